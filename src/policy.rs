//! What reaches Dataverse for a caller: the per-org access policy.
//!
//! Everyone who reaches the proxy acts with the application user's rights,
//! so the policy of each org ([`crate::config::Policy`]) decides: allowed
//! methods, a read-only switch, allowed and denied entity sets / functions /
//! actions, `$metadata` on or off, impersonation headers dropped, allowed, or
//! allowed for listed ids; privileged headers (`MSCRM.Bypass*`,
//! `MSCRM.SuppressCallback*`) dropped unless listed (and, where callers are
//! configured, listed for the caller too). `$batch` bodies are buffered
//! (under a cap) and read strictly ([`crate::batch`]): every operation is
//! checked against the same policy and loses the headers the top level would
//! lose, so a batch is no bypass.

use http::{HeaderMap, HeaderName, HeaderValue, Method};

use crate::batch::{self, BatchError, Operation, Target};
use crate::config::{Impersonation, PRIVILEGED_HEADERS, Policy};
use crate::guard;

/// Why the policy refuses a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The method or resource is not allowed (403).
    #[error("{0}")]
    Denied(String),
    /// A `$batch` body that cannot be read exactly (400).
    #[error("{0}")]
    BadBatch(String),
}

/// Caller headers that carry a credential, a session, an identity or a
/// privilege, lower-case: never forwarded as sent, at the top level or in
/// a `$batch` part; the policy may put the identity and privilege ones back.
pub fn is_guarded(name: &str) -> bool {
    GUARDED.contains(&name) || PRIVILEGED_HEADERS.contains(&name)
}

/// The guarded headers but the privileged ones ([`PRIVILEGED_HEADERS`]).
const GUARDED: [&str; 6] = [
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "cookie",
    "callerobjectid",
    "mscrmcallerid",
];

/// What the `$batch` check needs to know besides the body.
#[derive(Debug, Clone, Copy)]
pub struct BatchContext<'a> {
    /// The service root the batch was sent to, e.g. `/api/data/v9.2`.
    pub service_root: &'a str,
    /// Bases an absolute operation URL may start with (the org's origins
    /// and the proxy's public base), lower-case, no trailing slash.
    pub origins: &'a [String],
    /// The caller is read-only.
    pub caller_read_only: bool,
    /// The caller's own privileged-header grants; `None` when no callers
    /// are configured (the org policy alone decides).
    pub caller_privileged: Option<&'a [String]>,
    /// The org's tables, when the policy lists tables: every table each
    /// operation reaches is checked.
    pub tables: Option<&'a tables::TableMap>,
}

/// The resource a Web API path addresses: the first segment after
/// `/api/data/vX.Y/`, decoded, without its key or parentheses, lower-case.
pub fn resource(api_path: &str) -> Option<std::borrow::Cow<'_, str>> {
    let rest = api_path.strip_prefix("/api/data/")?;
    let (_, rest) = rest.split_once('/').unwrap_or((rest, ""));
    let first = rest.split(['/', '?']).next().unwrap_or("");
    let plain = first.split('(').next().unwrap_or("");
    if !plain.bytes().any(|b| b == b'%' || b.is_ascii_uppercase()) {
        // The usual case: nothing to decode or fold, no allocation.
        return Some(plain.into());
    }
    let decoded = percent_encoding::percent_decode_str(first).decode_utf8_lossy();
    let name = decoded.split('(').next().unwrap_or("");
    Some(name.to_ascii_lowercase().into())
}

impl Policy {
    /// True when the policy restricts anything a `$batch` could bypass.
    pub fn restricts(&self, caller_read_only: bool) -> bool {
        caller_read_only
            || self.read_only
            || !self.methods.is_empty()
            || !self.allow.is_empty()
            || !self.deny.is_empty()
            || !self.metadata
    }

    /// Whether the policy names tables (`allow` or `deny`): then every
    /// table a request reaches is checked, not only its first segment.
    pub fn lists_tables(&self) -> bool {
        !self.allow.is_empty() || !self.deny.is_empty()
    }

    /// Checks every table `reached` names (entity sets, lower-case), and
    /// refuses what could not be read with certainty.
    pub fn check_reached(
        &self,
        reached: Result<reach::Reached, reach::Unreadable>,
    ) -> Result<(), PolicyError> {
        let reached = reached.map_err(|e| {
            PolicyError::Denied(format!(
                "the request cannot be checked against the policy's table list: {e}"
            ))
        })?;
        for table in &reached.0 {
            self.check_table(table)
                .map_err(|why| PolicyError::Denied(format!("the request reaches {why}")))?;
        }
        Ok(())
    }

    /// Whether the lists let `table` (an entity set, function or action,
    /// lower-case) be reached; the refusal's words when not.
    fn check_table(&self, table: &str) -> Result<(), String> {
        if self.deny.iter().any(|d| d == table) {
            return Err(format!("'{table}', which is denied by the policy"));
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|a| a == table) {
            return Err(format!(
                "'{table}', which is not in the policy's allow list"
            ));
        }
        Ok(())
    }

    /// Checks one operation (the request itself, or one `$batch` part).
    pub fn check(
        &self,
        method: &Method,
        resource: &str,
        caller_read_only: bool,
    ) -> Result<(), PolicyError> {
        if resource == "$batch" && *method == Method::POST {
            // Judged by its operations (check_batch), not by its own POST.
            return Ok(());
        }
        self.check_method_only(method, caller_read_only)?;
        if resource == "$metadata" && !self.metadata {
            return Err(PolicyError::Denied(
                "$metadata is switched off by the policy".to_owned(),
            ));
        }
        if resource == "$batch" || resource == "$metadata" {
            return Ok(());
        }
        self.check_table(resource)
            .map_err(|why| PolicyError::Denied(format!("the request is for {why}")))
    }

    /// Checks every operation of a buffered `$batch` body and drops the
    /// guarded headers of its parts; the body to send when lines were cut.
    ///
    /// A body the strict reader refuses is a 400 when the policy restricts
    /// anything. Otherwise it is forwarded untouched, unless it names a
    /// guarded header anywhere: that header could not be cut exactly.
    pub fn check_batch(
        &self,
        content_type: Option<&str>,
        body: &[u8],
        ctx: &BatchContext<'_>,
    ) -> Result<Option<Vec<u8>>, PolicyError> {
        let operations = match batch::parse(content_type.unwrap_or(""), body) {
            Ok(ops) => ops,
            Err(e) if self.restricts(ctx.caller_read_only) || names_guarded_header(body) => {
                return Err(PolicyError::BadBatch(e.to_string()));
            }
            Err(_) => return Ok(None),
        };
        let mut cut = Vec::new();
        for op in &operations {
            self.check_operation(op, ctx).map_err(|e| match e {
                PolicyError::Denied(why) => PolicyError::Denied(format!("in $batch: {why}")),
                other @ PolicyError::BadBatch(_) => other,
            })?;
            cut.extend(self.lines_to_cut(op, ctx.caller_privileged));
        }
        cut.sort_by_key(|r| r.start);
        Ok((!cut.is_empty()).then(|| batch::without_lines(body, &cut)))
    }

    /// The path guard and the policy, for one `$batch` operation.
    fn check_operation(
        &self,
        op: &Operation<'_>,
        ctx: &BatchContext<'_>,
    ) -> Result<(), PolicyError> {
        let bad = |e: BatchError| PolicyError::BadBatch(e.to_string());
        let method = Method::from_bytes(op.method.as_bytes())
            .map_err(|_| bad(BatchError("an operation's method cannot be read")))?;
        let path = match op.resolve(ctx.service_root, ctx.origins).map_err(bad)? {
            // `$1`-style references name an entity created earlier in the
            // same change set (already checked): only method rules apply,
            // and the tables its body or further path reach.
            Target::Reference => {
                self.check_method_only(&method, ctx.caller_read_only)?;
                return self.check_reference_tables(op, ctx);
            }
            Target::Path(p) => p,
        };
        let (path, query) = path.split_once('?').unwrap_or((&path, ""));
        if !guard::percent_encodings_are_valid(query.as_bytes()) {
            return Err(bad(BatchError(
                "an operation's query has a % without two hex digits",
            )));
        }
        guard::check(path).map_err(|_| {
            bad(BatchError(
                "an operation addresses a path outside /api/data/v9.0|1|2, or an ambiguous one",
            ))
        })?;
        let resource = resource(path).unwrap_or_default();
        if resource == "$batch" {
            return Err(bad(BatchError("a batch may not contain another batch")));
        }
        self.check(&method, &resource, ctx.caller_read_only)?;
        let Some(map) = ctx.tables else {
            return Ok(());
        };
        let rest = path[ctx.service_root.len().min(path.len())..].trim_start_matches('/');
        let rest = percent_encoding::percent_decode_str(rest).decode_utf8_lossy();
        self.check_reached(reach::of_target(map, &rest, query))?;
        self.check_body_tables(map, reach::table_written(map, &rest).as_deref(), op.body)
    }

    /// A `$n` reference operation while tables are listed: nothing after
    /// the reference but its key, and the tables its body reaches.
    fn check_reference_tables(
        &self,
        op: &Operation<'_>,
        ctx: &BatchContext<'_>,
    ) -> Result<(), PolicyError> {
        let Some(map) = ctx.tables else {
            return Ok(());
        };
        if op.target.contains(['/', '?']) {
            return self.check_reached(Err(reach::Unreadable(format!(
                "the reference '{}' goes on past the row it names",
                op.target
            ))));
        }
        self.check_body_tables(map, None, op.body)
    }

    /// The tables an operation's JSON body reaches.
    fn check_body_tables(
        &self,
        map: &tables::TableMap,
        table: Option<&str>,
        body: &[u8],
    ) -> Result<(), PolicyError> {
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let reached = match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(json) => reach::of_body(map, table, &json),
            Err(_) => Err(reach::Unreadable("a part's body is not JSON".to_owned())),
        };
        self.check_reached(reached)
    }

    /// The header lines of `op` that may not reach Dataverse; when any of
    /// the embedded request's lines go, the part's `Content-Length` goes too.
    fn lines_to_cut(
        &self,
        op: &Operation<'_>,
        caller_privileged: Option<&[String]>,
    ) -> Vec<std::ops::Range<usize>> {
        let refused = |h: &&batch::HeaderLine<'_>| {
            let name = h.name.to_ascii_lowercase();
            is_guarded(&name) && !self.lets_through(&name, h.value, caller_privileged)
        };
        let mut cut: Vec<_> = op
            .part_headers
            .iter()
            .chain(&op.headers)
            .filter(refused)
            .map(|h| h.line.clone())
            .collect();
        if op.headers.iter().any(|h| refused(&h)) {
            cut.extend(
                op.part_headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .map(|h| h.line.clone()),
            );
        }
        cut
    }

    fn check_method_only(
        &self,
        method: &Method,
        caller_read_only: bool,
    ) -> Result<(), PolicyError> {
        let read = matches!(*method, Method::GET | Method::HEAD);
        if (self.read_only || caller_read_only) && !read {
            return Err(PolicyError::Denied(format!(
                "{method} is not allowed: the policy is read-only"
            )));
        }
        if !self.methods.is_empty() && !self.methods.contains(method) {
            return Err(PolicyError::Denied(format!(
                "{method} is not among the allowed methods"
            )));
        }
        Ok(())
    }

    /// Whether a guarded header (lower-case `name`) may reach Dataverse:
    /// impersonation by the impersonation rule; privileged headers when the
    /// policy lists them and, where callers are configured, the caller too;
    /// credentials and cookies never.
    pub fn lets_through(
        &self,
        name: &str,
        value: &[u8],
        caller_privileged: Option<&[String]>,
    ) -> bool {
        match name {
            "callerobjectid" | "mscrmcallerid" => match &self.impersonation {
                Impersonation::Drop => false,
                Impersonation::Allow => true,
                Impersonation::Only(ids) => std::str::from_utf8(value)
                    .is_ok_and(|v| ids.iter().any(|id| id.eq_ignore_ascii_case(v.trim()))),
            },
            _ if PRIVILEGED_HEADERS.contains(&name) => {
                let granted = |list: &[String]| list.iter().any(|p| p == name);
                granted(&self.privileged) && caller_privileged.is_none_or(granted)
            }
            _ => false,
        }
    }

    /// Whether any impersonation or privileged header can pass at all (the
    /// default policy lets none through).
    fn lets_any_through(&self) -> bool {
        self.impersonation != Impersonation::Drop || !self.privileged.is_empty()
    }

    /// The impersonation and privileged headers of the caller's request
    /// that the policy lets through, to put back after the header policy
    /// dropped them.
    pub fn restored_headers(
        &self,
        headers: &HeaderMap,
        caller_privileged: Option<&[String]>,
    ) -> Vec<(HeaderName, HeaderValue)> {
        if !self.lets_any_through() {
            // The default: no header lookups at all.
            return Vec::new();
        }
        let candidates = ["callerobjectid", "mscrmcallerid"]
            .into_iter()
            .chain(PRIVILEGED_HEADERS)
            .map(HeaderName::from_static);
        candidates
            .filter_map(|name| {
                let value = headers.get(&name)?;
                self.lets_through(name.as_str(), value.as_bytes(), caller_privileged)
                    .then(|| (name, value.clone()))
            })
            .collect()
    }
}

/// True when a body names a guarded header anywhere, in any letter case.
fn names_guarded_header(body: &[u8]) -> bool {
    static NAMES: std::sync::OnceLock<aho_corasick::AhoCorasick> = std::sync::OnceLock::new();
    let finder = NAMES.get_or_init(|| {
        aho_corasick::AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .build(GUARDED.iter().chain(&PRIVILEGED_HEADERS))
            .expect("fixed patterns build")
    });
    finder.is_match(body)
}

pub mod reach;
pub mod tables;

#[cfg(test)]
mod batch_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_are_the_first_segment() {
        assert_eq!(
            resource("/api/data/v9.2/accounts(1)/name").as_deref(),
            Some("accounts")
        );
        assert_eq!(
            resource("/api/data/v9.2/WhoAmI()").as_deref(),
            Some("whoami")
        );
        assert_eq!(resource("/api/data/v9.2/$batch").as_deref(), Some("$batch"));
        assert_eq!(resource("/api/data/v9.2").as_deref(), Some(""));
        // Encoded or upper-case names are decoded and folded (the slow path).
        assert_eq!(
            resource("/api/data/v9.2/ac%63ounts%28x)").as_deref(),
            Some("accounts")
        );
        assert_eq!(
            resource("/api/data/v9.2/Contacts?$top=1").as_deref(),
            Some("contacts")
        );
    }

    #[test]
    fn read_only_allows_reads_only() {
        let p = Policy {
            read_only: true,
            ..Policy::default()
        };
        assert!(p.check(&Method::GET, "accounts", false).is_ok());
        assert!(p.check(&Method::POST, "accounts", false).is_err());
        assert!(
            Policy::default()
                .check(&Method::DELETE, "accounts", true)
                .is_err(),
            "caller read-only"
        );
    }
}
