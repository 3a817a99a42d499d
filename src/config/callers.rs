//! `[[callers]]` and `[access]`.

use super::*;

/// What [`validate_access`] needs from other sections.
pub(super) struct AccessInputs<'a> {
    pub(super) callers: Option<Vec<RawCaller>>,
    pub(super) access: RawAccess,
    pub(super) trusted_proxies: &'a [ipnet::IpNet],
    pub(super) caller_tokens: Option<CallerTokens>,
    /// `[tls] client_ca_file` is set (client certificates can be verified).
    pub(super) client_ca: bool,
}

/// Validates callers and the global source list.
pub(super) fn validate_access(p: &mut Problems<'_>, input: AccessInputs<'_>) -> Access {
    let AccessInputs {
        callers,
        access,
        trusted_proxies,
        caller_tokens,
        client_ca,
    } = input;
    let allow_cidrs = cidr_list(p, "access.allow_cidrs", access.allow_cidrs);
    let mut out = Vec::new();
    let mut names = std::collections::HashSet::new();
    for (i, c) in callers.unwrap_or_default().into_iter().enumerate() {
        let key = format!("callers[{i}]");
        if !names.insert(c.name.clone()) || c.name.trim().is_empty() {
            p.push(
                &format!("{key}.name"),
                &format!("caller name {:?} is empty or used twice", c.name),
                "give every caller its own name",
            );
        }
        let caller = validate_caller(p, &key, c);
        if caller.token.is_some() && caller_tokens.is_none() {
            p.push(
                &format!("{key}.token"),
                "needs [caller_tokens] (which tenants and audience to accept)",
                "add a [caller_tokens] section with audiences and tenants",
            );
        }
        if caller.certificate.is_some() && !client_ca {
            p.push(
                &format!("{key}.client_certificate"),
                "needs [tls] client_ca_file to verify client certificates against",
                "set [tls] cert_file, key_file and client_ca_file",
            );
        }
        out.push(caller);
    }
    let any_credential = out
        .iter()
        .any(|c| c.key_sha256.is_some() || c.token.is_some() || c.certificate.is_some());
    Access {
        require_credential: access
            .require_credential
            .or(access.require_api_key)
            .unwrap_or(any_credential),
        callers: out,
        allow_cidrs,
        trusted_proxies: trusted_proxies.to_vec(),
        caller_tokens,
    }
}

/// One `[[callers]]` entry: recognised by key hash, Entra ID token, client
/// certificate or source addresses.
fn validate_caller(p: &mut Problems<'_>, key: &str, c: RawCaller) -> Caller {
    let key_sha256 = c
        .api_key_sha256
        .as_deref()
        .and_then(|h| key_hash(p, &format!("{key}.api_key_sha256"), h));
    let cidrs = cidr_list(p, &format!("{key}.cidrs"), c.cidrs);
    let token = c
        .token
        .map(|t| token_requirement(p, &format!("{key}.token"), t));
    let certificate = c
        .client_certificate
        .map(|t| certificate_requirement(p, &format!("{key}.client_certificate"), t));
    let recognisers = [key_sha256.is_some(), token.is_some(), certificate.is_some()];
    if recognisers.iter().filter(|r| **r).count() > 1 {
        p.push(
            key,
            "names more than one of api_key_sha256, token and client_certificate",
            "give each way of calling its own caller entry",
        );
    }
    if !recognisers.contains(&true) && cidrs.is_empty() {
        p.push(
            key,
            "a caller needs an api_key_sha256, a token, a client_certificate or cidrs to be recognised",
            "set one of them",
        );
    }
    if let Some(r) = c.requests_per_second
        && !(r > 0.0 && r.is_finite())
    {
        p.push(
            &format!("{key}.requests_per_second"),
            "must be above zero",
            "e.g. requests_per_second = 20",
        );
    }
    if c.daily_requests == Some(0) {
        p.push(
            &format!("{key}.daily_requests"),
            "must be above zero",
            "e.g. daily_requests = 50000 (Power Platform requests per UTC day), or leave it out",
        );
    }
    let weight = c.weight.unwrap_or(1);
    if !(1..=100).contains(&weight) {
        p.push(
            &format!("{key}.weight"),
            &format!("{weight} is outside 1..=100"),
            "e.g. weight = 2 (twice the share of a caller of weight 1, the default)",
        );
    }
    if c.max_concurrency.is_some_and(|m| m == 0 || m > 52) {
        p.push(
            &format!("{key}.max_concurrency"),
            "is outside 1..=52",
            "Dataverse allows 52 concurrent requests per user; e.g. max_concurrency = 10",
        );
    }
    let (act_as_caller, delegated) = act_as_caller(
        p,
        key,
        c.impersonate.as_deref(),
        c.impersonate_apps,
        token.is_some(),
    );
    Caller {
        name: c.name.into(),
        key_sha256,
        cidrs,
        orgs: c.orgs.unwrap_or_default(),
        read_only: c.read_only.unwrap_or(false),
        requests_per_second: c.requests_per_second,
        daily_requests: c.daily_requests,
        weight: weight.clamp(1, 100),
        max_concurrency: c.max_concurrency,
        lanes: c.lanes.unwrap_or_default(),
        privileged: privileged_headers(
            p,
            &format!("{key}.privileged_headers"),
            c.privileged_headers,
        ),
        token,
        certificate,
        act_as_caller,
        delegated,
    }
}

/// A SHA-256 as 64 hex digits.
fn key_hash(p: &mut Problems<'_>, key: &str, hex: &str) -> Option<[u8; 32]> {
    let bytes: Option<Vec<u8>> = (hex.len() == 64)
        .then(|| {
            (0..32)
                .map(|j| u8::from_str_radix(hex.get(2 * j..2 * j + 2)?, 16).ok())
                .collect()
        })
        .flatten();
    let hash = bytes.and_then(|b| <[u8; 32]>::try_from(b).ok());
    if hash.is_none() {
        p.push(
            key,
            "is not 64 hex digits",
            "store the SHA-256 of the key, e.g. `printf %s \"$KEY\" | sha256sum`",
        );
    }
    hash
}

/// IP addresses or CIDR blocks.
fn cidr_list(p: &mut Problems<'_>, key: &str, list: Option<Vec<String>>) -> Vec<ipnet::IpNet> {
    let mut out = Vec::new();
    for entry in list.unwrap_or_default() {
        match entry
            .parse::<ipnet::IpNet>()
            .or_else(|_| entry.parse::<IpAddr>().map(ipnet::IpNet::from))
        {
            Ok(n) => out.push(n),
            Err(_) => p.push(
                key,
                &format!("{entry:?} is not an IP address or CIDR block"),
                "use e.g. \"10.0.0.0/8\"",
            ),
        }
    }
    out
}
