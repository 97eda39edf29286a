//! Two servers on one bucket (issue 13): what one node knows about users, sessions, the
//! server secret and the TLS certificate, the other knows at once. Both are real servers
//! (in this process, each with its own ROOT) on a real S3-compatible server (moto).
#![cfg(feature = "s3")]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use calamine::{Data, Reader, Xlsx};
use common::*;
use netdisk::client::Client;
use netdisk::protocol::encode_header;
use netdisk::scram::MIN_ITERATIONS;
use netdisk::server::TlsSetting;
use netdisk::ErrorCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A server node on the bucket, with its own ROOT (as on its own machine).
async fn node(bucket: &S3Bucket, tls: TlsSetting) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let store = bucket.config();
    TestServer::start_with(dir, root, move |config| {
        config.object_store = Some(store);
        config.tls = tls;
        // All test clients come from 127.0.0.1.
        config.registration_burst = 1000;
    })
    .await
}

async fn two_nodes() -> Option<(S3Bucket, TestServer, TestServer)> {
    let bucket = common::s3_bucket()?;
    let a = node(&bucket, TlsSetting::Off).await;
    let b = node(&bucket, TlsSetting::Off).await;
    Some((bucket, a, b))
}

/// users.xlsx as it is in the bucket.
async fn table_in_bucket(bucket: &S3Bucket) -> Vec<u8> {
    let op = bucket.config().operator().unwrap();
    op.read("users.xlsx").await.unwrap().to_vec()
}

fn names_in(xlsx: &[u8]) -> Vec<String> {
    let mut book = Xlsx::new(std::io::Cursor::new(xlsx.to_vec())).unwrap();
    let range = book.worksheet_range("users").unwrap();
    range
        .rows()
        .skip(1)
        .map(|row| match &row[0] {
            Data::String(name) => name.clone(),
            other => panic!("name cell {other:?}"),
        })
        .collect()
}

fn auth_failed(result: netdisk::Result<String>) -> bool {
    matches!(result, Err(e) if e.code() == Some(ErrorCode::AuthFailed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_on_one_node_logs_in_on_the_other_at_once() {
    let Some((bucket, a, b)) = two_nodes().await else {
        return;
    };
    // B has read the table before the user exists (its cached copy must not win).
    let mut on_b = b.client().await;
    assert!(on_b.login("alice", PASSWORD).await.is_err());

    let mut on_a = a.client().await;
    on_a.register("alice", PASSWORD, MIN_ITERATIONS)
        .await
        .unwrap();
    let mut on_b = b.client().await;
    on_b.login("alice", PASSWORD).await.unwrap();
    assert_eq!(on_b.whoami().await.unwrap(), "alice");
    // A wrong password is still refused there.
    let mut wrong = b.client().await;
    assert!(wrong.login("alice", "not the password").await.is_err());
    // The name is taken on every node.
    let mut again = b.client().await;
    let taken = again.register("alice", PASSWORD, MIN_ITERATIONS).await;
    assert!(
        matches!(&taken, Err(e) if e.code() == Some(ErrorCode::NameTaken)),
        "{taken:?}"
    );
    assert_eq!(names_in(&table_in_bucket(&bucket).await), ["alice"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_from_one_node_resumes_on_the_other_until_logout_or_passwd() {
    let Some((_bucket, a, b)) = two_nodes().await else {
        return;
    };
    let mut on_a = a.user("bob").await;
    let first = on_a.login("bob", PASSWORD).await.unwrap();
    let mut other_device = a.client().await;
    let second = other_device.login("bob", PASSWORD).await.unwrap();

    let mut on_b = b.client().await;
    assert_eq!(on_b.login_with_token(&first).await.unwrap(), "bob");
    let mut on_b2 = b.client().await;
    assert_eq!(on_b2.login_with_token(&second).await.unwrap(), "bob");
    assert!(auth_failed(
        b.client().await.login_with_token("bob:0123abcd").await
    ));
    assert!(auth_failed(
        b.client().await.login_with_token("nonsense").await
    ));

    // Logout on A ends that session on B.
    on_a.logout().await.unwrap();
    assert!(auth_failed(b.client().await.login_with_token(&first).await));
    assert_eq!(
        b.client().await.login_with_token(&second).await.unwrap(),
        "bob"
    );

    // A password change on A (other sessions end) ends them on B, and the new
    // password works on B at once.
    let (_, fresh) = other_device
        .change_password(PASSWORD, "a new password", MIN_ITERATIONS, false)
        .await
        .unwrap();
    assert!(auth_failed(
        b.client().await.login_with_token(&second).await
    ));
    assert_eq!(
        b.client().await.login_with_token(&fresh).await.unwrap(),
        "bob"
    );
    let mut third = b.client().await;
    third.login("bob", "a new password").await.unwrap();
    assert!(b.client().await.login("bob", PASSWORD).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_change_ends_a_session_on_the_other_node() {
    let Some((_bucket, a, b)) = two_nodes().await else {
        return;
    };
    let mut on_a = a.user("carol").await;
    let mut laptop = b.client().await;
    let on_b_token = laptop.login("carol", PASSWORD).await.unwrap();
    assert_eq!(
        b.client()
            .await
            .login_with_token(&on_b_token)
            .await
            .unwrap(),
        "carol"
    );
    on_a.change_password(PASSWORD, "carol's new one", MIN_ITERATIONS, false)
        .await
        .unwrap();
    assert!(auth_failed(
        b.client().await.login_with_token(&on_b_token).await
    ));
    assert!(auth_failed(
        a.client().await.login_with_token(&on_b_token).await
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_registering_50_users_at_once_lose_none() {
    let Some((bucket, a, b)) = two_nodes().await else {
        return;
    };
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..50 {
        let addr = if i % 2 == 0 {
            a.addr_string()
        } else {
            b.addr_string()
        };
        tasks.spawn(async move {
            let mut client = Client::connect(&addr).await.unwrap();
            client
                .register(&format!("user{i:02}"), PASSWORD, MIN_ITERATIONS)
                .await
                .unwrap_or_else(|e| panic!("user{i:02} on {addr}: {e}"));
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let expected: BTreeSet<String> = (0..50).map(|i| format!("user{i:02}")).collect();
    let xlsx = table_in_bucket(&bucket).await;
    let names: BTreeSet<String> = names_in(&xlsx).into_iter().collect();
    assert_eq!(names, expected);
    // Every one of them can log in on either node.
    for i in [0, 1, 48, 49] {
        for node in [&a, &b] {
            let mut client = node.client().await;
            client
                .login(&format!("user{i:02}"), PASSWORD)
                .await
                .unwrap();
        }
    }
    // An independent reader (openpyxl, what the owner's scripts use) agrees.
    let file = a.dir.path().join("from-bucket.xlsx");
    std::fs::write(&file, &xlsx).unwrap();
    let script = "import sys, openpyxl\n\
                  rows = list(openpyxl.load_workbook(sys.argv[1])['users'].iter_rows(values_only=True))\n\
                  print(rows[0][0], len(rows) - 1, len({r[0] for r in rows[1:]}))\n";
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(&file)
        .output();
    match out {
        Ok(out) if out.status.success() => {
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "name 50 50");
        }
        _ => {
            assert!(
                std::env::var_os("NETDISK_TEST_REQUIRE_OPENPYXL").is_none(),
                "python3 with openpyxl is required"
            );
            eprintln!("skipped the openpyxl check: python3 with openpyxl is not installed");
        }
    }
}

/// The `s=` and `i=` of the server-first message a login for `user` gets.
async fn salt_offered(addr: &str, user: &str) -> String {
    let mut socket = TcpStream::connect(addr).await.unwrap();
    let mut bytes = encode_header(&serde_json::json!({"cmd": "hello", "version": 1})).unwrap();
    bytes.extend(
        encode_header(&serde_json::json!({
            "cmd": "auth_start",
            "message": format!("n,,n={user},r=clientnonce0123456789"),
        }))
        .unwrap(),
    );
    socket.write_all(&bytes).await.unwrap();
    let mut replies = Vec::new();
    for _ in 0..2 {
        let mut len = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(30), socket.read_exact(&mut len))
            .await
            .unwrap()
            .unwrap();
        let mut header = vec![0u8; u32::from_le_bytes(len) as usize];
        socket.read_exact(&mut header).await.unwrap();
        replies.push(serde_json::from_slice::<serde_json::Value>(&header).unwrap());
    }
    let message = replies[1]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("auth_start reply: {}", replies[1]));
    message
        .split(',')
        .filter(|part| part.starts_with("s=") || part.starts_with("i="))
        .collect::<Vec<_>>()
        .join(",")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_user_gets_the_same_fake_salt_on_both_nodes() {
    let Some((bucket, a, b)) = two_nodes().await else {
        return;
    };
    let on_a = salt_offered(&a.addr_string(), "ghost").await;
    assert!(on_a.starts_with("s="), "{on_a}");
    assert_eq!(on_a, salt_offered(&b.addr_string(), "ghost").await);
    // ... and a node started later, elsewhere, agrees too: the secret is the bucket's.
    let c = node(&bucket, TlsSetting::Off).await;
    assert_eq!(on_a, salt_offered(&c.addr_string(), "ghost").await);
    // Another name gets another salt (it is not one constant).
    assert_ne!(on_a, salt_offered(&a.addr_string(), "phantom").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_nodes_present_the_same_certificate() {
    let Some(bucket) = common::s3_bucket() else {
        return;
    };
    // Started together: one makes the certificate, the other must take the winner's.
    let (a, b) = tokio::join!(
        node(&bucket, TlsSetting::SelfSigned),
        node(&bucket, TlsSetting::SelfSigned)
    );
    let fingerprint = a.fingerprint.clone().unwrap();
    assert_eq!(b.fingerprint.as_deref(), Some(fingerprint.as_str()));
    // A client that pinned A on first use connects to B without a warning.
    let known = a.dir.path().join("known_servers");
    let options = netdisk::client::ConnectOptions {
        tls: Some(netdisk::tls::ClientTls::Pinned {
            known_servers: known.clone(),
        }),
        secret: None,
    };
    let first = Client::connect_with(&a.addr_string(), &options)
        .await
        .unwrap();
    assert_eq!(first.newly_pinned(), Some(fingerprint.as_str()));
    // Pinning is per address: record B's address under A's fingerprint, as a load
    // balancer's single address would be, and B must match it.
    let pinned = std::fs::read_to_string(&known).unwrap();
    std::fs::write(&known, pinned.replace(&a.addr_string(), &b.addr_string())).unwrap();
    let second = Client::connect_with(&b.addr_string(), &options)
        .await
        .unwrap();
    assert_eq!(second.newly_pinned(), None);
    // The private key is in the bucket (documented): protect the bucket.
    let op = bucket.config().operator().unwrap();
    let pem = op.read("tls/self-signed.pem").await.unwrap().to_vec();
    assert!(String::from_utf8_lossy(&pem).contains("PRIVATE KEY"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_on_the_bucket_acts_on_every_node() {
    let Some((bucket, a, b)) = two_nodes().await else {
        return;
    };
    let mut on_a = a.user("fay").await;
    let token = on_a.login("fay", PASSWORD).await.unwrap();
    let admin = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_netdisk"));
        cmd.args(["admin", "--storage", &bucket.url("netdisk")])
            .args(args)
            .envs(bucket.env())
            .env_remove("RUST_LOG");
        cmd
    };
    let listed = run(admin(&["users", "--json"])).await;
    assert!(listed.status.success(), "{}", stderr(&listed));
    assert!(String::from_utf8_lossy(&listed.stdout).contains("\"fay\""));

    let disabled = run(admin(&["disable", "fay"])).await;
    assert!(disabled.status.success(), "{}", stderr(&disabled));
    for node in [&a, &b] {
        assert!(auth_failed(
            node.client().await.login_with_token(&token).await
        ));
        assert!(node.client().await.login("fay", PASSWORD).await.is_err());
    }
    // A wrong bucket prefix is refused, not shown as an empty table.
    let mut wrong = std::process::Command::new(env!("CARGO_BIN_EXE_netdisk"));
    wrong
        .args(["admin", "--storage", &bucket.url("elsewhere"), "users"])
        .envs(bucket.env());
    let wrong = run(wrong).await;
    assert!(!wrong.status.success());
    assert!(
        stderr(&wrong).contains("no user table"),
        "{}",
        stderr(&wrong)
    );
}
