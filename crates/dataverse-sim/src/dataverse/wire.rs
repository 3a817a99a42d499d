//! How the simulated Dataverse's answers travel: compressed when the
//! client asks (text only, as Dataverse's front end does), and broken on
//! purpose for the tests (`SimHandle::break_compressed_answers`).

use super::*;

/// Answers worth compressing: JSON, XML and multipart text of 32 bytes or more.
pub(super) fn is_text(
    _: StatusCode,
    _: axum::http::Version,
    headers: &HeaderMap,
    _: &axum::http::Extensions,
) -> bool {
    let text = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            [
                "application/json",
                "application/xml",
                "multipart/mixed",
                "text/",
            ]
            .iter()
            .any(|t| ct.starts_with(t))
        });
    let tiny = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n < 32);
    text && !tiny
}

/// With `break_compressed_answers` on, a compressed answer stops halfway,
/// ending as if complete: a coded stream that cannot be decoded.
pub(super) async fn break_compressed(
    State(sim): State<Arc<SimState>>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let resp = next.run(req).await;
    let broken = sim
        .break_compression
        .load(std::sync::atomic::Ordering::Relaxed);
    if !broken || !resp.headers().contains_key(header::CONTENT_ENCODING) {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(bytes.slice(..bytes.len() / 2)))
}
