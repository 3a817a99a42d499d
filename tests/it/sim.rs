//! The simulator itself follows docs/dataverse.md: it is the test oracle, so
//! its Entra ID and Dataverse answers are checked directly here.

use base64::Engine;
use dataverse_sim::{Sim, SimConfig, SimHandle};
use serde_json::Value;

use crate::harness::client;

/// A token request that must fail: form, URL, status, `error`, AADSTS code.
type Case<'a> = (Vec<(&'a str, &'a str)>, String, u16, &'a str, u64);

async fn token_request(url: &str, form: &[(&str, &str)]) -> (u16, Value) {
    let resp = client()
        .post(url)
        .form(form)
        .send()
        .await
        .expect("token request");
    let status = resp.status().as_u16();
    (status, resp.json().await.expect("json"))
}

fn scope(sim: &SimHandle) -> String {
    format!("{}/.default", sim.org_url())
}

#[tokio::test]
async fn entra_issues_tokens_and_explains_mistakes_with_aadsts_codes() {
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let h = &sim.handle;
    let cfg = h.config().clone();
    let url = h.token_url();
    let scope = scope(h);
    let base = [
        ("grant_type", "client_credentials"),
        ("client_id", cfg.client_id.as_str()),
        ("client_secret", cfg.client_secret.as_str()),
        ("scope", scope.as_str()),
    ];

    let (status, body) = token_request(&url, &base).await;
    assert_eq!(status, 200);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3599, "v2 numbers are JSON integers");
    let token = body["access_token"].as_str().expect("token");
    let claims_b64 = token.split('.').nth(1).expect("jwt");
    let claims: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(claims_b64)
            .expect("b64"),
    )
    .expect("claims");
    assert_eq!(claims["aud"], h.org_url());
    assert_eq!(claims["tid"], cfg.tenant_id);
    assert_eq!(claims["appid"], cfg.client_id);
    assert!(claims["exp"].as_u64().expect("exp") > claims["iat"].as_u64().expect("iat"));

    // The `//.default` form from Microsoft's samples works too.
    let double = format!("{}//.default", h.org_url());
    let mut form = base;
    form[3].1 = &double;
    assert_eq!(token_request(&url, &form).await.0, 200);

    // Secret in HTTP Basic instead of the body.
    let resp = client()
        .post(&url)
        .basic_auth(&cfg.client_id, Some(&cfg.client_secret))
        .form(&[
            ("grant_type", "client_credentials"),
            ("scope", scope.as_str()),
        ])
        .send()
        .await
        .expect("basic");
    assert_eq!(resp.status(), 200);

    let cases: Vec<Case<'_>> = vec![
        (
            vec![base[0], base[1], ("client_secret", "wrong"), base[3]],
            url.clone(),
            401,
            "invalid_client",
            7000215,
        ),
        (
            vec![base[0], base[1], base[3]],
            url.clone(),
            401,
            "invalid_client",
            7000218,
        ),
        (
            vec![
                base[0],
                ("client_id", "00000000-0000-0000-0000-00000000dead"),
                base[2],
                base[3],
            ],
            url.clone(),
            400,
            "unauthorized_client",
            700016,
        ),
        (
            base.to_vec(),
            url.replace(&cfg.tenant_id, "11111111-2222-3333-4444-555555555555"),
            400,
            "invalid_request",
            90002,
        ),
        (
            vec![
                base[0],
                base[1],
                base[2],
                ("scope", "https://other.crm.dynamics.com/.default"),
            ],
            url.clone(),
            400,
            "invalid_resource",
            500011,
        ),
        (
            vec![base[0], base[1], base[2], ("scope", "user.read")],
            url.clone(),
            400,
            "invalid_scope",
            1002012,
        ),
    ];
    for (form, url, status, error, code) in cases {
        let (s, body) = token_request(&url, &form).await;
        assert_eq!(s, status, "{body}");
        assert_eq!(body["error"], error, "{body}");
        assert_eq!(body["error_codes"][0], code, "{body}");
        let description = body["error_description"].as_str().expect("description");
        assert!(
            description.starts_with(&format!("AADSTS{code}: ")),
            "{description}"
        );
        assert!(description.contains("\r\nTrace ID: "), "{description}");
    }
    sim.shutdown();
}

#[tokio::test]
async fn dataverse_demands_a_valid_bearer_and_challenges_like_dataverse() {
    let sim = Sim::start(SimConfig::default()).await.expect("sim");
    let h = &sim.handle;
    let whoami = format!("{}/api/data/v9.2/WhoAmI", h.org_url());

    let resp = client().get(&whoami).send().await.expect("no token");
    assert_eq!(resp.status(), 401);
    let challenge = resp.headers()["www-authenticate"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert_eq!(
        challenge,
        format!(
            "Bearer authorization_uri={}/{}/oauth2/authorize, resource_id={}/",
            h.entra_url(),
            h.config().tenant_id,
            h.org_url()
        )
    );

    // A token signed by someone else is refused.
    let forged =
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJhdWQiOiJ4IiwiZXhwIjo0MTAyNDQ0ODAwfQ.c2lnbmF0dXJl";
    let resp = client()
        .get(&whoami)
        .bearer_auth(forged)
        .send()
        .await
        .expect("forged");
    assert_eq!(resp.status(), 401);

    // An expired one too.
    h.set_token_lifetime(std::time::Duration::ZERO);
    let scope = scope(h);
    let (_, body) = token_request(
        &h.token_url(),
        &[
            ("grant_type", "client_credentials"),
            ("client_id", &h.config().client_id),
            ("client_secret", &h.config().client_secret),
            ("scope", &scope),
        ],
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let expired = body["access_token"].as_str().expect("token");
    let resp = client()
        .get(&whoami)
        .bearer_auth(expired)
        .send()
        .await
        .expect("expired");
    assert_eq!(resp.status(), 401);
    let body: Value = resp.json().await.expect("json");
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("ExpiredAuthTicket")
    );
    assert!(h.seen().iter().all(|r| !r.authorized));
    sim.shutdown();
}

/// A query option the simulator does not run is refused in Dataverse's
/// error shape, never ignored (rows in another order, or every row for a
/// SQL query, would be a silent wrong answer).
#[tokio::test]
async fn query_options_the_simulator_does_not_run_are_refused() {
    let h = crate::harness::Harness::start().await;
    let token = h.sim_token().await;
    for query in [
        "$orderby=name",
        "$apply=groupby((name))",
        "sql=SELECT%20name%20FROM%20account",
    ] {
        let resp = client()
            .get(format!(
                "{}/api/data/v9.2/accounts?{query}",
                h.sim.org_url()
            ))
            .bearer_auth(&token)
            .send()
            .await
            .expect("simulator");
        assert_eq!(resp.status(), 400, "{query}");
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["error"]["code"], "0x80060888", "{query}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("is not supported")),
            "{body}"
        );
    }
    h.stop().await;
}
