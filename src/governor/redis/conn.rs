//! The connection to Redis: one server through redis's `ConnectionManager`
//! (which reconnects by itself), or a cluster through its cluster client
//! (each script routed to the node of its keys' hash slot; every script's
//! keys share one slot: `prefix:{org}:…`). Which one is configured
//! (`governor.redis_cluster`) or asked of the server at connect.

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use secrecy::{ExposeSecret, SecretString};

/// A connection to one server or to a cluster; cheap to clone.
#[derive(Clone)]
pub(super) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// How to reach Redis.
pub(super) struct Target {
    pub(super) client: redis::Client,
    pub(super) url: SecretString,
    pub(super) root_cert: Option<Vec<u8>>,
    pub(super) cluster: Option<bool>,
    pub(super) timeout: Duration,
}

impl Target {
    /// A connection, within four timeouts: to the cluster when it is one.
    pub(super) async fn connect(&self) -> Option<Conn> {
        let attempt = async {
            let single = self.single().await?;
            let cluster = match self.cluster {
                Some(c) => c,
                None => is_cluster(single.clone()).await,
            };
            if !cluster {
                return Some(Conn::Single(single));
            }
            self.cluster().await.map(Conn::Cluster)
        };
        tokio::time::timeout(self.timeout * 4, attempt)
            .await
            .ok()
            .flatten()
    }

    async fn single(&self) -> Option<ConnectionManager> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        ConnectionManager::new_with_config(self.client.clone(), config)
            .await
            .ok()
    }

    async fn cluster(&self) -> Option<ClusterConnection> {
        let mut builder = redis::cluster::ClusterClientBuilder::new([self.url.expose_secret()])
            .connection_timeout(self.timeout)
            .response_timeout(self.timeout);
        if let Some(root) = &self.root_cert {
            builder = builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root.clone()),
            });
        }
        match builder.build() {
            Ok(client) => client.get_async_connection().await.ok(),
            Err(e) => {
                tracing::warn!(error = ?e.kind(), "cannot build the Redis cluster client");
                None
            }
        }
    }
}

/// Whether the server is a cluster node (`CLUSTER INFO` answers with
/// `cluster_state`; a single server refuses the command).
async fn is_cluster(mut conn: ConnectionManager) -> bool {
    let info: redis::RedisResult<String> = redis::cmd("CLUSTER")
        .arg("INFO")
        .query_async(&mut conn)
        .await;
    info.is_ok_and(|i| i.contains("cluster_state:"))
}
