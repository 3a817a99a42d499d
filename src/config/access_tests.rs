//! Loading callers, identities and lanes: token rules, client certificates,
//! acting as the user (both modes), lanes and pinned callers.

use super::tests::{env, load_toml, minimal_env};
use super::*;

const TENANT: &str = "7f3c8a2e-1b4d-4c6a-9e21-5d8f0a3b6c11";
const APP: &str = "3d9e5f1a-6b2c-4a8d-b7e4-0c1f2a3b4d5e";

#[test]
fn caller_tokens_and_acting_as_the_caller_load() {
    let text = format!(
        "[caller_tokens]\naudiences = [\"api://dataverse-proxy\"]\ntenants = [\"{TENANT}\"]\nclock_skew = \"2m\"\n\n\
         [[callers]]\nname = \"portal\"\ntoken = {{ scopes = [\"user_impersonation\"] }}\nimpersonate = \"caller\"\n\
         impersonate_apps = {{ \"{APP}\" = \"{TENANT}\" }}\n\n\
         [[callers]]\nname = \"jobs\"\ntoken = {{ app_ids = [\"{}\"], roles = [\"Dataverse.Read\"] }}\n",
        APP.to_ascii_uppercase()
    );
    let cfg = load_toml(&text, minimal_env()).1.expect("valid");
    let tokens = cfg.access.caller_tokens.as_ref().expect("caller tokens");
    assert_eq!(tokens.clock_skew, Duration::from_secs(120));
    assert_eq!(tokens.key_refetch_interval, Duration::from_secs(300));
    assert!(
        cfg.access.require_credential,
        "token rules require a credential"
    );
    let portal = &cfg.access.callers[0];
    assert_eq!(portal.act_as_caller.as_ref().map(|a| a.apps.len()), Some(1));
    let jobs = cfg.access.callers[1].token.as_ref().expect("token rule");
    assert_eq!(jobs.app_ids, [APP], "GUIDs are lower-cased");
}

#[test]
fn broad_token_rules_and_untyped_sans_are_refused() {
    let head = format!(
        "[caller_tokens]\naudiences = [\"api://dataverse-proxy\"]\ntenants = [\"{TENANT}\"]\n\n"
    );
    for (rule, key) in [
        ("token = {}".to_owned(), "admits a token of any app"),
        (
            format!("token = {{ tenants = [\"{TENANT}\"] }}"),
            "admits a token of any app",
        ),
        (
            "token = { app_only = true }".to_owned(),
            "admits a token of any app",
        ),
        (
            "client_certificate = { sans = [\"orders.internal\"] }".to_owned(),
            "\"orders.internal\" is not a typed",
        ),
        (
            "client_certificate = { sans = [\"ip:10.0.0.1\"] }".to_owned(),
            "`callers[0].client_certificate.sans`",
        ),
    ] {
        let text = format!("{head}[[callers]]\nname = \"a\"\n{rule}\n");
        let err = load_toml(&text, minimal_env()).1.expect_err(&rule);
        let err = err.to_string();
        assert!(err.contains(key), "{rule}: {err}");
        let named = if rule.contains("sans") {
            "`callers[0].client_certificate.sans`"
        } else {
            "`callers[0].token`"
        };
        assert!(err.contains(named), "{rule}: {err}");
    }
    let text =
        format!("{head}[[callers]]\nname = \"a\"\ntoken = {{ any_app = true, app_only = true }}\n");
    let cfg = load_toml(&text, minimal_env()).1.expect("valid");
    assert!(
        cfg.access.callers[0]
            .token
            .as_ref()
            .expect("token")
            .app_only
    );
    // Typed SANs are accepted (the one problem left is the missing client CA).
    let text = "[[callers]]\nname = \"b\"\nclient_certificate = { sans = [\"DNS:a.internal\", \"uri:spiffe://c/ns/x/sa/y\", \"email:ops@example.com\"] }\n";
    let err = load_toml(text, minimal_env()).1.expect_err("no client CA");
    assert!(err.to_string().contains("(1 problem)"), "{err}");
    assert!(err.to_string().contains("client_ca_file"), "{err}");
}

#[test]
fn subject_names_are_typed() {
    let dns = SubjectName::parse("DNS:a.internal").expect("dns");
    assert_eq!(dns, SubjectName::Dns("a.internal".into()));
    assert!(dns.names(&SubjectName::Dns("A.Internal".into())));
    assert!(!dns.names(&SubjectName::Uri("a.internal".into())));
    assert!(!dns.names(&SubjectName::Email("a.internal".into())));
    let uri = SubjectName::parse("uri:spiffe://c/ns/x/sa/y").expect("uri");
    assert!(uri.names(&SubjectName::Uri("spiffe://c/ns/x/sa/y".into())));
    assert!(!uri.names(&SubjectName::Uri("spiffe://c/ns/x/sa/Y".into())));
    for bad in ["orders.internal", "ip:10.0.0.1", "dns:", "email: "] {
        assert_eq!(SubjectName::parse(bad), None, "{bad}");
    }
}

#[test]
fn identity_mistakes_name_their_keys() {
    let text = format!(
        "[[callers]]\nname = \"a\"\ntoken = {{ app_ids = [\"not-a-guid\"] }}\n\n\
         [[callers]]\nname = \"b\"\ncidrs = [\"10.0.0.0/8\"]\nimpersonate = \"caller\"\n\n\
         [[callers]]\nname = \"c\"\napi_key_sha256 = \"{}\"\ntoken = {{}}\nimpersonate = \"someone\"\n\n\
         [[callers]]\nname = \"d\"\nclient_certificate = {{ common_names = [\"svc\"] }}\n\n\
         [cors]\nallowed_origins = [\"*\", \"https://app.example.com/path\"]\nallowed_methods = [\"TRACE\"]\n",
        "0".repeat(64)
    );
    let err = load_toml(&text, minimal_env()).1.expect_err("invalid");
    let text = err.to_string();
    for key in [
        "`callers[0].token.app_ids`",
        "`callers[0].token` (",
        "`callers[1].impersonate`",
        "`callers[2]`",
        "`callers[2].impersonate`",
        "`callers[3].client_certificate`",
        "`cors.allowed_origins`",
        "`cors.allowed_methods`",
    ] {
        assert!(text.contains(key), "{key} in {text}");
    }
}

const LANES: &str = "[org]\nlanes = [\"default\", \"bulk-2\", \"bulk-3\"]\n\n\
    [credentials.bulk-2]\ntenant_id = \"tenant-1\"\nclient_id = \"client-2\"\nclient_secret = \"s2\"\n\n\
    [credentials.bulk-3]\ntenant_id = \"tenant-1\"\nclient_id = \"client-3\"\nclient_secret = \"s3\"\n\n";

#[test]
fn lanes_load_in_order_and_callers_may_be_pinned() {
    let text = format!(
        "{LANES}[[callers]]\nname = \"bulk\"\ncidrs = [\"10.0.0.0/8\"]\nlanes = [\"bulk-3\"]\n"
    );
    let cfg = load_toml(&text, minimal_env()).1.expect("valid");
    let names: Vec<_> = cfg.orgs[0].lanes.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["default", "bulk-2", "bulk-3"]);
    assert_eq!(cfg.orgs[0].credential.name, "default", "the first lane");
    assert_eq!(cfg.access.callers[0].lanes, ["bulk-3"]);
    // Without lanes: one lane, the org's credential.
    let cfg = load_toml("", minimal_env()).1.expect("valid");
    assert_eq!(cfg.orgs[0].lanes.len(), 1);
}

#[test]
fn lane_mistakes_name_their_keys() {
    for (text, wanted) in [
        (
            "[org]\nlanes = [\"default\", \"nope\"]\n".to_owned(),
            "`org.lanes` (in config file",
        ),
        (
            "[org]\nlanes = [\"default\", \"default\"]\n".to_owned(),
            "names \"default\" twice",
        ),
        (
            "[org]\nlanes = [\"default\", \"same\"]\n\n[credentials.same]\ntenant_id = \"t\"\nclient_id = \"client-1\"\nclient_secret = \"x\"\n".to_owned(),
            "are the same application user",
        ),
        (
            "[org]\nlanes = [\"default\", \"same\"]\n\n[credentials.same]\ntenant_id = \"t\"\nclient_id = \"CLIENT-1\"\nclient_secret = \"x\"\n".to_owned(),
            "are the same application user",
        ),
        (
            format!("{LANES}[[callers]]\nname = \"bulk\"\ncidrs = [\"10.0.0.0/8\"]\nlanes = [\"bulk-9\"]\n"),
            "\"bulk-9\" is no org's lane",
        ),
        (
            "[org]\nlanes = []\n".to_owned(),
            "names 0 lanes",
        ),
    ] {
        let err = load_toml(&text, minimal_env()).1.expect_err(wanted);
        assert!(err.to_string().contains(wanted), "{wanted}: {err}");
        assert!(!err.to_string().contains("s3cr3t"), "{err}");
    }
}

#[test]
fn delegated_rules_load_and_their_mistakes_are_named() {
    let head = format!(
        "[caller_tokens]\naudiences = [\"api://dataverse-proxy\"]\ntenants = [\"{TENANT}\"]\n\n"
    );
    let rule = "[[callers]]\nname = \"portal\"\ntoken = { scopes = [\"user_impersonation\"] }\nimpersonate = \"delegated\"\n";
    let cfg = load_toml(&format!("{head}{rule}"), minimal_env())
        .1
        .expect("valid");
    assert!(cfg.access.callers[0].delegated);
    assert!(cfg.access.callers[0].act_as_caller.is_none());
    let err = load_toml(
        "[[callers]]\nname = \"p\"\ncidrs = [\"10.0.0.0/8\"]\nimpersonate = \"delegated\"\n",
        minimal_env(),
    )
    .1
    .expect_err("no token");
    assert!(
        err.to_string().contains("`callers[0].impersonate`"),
        "{err}"
    );
    // A managed identity cannot run the exchange.
    let env = env(&[
        ("DATAVERSE_URL", "https://contoso.crm.dynamics.com"),
        ("DATAVERSE_PROXY_MANAGED_IDENTITY", "imds"),
    ]);
    let err = load_toml(&format!("{head}{rule}"), env)
        .1
        .expect_err("managed identity");
    assert!(err.to_string().contains("not a managed identity"), "{err}");
}
