//! Bad frames from one client never hurt another; many clients at once.

mod common;

use std::time::Duration;

use common::*;
use netdisk::client::NoProgress;
use netdisk::protocol::{encode_header, MAX_HEADER_LEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Send raw bytes and read whatever comes back until the server closes (bounded).
async fn raw_exchange(server: &TestServer, bytes: &[u8]) -> Vec<u8> {
    let mut socket = TcpStream::connect(server.addr).await.unwrap();
    socket.write_all(bytes).await.unwrap();
    socket.shutdown().await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut reply))
        .await
        .expect("server closes the connection")
        .unwrap();
    reply
}

fn hello() -> Vec<u8> {
    encode_header(&serde_json::json!({"cmd": "hello", "version": 1})).unwrap()
}

/// The JSON headers of all frames in `bytes` (bodies skipped).
fn replies(bytes: &[u8]) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 4 {
        let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        let header: serde_json::Value = serde_json::from_slice(&rest[4..4 + len]).unwrap();
        let body = header["filesize"].as_u64().unwrap_or(0) as usize;
        rest = &rest[4 + len + body..];
        out.push(header);
    }
    out
}

async fn still_serves(server: &TestServer) {
    let mut client = server.client().await;
    client.login("keeper", PASSWORD).await.unwrap();
    let listing = client.list().await.unwrap();
    assert_eq!(listing.len(), 1);
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("k");
    client
        .get("keep.txt", &out, false, &mut NoProgress)
        .await
        .unwrap();
    assert_eq!(std::fs::read(out).unwrap(), b"kept");
}

async fn server_with_keeper() -> TestServer {
    let server = TestServer::start().await;
    let mut keeper = server.user("keeper").await;
    let work = tempfile::tempdir().unwrap();
    put_bytes(&mut keeper, work.path(), "keep.txt", b"kept").await;
    server
}

#[tokio::test]
async fn oversized_header_is_refused_and_closed() {
    let server = server_with_keeper().await;
    let mut bytes = hello();
    bytes.extend_from_slice(&((MAX_HEADER_LEN as u32) + 1).to_le_bytes());
    let got = replies(&raw_exchange(&server, &bytes).await);
    assert_eq!(got.len(), 2);
    assert_eq!(got[1]["ok"], false);
    assert_eq!(got[1]["code"], "bad_request");
    // A 4 GiB announcement too: refused before any allocation.
    let replies_huge = raw_exchange(&server, &[hello(), vec![0xff; 4]].concat()).await;
    assert_eq!(replies(&replies_huge)[1]["code"], "bad_request");
    still_serves(&server).await;
}

#[tokio::test]
async fn invalid_json_and_unknown_commands() {
    let server = server_with_keeper().await;
    let mut bytes = hello();
    // An unknown command is answered and the connection stays usable...
    bytes.extend(encode_header(&serde_json::json!({"cmd": "rm", "filename": "x"})).unwrap());
    bytes.extend(encode_header(&serde_json::json!({"no_cmd": true})).unwrap());
    bytes.extend(encode_header(&serde_json::json!({"cmd": "quit"})).unwrap());
    let got = replies(&raw_exchange(&server, &bytes).await);
    assert_eq!(got.len(), 4, "{got:?}");
    assert_eq!(got[1]["code"], "bad_request");
    assert_eq!(got[2]["code"], "bad_request");
    assert_eq!(got[3]["ok"], true);

    // ...invalid JSON is answered, then the connection is closed.
    let mut bytes = hello();
    bytes.extend_from_slice(&5u32.to_le_bytes());
    bytes.extend_from_slice(b"{nope");
    let got = replies(&raw_exchange(&server, &bytes).await);
    assert_eq!(got.last().unwrap()["code"], "bad_request");
    still_serves(&server).await;
}

#[tokio::test]
async fn hello_must_come_first_and_versions_must_match() {
    let server = server_with_keeper().await;
    let ls = encode_header(&serde_json::json!({"cmd": "ls"})).unwrap();
    let got = replies(&raw_exchange(&server, &ls).await);
    assert_eq!(got[0]["code"], "bad_request");
    let v2 = encode_header(&serde_json::json!({"cmd": "hello", "version": 2})).unwrap();
    let got = replies(&raw_exchange(&server, &[v2.clone(), ls].concat()).await);
    assert_eq!(got.len(), 1, "closed after the version error");
    assert_eq!(got[0]["code"], "unsupported_version");
    still_serves(&server).await;
}

#[tokio::test]
async fn body_shorter_than_announced_leaves_no_file() {
    let server = server_with_keeper().await;
    let mut client = server.client().await;
    let token = client.login("keeper", PASSWORD).await.unwrap();
    drop(client);
    let mut bytes = hello();
    bytes.extend(encode_header(&serde_json::json!({"cmd": "auth_token", "token": token})).unwrap());
    bytes.extend(
        encode_header(&serde_json::json!({"cmd": "put", "filename": "cut.bin", "size": 2_000_000}))
            .unwrap(),
    );
    bytes.extend(
        encode_header(&serde_json::json!({"cmd": "put_data", "offset": 0, "filesize": 2_000_000}))
            .unwrap(),
    );
    bytes.extend_from_slice(&[7u8; 400]);
    let got = replies(&raw_exchange(&server, &bytes).await);
    assert_eq!(
        got.len(),
        3,
        "hello, auth, put answered; then the cut: {got:?}"
    );
    assert!(!server.user_file("keeper", "cut.bin").exists());
    let mut client = server.client().await;
    client.login("keeper", PASSWORD).await.unwrap();
    let partial = client.list_partial().await.unwrap();
    assert_eq!(partial.len(), 1);
    assert_eq!((partial[0].received, partial[0].size), (400, 2_000_000));
    still_serves(&server).await;
}

#[tokio::test]
async fn data_at_a_wrong_offset_is_a_conflict() {
    let server = server_with_keeper().await;
    let mut client = server.client().await;
    let token = client.login("keeper", PASSWORD).await.unwrap();
    let mut bytes = hello();
    bytes.extend(encode_header(&serde_json::json!({"cmd": "auth_token", "token": token})).unwrap());
    bytes.extend(
        encode_header(&serde_json::json!({"cmd": "put", "filename": "x", "size": 10})).unwrap(),
    );
    bytes.extend(
        encode_header(&serde_json::json!({"cmd": "put_data", "offset": 5, "filesize": 5})).unwrap(),
    );
    bytes.extend_from_slice(b"12345");
    bytes.extend(encode_header(&serde_json::json!({"cmd": "ls"})).unwrap());
    let got = replies(&raw_exchange(&server, &bytes).await);
    assert_eq!(got[3]["code"], "conflict");
    assert_eq!(got[4]["ok"], true, "still in step after the refused body");
    assert!(!server.user_file("keeper", "x").exists());
}

#[tokio::test]
async fn random_garbage_then_a_good_client() {
    let server = server_with_keeper().await;
    for seed in 0..50u64 {
        let mut bytes = hello();
        let len = (seed * 37 % 300) as usize;
        bytes.extend(random_bytes(len, seed));
        raw_exchange(&server, &bytes).await;
        // Truncated valid frames too.
        let frame = encode_header(&serde_json::json!({"cmd": "ls"})).unwrap();
        raw_exchange(
            &server,
            &[hello(), frame[..(seed as usize % frame.len())].to_vec()].concat(),
        )
        .await;
    }
    still_serves(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let server = TestServer::start_with(dir, root, |c| c.registration_burst = 50).await;
    let addr = server.addr_string();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let addr = addr.clone();
        tasks.push(tokio::spawn(async move {
            let work = tempfile::tempdir().unwrap();
            let mut client = netdisk::client::Client::connect(&addr).await.unwrap();
            let user = format!("u{i}");
            client
                .register(&user, PASSWORD, netdisk::scram::MIN_ITERATIONS)
                .await
                .unwrap();
            client.login(&user, PASSWORD).await.unwrap();
            let data = random_bytes(100_000 + i * 1000, i as u64);
            put_bytes(&mut client, work.path(), "mine.bin", &data).await;
            let out = work.path().join("back");
            client
                .get("mine.bin", &out, false, &mut NoProgress)
                .await
                .unwrap();
            assert!(std::fs::read(&out).unwrap() == data);
            let names: Vec<_> = client
                .list()
                .await
                .unwrap()
                .into_iter()
                .map(|e| e.name)
                .collect();
            assert_eq!(names, ["mine.bin"]);
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test]
async fn a_silent_client_does_not_stall_others() {
    let server = server_with_keeper().await;
    // Half a header, then nothing: the server must keep serving others meanwhile.
    let mut stalled = TcpStream::connect(server.addr).await.unwrap();
    stalled.write_all(&hello()[..3]).await.unwrap();
    still_serves(&server).await;
    drop(stalled);
}

#[tokio::test]
async fn idle_connections_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let server = TestServer::start_with(dir, root, |c| {
        c.handshake_timeout = Duration::from_millis(200);
    })
    .await;
    let mut slowloris = TcpStream::connect(server.addr).await.unwrap();
    slowloris.write_all(&hello()[..3]).await.unwrap();
    let mut rest = Vec::new();
    let read =
        tokio::time::timeout(Duration::from_secs(10), slowloris.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the server closed the half-sent connection");
}

#[tokio::test]
async fn connection_limit_refuses_politely() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let server = TestServer::start_with(dir, root, |c| c.max_connections = 1).await;
    let _first = server.client().await;
    let err = netdisk::client::Client::connect(&server.addr_string())
        .await
        .err()
        .unwrap();
    assert_eq!(
        err.code(),
        Some(netdisk::ErrorCode::TooManyRequests),
        "{err}"
    );
}

/// Thousands of random and truncated frames against the real binary (TLS off, so the bytes
/// reach the frame decoder), then a well-behaved client; the server's open file
/// descriptors return to where they were: nothing leaked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_bad_frames_leak_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let server = ServerProcess::spawn(&root, &[]);
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", server.child.id()))
            .unwrap()
            .count()
    };
    let mut client = netdisk::client::Client::connect(&server.addr)
        .await
        .unwrap();
    client
        .register("survivor", PASSWORD, netdisk::scram::MIN_ITERATIONS)
        .await
        .unwrap();
    drop(client);
    let baseline = fds();

    let addr: std::net::SocketAddr = server.addr.parse().unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for seed in 0..2000u64 {
        if tasks.len() >= 32 {
            tasks.join_next().await;
        }
        tasks.spawn(async move {
            let Ok(mut socket) = TcpStream::connect(addr).await else {
                return;
            };
            let mut bytes = if seed % 3 == 0 { Vec::new() } else { hello() };
            match seed % 4 {
                0 => bytes.extend(random_bytes((seed % 200) as usize, seed)),
                1 => {
                    let frame = encode_header(
                        &serde_json::json!({"cmd": "put", "filename": "x", "size": seed}),
                    )
                    .unwrap();
                    bytes.extend_from_slice(&frame[..frame.len() - 1 - (seed as usize % 5)]);
                }
                2 => {
                    bytes.extend_from_slice(&(seed as u32 * 7919).to_le_bytes());
                    bytes.extend(random_bytes(20, seed));
                }
                _ => bytes.extend(
                    encode_header(
                        &serde_json::json!({"cmd": "get", "filename": "../../etc/passwd"}),
                    )
                    .unwrap(),
                ),
            }
            let _ = socket.write_all(&bytes).await;
            let _ = socket.shutdown().await;
            let mut sink = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(20), socket.read_to_end(&mut sink)).await;
        });
    }
    while tasks.join_next().await.is_some() {}

    let mut client = netdisk::client::Client::connect(&server.addr)
        .await
        .unwrap();
    client.login("survivor", PASSWORD).await.unwrap();
    let work = tempfile::tempdir().unwrap();
    put_bytes(&mut client, work.path(), "still.txt", b"serving").await;
    assert_eq!(client.list().await.unwrap().len(), 1);
    drop(client);
    // Every bad connection was answered and closed by the server before its client
    // finished reading, so only the last good client's socket may still be closing.
    let mut now = fds();
    for _ in 0..100 {
        if now <= baseline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
        now = fds();
    }
    assert!(now <= baseline, "{now} open descriptors, {baseline} before");
}

/// Under `ulimit -n 256` the server does not promise 1024 connections it cannot open: it
/// raises the soft limit to the hard one and lowers `--max-connections` to fit, saying so.
#[tokio::test]
async fn max_connections_fit_the_open_file_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c").arg(format!(
        "ulimit -Sn 100; ulimit -Hn 256; exec '{}' serve --no-tls --listen 127.0.0.1:0 \
             --max-connections 1024 --root '{}'",
        env!("CARGO_BIN_EXE_netdisk"),
        dir.path().join("root").display()
    ));
    let server = ServerProcess::spawn_command(cmd);
    let log = server.log.lock().unwrap().clone();
    assert!(log.contains("--max-connections lowered"), "{log}");
    // (256 - 64 reserved) / 4 descriptors per connection: the soft limit was raised to 256.
    assert!(log.contains("allowed=48"), "{log}");
    let mut client = netdisk::client::Client::connect(&server.addr)
        .await
        .unwrap();
    client
        .register("fd", PASSWORD, netdisk::scram::MIN_ITERATIONS)
        .await
        .unwrap();
}
