//! As whom a request is sent, which decides its budget and its token: one of the org's
//! lanes (an application user's token and governor), or, for a caller
//! rule with `impersonate = "delegated"`, the user's own token (exchanged
//! on-behalf-of) and the user's own governor.

use std::sync::Arc;

use super::admit::Admitted;
use crate::app::AppState;
use crate::callers::Delegated;
use crate::error::ProxyError;
use crate::governor::{Governor, Permit};
use crate::token::{AccessToken, UserAssertion};

/// As whom the request is sent.
pub enum SentAs<'a> {
    /// On lane `lane` of the org.
    Lane { admitted: &'a Admitted, lane: usize },
    /// As `user`, with the user's governor.
    User {
        admitted: &'a Admitted,
        user: &'a Delegated,
        governor: Governor,
        /// The token in hand was exchanged by this request.
        fresh: bool,
    },
}

impl<'a> SentAs<'a> {
    /// As whom the request is sent, and its first slot.
    pub async fn start(admitted: &'a Admitted) -> Result<(Self, Permit), ProxyError> {
        if let Some(user) = admitted.delegated.as_deref() {
            let governor = admitted.org.users.of(&user.tenant, &user.object_id);
            let permit = governor.acquire_for(&admitted.flow).await?;
            return Ok((
                Self::User {
                    admitted,
                    user,
                    governor,
                    fresh: false,
                },
                permit,
            ));
        }
        let lanes = &admitted.org.lanes;
        let (lane, permit) = lanes.acquire(admitted.lanes, &admitted.flow).await?;
        Ok((Self::Lane { admitted, lane }, permit))
    }

    /// The lane's name, or `user` for a request with the user's own token
    /// (the attempt's span names it).
    pub fn lane_name(&self) -> &str {
        match self {
            Self::Lane { admitted, lane } => &admitted.org.lanes.get(*lane).name,
            Self::User { .. } => "user",
        }
    }

    /// [`Self::lane_name`], shared (no allocation per request).
    pub fn lane_label(&self) -> std::sync::Arc<str> {
        static USER: std::sync::LazyLock<std::sync::Arc<str>> =
            std::sync::LazyLock::new(|| std::sync::Arc::from("user"));
        match self {
            Self::Lane { admitted, lane } => admitted.org.lanes.get(*lane).name.clone(),
            Self::User { .. } => USER.clone(),
        }
    }

    /// The governor of the slot held.
    pub fn governor(&self) -> &Governor {
        match self {
            Self::Lane { admitted, lane } => &admitted.org.lanes.get(*lane).governor,
            Self::User { governor, .. } => governor,
        }
    }

    /// The token to send. A lane whose credential fails hands the request
    /// to another lane (`permit` is then that lane's); a user's token
    /// that cannot be had is the caller's error.
    pub async fn token(
        &mut self,
        state: &AppState,
        permit: &mut Permit,
    ) -> Result<Arc<AccessToken>, ProxyError> {
        match self {
            Self::User {
                admitted,
                user,
                fresh,
                ..
            } => {
                let credential = admitted.org.lanes.first().token.credential();
                let assertion = assertion(user);
                // Boxed, as the lane's fetch is (`TokenProvider::get`).
                let exchange = state
                    .obo
                    .token(credential, &admitted.org.origin, &assertion);
                let exchanged = Box::pin(exchange).await?;
                *fresh = exchanged.fresh;
                Ok(exchanged.token)
            }
            Self::Lane { admitted, lane } => {
                let lanes = &admitted.org.lanes;
                let mut allowed = admitted.lanes;
                loop {
                    let e = match lanes.get(*lane).token.get().await {
                        Ok(token) => return Ok(token),
                        Err(e) => e,
                    };
                    // Nothing was sent: the slot is free at once; every lane
                    // whose credential failed stays out of this request's way.
                    permit.set_finished();
                    allowed = allowed.without(*lane);
                    // The caller's cap moves with the request to the next lane.
                    let cap = permit.take_cap();
                    let elsewhere = lanes.acquire_elsewhere(allowed, &admitted.flow, cap);
                    match Box::pin(elsewhere).await {
                        Some(next) => (*lane, *permit) = next?,
                        None => return Err(e.into()),
                    }
                }
            }
        }
    }

    /// Dataverse refused `token` (401): it is dropped, so the replay gets
    /// a fresh one. A user's token exchanged for this very request was not
    /// revoked since: the refusal is the user's, remembered for a while.
    pub async fn invalidate(&self, state: &AppState, token: &Arc<AccessToken>) {
        match self {
            Self::Lane { admitted, lane } => {
                admitted.org.lanes.get(*lane).token.invalidate(token).await;
            }
            Self::User {
                admitted,
                user,
                fresh,
                ..
            } => {
                let (org, user) = (&admitted.org.origin, assertion(user));
                if *fresh {
                    state.obo.refused_by_dataverse(org, &user).await;
                } else {
                    state.obo.invalidate(org, &user).await;
                }
            }
        }
    }

    /// Whether the token in hand is a user's, exchanged by this request.
    pub fn exchanged_now(&self) -> bool {
        matches!(self, Self::User { fresh: true, .. })
    }

    /// Whether a throttled request can go elsewhere at once: another lane
    /// with an open gate (a user has one budget only).
    pub fn another_open(&self) -> bool {
        match self {
            Self::Lane { admitted, lane } => admitted.org.lanes.another_open(admitted.lanes, *lane),
            Self::User { .. } => false,
        }
    }

    /// A new slot, after a 429's wait: any allowed lane, or the user's.
    pub async fn reacquire(&mut self) -> Result<Permit, ProxyError> {
        match self {
            Self::Lane { admitted, lane } => {
                let (next, permit) = admitted
                    .org
                    .lanes
                    .acquire(admitted.lanes, &admitted.flow)
                    .await?;
                *lane = next;
                Ok(permit)
            }
            Self::User {
                admitted, governor, ..
            } => Ok(governor.acquire_for(&admitted.flow).await?),
        }
    }
}

fn assertion(user: &Delegated) -> UserAssertion<'_> {
    use secrecy::ExposeSecret;
    UserAssertion {
        token: user.token.expose_secret(),
        tenant: &user.tenant,
        object_id: &user.object_id,
        expires_at: user.expires_at,
    }
}
