//! Caller identity end to end: Entra ID caller tokens (v1 and v2, app and
//! user), every refusal, key rotation and outages, and acting as the
//! calling user against the simulator's impersonation rules.

use base64::Engine;
use dataverse_sim::entra::{CallerApp, CallerKey, TokenSubject};
use dataverse_sim::{Sim, SimConfig, SimHandle};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::harness::Harness;

/// A second tenant, registered in the simulator but not necessarily allowed.
const OTHER_TENANT: &str = "2b4c6d8e-0f1a-4b3c-8d5e-6f7a8b9c0d1e";

/// The `[caller_tokens]` section for `sim`, plus `callers`.
fn caller_config(sim: &SimHandle, callers: &str) -> String {
    let cfg = sim.config();
    format!(
        "\n[caller_tokens]\naudiences = [\"{}\", \"{}\"]\ntenants = [\"{}\"]\nauthority_host = \"{}\"\n\n{callers}",
        cfg.api_app_id_uri,
        cfg.api_client_id,
        cfg.tenant_id,
        sim.entra_url(),
    )
}

/// A proxy whose callers are `callers` (TOML), in front of `sim`.
async fn proxy(sim: Sim, callers: &str) -> Harness {
    let extra = caller_config(&sim.handle, callers);
    let h = Harness::with_file(sim, "", &extra, &[]).await;
    h.wait_ready().await;
    h
}

async fn sim() -> Sim {
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    sim.handle.add_tenant(OTHER_TENANT);
    sim
}

/// A token from the simulator's token endpoint by client credentials.
async fn client_credentials(h: &Harness, app: &CallerApp, v1: bool) -> String {
    let cfg = h.sim.config();
    let (url, field, value) = if v1 {
        (h.sim.token_url_v1(), "resource", cfg.api_app_id_uri.clone())
    } else {
        (
            h.sim.token_url(),
            "scope",
            format!("{}/.default", cfg.api_app_id_uri),
        )
    };
    let resp = h
        .client
        .post(url)
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", &app.client_id),
            ("client_secret", &app.secret),
            (field, &value),
        ])
        .send()
        .await
        .expect("token request");
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("json");
    body["access_token"].as_str().expect("token").to_owned()
}

async fn whoami(h: &Harness, token: &str) -> reqwest::Response {
    h.get_with("/WhoAmI", &[("authorization", &format!("Bearer {token}"))])
        .await
}

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

#[tokio::test]
async fn app_tokens_of_both_versions_are_admitted_and_never_forwarded() {
    let sim = sim().await;
    let app = sim.handle.add_caller_app(&["Dataverse.ReadWrite"]);
    let callers = format!(
        "[[callers]]\nname = \"orders\"\ntoken = {{ app_ids = [\"{}\"], roles = [\"Dataverse.ReadWrite\"] }}\n",
        app.client_id
    );
    let h = proxy(sim, &callers).await;
    for (version, v1_endpoint) in [(2, false), (1, true), (1, false)] {
        h.sim.set_caller_token_version(version);
        let token = client_credentials(&h, &app, v1_endpoint).await;
        let resp = whoami(&h, &token).await;
        assert_eq!(resp.status(), 200, "v{version} token");
        let seen = h.sim.seen().pop().expect("seen");
        let sent = seen.headers["authorization"].to_str().expect("ascii");
        assert!(
            !sent.contains(&token),
            "the caller's token is never forwarded"
        );
        assert!(seen.authorized, "Dataverse got the proxy's own token");
    }
    // No credential at all: 401 with both challenges.
    let resp = h.get("/WhoAmI").await;
    assert_eq!(resp.status(), 401);
    let challenges: Vec<_> = resp.headers().get_all("www-authenticate").iter().collect();
    assert!(
        challenges
            .iter()
            .any(|c| c.as_bytes().starts_with(b"Bearer")),
        "{challenges:?}"
    );
    let m = h.metrics().await;
    assert!(m.contains("caller=\"orders\""), "{m}");
    h.stop().await;
}

/// `app_only = true`: a user's token never meets the rule, even from an
/// app the rule would admit.
#[tokio::test]
async fn app_only_rules_refuse_user_tokens() {
    let sim = sim().await;
    let app = sim.handle.add_caller_app(&["Dataverse.ReadWrite"]);
    let callers = "[[callers]]\nname = \"daemons\"\ntoken = { app_only = true, any_app = true }\n";
    let h = proxy(sim, callers).await;
    let token = client_credentials(&h, &app, false).await;
    assert_eq!(whoami(&h, &token).await.status(), 200, "an app-only token");
    let user = h
        .sim
        .mint_user_token(&Uuid::new_v4().to_string(), &["user_impersonation"]);
    let resp = whoami(&h, &user).await;
    assert_eq!(resp.status(), 403, "a user's token");
    assert_eq!(
        resp.headers()["x-dataverse-proxy-error"],
        "insufficient_scope"
    );
    h.stop().await;
}

/// Every token the proxy must refuse, with its status; none reaches Dataverse.
#[tokio::test]
async fn refused_tokens_never_reach_dataverse() {
    let sim = sim().await;
    let app = sim.handle.add_caller_app(&["Dataverse.Read"]);
    let callers = "[[callers]]\nname = \"reader\"\ntoken = { roles = [\"Dataverse.Read\"] }\n";
    let h = proxy(sim, callers).await;
    let tenant = h.sim.tenant_id().to_owned();
    let who = TokenSubject::App {
        client_id: app.client_id.clone(),
        roles: app.roles.clone(),
    };
    let good = h.sim.caller_claims(&tenant, &who, 2);
    assert_eq!(
        whoami(&h, &h.sim.sign_caller_token(&good)).await.status(),
        200,
        "the baseline is admitted"
    );
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = good.clone();
        f(&mut c);
        h.sim.sign_caller_token(&c)
    };
    let now = good["iat"].as_u64().expect("iat");
    let signed = h.sim.sign_caller_token(&good);
    let parts: Vec<&str> = signed.split('.').collect();
    let mut tampered_claims = good.clone();
    tampered_claims["roles"] = json!(["Dataverse.Admin", "Dataverse.Read"]);
    let rogue = CallerKey::generate();
    let hs256 = jsonwebtoken::encode(
        &jsonwebtoken::Header {
            kid: Some(signed_kid(&signed)),
            ..jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256)
        },
        &good,
        &jsonwebtoken::EncodingKey::from_secret(h.sim.caller_public_key_pem().as_bytes()),
    )
    .expect("hs256");
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "expired",
            with(&|c| c["exp"] = json!(now - 600)),
            401,
            "invalid_token",
        ),
        (
            "not yet valid",
            with(&|c| c["nbf"] = json!(now + 600)),
            401,
            "invalid_token",
        ),
        (
            "wrong audience",
            with(&|c| c["aud"] = json!("api://another-app")),
            401,
            "invalid_token",
        ),
        (
            "a Dataverse token",
            with(&|c| c["aud"] = json!(h.sim.org_url())),
            401,
            "invalid_token",
        ),
        (
            "another tenant's issuer",
            with(&|c| {
                c["iss"] = json!(format!(
                    "https://login.microsoftonline.com/{OTHER_TENANT}/v2.0"
                ))
            }),
            401,
            "invalid_token",
        ),
        (
            "v1 issuer on a v2 token",
            with(&|c| c["iss"] = json!(format!("https://sts.windows.net/{tenant}/"))),
            401,
            "invalid_token",
        ),
        (
            "tenant not allowed",
            with(&|c| {
                c["tid"] = json!(OTHER_TENANT);
                c["iss"] = json!(format!(
                    "https://login.microsoftonline.com/{OTHER_TENANT}/v2.0"
                ));
            }),
            401,
            "invalid_token",
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(&json!({"alg": "none", "typ": "JWT", "kid": signed_kid(&signed)})),
                parts[1]
            ),
            401,
            "invalid_token",
        ),
        ("HS256 with the public key", hs256, 401, "invalid_token"),
        (
            "tampered payload",
            format!("{}.{}.{}", parts[0], b64(&tampered_claims), parts[2]),
            401,
            "invalid_token",
        ),
        ("unknown key", rogue.sign(&good), 401, "invalid_token"),
        ("not a JWT", "opaque-token".to_owned(), 401, "invalid_token"),
        (
            "missing role",
            with(&|c| c["roles"] = json!(["Dataverse.Write"])),
            403,
            "insufficient_scope",
        ),
    ];
    h.sim.clear_seen();
    let keys_before = h.sim.key_requests();
    for (what, token, status, code) in &cases {
        let resp = whoami(&h, token).await;
        assert_eq!(resp.status().as_u16(), *status, "{what}");
        assert_eq!(resp.headers()["x-dataverse-proxy-error"], *code, "{what}");
        let challenge = resp.headers()["www-authenticate"]
            .to_str()
            .expect("ascii")
            .to_owned();
        assert!(
            challenge.contains(&format!("error=\"{code}\"")),
            "{what}: {challenge}"
        );
        let body: Value = resp.json().await.expect("OData error");
        assert_eq!(body["error"]["code"], *code, "{what}");
        assert!(
            body["error"]["innererror"]["requestid"].is_string(),
            "{what}"
        );
    }
    assert!(h.sim.seen().is_empty(), "nothing reached Dataverse");
    // The unknown key cost one refetch (3 documents), and a second unknown
    // key within the interval none.
    let after_one = h.sim.key_requests();
    assert_eq!(
        after_one - keys_before,
        3,
        "one refetch for the unknown key"
    );
    assert_eq!(
        whoami(&h, &CallerKey::generate().sign(&good))
            .await
            .status(),
        401
    );
    assert_eq!(
        h.sim.key_requests(),
        after_one,
        "no second refetch within the interval"
    );
    h.stop().await;
}

fn signed_kid(token: &str) -> String {
    jsonwebtoken::decode_header(token)
        .expect("header")
        .kid
        .expect("kid")
}

#[tokio::test]
async fn key_rotation_fails_no_request_and_cached_keys_outlive_an_outage() {
    let sim = sim().await;
    let app = sim.handle.add_caller_app(&[]);
    let callers = format!(
        "[[callers]]\nname = \"svc\"\ntoken = {{ app_ids = [\"{}\"] }}\n",
        app.client_id
    );
    let h = proxy(sim, &callers).await;
    let tenant = h.sim.tenant_id().to_owned();
    let who = TokenSubject::App {
        client_id: app.client_id.clone(),
        roles: vec![],
    };
    let claims = h.sim.caller_claims(&tenant, &who, 2);
    let old = h.sim.sign_caller_token(&claims);
    assert_eq!(whoami(&h, &old).await.status(), 200);
    // Entra ID starts signing with a new key: callers hold tokens of the
    // old key and of the new one at once, and the new key's first tokens
    // arrive together.
    let keys_before = h.sim.key_requests();
    h.sim.rotate_caller_keys();
    let new = h.sim.sign_caller_token(&claims);
    let requests = (0..40).map(|i| {
        let token = if i % 2 == 0 { new.clone() } else { old.clone() };
        let h = &h;
        async move { whoami(h, &token).await.status().as_u16() }
    });
    let statuses = futures_util::future::join_all(requests).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(
        h.sim.key_requests() - keys_before,
        3,
        "one refetch (3 documents) for all of them"
    );
    // Entra ID down: the cached keys still verify.
    h.sim.set_entra_down(true);
    let token = h.sim.sign_caller_token(&claims);
    assert_eq!(whoami(&h, &token).await.status(), 200);
    h.stop().await;
}

#[tokio::test]
async fn without_any_keys_nothing_is_admitted() {
    let sim = sim().await;
    sim.handle.set_entra_down(true);
    let extra = caller_config(
        &sim.handle,
        "[[callers]]\nname = \"any\"\ntoken = { any_app = true }\n",
    );
    // Not ready (Entra ID is down for the Dataverse token too): no waiting.
    let h = Harness::with_file(sim, "", &extra, &[]).await;
    let token = h
        .sim
        .mint_user_token(&Uuid::new_v4().to_string(), &["user_impersonation"]);
    let resp = whoami(&h, &token).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(
        resp.headers()["x-dataverse-proxy-error"],
        "caller_keys_unavailable"
    );
    assert!(resp.headers().get("retry-after").is_some());
    assert!(h.sim.seen().is_empty());
    // Recovery once keys can be fetched again: src/identity/tests.rs.
    h.stop().await;
}

#[tokio::test]
async fn acting_as_the_calling_user() {
    let sim = sim().await;
    let daemon = sim.handle.add_caller_app(&["Dataverse.ReadWrite"]);
    let mapped = sim.handle.add_caller_app(&["Dataverse.ReadWrite"]);
    let mapped_user = Uuid::new_v4();
    let callers = format!(
        "[org.policy]\nimpersonation = [\"allow\"]\n\n\
         [[callers]]\nname = \"portal\"\ntoken = {{ scopes = [\"user_impersonation\"] }}\nimpersonate = \"caller\"\n\n\
         [[callers]]\nname = \"jobs\"\ntoken = {{ app_ids = [\"{}\"] }}\nimpersonate = \"caller\"\nimpersonate_apps = {{ \"{}\" = \"{mapped_user}\" }}\n",
        mapped.client_id, mapped.client_id,
    );
    let h = proxy(sim, &callers).await;
    let user = Uuid::new_v4();
    let systemuser = h.sim.add_user(user);
    let mapped_systemuser = h.sim.add_user(mapped_user);
    let token = h
        .sim
        .mint_user_token(&user.to_string(), &["user_impersonation"]);
    let auth = format!("Bearer {token}");
    // WhoAmI answers the user, even when the caller tries to name another.
    let other = h.sim.add_user(Uuid::new_v4());
    let resp = h
        .get_with(
            "/WhoAmI",
            &[
                ("authorization", &auth),
                ("mscrmcallerid", &other.to_string()),
                ("callerobjectid", &Uuid::new_v4().to_string()),
            ],
        )
        .await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["UserId"], systemuser.to_string());
    let seen = h.sim.seen().pop().expect("seen");
    assert_eq!(seen.headers["callerobjectid"], user.to_string().as_str());
    assert!(
        seen.headers.get("mscrmcallerid").is_none(),
        "the caller's own impersonation header is dropped"
    );
    // Records carry the user as creator, the application user on behalf.
    let resp = h
        .send(
            reqwest::Method::POST,
            "/accounts",
            &[
                ("authorization", &auth),
                ("prefer", "return=representation"),
            ],
            Some(&json!({"name": "Made by a user"})),
        )
        .await;
    assert_eq!(resp.status(), 201);
    let row: Value = resp.json().await.expect("json");
    assert_eq!(row["_createdby_value"], systemuser.to_string());
    assert_eq!(
        row["_createdonbehalfby_value"],
        h.sim.application_user_id().to_string()
    );
    // A user unknown to the org: Dataverse's own error passes through.
    let stranger = h
        .sim
        .mint_user_token(&Uuid::new_v4().to_string(), &["user_impersonation"]);
    let resp = whoami(&h, &stranger).await;
    assert_eq!(resp.status(), 400);
    assert!(
        resp.headers().get("x-dataverse-proxy-error").is_none(),
        "Dataverse's answer"
    );
    // An app-only token never acts as a user unless mapped.
    let tenant = h.sim.tenant_id().to_owned();
    let daemon_token = h.sim.sign_caller_token(&h.sim.caller_claims(
        &tenant,
        &TokenSubject::App {
            client_id: daemon.client_id.clone(),
            roles: daemon.roles.clone(),
        },
        2,
    ));
    let resp = whoami(&h, &daemon_token).await;
    assert_eq!(resp.status(), 403);
    assert_eq!(
        resp.headers()["x-dataverse-proxy-error"],
        "insufficient_scope"
    );
    let mapped_token = h.sim.sign_caller_token(&h.sim.caller_claims(
        &tenant,
        &TokenSubject::App {
            client_id: mapped.client_id.clone(),
            roles: mapped.roles.clone(),
        },
        2,
    ));
    let body: Value = whoami(&h, &mapped_token).await.json().await.expect("json");
    assert_eq!(body["UserId"], mapped_systemuser.to_string());
    // Without the privilege, Dataverse refuses, and the proxy passes that on.
    h.sim.set_impersonation_privilege(false);
    let resp = whoami(&h, &token).await;
    assert_eq!(resp.status(), 403);
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["error"]["code"], "0x80040220");
    h.stop().await;
}

#[tokio::test]
async fn impersonation_inside_a_batch_is_the_callers_own() {
    let sim = sim().await;
    let callers = "[org.policy]\nimpersonation = [\"allow\"]\n\n[[callers]]\nname = \"portal\"\ntoken = { any_app = true }\nimpersonate = \"caller\"\n";
    let h = proxy(sim, callers).await;
    let user = Uuid::new_v4();
    h.sim.add_user(user);
    let victim = Uuid::new_v4();
    h.sim.add_user(victim);
    let token = h
        .sim
        .mint_user_token(&user.to_string(), &["user_impersonation"]);
    let batch = format!(
        "--b\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n\r\nGET /api/data/v9.2/WhoAmI HTTP/1.1\r\nCallerObjectId: {victim}\r\nAccept: application/json\r\n\r\n\r\n--b--\r\n"
    );
    let resp = h
        .client
        .post(h.url("/$batch"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "multipart/mixed; boundary=b")
        .body(batch)
        .send()
        .await
        .expect("batch");
    assert_eq!(resp.status(), 200);
    let sent = h.sim.last_batch_body().expect("batch body");
    let sent = String::from_utf8_lossy(&sent);
    assert!(
        !sent.to_ascii_lowercase().contains("callerobjectid"),
        "{sent}"
    );
    let seen = h.sim.seen().pop().expect("seen");
    assert_eq!(seen.headers["callerobjectid"], user.to_string().as_str());
    h.stop().await;
}

#[tokio::test]
async fn several_tenants_and_group_rules() {
    let sim = sim().await;
    let home = sim.handle.tenant_id().to_owned();
    let group = Uuid::new_v4().to_string();
    let extra = format!(
        "\n[caller_tokens]\naudiences = [\"{}\"]\ntenants = [\"{home}\", \"{OTHER_TENANT}\"]\nauthority_host = \"{}\"\n\n\
         [[callers]]\nname = \"partners\"\ntoken = {{ tenants = [\"{OTHER_TENANT}\"], groups = [\"{group}\"] }}\n",
        sim.handle.config().api_client_id,
        sim.handle.entra_url(),
    );
    let h = Harness::with_file(sim, "", &extra, &[]).await;
    h.wait_ready().await;
    let who = TokenSubject::User {
        oid: Uuid::new_v4().to_string(),
        client_id: Uuid::new_v4().to_string(),
        scopes: vec!["user_impersonation".into()],
    };
    let mut claims = h.sim.caller_claims(OTHER_TENANT, &who, 2);
    claims["groups"] = json!([Uuid::new_v4().to_string(), group.to_uppercase()]);
    assert_eq!(
        whoami(&h, &h.sim.sign_caller_token(&claims)).await.status(),
        200,
        "the partner tenant's member"
    );
    claims["groups"] = json!([Uuid::new_v4().to_string()]);
    let resp = whoami(&h, &h.sim.sign_caller_token(&claims)).await;
    assert_eq!(resp.status(), 403, "not in the group");
    // The home tenant is allowed, but this rule names the partner tenant only.
    let home_claims = h.sim.caller_claims(&home, &who, 2);
    assert_eq!(
        whoami(&h, &h.sim.sign_caller_token(&home_claims))
            .await
            .status(),
        403
    );
    h.stop().await;
}

#[tokio::test]
async fn an_oid_that_cannot_be_sent_never_becomes_a_request_as_the_application_user() {
    let sim = sim().await;
    let callers = "[org.policy]\nimpersonation = [\"allow\"]\n\n[[callers]]\nname = \"portal\"\ntoken = { any_app = true }\nimpersonate = \"caller\"\n";
    let h = proxy(sim, callers).await;
    h.sim.clear_seen();
    let token = h
        .sim
        .mint_user_token("not\u{7f}a header value", &["user_impersonation"]);
    let resp = h
        .get_with("/WhoAmI", &[("authorization", &format!("Bearer {token}"))])
        .await;
    assert_eq!(
        resp.status(),
        500,
        "{:?}",
        resp.headers().get("x-dataverse-proxy-error")
    );
    assert!(h.sim.seen().is_empty(), "nothing reached Dataverse");
    h.stop().await;
}

/// A broad token rule's `requests_per_second`, like its `max_concurrency`,
/// is each principal's own: one user spending it leaves another's whole.
#[tokio::test]
async fn a_broad_rules_quota_is_each_users_own() {
    let sim = sim().await;
    let callers = "[[callers]]\nname = \"portal\"\ntoken = { scopes = [\"user_impersonation\"] }\nrequests_per_second = 0.1\n";
    let h = proxy(sim, callers).await;
    let a = h
        .sim
        .mint_user_token(&Uuid::new_v4().to_string(), &["user_impersonation"]);
    let b = h
        .sim
        .mint_user_token(&Uuid::new_v4().to_string(), &["user_impersonation"]);
    assert_eq!(whoami(&h, &a).await.status(), 200);
    let again = whoami(&h, &a).await;
    assert_eq!(again.status(), 429, "user A's quota is spent");
    assert_eq!(
        again.headers()["x-dataverse-proxy-error"],
        "caller_quota_exceeded"
    );
    assert_eq!(whoami(&h, &b).await.status(), 200, "user B's is whole");
    h.stop().await;
}
