//! The simulator's own `multipart/mixed` reader for `$batch` bodies (RFC
//! 2046 §5.1, as the OData batch format uses it), lenient as a server is
//! (LF-only lines are read too). The proxy does not use it: its strict
//! reader is the proxy's own `batch` module, so the two are independent.

/// One MIME part: its headers and content.
pub struct Part<'a> {
    /// Part headers, in order.
    pub headers: Vec<(String, String)>,
    /// The part's content (for `application/http`: a whole HTTP request).
    pub content: &'a [u8],
}

impl Part<'_> {
    /// A part header's value, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The `boundary` parameter of a `multipart/mixed` content type.
pub fn boundary(content_type: &str) -> Option<String> {
    let (kind, params) = content_type.split_once(';')?;
    if !kind.trim().eq_ignore_ascii_case("multipart/mixed") {
        return None;
    }
    params.split(';').find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_owned())
    })
}

/// Splits a multipart body into its parts; `None` unless the closing
/// delimiter is there.
pub fn split<'a>(body: &'a [u8], boundary: &str) -> Option<Vec<Part<'a>>> {
    let delimiter = format!("--{boundary}");
    let finder = memchr::memmem::Finder::new(delimiter.as_bytes());
    let positions: Vec<usize> = finder.find_iter(body).collect();
    let mut parts = Vec::new();
    for pair in positions.windows(2) {
        let mut segment = &body[pair[0] + delimiter.len()..pair[1]];
        if segment.starts_with(b"--") {
            break;
        }
        segment = strip_crlf_start(segment);
        segment = segment
            .strip_suffix(b"\r\n")
            .or_else(|| segment.strip_suffix(b"\n"))
            .unwrap_or(segment);
        let (head, content) = split_head(segment)?;
        parts.push(Part {
            headers: parse_headers(head),
            content,
        });
    }
    let last = *positions.last()?;
    body[last + delimiter.len()..]
        .starts_with(b"--")
        .then_some(parts)
}

fn strip_crlf_start(s: &[u8]) -> &[u8] {
    s.strip_prefix(b"\r\n")
        .or_else(|| s.strip_prefix(b"\n"))
        .unwrap_or(s)
}

/// Splits at the first empty line: (header block, rest).
pub fn split_head(s: &[u8]) -> Option<(&[u8], &[u8])> {
    if let Some(i) = memchr::memmem::find(s, b"\r\n\r\n") {
        return Some((&s[..i], &s[i + 4..]));
    }
    if let Some(i) = memchr::memmem::find(s, b"\n\n") {
        return Some((&s[..i], &s[i + 2..]));
    }
    // Headers only, no body.
    Some((s, &[]))
}

/// `Name: value` lines.
pub fn parse_headers(block: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(block)
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_owned(), v.trim().to_owned()))
        })
        .collect()
}
