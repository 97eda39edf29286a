//! One contract for every file store: the same checks run against the local disk,
//! OpenDAL's in-memory service and S3 (moto on loopback), then what only shared object
//! storage promises: two servers on one bucket, and the real server on S3.
#![cfg(feature = "s3")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use netdisk::client::NoProgress;
use netdisk::digest::{file_digest, hash_reader, CHUNK_SIZE};
use netdisk::error::ErrorCode;
use netdisk::objstore::ObjectStoreConfig;
use netdisk::storage::{Kind, LocalStorage, ObjectStorage, Storage, StorageOptions, Upload};

use common::{random_bytes, S3Bucket, TestServer};

const MIB: usize = 1024 * 1024;

fn digest_of(bytes: &[u8]) -> String {
    file_digest(&hash_reader(bytes).unwrap())
        .to_hex()
        .to_string()
}

/// Send `bytes[from..]` into an upload, in pieces as the server would.
async fn send(upload: &mut Box<dyn Upload>, bytes: &[u8], from: usize) {
    upload
        .start_write(from as u64, (bytes.len() - from) as u64)
        .unwrap();
    for piece in bytes[from..].chunks(MIB) {
        upload.write(piece.to_vec(), piece.len()).await.unwrap();
    }
    upload.finish_writes().await.unwrap();
}

async fn put(storage: &dyn Storage, user: &str, path: &str, bytes: &[u8]) {
    let mut upload = storage
        .begin_upload(user, path, bytes.len() as u64, false)
        .await
        .unwrap();
    let from = upload.offset() as usize;
    send(&mut upload, bytes, from).await;
    let committed = upload.commit(&digest_of(bytes), None).await.unwrap();
    assert_eq!(committed.digest, digest_of(bytes));
    committed.durable.wait().await.unwrap();
}

async fn read_all(storage: &dyn Storage, user: &str, path: &str) -> Vec<u8> {
    let file = storage.open(user, path).await.unwrap();
    let mut out = Vec::new();
    let mut offset = 0;
    while offset < file.size() {
        let (buf, n) = file.read_at(offset, vec![0; 3 * MIB]).await.unwrap();
        out.extend_from_slice(&buf[..n]);
        offset += n as u64;
    }
    out
}

async fn names(storage: &dyn Storage, user: &str, dir: &str) -> Vec<String> {
    let page = storage.list(user, dir, None, 1000).await.unwrap();
    page.entries.into_iter().map(|e| e.name).collect()
}

/// The whole contract, each part with a user of its own.
async fn contract(storage: Arc<dyn Storage>) {
    listing_pages_and_stat(&*storage).await;
    pages_follow_names_not_keys(&*storage).await;
    folders_are_made_and_refused(&*storage).await;
    a_folder_in_the_way_is_refused(&*storage).await;
    uploads_commit_and_read_in_ranges(&*storage).await;
    overwrite_and_remove_keep_versions(&*storage).await;
    renames_move_files_and_folders(&*storage).await;
    a_path_has_one_uploader(&*storage).await;
    a_dropped_upload_resumes_at_whole_parts(&*storage).await;
    a_mismatch_keeps_matching_chunks(&*storage).await;
    usage_counts_files_versions_and_staged(&*storage).await;
    bad_paths_are_refused(&*storage).await;
}

async fn listing_pages_and_stat(s: &dyn Storage) {
    s.create_user("lena").await.unwrap();
    assert!(names(s, "lena", "").await.is_empty());
    for name in ["c.txt", "a.txt", "e.txt", "b b.txt", "😀.txt"] {
        put(s, "lena", name, name.as_bytes()).await;
    }
    s.mkdir("lena", "d", false).await.unwrap();
    let first = s.list("lena", "", None, 2).await.unwrap();
    let got: Vec<_> = first.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(got, ["a.txt", "b b.txt"]);
    assert_eq!(first.next.as_deref(), Some("b b.txt"));
    let rest = s.list("lena", "", first.next.as_deref(), 10).await.unwrap();
    let got: Vec<_> = rest.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(got, ["c.txt", "d", "e.txt", "😀.txt"]);
    assert_eq!(rest.next, None);
    assert_eq!(rest.entries[1].kind, Kind::Dir);
    assert_eq!(rest.entries[0].size, 5);
    let entry = s.stat("lena", "/c.txt").await.unwrap();
    assert_eq!(
        (entry.name.as_str(), entry.kind, entry.size),
        ("c.txt", Kind::File, 5)
    );
    assert_eq!(s.stat("lena", "d/").await.unwrap().kind, Kind::Dir);
    assert_eq!(s.stat("lena", "").await.unwrap().kind, Kind::Dir);
    let err = s.stat("lena", "nope").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
    let err = s.list("lena", "nope", None, 10).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
}

/// Every page of `dir` with at most `limit` entries, collected until `next` is `None`.
async fn all_pages(s: &dyn Storage, user: &str, dir: &str, limit: usize) -> Vec<(String, Kind)> {
    let mut all: Vec<(String, Kind)> = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = s.list(user, dir, after.as_deref(), limit).await.unwrap();
        assert!(page.entries.len() <= limit, "limit {limit}: {page:?}");
        for entry in page.entries {
            if let Some((last, _)) = all.last() {
                assert!(
                    entry.name > *last,
                    "limit {limit}: {} after {last}",
                    entry.name
                );
            }
            all.push((entry.name, entry.kind));
        }
        match page.next {
            Some(next) => {
                assert_eq!(Some(&next), all.last().map(|(n, _)| n), "limit {limit}");
                after = Some(next);
            }
            None => return all,
        }
    }
}

async fn pages_follow_names_not_keys(s: &dyn Storage) {
    s.create_user("page").await.unwrap();
    // On object storage a folder's key is its name and `/`, which sorts after the names
    // that continue with a byte below `/` (space, `!`, `+`, `-`, `.`): pages must follow
    // the names, not the keys.
    let folders = ["a", "a b", "x"];
    let files = [
        "a!", "a b.txt", "a+b", "a-1", "a.txt", "ab", "A", "x y", "x.1", "é", "😀", "~",
    ];
    for dir in folders {
        s.mkdir("page", dir, false).await.unwrap();
    }
    put(s, "page", "a b/inside", b"in a folder").await;
    for name in files {
        put(s, "page", name, name.as_bytes()).await;
    }
    let mut expected: Vec<(String, Kind)> = folders
        .iter()
        .map(|n| (n.to_string(), Kind::Dir))
        .chain(files.iter().map(|n| (n.to_string(), Kind::File)))
        .collect();
    expected.sort();
    for limit in [1, 2, 3, 4, 7, 1000] {
        assert_eq!(
            all_pages(s, "page", "", limit).await,
            expected,
            "limit {limit}"
        );
    }
    // After a name that is not there, and in a sub-folder.
    let page = s.list("page", "", Some("a,"), 2).await.unwrap();
    let got: Vec<_> = page.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(got, ["a-1", "a.txt"]);
    assert_eq!(names(s, "page", "a b").await, ["inside"]);
    let err = s.list("page", "a.txt", None, 10).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::WrongType), "{err}");
}

/// An upload onto a folder, or under a file, is refused (by its commit at the latest:
/// small uploads may only find out at their last write) and changes nothing.
async fn a_folder_in_the_way_is_refused(s: &dyn Storage) {
    s.create_user("gus").await.unwrap();
    s.mkdir("gus", "dir", false).await.unwrap();
    put(s, "gus", "file", b"f").await;
    for (path, size) in [
        ("dir", 10),
        ("dir", 0),
        ("file/inner", 10),
        ("dir", 20 * MIB),
        ("file/inner", 20 * MIB),
    ] {
        let bytes = vec![7u8; size];
        let refused = async {
            let mut upload = s.begin_upload("gus", path, size as u64, false).await?;
            upload.start_write(0, size as u64)?;
            for piece in bytes.chunks(MIB) {
                upload.write(piece.to_vec(), piece.len()).await?;
            }
            upload.finish_writes().await?;
            let committed = upload.commit(&digest_of(&bytes), None).await?;
            committed.durable.wait().await
        }
        .await
        .unwrap_err();
        assert_eq!(
            refused.code(),
            Some(ErrorCode::WrongType),
            "{path} ({size} bytes): {refused}"
        );
    }
    assert_eq!(s.stat("gus", "dir").await.unwrap().kind, Kind::Dir);
    assert!(names(s, "gus", "dir").await.is_empty());
    assert_eq!(read_all(s, "gus", "file").await, b"f");
    assert!(s.list_partial("gus").await.unwrap().is_empty());
}

async fn folders_are_made_and_refused(s: &dyn Storage) {
    s.create_user("fay").await.unwrap();
    let err = s.mkdir("fay", "a/b", false).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
    s.mkdir("fay", "a/b/c", true).await.unwrap();
    s.mkdir("fay", "a/b/c", true).await.unwrap(); // -p: no error when it exists
    let err = s.mkdir("fay", "a/b", false).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Exists), "{err}");
    assert_eq!(names(s, "fay", "a/b").await, ["c"]);
    assert!(
        names(s, "fay", "a/b/c").await.is_empty(),
        "an empty folder is listed"
    );
    put(s, "fay", "f", b"x").await;
    let err = s.mkdir("fay", "f/g", true).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::WrongType), "{err}");
    // A file committed into a new folder makes the folder.
    put(s, "fay", "new/deep/file", b"y").await;
    assert_eq!(s.stat("fay", "new/deep").await.unwrap().kind, Kind::Dir);
    let err = s.remove("fay", "a", false).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotEmpty), "{err}");
    s.remove("fay", "a/b/c", false).await.unwrap();
    assert!(names(s, "fay", "a/b").await.is_empty());
}

async fn uploads_commit_and_read_in_ranges(s: &dyn Storage) {
    s.create_user("ruth").await.unwrap();
    // 20 MiB and a bit: several parts on S3, a short last chunk.
    let big = random_bytes(20 * MIB + 12_345, 1);
    put(s, "ruth", "big.bin", &big).await;
    let file = s.open("ruth", "big.bin").await.unwrap();
    assert_eq!(file.size(), big.len() as u64);
    assert_eq!(file.chunks(), hash_reader(&big[..]).unwrap());
    let at = 9 * MIB - 17; // across a part boundary
    let (buf, n) = file.read_at(at as u64, vec![0; 2 * MIB]).await.unwrap();
    assert_eq!(&buf[..n], &big[at..at + 2 * MIB]);
    let (buf, n) = file
        .read_at(big.len() as u64 - 5, vec![0; 100])
        .await
        .unwrap();
    assert_eq!(&buf[..n], &big[big.len() - 5..]);
    assert_eq!(read_all(s, "ruth", "big.bin").await, big);
    put(s, "ruth", "empty", b"").await;
    assert_eq!(s.stat("ruth", "empty").await.unwrap().size, 0);
    assert!(read_all(s, "ruth", "empty").await.is_empty());
    // An upload not committed shows nowhere but in the staged list.
    let mut upload = s.begin_upload("ruth", "half", 10, false).await.unwrap();
    upload.start_write(0, 10).unwrap();
    let err = upload.commit(&digest_of(b""), None).await.err().unwrap();
    assert_eq!(err.code(), Some(ErrorCode::Conflict), "{err}");
    assert!(!names(s, "ruth", "").await.contains(&"half".to_string()));
}

async fn overwrite_and_remove_keep_versions(s: &dyn Storage) {
    s.create_user("vic").await.unwrap();
    put(s, "vic", "doc", b"one").await;
    put(s, "vic", "doc", b"two!").await;
    assert_eq!(read_all(s, "vic", "doc").await, b"two!");
    let versions = s.versions("vic", "doc").await.unwrap();
    assert_eq!(versions.len(), 1, "{versions:?}");
    assert_eq!((versions[0].kind, versions[0].size), (Kind::File, 3));
    let removed = s.remove("vic", "doc", false).await.unwrap();
    assert_eq!((removed.files, removed.bytes), (1, 4));
    assert!(s.stat("vic", "doc").await.is_err());
    assert_eq!(s.versions("vic", "doc").await.unwrap().len(), 2);
    s.restore("vic", "doc", None).await.unwrap();
    assert_eq!(read_all(s, "vic", "doc").await, b"two!");
    let oldest = s.versions("vic", "doc").await.unwrap().pop().unwrap();
    s.restore("vic", "doc", Some(&oldest.id)).await.unwrap();
    assert_eq!(read_all(s, "vic", "doc").await, b"one");
    // A folder removed recursively comes back whole.
    put(s, "vic", "tree/x/y", b"yy").await;
    s.mkdir("vic", "tree/empty", false).await.unwrap();
    let removed = s.remove("vic", "tree", true).await.unwrap();
    assert_eq!((removed.files, removed.bytes), (1, 2));
    assert!(s.stat("vic", "tree").await.is_err());
    let versions = s.versions("vic", "tree").await.unwrap();
    assert_eq!(versions[0].kind, Kind::Dir);
    s.restore("vic", "tree", None).await.unwrap();
    assert_eq!(read_all(s, "vic", "tree/x/y").await, b"yy");
    assert_eq!(s.stat("vic", "tree/empty").await.unwrap().kind, Kind::Dir);
    let (count, _) = s.prune_versions("vic", u64::MAX).await.unwrap();
    assert!(count >= 1);
    assert!(s.versions("vic", "doc").await.unwrap().is_empty());
}

async fn renames_move_files_and_folders(s: &dyn Storage) {
    s.create_user("max").await.unwrap();
    let big = random_bytes(9 * MIB, 2);
    put(s, "max", "a.bin", &big).await;
    put(s, "max", "b.txt", b"bee").await;
    s.rename("max", "a.bin", "c.bin", false).await.unwrap();
    assert!(s.stat("max", "a.bin").await.is_err());
    let file = s.open("max", "c.bin").await.unwrap();
    assert_eq!(file.chunks(), hash_reader(&big[..]).unwrap());
    let err = s.rename("max", "b.txt", "c.bin", false).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Exists), "{err}");
    s.rename("max", "b.txt", "c.bin", true).await.unwrap();
    assert_eq!(read_all(s, "max", "c.bin").await, b"bee");
    assert_eq!(s.versions("max", "c.bin").await.unwrap().len(), 1);
    let err = s
        .rename("max", "c.bin", "no/where", false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");
    put(s, "max", "dir/sub/f", b"f").await;
    s.mkdir("max", "dir/empty", false).await.unwrap();
    s.mkdir("max", "other", false).await.unwrap();
    let err = s
        .rename("max", "dir", "dir/sub/x", false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest), "{err}");
    let err = s.rename("max", "dir", "other", true).await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(ErrorCode::Exists),
        "a folder is never replaced: {err}"
    );
    s.rename("max", "dir", "moved", false).await.unwrap();
    assert!(s.stat("max", "dir").await.is_err());
    assert_eq!(read_all(s, "max", "moved/sub/f").await, b"f");
    assert_eq!(names(s, "max", "moved").await, ["empty", "sub"]);
}

async fn a_path_has_one_uploader(s: &dyn Storage) {
    s.create_user("bo").await.unwrap();
    let first = s
        .begin_upload("bo", "x", 20 * MIB as u64, false)
        .await
        .unwrap();
    let err = s
        .begin_upload("bo", "x", 20 * MIB as u64, false)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Some(ErrorCode::Busy), "{err}");
    drop(first);
    let second = s.begin_upload("bo", "x", 20 * MIB as u64, false).await;
    assert!(second.is_ok(), "free again once the first is dropped");
}

async fn a_dropped_upload_resumes_at_whole_parts(s: &dyn Storage) {
    s.create_user("rex").await.unwrap();
    let data = random_bytes(20 * MIB + 7, 3);
    let mut upload = s
        .begin_upload("rex", "r.bin", data.len() as u64, false)
        .await
        .unwrap();
    upload.start_write(0, data.len() as u64).unwrap();
    for piece in data[..17 * MIB].chunks(MIB) {
        upload.write(piece.to_vec(), piece.len()).await.unwrap();
    }
    upload.finish_writes().await.unwrap();
    drop(upload);
    let partial = s.list_partial("rex").await.unwrap();
    assert_eq!(partial.len(), 1);
    assert_eq!(partial[0].size, data.len() as u64);
    let mut upload = s
        .begin_upload("rex", "r.bin", data.len() as u64, false)
        .await
        .unwrap();
    let offset = upload.offset();
    assert!(
        offset >= 8 * MIB as u64 && offset <= 17 * MIB as u64 && offset % CHUNK_SIZE == 0,
        "resumed at {offset}"
    );
    send(&mut upload, &data, offset as usize).await;
    upload.commit(&digest_of(&data), None).await.unwrap();
    assert_eq!(read_all(s, "rex", "r.bin").await, data);
    assert!(s.list_partial("rex").await.unwrap().is_empty());
}

async fn a_mismatch_keeps_matching_chunks(s: &dyn Storage) {
    s.create_user("mia").await.unwrap();
    let good = random_bytes(20 * MIB, 4);
    let mut bad = good.clone();
    bad[17 * MIB] ^= 1; // in the third part on S3, the fifth chunk
    let mut upload = s
        .begin_upload("mia", "m.bin", good.len() as u64, false)
        .await
        .unwrap();
    send(&mut upload, &bad, 0).await;
    let theirs = hash_reader(&good[..]).unwrap();
    let err = upload
        .commit(&digest_of(&good), Some(theirs))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Some(ErrorCode::ChecksumMismatch), "{err}");
    let mut upload = s
        .begin_upload("mia", "m.bin", good.len() as u64, false)
        .await
        .unwrap();
    let missing = upload.missing();
    assert_eq!(missing.len(), 1, "{missing:?}");
    let (offset, len) = missing[0];
    assert!(offset <= 17 * MIB as u64 && offset + len > 17 * MIB as u64);
    assert!(len < good.len() as u64, "the other chunks stay");
    upload.start_write(offset, len).unwrap();
    let range = &good[offset as usize..(offset + len) as usize];
    for piece in range.chunks(MIB) {
        upload.write(piece.to_vec(), piece.len()).await.unwrap();
    }
    upload.finish_writes().await.unwrap();
    upload.commit(&digest_of(&good), None).await.unwrap();
    assert_eq!(read_all(s, "mia", "m.bin").await, good);
}

async fn usage_counts_files_versions_and_staged(s: &dyn Storage) {
    s.create_user("uli").await.unwrap();
    put(s, "uli", "a", b"12345").await;
    put(s, "uli", "a", b"123").await;
    put(s, "uli", "d/b", b"1").await;
    let upload = s
        .begin_upload("uli", "staged", 20 * MIB as u64, false)
        .await
        .unwrap();
    drop(upload);
    let usage = s.usage("uli").await.unwrap();
    assert_eq!((usage.files, usage.file_bytes), (2, 4));
    assert_eq!((usage.versions, usage.version_bytes), (1, 5));
    assert_eq!(usage.staged, [("staged".to_string(), 20 * MIB as u64)]);
    s.remove_partial("uli", "staged").await.unwrap();
    assert!(s.usage("uli").await.unwrap().staged.is_empty());
}

async fn bad_paths_are_refused(s: &dyn Storage) {
    s.create_user("pat").await.unwrap();
    for bad in ["../x", "a//b", "a/./b", "a\\b"] {
        let err = s.stat("pat", bad).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::BadName), "{bad}");
        let err = s.begin_upload("pat", bad, 1, false).await.err().unwrap();
        assert_eq!(err.code(), Some(ErrorCode::BadName), "{bad}");
    }
    assert!(s.list("../etc", "", None, 10).await.is_err());
    let err = s.remove("pat", "/", true).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadRequest), "{err}");
}

fn memory_storage() -> ObjectStorage {
    let op = opendal::Operator::new(opendal::services::Memory::default()).unwrap();
    ObjectStorage::new(op, None, StorageOptions::default())
}

fn s3_config(bucket: &S3Bucket, prefix: &str) -> ObjectStoreConfig {
    let mut config = ObjectStoreConfig::from_url(&bucket.url(prefix)).unwrap();
    config.endpoint = Some(bucket.endpoint.clone());
    config.region = Some("us-east-1".into());
    config.access_key_id = Some("id".into());
    config.secret_access_key = Some("key".into());
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_storage_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let storage = LocalStorage::open(dir.path(), StorageOptions::default()).unwrap();
    contract(Arc::new(storage)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_storage_in_memory_keeps_the_contract() {
    contract(Arc::new(memory_storage())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_storage_on_s3_keeps_the_contract() {
    let Some(bucket) = common::s3_bucket() else {
        return;
    };
    let config = s3_config(&bucket, "contract");
    let storage = ObjectStorage::open(&config, StorageOptions::default()).unwrap();
    contract(Arc::new(storage)).await;
}

/// Wait until `node`'s dropped upload of `path` has given up its lease (a background
/// write), so another server may take it at once.
async fn lease_released(node: &ObjectStorage, user: &str, path: &str) -> String {
    for _ in 0..500 {
        let record = node.partial_record(user, path).await.unwrap().unwrap();
        if record.contains("\"lease_until\":0") {
            return record;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the lease of {path} was not released");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_begun_on_one_server_is_resumed_and_committed_on_another() {
    let Some(bucket) = common::s3_bucket() else {
        return;
    };
    let config = s3_config(&bucket, "shared");
    let a = ObjectStorage::open(&config, StorageOptions::default()).unwrap();
    let b = ObjectStorage::open(&config, StorageOptions::default()).unwrap();
    let data = random_bytes(20 * MIB + 99, 5);
    a.create_user("nora").await.unwrap();

    let mut upload = a
        .begin_upload("nora", "two.bin", data.len() as u64, false)
        .await
        .unwrap();
    upload.start_write(0, data.len() as u64).unwrap();
    for piece in data[..10 * MIB].chunks(MIB) {
        upload.write(piece.to_vec(), piece.len()).await.unwrap();
    }
    // While A holds it, B is refused: the lease is in the bucket, not in A's memory.
    let err = b
        .begin_upload("nora", "two.bin", data.len() as u64, false)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Some(ErrorCode::Busy), "{err}");
    drop(upload);
    let record_on_a: serde_json::Value =
        serde_json::from_str(&lease_released(&a, "nora", "two.bin").await).unwrap();
    let upload_id = record_on_a["upload_id"].as_str().unwrap().to_string();

    let mut upload = b
        .begin_upload("nora", "two.bin", data.len() as u64, false)
        .await
        .unwrap();
    assert_eq!(
        upload.offset(),
        8 * MIB as u64,
        "one 8 MiB part was stored by A"
    );
    let record_on_b: serde_json::Value =
        serde_json::from_str(&b.partial_record("nora", "two.bin").await.unwrap().unwrap()).unwrap();
    assert_eq!(
        record_on_b["upload_id"], upload_id,
        "the same multipart upload"
    );
    send(&mut upload, &data, 8 * MIB).await;
    upload.commit(&digest_of(&data), None).await.unwrap();

    // Put on B, get on A.
    assert_eq!(read_all(&a, "nora", "two.bin").await, data);
    put(&b, "nora", "small", b"hello").await;
    assert_eq!(read_all(&a, "nora", "small").await, b"hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_on_s3_serves_put_get_resume_ls_mkdir_mv_rm() {
    let Some(bucket) = common::s3_bucket() else {
        return;
    };
    let config = s3_config(&bucket, "e2e");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let server_config = config.clone();
    let server =
        TestServer::start_with(dir, root, move |c| c.object_store = Some(server_config)).await;
    let mut client = server.user("sam").await;
    let work = tempfile::tempdir().unwrap();

    let data = random_bytes(20 * MIB + 5, 6);
    common::put_path(&mut client, work.path(), "big.bin", &data).await;
    assert!(
        !server.user_file("sam", "big.bin").exists(),
        "the bytes are in the bucket, not under the root"
    );
    let out = work.path().join("got.bin");
    client
        .get("big.bin", &out, false, &mut NoProgress)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), data);

    client.mkdir("docs/deep", true).await.unwrap();
    common::put_path(&mut client, work.path(), "docs/a.txt", b"aaa").await;
    client
        .mv("docs/a.txt", "docs/deep/b.txt", false)
        .await
        .unwrap();
    let listing = client.list_dir("docs/deep").await.unwrap();
    assert_eq!(listing.len(), 1);
    assert_eq!(listing[0].name, "b.txt");
    client.rm("docs", true).await.unwrap();
    let names: Vec<String> = client
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["big.bin"]);
    client.restore("docs", None).await.unwrap();
    assert_eq!(client.list_dir("docs/deep").await.unwrap().len(), 1);

    // An upload begun by another server on the bucket is resumed through this one.
    let other = ObjectStorage::open(&config, StorageOptions::default()).unwrap();
    let resumed = random_bytes(18 * MIB, 7);
    let mut upload = other
        .begin_upload("sam", "resumed.bin", resumed.len() as u64, false)
        .await
        .unwrap();
    upload.start_write(0, resumed.len() as u64).unwrap();
    for piece in resumed[..9 * MIB].chunks(MIB) {
        upload.write(piece.to_vec(), piece.len()).await.unwrap();
    }
    drop(upload);
    lease_released(&other, "sam", "resumed.bin").await;
    let local = common::write_file(work.path(), "resumed.bin", &resumed);
    let outcome = client
        .put(&local, "resumed.bin", false, &mut NoProgress)
        .await
        .unwrap();
    assert_eq!(outcome.resumed_from, 8 * MIB as u64);
    let out = work.path().join("resumed.out");
    client
        .get("resumed.bin", &out, false, &mut NoProgress)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), resumed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_keeps_what_another_server_wrote_or_removed_meanwhile() {
    let Some(bucket) = common::s3_bucket() else {
        return;
    };
    let config = s3_config(&bucket, "race");
    let a = ObjectStorage::open(&config, StorageOptions::default()).unwrap();
    let b = ObjectStorage::open(&config, StorageOptions::default()).unwrap();
    a.create_user("olga").await.unwrap();
    let sizes = |versions: Vec<netdisk::storage::Version>| {
        let mut sizes: Vec<u64> = versions.iter().map(|v| v.size).collect();
        sizes.sort();
        sizes
    };

    // A small file: A stages it, B commits another one to the same path, A commits.
    put(&a, "olga", "doc", b"one").await;
    let mut upload = a.begin_upload("olga", "doc", 5, false).await.unwrap();
    send(&mut upload, b"three", 0).await;
    put(&b, "olga", "doc", b"two!").await;
    upload.commit(&digest_of(b"three"), None).await.unwrap();
    assert_eq!(read_all(&b, "olga", "doc").await, b"three");
    assert_eq!(sizes(b.versions("olga", "doc").await.unwrap()), [3, 4]);

    // A file of several parts (a multipart upload: its record keeps other servers from
    // uploading the same path, but not from moving or removing what is there).
    let big = random_bytes(20 * MIB + 1, 8);
    put(&a, "olga", "big", b"small").await;
    let mut upload = a
        .begin_upload("olga", "big", big.len() as u64, false)
        .await
        .unwrap();
    send(&mut upload, &big, 0).await;
    b.rename("olga", "big", "moved", false).await.unwrap();
    upload.commit(&digest_of(&big), None).await.unwrap();
    assert_eq!(read_all(&b, "olga", "big").await, big);
    assert_eq!(read_all(&b, "olga", "moved").await, b"small");

    // Over a file B removed meanwhile: the commit creates it again.
    let mut upload = a
        .begin_upload("olga", "big", big.len() as u64, false)
        .await
        .unwrap();
    send(&mut upload, &big, 0).await;
    b.remove("olga", "big", false).await.unwrap();
    upload.commit(&digest_of(&big), None).await.unwrap();
    assert_eq!(read_all(&b, "olga", "big").await, big);
    assert_eq!(
        sizes(b.versions("olga", "big").await.unwrap()),
        [big.len() as u64]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retired_account_leaves_nothing_to_the_next_one() {
    let Some(bucket) = common::s3_bucket() else {
        return;
    };
    let config = s3_config(&bucket, "retire");
    let a = ObjectStorage::open(&config, StorageOptions::default()).unwrap();
    let b = ObjectStorage::open(&config, StorageOptions::default()).unwrap();
    a.create_user("rita").await.unwrap();
    put(&a, "rita", "dir/f", b"old file").await;
    put(&a, "rita", "dir/f", b"replaced").await;
    // An upload of the old account in progress on another server.
    let big = random_bytes(20 * MIB, 9);
    let mut upload = b
        .begin_upload("rita", "late.bin", big.len() as u64, false)
        .await
        .unwrap();
    send(&mut upload, &big, 0).await;

    let place = a.retire_user("rita").await.unwrap().unwrap();
    assert!(place.starts_with("retired/rita-"), "{place}");
    a.create_user("rita").await.unwrap();
    // The late commit cannot land in the new account: its multipart upload was aborted.
    assert!(upload.commit(&digest_of(&big), None).await.is_err());
    assert!(names(&a, "rita", "").await.is_empty());
    assert!(a.versions("rita", "dir/f").await.unwrap().is_empty());
    assert!(a.list_partial("rita").await.unwrap().is_empty());
    assert_eq!(a.usage("rita").await.unwrap(), Default::default());

    // A retirement cut short by a crash (its journal written, nothing moved yet) is
    // finished by the next login's create_user, before the new account sees anything.
    put(&a, "rita", "left", b"an old file").await;
    let op = config.operator().unwrap();
    op.write("retiring/rita", "retired/rita-crashed/")
        .await
        .unwrap();
    b.create_user("rita").await.unwrap();
    assert!(names(&a, "rita", "").await.is_empty());
    let moved = op.read("retired/rita-crashed/files/left").await.unwrap();
    assert_eq!(moved.to_vec(), b"an old file");
    assert!(
        op.stat("retiring/rita").await.is_err(),
        "the journal is gone"
    );
}
