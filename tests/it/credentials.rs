//! Every credential a Dynamics shop uses, several orgs and tenants, and the
//! 401 path. Each test proves a request went through with a token the
//! simulator checked.

use std::path::PathBuf;
use std::time::Duration;

use dataverse_sim::{FEDERATION_AUDIENCE, Federation, Sim, SimConfig, SimHandle};
use serde_json::Value;

use crate::harness::{Harness, Setup};

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .display()
        .to_string()
}

fn with_certificate() -> SimConfig {
    SimConfig {
        certificate_pem: Some(std::fs::read_to_string(fixture("cert.pem")).expect("cert")),
        ..SimConfig::default()
    }
}

/// The form of the last token request, decoded.
fn last_form(sim: &SimHandle) -> Vec<(String, String)> {
    let (_, body) = sim.last_token_request().expect("a token request");
    url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect()
}

fn form_value<'a>(form: &'a [(String, String)], key: &str) -> Option<&'a str> {
    form.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// Settings that point a credential at the simulator's tenant and app.
fn entra(sim: &SimConfig, token_url: String) -> Vec<(&'static str, String)> {
    vec![
        ("credential.tenant_id", sim.tenant_id.clone()),
        ("credential.client_id", sim.client_id.clone()),
        ("credential.token_url", token_url),
    ]
}

async fn start(
    sim_config: SimConfig,
    credential: impl FnOnce(&SimHandle) -> Vec<(&'static str, String)>,
) -> Harness {
    let sim = Sim::start(sim_config).await.expect("sim");
    let mut setup = Setup::default().set("org.url", sim.handle.org_url());
    setup.overrides.extend(credential(&sim.handle));
    setup.toml = Some(String::new());
    Harness::on(sim, setup).await
}

async fn assert_whoami(h: &Harness) -> Value {
    let resp = h.get("/WhoAmI").await;
    assert_eq!(resp.status(), 200);
    let seen = h.sim.seen().pop().expect("seen");
    assert!(seen.authorized);
    serde_json::to_value(seen.claims.expect("claims")).expect("json")
}

#[tokio::test]
async fn a_pem_certificate_signs_a_ps256_assertion_by_default() {
    let cfg = with_certificate();
    let h = start(cfg.clone(), |s| {
        let mut v = entra(&cfg, s.token_url());
        v.push(("credential.certificate_path", fixture("client.pem")));
        v
    })
    .await;
    let claims = assert_whoami(&h).await;
    assert_eq!(claims["appidacr"], "2", "authenticated with a certificate");
    let form = last_form(&h.sim);
    assert!(form_value(&form, "client_secret").is_none());
    assert_eq!(
        form_value(&form, "client_assertion_type"),
        Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    );
    let header =
        jsonwebtoken::decode_header(form_value(&form, "client_assertion").expect("assertion"))
            .expect("jwt");
    assert_eq!(header.alg, jsonwebtoken::Algorithm::PS256);
    assert!(header.x5t_s256.is_some() && header.x5c.is_none());
    h.stop().await;
}

#[tokio::test]
async fn a_pfx_certificate_with_rs256_and_the_chain() {
    let cfg = with_certificate();
    let h = start(cfg.clone(), |s| {
        let mut v = entra(&cfg, s.token_url());
        v.push(("credential.certificate_path", fixture("client.pfx")));
        v.push(("credential.certificate_password", "fixture-password".into()));
        v.push(("credential.assertion_algorithm", "RS256".into()));
        v.push(("credential.send_certificate_chain", "true".into()));
        v
    })
    .await;
    let claims = assert_whoami(&h).await;
    assert_eq!(claims["appidacr"], "2");
    let form = last_form(&h.sim);
    let header =
        jsonwebtoken::decode_header(form_value(&form, "client_assertion").expect("assertion"))
            .expect("jwt");
    assert_eq!(header.alg, jsonwebtoken::Algorithm::RS256);
    assert!(header.x5t.is_some());
    assert_eq!(header.x5c.map(|c| c.len()), Some(1));
    h.stop().await;
}

#[tokio::test]
async fn a_wrong_certificate_is_refused_with_advice() {
    // The simulator has no certificate registered: Entra refuses the assertion.
    let cfg = SimConfig::default();
    let h = start(cfg.clone(), |s| {
        let mut v = entra(&cfg, s.token_url());
        v.push(("credential.certificate_path", fixture("client.pem")));
        v
    })
    .await;
    let resp = h.get("/WhoAmI").await;
    assert_eq!(resp.status(), 503);
    let body: Value = resp.json().await.expect("json");
    assert!(
        body["error"]["message"]
            .as_str()
            .expect("msg")
            .contains("AADSTS700027"),
        "{body}"
    );
    h.stop().await;
}

fn federated_token(fed: &Federation, subject: &str) -> String {
    let now = dataverse_sim::now_epoch();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({
            "iss": fed.issuer, "sub": subject, "aud": FEDERATION_AUDIENCE,
            "iat": now, "nbf": now, "exp": now + 3600,
        }),
        &jsonwebtoken::EncodingKey::from_secret(&fed.key),
    )
    .expect("sign")
}

#[tokio::test]
async fn workload_identity_reads_the_token_file_at_every_fetch() {
    let fed = Federation {
        issuer: "https://oidc.aks.example/tenant/cluster/".into(),
        subject: "system:serviceaccount:crm:dataverse-proxy".into(),
        key: b"cluster-signing-key-0123456789abcdef".to_vec(),
    };
    let cfg = SimConfig {
        federation: Some(fed.clone()),
        token_lifetime: Duration::from_secs(2),
        ..SimConfig::default()
    };
    let dir = std::env::temp_dir().join(format!("dvp-fed-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let file = dir.join("token");
    let first = federated_token(&fed, &fed.subject);
    std::fs::write(&file, &first).expect("write");
    let path = file.display().to_string();
    let h = start(cfg.clone(), |s| {
        let mut v = entra(&cfg, s.token_url());
        v.push(("credential.federated_token_file", path));
        v
    })
    .await;
    let claims = assert_whoami(&h).await;
    assert_eq!(claims["appid"], cfg.client_id);
    assert_eq!(
        form_value(&last_form(&h.sim), "client_assertion"),
        Some(first.as_str())
    );

    // The kubelet rotates the projected token; the next refresh uses it.
    let second = federated_token(&fed, &fed.subject);
    let second = format!("{second}\n");
    std::fs::write(&file, &second).expect("rotate");
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_whoami(&h).await;
    assert_eq!(
        form_value(&last_form(&h.sim), "client_assertion"),
        Some(second.trim_end())
    );
    h.stop().await;
}

#[tokio::test]
async fn managed_identity_through_imds_system_and_user_assigned() {
    let cfg = SimConfig::default();
    let h = start(cfg.clone(), |s| {
        vec![
            ("credential.managed_identity", "imds".into()),
            ("credential.imds_endpoint", s.imds_endpoint()),
        ]
    })
    .await;
    let claims = assert_whoami(&h).await;
    assert_eq!(claims["appid"], cfg.managed_identity_client_id);
    assert_eq!(claims["appidacr"], "0");
    h.stop().await;

    let h = start(cfg.clone(), |s| {
        vec![
            ("credential.managed_identity", "imds".into()),
            (
                "credential.client_id",
                cfg.managed_identity_client_id.clone(),
            ),
            ("credential.imds_endpoint", s.imds_endpoint()),
        ]
    })
    .await;
    assert_whoami(&h).await;
    h.stop().await;
}

#[tokio::test]
async fn managed_identity_through_app_service() {
    let cfg = SimConfig::default();
    let h = start(cfg.clone(), |s| {
        vec![
            ("credential.identity_endpoint", s.app_service_endpoint()),
            ("credential.identity_header", cfg.identity_header.clone()),
        ]
    })
    .await;
    let claims = assert_whoami(&h).await;
    assert_eq!(claims["appid"], cfg.managed_identity_client_id);
    h.stop().await;
}

#[tokio::test]
async fn the_v1_endpoint_with_resource_and_string_numbers() {
    let cfg = SimConfig::default();
    let h = start(cfg.clone(), |s| {
        let mut v = entra(&cfg, s.token_url_v1());
        v.push(("credential.client_secret", cfg.client_secret.clone()));
        v.push(("credential.token_version", "v1".into()));
        v
    })
    .await;
    assert_whoami(&h).await;
    let form = last_form(&h.sim);
    assert_eq!(form_value(&form, "resource"), Some(h.sim.org_url()));
    assert!(form_value(&form, "scope").is_none());
    h.stop().await;
}

#[tokio::test]
async fn two_orgs_in_two_tenants_each_get_their_own_token() {
    let cfg = SimConfig::default();
    let sim = Sim::start(cfg.clone()).await.expect("sim");
    let other_tenant = "9b8a7c6d-5e4f-4a3b-2c1d-0e9f8a7b6c5d";
    sim.handle.add_tenant(other_tenant);
    let org_b = sim.add_org(other_tenant).await.expect("org b");
    let org_a = sim.handle.clone();
    let toml = format!(
        r#"
[credential]
tenant_id = "{tenant_a}"
client_id = "{client}"
client_secret = "{secret}"
token_url = "{url_a}"

[credentials.customer]
tenant_id = "{other_tenant}"
client_id = "{client}"
client_secret = "{secret}"
token_url = "{url_b}"

[[orgs]]
name = "sales"
url = "{org_a}"
default = true

[[orgs]]
name = "customer"
url = "{org_b}"
credential = "customer"
hosts = ["customer.dataverse.local"]
"#,
        tenant_a = cfg.tenant_id,
        client = cfg.client_id,
        secret = cfg.client_secret,
        url_a = org_a.token_url(),
        url_b = org_b.token_url(),
        org_a = org_a.org_url(),
        org_b = org_b.org_url(),
    );
    let h = Harness::on(sim, Setup::default().toml(toml)).await;
    h.wait_ready().await;

    let resp = h
        .client
        .get(format!("{}/sales/api/data/v9.2/WhoAmI", h.proxy))
        .send()
        .await
        .expect("a");
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("json");
    assert!(
        body["@odata.context"]
            .as_str()
            .expect("ctx")
            .starts_with(&format!("{}/sales/api/data/v9.2/", h.proxy))
    );
    let resp = h
        .client
        .get(format!("{}/customer/api/data/v9.2/leads?$top=1", h.proxy))
        .send()
        .await
        .expect("b");
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.expect("json");
    assert!(
        body["@odata.context"]
            .as_str()
            .expect("ctx")
            .starts_with(&format!("{}/customer/api/data/v9.2/", h.proxy))
    );

    let a = org_a.seen().pop().expect("a saw").claims.expect("claims");
    assert_eq!(
        (a.tid.as_str(), a.aud.as_str()),
        (cfg.tenant_id.as_str(), org_a.org_url())
    );
    let b = org_b.seen().pop().expect("b saw").claims.expect("claims");
    assert_eq!(
        (b.tid.as_str(), b.aud.as_str()),
        (other_tenant, org_b.org_url())
    );
    assert_eq!(a.appid, b.appid, "one multi-tenant app");
    assert_eq!(h.sim.token_requests(), 2, "one token per tenant and org");

    // The bare path goes to the default org; Host routing picks the other.
    assert_eq!(h.get("/WhoAmI").await.status(), 200);
    assert_eq!(org_a.seen().len(), 2);
    let resp = h
        .get_with("/WhoAmI", &[("host", "customer.dataverse.local")])
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(org_b.seen().len(), 2);
    // An unknown org prefix is a proxy 404.
    let resp = h
        .client
        .get(format!("{}/nosuch/api/data/v9.2/WhoAmI", h.proxy))
        .send()
        .await
        .expect("404");
    assert_eq!(resp.status(), 404);
    h.stop().await;
}

#[tokio::test]
async fn revoking_tokens_costs_one_token_request_and_no_failed_get() {
    let h = Harness::start().await;
    h.wait_ready().await;
    assert_eq!(h.get("/WhoAmI").await.status(), 200);
    let before = h.sim.token_requests();
    h.sim.revoke_tokens();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (c, u) = (h.client.clone(), h.url("/leads?$top=2"));
        tasks.push(tokio::spawn(async move {
            c.get(u).send().await.expect("get").status().as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), 200);
    }
    assert_eq!(
        h.sim.token_requests() - before,
        1,
        "concurrent 401s cause one fetch"
    );
    // A second revocation with a streamed (non-replayable) body: the 401
    // reaches the caller, and the next request uses a fresh token.
    h.sim.revoke_tokens();
    let big = "x".repeat(2 * 1024 * 1024);
    let resp = h
        .send(
            reqwest::Method::POST,
            "/accounts",
            &[],
            Some(&serde_json::json!({"name": "big", "description": big})),
        )
        .await;
    assert_eq!(resp.status(), 401);
    assert_eq!(h.get("/WhoAmI").await.status(), 200);
    h.stop().await;
}
