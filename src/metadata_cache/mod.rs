//! The metadata cache: `$metadata`, `EntityDefinitions…` and
//! `GlobalOptionSetDefinitions…` answers of one org, kept as Dataverse sent
//! them (compressed, links not yet rewritten) so that each caller's answer
//! is made from them exactly as from a fresh one.
//!
//! Clients load these documents (several MB of CSDL for a real org) at
//! every start; they change only when someone customises the org. An entry
//! is served without asking Dataverse for `fresh_for`, then revalidated
//! with `If-None-Match` (a 304 costs Dataverse nothing to send), so a
//! schema change shows up within `fresh_for`. Nothing else is cached: data
//! answers depend on the rows and the user (docs/dataverse.md, "Compression and caching").
//!
//! Entries are keyed by everything that selects the representation: the
//! path and query, `Accept`, `Prefer`, `Accept-Language`, and the user
//! Dataverse acts as (impersonation headers, or the user whose own token
//! the request carries), hashed (SHA-256), so a caller's 60 KB header costs the
//! cache 32 bytes. They are bounded by bytes (moka's weigher: body, kept
//! headers, key and bookkeeping) and in number (each weighs at least
//! `max_bytes / MAX_ENTRIES`).
//!
//! A caller's form of an entry (links rewritten, coded as its
//! `Accept-Encoding` asks) is kept too, as a *variant* of its own under a
//! key made from the entry's: parallel hits with `Accept-Encoding: br`
//! cost one decode, rewrite and encode per entry and coding, not one per
//! hit.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Method, header};
use http_body::{Body, Frame, SizeHint};
use sha2::{Digest, Sha256};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

use crate::compression::Coding;
use crate::config::MetadataCacheConfig;

/// The most variants (codings and link forms) kept of one answer.
pub const MAX_VARIANTS: u8 = 16;

/// The most entries (answers and variants) one org's cache holds.
pub const MAX_ENTRIES: usize = 4096;

/// What an entry costs beyond its bytes: the key, the `Arc`, moka's node.
const ENTRY_OVERHEAD: usize = 256;

/// Resources (as [`crate::policy::resource`] names them) whose answers are
/// kept.
const CACHED: [&str; 3] = [
    "$metadata",
    "entitydefinitions",
    "globaloptionsetdefinitions",
];

/// Request headers that select the representation, besides the target.
static SELECTING: [HeaderName; 5] = [
    header::ACCEPT,
    HeaderName::from_static("prefer"),
    header::ACCEPT_LANGUAGE,
    HeaderName::from_static("callerobjectid"),
    HeaderName::from_static("mscrmcallerid"),
];

/// Answer headers kept with an entry. Per-request ones (request ids,
/// `x-ms-ratelimit-*`, the DOP hint, cookies, `Date`) are not: a cached
/// answer must not feed stale figures to the governor.
static KEPT: [HeaderName; 7] = [
    header::CONTENT_TYPE,
    header::CONTENT_ENCODING,
    header::CONTENT_LANGUAGE,
    header::ETAG,
    header::VARY,
    HeaderName::from_static("odata-version"),
    HeaderName::from_static("preference-applied"),
];

/// What identifies one cached answer: a SHA-256 of the target and every
/// value of the selecting headers, each length-prefixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key([u8; 32]);

impl Key {
    fn of(target: &str, headers: &HeaderMap) -> Self {
        let mut hash = Sha256::new();
        let mut part = |bytes: &[u8]| {
            hash.update((bytes.len() as u64).to_be_bytes());
            hash.update(bytes);
        };
        part(target.as_bytes());
        for name in &SELECTING {
            for value in headers.get_all(name) {
                part(name.as_str().as_bytes());
                part(value.as_bytes());
            }
        }
        Self(hash.finalize().into())
    }

    /// The key of the same answer for a request that goes with `user`'s own
    /// token (on-behalf-of): Dataverse's answer is that user's, so it is
    /// kept apart from everyone else's.
    pub fn for_user(self, user: &str) -> Self {
        let mut hash = Sha256::new();
        hash.update(b"user");
        hash.update(self.0);
        hash.update((user.len() as u64).to_be_bytes());
        hash.update(user.as_bytes());
        Self(hash.finalize().into())
    }

    /// The key of the same answer for a request that may take only some of
    /// the org's lanes (a pinned caller, `lanes` one bit per lane): each
    /// lane is an application user with its own roles, so an answer
    /// fetched on lanes the caller may not take is not served to it.
    pub fn for_lanes(self, lanes: u64) -> Self {
        let mut hash = Sha256::new();
        hash.update(b"lanes");
        hash.update(self.0);
        hash.update(lanes.to_be_bytes());
        Self(hash.finalize().into())
    }

    /// The key of `entry`'s variant coded as `coding` (`None`: identity)
    /// with links made to start with `links` (empty: not rewritten). The
    /// entry's generation is part of it: a changed answer's variants are
    /// never served for the new one.
    pub fn variant(&self, entry: &Entry, coding: Option<Coding>, links: &[u8]) -> Self {
        let mut hash = Sha256::new();
        hash.update(b"variant");
        hash.update(self.0);
        hash.update(entry.generation.to_be_bytes());
        hash.update(coding.map_or("identity", Coding::token));
        hash.update((links.len() as u64).to_be_bytes());
        hash.update(links);
        Self(hash.finalize().into())
    }
}

/// One kept answer (always a 200), or a caller's form of one.
#[derive(Debug)]
pub struct Entry {
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When Dataverse last confirmed it (fetched or answered 304).
    pub checked: Instant,
    /// Which fill it came from; kept across revalidations.
    generation: u64,
    /// Codings whose variant is larger than `max_entry` (one bit each):
    /// those are made afresh at each hit rather than tried again.
    unkept: AtomicU8,
    /// Variants of this entry kept so far.
    variants: AtomicU8,
}

impl Entry {
    fn new(headers: HeaderMap, body: Bytes, checked: Instant, generation: u64) -> Self {
        Self {
            headers,
            body,
            checked,
            generation,
            unkept: AtomicU8::new(0),
            variants: AtomicU8::new(0),
        }
    }

    pub fn etag(&self) -> Option<&HeaderValue> {
        self.headers.get(header::ETAG)
    }

    /// Whether the variant coded as `coding` is known not to fit.
    pub fn variant_unkept(&self, coding: Option<Coding>) -> bool {
        self.unkept.load(Ordering::Relaxed) & coding_bit(coding) != 0
    }

    /// Marks the variant coded as `coding` as too large to keep.
    pub fn set_variant_unkept(&self, coding: Option<Coding>) {
        self.unkept.fetch_or(coding_bit(coding), Ordering::Relaxed);
    }

    fn weight(&self, floor: usize) -> u32 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len())
            .sum();
        let weight = (self.body.len() + headers + ENTRY_OVERHEAD).max(floor);
        u32::try_from(weight).unwrap_or(u32::MAX)
    }
}

fn coding_bit(coding: Option<Coding>) -> u8 {
    match coding {
        None => 1,
        Some(c) => 2 << Coding::ALL.iter().position(|a| *a == c).unwrap_or(0),
    }
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    /// Within `fresh_for` of its last check: serve it.
    Fresh(Arc<Entry>),
    /// Older, or the caller asked for a check: ask Dataverse whether it
    /// still holds (`If-None-Match`).
    Stale(Arc<Entry>),
    Miss,
}

/// How requests fared, for the metrics.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Served from the cache without asking Dataverse.
    pub hits: AtomicU64,
    /// Not in the cache: fetched in full.
    pub misses: AtomicU64,
    /// Stale, and Dataverse answered 304: served from the cache.
    pub revalidated: AtomicU64,
    /// Stale, and Dataverse sent a new answer (the schema changed).
    pub changed: AtomicU64,
    /// Variants made (decoded, rewritten, encoded for a caller's coding).
    pub variants_made: AtomicU64,
}

/// One org's metadata cache.
pub struct MetadataCache {
    entries: moka::sync::Cache<Key, Arc<Entry>>,
    /// One lock per key being fetched: callers that miss together wait for
    /// the first one's answer instead of each downloading the document
    /// (after a deploy, every client loads `$metadata` at once).
    fills: moka::sync::Cache<Key, Arc<tokio::sync::Mutex<()>>>,
    config: MetadataCacheConfig,
    stats: Arc<CacheStats>,
    /// The last fill's generation.
    generations: AtomicU64,
    /// Places for making callers' forms of entries: one per core.
    transcoding: Semaphore,
}

/// The longest a caller waits for another's fetch of the same answer
/// before fetching it itself (the other's client may read slowly).
pub const FILL_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A caller's turn after a miss.
pub enum Turn {
    /// Another caller's fetch filled the entry meanwhile.
    Ready(Arc<Entry>),
    /// This caller fetches and fills; others wait until the lock goes (the
    /// fill ended, or gave up).
    Lead(FillLock),
    /// Waited [`FILL_WAIT`] in vain: fetch without filling.
    Alone,
}

/// Held by the caller whose answer fills an entry.
pub struct FillLock(
    #[expect(dead_code, reason = "held for its drop, which lets the waiters in")]
    tokio::sync::OwnedMutexGuard<()>,
);

impl MetadataCache {
    pub fn new(config: &MetadataCacheConfig) -> Self {
        // Each entry weighs at least this: at most MAX_ENTRIES fit.
        let floor = config.max_bytes / MAX_ENTRIES;
        let entries = moka::sync::Cache::builder()
            .max_capacity(config.max_bytes as u64)
            .weigher(move |_: &Key, e: &Arc<Entry>| e.weight(floor))
            .build();
        let fills = moka::sync::Cache::builder()
            .max_capacity(10_000)
            .time_to_idle(std::time::Duration::from_secs(60))
            .build();
        Self {
            entries,
            fills,
            config: config.clone(),
            stats: Arc::default(),
            generations: AtomicU64::new(0),
            transcoding: Semaphore::new(
                std::thread::available_parallelism().map_or(2, std::num::NonZero::get),
            ),
        }
    }

    /// After a miss: waits for a fetch of `key` already under way, then
    /// serves its entry, or takes the turn to fetch.
    pub async fn turn(&self, key: &Key) -> Turn {
        let lock = self
            .fills
            .get_with(*key, || Arc::new(tokio::sync::Mutex::new(())));
        let Ok(guard) = tokio::time::timeout(FILL_WAIT, lock.lock_owned()).await else {
            return Turn::Alone;
        };
        match self.entries.get(key) {
            Some(entry) => Turn::Ready(entry),
            None => Turn::Lead(FillLock(guard)),
        }
    }

    /// The key of a request whose answer is kept, or `None` for every
    /// other request (only GETs of the metadata resources).
    pub fn key(
        method: &Method,
        resource: &str,
        path_and_query: &str,
        headers: &HeaderMap,
    ) -> Option<Key> {
        if method != Method::GET || !CACHED.contains(&resource) {
            return None;
        }
        Some(Key::of(path_and_query, headers))
    }

    /// Finds `key`; `check` (the caller sent `Cache-Control: no-cache` or
    /// `Consistency: Strong`) makes any entry stale.
    pub fn lookup(&self, key: &Key, check: bool) -> Lookup {
        match self.entries.get(key) {
            Some(e) if !check && e.checked.elapsed() < self.config.fresh_for => Lookup::Fresh(e),
            Some(e) => Lookup::Stale(e),
            None => Lookup::Miss,
        }
    }

    /// Dataverse answered 304 for `entry`: fresh again from now.
    pub fn revalidated(&self, key: &Key, entry: &Entry) -> Arc<Entry> {
        let renewed = Arc::new(Entry::new(
            entry.headers.clone(),
            entry.body.clone(),
            Instant::now(),
            entry.generation,
        ));
        self.entries.insert(*key, renewed.clone());
        renewed
    }

    /// The largest answer kept.
    pub fn max_entry(&self) -> usize {
        self.config.max_entry
    }

    /// Keeps a whole 200 answer under `key` (its headers are the 200's).
    pub fn insert(&self, key: Key, headers: &HeaderMap, body: Bytes) -> Arc<Entry> {
        let entry = Arc::new(Entry::new(
            kept_headers(headers),
            body,
            Instant::now(),
            self.next_generation(),
        ));
        self.entries.insert(key, entry.clone());
        entry
    }

    /// The variant under `key`, if kept.
    pub fn variant(&self, key: &Key) -> Option<Arc<Entry>> {
        self.entries.get(key)
    }

    /// Whether `of` may get one more kept variant ([`MAX_VARIANTS`]).
    pub fn may_add_variant(&self, of: &Entry) -> bool {
        of.variants.load(Ordering::Relaxed) < MAX_VARIANTS
    }

    /// One of the places for making a caller's form of an entry (decoding,
    /// rewriting and encoding a document of up to `max_entry` bytes),
    /// waited for at most `wait`; `None` when none came free.
    pub async fn transcoding(&self, wait: Duration) -> Option<SemaphorePermit<'_>> {
        tokio::time::timeout(wait, self.transcoding.acquire())
            .await
            .ok()?
            .ok()
    }

    /// A caller's form of `of` that is not kept (made for one answer).
    pub fn unkept_variant(of: &Entry, headers: HeaderMap, body: Bytes) -> Entry {
        Entry::new(headers, body, of.checked, of.generation)
    }

    /// Keeps `of`'s variant: the caller's `headers` and `body`, as old as `of`.
    pub fn insert_variant(
        &self,
        key: Key,
        of: &Entry,
        headers: HeaderMap,
        body: Bytes,
    ) -> Arc<Entry> {
        let variant = Arc::new(Entry::new(headers, body, of.checked, of.generation));
        self.entries.insert(key, variant.clone());
        of.variants.fetch_add(1, Ordering::Relaxed);
        self.stats.variants_made.fetch_add(1, Ordering::Relaxed);
        variant
    }

    fn next_generation(&self) -> u64 {
        self.generations.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A body that passes `body` through and keeps a copy under `key` when
    /// it ends cleanly within `max_entry`; `headers` are the 200's. `lock`
    /// (this caller's turn) is let go when the body ends or is dropped.
    pub fn fill<B>(
        self: &Arc<Self>,
        key: Key,
        headers: &HeaderMap,
        body: B,
        lock: Option<FillLock>,
    ) -> Fill<B> {
        Fill {
            prefix: None,
            inner: body,
            filling: Some(Filling {
                cache: self.clone(),
                key,
                headers: kept_headers(headers),
                bytes: BytesMut::new(),
                _lock: lock,
            }),
        }
    }

    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// Bytes held (bodies and kept headers).
    pub fn weighted_size(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.weighted_size()
    }

    /// Counts one request's outcome.
    pub fn count(&self, outcome: Outcome) {
        let s = &self.stats;
        let counter = match outcome {
            Outcome::Hit => &s.hits,
            Outcome::Miss => &s.misses,
            Outcome::Revalidated => &s.revalidated,
            Outcome::Changed => &s.changed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The headers of a 200 that an entry keeps.
fn kept_headers(headers: &HeaderMap) -> HeaderMap {
    let mut kept = HeaderMap::new();
    for name in &KEPT {
        for value in headers.get_all(name) {
            kept.append(name, value.clone());
        }
    }
    kept
}

/// How one request fared with the cache (the fields of [`CacheStats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    Revalidated,
    Changed,
}

impl Outcome {
    /// The name in the access log and the metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Revalidated => "revalidated",
            Self::Changed => "changed",
        }
    }
}

/// Whether a caller's `If-None-Match` names `etag`, by weak comparison
/// (RFC 9110 §13.1.2: `W/` aside, the opaque tags are equal), or is `*`.
pub fn none_match(headers: &HeaderMap, etag: &HeaderValue) -> bool {
    let opaque = |t: &str| t.trim().trim_start_matches("W/").to_owned();
    let Ok(etag) = etag.to_str().map(opaque) else {
        return false;
    };
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim() == "*" || opaque(t) == etag)
}

/// A body on its way to the caller, copied into the cache as it passes.
pub struct Fill<B> {
    /// Bytes already read from `inner`, sent first.
    prefix: Option<Bytes>,
    inner: B,
    /// `None` once the copy is given up (too large, or the body failed),
    /// or for a body that is not kept.
    filling: Option<Filling>,
}

impl<B> Fill<B> {
    /// A body passed through without a copy (an answer that is not a 200).
    pub fn through(inner: B) -> Self {
        Self {
            prefix: None,
            inner,
            filling: None,
        }
    }

    /// `prefix` (already read from `inner`), then the rest of `inner`,
    /// without a copy (an answer too large to keep).
    pub fn prefixed(prefix: Bytes, inner: B) -> Self {
        Self {
            prefix: Some(prefix).filter(|p| !p.is_empty()),
            inner,
            filling: None,
        }
    }
}

struct Filling {
    cache: Arc<MetadataCache>,
    key: Key,
    headers: HeaderMap,
    bytes: BytesMut,
    /// Dropped with the filling: after the entry is in, or given up.
    _lock: Option<FillLock>,
}

impl<B> Body for Fill<B>
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
        if let Some(prefix) = this.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(f)) = (frame.data_ref(), &mut this.filling) {
                    if f.bytes.len() + data.len() > f.cache.config.max_entry {
                        this.filling = None;
                    } else {
                        f.bytes.extend_from_slice(data);
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(f) = this.filling.take() {
                    let generation = f.cache.next_generation();
                    let entry = Entry::new(f.headers, f.bytes.freeze(), Instant::now(), generation);
                    f.cache.entries.insert(f.key, Arc::new(entry));
                }
            }
            Poll::Ready(Some(Err(_))) => this.filling = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        // Not the inner body's answer: the end must be polled to be kept.
        false
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests;
