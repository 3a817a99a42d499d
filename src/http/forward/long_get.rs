//! A GET whose URL Dataverse would refuse on the request line goes as a
//! one-part `$batch` (`crate::batch::long_get`); the caller gets the inner
//! response through the usual answer step (headers, links, coding).

use axum::body::Body;
use axum::http::{HeaderValue, Method, Response, header};
use bytes::Bytes;

use super::admit::Admitted;
use super::answer::answer;
use super::call::Call;
use super::plan::{Planned, service_root};
use super::send::{Sent, send};
use crate::batch::long_get::{MAX_BATCH_URL, MAX_GET_URL, UnwrapError, unwrap, wrap};
use crate::error::ProxyError;
use crate::http::body::RequestBody;

/// The length of the URL Dataverse would see for `planned`, when it is a
/// GET too long for a request line (else `None`).
pub fn too_long_for_a_request_line(admitted: &Admitted, planned: &Planned) -> Option<usize> {
    let pq = planned.uri.path_and_query()?.as_str().len();
    let len = admitted.org.origin.len() + pq;
    (planned.method == Method::GET && len > MAX_GET_URL).then_some(len)
}

/// Sends `planned` (a GET of `url_len` characters) inside `$batch` and
/// answers with the inner response.
pub async fn as_batch(
    call: &mut Call<'_>,
    admitted: &Admitted,
    mut planned: Planned,
    url_len: usize,
) -> Result<Response<Body>, ProxyError> {
    if url_len > MAX_BATCH_URL {
        return Err(ProxyError::UrlTooLongForDataverse(url_len));
    }
    let url = planned.uri.to_string();
    let (content_type, body) = wrap(&url, &mut planned.headers);
    let batch = batch_uri(&planned.uri)?;
    planned.uri = batch;
    planned.method = Method::POST;
    let h = &mut planned.headers;
    h.insert(header::CONTENT_TYPE, content_type);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    h.insert(header::ACCEPT, HeaderValue::from_static("multipart/mixed"));
    // The multipart answer is read here to find the part: not compressed.
    h.remove(header::ACCEPT_ENCODING);
    planned.body = RequestBody::Buffered(body);
    let sent = send(call, admitted, planned).await?;
    let Sent {
        response, permit, ..
    } = sent;
    let idle = call.state.upstream.idle_timeout;
    let response = match unwrap(response, idle).await {
        Err(as_it_is) => as_it_is.map(http_body_util::Either::Left),
        Ok(Ok(inner)) => inner.map(http_body_util::Either::Right),
        Ok(Err(UnwrapError::Stalled(idle))) => return Err(ProxyError::UpstreamTimeout(idle)),
        Ok(Err(e)) => return Err(ProxyError::UpstreamBody(e.into())),
    };
    let resp = answer(call, admitted, Sent::new(response, permit)).await?;
    Ok(resp.map(Body::new))
}

/// `{service root}/$batch` on the org, from the GET's URI.
fn batch_uri(get: &http::Uri) -> Result<http::Uri, ProxyError> {
    let root = service_root(get.path());
    let mut parts = http::uri::Parts::default();
    parts.scheme = get.scheme().cloned();
    parts.authority = get.authority().cloned();
    parts.path_and_query = Some(
        http::uri::PathAndQuery::from_maybe_shared(Bytes::from(format!("{root}/$batch")))
            .map_err(|_| ProxyError::Internal)?,
    );
    http::Uri::from_parts(parts).map_err(|_| ProxyError::Internal)
}
