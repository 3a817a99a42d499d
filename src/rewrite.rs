//! Streaming org-URL ⇄ proxy-URL rewriting (pure: no I/O).
//!
//! Dataverse writes absolute URLs of the org into `@odata.context`,
//! `@odata.nextLink`, `@odata.id`, `@odata.editLink`, the `OData-EntityId`,
//! `Location` and `Content-Location` headers and every part of a `$batch`
//! answer (docs/dataverse.md, "The Web API"). Clients follow those links, so the proxy
//! replaces the org's `{origin}/api/data/` with the proxy's public
//! `{base}/api/data/` in responses, and the reverse in request bodies
//! (`$batch` request lines, `@odata.id` and `@odata.bind` values).
//!
//! Only `scheme://host[:port]/api/data/` prefixes are replaced; every other
//! byte, `$skiptoken` paging cookies included, is left as it was. The
//! prefix ends with `/api/data/`, so no pattern is a prefix of another and
//! a match never depends on bytes after it.
//!
//! A [`Rewriter`] is built once per org, direction and public URL and
//! shared by reference count (see `OrgState::links`); [`RewriteBody`] applies it to a body chunk by chunk, carrying the
//! few bytes at a chunk's end that could start a match into the next one, so
//! matches across chunk boundaries work and memory stays bounded.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use aho_corasick::AhoCorasick;
use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};

/// Replaces any of a few URL prefixes with one replacement. Cloning is a
/// reference-count increment (one rewriter serves every request of an org).
#[derive(Debug, Clone)]
pub struct Rewriter(Arc<Patterns>);

#[derive(Debug)]
struct Patterns {
    search: Search,
    patterns: Box<[Box<[u8]>]>,
    replacement: Bytes,
    /// Length of the longest pattern, minus one: the most bytes a partial
    /// match at a chunk's end can have.
    keep: usize,
}

/// Longest needle given to `memmem`.
const PREFIX_MAX: usize = 16;

/// How matches are found. `memmem` (SIMD) finds the first [`PREFIX_MAX`]
/// bytes the patterns share (`https://contoso.` for an org and its `.api.`
/// alias, or the start of the single pattern), after which the patterns are
/// compared; Aho-Corasick handles patterns without a useful common prefix.
/// Measured on a page dense with links: Aho-Corasick with a fresh search per
/// match cost 3 × as much, and `memmem` with a whole 43-byte pattern 2 × as
/// much as with its 16-byte prefix.
#[derive(Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "one per rewriter, behind its Arc"
)]
enum Search {
    Prefix(memchr::memmem::Finder<'static>),
    Many(AhoCorasick),
}

impl Search {
    fn new(patterns: &[String]) -> Option<Self> {
        let first = patterns.first()?.as_bytes();
        let common = patterns.iter().fold(first.len(), |n, p| {
            first[..n]
                .iter()
                .zip(p.as_bytes())
                .take_while(|(a, b)| a == b)
                .count()
        });
        // More than `https://`: a host-specific prefix is rare in a body.
        if common > "https://".len() {
            let prefix = &first[..common.min(PREFIX_MAX)];
            return Some(Self::Prefix(
                memchr::memmem::Finder::new(prefix).into_owned(),
            ));
        }
        AhoCorasick::new(patterns).ok().map(Self::Many)
    }
}

impl Patterns {
    /// The first match in `haystack` at or after `from`: (start, end).
    fn find(&self, haystack: &[u8], from: usize) -> Option<(usize, usize)> {
        match &self.search {
            Search::Prefix(prefix) => {
                let mut at = from;
                while let Some(i) = prefix.find(&haystack[at..]) {
                    let start = at + i;
                    if let Some(p) = self
                        .patterns
                        .iter()
                        .find(|p| haystack[start..].starts_with(p))
                    {
                        return Some((start, start + p.len()));
                    }
                    at = start + 1;
                }
                None
            }
            Search::Many(ac) => ac
                .find(aho_corasick::Input::new(haystack).range(from..))
                .map(|m| (m.start(), m.end())),
        }
    }
}

impl Rewriter {
    /// What links become: rewriters with the same replacement (for the
    /// same org) rewrite alike.
    pub fn replacement(&self) -> &[u8] {
        &self.0.replacement
    }

    /// Rewrites every `{from}/api/data/` to `{to}/api/data/`. Origins are
    /// given without a trailing slash; `to` may carry a path prefix.
    /// Returns `None` when there is nothing to do (all `from` equal `to`).
    pub fn api_prefix(from: &[&str], to: &str) -> Option<Self> {
        let to = to.trim_end_matches('/');
        let mut patterns: Vec<String> = from
            .iter()
            .map(|f| f.trim_end_matches('/'))
            .filter(|f| *f != to)
            .map(|f| format!("{f}/api/data/"))
            .collect();
        patterns.dedup();
        let keep = patterns.iter().map(String::len).max()? - 1;
        let search = Search::new(&patterns)?;
        Some(Self(Arc::new(Patterns {
            search,
            patterns: patterns
                .into_iter()
                .map(|p| p.into_bytes().into_boxed_slice())
                .collect(),
            replacement: Bytes::from(format!("{to}/api/data/")),
            keep,
        })))
    }

    /// Rewrites a whole value (a header, a buffered body); `None` when it
    /// holds no link.
    pub fn rewrite_all(&self, input: &[u8]) -> Option<Vec<u8>> {
        let this = &*self.0;
        let mut out: Option<Vec<u8>> = None;
        let mut last = 0;
        while let Some((start, end)) = this.find(input, last) {
            let o = out.get_or_insert_with(|| Vec::with_capacity(input.len() + 64));
            o.extend_from_slice(&input[last..start]);
            o.extend_from_slice(&this.replacement);
            last = end;
        }
        let mut out = out?;
        out.extend_from_slice(&input[last..]);
        Some(out)
    }

    /// Length of the longest suffix of `tail` that is a proper prefix of a
    /// pattern: the bytes that may start a match the next chunk completes.
    fn partial_tail(&self, tail: &[u8]) -> usize {
        let this = &*self.0;
        let from = tail.len().saturating_sub(this.keep);
        (from..tail.len())
            .find(|&i| {
                let suffix = &tail[i..];
                this.patterns.iter().any(|p| p.starts_with(suffix))
            })
            .map_or(0, |i| tail.len() - i)
    }

    /// Feeds one chunk and pushes what can be emitted now onto `out`.
    /// `carry` holds the bytes kept back from the previous chunk and
    /// receives the new ones.
    ///
    /// Only a chunk's end that could begin a link is kept back. Stretches
    /// of at least [`SLICE_MIN`] bytes between links go out as slices of
    /// the chunk (no copy); short ones are copied together with the
    /// replacements, so a page dense with links is not cut into thousands
    /// of frames.
    pub fn feed(&self, carry: &mut BytesMut, chunk: Bytes, out: &mut VecDeque<Bytes>) {
        let this = &*self.0;
        if !carry.is_empty() && chunk.len() < this.keep {
            // A tiny chunk: join it to the kept bytes and go on.
            carry.extend_from_slice(&chunk);
            let joined = carry.split().freeze();
            return self.feed(carry, joined, out);
        }
        let mut acc = Pieces::new(&chunk, out);
        let mut start = 0;
        if !carry.is_empty() {
            // Only a match that begins in the kept bytes needs them: such a
            // match ends within the first `keep` bytes of this chunk, and two
            // cannot begin there (the kept bytes are shorter than a pattern).
            let kept = carry.len();
            let head = &chunk[..this.keep.min(chunk.len())];
            let mut joined = BytesMut::with_capacity(kept + head.len());
            joined.extend_from_slice(carry);
            joined.extend_from_slice(head);
            match this.find(&joined, 0) {
                Some((s, e)) if s < kept => {
                    acc.copy(&joined[..s]);
                    acc.copy(&this.replacement);
                    start = e - kept;
                }
                _ => acc.copy(carry),
            }
            carry.clear();
        }
        let mut last = start;
        while let Some((s, e)) = this.find(&chunk, last) {
            acc.take(last..s);
            acc.copy(&this.replacement);
            last = e;
        }
        // After the last match, keep back a tail that could begin one.
        let cut = chunk.len() - self.partial_tail(&chunk[last..]);
        carry.extend_from_slice(&chunk[cut..]);
        acc.take(last..cut);
        acc.finish();
    }
}

/// Stretches at least this long go out as slices of the chunk they came in.
const SLICE_MIN: usize = 4096;

/// Size of the blocks short stretches and replacements are copied into.
const COPY_BLOCK: usize = 64 * 1024;

/// The output of one [`Rewriter::feed`]: short pieces copied together, long
/// ones sliced.
struct Pieces<'a> {
    chunk: &'a Bytes,
    out: &'a mut VecDeque<Bytes>,
    copied: BytesMut,
    /// Bytes of the chunk already taken.
    taken: usize,
}

impl<'a> Pieces<'a> {
    fn new(chunk: &'a Bytes, out: &'a mut VecDeque<Bytes>) -> Self {
        Self {
            chunk,
            out,
            copied: BytesMut::new(),
            taken: 0,
        }
    }

    /// Copies into blocks of at most [`COPY_BLOCK`] bytes (no more than the
    /// rest of the chunk needs): a full block goes out as a piece instead of
    /// being grown (and copied again).
    fn copy(&mut self, bytes: &[u8]) {
        if self.copied.capacity() - self.copied.len() < bytes.len() {
            self.flush();
            let rest = self.chunk.len() - self.taken + 1024;
            self.copied.reserve(bytes.len().max(rest.min(COPY_BLOCK)));
        }
        self.copied.extend_from_slice(bytes);
    }

    /// `range` of the chunk: sliced when long, copied when short.
    fn take(&mut self, range: std::ops::Range<usize>) {
        self.taken = range.end;
        if range.len() >= SLICE_MIN {
            self.flush();
            self.out.push_back(self.chunk.slice(range));
        } else if !range.is_empty() {
            let chunk = self.chunk;
            self.copy(&chunk[range]);
        }
    }

    fn flush(&mut self) {
        if !self.copied.is_empty() {
            self.out.push_back(self.copied.split().freeze());
        }
    }

    fn finish(mut self) {
        self.flush();
    }
}

/// A body rewritten chunk by chunk (or passed through untouched when the
/// rewriter is `None`).
pub struct RewriteBody<B> {
    inner: B,
    rewriter: Option<Rewriter>,
    carry: BytesMut,
    /// Rewritten pieces not yet handed out.
    ready: VecDeque<Bytes>,
    /// Trailers that arrived while bytes were still kept back.
    trailers: Option<http::HeaderMap>,
    done: bool,
}

impl<B> RewriteBody<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, rewriter: Option<Rewriter>) -> Self {
        Self {
            inner,
            rewriter,
            carry: BytesMut::new(),
            ready: VecDeque::new(),
            trailers: None,
            done: false,
        }
    }
}

impl<B> Body for RewriteBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let Some(rewriter) = &this.rewriter else {
            return Pin::new(&mut this.inner).poll_frame(cx);
        };
        loop {
            if let Some(piece) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(piece))));
            }
            if this.done {
                // Kept-back bytes first, then any trailers, then the end.
                if !this.carry.is_empty() {
                    return Poll::Ready(Some(Ok(Frame::data(this.carry.split().freeze()))));
                }
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => rewriter.feed(&mut this.carry, data, &mut this.ready),
                    Err(frame) => {
                        // Trailers end the body.
                        this.trailers = frame.into_trailers().ok();
                        this.done = true;
                    }
                },
                Poll::Ready(None) => this.done = true,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self.rewriter {
            None => self.inner.is_end_stream(),
            Some(_) => {
                self.done
                    && self.ready.is_empty()
                    && self.carry.is_empty()
                    && self.trailers.is_none()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.rewriter {
            None => self.inner.size_hint(),
            // Rewriting changes the length.
            Some(_) => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORG: &str = "https://contoso.crm.dynamics.com";
    const PROXY: &str = "http://127.0.0.1:8080";

    fn rw() -> Rewriter {
        Rewriter::api_prefix(&[ORG], PROXY).expect("rewriter")
    }

    fn stream(r: &Rewriter, input: &[u8], splits: &[usize]) -> Vec<u8> {
        let mut carry = BytesMut::new();
        let mut out = Vec::new();
        let mut start = 0;
        for &s in splits.iter().chain(std::iter::once(&input.len())) {
            let s = s.clamp(start, input.len());
            let mut pieces = VecDeque::new();
            r.feed(
                &mut carry,
                Bytes::copy_from_slice(&input[start..s]),
                &mut pieces,
            );
            pieces.iter().for_each(|p| out.extend_from_slice(p));
            start = s;
        }
        out.extend_from_slice(&carry);
        out
    }

    #[test]
    fn links_are_rewritten_and_skiptokens_untouched() {
        let body = format!(
            r#"{{"@odata.context":"{ORG}/api/data/v9.2/$metadata#accounts(name)","value":[],"@odata.nextLink":"{ORG}/api/data/v9.2/accounts?$select=name&$skiptoken=%3Ccookie%20pagenumber=%222%22%20pagingcookie=%22%253ccookie%2520page%253d%25221%2522%253e%22%20/%3E"}}"#
        );
        let out =
            String::from_utf8(rw().rewrite_all(body.as_bytes()).expect("match")).expect("utf8");
        assert_eq!(out, body.replace(ORG, PROXY));
        assert!(out.contains("$skiptoken=%3Ccookie%20pagenumber=%222%22%20pagingcookie=%22%253ccookie%2520page%253d%25221%2522%253e%22%20/%3E"));
    }

    #[test]
    fn other_urls_of_the_org_are_left_alone() {
        let body = format!(r#"{{"url":"{ORG}/main.aspx?etn=account","x":"{ORG}/api/data"}}"#);
        assert!(rw().rewrite_all(body.as_bytes()).is_none());
    }

    #[test]
    fn a_match_split_across_chunks_is_found() {
        let body = format!("xx {ORG}/api/data/v9.2/accounts(1) yy {ORG}/api/data/v9.2/x");
        let expected = body.replace(ORG, PROXY);
        for split in 0..body.len() {
            assert_eq!(
                stream(&rw(), body.as_bytes(), &[split]),
                expected.as_bytes(),
                "split at {split}"
            );
        }
    }

    #[test]
    fn long_stretches_are_sliced_and_short_ones_copied() {
        let filler = "x".repeat(50_000);
        let body = format!(
            "{filler}\"{ORG}/api/data/v9.2/a\",\"{ORG}/api/data/v9.2/b\"{filler}{ORG}/api/data/v9.2/c"
        );
        let expected = body.replace(ORG, PROXY);
        let r = rw();
        for splits in [
            vec![],
            vec![49_990, 50_010],
            vec![10_000, 20_000, 50_003, 99_000],
        ] {
            assert_eq!(stream(&r, body.as_bytes(), &splits), expected.as_bytes());
        }
        // One chunk: the long stretches are slices of it; the first two links
        // and the short stretch between them are one copied piece, the last
        // link and what follows it another.
        let chunk = Bytes::from(body.clone());
        let mut out = VecDeque::new();
        let mut carry = BytesMut::new();
        r.feed(&mut carry, chunk.clone(), &mut out);
        let lens: Vec<usize> = out.iter().map(Bytes::len).collect();
        assert_eq!(lens[0], 50_001, "{lens:?}");
        assert_eq!(out.len(), 4, "{lens:?}");
        assert_eq!(
            out[0].as_ptr(),
            chunk.as_ptr(),
            "the first stretch is not copied"
        );
        let inside = chunk.as_ptr_range();
        assert!(
            inside.contains(&out[2].as_ptr()),
            "the filler is not copied"
        );
        assert!(
            !inside.contains(&out[1].as_ptr()),
            "links are copied with their replacement"
        );
    }

    #[test]
    fn nothing_to_do_when_origins_match() {
        assert!(Rewriter::api_prefix(&[PROXY], PROXY).is_none());
    }

    #[test]
    fn the_reverse_direction_and_path_prefixes() {
        let r = Rewriter::api_prefix(&["https://gw.example.com/dv"], ORG).expect("rewriter");
        let line = b"POST https://gw.example.com/dv/api/data/v9.2/accounts HTTP/1.1";
        assert_eq!(
            r.rewrite_all(line).expect("match"),
            format!("POST {ORG}/api/data/v9.2/accounts HTTP/1.1").as_bytes()
        );
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        /// The oracle: replace one byte at a time, no search library.
        fn naive(body: &[u8], from: &[&str], to: &str) -> Vec<u8> {
            let pats: Vec<Vec<u8>> = from
                .iter()
                .map(|f| format!("{f}/api/data/").into_bytes())
                .collect();
            let to = format!("{to}/api/data/").into_bytes();
            let mut out = Vec::new();
            let mut i = 0;
            'outer: while i < body.len() {
                for p in &pats {
                    if body[i..].starts_with(p) {
                        out.extend_from_slice(&to);
                        i += p.len();
                        continue 'outer;
                    }
                }
                out.push(body[i]);
                i += 1;
            }
            out
        }

        fn body_strategy() -> impl Strategy<Value = Vec<u8>> {
            let piece = prop_oneof![
                Just(format!("{ORG}/api/data/v9.2/").into_bytes()),
                Just(format!("{ORG}/api/dat").into_bytes()),
                Just(b"https://contoso.crm".to_vec()),
                Just(b"https://contoso.api.crm.dynamics.com/api/data/v9.2/".to_vec()),
                Just(b"https://contoso.api.crm.dynamics.com/api/da".to_vec()),
                Just(b"http://127.0.0.1:9/api/data/".to_vec()),
                Just(b"%3Ccookie%20page%253d".to_vec()),
                proptest::collection::vec(any::<u8>(), 0..40),
            ];
            proptest::collection::vec(piece, 0..30).prop_map(|v| v.concat())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]
            #[test]
            fn chunked_equals_whole(body in body_strategy(), splits in proptest::collection::vec(0usize..2000, 0..12)) {
                let mut splits = splits;
                splits.sort_unstable();
                // One pattern (memmem) and an org with its `.api.` alias (Aho-Corasick).
                let two = Rewriter::api_prefix(&[ORG, "https://contoso.api.crm.dynamics.com"], PROXY)
                    .expect("rewriter");
                let api = "https://contoso.api.crm.dynamics.com";
                // Two origins without a common prefix (Aho-Corasick).
                let other = "http://127.0.0.1:9";
                let unrelated = Rewriter::api_prefix(&[ORG, other], PROXY).expect("rewriter");
                for (r, from) in [(rw(), &[ORG][..]), (two, &[ORG, api][..]), (unrelated, &[ORG, other][..])] {
                    let whole = r.rewrite_all(&body).unwrap_or_else(|| body.clone());
                    prop_assert_eq!(&whole, &naive(&body, from, PROXY));
                    prop_assert_eq!(stream(&r, &body, &splits), whole);
                }
            }
        }
    }
}
