//! Certificate credentials: load a PEM or PFX file and sign client
//! assertions (docs/dataverse.md, "Tokens").
//!
//! The assertion is a JWT with `aud` = the token endpoint, `iss` = `sub` =
//! the client id, a fresh `jti`, `nbf` / `iat` = now and `exp` = now + 10
//! minutes. Its header names the certificate: PS256 with `x5t#S256` (the
//! current Entra default) or RS256 with `x5t` (ADFS and older tenants), plus
//! the chain in `x5c` when asked (subject-name/issuer authentication). A new
//! assertion is made for every token request; none is reused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use sha2::Digest;

use crate::config::AssertionAlgorithm;

/// Lifetime of an assertion.
const ASSERTION_LIFETIME_SECS: u64 = 600;

/// A loaded certificate credential.
pub struct ClientCertificate {
    key: EncodingKey,
    /// DER of the certificates, leaf first.
    chain: Vec<Vec<u8>>,
}

impl std::fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCertificate")
            .field("key", &"[REDACTED]")
            .field("certificates", &self.chain.len())
            .finish()
    }
}

#[derive(Serialize)]
struct AssertionClaims<'a> {
    aud: &'a str,
    iss: &'a str,
    sub: &'a str,
    jti: String,
    nbf: u64,
    iat: u64,
    exp: u64,
}

fn b64url(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// A certificate file as last loaded: what identified the file's version
/// then, and the loaded certificate.
struct Loaded {
    version: FileVersion,
    certificate: Arc<ClientCertificate>,
}

/// What tells one version of a credential file from the next (and which
/// password opened it).
#[derive(PartialEq, Eq)]
struct FileVersion {
    modified: Option<SystemTime>,
    len: u64,
    password: [u8; 32],
}

/// The certificate at `path`, loaded once and again only when the file
/// changes: parsing a PFX and its key costs far more than a signature, and
/// every token request (a lane's refresh, each on-behalf-of exchange)
/// needs one. Process-wide because credentials of several orgs, lanes and
/// reloads name the same file; bounded by the files the configuration names.
pub fn load_shared(
    path: &Path,
    password: Option<&SecretString>,
) -> Result<Arc<ClientCertificate>, String> {
    static LOADED: OnceLock<Mutex<HashMap<PathBuf, Loaded>>> = OnceLock::new();
    let meta =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let version = FileVersion {
        modified: meta.modified().ok(),
        len: meta.len(),
        password: sha2::Sha256::digest(password.map_or("", |p| p.expose_secret())).into(),
    };
    let loaded = LOADED.get_or_init(Mutex::default);
    let lock = || {
        loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    if let Some(l) = lock().get(path).filter(|l| l.version == version) {
        return Ok(Arc::clone(&l.certificate));
    }
    let certificate = Arc::new(ClientCertificate::load(path, password)?);
    lock().insert(
        path.to_owned(),
        Loaded {
            version,
            certificate: Arc::clone(&certificate),
        },
    );
    Ok(certificate)
}

impl ClientCertificate {
    /// Loads a PEM file (private key + certificates) or a PFX / PKCS#12
    /// file. Errors say what is wrong without echoing key material.
    pub fn load(path: &Path, password: Option<&SecretString>) -> Result<Self, String> {
        let data =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if memchr::memmem::find(&data, b"-----BEGIN").is_some() {
            Self::from_pem(&data)
        } else {
            Self::from_pfx(&data, password.map_or("", |p| p.expose_secret()))
        }
    }

    fn from_pem(data: &[u8]) -> Result<Self, String> {
        let blocks = pem::parse_many(data).map_err(|e| format!("not a valid PEM file ({e})"))?;
        let mut key = None;
        let mut chain = Vec::new();
        for block in &blocks {
            match block.tag() {
                "PRIVATE KEY" | "RSA PRIVATE KEY" => key = Some(pem::encode(block)),
                "CERTIFICATE" => chain.push(block.contents().to_vec()),
                "ENCRYPTED PRIVATE KEY" => {
                    return Err(
                        "the PEM private key is encrypted; use an unencrypted PEM (protected by file permissions) or a PFX with AZURE_CLIENT_CERTIFICATE_PASSWORD"
                            .to_owned(),
                    );
                }
                _ => {}
            }
        }
        let key =
            key.ok_or("the PEM file has no private key (it needs the key and the certificate)")?;
        if chain.is_empty() {
            return Err(
                "the PEM file has no certificate (it needs the key and the certificate)".to_owned(),
            );
        }
        let key = EncodingKey::from_rsa_pem(key.as_bytes())
            .map_err(|_| "the private key is not an RSA key in PKCS#1 or PKCS#8 form".to_owned())?;
        Ok(Self { key, chain })
    }

    fn from_pfx(data: &[u8], password: &str) -> Result<Self, String> {
        let store = p12_keystore::KeyStore::from_pkcs12(data, password, p12_keystore::Pkcs12ImportPolicy::Relaxed)
            .map_err(|e| format!("cannot open the PFX file (wrong AZURE_CLIENT_CERTIFICATE_PASSWORD, or not PKCS#12): {e}"))?;
        let (_, chain) = store
            .private_key_chain()
            .ok_or("the PFX file holds no private key with its certificate")?;
        let key_pem = pem::encode(&pem::Pem::new("PRIVATE KEY", chain.key().as_der().to_vec()));
        let key = EncodingKey::from_rsa_pem(key_pem.as_bytes())
            .map_err(|_| "the PFX private key is not an RSA key".to_owned())?;
        let chain: Vec<Vec<u8>> = chain.certs().iter().map(|c| c.as_der().to_vec()).collect();
        if chain.is_empty() {
            return Err("the PFX file holds no certificate for its key".to_owned());
        }
        Ok(Self { key, chain })
    }

    /// `x5t#S256`: base64url SHA-256 thumbprint of the leaf certificate.
    pub fn thumbprint_sha256(&self) -> String {
        b64url(&sha2::Sha256::digest(&self.chain[0]))
    }

    /// `x5t`: base64url SHA-1 thumbprint of the leaf certificate.
    pub fn thumbprint_sha1(&self) -> String {
        b64url(&<sha1::Sha1 as sha1::Digest>::digest(&self.chain[0]))
    }

    /// A fresh signed assertion for `audience` (the token endpoint).
    pub fn assertion(
        &self,
        client_id: &str,
        audience: &str,
        algorithm: AssertionAlgorithm,
        send_chain: bool,
        now: u64,
    ) -> Result<SecretString, String> {
        let mut header = match algorithm {
            AssertionAlgorithm::Ps256 => {
                let mut h = Header::new(Algorithm::PS256);
                h.x5t_s256 = Some(self.thumbprint_sha256());
                h
            }
            AssertionAlgorithm::Rs256 => {
                let mut h = Header::new(Algorithm::RS256);
                h.x5t = Some(self.thumbprint_sha1());
                h
            }
        };
        if send_chain {
            header.x5c = Some(
                self.chain
                    .iter()
                    .map(|der| base64::engine::general_purpose::STANDARD.encode(der))
                    .collect(),
            );
        }
        let claims = AssertionClaims {
            aud: audience,
            iss: client_id,
            sub: client_id,
            jti: uuid::Uuid::new_v4().to_string(),
            nbf: now,
            iat: now,
            exp: now + ASSERTION_LIFETIME_SECS,
        };
        jsonwebtoken::encode(&header, &claims, &self.key)
            .map(SecretString::from)
            .map_err(|e| format!("cannot sign the client assertion: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name)
    }

    #[test]
    fn pem_and_pfx_load_the_same_certificate() {
        let pem = ClientCertificate::load(&fixture("client.pem"), None).expect("pem");
        let password = SecretString::from("fixture-password");
        let pfx = ClientCertificate::load(&fixture("client.pfx"), Some(&password)).expect("pfx");
        let legacy = ClientCertificate::load(&fixture("client-legacy.pfx"), Some(&password))
            .expect("legacy pfx");
        assert_eq!(pem.thumbprint_sha256(), pfx.thumbprint_sha256());
        assert_eq!(pem.thumbprint_sha1(), legacy.thumbprint_sha1());
        assert!(!format!("{pem:?}").contains("BEGIN"));
    }

    #[test]
    fn a_certificate_is_loaded_once_and_again_when_its_file_changes() {
        let dir = std::env::temp_dir().join(format!("dvp-cert-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("client.pem");
        std::fs::copy(fixture("client.pem"), &path).expect("copy");
        let first = load_shared(&path, None).expect("load");
        let again = load_shared(&path, None).expect("load");
        assert!(Arc::ptr_eq(&first, &again), "the file unchanged: no reload");
        // A renewed certificate: another file's contents under the name.
        let mut renewed = std::fs::read(fixture("client.pem")).expect("read");
        renewed.extend_from_slice(b"\n");
        std::fs::write(&path, renewed).expect("write");
        let after = load_shared(&path, None).expect("load");
        assert!(
            !Arc::ptr_eq(&first, &after),
            "the changed file is read again"
        );
        std::fs::remove_dir_all(&dir).expect("clean");
    }

    #[test]
    fn a_wrong_pfx_password_is_explained() {
        let wrong = SecretString::from("nope");
        let err = ClientCertificate::load(&fixture("client.pfx"), Some(&wrong))
            .expect_err("wrong password");
        assert!(err.contains("AZURE_CLIENT_CERTIFICATE_PASSWORD"), "{err}");
    }

    #[test]
    fn assertions_carry_the_documented_header_and_claims() {
        let cert = ClientCertificate::load(&fixture("client.pem"), None).expect("pem");
        let a = cert
            .assertion(
                "client-1",
                "https://login.example/t/oauth2/v2.0/token",
                AssertionAlgorithm::Ps256,
                true,
                1_700_000_000,
            )
            .expect("sign");
        let header = jsonwebtoken::decode_header(a.expose_secret()).expect("header");
        assert_eq!(header.alg, Algorithm::PS256);
        assert_eq!(
            header.x5t_s256.as_deref(),
            Some(cert.thumbprint_sha256().as_str())
        );
        assert_eq!(header.x5c.as_ref().map(Vec::len), Some(1));
        let b = cert
            .assertion(
                "client-1",
                "aud",
                AssertionAlgorithm::Rs256,
                false,
                1_700_000_000,
            )
            .expect("sign");
        let header = jsonwebtoken::decode_header(b.expose_secret()).expect("header");
        assert_eq!(header.alg, Algorithm::RS256);
        assert!(header.x5t.is_some() && header.x5c.is_none());
        assert_ne!(a.expose_secret(), b.expose_secret());
    }
}
