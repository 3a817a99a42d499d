//! The command line: `serve` (default), `demo`, `sim`, `check` and `token`.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, EXIT_CONFIG, LogFormat, Sources};
use dataverse_sim::{Sim, SimConfig};

mod check;

/// Authenticating reverse proxy for Microsoft Dataverse.
#[derive(Debug, Parser)]
#[command(name = "dataverse-proxy", version, about, long_about = None)]
pub struct Cli {
    /// Config file (TOML); default: ./config.toml when it exists.
    #[arg(
        long,
        global = true,
        env = "DATAVERSE_PROXY_CONFIG",
        value_name = "PATH"
    )]
    pub config: Option<PathBuf>,
    /// Proxy listen address (default 127.0.0.1:8080).
    #[arg(long, global = true, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Admin listen address for /livez, /readyz, /metrics and the status page (default 127.0.0.1:9090).
    #[arg(long, global = true, value_name = "ADDR")]
    pub admin_listen: Option<String>,
    /// Dataverse org URL, e.g. https://contoso.crm.dynamics.com.
    #[arg(long, global = true, value_name = "URL")]
    pub org_url: Option<String>,
    /// The proxy's URL as callers see it.
    #[arg(long, global = true, value_name = "URL")]
    pub public_url: Option<String>,
    /// Log format: text or json.
    #[arg(long, global = true, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// What to do (default: serve).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the proxy from configuration (the default).
    Serve,
    /// Start the built-in Entra ID + Dataverse simulator and the proxy in front of it.
    Demo {
        /// Serve the proxy over TLS with a certificate made for this run
        /// (its CA is written to a file the banner names).
        #[arg(long)]
        tls: bool,
    },
    /// Run only the simulator, printing the environment that points a proxy at it.
    Sim {
        /// Entra ID listen address.
        #[arg(long, default_value = "127.0.0.1:0")]
        entra_listen: String,
        /// Dataverse listen address.
        #[arg(long, default_value = "127.0.0.1:0")]
        dataverse_listen: String,
        /// Client secret the simulated app accepts (default: random).
        #[arg(long)]
        client_secret: Option<String>,
    },
    /// Validate config, fetch a token, call WhoAmI and print the ids.
    Check,
    /// Print a fresh access token to stdout (for debugging).
    Token {
        /// The org whose token to print (default: the default org).
        #[arg(long)]
        org: Option<String>,
    },
}

impl Cli {
    fn sources(&self, env: HashMap<String, String>) -> Sources {
        let mut flags = Vec::new();
        for (flag, value) in [
            ("--listen", &self.listen),
            ("--admin-listen", &self.admin_listen),
            ("--org-url", &self.org_url),
            ("--public-url", &self.public_url),
            ("--log-format", &self.log_format),
        ] {
            if let Some(v) = value {
                flags.push((flag, v.clone()));
            }
        }
        Sources {
            file: self.config.clone(),
            default_file: true,
            env,
            flags,
            overrides: Vec::new(),
            inline_toml: None,
        }
    }
}

/// The sources with the file found at start named explicitly: a reload
/// reads that file again, and refuses when it is gone, instead of falling
/// back to defaults because `./config.toml` disappeared.
fn pinned(mut sources: crate::config::Sources) -> crate::config::Sources {
    if sources.file.is_none() && sources.default_file {
        let default = std::path::Path::new("config.toml");
        if default.is_file() {
            sources.file =
                Some(std::fs::canonicalize(default).unwrap_or_else(|_| default.to_owned()));
        }
        sources.default_file = false;
    }
    sources
}

/// Runs the command line; `env` is the process environment.
pub async fn run(cli: Cli, env: HashMap<String, String>) -> ExitCode {
    crate::install_crypto_provider();
    let sources = cli.sources(env);
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => match load(&sources) {
            Ok(config) => serve(config, sources).await,
            Err(code) => code,
        },
        Command::Demo { tls } => demo(sources, tls).await,
        Command::Sim {
            entra_listen,
            dataverse_listen,
            client_secret,
        } => sim(&entra_listen, &dataverse_listen, client_secret).await,
        Command::Check => match load(&sources) {
            Ok(config) => check::check(&config).await,
            Err(code) => code,
        },
        Command::Token { org } => match load(&sources) {
            Ok(config) => token(&config, org.as_deref()).await,
            Err(code) => code,
        },
    }
}

fn load(sources: &Sources) -> Result<Config, ExitCode> {
    Config::load(sources).map_err(|e| {
        eprint!("dataverse-proxy: {e}");
        ExitCode::from(EXIT_CONFIG as u8)
    })
}

/// Cancels `shutdown` on the first SIGINT or SIGTERM, and `abort` on the
/// second (the drain ends at once).
async fn shutdown_signals(shutdown: CancellationToken, abort: CancellationToken) {
    stop_signal().await;
    tracing::info!("shutdown signal received, draining (a second signal ends the drain at once)");
    shutdown.cancel();
    stop_signal().await;
    tracing::warn!("second shutdown signal: ending the drain now");
    abort.cancel();
}

/// Resolves on SIGINT or SIGTERM.
async fn stop_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            let _ = ctrl_c.await;
            return;
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Cancels `token` on the first SIGINT or SIGTERM (the demo and the
/// simulator, which have no drain).
async fn shutdown_signal(token: CancellationToken) {
    stop_signal().await;
    tracing::info!("shutdown signal received");
    token.cancel();
}

/// Notifies `reload` on every SIGHUP.
async fn reload_signal(reload: std::sync::Arc<tokio::sync::Notify>) {
    #[cfg(unix)]
    {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hup.recv().await.is_some() {
            reload.notify_one();
        }
    }
    #[cfg(not(unix))]
    let _ = reload;
}

async fn bind(config: &Config) -> Result<(TcpListener, TcpListener), ExitCode> {
    let proxy = TcpListener::bind(config.listen).await;
    let admin = TcpListener::bind(config.admin_listen).await;
    match (proxy, admin) {
        (Ok(p), Ok(a)) => Ok((p, a)),
        (Err(e), _) => {
            eprintln!(
                "dataverse-proxy: cannot listen on {} (`listen`): {e}",
                config.listen
            );
            Err(ExitCode::FAILURE)
        }
        (_, Err(e)) => {
            eprintln!(
                "dataverse-proxy: cannot listen on {} (`admin_listen`): {e}",
                config.admin_listen
            );
            Err(ExitCode::FAILURE)
        }
    }
}

async fn serve(config: Config, sources: Sources) -> ExitCode {
    let _log = crate::logging::init(config.log.format);
    let (proxy, admin) = match bind(&config).await {
        Ok(l) => l,
        Err(code) => return code,
    };
    let orgs: Vec<String> = config
        .orgs
        .iter()
        .map(|o| format!("{}={}", o.name, o.origin()))
        .collect();
    tracing::info!(
        listen = %config.listen,
        admin_listen = %config.admin_listen,
        orgs = %orgs.join(","),
        "dataverse-proxy listening"
    );
    let control = crate::Control {
        sources: Some(pinned(sources)),
        ..crate::Control::default()
    };
    tokio::spawn(shutdown_signals(
        control.shutdown.clone(),
        control.abort.clone(),
    ));
    tokio::spawn(reload_signal(control.reload.clone()));
    let result = crate::serve_with(config, proxy, admin, control).await;
    crate::telemetry::shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "server failed");
            ExitCode::FAILURE
        }
    }
}

async fn demo(mut sources: Sources, tls: bool) -> ExitCode {
    // The proxy's app exposes the API its callers' tokens are for, as the
    // on-behalf-of exchange needs (docs/azure-setup.md).
    let defaults = SimConfig::default();
    let sim_config = SimConfig {
        api_client_id: defaults.client_id.clone(),
        ..defaults
    };
    let sim = match Sim::start(sim_config).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("dataverse-proxy demo: cannot start the simulator: {e}");
            return ExitCode::FAILURE;
        }
    };
    let h = &sim.handle;
    // The demo ignores config files and credentials from the environment:
    // it always fronts its own simulator.
    sources.file = None;
    sources.default_file = false;
    sources.env.retain(|k, _| {
        matches!(
            k.as_str(),
            "DATAVERSE_PROXY_LISTEN"
                | "DATAVERSE_PROXY_ADMIN_LISTEN"
                | "DATAVERSE_PROXY_PUBLIC_URL"
                | "DATAVERSE_PROXY_LOG_FORMAT"
        )
    });
    sources.overrides = h.proxy_overrides();
    let tls = match tls.then(demo_tls).transpose() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("dataverse-proxy demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(t) = &tls {
        sources
            .overrides
            .push(("tls.cert_file", t.cert_file.display().to_string()));
        sources
            .overrides
            .push(("tls.key_file", t.key_file.display().to_string()));
    }
    sources.inline_toml = Some(demo_callers(h));
    // A signed-in user of the org, and a token of theirs for the proxy's API.
    let user = uuid::Uuid::new_v4();
    h.add_user(user);
    let user_token = h.mint_user_token(&user.to_string(), &["user_impersonation"]);
    let delegated_token = h.mint_user_token(&user.to_string(), &["Dataverse.Delegated"]);
    let config = match load(&sources) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let _log = crate::logging::init(config.log.format);
    let (proxy, admin) = match bind(&config).await {
        Ok(l) => l,
        Err(code) => return code,
    };
    let local = |l: &TcpListener, fallback| l.local_addr().unwrap_or(fallback);
    let scheme = if tls.is_some() { "https" } else { "http" };
    let p = format!("{scheme}://{}", local(&proxy, config.listen));
    let a = format!("http://{}", local(&admin, config.admin_listen));
    let tokens = (user_token.as_str(), delegated_token.as_str());
    let mut banner = demo_banner((&p, &a), (h.entra_url(), h.org_url()), tokens);
    if let Some(t) = &tls {
        banner = format!("{}\n{banner}", trust_lines(&t.ca_file));
    }
    // A closed stdout (e.g. piped into `head`) must not stop the demo.
    let _ = writeln!(std::io::stdout().lock(), "{banner}");
    let shutdown = CancellationToken::new();
    tokio::spawn(shutdown_signal(shutdown.clone()));
    // The demo stops at Ctrl-C at once: nothing routes to it to drain.
    let control = crate::Control {
        abort: shutdown.child_token(),
        shutdown,
        ..crate::Control::default()
    };
    let result = crate::serve_with(config, proxy, admin, control).await;
    sim.shutdown();
    if let Some(dir) = tls.as_ref().and_then(|t| t.ca_file.parent()) {
        let _ = std::fs::remove_dir_all(dir);
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dataverse-proxy demo: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The demo's TLS files, in a directory of the system's temporary one.
fn demo_tls() -> Result<dataverse_sim::demo_tls::DemoTls, String> {
    let dir = std::env::temp_dir().join(format!("dataverse-proxy-demo-{}", std::process::id()));
    dataverse_sim::demo_tls::make(&dir)
}

/// How clients trust the demo's CA.
fn trust_lines(ca: &std::path::Path) -> String {
    let ca = ca.display();
    format!(
        "TLS: the proxy's certificate is signed by a CA made for this run. Trust it with:\n\
         \x20 export CURL_CA_BUNDLE={ca}        # curl\n\
         \x20 export REQUESTS_CA_BUNDLE={ca}    # Python (requests, Microsoft's Dataverse SDK)\n\
         \x20 export NODE_EXTRA_CA_CERTS={ca}   # Node.js (DynamicsWebApi)\n"
    )
}

/// What the demo prints: where everything listens and curl lines to try.
fn demo_banner(
    (p, a): (&str, &str),
    (entra, org): (&str, &str),
    (user_token, delegated_token): (&str, &str),
) -> String {
    format!(
        "dataverse-proxy demo\n\
         \x20 simulated Entra ID:  {entra}\n\
         \x20 simulated Dataverse: {org}\n\
         \x20 proxy:               {p}   (admin: {a})\n\n\
         Try (no credentials needed: the proxy fetches and injects the token):\n\
         \x20 curl '{p}/api/data/v9.2/WhoAmI'\n\
         \x20 curl '{p}/api/data/v9.2/leads?$select=subject'\n\
         \x20 curl -H 'Prefer: odata.maxpagesize=5' '{p}/api/data/v9.2/accounts?$select=name,address1_city'\n\
         \x20 curl \"{p}/api/data/v9.2/contacts?\\$select=fullname&\\$filter=jobtitle%20eq%20'CFO'\"\n\
         \x20 curl -i -X POST -H 'Content-Type: application/json' -d '{{\"name\":\"Demo Ltd\"}}' '{p}/api/data/v9.2/accounts'\n\
         \x20 curl '{a}/readyz'\n\
         \x20 status page: {a}/\n\n\
         Act as a signed-in user (a caller token minted by the simulated Entra ID, valid\n\
         for an hour; Dataverse then applies that user's roles, and WhoAmI answers them):\n\
         \x20 curl -H 'Authorization: Bearer {user_token}' '{p}/api/data/v9.2/WhoAmI'\n\n\
         Act as the user with the user's own token (on-behalf-of: the proxy exchanges\n\
         the caller token with Entra ID, and Dataverse counts the user's own budget):\n\
         \x20 curl -H 'Authorization: Bearer {delegated_token}' '{p}/api/data/v9.2/WhoAmI'\n\n\
         Press Ctrl-C to stop.",
    )
}

/// The demo's callers: Entra ID user tokens for the simulated proxy API act
/// as their user (with the scope `Dataverse.Delegated`, with the user's own
/// token); anything else from loopback needs no credential.
fn demo_callers(h: &dataverse_sim::SimHandle) -> String {
    let cfg = h.config();
    format!(
        "[caller_tokens]\naudiences = [\"{}\", \"{}\"]\ntenants = [\"{}\"]\nauthority_host = \"{}\"\n\n\
         [[callers]]\nname = \"delegated-users\"\ntoken = {{ scopes = [\"Dataverse.Delegated\"] }}\nimpersonate = \"delegated\"\n\n\
         [[callers]]\nname = \"signed-in-users\"\ntoken = {{ scopes = [\"user_impersonation\"] }}\nimpersonate = \"caller\"\n\n\
         [[callers]]\nname = \"local\"\ncidrs = [\"127.0.0.0/8\", \"::1/128\"]\n\n\
         [access]\nrequire_credential = false\n",
        cfg.api_app_id_uri,
        cfg.api_client_id,
        cfg.tenant_id,
        h.entra_url(),
    )
}

async fn sim(entra: &str, dataverse: &str, client_secret: Option<String>) -> ExitCode {
    let _log = crate::logging::init(LogFormat::Text);
    let mut cfg = SimConfig::default();
    if let Some(s) = client_secret {
        cfg.client_secret = s;
    }
    let listeners = (
        TcpListener::bind(entra).await,
        TcpListener::bind(dataverse).await,
    );
    let (entra, dataverse) = match listeners {
        (Ok(e), Ok(d)) => (e, d),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("dataverse-proxy sim: cannot listen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let sim = match Sim::start_on(cfg, entra, dataverse) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("dataverse-proxy sim: {e}");
            return ExitCode::FAILURE;
        }
    };
    let h = &sim.handle;
    println!(
        "# simulator running; point a proxy at it with:\n\
         export DATAVERSE_URL={}\n\
         export AZURE_TENANT_ID={}\n\
         export AZURE_CLIENT_ID={}\n\
         export AZURE_CLIENT_SECRET={}\n\
         export DATAVERSE_PROXY_TOKEN_URL={}",
        h.org_url(),
        h.config().tenant_id,
        h.config().client_id,
        h.config().client_secret,
        h.token_url()
    );
    let stop = CancellationToken::new();
    shutdown_signal(stop.clone()).await;
    sim.shutdown();
    ExitCode::SUCCESS
}

async fn token(config: &Config, name: Option<&str>) -> ExitCode {
    let _log = crate::logging::init(config.log.format);
    let org = match name {
        Some(n) => config.orgs.iter().find(|o| o.name == n),
        None => config
            .orgs
            .iter()
            .find(|o| o.default)
            .or(config.orgs.first()),
    };
    let Some(org) = org else {
        eprintln!(
            "dataverse-proxy token: no org named {:?}",
            name.unwrap_or("")
        );
        return ExitCode::from(EXIT_CONFIG as u8);
    };
    let provider = match check::provider_for(config, org, &org.credential) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("dataverse-proxy token: {e}");
            return ExitCode::FAILURE;
        }
    };
    match provider.fetch_uncached().await {
        Ok(t) => {
            println!("{}", t.expose());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dataverse-proxy token: {e}");
            if let Some(advice) = e.advice() {
                eprintln!("  what to do: {advice}");
            }
            ExitCode::FAILURE
        }
    }
}
