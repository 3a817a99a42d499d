//! Configuration reload without a restart (SIGHUP, or `POST /reload` on
//! the admin listener with `admin_reload = true`).
//!
//! The configuration is read again from where it was read at start and
//! validated whole. An invalid one changes nothing: every problem is
//! logged with its key and shown on the status page. A valid one swaps in,
//! at once and for new requests only, what can change safely:
//!
//! - the callers (`[[callers]]`, `[access]`, not `[caller_tokens]`) and
//!   every org's `[org.policy]`;
//! - `limits.max_body`, `limits.max_path`, `limits.max_query`;
//! - the governor's limit bounds, queue and replays (not its Redis
//!   settings, `expected_replicas` or the retry budget).
//!
//! Refused although valid: a file that would open a closed proxy (no caller
//! rule left, or no credential required any more), a changed
//! `[caller_tokens]` (a removed tenant must not stay trusted), changed lanes
//! of an org or a caller pinned to lanes not running, and a start-up file
//! that is gone. `trusted_proxies` stays as started everywhere.
//!
//! A request keeps the rules it was admitted under to its end, and no
//! connection is touched. Settings that shape listeners, clients, pools or
//! per-org state need a restart; when the file changes them, the reload
//! names them in the log and in its answer, and they stay as started.

use std::sync::Arc;

use super::AppState;
use super::rules::Rules;
use crate::config::Config;
use crate::stats::activity::unix_ms;
use serde::Serialize;

/// What a successful reload did not apply.
#[derive(Debug, Default)]
pub struct Reloaded {
    /// Keys that differ from the running configuration but need a restart.
    pub restart_needed: Vec<&'static str>,
}

/// Reads the configuration again and applies what may change (see the
/// module's text); the problems, each naming its key, when it is invalid.
pub fn reload(state: &AppState) -> Result<Reloaded, Vec<String>> {
    let outcome = try_reload(state);
    let mut history = state
        .config_history
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match &outcome {
        Ok(done) => {
            history.loaded = unix_ms();
            history.reloads += 1;
            history.last_error = None;
            tracing::info!(
                restart_needed = %done.restart_needed.join(","),
                "configuration reloaded: callers, policies, limits and governor settings in force for new requests"
            );
            for key in &done.restart_needed {
                tracing::warn!(
                    key,
                    "changed in the configuration, but needs a restart to apply"
                );
            }
        }
        Err(problems) => {
            history.last_error = Some(ReloadError {
                at: unix_ms(),
                problems: problems.clone(),
            });
            for problem in problems {
                tracing::error!(problem = %problem, "reload refused: the running configuration stays");
            }
        }
    }
    outcome
}

fn try_reload(state: &AppState) -> Result<Reloaded, Vec<String>> {
    let (started, sources) = state
        .running
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let Some(sources) = sources else {
        return Err(vec![
            "this proxy was started without a configuration source to read again".to_owned(),
        ]);
    };
    if let Some(file) = sources.file.as_ref().filter(|f| !f.exists()) {
        return Err(vec![format!(
            "the configuration file {} the proxy started from is gone; restore it (a reload never falls back to defaults)",
            file.display()
        )]);
    }
    let mut new = Config::load(&sources).map_err(|e| e.problems)?;
    refuse_weaker_access(&started, &new)?;
    // Restart-only, and used in two places (admission and the public URL):
    // kept as started everywhere, never half applied.
    new.access.trusted_proxies = started.access.trusted_proxies.clone();
    let names = |c: &Config| c.orgs.iter().map(|o| o.name.clone()).collect::<Vec<_>>();
    if names(&new) != names(&started) {
        return Err(vec![
            "orgs: an org was added, removed, renamed or moved; that needs a restart".to_owned(),
        ]);
    }
    refuse_lane_changes(state, &new)?;
    state
        .rules
        .store(Arc::new(Rules::new(&new, &state.metrics)));
    let limits = crate::config::LimitsConfig {
        max_body: new.limits.max_body,
        max_path: new.limits.max_path,
        max_query: new.limits.max_query,
        ..started.limits.clone()
    };
    state.limits.store(Arc::new(limits));
    for org in state.orgs.iter() {
        for lane in org.lanes.iter() {
            lane.governor.reconfigure(new.governor.clone());
        }
        org.users.reconfigure(new.governor.clone());
    }
    Ok(Reloaded {
        restart_needed: restart_needed(&started, &new),
    })
}

/// A reload may not open what was closed, nor keep trusting what the file
/// no longer trusts: both are refused (the running configuration stays).
fn refuse_weaker_access(started: &Config, new: &Config) -> Result<(), Vec<String>> {
    let (a, b) = (&started.access, &new.access);
    let mut problems = Vec::new();
    if (!a.is_open() && b.is_open()) || (a.require_credential && !b.require_credential) {
        problems.push(
            "access: the new configuration lets callers in without a credential or address rule, and the running one does not; restart the proxy to open it on purpose".to_owned(),
        );
    }
    if format!("{:?}", a.caller_tokens) != format!("{:?}", b.caller_tokens) {
        problems.push(
            "caller_tokens: changed, and a reload cannot swap the token checks (a removed tenant or audience would stay trusted); restart the proxy to apply it".to_owned(),
        );
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// An org's lanes are built at start: a reload that changes them, or pins
/// a caller to a lane an org it may use does not run, is refused (a pin
/// that finds no lane would otherwise be a caller without a lane).
fn refuse_lane_changes(state: &AppState, new: &Config) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    for (org, running) in new.orgs.iter().zip(state.orgs.iter()) {
        let wanted: Vec<&str> = org.lanes.iter().map(|l| l.name.as_str()).collect();
        let has: Vec<&str> = running.lanes.iter().map(|l| &*l.name).collect();
        if wanted != has {
            problems.push(format!(
                "orgs[{:?}].lanes: {wanted:?} instead of the running {has:?}; changing an org's lanes needs a restart",
                org.name
            ));
        }
    }
    for (i, caller) in new.access.callers.iter().enumerate() {
        if caller.lanes.is_empty() {
            continue;
        }
        let usable = state
            .orgs
            .iter()
            .filter(|o| caller.orgs.is_empty() || caller.orgs.contains(&o.name));
        for org in usable {
            if org.lanes.allowed(&caller.lanes).is_none() {
                problems.push(format!(
                    "callers[{i}].lanes: {:?} names no lane org {:?} runs; pinning a caller to new lanes needs a restart",
                    caller.lanes, org.name
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// The keys whose values differ between `started` and `new` but apply only
/// at start. Compared by their `Debug` text, which redacts secrets: a
/// changed secret is not reported (credential files are re-read at every
/// token fetch anyway, and SIGHUP fetches new tokens).
pub fn restart_needed(started: &Config, new: &Config) -> Vec<&'static str> {
    fn differ<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
        format!("{a:?}") != format!("{b:?}")
    }
    let org_shape = |c: &Config| {
        c.orgs
            .iter()
            .map(|o| {
                (
                    o.url.clone(),
                    o.scope.clone(),
                    o.hosts.clone(),
                    o.default,
                    format!("{:?}", o.lanes),
                )
            })
            .collect::<Vec<_>>()
    };
    let (a, b) = (started, new);
    let (la, lb) = (&a.limits, &b.limits);
    let (ga, gb) = (&a.governor, &b.governor);
    let checks: [(&'static str, bool); 21] = [
        ("listen", a.listen != b.listen),
        ("admin_hosts", a.admin_hosts != b.admin_hosts),
        ("admin_listen", a.admin_listen != b.admin_listen),
        ("public_url", a.public_url != b.public_url),
        ("trusted_proxies", a.trusted_proxies != b.trusted_proxies),
        (
            "orgs (url, scope, hosts, default, credential, lanes)",
            org_shape(a) != org_shape(b),
        ),
        ("upstream", differ(&a.upstream, &b.upstream)),
        (
            "metadata_cache",
            differ(&a.metadata_cache, &b.metadata_cache),
        ),
        ("token", differ(&a.token, &b.token)),
        ("log", differ(&a.log, &b.log)),
        ("shutdown", differ(&a.shutdown, &b.shutdown)),
        ("tls", differ(&a.tls, &b.tls)),
        ("cors", differ(&a.cors, &b.cors)),
        (
            "caller_tokens",
            differ(&a.access.caller_tokens, &b.access.caller_tokens),
        ),
        (
            "limits.max_connections",
            la.max_connections != lb.max_connections,
        ),
        (
            "limits.max_header_bytes / max_headers",
            la.max_header_bytes != lb.max_header_bytes || la.max_headers != lb.max_headers,
        ),
        (
            "limits.header_read_timeout",
            la.header_read_timeout != lb.header_read_timeout,
        ),
        (
            "limits.body_idle_timeout",
            la.body_idle_timeout != lb.body_idle_timeout,
        ),
        (
            "limits.max_concurrent_streams",
            la.max_concurrent_streams != lb.max_concurrent_streams,
        ),
        (
            "governor.redis_url / expected_replicas",
            differ(&ga.redis, &gb.redis) || ga.expected_replicas != gb.expected_replicas,
        ),
        (
            "governor.retry_budget / min_retries",
            ga.retry_budget != gb.retry_budget || ga.min_retries != gb.min_retries,
        ),
    ];
    checks
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(key, _)| key)
        .collect()
}

/// The configuration's history since the start.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConfigStatus {
    /// When the rules in force were loaded (Unix milliseconds).
    pub loaded: u64,
    /// Successful reloads since the start.
    pub reloads: u64,
    /// The last reload that failed, if it was the last attempt: its
    /// problems, each naming its key.
    pub last_error: Option<ReloadError>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReloadError {
    pub at: u64,
    pub problems: Vec<String>,
}
