//! Step 1: which org, the path guard, who is calling, and the policy.

use std::net::IpAddr;
use std::sync::Arc;

use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, Method, header};

use super::call::Call;
use crate::app::rules::Rules;
use crate::app::{AppState, Links, OrgState};
use crate::callers::{CallerRequest, Delegated, PeerCertificate};
use crate::error::ProxyError;
use crate::governor::Flow;
use crate::http::access_log::RequestInfo;
use crate::lanes::LaneSet;

/// A request the proxy will forward, and what the next steps need of it.
pub struct Admitted {
    /// The org it goes to.
    pub org: Arc<OrgState>,
    /// The rules it was admitted under (kept to its end, whatever a reload
    /// does meanwhile).
    pub rules: Arc<Rules>,
    /// Bytes of the path taken by the `/{org}` prefix (0 without one).
    pub prefix_len: usize,
    /// The method (kept for the answer: HEAD has no body).
    pub method: Method,
    /// The caller may only read.
    pub caller_read_only: bool,
    /// The caller's own privileged-header grants; `None` when no callers
    /// are configured (the org policy alone decides).
    pub caller_privileged: Option<Vec<String>>,
    /// Impersonation and privileged headers the policy lets through.
    pub restored: Vec<(HeaderName, HeaderValue)>,
    /// The link rewriters for the caller's view of the proxy.
    pub links: Arc<Links>,
    /// The links' base came from the caller's own `Host` (no `public_url`,
    /// no trusted proxy): forms made with them are never kept for others.
    pub links_from_caller: bool,
    /// For a `$batch`: the bases its absolute operation URLs may start with.
    pub batch_origins: Option<Vec<String>>,
    /// The proxy acts as the calling user (`CallerObjectId` set by the
    /// proxy; the caller's own impersonation headers dropped everywhere).
    pub acts_as_caller: bool,
    /// Who the request counts against in the governor's fair share.
    pub flow: Flow,
    /// The org's lanes the caller may take.
    pub lanes: LaneSet,
    /// The user whose own token goes to Dataverse (`impersonate =
    /// "delegated"`): exchanged on-behalf-of, governed per user.
    pub delegated: Option<Arc<Delegated>>,
}

impl Admitted {
    /// The org's policy as it applies to this request.
    pub fn policy(&self) -> &crate::config::Policy {
        let rules = &self.rules.orgs[self.org.index];
        if self.acts_as_caller {
            &rules.policy_acting_as_caller
        } else {
            &rules.policy
        }
    }
}

/// Dataverse's impersonation header (an Entra object id).
const CALLER_OBJECT_ID: HeaderName = HeaderName::from_static("callerobjectid");

/// Routes the request to an org and decides whether it may go there.
pub async fn admit(
    call: &mut Call<'_>,
    peer: IpAddr,
    parts: &Parts,
) -> Result<Admitted, ProxyError> {
    let (state, info) = (call.state, &mut *call.info);
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok());
    let routed = state.route(parts.uri.path(), host)?;
    let org = routed.org.clone();
    info.org = Some(org.clone());
    let prefix_len = routed.prefix_len;
    let api_path = &parts.uri.path()[prefix_len..];
    crate::guard::check(api_path)?;

    let rules = state.rules.load_full();
    info.rules = Some(rules.clone());
    let caller = identify(state, &rules, (peer, parts), &org, info).await?;
    let org_rules = &rules.orgs[org.index];
    let acting = caller.act_as.is_some() || caller.delegated.is_some();
    let policy = if acting {
        &org_rules.policy_acting_as_caller
    } else {
        &org_rules.policy
    };
    let resource = crate::policy::resource(api_path).unwrap_or_default();
    policy.check(&parts.method, &resource, caller.read_only)?;
    if policy.lists_tables() {
        let map = super::tables::of(&org, state.upstream.response_timeout).await?;
        let rest = api_path[super::plan::service_root(api_path).len()..].trim_start_matches('/');
        let rest = percent_encoding::percent_decode_str(rest).decode_utf8_lossy();
        let query = parts.uri.query().unwrap_or("");
        policy.check_reached(crate::policy::reach::of_target(&map, &rest, query))?;
    }
    let mut restored = policy.restored_headers(&parts.headers, caller.privileged.as_deref());
    if let Some(oid) = caller.act_as.as_deref() {
        // An id that cannot be sent must never turn into a request as the
        // application user: the request fails instead.
        let oid = HeaderValue::from_str(oid).map_err(|_| ProxyError::Internal)?;
        restored.push((CALLER_OBJECT_ID, oid));
    }

    let mut public = state.public.derive(&parts.headers, peer);
    if prefix_len > 0 {
        // Links keep the form the caller used: /{org}/api/data/…
        public = public.with_segment(&org.name);
    }
    let links = org.links(public);
    let links_from_caller = public.from_caller;
    let batch_origins = (resource == "$batch" && parts.method == Method::POST).then(|| {
        let mut origins: Vec<String> = org.aliases.iter().map(|a| a.to_ascii_lowercase()).collect();
        origins.push(public.to_string().to_ascii_lowercase());
        origins
    });
    Ok(Admitted {
        org,
        rules,
        prefix_len,
        method: parts.method.clone(),
        caller_read_only: caller.read_only,
        caller_privileged: caller.privileged,
        restored,
        links,
        links_from_caller,
        batch_origins,
        acts_as_caller: acting,
        flow: caller.flow,
        lanes: caller.lanes,
        delegated: caller.delegated.map(Arc::new),
    })
}

/// What the caller rules decided about a request.
struct Identified {
    read_only: bool,
    privileged: Option<Vec<String>>,
    act_as: Option<String>,
    delegated: Option<Delegated>,
    flow: Flow,
    lanes: LaneSet,
}

/// Who is calling (token, key, certificate or address), recorded for the
/// access log and the caller's metrics.
async fn identify(
    state: &AppState,
    rules: &Rules,
    (peer, parts): (IpAddr, &Parts),
    org: &OrgState,
    info: &mut RequestInfo,
) -> Result<Identified, ProxyError> {
    let request = CallerRequest {
        peer,
        headers: &parts.headers,
        certificate: parts.extensions.get::<PeerCertificate>(),
    };
    let admission = rules
        .access
        .admit(
            &request,
            state.verifier.as_deref(),
            &org.name,
            &state.quotas,
        )
        .await?;
    let caller = admission.caller;
    if let Some(c) = caller {
        within_daily_budget(state, c)?;
    }
    info.caller = caller.map(|c| c.name.clone());
    info.principal = admission.principal.as_ref().map(|p| Arc::from(p.flow_id()));
    info.caller_slot = caller
        .and_then(|c| rules.access.callers.iter().position(|k| std::ptr::eq(k, c)))
        .map_or(0, |i| i + 1);
    Ok(Identified {
        read_only: caller.is_some_and(|c| c.read_only),
        // Where callers are configured, privileged headers need the caller's grant too.
        privileged: (!rules.access.callers.is_empty())
            .then(|| caller.map(|c| c.privileged.clone()).unwrap_or_default()),
        act_as: admission.act_as,
        lanes: lanes_of(caller, org, admission.delegated.is_some())?,
        delegated: admission.delegated,
        flow: flow_of(caller, info.principal.as_deref(), &rules.access, request),
    })
}

/// Refuses a caller that spent its `daily_requests` today (as every replica
/// counted them, a second behind at most), before Dataverse sees the
/// request.
fn within_daily_budget(state: &AppState, caller: &crate::config::Caller) -> Result<(), ProxyError> {
    let Some(budget) = caller.daily_requests else {
        return Ok(());
    };
    if state.usage.caller_today(&caller.name) < budget {
        return Ok(());
    }
    Err(ProxyError::CallerDailyBudget {
        caller: caller.name.clone(),
        budget,
        retry_after: std::time::Duration::from_secs(crate::usage::until_renewal(
            crate::usage::now_unix(),
        )),
    })
}

/// The lanes the caller may take on `org`: all without a pin; a pin that
/// names no running lane of the org is refused, never lane 0 (a user's own
/// token takes no lane, so the pin does not matter there).
fn lanes_of(
    caller: Option<&crate::config::Caller>,
    org: &OrgState,
    delegated: bool,
) -> Result<LaneSet, ProxyError> {
    let pinned = caller.map_or(&[][..], |c| c.lanes.as_slice());
    match org.lanes.allowed(pinned) {
        Some(set) => Ok(set),
        None if delegated => Ok(LaneSet::ALL),
        None => Err(ProxyError::CallerLaneUnavailable),
    }
}

/// `ip/ADDRESS`, remembered per thread for the last few hundred addresses:
/// formatting it cost ~1,400 instructions a request (callgrind), a lookup
/// a tenth of that.
fn address_flow(ip: std::net::IpAddr) -> Arc<str> {
    thread_local! {
        static KEYS: std::cell::RefCell<std::collections::HashMap<std::net::IpAddr, Arc<str>>> =
            std::cell::RefCell::default();
    }
    KEYS.with_borrow_mut(|keys| {
        if let Some(key) = keys.get(&ip) {
            return key.clone();
        }
        if keys.len() >= 512 {
            keys.clear();
        }
        let key: Arc<str> = Arc::from(format!("ip/{ip}"));
        keys.insert(ip, key.clone());
        key
    })
}

/// The caller's flow: its rule (per principal for token callers), or its
/// address where no rule names it.
fn flow_of(
    caller: Option<&crate::config::Caller>,
    principal: Option<&str>,
    access: &crate::config::Access,
    request: CallerRequest<'_>,
) -> Flow {
    let Some(caller) = caller else {
        let ip = access.client_ip(request.peer, request.headers);
        return Flow {
            key: address_flow(ip),
            ..Flow::default()
        };
    };
    let key = match principal {
        Some(p) => Arc::from(format!("{}/{p}", caller.name)),
        None => caller.name.clone(),
    };
    Flow {
        key,
        weight: caller.weight,
        max_concurrency: caller.max_concurrency,
    }
}
