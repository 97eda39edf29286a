//! Transport security and the connection check: TLS by default with pinning or a CA,
//! the HMAC check of the tutorials, failed-login throttling, and what crosses the wire.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use netdisk::client::{Client, ConnectOptions, NoProgress};
use netdisk::scram::MIN_ITERATIONS;
use netdisk::server::TlsSetting;
use netdisk::tls::ClientTls;
use netdisk::ErrorCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn pinned(known_servers: &Path) -> ConnectOptions {
    ConnectOptions {
        tls: Some(ClientTls::Pinned {
            known_servers: known_servers.to_path_buf(),
        }),
        secret: None,
    }
}

#[tokio::test]
async fn tls_pins_on_first_use_and_refuses_a_changed_certificate() {
    let server = TestServer::start_tls().await;
    let config = tempfile::tempdir().unwrap();
    let known = config.path().join("known_servers");
    let addr = server.addr_string();

    let first = Client::connect_with(&addr, &pinned(&known)).await.unwrap();
    assert_eq!(first.newly_pinned(), server.fingerprint.as_deref());
    let recorded = std::fs::read_to_string(&known).unwrap();
    assert!(recorded.contains(server.fingerprint.as_deref().unwrap()));
    let mut again = Client::connect_with(&addr, &pinned(&known)).await.unwrap();
    assert_eq!(again.newly_pinned(), None);
    again
        .register("tls-user", PASSWORD, MIN_ITERATIONS)
        .await
        .unwrap();

    // The server gets a new certificate (its key was replaced): refused, both fingerprints named.
    let old = server.fingerprint.clone().unwrap();
    let (dir, root) = server.stop().await;
    std::fs::remove_dir_all(root.join("tls")).unwrap();
    let same_addr = addr.clone();
    let server = TestServer::start_with(dir, root, |c| {
        c.tls = TlsSetting::SelfSigned;
        c.listen = same_addr;
    })
    .await;
    let new = server.fingerprint.clone().unwrap();
    assert_ne!(old, new);
    let err = Client::connect_with(&server.addr_string(), &pinned(&known))
        .await
        .err()
        .expect("a changed certificate must be refused");
    let message = err.to_string();
    for part in [old.as_str(), new.as_str(), "known_servers", "WARNING"] {
        assert!(message.contains(part), "{part} missing in: {message}");
    }
}

#[tokio::test]
async fn plain_client_against_tls_server_gets_a_clear_error() {
    let server = TestServer::start_tls().await;
    let err = Client::connect(&server.addr_string()).await.err().unwrap();
    assert!(err.to_string().contains("TLS"), "{err}");
}

/// A CA and a server certificate it signed for 127.0.0.1, as PEM files.
fn make_ca_and_server_cert(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

#[tokio::test]
async fn a_real_certificate_is_verified_with_the_ca() {
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_ca_and_server_cert(certs.path());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let server =
        TestServer::start_with(dir, root, |c| c.tls = TlsSetting::Files { cert, key }).await;
    let with_ca = ConnectOptions {
        tls: Some(ClientTls::Ca { ca_file: ca }),
        secret: None,
    };
    let mut client = Client::connect_with(&server.addr_string(), &with_ca)
        .await
        .unwrap();
    client
        .register("ca-user", PASSWORD, MIN_ITERATIONS)
        .await
        .unwrap();

    // Another CA does not vouch for this server.
    let other = tempfile::tempdir().unwrap();
    let (other_ca, _, _) = make_ca_and_server_cert(other.path());
    let with_other = ConnectOptions {
        tls: Some(ClientTls::Ca { ca_file: other_ca }),
        secret: None,
    };
    assert!(Client::connect_with(&server.addr_string(), &with_other)
        .await
        .is_err());
}

#[tokio::test]
async fn tls_hides_file_contents_and_the_password_never_crosses_the_wire() {
    for tls in [false, true] {
        let server = if tls {
            TestServer::start_tls().await
        } else {
            TestServer::start().await
        };
        let (proxy_addr, recorded) = recording_proxy(server.addr).await;
        let config = tempfile::tempdir().unwrap();
        let options = if tls {
            pinned(&config.path().join("known_servers"))
        } else {
            ConnectOptions::default()
        };
        let mut client = Client::connect_with(&proxy_addr, &options).await.unwrap();
        client
            .register("wire", PASSWORD, MIN_ITERATIONS)
            .await
            .unwrap();
        client.login("wire", PASSWORD).await.unwrap();
        let work = tempfile::tempdir().unwrap();
        let marker = b"THE-SECRET-FILE-CONTENT-0123456789".repeat(100);
        put_bytes(&mut client, work.path(), "marker.txt", &marker).await;
        client.quit().await.unwrap();

        let bytes = recorded.await.unwrap();
        let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        assert!(
            !contains(PASSWORD.as_bytes()),
            "password on the wire (tls={tls})"
        );
        assert_eq!(contains(b"THE-SECRET-FILE-CONTENT"), !tls, "tls={tls}");
    }
}

/// A TCP proxy for one connection that records what the client sent.
async fn recording_proxy(
    target: std::net::SocketAddr,
) -> (String, tokio::task::JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let task = tokio::spawn(async move {
        let (mut client, _) = listener.accept().await.unwrap();
        let mut server = TcpStream::connect(target).await.unwrap();
        let (mut client_read, mut client_write) = client.split();
        let (mut server_read, mut server_write) = server.split();
        let upstream = async {
            let mut seen = Vec::new();
            let mut buf = vec![0u8; 65536];
            loop {
                let n = client_read.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    let _ = server_write.shutdown().await;
                    return seen;
                }
                seen.extend_from_slice(&buf[..n]);
                if server_write.write_all(&buf[..n]).await.is_err() {
                    return seen;
                }
            }
        };
        let downstream = async {
            let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
            let _ = client_write.shutdown().await;
        };
        let (seen, ()) = tokio::join!(upstream, downstream);
        seen
    });
    (addr, task)
}

#[tokio::test]
async fn connection_check_with_a_shared_secret() {
    let secret = b"a shared secret of the deployment".to_vec();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let expected = secret.clone();
    let server = TestServer::start_with(dir, root, move |c| c.secret = Some(expected)).await;
    let addr = server.addr_string();

    let right = ConnectOptions {
        tls: None,
        secret: Some(secret),
    };
    let mut client = Client::connect_with(&addr, &right).await.unwrap();
    client
        .register("checked", PASSWORD, MIN_ITERATIONS)
        .await
        .unwrap();

    let wrong = ConnectOptions {
        tls: None,
        secret: Some(b"not the shared secret at all".to_vec()),
    };
    assert!(Client::connect_with(&addr, &wrong).await.is_err());
    let none = Client::connect(&addr).await.err().unwrap();
    assert!(none.to_string().contains("--secret-file"), "{none}");

    // A wrong answer on the raw socket: the challenge, then silence and a close.
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    let mut len = [0u8; 4];
    socket.read_exact(&mut len).await.unwrap();
    let mut challenge = vec![0u8; u32::from_le_bytes(len) as usize];
    socket.read_exact(&mut challenge).await.unwrap();
    assert!(String::from_utf8_lossy(&challenge).contains("\"challenge\""));
    let answer = netdisk::protocol::encode_header(
        &serde_json::json!({"cmd": "challenge_response", "hmac": "00".repeat(32)}),
    )
    .unwrap();
    socket.write_all(&answer).await.unwrap();
    let mut rest = Vec::new();
    socket.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "no reply at all to a wrong answer");
}

#[tokio::test]
async fn failed_logins_are_throttled() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    client
        .register("target", PASSWORD, MIN_ITERATIONS)
        .await
        .unwrap();
    for _ in 0..3 {
        let err = server
            .client()
            .await
            .login("target", "guess")
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::AuthFailed));
    }
    // Now even the right password must wait.
    let err = server
        .client()
        .await
        .login("target", PASSWORD)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::TooManyRequests), "{err}");
    assert!(err.to_string().contains("try again"));
}

#[tokio::test]
async fn an_upload_over_tls_round_trips() {
    let server = TestServer::start_tls().await;
    let config = tempfile::tempdir().unwrap();
    let options = pinned(&config.path().join("known_servers"));
    let mut client = Client::connect_with(&server.addr_string(), &options)
        .await
        .unwrap();
    client
        .register("tlsfiles", PASSWORD, MIN_ITERATIONS)
        .await
        .unwrap();
    client.login("tlsfiles", PASSWORD).await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let data = random_bytes(9_000_000, 77);
    put_bytes(&mut client, work.path(), "t.bin", &data).await;
    let out = work.path().join("t.out");
    client
        .get("t.bin", &out, false, &mut NoProgress)
        .await
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == data);
}
