//! `dataverse-proxy check`: the configuration, then for every org and lane
//! a token from its credential and `WhoAmI` with it, explaining what fails.

use std::process::ExitCode;

use crate::config::{Config, CredentialConfig, CredentialKind, ManagedIdentity, OrgConfig};
use crate::token::{Target, TokenProvider};

/// What a credential is, in words (for `check`).
fn describe(c: &CredentialConfig) -> String {
    match &c.kind {
        CredentialKind::Secret(_) => "client secret".to_owned(),
        CredentialKind::Certificate {
            path, algorithm, ..
        } => {
            format!("certificate {} ({algorithm:?} assertion)", path.display())
        }
        CredentialKind::Federated { token_file } => {
            format!("federated token file {}", token_file.display())
        }
        CredentialKind::ManagedIdentity(ManagedIdentity::Imds { endpoint }) => {
            format!("managed identity via IMDS {endpoint}")
        }
        CredentialKind::ManagedIdentity(ManagedIdentity::AppService { endpoint, .. }) => {
            format!("managed identity via App Service {endpoint}")
        }
    }
}

pub(super) fn provider_for(
    config: &Config,
    org: &OrgConfig,
    credential: &std::sync::Arc<crate::config::CredentialConfig>,
) -> Result<TokenProvider, String> {
    let tls = crate::upstream::tls::client_config(config.upstream.ca_file.as_deref())
        .map_err(|e| e.to_string())?;
    TokenProvider::new(
        credential.clone(),
        Target {
            scope: org.scope.clone(),
            resource: org.origin(),
        },
        config.token.clone(),
        crate::token::new_cache(),
        tls,
    )
    .map_err(|e| e.to_string())
}

pub(super) async fn check(config: &Config) -> ExitCode {
    let _log = crate::logging::init(config.log.format);
    println!(
        "configuration: ok ({} org{})",
        config.orgs.len(),
        if config.orgs.len() == 1 { "" } else { "s" }
    );
    println!("callers:");
    for line in config.access.summary() {
        println!("  {line}");
    }
    let http = match reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(config.upstream.response_timeout)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            println!("cannot build the HTTP client: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut all_ok = true;
    for org in &config.orgs {
        all_ok &= check_org(config, org, &http).await;
    }
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn check_org(config: &Config, org: &OrgConfig, http: &reqwest::Client) -> bool {
    println!(
        "\norg {}{}",
        org.name,
        if org.default { " (default)" } else { "" }
    );
    println!("  url:         {}", org.origin());
    println!("  scope:       {}", org.scope);
    let mut all_ok = true;
    for credential in &org.lanes {
        if org.lanes.len() > 1 {
            println!("  lane {}", credential.name);
        }
        all_ok &= check_lane(config, org, credential, http).await;
    }
    all_ok
}

/// One lane: its credential gets a token, and Dataverse accepts it.
async fn check_lane(
    config: &Config,
    org: &OrgConfig,
    c: &std::sync::Arc<crate::config::CredentialConfig>,
    http: &reqwest::Client,
) -> bool {
    println!("  credential:  {} ({})", c.name, describe(c));
    if let Some(url) = &c.token_url {
        println!("  token URL:   {url}");
    }
    if let Some(id) = &c.client_id {
        println!("  client id:   {id}");
    }
    let provider = match provider_for(config, org, c) {
        Ok(p) => p,
        Err(e) => {
            println!("  token: cannot build the HTTP client: {e}");
            return false;
        }
    };
    let token = match provider.fetch_uncached().await {
        Ok(t) => {
            println!("  token: ok (lifetime {} s)", t.lifetime.as_secs());
            t
        }
        Err(e) => {
            println!("  token: FAILED: {e}");
            if let Some(advice) = e.advice() {
                println!("    what to do: {advice}");
            }
            return false;
        }
    };
    let url = format!("{}/api/data/v9.2/WhoAmI", org.origin());
    let resp = http
        .get(&url)
        .header(reqwest::header::AUTHORIZATION, token.header())
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await;
    match resp {
        Ok(r) if r.status().is_success() => {
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            println!("  WhoAmI: ok");
            for key in ["OrganizationId", "UserId", "BusinessUnitId"] {
                println!("    {key}: {}", body[key].as_str().unwrap_or("?"));
            }
            true
        }
        Ok(r) => {
            let status = r.status();
            println!("  WhoAmI: FAILED with HTTP {status}");
            if status == reqwest::StatusCode::UNAUTHORIZED
                || status == reqwest::StatusCode::FORBIDDEN
            {
                println!(
                    "    what to do: Entra ID issued a token but Dataverse refused it. Add the app as an application user \
                     of this environment (Power Platform admin center > Environments > Settings > Users + permissions > \
                     Application users) with a security role, and check that the org URL is this environment's."
                );
            }
            false
        }
        Err(e) => {
            println!(
                "  WhoAmI: FAILED, Dataverse unreachable: {}",
                e.without_url()
            );
            false
        }
    }
}
