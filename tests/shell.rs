//! `netdisk shell` used as a person uses it: the real binary on a pseudo-terminal (or fed
//! through a pipe, as scripts do) against a real server.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::*;

/// One user's side: the server they talk to, their config folder (saved logins, history)
/// and the folder they work in.
struct Home {
    server: String,
    config: tempfile::TempDir,
    work: tempfile::TempDir,
}

impl Home {
    fn new(server: &str) -> Home {
        Home {
            server: server.to_string(),
            config: tempfile::tempdir().unwrap(),
            work: tempfile::tempdir().unwrap(),
        }
    }

    fn cmd(&self, args: &[&str]) -> std::process::Command {
        let mut cmd = netdisk(&self.server, self.config.path());
        cmd.args(args)
            .current_dir(self.work.path())
            .stdin(Stdio::null())
            .env("NETDISK_PASSWORD", "password");
        cmd
    }

    async fn ok(&self, args: &[&str]) -> String {
        let out = run(self.cmd(args)).await;
        assert!(out.status.success(), "{args:?} failed: {}", stderr(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Register `user` (password "password") and save a login, with `netdisk` commands.
    async fn logged_in(&self, user: &str) {
        self.ok(&["register", user]).await;
        self.ok(&["login", user]).await;
    }

    /// `netdisk shell` on a terminal (its own logins use the password "password").
    fn shell(&self) -> Terminal {
        Terminal::spawn(self.cmd(&["shell"]))
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.work.path().join(name)
    }
}

/// `netdisk serve` (TLS on, as by default) as a process on `root`, listening on `listen`.
fn serve(root: &Path, listen: &str) -> ServerProcess {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_netdisk"));
    cmd.args(["serve", "--listen", listen, "--root"]).arg(root);
    ServerProcess::spawn_command(cmd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shell_uses_the_saved_login_and_keeps_its_own() {
    let server = TestServer::start_tls().await;
    let home = Home::new(&server.addr_string());
    home.logged_in("ann").await;

    let mut shell = home.shell();
    shell.expect("netdisk ann> ");
    shell.send("whoami\r");
    shell.expect("ann\r\n");
    shell.expect("netdisk ann> ");

    // logout ends the session and forgets the saved login, as `netdisk logout` does.
    shell.send("logout\r");
    shell.expect("logged out ann");
    shell.expect("netdisk> ");
    assert!(!run(home.cmd(&["whoami"])).await.status.success());

    // login saves it again, as `netdisk login` does.
    shell.send("login ann\r");
    shell.expect("logged in as ann");
    shell.expect("netdisk ann> ");
    assert_eq!(home.ok(&["whoami"]).await.trim(), "ann");

    // Ctrl-D leaves, ending the prompt's line.
    shell.send("\x04");
    assert!(shell.wait().success(), "{}", shell.output());
    let output = shell.output();
    let after_prompt = output.rsplit("netdisk ann> ").next().unwrap();
    assert!(after_prompt.contains('\n'), "{output:?}");

    // The lines typed are kept for the next shell, readable by their owner only.
    let history = home.config.path().join("netdisk/shell_history");
    let lines = std::fs::read_to_string(&history).unwrap();
    assert!(lines.contains("login ann"), "{lines}");
    let mode = std::fs::metadata(&history).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_server_restart_the_next_command_reconnects_and_says_so_once() {
    let root = tempfile::tempdir().unwrap();
    let mut server = serve(root.path(), "127.0.0.1:0");
    let home = Home::new(&server.addr);
    home.logged_in("bea").await;
    let mut shell = home.shell();
    shell.expect("netdisk bea> ");
    shell.send("mkdir kept\r");
    shell.expect("made folder kept");
    shell.expect("netdisk bea> ");

    server.kill9();
    let _server = serve(root.path(), &server.addr);
    // The closed connection is noticed before the command is sent, so even one that is
    // not run twice (a move) just works.
    shell.send("mv kept moved\r");
    shell.expect("moved kept to moved");
    shell.expect("netdisk bea> ");
    shell.send("ls\r");
    let shown = shell.expect("netdisk bea> ");
    assert!(shown.contains("moved/"), "{shown}");
    shell.send("whoami\r");
    shell.expect("bea\r\n");
    shell.expect("netdisk bea> ");

    let output = shell.output();
    assert_eq!(output.matches("reconnected").count(), 1, "{output}");
    assert!(!output.contains("error"), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ended_elsewhere_says_login_again() {
    let root = tempfile::tempdir().unwrap();
    let mut server = serve(root.path(), "127.0.0.1:0");
    let home = Home::new(&server.addr);
    home.logged_in("cy").await;
    let mut shell = home.shell();
    shell.expect("netdisk cy> ");

    // Logged out from another terminal, then the shell's connection is gone too.
    home.ok(&["logout"]).await;
    server.kill9();
    let _server = serve(root.path(), &server.addr);
    shell.send("ls\r");
    shell.expect("session expired: login again");
    shell.expect("netdisk> ");

    shell.send("login cy\r");
    shell.expect("logged in as cy");
    shell.expect("netdisk cy> ");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_a_pipe_quoting_usage_lcd_and_the_cli_commands_work() {
    let server = TestServer::start_tls().await;
    let home = Home::new(&server.addr_string());
    home.logged_in("dee").await;
    std::fs::create_dir(home.path("in")).unwrap();
    std::fs::create_dir_all(home.path("out/got")).unwrap();
    write_file(&home.path("in"), "name with spaces.txt", b"spaced");
    write_file(&home.path("in"), "a.txt", b"a");
    write_file(&home.path("in"), "b.txt", b"bb");

    let script = "help\n\
        help mget\n\
        put\n\
        get\n\
        lcd in\n\
        lpwd\n\
        put \"name with spaces.txt\"\n\
        mput a.txt b.txt --to many\n\
        ls --json\n\
        lcd ../out\n\
        get \"name with spaces.txt\"\n\
        mget -C got many/a.txt many/b.txt\n\
        quit\n";
    let mut cmd = home.cmd(&["shell"]);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = cmd.spawn().unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(script.as_bytes()).unwrap();
        drop(stdin);
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let err = stderr(&out);

    // help lists the CLI's commands and the shell's own.
    for command in ["ls", "mput", "mget", "logout", "lcd", "lpwd", "quit"] {
        assert!(
            stdout.contains(&format!("\n  {command} ")),
            "{command}: {stdout}"
        );
    }
    assert!(stdout.contains("Usage: mget"), "{stdout}");
    // put and get without a name print their usage.
    assert!(err.contains("Usage: put <LOCAL_FILE>"), "{err}");
    assert!(err.contains("Usage: get <REMOTE_NAME>"), "{err}");
    assert!(!err.contains("unknown command"), "{err}");
    let inside = std::fs::canonicalize(home.path("in")).unwrap();
    assert!(stdout.contains(&inside.display().to_string()), "{stdout}");
    assert!(
        stdout.contains("\"name\": \"name with spaces.txt\""),
        "{stdout}"
    );
    assert!(stdout.contains("\"name\": \"many\""), "{stdout}");
    assert_eq!(
        std::fs::read(home.path("out/name with spaces.txt")).unwrap(),
        b"spaced"
    );
    let fetched = std::fs::read(home.path("out/got/b.txt"));
    assert_eq!(fetched.ok().as_deref(), Some(&b"bb"[..]), "{err}");
}

/// A TCP proxy that passes at most `rate` bytes a second each way: a transfer through it
/// lasts long enough to be interrupted.
async fn slow_proxy(target: String, rate: f64) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                continue;
            };
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::spawn(slow_copy(client_read, server_write, rate));
            tokio::spawn(slow_copy(server_read, client_write, rate));
        }
    });
    addr
}

async fn slow_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    rate: f64,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        // The pace of a slow link, not a wait for anything.
        tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate)).await;
    }
    let _ = to.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_cancels_the_transfer_not_the_shell() {
    let server = TestServer::start_tls().await;
    let proxy = slow_proxy(server.addr_string(), 2_000_000.0).await;
    let home = Home::new(&proxy);
    home.logged_in("eli").await;
    write_file(home.work.path(), "big.bin", &random_bytes(40_000_000, 3));

    let mut shell = home.shell();
    shell.expect("netdisk eli> ");
    // At the prompt, Ctrl-C clears the line.
    shell.send("bogus words\x03");
    shell.expect("netdisk eli> ");

    shell.send("put big.bin\r");
    shell.expect("ETA"); // the progress bar: the transfer is running
    shell.send("\x03");
    shell.expect("cancelled");
    shell.expect("netdisk eli> ");

    // The shell goes on, on a new connection; the upload did not finish.
    shell.send("ls\r");
    let shown = shell.expect("netdisk eli> ");
    assert!(!shown.contains("big.bin"), "{shown}");
    shell.send("ls --partial\r");
    let shown = shell.expect("netdisk eli> ");
    assert!(shown.contains("big.bin"), "{shown}");
    let output = shell.output();
    assert!(!output.contains("unknown command"), "{output}");
    assert!(!output.contains("error"), "{output}");
    shell.send("quit\r");
    assert!(shell.wait().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tab_completes_commands_and_remote_names() {
    let server = TestServer::start_tls().await;
    let home = Home::new(&server.addr_string());
    home.logged_in("fay").await;
    std::fs::create_dir(home.path("src")).unwrap();
    write_file(&home.path("src"), "report 2024.txt", b"figures");
    home.ok(&["put", "src/report 2024.txt"]).await;
    home.ok(&["mkdir", "photos"]).await;

    let mut shell = home.shell();
    shell.expect("netdisk fay> ");
    shell.send("whoa\t");
    shell.expect("whoami");
    shell.send("\r");
    shell.expect("fay\r\n");
    shell.expect("netdisk fay> ");

    shell.send("get rep\t");
    shell.expect("'report 2024.txt'");
    shell.send("\r");
    shell.expect("downloaded");
    shell.expect("netdisk fay> ");
    assert_eq!(
        std::fs::read(home.path("report 2024.txt")).unwrap(),
        b"figures"
    );

    shell.send("ls pho\t");
    shell.expect("photos/");
    shell.send("\r");
    shell.expect("netdisk fay> ");
    assert!(!shell.output().contains("error"), "{}", shell.output());
}

/// A TCP proxy whose connections can be broken at their next request: the client's socket
/// stays open (nothing tells it), and closes when it sends, as when the server dies while
/// a request is on its way. It also tells when no connection is open any more.
struct BreakingProxy {
    addr: String,
    /// Connections accepted before the latest break end at their next request.
    breaks: std::sync::Arc<std::sync::atomic::AtomicU64>,
    open: std::sync::Arc<std::sync::atomic::AtomicU64>,
    closed: std::sync::Arc<tokio::sync::Notify>,
}

impl BreakingProxy {
    async fn start(target: String) -> BreakingProxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let breaks = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let open = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let closed = std::sync::Arc::new(tokio::sync::Notify::new());
        let (counter, opened, ended) = (breaks.clone(), open.clone(), closed.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                    continue;
                };
                opened.fetch_add(1, Ordering::SeqCst);
                let (opened, ended) = (opened.clone(), ended.clone());
                let born = counter.load(Ordering::SeqCst);
                let counter = counter.clone();
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match client_read.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        // Dropping both halves here closes the server's side, whose end
                        // then closes the client's.
                        if counter.load(Ordering::SeqCst) != born
                            || server_write.write_all(&buf[..n]).await.is_err()
                        {
                            break;
                        }
                    }
                });
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                    let _ = client_write.shutdown().await;
                    opened.fetch_sub(1, Ordering::SeqCst);
                    ended.notify_one();
                });
            }
        });
        BreakingProxy {
            addr,
            breaks,
            open,
            closed,
        }
    }

    /// Wait (bounded) until every connection made through the proxy has been closed.
    async fn wait_until_none_open(&self) {
        let all_closed = async {
            while self.open.load(std::sync::atomic::Ordering::SeqCst) > 0 {
                self.closed.notified().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), all_closed)
            .await
            .expect("connections still open after 60 s");
    }

    fn break_connections(&self) {
        self.breaks
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_during_a_command_is_retried_only_when_that_is_safe() {
    let server = TestServer::start_tls().await;
    let proxy = BreakingProxy::start(server.addr_string()).await;
    let home = Home::new(&proxy.addr);
    home.logged_in("gus").await;
    home.ok(&["mkdir", "old"]).await;
    let mut shell = home.shell();
    shell.expect("netdisk gus> ");

    // A listing can run again: it does, on a new connection.
    proxy.break_connections();
    shell.send("ls\r");
    let shown = shell.expect("netdisk gus> ");
    assert!(shown.contains("reconnected"), "{shown}");
    assert!(shown.contains("old/"), "{shown}");
    assert!(!shown.contains("error"), "{shown}");

    // A move might have happened: it is not run twice; the next command reconnects.
    proxy.break_connections();
    shell.send("mv old new\r");
    let shown = shell.expect("netdisk gus> ");
    assert!(
        shown.contains("broke during mv: check whether it was done"),
        "{shown}"
    );
    assert!(!shown.contains("reconnected"), "{shown}");
    shell.send("ls\r");
    let shown = shell.expect("netdisk gus> ");
    assert!(shown.contains("reconnected"), "{shown}");
    assert!(shown.contains("old/"), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_the_server_closed_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let server = TestServer::start_with(dir, root, |c| {
        c.tls = netdisk::server::TlsSetting::SelfSigned;
        c.idle_timeout = Duration::from_secs(1);
    })
    .await;
    let proxy = BreakingProxy::start(server.addr_string()).await;
    let home = Home::new(&proxy.addr);
    home.logged_in("hal").await;
    home.ok(&["mkdir", "drafts"]).await;
    let mut shell = home.shell();
    shell.expect("netdisk hal> ");

    // The shell's connection stays idle until the server closes it.
    proxy.wait_until_none_open().await;
    shell.send("mv drafts final\r");
    let shown = shell.expect("netdisk hal> ");
    assert!(shown.contains("moved drafts to final"), "{shown}");
    assert_eq!(shown.matches("reconnected").count(), 1, "{shown}");
}
