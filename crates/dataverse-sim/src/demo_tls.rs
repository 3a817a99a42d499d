//! A certificate for the demo's TLS listener: a CA made for this run and a
//! server certificate it signs for `127.0.0.1` and `localhost`, written as
//! PEM files, so that clients which accept only `https://` (Microsoft's
//! Python SDK) can be pointed at the demo by trusting the CA file.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// The files of the demo's TLS listener.
#[derive(Debug, Clone)]
pub struct DemoTls {
    /// The CA to trust (`REQUESTS_CA_BUNDLE`, `NODE_EXTRA_CA_CERTS`).
    pub ca_file: PathBuf,
    /// The listener's certificate.
    pub cert_file: PathBuf,
    /// Its private key (readable by the owner only).
    pub key_file: PathBuf,
}

/// Makes a CA and a server certificate for `127.0.0.1` and `localhost`
/// and writes them into `dir`.
pub fn make(dir: &Path) -> Result<DemoTls, String> {
    let fail = |what: &str, e: &dyn std::fmt::Display| format!("demo TLS: {what}: {e}");
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(|e| fail("CA", &e))?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "dataverse-proxy demo CA");
    let ca_key = KeyPair::generate().map_err(|e| fail("CA key", &e))?;
    let issuer = CertifiedIssuer::self_signed(ca, ca_key).map_err(|e| fail("CA", &e))?;
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let mut leaf = CertificateParams::new(names).map_err(|e| fail("certificate", &e))?;
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "dataverse-proxy demo");
    let key = KeyPair::generate().map_err(|e| fail("key", &e))?;
    let cert = leaf
        .signed_by(&key, &issuer)
        .map_err(|e| fail("certificate", &e))?;
    std::fs::create_dir_all(dir).map_err(|e| fail(&dir.display().to_string(), &e))?;
    let files = DemoTls {
        ca_file: dir.join("ca.pem"),
        cert_file: dir.join("proxy.crt"),
        key_file: dir.join("proxy.key"),
    };
    let write = |path: &Path, text: &str| {
        std::fs::write(path, text).map_err(|e| fail(&path.display().to_string(), &e))
    };
    write(&files.ca_file, &issuer.pem())?;
    write(&files.cert_file, &cert.pem())?;
    write(&files.key_file, &key.serialize_pem())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let owner_only = std::fs::Permissions::from_mode(0o600);
        std::fs::set_permissions(&files.key_file, owner_only)
            .map_err(|e| fail(&files.key_file.display().to_string(), &e))?;
    }
    Ok(files)
}
