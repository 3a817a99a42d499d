//! `RawConfig` → `Config`: every section validated in turn, every problem
//! collected before failing.

use super::*;

impl RawConfig {
    /// Validates every field, collecting all problems.
    pub(super) fn validate(self, figment: &Figment) -> Result<Config, ConfigError> {
        let mut p = Problems {
            figment,
            list: Vec::new(),
        };
        let listen = p.addr("listen", self.listen.as_deref(), DEFAULT_LISTEN);
        let admin_listen = p.addr(
            "admin_listen",
            self.admin_listen.as_deref(),
            DEFAULT_ADMIN_LISTEN,
        );
        let public_url = public_url(&mut p, self.public_url.as_deref());
        let trusted_proxies = trusted_proxies(&mut p, self.trusted_proxies);
        let orgs = validate_orgs(
            &mut p,
            self.org,
            self.credential,
            self.orgs,
            self.credentials,
        );
        let upstream = upstream(&mut p, self.upstream);
        let metadata_cache = metadata_cache(&mut p, self.metadata_cache);
        let governor = governor(&mut p, self.governor);
        let token = token(&mut p, self.token, &upstream);
        let shutdown = shutdown(&mut p, self.shutdown);
        let usage = usage(&mut p, self.usage);
        let caller_tokens = caller_tokens(&mut p, self.caller_tokens);
        let tls = tls(&mut p, self.tls);
        let cors = cors(&mut p, self.cors);
        let client_ca = tls.as_ref().is_some_and(|t| t.client_ca_file.is_some());
        let access = validate_access(
            &mut p,
            AccessInputs {
                callers: self.callers,
                access: self.access,
                trusted_proxies: &trusted_proxies,
                caller_tokens,
                client_ca,
            },
        );
        pinned_lanes(&mut p, &access.callers, &orgs);
        delegating_orgs(&mut p, &access.callers, &orgs);
        let limits = limits(&mut p, self.limits);
        let log = LogConfig {
            format: log_format(&mut p, self.log.format.as_deref()),
            query: self.log.query.unwrap_or(false),
            trust_caller_trace_context: self.log.trust_caller_trace_context.unwrap_or(false),
        };
        match (listen, admin_listen) {
            (Some(listen), Some(admin_listen)) if p.list.is_empty() => Ok(Config {
                listen,
                admin_listen,
                admin_reload: self.admin_reload.unwrap_or(false),
                admin_hosts: self
                    .admin_hosts
                    .unwrap_or_default()
                    .into_iter()
                    .map(|h| h.to_ascii_lowercase())
                    .collect(),
                public_url,
                trusted_proxies,
                orgs,
                upstream,
                metadata_cache,
                token,
                governor,
                log,
                shutdown,
                usage,
                limits,
                access,
                tls,
                cors,
            }),
            _ => Err(ConfigError { problems: p.list }),
        }
    }
}

/// `public_url`: an http(s) URL without query (a path prefix is allowed).
fn public_url(p: &mut Problems<'_>, raw: Option<&str>) -> Option<Url> {
    raw.and_then(|v| match Url::parse(v) {
        Ok(u)
            if matches!(u.scheme(), "http" | "https")
                && u.host().is_some()
                && u.query().is_none()
                && u.fragment().is_none() =>
        {
            Some(u)
        }
        _ => {
            p.push(
                "public_url",
                &format!("{v:?} is not an http(s) URL without query"),
                "give the URL callers use, e.g. \"https://dataverse-proxy.example.com\" (a path prefix is allowed)",
            );
            None
        }
    })
}

/// `trusted_proxies`: addresses or CIDR blocks.
fn trusted_proxies(p: &mut Problems<'_>, raw: Option<Vec<String>>) -> Vec<ipnet::IpNet> {
    let mut trusted_proxies = Vec::new();
    for entry in raw.unwrap_or_default() {
        let parsed = entry
            .parse::<ipnet::IpNet>()
            .or_else(|_| entry.parse::<IpAddr>().map(ipnet::IpNet::from));
        match parsed {
            Ok(net) => trusted_proxies.push(net),
            Err(_) => p.push(
                "trusted_proxies",
                &format!("{entry:?} is not an IP address or CIDR block"),
                "list addresses or blocks such as \"10.0.0.0/8\" or \"192.0.2.7\"",
            ),
        }
    }
    trusted_proxies
}

/// `[upstream]`: egress proxy, CA file, timeouts, pool, replay buffer.
fn upstream(p: &mut Problems<'_>, u: RawUpstream) -> UpstreamConfig {
    let egress = u.proxy.as_deref().filter(|v| !v.trim().is_empty()).and_then(|v| {
        match Url::parse(v) {
            Ok(url) if url.scheme() == "http" && url.host().is_some() => Some(EgressProxy {
                url: v.trim().to_owned(),
                no_proxy: u.no_proxy.clone().unwrap_or_default(),
            }),
            _ => {
                p.push(
                    "upstream.proxy",
                    &format!("{:?} is not an http:// proxy URL", redact_userinfo(v)),
                    "use e.g. \"http://proxy.example.com:3128\" (HTTPS traffic is tunnelled with CONNECT)",
                );
                None
            }
        }
    });
    let ca_file = u.ca_file.map(PathBuf::from);
    if let Some(path) = &ca_file
        && let Err(e) = std::fs::read(path)
    {
        p.push(
            "upstream.ca_file",
            &format!("cannot read {} ({e})", path.display()),
            "point it at a PEM file of CA certificates",
        );
    }
    UpstreamConfig {
        egress,
        ca_file,
        connect_timeout: p.duration(
            "upstream.connect_timeout",
            u.connect_timeout.as_deref(),
            Duration::from_secs(10),
        ),
        response_timeout: p.duration(
            "upstream.response_timeout",
            u.response_timeout.as_deref(),
            Duration::from_secs(300),
        ),
        idle_timeout: p.duration(
            "upstream.idle_timeout",
            u.idle_timeout.as_deref(),
            Duration::from_secs(120),
        ),
        pool_idle_timeout: p.duration(
            "upstream.pool_idle_timeout",
            u.pool_idle_timeout.as_deref(),
            Duration::from_secs(90),
        ),
        pool_max_idle: u.pool_max_idle.unwrap_or(64),
        replay_buffer: p.size(
            "upstream.replay_buffer",
            u.replay_buffer.as_deref(),
            1 << 20,
        ),
        compression: u.compression.unwrap_or(true),
        recompression_level: recompression_level(p, u.recompression_level),
    }
}

fn recompression_level(p: &mut Problems<'_>, level: Option<u32>) -> u32 {
    match level.unwrap_or(4) {
        level @ 1..=9 => level,
        other => {
            p.push(
                "upstream.recompression_level",
                &format!("{other} is outside 1..=9"),
                "use 1 (fastest) to 9 (smallest); 4 is the default",
            );
            4
        }
    }
}

/// `[metadata_cache]`: on or off, its bounds and freshness.
fn metadata_cache(p: &mut Problems<'_>, m: RawMetadataCache) -> MetadataCacheConfig {
    let d = MetadataCacheConfig::default();
    let config = MetadataCacheConfig {
        enabled: m.enabled.unwrap_or(d.enabled),
        max_bytes: p.size(
            "metadata_cache.max_bytes",
            m.max_bytes.as_deref(),
            d.max_bytes,
        ),
        max_entry: p.size(
            "metadata_cache.max_entry",
            m.max_entry.as_deref(),
            d.max_entry,
        ),
        fresh_for: p.duration(
            "metadata_cache.fresh_for",
            m.fresh_for.as_deref(),
            d.fresh_for,
        ),
    };
    if config.enabled && config.max_entry > config.max_bytes.min(u32::MAX as usize) {
        p.push(
            "metadata_cache.max_entry",
            &format!(
                "{} bytes is more than max_bytes ({}) or 4 GiB",
                config.max_entry, config.max_bytes
            ),
            "keep max_entry at most max_bytes, e.g. max_entry = \"64MiB\" with max_bytes = \"256MiB\"",
        );
    }
    config
}

/// `[governor]`: the limit and its adaptation, queue, replays, shared state.
fn governor(p: &mut Problems<'_>, g: RawGovernor) -> GovernorConfig {
    let d = GovernorConfig::default();
    let max_concurrency = g.max_concurrency.unwrap_or(d.max_concurrency);
    let expected_replicas = g.expected_replicas.unwrap_or(1).max(1);
    let redis = redis_settings(p, &g);
    let governor = GovernorConfig {
        max_concurrency,
        min_concurrency: g
            .min_concurrency
            .unwrap_or(d.min_concurrency)
            .clamp(1, max_concurrency.max(1)),
        ceiling: g.ceiling.unwrap_or(d.ceiling).max(max_concurrency),
        max_queue: g.max_queue.unwrap_or(d.max_queue),
        queue_timeout: p.duration(
            "governor.queue_timeout",
            g.queue_timeout.as_deref(),
            d.queue_timeout,
        ),
        max_retries: g.max_retries.unwrap_or(d.max_retries),
        retry_deadline: p.duration(
            "governor.retry_deadline",
            g.retry_deadline.as_deref(),
            d.retry_deadline,
        ),
        max_retry_after: p.duration(
            "governor.max_retry_after",
            g.max_retry_after.as_deref(),
            d.max_retry_after,
        ),
        transient_retries: g.transient_retries.unwrap_or(d.transient_retries),
        retry_budget: g.retry_budget.unwrap_or(d.retry_budget),
        min_retries: g.min_retries.unwrap_or(d.min_retries),
        disconnect_grace: p.duration(
            "governor.disconnect_grace",
            g.disconnect_grace.as_deref(),
            d.disconnect_grace,
        ),
        max_hold: p.duration("governor.max_hold", g.max_hold.as_deref(), d.max_hold),
        redis,
        fallback_concurrency: g
            .fallback_concurrency
            .unwrap_or(max_concurrency.div_ceil(expected_replicas))
            .max(1),
        expected_replicas,
    };
    if governor.max_concurrency == 0 || governor.max_concurrency > 52 {
        p.push(
            "governor.max_concurrency",
            &format!("{} is outside 1..=52", governor.max_concurrency),
            "Dataverse allows 52 concurrent requests per user and web server; keep a margin, e.g. 50 (with governor.redis_url every replica shares it)",
        );
    }
    if governor.fallback_concurrency > 52 {
        p.push(
            "governor.fallback_concurrency",
            &format!("{} is above 52", governor.fallback_concurrency),
            "it is one replica's cap while Redis is away: at most Dataverse's 52, e.g. max_concurrency / expected_replicas",
        );
    }
    if governor.max_hold < Duration::from_secs(1) {
        p.push(
            "governor.max_hold",
            "is under a second, which would free slots of requests still running",
            "keep it above Dataverse's own limit of about 2 minutes, e.g. max_hold = \"2m10s\"",
        );
    }
    if !(0.0..=1.0).contains(&governor.retry_budget) {
        p.push(
            "governor.retry_budget",
            &format!("{} is not a share between 0 and 1", governor.retry_budget),
            "e.g. retry_budget = 0.2 (retries add at most 20 % to the requests)",
        );
    }
    governor
}

/// `governor.redis_url` (or `DATAVERSE_PROXY_REDIS_URL`) and its settings.
fn redis_settings(p: &mut Problems<'_>, g: &RawGovernor) -> Option<RedisSettings> {
    let url = g.redis_url.as_ref()?.0.clone();
    let text = secrecy::ExposeSecret::expose_secret(&url);
    if text.trim().is_empty() {
        return None;
    }
    if redis::Client::open(text).is_err() {
        // Never echo the URL: it may carry a password.
        p.push(
            "governor.redis_url",
            "is not a Redis URL",
            "use redis://[:password@]host:port[/db] or rediss:// (the password is never logged)",
        );
        return None;
    }
    let tls = text.starts_with("rediss://");
    Some(RedisSettings {
        url,
        prefix: g
            .redis_prefix
            .clone()
            .unwrap_or_else(|| "dataverse-proxy".to_owned()),
        timeout: p.nonzero_duration(
            "governor.redis_timeout",
            g.redis_timeout.as_deref(),
            Duration::from_millis(250),
        ),
        lease_time: p.nonzero_duration(
            "governor.lease_time",
            g.lease_time.as_deref(),
            Duration::from_secs(10),
        ),
        ca_file: g.redis_ca_file.as_deref().map(std::path::PathBuf::from),
        cluster: g.redis_cluster,
    })
    .inspect(|s| redis_checks(p, s, tls))
}

/// Durations that would break the shared state, and the CA file.
fn redis_checks(p: &mut Problems<'_>, s: &RedisSettings, tls: bool) {
    if s.lease_time < Duration::from_millis(300) {
        p.push(
            "governor.lease_time",
            "is under 300 ms: leases would expire before they are renewed",
            "e.g. lease_time = \"10s\"",
        );
    }
    if let Some(ca) = &s.ca_file {
        if !tls {
            p.push(
                "governor.redis_ca_file",
                "is set but governor.redis_url is not rediss://",
                "use rediss://host:port for TLS, or drop redis_ca_file",
            );
        } else if std::fs::read(ca)
            .map_or(true, |pem| !pem.windows(11).any(|w| w == b"-----BEGIN "))
        {
            p.push(
                "governor.redis_ca_file",
                &format!("{} is not a readable PEM file", ca.display()),
                "give the PEM bundle of the CA that signed the Redis server's certificate",
            );
        }
    }
}

/// `[token]`: fetch timeout and backoff; egress and CA as for Dataverse.
fn token(p: &mut Problems<'_>, t: RawToken, upstream: &UpstreamConfig) -> TokenConfig {
    let token = TokenConfig {
        egress: upstream.egress.clone(),
        fetch_timeout: p.duration(
            "token.fetch_timeout",
            t.fetch_timeout.as_deref(),
            Duration::from_secs(30),
        ),
        min_backoff: p.duration(
            "token.min_backoff",
            t.min_backoff.as_deref(),
            Duration::from_secs(1),
        ),
        max_backoff: p.duration(
            "token.max_backoff",
            t.max_backoff.as_deref(),
            Duration::from_secs(60),
        ),
    };
    if token.min_backoff.is_zero() || token.min_backoff > token.max_backoff {
        p.push(
            "token.min_backoff",
            "must be above zero and at most token.max_backoff",
            "e.g. min_backoff = \"1s\", max_backoff = \"60s\"",
        );
    }
    token
}

/// `[usage]`: how long daily counts are kept, when budgets warn.
fn usage(p: &mut Problems<'_>, raw: RawUsage) -> UsageConfig {
    let retention_days = raw.retention_days.unwrap_or(30);
    if !(1..=400).contains(&retention_days) {
        p.push(
            "usage.retention_days",
            &format!("{retention_days} is outside 1..=400"),
            "e.g. retention_days = 30",
        );
    }
    let warn_at = raw.warn_at.unwrap_or(0.8);
    if !(warn_at > 0.0 && warn_at <= 1.0) {
        p.push(
            "usage.warn_at",
            "must be a share above 0 and at most 1",
            "e.g. warn_at = 0.8 (a warning at 80 % of a daily budget)",
        );
    }
    UsageConfig {
        retention_days,
        warn_at,
    }
}

/// `[shutdown]`: readiness delay and drain grace.
fn shutdown(p: &mut Problems<'_>, raw: RawShutdown) -> ShutdownConfig {
    ShutdownConfig {
        // Long enough for an ingress's health checks or Kubernetes'
        // endpoints to see readiness fail before the listener closes.
        delay: p.duration(
            "shutdown.delay",
            raw.delay.as_deref(),
            Duration::from_secs(5),
        ),
        grace: p.duration(
            "shutdown.grace",
            raw.grace.as_deref(),
            Duration::from_secs(30),
        ),
    }
}

/// `[limits]`: connections, headers, body, path and query.
fn limits(p: &mut Problems<'_>, l: RawLimits) -> LimitsConfig {
    let max_connections = l.max_connections.unwrap_or(4096);
    let limits = LimitsConfig {
        max_connections,
        max_header_bytes: p.size(
            "limits.max_header_bytes",
            l.max_header_bytes.as_deref(),
            64 << 10,
        ),
        max_headers: l.max_headers.unwrap_or(100),
        header_read_timeout: p.nonzero_duration(
            "limits.header_read_timeout",
            l.header_read_timeout.as_deref(),
            Duration::from_secs(10),
        ),
        max_body: p.size("limits.max_body", l.max_body.as_deref(), 128 << 20),
        body_idle_timeout: p.nonzero_duration(
            "limits.body_idle_timeout",
            l.body_idle_timeout.as_deref(),
            Duration::from_secs(60),
        ),
        max_path: p.size("limits.max_path", l.max_path.as_deref(), 4 << 10),
        max_query: p.size("limits.max_query", l.max_query.as_deref(), 64 << 10),
        max_concurrent_streams: l.max_concurrent_streams.unwrap_or(100),
        // nginx's keepalive_timeout.
        idle_timeout: p.nonzero_duration(
            "limits.idle_timeout",
            l.idle_timeout.as_deref(),
            Duration::from_secs(75),
        ),
        // One source (a client, or the only ingress) never takes every place.
        max_connections_per_ip: l
            .max_connections_per_ip
            .unwrap_or((max_connections / 4).max(1)),
    };
    if limits.max_connections == 0 || limits.max_connections_per_ip == 0 {
        p.push(
            "limits.max_connections",
            "limits.max_connections and limits.max_connections_per_ip must be at least 1",
            "e.g. max_connections = 4096, max_connections_per_ip = 256 (or leave it out)",
        );
    }
    limits
}

/// `log.format`: `text` or `json`.
fn log_format(p: &mut Problems<'_>, raw: Option<&str>) -> LogFormat {
    match raw {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            p.push(
                "log.format",
                &format!("{other:?} is not a log format"),
                "use \"text\" or \"json\"",
            );
            LogFormat::Text
        }
    }
}

/// A caller pinned to lanes (`[[callers]] lanes`) must find one of them in
/// every org it may use, and each name must be some org's lane.
fn pinned_lanes(p: &mut Problems<'_>, callers: &[Caller], orgs: &[OrgConfig]) {
    for (i, c) in callers.iter().enumerate() {
        if c.lanes.is_empty() {
            continue;
        }
        let key = format!("callers[{i}].lanes");
        let usable = orgs
            .iter()
            .filter(|o| c.orgs.is_empty() || c.orgs.contains(&o.name));
        for o in usable {
            if !o.lanes.iter().any(|l| c.lanes.contains(&l.name)) {
                p.push(
                    &key,
                    &format!("names no lane of org {:?}", o.name),
                    "name one of that org's lanes, or limit the caller with orgs = [...]",
                );
            }
        }
        for name in &c.lanes {
            if !orgs.iter().any(|o| o.lanes.iter().any(|l| &l.name == name)) {
                p.push(
                    &key,
                    &format!("{name:?} is no org's lane"),
                    "name credentials listed in an org's lanes = [...]",
                );
            }
        }
    }
}

/// `impersonate = "delegated"` exchanges the user's token with the org's
/// own credential: one that can authenticate at the token endpoint.
fn delegating_orgs(p: &mut Problems<'_>, callers: &[Caller], orgs: &[OrgConfig]) {
    for (i, c) in callers.iter().enumerate().filter(|(_, c)| c.delegated) {
        let usable = orgs
            .iter()
            .filter(|o| c.orgs.is_empty() || c.orgs.contains(&o.name));
        for o in usable {
            if matches!(o.credential.kind, CredentialKind::ManagedIdentity(_)) {
                p.push(
                    &format!("callers[{i}].impersonate"),
                    &format!(
                        "\"delegated\" needs org {:?}'s credential to be an app registration's (a secret, certificate or federated credential), not a managed identity",
                        o.name
                    ),
                    "give the org an app registration's credential, or use impersonate = \"caller\"",
                );
            }
        }
    }
}
