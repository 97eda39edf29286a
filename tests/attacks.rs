//! The way an attacker works: raw frames over many connections of one account, aimed at
//! what one client can cost the others (threads, memory, slots, quota, login guesses) and
//! at the parser (smuggled frames), plus what the files on the server's disk reveal.
//!
//! Where the server's threads or memory are measured it runs as a separate process
//! (`netdisk serve`) and `/proc/PID/status` is read. The tests take one lock so that the
//! heavy ones do not disturb each other's numbers on a small machine.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use netdisk::client::{Client, ConnectOptions, NoProgress};
use netdisk::protocol::encode_header;
use netdisk::scram::MIN_ITERATIONS;
use netdisk::server::TlsSetting;
use netdisk::tls::ClientTls;
use netdisk::ErrorCode;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

const MIB: u64 = 1024 * 1024;

/// One test at a time: the attacks load a 2-core machine, and the latency, thread and
/// memory numbers must be the attack's own.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A raw protocol connection: frames written by hand, replies read by hand.
struct Raw {
    stream: TcpStream,
}

impl Raw {
    /// Connect and greet (`hello` answered ok).
    async fn connect(addr: &str) -> Raw {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let mut raw = Raw { stream };
        raw.send(&json!({"cmd": "hello", "version": 1, "client": "attacker"}))
            .await;
        let (reply, _) = raw.reply().await.unwrap();
        assert_eq!(reply["ok"], true, "hello: {reply}");
        raw
    }

    /// Connect, greet and log in with a session token.
    async fn login(addr: &str, token: &str) -> Raw {
        let mut raw = Raw::connect(addr).await;
        raw.send(&json!({"cmd": "auth_token", "token": token}))
            .await;
        let (reply, _) = raw.reply().await.unwrap();
        assert_eq!(reply["ok"], true, "auth_token: {reply}");
        raw
    }

    async fn send(&mut self, header: &Value) {
        self.send_bytes(&encode_header(header).unwrap()).await;
    }

    async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// The next reply's header and body; an error when the server closed or reset.
    async fn reply(&mut self) -> std::io::Result<(Value, Vec<u8>)> {
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).await?;
        let mut header = vec![0u8; u32::from_le_bytes(len) as usize];
        self.stream.read_exact(&mut header).await?;
        let header: Value = serde_json::from_slice(&header).unwrap();
        let mut body = vec![0u8; header["filesize"].as_u64().unwrap_or(0) as usize];
        self.stream.read_exact(&mut body).await?;
        Ok((header, body))
    }

    /// The next reply within 10 s.
    async fn reply_soon(&mut self) -> (Value, Vec<u8>) {
        tokio::time::timeout(Duration::from_secs(10), self.reply())
            .await
            .expect("a reply within 10 s")
            .expect("a reply, not a closed connection")
    }

    /// Read until the server closes (EOF or reset), at most `limit`; the bytes read.
    async fn drain_until_closed(&mut self, limit: Duration) -> u64 {
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.stream.read(&mut buf)).await {
                Err(_) => panic!("the server did not close the connection within {limit:?}"),
                Ok(Ok(0)) | Ok(Err(_)) => return total,
                Ok(Ok(n)) => total += n as u64,
            }
        }
    }
}

/// VmRSS in KiB and the thread count of process `pid`.
fn proc_status(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("Threads:"))
}

/// Open file descriptors of process `pid` (its sockets among them).
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Samples a process's threads and RSS every 50 ms until dropped; keeps the peaks.
struct Sampler {
    peak: std::sync::Arc<std::sync::Mutex<(u64, u64)>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let peak = std::sync::Arc::new(std::sync::Mutex::new(proc_status(pid)));
        let shared = peak.clone();
        let task = tokio::spawn(async move {
            loop {
                let (rss, threads) = proc_status(pid);
                {
                    let mut peak = shared.lock().unwrap();
                    peak.0 = peak.0.max(rss);
                    peak.1 = peak.1.max(threads);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Sampler { peak, task }
    }

    /// (peak VmRSS KiB, peak threads).
    fn peak(&self) -> (u64, u64) {
        *self.peak.lock().unwrap()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Register `user` and log in on a fresh connection; the client and its session token.
async fn register_and_login(addr: &str, user: &str) -> (Client, String) {
    let mut client = Client::connect(addr).await.unwrap();
    client
        .register(user, PASSWORD, MIN_ITERATIONS)
        .await
        .unwrap();
    let token = client.login(user, PASSWORD).await.unwrap();
    (client, token)
}

/// Run `open` for indices `0..count`, at most `parallel` at a time; results in index order.
async fn open_many<F, Fut>(count: usize, parallel: usize, open: F) -> Vec<Raw>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Raw> + Send + 'static,
{
    let mut out: Vec<Option<Raw>> = (0..count).map(|_| None).collect();
    let mut set = JoinSet::new();
    let mut next = 0;
    while next < count || !set.is_empty() {
        while next < count && set.len() < parallel {
            let fut = open(next);
            let i = next;
            set.spawn(async move { (i, fut.await) });
            next += 1;
        }
        let (i, raw) = set.join_next().await.unwrap().unwrap();
        out[i] = Some(raw);
    }
    out.into_iter().map(Option::unwrap).collect()
}

/// Bytes of regular files under `dir` (recursively), leaving out files named `skip`.
fn tree_bytes(dir: &Path, skip: &str) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut total = 0;
    for entry in entries {
        let entry = entry.unwrap();
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            total += tree_bytes(&entry.path(), skip);
        } else if kind.is_file() && entry.file_name() != skip {
            total += entry.metadata().unwrap().len();
        }
    }
    total
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_transfers_cost_no_threads() {
    let _serial = SERIAL.lock().await;
    netdisk::limits::raise_fd_limit().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let server = ServerProcess::spawn(
        &root,
        &[
            "--max-connections",
            "2000",
            "--max-connections-per-address",
            "2000",
        ],
    );
    let addr = server.addr.clone();
    let pid = server.pid();

    let (mut mallory, token) = register_and_login(&addr, "mallory").await;
    let work = tempfile::tempdir().unwrap();
    put_bytes(
        &mut mallory,
        work.path(),
        "big.bin",
        &random_bytes(32 * MIB as usize, 1),
    )
    .await;
    let (mut alice, alice_token) = register_and_login(&addr, "alice").await;
    put_bytes(&mut alice, work.path(), "a.txt", b"alice's").await;
    let (rss_before, threads_before) = proc_status(pid);

    let sampler = Sampler::start(pid);
    // 300 uploads that announce 1 GiB and then send nothing.
    let uploads = open_many(300, 16, |i| {
        let (addr, token) = (addr.clone(), token.clone());
        async move {
            let mut raw = Raw::login(&addr, &token).await;
            raw.send(
                &json!({"cmd": "put", "filename": format!("huge-{i}.bin"), "size": 1u64 << 30}),
            )
            .await;
            let (reply, _) = raw.reply_soon().await;
            assert_eq!(reply["ok"], true, "put: {reply}");
            raw.send(&json!({"cmd": "put_data", "offset": 0, "filesize": 1u64 << 30}))
                .await;
            raw
        }
    })
    .await;
    // 300 downloads of 32 MiB that are never read.
    let downloads = open_many(300, 16, |_| {
        let (addr, token) = (addr.clone(), token.clone());
        async move {
            let mut raw = Raw::login(&addr, &token).await;
            raw.send(&json!({"cmd": "get", "filename": "big.bin", "offset": 0}))
                .await;
            raw
        }
    })
    .await;
    // Let the server fill the downloads' socket buffers and settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_attack, threads_attack) = proc_status(pid);
    let fds_attack = open_fds(pid);

    let mut ls_times = Vec::new();
    let mut session_times = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let listing = alice.list().await.unwrap();
        ls_times.push(started.elapsed());
        assert_eq!(listing.len(), 1);
        // A new connection too: connect, log in, list.
        let started = Instant::now();
        let mut fresh = Client::connect(&addr).await.unwrap();
        fresh.login_with_token(&alice_token).await.unwrap();
        assert_eq!(fresh.list().await.unwrap().len(), 1);
        session_times.push(started.elapsed());
        fresh.quit().await.unwrap();
    }
    let (rss_after, threads_after) = proc_status(pid);
    let (rss_peak, threads_peak) = sampler.peak();
    drop(sampler);
    eprintln!(
        "stalled_transfers_cost_no_threads: {fds_attack} server fds open; threads before \
         {threads_before}, with 600 stalled transfers {threads_attack}, after ls {threads_after}, peak {threads_peak}; \
         VmRSS before {} MiB, attack {} MiB, after {} MiB, peak {} MiB; \
         alice ls {:?}; connect+login+ls {:?}",
        rss_before / 1024,
        rss_attack / 1024,
        rss_after / 1024,
        rss_peak / 1024,
        ls_times,
        session_times,
    );
    let worst_ls = ls_times.iter().max().unwrap();
    let worst_session = session_times.iter().max().unwrap();
    assert!(*worst_ls < Duration::from_secs(1), "ls took {worst_ls:?}");
    assert!(
        *worst_session < Duration::from_secs(1),
        "connect+login+ls took {worst_session:?}"
    );
    assert!(
        threads_peak < 100,
        "the server ran {threads_peak} threads for 600 stalled transfers"
    );
    // The measurement was made under the attack: the server held all 600 connections.
    assert!(
        fds_attack >= 600,
        "only {fds_attack} descriptors open in the server"
    );
    drop(uploads);
    drop(downloads);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_pipelined_listings_keep_memory_bounded() {
    let _serial = SERIAL.lock().await;
    netdisk::limits::raise_fd_limit().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let server = ServerProcess::spawn(
        &root,
        &[
            "--max-connections",
            "2000",
            "--max-connections-per-address",
            "2000",
        ],
    );
    let addr = server.addr.clone();
    let pid = server.pid();
    let (_mallory, token) = register_and_login(&addr, "mallory").await;
    let (mut alice, _) = register_and_login(&addr, "alice").await;

    let folder = root.join("files").join("mallory");
    assert!(folder.is_dir(), "login made the user's folder");
    let created = Instant::now();
    tokio::task::spawn_blocking(move || {
        for i in 0..100_000 {
            std::fs::File::create(folder.join(format!("file-{i:06}.txt"))).unwrap();
        }
    })
    .await
    .unwrap();
    let created = created.elapsed();
    let (rss_before, threads_before) = proc_status(pid);

    let sampler = Sampler::start(pid);
    let ls = encode_header(&json!({"cmd": "ls"})).unwrap();
    let four = [ls.clone(), ls.clone(), ls.clone(), ls].concat();
    let attackers = open_many(100, 16, |_| {
        let (addr, token, four) = (addr.clone(), token.clone(), four.clone());
        async move {
            let mut raw = Raw::login(&addr, &token).await;
            raw.send_bytes(&four).await;
            raw
        }
    })
    .await;

    // Until the RSS stops growing: three polls in a row without growth, at most 10 s.
    let mut samples = Vec::new();
    let mut last = 0;
    let mut flat = 0;
    let polling = Instant::now();
    while polling.elapsed() < Duration::from_secs(10) && flat < 3 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (rss, _) = proc_status(pid);
        samples.push(rss / 1024);
        flat = if rss <= last { flat + 1 } else { 0 };
        last = rss;
    }
    let (rss_settled, threads_settled) = proc_status(pid);
    let fds_settled = open_fds(pid);

    let started = Instant::now();
    let listing = alice.list().await.unwrap();
    let alice_ls = started.elapsed();
    assert!(listing.is_empty());
    let (rss_peak, threads_peak) = sampler.peak();
    drop(sampler);
    eprintln!(
        "unread_pipelined_listings_keep_memory_bounded: 100,000 files made in {created:?}; \
         VmRSS before {} MiB, settled {} MiB, peak {} MiB (samples MiB {samples:?}); \
         threads before {threads_before}, settled {threads_settled}, peak {threads_peak}; \
         {fds_settled} server fds open; alice's ls took {alice_ls:?}",
        rss_before / 1024,
        rss_settled / 1024,
        rss_peak / 1024,
    );
    assert!(
        rss_peak < 200 * 1024,
        "server VmRSS reached {} MiB",
        rss_peak / 1024
    );
    assert!(
        rss_settled < 200 * 1024,
        "server VmRSS settled at {} MiB",
        rss_settled / 1024
    );
    assert!(fds_settled >= 100, "the 100 connections were held open");
    // One user's huge folder never makes another user wait for its scans.
    assert!(
        alice_ls < Duration::from_secs(1),
        "alice's ls took {alice_ls:?} behind mallory's listings"
    );
    drop(attackers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_logins_check_few_guesses() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start().await;
    let addr = server.addr_string();
    let mut owner = server.client().await;
    owner
        .register("victim", PASSWORD, MIN_ITERATIONS)
        .await
        .unwrap();
    drop(owner);

    let mut conns = open_many(100, 8, |_| {
        let addr = addr.clone();
        async move { Raw::connect(&addr).await }
    })
    .await;
    // Every connection starts a login for the victim before any finishes.
    for (i, raw) in conns.iter_mut().enumerate() {
        raw.send(
            &json!({"cmd": "auth_start", "message": format!("n,,n=victim,r=guess{i:03}nonce")}),
        )
        .await;
    }
    let mut started = Vec::new();
    for raw in conns.iter_mut() {
        let (reply, _) = raw.reply_soon().await;
        if reply["ok"] == true {
            let message = reply["message"].as_str().unwrap();
            let nonce = message
                .split(',')
                .find_map(|part| part.strip_prefix("r="))
                .unwrap()
                .to_string();
            started.push(Some(nonce));
        } else {
            assert_eq!(reply["code"], "too_many_requests", "{reply}");
            started.push(None);
        }
    }
    let answered = started.iter().filter(|s| s.is_some()).count();
    // Then every one of them guesses.
    let proof = base64::engine::general_purpose::STANDARD.encode([0x5au8; 32]);
    for (raw, nonce) in conns.iter_mut().zip(&started) {
        let nonce = nonce.clone().unwrap_or_else(|| "guessnonce".to_string());
        raw.send(&json!({"cmd": "auth_finish", "message": format!("c=biws,r={nonce},p={proof}")}))
            .await;
    }
    let mut failed = 0;
    for (raw, nonce) in conns.iter_mut().zip(&started) {
        let (reply, _) = raw.reply_soon().await;
        assert_eq!(reply["ok"], false, "a wrong proof logged in: {reply}");
        if nonce.is_some() {
            assert_eq!(reply["code"], "auth_failed", "{reply}");
            failed += 1;
        } else {
            assert_eq!(reply["code"], "bad_request", "{reply}");
        }
    }
    drop(conns);
    eprintln!(
        "parallel_logins_check_few_guesses: {answered} of 100 auth_start answered, \
         {failed} proofs checked"
    );
    assert!(answered >= 1, "no login could start at all");
    assert!(
        answered <= 20,
        "{answered} parallel guesses were checked for one user from one address"
    );

    // The owner still gets in, after at most the wait the refusal names.
    let mut waited = Duration::ZERO;
    let mut tries = 0;
    loop {
        tries += 1;
        let mut client = server.client().await;
        match client.login("victim", PASSWORD).await {
            Ok(_) => break,
            Err(e) if e.code() == Some(ErrorCode::TooManyRequests) && tries < 3 => {
                let message = e.to_string();
                let secs: u64 = message
                    .split("try again in ")
                    .nth(1)
                    .and_then(|rest| rest.split(' ').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("refusal without a wait: {message}"));
                assert!(secs <= 20, "the owner is locked out for {secs} s");
                let wait = Duration::from_secs(secs) + Duration::from_millis(200);
                waited += wait;
                tokio::time::sleep(wait).await;
            }
            Err(e) => panic!("the owner cannot log in after {tries} tries: {e}"),
        }
    }
    eprintln!("parallel_logins_check_few_guesses: owner logged in on try {tries} after waiting {waited:?}");
}

/// Upload `count` files of `size` bytes concurrently, one connection each, all logged in
/// with `token`; how many succeeded, and every refusal must be `no_space`.
async fn concurrent_puts(addr: &str, token: &str, prefix: &str, count: usize, size: u64) -> usize {
    let work = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let mut set = JoinSet::new();
    for i in 0..count {
        let path = write_file(
            work.path(),
            &format!("{prefix}-{i}"),
            &random_bytes(size as usize, 100 + i as u64),
        );
        let (addr, token, name) = (
            addr.to_string(),
            token.to_string(),
            format!("{prefix}-{i}.bin"),
        );
        let work = work.clone();
        set.spawn(async move {
            let _keep = work;
            let mut client = Client::connect(&addr).await.unwrap();
            client.login_with_token(&token).await.unwrap();
            client.put(&path, &name, false, &mut NoProgress).await
        });
    }
    let mut ok = 0;
    while let Some(result) = set.join_next().await {
        match result.unwrap() {
            Ok(outcome) => {
                assert_eq!(outcome.size, size);
                ok += 1;
            }
            Err(e) => assert_eq!(e.code(), Some(ErrorCode::NoSpace), "{e}"),
        }
    }
    ok
}

/// What the user holds on the server's disk: files plus versions (their `path` records
/// left out), staged uploads apart.
fn stored_bytes(root: &Path, user: &str) -> (u64, u64, u64) {
    (
        tree_bytes(&root.join("files").join(user), ""),
        tree_bytes(&root.join("versions").join(user), "path"),
        tree_bytes(&root.join("partial").join(user), ""),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_cannot_be_raced() {
    let _serial = SERIAL.lock().await;
    let quota = 10 * MIB;
    let work = tempfile::tempdir().unwrap();

    // 9 MiB used, 1 MiB free: 16 uploads of 1 MiB at once.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let server = TestServer::start_with(dir, root.clone(), |c| c.quota = Some(quota)).await;
    let addr = server.addr_string();
    let (mut payer, token) = register_and_login(&addr, "payer").await;
    put_bytes(
        &mut payer,
        work.path(),
        "nine.bin",
        &random_bytes(9 * MIB as usize, 7),
    )
    .await;
    let ok_small = concurrent_puts(&addr, &token, "small", 16, MIB).await;
    let (files, versions, partial) = stored_bytes(&root, "payer");
    let usage = payer.usage().await.unwrap();
    eprintln!(
        "quota_cannot_be_raced: 1 MiB free, 16 x 1 MiB: {ok_small} succeeded; on disk files \
         {files} + versions {versions} (partial {partial}); usage {usage:?}"
    );
    assert!(ok_small >= 1, "no upload fit into the free MiB");
    assert_eq!(ok_small, 1, "exactly one 1 MiB file fits");
    assert!(files + versions <= quota, "{files} + {versions} > {quota}");
    assert!(usage.bytes + usage.version_bytes <= quota, "{usage:?}");

    // 1.5 MiB free: 16 uploads of 3 MiB at once, none fits.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let server = TestServer::start_with(dir, root.clone(), |c| c.quota = Some(quota)).await;
    let addr = server.addr_string();
    let (mut payer, token) = register_and_login(&addr, "payer").await;
    let preload = random_bytes((8 * MIB + MIB / 2) as usize, 8);
    put_bytes(&mut payer, work.path(), "eight.bin", &preload).await;
    let ok_large = concurrent_puts(&addr, &token, "large", 16, 3 * MIB).await;
    let (files, versions, partial) = stored_bytes(&root, "payer");
    eprintln!(
        "quota_cannot_be_raced: 1.5 MiB free, 16 x 3 MiB: {ok_large} succeeded; on disk files \
         {files} + versions {versions} (partial {partial})"
    );
    assert_eq!(ok_large, 0);
    assert!(files + versions <= quota, "{files} + {versions} > {quota}");

    // The 8.5 MiB file removed: it is kept as a version, which counts but may be pruned to
    // make room. 16 uploads of 3 MiB at once: at most three fit, pruning must not race.
    payer.rm("eight.bin", false).await.unwrap();
    let ok_pruning = concurrent_puts(&addr, &token, "again", 16, 3 * MIB).await;
    let (files, versions, partial) = stored_bytes(&root, "payer");
    let usage = payer.usage().await.unwrap();
    eprintln!(
        "quota_cannot_be_raced: 8.5 MiB in versions, 16 x 3 MiB: {ok_pruning} succeeded; on \
         disk files {files} + versions {versions} (partial {partial}); usage {usage:?}"
    );
    assert!(
        (1..=3).contains(&ok_pruning),
        "{ok_pruning} uploads of 3 MiB"
    );
    assert!(files + versions <= quota, "{files} + {versions} > {quota}");
    assert!(usage.bytes + usage.version_bytes <= quota, "{usage:?}");
}

/// `mkdir NAME` as a complete frame.
fn mkdir_frame(name: &str) -> Vec<u8> {
    encode_header(&json!({"cmd": "mkdir", "path": name})).unwrap()
}

/// A complete upload of the 5-byte file `hello` as `name` (digest from docs/PROTOCOL.md).
fn upload_frames(name: &str) -> Vec<u8> {
    let chunk =
        hex::decode("ea8f163db38682925e4491c5e58d4bb3506ef8c14eb78a86e908c5624a67200f").unwrap();
    let digest = "0f79bf7f41e10b873e0f24b701159b4951037967529d18dcacc9392a8fbf5163";
    let mut bytes = Vec::new();
    bytes.extend(encode_header(&json!({"cmd": "put", "filename": name, "size": 5})).unwrap());
    bytes.extend(encode_header(&json!({"cmd": "put_data", "offset": 0, "filesize": 5})).unwrap());
    bytes.extend_from_slice(b"hello");
    bytes.extend(
        encode_header(&json!({"cmd": "put_commit", "digest": digest, "filesize": 32})).unwrap(),
    );
    bytes.extend(chunk);
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_requests_never_smuggle_frames() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start().await;
    let addr = server.addr_string();
    let (_owner, token) = register_and_login(&addr, "smuggler").await;
    let home = server.root.join("files").join("smuggler");

    // The upload frames themselves work when sent as frames (so a smuggled copy would).
    let mut raw = Raw::login(&addr, &token).await;
    raw.send_bytes(&upload_frames("honest.txt")).await;
    for _ in 0..3 {
        let (reply, _) = raw.reply_soon().await;
        assert_eq!(reply["ok"], true, "{reply}");
    }
    assert_eq!(std::fs::read(home.join("honest.txt")).unwrap(), b"hello");

    // 1. put_data whose offset is a string: refused; its body (an upload and a mkdir) is
    // skipped, never read as frames.
    let mut raw = Raw::login(&addr, &token).await;
    let smuggled = [upload_frames("SMUGGLED.txt"), mkdir_frame("SMUGGLED")].concat();
    let mut bytes =
        encode_header(&json!({"cmd": "put_data", "offset": "0", "filesize": smuggled.len()}))
            .unwrap();
    bytes.extend(&smuggled);
    bytes.extend(encode_header(&json!({"cmd": "ls"})).unwrap());
    raw.send_bytes(&bytes).await;
    let (first, _) = raw.reply_soon().await;
    assert_eq!(first["ok"], false, "{first}");
    assert_eq!(first["code"], "bad_request", "{first}");
    let (second, body) = raw.reply_soon().await;
    assert_eq!(second["ok"], true, "the ls, not a smuggled frame: {second}");
    assert!(second.get("count").is_some(), "an ls reply: {second}");
    let names: Vec<Value> = serde_json::from_slice(&body).unwrap();
    assert_eq!(names.len(), 1, "only honest.txt: {names:?}");
    raw.send(&json!({"cmd": "quit"})).await;
    let (bye, _) = raw.reply_soon().await;
    assert_eq!(bye["ok"], true, "no reply was left over: {bye}");
    assert!(!home.join("SMUGGLED.txt").exists());
    assert!(!home.join("SMUGGLED").exists());

    // 2. ls carries no body: refused, the body (a mkdir) skipped.
    let mut raw = Raw::login(&addr, &token).await;
    let smuggled = mkdir_frame("SMUGGLED2");
    let mut bytes = encode_header(&json!({"cmd": "ls", "filesize": smuggled.len()})).unwrap();
    bytes.extend(&smuggled);
    bytes.extend(encode_header(&json!({"cmd": "ls"})).unwrap());
    raw.send_bytes(&bytes).await;
    let (first, _) = raw.reply_soon().await;
    assert_eq!(first["code"], "bad_request", "{first}");
    let (second, _) = raw.reply_soon().await;
    assert_eq!(second["ok"], true, "{second}");
    assert!(second.get("count").is_some(), "an ls reply: {second}");
    raw.send(&json!({"cmd": "quit"})).await;
    assert_eq!(raw.reply_soon().await.0["ok"], true);
    assert!(!home.join("SMUGGLED2").exists());

    // 3. put_data without put, otherwise well formed: refused, body skipped.
    let mut raw = Raw::login(&addr, &token).await;
    let smuggled = mkdir_frame("SMUGGLED4");
    let mut bytes =
        encode_header(&json!({"cmd": "put_data", "offset": 0, "filesize": smuggled.len()}))
            .unwrap();
    bytes.extend(&smuggled);
    bytes.extend(encode_header(&json!({"cmd": "ls"})).unwrap());
    raw.send_bytes(&bytes).await;
    assert_eq!(raw.reply_soon().await.0["code"], "bad_request");
    let (second, _) = raw.reply_soon().await;
    assert!(second.get("count").is_some(), "an ls reply: {second}");
    assert!(!home.join("SMUGGLED4").exists());

    // 4. filesize that is not a number: the server cannot know where the frame ends, so it
    // answers and closes; the bytes after it are never run.
    let mut raw = Raw::login(&addr, &token).await;
    let smuggled = mkdir_frame("SMUGGLED3");
    let mut bytes =
        encode_header(&json!({"cmd": "ls", "filesize": smuggled.len().to_string()})).unwrap();
    bytes.extend(&smuggled);
    bytes.extend(encode_header(&json!({"cmd": "ls"})).unwrap());
    raw.send_bytes(&bytes).await;
    let (first, _) = raw.reply_soon().await;
    assert_eq!(first["code"], "bad_request", "{first}");
    let rest = raw.drain_until_closed(Duration::from_secs(10)).await;
    assert_eq!(
        rest, 0,
        "nothing after the refusal: the connection is closed"
    );
    assert!(!home.join("SMUGGLED3").exists());

    let mut client = Client::connect(&addr).await.unwrap();
    client.login_with_token(&token).await.unwrap();
    let listing: Vec<String> = client
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(listing, vec!["honest.txt".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_replies_time_out() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    // One slot: while the reader-less connection holds it, no one else gets in, so a new
    // connection getting in shows that the server let it go.
    let server = TestServer::start_with(dir, root, |c| {
        c.idle_timeout = Duration::from_secs(2);
        c.max_connections = 1;
    })
    .await;
    let addr = server.addr_string();
    let (mut client, token) = register_and_login(&addr, "hoarder").await;
    let work = tempfile::tempdir().unwrap();
    let file = random_bytes(4 * MIB as usize, 3);
    put_bytes(&mut client, work.path(), "four.bin", &file).await;
    client.quit().await.unwrap();

    /// Connect once the single slot is free; `None` (and why) while it is taken.
    async fn try_connect(addr: &str) -> Result<Client, String> {
        Client::connect(addr).await.map_err(|e| e.to_string())
    }
    let mut attacker = None;
    for _ in 0..50 {
        let mut raw = Raw {
            stream: TcpStream::connect(&addr).await.unwrap(),
        };
        let mut greeting = encode_header(&json!({"cmd": "hello", "version": 1})).unwrap();
        greeting.extend(encode_header(&json!({"cmd": "auth_token", "token": token})).unwrap());
        // A refused connection may be closed before (or while) this is written.
        let _ = raw.stream.write_all(&greeting).await;
        let hello = raw.reply().await.map(|(reply, _)| reply["ok"] == true);
        if matches!(hello, Ok(true)) {
            let (reply, _) = raw.reply_soon().await;
            assert_eq!(reply["ok"], true, "{reply}");
            attacker = Some(raw);
            break;
        }
        // The setup connection's slot is not free yet.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut attacker = attacker.expect("the attacker gets the slot");

    let mut bytes = Vec::new();
    for _ in 0..8 {
        bytes.extend(encode_header(&json!({"cmd": "get", "filename": "four.bin"})).unwrap());
    }
    for _ in 0..2000 {
        bytes.extend(encode_header(&json!({"cmd": "ls"})).unwrap());
    }
    attacker.send_bytes(&bytes).await;
    let sent = Instant::now();

    // Never read; poll the slot every 200 ms for up to 30 s.
    let mut freed = None;
    let mut refusal = String::new();
    while sent.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        match try_connect(&addr).await {
            Ok(probe) => {
                freed = Some(sent.elapsed());
                probe.quit().await.unwrap();
                break;
            }
            Err(e) => refusal = e,
        }
    }
    let freed = freed.unwrap_or_else(|| {
        panic!("the server never closed the connection that does not read (probes: {refusal})")
    });
    let received = attacker.drain_until_closed(Duration::from_secs(30)).await;
    eprintln!(
        "unread_replies_time_out: the server closed the non-reading connection after \
         {freed:?} (idle timeout 2 s); {received} bytes had been delivered of {} requested",
        8 * file.len()
    );
    assert!(freed < Duration::from_secs(20), "closed after {freed:?}");
    assert!(
        received < 8 * file.len() as u64,
        "the server gave up before sending everything"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_do_not_take_slots() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let server = TestServer::start_with(dir, root, |c| {
        c.tls = TlsSetting::SelfSigned;
        c.max_connections = 10;
    })
    .await;
    let addr = server.addr_string();
    let mut silent = Vec::new();
    for _ in 0..40 {
        silent.push(TcpStream::connect(&addr).await.unwrap());
    }
    // Give the accept loop time to take them all into their TLS handshakes (the client
    // below queues behind them anyway).
    tokio::time::sleep(Duration::from_millis(300)).await;

    let config = tempfile::tempdir().unwrap();
    let options = ConnectOptions {
        tls: Some(ClientTls::Pinned {
            known_servers: config.path().join("known_servers"),
        }),
        secret: None,
    };
    let started = Instant::now();
    let served = tokio::time::timeout(Duration::from_secs(5), async {
        let mut client = Client::connect_with(&addr, &options).await?;
        client.register("patient", PASSWORD, MIN_ITERATIONS).await?;
        client.login("patient", PASSWORD).await?;
        client.list().await
    })
    .await;
    let took = started.elapsed();
    eprintln!(
        "silent_connections_do_not_take_slots: 40 silent TCP connections, max 10 served; \
         TLS connect+register+login+ls took {took:?}"
    );
    let listing = served
        .expect("connect, register and ls within 5 s")
        .unwrap();
    assert!(listing.is_empty());
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_private() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start().await;
    let mut client = server.user("privy").await;
    let work = tempfile::tempdir().unwrap();
    put_bytes(&mut client, work.path(), "diary.txt", b"dear diary").await;
    put_bytes(
        &mut client,
        work.path(),
        "big.bin",
        &random_bytes(5 * MIB as usize, 5),
    )
    .await;
    let root = &server.root;
    let home = root.join("files").join("privy");
    assert_eq!(mode(&home.join("diary.txt")), 0o600, "small file");
    assert_eq!(mode(&home.join("big.bin")), 0o600, "staged (large) file");
    assert_eq!(mode(&home), 0o700, "the user's folder");
    assert_eq!(mode(root), 0o700, "the root");
    for area in ["files", "partial", "meta", "versions"] {
        assert_eq!(mode(&root.join(area)), 0o700, "{area}");
    }
    for secret in ["users.xlsx", "sessions.json", "server.secret"] {
        let path = root.join(secret);
        if path.exists() {
            assert_eq!(mode(&path) & 0o077, 0, "{secret} is readable by others");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn display_spoofing_names_are_refused() {
    let _serial = SERIAL.lock().await;
    let server = TestServer::start().await;
    let addr = server.addr_string();
    let (mut client, token) = register_and_login(&addr, "spoofed").await;
    let work = tempfile::tempdir().unwrap();
    let local = write_file(work.path(), "payload", b"payload");
    let home = server.root.join("files").join("spoofed");

    let spoofs = [
        "invoice\u{202E}fdp.exe",  // right-to-left override: shows as invoiceexe.pdf
        "pass\u{200B}words.txt",   // zero-width space
        "report\u{2028}final.txt", // line separator
        "cafe\u{0301}.txt",        // NFD: e + combining acute
    ];
    // The library refuses the first three itself (bad_name); the NFD name it normalises.
    for name in &spoofs[..3] {
        let err = client
            .put(&local, name, false, &mut NoProgress)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::BadName), "{name:?}: {err}");
    }
    client
        .put(&local, spoofs[3], false, &mut NoProgress)
        .await
        .unwrap();
    let names: Vec<String> = std::fs::read_dir(&home)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["caf\u{e9}.txt".to_string()],
        "stored as NFC only"
    );

    // The server refuses all four itself, for put, mkdir and mv.
    let mut raw = Raw::login(&addr, &token).await;
    for name in spoofs {
        for request in [
            json!({"cmd": "put", "filename": name, "size": 7}),
            json!({"cmd": "mkdir", "path": name}),
            json!({"cmd": "mv", "from": "caf\u{e9}.txt", "to": name}),
        ] {
            raw.send(&request).await;
            let (reply, _) = raw.reply_soon().await;
            assert_eq!(reply["code"], "bad_name", "{request}: {reply}");
        }
    }
    let (reply, body) = {
        raw.send(&json!({"cmd": "ls", "partial": true})).await;
        raw.reply_soon().await
    };
    assert_eq!(
        reply["count"],
        0,
        "nothing staged: {}",
        String::from_utf8_lossy(&body)
    );
    let names: Vec<String> = std::fs::read_dir(&home)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["caf\u{e9}.txt".to_string()], "nothing created");
}
