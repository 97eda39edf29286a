//! Interrupted uploads: cuts at every stage of a 100 MiB upload, each resumed from where
//! the server says; a local file that changed between attempts; two uploads of one name;
//! expiry of stale partials; partials never listed nor served.
//!
//! Cuts are made by a proxy between the client library and the server that forwards the
//! client's frames and stops at an exact byte of the upload. It then waits for the server
//! to close its side before the client sees the end, so when `put` returns its error the
//! server has settled the upload: no sleeps, no races.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use netdisk::client::{Client, NoProgress, Progress};
use netdisk::digest::{file_digest, hash_reader, ChunkHash, CHUNK_SIZE};
use netdisk::protocol::{CommitReply, Connection, PutReply, Request};
use netdisk::ErrorCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

const MIB: u64 = 1024 * 1024;

/// Records how a transfer started, how many bytes it moved, and its notices.
#[derive(Clone, Default)]
struct Recorder {
    notices: Arc<Mutex<Vec<String>>>,
    start: Arc<Mutex<Option<(u64, u64)>>>,
    moved: Arc<Mutex<u64>>,
}

impl Recorder {
    fn start(&self) -> Option<(u64, u64)> {
        *self.start.lock().unwrap()
    }
    fn moved(&self) -> u64 {
        *self.moved.lock().unwrap()
    }
    fn notices(&self) -> String {
        self.notices.lock().unwrap().join("\n")
    }
}

impl Progress for Recorder {
    fn start(&mut self, total: u64, from: u64) {
        *self.start.lock().unwrap() = Some((total, from));
    }
    fn advance(&mut self, bytes: u64) {
        *self.moved.lock().unwrap() += bytes;
    }
    fn notice(&mut self, message: &str) {
        self.notices.lock().unwrap().push(message.to_string());
    }
}

/// Where [`cut_put`] cuts the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cut {
    /// After this many bytes of `put_data` bodies reached the server.
    Data(u64),
    /// After all data, before `put_commit` reaches the server.
    BeforeCommit,
    /// After `put_commit` reached the server; no reply gets back to the client.
    AfterCommit,
}

/// `put` through a proxy that cuts the connection at `cut`. Returns the client's error
/// and what its progress recorded. When this returns, the server has closed the
/// connection, so the upload it staged is settled and its name free.
async fn cut_put(
    server: &TestServer,
    token: &str,
    local: &Path,
    remote: &str,
    cut: Cut,
) -> (netdisk::Error, Recorder) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = listener.local_addr().unwrap().to_string();
    let upstream = server.addr;
    let proxy = tokio::spawn(async move {
        let (client_side, _) = listener.accept().await.unwrap();
        let server_side = TcpStream::connect(upstream).await.unwrap();
        let (mut from_client, to_client) = client_side.into_split();
        let (from_server, mut to_server) = server_side.into_split();
        let muted = Arc::new(AtomicBool::new(false));
        let replies = tokio::spawn(pass_replies(from_server, to_client, muted.clone()));
        forward_until(&mut from_client, &mut to_server, cut, &muted).await;
        // The server sees the stream end here, finishes what it received and closes;
        // only then does the client see its connection end.
        let _ = to_server.shutdown().await;
        let to_client = replies.await.unwrap();
        drop((from_client, to_client));
    });
    let mut client = Client::connect(&proxy_addr).await.unwrap();
    client.login_with_token(token).await.unwrap();
    let recorder = Recorder::default();
    let result = client
        .put(local, remote, false, &mut recorder.clone())
        .await;
    proxy.await.unwrap();
    match result {
        Ok(outcome) => panic!("the put should have been cut at {cut:?}: {outcome:?}"),
        Err(err) => (err, recorder),
    }
}

/// Server to client: passed on until `muted`, then read and dropped. Ends when the
/// server closes the connection.
async fn pass_replies(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    muted: Arc<AtomicBool>,
) -> OwnedWriteHalf {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
        if !muted.load(Ordering::SeqCst) {
            let _ = to.write_all(&buf[..n]).await;
        }
    }
    to
}

/// Client to server, frame by frame, until the cut.
async fn forward_until(
    from: &mut OwnedReadHalf,
    to: &mut OwnedWriteHalf,
    cut: Cut,
    muted: &AtomicBool,
) {
    let mut data_left = match cut {
        Cut::Data(n) => n,
        _ => u64::MAX,
    };
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let mut len = [0u8; 4];
        if from.read_exact(&mut len).await.is_err() {
            return;
        }
        let mut header = vec![0u8; u32::from_le_bytes(len) as usize];
        if from.read_exact(&mut header).await.is_err() {
            return;
        }
        let json: serde_json::Value = serde_json::from_slice(&header).unwrap();
        let cmd = json["cmd"].as_str().unwrap_or_default().to_string();
        let mut body = json["filesize"].as_u64().unwrap_or(0);
        if cmd == "put_commit" {
            match cut {
                Cut::BeforeCommit => return,
                // Nothing the server says from now on reaches the client.
                Cut::AfterCommit => muted.store(true, Ordering::SeqCst),
                Cut::Data(_) => {}
            }
        }
        if to.write_all(&len).await.is_err() || to.write_all(&header).await.is_err() {
            return;
        }
        let is_data = cmd == "put_data";
        while body > 0 {
            let mut want = body.min(buf.len() as u64);
            if is_data {
                want = want.min(data_left);
            }
            if want == 0 {
                return;
            }
            let n = match from.read(&mut buf[..want as usize]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
            body -= n as u64;
            if is_data {
                data_left -= n as u64;
            }
        }
        if (is_data && data_left == 0) || (cmd == "put_commit" && cut == Cut::AfterCommit) {
            return;
        }
    }
}

/// On a cut, the server may drop what it had read from the socket but not yet written:
/// at most its buffers in flight (3 of 256 KiB, see `netdisk::transfer`).
const IN_FLIGHT: u64 = 3 * 256 * 1024;

/// After a cut before the commit: `ls` does not show the name, `ls --partial` shows what
/// arrived (`sent` bytes, less at most [`IN_FLIGHT`]) of `size`, and `get` finds nothing.
/// Returns where the next put continues: the last whole chunk staged.
async fn assert_only_staged(
    server: &TestServer,
    client: &mut Client,
    name: &str,
    sent: u64,
    size: u64,
) -> u64 {
    let listing = client.list().await.unwrap();
    assert!(listing.iter().all(|e| e.name != name), "{listing:?}");
    let partial = client.list_partial().await.unwrap();
    let entry = partial.iter().find(|e| e.name == name).expect("staged");
    assert_eq!(entry.size, size);
    assert!(
        entry.received <= sent && entry.received + IN_FLIGHT + server.unkept_at_cut(size) >= sent,
        "{} staged of {sent} sent",
        entry.received
    );
    assert!(entry.updated.ends_with('Z'));
    let work = tempfile::tempdir().unwrap();
    let err = client
        .get(name, &work.path().join("x"), false, &mut NoProgress)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
    assert!(!server.user_has("uma", name).await);
    if entry.received == size {
        size
    } else {
        entry.received / CHUNK_SIZE * CHUNK_SIZE
    }
}

/// Register and log in `user`; the client and a session token for more connections.
async fn user_with_token(server: &TestServer, user: &str) -> (Client, String) {
    let mut client = server.user(user).await;
    let token = client.login(user, PASSWORD).await.unwrap();
    (client, token)
}

// 100 MiB less a little, so the last chunk is short: 24 whole chunks and 4 MiB - 777 bytes.
const BIG: u64 = 100 * MIB - 777;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cuts_early_midway_and_in_the_last_chunk_each_resume_where_they_stopped() {
    let server = TestServer::start().await;
    let (mut client, token) = user_with_token(&server, "uma").await;
    let work = tempfile::tempdir().unwrap();
    let data = random_bytes(BIG as usize, 40);
    let local = write_file(work.path(), "big.iso", &data);

    // Each attempt is cut in turn; each next one starts at the last whole chunk staged.
    let mut staged = 0;
    for cut_at in [5 * MIB + 123, 50 * MIB + 7, BIG - MIB] {
        let cut = Cut::Data(cut_at - staged);
        let (err, recorder) = cut_put(&server, &token, &local, "big.iso", cut).await;
        assert_eq!(err.code(), None, "a cut, not a refusal: {err}");
        assert_eq!(recorder.start(), Some((BIG, staged)), "cut at {cut_at}");
        staged = assert_only_staged(&server, &mut client, "big.iso", cut_at, BIG).await;
    }
    assert_eq!(staged, 96 * MIB, "the last cut was in the last chunk");

    let recorder = Recorder::default();
    let outcome = client
        .put(&local, "big.iso", false, &mut recorder.clone())
        .await
        .unwrap();
    assert_eq!(outcome.resumed_from, staged);
    assert_eq!(recorder.start(), Some((BIG, staged)));
    assert_eq!(recorder.moved(), BIG - staged, "only the rest was sent");
    assert!(recorder
        .notices()
        .contains(&format!("resuming the upload of big.iso at byte {staged}")));
    assert!(server.user_bytes("uma", "big.iso").await == data);
    assert!(client.list_partial().await.unwrap().is_empty());
    assert!(server.stored_names("partial/uma").await.is_empty());
    let listing = client.list().await.unwrap();
    assert_eq!(
        (listing[0].name.as_str(), listing[0].size),
        ("big.iso", BIG)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_before_the_commit_leaves_nothing_to_send_again() {
    let server = TestServer::start().await;
    let (mut client, token) = user_with_token(&server, "uma").await;
    let work = tempfile::tempdir().unwrap();
    let data = random_bytes(BIG as usize, 41);
    let local = write_file(work.path(), "all.bin", &data);

    // Every byte arrived, the commit did not: staged, complete, not yet the file.
    let (err, _) = cut_put(&server, &token, &local, "all.bin", Cut::BeforeCommit).await;
    assert_eq!(err.code(), None, "{err}");
    let staged = assert_only_staged(&server, &mut client, "all.bin", BIG, BIG).await;
    assert_eq!(staged, BIG, "a whole body arrives whole");

    let recorder = Recorder::default();
    let outcome = client
        .put(&local, "all.bin", false, &mut recorder.clone())
        .await
        .unwrap();
    assert_eq!(recorder.start(), Some((BIG, BIG)));
    assert_eq!(recorder.moved(), 0, "only the commit was left");
    assert_eq!(outcome.resumed_from, BIG);
    assert!(server.user_bytes("uma", "all.bin").await == data);
    assert!(client.list_partial().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_commit_reply_leaves_the_file_committed_never_broken() {
    let server = TestServer::start().await;
    let (mut client, token) = user_with_token(&server, "uma").await;
    let work = tempfile::tempdir().unwrap();
    let old = random_bytes(3 * MIB as usize, 42);
    put_bytes(&mut client, work.path(), "doc.bin", &old).await;
    let data = random_bytes(2 * CHUNK_SIZE as usize + 5, 43);
    let local = write_file(work.path(), "doc.bin", &data);

    let (err, _) = cut_put(&server, &token, &local, "doc.bin", Cut::AfterCommit).await;
    assert_eq!(err.code(), None, "{err}");
    // The server got the commit: the new file replaced the old one whole.
    assert!(server.user_bytes("uma", "doc.bin").await == data);
    assert!(client.list_partial().await.unwrap().is_empty());
    let out = work.path().join("back");
    client
        .get("doc.bin", &out, false, &mut NoProgress)
        .await
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == data);
    // Putting it again (the user did not see it succeed) simply works.
    client
        .put(&local, "doc.bin", false, &mut NoProgress)
        .await
        .unwrap();
    assert!(server.user_bytes("uma", "doc.bin").await == data);
}

/// A staged prefix that no longer matches the local file: only the chunks that differ
/// are sent again, besides the rest of the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_local_file_costs_only_the_chunks_that_differ() {
    let server = TestServer::start().await;
    let (mut client, token) = user_with_token(&server, "uma").await;
    let work = tempfile::tempdir().unwrap();
    let size = 8 * CHUNK_SIZE + 999;
    let cut_at = 6 * CHUNK_SIZE + MIB;

    // The last staged chunk differs; then the very first.
    for (changed, seed) in [(5u64, 50u64), (0, 51)] {
        let name = format!("changed-{changed}.bin");
        let mut data = random_bytes(size as usize, seed);
        let local = write_file(work.path(), &name, &data);
        let (err, _) = cut_put(&server, &token, &local, &name, Cut::Data(cut_at)).await;
        assert_eq!(err.code(), None, "{err}");
        let staged = assert_only_staged(&server, &mut client, &name, cut_at, size).await;
        assert_eq!(staged, 6 * CHUNK_SIZE);

        let at = (changed * CHUNK_SIZE + 100) as usize;
        data[at] ^= 0x55;
        std::fs::write(&local, &data).unwrap();
        let recorder = Recorder::default();
        let outcome = client
            .put(&local, &name, false, &mut recorder.clone())
            .await
            .unwrap();
        assert!(
            server.user_bytes("uma", &name).await == data,
            "the new file won"
        );
        let unit = server.repair_unit(size);
        assert_eq!(
            recorder.moved(),
            (size - staged) + unit,
            "the rest, then the one chunk (S3: part) that differed"
        );
        assert!(recorder.moved() < size);
        assert_eq!(outcome.resumed_from, size - unit);
        let notices = recorder.notices();
        assert!(
            notices.contains(&format!("{unit} bytes staged earlier differ")),
            "{notices}"
        );
        assert!(client.list_partial().await.unwrap().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_file_of_another_size_starts_over() {
    let server = TestServer::start().await;
    let (mut client, token) = user_with_token(&server, "uma").await;
    let work = tempfile::tempdir().unwrap();
    let data = random_bytes(3 * CHUNK_SIZE as usize, 52);
    let local = write_file(work.path(), "grow.bin", &data);
    let (err, _) = cut_put(
        &server,
        &token,
        &local,
        "grow.bin",
        Cut::Data(2 * CHUNK_SIZE),
    )
    .await;
    assert_eq!(err.code(), None, "{err}");
    let data = random_bytes(3 * CHUNK_SIZE as usize + 1, 53);
    std::fs::write(&local, &data).unwrap();
    let recorder = Recorder::default();
    client
        .put(&local, "grow.bin", false, &mut recorder.clone())
        .await
        .unwrap();
    assert_eq!(recorder.start(), Some((data.len() as u64, 0)));
    assert!(server.user_bytes("uma", "grow.bin").await == data);
}

/// A raw connection (hello and session token done) for exchanges the client library
/// would not make.
async fn raw(server: &TestServer, token: &str) -> Connection {
    let socket = TcpStream::connect(server.addr).await.unwrap();
    let mut conn = Connection::new(socket);
    let _: serde_json::Value = conn
        .call(&Request::Hello {
            version: 1,
            client: "resume_put test".into(),
        })
        .await
        .unwrap();
    let _: serde_json::Value = conn
        .call(&Request::AuthToken {
            token: token.to_string(),
        })
        .await
        .unwrap();
    conn
}

fn chunk_hashes(data: &[u8]) -> Vec<ChunkHash> {
    hash_reader(data).unwrap()
}

fn digest_hex(chunks: &[ChunkHash]) -> String {
    file_digest(chunks).to_hex().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_uploads_of_one_name_never_mix() {
    let server = TestServer::start().await;
    let (mut second, token) = user_with_token(&server, "uma").await;
    let work = tempfile::tempdir().unwrap();
    let first_data = random_bytes(2 * CHUNK_SIZE as usize + 3, 60);
    let second_data = random_bytes(2 * CHUNK_SIZE as usize + 3, 61);
    let second_local = write_file(work.path(), "second", &second_data);

    // The first uploader holds the name and is halfway through its data...
    let mut first = raw(&server, &token).await;
    let reply: PutReply = first
        .call(&Request::Put {
            filename: "shared.bin".into(),
            size: first_data.len() as u64,
            restart: false,
            digest: None,
        })
        .await
        .unwrap();
    assert_eq!(reply.offset, 0);
    first
        .write_header(&Request::PutData {
            offset: 0,
            filesize: first_data.len() as u64,
        })
        .await
        .unwrap();
    let half = first_data.len() / 2;
    first.write_body(&first_data[..half]).await.unwrap();
    first.flush().await.unwrap();

    // ...so the second is told the name is busy, and nothing it has is sent.
    let recorder = Recorder::default();
    let err = second
        .put(&second_local, "shared.bin", false, &mut recorder.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Busy), "{err}");
    assert_eq!(recorder.moved(), 0);
    // --restart does not take the name away either.
    let err = second
        .put(&second_local, "shared.bin", true, &mut NoProgress)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Busy), "{err}");

    // The first finishes undisturbed.
    first.write_body(&first_data[half..]).await.unwrap();
    let chunks = chunk_hashes(&first_data);
    first
        .write_header(&Request::PutCommit {
            digest: digest_hex(&chunks),
            filesize: None,
        })
        .await
        .unwrap();
    first.flush().await.unwrap();
    let _: PutReply = first.read_reply().await.unwrap();
    let commit: CommitReply = first.read_reply().await.unwrap();
    assert_eq!(commit.size, first_data.len() as u64);
    assert!(server.user_bytes("uma", "shared.bin").await == first_data);

    // Now the name is free: the second upload, complete, replaces it.
    second
        .put(&second_local, "shared.bin", false, &mut NoProgress)
        .await
        .unwrap();
    assert!(server.user_bytes("uma", "shared.bin").await == second_data);
    assert!(second.list_partial().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_partials_expire_and_free_their_space() {
    let server = TestServer::start().await;
    let (mut client, token) = user_with_token(&server, "uma").await;
    let work = tempfile::tempdir().unwrap();
    let data = random_bytes(3 * CHUNK_SIZE as usize, 70);
    let local = write_file(work.path(), "old.bin", &data);
    let (err, _) = cut_put(
        &server,
        &token,
        &local,
        "old.bin",
        Cut::Data(CHUNK_SIZE + 9),
    )
    .await;
    assert_eq!(err.code(), None, "{err}");
    let staged = server.stored_names("partial/uma").await;
    if !server.on_s3() {
        assert_eq!(staged.len(), 3, "data, chunk hashes, info: {staged:?}");
    }
    assert!(!staged.is_empty());

    // Expiry as the server runs it, called directly: a fresh partial is kept...
    let storage = server.storage();
    let expired = storage
        .expire(Duration::from_secs(24 * 3600))
        .await
        .unwrap();
    assert_eq!(expired.partials, 0);
    assert_eq!(client.list_partial().await.unwrap().len(), 1);
    // ...and one idle for longer than the limit is deleted with all its files.
    assert_eq!(storage.expire(Duration::ZERO).await.unwrap().partials, 1);
    assert!(client.list_partial().await.unwrap().is_empty());
    assert_eq!(
        server.stored_names("partial/uma").await,
        Vec::<String>::new()
    );

    // The next put starts from scratch.
    let recorder = Recorder::default();
    client
        .put(&local, "old.bin", false, &mut recorder.clone())
        .await
        .unwrap();
    assert_eq!(recorder.start(), Some((data.len() as u64, 0)));
    assert!(server.user_bytes("uma", "old.bin").await == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_is_never_listed_nor_served_in_place_of_the_old_file() {
    let server = TestServer::start().await;
    let (mut client, token) = user_with_token(&server, "uma").await;
    let work = tempfile::tempdir().unwrap();
    let old = random_bytes(5000, 80);
    put_bytes(&mut client, work.path(), "report.pdf", &old).await;
    let new = random_bytes(3 * CHUNK_SIZE as usize + 17, 81);
    let local = write_file(work.path(), "report.pdf", &new);
    let (err, _) = cut_put(
        &server,
        &token,
        &local,
        "report.pdf",
        Cut::Data(2 * CHUNK_SIZE + 1),
    )
    .await;
    assert_eq!(err.code(), None, "{err}");

    // The old version is what is listed and served until the new one is complete.
    let listing = client.list().await.unwrap();
    assert_eq!(listing.len(), 1);
    assert_eq!(
        (listing[0].name.as_str(), listing[0].size),
        ("report.pdf", 5000)
    );
    let out = work.path().join("out.pdf");
    client
        .get("report.pdf", &out, false, &mut NoProgress)
        .await
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == old);
    let partial = client.list_partial().await.unwrap();
    assert_eq!(partial[0].name, "report.pdf");
    assert!(partial[0].received > CHUNK_SIZE);
    // Nothing under the user's folder but the file itself.
    assert_eq!(server.stored_names("files/uma").await, ["report.pdf"]);

    client
        .put(&local, "report.pdf", false, &mut NoProgress)
        .await
        .unwrap();
    client
        .get("report.pdf", &out, false, &mut NoProgress)
        .await
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == new);
}

/// The messages behind a mismatch, spoken directly: the server keeps the chunks that
/// match the sender's hashes, lists the others as missing, accepts data only there or at
/// the end, and still decides with its own hashes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mismatch_keeps_matching_chunks_and_asks_only_for_the_others() {
    let server = TestServer::start().await;
    if server.local_only("chunk by chunk repair: on S3 a mismatch sends its whole part again") {
        return;
    }
    let (mut client, token) = user_with_token(&server, "uma").await;
    let size = 3 * CHUNK_SIZE + 5;
    let staged = random_bytes(size as usize, 90);
    let mut wanted = staged.clone();
    wanted[(CHUNK_SIZE + 1) as usize] ^= 1; // chunk 1 differs
    let wanted_chunks = chunk_hashes(&wanted);
    let mut conn = raw(&server, &token).await;

    let put = |restart| Request::Put {
        filename: "m.bin".into(),
        size,
        restart,
        digest: None,
    };
    let reply: PutReply = conn.call(&put(false)).await.unwrap();
    assert_eq!((reply.offset, reply.missing.len()), (0, 0));
    conn.write_header(&Request::PutData {
        offset: 0,
        filesize: size,
    })
    .await
    .unwrap();
    conn.write_body(&staged).await.unwrap();
    let hashes = wanted_chunks.concat();
    conn.write_header(&Request::PutCommit {
        digest: digest_hex(&wanted_chunks),
        filesize: Some(hashes.len() as u64),
    })
    .await
    .unwrap();
    conn.write_body(&hashes).await.unwrap();
    conn.flush().await.unwrap();
    let data_reply: PutReply = conn.read_reply().await.unwrap();
    assert_eq!(data_reply.offset, size);
    let err = conn.read_reply::<CommitReply>().await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ChecksumMismatch), "{err}");
    assert!(err.to_string().contains("1 of 4 chunks differ"), "{err}");
    let partial = client.list_partial().await.unwrap();
    assert_eq!(
        partial[0].received,
        size - CHUNK_SIZE,
        "chunk 1 is to come again"
    );

    // The next put: everything is staged except chunk 1.
    let reply: PutReply = conn.call(&put(false)).await.unwrap();
    assert_eq!(reply.offset, size);
    assert_eq!(reply.missing, [(CHUNK_SIZE, CHUNK_SIZE)]);
    // Data anywhere else is refused (and the connection stays in step).
    for (offset, len) in [
        (0, CHUNK_SIZE),
        (CHUNK_SIZE, 10),
        (2 * CHUNK_SIZE, CHUNK_SIZE),
    ] {
        conn.write_header(&Request::PutData {
            offset,
            filesize: len,
        })
        .await
        .unwrap();
        conn.write_body(&wanted[offset as usize..(offset + len) as usize])
            .await
            .unwrap();
        conn.flush().await.unwrap();
        let err = conn.read_reply::<PutReply>().await.unwrap_err();
        assert_eq!(
            err.code(),
            Some(ErrorCode::Conflict),
            "{offset} {len}: {err}"
        );
    }
    // A commit before chunk 1 came again is refused, and changes nothing.
    let err = conn
        .call::<CommitReply>(&Request::PutCommit {
            digest: digest_hex(&wanted_chunks),
            filesize: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Conflict), "{err}");
    let reply: PutReply = conn.call(&put(false)).await.unwrap();
    assert_eq!(reply.missing, [(CHUNK_SIZE, CHUNK_SIZE)]);

    // Chunk 1 again, then a commit whose hashes claim a different file: the server's own
    // hashes of its bytes decide, and hashes inconsistent with the digest are not used.
    let chunk1 = &wanted[CHUNK_SIZE as usize..2 * CHUNK_SIZE as usize];
    let reply: PutReply = {
        conn.write_header(&Request::PutData {
            offset: CHUNK_SIZE,
            filesize: CHUNK_SIZE,
        })
        .await
        .unwrap();
        conn.write_body(chunk1).await.unwrap();
        conn.flush().await.unwrap();
        conn.read_reply().await.unwrap()
    };
    assert_eq!(reply.offset, size);
    let mut lying = wanted.clone();
    lying[5] ^= 1;
    let lying_chunks = chunk_hashes(&lying);
    let err = conn
        .call::<CommitReply>(&Request::PutCommit {
            digest: digest_hex(&lying_chunks),
            filesize: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::ChecksumMismatch));
    assert!(err.to_string().contains("discarded"), "{err}");
    let reply: PutReply = conn.call(&put(false)).await.unwrap();
    assert_eq!((reply.offset, reply.missing.len()), (0, 0), "dropped");

    // A chunk list of the wrong length is a bad request; the connection stays in step.
    conn.write_header(&Request::PutData {
        offset: 0,
        filesize: size,
    })
    .await
    .unwrap();
    conn.write_body(&wanted).await.unwrap();
    conn.write_header(&Request::PutCommit {
        digest: digest_hex(&wanted_chunks),
        filesize: Some(40),
    })
    .await
    .unwrap();
    conn.write_body(&[0u8; 40]).await.unwrap();
    conn.flush().await.unwrap();
    let _: PutReply = conn.read_reply().await.unwrap();
    let err = conn.read_reply::<CommitReply>().await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest), "{err}");

    // What was received stays staged: the library client finishes with nothing to send.
    let work = tempfile::tempdir().unwrap();
    let local = write_file(work.path(), "m.bin", &wanted);
    let recorder = Recorder::default();
    client
        .put(&local, "m.bin", false, &mut recorder.clone())
        .await
        .unwrap();
    assert_eq!(recorder.moved(), 0);
    assert!(server.user_bytes("uma", "m.bin").await == wanted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_request_sees_the_upload_committed_before_it() {
    let server = TestServer::start().await;
    let (_client, token) = user_with_token(&server, "uma").await;
    let mut conn = raw(&server, &token).await;
    let data = random_bytes(1000, 62);
    let size = data.len() as u64;
    // A small upload (made durable by a group commit) and a stat of it, all sent before
    // any reply is read: the stat must see the file the commit before it named.
    conn.write_header(&Request::Put {
        filename: "fresh.txt".into(),
        size,
        restart: true,
        digest: None,
    })
    .await
    .unwrap();
    conn.write_header(&Request::PutData {
        offset: 0,
        filesize: size,
    })
    .await
    .unwrap();
    conn.write_body(&data).await.unwrap();
    conn.write_header(&Request::PutCommit {
        digest: digest_hex(&chunk_hashes(&data)),
        filesize: None,
    })
    .await
    .unwrap();
    conn.write_header(&Request::Stat {
        path: "fresh.txt".into(),
        digest: false,
    })
    .await
    .unwrap();
    conn.flush().await.unwrap();
    let _: PutReply = conn.read_reply().await.unwrap();
    let _: PutReply = conn.read_reply().await.unwrap();
    let commit: CommitReply = conn.read_reply().await.unwrap();
    assert_eq!(commit.size, size);
    let stat: serde_json::Value = conn.read_reply().await.expect("stat after the commit");
    assert_eq!(stat["size"], size, "{stat}");
}
