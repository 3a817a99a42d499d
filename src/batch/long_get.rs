//! Long GETs sent as a one-part `$batch`.
//!
//! Dataverse refuses a request line whose URL is longer than
//! [`MAX_GET_URL`] characters, but takes a URL up to [`MAX_BATCH_URL`]
//! inside a `$batch` body (Microsoft Learn, "Query data using the Web API"
//! and "Execute batch operations using the Web API"; docs/dataverse.md,
//! "Long queries"). FetchXML queries outgrow the first often. So the proxy
//! sends such a GET as `POST $batch` holding that one GET ([`wrap`]), and
//! answers the caller with the inner response: its status and headers
//! read from the part's head ([`unwrap`]), its body streamed from the
//! multipart answer up to the closing delimiter ([`Unwrapped`]).

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::BoxError;
use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, header};
use http_body::{Body, Frame};
use http_body_util::BodyExt;

/// Longest URL Dataverse takes on a request line.
pub const MAX_GET_URL: usize = 32_768;
/// Longest URL of an operation inside `$batch`.
pub const MAX_BATCH_URL: usize = 65_536;
/// Longest head (outer part headers and inner status line and headers).
const MAX_HEAD: usize = 64 * 1024;
/// Most bytes read after the inner body's end (the close delimiter).
const MAX_EPILOGUE: usize = 64 * 1024;

/// Request headers that describe the GET itself, so they go into the part
/// (the rest, such as impersonation, stay on the `$batch` request).
const INNER: [&str; 9] = [
    "accept",
    "prefer",
    "if-none-match",
    "if-match",
    "odata-maxversion",
    "odata-version",
    "consistency",
    "accept-language",
    "mscrm.solutionuniquename",
];

/// The `$batch` request for a GET of `url` (absolute): its content type
/// and body. The GET's own headers ([`INNER`]) move from `headers` into
/// the part.
pub fn wrap(url: &str, headers: &mut HeaderMap) -> (HeaderValue, Bytes) {
    let boundary = format!("batch_{}", uuid::Uuid::new_v4());
    let mut body = format!(
        "--{boundary}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\nGET {url} HTTP/1.1\r\n"
    );
    for name in INNER {
        for value in headers.get_all(name).iter() {
            if let Ok(v) = value.to_str() {
                body.push_str(&format!("{name}: {v}\r\n"));
            }
        }
        headers.remove(name);
    }
    body.push_str(&format!("\r\n\r\n--{boundary}--\r\n"));
    let content_type = HeaderValue::from_str(&format!("multipart/mixed; boundary={boundary}"))
        .expect("a UUID boundary is a valid header value");
    (content_type, Bytes::from(body))
}

/// Why a `$batch` answer could not be unwrapped.
#[derive(Debug, thiserror::Error)]
pub enum UnwrapError {
    /// The answer ended, broke off or was malformed before the inner head.
    #[error("the $batch answer holds no readable response: {0}")]
    Malformed(&'static str),
    /// Reading the answer failed.
    #[error("reading the $batch answer failed")]
    Body(#[source] BoxError),
    /// Dataverse sent nothing of the head for this long.
    #[error("the $batch answer stalled for {0:?} before its response head")]
    Stalled(std::time::Duration),
}

/// Dataverse's `$batch` answer as the inner response. An answer that is
/// not `multipart/mixed` (the batch itself refused: 400, 401, 429…) is
/// `Err(answer)`, to be passed on as it is. Outer headers not in the inner
/// head (rate-limit remainders, request ids) are kept. Each piece of the
/// head must come within `idle`.
pub async fn unwrap<B>(
    response: Response<B>,
    idle: std::time::Duration,
) -> Result<Result<Response<Unwrapped<B>>, UnwrapError>, Response<B>>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let Some(boundary) = multipart_boundary(response.headers()) else {
        return Err(response);
    };
    let (outer, mut body) = response.into_parts();
    Ok(read_head(&mut body, &boundary, idle)
        .await
        .map(|(status, headers, rest)| {
            let mut inner = Response::new(Unwrapped::new(body, rest, &boundary));
            *inner.status_mut() = status;
            *inner.headers_mut() = merged(headers, outer.headers);
            inner
        }))
}

/// The answer's boundary, when it is `multipart/mixed` (the reader's own
/// rule, `super::boundary`).
fn multipart_boundary(headers: &HeaderMap) -> Option<String> {
    let content_type = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    super::boundary(content_type).map(str::to_owned)
}

/// Reads up to the end of the inner head: the status, the headers, and
/// the body bytes that came with it. A head can only be whole once a new
/// blank line (`CRLF CRLF`) arrives, so the buffer is parsed only then, not
/// at every frame: a head trickled a byte a frame costs linear work.
async fn read_head<B>(
    body: &mut B,
    boundary: &str,
    idle: std::time::Duration,
) -> Result<(StatusCode, HeaderMap, Bytes), UnwrapError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    let mut buf = BytesMut::new();
    let mut scanned: usize = 0;
    loop {
        let from = scanned.saturating_sub(3);
        if memchr::memmem::find(&buf[from..], b"\r\n\r\n").is_some()
            && let Some((status, headers, used)) = parse_head(&buf, boundary)?
        {
            buf.advance(used);
            return Ok((status, headers, buf.freeze()));
        }
        scanned = buf.len();
        if buf.len() > MAX_HEAD {
            return Err(UnwrapError::Malformed("the head is too long"));
        }
        let frame = tokio::time::timeout(idle, body.frame())
            .await
            .map_err(|_| UnwrapError::Stalled(idle))?;
        match frame {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    buf.extend_from_slice(&data);
                }
            }
            Some(Err(e)) => return Err(UnwrapError::Body(e.into())),
            None => return Err(UnwrapError::Malformed("the answer ended before a response")),
        }
    }
}

/// The inner head in `buf`, if all of it is there: the first part's
/// headers, then the embedded status line and headers.
fn parse_head(
    buf: &[u8],
    boundary: &str,
) -> Result<Option<(StatusCode, HeaderMap, usize)>, UnwrapError> {
    let open = format!("--{boundary}");
    let Some(start) = memchr::memmem::find(buf, open.as_bytes()) else {
        return Ok(None);
    };
    let Some(part_head) = memchr::memmem::find(&buf[start..], b"\r\n\r\n") else {
        return Ok(None);
    };
    let inner = start + part_head + 4;
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut headers);
    let used = match parsed.parse(&buf[inner..]) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => {
            return Err(UnwrapError::Malformed(
                "the embedded response head does not parse",
            ));
        }
    };
    let status = parsed
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(UnwrapError::Malformed("no status"))?;
    let mut map = HeaderMap::new();
    for h in parsed.headers.iter() {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) {
            map.append(name, value);
        }
    }
    Ok(Some((status, map, inner + used)))
}

/// The inner headers, and the outer ones they do not have (except those
/// that describe the outer body).
fn merged(mut inner: HeaderMap, outer: HeaderMap) -> HeaderMap {
    let mut last = None;
    for (name, value) in outer {
        let name = match name {
            Some(n) => {
                last = Some(n.clone());
                n
            }
            None => match &last {
                Some(n) => n.clone(),
                None => continue,
            },
        };
        let describes_body = matches!(
            name,
            header::CONTENT_TYPE
                | header::CONTENT_LENGTH
                | header::CONTENT_ENCODING
                | header::TRANSFER_ENCODING
        );
        if !describes_body && !inner.contains_key(&name) {
            inner.append(name, value);
        }
    }
    // The inner body's length is not the part's: it streams.
    inner.remove(header::CONTENT_LENGTH);
    inner
}

/// The inner body: the multipart answer's bytes up to the delimiter that
/// ends the part, streamed (a few bytes held back at a chunk's end, in
/// case they begin the delimiter). The rest of the answer is read and
/// dropped, so the connection can serve the next request.
pub struct Unwrapped<B> {
    inner: B,
    delimiter: Vec<u8>,
    held: BytesMut,
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Body,
    Epilogue(usize),
    Done,
}

impl<B> Unwrapped<B> {
    fn new(inner: B, rest: Bytes, boundary: &str) -> Self {
        Self {
            inner,
            delimiter: format!("\r\n--{boundary}").into_bytes(),
            held: BytesMut::from(&rest[..]),
            state: State::Body,
        }
    }

    /// What of `held` can go out: all before the delimiter once it is
    /// found, else all but a tail that could begin it.
    fn release(&mut self) -> Option<Bytes> {
        if let Some(i) = memchr::memmem::find(&self.held, &self.delimiter) {
            let out = self.held.split_to(i).freeze();
            self.held.clear();
            self.state = State::Epilogue(0);
            return (!out.is_empty()).then_some(out);
        }
        let keep = self.delimiter.len() - 1;
        let n = self.held.len().saturating_sub(keep);
        (n > 0).then(|| self.held.split_to(n).freeze())
    }
}

impl<B> Body for Unwrapped<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if self.state == State::Body
                && let Some(out) = self.release()
            {
                return Poll::Ready(Some(Ok(Frame::data(out))));
            }
            if self.state == State::Done {
                return Poll::Ready(None);
            }
            let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) if self.state == State::Body => {
                    self.state = State::Done;
                    return Poll::Ready(Some(
                        Err("the $batch answer ended inside its part".into()),
                    ));
                }
                Poll::Ready(None) => {
                    self.state = State::Done;
                    return Poll::Ready(None);
                }
                Poll::Ready(Some(Err(e))) => {
                    self.state = State::Done;
                    return Poll::Ready(Some(Err(e.into())));
                }
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            match self.state {
                State::Body => self.held.extend_from_slice(&data),
                State::Epilogue(n) if n + data.len() <= MAX_EPILOGUE => {
                    self.state = State::Epilogue(n + data.len());
                }
                // More after the part than a close delimiter: stop here
                // (the connection closes with the body).
                _ => self.state = State::Done,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == State::Done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: std::time::Duration = std::time::Duration::from_secs(5);

    /// A head that stops coming is an error after the idle time, not a
    /// wait without end.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_head_times_out() {
        use futures_util::StreamExt;
        let first: Result<Frame<Bytes>, std::convert::Infallible> = Ok(Frame::data(
            Bytes::from_static(b"--batchresponse_1\r\nContent-Ty"),
        ));
        let frames = futures_util::stream::iter([first]).chain(futures_util::stream::pending());
        let stalled = http_body_util::StreamBody::new(frames);
        let outcome = unwrap(outer(stalled), IDLE).await.expect("multipart");
        assert!(
            matches!(outcome, Err(UnwrapError::Stalled(d)) if d == IDLE),
            "stalled"
        );
    }

    const ANSWER: &str = "--batchresponse_1\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\n\
        HTTP/1.1 200 OK\r\nContent-Type: application/json; odata.metadata=minimal\r\nOData-Version: 4.0\r\n\r\n\
        {\"value\":[\"a\r\n--batchresponse_\"]}\r\n--batchresponse_1--\r\n";

    type Frames = futures_util::stream::Iter<
        std::vec::IntoIter<Result<Frame<Bytes>, std::convert::Infallible>>,
    >;

    /// The answer in frames of `size` bytes, as a body.
    fn body(text: &str, size: usize) -> http_body_util::StreamBody<Frames> {
        let frames: Vec<_> = text
            .as_bytes()
            .chunks(size)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        http_body_util::StreamBody::new(futures_util::stream::iter(frames))
    }

    fn outer<B>(b: B) -> Response<B> {
        let mut r = Response::new(b);
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("multipart/mixed; boundary=batchresponse_1"),
        );
        r.headers_mut()
            .insert("x-ms-service-request-id", HeaderValue::from_static("s-1"));
        r
    }

    #[tokio::test]
    async fn the_inner_response_streams_out_whatever_the_chunking() {
        for size in [1, 2, 7, 64, 4096] {
            let inner = unwrap(outer(body(ANSWER, size)), IDLE)
                .await
                .expect("multipart")
                .expect("unwrapped");
            assert_eq!(inner.status(), StatusCode::OK);
            assert_eq!(inner.headers()["odata-version"], "4.0");
            assert!(
                inner.headers()["content-type"]
                    .to_str()
                    .expect("ascii")
                    .starts_with("application/json")
            );
            assert_eq!(
                inner.headers()["x-ms-service-request-id"],
                "s-1",
                "outer headers kept"
            );
            let bytes = inner.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(
                &bytes[..],
                b"{\"value\":[\"a\r\n--batchresponse_\"]}",
                "frames of {size}"
            );
        }
    }

    #[tokio::test]
    async fn a_cut_answer_is_an_error_and_not_multipart_passes_as_it_is() {
        let cut = &ANSWER[..ANSWER.len() - 30];
        let inner = unwrap(outer(body(cut, 16)), IDLE)
            .await
            .expect("multipart")
            .expect("head read");
        assert!(inner.into_body().collect().await.is_err());
        let headless =
            "--batchresponse_1\r\nContent-Type: application/http\r\n\r\nnot a response\r\n\r\n";
        assert!(
            unwrap(outer(body(headless, 16)), IDLE)
                .await
                .expect("multipart")
                .is_err()
        );
        let plain = Response::new(body("{\"error\":{}}", 4));
        assert!(unwrap(plain, IDLE).await.is_err());
    }

    #[test]
    fn the_get_and_its_own_headers_go_into_the_part() {
        let mut headers = HeaderMap::new();
        headers.insert("prefer", HeaderValue::from_static("odata.maxpagesize=10"));
        headers.insert("callerobjectid", HeaderValue::from_static("0000"));
        let (ct, body) = wrap(
            "https://org.crm.dynamics.com/api/data/v9.2/accounts?fetchXml=x",
            &mut headers,
        );
        let body = std::str::from_utf8(&body).expect("utf-8");
        let boundary = ct
            .to_str()
            .expect("ascii")
            .split("boundary=")
            .nth(1)
            .expect("boundary");
        assert!(body.starts_with(&format!(
            "--{boundary}\r\nContent-Type: application/http\r\n"
        )));
        assert!(body.contains("\r\n\r\nGET https://org.crm.dynamics.com/api/data/v9.2/accounts?fetchXml=x HTTP/1.1\r\nprefer: odata.maxpagesize=10\r\n\r\n"));
        assert!(body.ends_with(&format!("\r\n--{boundary}--\r\n")));
        assert!(headers.get("prefer").is_none() && headers.get("callerobjectid").is_some());
    }
}
