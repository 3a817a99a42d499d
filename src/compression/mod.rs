//! Content codings on the Dataverse hop (pure negotiation here; the
//! streaming codecs in [`stream`]).
//!
//! The proxy asks Dataverse for compressed answers ([`UPSTREAM_ACCEPT`]):
//! the WAN hop is the slow one, and Dataverse's JSON shrinks 5–10 ×. What
//! the caller gets follows its own `Accept-Encoding`, q-values included
//! ([`AcceptEncoding`]): Dataverse's bytes untouched when it accepts them
//! and nothing needs rewriting, else decoded, rewritten and, when it
//! accepts a coding, encoded again ([`Transcode`]).
//!
//! A caller that sends no `Accept-Encoding` gets identity. RFC 9110 would
//! allow any coding then, but Dataverse clients exist that never decode
//! (docs/dataverse.md, "Compression and caching").

pub mod stream;

use axum::http::{HeaderMap, HeaderValue, header};

/// What the proxy sends Dataverse as `Accept-Encoding`: every coding it can
/// decode, gzip first (the one Dataverse is known to use).
pub const UPSTREAM_ACCEPT: HeaderValue = HeaderValue::from_static("gzip, br, deflate");

/// A content coding the proxy can decode and encode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    /// `br`.
    Brotli,
    /// `deflate`: zlib-wrapped DEFLATE, as HTTP means it (RFC 9110 §8.4.1.2).
    Deflate,
}

impl Coding {
    /// Every coding, in the order the proxy prefers when a caller's
    /// q-values tie (gzip: cheapest to produce for its size).
    pub const ALL: [Coding; 3] = [Coding::Gzip, Coding::Brotli, Coding::Deflate];

    /// The token in `Content-Encoding` and `Accept-Encoding`.
    pub fn token(self) -> &'static str {
        match self {
            Self::Gzip => "gzip",
            Self::Brotli => "br",
            Self::Deflate => "deflate",
        }
    }

    fn from_token(token: &str) -> Option<Self> {
        let token = token.trim();
        if token.eq_ignore_ascii_case("gzip") || token.eq_ignore_ascii_case("x-gzip") {
            Some(Self::Gzip)
        } else if token.eq_ignore_ascii_case("br") {
            Some(Self::Brotli)
        } else if token.eq_ignore_ascii_case("deflate") {
            Some(Self::Deflate)
        } else {
            None
        }
    }
}

/// The coding of a body, from its `Content-Encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyCoding {
    /// None (or `identity`).
    #[default]
    Identity,
    Coded(Coding),
    /// A coding the proxy cannot decode, or several stacked: the body can
    /// only pass through as it is.
    Unknown,
}

impl BodyCoding {
    pub fn of(headers: &HeaderMap) -> Self {
        let mut values = headers.get_all(header::CONTENT_ENCODING).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return if headers.contains_key(header::CONTENT_ENCODING) {
                Self::Unknown
            } else {
                Self::Identity
            };
        };
        Self::of_value(value)
    }

    /// The coding one `Content-Encoding` value names.
    pub fn of_value(value: &HeaderValue) -> Self {
        let Ok(value) = value.to_str() else {
            return Self::Unknown;
        };
        let value = value.trim();
        if value.is_empty() || value.eq_ignore_ascii_case("identity") {
            return Self::Identity;
        }
        Coding::from_token(value).map_or(Self::Unknown, Self::Coded)
    }
}

/// A caller's `Accept-Encoding`: which codings it takes, with their q-values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AcceptEncoding {
    /// q-values (0.0 – 1.0) of each coding of [`Coding::ALL`], in order;
    /// 0 where the caller refuses or did not name it.
    q: [f32; 3],
}

impl AcceptEncoding {
    /// Parses every `Accept-Encoding` line; no header means identity only.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let mut named: [Option<f32>; 3] = [None; 3];
        let mut any = None;
        for value in headers.get_all(header::ACCEPT_ENCODING) {
            let Ok(value) = value.to_str() else { continue };
            for item in value.split(',') {
                let mut params = item.split(';');
                let token = params.next().unwrap_or("").trim();
                let q = params.find_map(q_value).unwrap_or(1.0);
                if token == "*" {
                    any = Some(q);
                } else if let Some(c) = Coding::from_token(token) {
                    named[index(c)] = Some(q);
                }
            }
        }
        // `*` stands for every coding not named (RFC 9110 §12.5.3).
        let q = named.map(|q| q.or(any).unwrap_or(0.0));
        Self { q }
    }

    /// Whether the caller takes `coding`.
    pub fn accepts(&self, coding: Coding) -> bool {
        self.q[index(coding)] > 0.0
    }

    /// The coding to send when the proxy encodes anyway: the caller's
    /// highest q-value, ties going to `current` (Dataverse's coding) and
    /// then to [`Coding::ALL`]'s order; `None` for identity.
    pub fn choose(&self, current: Coding) -> Option<Coding> {
        std::iter::once(current)
            .chain(Coding::ALL)
            .filter(|c| self.accepts(*c))
            .fold(None, |best: Option<Coding>, c| match best {
                Some(b) if self.q[index(b)] >= self.q[index(c)] => Some(b),
                _ => Some(c),
            })
    }
}

fn index(coding: Coding) -> usize {
    match coding {
        Coding::Gzip => 0,
        Coding::Brotli => 1,
        Coding::Deflate => 2,
    }
}

/// `q=0.5` → 0.5; a malformed q-value counts as 0 (not acceptable), the
/// safe reading of a caller that said something about it.
fn q_value(param: &str) -> Option<f32> {
    let (name, value) = param.split_once('=')?;
    if !name.trim().eq_ignore_ascii_case("q") {
        return None;
    }
    Some(
        value
            .trim()
            .parse::<f32>()
            .ok()
            .filter(|q| (0.0..=1.0).contains(q))
            .unwrap_or(0.0),
    )
}

/// What the answer step does with a body's coding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transcode {
    /// Dataverse's bytes go out as they came.
    Untouched,
    /// Decoded from `from` (links rewritten on the way when the answer has
    /// any) and encoded as `to`, or sent as identity when `to` is `None`.
    Recode { from: Coding, to: Option<Coding> },
}

impl Transcode {
    /// Decides for a body with `coding` whose links need rewriting or not,
    /// for a caller who sent `accept`. An identity body is the rewriter's
    /// business alone, and an unknown coding cannot be opened.
    pub fn decide(coding: BodyCoding, rewrite: bool, accept: &AcceptEncoding) -> Self {
        let BodyCoding::Coded(from) = coding else {
            return Self::Untouched;
        };
        if !rewrite && accept.accepts(from) {
            return Self::Untouched;
        }
        Self::Recode {
            from,
            to: accept.choose(from),
        }
    }
}

/// Adds `Accept-Encoding` to `Vary` unless it is there (or `Vary: *`).
pub fn vary_on_accept_encoding(headers: &mut HeaderMap) {
    let named = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim() == "*" || v.trim().eq_ignore_ascii_case("accept-encoding"));
    if !named {
        headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
}

/// Turns a strong `ETag` weak: after decoding or rewriting, the bytes are
/// no longer the ones Dataverse tagged, but the content is equivalent
/// (RFC 9110 §8.8.1), so conditional GETs still match.
pub fn weaken_etag(headers: &mut HeaderMap) {
    let Some(tag) = headers.get(header::ETAG) else {
        return;
    };
    if tag.as_bytes().starts_with(b"W/") {
        return;
    }
    let mut weak = b"W/".to_vec();
    weak.extend_from_slice(tag.as_bytes());
    if let Ok(v) = HeaderValue::from_bytes(&weak) {
        headers.insert(header::ETAG, v);
    }
}

#[cfg(test)]
mod tests;
