//! The org's tables for the table policy: its `$metadata` (CSDL), fetched
//! with the first lane's token when first needed and again once it is older
//! than [`MAX_AGE`]. While a fetch fails, the last map serves; with none,
//! the request is refused (503), never checked by a guess.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{Method, Request, header};
use http_body_util::BodyExt;
use tokio::time::Instant;

use crate::error::ProxyError;
use crate::http::state::OrgState;
use crate::policy::tables::TableMap;

/// How long a map serves before the org's `$metadata` is read again.
const MAX_AGE: Duration = Duration::from_secs(3600);

/// The largest `$metadata` read (Dataverse's run to tens of megabytes).
const MAX_CSDL: usize = 128 << 20;

/// The org's table map, fetched or refreshed first when it must be.
pub async fn of(org: &OrgState, timeout: Duration) -> Result<Arc<TableMap>, ProxyError> {
    let mut held = org.tables.lock().await;
    if let Some((map, at)) = held.as_ref()
        && at.elapsed() < MAX_AGE
    {
        return Ok(map.clone());
    }
    match tokio::time::timeout(timeout, fetch(org)).await {
        Ok(Ok(map)) => {
            let map = Arc::new(map);
            *held = Some((map.clone(), Instant::now()));
            Ok(map)
        }
        failed => {
            let why = match failed {
                Ok(Err(why)) => why,
                _ => format!("no answer within {timeout:?}"),
            };
            tracing::warn!(org = %org.name, error = %why, "cannot read the org's $metadata for the table policy");
            match held.as_ref() {
                Some((map, _)) => Ok(map.clone()),
                None => Err(ProxyError::PolicyTablesUnavailable(why)),
            }
        }
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
