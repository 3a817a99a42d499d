//! `[[callers]]` and `[access]`.

use super::*;

/// Validates callers and the global source list.
pub(super) fn validate_access(
    p: &mut Problems<'_>,
    callers: Option<Vec<RawCaller>>,
    access: RawAccess,
    trusted_proxies: &[ipnet::IpNet],
) -> Access {
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
        out.push(validate_caller(p, &key, c));
    }
    let any_key = out.iter().any(|c| c.key_sha256.is_some());
    Access {
        require_key: access.require_api_key.unwrap_or(any_key),
        callers: out,
        allow_cidrs,
        trusted_proxies: trusted_proxies.to_vec(),
    }
}

/// One `[[callers]]` entry: recognised by key hash or source addresses.
fn validate_caller(p: &mut Problems<'_>, key: &str, c: RawCaller) -> Caller {
    let key_sha256 = c
        .api_key_sha256
        .as_deref()
        .and_then(|h| key_hash(p, &format!("{key}.api_key_sha256"), h));
    let cidrs = cidr_list(p, &format!("{key}.cidrs"), c.cidrs);
    if key_sha256.is_none() && cidrs.is_empty() {
        p.push(
            key,
            "a caller needs an api_key_sha256 or cidrs to be recognised",
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
    Caller {
        name: c.name.into(),
        key_sha256,
        cidrs,
        orgs: c.orgs.unwrap_or_default(),
        read_only: c.read_only.unwrap_or(false),
        requests_per_second: c.requests_per_second,
        privileged: privileged_headers(
            p,
            &format!("{key}.privileged_headers"),
            c.privileged_headers,
        ),
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
