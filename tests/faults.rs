//! Crashes and cuts: `kill -9` of the server during an upload and during users.xlsx
//! updates, a full disk during an upload. Nothing acknowledged may be lost, nothing
//! half-written may appear under a real name.

mod common;

use std::sync::{Arc, Mutex};

use calamine::{open_workbook, Reader, Xlsx};
use common::*;
use netdisk::client::{Client, NoProgress, Progress};
use netdisk::scram::MIN_ITERATIONS;

fn users_in_table(root: &std::path::Path) -> Vec<String> {
    let mut book: Xlsx<_> = open_workbook(root.join("users.xlsx")).unwrap();
    let range = book.worksheet_range("users").unwrap();
    range.rows().skip(1).map(|row| row[0].to_string()).collect()
}

/// SIGKILL the server once `at_least` writes were acknowledged, with more in flight
/// (bounded wait: the writers run on the runtime's other thread).
fn kill_after_acknowledged<T>(
    server: &mut ServerProcess,
    acknowledged: &Mutex<Vec<T>>,
    at_least: usize,
) {
    for _ in 0..10_000 {
        if acknowledged.lock().unwrap().len() >= at_least {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    server.kill9();
}

/// Kills the server once `after` bytes of an upload have been sent.
struct KillAt {
    sent: u64,
    after: u64,
    server: Arc<Mutex<ServerProcess>>,
    /// The user's staging folder: the kill waits (bounded) until a chunk record is there,
    /// so it lands after the first checkpoint however slowly the disk flushes.
    partial: std::path::PathBuf,
}

impl KillAt {
    fn a_chunk_is_recorded(&self) -> bool {
        std::fs::read_dir(&self.partial)
            .into_iter()
            .flatten()
            .flatten()
            .any(|entry| {
                entry.path().extension().is_some_and(|e| e == "hashes")
                    && entry.metadata().is_ok_and(|m| m.len() >= 32)
            })
    }
}

impl Progress for KillAt {
    fn advance(&mut self, bytes: u64) {
        self.sent += bytes;
        if self.sent >= self.after && self.sent - bytes < self.after {
            for _ in 0..2_000 {
                if self.a_chunk_is_recorded() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            self.server.lock().unwrap().kill9();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_an_upload_loses_nothing_and_the_upload_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let server = ServerProcess::spawn(&root, &[]);
    let addr = server.addr.clone();
    let mut client = Client::connect(&addr).await.unwrap();
    client
        .register("crash", PASSWORD, MIN_ITERATIONS)
        .await
        .unwrap();
    client.login("crash", PASSWORD).await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let data = random_bytes(48 * 1024 * 1024, 11);
    let local = write_file(work.path(), "big.bin", &data);
    put_bytes(&mut client, work.path(), "big.bin", b"the old version").await;

    let server = Arc::new(Mutex::new(server));
    // Chunk records trail the data by up to 16 MiB (a checkpoint fsyncs, then records):
    // at 3/4 of 48 MiB the first checkpoint has long finished.
    let mut killer = KillAt {
        sent: 0,
        after: data.len() as u64 * 3 / 4,
        server: server.clone(),
        partial: root.join("partial/crash"),
    };
    let result = client.put(&local, "big.bin", false, &mut killer).await;
    assert!(result.is_err(), "the server died mid-upload");

    // The old file is intact under its name; the table is complete.
    let target = root.join("files/crash/big.bin");
    assert_eq!(std::fs::read(&target).unwrap(), b"the old version");
    assert_eq!(users_in_table(&root), ["crash"]);

    let restarted = ServerProcess::spawn(&root, &[]);
    let mut client = Client::connect(&restarted.addr).await.unwrap();
    client.login("crash", PASSWORD).await.unwrap();
    let outcome = client
        .put(&local, "big.bin", false, &mut NoProgress)
        .await
        .unwrap();
    assert!(std::fs::read(&target).unwrap() == data);
    assert!(outcome.resumed_from > 0, "the staged part was reused");
    drop(server);
}

/// The chunk records of a staged upload (`.hashes`) that a crash left behind: each one
/// recorded matches the bytes staged for it (a record never leads its data).
fn recorded_chunks_match_staged_data(root: &std::path::Path, user: &str) -> usize {
    let partial = root.join("partial").join(user);
    let mut checked = 0;
    for entry in std::fs::read_dir(&partial).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "hashes") {
            continue;
        }
        let records = std::fs::read(&path).unwrap();
        let data = std::fs::read(path.with_extension("data")).unwrap();
        let staged = netdisk::digest::hash_reader(&data[..]).unwrap();
        for (i, record) in records.chunks_exact(32).enumerate() {
            if record != [0u8; 32] {
                assert_eq!(Some(record), staged.get(i).map(|h| &h[..]), "chunk {i}");
                checked += 1;
            }
        }
    }
    checked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_mid_upload_every_chunk_record_matches_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let server = ServerProcess::spawn(&root, &[]);
    let mut client = Client::connect(&server.addr).await.unwrap();
    client
        .register("rec", PASSWORD, MIN_ITERATIONS)
        .await
        .unwrap();
    client.login("rec", PASSWORD).await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let data = random_bytes(40 * 1024 * 1024 + 123, 12);
    let local = write_file(work.path(), "big.bin", &data);
    let server = Arc::new(Mutex::new(server));
    let mut killer = KillAt {
        sent: 0,
        after: data.len() as u64 * 3 / 4,
        server: server.clone(),
        partial: root.join("partial/rec"),
    };
    let result = client.put(&local, "big.bin", false, &mut killer).await;
    assert!(result.is_err(), "the server died mid-upload");
    // Checked before any restart could touch the staged files.
    recorded_chunks_match_staged_data(&root, "rec");

    let restarted = ServerProcess::spawn(&root, &[]);
    let mut client = Client::connect(&restarted.addr).await.unwrap();
    client.login("rec", PASSWORD).await.unwrap();
    client
        .put(&local, "big.bin", false, &mut NoProgress)
        .await
        .unwrap();
    assert!(std::fs::read(root.join("files/rec/big.bin")).unwrap() == data);
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_registrations_keeps_every_acknowledged_user() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let server = ServerProcess::spawn(&root, &["--registration-burst", "100000"]);
    let addr = server.addr.clone();
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for worker in 0..4 {
        let (addr, acknowledged) = (addr.clone(), acknowledged.clone());
        tasks.push(tokio::spawn(async move {
            let Ok(mut client) = Client::connect(&addr).await else {
                return;
            };
            for i in 0..1000 {
                let name = format!("w{worker}-{i}");
                match client.register(&name, PASSWORD, MIN_ITERATIONS).await {
                    Ok(()) => {
                        acknowledged.lock().unwrap().push(name);
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    let mut server = server;
    kill_after_acknowledged(&mut server, &acknowledged, 40);
    for task in tasks {
        task.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(acknowledged.len() >= 40);

    // The table parses (the server starts on it) and holds every acknowledged user.
    let restarted = ServerProcess::spawn(&root, &[]);
    let in_table = users_in_table(&root);
    for name in &acknowledged {
        assert!(
            in_table.contains(name),
            "{name} was acknowledged but is missing"
        );
    }
    let mut client = Client::connect(&restarted.addr).await.unwrap();
    client
        .login(&acknowledged[acknowledged.len() - 1], PASSWORD)
        .await
        .unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| {
            name.contains("users.xlsx") && name != "users.xlsx" && !name.ends_with(".lock")
        })
        .collect();
    // A temp file of the interrupted write may remain; it is never read as the table.
    assert!(leftovers.len() <= 1, "{leftovers:?}");
}

/// A 24 MiB file system for the server, in a private mount namespace (`unshare`), so the
/// test needs no privileges beyond user namespaces. Its files are inspected through
/// /proc/PID/root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_gives_a_clear_error_and_nothing_half_written() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("small");
    std::fs::create_dir_all(&root).unwrap();
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["-rm", "sh", "-c"])
        .arg("mount -t tmpfs -o size=24m tmpfs \"$0\" && exec \"$1\" serve --no-tls --listen 127.0.0.1:0 --root \"$0\"")
        .arg(&root)
        .arg(env!("CARGO_BIN_EXE_netdisk"));
    let server = ServerProcess::spawn_command(cmd);
    let seen_root = std::path::PathBuf::from(format!("/proc/{}/root", server.child.id()))
        .join(root.strip_prefix("/").unwrap());

    let mut client = Client::connect(&server.addr).await.unwrap();
    client
        .register("full", PASSWORD, MIN_ITERATIONS)
        .await
        .unwrap();
    client.login("full", PASSWORD).await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let too_big = write_file(
        work.path(),
        "too-big.bin",
        &random_bytes(40 * 1024 * 1024, 3),
    );
    let err = client
        .put(&too_big, "too-big.bin", false, &mut NoProgress)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(netdisk::ErrorCode::NoSpace), "{err}");
    assert!(err.to_string().contains("full"), "{err}");

    assert!(!seen_root.join("files/full/too-big.bin").exists());
    assert!(client.list().await.unwrap().is_empty());
    // The server keeps serving, and the space of the failed upload was freed.
    put_bytes(
        &mut client,
        work.path(),
        "small.txt",
        &random_bytes(8 * 1024 * 1024, 4),
    )
    .await;
    let names: Vec<_> = client
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["small.txt"]);
}

#[tokio::test]
async fn an_upload_over_quota_is_refused_up_front_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let server = TestServer::start_with(dir, root, |c| c.quota = Some(1_000_000)).await;
    let mut client = server.user("quota").await;
    let work = tempfile::tempdir().unwrap();
    put_bytes(&mut client, work.path(), "a.bin", &random_bytes(600_000, 1)).await;
    let big = write_file(work.path(), "b.bin", &random_bytes(500_000, 2));
    let err = client
        .put(&big, "b.bin", false, &mut NoProgress)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(netdisk::ErrorCode::NoSpace));
    assert!(err.to_string().contains("quota"), "{err}");
    assert!(
        client.list_partial().await.unwrap().is_empty(),
        "nothing staged"
    );
    assert_eq!(client.list().await.unwrap().len(), 1);
    // Replacing a file counts only the new size.
    put_bytes(&mut client, work.path(), "a.bin", &random_bytes(900_000, 3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_many_uploads_keeps_every_acknowledged_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let mut server = ServerProcess::spawn(&root, &[]);
    let addr = server.addr.clone();
    let acknowledged = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for worker in 0..4u64 {
        let (addr, acknowledged) = (addr.clone(), acknowledged.clone());
        tasks.push(tokio::spawn(async move {
            let work = tempfile::tempdir().unwrap();
            let user = format!("up{worker}");
            let mut client = Client::connect(&addr).await.unwrap();
            client
                .register(&user, PASSWORD, MIN_ITERATIONS)
                .await
                .unwrap();
            client.login(&user, PASSWORD).await.unwrap();
            for i in 0..1000u64 {
                let name = format!("f{i}.bin");
                let seed = worker * 10_000 + i;
                let local = write_file(
                    work.path(),
                    &name,
                    &random_bytes(100_000 + i as usize, seed),
                );
                match client.put(&local, &name, false, &mut NoProgress).await {
                    Ok(_) => {
                        acknowledged
                            .lock()
                            .unwrap()
                            .push((user.clone(), name, seed, i));
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    kill_after_acknowledged(&mut server, &acknowledged, 40);
    for task in tasks {
        task.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(acknowledged.len() >= 40);
    let restarted = ServerProcess::spawn(&root, &[]);
    for (user, name, seed, i) in &acknowledged {
        let stored = std::fs::read(root.join("files").join(user).join(name)).unwrap();
        assert!(
            stored == random_bytes(100_000 + *i as usize, *seed),
            "{user}/{name}"
        );
    }
    // No file under a real name is anything but a complete upload.
    for user in 0..4 {
        for entry in std::fs::read_dir(root.join(format!("files/up{user}"))).unwrap() {
            let entry = entry.unwrap();
            let i: usize = entry.file_name().to_string_lossy()[1..]
                .trim_end_matches(".bin")
                .parse()
                .unwrap();
            assert_eq!(entry.metadata().unwrap().len(), 100_000 + i as u64);
        }
    }
    // Interrupted small uploads (batched, not resumable) left no data behind.
    for user in 0..4 {
        let staged = std::fs::read_dir(root.join(format!("partial/up{user}")));
        assert_eq!(staged.map(|d| d.count()).unwrap_or(0), 0);
    }
    let mut client = Client::connect(&restarted.addr).await.unwrap();
    client.login("up0", PASSWORD).await.unwrap();
}

/// A log that cannot be written (its disk is full, its pipe is gone) drops lines; it never
/// breaks a connection. Here the server's stderr is a pipe whose reader has gone away, so
/// every log write fails (EPIPE).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_that_cannot_be_written_breaks_nothing() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_netdisk"))
        .args(["serve", "--no-tls", "--listen", "127.0.0.1:0", "--root"])
        .arg(dir.path().join("root"))
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut addr = None;
    let mut line = String::new();
    while addr.is_none() && log.read_line(&mut line).unwrap() > 0 {
        addr = line
            .split("addr=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_string);
        line.clear();
    }
    let addr = addr.expect("the server logs its address");
    drop(log); // from now on every log line the server writes fails

    for round in 0..3 {
        let mut client = Client::connect(&addr).await.unwrap();
        let user = format!("logless{round}");
        client
            .register(&user, PASSWORD, MIN_ITERATIONS)
            .await
            .unwrap();
        client.login(&user, PASSWORD).await.unwrap();
        assert!(client.list().await.unwrap().is_empty());
    }
    assert!(child.try_wait().unwrap().is_none(), "the server still runs");
    let _ = child.kill();
    let _ = child.wait();
}
