//! Collecting configuration problems, each with its key, where the value
//! came from and the fix; and the small parsers the validators share.

use super::*;

/// Every problem found while loading the configuration.
#[derive(Debug)]
pub struct ConfigError {
    /// One line per problem, each naming the key, its source and the fix.
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        writeln!(
            f,
            "invalid configuration ({n} problem{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Turns a figment error into one line that says what to do.
///
/// Nothing from the file's content is repeated: a TOML syntax error quotes
/// the offending line (which may hold a secret) and a type error quotes the
/// string it found; both are cut to where and what (found by fuzzing).
pub(super) fn explain_figment(e: &figment::Error) -> String {
    use figment::error::{Actual, Kind};
    let mut e = e.clone();
    e.kind = match e.kind {
        Kind::Message(m) => Kind::Message(without_source_lines(&m)),
        Kind::InvalidType(Actual::Str(_), exp) => {
            Kind::InvalidType(Actual::Other("a string".into()), exp)
        }
        Kind::InvalidValue(Actual::Str(_), exp) => {
            Kind::InvalidValue(Actual::Other("a string".into()), exp)
        }
        other => other,
    };
    let mut line = e.to_string();
    if let figment::error::Kind::UnknownField(field, expected) = &e.kind {
        line = format!(
            "unknown key `{field}`{}; remove it or fix its spelling (known keys here: {})",
            e.metadata
                .as_ref()
                .map(|m| format!(" in {}", describe_metadata(m)))
                .unwrap_or_default(),
            expected.join(", ")
        );
    }
    line
}

/// A TOML parser message without its quoted source lines (`3 | …`, `  |  ^`).
pub(super) fn without_source_lines(message: &str) -> String {
    message
        .lines()
        .filter(|l| {
            let t = l
                .trim_start()
                .trim_start_matches(|c: char| c.is_ascii_digit());
            !t.trim_start().starts_with('|')
        })
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(": ")
}

pub(super) fn describe_metadata(md: &Metadata) -> String {
    match &md.source {
        Some(Source::File(p)) => format!("config file {}", p.display()),
        Some(other) => format!("{} {}", md.name, other),
        None => md.name.to_string(),
    }
}

/// Collects validation problems with the origin of each key.
pub(super) struct Problems<'a> {
    pub(super) figment: &'a Figment,
    pub(super) list: Vec<String>,
}

/// `value` with the user information of a URL (`user:password@`) masked.
pub fn redacted(value: &str) -> String {
    let Some((scheme, rest)) = value.split_once("://") else {
        return value.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => value.to_owned(),
    }
}

impl Problems<'_> {
    /// Where `key`'s value came from, for error messages.
    pub(super) fn origin(&self, key: &str) -> String {
        match self.figment.find_metadata(key) {
            None => "(not set)".to_owned(),
            Some(md) => {
                let keys: Vec<&str> = key.split('.').collect();
                match &md.source {
                    Some(Source::File(p)) => format!("(in config file {})", p.display()),
                    _ => format!("(from {})", md.interpolate(&Profile::Default, &keys)),
                }
            }
        }
    }

    pub(super) fn push(&mut self, key: &str, what: &str, fix: &str) {
        let origin = self.origin(key);
        self.list.push(format!("`{key}` {origin}: {what}; {fix}"));
    }

    pub(super) fn addr(
        &mut self,
        key: &str,
        value: Option<&str>,
        default: &str,
    ) -> Option<SocketAddr> {
        let v = value.unwrap_or(default);
        match v.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.push(
                    key,
                    &format!("{v:?} is not a socket address"),
                    "use IP:PORT, e.g. \"127.0.0.1:8080\" or \"0.0.0.0:8080\"",
                );
                None
            }
        }
    }

    pub(super) fn duration(
        &mut self,
        key: &str,
        value: Option<&str>,
        default: Duration,
    ) -> Duration {
        match value {
            None => default,
            Some(v) => match parse_duration(v) {
                Some(d) => d,
                None => {
                    self.push(
                        key,
                        &format!("{v:?} is not a duration"),
                        "use a number with a unit: \"500ms\", \"30s\", \"5m\" or \"1h\"",
                    );
                    default
                }
            },
        }
    }

    /// A duration that must be above zero (a zero would spin a timer or
    /// close everything at once).
    pub(super) fn nonzero_duration(
        &mut self,
        key: &str,
        value: Option<&str>,
        default: Duration,
    ) -> Duration {
        let d = self.duration(key, value, default);
        if d.is_zero() {
            self.push(
                key,
                "is zero, which the proxy cannot run with",
                &format!("give a duration above zero, e.g. {default:?}"),
            );
            return default;
        }
        d
    }

    pub(super) fn size(&mut self, key: &str, value: Option<&str>, default: usize) -> usize {
        match value {
            None => default,
            Some(v) => parse_size(v).unwrap_or_else(|| {
                self.push(
                    key,
                    &format!("{v:?} is not a size"),
                    "use bytes or a unit: \"64KiB\", \"1MiB\", \"128MiB\"",
                );
                default
            }),
        }
    }

    /// Parses an http(s) URL; `http` only for loopback hosts.
    pub(super) fn url(&mut self, key: &str, raw: &str) -> Option<Url> {
        // A URL's user information may be a password: never echoed.
        let value = &redacted(raw);
        let url = match Url::parse(raw) {
            Ok(u) => u,
            Err(e) => {
                self.push(
                    key,
                    &format!("{value:?} is not a URL ({e})"),
                    "give an absolute URL such as \"https://contoso.crm.dynamics.com\"",
                );
                return None;
            }
        };
        if !url.username().is_empty() || url.password().is_some() {
            self.push(
                key,
                &format!("{value:?} carries a user name or password"),
                "give the URL without credentials (the proxy authenticates with its Entra ID credential)",
            );
            return None;
        }
        match url.scheme() {
            "https" => {}
            "http" if is_loopback(&url) => {}
            "http" => {
                self.push(
                    key,
                    &format!("{value:?} uses http:// for a host that is not loopback"),
                    "use https:// (plain http is accepted only for 127.0.0.1, ::1 and localhost)",
                );
                return None;
            }
            other => {
                self.push(
                    key,
                    &format!("scheme {other:?} is not supported"),
                    "use https://",
                );
                return None;
            }
        }
        if !url.username().is_empty() || url.password().is_some() {
            self.push(
                key,
                "the URL contains user information",
                "remove the user:password@ part; credentials belong in the credential section",
            );
            return None;
        }
        Some(url)
    }
}

impl Problems<'_> {
    /// A managed-identity endpoint: http is fine for loopback and link-local
    /// (IMDS is http://169.254.169.254) hosts, https anywhere.
    pub(super) fn local_url(&mut self, key: &str, value: &str) -> Option<Url> {
        let url = Url::parse(value)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"));
        let Some(url) = url else {
            self.push(
                key,
                &format!("{value:?} is not an http(s) URL"),
                "give the endpoint URL, e.g. http://169.254.169.254/metadata/identity/oauth2/token",
            );
            return None;
        };
        let link_local = matches!(url.host(), Some(url::Host::Ipv4(ip)) if ip.is_link_local());
        if url.scheme() == "http" && !is_loopback(&url) && !link_local {
            self.push(
                key,
                &format!(
                    "{value:?} uses http:// for a host that is neither loopback nor link-local"
                ),
                "use https://",
            );
            return None;
        }
        Some(url)
    }
}

/// A URL with any `user:password@` replaced, for error messages.
pub(super) fn redact_userinfo(v: &str) -> String {
    match (v.find("://"), v.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://[REDACTED]@{}", &v[..s], &v[at + 1..]),
        _ => v.to_owned(),
    }
}

pub(super) fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

/// Parses `"512"`, `"64KiB"`, `"1MiB"`, `"2GiB"` (also `KB`/`MB`/`GB` as binary units).
pub fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: usize = num.parse().ok()?;
    let mult: usize = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "KB" | "k" | "K" => 1 << 10,
        "MiB" | "MB" | "M" => 1 << 20,
        "GiB" | "GB" | "G" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Parses `"500ms"`, `"30s"`, `"5m"`, `"1h"` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        _ => return None,
    };
    Some(d)
}
