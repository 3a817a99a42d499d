//! The path guard: which request targets may reach Dataverse (pure, no I/O).
//!
//! Only `/api/data/v9.0`, `/api/data/v9.1` and `/api/data/v9.2` (and what is
//! below them) are forwarded. Segments that a server could normalise into
//! something else (`.`/`..`, percent-encoded dots, slashes and backslashes,
//! raw backslashes, control bytes) are refused, so that what the proxy checks
//! is what Dataverse serves. Every `%` must start an RFC 3986
//! percent-encoding (two hex digits): IIS's `%uNNNN` form (`%u002e` is a dot
//! to http.sys with `PercentUAllowed`), a bare `%` or `%` with one digit are
//! read differently by different servers, so they are refused in the path
//! and in the query alike (docs/dataverse.md, "Percent-encoding and IIS").
//!
//! Only the Web API's methods are forwarded ([`WEB_API_METHODS`]).

use http::Method;

use crate::config::WEB_API_METHODS;

/// Why a path cannot be forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not under `/api/data/v9.0|1|2` (404).
    #[error("only /api/data/v9.0, v9.1 and v9.2 paths are proxied to Dataverse")]
    OutsideApi,
    /// Ambiguous: a server could read it as another path (400).
    #[error("{0}")]
    Ambiguous(&'static str),
}

/// The methods of the Dataverse Web API, the only ones forwarded.
pub fn is_web_api_method(method: &Method) -> bool {
    WEB_API_METHODS.contains(method)
}

/// True when every `%` is followed by two hex digits (RFC 3986 §2.1).
pub fn percent_encodings_are_valid(bytes: &[u8]) -> bool {
    memchr::memchr_iter(b'%', bytes).all(|i| {
        bytes
            .get(i + 1..i + 3)
            .is_some_and(|pair| pair.iter().all(u8::is_ascii_hexdigit))
    })
}

/// Checks a query string with the same escape rule as the path.
pub fn check_query(query: &str) -> Result<(), PathError> {
    if percent_encodings_are_valid(query.as_bytes()) {
        Ok(())
    } else {
        Err(PathError::Ambiguous(
            "every % in the query must start a percent-encoding with two hex digits (%25 for a literal %)",
        ))
    }
}

const API_VERSIONS: &[&str] = &["v9.0", "v9.1", "v9.2"];

/// Checks a raw (still percent-encoded) request path.
pub fn check(path: &str) -> Result<(), PathError> {
    let Some(rest) = path.strip_prefix("/api/data/") else {
        return Err(PathError::OutsideApi);
    };
    let (version, _) = rest.split_once('/').unwrap_or((rest, ""));
    if !API_VERSIONS.contains(&version) {
        return Err(PathError::OutsideApi);
    }
    if path.contains("//") {
        return Err(PathError::Ambiguous("empty path segments are not allowed"));
    }
    // The common case, in one pass: nothing encoded, no backslash, no
    // control byte, no segment starting with a dot.
    let bytes = path.as_bytes();
    if bytes
        .iter()
        .all(|&b| b.is_ascii_graphic() && b != b'%' && b != b'\\')
        && !bytes.windows(2).any(|w| w == b"/.")
    {
        return Ok(());
    }
    if !percent_encodings_are_valid(bytes) {
        return Err(PathError::Ambiguous(
            "every % in the path must start a percent-encoding with two hex digits (no %uNNNN, no bare %)",
        ));
    }
    let decoded = percent_encoding::percent_decode_str(path);
    let Ok(decoded) = decoded.decode_utf8() else {
        return Err(PathError::Ambiguous(
            "the path is not valid UTF-8 once percent-decoded",
        ));
    };
    if decoded.chars().any(char::is_control) {
        return Err(PathError::Ambiguous(
            "control characters are not allowed in the path",
        ));
    }
    // No OData segment starts with a dot; dot segments in any spelling
    // ("..", ".", "..;x", "%2e%2e" once decoded) are refused.
    if decoded.split('/').any(|seg| seg.starts_with('.')) {
        return Err(PathError::Ambiguous(
            "dot segments are not allowed in the path",
        ));
    }
    // Encoded dots, slashes, backslashes and percent signs, in any case.
    for (i, _) in bytes.iter().enumerate().filter(|(_, b)| **b == b'%') {
        let pair = bytes
            .get(i + 1..i + 3)
            .map(|p| [p[0].to_ascii_lowercase(), p[1]]);
        if matches!(
            pair,
            Some([b'2', b'e' | b'E' | b'f' | b'F' | b'5']) | Some([b'5', b'c' | b'C'])
        ) {
            return Err(PathError::Ambiguous(
                "percent-encoded dots, slashes, backslashes or percent signs are not allowed in the path",
            ));
        }
    }
    if path.bytes().any(|b| b == b'\\' || b.is_ascii_control()) {
        return Err(PathError::Ambiguous(
            "backslashes and control characters are not allowed in the path",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    mod prop {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]
            /// Whatever the input, an accepted path is under the API, has no
            /// dot segment and no encoded separator, once decoded.
            #[test]
            fn accepted_paths_stay_inside_the_api(tail in "([a-zA-Z0-9./\\\\()$'=_-]|%[0-9a-fA-FuU]{0,4}|%u002[eEfF]|%2[eEfF]|%5[cC]){0,40}") {
                let path = format!("/api/data/v9.2/{tail}");
                if check(&path).is_ok() {
                    prop_assert!(percent_encodings_are_valid(path.as_bytes()), "only RFC 3986 escapes: {path}");
                    prop_assert!(!path.to_ascii_lowercase().contains("%u"), "no IIS %u form: {path}");
                    let decoded = percent_encoding::percent_decode_str(&path).decode_utf8_lossy().to_string();
                    prop_assert!(decoded.starts_with("/api/data/v9.2/"));
                    prop_assert!(!decoded.split('/').any(|s| s == ".." || s == "."));
                    prop_assert!(!decoded.contains('\\'));
                    prop_assert!(decoded[1..].split('/').count() == path[1..].split('/').count(), "no encoded slash");
                }
            }
        }
    }

    #[test]
    fn only_web_api_methods_pass() {
        for m in ["GET", "HEAD", "POST", "PATCH", "PUT", "DELETE"] {
            assert!(
                is_web_api_method(&Method::from_bytes(m.as_bytes()).expect("m")),
                "{m}"
            );
        }
        for m in [
            "OPTIONS",
            "CONNECT",
            "TRACE",
            "PROPFIND",
            "PROPPATCH",
            "MKCOL",
            "MOVE",
            "COPY",
            "LOCK",
            "UNLOCK",
            "M-SEARCH",
            "SEARCH",
            "MERGE",
            "PURGE",
            "get",
            "Post",
            "BREW",
        ] {
            assert!(
                !is_web_api_method(&Method::from_bytes(m.as_bytes()).expect("m")),
                "{m}"
            );
        }
    }

    #[test]
    fn percent_rule() {
        for ok in ["", "a", "%20", "%2e%2E", "a%41b%7a"] {
            assert!(percent_encodings_are_valid(ok.as_bytes()), "{ok}");
        }
        for bad in ["%", "%2", "a%g1", "%u002e", "%%41", "x%2"] {
            assert!(!percent_encodings_are_valid(bad.as_bytes()), "{bad}");
        }
    }

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
            assert!(matches!(check(p), Err(PathError::OutsideApi)), "{p}");
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
            "/api/data/v9.2//accounts",
            "/api/data/v9.2/a%00b",
            "/api/data/v9.2/a%0d%0aX-Injected:%201",
            "/api/data/v9.2/%ff%fe",
            "/api/data/v9.2/%u002e%u002e/%u002e%u002e/XRMServices/2011/Organization.svc",
            "/api/data/v9.2/%U002E%U002E/x",
            "/api/data/v9.2/%u2216",
            "/api/data/v9.2/a%",
            "/api/data/v9.2/a%2",
            "/api/data/v9.2/a%2/b",
            "/api/data/v9.2/a%g0",
            "/api/data/v9.2/a%%41",
            "/api/data/v9.2/%%32%65",
            "/api/data/v9.2/a%20%u0041b",
            "/api/data/v9.2/accounts%",
        ] {
            assert!(matches!(check(p), Err(PathError::Ambiguous(_))), "{p}");
        }
    }
}
