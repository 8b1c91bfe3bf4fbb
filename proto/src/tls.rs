//! TLS for the job bus, the git tunnel and the control API: rustls with ring as the one
//! crypto provider, certificates, and how an agent or client decides to trust a coordinator.
//!
//! Every rustls config is built with [`provider`] explicitly, and the binaries also install
//! it as the process default ([`install_default_provider`]): rustls refuses to guess when
//! two providers are compiled in, and only ring is (the workspace's dependency list keeps
//! aws-lc-rs out).
//!
//! A coordinator's certificate is usually self-signed ([`ServerIdentity::load_or_create`]);
//! agents then pin its SHA-256 fingerprint ([`ServerTrust::Pinned`]), which the coordinator
//! prints at start. With a certificate from a CA of their own, users give agents the CA
//! file instead ([`ServerTrust::CaFile`]), and names are checked as usual.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

/// File names of a generated certificate and key, in the coordinator's config directory.
pub const GENERATED_CERT_FILE: &str = "tls-cert.pem";
pub const GENERATED_KEY_FILE: &str = "tls-key.pem";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("cannot write {0}: {1}")]
    Write(PathBuf, std::io::Error),
    #[error("{0} holds no PEM certificate")]
    NoCertificate(PathBuf),
    #[error("{0} holds no PEM private key")]
    NoKey(PathBuf),
    #[error("{0}: {1}")]
    Pem(PathBuf, String),
    #[error(
        "{found} exists but {missing} does not; restore it or delete both to generate a new pair"
    )]
    HalfPair { found: PathBuf, missing: PathBuf },
    #[error("cannot generate a certificate: {0}")]
    Generate(String),
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("client certificate verification: {0}")]
    ClientVerifier(String),
    #[error("invalid TLS fingerprint {0:?}: expected sha256: and 64 hex digits (colons allowed)")]
    BadFingerprint(String),
}

/// The crypto provider of every TLS config here.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process-wide default provider. Idempotent; binaries call it first.
pub fn install_default_provider() {
    // An error means a provider is installed already, which can only be this one.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The SHA-256 of a DER certificate: what agents pin.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    pub fn of(der: &[u8]) -> Self {
        Self(Sha256::digest(der).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Fingerprint {
    type Err = TlsError;

    /// Accepts `sha256:` followed by 64 hex digits, in either case, colons anywhere (the
    /// form `openssl x509 -fingerprint -sha256` prints). The prefix may be left out.
    fn from_str(text: &str) -> Result<Self, TlsError> {
        let bad = || TlsError::BadFingerprint(text.to_owned());
        let trimmed = text.trim();
        let hex = trimmed
            .get(..7)
            .filter(|prefix| prefix.eq_ignore_ascii_case("sha256:"))
            .map_or(trimmed, |_| &trimmed[7..]);
        let digits: String = hex.chars().filter(|c| *c != ':').collect();
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(digits, &mut bytes).map_err(|_| bad())?;
        Ok(Self(bytes))
    }
}

/// A coordinator's certificate chain and key.
#[derive(Debug)]
pub struct ServerIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// Of the end-entity certificate.
    pub fingerprint: Fingerprint,
    pub cert_file: PathBuf,
    /// Whether [`ServerIdentity::load_or_create`] made it just now.
    pub generated: bool,
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let text = std::fs::read(path).map_err(|e| TlsError::Read(path.to_owned(), e))?;
    let chain = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(path.to_owned(), e.to_string()))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let text = std::fs::read(path).map_err(|e| TlsError::Read(path.to_owned(), e))?;
    PrivateKeyDer::from_pem_slice(&text).map_err(|error| match error {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoKey(path.to_owned()),
        error => TlsError::Pem(path.to_owned(), error.to_string()),
    })
}

fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for certificate in read_chain(path)? {
        roots.add(certificate)?;
    }
    Ok(roots)
}

impl ServerIdentity {
    /// Loads a certificate chain (end-entity first) and its key from PEM files.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Self, TlsError> {
        let chain = read_chain(cert_file)?;
        let key = read_key(key_file)?;
        Ok(Self {
            fingerprint: Fingerprint::of(&chain[0]),
            chain,
            key,
            cert_file: cert_file.to_owned(),
            generated: false,
        })
    }

    /// Loads the generated pair in `dir`, creating a self-signed one (mode 0600) for
    /// `names` if there is none. The pair is kept, so the fingerprint agents pinned stays
    /// valid across restarts. Coordinators of several repositories share the directory and
    /// may start together: the files are placed without replacing, the first key placed
    /// wins, and the others load its pair.
    pub fn load_or_create(dir: &Path, names: &[String]) -> Result<Self, TlsError> {
        let cert_file = dir.join(GENERATED_CERT_FILE);
        let key_file = dir.join(GENERATED_KEY_FILE);
        if !key_file.exists() {
            if cert_file.exists() {
                return Err(TlsError::HalfPair {
                    found: cert_file,
                    missing: key_file,
                });
            }
            std::fs::create_dir_all(dir).map_err(|e| TlsError::Write(dir.to_owned(), e))?;
            let generated = rcgen::generate_simple_self_signed(names.to_vec())
                .map_err(|e| TlsError::Generate(e.to_string()))?;
            // The key first: whoever places it also places its certificate.
            if place_private(&key_file, &generated.signing_key.serialize_pem())? {
                place_private(&cert_file, &generated.cert.pem())?;
                let mut identity = Self::load(&cert_file, &key_file)?;
                identity.generated = true;
                return Ok(identity);
            }
        }
        // A key exists; its certificate may still be on its way from another process.
        let deadline = std::time::Instant::now() + PAIR_WAIT;
        while !cert_file.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if !cert_file.exists() {
            return Err(TlsError::HalfPair {
                found: key_file,
                missing: cert_file,
            });
        }
        Self::load(&cert_file, &key_file)
    }
}

/// How long a coordinator waits for the certificate of a key another one just placed.
const PAIR_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Writes `contents` to `path` with mode 0600 unless `path` exists; never replaces it, and a
/// reader sees all or nothing. Returns whether this call placed the file.
fn place_private(path: &Path, contents: &str) -> Result<bool, TlsError> {
    let error = |e| TlsError::Write(path.to_owned(), e);
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let unique = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let temporary = path.with_extension(format!("tmp.{}.{unique}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(error)?;
    file.write_all(contents.as_bytes()).map_err(error)?;
    file.sync_all().map_err(error)?;
    // A hard link fails if the name exists: the no-replace rename.
    let placed = match std::fs::hard_link(&temporary, path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(error(e)),
    };
    let _ = std::fs::remove_file(&temporary);
    placed
}

/// Builds the server config: this identity, optionally requiring client certificates
/// signed by `client_ca` (mutual TLS), offering `alpn` protocols.
pub fn server_config(
    identity: &ServerIdentity,
    client_ca: Option<&Path>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        Some(path) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(read_roots(path)?),
                provider(),
            )
            .build()
            .map_err(|e| TlsError::ClientVerifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// How an agent or client decides the coordinator is the right one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerTrust {
    /// The coordinator's certificate must have this fingerprint; names are not checked.
    Pinned(Fingerprint),
    /// The certificate must chain to a CA in this PEM file and name the host dialled.
    CaFile(PathBuf),
}

/// A client certificate and key for mutual TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCertFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Builds a client config that trusts as `trust` says and presents `client_cert`.
pub fn client_config(
    trust: &ServerTrust,
    client_cert: Option<&ClientCertFiles>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let builder =
        match trust {
            ServerTrust::Pinned(fingerprint) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedCertificate {
                    expected: *fingerprint,
                    algorithms: provider().signature_verification_algorithms,
                })),
            ServerTrust::CaFile(path) => builder.with_root_certificates(read_roots(path)?),
        };
    let mut config = match client_cert {
        Some(files) => builder
            .with_client_auth_cert(read_chain(&files.cert_file)?, read_key(&files.key_file)?)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The server presented a certificate other than the pinned one.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "the coordinator's certificate has fingerprint {found}, but this agent pins {expected}; \
     if the coordinator's certificate was replaced on purpose, pin the new fingerprint"
)]
pub struct PinMismatch {
    pub expected: Fingerprint,
    pub found: Fingerprint,
}

impl PinMismatch {
    /// Finds a pin mismatch inside an I/O error from a TLS handshake.
    pub fn find(error: &std::io::Error) -> Option<&Self> {
        match error.get_ref()?.downcast_ref::<rustls::Error>()? {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
                inner.downcast_ref::<Self>()
            }
            _ => None,
        }
    }
}

/// Accepts exactly one certificate, by fingerprint. Signatures are still verified, so the
/// peer must hold that certificate's key.
#[derive(Debug)]
struct PinnedCertificate {
    expected: Fingerprint,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let found = Fingerprint::of(end_entity);
        if found == self.expected {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(PinMismatch {
                    expected: self.expected,
                    found,
                })),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn fingerprints_parse_in_the_usual_spellings() {
        let fingerprint = Fingerprint::of(b"certificate");
        let text = fingerprint.to_string();
        assert!(
            text.starts_with("sha256:") && text.len() == 7 + 64,
            "{text}"
        );
        let colons: String = text.as_bytes()[7..]
            .chunks(2)
            .map(|pair| String::from_utf8_lossy(pair).to_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        for spelling in [
            text.clone(),
            text[7..].to_owned(),
            format!("SHA256:{colons}"),
            format!("  {text}\n"),
        ] {
            assert_eq!(
                spelling.parse::<Fingerprint>().expect(&spelling),
                fingerprint
            );
        }
        for bad in [
            "",
            "sha256:",
            "sha256:abc",
            &format!("{text}00"),
            "sha256:zz",
        ] {
            assert!(bad.parse::<Fingerprint>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn a_generated_pair_is_private_and_kept() {
        let dir = tempfile::tempdir().expect("temp");
        let first =
            ServerIdentity::load_or_create(dir.path(), &["localhost".into()]).expect("created");
        assert!(first.generated);
        for file in [GENERATED_CERT_FILE, GENERATED_KEY_FILE] {
            let mode = std::fs::metadata(dir.path().join(file))
                .expect("exists")
                .permissions();
            assert_eq!(
                std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
                0o600,
                "{file}"
            );
        }
        let again = ServerIdentity::load_or_create(dir.path(), &[]).expect("loaded");
        assert!(!again.generated);
        assert_eq!(again.fingerprint, first.fingerprint);

        std::fs::remove_file(dir.path().join(GENERATED_KEY_FILE)).expect("rm");
        assert!(matches!(
            ServerIdentity::load_or_create(dir.path(), &[]),
            Err(TlsError::HalfPair { .. })
        ));
    }

    #[test]
    fn coordinators_starting_together_share_one_pair() {
        let dir = tempfile::tempdir().expect("temp");
        let fingerprints: Vec<Fingerprint> = std::thread::scope(|scope| {
            let starts: Vec<_> = (0..6)
                .map(|_| {
                    scope.spawn(|| {
                        ServerIdentity::load_or_create(dir.path(), &["localhost".into()])
                            .expect("loaded or created")
                            .fingerprint
                    })
                })
                .collect();
            starts
                .into_iter()
                .map(|start| start.join().expect("joins"))
                .collect()
        });
        let on_disk = ServerIdentity::load_or_create(dir.path(), &[]).expect("loaded");
        assert!(
            fingerprints.iter().all(|f| *f == on_disk.fingerprint),
            "{fingerprints:?} vs {:?}",
            on_disk.fingerprint
        );
    }

    /// One TLS handshake over an in-memory pipe; returns the client's result.
    async fn handshake(
        server: Arc<rustls::ServerConfig>,
        client: Arc<rustls::ClientConfig>,
    ) -> std::io::Result<()> {
        let (server_end, client_end) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let serving = tokio::spawn(async move {
            let mut stream = acceptor.accept(server_end).await?;
            stream.write_all(b"ok").await?;
            stream.shutdown().await
        });
        let connector = tokio_rustls::TlsConnector::from(client);
        let name = ServerName::try_from("localhost").expect("name");
        let mut stream = connector.connect(name, client_end).await?;
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).await?;
        assert_eq!(reply, b"ok");
        let _ = serving.await;
        Ok(())
    }

    #[tokio::test]
    async fn a_pin_admits_its_certificate_and_names_both_fingerprints_otherwise() {
        let dir = tempfile::tempdir().expect("temp");
        let identity =
            ServerIdentity::load_or_create(dir.path(), &["localhost".into()]).expect("created");
        let server = server_config(&identity, None, &[]).expect("server config");

        let right = client_config(&ServerTrust::Pinned(identity.fingerprint), None, &[])
            .expect("client config");
        handshake(Arc::clone(&server), right).await.expect("pinned");

        let wrong_pin = Fingerprint::of(b"some other certificate");
        let wrong = client_config(&ServerTrust::Pinned(wrong_pin), None, &[]).expect("config");
        let error = handshake(server, wrong).await.expect_err("refused");
        let mismatch = PinMismatch::find(&error).expect("a pin mismatch");
        assert_eq!(
            (mismatch.expected, mismatch.found),
            (wrong_pin, identity.fingerprint)
        );
        let message = mismatch.to_string();
        assert!(
            message.contains(&wrong_pin.to_string())
                && message.contains(&identity.fingerprint.to_string()),
            "{message}"
        );
    }

    #[tokio::test]
    async fn a_ca_file_checks_the_chain_and_mutual_tls_checks_the_client() {
        let dir = tempfile::tempdir().expect("temp");
        let server_dir = dir.path().join("server");
        let identity =
            ServerIdentity::load_or_create(&server_dir, &["localhost".into()]).expect("server");
        // A self-signed certificate is its own CA.
        let ca = ServerTrust::CaFile(identity.cert_file.clone());
        let client_dir = dir.path().join("client");
        let client_identity =
            ServerIdentity::load_or_create(&client_dir, &["agent".into()]).expect("client");
        let client_files = ClientCertFiles {
            cert_file: client_identity.cert_file.clone(),
            key_file: client_dir.join(GENERATED_KEY_FILE),
        };

        let plain_server = server_config(&identity, None, &[]).expect("server config");
        let trusting = client_config(&ca, None, &[]).expect("client config");
        handshake(plain_server, Arc::clone(&trusting))
            .await
            .expect("CA-verified");

        let mutual =
            server_config(&identity, Some(&client_identity.cert_file), &[]).expect("mutual");
        assert!(
            handshake(Arc::clone(&mutual), trusting).await.is_err(),
            "no client certificate"
        );
        let presenting = client_config(&ca, Some(&client_files), &[]).expect("client config");
        handshake(mutual, presenting).await.expect("mutual TLS");

        let stranger_dir = dir.path().join("stranger");
        let stranger =
            ServerIdentity::load_or_create(&stranger_dir, &["localhost".into()]).expect("other");
        let untrusted = server_config(&stranger, None, &[]).expect("server config");
        let trusting = client_config(&ca, None, &[]).expect("client config");
        assert!(handshake(untrusted, trusting).await.is_err(), "wrong CA");
    }
}
