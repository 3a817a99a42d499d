//! The request line, written by hand into the writer's buffer: a fixed
//! set of fields needs no formatting machinery, and going through
//! `tracing`'s formatter cost more than the rest of the request.
//!
//! Both formats escape every value that needs it (quotes, backslashes,
//! control characters), so no field can start a line of its own.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config::LogFormat;

/// The request line's target, a contract (docs/logging.md).
pub const TARGET: &str = "dataverse_proxy::access";

/// The fields of one request line (docs/logging.md).
#[derive(Debug)]
pub struct RequestLine<'a> {
    pub request_id: &'a str,
    pub caller: &'a str,
    pub principal: &'a str,
    pub org: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration_ms: u64,
    pub upstream_ms: u64,
    pub dataverse_request_id: &'a str,
    pub cache: &'a str,
    pub proxy_error: &'a str,
    pub error: &'a str,
    pub outcome: &'a str,
}

/// How a line's fields are written.
trait Fields {
    fn text(&mut self, key: &str, value: &str);
    fn number(&mut self, key: &str, value: u64);
}

impl RequestLine<'_> {
    /// Appends the line, with its newline, to `out`.
    pub fn write(&self, format: LogFormat, colours: bool, out: &mut Vec<u8>) {
        match format {
            LogFormat::Json => {
                out.extend_from_slice(b"{\"timestamp\":\"");
                timestamp(out);
                out.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"request\"");
                self.fields(&mut Json(out));
                out.extend_from_slice(b",\"target\":\"");
                out.extend_from_slice(TARGET.as_bytes());
                out.extend_from_slice(b"\"}\n");
            }
            LogFormat::Text => {
                timestamp(out);
                out.extend_from_slice(match colours {
                    true => b"  \x1b[32mINFO\x1b[0m \x1b[2mdataverse_proxy::access\x1b[0m: request",
                    false => b"  INFO dataverse_proxy::access: request",
                });
                self.fields(&mut Text(out));
                out.push(b'\n');
            }
        }
    }

    fn fields(&self, f: &mut impl Fields) {
        f.text("request.id", self.request_id);
        f.text("caller", self.caller);
        f.text("principal", self.principal);
        f.text("org", self.org);
        f.text("method", self.method);
        f.text("path", self.path);
        f.number("status", u64::from(self.status));
        f.number("bytes_in", self.bytes_in);
        f.number("bytes_out", self.bytes_out);
        f.number("duration_ms", self.duration_ms);
        f.number("upstream_ms", self.upstream_ms);
        f.text("dataverse_request_id", self.dataverse_request_id);
        f.text("cache", self.cache);
        f.text("proxy_error", self.proxy_error);
        f.text("error", self.error);
        f.text("outcome", self.outcome);
    }
}

/// `,"key":value`.
struct Json<'a>(&'a mut Vec<u8>);

impl Fields for Json<'_> {
    fn text(&mut self, key: &str, value: &str) {
        self.key(key);
        quoted(self.0, value);
    }

    fn number(&mut self, key: &str, value: u64) {
        self.key(key);
        self.0
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }
}

impl Json<'_> {
    fn key(&mut self, key: &str) {
        self.0.extend_from_slice(b",\"");
        self.0.extend_from_slice(key.as_bytes());
        self.0.extend_from_slice(b"\":");
    }
}

/// ` key=value`, the value quoted when it is empty or holds anything but
/// visible ASCII.
struct Text<'a>(&'a mut Vec<u8>);

impl Fields for Text<'_> {
    fn text(&mut self, key: &str, value: &str) {
        self.key(key);
        let bare = !value.is_empty()
            && value
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
        if bare {
            self.0.extend_from_slice(value.as_bytes());
        } else {
            quoted(self.0, value);
        }
    }

    fn number(&mut self, key: &str, value: u64) {
        self.key(key);
        self.0
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    }
}

impl Text<'_> {
    fn key(&mut self, key: &str) {
        self.0.push(b' ');
        self.0.extend_from_slice(key.as_bytes());
        self.0.push(b'=');
    }
}

/// A JSON string (quotes, backslashes and control characters escaped).
fn quoted(out: &mut Vec<u8>, value: &str) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, value);
}

thread_local! {
    /// The second last formatted and its `YYYY-MM-DDTHH:MM:SS.`.
    static SECOND: RefCell<(u64, [u8; 20])> = const { RefCell::new((u64::MAX, [0; 20])) };
}

/// `2026-11-26T21:47:00.781838Z`, UTC, as `tracing`'s formatter writes it;
/// the date and time are formatted once a second per thread.
fn timestamp(out: &mut Vec<u8>) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    SECOND.with_borrow_mut(|(second, text)| {
        if *second != now.as_secs() {
            *second = now.as_secs();
            *text = date_time(now.as_secs());
        }
        out.extend_from_slice(text);
    });
    // Six digits with their leading zeros: 1_000_000 + µs, less the 1.
    let mut micros = itoa::Buffer::new();
    out.extend_from_slice(&micros.format(now.subsec_micros() + 1_000_000).as_bytes()[1..]);
    out.push(b'Z');
}

/// `YYYY-MM-DDTHH:MM:SS.` of a Unix time.
fn date_time(unix: u64) -> [u8; 20] {
    let at = time::OffsetDateTime::from_unix_timestamp(unix as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let mut text = *b"0000-00-00T00:00:00.";
    let mut put = |at: usize, value: u32, width: usize| {
        let mut v = value;
        for i in (at..at + width).rev() {
            text[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, at.year().clamp(0, 9999) as u32, 4);
    put(5, u32::from(u8::from(at.month())), 2);
    put(8, u32::from(at.day()), 2);
    put(11, u32::from(at.hour()), 2);
    put(14, u32::from(at.minute()), 2);
    put(17, u32::from(at.second()), 2);
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line() -> RequestLine<'static> {
        RequestLine {
            request_id: "e7fb45e3",
            caller: "-",
            principal: "-",
            org: "default",
            method: "GET",
            path: "/api/data/v9.2/leads",
            status: 200,
            bytes_in: 0,
            bytes_out: 734,
            duration_ms: 3,
            upstream_ms: 2,
            dataverse_request_id: "",
            cache: "-",
            proxy_error: "",
            error: "say \"no\"\nnext line",
            outcome: "complete",
        }
    }

    #[test]
    fn json_line_is_one_object_with_every_field() {
        let mut out = Vec::new();
        line().write(LogFormat::Json, false, &mut out);
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["target"], TARGET);
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["request.id"], "e7fb45e3");
        assert_eq!(v["status"], 200);
        assert_eq!(v["error"], "say \"no\"\nnext line");
        let ts = v["timestamp"].as_str().expect("timestamp");
        assert_eq!(ts.len(), 27, "{ts}");
        assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{ts}");
    }

    #[test]
    fn text_line_quotes_what_needs_it_and_colours_only_when_asked() {
        let mut out = Vec::new();
        line().write(LogFormat::Text, false, &mut out);
        let text = String::from_utf8(out).expect("utf-8");
        assert_eq!(text.matches('\n').count(), 1, "{text}");
        assert!(!text.contains('\x1b'), "{text}");
        assert!(
            text.contains(" INFO dataverse_proxy::access: request request.id=e7fb45e3 caller=- ")
        );
        assert!(text.contains(r#" dataverse_request_id="" "#), "{text}");
        assert!(
            text.contains(r#" error="say \"no\"\nnext line" "#),
            "{text}"
        );
        let mut coloured = Vec::new();
        line().write(LogFormat::Text, true, &mut coloured);
        assert!(coloured.contains(&0x1b));
    }

    #[test]
    fn dates_are_utc_civil_dates() {
        assert_eq!(&date_time(0), b"1970-01-01T00:00:00.");
        // 2024-02-29T23:59:59Z, a leap day.
        assert_eq!(&date_time(1_709_251_199), b"2024-02-29T23:59:59.");
    }
}
