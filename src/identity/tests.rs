//! The verifier's key rules under tokio's paused clock, with a scripted
//! key source: refetch for an unknown key at most once per interval, no
//! keys → refused and retried after a pause, old keys refreshed in the
//! background and kept when the refresh fails.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;

use super::*;
use dataverse_sim::entra::CallerKey;

const TENANT: &str = "7f3c8a2e-1b4d-4c6a-9e21-5d8f0a3b6c11";
const AUDIENCE: &str = "api://dataverse-proxy";

/// Keys a test publishes, or an outage.
#[derive(Default)]
struct Scripted {
    keys: Mutex<Vec<Arc<CallerKey>>>,
    down: std::sync::atomic::AtomicBool,
    fetches: AtomicU64,
}

impl KeySource for Scripted {
    fn fetch<'a>(
        &'a self,
        _tenant: &'a str,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Discovered, String>> + Send + 'a>> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        let result = if self.down.load(Ordering::SeqCst) {
            Err("down".to_owned())
        } else {
            let keys = self
                .keys
                .lock()
                .expect("lock")
                .iter()
                .map(|k| (k.kid.clone(), k.decoding_key()))
                .collect();
            Ok(Discovered {
                issuers: vec![
                    (
                        Version::V2,
                        format!("https://login.microsoftonline.com/{TENANT}/v2.0"),
                    ),
                    (Version::V1, format!("https://sts.windows.net/{TENANT}/")),
                ],
                keys,
            })
        };
        Box::pin(async move { result })
    }
}

fn config() -> CallerTokens {
    CallerTokens {
        audiences: vec![AUDIENCE.to_owned()],
        tenants: vec![TENANT.to_owned()],
        authority: url::Url::parse("https://login.microsoftonline.com").expect("url"),
        clock_skew: Duration::from_secs(60),
        key_refetch_interval: Duration::from_secs(300),
        key_refresh: Duration::from_secs(3600),
    }
}

fn token(key: &CallerKey) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    key.sign(&json!({
        "aud": AUDIENCE, "iss": format!("https://login.microsoftonline.com/{TENANT}/v2.0"),
        "tid": TENANT, "ver": "2.0", "iat": now, "nbf": now, "exp": now + 3600,
        "azp": "0C4E1F2A-3B5D-4E6F-8A9B-1C2D3E4F5A6B", "oid": "5d9f5c0a-1111-4c6a-9e21-5d8f0a3b6c11",
        "scp": "user_impersonation Dataverse.Read",
    }))
}

fn setup(keys: &[&Arc<CallerKey>]) -> (Arc<Scripted>, Verifier) {
    let source = Arc::new(Scripted::default());
    source
        .keys
        .lock()
        .expect("lock")
        .extend(keys.iter().map(|k| (*k).clone()));
    let verifier = Verifier::new(config(), source.clone());
    (source, verifier)
}

#[tokio::test(start_paused = true)]
async fn an_unknown_key_refetches_at_most_once_per_interval() {
    let (k1, k2) = (
        Arc::new(CallerKey::generate()),
        Arc::new(CallerKey::generate()),
    );
    let (source, verifier) = setup(&[&k1]);
    verifier.prefetch().await;
    assert!(verifier.verify(&token(&k1)).await.is_ok());
    assert_eq!(source.fetches.load(Ordering::SeqCst), 1);
    let unknown = token(&k2);
    assert_eq!(
        verifier.verify(&unknown).await,
        Err(TokenError::Invalid("signed with an unknown key"))
    );
    assert_eq!(source.fetches.load(Ordering::SeqCst), 2, "one refetch");
    // Published now, but the interval has not passed: no refetch yet.
    source.keys.lock().expect("lock").push(k2.clone());
    assert!(verifier.verify(&unknown).await.is_err());
    assert_eq!(source.fetches.load(Ordering::SeqCst), 2);
    tokio::time::advance(Duration::from_secs(301)).await;
    assert!(
        verifier.verify(&unknown).await.is_ok(),
        "refetched after the interval"
    );
    assert_eq!(source.fetches.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn without_keys_nothing_is_admitted_and_fetching_pauses() {
    let key = Arc::new(CallerKey::generate());
    let (source, verifier) = setup(&[&key]);
    source.down.store(true, Ordering::SeqCst);
    let t = token(&key);
    assert_eq!(verifier.verify(&t).await, Err(TokenError::KeysUnavailable));
    assert_eq!(verifier.verify(&t).await, Err(TokenError::KeysUnavailable));
    assert_eq!(
        source.fetches.load(Ordering::SeqCst),
        1,
        "at most one attempt per pause"
    );
    source.down.store(false, Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(verifier.verify(&t).await.is_ok());
    assert_eq!(source.fetches.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn old_keys_refresh_in_the_background_and_stay_when_that_fails() {
    let key = Arc::new(CallerKey::generate());
    let (source, verifier) = setup(&[&key]);
    verifier.prefetch().await;
    source.down.store(true, Ordering::SeqCst);
    tokio::time::advance(Duration::from_secs(3601)).await;
    let t = token(&key);
    assert!(verifier.verify(&t).await.is_ok(), "cached keys verify");
    // Let the background refresh run.
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(
        source.fetches.load(Ordering::SeqCst),
        2,
        "a refresh was tried"
    );
    assert!(
        verifier.verify(&t).await.is_ok(),
        "and its failure kept the keys"
    );
}

#[tokio::test]
async fn the_principal_names_the_app_and_the_user() {
    let key = Arc::new(CallerKey::generate());
    let (_, verifier) = setup(&[&key]);
    let p = verifier.verify(&token(&key)).await.expect("valid");
    assert!(p.is_user, "scp makes a user token");
    assert_eq!(
        p.app_id, "0c4e1f2a-3b5d-4e6f-8a9b-1c2d3e4f5a6b",
        "ids are lower-cased"
    );
    assert_eq!(p.scopes, ["user_impersonation", "Dataverse.Read"]);
    assert_eq!(p.tenant, TENANT);
}
