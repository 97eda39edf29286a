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
        .with_password("password-1", &["register", "carol"])
        .await
        .status
        .success());
    assert!(env
        .with_password("password-1", &["login", "carol"])
        .await
        .status
        .success());
    let logins = env.config.path().join("netdisk/logins.json");
    assert_eq!(
        std::fs::metadata(&logins).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(!std::fs::read_to_string(&logins)
        .unwrap()
        .contains("password-1"));

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

    // The same file again: off a terminal a flag is still needed (scripts decide)...
    let err = env.fails(&["get", "a.bin", "b.bin"]).await;
    assert!(err.contains("--resume"), "{err}");
    // ...and resuming an identical file has nothing to do.
    let out = run(env.cmd(&["get", "a.bin", "b.bin", "--resume"])).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("already complete"),
        "{}",
        stderr(&out)
    );
    // A different local file: asks for a flag off a terminal.
    write_file(env.work.path(), "other.bin", b"other");
    let err = env.fails(&["get", "a.bin", "other.bin"]).await;
    assert!(
        err.contains("--resume") && err.contains("--restart"),
        "{err}"
    );
    assert_eq!(std::fs::read(env.path("other.bin")).unwrap(), b"other");

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
        .with_password("password-2", &["register", "dan"])
        .await
        .status
        .success());
    write_file(env.work.path(), "x.txt", b"hello");
    let out = env
        .with_password("password-2", &["--user", "dan", "put", "x.txt"])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = env
        .with_password("password-2", &["--user", "dan", "ls", "--json"])
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
        .with_password("password", &["register", "erin"])
        .await
        .status
        .success());
    let out = env.with_password("password", &["register", "erin"]).await;
    assert!(!out.status.success() && stderr(&out).contains("already taken"));
    let out = env
        .with_password("password", &["register", "bad/name"])
        .await;
    assert!(!out.status.success() && stderr(&out).contains("bad user name"));
    let out = env.with_password("nope", &["login", "erin"]).await;
    assert!(!out.status.success() && stderr(&out).contains("wrong user name or password"));
    let out = env.with_password("nope", &["login", "ghost"]).await;
    assert!(!out.status.success() && stderr(&out).contains("wrong user name or password"));

    assert!(env
        .with_password("password", &["login", "erin"])
        .await
        .status
        .success());
    let err = env.fails(&["get", "missing.txt"]).await;
    assert!(err.contains("no such file"), "{err}");
    let err = env.fails(&["put", "does-not-exist.txt"]).await;
    assert!(err.contains("does-not-exist.txt"), "{err}");
    write_file(env.work.path(), "ok.txt", b"x");
    let err = env.fails(&["put", "ok.txt", "../escape"]).await;
    assert!(err.contains("bad path"), "{err}");

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
        "serve",
        "register",
        "login",
        "logout",
        "ls",
        "put",
        "get",
        "mput",
        "mget",
        "mkdir",
        "rmdir",
        "rm",
        "mv",
        "passwd",
        "whoami",
        "usage",
        "versions",
        "restore",
        "shell",
        "known-servers",
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
    cmd.env("NETDISK_PASSWORD", "password-s")
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
        .with_password("password-m", &["register", "mia"])
        .await
        .status
        .success());
    assert!(env
        .with_password("password-m", &["login", "mia"])
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
        let stored = env.server.user_bytes("mia", &format!("s{i}.txt")).await;
        assert!(stored == random_bytes(4096 + i, i as u64));
    }
    assert_eq!(
        env.server.user_bytes("mia", "large.bin").await.len(),
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
    // Identical local files are kept; different ones are not overwritten without
    // --overwrite.
    let out = run(env.cmd(&["mget", "-C", "back", "s1.txt"])).await;
    assert!(stderr(&out).contains("1 unchanged"), "{}", stderr(&out));
    write_file(env.work.path(), "back/s1.txt", b"changed here");
    let out = run(env.cmd(&["mget", "-C", "back", "s1.txt"])).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--overwrite"));
    env.ok(&["mget", "-C", "back", "--overwrite", "s1.txt"])
        .await;
    assert!(std::fs::read(env.path("back/s1.txt")).unwrap() == random_bytes(4097, 1));
}

/// Runs the binary on a pseudo-terminal (Python's pty module), answers its questions
/// (`[Y/n/c]` prompts) with `answers` in turn, and returns everything it printed.
async fn on_terminal(env: &Env, args: &[&str], answers: &[&str]) -> String {
    let script = r#"
import os, pty, sys, time
answers = [a.encode() for a in sys.argv[1].split(",")] if sys.argv[1] != "-" else [b""]
pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
out = b""
answered = 0
deadline = time.time() + 60
while time.time() < deadline:
    try:
        chunk = os.read(fd, 4096)
    except OSError:
        break
    if not chunk:
        break
    out += chunk
    while answered < len(answers) and out.count(b"[Y/n/c]") > answered:
        os.write(fd, answers[answered] + b"\r")
        answered += 1
_, status = os.waitpid(pid, 0)
sys.stdout.write(out.decode("utf-8", "replace"))
sys.stdout.write("\nEXIT=%d\n" % os.waitstatus_to_exitcode(status))
"#;
    let answers = if answers == [""] {
        "-".to_string()
    } else {
        answers.join(",")
    };
    let mut cmd = std::process::Command::new("python3");
    cmd.args(["-c", script, &answers, env!("CARGO_BIN_EXE_netdisk")])
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
        .with_password("password-t", &["register", "tia"])
        .await
        .status
        .success());
    assert!(env
        .with_password("password-t", &["login", "tia"])
        .await
        .status
        .success());
    let data = random_bytes(9_000_000, 21);
    write_file(env.work.path(), "t.bin", &data);
    env.ok(&["put", "t.bin"]).await;

    // Enter resumes: only the rest is fetched.
    write_file(env.work.path(), "part.bin", &data[..5_000_000]);
    let shown = on_terminal(&env, &["get", "t.bin", "part.bin"], &[""]).await;
    assert!(shown.contains("Resume the download?"), "{shown}");
    assert!(shown.contains("[Y/n/c]"), "{shown}");
    assert!(shown.contains("resuming the download"), "{shown}");
    assert!(shown.contains("EXIT=0"), "{shown}");
    assert!(std::fs::read(env.path("part.bin")).unwrap() == data);
    assert!(!env.path("part.bin.part").exists());

    // Anything else asks again; "n" then starts over (and says it replaces the file).
    write_file(env.work.path(), "junk.bin", b"not a prefix at all");
    let shown = on_terminal(&env, &["get", "t.bin", "junk.bin"], &["maybe", "n"]).await;
    assert!(shown.contains("replace it"), "{shown}");
    assert!(shown.contains("please answer y, n or c"), "{shown}");
    assert_eq!(shown.matches("[Y/n/c]").count(), 2, "{shown}");
    assert!(!shown.contains("resuming"), "{shown}");
    assert!(shown.contains("EXIT=0"), "{shown}");
    assert!(std::fs::read(env.path("junk.bin")).unwrap() == data);

    // "c" cancels: the local file stays as it was.
    write_file(env.work.path(), "keep.bin", b"mine");
    let shown = on_terminal(&env, &["get", "t.bin", "keep.bin"], &["c"]).await;
    assert!(shown.contains("cancelled"), "{shown}");
    assert!(shown.contains("EXIT=0"), "{shown}");
    assert_eq!(std::fs::read(env.path("keep.bin")).unwrap(), b"mine");
    assert!(!env.path("keep.bin.part").exists());

    // An identical file is not asked about.
    let shown = on_terminal(&env, &["get", "t.bin", "junk.bin"], &["n"]).await;
    assert!(shown.contains("already complete"), "{shown}");
    assert!(!shown.contains("[Y/n/c]"), "{shown}");
}

/// Register and log in `user` (password "password") through the binary.
async fn logged_in(env: &Env, user: &str) {
    for command in ["register", "login"] {
        let out = env.with_password("password", &[command, user]).await;
        assert!(out.status.success(), "{command}: {}", stderr(&out));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn folder_commands_from_the_command_line() {
    let env = Env::new().await;
    logged_in(&env, "fay").await;
    write_file(env.work.path(), "a.txt", b"alpha");
    write_file(env.work.path(), "big.bin", &random_bytes(3_000_000, 4));

    env.ok(&["mkdir", "docs"]).await;
    let err = env.fails(&["mkdir", "docs"]).await;
    assert!(err.contains("exists"), "{err}");
    env.ok(&["mkdir", "-p", "docs/2024/q1"]).await;
    env.ok(&["put", "a.txt", "docs/"]).await; // into the folder
    env.ok(&["put", "big.bin", "docs/2024"]).await; // an existing folder: inside it
    env.ok(&["put", "a.txt", "docs/renamed.txt"]).await;

    let listing = env.ok(&["ls", "docs"]).await;
    assert!(listing.contains("2024/"), "{listing}");
    assert!(listing.contains("a.txt") && listing.contains("renamed.txt"));
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["ls", "--json", "docs"]).await).unwrap();
    assert_eq!(json[0]["name"], "2024");
    assert_eq!(json[0]["type"], "dir");
    assert_eq!(json[1]["type"], "file");
    let human = env.ok(&["ls", "-h", "docs/2024"]).await;
    assert!(human.contains("MiB"), "{human}");
    assert!(human.contains("q1/"), "{human}");
    let by_size = env.ok(&["ls", "--sort", "size", "docs/2024"]).await;
    assert!(by_size.find("big.bin") < by_size.find("q1/"), "{by_size}");
    let reversed = env.ok(&["ls", "--sort", "name", "-r", "docs"]).await;
    assert!(
        reversed.find("renamed.txt") < reversed.find("a.txt"),
        "{reversed}"
    );

    std::fs::remove_file(env.path("big.bin")).unwrap();
    env.ok(&["get", "docs/2024/big.bin"]).await; // saved as big.bin here
    let out = run(env.cmd(&["get", "docs/2024/big.bin", "--resume"])).await;
    assert!(out.status.success() && stderr(&out).contains("already complete"));
    write_file(env.work.path(), "big.bin", b"changed");
    let err = env.fails(&["get", "docs/2024/big.bin"]).await;
    assert!(err.contains("--resume"), "{err}");
    env.ok(&["get", "docs/renamed.txt"]).await;
    assert_eq!(std::fs::read(env.path("renamed.txt")).unwrap(), b"alpha");

    env.ok(&["mv", "docs/renamed.txt", "docs/2024/q1"]).await; // into a folder
    env.ok(&["mv", "docs/a.txt", "moved.txt"]).await;
    let err = env
        .fails(&["mv", "moved.txt", "docs/2024/q1/renamed.txt"])
        .await;
    assert!(err.contains("exists"), "{err}");
    env.ok(&["mv", "-f", "moved.txt", "docs/2024/q1/renamed.txt"])
        .await;

    let err = env.fails(&["rmdir", "docs/2024/q1"]).await;
    assert!(err.contains("empty"), "{err}");
    let err = env.fails(&["rmdir", "docs/2024/big.bin"]).await;
    assert!(err.contains("not a folder"), "{err}");
    let err = env.fails(&["rm", "docs/2024"]).await;
    assert!(err.contains("rm -r"), "{err}");
    env.ok(&["rm", "docs/2024/q1/renamed.txt"]).await;
    env.ok(&["rmdir", "docs/2024/q1"]).await;
    env.ok(&["rm", "-r", "docs"]).await;
    let json: serde_json::Value = serde_json::from_str(&env.ok(&["ls", "--json"]).await).unwrap();
    assert_eq!(json, serde_json::json!([]));

    assert_eq!(env.ok(&["whoami"]).await.trim(), "fay");
    let usage = env.ok(&["usage"]).await;
    assert!(
        usage.contains("versions") && usage.contains("used"),
        "{usage}"
    );
    let usage: serde_json::Value =
        serde_json::from_str(&env.ok(&["usage", "--json"]).await).unwrap();
    assert_eq!(usage["files"], 0);
    assert!(usage["versions"].as_u64().unwrap() >= 3, "{usage}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_and_restore_from_the_command_line() {
    let env = Env::new().await;
    logged_in(&env, "vic").await;
    write_file(env.work.path(), "v.txt", b"first");
    env.ok(&["put", "v.txt", "notes/v.txt"]).await;
    write_file(env.work.path(), "v.txt", b"second");
    env.ok(&["put", "v.txt", "notes/v.txt"]).await;
    env.ok(&["rm", "notes/v.txt"]).await;
    let json: serde_json::Value =
        serde_json::from_str(&env.ok(&["versions", "--json", "notes/v.txt"]).await).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2, "{json}");
    let oldest = json[1]["id"].as_str().unwrap().to_string();
    assert!(env.ok(&["versions", "notes/v.txt"]).await.contains(&oldest));
    env.ok(&["restore", "notes/v.txt"]).await;
    env.ok(&["get", "notes/v.txt", "back.txt"]).await;
    assert_eq!(std::fs::read(env.path("back.txt")).unwrap(), b"second");
    env.ok(&["restore", "notes/v.txt", "--version", &oldest])
        .await;
    env.ok(&["get", "notes/v.txt", "back.txt", "--restart"])
        .await;
    assert_eq!(std::fs::read(env.path("back.txt")).unwrap(), b"first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awkward_names_and_escapes_from_the_command_line() {
    let env = Env::new().await;
    logged_in(&env, "ned").await;
    let long = "y".repeat(255);
    for (i, name) in ["two words.txt", "🎉 party.txt", long.as_str()]
        .iter()
        .enumerate()
    {
        let data = random_bytes(100 + i, i as u64);
        write_file(env.work.path(), name, &data);
        env.ok(&["put", name, &format!("odd dir/{name}")]).await;
        std::fs::remove_file(env.path(name)).unwrap();
        env.ok(&["get", &format!("odd dir/{name}")]).await;
        assert!(std::fs::read(env.path(name)).unwrap() == data, "{name}");
    }
    let listing = env.ok(&["ls", "odd dir"]).await;
    assert!(
        listing.contains("🎉 party.txt") && listing.contains(&long),
        "{listing}"
    );

    write_file(env.work.path(), "ok.txt", b"ok");
    let err = env.fails(&["put", "ok.txt", "a\nb"]).await;
    assert!(err.contains("control character"), "{err}");
    let err = env.fails(&["put", "ok.txt", &"z".repeat(256)]).await;
    assert!(err.contains("255 bytes"), "{err}");
    for args in [
        &["mv", "odd dir", "../../x"][..],
        &["mkdir", "../x"],
        &["rm", "-r", ".."],
        &["get", "../x"],
        &["ls", "a/../.."],
        &["put", "ok.txt", "../ok.txt"],
    ] {
        let err = env.fails(args).await;
        assert!(
            err.contains("bad path") || err.contains("bad file name"),
            "{args:?}: {err}"
        );
    }
    assert!(!env.server.stored_exists("files/x").await);
    assert!(!env.server.stored_exists("files/ok.txt").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_r_and_get_r_round_trip_skip_symlinks_and_resume() {
    let env = Env::new().await;
    logged_in(&env, "rita").await;
    let tree = env.path("photos");
    for (name, data) in [
        ("a.jpg", random_bytes(5000, 1)),
        ("2024/b.jpg", random_bytes(6000, 2)),
        ("2024/summer/c d.jpg", random_bytes(7000, 3)),
        ("2024/summer/large.raw", random_bytes(6_000_000, 4)),
    ] {
        let path = tree.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    }
    std::os::unix::fs::symlink("/etc", tree.join("2024/etc-link")).unwrap();

    let out = run(env.cmd(&["put", "-r", "photos"])).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("etc-link") && err.contains("symbolic link"),
        "{err}"
    );
    assert!(err.contains("uploaded 4 files"), "{err}");
    assert!(env.ok(&["ls", "photos/2024"]).await.contains("summer/"));
    assert!(!env.ok(&["ls", "photos/2024"]).await.contains("etc-link"));

    // Again: nothing sent.
    let out = run(env.cmd(&["put", "-r", "photos"])).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("uploaded 0 files"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("4 unchanged"), "{}", stderr(&out));

    // Into an existing folder with a trailing '/'.
    env.ok(&["mkdir", "backups"]).await;
    env.ok(&["put", "-r", "photos", "backups/"]).await;
    assert!(env.ok(&["ls", "backups"]).await.contains("photos/"));

    env.ok(&["get", "-r", "photos", "restored"]).await;
    for name in [
        "a.jpg",
        "2024/b.jpg",
        "2024/summer/c d.jpg",
        "2024/summer/large.raw",
    ] {
        assert!(
            std::fs::read(env.path("restored").join(name)).unwrap()
                == std::fs::read(tree.join(name)).unwrap(),
            "{name}"
        );
    }
    assert!(!env.path("restored/2024/etc-link").exists());
    let out = run(env.cmd(&["get", "-r", "photos", "restored"])).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("downloaded 0 files"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("4 unchanged"), "{}", stderr(&out));

    // Default local folder: the remote folder's name.
    std::fs::remove_dir_all(&tree).unwrap();
    env.ok(&["get", "-r", "photos"]).await;
    assert_eq!(
        std::fs::read(tree.join("a.jpg")).unwrap(),
        random_bytes(5000, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwd_from_the_command_line() {
    let env = Env::new().await;
    logged_in(&env, "paul").await;
    // Another machine's saved login (its own config folder).
    let elsewhere = tempfile::tempdir().unwrap();
    let mut cmd = netdisk(&env.server.addr_string(), elsewhere.path());
    cmd.args(["login", "paul"])
        .env("NETDISK_PASSWORD", "password");
    assert!(run(cmd).await.status.success());

    let mut cmd = env.cmd(&["passwd"]);
    cmd.env("NETDISK_PASSWORD", "wrong")
        .env("NETDISK_NEW_PASSWORD", "password-2");
    let out = run(cmd).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("wrong user name or password"),
        "{}",
        stderr(&out)
    );

    let mut cmd = env.cmd(&["passwd"]);
    cmd.env("NETDISK_PASSWORD", "password")
        .env("NETDISK_NEW_PASSWORD", "password-2");
    let out = run(cmd).await;
    assert!(out.status.success(), "{}", stderr(&out));
    // This machine's saved login was updated and still works.
    assert_eq!(env.ok(&["whoami"]).await.trim(), "paul");
    // The other one was revoked.
    let mut cmd = netdisk(&env.server.addr_string(), elsewhere.path());
    cmd.arg("ls");
    let out = run(cmd).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no longer works"), "{}", stderr(&out));
    // Old password fails, new works.
    let out = env
        .with_password("password", &["--user", "paul", "whoami"])
        .await;
    assert!(!out.status.success());
    let out = env
        .with_password("password-2", &["--user", "paul", "whoami"])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_has_the_folder_commands_and_quoting() {
    let env = Env::new().await;
    write_file(env.work.path(), "my file.txt", b"quoted");
    let mut cmd = env.cmd(&["shell"]);
    cmd.env("NETDISK_PASSWORD", "password-s")
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
                b"register sid\nlogin sid\nmkdir -p 'a b/c'\nput \"my file.txt\" 'a b/c/'\nls 'a b/c'\nwhoami\nmv 'a b/c/my file.txt' top.txt\nls\nrm --help\nquit\n",
            )
            .unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let text = format!("{stdout}{}", stderr(&out));
    assert!(stdout.contains("my file.txt"), "{text}");
    assert!(stdout.contains("sid"), "{text}");
    assert!(stdout.contains("top.txt"), "{text}");
    assert!(text.contains("Usage:"), "{text}");
    assert!(!text.contains("error:"), "{text}");
}

/// A TCP proxy in front of the test server that cuts each connection once `limit` bytes
/// went either way (set before a command; `u64::MAX` passes all).
struct CuttingProxy {
    addr: String,
    limit: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// Copy `from` to `to` until `allowed` bytes went, then stop (both sides get dropped).
async fn copy_at_most(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut allowed: u64,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    while allowed > 0 {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => (n as u64).min(allowed) as usize,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        allowed -= n as u64;
    }
}

impl CuttingProxy {
    async fn start(target: String) -> CuttingProxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let limit = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
        let shared = limit.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(&target).await else {
                    continue;
                };
                let allowed = shared.load(Ordering::SeqCst);
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(async move {
                    // Whichever direction is cut first ends both.
                    tokio::select! {
                        _ = copy_at_most(client_read, server_write, allowed) => {}
                        _ = copy_at_most(server_read, client_write, allowed) => {}
                    }
                });
            }
        });
        CuttingProxy { addr, limit }
    }

    fn cut_after(&self, bytes: u64) {
        self.limit.store(bytes, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A one-line error with no library URL or system error number.
fn assert_clean_line(err: &str) {
    let lines = err
        .lines()
        .filter(|l| !l.starts_with("note: first connection"));
    assert_eq!(lines.count(), 1, "one line: {err}");
    assert!(!err.contains("os error") && !err.contains("http"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_get_and_mget_leave_only_part_files_and_resume_them() {
    let env = Env::new().await;
    logged_in(&env, "ivy").await;
    let data = random_bytes(12_000_000, 31);
    write_file(env.work.path(), "big.bin", &data);
    env.ok(&["put", "big.bin"]).await;
    std::fs::remove_file(env.path("big.bin")).unwrap();
    std::fs::create_dir(env.path("many")).unwrap();

    let proxy = CuttingProxy::start(env.server.addr_string()).await;
    let via_proxy = |args: &[&str]| {
        let mut cmd = env.cmd(args);
        cmd.env("NETDISK_SERVER", &proxy.addr)
            .env("NETDISK_PASSWORD", "password")
            .args(["--user", "ivy"]);
        cmd
    };
    proxy.cut_after(6_000_000);
    let out = run(via_proxy(&["get", "big.bin"])).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(5), "network: {err}");
    assert!(
        err.contains(&format!("connection to {} lost after", proxy.addr))
            && err.contains(" MiB of 11.4 MiB; run the same command again to resume"),
        "{err}"
    );
    assert_clean_line(&err);
    assert!(
        !env.path("big.bin").exists(),
        "no partial file under the real name"
    );
    let part_len = std::fs::metadata(env.path("big.bin.part")).unwrap().len();
    assert!(part_len > 0 && part_len < 12_000_000, "{part_len}");

    let out = run(via_proxy(&["mget", "-C", "many", "big.bin"])).await;
    assert!(!out.status.success());
    assert!(!env.path("many/big.bin").exists());
    assert!(env.path("many/big.bin.part").exists());

    // Run again: the .part files are found and continued.
    proxy.cut_after(u64::MAX);
    let out = run(via_proxy(&["get", "big.bin"])).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("resuming"), "{}", stderr(&out));
    assert!(std::fs::read(env.path("big.bin")).unwrap() == data);
    assert!(!env.path("big.bin.part").exists());
    let out = run(via_proxy(&["mget", "-C", "many", "big.bin"])).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(std::fs::read(env.path("many/big.bin")).unwrap() == data);
    assert!(!env.path("many/big.bin.part").exists());

    // A .part beside an existing file is resumed without a question, and replaces it
    // only once verified.
    write_file(env.work.path(), "big.bin", b"old");
    write_file(env.work.path(), "big.bin.part", &data[..5_000_000]);
    let out = run(env.cmd(&["get", "big.bin"])).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("resuming"), "{}", stderr(&out));
    assert!(std::fs::read(env.path("big.bin")).unwrap() == data);
    assert!(!env.path("big.bin.part").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_connection_during_put_says_how_far_and_to_run_it_again() {
    let env = Env::new().await;
    logged_in(&env, "uma").await;
    let data = random_bytes(12_000_000, 32);
    write_file(env.work.path(), "up.bin", &data);
    let proxy = CuttingProxy::start(env.server.addr_string()).await;
    let via_proxy = |args: &[&str]| {
        let mut cmd = env.cmd(args);
        cmd.env("NETDISK_SERVER", &proxy.addr)
            .env("NETDISK_PASSWORD", "password")
            .args(["--user", "uma"]);
        cmd
    };
    // Past 8 MiB: a whole chunk locally, a whole multipart part on S3.
    proxy.cut_after(10_000_000);
    let out = run(via_proxy(&["put", "up.bin"])).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(
        err.contains(&format!("connection to {} lost after", proxy.addr))
            && err.contains("of 11.4 MiB; run the same command again to resume"),
        "{err}"
    );
    assert_clean_line(&err);
    // --verbose adds the cause.
    let mut cmd = via_proxy(&["put", "up.bin", "other.bin", "--verbose"]);
    cmd.env("NETDISK_SERVER", &proxy.addr);
    let out = run(cmd).await;
    assert!(stderr(&out).contains("cause:"), "{}", stderr(&out));

    proxy.cut_after(u64::MAX);
    let out = run(via_proxy(&["put", "up.bin"])).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("resuming"), "{}", stderr(&out));
    assert!(env.server.user_bytes("uma", "up.bin").await == data);
}

/// An `Env` around a server configured by `adjust` (TLS off unless it turns it on).
async fn env_with(adjust: impl FnOnce(&mut netdisk::server::ServerConfig)) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    Env {
        server: TestServer::start_with(dir, root, adjust).await,
        config: tempfile::tempdir().unwrap(),
        work: tempfile::tempdir().unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_setup_errors_say_which_side_and_which_flag() {
    // A wrong secret file.
    let env = env_with(|c| {
        c.tls = netdisk::server::TlsSetting::SelfSigned;
        c.secret = Some(b"the right secret, long enough".to_vec());
    })
    .await;
    write_file(
        env.work.path(),
        "wrong.secret",
        b"a wrong secret, long enough too",
    );
    let out = run(env.cmd(&["--secret-file", "wrong.secret", "ls"])).await;
    let err = stderr(&out);
    assert!(
        err.contains("the server refused the connection secret"),
        "{err}"
    );
    assert_eq!(out.status.code(), Some(3), "auth: {err}");
    assert_clean_line(&err);

    // A TLS client to a --no-tls server.
    let env = env_with(|_| {}).await;
    let out = run(env.cmd(&["ls"])).await;
    let err = stderr(&out);
    assert!(err.contains("TLS off") && err.contains("--no-tls"), "{err}");
    assert_eq!(out.status.code(), Some(5), "network: {err}");
    assert_clean_line(&err);
    let out = run(env.cmd(&["--verbose", "ls"])).await;
    assert!(stderr(&out).contains("cause:"), "{}", stderr(&out));

    // A --no-tls client to a TLS server.
    let env = Env::new().await;
    let out = run(env.cmd(&["--no-tls", "-q", "ls"])).await;
    let err = stderr(&out);
    assert!(
        err.contains("uses TLS") && err.contains("TLS off") && err.contains("drop --no-tls"),
        "{err}"
    );
    assert_eq!(out.status.code(), Some(5), "network: {err}");
    assert_clean_line(&err);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_port_and_forgetting_a_pinned_server() {
    let env = Env::new().await;
    // No port: 9000 (the error names the address it used).
    for (given, meant) in [
        ("127.0.0.1", "127.0.0.1:9000"),
        ("[::1]", "[::1]:9000"),
        ("localhost", "localhost:9000"),
    ] {
        let err = env.fails(&["--server", given, "logout"]).await;
        assert!(err.contains(&format!("not logged in to {meant}")), "{err}");
    }

    let addr = env.server.addr_string();
    logged_in(&env, "kim").await;
    let list = env.ok(&["known-servers", "list"]).await;
    assert!(list.starts_with(&format!("{addr} sha256:")), "{list}");
    let out = run(env.cmd(&["known-servers", "forget", &addr])).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains(&format!("forgot the certificate of {addr}")));
    assert_eq!(env.ok(&["known-servers", "list"]).await, "");
    let out = run(env.cmd(&["known-servers", "forget", &addr])).await;
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("no certificate is pinned"));
    // The next connection pins it again.
    let out = run(env.cmd(&["whoami"])).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("first connection"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_codes_tell_the_kind_of_failure() {
    let env = Env::new().await;
    let help = env.ok(&["--help"]).await;
    assert!(
        help.contains("Exit codes:") && help.contains("7  refused"),
        "{help}"
    );
    let code = |out: std::process::Output| out.status.code();

    // 2: usage.
    assert_eq!(code(run(env.cmd(&["ls", "--bogus"])).await), Some(2));
    // 3: authentication.
    assert_eq!(code(run(env.cmd(&["ls"])).await), Some(3), "not logged in");
    logged_in(&env, "eve").await;
    let out = env.with_password("wrong", &["--user", "eve", "ls"]).await;
    assert_eq!(code(out), Some(3), "wrong password");
    // 4: not found.
    assert_eq!(code(run(env.cmd(&["get", "missing.txt"])).await), Some(4));
    assert_eq!(code(run(env.cmd(&["rm", "missing.txt"])).await), Some(4));
    // 7: refused by the server.
    env.ok(&["mkdir", "docs"]).await;
    assert_eq!(code(run(env.cmd(&["mkdir", "docs"])).await), Some(7));
    let out = env.with_password("password", &["register", "eve"]).await;
    assert_eq!(code(out), Some(7), "name taken");
    // 5: network.
    let mut cmd = env.cmd(&["ls"]);
    cmd.env("NETDISK_SERVER", "127.0.0.1:1");
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert_clean_line(&stderr(&out));
    // 6: verification (the server's certificate is not the pinned one).
    let known = env.config.path().join("netdisk/known_servers");
    std::fs::write(
        &known,
        format!("{} sha256:{}\n", env.server.addr_string(), "00".repeat(32)),
    )
    .unwrap();
    let out = run(env.cmd(&["ls"])).await;
    assert_eq!(out.status.code(), Some(6), "{}", stderr(&out));
    assert!(stderr(&out).contains("WARNING"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_checks_the_name_first_and_the_password_length() {
    let env = Env::new().await;
    // A bad name is refused before any password is asked (on a terminal or not).
    let err = env.fails(&["register", "bad/name"]).await;
    assert!(err.contains("bad user name"), "{err}");
    assert!(!err.contains("password"), "{err}");
    let shown = on_terminal(&env, &["register", ".hidden"], &[""]).await;
    assert!(shown.contains("bad user name"), "{shown}");
    assert!(!shown.contains("password for"), "{shown}");

    // Too short a password: a clear message, nothing registered.
    let out = env.with_password("short", &["register", "lea"]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("at least 8 characters"),
        "{}",
        stderr(&out)
    );
    let out = env.with_password("long enough", &["register", "lea"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    // The hint names the server it used.
    let hint = format!(
        "now run: netdisk --server {} login lea",
        env.server.addr_string()
    );
    assert!(stderr(&out).contains(&hint), "{}", stderr(&out));

    // passwd too.
    assert!(env
        .with_password("long enough", &["login", "lea"])
        .await
        .status
        .success());
    let mut cmd = env.cmd(&["passwd"]);
    cmd.env("NETDISK_PASSWORD", "long enough")
        .env("NETDISK_NEW_PASSWORD", "1234567");
    let out = run(cmd).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("at least 8 characters"));
}

/// What identifies each stored copy of the user's files: a file sent again is a new
/// inode on disk, a new object (ETag and Last-Modified) on S3.
async fn server_stamps(env: &Env, user: &str, names: &[&str]) -> Vec<String> {
    let mut stamps = Vec::new();
    for name in names {
        stamps.push(
            env.server
                .stored_stamp(&format!("files/{user}/{name}"))
                .await,
        );
    }
    stamps
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mput_run_again_after_a_cut_sends_only_what_is_missing() {
    let env = Env::new().await;
    logged_in(&env, "rae").await;
    // Small files (pipelined), then two large ones (streamed, resumable).
    let files: Vec<(String, Vec<u8>)> = vec![
        ("s1.txt".into(), random_bytes(200_000, 1)),
        ("s2.txt".into(), random_bytes(200_000, 2)),
        ("s3.txt".into(), random_bytes(200_000, 3)),
        ("l1.bin".into(), random_bytes(6_000_000, 4)),
        ("l2.bin".into(), random_bytes(12_000_000, 5)),
    ];
    for (name, data) in &files {
        write_file(env.work.path(), name, data);
    }
    let names: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    let mut args = vec!["mput"];
    args.extend(&names);

    // Cut the connection in the middle of l2.bin, about 10 MB into it: past its first
    // two 4 MiB chunks locally, past its first 8 MiB multipart part on S3.
    let proxy = CuttingProxy::start(env.server.addr_string()).await;
    proxy.cut_after(17_000_000);
    let mut cmd = env.cmd(&args);
    cmd.env("NETDISK_SERVER", &proxy.addr)
        .env("NETDISK_PASSWORD", "password")
        .args(["--user", "rae"]);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(!env.server.user_has("rae", "l2.bin").await);
    let done = ["s1.txt", "s2.txt", "s3.txt", "l1.bin"];
    let before = server_stamps(&env, "rae", &done).await;
    if env.server.on_s3() {
        // S3's Last-Modified has whole seconds: a copy sent again must differ from it.
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    }

    // One file changed locally since (same size): it must be sent again.
    let changed = random_bytes(200_000, 99);
    write_file(env.work.path(), "s2.txt", &changed);
    let out = run(env.cmd(&args)).await;
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("resuming the upload of l2.bin"), "{err}");
    assert!(err.contains("uploaded 2 files ("), "{err}");
    assert!(err.contains("; 3 unchanged"), "{err}");
    let after = server_stamps(&env, "rae", &done).await;
    // s1, s3 and l1 were not sent again; s2 was.
    assert_eq!(
        [&after[0], &after[2], &after[3]],
        [&before[0], &before[2], &before[3]]
    );
    assert_ne!(after[1], before[1]);
    for (name, data) in &files {
        let expected = if name == "s2.txt" { &changed } else { data };
        assert!(
            env.server.user_bytes("rae", name).await == *expected,
            "{name}"
        );
    }

    // Nothing left to do: all unchanged, one summary line.
    let out = run(env.cmd(&args)).await;
    assert!(out.status.success());
    assert!(
        stderr(&out).contains("uploaded 0 files (0 B, verified); 5 unchanged"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mget_run_again_after_a_cut_resumes_and_keeps_complete_files() {
    let env = Env::new().await;
    logged_in(&env, "max").await;
    let files: Vec<(String, Vec<u8>)> = vec![
        ("a.txt".into(), random_bytes(300_000, 11)),
        ("b.bin".into(), random_bytes(5_000_000, 12)),
        ("c.bin".into(), random_bytes(10_000_000, 13)),
    ];
    for (name, data) in &files {
        write_file(env.work.path(), name, data);
    }
    env.ok(&["mput", "a.txt", "b.bin", "c.bin"]).await;
    std::fs::create_dir(env.path("back")).unwrap();
    let args = ["mget", "-C", "back", "a.txt", "b.bin", "c.bin"];

    let proxy = CuttingProxy::start(env.server.addr_string()).await;
    proxy.cut_after(11_000_000);
    let mut cmd = env.cmd(&args);
    cmd.env("NETDISK_SERVER", &proxy.addr)
        .env("NETDISK_PASSWORD", "password")
        .args(["--user", "max"]);
    let out = run(cmd).await;
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(env.path("back/c.bin.part").exists());
    assert!(!env.path("back/c.bin").exists());
    use std::os::unix::fs::MetadataExt;
    let kept = std::fs::metadata(env.path("back/a.txt")).unwrap().ino();

    let out = run(env.cmd(&args)).await;
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("resuming the download of c.bin"), "{err}");
    assert!(
        err.contains("downloaded 1 file (") && err.contains("; 2 unchanged"),
        "{err}"
    );
    assert_eq!(
        std::fs::metadata(env.path("back/a.txt")).unwrap().ino(),
        kept
    );
    for (name, data) in &files {
        assert!(std::fs::read(env.path(&format!("back/{name}"))).unwrap() == *data);
    }
    assert!(!env.path("back/c.bin.part").exists());

    // A local file that differs is left alone unless --overwrite.
    write_file(env.work.path(), "back/a.txt", b"mine");
    let out = run(env.cmd(&["mget", "-C", "back", "a.txt"])).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--overwrite"), "{}", stderr(&out));
    assert_eq!(std::fs::read(env.path("back/a.txt")).unwrap(), b"mine");
    env.ok(&["mget", "-C", "back", "--overwrite", "a.txt"])
        .await;
    assert!(std::fs::read(env.path("back/a.txt")).unwrap() == files[0].1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mput_refuses_two_files_with_one_name_before_sending_anything() {
    let env = Env::new().await;
    logged_in(&env, "dee").await;
    std::fs::create_dir(env.path("x")).unwrap();
    std::fs::create_dir(env.path("y")).unwrap();
    write_file(env.work.path(), "first.txt", b"1");
    write_file(env.work.path(), "x/same.txt", b"x");
    write_file(env.work.path(), "y/same.txt", b"y");
    let out = run(env.cmd(&["mput", "first.txt", "x/same.txt", "y/same.txt"])).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("x/same.txt")
            && err.contains("y/same.txt")
            && err.contains("nothing was sent"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let listing: serde_json::Value =
        serde_json::from_str(&env.ok(&["ls", "--json"]).await).unwrap();
    assert_eq!(listing, serde_json::json!([]), "nothing was sent");
    // The same for mget: two remote files that would land on one local name.
    let out = run(env.cmd(&["mget", "a/same.txt", "b/same.txt"])).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("a/same.txt and b/same.txt"), "{err}");
    assert!(!env.path("same.txt").exists() && !env.path("same.txt.part").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_file_summaries_count_in_words() {
    let env = Env::new().await;
    logged_in(&env, "sue").await;
    write_file(env.work.path(), "one.txt", b"1");
    let out = run(env.cmd(&["mput", "one.txt"])).await;
    assert!(
        stderr(&out).contains("uploaded 1 file (1 B, verified); 0 unchanged"),
        "{}",
        stderr(&out)
    );
    for name in ["a.txt", "b.txt", "c.txt", "aux.txt"] {
        write_file(env.work.path(), name, name.as_bytes());
    }
    // Two of five fail: a missing local file, and a name the server refuses.
    let out = run(env.cmd(&["mput", "a.txt", "missing.txt", "b.txt", "aux.txt", "c.txt"])).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("uploaded 3 files ("), "{err}");
    assert!(err.contains("2 of 5 files failed"), "{err}");
    assert!(err.contains("missing.txt: cannot read"), "{err}");
    assert!(err.contains("aux.txt: bad path"), "{err}");
    // mget: one of one.
    let out = run(env.cmd(&["mget", "-C", ".", "nothing-here.txt"])).await;
    assert!(
        stderr(&out).contains("1 of 1 file failed"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_to_stdout_and_put_from_stdin() {
    let env = Env::new().await;
    logged_in(&env, "pip").await;
    let data = random_bytes(6_000_000, 41);
    write_file(env.work.path(), "d.bin", &data);
    env.ok(&["put", "d.bin"]).await;

    let out = run(env.cmd(&["get", "d.bin", "-"])).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out.stdout == data, "stdout is the file, byte for byte");
    assert!(stderr(&out).contains("standard output"), "{}", stderr(&out));
    assert!(!env.path("-").exists() && !env.path("-.part").exists());

    // put - NAME: stdin is spooled in $TMPDIR, uploaded, verified, and the spool removed.
    let spool = tempfile::tempdir().unwrap();
    let piped = random_bytes(5_500_000, 42);
    let mut cmd = env.cmd(&["put", "-", "from-stdin.bin"]);
    cmd.env("TMPDIR", spool.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let input = piped.clone();
    let out = tokio::task::spawn_blocking(move || {
        let mut child = cmd.spawn().unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&input).unwrap();
        child.wait_with_output().unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    assert!(env.server.user_bytes("pip", "from-stdin.bin").await == piped);
    assert_eq!(std::fs::read_dir(spool.path()).unwrap().count(), 0);
    // Without a remote name there is nothing to call it.
    let err = env.fails(&["put", "-"]).await;
    assert!(err.contains("put - NAME"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_still_says_a_new_certificate_was_trusted() {
    let env = Env::new().await;
    let out = run(env.cmd(&["-q", "ls"])).await;
    let err = stderr(&out);
    assert!(err.contains("trusting its certificate"), "{err}");
    assert!(err.contains("known-servers"), "{err}");
    // Only the first time.
    let out = run(env.cmd(&["-q", "ls"])).await;
    assert!(!stderr(&out).contains("trusting"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_help_has_only_server_options_and_server_goes_either_side() {
    let env = Env::new().await;
    let help = env.ok(&["serve", "--help"]).await;
    assert!(
        help.contains("--shutdown-grace") && help.contains("--listen"),
        "{help}"
    );
    assert!(
        !help.contains("--user") && !help.contains("--server"),
        "{help}"
    );
    logged_in(&env, "ned").await;
    // --server before or after the command, overriding NETDISK_SERVER.
    let addr = env.server.addr_string();
    for args in [
        vec!["--server", addr.as_str(), "whoami"],
        vec!["whoami", "--server", addr.as_str()],
    ] {
        let mut cmd = env.cmd(&args);
        cmd.env("NETDISK_SERVER", "127.0.0.1:1");
        let out = run(cmd).await;
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ned");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_with_user_keeps_another_users_saved_login() {
    let env = Env::new().await;
    logged_in(&env, "yan").await;
    assert!(env
        .with_password("password", &["register", "xia"])
        .await
        .status
        .success());
    let out = run(env.cmd(&["--user", "xia", "logout"])).await;
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("yan") && err.contains("kept"), "{err}");
    assert_eq!(env.ok(&["whoami"]).await.trim(), "yan");
    env.ok(&["--user", "yan", "logout"]).await;
    let err = env.fails(&["whoami"]).await;
    assert!(err.contains("not logged in"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_windows_reserved_name_says_so_and_how_to_rename() {
    let env = Env::new().await;
    logged_in(&env, "win").await;
    write_file(env.work.path(), "aux.txt", b"x");
    let err = env.fails(&["put", "aux.txt"]).await;
    assert!(
        err.contains("Windows") && err.contains("netdisk put aux.txt NEW-NAME"),
        "{err}"
    );
    write_file(env.work.path(), "notes.", b"n");
    let err = env.fails(&["put", "notes."]).await;
    assert!(
        err.contains("Windows") && err.contains("netdisk put notes. NEW-NAME"),
        "{err}"
    );
    env.ok(&["put", "aux.txt", "my-aux.txt"]).await;
    assert_eq!(env.server.user_bytes("win", "my-aux.txt").await, b"x");
}

/// `mput` of many files (the saved login: helper connections share them), small and
/// large mixed: every file arrives whole under its name; run again, all are unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mput_of_many_files_over_several_connections() {
    let env = Env::new().await;
    logged_in(&env, "mia").await;
    let mut files: Vec<(String, Vec<u8>)> = (0..150)
        .map(|i| (format!("m{i:03}.txt"), random_bytes(100 + i * 37, i as u64)))
        .collect();
    files.push(("large.bin".into(), random_bytes(5_000_000, 7)));
    for (name, data) in &files {
        write_file(env.work.path(), name, data);
    }
    let mut args = vec!["mput", "--to", "many"];
    args.extend(files.iter().map(|(n, _)| n.as_str()));
    let out = run(env.cmd(&args)).await;
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("uploaded 151 files ("), "{err}");
    for (name, data) in &files {
        let remote = format!("many/{name}");
        assert!(
            env.server.user_bytes("mia", &remote).await == *data,
            "{name}"
        );
    }
    let out = run(env.cmd(&args)).await;
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("; 151 unchanged"), "{err}");
}
