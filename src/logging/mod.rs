//! Log lines on stderr: the request line of every request (built by hand,
//! [`line`]) and every other event (`tracing`'s formatter), both through one
//! bounded, buffered writer off the request's path ([`writer`]).
//!
//! Log lines carry no span context: spans are for traces
//! ([`crate::telemetry`]), and the request line has the request id.

pub mod line;
pub mod writer;

use std::io::IsTerminal as _;
use std::sync::OnceLock;

use crate::config::LogFormat;
pub use line::RequestLine;
use writer::{Flusher, LineWriter};

/// Where the request line goes, once [`init`] has run.
struct Output {
    writer: LineWriter,
    format: LogFormat,
    colours: bool,
    /// `RUST_LOG` admits the request line (target `dataverse_proxy::access`
    /// at `info`); decided once, as `RUST_LOG` is read once.
    requests: bool,
}

static OUTPUT: OnceLock<Output> = OnceLock::new();

/// Writes what is left in the buffer when dropped (keep it until the
/// process is done logging).
#[must_use = "dropping it ends buffered logging"]
pub struct LogGuard(Option<Flusher>);

impl LogGuard {
    /// Writes every line logged so far.
    pub fn flush(&self) {
        if let Some(f) = &self.0 {
            f.flush();
        }
    }
}

/// Sets up logging to stderr; `RUST_LOG` filters (default `info`). Colours
/// only when stderr is a terminal. A second call (tests) changes nothing.
pub fn init(format: LogFormat) -> LogGuard {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::filter::FilterExt as _;
    use tracing_subscriber::filter::{LevelFilter, filter_fn};
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    if OUTPUT.get().is_some() {
        return LogGuard(None);
    }
    let colours = std::io::stderr().is_terminal();
    let (writer, flusher) = LineWriter::start(Box::new(std::io::stderr()));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer.clone())
        .with_ansi(colours);
    let fmt = match format {
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    // Each layer filters for itself: RUST_LOG decides what is logged, not
    // which spans are exported. The log sees events only, so spans cost
    // nothing unless traces are exported.
    // The hint keeps `RUST_LOG`'s level as the global maximum, so that
    // disabled levels stay a static check everywhere.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let level = filter.max_level_hint().unwrap_or(LevelFilter::TRACE);
    let events = filter_fn(|meta| meta.is_event()).with_max_level_hint(level);
    let registry = tracing_subscriber::registry().with(fmt.with_filter(filter.and(events)));
    let spans = crate::telemetry::layer().map(|layer| {
        layer.with_filter(filter_fn(|meta| {
            meta.is_span() && meta.target().starts_with("dataverse_proxy")
        }))
    });
    // Without traces no layer at all: an absent layer (`None`) still
    // declares an interest in every span, which would make each one.
    let installed = match spans {
        Some(spans) => registry.with(spans).try_init(),
        None => registry.try_init(),
    };
    if installed.is_err() {
        return LogGuard(None);
    }
    let requests = tracing::enabled!(
        kind: tracing::metadata::Kind::EVENT,
        target: "dataverse_proxy::access",
        tracing::Level::INFO
    );
    let output = Output {
        writer,
        format,
        colours,
        requests,
    };
    match OUTPUT.set(output) {
        Ok(()) => LogGuard(Some(flusher)),
        Err(_) => LogGuard(None),
    }
}

/// Whether request lines are written (skip building one otherwise).
pub fn requests_logged() -> bool {
    OUTPUT.get().is_some_and(|o| o.requests)
}

thread_local! {
    /// Each thread builds its lines here, so a line costs no allocation.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Writes a request line, if request lines are logged.
pub fn request(line: &RequestLine<'_>) {
    let Some(output) = OUTPUT.get().filter(|o| o.requests) else {
        return;
    };
    SCRATCH.with_borrow_mut(|scratch| {
        scratch.clear();
        line.write(output.format, output.colours, scratch);
        output.writer.append(scratch);
    });
}

/// Log lines dropped since the start because the output could not keep up.
pub fn dropped_lines() -> u64 {
    OUTPUT.get().map_or(0, |o| o.writer.dropped())
}
