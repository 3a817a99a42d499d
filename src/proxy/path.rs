//! Which request targets may reach Dataverse.
//!
//! Only `/api/data/v9.0`, `/api/data/v9.1` and `/api/data/v9.2` (and what is
//! below them) are forwarded. Segments that a server could normalise into
//! something else (`.`/`..`, percent-encoded dots, slashes and backslashes,
//! raw backslashes, control bytes) are refused, so that what the proxy checks
//! is what Dataverse serves. The scheme and host always come from config.

use crate::error::ProxyError;

const API_VERSIONS: &[&str] = &["v9.0", "v9.1", "v9.2"];

/// Checks a raw (still percent-encoded) request path.
pub fn check(path: &str) -> Result<(), ProxyError> {
    let Some(rest) = path.strip_prefix("/api/data/") else {
        return Err(ProxyError::NotFound);
    };
    let (version, _) = rest.split_once('/').unwrap_or((rest, ""));
    if !API_VERSIONS.contains(&version) {
        return Err(ProxyError::NotFound);
    }
    for segment in path.split('/') {
        if segment == "." || segment == ".." {
            return Err(ProxyError::BadRequest(
                "dot segments are not allowed in the path",
            ));
        }
        let lower = segment.to_ascii_lowercase();
        if ["%2e", "%2f", "%5c", "%25"]
            .iter()
            .any(|enc| lower.contains(enc))
        {
            return Err(ProxyError::BadRequest(
                "percent-encoded dots, slashes, backslashes or percent signs are not allowed in the path",
            ));
        }
    }
    if path.bytes().any(|b| b == b'\\' || b.is_ascii_control()) {
        return Err(ProxyError::BadRequest(
            "backslashes and control characters are not allowed in the path",
        ));
    }
    Ok(())
}

/// True for file and image downloads (`…/$value`), whose binary bodies are
/// never rewritten and may come compressed.
pub fn is_file_download(path: &str) -> bool {
    path.ends_with("/$value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_paths_pass() {
        for p in [
            "/api/data/v9.2",
            "/api/data/v9.2/",
            "/api/data/v9.0/accounts",
            "/api/data/v9.1/accounts(00000000-0000-0000-0000-000000000001)/name",
            "/api/data/v9.2/WhoAmI()",
            "/api/data/v9.2/$metadata",
            "/api/data/v9.2/leads(1)/dvp_document/$value",
        ] {
            assert!(check(p).is_ok(), "{p}");
        }
    }

    #[test]
    fn outside_the_api_is_404() {
        for p in [
            "/",
            "/api",
            "/api/data",
            "/api/data/v8.2/accounts",
            "/api/data/v9.20/x",
            "/XRMServices/2011/Organization.svc",
            "/api/search/v1.0/query",
        ] {
            assert!(matches!(check(p), Err(ProxyError::NotFound)), "{p}");
        }
    }

    #[test]
    fn ambiguous_paths_are_400() {
        for p in [
            "/api/data/v9.2/../../XRMServices",
            "/api/data/v9.2/./accounts",
            "/api/data/v9.2/%2e%2e/x",
            "/api/data/v9.2/%2E%2E/x",
            "/api/data/v9.2/a%2fb",
            "/api/data/v9.2/a%5Cb",
            "/api/data/v9.2/a%252fb",
            "/api/data/v9.2/a\\b",
        ] {
            assert!(matches!(check(p), Err(ProxyError::BadRequest(_))), "{p}");
        }
    }
}
