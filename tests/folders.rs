//! Folders and paths through the client library: mkdir, ls of a folder (all pages), stat,
//! mv, rm, versions, restore, passwd, and whole-folder transfers (put_tree / get_tree).

mod common;

use std::path::{Path, PathBuf};

use common::*;
use netdisk::client::{Client, NoProgress};
use netdisk::protocol::EntryType;
use netdisk::scram::MIN_ITERATIONS;
use netdisk::ErrorCode;

fn names(entries: &[netdisk::protocol::FileEntry]) -> Vec<String> {
    entries
        .iter()
        .map(|e| match e.kind {
            EntryType::Dir => format!("{}/", e.name),
            EntryType::File => e.name.clone(),
        })
        .collect()
}

async fn get_bytes(client: &mut Client, dir: &Path, remote: &str) -> Vec<u8> {
    let local = dir.join("download.tmp");
    client
        .get(remote, &local, false, &mut NoProgress)
        .await
        .unwrap_or_else(|e| panic!("get {remote}: {e}"));
    std::fs::read(local).unwrap()
}

#[tokio::test]
async fn folders_mkdir_ls_stat_mv_rm() {
    let server = TestServer::start().await;
    let mut client = server.user("fern").await;
    let work = tempfile::tempdir().unwrap();

    client.mkdir("docs/2024", true).await.unwrap();
    client.mkdir("docs/2024", true).await.unwrap();
    let err = client.mkdir("docs", false).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Exists), "{err}");
    put_path(&mut client, work.path(), "docs/2024/report.txt", b"report").await;
    // put makes missing parents.
    put_path(&mut client, work.path(), "new/deep/x.txt", b"x").await;
    put_path(&mut client, work.path(), "top.txt", b"top").await;

    assert_eq!(
        names(&client.list().await.unwrap()),
        ["docs/", "new/", "top.txt"]
    );
    assert_eq!(names(&client.list_dir("docs").await.unwrap()), ["2024/"]);
    assert_eq!(
        names(&client.list_dir("/docs/2024/").await.unwrap()),
        ["report.txt"]
    );
    let entry = client.stat("docs/2024/report.txt", true).await.unwrap();
    assert_eq!((entry.kind, entry.size), (EntryType::File, 6));
    assert_eq!(
        entry.digest.as_deref(),
        Some(
            blake3::hash(blake3::hash(b"report").as_bytes())
                .to_hex()
                .as_str()
        )
    );
    assert_eq!(
        client.stat("docs", false).await.unwrap().kind,
        EntryType::Dir
    );
    let err = client.stat("nope.txt", false).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");

    client
        .mv("docs/2024/report.txt", "docs/report.txt", false)
        .await
        .unwrap();
    let err = client
        .mv("top.txt", "docs/report.txt", false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Exists), "{err}");
    client.mv("top.txt", "docs/report.txt", true).await.unwrap();
    assert_eq!(
        get_bytes(&mut client, work.path(), "docs/report.txt").await,
        b"top"
    );
    client.mv("new", "docs/new", false).await.unwrap();
    assert_eq!(
        names(&client.list_dir("docs").await.unwrap()),
        ["2024/", "new/", "report.txt"]
    );

    let err = client.rm("docs", false).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotEmpty), "{err}");
    client.rm("docs/2024", false).await.unwrap();
    let err = client
        .get("docs", &work.path().join("d"), false, &mut NoProgress)
        .await;
    assert_eq!(err.unwrap_err().code(), Some(ErrorCode::WrongType));
    let removed = client.rm("docs", true).await.unwrap();
    assert_eq!(removed.files, 2, "{removed:?}");
    assert!(client.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn listing_collects_every_page() {
    let server = TestServer::start().await;
    let mut client = server.user("page").await;
    let work = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for i in 0..1205 {
        let local = write_file(work.path(), &format!("f{i:05}"), b"");
        files.push((local, format!("many/f{i:05}")));
    }
    client.mkdir("many", false).await.unwrap();
    for result in client.put_many(&files, &mut NoProgress).await.unwrap() {
        result.unwrap();
    }
    let listing = client.list_dir("many").await.unwrap();
    assert_eq!(listing.len(), 1205);
    assert!(listing.windows(2).all(|w| w[0].name < w[1].name));
}

#[tokio::test]
async fn awkward_names_round_trip_and_escapes_are_refused() {
    let server = TestServer::start().await;
    let mut client = server.user("odd").await;
    let work = tempfile::tempdir().unwrap();
    let long = "é".repeat(127) + "x"; // 255 bytes
    assert_eq!(long.len(), 255);
    for (i, name) in [
        "with space/and more.txt".to_string(),
        "emoji 🎉/🦀.rs".to_string(),
        format!("{long}/{long}"),
    ]
    .iter()
    .enumerate()
    {
        let data = random_bytes(1000 + i, i as u64);
        put_path(&mut client, work.path(), name, &data).await;
        assert_eq!(get_bytes(&mut client, work.path(), name).await, data);
    }
    assert_eq!(
        names(&client.list().await.unwrap()),
        ["emoji 🎉/", "with space/", &format!("{long}/")]
    );
    // NFD input is sent as NFC: the same file.
    let nfd = "e\u{301}t\u{e9}.txt";
    put_path(&mut client, work.path(), nfd, b"ete").await;
    assert_eq!(
        get_bytes(&mut client, work.path(), "\u{e9}t\u{e9}.txt").await,
        b"ete"
    );

    let too_long = "x".repeat(256);
    for bad in ["a\nb", "../x", "a/../../x", "..", "a//b", too_long.as_str()] {
        let err = client.mkdir(bad, true).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::BadName), "{bad:?}: {err}");
        let err = client
            .get(bad, &work.path().join("out"), false, &mut NoProgress)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::BadName), "{bad:?}: {err}");
    }
    let err = client.mkdir("a\nb", true).await.unwrap_err();
    assert!(err.to_string().contains("control character"), "{err}");
    let err = client.mv("ete.txt", "../../x", false).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadName), "{err}");
    let err = client.rm("..", true).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadName), "{err}");
    let err = client.rm("", true).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadName), "{err}");
    assert!(!server.stored_exists("files/x").await);
}

#[tokio::test]
async fn versions_and_restore_after_overwrite_and_rm() {
    let server = TestServer::start().await;
    let mut client = server.user("vera").await;
    let work = tempfile::tempdir().unwrap();
    put_path(&mut client, work.path(), "d/v.txt", b"one").await;
    put_path(&mut client, work.path(), "d/v.txt", b"two").await;
    let versions = client.versions("d/v.txt").await.unwrap();
    assert_eq!(versions.len(), 1, "{versions:?}");
    assert_eq!(versions[0].size, 3);
    client.rm("d/v.txt", false).await.unwrap();
    let versions = client.versions("d/v.txt").await.unwrap();
    assert_eq!(versions.len(), 2, "{versions:?}");
    let usage = client.usage().await.unwrap();
    assert_eq!((usage.files, usage.versions), (0, 2), "{usage:?}");

    // Newest first: "two" (removed), then "one" (overwritten).
    client.restore("d/v.txt", None).await.unwrap();
    assert_eq!(get_bytes(&mut client, work.path(), "d/v.txt").await, b"two");
    let oldest = client
        .versions("d/v.txt")
        .await
        .unwrap()
        .last()
        .unwrap()
        .id
        .clone();
    client.restore("d/v.txt", Some(&oldest)).await.unwrap();
    assert_eq!(get_bytes(&mut client, work.path(), "d/v.txt").await, b"one");
    let err = client.versions("never.txt").await;
    assert!(err.map(|v| v.is_empty()).unwrap_or(true));
}

#[tokio::test]
async fn passwd_changes_the_password_and_ends_other_sessions() {
    let server = TestServer::start().await;
    let mut client = server.user("pat").await;
    let mut other = server.client().await;
    let other_token = other.login("pat", PASSWORD).await.unwrap();
    assert_eq!(client.whoami().await.unwrap(), "pat");

    let err = client
        .change_password("not the password", "new-pw", MIN_ITERATIONS, false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::AuthFailed), "{err}");
    let (user, token) = client
        .change_password(PASSWORD, "new-pw", MIN_ITERATIONS, false)
        .await
        .unwrap();
    assert_eq!(user, "pat");

    let mut fresh = server.client().await;
    let err = fresh.login("pat", PASSWORD).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::AuthFailed));
    let mut fresh = server.client().await;
    fresh.login("pat", "new-pw").await.unwrap();
    let mut fresh = server.client().await;
    let err = fresh.login_with_token(&other_token).await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(ErrorCode::AuthFailed),
        "other session revoked"
    );
    let mut fresh = server.client().await;
    assert_eq!(fresh.login_with_token(&token).await.unwrap(), "pat");

    // keep_sessions keeps them.
    let mut third = server.client().await;
    let third_token = third.login("pat", "new-pw").await.unwrap();
    client
        .change_password("new-pw", "newer-pw", MIN_ITERATIONS, true)
        .await
        .unwrap();
    let mut fresh = server.client().await;
    assert_eq!(fresh.login_with_token(&third_token).await.unwrap(), "pat");
}

/// A local tree: nested folders, an empty folder, a large file, awkward names, a symlink.
fn make_tree(root: &Path) -> Vec<(String, Vec<u8>)> {
    let files = vec![
        ("a.txt".to_string(), b"alpha".to_vec()),
        ("sub/b.bin".to_string(), random_bytes(10_000, 1)),
        ("sub/deeper/c d.txt".to_string(), b"spaced".to_vec()),
        ("sub/deeper/🦀.rs".to_string(), b"fn main() {}".to_vec()),
        ("big/large.bin".to_string(), random_bytes(9_000_000, 2)),
        ("empty.txt".to_string(), Vec::new()),
    ];
    for (name, data) in &files {
        let path = root.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    }
    std::fs::create_dir_all(root.join("void")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("sub/link-to-passwd")).unwrap();
    std::os::unix::fs::symlink("..", root.join("sub/loop")).unwrap();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_tree_and_get_tree_round_trip_then_resume_sends_nothing() {
    let server = TestServer::start().await;
    let mut client = server.user("tree").await;
    let work = tempfile::tempdir().unwrap();
    let src = work.path().join("src");
    let files = make_tree(&src);

    let report = client
        .put_tree(&src, "backup/src", &mut NoProgress)
        .await
        .unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.transferred, files.len() as u64);
    assert_eq!(report.skipped.len(), 2, "{:?}", report.skipped);
    assert!(report.skipped.iter().any(|s| s.contains("link-to-passwd")));
    assert_eq!(
        names(&client.list_dir("backup/src").await.unwrap()),
        ["a.txt", "big/", "empty.txt", "sub/", "void/"]
    );
    assert_eq!(
        names(&client.list_dir("backup/src/sub").await.unwrap()),
        ["b.bin", "deeper/"]
    );

    // Again: nothing changed, nothing sent.
    let report = client
        .put_tree(&src, "backup/src", &mut NoProgress)
        .await
        .unwrap();
    assert_eq!(
        (report.transferred, report.unchanged),
        (0, files.len() as u64)
    );

    // One changed file is the only one sent.
    std::fs::write(src.join("sub/b.bin"), b"changed").unwrap();
    let report = client
        .put_tree(&src, "backup/src", &mut NoProgress)
        .await
        .unwrap();
    assert_eq!(report.transferred, 1, "{report:?}");

    let dst = work.path().join("dst");
    let report = client
        .get_tree("backup/src", &dst, &mut NoProgress)
        .await
        .unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.transferred, files.len() as u64);
    for (name, data) in &files {
        let expected: &[u8] = if name == "sub/b.bin" {
            b"changed"
        } else {
            data
        };
        assert!(std::fs::read(dst.join(name)).unwrap() == expected, "{name}");
    }
    assert!(dst.join("void").is_dir());
    assert!(!dst.join("sub/link-to-passwd").exists());

    // Again: nothing fetched. Then a cut-short large file resumes and a changed small
    // one is fetched again; a local symlink in the way is never written through.
    let report = client
        .get_tree("backup/src", &dst, &mut NoProgress)
        .await
        .unwrap();
    assert_eq!(
        (report.transferred, report.unchanged),
        (0, files.len() as u64)
    );
    let large = dst.join("big/large.bin");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&large)
        .unwrap()
        .set_len(5_000_000)
        .unwrap();
    std::fs::write(dst.join("a.txt"), b"ALPHA").unwrap();
    let outside = work.path().join("outside.txt");
    std::fs::write(&outside, b"keep me").unwrap();
    std::fs::remove_file(dst.join("empty.txt")).unwrap();
    std::os::unix::fs::symlink(&outside, dst.join("empty.txt")).unwrap();
    let report = client
        .get_tree("backup/src", &dst, &mut NoProgress)
        .await
        .unwrap();
    assert_eq!(report.transferred, 2, "{report:?}");
    assert_eq!(report.skipped.len(), 1, "{report:?}");
    assert!(std::fs::read(&large).unwrap() == files[4].1);
    assert_eq!(std::fs::read(dst.join("a.txt")).unwrap(), b"alpha");
    assert_eq!(std::fs::read(&outside).unwrap(), b"keep me");

    let err = client
        .get_tree("backup/src/a.txt", &dst, &mut NoProgress)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::WrongType), "{err}");
}

/// `mput` of many files into one folder learns what is there from listing pages (and, past
/// the pages it reads, from a stat per file): either way, unchanged files are not sent
/// again and changed ones are, whatever their size.
#[tokio::test]
async fn put_files_into_a_full_folder_sends_only_what_changed() {
    let server = TestServer::start().await;
    let mut client = server.user("many").await;
    let work = tempfile::tempdir().unwrap();
    // The folder of more than two pages only on the local disk: the paging is the
    // client's (the stores' own paging is in tests/storage_contract.rs), and 2,005 uploads
    // to moto take minutes of the S3 pass.
    let folders: &[(&str, u64)] = if server.on_s3() {
        &[("some", 40)]
    } else {
        &[("some", 40), ("pages", 2005)]
    };
    for &(folder, count) in folders {
        let files: Vec<(PathBuf, String)> = (0..count)
            .map(|i| {
                let name = format!("f{i:04}.txt");
                let local = work.path().join(format!("{folder}-{name}"));
                std::fs::write(&local, format!("content {i}")).unwrap();
                (local, format!("{folder}/{name}"))
            })
            .collect();
        let report = client.put_files(&files, &mut NoProgress).await.unwrap();
        assert_eq!(
            (report.transferred, report.unchanged),
            (count, 0),
            "{folder}: {:?}",
            report.failed
        );

        let report = client.put_files(&files, &mut NoProgress).await.unwrap();
        assert_eq!(
            (report.transferred, report.unchanged),
            (0, count),
            "{folder}"
        );

        // Same size, other bytes; another size; and one new file in the folder.
        std::fs::write(&files[3].0, "CONTENT 3").unwrap();
        std::fs::write(&files[7].0, "longer content 7").unwrap();
        let mut more = files.clone();
        let extra = work.path().join(format!("{folder}-extra"));
        std::fs::write(&extra, "extra").unwrap();
        more.push((extra, format!("{folder}/extra.txt")));
        let report = client.put_files(&more, &mut NoProgress).await.unwrap();
        assert!(report.failed.is_empty(), "{:?}", report.failed);
        assert_eq!(
            (report.transferred, report.unchanged),
            (3, count - 2),
            "{folder}"
        );
        for i in [3, 7] {
            let back = work.path().join("back");
            client
                .get(&files[i].1, &back, false, &mut NoProgress)
                .await
                .unwrap();
            assert_eq!(
                std::fs::read(&back).unwrap(),
                std::fs::read(&files[i].0).unwrap()
            );
            std::fs::remove_file(&back).unwrap();
        }

        // A few names in a big folder: only its first pages are read, the rest is asked.
        let few: Vec<(PathBuf, String)> = more.iter().rev().step_by(97).cloned().collect();
        std::fs::write(&files[0].0, "CONTENT 0").unwrap();
        let mut few_and_first = few.clone();
        few_and_first.push(files[0].clone());
        let report = client
            .put_files(&few_and_first, &mut NoProgress)
            .await
            .unwrap();
        assert_eq!(
            (report.transferred, report.unchanged),
            (1, few.len() as u64),
            "{folder}"
        );

        // `mget` learns the sizes the same way; a name not there is still its own failure.
        let into = work.path().join(format!("{folder}-down"));
        std::fs::create_dir(&into).unwrap();
        let mut wanted: Vec<(String, PathBuf)> = more
            .iter()
            .map(|(_, remote)| (remote.clone(), into.join(remote.replace('/', "-"))))
            .collect();
        wanted.push((format!("{folder}/missing.txt"), into.join("missing")));
        let report = client
            .get_files(&wanted, false, &mut NoProgress)
            .await
            .unwrap();
        assert_eq!(report.transferred, count + 1, "{folder}");
        assert_eq!(report.failed.len(), 1, "{:?}", report.failed);
        assert_eq!(report.failed[0].1.code(), Some(ErrorCode::NotFound));
        for ((local, _), (_, down)) in more.iter().zip(&wanted) {
            assert_eq!(std::fs::read(down).unwrap(), std::fs::read(local).unwrap());
        }
    }
}
