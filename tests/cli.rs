//! The `netdisk` binary driven end to end, as a user would.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;

use common::*;

struct Env {
    server: TestServer,
    config: tempfile::TempDir,
    work: tempfile::TempDir,
}

impl Env {
    async fn new() -> Env {
        Env {
            // TLS on, as `netdisk serve` runs by default; the CLI pins it on first use.
            server: TestServer::start_tls().await,
            config: tempfile::tempdir().unwrap(),
            work: tempfile::tempdir().unwrap(),
        }
    }

    fn cmd(&self, args: &[&str]) -> std::process::Command {
        let mut cmd = netdisk(&self.server.addr_string(), self.config.path());
        cmd.args(args)
            .current_dir(self.work.path())
            .stdin(Stdio::null());
        cmd
    }

    async fn ok(&self, args: &[&str]) -> String {
        let out = run(self.cmd(args)).await;
        assert!(out.status.success(), "{args:?} failed: {}", stderr(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Run a command that must fail; returns its one-line error.
    async fn fails(&self, args: &[&str]) -> String {
        let out = run(self.cmd(args)).await;
        assert!(!out.status.success(), "{args:?} should fail");
        let err = stderr(&out);
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        err
    }

    async fn with_password(&self, password: &str, args: &[&str]) -> std::process::Output {
        let mut cmd = self.cmd(args);
        cmd.env("NETDISK_PASSWORD", password);
        run(cmd).await
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.work.path().join(name)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_login_put_ls_get_resume_restart_logout() {
    let env = Env::new().await;
    assert!(env
        .with_password("pw-1", &["register", "carol"])
        .await
        .status
        .success());
    assert!(env
        .with_password("pw-1", &["login", "carol"])
        .await
        .status
        .success());
    let logins = env.config.path().join("netdisk/logins.json");
    assert_eq!(
        std::fs::metadata(&logins).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(!std::fs::read_to_string(&logins).unwrap().contains("pw-1"));

    let listing: serde_json::Value =
        serde_json::from_str(&env.ok(&["ls", "--json"]).await).unwrap();
    assert_eq!(listing, serde_json::json!([]));

    let data = random_bytes(5_000_000, 9);
    write_file(env.work.path(), "a.bin", &data);
    env.ok(&["put", "a.bin"]).await;
    env.ok(&["put", "a.bin", "copy.bin"]).await;
    let listing: serde_json::Value =
        serde_json::from_str(&env.ok(&["ls", "--json"]).await).unwrap();
    assert_eq!(listing[0]["name"], "a.bin");
    assert_eq!(listing[0]["size"], 5_000_000);
    assert_eq!(listing[1]["name"], "copy.bin");
    assert!(env.ok(&["ls"]).await.contains("copy.bin"));

    env.ok(&["get", "a.bin", "b.bin"]).await;
    assert!(std::fs::read(env.path("b.bin")).unwrap() == data);

    let err = env.fails(&["get", "a.bin", "b.bin"]).await;
    assert!(
        err.contains("--resume") && err.contains("--restart"),
        "{err}"
    );

    write_file(env.work.path(), "c.bin", &data[..4_500_000]);
    let out = run(env.cmd(&["get", "a.bin", "c.bin", "--resume"])).await;
    assert!(out.status.success());
    assert!(stderr(&out).contains("resuming"), "{}", stderr(&out));
    assert!(std::fs::read(env.path("c.bin")).unwrap() == data);

    write_file(env.work.path(), "d.bin", b"junk");
    env.ok(&["get", "a.bin", "d.bin", "--restart"]).await;
    assert!(std::fs::read(env.path("d.bin")).unwrap() == data);

    std::fs::create_dir(env.path("into")).unwrap();
    env.ok(&["get", "copy.bin", "into"]).await;
    assert!(std::fs::read(env.path("into/copy.bin")).unwrap() == data);

    env.ok(&["logout"]).await;
    let err = env.fails(&["ls"]).await;
    assert!(err.contains("not logged in"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_flag_authenticates_one_command_without_saving() {
    let env = Env::new().await;
    assert!(env
        .with_password("pw-2", &["register", "dan"])
        .await
        .status
        .success());
    write_file(env.work.path(), "x.txt", b"hello");
    let out = env
        .with_password("pw-2", &["--user", "dan", "put", "x.txt"])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = env
        .with_password("pw-2", &["--user", "dan", "ls", "--json"])
        .await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("x.txt"));
    assert!(!env.config.path().join("netdisk/logins.json").exists());
    let out = env.with_password("wrong", &["--user", "dan", "ls"]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("wrong user name or password"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_exit_non_zero_with_one_clear_line() {
    let env = Env::new().await;
    assert!(env
        .with_password("pw", &["register", "erin"])
        .await
        .status
        .success());
    let out = env.with_password("pw", &["register", "erin"]).await;
    assert!(!out.status.success() && stderr(&out).contains("already taken"));
    let out = env.with_password("pw", &["register", "bad/name"]).await;
    assert!(!out.status.success() && stderr(&out).contains("bad user name"));
    let out = env.with_password("nope", &["login", "erin"]).await;
    assert!(!out.status.success() && stderr(&out).contains("wrong user name or password"));
    let out = env.with_password("nope", &["login", "ghost"]).await;
    assert!(!out.status.success() && stderr(&out).contains("wrong user name or password"));

    assert!(env
        .with_password("pw", &["login", "erin"])
        .await
        .status
        .success());
    let err = env.fails(&["get", "missing.txt"]).await;
    assert!(err.contains("no such file"), "{err}");
    let err = env.fails(&["put", "does-not-exist.txt"]).await;
    assert!(err.contains("does-not-exist.txt"), "{err}");
    write_file(env.work.path(), "ok.txt", b"x");
    let err = env.fails(&["put", "ok.txt", "../escape"]).await;
    assert!(err.contains("bad file name"), "{err}");

    let mut cmd = env.cmd(&["ls"]);
    cmd.env("NETDISK_SERVER", "127.0.0.1:1");
    let out = run(cmd).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot reach"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn help_on_every_command() {
    let env = Env::new().await;
    for command in [
        "serve", "register", "login", "logout", "ls", "put", "get", "mput", "mget", "shell",
    ] {
        let out = env.ok(&[command, "--help"]).await;
        assert!(out.contains("Usage:"), "{command}: {out}");
    }
    assert!(env.ok(&["--help"]).await.contains("NETDISK_SERVER"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_runs_commands_from_its_prompt() {
    let env = Env::new().await;
    write_file(env.work.path(), "s.txt", b"shell data");
    let mut cmd = env.cmd(&["shell"]);
    cmd.env("NETDISK_PASSWORD", "pw-s")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = tokio::task::spawn_blocking(move || {
        let mut child = cmd.spawn().unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(
                b"help\nregister sam\nlogin sam\nput s.txt\nls\nget s.txt back.txt\nbogus\nquit\n",
            )
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(text.contains("registered sam"), "{text}");
    assert!(text.contains("s.txt"));
    assert!(text.contains("unknown command"));
    assert_eq!(std::fs::read(env.path("back.txt")).unwrap(), b"shell data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mput_and_mget_move_many_files_over_one_connection() {
    let env = Env::new().await;
    assert!(env
        .with_password("pw-m", &["register", "mia"])
        .await
        .status
        .success());
    assert!(env
        .with_password("pw-m", &["login", "mia"])
        .await
        .status
        .success());
    let mut args = vec!["mput".to_string()];
    for i in 0..150 {
        write_file(
            env.work.path(),
            &format!("s{i}.txt"),
            &random_bytes(4096 + i, i as u64),
        );
        args.push(format!("s{i}.txt"));
    }
    // One large file in the middle takes the streaming path.
    write_file(env.work.path(), "large.bin", &random_bytes(3_000_000, 999));
    args.insert(70, "large.bin".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    env.ok(&args).await;
    for i in 0..150 {
        let stored = std::fs::read(env.server.user_file("mia", &format!("s{i}.txt"))).unwrap();
        assert!(stored == random_bytes(4096 + i, i as u64));
    }
    assert_eq!(
        std::fs::metadata(env.server.user_file("mia", "large.bin"))
            .unwrap()
            .len(),
        3_000_000
    );

    std::fs::create_dir(env.path("back")).unwrap();
    let mut args = vec!["mget", "-C", "back", "large.bin", "missing.txt"];
    let names: Vec<String> = (0..150).map(|i| format!("s{i}.txt")).collect();
    args.extend(names.iter().map(String::as_str));
    let out = run(env.cmd(&args)).await;
    assert!(!out.status.success(), "missing.txt fails the command");
    assert!(
        stderr(&out).contains("missing.txt: no such file"),
        "{}",
        stderr(&out)
    );
    for i in 0..150 {
        let back = std::fs::read(env.path(&format!("back/s{i}.txt"))).unwrap();
        assert!(back == random_bytes(4096 + i, i as u64));
    }
    assert_eq!(
        std::fs::metadata(env.path("back/large.bin")).unwrap().len(),
        3_000_000
    );
    // Existing files are not overwritten without --overwrite.
    let out = run(env.cmd(&["mget", "-C", "back", "s1.txt"])).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--overwrite"));
    env.ok(&["mget", "-C", "back", "--overwrite", "s1.txt"])
        .await;
}

/// Runs the binary on a pseudo-terminal (Python's pty module), answers its first
/// question with `answer`, and returns everything it printed.
async fn on_terminal(env: &Env, args: &[&str], answer: &str) -> String {
    let script = r#"
import os, pty, sys, time
answer = sys.argv[1].encode()
pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
out = b""
answered = False
deadline = time.time() + 60
while time.time() < deadline:
    try:
        chunk = os.read(fd, 4096)
    except OSError:
        break
    if not chunk:
        break
    out += chunk
    if not answered and b"[Y/n]" in out:
        os.write(fd, answer + b"\r")
        answered = True
_, status = os.waitpid(pid, 0)
sys.stdout.write(out.decode("utf-8", "replace"))
sys.stdout.write("\nEXIT=%d\n" % os.waitstatus_to_exitcode(status))
"#;
    let mut cmd = std::process::Command::new("python3");
    cmd.args(["-c", script, answer, env!("CARGO_BIN_EXE_netdisk")])
        .args(args)
        .current_dir(env.work.path())
        .env("NETDISK_SERVER", env.server.addr_string())
        .env("XDG_CONFIG_HOME", env.config.path())
        .env("HOME", env.config.path());
    let out = run(cmd).await;
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_terminal_get_asks_resume_or_start_over() {
    let env = Env::new().await;
    assert!(env
        .with_password("pw-t", &["register", "tia"])
        .await
        .status
        .success());
    assert!(env
        .with_password("pw-t", &["login", "tia"])
        .await
        .status
        .success());
    let data = random_bytes(9_000_000, 21);
    write_file(env.work.path(), "t.bin", &data);
    env.ok(&["put", "t.bin"]).await;

    // Enter resumes: only the rest is fetched.
    write_file(env.work.path(), "part.bin", &data[..5_000_000]);
    let shown = on_terminal(&env, &["get", "t.bin", "part.bin"], "").await;
    assert!(shown.contains("Resume the download? [Y/n]"), "{shown}");
    assert!(shown.contains("resuming the download"), "{shown}");
    assert!(shown.contains("EXIT=0"), "{shown}");
    assert!(std::fs::read(env.path("part.bin")).unwrap() == data);

    // "n" starts over.
    write_file(env.work.path(), "junk.bin", b"not a prefix at all");
    let shown = on_terminal(&env, &["get", "t.bin", "junk.bin"], "n").await;
    assert!(
        shown.contains("[Y/n]") && !shown.contains("resuming"),
        "{shown}"
    );
    assert!(shown.contains("EXIT=0"), "{shown}");
    assert!(std::fs::read(env.path("junk.bin")).unwrap() == data);
}
