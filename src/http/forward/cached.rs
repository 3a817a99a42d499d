//! Step 3 for `$metadata`, `EntityDefinitions…` and
//! `GlobalOptionSetDefinitions…` GETs: the org's metadata cache first
//! (`metadata_cache`), Dataverse when the entry is missing or stale.
//!
//! The caller was admitted (identity, policy) like any other before it gets
//! here, and its answer still goes through the answer step: a cached body
//! is Dataverse's, so its links are rewritten and its coding fitted to this
//! caller exactly as for a fresh one.

use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use bytes::Bytes;
use http_body_util::{BodyExt, Collected, Either, Full};

use super::admit::Admitted;
use super::call::Call;
use super::plan::Planned;
use super::send::{self, Sent};
use crate::app::AppState;
use crate::compression::{AcceptEncoding, Coding, Transcode, vary_on_accept_encoding, weaken_etag};
use crate::error::ProxyError;
use crate::http::access_log::RequestInfo;
use crate::http::body::{UpstreamBody, is_rewritable};
use crate::metadata_cache::{Entry, Fill, Key, Lookup, MetadataCache, Outcome, Turn, none_match};
use crate::rewrite::Rewriter;

/// An answer of the cached path: Dataverse's (copied into the cache as it
/// passes when it is a 200), or one made from an entry.
pub type CachedBody = Either<Fill<UpstreamBody>, Full<Bytes>>;

/// What the cached path gives the answer step.
pub enum Cached {
    /// Dataverse's answer, or an entry as Dataverse sent it: the answer
    /// step fits it to the caller.
    Answer(Box<Sent<CachedBody>>),
    /// Already the caller's: a 304, or a kept variant.
    Made(Response<Full<Bytes>>),
}

/// The org's cache and the key a request has in it.
pub type CacheKey = (Arc<MetadataCache>, Key);

/// The org's cache and the request's key, when the request is one the
/// cache serves.
pub fn lookup_key(admitted: &Admitted, planned: &Planned) -> Option<CacheKey> {
    let cache = admitted.org.metadata.as_ref()?;
    let resource = crate::policy::resource(planned.uri.path())?;
    let target = planned.uri.path_and_query()?.as_str();
    let key = MetadataCache::key(&planned.method, &resource, target, &planned.headers)?;
    let key = match admitted.delegated.as_deref() {
        Some(user) => key.for_user(&format!("{}/{}", user.tenant, user.object_id)),
        None if admitted.lanes.is_all() => key,
        None => key.for_lanes(admitted.lanes.bits()),
    };
    Some((cache.clone(), key))
}

/// What an answer made from an entry depends on: the request as admitted,
/// the caller's `Accept-Encoding` and its own `If-None-Match`.
struct Asker<'a> {
    admitted: &'a Admitted,
    accept: &'a AcceptEncoding,
    if_none_match: HeaderMap,
}

/// Serves from `cache` what it holds fresh; revalidates what is stale with
/// `If-None-Match`; fetches (and keeps) the rest.
pub async fn serve(
    call: &mut Call<'_>,
    admitted: &Admitted,
    (cache, key): CacheKey,
    mut planned: Planned,
) -> Result<Cached, ProxyError> {
    let (state, accept) = (call.state, call.accept);
    let asker = Asker {
        admitted,
        accept,
        if_none_match: conditional(&planned.headers),
    };
    // A stale entry without a tag cannot be revalidated: fetched again.
    let stale = match cache.lookup(&key, wants_check(&planned.headers)) {
        Lookup::Fresh(entry) => {
            let hit = Hit(&cache, &key, Outcome::Hit);
            return served(state, hit, &entry, &asker, call.info).await;
        }
        Lookup::Stale(entry) => entry.etag().cloned().map(|tag| (entry, tag)),
        Lookup::Miss => None,
    };
    // Callers that miss together: one fetches, the others wait for it.
    let lock = match stale {
        Some(_) => None,
        None => match cache.turn(&key).await {
            Turn::Ready(entry) => {
                let hit = Hit(&cache, &key, Outcome::Hit);
                return served(state, hit, &entry, &asker, call.info).await;
            }
            Turn::Lead(lock) => Some(lock),
            Turn::Alone => None,
        },
    };
    if let Some((_, tag)) = &stale {
        // Our tag, not the caller's: a 304 must say whether the entry holds.
        planned.headers.remove(header::IF_MODIFIED_SINCE);
        planned.headers.insert(header::IF_NONE_MATCH, tag.clone());
    }
    let sent = send::send(call, admitted, planned).await?;
    let status = sent.response.status();
    if let (Some((entry, _)), StatusCode::NOT_MODIFIED) = (&stale, status) {
        let Sent {
            response, permit, ..
        } = sent;
        drop(response);
        if let Some(permit) = permit {
            permit.finish();
        }
        let entry = cache.revalidated(&key, entry);
        let hit = Hit(&cache, &key, Outcome::Revalidated);
        return served(state, hit, &entry, &asker, call.info).await;
    }
    let outcome = if stale.is_some() {
        Outcome::Changed
    } else {
        Outcome::Miss
    };
    cache.count(outcome);
    call.info.cache = Some(outcome.label());
    Ok(Cached::Answer(Box::new(
        keep(state, (&cache, key), sent, lock).await?,
    )))
}

/// Dataverse's fresh answer: a 200 is read whole at Dataverse's pace and
/// kept (the callers waiting for this fill, and the slot, never wait on
/// this caller's reading), unless it outgrows `max_entry`; anything else
/// passes through.
async fn keep(
    state: &AppState,
    (cache, key): (&MetadataCache, Key),
    sent: Sent<UpstreamBody>,
    lock: Option<crate::metadata_cache::FillLock>,
) -> Result<Sent<CachedBody>, ProxyError> {
    let Sent {
        response, permit, ..
    } = sent;
    let (parts, body) = response.into_parts();
    if parts.status != StatusCode::OK {
        let response = Response::from_parts(parts, Either::Left(Fill::through(body)));
        return Ok(Sent::new(response, permit));
    }
    let idle = state.upstream.idle_timeout;
    let body = match read_whole(body, cache.max_entry(), idle).await? {
        Whole::Complete(bytes) => {
            cache.insert(key, &parts.headers, bytes.clone());
            drop(lock);
            if let Some(permit) = permit {
                permit.finish();
            }
            let response = Response::from_parts(parts, Either::Right(Full::new(bytes)));
            return Ok(Sent::new(response, None));
        }
        Whole::TooLarge(prefix, rest) => Fill::prefixed(prefix, rest),
    };
    drop(lock);
    Ok(Sent::new(
        Response::from_parts(parts, Either::Left(body)),
        permit,
    ))
}

/// An answer read up to a size.
enum Whole<B> {
    /// It ended within the size.
    Complete(Bytes),
    /// It did not: what was read, and the rest.
    TooLarge(Bytes, B),
}

/// Reads `body` to its end, unless it grows beyond `max` bytes; each frame
/// must come within `idle`.
async fn read_whole<B>(
    mut body: B,
    max: usize,
    idle: std::time::Duration,
) -> Result<Whole<B>, ProxyError>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    use http_body_util::BodyExt;
    let mut bytes = bytes::BytesMut::new();
    loop {
        let frame = tokio::time::timeout(idle, body.frame())
            .await
            .map_err(|_| ProxyError::UpstreamTimeout(idle))?;
        match frame {
            None => return Ok(Whole::Complete(bytes.freeze())),
            Some(Err(e)) => return Err(ProxyError::UpstreamBody(e.into())),
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    bytes.extend_from_slice(data);
                }
                if bytes.len() > max {
                    return Ok(Whole::TooLarge(bytes.freeze(), body));
                }
            }
        }
    }
}

/// A hit: the cache, the entry's key, and how it was found.
struct Hit<'a>(&'a MetadataCache, &'a Key, Outcome);

/// An answer made from `entry`: a 304 when the caller already holds it,
/// the entry itself when the answer step leaves its bytes alone, else its
/// variant for this caller's coding. Each carries the entry's `Age`.
async fn served(
    state: &AppState,
    Hit(cache, key, outcome): Hit<'_>,
    entry: &Entry,
    asker: &Asker<'_>,
    info: &mut RequestInfo,
) -> Result<Cached, ProxyError> {
    cache.count(outcome);
    info.cache = Some(outcome.label());
    let age = HeaderValue::from(entry.checked.elapsed().as_secs());
    if let Some(etag) = entry.etag()
        && none_match(&asker.if_none_match, etag)
    {
        let mut response = not_modified(entry, asker);
        response.headers_mut().insert(header::AGE, age);
        return Ok(Cached::Made(response));
    }
    let made = match variant_coding(entry, asker) {
        Some(form) => variant(state, (cache, key), entry, form, asker).await?,
        None => None,
    };
    Ok(match made {
        Some(variant) => {
            let mut response = Response::new(Full::new(variant.body.clone()));
            *response.headers_mut() = variant.headers.clone();
            response.headers_mut().insert(header::AGE, age);
            Cached::Made(response)
        }
        // The entry's own bytes suit the caller, or its form is too large
        // to keep: the answer step fits it as it streams.
        None => {
            let mut sent = as_sent(entry);
            sent.response.headers_mut().insert(header::AGE, age);
            Cached::Answer(Box::new(sent))
        }
    })
}

/// The entry as Dataverse sent it, for the answer step.
fn as_sent(entry: &Entry) -> Sent<CachedBody> {
    let mut response = Response::new(Either::Right(Full::new(entry.body.clone())));
    *response.headers_mut() = entry.headers.clone();
    let length = HeaderValue::from(entry.body.len());
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, length);
    Sent::new(response, None)
}

/// The form an answer made from an entry takes: its coding (`None`:
/// identity) and whether its links are rewritten.
#[derive(Clone, Copy)]
struct Form {
    coding: Option<Coding>,
    rewrite: bool,
}

/// The caller's form of `entry`, or `None` when the answer step would send
/// the entry's bytes as they are.
fn variant_coding(entry: &Entry, asker: &Asker<'_>) -> Option<Form> {
    let admitted = asker.admitted;
    let kept = &entry.headers;
    let rewrite = admitted.links.to_caller.is_some() && is_rewritable(kept);
    let as_200 = (StatusCode::OK, kept);
    match super::answer::transcode_for(as_200, &admitted.method, rewrite, asker.accept) {
        Transcode::Recode { to, .. } => Some(Form {
            coding: to,
            rewrite,
        }),
        Transcode::Untouched if rewrite => Some(Form {
            coding: None,
            rewrite,
        }),
        Transcode::Untouched => None,
    }
}

/// The variant of `entry` in `form`: kept, or made now by the answer step
/// (one caller makes it, the others wait for it) and kept when it fits
/// `max_entry`. A form whose links come from the caller's own `Host`, or
/// one past the entry's variant cap, is made for this caller alone and not
/// kept. Every making takes one of the cache's transcoding places, so the
/// CPU callers can spend on cached documents is bounded. `None`: too large
/// to keep; the answer step makes this caller's answer as it streams.
async fn variant(
    state: &AppState,
    (cache, key): (&MetadataCache, &Key),
    entry: &Entry,
    form: Form,
    asker: &Asker<'_>,
) -> Result<Option<Arc<Entry>>, ProxyError> {
    let links = asker
        .admitted
        .links
        .to_caller
        .as_ref()
        .filter(|_| form.rewrite);
    let vkey = key.variant(
        entry,
        form.coding,
        links.map_or(&[][..], Rewriter::replacement),
    );
    if let Some(kept) = cache.variant(&vkey) {
        return Ok(Some(kept));
    }
    if entry.variant_unkept(form.coding) {
        return Ok(None);
    }
    let keep = !(form.rewrite && asker.admitted.links_from_caller) && cache.may_add_variant(entry);
    let _lock = match keep {
        false => None,
        true => match cache.turn(&vkey).await {
            Turn::Ready(kept) => return Ok(Some(kept)),
            Turn::Alone => return Ok(None),
            Turn::Lead(lock) => Some(lock),
        },
    };
    let wait = asker
        .admitted
        .org
        .lanes
        .first()
        .governor
        .config()
        .queue_timeout;
    let _transcoding = cache
        .transcoding(wait)
        .await
        .ok_or(ProxyError::GovernorQueueTimeout {
            waited: wait,
            retry_after: std::time::Duration::from_secs(1),
        })?;
    let Some((headers, bytes)) = make(state, cache, entry, asker).await? else {
        entry.set_variant_unkept(form.coding);
        return Ok(None);
    };
    Ok(Some(if keep {
        cache.insert_variant(vkey, entry, headers, bytes)
    } else {
        Arc::new(MetadataCache::unkept_variant(entry, headers, bytes))
    }))
}

/// The caller's form of `entry`, made whole by the answer step; `None`
/// when it outgrows `max_entry`.
async fn make(
    state: &AppState,
    cache: &MetadataCache,
    entry: &Entry,
    asker: &Asker<'_>,
) -> Result<Option<(HeaderMap, Bytes)>, ProxyError> {
    // Made for the cache, not for this request: what it learns is not kept.
    let mut scratch = RequestInfo::default();
    let call = &mut Call {
        state,
        arrived: tokio::time::Instant::now(),
        accept: asker.accept,
        info: &mut scratch,
    };
    let made = super::answer::answer(call, asker.admitted, as_sent(entry));
    let (mut parts, body) = made.await?.into_parts();
    let limited = http_body_util::Limited::new(body, cache.max_entry());
    let Ok(bytes) = limited.collect().await.map(Collected::to_bytes) else {
        return Ok(None);
    };
    let length = HeaderValue::from(bytes.len());
    parts.headers.insert(header::CONTENT_LENGTH, length);
    Ok(Some((parts.headers, bytes)))
}

/// The 304 for a caller whose `If-None-Match` names the entry: its `ETag`
/// and `Vary` as the 200 would carry them (RFC 9110 §15.4.5), the tag weak
/// where the answer step would change the bytes.
fn not_modified(entry: &Entry, asker: &Asker<'_>) -> Response<Full<Bytes>> {
    let kept = &entry.headers;
    let admitted = asker.admitted;
    let rewrite = admitted.links.to_caller.is_some() && is_rewritable(kept);
    let as_200 = (StatusCode::OK, kept);
    let recoded = super::answer::transcode_for(as_200, &admitted.method, rewrite, asker.accept)
        != Transcode::Untouched;
    let mut headers = HeaderMap::new();
    for name in [header::ETAG, header::VARY] {
        for value in kept.get_all(&name) {
            headers.append(&name, value.clone());
        }
    }
    if kept.contains_key(header::CONTENT_ENCODING) {
        vary_on_accept_encoding(&mut headers);
    }
    if recoded {
        weaken_etag(&mut headers);
    }
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NOT_MODIFIED;
    *response.headers_mut() = headers;
    response
}

/// The caller's own conditional headers, kept before the entry's tag
/// replaces them on the way to Dataverse.
fn conditional(headers: &HeaderMap) -> HeaderMap {
    let mut asked = HeaderMap::new();
    for value in headers.get_all(header::IF_NONE_MATCH) {
        asked.append(header::IF_NONE_MATCH, value.clone());
    }
    asked
}

/// Whether the caller asks for a check with Dataverse before anything
/// cached is served: `Cache-Control: no-cache` (or `Pragma: no-cache`),
/// or Dataverse's own `Consistency: Strong`.
fn wants_check(headers: &HeaderMap) -> bool {
    let says = |name: &str, word: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|v| v.trim().eq_ignore_ascii_case(word))
    };
    says("cache-control", "no-cache")
        || says("cache-control", "max-age=0")
        || says("pragma", "no-cache")
        || says("consistency", "strong")
}
