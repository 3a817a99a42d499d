//! Refresh ahead, serving until expiry, backoff and failing closed, under
//! tokio's paused clock: the token source is scripted, so every count and
//! every instant is exact.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};

use secrecy::SecretString;

use super::*;
use crate::config::{SecretSource, TokenVersion};

/// Answers in order: `Ok(lifetime)` issues a token, `Err(())` is a
/// transient Entra ID failure; when the script runs out, the last answer
/// repeats.
struct Scripted {
    answers: Mutex<VecDeque<Result<Duration, ()>>>,
    refresh_in: Option<Duration>,
    calls: AtomicU32,
}

impl Scripted {
    fn new(answers: &[Result<Duration, ()>], refresh_in: Option<Duration>) -> Arc<Self> {
        Arc::new(Self {
            answers: Mutex::new(answers.iter().copied().collect()),
            refresh_in,
            calls: AtomicU32::new(0),
        })
    }

    fn calls(&self) -> u32 {
        self.calls.load(Ordering::SeqCst)
    }
}

impl TokenSource for Scripted {
    fn request(
        &self,
    ) -> Pin<Box<dyn Future<Output = Result<client::TokenResponse, TokenError>> + Send + '_>> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let answer = {
            let mut answers = self.answers.lock().expect("lock");
            if answers.len() > 1 {
                answers.pop_front()
            } else {
                answers.front().copied()
            }
        };
        let result = match answer {
            Some(Ok(lifetime)) => Ok(client::TokenResponse {
                access_token: SecretString::from(format!("token-{n}")),
                expires_in: lifetime,
                refresh_in: self.refresh_in,
            }),
            _ => Err(TokenError::Entra {
                status: 503,
                error: "temporarily_unavailable".to_owned(),
                codes: vec![50033],
                description: "a scripted outage".to_owned(),
            }),
        };
        Box::pin(std::future::ready(result))
    }
}

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn provider(source: Arc<Scripted>) -> TokenProvider {
    let credential = Arc::new(CredentialConfig {
        name: "default".to_owned(),
        tenant_id: Some("tenant".to_owned()),
        client_id: Some("client".to_owned()),
        kind: CredentialKind::Secret(SecretSource::Inline(SecretString::from("s"))),
        token_url: None,
        version: TokenVersion::V2,
    });
    let target = Target {
        scope: "https://org.example/.default".to_owned(),
        resource: "https://org.example".to_owned(),
    };
    let settings = TokenConfig {
        egress: None,
        fetch_timeout: secs(30),
        min_backoff: secs(1),
        max_backoff: secs(60),
    };
    let key = TokenKey::new(&credential, &target);
    TokenProvider::with_source(key, credential, settings, new_cache(), source)
}

/// Lets the refresher run whatever is due now.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_one_hour_token_is_refreshed_five_minutes_before_expiry() {
    let source = Scripted::new(&[Ok(secs(3600))], None);
    let p = provider(source.clone());
    let _refresher = p.spawn_refresher(CancellationToken::new());
    settle().await;
    assert_eq!(source.calls(), 1, "fetched at start-up");
    let first = p.get().await.expect("a token");
    tokio::time::sleep(secs(3299)).await;
    settle().await;
    assert_eq!(source.calls(), 1, "not before 55 minutes");
    tokio::time::sleep(secs(2)).await;
    settle().await;
    assert_eq!(source.calls(), 2, "refreshed at 55 minutes");
    let second = p.get().await.expect("a token");
    assert!(!Arc::ptr_eq(&first, &second), "callers get the new token");
    // And again 55 minutes after that.
    tokio::time::sleep(secs(3300)).await;
    settle().await;
    assert_eq!(source.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn refresh_in_from_entra_wins_and_long_tokens_refresh_at_half_life() {
    let hinted = Scripted::new(&[Ok(secs(24 * 3600))], Some(secs(600)));
    let p = provider(hinted.clone());
    let _r = p.spawn_refresher(CancellationToken::new());
    settle().await;
    tokio::time::sleep(secs(601)).await;
    settle().await;
    assert_eq!(hinted.calls(), 2, "refresh_in = 600 s");

    let long = Scripted::new(&[Ok(secs(4 * 3600))], None);
    let p = provider(long.clone());
    let _r = p.spawn_refresher(CancellationToken::new());
    settle().await;
    tokio::time::sleep(secs(2 * 3600 - 1)).await;
    settle().await;
    assert_eq!(long.calls(), 1);
    tokio::time::sleep(secs(2)).await;
    settle().await;
    assert_eq!(long.calls(), 2, "half of four hours");
}

#[tokio::test(start_paused = true)]
async fn a_failed_refresh_keeps_serving_until_expiry_then_fails_closed() {
    // 100 s token: refreshed from 50 s, served until 90 s; Entra ID is down
    // after the first token.
    let source = Scripted::new(&[Ok(secs(100)), Err(())], None);
    let p = provider(source.clone());
    let _r = p.spawn_refresher(CancellationToken::new());
    settle().await;
    let token = p.get().await.expect("a token");
    tokio::time::sleep(secs(89)).await;
    settle().await;
    let still = p.get().await.expect("served until 90 s");
    assert!(Arc::ptr_eq(&token, &still));
    // Retries from 50 s, then after 1, 2, 4, 8, 16, 32 s less a random
    // jitter of up to half each: six attempts by 89 s with no jitter, seven
    // with the most (50, 50.5, 51.5, 53.5, 57.5, 65.5, 81.5 s).
    let retries = source.calls() - 1;
    assert!((6..=7).contains(&retries), "{retries} retries in 40 s");
    tokio::time::sleep(secs(2)).await;
    let err = p.get().await.expect_err("no token after 90 s");
    assert!(err.reason.contains("AADSTS50033"), "{}", err.reason);
    assert!(err.retry_after > Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn during_backoff_callers_fail_fast_without_asking_entra() {
    let source = Scripted::new(&[Err(()), Ok(secs(3600))], None);
    let p = provider(source.clone());
    let first = p.get().await.expect_err("Entra ID is down");
    assert_eq!(source.calls(), 1);
    for _ in 0..50 {
        let again = p.get().await.expect_err("still backing off");
        assert!(again.retry_after <= first.retry_after);
    }
    assert_eq!(
        source.calls(),
        1,
        "fifty callers, no fetch during the backoff"
    );
    // The first backoff is at most min_backoff (1 s).
    tokio::time::sleep(secs(1)).await;
    assert!(
        p.get().await.is_ok(),
        "fetched again once the backoff is over"
    );
    assert_eq!(source.calls(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_refused_token_is_fetched_again_once() {
    let source = Scripted::new(&[Ok(secs(3600))], None);
    let p = provider(source.clone());
    let stale = p.get().await.expect("a token");
    p.invalidate(&stale).await;
    let fresh = p.get().await.expect("a new token");
    assert!(!Arc::ptr_eq(&stale, &fresh));
    // Invalidating the old one again leaves the new one alone.
    p.invalidate(&stale).await;
    let same = p.get().await.expect("the same token");
    assert!(Arc::ptr_eq(&fresh, &same));
    assert_eq!(source.calls(), 2);
}
