//! `netdisk admin` against a real `netdisk serve` process on the same root, with the
//! `netdisk` binary as the client: what an operator and a user would see.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct Env {
    server: ServerProcess,
    root: PathBuf,
    config: tempfile::TempDir,
    work: tempfile::TempDir,
    _dir: tempfile::TempDir,
}

impl Env {
    fn start() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        Env {
            server: ServerProcess::spawn(&root, &[]),
            root,
            config: tempfile::tempdir().unwrap(),
            work: tempfile::tempdir().unwrap(),
            _dir: dir,
        }
    }

    /// A client command; `password` goes in NETDISK_PASSWORD.
    fn client(&self, password: Option<&str>, args: &[&str]) -> Output {
        let mut cmd = netdisk(&self.server.addr, self.config.path());
        cmd.arg("--no-tls")
            .args(args)
            .current_dir(self.work.path())
            .stdin(Stdio::null());
        if let Some(password) = password {
            cmd.env("NETDISK_PASSWORD", password);
        }
        cmd.output().unwrap()
    }

    fn client_ok(&self, password: Option<&str>, args: &[&str]) -> String {
        let mut out = self.client(password, args);
        // Failed logins earlier in a test delay the next login from this address (the
        // throttle); a person would wait the few seconds it names, so does the test.
        for _ in 0..4 {
            if out.status.success() || !stderr(&out).contains("too many failed logins") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_secs(2));
            out = self.client(password, args);
        }
        assert!(out.status.success(), "{args:?} failed: {}", stderr(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    /// A client command that must fail; returns its error output.
    fn client_fails(&self, password: Option<&str>, args: &[&str]) -> String {
        let out = self.client(password, args);
        assert!(!out.status.success(), "{args:?} should fail");
        stderr(&out)
    }

    fn admin(&self, args: &[&str]) -> Output {
        admin(&self.root, args)
    }

    fn admin_ok(&self, args: &[&str]) -> String {
        let out = self.admin(args);
        assert!(
            out.status.success(),
            "admin {args:?} failed: {}",
            stderr(&out)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn users_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.admin_ok(&["users", "--json"])).unwrap()
    }
}

fn admin(root: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_netdisk"))
        .arg("admin")
        .arg("--root")
        .arg(root)
        .args(args)
        .env_remove("NETDISK_ROOT")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Retry `check` until it holds or 10 s pass: the server rereads the table on its
/// next lookup, so this normally holds at once; the bound only stops a hang.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "not within 10 s: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn user<'a>(users: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    users
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {users}"))
}

#[test]
fn disable_enable_reset_delete_against_a_running_server() {
    let env = Env::start();
    env.client_ok(Some("password-1"), &["register", "carol"]);
    env.client_ok(Some("password-1"), &["login", "carol"]);
    write_file(env.work.path(), "a.txt", b"carol's file");
    env.client_ok(None, &["put", "a.txt"]);

    let users = env.users_json();
    assert_eq!(user(&users, "carol")["disabled"], false);
    assert!(user(&users, "carol")["last_login"]
        .as_str()
        .is_some_and(|at| at.ends_with('Z')));
    assert!(env.admin_ok(&["users"]).contains("carol"));

    // Disabled: the saved session and the right password are refused, saying why;
    // a wrong password gets the usual answer.
    let out = env.admin_ok(&["disable", "carol"]);
    assert!(out.contains("disabled carol"), "{out}");
    eventually("the saved session is refused", || {
        !env.client(None, &["ls"]).status.success()
    });
    let err = env.client_fails(None, &["ls"]);
    assert!(err.contains("account disabled"), "{err}");
    let err = env.client_fails(Some("password-1"), &["login", "carol"]);
    assert!(err.contains("account disabled"), "{err}");
    let err = env.client_fails(Some("wrong"), &["login", "carol"]);
    assert!(err.contains("wrong user name or password"), "{err}");
    assert_eq!(user(&env.users_json(), "carol")["disabled"], true);

    env.admin_ok(&["enable", "carol"]);
    env.client_ok(Some("password-1"), &["login", "carol"]);
    assert!(env.client_ok(None, &["ls"]).contains("a.txt"));

    // Reset: the old password and the old session stop working, the printed one works.
    let out = env.admin(&["reset-password", "carol"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("netdisk passwd"), "{}", stderr(&out));
    let password = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(password.len() >= 16, "{password:?}");
    eventually("the old session is refused", || {
        !env.client(None, &["ls"]).status.success()
    });
    let err = env.client_fails(Some("password-1"), &["login", "carol"]);
    assert!(err.contains("wrong user name or password"), "{err}");
    env.client_ok(Some(&password), &["login", "carol"]);
    assert!(env.client_ok(None, &["ls"]).contains("a.txt"));

    // Delete: no more logins, files moved aside, the name starts afresh.
    let saved_logins = env.config.path().join("netdisk/logins.json");
    let old_login = std::fs::read(&saved_logins).unwrap();
    let out = env.admin_ok(&["delete", "carol"]);
    let deleted = env.root.join("deleted");
    assert!(out.contains(&deleted.display().to_string()), "{out}");
    assert!(!env.root.join("files/carol").exists());
    let moved: Vec<_> = std::fs::read_dir(&deleted)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert!(moved[0]
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("carol-"));
    assert_eq!(
        std::fs::read(moved[0].join("files/a.txt")).unwrap(),
        b"carol's file"
    );
    eventually("the deleted user's session is refused", || {
        !env.client(None, &["ls"]).status.success()
    });
    let err = env.client_fails(Some(&password), &["login", "carol"]);
    assert!(err.contains("wrong user name or password"), "{err}");

    env.client_ok(Some("password-2"), &["register", "carol"]);
    // The saved session of the deleted carol does not open the new carol's account.
    std::fs::write(&saved_logins, &old_login).unwrap();
    let err = env.client_fails(None, &["ls"]);
    assert!(err.contains("log in again"), "{err}");
    env.client_ok(Some("password-2"), &["login", "carol"]);
    let listing: serde_json::Value =
        serde_json::from_str(&env.client_ok(None, &["ls", "--json"])).unwrap();
    assert_eq!(listing, serde_json::json!([]));
    assert_eq!(user(&env.users_json(), "carol")["disabled"], false);

    for command in ["disable", "enable", "delete", "reset-password"] {
        let out = env.admin(&[command, "nobody"]);
        assert!(!out.status.success(), "{command} nobody should fail");
        assert!(
            stderr(&out).contains("no such user: nobody"),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn a_new_account_does_not_inherit_an_orphaned_folder() {
    let env = Env::start();
    // Files of an account whose row is gone (e.g. removed from users.xlsx by hand).
    let orphan = env.root.join("files/erin");
    std::fs::create_dir_all(&orphan).unwrap();
    std::fs::write(orphan.join("old.txt"), b"someone else's").unwrap();

    env.client_ok(Some("password"), &["register", "erin"]);
    env.client_ok(Some("password"), &["login", "erin"]);
    assert_eq!(env.client_ok(None, &["ls", "--json"]).trim(), "[]");
    let moved: Vec<_> = std::fs::read_dir(env.root.join("deleted"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert!(moved[0].join("files/old.txt").is_file());
    let log = env.server.log.lock().unwrap().clone();
    assert!(
        log.contains("WARN") && log.contains("moved them aside"),
        "{log}"
    );
}

#[test]
fn admin_needs_an_existing_table() {
    let dir = tempfile::tempdir().unwrap();
    let out = admin(&dir.path().join("nothing"), &["users"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no user table"), "{}", stderr(&out));
    assert!(!dir.path().join("nothing").exists());
}

#[test]
fn a_second_server_on_the_same_root_is_refused() {
    let env = Env::start();
    let second = Command::new(env!("CARGO_BIN_EXE_netdisk"))
        .args(["serve", "--no-tls", "--listen", "127.0.0.1:0", "--root"])
        .arg(&env.root)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!second.status.success());
    let expected = format!(
        "another netdisk server (pid {}) is already serving {}; stop it first or use another --root",
        env.server.child.id(),
        env.root.display()
    );
    assert!(stderr(&second).contains(&expected), "{}", stderr(&second));
    // Admin commands do not need the server's lock.
    env.client_ok(Some("password"), &["register", "fay"]);
    assert!(env.admin_ok(&["users"]).contains("fay"));

    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&env.root).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o700);

    // Once the first is gone (even killed), the root is free.
    let Env {
        mut server, root, ..
    } = env;
    server.kill9();
    let again = ServerProcess::spawn(&root, &[]);
    drop(again);
}

/// The new columns as another program sees them (openpyxl; required where
/// NETDISK_TEST_REQUIRE_OPENPYXL is set, as in CI).
#[test]
fn users_xlsx_shows_the_new_columns_in_openpyxl() {
    let env = Env::start();
    env.client_ok(Some("password"), &["register", "gus"]);
    env.client_ok(Some("password"), &["register", "hal"]);
    env.admin_ok(&["disable", "gus"]);
    let script = r#"
import sys, openpyxl
rows = list(openpyxl.load_workbook(sys.argv[1]).worksheets[0].iter_rows(values_only=True))
print(rows[0][7], rows[0][8])
for row in rows[1:]:
    print(row[0], repr(row[7]), row[8] is not None and row[8].endswith("Z"))
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(env.root.join("users.xlsx"))
        .output();
    let available = matches!(&out, Ok(o) if o.status.success() || !String::from_utf8_lossy(&o.stderr).contains("No module named"));
    if !available {
        assert!(
            std::env::var_os("NETDISK_TEST_REQUIRE_OPENPYXL").is_none(),
            "python3 with openpyxl is required"
        );
        eprintln!("skipped: python3 with openpyxl is not installed");
        return;
    }
    let out = out.unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "disabled sessions_after\ngus 'yes' True\nhal None False"
    );
}
