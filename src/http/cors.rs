//! CORS for internal browser apps, off unless `[cors]` lists origins:
//! tower-http's layer answers preflights itself (they never reach the
//! router, so never Dataverse) and adds the allow headers to answers for
//! listed origins. Dataverse's own `Access-Control-*` headers never reach
//! callers (`headers.rs`): the proxy is the origin the browser talks to.

use axum::http::{HeaderName, HeaderValue};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::CorsConfig;

/// The layer for `config`.
pub fn layer(config: &CorsConfig) -> CorsLayer {
    let origins: Vec<HeaderValue> = config
        .allowed_origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    let names = |list: &[String]| -> Vec<HeaderName> {
        list.iter()
            .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
            .collect()
    };
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods(config.allowed_methods.clone())
        .allow_headers(names(&config.allowed_headers))
        .expose_headers(names(&config.exposed_headers))
        .max_age(config.max_age)
        .allow_credentials(config.allow_credentials)
}
