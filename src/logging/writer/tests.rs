use std::sync::mpsc;

use super::*;

/// An output that keeps what it is given and, while `gate` is held by
/// the test, blocks every write (a slow pipe).
#[derive(Clone, Default)]
struct Output {
    written: Arc<Mutex<Vec<u8>>>,
    gate: Arc<Mutex<()>>,
    writes: Arc<AtomicU64>,
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _open = lock(&self.gate);
        self.writes.fetch_add(1, Ordering::Relaxed);
        lock(&self.written).extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Output {
    fn lines(&self) -> Vec<String> {
        String::from_utf8(lock(&self.written).clone())
            .expect("utf-8")
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

fn line(i: usize) -> Vec<u8> {
    format!("line {i:05} {}\n", "x".repeat(90)).into_bytes()
}

#[test]
fn lines_leave_in_order_and_none_is_left_at_the_end() {
    let output = Output::default();
    let (writer, flusher) = LineWriter::with_bounds(Box::new(output.clone()), LIMIT, FLUSH_EVERY);
    for i in 0..2_000 {
        assert!(writer.append(&line(i)));
    }
    drop(flusher);
    let lines = output.lines();
    assert_eq!(lines.len(), 2_000);
    assert!(
        lines
            .iter()
            .enumerate()
            .all(|(i, l)| l.starts_with(&format!("line {i:05}")))
    );
    // ~200 KB left in a few writes, not one per line.
    assert!(output.writes.load(Ordering::Relaxed) < 20);
    assert_eq!(writer.dropped(), 0);
}

#[test]
fn a_quiet_log_is_written_within_the_interval() {
    let output = Output::default();
    let (writer, _flusher) =
        LineWriter::with_bounds(Box::new(output.clone()), LIMIT, Duration::from_millis(20));
    writer.append(b"only line\n");
    let begun = Instant::now();
    while output.lines().is_empty() {
        assert!(begun.elapsed() < Duration::from_secs(10), "never written");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(output.lines(), ["only line"]);
}

#[test]
fn a_stuck_output_never_blocks_the_logger_and_every_dropped_line_is_counted() {
    let output = Output::default();
    let gate = lock(&output.gate);
    let limit = 64 * 1024;
    let (writer, flusher) =
        LineWriter::with_bounds(Box::new(output.clone()), limit, Duration::from_millis(1));
    // The thread takes what is buffered and blocks on the stuck output;
    // the logger goes on appending, on its own thread, and never waits.
    let (done, finished) = mpsc::channel();
    let logger = writer.clone();
    std::thread::spawn(move || {
        let kept = (0..5_000).filter(|&i| logger.append(&line(i))).count();
        done.send(kept).expect("send");
    });
    let kept = finished
        .recv_timeout(Duration::from_secs(30))
        .expect("the logger was blocked by the output");
    drop(gate);
    drop(flusher);
    let written = output.lines();
    assert!(kept < 5_000, "the buffer is bounded");
    assert_eq!(written.len(), kept, "every kept line is written");
    assert_eq!(writer.dropped(), (5_000 - kept) as u64);
    // The buffer never held more than its limit (~100-byte lines).
    assert!(kept * 100 <= 2 * limit, "{kept} lines kept");
}

#[test]
fn a_failed_output_counts_its_lines_as_dropped() {
    struct Closed;
    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let (writer, flusher) = LineWriter::start(Box::new(Closed));
    for i in 0..3 {
        writer.append(&line(i));
    }
    drop(flusher);
    assert_eq!(writer.dropped(), 3);
}
