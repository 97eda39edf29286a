//! Uploads and downloads through the client library: overwrite, empty and large files,
//! resume after a cut, resume after the server's file changed, restart, isolation.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use netdisk::client::{NoProgress, Progress};
use netdisk::digest::CHUNK_SIZE;
use netdisk::ErrorCode;

/// Records notices and how far a transfer got.
#[derive(Clone, Default)]
struct Recorder {
    notices: Arc<Mutex<Vec<String>>>,
    start: Arc<Mutex<Option<(u64, u64)>>>,
    moved: Arc<Mutex<u64>>,
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

#[tokio::test]
async fn put_ls_get_round_trip_with_overwrite_and_empty_file() {
    let server = TestServer::start().await;
    let mut client = server.user("alice").await;
    let work = tempfile::tempdir().unwrap();

    put_bytes(&mut client, work.path(), "a.txt", b"first version").await;
    put_bytes(&mut client, work.path(), "a.txt", b"second").await;
    put_bytes(&mut client, work.path(), "empty", b"").await;
    assert_eq!(server.user_bytes("alice", "a.txt").await, b"second");

    let listing = client.list().await.unwrap();
    let names: Vec<_> = listing.iter().map(|e| (e.name.as_str(), e.size)).collect();
    assert_eq!(names, [("a.txt", 6), ("empty", 0)]);
    assert!(listing[0].modified.ends_with('Z'));

    let out = work.path().join("out.txt");
    let outcome = client
        .get("a.txt", &out, false, &mut NoProgress)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), b"second");
    assert_eq!(outcome.size, 6);
    let out = work.path().join("out-empty");
    client
        .get("empty", &out, false, &mut NoProgress)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), b"");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_file_larger_than_every_buffer() {
    let server = TestServer::start().await;
    let mut client = server.user("big").await;
    let work = tempfile::tempdir().unwrap();
    // Three chunks and a bit: crosses every buffer and chunk boundary.
    let data = random_bytes(3 * CHUNK_SIZE as usize + 12_345, 1);
    put_bytes(&mut client, work.path(), "big.bin", &data).await;
    assert!(server.user_bytes("big", "big.bin").await == data);
    let out = work.path().join("big.out");
    client
        .get("big.bin", &out, false, &mut NoProgress)
        .await
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == data);
}

#[tokio::test]
async fn missing_file_and_bad_names_get_clear_errors() {
    let server = TestServer::start().await;
    let mut client = server.user("erin").await;
    let work = tempfile::tempdir().unwrap();
    let err = client
        .get("nope.txt", &work.path().join("x"), false, &mut NoProgress)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    assert!(err.to_string().contains("nope.txt"));
    let local = write_file(work.path(), "f", b"x");
    for bad in [
        "../escape",
        "a/../../escape",
        "..",
        ".",
        "a//b",
        "nul\0byte",
        "",
    ] {
        let err = client
            .put(&local, bad, false, &mut NoProgress)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::BadName), "{bad:?}");
    }
    assert!(!server.stored_exists("files/escape").await);
    // Paths are relative to the user's folder: a leading '/' does not reach the host's.
    client
        .put(&local, "/etc/passwd", false, &mut NoProgress)
        .await
        .unwrap();
    assert!(server.user_has("erin", "etc/passwd").await);
}

#[tokio::test]
async fn symlinks_out_of_the_folder_are_not_followed() {
    let server = TestServer::start().await;
    if server.local_only("a symlink planted in the user's folder on the server's disk") {
        return;
    }
    let mut client = server.user("frank").await;
    let secret = server.dir.path().join("secret.txt");
    std::fs::write(&secret, b"top secret").unwrap();
    std::os::unix::fs::symlink(&secret, server.user_file("frank", "link")).unwrap();
    let work = tempfile::tempdir().unwrap();

    assert!(
        client.list().await.unwrap().is_empty(),
        "symlinks are not listed"
    );
    let err = client
        .get("link", &work.path().join("x"), false, &mut NoProgress)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    // Uploading over the link replaces the link, never writes through it.
    put_bytes(&mut client, work.path(), "link", b"mine").await;
    assert_eq!(std::fs::read(&secret).unwrap(), b"top secret");
    assert_eq!(server.user_bytes("frank", "link").await, b"mine");
}

#[tokio::test]
async fn users_are_isolated() {
    let server = TestServer::start().await;
    let mut alice = server.user("alice").await;
    let mut bob = server.user("bob").await;
    let work = tempfile::tempdir().unwrap();
    put_bytes(&mut alice, work.path(), "private.txt", b"alice only").await;
    assert!(bob.list().await.unwrap().is_empty());
    let err = bob
        .get(
            "private.txt",
            &work.path().join("x"),
            false,
            &mut NoProgress,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    put_bytes(&mut bob, work.path(), "private.txt", b"bob's").await;
    assert_eq!(
        server.user_bytes("alice", "private.txt").await,
        b"alice only"
    );
}

#[tokio::test]
async fn commands_before_login_are_refused() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let err = client.list().await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotLoggedIn));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_resumes_after_a_real_cut() {
    let server = TestServer::start().await;
    let mut client = server.user("gina").await;
    let work = tempfile::tempdir().unwrap();
    let data = random_bytes(6 * CHUNK_SIZE as usize + 777, 2);
    put_bytes(&mut client, work.path(), "movie.bin", &data).await;
    let out = work.path().join("movie.out");

    // Cut the connection once more than half has arrived.
    cut_download(&server, "movie.bin", &out, data.len() as u64 / 2).await;
    // The partial download waits beside it as movie.out.part, never under the real name.
    assert!(!out.exists());
    let partial = std::fs::metadata(netdisk::client::partial_path(&out))
        .unwrap()
        .len();
    assert!(
        partial > 2 * CHUNK_SIZE && partial < data.len() as u64,
        "{partial}"
    );

    let recorder = Recorder::default();
    let outcome = client
        .get("movie.bin", &out, true, &mut recorder.clone())
        .await
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == data);
    assert!(
        outcome.resumed_from >= 2 * CHUNK_SIZE,
        "{}",
        outcome.resumed_from
    );
    let moved = *recorder.moved.lock().unwrap();
    assert_eq!(
        moved,
        data.len() as u64 - outcome.resumed_from,
        "only the rest was sent"
    );
    assert_eq!(
        *recorder.start.lock().unwrap(),
        Some((data.len() as u64, outcome.resumed_from))
    );
}

/// Start a download and cut it once `after` bytes have arrived: the progress callback
/// panics, which ends the client task (and its connection) on the spot.
async fn cut_download(server: &TestServer, name: &str, out: &std::path::Path, after: u64) {
    struct Trip(u64, u64);
    impl Progress for Trip {
        fn advance(&mut self, bytes: u64) {
            self.0 += bytes;
            if self.0 >= self.1 {
                panic!("simulated cut at byte {}", self.0);
            }
        }
    }
    let mut client = server.client().await;
    client.login("gina", PASSWORD).await.unwrap();
    let (name, out) = (name.to_string(), out.to_path_buf());
    let task =
        tokio::spawn(async move { client.get(&name, &out, false, &mut Trip(0, after)).await });
    assert!(task.await.unwrap_err().is_panic());
}

#[tokio::test]
async fn resume_notices_a_changed_server_file_and_starts_over() {
    let server = TestServer::start().await;
    let mut client = server.user("hank").await;
    let work = tempfile::tempdir().unwrap();
    let old = random_bytes(3 * CHUNK_SIZE as usize, 3);
    let new = random_bytes(3 * CHUNK_SIZE as usize + 5, 4);
    put_bytes(&mut client, work.path(), "doc.bin", &new).await;

    // A partial copy of the old version, chunk-aligned and not.
    for partial_len in [2 * CHUNK_SIZE as usize, 2 * CHUNK_SIZE as usize + 99] {
        let out = write_file(work.path(), "doc.out", &old[..partial_len]);
        let recorder = Recorder::default();
        let outcome = client
            .get("doc.bin", &out, true, &mut recorder.clone())
            .await
            .unwrap();
        assert!(std::fs::read(&out).unwrap() == new);
        assert_eq!(outcome.resumed_from, 0);
        let notices = recorder.notices.lock().unwrap().join("\n");
        assert!(notices.contains("starting over"), "{notices}");
    }
}

#[tokio::test]
async fn resume_with_bad_data_in_an_earlier_chunk_still_ends_correct() {
    let server = TestServer::start().await;
    let mut client = server.user("ivy").await;
    let work = tempfile::tempdir().unwrap();
    let data = random_bytes(3 * CHUNK_SIZE as usize + 5, 5);
    put_bytes(&mut client, work.path(), "f.bin", &data).await;
    // The last full chunk matches but the first is corrupt: only the final check sees it.
    let mut partial = data[..2 * CHUNK_SIZE as usize].to_vec();
    partial[10] ^= 0xff;
    let out = write_file(work.path(), "f.out", &partial);
    let recorder = Recorder::default();
    client
        .get("f.bin", &out, true, &mut recorder.clone())
        .await
        .unwrap();
    assert!(std::fs::read(&out).unwrap() == data);
    assert!(recorder
        .notices
        .lock()
        .unwrap()
        .iter()
        .any(|n| n.contains("starting over")));
}

#[tokio::test]
async fn restart_overwrites_a_local_file() {
    let server = TestServer::start().await;
    let mut client = server.user("jack").await;
    let work = tempfile::tempdir().unwrap();
    put_bytes(&mut client, work.path(), "a", b"server content").await;
    let out = write_file(
        work.path(),
        "a.out",
        b"local junk that is longer than the file",
    );
    client.get("a", &out, false, &mut NoProgress).await.unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), b"server content");
    // Resuming a complete, correct local copy yields the same file.
    client.get("a", &out, true, &mut NoProgress).await.unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), b"server content");
}

#[tokio::test]
async fn get_many_of_two_files_to_one_local_name_leaves_the_second() {
    let server = TestServer::start().await;
    let mut client = server.user("alice").await;
    let work = tempfile::tempdir().unwrap();
    put_bytes(&mut client, work.path(), "one", b"first file").await;
    put_bytes(&mut client, work.path(), "two", b"the second file").await;

    let out = work.path().join("out");
    let files = [
        ("one".to_string(), out.clone()),
        ("two".to_string(), out.clone()),
    ];
    let results = client.get_many(&files, &mut NoProgress).await.unwrap();

    assert_eq!(results.len(), 2);
    assert_eq!(results[0].as_ref().unwrap().size, 10);
    assert_eq!(results[1].as_ref().unwrap().size, 15);
    assert_eq!(std::fs::read(&out).unwrap(), b"the second file");
    assert!(!work.path().join("out.part").exists());
}

#[tokio::test]
async fn get_many_failures_mid_batch_leave_the_other_files_named_and_no_part_files() {
    let server = TestServer::start().await;
    let mut client = server.user("bob").await;
    let work = tempfile::tempdir().unwrap();
    // More files than three batches of 64, so that several are finished at once while
    // the next replies are read.
    let count = 200;
    let data: Vec<Vec<u8>> = (0..count)
        .map(|i| random_bytes(100 + i, i as u64))
        .collect();
    for (i, bytes) in data.iter().enumerate() {
        put_bytes(&mut client, work.path(), &format!("f{i}"), bytes).await;
    }
    let out = work.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let mut files: Vec<(String, std::path::PathBuf)> = (0..count)
        .map(|i| (format!("f{i}"), out.join(format!("f{i}"))))
        .collect();
    // File 70 is not on the server.
    files[70].0 = "no-such-file".to_string();
    // File 130 cannot be written: its folder does not exist.
    files[130].1 = out.join("missing").join("f130");

    let results = client.get_many(&files, &mut NoProgress).await.unwrap();

    assert_eq!(results.len(), count);
    for (i, result) in results.iter().enumerate() {
        let local = &files[i].1;
        let part = local.with_file_name(format!("f{i}.part"));
        assert!(!part.exists(), "{} left behind", part.display());
        if i == 70 || i == 130 {
            assert!(result.is_err(), "file {i} should have failed");
            assert!(!local.exists(), "file {i} got a name");
        } else {
            assert_eq!(result.as_ref().unwrap().size, data[i].len() as u64);
            assert_eq!(std::fs::read(local).unwrap(), data[i], "file {i}");
        }
    }
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), count - 2);
}

/// A batch of many files is shared with the helper connections: file `i` goes over
/// connection `i % 3`. (Seen here by giving each helper another user's login: its files
/// land in that user's folder.) Results come back in the batch's order.
#[tokio::test]
async fn many_files_are_shared_with_the_helper_connections() {
    let server = TestServer::start().await;
    let mut main = server.user("hal").await;
    main.add_upload_helper(server.user("ivy").await);
    main.add_upload_helper(server.user("joe").await);
    let work = tempfile::tempdir().unwrap();
    let count = netdisk::client::SHARE_WITH_HELPER_FILES + 3;
    let files: Vec<(std::path::PathBuf, String)> = (0..count)
        .map(|i| {
            let local = write_file(
                work.path(),
                &format!("f{i}"),
                format!("file {i}").as_bytes(),
            );
            (local, format!("f{i:04}"))
        })
        .collect();
    let results = main.put_many(&files, &mut NoProgress).await.unwrap();
    assert_eq!(results.len(), count);
    for (i, result) in results.iter().enumerate() {
        let outcome = result.as_ref().unwrap();
        assert_eq!(outcome.size, format!("file {i}").len() as u64, "{i}");
    }
    let users = ["hal", "ivy", "joe"];
    for i in 0..count {
        let name = format!("f{i:04}");
        for (c, user) in users.iter().enumerate() {
            let has = server.user_has(user, &name).await;
            assert_eq!(has, c == i % 3, "{name} at {user}");
        }
    }
}
