//! Shared fixtures: a real server on 127.0.0.1 port 0 with a temporary root, clients of
//! the library, and the `netdisk` binary.
//!
//! The end-to-end suites run twice: as themselves (files and users on the local disk)
//! and included by `tests/on_s3.rs`, where [`TestServer`] keeps files and users in a
//! bucket of a real S3-compatible server (moto) instead. Tests look at what the server
//! stored through [`TestServer::stored`] and friends, which read either place.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use netdisk::client::{Client, NoProgress};
use netdisk::scram::MIN_ITERATIONS;
use netdisk::server::{Server, ServerConfig, TlsSetting};
use tempfile::TempDir;
use tokio::sync::oneshot;

pub const PASSWORD: &str = "correct horse battery staple";

/// A running server; stopped when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    /// The TLS certificate's fingerprint, when TLS is on.
    pub fingerprint: Option<String>,
    pub root: PathBuf,
    pub dir: TempDir,
    /// Where files and users live when this suite runs on S3 (`None`: under `root`).
    #[cfg(feature = "s3")]
    pub object_store: Option<netdisk::objstore::ObjectStoreConfig>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl TestServer {
    /// A plain-TCP server (library tests; TLS has its own tests).
    pub async fn start() -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        Self::start_with(dir, root, |_| {}).await
    }

    /// A server with TLS as `netdisk serve` runs by default (self-signed certificate).
    pub async fn start_tls() -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        Self::start_with(dir, root, |c| c.tls = TlsSetting::SelfSigned).await
    }

    /// Start on an existing root (a restart), adjusting the config (TLS off unless
    /// `adjust` turns it on).
    pub async fn start_with(
        dir: TempDir,
        root: PathBuf,
        adjust: impl FnOnce(&mut ServerConfig),
    ) -> TestServer {
        let mut config = ServerConfig::new("127.0.0.1:0", &root);
        config.tls = TlsSetting::Off;
        adjust(&mut config);
        #[cfg(feature = "s3")]
        if config.object_store.is_none() {
            // One prefix per root, so a restart on the same root finds the same bucket data.
            config.object_store = s3_suite_bucket().map(|bucket| bucket.config_at(&root));
        }
        #[cfg(feature = "s3")]
        let object_store = config.object_store.clone();
        let server = Server::bind(config).await.unwrap();
        let addr = server.local_addr().unwrap();
        let fingerprint = server.fingerprint().map(str::to_string);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            server
                .run(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        TestServer {
            addr,
            fingerprint,
            root,
            dir,
            #[cfg(feature = "s3")]
            object_store,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stop accepting and hand back the folder, for a restart on the same root.
    pub async fn stop(mut self) -> (TempDir, PathBuf) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        (dir, self.root.clone())
    }

    pub fn addr_string(&self) -> String {
        self.addr.to_string()
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.addr_string()).await.unwrap()
    }

    /// Register `user` (with few SCRAM iterations, to keep tests fast) and log in.
    pub async fn user(&self, user: &str) -> Client {
        let mut client = self.client().await;
        client
            .register(user, PASSWORD, MIN_ITERATIONS)
            .await
            .unwrap();
        client.login(user, PASSWORD).await.unwrap();
        client
    }

    /// Where `user`'s file `name` is on the local disk (local-only tests).
    pub fn user_file(&self, user: &str, name: &str) -> PathBuf {
        self.root.join("files").join(user).join(name)
    }

    /// Whether the server keeps its files and users on S3 in this suite.
    pub fn on_s3(&self) -> bool {
        #[cfg(feature = "s3")]
        return self.object_store.is_some();
        #[cfg(not(feature = "s3"))]
        false
    }

    /// The bytes the server stored under `key` (a path from the root: `users.xlsx`,
    /// `files/USER/NAME`), on disk or in the bucket; `None` when there is none.
    pub async fn stored(&self, key: &str) -> Option<Vec<u8>> {
        #[cfg(feature = "s3")]
        if let Some(store) = &self.object_store {
            return read_object(store, key).await;
        }
        stored_at(&self.root, key).await
    }

    /// Whether anything (a file, a folder, a folder's content) is stored under `key`.
    pub async fn stored_exists(&self, key: &str) -> bool {
        #[cfg(feature = "s3")]
        if let Some(store) = &self.object_store {
            let op = store.operator().unwrap();
            let folder = format!("{}/", key.trim_end_matches('/'));
            return op.exists(key).await.unwrap()
                || !op.list_with(&folder).limit(1).await.unwrap().is_empty();
        }
        self.root.join(key).exists()
    }

    /// The names directly inside the stored folder `dir` (files and folders, no `/`).
    pub async fn stored_names(&self, dir: &str) -> Vec<String> {
        let dir = dir.trim_end_matches('/');
        #[cfg(feature = "s3")]
        if let Some(store) = &self.object_store {
            let folder = format!("{dir}/");
            let mut names: Vec<String> = store
                .operator()
                .unwrap()
                .list(&folder)
                .await
                .unwrap()
                .iter()
                .filter(|e| e.path() != folder)
                .map(|e| e.name().trim_end_matches('/').to_string())
                .collect();
            names.sort();
            return names;
        }
        let mut names: Vec<String> = match std::fs::read_dir(self.root.join(dir)) {
            Ok(entries) => entries
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => panic!("read {dir}: {e}"),
        };
        names.sort();
        names
    }

    /// How much of an upload of `size` bytes a cut may lose beyond the bytes in flight:
    /// nothing locally (every byte written is kept), up to one multipart part on S3
    /// (only whole parts are uploaded).
    pub fn unkept_at_cut(&self, size: u64) -> u64 {
        #[cfg(feature = "s3")]
        if self.on_s3() {
            return netdisk::storage::part_size(size);
        }
        let _ = size;
        0
    }

    /// The unit in which staged bytes that differ from the sender's are sent again: a
    /// 4 MiB chunk locally, a whole multipart part on S3.
    pub fn repair_unit(&self, size: u64) -> u64 {
        self.unkept_at_cut(size).max(netdisk::digest::CHUNK_SIZE)
    }

    /// The server's file store, opened a second time on the same place (for calling it
    /// directly, as the server's background jobs do).
    pub fn storage(&self) -> std::sync::Arc<dyn netdisk::storage::Storage> {
        let options = netdisk::storage::StorageOptions::default();
        #[cfg(feature = "s3")]
        if let Some(store) = &self.object_store {
            return std::sync::Arc::new(
                netdisk::storage::ObjectStorage::open(store, options).unwrap(),
            );
        }
        std::sync::Arc::new(netdisk::storage::LocalStorage::open(&self.root, options).unwrap())
    }

    /// What changes when the object under `key` is written again: its inode and
    /// modification time on disk, its ETag and Last-Modified on S3.
    pub async fn stored_stamp(&self, key: &str) -> String {
        #[cfg(feature = "s3")]
        if let Some(store) = &self.object_store {
            let meta = store.operator().unwrap().stat(key).await.unwrap();
            return format!("{:?} {:?}", meta.etag(), meta.last_modified());
        }
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(self.root.join(key)).unwrap();
        format!("{} {}.{}", meta.ino(), meta.mtime(), meta.mtime_nsec())
    }

    /// `user`'s stored file `name` (panics when it is missing).
    pub async fn user_bytes(&self, user: &str, name: &str) -> Vec<u8> {
        let key = format!("files/{user}/{name}");
        self.stored(&key)
            .await
            .unwrap_or_else(|| panic!("{key} is not stored"))
    }

    /// Whether `user`'s file or folder `name` is stored.
    pub async fn user_has(&self, user: &str, name: &str) -> bool {
        self.stored_exists(&format!("files/{user}/{name}")).await
    }

    /// True, with a note, when this test looks at the local file system itself (inodes,
    /// symlinks, modes) and the suite runs on S3, where there is no such thing.
    pub fn local_only(&self, why: &str) -> bool {
        let skip = self.on_s3();
        if skip {
            eprintln!("not on S3: {why}");
        }
        skip
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A server config for the root `root` as [`TestServer`] would make it (TLS off; files
/// and users in this suite's bucket when it runs on S3), for tests that bind themselves.
pub fn server_config(root: &Path) -> ServerConfig {
    let mut config = ServerConfig::new("127.0.0.1:0", root);
    config.tls = TlsSetting::Off;
    #[cfg(feature = "s3")]
    {
        config.object_store = s3_suite_bucket().map(|bucket| bucket.config_at(root));
    }
    config
}

/// Store `bytes` under `key` where a server on `root` will look (before it starts).
pub async fn store_before_start(root: &Path, key: &str, bytes: &[u8]) {
    #[cfg(feature = "s3")]
    if let Some(bucket) = s3_suite_bucket() {
        let op = bucket.config_at(root).operator().unwrap();
        op.write(key, bytes.to_vec()).await.unwrap();
        return;
    }
    let path = root.join(key);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// What is stored under `key` for a server on `root` (as [`TestServer::stored`]).
pub async fn stored_at(root: &Path, key: &str) -> Option<Vec<u8>> {
    #[cfg(feature = "s3")]
    if let Some(bucket) = s3_suite_bucket() {
        return read_object(&bucket.config_at(root), key).await;
    }
    match std::fs::read(root.join(key)) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("read {key}: {e}"),
    }
}

#[cfg(feature = "s3")]
async fn read_object(store: &netdisk::objstore::ObjectStoreConfig, key: &str) -> Option<Vec<u8>> {
    match store.operator().unwrap().read(key).await {
        Ok(bytes) => Some(bytes.to_vec()),
        Err(e) if e.kind() == opendal::ErrorKind::NotFound => None,
        Err(e) => panic!("read {key} from the bucket: {e}"),
    }
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

pub async fn put_bytes(client: &mut Client, dir: &Path, name: &str, bytes: &[u8]) {
    let path = write_file(dir, &format!("upload-{name}"), bytes);
    client
        .put(&path, name, false, &mut NoProgress)
        .await
        .unwrap();
}

/// The `netdisk` binary with a private config folder and the server address set.
pub fn netdisk(server: &str, config: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_netdisk"));
    cmd.env("NETDISK_SERVER", server)
        .env("XDG_CONFIG_HOME", config)
        .env("HOME", config)
        .env_remove("NETDISK_PASSWORD")
        .env_remove("RUST_LOG");
    cmd
}

/// Run a command (on a blocking thread, so the in-process server keeps serving).
pub async fn run(mut cmd: Command) -> Output {
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The `netdisk serve` binary as a child process on an ephemeral port (for tests that
/// kill it). `wrap` can put a command in front (e.g. `unshare`).
pub struct ServerProcess {
    pub child: std::process::Child,
    pub addr: String,
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl ServerProcess {
    pub fn spawn(root: &Path, extra: &[&str]) -> ServerProcess {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_netdisk"));
        cmd.args(["serve", "--no-tls", "--listen", "127.0.0.1:0", "--root"])
            .arg(root)
            .args(extra);
        Self::spawn_command(cmd)
    }

    /// Spawn `cmd` (which must run `netdisk serve --listen 127.0.0.1:0`) and wait for the
    /// address it logs.
    pub fn spawn_command(mut cmd: Command) -> ServerProcess {
        use std::io::BufRead;
        cmd.env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.split("addr=").nth(1) {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(addr.split_whitespace().next().unwrap().to_string());
                    }
                }
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let addr = rx
            .recv_timeout(std::time::Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("server did not start: {}", log.lock().unwrap()));
        ServerProcess { child, addr, log }
    }

    /// The server's process id (for /proc/PID/status).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no chance to clean up, as in a crash.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Upload `bytes` to the remote path `remote` (through a temporary local file in `dir`).
pub async fn put_path(client: &mut Client, dir: &Path, remote: &str, bytes: &[u8]) {
    let local = write_file(dir, "upload.tmp", bytes);
    client
        .put(&local, remote, false, &mut NoProgress)
        .await
        .unwrap_or_else(|e| panic!("put {remote}: {e}"));
}

/// A bucket of its own on a real S3-compatible server (moto, from PyPI) on loopback.
pub struct S3Bucket {
    /// e.g. `http://127.0.0.1:41234`
    pub endpoint: String,
    pub bucket: String,
}

impl S3Bucket {
    /// `s3://BUCKET/PREFIX` for `netdisk serve --storage`.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{}", self.bucket, prefix)
    }

    /// The bucket as `netdisk serve --storage s3://BUCKET/netdisk` with [`S3Bucket::env`].
    #[cfg(feature = "s3")]
    pub fn config(&self) -> netdisk::objstore::ObjectStoreConfig {
        self.config_with_prefix("netdisk")
    }

    /// The bucket with a prefix of its own for the server root `root` (a fresh temporary
    /// folder per test, so tests sharing the bucket never meet).
    #[cfg(feature = "s3")]
    pub fn config_at(&self, root: &Path) -> netdisk::objstore::ObjectStoreConfig {
        let prefix: String = root
            .to_string_lossy()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        self.config_with_prefix(prefix.trim_matches('-'))
    }

    #[cfg(feature = "s3")]
    fn config_with_prefix(&self, prefix: &str) -> netdisk::objstore::ObjectStoreConfig {
        let mut config = netdisk::objstore::ObjectStoreConfig::from_url(&self.url(prefix)).unwrap();
        config.endpoint = Some(self.endpoint.clone());
        config.region = Some("us-east-1".to_string());
        config.access_key_id = Some("netdisk-test".to_string());
        config.secret_access_key = Some("netdisk-test-secret".to_string());
        config
    }

    /// The environment `netdisk serve --storage` (or the library) reads.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ACCESS_KEY_ID", "netdisk-test".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "netdisk-test-secret".to_string()),
        ]
    }
}

/// The bucket of the suites included by `tests/on_s3.rs` (their module path starts
/// with `on_s3::`); `None` in every other test binary, or when there is no S3 server and
/// NETDISK_TEST_REQUIRE_S3 is not set (then the suite runs on the local disk again).
pub fn s3_suite_bucket() -> Option<&'static S3Bucket> {
    use std::sync::OnceLock;
    static BUCKET: OnceLock<Option<S3Bucket>> = OnceLock::new();
    if !module_path!().starts_with("on_s3::") {
        return None;
    }
    BUCKET.get_or_init(s3_bucket).as_ref()
}

/// A fresh bucket on this test binary's moto server (started on first use, stopped when
/// the binary exits). `None` when moto can be neither found nor installed (no network),
/// unless NETDISK_TEST_REQUIRE_S3 is set (as in CI), where that is a failure.
pub fn s3_bucket() -> Option<S3Bucket> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::OnceLock;
    static SERVER: OnceLock<Option<(String, std::process::ChildStdin)>> = OnceLock::new();
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let server = SERVER.get_or_init(start_moto);
    let Some((endpoint, _stdin)) = server else {
        assert!(
            std::env::var_os("NETDISK_TEST_REQUIRE_S3").is_none(),
            "NETDISK_TEST_REQUIRE_S3 is set but moto could not start (pip install 'moto[server]')"
        );
        eprintln!("skipped: no S3 test server (moto could not be installed)");
        return None;
    };
    let bucket = format!(
        "netdisk-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let addr = endpoint.trim_start_matches("http://");
    let status = http_request(addr, "PUT", &format!("/{bucket}"));
    assert!(
        status.starts_with("HTTP/1.1 200"),
        "create bucket: {status}"
    );
    Some(S3Bucket {
        endpoint: endpoint.clone(),
        bucket,
    })
}

/// A Python that has moto: the system's, or else one in a virtual environment under
/// cargo's target folder, made on first use (so `cargo test` alone sets everything up).
fn moto_python() -> Option<PathBuf> {
    use std::os::fd::AsRawFd;
    let has_moto = |python: &Path| {
        Command::new(python)
            .args(["-c", "import moto.server"])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if has_moto(Path::new("python3")) {
        return Some("python3".into());
    }
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("moto-venv");
    let python = venv.join("bin/python3");
    // Test binaries run at the same time: one installs, the others wait for it.
    let lock = std::fs::File::create(venv.with_extension("lock")).ok()?;
    // SAFETY: flock on a descriptor we own; released when `lock` is dropped.
    unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    if !has_moto(&python) {
        eprintln!(
            "installing moto[server] into {} for the S3 tests",
            venv.display()
        );
        let made = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .is_ok_and(|s| s.success());
        let installed = made
            && Command::new(&python)
                .args(["-m", "pip", "install", "--quiet", "moto[server]"])
                .status()
                .is_ok_and(|s| s.success());
        if !installed {
            return None;
        }
    }
    has_moto(&python).then_some(python)
}

/// Start moto's server on a free loopback port. It exits when its stdin closes, that is
/// when this test process ends, however it ends.
fn start_moto() -> Option<(String, std::process::ChildStdin)> {
    let python = moto_python()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let script = format!(
        "import os, sys, threading\n\
         threading.Thread(target=lambda: (sys.stdin.read(), os._exit(0)), daemon=True).start()\n\
         from moto.server import main\n\
         main(['-H', '127.0.0.1', '-p', '{port}'])\n"
    );
    let mut child = Command::new(python)
        .args(["-c", &script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let stdin = child.stdin.take()?;
    let addr = format!("127.0.0.1:{port}");
    for _ in 0..300 {
        if let Ok(Some(_)) = child.try_wait() {
            return None; // moto is not installed (import failed)
        }
        if std::net::TcpStream::connect(&addr).is_ok() {
            return Some((format!("http://{addr}"), stdin));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    None
}

/// One unsigned HTTP/1.1 request (moto accepts them); returns the status line.
fn http_request(addr: &str, method: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.lines().next().unwrap_or_default().to_string()
}

/// A program on a pseudo-terminal, as a person runs it: type into it and wait (bounded)
/// for what it prints. It gets its own session with the terminal as the controlling one,
/// so Ctrl-C (`\x03`) sends it SIGINT as at a real terminal.
pub struct Terminal {
    master: std::fs::File,
    child: std::process::Child,
    output: std::sync::Arc<(std::sync::Mutex<TerminalOutput>, std::sync::Condvar)>,
    /// How much of the output [`Terminal::expect`] has gone past.
    seen: usize,
}

#[derive(Default)]
struct TerminalOutput {
    bytes: Vec<u8>,
    closed: bool,
}

/// The longest a test waits for a program on a terminal to print something.
const TERMINAL_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

impl Terminal {
    pub fn spawn(mut cmd: Command) -> Terminal {
        use std::io::Read;
        use std::os::fd::{FromRawFd, OwnedFd};
        use std::os::unix::process::CommandExt;
        let (mut master, mut slave) = (-1, -1);
        let size = libc::winsize {
            ws_row: 50,
            ws_col: 200,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let opened = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                &size,
            )
        };
        assert_eq!(opened, 0, "openpty: {}", std::io::Error::last_os_error());
        let master = unsafe { std::fs::File::from_raw_fd(master) };
        let slave = unsafe { OwnedFd::from_raw_fd(slave) };
        cmd.stdin(slave.try_clone().unwrap())
            .stdout(slave.try_clone().unwrap())
            .stderr(slave)
            .env("TERM", "xterm");
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        // Our copies of the terminal's far end go, so reading ends when the program does.
        drop(cmd);
        let output = std::sync::Arc::new((
            std::sync::Mutex::new(TerminalOutput::default()),
            std::sync::Condvar::new(),
        ));
        let sink = output.clone();
        let mut reader = master.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = reader.read(&mut buf).unwrap_or(0);
                let mut out = sink.0.lock().unwrap();
                if n == 0 {
                    out.closed = true;
                } else {
                    out.bytes.extend_from_slice(&buf[..n]);
                }
                sink.1.notify_all();
                if n == 0 {
                    break;
                }
            }
        });
        Terminal {
            master,
            child,
            output,
            seen: 0,
        }
    }

    /// Type `keys` (`\r` is Enter, `\t` Tab, `\x03` Ctrl-C, `\x04` Ctrl-D).
    pub fn send(&mut self, keys: &str) {
        use std::io::Write;
        self.master.write_all(keys.as_bytes()).unwrap();
        self.master.flush().unwrap();
    }

    /// Wait until `text` appears after what earlier calls went past; returns the output up
    /// to it (and goes past it). Panics with everything printed if it does not appear.
    pub fn expect(&mut self, text: &str) -> String {
        let deadline = std::time::Instant::now() + TERMINAL_WAIT;
        let (lock, ready) = &*self.output;
        let mut out = lock.lock().unwrap();
        loop {
            let fresh = String::from_utf8_lossy(&out.bytes[self.seen..]).into_owned();
            if let Some(at) = fresh.find(text) {
                let upto = &fresh[..at + text.len()];
                self.seen += upto.len().min(out.bytes.len() - self.seen);
                return upto.to_string();
            }
            let now = std::time::Instant::now();
            if out.closed || now >= deadline {
                panic!(
                    "{text:?} did not appear; the terminal showed:\n{}",
                    String::from_utf8_lossy(&out.bytes)
                );
            }
            out = ready.wait_timeout(out, deadline - now).unwrap().0;
        }
    }

    /// Everything printed so far.
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.0.lock().unwrap().bytes).into_owned()
    }

    /// Wait (bounded) for the program to end; its exit status.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + TERMINAL_WAIT;
        loop {
            // Ended, and all it printed has been read.
            if let Some(status) = self.child.try_wait().unwrap() {
                if self.output.0.lock().unwrap().closed {
                    return status;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "still running; the terminal showed:\n{}",
                self.output()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
