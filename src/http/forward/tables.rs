//! The org's tables for the table policy: its `$metadata` (CSDL), fetched
//! with the first lane's token when first needed and again once it is older
//! than [`MAX_AGE`]. Requests read the map without a lock; one request at a
//! time reads `$metadata` again, while the others go on with the map they
//! have. A failed read is not tried again for [`RETRY_AFTER`]: meanwhile the
//! last map serves, or, with none, requests are refused (503), never
//! checked by a guess.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{Method, Request, header};
use http_body_util::BodyExt;
use tokio::time::Instant;

use crate::app::OrgState;
use crate::error::ProxyError;
use crate::policy::tables::{Loaded, TableMap};

/// How long a map serves before the org's `$metadata` is read again.
const MAX_AGE: Duration = Duration::from_secs(3600);

/// How long a failed read stands before the next try.
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// The largest `$metadata` read (Dataverse's run to tens of megabytes).
const MAX_CSDL: usize = 128 << 20;

/// The org's table map, read first when there is none yet or it is due.
pub async fn of(org: &OrgState, timeout: Duration) -> Result<Arc<TableMap>, ProxyError> {
    if let Some(answer) = standing(org, false) {
        return answer;
    }
    let _refresh = match org.tables_refresh.try_lock() {
        Ok(guard) => guard,
        // Another request reads it: go on with the map there is, or wait.
        Err(_) => match standing(org, true) {
            Some(answer) => return answer,
            None => org.tables_refresh.lock().await,
        },
    };
    if let Some(answer) = standing(org, false) {
        return answer;
    }
    let previous = org.tables.load_full().and_then(|l| l.map.clone());
    let loaded = match tokio::time::timeout(timeout, fetch(org)).await {
        Ok(Ok(map)) => Loaded {
            map: Some(Arc::new(map)),
            failure: None,
            until: Instant::now() + MAX_AGE,
        },
        failed => {
            let why = match failed {
                Ok(Err(why)) => why,
                _ => format!("no answer within {timeout:?}"),
            };
            tracing::warn!(org = %org.name, error = %why, "cannot read the org's $metadata for the table policy");
            Loaded {
                map: previous,
                failure: Some(why),
                until: Instant::now() + RETRY_AFTER,
            }
        }
    };
    let answer = answer_of(&loaded);
    org.tables.store(Some(Arc::new(loaded)));
    answer
}

/// What the map last read answers: while it stands, or (`stale_ok`) as long
/// as it holds a map at all.
fn standing(org: &OrgState, stale_ok: bool) -> Option<Result<Arc<TableMap>, ProxyError>> {
    let loaded = org.tables.load();
    let loaded = loaded.as_ref()?;
    let stands = Instant::now() < loaded.until;
    (stands || (stale_ok && loaded.map.is_some())).then(|| answer_of(loaded))
}

fn answer_of(loaded: &Loaded) -> Result<Arc<TableMap>, ProxyError> {
    match (&loaded.map, &loaded.failure) {
        (Some(map), _) => Ok(map.clone()),
        (None, why) => Err(ProxyError::PolicyTablesUnavailable(
            why.clone().unwrap_or_default(),
        )),
    }
}

async fn fetch(org: &OrgState) -> Result<TableMap, String> {
    let token = org
        .lanes
        .first()
        .token
        .get()
        .await
        .map_err(|e| e.to_string())?;
    let uri: http::Uri = format!("{}/api/data/v9.2/$metadata", org.origin)
        .parse()
        .map_err(|e: http::uri::InvalidUri| e.to_string())?;
    let req = Request::builder()
        .method(Method::GET)
        .uri(uri)
        .header(header::HOST, org.host_header.clone())
        .header(header::ACCEPT, "application/xml")
        .header(header::AUTHORIZATION, token.header())
        .body(axum::body::Body::empty())
        .map_err(|e| e.to_string())?;
    let resp = org.pool.send(req).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("Dataverse answered {}", resp.status()));
    }
    let body = http_body_util::Limited::new(resp.into_body(), MAX_CSDL)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let text = std::str::from_utf8(&body).map_err(|_| "the CSDL is not UTF-8".to_owned())?;
    TableMap::from_csdl(text).map_err(|e| e.to_string())
}
