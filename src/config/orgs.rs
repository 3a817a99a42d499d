//! The org list: `[org]` and `[[orgs]]`, each with its credential.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::*;

/// One org entry as written, `[org]` or `[[orgs]]`, before validation.
struct Wanted {
    key: String,
    name: String,
    url: Option<String>,
    credential: String,
    /// `lanes = [...]`, if given (then `credential` is its first).
    lanes: Option<Vec<String>>,
    default: Option<bool>,
    hosts: Vec<String>,
    scope: Option<String>,
    policy: Option<RawPolicy>,
    daily_entitlement: Option<u64>,
}

/// Credentials by name, each validated once however many orgs use it.
struct Credentials {
    raw: BTreeMap<String, RawCredential>,
    validated: HashMap<String, Option<Arc<CredentialConfig>>>,
}

impl Credentials {
    fn get(&mut self, p: &mut Problems<'_>, at: &str, name: &str) -> Option<Arc<CredentialConfig>> {
        if let Some(c) = self.validated.get(name) {
            return c.clone();
        }
        let c = match self.raw.remove(name) {
            Some(raw) => validate_credential(p, name, raw).map(Arc::new),
            None => {
                p.push(
                    at,
                    &format!("no credential named {name:?}"),
                    "define it as [credentials.NAME], or use \"default\" for [credential]",
                );
                None
            }
        };
        self.validated.insert(name.to_owned(), c.clone());
        c
    }
}

/// Builds the org list: the `[org]` shorthand (named `default`) and every
/// `[[orgs]]` entry, each with its credential validated once.
pub(super) fn validate_orgs(
    p: &mut Problems<'_>,
    org: RawOrg,
    credential: RawCredential,
    named: Option<Vec<RawNamedOrg>>,
    credentials: Option<BTreeMap<String, RawCredential>>,
) -> Vec<OrgConfig> {
    let wanted = wanted_orgs(org, named.unwrap_or_default());
    let mut raw = credentials.unwrap_or_default();
    if raw.contains_key("default") {
        p.push(
            "credentials.default",
            "the name `default` is taken by the [credential] section",
            "rename this credential, or move its keys to [credential]",
        );
    }
    raw.insert("default".to_owned(), credential);
    let mut credentials = Credentials {
        raw,
        validated: HashMap::new(),
    };
    let explicit_defaults = wanted.iter().filter(|w| w.default == Some(true)).count();
    if explicit_defaults > 1 {
        p.push(
            "orgs",
            "more than one org is marked default = true",
            "mark at most one",
        );
    }
    let single = wanted.len() == 1;
    let mut names = HashSet::new();
    let mut out = Vec::new();
    for w in wanted {
        check_name(p, &w, &mut names);
        let url = org_url(p, &w);
        let lanes = lanes(p, &w, &mut credentials);
        let policy = validate_policy(
            p,
            &format!("{}.policy", w.key),
            w.policy.unwrap_or_default(),
        );
        let (Some(url), Some(credential)) = (url, lanes.first().cloned()) else {
            continue;
        };
        let origin = url.as_str().trim_end_matches('/').to_owned();
        out.push(OrgConfig {
            scope: w.scope.unwrap_or_else(|| format!("{origin}/.default")),
            url,
            credential,
            lanes,
            hosts: w
                .hosts
                .iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .collect(),
            default: w
                .default
                .unwrap_or(single || (explicit_defaults == 0 && w.key == "org")),
            policy,
            daily_entitlement: w.daily_entitlement,
            name: w.name,
        });
    }
    out
}

/// Most lanes per org.
const MAX_LANES: usize = 16;

/// The org's lanes: `lanes = [...]` (each a credential, an application user
/// of its own), else its one credential. Empty when one does not validate.
fn lanes(
    p: &mut Problems<'_>,
    w: &Wanted,
    credentials: &mut Credentials,
) -> Vec<Arc<CredentialConfig>> {
    let key = format!("{}.lanes", w.key);
    let Some(names) = &w.lanes else {
        let at = format!("{}.credential", w.key);
        return credentials.get(p, &at, &w.credential).into_iter().collect();
    };
    if w.key != "org" && w.credential != "default" {
        p.push(
            &format!("{}.credential", w.key),
            "is set beside lanes",
            "name every credential in lanes (the first is the org's own) and remove credential",
        );
    }
    if names.is_empty() || names.len() > MAX_LANES {
        p.push(
            &key,
            &format!("names {} lanes", names.len()),
            "name 1 to 16 credentials, e.g. lanes = [\"default\", \"bulk-2\"]",
        );
    }
    let mut out: Vec<Arc<CredentialConfig>> = Vec::new();
    for name in names {
        if out.iter().any(|c| &c.name == name) {
            p.push(
                &key,
                &format!("names {name:?} twice"),
                "name each credential once",
            );
            continue;
        }
        let Some(c) = credentials.get(p, &key, name) else {
            continue;
        };
        // Client ids are GUIDs: one app whatever the letter case.
        let same_app = |o: &Arc<CredentialConfig>| match (&o.client_id, &c.client_id) {
            (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
            _ => false,
        };
        if let Some(twin) = out.iter().find(|o| same_app(o)) {
            p.push(
                &key,
                &format!("lanes {:?} and {name:?} are the same application user (one client id)", twin.name),
                "give each lane its own app registration: Dataverse counts its limits per application user",
            );
        }
        out.push(c);
    }
    if out.len() != names.len() {
        return Vec::new();
    }
    out
}

/// `[org]` (when it has a URL, or when there is nothing else) and `[[orgs]]`.
fn wanted_orgs(org: RawOrg, named: Vec<RawNamedOrg>) -> Vec<Wanted> {
    let mut wanted = Vec::new();
    if org.url.is_some() || named.is_empty() {
        wanted.push(Wanted {
            key: "org".to_owned(),
            name: "default".to_owned(),
            url: org.url,
            credential: "default".to_owned(),
            lanes: org.lanes,
            default: None,
            hosts: org.hosts.unwrap_or_default(),
            scope: org.scope,
            policy: org.policy,
            daily_entitlement: org.daily_entitlement,
        });
    }
    for (i, o) in named.into_iter().enumerate() {
        wanted.push(Wanted {
            key: format!("orgs[{i}]"),
            name: o.name,
            url: o.url,
            credential: o.credential.unwrap_or_else(|| "default".to_owned()),
            lanes: o.lanes,
            default: o.default,
            hosts: o.hosts.unwrap_or_default(),
            scope: o.scope,
            policy: o.policy,
            daily_entitlement: o.daily_entitlement,
        });
    }
    wanted
}

/// An org name is the path prefix `/NAME/api/data/…`: lower-case letters,
/// digits, `-` and `_`, not `api`, and not used twice.
fn check_name(p: &mut Problems<'_>, w: &Wanted, names: &mut HashSet<String>) {
    let name_ok = !w.name.is_empty()
        && w.name.len() <= 64
        && w.name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && w.name != "api";
    if !name_ok {
        p.push(
            &format!("{}.name", w.key),
            &format!(
                "{:?} cannot be an org name (it is the path prefix /NAME/api/data/…)",
                w.name
            ),
            "use lower-case letters, digits, - and _ (and not \"api\")",
        );
    }
    if !names.insert(w.name.clone()) {
        p.push(
            &format!("{}.name", w.key),
            &format!("the org name {:?} is used twice", w.name),
            "give every org its own name",
        );
    }
}

/// The org's URL: required, an origin only (the proxy adds `/api/data/v9.x/`).
fn org_url(p: &mut Problems<'_>, w: &Wanted) -> Option<Url> {
    let key = format!("{}.url", w.key);
    let Some(v) = w.url.as_deref() else {
        p.push(
            &key,
            "the Dataverse org URL is required",
            "set DATAVERSE_URL, --org-url or [org] url, e.g. \"https://contoso.crm.dynamics.com\"",
        );
        return None;
    };
    let u = p.url(&key, v)?;
    if !u.path().trim_end_matches('/').is_empty() || u.query().is_some() {
        p.push(
            &key,
            &format!("{v:?} has a path or query"),
            "give only the origin, e.g. \"https://contoso.crm.dynamics.com\" (the proxy adds /api/data/v9.x/)",
        );
        return None;
    }
    Some(u)
}
