//! The one TLS setup of every outbound connection: the token client's
//! (Entra ID) and the Dataverse client's. rustls with the platform's trust
//! store, plus the CA certificates of `upstream.ca_file` (a corporate
//! TLS-inspecting egress, a private CA in tests).
//!
//! Built once at start-up and handed to both clients, so a bad CA file
//! fails both, naming the key, before anything is served.

use std::path::Path;
use std::sync::Arc;

/// Why the TLS setup cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The CA file cannot be read.
    #[error(
        "upstream.ca_file: cannot read {path}: {source}; point it at a PEM file of CA certificates"
    )]
    Read {
        /// The configured path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The CA file holds no PEM certificate.
    #[error(
        "upstream.ca_file: {path} holds no PEM CERTIFICATE block; point it at a PEM file of CA certificates"
    )]
    NoCertificates {
        /// The configured path.
        path: String,
    },
    /// rustls refused the setup.
    #[error("the TLS setup failed: {0}")]
    Rustls(String),
}

/// The client TLS configuration: platform roots plus `ca_file`'s.
pub fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, TlsError> {
    crate::install_crypto_provider();
    let extra = match ca_file {
        None => Vec::new(),
        Some(path) => extra_roots(path)?,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls_platform_verifier::Verifier::new_with_extra_roots(extra, provider.clone())
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

/// The CERTIFICATE blocks of a PEM file; at least one.
fn extra_roots(path: &Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, TlsError> {
    let shown = path.display().to_string();
    let pem = std::fs::read(path).map_err(|source| TlsError::Read {
        path: shown.clone(),
        source,
    })?;
    let certs: Vec<_> = pem::parse_many(&pem)
        .unwrap_or_default()
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(|b| rustls::pki_types::CertificateDer::from(b.into_contents()))
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificates { path: shown });
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_bundle_is_read_and_a_bad_one_names_the_key() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cert.pem");
        assert!(client_config(Some(&fixture)).is_ok());
        assert!(client_config(None).is_ok());
        let missing = client_config(Some(Path::new("/nonexistent.pem"))).expect_err("missing");
        assert!(
            missing
                .to_string()
                .starts_with("upstream.ca_file: cannot read"),
            "{missing}"
        );
        let not_pem = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
        let err = client_config(Some(&not_pem)).expect_err("not PEM");
        assert!(err.to_string().contains("no PEM CERTIFICATE"), "{err}");
    }
}
