//! Simulated `$batch` (docs/dataverse.md, "Batch requests"): `multipart/mixed` requests of
//! `application/http` parts and change sets, executed in order.
//!
//! - Change sets are atomic: a failing operation rolls the whole set back.
//! - `Content-ID` references: a later request in a change set may use `$n`
//!   as its URL (or URL prefix), or as an `@odata.bind` value.
//! - Without `Prefer: odata.continue-on-error`, processing stops at the first
//!   failure; the answer then has the failing status and only the failing
//!   part. With it, the answer is 200 and every part has its own status.
//! - Request URLs may be absolute (their origin must be this org's: the
//!   simulator refuses foreign hosts, which is what makes a proxy rewrite
//!   them), absolute paths, or relative to the service root.
//! - Answers use `batchresponse_…` / `changesetresponse_…` boundaries and
//!   absolute org URLs in `Location` / `OData-EntityId` and JSON bodies.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt;
use uuid::Uuid;

use super::{dv_error, route};
use crate::multipart::{Part, boundary, split, split_head};
use crate::{SimState, lock};

/// Most operations in one batch (Dataverse: 1000).
const MAX_OPERATIONS: usize = 1000;

/// A request parsed from an `application/http` part.
struct Operation {
    content_id: Option<String>,
    method: Method,
    url: String,
    headers: Vec<(String, String)>,
    body: Bytes,
}

fn parse_operation(part: &Part<'_>) -> Result<Operation, String> {
    let (head, body) = split_head(part.content).ok_or_else(|| "empty operation".to_owned())?;
    let head = String::from_utf8_lossy(head);
    let mut lines = head.lines();
    let request_line = lines.next().unwrap_or_default();
    let mut words = request_line.split_whitespace();
    let (Some(method), Some(url)) = (words.next(), words.next()) else {
        return Err(format!("invalid request line '{request_line}'"));
    };
    let method =
        Method::from_bytes(method.as_bytes()).map_err(|_| format!("invalid method '{method}'"))?;
    if url.len() > super::MAX_BATCH_URL {
        return Err(format!(
            "the URL of a batch operation is {} characters long; at most {} are allowed",
            url.len(),
            super::MAX_BATCH_URL
        ));
    }
    let headers = lines
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_owned(), v.trim().to_owned()))
        })
        .collect();
    Ok(Operation {
        content_id: part.header("content-id").map(str::to_owned),
        method,
        url: url.to_owned(),
        headers,
        body: Bytes::copy_from_slice(body),
    })
}

/// The result of one operation, ready to be written as a part.
struct Outcome {
    content_id: Option<String>,
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Outcome {
    fn failed(&self) -> bool {
        self.status.is_client_error() || self.status.is_server_error()
    }

    fn write(&self, out: &mut String) {
        out.push_str("Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n");
        if let Some(id) = &self.content_id {
            out.push_str(&format!("Content-ID: {id}\r\n"));
        }
        out.push_str(&format!(
            "\r\nHTTP/1.1 {} {}\r\n",
            self.status.as_u16(),
            self.status.canonical_reason().unwrap_or("")
        ));
        for (k, v) in &self.headers {
            if let Ok(v) = v.to_str() {
                out.push_str(&format!("{}: {v}\r\n", canonical(k)));
            }
        }
        out.push_str("\r\n");
        out.push_str(&String::from_utf8_lossy(&self.body));
        out.push_str("\r\n");
    }
}

/// The headers of an answer part, as Dataverse writes them
/// (docs/dataverse.md, "Batch"): `OData-Version: 4.0` in every part, and a
/// created record's `Location` beside its `OData-EntityId`.
fn part_headers(mut headers: HeaderMap) -> HeaderMap {
    headers.insert("odata-version", HeaderValue::from_static("4.0"));
    if let Some(id) = headers.get("odata-entityid").cloned()
        && !headers.contains_key(http::header::LOCATION)
    {
        headers.insert(http::header::LOCATION, id);
    }
    headers
}

/// `odata-entityid` → `OData-EntityId`, as Dataverse writes headers.
fn canonical(name: &HeaderName) -> String {
    match name.as_str() {
        "odata-entityid" => "OData-EntityId".to_owned(),
        "odata-version" => "OData-Version".to_owned(),
        "etag" => "ETag".to_owned(),
        "req_id" => "REQ_ID".to_owned(),
        other => other
            .split('-')
            .map(|w| {
                let mut c = w.chars();
                c.next()
                    .map(|f| f.to_ascii_uppercase().to_string() + c.as_str())
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("-"),
    }
}

/// A top-level item: one operation or a change set.
enum Item {
    Single(Operation),
    ChangeSet(Vec<Operation>),
}

/// Runs a `$batch` request.
pub(super) async fn execute(
    sim: &Arc<SimState>,
    api_path: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    *lock(&sim.last_batch) = Some(body.clone());
    let items = match read_items(headers, &body) {
        Ok(items) => items,
        Err(msg) => return dv_error(StatusCode::BAD_REQUEST, "0x80048d19", &msg),
    };
    let continue_on_error = headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("odata.continue-on-error"));
    let boundary_out = format!("batchresponse_{}", Uuid::new_v4());
    let mut answer = Answer {
        boundary: boundary_out.clone(),
        body: String::new(),
        status: StatusCode::OK,
    };
    for item in items {
        let failed = match item {
            Item::Single(op) => {
                let outcome = run(sim, api_path, op, &HashMap::new()).await;
                answer.part(outcome, continue_on_error)
            }
            Item::ChangeSet(ops) => {
                run_change_set(sim, api_path, ops, &mut answer, continue_on_error).await
            }
        };
        if failed && !continue_on_error {
            break;
        }
    }
    answer.body.push_str(&format!("--{boundary_out}--\r\n"));
    let mut resp = (answer.status, answer.body).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("multipart/mixed; boundary={boundary_out}")) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp
}

/// The batch's items, as a lenient server reads them.
fn read_items(headers: &HeaderMap, body: &[u8]) -> Result<Vec<Item>, String> {
    let outer = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(boundary)
        .ok_or("The batch request must have a multipart/mixed content type with a boundary.")?;
    let parts = split(body, &outer)
        .ok_or("The batch request body is not valid multipart/mixed content.")?;
    let mut items = Vec::new();
    let mut count = 0;
    for part in &parts {
        let ct = part.header("content-type").unwrap_or_default();
        if let Some(inner) = boundary(ct) {
            let inner_parts = split(part.content, &inner)
                .ok_or("A change set is not valid multipart/mixed content.")?;
            let ops = inner_parts
                .iter()
                .map(parse_operation)
                .collect::<Result<Vec<_>, String>>()?;
            count += ops.len();
            items.push(Item::ChangeSet(ops));
        } else {
            items.push(Item::Single(parse_operation(part)?));
            count += 1;
        }
    }
    if count > MAX_OPERATIONS {
        return Err("The batch request exceeds the limit of 1000 operations.".to_owned());
    }
    Ok(items)
}

/// The answer being written: its parts and the outer status.
struct Answer {
    boundary: String,
    body: String,
    status: StatusCode,
}

impl Answer {
    /// Adds one operation's answer; true when it failed. Without
    /// continue-on-error, a failure is the whole answer (and its status).
    fn part(&mut self, outcome: Outcome, continue_on_error: bool) -> bool {
        let failed = outcome.failed();
        if failed && !continue_on_error {
            self.status = outcome.status;
            self.body.clear();
        }
        self.body.push_str(&format!("--{}\r\n", self.boundary));
        outcome.write(&mut self.body);
        failed
    }
}

/// Runs a change set all or nothing; true when it failed.
async fn run_change_set(
    sim: &Arc<SimState>,
    api_path: &str,
    ops: Vec<Operation>,
    answer: &mut Answer,
    continue_on_error: bool,
) -> bool {
    let snapshot = lock(&sim.db).clone();
    let mut ids: HashMap<String, String> = HashMap::new();
    let mut outcomes = Vec::new();
    for op in ops {
        let outcome = run(sim, api_path, op, &ids).await;
        if outcome.failed() {
            // All or nothing: undo the set's earlier operations.
            *lock(&sim.db) = snapshot;
            return answer.part(outcome, continue_on_error);
        }
        if let (Some(id), Some(url)) = (
            &outcome.content_id,
            outcome
                .headers
                .get("odata-entityid")
                .and_then(|v| v.to_str().ok()),
        ) {
            ids.insert(id.clone(), url.to_owned());
        }
        outcomes.push(outcome);
    }
    let cs = format!("changesetresponse_{}", Uuid::new_v4());
    answer.body.push_str(&format!(
        "--{}\r\nContent-Type: multipart/mixed; boundary={cs}\r\n\r\n",
        answer.boundary
    ));
    for o in &outcomes {
        answer.body.push_str(&format!("--{cs}\r\n"));
        o.write(&mut answer.body);
    }
    answer.body.push_str(&format!("--{cs}--\r\n"));
    false
}

/// Executes one operation through the normal routes.
async fn run(
    sim: &Arc<SimState>,
    api_path: &str,
    op: Operation,
    ids: &HashMap<String, String>,
) -> Outcome {
    let content_id = op.content_id.clone();
    let done = |resp: Response| async {
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Outcome {
            content_id: content_id.clone(),
            status: parts.status,
            headers: part_headers(parts.headers),
            body,
        }
    };
    let path = match resolve(sim, api_path, &op.url, ids) {
        Ok(p) => p,
        Err(msg) => return done(dv_error(StatusCode::BAD_REQUEST, "0x80060888", &msg)).await,
    };
    let mut body = op.body;
    for (id, url) in ids {
        let needle = format!("\"${id}\"");
        let text = String::from_utf8_lossy(&body);
        if text.contains(&needle) {
            let relative = url
                .split_once("/api/data/")
                .map_or(url.as_str(), |(_, r)| r);
            let relative = relative.split_once('/').map_or(relative, |(_, r)| r);
            body = Bytes::from(text.replace(&needle, &format!("\"/{relative}\"")));
        }
    }
    let mut req = Request::new(Body::from(body));
    *req.method_mut() = op.method;
    match path.parse() {
        Ok(uri) => *req.uri_mut() = uri,
        Err(_) => {
            return done(dv_error(
                StatusCode::BAD_REQUEST,
                "0x80060888",
                "Invalid URL in batch operation.",
            ))
            .await;
        }
    }
    for (k, v) in &op.headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            req.headers_mut().append(k, v);
        }
    }
    // Boxed: route() runs batches, which run route().
    done(Box::pin(route(sim, req)).await).await
}

/// The path and query an operation's URL addresses.
fn resolve(
    sim: &SimState,
    api_path: &str,
    url: &str,
    ids: &HashMap<String, String>,
) -> Result<String, String> {
    if let Some(reference) = url.strip_prefix('$') {
        let (id, rest) = reference
            .split_once('/')
            .map_or((reference, ""), |(i, r)| (i, r));
        let target = ids.get(id).ok_or_else(|| {
            format!("Content-ID reference '${id}' was not found in this change set.")
        })?;
        let path = target.strip_prefix(&sim.org_url).unwrap_or(target);
        return Ok(if rest.is_empty() {
            path.to_owned()
        } else {
            format!("{path}/{rest}")
        });
    }
    if url.split('?').next().is_some_and(|p| p.ends_with("$batch")) {
        return Err("Nested $batch requests are not supported.".to_owned());
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return url
            .strip_prefix(&sim.org_url)
            .filter(|p| p.starts_with('/'))
            .map(str::to_owned)
            .ok_or_else(|| {
                format!(
                    "The URL '{url}' in the batch does not address this organization ({}).",
                    sim.org_url
                )
            });
    }
    if url.starts_with('/') {
        return Ok(url.to_owned());
    }
    Ok(format!("{api_path}/{url}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundaries_and_parts() {
        assert_eq!(
            boundary("multipart/mixed; boundary=\"batch_AAA\"").as_deref(),
            Some("batch_AAA")
        );
        assert_eq!(boundary("application/json"), None);
        let body = b"--b\r\nContent-Type: application/http\r\n\r\nGET accounts HTTP/1.1\r\n\r\n\r\n--b\r\nContent-Type: application/http\r\n\r\nGET leads HTTP/1.1\r\n\r\n\r\n--b--\r\n";
        let parts = split(body, "b").expect("parts");
        assert_eq!(parts.len(), 2);
        let op = parse_operation(&parts[1]).expect("op");
        assert_eq!(op.method, Method::GET);
        assert_eq!(op.url, "leads");
        assert!(split(b"--b\r\nx\r\n\r\n", "b").is_none(), "unterminated");
    }

    #[test]
    fn every_answer_part_says_its_odata_version_and_a_create_its_location() {
        let mut created = HeaderMap::new();
        let id = "https://org.example/api/data/v9.2/tasks(00000000-0000-0000-0000-000000000001)";
        created.insert("odata-entityid", HeaderValue::from_static(id));
        let outcome = Outcome {
            content_id: Some("1".into()),
            status: StatusCode::NO_CONTENT,
            headers: part_headers(created),
            body: Bytes::new(),
        };
        let mut out = String::new();
        outcome.write(&mut out);
        let head = out.split("\r\n\r\n").nth(1).expect("the part's HTTP head");
        assert!(head.starts_with("HTTP/1.1 204 No Content\r\n"), "{out}");
        assert!(head.contains("OData-Version: 4.0"), "{out}");
        assert!(head.contains(&format!("Location: {id}")), "{out}");
        assert!(head.contains(&format!("OData-EntityId: {id}")), "{out}");
    }

    #[test]
    fn header_names_are_written_like_dataverse() {
        assert_eq!(
            canonical(&HeaderName::from_static("odata-entityid")),
            "OData-EntityId"
        );
        assert_eq!(
            canonical(&HeaderName::from_static("content-type")),
            "Content-Type"
        );
        assert_eq!(canonical(&HeaderName::from_static("location")), "Location");
    }
}
