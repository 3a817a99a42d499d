//! A strict reader of `$batch` bodies, for the access policy.
//!
//! `$batch` inspection is a security boundary: what the proxy reads must be
//! what Dataverse will run, or a caller hides a denied operation from the
//! check. So this reader accepts only what it can read exactly and refuses
//! the rest (the policy answers 400 `bad_batch`), rather than guessing as a
//! lenient server would:
//!
//! - `multipart/mixed` per RFC 2046 §5.1.1: a delimiter is `--boundary` at
//!   the very start of the body or after CRLF, followed by optional
//!   transport padding and CRLF; the close delimiter adds `--`. Any other occurrence of the boundary text, in any
//!   letter case, is refused (RFC 2046 forbids it inside parts, and a reader
//!   that folds case or accepts LF-only lines would see a part there).
//!   Preamble and epilogue may hold only blank lines: OData clients send
//!   nothing there, and text there is where a broken delimiter hides a part.
//! - Every line of every head (part headers, embedded request line and
//!   headers) ends with CRLF: a bare CR or LF is refused.
//! - Each part is `application/http` (one operation) or, at the top level
//!   only, `multipart/mixed` (a change set); a part without `Content-Type`,
//!   or a change set inside a change set, is refused.
//! - Each embedded request head is parsed by `httparse` (one space between
//!   method, target and `HTTP/1.1`; no whitespace before a colon; no folded
//!   lines); its method must be one of the Web API's, in capitals.
//! - GET, HEAD and DELETE operations carry no body; `$n` references name a
//!   `Content-ID` defined earlier in the same change set; at most
//!   [`MAX_OPERATIONS`] operations (Dataverse's limit).
//!
//! The OData batch format and Dataverse's rules are in `docs/dataverse.md`
//! ("Batch requests").

use std::ops::Range;

use aho_corasick::AhoCorasick;

/// Dataverse runs at most 1,000 operations per batch.
pub const MAX_OPERATIONS: usize = 1000;

/// Headers read per part or embedded request head.
const MAX_HEADERS: usize = 64;

/// Why a batch body cannot be read exactly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BatchError(pub &'static str);

/// One header line of a part or of an embedded request.
#[derive(Debug, Clone)]
pub struct HeaderLine<'a> {
    /// The name as sent.
    pub name: &'a str,
    /// The value, without surrounding whitespace.
    pub value: &'a [u8],
    /// The whole line, CRLF included, as a range of the batch body.
    pub line: Range<usize>,
}

/// One operation of a batch.
#[derive(Debug, Clone)]
pub struct Operation<'a> {
    /// The method, exactly as sent (one of the Web API's).
    pub method: &'a str,
    /// The request target as sent: absolute URL, absolute path, a path
    /// relative to the service root, or a `$n` reference.
    pub target: &'a str,
    /// Inside a change set.
    pub in_change_set: bool,
    /// The MIME part's headers (`Content-Type`, `Content-ID`…).
    pub part_headers: Vec<HeaderLine<'a>>,
    /// The embedded request's headers.
    pub headers: Vec<HeaderLine<'a>>,
    /// The embedded request's body (empty for GET, HEAD, DELETE).
    pub body: &'a [u8],
}

/// Where an operation's target points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A Web API path with its query, e.g. `/api/data/v9.2/accounts?$top=1`.
    Path(String),
    /// `$n…`: an entity created earlier in the same change set.
    Reference,
}

impl Operation<'_> {
    /// Resolves the target against `service_root` (`/api/data/v9.2`);
    /// absolute URLs must start with one of `origins` (the org's origins and
    /// the proxy's public base, lower-case, no trailing slash).
    pub fn resolve(&self, service_root: &str, origins: &[String]) -> Result<Target, BatchError> {
        let t = self.target;
        if t.starts_with('$') && t[1..].starts_with(|c: char| c.is_ascii_digit()) {
            return Ok(Target::Reference);
        }
        if t.starts_with('/') {
            return Ok(Target::Path(t.to_owned()));
        }
        if let Some((scheme, _)) = t.split_once("://")
            && !scheme.contains(['/', '?', '('])
        {
            let lower = t.to_ascii_lowercase();
            let base = origins
                .iter()
                .find(|o| lower.starts_with(o.as_str()) && t[o.len()..].starts_with('/'))
                .ok_or(BatchError(
                    "an operation's absolute URL names another host than this org",
                ))?;
            return Ok(Target::Path(t[base.len()..].to_owned()));
        }
        Ok(Target::Path(format!("{service_root}/{t}")))
    }
}

/// The `boundary` parameter of a `multipart/mixed` content type.
pub fn boundary(content_type: &str) -> Option<&str> {
    let (kind, params) = content_type.split_once(';')?;
    if !kind.trim().eq_ignore_ascii_case("multipart/mixed") {
        return None;
    }
    let value = params.split(';').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim().eq_ignore_ascii_case("boundary").then(|| v.trim())
    })?;
    let value = match value.strip_prefix('"') {
        Some(quoted) => quoted.strip_suffix('"')?,
        None => value,
    };
    // RFC 2046 §5.1.1: 1 to 70 characters of `bchars`, not ending in a space.
    let valid = (1..=70).contains(&value.len())
        && !value.ends_with(' ')
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"'()+_,-./:=? ".contains(&b));
    valid.then_some(value)
}

/// Reads every operation of a batch body sent with `content_type`.
pub fn parse<'a>(content_type: &str, body: &'a [u8]) -> Result<Vec<Operation<'a>>, BatchError> {
    let boundary = boundary(content_type).ok_or(BatchError(
        "the Content-Type must be multipart/mixed with a valid boundary",
    ))?;
    let mut out = Vec::new();
    for part in split(body, 0, boundary)? {
        let head = part_head(body, part.clone())?;
        match head.kind {
            PartKind::Operation => {
                let op = operation(body, head, false)?;
                // `$n` names an entity of a change set: never valid outside one.
                check_reference(&op, &[])?;
                out.push(op);
            }
            PartKind::ChangeSet(inner) => {
                let mut ids: Vec<&str> = Vec::new();
                for op_part in split(&body[head.content.clone()], head.content.start, inner)? {
                    let op_head = part_head(body, op_part)?;
                    if !matches!(op_head.kind, PartKind::Operation) {
                        return Err(BatchError(
                            "a change set may not contain another change set",
                        ));
                    }
                    let content_id = op_head.content_id;
                    let op = operation(body, op_head, true)?;
                    check_reference(&op, &ids)?;
                    if let Some(id) = content_id {
                        ids.push(id);
                    }
                    out.push(op);
                }
            }
        }
        if out.len() > MAX_OPERATIONS {
            return Err(BatchError(
                "a batch holds at most 1,000 operations (Dataverse's limit)",
            ));
        }
    }
    Ok(out)
}

/// The body with the given lines cut out (ranges sorted, not overlapping).
pub fn without_lines(body: &[u8], lines: &[Range<usize>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    let mut at = 0;
    for line in lines {
        out.extend_from_slice(&body[at..line.start]);
        at = line.end;
    }
    out.extend_from_slice(&body[at..]);
    out
}

/// The parts of one multipart level: ranges of `body` (offset by `base`
/// into the whole batch body) between delimiters.
fn split(body: &[u8], base: usize, boundary: &str) -> Result<Vec<Range<usize>>, BatchError> {
    let delimiter = format!("--{boundary}");
    let finder = AhoCorasick::builder()
        .ascii_case_insensitive(true)
        .build([delimiter.as_bytes()])
        .map_err(|_| BatchError("the boundary cannot be searched for"))?;
    let mut parts = Vec::new();
    let mut open: Option<usize> = None;
    let mut closed = false;
    for found in finder.find_iter(body) {
        let (at, end) = (found.start(), found.end());
        let exact = &body[at..end] == delimiter.as_bytes();
        let line_start = at == 0 || body[..at].ends_with(b"\r\n");
        if closed || !exact || !line_start {
            return Err(BatchError(
                "the boundary appears inside a part, in the epilogue, or not at the start of a CRLF line",
            ));
        }
        if parts.is_empty() && open.is_none() && !is_blank(&body[..at]) {
            // RFC 2046 allows a preamble; OData clients send none, and text
            // there is where a broken delimiter would hide a part.
            return Err(BatchError("there is text before the first delimiter"));
        }
        if let Some(start) = open.take() {
            // The CRLF before a delimiter belongs to the delimiter.
            parts.push(base + start..base + at.saturating_sub(2).max(start));
        }
        let rest = &body[end..];
        let padded = rest
            .iter()
            .take_while(|b| matches!(b, b' ' | b'\t'))
            .count();
        let (is_close, after) = match rest.strip_prefix(b"--") {
            Some(r) => (true, r),
            None => (false, &rest[padded..]),
        };
        if is_close {
            let padded = after
                .iter()
                .take_while(|b| matches!(b, b' ' | b'\t'))
                .count();
            let after = &after[padded..];
            if !(after.is_empty() || after.starts_with(b"\r\n")) {
                return Err(BatchError("the close delimiter is not followed by CRLF"));
            }
            if !is_blank(after) {
                return Err(BatchError("there is text after the close delimiter"));
            }
            closed = true;
        } else if after.starts_with(b"\r\n") {
            open = Some(end + padded + 2);
        } else {
            return Err(BatchError("a delimiter line does not end with CRLF"));
        }
    }
    if !closed {
        return Err(BatchError("the close delimiter (--boundary--) is missing"));
    }
    Ok(parts)
}

enum PartKind<'a> {
    Operation,
    ChangeSet(&'a str),
}

struct PartHead<'a> {
    kind: PartKind<'a>,
    content_id: Option<&'a str>,
    headers: Vec<HeaderLine<'a>>,
    content: Range<usize>,
}

/// Reads a part's MIME headers: what it holds, its `Content-ID`.
fn part_head(body: &[u8], part: Range<usize>) -> Result<PartHead<'_>, BatchError> {
    let bytes = &body[part.clone()];
    let head_len = memchr::memmem::find(bytes, b"\r\n\r\n")
        .map(|i| i + 4)
        .or_else(|| bytes.starts_with(b"\r\n").then_some(2))
        .ok_or(BatchError("a part has no empty line after its headers"))?;
    let headers = header_lines(body, part.start, head_len, 0)?;
    let find = |name: &str| {
        headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let content_type = find("content-type").ok_or(BatchError("a part has no Content-Type"))?;
    let content_id = find("content-id");
    let kind = if media_type_is(content_type, "application/http") {
        PartKind::Operation
    } else if let Some(inner) = boundary(content_type) {
        PartKind::ChangeSet(inner)
    } else {
        return Err(BatchError(
            "a part is neither application/http nor a multipart/mixed change set",
        ));
    };
    Ok(PartHead {
        kind,
        content_id,
        headers,
        content: part.start + head_len..part.end,
    })
}

/// Reads one embedded HTTP request.
fn operation<'a>(
    body: &'a [u8],
    head: PartHead<'a>,
    in_change_set: bool,
) -> Result<Operation<'a>, BatchError> {
    let content = &body[head.content.clone()];
    if content.starts_with(b"\r") || content.starts_with(b"\n") {
        return Err(BatchError(
            "an operation does not start with its request line",
        ));
    }
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut raw);
    let head_len = match req.parse(content) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return Err(BatchError("an operation's request head is incomplete"));
        }
        Err(_) => return Err(BatchError("an operation's request head cannot be parsed")),
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Err(BatchError(
            "an operation's request line is not METHOD target HTTP/1.1",
        ));
    };
    if !matches!(method, "GET" | "HEAD" | "POST" | "PATCH" | "PUT" | "DELETE") {
        return Err(BatchError(
            "an operation's method is not one of the Web API's (GET, HEAD, POST, PATCH, PUT, DELETE, in capitals)",
        ));
    }
    let request_line = memchr::memmem::find(content, b"\r\n").map_or(0, |i| i + 2);
    let headers = header_lines(body, head.content.start, head_len, request_line)?;
    let rest = &content[head_len..];
    if matches!(method, "GET" | "HEAD" | "DELETE")
        && rest.iter().any(|b| !matches!(b, b'\r' | b'\n'))
    {
        return Err(BatchError("a GET, HEAD or DELETE operation carries a body"));
    }
    Ok(Operation {
        method,
        target,
        in_change_set,
        part_headers: head.headers,
        headers,
        body: rest,
    })
}

/// The header lines of a head that starts at `start` in `body`, is
/// `head_len` bytes long (its empty line included), and whose first
/// `skip` bytes are a request line. Every line must end with CRLF.
fn header_lines(
    body: &[u8],
    start: usize,
    head_len: usize,
    skip: usize,
) -> Result<Vec<HeaderLine<'_>>, BatchError> {
    let head = &body[start..start + head_len];
    if !crlf_only(head) {
        return Err(BatchError(
            "a line in a part or operation head does not end with CRLF",
        ));
    }
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let block = &head[skip..];
    match httparse::parse_headers(block, &mut raw) {
        Ok(httparse::Status::Complete((n, _))) if n == block.len() => {}
        Ok(_) => {
            return Err(BatchError(
                "a head has more than 64 headers or is incomplete",
            ));
        }
        Err(_) => return Err(BatchError("a header line cannot be parsed")),
    }
    // With CRLF-only lines and no folding, each line is one header, in order.
    let mut out = Vec::new();
    let mut at = start + skip;
    let end = start + head_len - 2;
    for parsed in raw.iter().take_while(|h| !h.name.is_empty()) {
        let line_end = memchr::memmem::find(&body[at..end], b"\r\n")
            .map(|i| at + i + 2)
            .ok_or(BatchError("a header line cannot be parsed"))?;
        let name = body
            .get(at..at + parsed.name.len())
            .filter(|n| *n == parsed.name.as_bytes())
            .and_then(|n| std::str::from_utf8(n).ok())
            .ok_or(BatchError("a header line cannot be parsed"))?;
        out.push(HeaderLine {
            name,
            value: trim(value_of(&body[at..line_end], name.len())),
            line: at..line_end,
        });
        at = line_end;
    }
    if at != end {
        return Err(BatchError("a header line cannot be parsed"));
    }
    Ok(out)
}

/// The bytes after `name:` on a line, CRLF cut.
fn value_of(line: &[u8], name_len: usize) -> &[u8] {
    let line = line.strip_suffix(b"\r\n").unwrap_or(line);
    line.get(name_len + 1..).unwrap_or_default()
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |i| i + 1);
    &v[start..end]
}

/// Only spaces, tabs and line ends.
fn is_blank(s: &[u8]) -> bool {
    s.iter().all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
}

/// True when every CR is followed by LF and every LF follows a CR.
fn crlf_only(s: &[u8]) -> bool {
    s.iter().enumerate().all(|(i, &b)| match b {
        b'\r' => s.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && s[i - 1] == b'\r',
        _ => true,
    })
}

fn media_type_is(content_type: &str, expected: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case(expected))
}

/// A `$n` reference must name a `Content-ID` defined earlier in the change set.
fn check_reference(op: &Operation<'_>, defined: &[&str]) -> Result<(), BatchError> {
    let Some(rest) = op.target.strip_prefix('$') else {
        return Ok(());
    };
    let id: String = rest.chars().take_while(char::is_ascii_digit).collect();
    if id.is_empty() {
        return Ok(());
    }
    if defined.contains(&id.as_str()) {
        Ok(())
    } else {
        Err(BatchError(
            "a $n reference names no Content-ID defined earlier in its change set",
        ))
    }
}

pub mod long_get;

#[cfg(test)]
mod tests;
