//! Acting as the user with the user's own token (`impersonate =
//! "delegated"`): the on-behalf-of exchange against the simulator's Entra
//! ID, Dataverse seeing each user, the cache, Entra's refusals as the
//! caller's errors, and a budget per user (alone and shared via Redis).

use std::time::Duration;

use base64::Engine;
use dataverse_sim::entra::TokenSubject;
use dataverse_sim::{ServiceLimits, Sim, SimConfig, SimHandle};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::harness::{Harness, client};
use crate::redis::RedisServer;
use crate::shared::Replica;

const RULE: &str = "[[callers]]\nname = \"portal\"\ntoken = { scopes = [\"user_impersonation\"] }\nimpersonate = \"delegated\"\n";

fn caller_tokens(sim: &SimHandle) -> String {
    let cfg = sim.config();
    format!(
        "\n[caller_tokens]\naudiences = [\"{}\", \"{}\"]\ntenants = [\"{}\"]\nauthority_host = \"{}\"\n\n",
        cfg.api_app_id_uri,
        cfg.api_client_id,
        cfg.tenant_id,
        sim.entra_url(),
    )
}

async fn proxy(sim: Sim, overrides: &[(&'static str, String)]) -> Harness {
    let extra = format!("{}{RULE}", caller_tokens(&sim.handle));
    let h = Harness::with_file(sim, "", &extra, overrides).await;
    h.wait_ready().await;
    h
}

/// A simulator whose proxy app exposes the API itself: the on-behalf-of
/// exchange needs the assertion to be for the app that exchanges it.
async fn sim() -> Sim {
    let config = SimConfig::default();
    Sim::start(SimConfig {
        api_client_id: config.client_id.clone(),
        ..config
    })
    .await
    .expect("sim")
}

/// A user of the org and a caller token of theirs.
fn user(sim: &SimHandle) -> (Uuid, Uuid, String) {
    let oid = Uuid::new_v4();
    let systemuser = sim.add_user(oid);
    let token = sim.mint_user_token(&oid.to_string(), &["user_impersonation"]);
    (oid, systemuser, token)
}

async fn whoami(h: &Harness, token: &str) -> reqwest::Response {
    h.get_with("/WhoAmI", &[("authorization", &format!("Bearer {token}"))])
        .await
}

#[tokio::test]
async fn each_user_reads_and_writes_as_themselves_with_their_own_token() {
    let h = proxy(sim().await, &[]).await;
    let (a_oid, a_user, a_token) = user(&h.sim);
    let (b_oid, b_user, b_token) = user(&h.sim);
    let body: Value = whoami(&h, &a_token).await.json().await.expect("json");
    assert_eq!(body["UserId"], a_user.to_string(), "Dataverse sees user A");
    let seen = h.sim.seen().pop().expect("seen");
    let sent = seen.headers["authorization"].to_str().expect("ascii");
    assert!(
        !sent.contains(&a_token),
        "the caller's token is never forwarded"
    );
    let claims = seen.claims.expect("a valid Dataverse token");
    assert_eq!(claims.oid, a_oid.to_string(), "the user's own token");
    assert_eq!(claims.scp.as_deref(), Some("user_impersonation"));
    assert!(
        seen.headers.get("callerobjectid").is_none(),
        "no impersonation"
    );
    let resp = h
        .send(
            reqwest::Method::POST,
            "/accounts",
            &[
                ("authorization", &format!("Bearer {b_token}")),
                ("prefer", "return=representation"),
                // The caller cannot name anyone else.
                ("callerobjectid", &a_oid.to_string()),
            ],
            Some(&json!({"name": "Made by B"})),
        )
        .await;
    assert_eq!(resp.status(), 201);
    let row: Value = resp.json().await.expect("json");
    assert_eq!(row["_createdby_value"], b_user.to_string());
    assert!(
        row["_createdonbehalfby_value"].is_null(),
        "nobody on behalf"
    );
    let seen = h.sim.seen().pop().expect("seen");
    assert_eq!(seen.claims.expect("claims").oid, b_oid.to_string());
    assert!(seen.headers.get("callerobjectid").is_none());
    assert_eq!(h.sim.obo_exchanges(), 2, "one exchange per user");
    // Cached: no second exchange for A.
    assert_eq!(whoami(&h, &a_token).await.status(), 200);
    assert_eq!(h.sim.obo_exchanges(), 2);
    // Each user's own allocation is counted apart: two for A, one for B.
    let mut spent = Vec::new();
    for _ in 0..100 {
        let status: Value = h.admin_get("/status").await.json().await.expect("json");
        spent = status["orgs"][0]["usage"]["rows"]
            .as_array()
            .expect("rows")
            .iter()
            .map(|r| (r["lane"].clone(), r["user"].clone(), r["executed"].clone()))
            .collect();
        spent.sort_by_key(|(_, _, n)| n.as_u64());
        if spent.len() == 2 && spent[1].2 == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        spent,
        [
            (json!("user"), json!(b_oid.to_string()), json!(1)),
            (json!("user"), json!(a_oid.to_string()), json!(2)),
        ]
    );
    h.stop().await;
}

#[tokio::test]
async fn fifty_first_requests_of_one_user_cost_one_exchange() {
    let sim = sim().await;
    sim.handle.set_latency(Duration::from_millis(50));
    let h = proxy(sim, &[]).await;
    let (_, _, token) = user(&h.sim);
    let loads = (0..50).map(|_| whoami(&h, &token));
    let statuses: Vec<u16> = futures_util::future::join_all(loads)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(h.sim.obo_exchanges(), 1);
    h.stop().await;
}

#[tokio::test]
async fn entras_refusals_are_the_callers_errors() {
    let h = proxy(sim().await, &[]).await;
    let tenant = h.sim.tenant_id().to_owned();
    // An expired caller token: refused before any exchange.
    let oid = Uuid::new_v4();
    h.sim.add_user(oid);
    let who = TokenSubject::User {
        oid: oid.to_string(),
        client_id: Uuid::new_v4().to_string(),
        scopes: vec!["user_impersonation".to_owned()],
    };
    let mut claims = h.sim.caller_claims(&tenant, &who, 2);
    claims["exp"] = json!(1_000_000);
    let resp = whoami(&h, &h.sim.sign_caller_token(&claims)).await;
    assert_eq!(resp.status(), 401);
    assert_eq!(resp.headers()["x-dataverse-proxy-error"], "invalid_token");
    assert_eq!(h.sim.obo_exchanges(), 0);

    // No admin consent: 403 naming the step.
    h.sim.set_obo_consent(&tenant, false);
    let (_, _, refused) = user(&h.sim);
    let resp = whoami(&h, &refused).await;
    assert_eq!(resp.status(), 403);
    assert_eq!(
        resp.headers()["x-dataverse-proxy-error"],
        "consent_required"
    );
    let text = resp.text().await.expect("body");
    assert!(text.contains("admin consent"), "{text}");
    assert!(
        !text.contains("AADSTS"),
        "never Entra's description: {text}"
    );
    h.sim.set_obo_consent(&tenant, true);
    let (_, _, token) = user(&h.sim);

    // MFA demanded: the claims challenge, passed back for MSAL.
    h.sim.require_mfa(true);
    let resp = whoami(&h, &token).await;
    assert_eq!(resp.status(), 401);
    assert_eq!(
        resp.headers()["x-dataverse-proxy-error"],
        "insufficient_claims"
    );
    let challenge = resp.headers()["www-authenticate"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(challenge.starts_with("Bearer "), "{challenge}");
    assert!(
        challenge.contains("error=\"insufficient_claims\""),
        "{challenge}"
    );
    let encoded =
        base64::engine::general_purpose::STANDARD.encode(dataverse_sim::entra::obo::MFA_CLAIMS);
    assert!(
        challenge.contains(&format!("claims=\"{encoded}\"")),
        "{challenge}"
    );
    // After the step-up the user's new token (amr: mfa) goes through.
    let who = TokenSubject::User {
        oid: oid.to_string(),
        client_id: Uuid::new_v4().to_string(),
        scopes: vec!["user_impersonation".to_owned()],
    };
    let mut claims = h.sim.caller_claims(&tenant, &who, 2);
    claims["amr"] = json!(["pwd", "mfa"]);
    let resp = whoami(&h, &h.sim.sign_caller_token(&claims)).await;
    assert_eq!(resp.status(), 200);
    h.sim.require_mfa(false);

    // Entra unreachable: 503 with Retry-After.
    let (_, _, fresh) = user(&h.sim);
    h.sim.set_entra_down(true);
    let resp = whoami(&h, &fresh).await;
    assert_eq!(resp.status(), 503);
    assert_eq!(
        resp.headers()["x-dataverse-proxy-error"],
        "token_exchange_unavailable"
    );
    assert!(resp.headers().get("retry-after").is_some());
    h.sim.set_entra_down(false);

    // An app-only token cannot use a delegated rule.
    let app = h.sim.add_caller_app(&["Dataverse.ReadWrite"]);
    let app_token = h.sim.sign_caller_token(&h.sim.caller_claims(
        &tenant,
        &TokenSubject::App {
            client_id: app.client_id.clone(),
            roles: app.roles.clone(),
        },
        2,
    ));
    let resp = whoami(&h, &app_token).await;
    assert_eq!(resp.status(), 403);
    h.stop().await;
}

/// Conditional Access is evaluated at each exchange, so a second token of
/// the same user (without MFA) is exchanged on its own, never served the
/// first token's cached result.
#[tokio::test]
async fn a_second_token_of_a_user_cannot_skip_conditional_access() {
    let h = proxy(sim().await, &[]).await;
    h.sim.require_mfa(true);
    let tenant = h.sim.tenant_id().to_owned();
    let oid = Uuid::new_v4();
    h.sim.add_user(oid);
    let token_with = |amr: &[&str]| {
        let who = TokenSubject::User {
            oid: oid.to_string(),
            client_id: Uuid::new_v4().to_string(),
            scopes: vec!["user_impersonation".to_owned()],
        };
        let mut claims = h.sim.caller_claims(&tenant, &who, 2);
        claims["amr"] = json!(amr);
        h.sim.sign_caller_token(&claims)
    };
    let strong = token_with(&["pwd", "mfa"]);
    assert_eq!(whoami(&h, &strong).await.status(), 200);
    let weak = token_with(&["pwd"]);
    let resp = whoami(&h, &weak).await;
    assert_eq!(
        resp.status(),
        401,
        "the cached exchange is not the weak token's"
    );
    assert_eq!(
        resp.headers()["x-dataverse-proxy-error"],
        "insufficient_claims"
    );
    assert_eq!(h.sim.obo_attempts(), 2, "each token exchanged on its own");
    assert_eq!(h.sim.obo_exchanges(), 1);
    // The strong token still serves from the cache.
    assert_eq!(whoami(&h, &strong).await.status(), 200);
    assert_eq!(h.sim.obo_attempts(), 2);
    h.stop().await;
}

/// A refused exchange is remembered for that assertion: the user's next
/// requests cost Entra nothing until the refusal's time is up, and say
/// when to come back.
#[tokio::test]
async fn a_refused_exchange_is_not_asked_again_on_every_request() {
    let h = proxy(sim().await, &[]).await;
    h.sim.set_obo_consent(h.sim.tenant_id(), false);
    let (_, _, token) = user(&h.sim);
    for _ in 0..5 {
        let resp = whoami(&h, &token).await;
        assert_eq!(resp.status(), 403);
        assert_eq!(
            resp.headers()["x-dataverse-proxy-error"],
            "consent_required"
        );
        let wait: u64 = resp.headers()["retry-after"]
            .to_str()
            .expect("ascii")
            .parse()
            .expect("seconds");
        assert!((1..=30).contains(&wait), "{wait}");
    }
    assert_eq!(
        h.sim.obo_attempts(),
        1,
        "one call to Entra for five requests"
    );
    // Another user is not refused for the first one's sake.
    h.sim.set_obo_consent(h.sim.tenant_id(), true);
    let (_, _, other) = user(&h.sim);
    assert_eq!(whoami(&h, &other).await.status(), 200);
    assert_eq!(h.sim.obo_attempts(), 2);
    h.stop().await;
}

#[tokio::test]
async fn a_token_dataverse_refuses_is_exchanged_again_once() {
    let h = proxy(sim().await, &[]).await;
    let (_, _, token) = user(&h.sim);
    assert_eq!(whoami(&h, &token).await.status(), 200);
    h.sim.revoke_tokens();
    assert_eq!(whoami(&h, &token).await.status(), 200);
    assert_eq!(
        h.sim.obo_exchanges(),
        2,
        "dropped after the 401, exchanged again"
    );
    h.stop().await;
}

#[tokio::test]
async fn one_user_throttled_never_pauses_another() {
    let h = proxy(sim().await, &[]).await;
    let (a_oid, _, a_token) = user(&h.sim);
    let (_, _, b_token) = user(&h.sim);
    h.sim.set_user_limits(
        &a_oid.to_string(),
        ServiceLimits {
            requests: 2,
            ..ServiceLimits::default()
        },
    );
    let mut a = Vec::new();
    for _ in 0..3 {
        a.push(whoami(&h, &a_token).await.status().as_u16());
    }
    assert_eq!(a, [200, 200, 429], "A's window is used up");
    let started = std::time::Instant::now();
    for _ in 0..10 {
        assert_eq!(whoami(&h, &b_token).await.status(), 200, "B goes on");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "B never waited for A's gate"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_users_gate_is_shared_by_every_replica() {
    let redis = RedisServer::start().await;
    let sim = sim().await;
    let overrides = vec![
        ("governor.redis_url", redis.url()),
        ("governor.queue_timeout", "1s".to_owned()),
        ("governor.retry_deadline", "1s".to_owned()),
    ];
    let toml = format!("{}{RULE}", caller_tokens(&sim.handle));
    let one = Replica::start_with(&sim.handle, &overrides, Some(toml.clone())).await;
    let two = Replica::start_with(&sim.handle, &overrides, Some(toml)).await;
    let (a_oid, _, a_token) = user(&sim.handle);
    let (_, _, b_token) = user(&sim.handle);
    sim.handle.set_user_limits(
        &a_oid.to_string(),
        ServiceLimits {
            requests: 1,
            ..ServiceLimits::default()
        },
    );
    let get = |url: String, token: &str| {
        client()
            .get(url)
            .header("authorization", format!("Bearer {token}"))
            .send()
    };
    assert_eq!(
        get(one.url("/WhoAmI"), &a_token).await.expect("a").status(),
        200
    );
    let resp = get(one.url("/WhoAmI"), &a_token).await.expect("a");
    assert_eq!(resp.status(), 429, "Dataverse throttled A on replica one");
    let throttled = sim.handle.throttled();
    // Replica one closes A's gate in Redis as it answers; wait for the key.
    let redis_client = redis::Client::open(redis.url()).expect("redis url");
    let mut conn = redis_client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let pattern = format!("*/user/*/{a_oid}:gate");
    for _ in 0..200 {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query_async(&mut conn)
            .await
            .expect("keys");
        if !keys.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Replica two knows A's gate is closed: A waits there, B does not.
    let resp = get(two.url("/WhoAmI"), &a_token).await.expect("a");
    assert_eq!(resp.status(), 429);
    assert_eq!(
        resp.headers()["x-dataverse-proxy-error"],
        "governor_queue_timeout"
    );
    assert_eq!(
        sim.handle.throttled(),
        throttled,
        "A's request never reached Dataverse"
    );
    assert_eq!(
        get(two.url("/WhoAmI"), &b_token).await.expect("b").status(),
        200
    );
    one.stop().await;
    two.stop().await;
}

/// A metadata answer fetched with one user's own token is that user's:
/// the cache keeps it apart from other users'.
#[tokio::test]
async fn cached_metadata_is_kept_per_user() {
    let h = proxy(sim().await, &[]).await;
    let (_, _, a) = user(&h.sim);
    let (_, _, b) = user(&h.sim);
    let path = "/EntityDefinitions?$select=LogicalName";
    for (token, fetched, why) in [
        (Some(&a), 1, "A's first load"),
        (Some(&a), 1, "A's second load is a hit"),
        (Some(&b), 2, "B's is B's own"),
    ] {
        let auth = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|v| ("authorization", v.as_str())).collect();
        assert_eq!(h.get_with(path, &headers).await.status(), 200, "{why}");
        let seen = h
            .sim
            .seen()
            .iter()
            .filter(|s| s.target.contains("EntityDefinitions"))
            .count();
        assert_eq!(seen, fetched, "{why}");
    }
    h.stop().await;
}
