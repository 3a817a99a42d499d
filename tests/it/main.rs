//! End-to-end tests: the simulator and the proxy on ephemeral loopback ports,
//! talking HTTP over real sockets. One binary, several modules (a single
//! link step keeps the suite fast).

mod binary;
mod clients;
mod cluster;
mod compression;
mod connections;
mod credentials;
mod delegated;
mod forward;
mod governor;
mod harness;
mod holders;
mod hostile;
mod identity;
mod lanes;
mod links;
mod listener;
mod long_get;
mod metadata;
mod operations;
mod pool;
mod redis;
mod reload;
mod rollout;
mod security;
mod shared;
mod shared_trust;
mod sim;
mod status;
mod streaming;
mod table_policy;
mod token;
mod traces;
mod usage;
