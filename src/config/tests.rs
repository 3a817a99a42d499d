//! Loading and validation, end to end from sources to `Config`.

use super::*;

pub(super) fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Writes `text` to a fresh temporary config file and loads it with `env`.
pub(super) fn load_toml(
    text: &str,
    env: HashMap<String, String>,
) -> (PathBuf, Result<Config, ConfigError>) {
    let dir = std::env::temp_dir().join(format!("dvp-cfg-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let path = dir.join("c.toml");
    std::fs::write(&path, text).expect("write");
    let result = Config::load(&Sources {
        file: Some(path.clone()),
        env,
        ..Sources::default()
    });
    (path, result)
}

pub(super) fn minimal_env() -> HashMap<String, String> {
    env(&[
        ("DATAVERSE_URL", "https://contoso.crm.dynamics.com"),
        ("AZURE_TENANT_ID", "tenant-1"),
        ("AZURE_CLIENT_ID", "client-1"),
        ("AZURE_CLIENT_SECRET", "s3cr3t-value"),
    ])
}

#[test]
fn env_alone_is_enough() {
    let cfg = Config::load(&Sources {
        env: minimal_env(),
        ..Sources::default()
    })
    .expect("valid");
    let org = &cfg.orgs[0];
    assert_eq!(org.origin(), "https://contoso.crm.dynamics.com");
    assert_eq!(
        org.credential.token_url.as_ref().map(Url::as_str),
        Some("https://login.microsoftonline.com/tenant-1/oauth2/v2.0/token")
    );
    assert_eq!(org.scope, "https://contoso.crm.dynamics.com/.default");
    assert!(org.default);
    assert_eq!(cfg.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(cfg.upstream.response_timeout, Duration::from_secs(300));
    // The secret never shows in Debug output.
    assert!(!format!("{cfg:?}").contains("s3cr3t-value"));
}

#[test]
fn flags_beat_env_and_authority_host_is_used() {
    let mut e = minimal_env();
    e.insert("DATAVERSE_PROXY_LISTEN".into(), "127.0.0.1:1111".into());
    e.insert(
        "AZURE_AUTHORITY_HOST".into(),
        "login.microsoftonline.us".into(),
    );
    let cfg = Config::load(&Sources {
        env: e,
        flags: vec![("--listen", "127.0.0.1:2222".into())],
        ..Sources::default()
    })
    .expect("valid");
    assert_eq!(cfg.listen.port(), 2222);
    assert_eq!(
        cfg.orgs[0].credential.token_url.as_ref().map(Url::as_str),
        Some("https://login.microsoftonline.us/tenant-1/oauth2/v2.0/token")
    );
}

#[test]
fn every_problem_is_reported_with_its_source() {
    let e = env(&[
        ("DATAVERSE_URL", "http://contoso.crm.dynamics.com"),
        ("DATAVERSE_PROXY_LISTEN", "nonsense"),
    ]);
    let err = Config::load(&Sources {
        env: e,
        ..Sources::default()
    })
    .expect_err("invalid");
    let text = err.to_string();
    assert!(text.contains("`org.url` (from $DATAVERSE_URL)"), "{text}");
    assert!(text.contains("https://"), "{text}");
    assert!(
        text.contains("`listen` (from $DATAVERSE_PROXY_LISTEN)"),
        "{text}"
    );
    assert!(text.contains("`credential.tenant_id` (not set)"), "{text}");
    assert!(text.contains("`credential.client_id`"), "{text}");
    assert!(text.contains("`credential.client_secret`"), "{text}");
    assert_eq!(err.problems.len(), 5, "{text}");
}

#[test]
fn unknown_keys_in_the_file_are_rejected() {
    let (path, result) = load_toml(
        "[org]
url = \"https://a.crm.dynamics.com\"
urll = 1
",
        HashMap::new(),
    );
    let err = result.expect_err("unknown key");
    let text = err.to_string();
    assert!(text.contains("unknown key `urll`"), "{text}");
    assert!(text.contains(&path.display().to_string()), "{text}");
}

#[test]
fn a_secret_of_the_wrong_type_is_not_echoed() {
    let (_, result) = load_toml(
        "[credential]
client_secret = 987654321
",
        HashMap::new(),
    );
    let err = result.expect_err("bad type");
    assert!(!err.to_string().contains("987654321"), "{err}");
}

/// Found by the `config_load` fuzz target: TOML syntax errors quoted the
/// offending line, secret and all.
#[test]
fn syntax_and_type_errors_never_quote_the_file() {
    for text in [
        "i=\"\"\"'=\"\"'\n[credential]\nclient_secret = \"hunter2-secret-value\"\n",
        "[credential]\nclient_secret = \"hunter2-secret-value\" x\n",
        "[credential]\nclient_secret = \"hunter2-secret-value\n",
    ] {
        let (_, result) = load_toml(text, HashMap::new());
        let err = result.expect_err("invalid").to_string();
        assert!(!err.contains("hunter2"), "{err}");
        assert!(err.contains("TOML parse error at line"), "{err}");
    }
}

#[test]
fn http_is_loopback_only() {
    let mut e = minimal_env();
    e.insert("DATAVERSE_URL".into(), "http://127.0.0.1:9999".into());
    e.insert(
        "DATAVERSE_PROXY_TOKEN_URL".into(),
        "http://localhost:1/t/oauth2/v2.0/token".into(),
    );
    assert!(
        Config::load(&Sources {
            env: e,
            ..Sources::default()
        })
        .is_ok()
    );
}

#[test]
fn sizes_parse() {
    assert_eq!(parse_size("512"), Some(512));
    assert_eq!(parse_size("64KiB"), Some(65_536));
    assert_eq!(parse_size("1MiB"), Some(1 << 20));
    assert_eq!(parse_size("128 MB"), Some(128 << 20));
    assert_eq!(parse_size("1 furlong"), None);
}

#[test]
fn durations_parse() {
    assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
    assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
    assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
    assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
    assert_eq!(parse_duration("12"), Some(Duration::from_secs(12)));
    assert_eq!(parse_duration("5 minutes"), None);
    assert_eq!(parse_duration("s"), None);
}

#[test]
fn the_shipped_example_config_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
    let mut e = HashMap::new();
    e.insert("AZURE_CLIENT_SECRET".to_owned(), "x".to_owned());
    let cfg = Config::load(&Sources {
        file: Some(path),
        env: e,
        ..Sources::default()
    })
    .expect("config.toml is valid");
    assert_eq!(cfg.orgs[0].origin(), "https://contoso.crm.dynamics.com");
    assert_eq!(cfg.upstream.idle_timeout, Duration::from_secs(120));
}

#[test]
fn the_shipped_multi_org_example_parses_when_uncommented() {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml"))
        .expect("config.toml");
    let start = text.find("# --- multi-org example").expect("example start");
    let end = text
        .find("# --- end of multi-org example")
        .expect("example end");
    let block: String = text[start..end]
        .lines()
        .skip(1)
        .map(|l| {
            l.strip_prefix("# ")
                .or_else(|| l.strip_prefix('#'))
                .unwrap_or(l)
        })
        .collect::<Vec<_>>()
        .join("\n");
    let full = format!("{}{block}\n{}", &text[..start], &text[end..]);
    let mut e = HashMap::new();
    e.insert("AZURE_CLIENT_SECRET".to_owned(), "x".to_owned());
    let cfg = load_toml(&full, e)
        .1
        .expect("the multi-org example is valid");
    assert_eq!(cfg.orgs.len(), 2);
    assert!(cfg.orgs[0].default && !cfg.orgs[1].default);
    assert_eq!(cfg.orgs[1].name, "fabrikam");
    assert_eq!(
        cfg.orgs[1].hosts,
        ["fabrikam-dataverse.internal.example.com"]
    );
    assert!(matches!(
        cfg.orgs[1].credential.kind,
        CredentialKind::Federated { .. }
    ));
}

#[test]
fn credential_kinds_are_inferred_in_azure_identity_order() {
    let mut e = minimal_env();
    e.remove("AZURE_CLIENT_SECRET");
    e.insert("AZURE_FEDERATED_TOKEN_FILE".into(), "/tmp/t".into());
    e.insert("DATAVERSE_PROXY_CLOUD".into(), "usgovernment".into());
    let cfg = Config::load(&Sources {
        env: e.clone(),
        ..Sources::default()
    })
    .expect("valid");
    let c = &cfg.orgs[0].credential;
    assert!(matches!(c.kind, CredentialKind::Federated { .. }));
    assert_eq!(
        c.token_url.as_ref().map(Url::as_str),
        Some("https://login.microsoftonline.us/tenant-1/oauth2/v2.0/token")
    );
    e.remove("AZURE_FEDERATED_TOKEN_FILE");
    e.insert("DATAVERSE_PROXY_MANAGED_IDENTITY".into(), "imds".into());
    let cfg = Config::load(&Sources {
        env: e.clone(),
        ..Sources::default()
    })
    .expect("valid");
    assert!(matches!(
        cfg.orgs[0].credential.kind,
        CredentialKind::ManagedIdentity(ManagedIdentity::Imds { .. })
    ));
    e.insert(
        "DATAVERSE_PROXY_IMDS_ENDPOINT".into(),
        "http://10.1.2.3/token".into(),
    );
    let err = Config::load(&Sources {
        env: e,
        ..Sources::default()
    })
    .expect_err("plain http off-host");
    assert!(
        err.to_string().contains("credential.imds_endpoint"),
        "{err}"
    );
}

#[test]
fn org_names_and_references_are_checked() {
    let (_, result) = load_toml(
        "[[orgs]]
name = \"api\"
url = \"https://a.crm.dynamics.com\"
credential = \"nope\"
",
        HashMap::new(),
    );
    let err = result.expect_err("invalid");
    let text = err.to_string();
    assert!(text.contains("`orgs[0].name`"), "{text}");
    assert!(text.contains("no credential named \"nope\""), "{text}");
}

#[test]
fn the_redis_url_comes_from_the_environment_and_is_never_echoed() {
    let mut e = minimal_env();
    e.insert(
        "DATAVERSE_PROXY_REDIS_URL".into(),
        "redis://:s3cret-pw@redis:6379".into(),
    );
    e.insert("DATAVERSE_PROXY_EXPECTED_REPLICAS".into(), "4".into());
    let cfg = Config::load(&Sources {
        env: e.clone(),
        ..Sources::default()
    })
    .expect("valid");
    assert!(cfg.governor.redis.is_some());
    assert_eq!(cfg.governor.fallback_concurrency, 13, "50 / 4, rounded up");
    assert!(
        !format!("{cfg:?}").contains("s3cret-pw"),
        "Debug redacts the URL"
    );
    e.insert(
        "DATAVERSE_PROXY_REDIS_URL".into(),
        "htp://:s3cret-pw@redis".into(),
    );
    let err = Config::load(&Sources {
        env: e,
        ..Sources::default()
    })
    .expect_err("bad URL");
    let text = err.to_string();
    assert!(text.contains("`governor.redis_url`"), "{text}");
    assert!(!text.contains("s3cret-pw"), "{text}");
}

#[test]
fn tls_files_that_are_not_pem_are_config_errors() {
    let not_pem = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let cert = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cert.pem");
    let text = format!(
        "[tls]\ncert_file = {:?}\nkey_file = {:?}\nclient_ca_file = {:?}\n",
        not_pem.display().to_string(),
        cert.display().to_string(),
        cert.display().to_string(),
    );
    let err = load_toml(&text, minimal_env()).1.expect_err("not PEM");
    let text = err.to_string();
    assert!(
        text.contains("`tls.cert_file`") && text.contains("no PEM CERTIFICATE"),
        "{text}"
    );
    assert!(
        text.contains("`tls.key_file`") && text.contains("no PEM private key"),
        "{text}"
    );
    assert!(
        !text.contains("`tls.client_ca_file`"),
        "a CA bundle of certificates is fine: {text}"
    );
}

#[test]
fn compression_and_the_metadata_cache_are_on_by_default_and_checked() {
    let (_, cfg) = load_toml("", minimal_env());
    let cfg = cfg.expect("valid");
    assert!(cfg.upstream.compression);
    assert_eq!(cfg.upstream.recompression_level, 4);
    assert!(cfg.metadata_cache.enabled);
    assert_eq!(cfg.metadata_cache.fresh_for, Duration::from_secs(300));

    let text = "[upstream]\ncompression = false\n[metadata_cache]\nenabled = false\n";
    let cfg = load_toml(text, minimal_env()).1.expect("valid");
    assert!(!cfg.upstream.compression && !cfg.metadata_cache.enabled);

    let text = "[upstream]\nrecompression_level = 12\n[metadata_cache]\nmax_bytes = \"1MiB\"\nmax_entry = \"2MiB\"\nfresh_for = \"soon\"\n";
    let err = load_toml(text, minimal_env()).1.expect_err("invalid");
    let message = err.to_string();
    for key in [
        "upstream.recompression_level",
        "metadata_cache.max_entry",
        "metadata_cache.fresh_for",
    ] {
        assert!(message.contains(key), "{key} named in: {message}");
    }
}

#[test]
fn a_url_with_a_password_is_refused_without_echoing_it() {
    for url in [
        "https://user:hunter2secret@contoso.crm.dynamics.com",
        "http://user:hunter2secret@example.com",
        "https://user:hunter2secret@bad host",
    ] {
        let mut vars = minimal_env();
        vars.insert("DATAVERSE_URL".into(), url.into());
        let err = Config::load(&Sources {
            env: vars,
            ..Sources::default()
        })
        .expect_err("refused");
        let text = err.to_string();
        assert!(text.contains("org.url"), "{text}");
        assert!(!text.contains("hunter2secret"), "{text}");
    }
}

#[test]
fn zero_durations_that_break_things_are_refused() {
    for (key, toml) in [
        ("limits.idle_timeout", "[limits]\nidle_timeout = \"0s\"\n"),
        (
            "limits.header_read_timeout",
            "[limits]\nheader_read_timeout = \"0s\"\n",
        ),
        (
            "governor.lease_time",
            "[governor]\nredis_url = \"redis://127.0.0.1:1\"\nlease_time = \"0s\"\n",
        ),
        ("governor.max_hold", "[governor]\nmax_hold = \"0s\"\n"),
        (
            "governor.fallback_concurrency",
            "[governor]\nfallback_concurrency = 99\n",
        ),
        (
            "callers[0].weight",
            "[[callers]]\nname = \"a\"\ncidrs = [\"10.0.0.0/8\"]\nweight = 0\n",
        ),
    ] {
        let (_, result) = load_toml(toml, minimal_env());
        let text = result.expect_err(key).to_string();
        assert!(text.contains(key), "{key}: {text}");
    }
}
