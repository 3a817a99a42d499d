//! Config loading from arbitrary TOML: a config or a list of problems,
//! never a panic, and no problem echoes a secret given in the file.
#![no_main]

use dataverse_proxy::config::{Config, Sources};
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "fuzz-secret-value-0123456789";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("dvp-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("config.toml");
    let toml = format!("{text}\n[credential]\nclient_secret = \"{SECRET}\"\n");
    if std::fs::write(&path, toml).is_err() {
        return;
    }
    let sources = Sources {
        file: Some(path),
        ..Sources::default()
    };
    if let Err(e) = Config::load(&sources) {
        let shown = e.to_string();
        assert!(!shown.contains(SECRET), "a config error echoes the secret: {shown}");
    }
});
