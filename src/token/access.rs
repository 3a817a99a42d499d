//! A token as the proxy holds it: the `Authorization` value (marked
//! sensitive) and when it is refreshed and stops being served.

use std::fmt;
use std::time::Duration;

use axum::http::HeaderValue;
use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;

use super::{TokenError, client, expiry};

/// A cached access token with its schedule.
pub struct AccessToken {
    /// The token itself, for `dataverse-proxy token`.
    token: SecretString,
    /// `Bearer …`, marked sensitive so it never prints in Debug output.
    header: HeaderValue,
    /// When the background task refreshes it.
    pub refresh_at: Instant,
    /// When it stops being served (just before it really expires).
    pub serve_until: Instant,
    /// Lifetime granted by Entra ID.
    pub lifetime: Duration,
}

impl AccessToken {
    pub(super) fn new(resp: client::TokenResponse, now: Instant) -> Result<Self, TokenError> {
        let mut header =
            HeaderValue::try_from(format!("Bearer {}", resp.access_token.expose_secret()))
                .map_err(|_| TokenError::Malformed {
                    status: 200,
                    detail: "access_token contains bytes not allowed in a header".to_owned(),
                })?;
        header.set_sensitive(true);
        Ok(Self {
            refresh_at: now + expiry::refresh_after(resp.expires_in, resp.refresh_in),
            serve_until: now + expiry::serve_for(resp.expires_in),
            lifetime: resp.expires_in,
            header,
            token: resp.access_token,
        })
    }

    /// The `Authorization` header value to inject.
    pub fn header(&self) -> HeaderValue {
        self.header.clone()
    }

    /// The raw token, for the `token` subcommand only.
    pub fn expose(&self) -> &str {
        self.token.expose_secret()
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("token", &"[REDACTED]")
            .field("refresh_at", &self.refresh_at)
            .field("serve_until", &self.serve_until)
            .finish()
    }
}
