//! A `redis-server` of the test's own, on an ephemeral loopback port, with
//! nothing on disk; stopped and started again on the same port for the
//! outage tests. The machine's own Redis is never used.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: std::path::PathBuf,
    /// TLS only (`--tls-port`), with these certificate files.
    tls: Option<Tls>,
    /// More arguments (a cluster node's).
    extra: Vec<String>,
}

/// A TLS listener's files: the server's certificate and key.
#[derive(Clone)]
pub struct Tls {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

impl RedisServer {
    /// Starts one; fails the test with the fix when `redis-server` is missing.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// One that speaks only TLS, with `tls`'s certificate.
    pub async fn start_tls(tls: Tls) -> Self {
        Self::start_with(Some(tls)).await
    }

    async fn start_with(tls: Option<Tls>) -> Self {
        Self::start_args(tls, Vec::new()).await
    }

    async fn start_args(tls: Option<Tls>, extra: Vec<String>) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let dir = std::env::temp_dir().join(format!("dvp-redis-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let mut server = Self {
            child: None,
            port,
            dir,
            tls,
            extra,
        };
        server.launch().await;
        server
    }

    /// `redis://127.0.0.1:PORT` (`rediss://localhost:PORT` over TLS).
    pub fn url(&self) -> String {
        match self.tls {
            None => format!("redis://127.0.0.1:{}", self.port),
            Some(_) => format!("rediss://localhost:{}", self.port),
        }
    }

    async fn launch(&mut self) {
        let mut command = Command::new("redis-server");
        match &self.tls {
            None => command.args(["--port", &self.port.to_string()]),
            Some(tls) => command
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(&tls.cert)
                .arg("--tls-key-file")
                .arg(&tls.key)
                .args(["--tls-auth-clients", "no"]),
        };
        let child = command
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}): the shared-governor tests need it; \
                     install Debian's redis-server package (bash tests/run.sh does where it is missing)"
                )
            });
        self.child = Some(child);
        for _ in 0..200 {
            if self.answers().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("redis-server on port {} never answered PING", self.port);
    }

    /// PING answered (over TLS: the port accepts connections).
    async fn answers(&self) -> bool {
        if self.tls.is_some() {
            return tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok();
        }
        self.ping().await
    }

    async fn ping(&self) -> bool {
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else {
            return false;
        };
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").await.is_ok()
            && s.read_exact(&mut buf).await.is_ok()
            && &buf == b"+PONG\r\n"
    }

    /// Sends one command and returns its answer as sent (plain connections
    /// only): `FLUSHALL` stands for a node that answers without the state
    /// it had.
    pub async fn command(&self, words: &[&str]) -> String {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .expect("connect to redis-server");
        let mut request = format!("*{}\r\n", words.len());
        for w in words {
            request.push_str(&format!("${}\r\n{w}\r\n", w.len()));
        }
        s.write_all(request.as_bytes()).await.expect("send");
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.expect("answer");
        let answer = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(
            !answer.starts_with('-'),
            "redis-server refused {words:?}: {answer}"
        );
        answer
    }

    /// Kills the server (its state is gone, as after a restart without persistence).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) {
        self.stop();
        self.launch().await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of three masters (no replicas) on ephemeral ports,
/// made with `redis-cli --cluster create`, as Azure Managed Redis's OSS
/// cluster policy presents itself.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    security: Option<ClusterSecurity>,
}

/// A cluster's TLS files (its nodes' certificate, and the CA for
/// `redis-cli`) and the ACL user it requires.
pub struct ClusterSecurity {
    pub tls: Tls,
    pub ca_file: std::path::PathBuf,
    pub user: (String, String),
}

impl RedisCluster {
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// Three masters over TLS only (the cluster bus too), refusing every
    /// connection but `security.user`'s.
    pub async fn start_secure(security: ClusterSecurity) -> Self {
        Self::start_with(Some(security)).await
    }

    async fn start_with(security: Option<ClusterSecurity>) -> Self {
        let mut args: Vec<String> = ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]
            .map(str::to_owned)
            .to_vec();
        let tls = security.as_ref().map(|s| s.tls.clone());
        if let Some(s) = &security {
            let (name, password) = &s.user;
            args.extend(["--tls-cluster".to_owned(), "yes".to_owned()]);
            args.push("--tls-ca-cert-file".to_owned());
            args.push(s.ca_file.display().to_string());
            // One directive, its words as separate arguments.
            let acl = format!("--user {name} on >{password} ~* &* +@all --user default off");
            args.extend(acl.split(' ').map(str::to_owned));
        }
        let mut nodes = Vec::new();
        for _ in 0..3 {
            // The bus port defaults to the port + 10000, past 65535 for an
            // ephemeral port above 55535: each node gets one of its own.
            let bus = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("a free port");
            let mut node_args = args.clone();
            node_args.extend(["--cluster-port".to_owned(), bus.to_string()]);
            nodes.push(RedisServer::start_args(tls.clone(), node_args).await);
        }
        let cluster = Self { nodes, security };
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = cluster
            .cli()
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli (Debian's redis-tools, with redis-server)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        for _ in 0..200 {
            if cluster.state_ok() {
                return cluster;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the cluster never reached cluster_state:ok");
    }

    /// `redis-cli` with the cluster's TLS and user.
    fn cli(&self) -> Command {
        let mut c = Command::new("redis-cli");
        if let Some(s) = &self.security {
            c.arg("--tls").arg("--cacert").arg(&s.ca_file);
            c.args([
                "--user",
                &s.user.0,
                "--pass",
                &s.user.1,
                "--no-auth-warning",
            ]);
        }
        c
    }

    fn state_ok(&self) -> bool {
        self.nodes.iter().all(|n| {
            self.cli()
                .args(["-p", &n.port.to_string(), "cluster", "info"])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
        })
    }

    /// One node's URL (with the user, over TLS, for a secure cluster):
    /// the proxy finds the others itself.
    pub fn url(&self) -> String {
        match &self.security {
            None => self.nodes[0].url(),
            Some(s) => format!(
                "rediss://{}:{}@127.0.0.1:{}",
                s.user.0, s.user.1, self.nodes[0].port
            ),
        }
    }
}
