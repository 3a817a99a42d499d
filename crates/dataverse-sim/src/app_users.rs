//! Application users and their service-protection limits: each app
//! registration the org knows is an application user of its own, and
//! Dataverse counts its limits per user and web server (docs/dataverse.md,
//! "Service protection limits"). The proxy's lanes are tested against that.

use std::collections::HashMap;

use uuid::Uuid;

use super::{ServiceLimits, SimHandle, lock};

/// An app registration that is an application user of the org.
#[derive(Debug, Clone)]
pub struct AppUser {
    pub client_id: String,
    pub secret: String,
    /// The object id its tokens carry (`oid`): the user Dataverse counts.
    pub oid: String,
}

impl SimHandle {
    /// Registers another application user: an app of the home tenant with a
    /// secret of its own, whose tokens Dataverse accepts as that user.
    pub fn add_application_user(&self) -> AppUser {
        let client_id = Uuid::new_v4().to_string();
        let secret = format!("secret-{}", Uuid::new_v4().simple());
        lock(&self.0.entra.app_users).insert(client_id.clone(), secret.clone());
        AppUser {
            oid: self.application_user_oid(&client_id),
            client_id,
            secret,
        }
    }

    /// The `oid` of tokens the app `client_id` gets for this org.
    pub fn application_user_oid(&self, client_id: &str) -> String {
        let tenant = &self.0.tenant_id;
        Uuid::new_v5(
            &Uuid::NAMESPACE_OID,
            format!("{tenant}/{client_id}").as_bytes(),
        )
        .to_string()
    }

    /// Sets the service-protection limits of every user (default:
    /// Dataverse's own); counts start again.
    pub fn set_service_limits(&self, limits: ServiceLimits) {
        self.0.limiter.set(limits);
    }

    /// Gives one user (by `oid`) limits of its own.
    pub fn set_user_limits(&self, oid: &str, limits: ServiceLimits) {
        self.0.limiter.set_for_user(oid, limits);
    }

    /// The most requests Dataverse ever had in flight at once for one user
    /// on one web server.
    pub fn max_concurrency_seen(&self) -> usize {
        self.0.limiter.max_in_flight()
    }

    /// The same, per user (`oid`).
    pub fn max_concurrency_by_user(&self) -> HashMap<String, usize> {
        self.0.limiter.users_max()
    }

    /// The most requests in flight at once over all users and servers.
    pub fn max_total_concurrency_seen(&self) -> usize {
        self.0.limiter.max_total_in_flight()
    }

    /// Requests in flight now over all users and servers.
    pub fn in_flight_now(&self) -> usize {
        self.0.limiter.total_in_flight()
    }

    /// How many 429s the service-protection limits produced.
    pub fn throttled(&self) -> u64 {
        self.0.limiter.throttled()
    }
}
