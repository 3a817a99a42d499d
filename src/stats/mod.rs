//! What the proxy records about itself as requests pass: the metrics
//! registry and the handles each request records into ([`metrics`]), and
//! the status page's recent requests and errors ([`board`], [`activity`]).
//! Data only: the admin listener reads it together with the application's
//! state.

pub mod activity;
pub mod board;
pub mod metrics;
