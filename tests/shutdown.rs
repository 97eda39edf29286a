//! The server binary's life and log: graceful shutdown on SIGTERM, and what a client's
//! Ctrl-C or a full disk look like in its log.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use netdisk::client::Client;
use netdisk::scram::MIN_ITERATIONS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

/// Wait (at most a minute) until `ready` holds; panics with `what` otherwise.
async fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn log_of(server: &ServerProcess) -> String {
    server.log.lock().unwrap().clone()
}

/// Send `signal` to a process.
fn signal(pid: u32, signal: i32) {
    assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0);
}

/// Wait (bounded) for a child to exit.
async fn wait_exit(child: &mut std::process::Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "process did not exit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A one-connection TCP proxy that forwards the client's first `gate` bytes, then holds
/// the rest until `open` is notified (a transfer paused mid-body, as on a slow link).
/// `cut` instead drops both sides (with a reset towards the server when `reset`).
struct GateProxy {
    addr: String,
    /// Notified once the gate is reached.
    reached: Arc<Notify>,
    open: Arc<Notify>,
    cut: Arc<Notify>,
}

impl GateProxy {
    async fn start(target: String, gate: u64, reset: bool) -> GateProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (reached, open, cut) = (
            Arc::new(Notify::new()),
            Arc::new(Notify::new()),
            Arc::new(Notify::new()),
        );
        let (reached2, open2, cut2) = (reached.clone(), open.clone(), cut.clone());
        tokio::spawn(async move {
            let (client, _) = listener.accept().await.unwrap();
            let server = tokio::net::TcpStream::connect(&target).await.unwrap();
            if reset {
                // Closing with a zero linger sends a reset instead of an end of stream.
                #[allow(deprecated)]
                server.set_linger(Some(Duration::ZERO)).unwrap();
            }
            let (mut client_read, mut client_write) = client.into_split();
            let (mut server_read, mut server_write) = server.into_split();
            let upstream = async {
                let mut buf = vec![0u8; 64 * 1024];
                let mut sent = 0u64;
                let mut gated = true;
                loop {
                    let want = if gated {
                        buf.len().min((gate - sent) as usize)
                    } else {
                        buf.len()
                    };
                    if want == 0 {
                        reached2.notify_one();
                        open2.notified().await;
                        gated = false;
                        continue;
                    }
                    let n = match client_read.read(&mut buf[..want]).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if server_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    sent += n as u64;
                }
                let _ = server_write.shutdown().await;
                // Hand the write half back for a reset, if asked.
                server_write
            };
            let downstream = async {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let n = match server_read.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if client_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = client_write.shutdown().await;
                server_read
            };
            // A cut drops both connections (with the futures that own their halves).
            tokio::select! {
                _ = cut2.notified() => {}
                _ = async { tokio::join!(upstream, downstream) } => {}
            }
        });
        GateProxy {
            addr,
            reached,
            open,
            cut,
        }
    }
}

/// A registered user on a server process, and a config folder for the CLI.
async fn user_on(server: &ServerProcess, user: &str) -> tempfile::TempDir {
    let mut client = Client::connect(&server.addr).await.unwrap();
    client
        .register(user, PASSWORD, MIN_ITERATIONS)
        .await
        .unwrap();
    tempfile::tempdir().unwrap()
}

/// `netdisk --no-tls --user USER ARGS` against `addr`, run in `work`.
fn cli(addr: &str, config: &Path, work: &Path, user: &str, args: &[&str]) -> Command {
    let mut cmd = netdisk(addr, config);
    cmd.args(["--no-tls", "--user", user])
        .args(args)
        .env("NETDISK_PASSWORD", PASSWORD)
        .current_dir(work)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

async fn finish(child: std::process::Child) -> Output {
    tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_running_upload_finish_refuses_new_connections_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let mut server = ServerProcess::spawn(&root, &["--shutdown-grace", "600"]);
    let config = user_on(&server, "sam").await;
    let work = tempfile::tempdir().unwrap();
    let data = random_bytes(12_000_000, 71);
    write_file(work.path(), "big.bin", &data);

    // The upload pauses on the wire after 5 MB, in the middle of its body.
    let proxy = GateProxy::start(server.addr.clone(), 5_000_000, false).await;
    let upload = cli(
        &proxy.addr,
        config.path(),
        work.path(),
        "sam",
        &["put", "big.bin"],
    )
    .spawn()
    .unwrap();
    proxy.reached.notified().await;

    signal(server.pid(), libc::SIGTERM);
    wait_until("the shutdown log line", || {
        log_of(&server).contains("shutting down")
    })
    .await;
    // No new connections...
    let refused = tokio::net::TcpStream::connect(&server.addr).await;
    assert!(
        refused.is_err(),
        "a new connection was accepted during shutdown"
    );
    // ...but the running upload completes.
    proxy.open.notify_one();
    let out = finish(upload).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let status = wait_exit(&mut server.child).await;
    assert!(
        status.success(),
        "server exit: {status:?}\n{}",
        log_of(&server)
    );
    let log = log_of(&server);
    assert!(
        log.contains("netdisk server stopped") && log.contains("connections_cut=0"),
        "{log}"
    );
    assert!(std::fs::read(root.join("files/sam/big.bin")).unwrap() == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_idle_connections_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    // A grace far longer than the wait below: only closing the idle client ends it in time.
    let mut server = ServerProcess::spawn(&root, &["--shutdown-grace", "3600"]);
    let mut idle = Client::connect(&server.addr).await.unwrap();
    idle.register("ida", PASSWORD, MIN_ITERATIONS)
        .await
        .unwrap();
    idle.login("ida", PASSWORD).await.unwrap();

    signal(server.pid(), libc::SIGTERM);
    let status = wait_exit(&mut server.child).await;
    assert!(status.success(), "{status:?}");
    let log = log_of(&server);
    assert!(log.contains("closing the idle connection"), "{log}");
    assert!(log.contains("netdisk server stopped"), "{log}");
    assert!(
        idle.whoami().await.is_err(),
        "the idle connection was closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_cuts_a_stalled_transfer_after_the_grace_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let mut server = ServerProcess::spawn(&root, &["--shutdown-grace", "1"]);
    let config = user_on(&server, "tom").await;
    let work = tempfile::tempdir().unwrap();
    write_file(work.path(), "big.bin", &random_bytes(8_000_000, 72));
    let proxy = GateProxy::start(server.addr.clone(), 3_000_000, false).await;
    let upload = cli(
        &proxy.addr,
        config.path(),
        work.path(),
        "tom",
        &["put", "big.bin"],
    )
    .spawn()
    .unwrap();
    proxy.reached.notified().await;

    // The gate never opens: the upload cannot finish within the grace.
    signal(server.pid(), libc::SIGTERM);
    let status = wait_exit(&mut server.child).await;
    assert!(status.success(), "{status:?}");
    let log = log_of(&server);
    assert!(log.contains("connections_cut=1"), "{log}");
    // The client, stuck behind the closed gate, learns of it when the wire goes down.
    proxy.cut.notify_one();
    let out = finish(upload).await;
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_stops_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    // A grace far longer than the wait for the exit: only the second signal ends it.
    let mut server = ServerProcess::spawn(&root, &["--shutdown-grace", "3600"]);
    let config = user_on(&server, "uli").await;
    let work = tempfile::tempdir().unwrap();
    write_file(work.path(), "big.bin", &random_bytes(8_000_000, 74));
    let proxy = GateProxy::start(server.addr.clone(), 3_000_000, false).await;
    let upload = cli(
        &proxy.addr,
        config.path(),
        work.path(),
        "uli",
        &["put", "big.bin"],
    )
    .spawn()
    .unwrap();
    proxy.reached.notified().await;

    signal(server.pid(), libc::SIGTERM);
    wait_until("the shutdown log line", || {
        log_of(&server).contains("shutting down")
    })
    .await;
    signal(server.pid(), libc::SIGTERM);
    let status = wait_exit(&mut server.child).await;
    assert_eq!(status.code(), Some(1), "{status:?}");
    assert!(
        log_of(&server).contains("second signal"),
        "{}",
        log_of(&server)
    );
    proxy.cut.notify_one();
    finish(upload).await;
}

/// The server's log lines at ERROR level.
fn errors_in(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains(" ERROR ")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_mid_upload_is_not_an_error_in_the_log() {
    for tls in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let server = if tls {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_netdisk"));
            cmd.args(["serve", "--listen", "127.0.0.1:0", "--root"])
                .arg(&root);
            ServerProcess::spawn_command(cmd)
        } else {
            ServerProcess::spawn(&root, &[])
        };
        let config = tempfile::tempdir().unwrap();
        let work = tempfile::tempdir().unwrap();
        let mut register = netdisk(&server.addr, config.path());
        if !tls {
            register.arg("--no-tls");
        }
        register
            .args(["register", "kim"])
            .env("NETDISK_PASSWORD", PASSWORD)
            .stdin(Stdio::null());
        let out = run(register).await;
        assert!(out.status.success(), "{}", stderr(&out));
        write_file(work.path(), "big.bin", &random_bytes(8_000_000, 73));

        let proxy = GateProxy::start(server.addr.clone(), 3_000_000, !tls).await;
        let mut cmd = cli(
            &proxy.addr,
            config.path(),
            work.path(),
            "kim",
            &["put", "big.bin"],
        );
        if tls {
            // `cli` adds --no-tls; this server speaks TLS.
            cmd = netdisk(&proxy.addr, config.path());
            cmd.args(["--user", "kim", "put", "big.bin"])
                .env("NETDISK_PASSWORD", PASSWORD)
                .current_dir(work.path())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
        }
        let mut upload = cmd.spawn().unwrap();
        proxy.reached.notified().await;
        // Ctrl-C, then the wire goes down with it.
        signal(upload.id(), libc::SIGINT);
        wait_exit(&mut upload).await;
        proxy.cut.notify_one();
        // Two connections end: the registration's and the upload's.
        wait_until("the disconnect in the log", || {
            log_of(&server).matches("disconnected peer").count() == 2
        })
        .await;
        let log = log_of(&server);
        assert!(log.contains("connection lost"), "tls {tls}: {log}");
        assert_eq!(errors_in(&log), Vec::<&str>::new(), "tls {tls}");
    }
}

/// A full disk is the operator's problem: logged at ERROR (see faults.rs for the client's
/// side), in a private 24 MiB tmpfs (`unshare`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_an_error_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("small");
    std::fs::create_dir_all(&root).unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args(["-rm", "sh", "-c"])
        .arg("mount -t tmpfs -o size=24m tmpfs \"$0\" && exec \"$1\" serve --no-tls --listen 127.0.0.1:0 --root \"$0\"")
        .arg(&root)
        .arg(env!("CARGO_BIN_EXE_netdisk"));
    let server = ServerProcess::spawn_command(cmd);
    let mut client = Client::connect(&server.addr).await.unwrap();
    client
        .register("full", PASSWORD, MIN_ITERATIONS)
        .await
        .unwrap();
    client.login("full", PASSWORD).await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let too_big = write_file(work.path(), "too-big.bin", &random_bytes(40 << 20, 3));
    let err = client
        .put(
            &too_big,
            "too-big.bin",
            false,
            &mut netdisk::client::NoProgress,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(netdisk::ErrorCode::NoSpace), "{err}");
    wait_until("the refusal in the log", || {
        log_of(&server).contains("disk full")
    })
    .await;
    let log = log_of(&server);
    assert!(
        log.lines()
            .any(|l| l.contains(" ERROR ") && l.contains("disk full")),
        "{log}"
    );
}
