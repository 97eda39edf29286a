//! Folder operations against what can go wrong: symbolic links planted on the server's
//! disk, a file removed while it is downloaded, `mv` racing an upload, the quota with
//! versions, and `kill -9` in the middle of `rm -r` and `mv`.

mod common;

use std::path::Path;

use common::*;
use netdisk::client::{Client, NoProgress};
use netdisk::protocol::{Connection, GetReply, PutReply, Request};
use netdisk::scram::MIN_ITERATIONS;
use netdisk::ErrorCode;

/// A raw connection logged in with `token`.
async fn raw(addr: &str, token: &str) -> Connection {
    let socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut conn = Connection::new(socket);
    let _: serde_json::Value = conn
        .call(&Request::Hello {
            version: netdisk::protocol::PROTOCOL_VERSION,
            client: "test".into(),
        })
        .await
        .unwrap();
    let _: serde_json::Value = conn
        .call(&Request::AuthToken {
            token: token.into(),
        })
        .await
        .unwrap();
    conn
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn symlinks_planted_by_the_host_are_never_followed() {
    let server = TestServer::start().await;
    let mut client = server.user("sam").await;
    let work = tempfile::tempdir().unwrap();
    put_path(&mut client, work.path(), "a/b/real.txt", b"real").await;

    // Outside the user's folder: must stay untouched whatever the user sends.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.txt"), b"host secret").unwrap();
    let home = server.root.join("files/sam");
    std::os::unix::fs::symlink(outside.path(), home.join("top-link")).unwrap();
    std::os::unix::fs::symlink(outside.path(), home.join("a/b/deep-link")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret.txt"), home.join("a/file-link"))
        .unwrap();

    // Listings do not show links.
    let listed: Vec<String> = client
        .list_dir("a/b")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(listed, ["real.txt"]);

    let refused = |e: netdisk::Error| {
        assert!(
            matches!(
                e.code(),
                Some(ErrorCode::NotFound | ErrorCode::WrongType | ErrorCode::BadName)
            ),
            "{e}"
        );
    };
    for path in [
        "top-link/secret.txt",
        "a/b/deep-link/secret.txt",
        "a/file-link",
    ] {
        let local = work.path().join("got");
        refused(
            client
                .get(path, &local, true, &mut NoProgress)
                .await
                .unwrap_err(),
        );
        refused(client.stat(path, false).await.unwrap_err());
    }
    refused(client.list_dir("top-link").await.unwrap_err());
    refused(client.list_dir("a/b/deep-link").await.unwrap_err());
    refused(client.mkdir("top-link/made", false).await.unwrap_err());
    refused(client.mkdir("a/b/deep-link/made", true).await.unwrap_err());
    refused(
        client
            .mv("a/b/real.txt", "top-link/moved.txt", false)
            .await
            .unwrap_err(),
    );
    refused(client.rm("top-link/secret.txt", false).await.unwrap_err());
    refused(client.rm("a/b/deep-link", true).await.unwrap_err());
    let local = write_file(work.path(), "evil.txt", b"planted");
    refused(
        client
            .put(&local, "a/b/deep-link/evil.txt", false, &mut NoProgress)
            .await
            .unwrap_err(),
    );
    // Uploading to the link's own path may replace the link with a file; it never writes
    // through it.
    let _ = client
        .put(&local, "a/file-link", false, &mut NoProgress)
        .await;

    assert_eq!(entries(outside.path()), ["secret.txt"]);
    assert_eq!(
        std::fs::read(outside.path().join("secret.txt")).unwrap(),
        b"host secret"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_removed_during_its_download_arrives_whole() {
    let server = TestServer::start().await;
    let mut client = server.user("dora").await;
    let work = tempfile::tempdir().unwrap();
    let data = random_bytes(12 * 1024 * 1024 + 77, 5);
    put_path(&mut client, work.path(), "big.bin", &data).await;
    let token = client.login("dora", PASSWORD).await.unwrap();

    let mut conn = raw(&server.addr_string(), &token).await;
    let reply: GetReply = conn
        .call(&Request::Get {
            filename: "big.bin".into(),
            offset: 0,
            check_chunk: None,
        })
        .await
        .unwrap();
    let mut body = vec![0u8; reply.filesize as usize];
    let (first, rest) = body.split_at_mut(1024 * 1024);
    conn.read_body(first).await.unwrap();
    // Removed and then overwritten while the body is on its way.
    client.rm("big.bin", false).await.unwrap();
    put_path(&mut client, work.path(), "big.bin", b"something else").await;
    conn.read_body(rest).await.unwrap();
    assert!(body == data, "the download is the file as it was opened");
    assert_eq!(
        blake3_digest(&body),
        reply.digest,
        "and matches the digest announced"
    );
}

fn blake3_digest(bytes: &[u8]) -> String {
    let mut hasher = netdisk::digest::ChunkHasher::new();
    hasher.update(bytes);
    hasher.finish().to_hex().to_string()
}

#[tokio::test]
async fn mv_of_a_path_being_uploaded_is_busy() {
    let server = TestServer::start().await;
    let mut client = server.user("max").await;
    let work = tempfile::tempdir().unwrap();
    put_path(&mut client, work.path(), "dir/file.bin", b"old").await;
    let token = client.login("max", PASSWORD).await.unwrap();

    // Another connection is uploading dir/file.bin (announced, no data yet).
    let mut uploader = raw(&server.addr_string(), &token).await;
    let _: PutReply = uploader
        .call(&Request::Put {
            filename: "dir/file.bin".into(),
            size: 8 * 1024 * 1024,
            restart: false,
            digest: None,
        })
        .await
        .unwrap();
    for (from, to) in [("dir/file.bin", "other.bin"), ("dir", "renamed")] {
        let err = client.mv(from, to, false).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Busy), "mv {from}: {err}");
    }
    let err = client.rm("dir", true).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Busy), "{err}");

    // Once that upload's connection ends, the path is free.
    drop(uploader);
    let mut moved = false;
    for _ in 0..100 {
        match client.mv("dir", "renamed", false).await {
            Ok(()) => {
                moved = true;
                break;
            }
            Err(e) if e.code() == Some(ErrorCode::Busy) => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(moved);
    assert!(server.user_file("max", "renamed/file.bin").is_file());
}

#[tokio::test]
async fn versions_count_toward_the_quota_and_make_room_oldest_first() {
    const MIB: usize = 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let server = TestServer::start_with(dir, root, |c| c.quota = Some(10 * MIB as u64)).await;
    let mut client = server.user("quinn").await;
    let work = tempfile::tempdir().unwrap();

    put_path(&mut client, work.path(), "a.bin", &random_bytes(6 * MIB, 1)).await;
    put_path(&mut client, work.path(), "b.bin", &random_bytes(3 * MIB, 2)).await;
    client.rm("a.bin", false).await.unwrap();
    let usage = client.usage().await.unwrap();
    assert_eq!(
        (usage.bytes, usage.version_bytes),
        (3 * MIB as u64, 6 * MIB as u64)
    );

    // 5 MiB more fits only if the removed a.bin (a version) goes: it does, oldest first.
    put_path(&mut client, work.path(), "c.bin", &random_bytes(5 * MIB, 3)).await;
    let usage = client.usage().await.unwrap();
    assert_eq!(usage.bytes, 8 * MIB as u64);
    assert_eq!(usage.version_bytes, 0);
    assert!(client.versions("a.bin").await.unwrap().is_empty());

    // What cannot fit even without versions is refused before anything is sent.
    let local = write_file(work.path(), "huge.bin", &random_bytes(3 * MIB, 4));
    let err = client
        .put(&local, "huge.bin", false, &mut NoProgress)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NoSpace), "{err}");

    // Overwriting keeps the old content as a version, within the quota.
    put_path(&mut client, work.path(), "b.bin", &random_bytes(3 * MIB, 5)).await;
    let usage = client.usage().await.unwrap();
    assert!(
        usage.bytes + usage.version_bytes <= 10 * MIB as u64,
        "{usage:?}"
    );
}

/// Start `request` on a fresh connection and kill the server right after sending it.
async fn kill_during(root: &Path, user: &str, request: Request) -> ServerProcess {
    let mut server = ServerProcess::spawn(root, &[]);
    let mut client = Client::connect(&server.addr).await.unwrap();
    let token = client.login(user, PASSWORD).await.unwrap();
    let mut conn = raw(&server.addr, &token).await;
    conn.write_header(&request).await.unwrap();
    conn.flush().await.unwrap();
    server.kill9();
    ServerProcess::spawn(root, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_rm_r_and_mv_leaves_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let server = ServerProcess::spawn(&root, &[]);
    let mut client = Client::connect(&server.addr).await.unwrap();
    client
        .register("kim", PASSWORD, MIN_ITERATIONS)
        .await
        .unwrap();
    client.login("kim", PASSWORD).await.unwrap();
    drop(client);
    drop(server);
    // A tree of 300 files, made on the host (faster than uploading them).
    let tree = root.join("files/kim/tree");
    for i in 0..30 {
        let sub = tree.join(format!("d{i}"));
        std::fs::create_dir_all(&sub).unwrap();
        for j in 0..10 {
            std::fs::write(sub.join(format!("f{j}")), format!("{i}/{j}")).unwrap();
        }
    }
    let count_files = |dir: &Path| -> usize {
        std::fs::read_dir(dir)
            .map(|subs| {
                subs.map(|s| std::fs::read_dir(s.unwrap().path()).unwrap().count())
                    .sum()
            })
            .unwrap_or(0)
    };

    let restarted = kill_during(
        &root,
        "kim",
        Request::Mv {
            from: "tree".into(),
            to: "moved".into(),
            overwrite: false,
        },
    )
    .await;
    let (here, there) = (
        count_files(&tree),
        count_files(&root.join("files/kim/moved")),
    );
    assert!(
        (here, there) == (300, 0) || (here, there) == (0, 300),
        "mv is all or nothing: {here} + {there}"
    );
    let current = if here == 300 { "tree" } else { "moved" };
    drop(restarted);

    let restarted = kill_during(
        &root,
        "kim",
        Request::Rm {
            path: current.into(),
            recursive: true,
            partial: false,
        },
    )
    .await;
    let left = count_files(&root.join("files/kim").join(current));
    assert!(left == 300 || left == 0, "rm -r is all or nothing: {left}");
    let mut client = Client::connect(&restarted.addr).await.unwrap();
    client.login("kim", PASSWORD).await.unwrap();
    if left == 0 {
        // Gone whole, into the trash, and it comes back whole.
        client.restore(current, None).await.unwrap();
    }
    assert_eq!(count_files(&root.join("files/kim").join(current)), 300);
}
