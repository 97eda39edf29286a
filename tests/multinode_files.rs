//! Files through two servers on one bucket (issue 13): what one node stored, the other
//! serves, and an upload cut on one node resumes on the other. These need the object
//! file storage (branch `s3store`): without it each node keeps files in its own ROOT and
//! they fail, as they should.
#![cfg(feature = "s3")]

mod common;

use common::*;
use netdisk::client::{Client, NoProgress};
use netdisk::server::TlsSetting;
use netdisk::ErrorCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MIB: usize = 1024 * 1024;

async fn node(bucket: &S3Bucket) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let store = bucket.config();
    TestServer::start_with(dir, root, move |config| {
        config.object_store = Some(store);
        config.tls = TlsSetting::Off;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_on_one_node_get_on_the_other() {
    let Some(bucket) = common::s3_bucket() else {
        return;
    };
    let (a, b) = (node(&bucket).await, node(&bucket).await);
    let mut on_a = a.user("dora").await;
    let token = on_a.login("dora", PASSWORD).await.unwrap();
    let data = random_bytes(5 * MIB + 17, 13);
    put_bytes(&mut on_a, a.dir.path(), "report.bin", &data).await;

    let mut on_b = b.client().await;
    on_b.login_with_token(&token).await.unwrap();
    let listing = on_b.list().await.unwrap();
    assert!(
        listing.iter().any(|e| e.name == "report.bin"),
        "{listing:?}"
    );
    let local = b.dir.path().join("report.bin");
    on_b.get("report.bin", &local, false, &mut NoProgress)
        .await
        .unwrap();
    assert!(std::fs::read(&local).unwrap() == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_cut_on_one_node_resumes_on_the_other() {
    let Some(bucket) = common::s3_bucket() else {
        return;
    };
    let (a, b) = (node(&bucket).await, node(&bucket).await);
    let mut on_a = a.user("emil").await;
    let token = on_a.login("emil", PASSWORD).await.unwrap();
    let data = random_bytes(20 * MIB + 5, 14);
    let local = write_file(a.dir.path(), "big.bin", &data);

    // Through a proxy to A that drops the connection after 10 MiB of file data.
    let proxy = cutting_proxy(a.addr, 10 * MIB as u64).await;
    let mut cut = Client::connect(&proxy).await.unwrap();
    cut.login_with_token(&token).await.unwrap();
    assert!(cut
        .put(&local, "big.bin", false, &mut NoProgress)
        .await
        .is_err());

    let mut on_b = b.client().await;
    on_b.login_with_token(&token).await.unwrap();
    let partial = on_b.list_partial().await.unwrap();
    assert!(partial.iter().any(|e| e.name == "big.bin"), "{partial:?}");
    // A notices the cut and gives up its lease a moment later (asynchronously): until
    // then B says Busy. Bounded at 10 s, well under the 60 s lease, so this still checks
    // that the lease is given up early rather than left to expire.
    let mut outcome = None;
    for _ in 0..200 {
        match on_b.put(&local, "big.bin", false, &mut NoProgress).await {
            Ok(done) => {
                outcome = Some(done);
                break;
            }
            Err(e) if e.code() == Some(ErrorCode::Busy) => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
    let outcome = outcome.expect("A never gave up its lease on big.bin");
    assert!(
        outcome.resumed_from >= 4 * MIB as u64,
        "resumed from {}",
        outcome.resumed_from
    );
    let back = b.dir.path().join("back.bin");
    on_b.get("big.bin", &back, false, &mut NoProgress)
        .await
        .unwrap();
    assert!(std::fs::read(&back).unwrap() == data);
}

/// A one-connection proxy to `upstream` that passes frames on until `data_bytes` of
/// `put_data` bodies went through, then closes both sides.
async fn cutting_proxy(upstream: std::net::SocketAddr, data_bytes: u64) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let (client_side, _) = listener.accept().await.unwrap();
        let server_side = TcpStream::connect(upstream).await.unwrap();
        let (mut from_client, mut to_client) = client_side.into_split();
        let (mut from_server, mut to_server) = server_side.into_split();
        let replies = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
        });
        let mut left = data_bytes;
        let mut buf = vec![0u8; 256 * 1024];
        'frames: loop {
            let mut len = [0u8; 4];
            if from_client.read_exact(&mut len).await.is_err() {
                break;
            }
            let mut header = vec![0u8; u32::from_le_bytes(len) as usize];
            if from_client.read_exact(&mut header).await.is_err() {
                break;
            }
            let json: serde_json::Value = serde_json::from_slice(&header).unwrap();
            let is_data = json["cmd"] == "put_data";
            let mut body = json["filesize"].as_u64().unwrap_or(0);
            if to_server.write_all(&len).await.is_err()
                || to_server.write_all(&header).await.is_err()
            {
                break;
            }
            while body > 0 {
                let mut want = body.min(buf.len() as u64);
                if is_data {
                    want = want.min(left);
                }
                if want == 0 {
                    break 'frames;
                }
                let n = match from_client.read(&mut buf[..want as usize]).await {
                    Ok(0) | Err(_) => break 'frames,
                    Ok(n) => n,
                };
                if to_server.write_all(&buf[..n]).await.is_err() {
                    break 'frames;
                }
                body -= n as u64;
                if is_data {
                    left -= n as u64;
                }
            }
        }
        let _ = to_server.shutdown().await;
        replies.abort();
    });
    addr
}
