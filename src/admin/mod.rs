//! The admin listener: `/livez` (the process is up), `/readyz` (a valid
//! token is held for a lane of every org and shutdown has not begun; the
//! lanes down are named), `/metrics`,
//! and the operator's view: `/` (the status page) and `/status` (its data
//! as JSON), see `admin/status/`, and `/usage` (the Power Platform requests
//! spent by day, as CSV).

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::app::AppState;

pub mod metrics;
pub mod status;
mod usage;

pub fn router(state: AppState) -> Router {
    // What a page in the operator's browser must not read through a
    // DNS-rebound name (a port-forward to 127.0.0.1): the status page, its
    // data and the metrics answer only to a Host the operator uses.
    let views = Router::new()
        .route("/metrics", get(metrics))
        .route("/", get(status::page))
        .route("/status", get(status::status))
        .route("/usage", get(usage::usage))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            known_host,
        ));
    Router::new()
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/reload", axum::routing::post(reload))
        .merge(views)
        .with_state(state)
}

/// Refuses a request whose `Host` is neither an address, `localhost`, nor
/// one of `admin_hosts`.
async fn known_host(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if host_is_local(req.headers().get(http::header::HOST), &state.admin_hosts) {
        return next.run(req).await;
    }
    (
        StatusCode::FORBIDDEN,
        "the admin listener answers only to an address, localhost or a name in admin_hosts (Host)\n",
    )
        .into_response()
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let body = metrics::render(&state.metrics, &state).await;
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
}

/// Readiness is the tokens' and the drain's; the governor's shared state
/// is reported in the body but never makes the proxy unready (it runs on
/// its local fallback cap while Redis does not answer).
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    use crate::governor::redis::State;
    let governor = match state.redis.as_ref().map(|r| r.state()) {
        None => "",
        Some(State::Shared) => "governor: shared (Redis)\n",
        Some(State::Returning) => {
            "governor: returning (Redis answers again; local fallback cap while every replica registers its slots)\n"
        }
        Some(State::Down) => "governor: local fallback cap (Redis does not answer)\n",
    };
    let mut lanes = String::new();
    for org in state.orgs.iter() {
        for lane in org.lanes.out_of_rotation() {
            lanes.push_str(&format!(
                "lane down: {}/{lane} (its credential fails; the other lanes serve)\n",
                org.name
            ));
        }
    }
    if state.ready().await {
        (StatusCode::OK, format!("ready\n{governor}{lanes}"))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: no valid token for every org yet\n{governor}{lanes}"),
        )
    }
}

/// `POST /reload` (with `admin_reload = true`): reloads as SIGHUP does, and
/// says what happened: 200 with the settings that still need a restart, or
/// 422 with every problem (the running configuration stays). Off, 404.
///
/// A browser page must not be able to trigger it: the request needs
/// `X-Dataverse-Proxy-Reload: 1` (a header no form or simple request can
/// carry, and the admin listener answers no CORS preflight), and a `Host`
/// that is an address or `localhost` (a DNS-rebound name is refused).
/// Whether `Host` names this machine by address (IPv4, `[IPv6]`), as
/// `localhost` or as one of `names`, with or without a port.
fn host_is_local(host: Option<&http::HeaderValue>, names: &[String]) -> bool {
    let Some(host) = host.and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let Ok(authority) = host.parse::<http::uri::Authority>() else {
        return false;
    };
    let name = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<std::net::IpAddr>().is_ok()
        || names.iter().any(|n| n.eq_ignore_ascii_case(name))
}

async fn reload(
    State(state): State<AppState>,
    headers: http::HeaderMap,
) -> axum::response::Response {
    if !state.admin_reload {
        return (StatusCode::NOT_FOUND, "admin_reload is off\n").into_response();
    }
    if headers
        .get("x-dataverse-proxy-reload")
        .is_none_or(|v| v != "1")
    {
        return (
            StatusCode::FORBIDDEN,
            "POST /reload needs the header X-Dataverse-Proxy-Reload: 1\n",
        )
            .into_response();
    }
    if !host_is_local(headers.get(http::header::HOST), &state.admin_hosts) {
        return (
            StatusCode::FORBIDDEN,
            "POST /reload must name the admin listener by address or localhost in Host\n",
        )
            .into_response();
    }
    let outcome = tokio::task::spawn_blocking({
        let state = state.clone();
        move || crate::app::reload::reload(&state)
    })
    .await;
    match outcome {
        Ok(Ok(done)) => axum::Json(serde_json::json!({
            "reloaded": true,
            "restart_needed": done.restart_needed,
        }))
        .into_response(),
        Ok(Err(problems)) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(serde_json::json!({"reloaded": false, "problems": problems})),
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
