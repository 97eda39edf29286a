//! TLS 1.3 for the transport (rustls with the ring provider; no OpenSSL).
//!
//! The server uses a certificate given with `--tls-cert`/`--tls-key`, or a self-signed one
//! it makes on first start in `ROOT/tls/`. The client either pins the server like SSH's
//! `accept-new` (the first fingerprint seen for an address is recorded in
//! `known_servers`; a different one later is refused), or verifies a real chain with
//! `--ca FILE`.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::error::{Error, Result};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_error(context: &str, e: impl std::fmt::Display) -> Error {
    Error::Invalid(format!("{context}: {e}"))
}

/// `sha256:` and the hex SHA-256 of a certificate (DER), as logged and pinned.
pub fn fingerprint(cert: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(cert)))
}

/// The server's TLS setup: the acceptor and the certificate's fingerprint.
pub struct ServerTls {
    pub acceptor: TlsAcceptor,
    pub fingerprint: String,
}

/// Load `cert`/`key` (PEM), or with `None` the self-signed pair in `ROOT/tls/`, made on
/// first use (the key readable by the owner only).
pub fn server_tls(root: &Path, files: Option<(&Path, &Path)>) -> Result<ServerTls> {
    let (cert_path, key_path) = match files {
        Some((cert, key)) => (cert.to_path_buf(), key.to_path_buf()),
        None => ensure_self_signed(&root.join("tls"))?,
    };
    let read = |path: &Path, what: &str| {
        fs::read(path).map_err(|e| tls_error(&format!("cannot read {what} {}", path.display()), e))
    };
    server_tls_from_pem(
        &read(&cert_path, "certificate")?,
        &read(&key_path, "key")?,
        &format!("{} and {}", cert_path.display(), key_path.display()),
    )
}

/// The TLS setup from a PEM certificate chain and its PEM key (`origin` names them in
/// errors). Several servers sharing one certificate through the bucket come here.
pub fn server_tls_from_pem(cert_pem: &[u8], key_pem: &[u8], origin: &str) -> Result<ServerTls> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| tls_error(&format!("cannot read the certificate in {origin}"), e))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| tls_error(&format!("cannot read the key in {origin}"), e))?;
    let first = certs
        .first()
        .ok_or_else(|| Error::Invalid(format!("no certificate in {origin}")))?;
    let fingerprint = fingerprint(first);
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_error("TLS setup", e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| tls_error("certificate and key do not fit", e))?;
    Ok(ServerTls {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        fingerprint,
    })
}

/// A new self-signed certificate for localhost: (certificate PEM, key PEM).
pub fn make_self_signed() -> Result<(String, String)> {
    let names = vec!["localhost".to_string(), "127.0.0.1".into(), "::1".into()];
    let made = rcgen::generate_simple_self_signed(names)
        .map_err(|e| tls_error("cannot make a certificate", e))?;
    Ok((made.cert.pem(), made.signing_key.serialize_pem()))
}

fn ensure_self_signed(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let (cert, key) = make_self_signed()?;
    write_private(&key_path, key.as_bytes())?;
    fs::write(&cert_path, cert)?;
    Ok((cert_path, key_path))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(())
}

/// How a client checks the server's certificate.
#[derive(Clone, Debug)]
pub enum ClientTls {
    /// Trust on first use, then insist on the same certificate (fingerprints in this file).
    Pinned { known_servers: PathBuf },
    /// Verify the chain and the host name against the CA certificates in this PEM file.
    Ca { ca_file: PathBuf },
}

/// Accepts any certificate whose signature checks out, remembering its fingerprint, and
/// insists on `expected` when one is on record.
#[derive(Debug)]
struct PinVerifier {
    expected: Option<String>,
    seen: Mutex<Option<String>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let seen = fingerprint(end_entity);
        *self.seen.lock().unwrap() = Some(seen.clone());
        match &self.expected {
            Some(expected) if *expected != seen => Err(rustls::Error::General(
                "certificate does not match the pinned fingerprint".into(),
            )),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not used".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TLS connection, and the fingerprint recorded if this was the first visit.
pub struct Connected {
    pub stream: tokio_rustls::client::TlsStream<TcpStream>,
    pub newly_pinned: Option<String>,
}

/// Run the TLS handshake on `tcp`, checking the server as `mode` says.
pub async fn connect(tcp: TcpStream, addr: &str, mode: &ClientTls) -> Result<Connected> {
    let host = host_of(addr);
    let server_name = ServerName::try_from(host.to_string())
        .or_else(|_| ServerName::try_from("netdisk".to_string()))
        .map_err(|e| tls_error("bad server name", e))?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_error("TLS setup", e))?;
    match mode {
        ClientTls::Ca { ca_file } => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(ca_file)
                .and_then(|certs| certs.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|e| tls_error(&format!("cannot read CA file {}", ca_file.display()), e))?;
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    tls_error(&format!("bad CA certificate in {}", ca_file.display()), e)
                })?;
            }
            let config = builder.with_root_certificates(roots).with_no_client_auth();
            let stream = TlsConnector::from(Arc::new(config))
                .connect(server_name, tcp)
                .await
                .map_err(|e| handshake_failed(addr, e))?;
            Ok(Connected {
                stream,
                newly_pinned: None,
            })
        }
        ClientTls::Pinned { known_servers } => {
            let expected = known_fingerprint(known_servers, addr)?;
            let verifier = Arc::new(PinVerifier {
                expected: expected.clone(),
                seen: Mutex::new(None),
                provider: provider(),
            });
            let config = builder
                .dangerous()
                .with_custom_certificate_verifier(verifier.clone())
                .with_no_client_auth();
            let result = TlsConnector::from(Arc::new(config))
                .connect(server_name, tcp)
                .await;
            let seen = verifier.seen.lock().unwrap().clone();
            match (result, expected, seen) {
                (Err(_), Some(expected), Some(seen)) if expected != seen => Err(Error::Invalid(format!(
                    "WARNING: the server at {addr} presented certificate {seen}, but {expected} is on record in {}; someone may be intercepting the connection. If the server's certificate really changed, run: netdisk known-servers forget {addr}",
                    known_servers.display()
                ))),
                (Err(e), _, _) => Err(handshake_failed(addr, e)),
                (Ok(stream), Some(_), _) => Ok(Connected {
                    stream,
                    newly_pinned: None,
                }),
                (Ok(stream), None, seen) => {
                    let seen = seen.ok_or_else(|| Error::Protocol("no server certificate".into()))?;
                    record_fingerprint(known_servers, addr, &seen)?;
                    Ok(Connected {
                        stream,
                        newly_pinned: Some(seen),
                    })
                }
            }
        }
    }
}

/// A TLS handshake that failed. Mostly a server with TLS off (`serve --no-tls`): it
/// answers the client's hello with no TLS at all. The message says that and what to do;
/// the TLS library's own words stay as the source (shown with `--verbose`).
#[derive(Debug)]
struct HandshakeFailed {
    message: String,
    cause: std::io::Error,
}

impl std::fmt::Display for HandshakeFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HandshakeFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.cause)
    }
}

fn handshake_failed(addr: &str, cause: std::io::Error) -> Error {
    let message = format!(
        "the TLS handshake with {addr} failed: the server probably has TLS off (netdisk serve --no-tls); add --no-tls to this command, or run the server without --no-tls"
    );
    Error::Io(std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        HandshakeFailed { message, cause },
    ))
}

/// `host` of `host:port` or `[v6]:port`.
fn host_of(addr: &str) -> &str {
    let host = match addr.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
        _ => addr,
    };
    host.trim_start_matches('[').trim_end_matches(']')
}

/// The fingerprint on record for `addr`: lines of `ADDR FINGERPRINT`, `#` comments.
fn known_fingerprint(path: &Path, addr: &str) -> Result<Option<String>> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    Ok(text
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .filter_map(|line| line.split_once(' '))
        .find(|(server, _)| *server == addr)
        .map(|(_, fingerprint)| fingerprint.trim().to_string()))
}

/// Every `(address, fingerprint)` on record, in file order.
pub fn known_servers(path: &Path) -> Result<Vec<(String, String)>> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    Ok(text
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .filter_map(|line| line.split_once(' '))
        .map(|(addr, fingerprint)| (addr.to_string(), fingerprint.trim().to_string()))
        .collect())
}

/// Remove the lines of `addr` (like `ssh-keygen -R`); returns how many there were.
pub fn forget_known_server(path: &Path, addr: &str) -> Result<usize> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let mut kept = String::new();
    let mut removed = 0;
    for line in text.lines() {
        let is_addr = !line.trim_start().starts_with('#')
            && line
                .split_once(' ')
                .is_some_and(|(server, _)| server == addr);
        if is_addr {
            removed += 1;
        } else {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    if removed > 0 {
        crate::durable::write_atomically(path, kept.as_bytes(), 0o600)?;
    }
    Ok(removed)
}

fn record_fingerprint(path: &Path, addr: &str, fingerprint: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        // The client's config folder: owner only, whichever file creates it first.
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let mut file = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)?;
    writeln!(file, "{addr} {fingerprint}")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_strips_ports_and_brackets() {
        assert_eq!(host_of("127.0.0.1:9000"), "127.0.0.1");
        assert_eq!(host_of("[::1]:9000"), "::1");
        assert_eq!(host_of("example.org:1"), "example.org");
        assert_eq!(host_of("example.org"), "example.org");
    }

    #[test]
    fn known_servers_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("known_servers");
        assert_eq!(known_fingerprint(&path, "a:1").unwrap(), None);
        record_fingerprint(&path, "a:1", "sha256:aa").unwrap();
        record_fingerprint(&path, "b:2", "sha256:bb").unwrap();
        assert_eq!(
            known_fingerprint(&path, "b:2").unwrap().as_deref(),
            Some("sha256:bb")
        );
        assert_eq!(
            known_fingerprint(&path, "a:1").unwrap().as_deref(),
            Some("sha256:aa")
        );
        assert_eq!(forget_known_server(&path, "a:1").unwrap(), 1);
        assert_eq!(known_fingerprint(&path, "a:1").unwrap(), None);
        assert_eq!(forget_known_server(&path, "a:1").unwrap(), 0);
        assert_eq!(known_servers(&path).unwrap().len(), 1);
    }

    #[test]
    fn self_signed_pair_is_made_once_with_a_private_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let first = server_tls(dir.path(), None).unwrap().fingerprint;
        let mode = fs::metadata(dir.path().join("tls/key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(server_tls(dir.path(), None).unwrap().fingerprint, first);
    }
}
