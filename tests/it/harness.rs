//! Test support: a simulator plus a proxy in front of it.

use std::time::Duration;

use dataverse_proxy::config::{Config, Sources};
use dataverse_sim::{Sim, SimConfig, SimHandle};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A running simulator and proxy.
pub struct Harness {
    pub sim: SimHandle,
    sim_server: Sim,
    /// `http://127.0.0.1:PORT` of the proxy.
    pub proxy: String,
    /// `http://127.0.0.1:PORT` of the admin listener.
    pub admin: String,
    /// A client with redirects off and no proxy from the environment.
    pub client: reqwest::Client,
    shutdown: CancellationToken,
    server: JoinHandle<std::io::Result<()>>,
    /// The config file, when the test gave one (a reload reads it again).
    pub config_file: Option<std::path::PathBuf>,
}

/// How to set up a harness.
pub struct Setup {
    pub sim: SimConfig,
    /// Extra config overrides as `(key, value)`.
    pub overrides: Vec<(&'static str, String)>,
    /// Use this org URL instead of the simulator's (the scope still names the simulator's org).
    pub org_url: Option<String>,
    /// Runs on the simulator before the proxy starts (faults for cold starts).
    pub prepare: Option<fn(&SimHandle)>,
    /// A whole config file instead of the simulator overrides.
    pub toml: Option<String>,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            sim: SimConfig::default(),
            overrides: vec![
                ("token.min_backoff", "100ms".to_owned()),
                ("token.max_backoff", "400ms".to_owned()),
            ],
            org_url: None,
            prepare: None,
            toml: None,
        }
    }
}

impl Setup {
    pub fn lifetime(mut self, lifetime: Duration) -> Self {
        self.sim.token_lifetime = lifetime;
        self
    }

    pub fn prepare(mut self, f: fn(&SimHandle)) -> Self {
        self.prepare = Some(f);
        self
    }

    /// Uses a whole config file (with the simulator's URLs filled in by the test).
    pub fn toml(mut self, toml: String) -> Self {
        self.toml = Some(toml);
        self
    }

    pub fn set(mut self, key: &'static str, value: &str) -> Self {
        self.overrides.push((key, value.to_owned()));
        self
    }
}

/// The config overrides that point a proxy at `sim`.
pub fn sim_overrides(sim: &SimHandle) -> Vec<(&'static str, String)> {
    sim.proxy_overrides()
}

/// A proxy serving `config` on ephemeral ports: its URL, its admin URL,
/// its stop switch and its task.
pub async fn spawn_proxy(
    config: Config,
) -> (
    String,
    String,
    CancellationToken,
    JoinHandle<std::io::Result<()>>,
) {
    spawn_proxy_with(config, None).await
}

/// [`spawn_proxy`], reloading from `sources` (SIGHUP, `POST /reload`).
pub async fn spawn_proxy_with(
    config: Config,
    sources: Option<Sources>,
) -> (
    String,
    String,
    CancellationToken,
    JoinHandle<std::io::Result<()>>,
) {
    let proxy = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let proxy_url = format!("http://{}", proxy.local_addr().expect("addr"));
    let admin_url = format!("http://{}", admin.local_addr().expect("addr"));
    let shutdown = CancellationToken::new();
    let control = dataverse_proxy::Control {
        shutdown: shutdown.clone(),
        // Tests stop at once: no readiness delay, no drain.
        abort: shutdown.child_token(),
        sources,
        ..dataverse_proxy::Control::default()
    };
    let server = tokio::spawn(dataverse_proxy::serve_with(config, proxy, admin, control));
    (proxy_url, admin_url, shutdown, server)
}

/// Waits until the proxy behind `admin` holds a token (`/readyz`).
pub async fn wait_ready(client: &reqwest::Client, admin: &str) {
    for _ in 0..200 {
        if let Ok(r) = client.get(format!("{admin}/readyz")).send().await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("proxy never became ready");
}

pub fn client() -> reqwest::Client {
    dataverse_proxy::install_crypto_provider();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .expect("client")
}

impl Harness {
    pub async fn start() -> Self {
        Self::with(Setup::default()).await
    }

    pub async fn with(setup: Setup) -> Self {
        let sim_server = Sim::start(setup.sim.clone()).await.expect("simulator");
        Self::on(sim_server, setup).await
    }

    /// Starts a proxy in front of a simulator the test set up itself.
    pub async fn on(sim_server: Sim, setup: Setup) -> Self {
        let sim = sim_server.handle.clone();
        if let Some(prepare) = setup.prepare {
            prepare(&sim);
        }
        let mut overrides = Vec::new();
        let mut file = None;
        match setup.toml {
            Some(toml) => {
                let dir = std::env::temp_dir().join(format!("dvp-it-{}", uuid::Uuid::new_v4()));
                std::fs::create_dir_all(&dir).expect("mkdir");
                let path = dir.join("config.toml");
                std::fs::write(&path, toml).expect("write config");
                file = Some(path);
            }
            None => overrides = sim_overrides(&sim),
        }
        if let Some(url) = setup.org_url {
            overrides.push(("org.scope", format!("{}/.default", sim.org_url())));
            overrides.push(("org.url", url));
        }
        overrides.extend(setup.overrides);
        let sources = Sources {
            file: file.clone(),
            overrides,
            ..Sources::default()
        };
        let config = Config::load(&sources).expect("test config is valid");
        let (proxy, admin, shutdown, server) = spawn_proxy_with(config, Some(sources)).await;
        Self {
            sim,
            sim_server,
            proxy,
            admin,
            client: client(),
            shutdown,
            server,
            config_file: file,
        }
    }

    /// Starts a proxy in front of `sim` whose config file is `top`
    /// (top-level keys, which TOML needs before the first table), the
    /// simulator's `[org]`, then `extra`; the simulator's credential and
    /// `overrides` come as overrides. Does not wait for readiness.
    pub async fn with_file(
        sim: Sim,
        top: &str,
        extra: &str,
        overrides: &[(&'static str, String)],
    ) -> Self {
        let mut toml = format!("{top}\n[org]\n");
        for (k, v) in sim_overrides(&sim.handle) {
            if let Some(key) = k.strip_prefix("org.") {
                toml.push_str(&format!("{key} = \"{v}\"\n"));
            }
        }
        toml.push_str(extra);
        let mut setup = Setup::default().toml(toml);
        setup.overrides.extend(
            sim_overrides(&sim.handle)
                .into_iter()
                .filter(|(k, _)| k.starts_with("credential.")),
        );
        setup.overrides.extend(overrides.iter().cloned());
        Self::on(sim, setup).await
    }

    /// A bearer token for the simulated org, fetched as the proxy does, for
    /// requests straight to Dataverse (to compare with the proxy's answer).
    pub async fn sim_token(&self) -> String {
        let cfg = self.sim.config();
        let scope = format!("{}/.default", self.sim.org_url());
        let form = [
            ("grant_type", "client_credentials"),
            ("client_id", cfg.client_id.as_str()),
            ("client_secret", cfg.client_secret.as_str()),
            ("scope", scope.as_str()),
        ];
        let resp = self
            .client
            .post(self.sim.token_url())
            .form(&form)
            .send()
            .await
            .expect("token");
        let body: serde_json::Value = resp.json().await.expect("token json");
        body["access_token"]
            .as_str()
            .expect("access_token")
            .to_owned()
    }

    /// URL of a Web API path through the proxy, e.g. `url("/leads")`.
    pub fn url(&self, api_path: &str) -> String {
        format!("{}/api/data/v9.2{api_path}", self.proxy)
    }

    pub async fn get(&self, api_path: &str) -> reqwest::Response {
        self.client
            .get(self.url(api_path))
            .send()
            .await
            .expect("request")
    }

    /// `GET` of a Web API path with extra request headers.
    pub async fn get_with(&self, api_path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut req = self.client.get(self.url(api_path));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        req.send().await.expect("request")
    }

    /// A request with `method` to a Web API path, extra headers and an
    /// optional JSON body.
    pub async fn send(
        &self,
        method: reqwest::Method,
        api_path: &str,
        headers: &[(&str, &str)],
        json: Option<&serde_json::Value>,
    ) -> reqwest::Response {
        let mut req = self.client.request(method, self.url(api_path));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        if let Some(body) = json {
            req = req.json(body);
        }
        req.send().await.expect("request")
    }

    /// `GET` of an admin listener path (`/readyz`, `/metrics`…).
    pub async fn admin_get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.admin))
            .send()
            .await
            .expect("admin request")
    }

    /// The admin listener's `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.admin_get("/metrics")
            .await
            .text()
            .await
            .expect("metrics text")
    }

    /// Waits until the proxy holds a token (admin /readyz).
    pub async fn wait_ready(&self) {
        wait_ready(&self.client, &self.admin).await;
    }

    /// Stops the proxy and the simulator, re-raising a server panic.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.sim_server.shutdown();
        match tokio::time::timeout(Duration::from_secs(10), self.server).await {
            Ok(Ok(result)) => result.expect("server error"),
            Ok(Err(join)) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            Ok(Err(_)) => {}
            Err(_) => panic!("server did not stop"),
        }
    }
}
