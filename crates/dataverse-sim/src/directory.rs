//! The simulated Entra ID as tests steer it: token requests counted,
//! failed or refused, lifetimes, revocation, tenants, caller apps and the
//! keys their tokens are signed with.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::http::HeaderMap;

use super::{SimHandle, entra, lock};

impl SimHandle {
    /// The configuration overrides that point a proxy at this simulator:
    /// its org and the credential of its registered app.
    pub fn proxy_overrides(&self) -> Vec<(&'static str, String)> {
        let cfg = self.config();
        vec![
            ("org.url", self.org_url().to_owned()),
            ("credential.tenant_id", cfg.tenant_id.clone()),
            ("credential.client_id", cfg.client_id.clone()),
            ("credential.client_secret", cfg.client_secret.clone()),
            ("credential.token_url", self.token_url()),
        ]
    }

    /// Token requests received so far (successful or not, all endpoints).
    pub fn token_requests(&self) -> u64 {
        self.0.entra.token_requests.load(Ordering::SeqCst)
    }

    /// Headers and form body of the last token request.
    pub fn last_token_request(&self) -> Option<(HeaderMap, String)> {
        lock(&self.0.entra.last_request).clone()
    }

    /// Makes the next `n` token requests fail with 503 `temporarily_unavailable`.
    pub fn fail_next_token_requests(&self, n: u64) {
        self.0.entra.fail_token_requests.store(n, Ordering::SeqCst);
    }

    /// Takes Entra ID down (every token request fails with 503) or back up.
    pub fn set_entra_down(&self, down: bool) {
        self.0.entra.entra_down.store(down, Ordering::SeqCst);
    }

    /// Sets the lifetime of tokens issued from now on.
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        *lock(&self.0.entra.token_lifetime) = lifetime;
    }

    /// Makes Entra ID send `refresh_in` (seconds) with new tokens.
    pub fn set_refresh_in(&self, refresh_in: Option<Duration>) {
        *lock(&self.0.entra.refresh_in) = refresh_in;
    }

    /// Revokes every token issued so far: Dataverse refuses them from now on.
    pub fn revoke_tokens(&self) {
        let issued = std::mem::take(&mut *lock(&self.0.entra.issued));
        lock(&self.0.entra.revoked).extend(issued);
    }

    /// Registers (consents) the app in another tenant, as a multi-tenant
    /// app an admin of that tenant approved.
    pub fn add_tenant(&self, tenant_id: &str) {
        lock(&self.0.entra.tenants).push(tenant_id.to_owned());
    }

    /// Registers an app that may call the proxy's API, with `roles`
    /// assigned; it gets tokens by client credentials with its secret.
    pub fn add_caller_app(&self, roles: &[&str]) -> entra::CallerApp {
        self.0.entra.callers.add_app(roles)
    }

    /// Claims of a caller token for `who` in `tenant` (1.0 or 2.0 format),
    /// valid for an hour; tests change them before [`Self::sign_caller_token`].
    pub fn caller_claims(
        &self,
        tenant: &str,
        who: &entra::TokenSubject,
        version: u8,
    ) -> serde_json::Value {
        entra::caller_claims(&self.0.entra, tenant, who, version)
    }

    /// Signs `claims` with the published signing key (RS256).
    pub fn sign_caller_token(&self, claims: &serde_json::Value) -> String {
        self.0.entra.callers.current_key().sign(claims)
    }

    /// A user token for the proxy's API in the home tenant: the test-only
    /// stand-in for a user signing in to a client app.
    pub fn mint_user_token(&self, oid: &str, scopes: &[&str]) -> String {
        let who = entra::TokenSubject::User {
            oid: oid.to_owned(),
            client_id: "0c4e1f2a-3b5d-4e6f-8a9b-1c2d3e4f5a6b".to_owned(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        };
        let version = self.0.entra.callers.token_version();
        self.sign_caller_token(&self.caller_claims(&self.0.tenant_id, &who, version))
    }

    /// The signing key's public half as PEM.
    pub fn caller_public_key_pem(&self) -> String {
        self.0.entra.callers.current_key().public_pem.clone()
    }

    /// Publishes a new signing key and signs caller tokens with it from now on.
    pub fn rotate_caller_keys(&self) {
        self.0.entra.callers.rotate();
    }

    /// The token format of caller tokens: 1 or 2 (the default).
    pub fn set_caller_token_version(&self, version: u8) {
        self.0.entra.callers.set_token_version(version);
    }

    /// Requests for the OpenID discovery documents and the keys.
    pub fn key_requests(&self) -> u64 {
        self.0.entra.callers.key_requests.load(Ordering::SeqCst)
    }
}
