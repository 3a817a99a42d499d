//! The one writer of every log line: lines are appended to a bounded
//! buffer on the thread that logs them, and a thread of its own writes the
//! buffer out when it passes [`FLUSH_AT`] or at least every [`FLUSH_EVERY`],
//! as nginx's `access_log … buffer=64k flush=1s` does. A request never
//! waits on the output: when the output cannot keep up (a slow pipe) and
//! the buffer is full, the line is dropped and counted, and the count is
//! reported in the log and in a metric.
//!
//! Hand-written: tracing-appender's non-blocking writer allocates every
//! line and writes as soon as its thread wakes (a write per line under
//! light load), and has no time-based flush.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The output is written once the buffer holds this much.
pub const FLUSH_AT: usize = 64 * 1024;
/// The longest a line waits in the buffer.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// The most the buffer holds while the output is behind; lines past it
/// are dropped and counted.
pub const LIMIT: usize = 1024 * 1024;

/// Appends lines to the buffer; cheap to clone.
#[derive(Clone)]
pub struct LineWriter {
    shared: Arc<Shared>,
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    /// Held while writing, so lines leave in the order they came.
    output: Mutex<Box<dyn Write + Send>>,
    dropped: AtomicU64,
    limit: usize,
    every: Duration,
}

struct Pending {
    lines: Vec<u8>,
    /// Closed: the thread has ended and lines are written at once.
    closed: bool,
}

/// Writes what is left and stops the writer's thread when dropped.
pub struct Flusher {
    writer: LineWriter,
    thread: Option<JoinHandle<()>>,
}

impl LineWriter {
    /// Starts the writer's thread over `output`; the [`Flusher`] writes the
    /// rest when the process is done logging.
    pub fn start(output: Box<dyn Write + Send>) -> (Self, Flusher) {
        Self::with_bounds(output, LIMIT, FLUSH_EVERY)
    }

    fn with_bounds(
        output: Box<dyn Write + Send>,
        limit: usize,
        every: Duration,
    ) -> (Self, Flusher) {
        let writer = Self {
            shared: Arc::new(Shared {
                pending: Mutex::new(Pending {
                    lines: Vec::with_capacity(FLUSH_AT * 2),
                    closed: false,
                }),
                wake: Condvar::new(),
                output: Mutex::new(output),
                dropped: AtomicU64::new(0),
                limit,
                every,
            }),
        };
        let shared = writer.shared.clone();
        let thread = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || shared.run())
            .ok();
        if thread.is_none() {
            // No thread: every line is written at once.
            lock(&writer.shared.pending).closed = true;
        }
        let flusher = Flusher {
            writer: writer.clone(),
            thread,
        };
        (writer, flusher)
    }

    /// Appends one or more whole lines; false if they were dropped because
    /// the buffer is full.
    pub fn append(&self, lines: &[u8]) -> bool {
        let mut pending = lock(&self.shared.pending);
        if pending.closed {
            pending.lines.extend_from_slice(lines);
            drop(pending);
            self.shared.write(&mut Vec::new());
            return true;
        }
        let len = pending.lines.len();
        if len + lines.len() > self.shared.limit {
            drop(pending);
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        pending.lines.extend_from_slice(lines);
        if len < FLUSH_AT && len + lines.len() >= FLUSH_AT {
            self.shared.wake.notify_one();
        }
        true
    }

    /// Lines dropped since the start because the output was behind.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

impl Shared {
    /// The thread: waits for a full buffer or the flush interval, writes.
    fn run(&self) {
        let mut spare = Vec::with_capacity(FLUSH_AT * 2);
        let mut reported = 0;
        loop {
            let closed = self.wait_for_lines();
            self.write(&mut spare);
            reported = self.report_dropped(reported);
            if closed {
                return;
            }
        }
    }

    /// Blocks until the buffer passes [`FLUSH_AT`], the interval is over or
    /// the writer is closed (true).
    fn wait_for_lines(&self) -> bool {
        let deadline = Instant::now() + self.every;
        let mut pending = lock(&self.pending);
        while pending.lines.len() < FLUSH_AT && !pending.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            pending = self
                .wake
                .wait_timeout(pending, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        pending.closed
    }

    /// Swaps the buffer with `spare` (keeping both allocations) and writes
    /// it; a failed write counts its lines as dropped.
    fn write(&self, spare: &mut Vec<u8>) {
        let mut output = lock(&self.output);
        std::mem::swap(&mut lock(&self.pending).lines, spare);
        if spare.is_empty() {
            return;
        }
        if output
            .write_all(spare)
            .and_then(|()| output.flush())
            .is_err()
        {
            let lines = spare.iter().filter(|&&b| b == b'\n').count();
            self.dropped.fetch_add(lines as u64, Ordering::Relaxed);
        }
        spare.clear();
    }

    /// Says in the log how many lines were dropped since the last report.
    fn report_dropped(&self, reported: u64) -> u64 {
        let dropped = self.dropped.load(Ordering::Relaxed);
        if dropped > reported {
            tracing::warn!(
                dropped = dropped - reported,
                dropped_total = dropped,
                "log lines dropped: the log output could not keep up (see dataverse_proxy_log_lines_dropped_total)"
            );
        }
        dropped
    }
}

impl Flusher {
    /// Writes every line appended so far (the thread keeps running).
    pub fn flush(&self) {
        self.writer.shared.write(&mut Vec::new());
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        lock(&self.writer.shared.pending).closed = true;
        self.writer.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // Lines appended after the thread's last write.
        self.flush();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Each event the `tracing` formatter writes is one `write_all` of whole
/// lines, appended as they are.
impl Write for &LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LineWriter {
    type Writer = &'a LineWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

#[cfg(test)]
mod tests;
