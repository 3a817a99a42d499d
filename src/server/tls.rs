//! TLS on the proxy listener (rustls): the certificate and key, optional
//! client-certificate verification against a CA bundle (mTLS), ALPN `h2`
//! and `http/1.1`, and reloading: on SIGHUP, and when the files' change
//! times move (Kubernetes swaps mounted secrets under a symlink). A reload
//! that fails keeps the running configuration and logs why; connections
//! already open keep the configuration they started with.

use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::TlsAcceptor;

use crate::callers::PeerCertificate;
use crate::config::{ListenerTls, SubjectName};

/// The listener's TLS setup, swapped whole on reload.
pub struct ListenerTlsState {
    settings: ListenerTls,
    current: RwLock<TlsAcceptor>,
    stamps: Mutex<Vec<Option<SystemTime>>>,
}

impl std::fmt::Debug for ListenerTlsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerTlsState")
            .field("cert_file", &self.settings.cert_file)
            .finish_non_exhaustive()
    }
}

impl ListenerTlsState {
    /// Reads the files; an error names the key and the fix.
    pub fn load(settings: ListenerTls) -> Result<Self, String> {
        let acceptor = acceptor(&settings)?;
        Ok(Self {
            stamps: Mutex::new(stamps(&settings)),
            current: RwLock::new(acceptor),
            settings,
        })
    }

    /// The acceptor for a new connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Re-reads the files; on failure the running setup stays.
    pub fn reload(&self) {
        match acceptor(&self.settings) {
            Ok(a) => {
                *self
                    .current
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = a;
                *self.lock_stamps() = stamps(&self.settings);
                tracing::info!(cert_file = %self.settings.cert_file.display(), "listener TLS certificate reloaded");
            }
            Err(error) => {
                tracing::error!(%error, "listener TLS reload failed; the running certificate stays");
            }
        }
    }

    /// Reloads when a file's modification time changed since the last load.
    pub fn reload_if_changed(&self) {
        if *self.lock_stamps() != stamps(&self.settings) {
            self.reload();
        }
    }

    /// Checks the files every `reload_interval` until the task is aborted.
    pub async fn watch_files(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.settings.reload_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let me = self.clone();
            // File reads are blocking; they are small and rare.
            let _ = tokio::task::spawn_blocking(move || me.reload_if_changed()).await;
        }
    }

    fn lock_stamps(&self) -> std::sync::MutexGuard<'_, Vec<Option<SystemTime>>> {
        self.stamps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn stamps(s: &ListenerTls) -> Vec<Option<SystemTime>> {
    [
        Some(&s.cert_file),
        Some(&s.key_file),
        s.client_ca_file.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
    .collect()
}

fn acceptor(s: &ListenerTls) -> Result<TlsAcceptor, String> {
    let certs = certificates("tls.cert_file", &s.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&s.key_file).map_err(|e| {
        format!(
            "tls.key_file: {} holds no usable private key ({e}); give a PEM PKCS#8, PKCS#1 or SEC1 key",
            s.key_file.display()
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("the TLS setup failed: {e}"))?;
    let builder = match &s.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates("tls.client_ca_file", ca)? {
                roots
                    .add(cert)
                    .map_err(|e| format!("tls.client_ca_file: {} ({e})", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if s.require_client_certificate {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| format!("tls.client_ca_file: {e}"))?,
            )
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| {
        format!("tls.cert_file / tls.key_file: the key does not fit the certificate ({e})")
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn certificates(key: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{key}: cannot read {} ({e})", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{key}: {} is not PEM ({e})", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{key}: {} holds no CERTIFICATE block; give a PEM file",
            path.display()
        ));
    }
    Ok(certs)
}

/// The names of the verified client certificate of a connection, if any.
pub fn peer_certificate(conn: &rustls::ServerConnection) -> Option<PeerCertificate> {
    use x509_parser::extensions::GeneralName;
    let leaf = conn.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let common_names = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    let sans = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(s) => Some(SubjectName::Dns((*s).to_owned())),
                    GeneralName::URI(s) => Some(SubjectName::Uri((*s).to_owned())),
                    GeneralName::RFC822Name(s) => Some(SubjectName::Email((*s).to_owned())),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Some(PeerCertificate { common_names, sans })
}
