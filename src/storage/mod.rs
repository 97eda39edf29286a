//! File storage: the only code that touches file contents, behind one async interface.
//!
//! [`Storage`] speaks in domain types (paths, entries, versions, staged uploads), never in
//! wire types, so the server maps it to the protocol and another implementation (an object
//! store) can stand behind the same calls. [`LocalStorage`] keeps files on a local disk;
//! `ObjectStorage` (feature `s3`) keeps them in an S3 bucket through OpenDAL.
//!
//! The contract every implementation keeps:
//! - paths are relative to the user's folder, `/`-separated, each component a valid file
//!   name ([`split_path`]); nothing resolves outside the user's folder and no symbolic
//!   link is followed;
//! - an upload appears under its name only complete, verified and durable (once its
//!   [`Committed::durable`] has been awaited); it replaces the old file in one step and
//!   the old file becomes a [`Version`];
//! - listings are pages sorted by name, so a folder of any size costs bounded memory;
//! - `remove` and an overwriting commit keep the previous content as a version (undo);
//!   versions count toward usage.

mod fsat;
mod local;
#[cfg(feature = "s3")]
mod object;

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::digest::ChunkHash;
use crate::error::{Error, ErrorCode, Result};

pub use local::{LocalStorage, StorageOptions};
#[cfg(feature = "s3")]
pub use object::{part_size, ObjectStorage, S3Multipart};

pub use crate::names::{split_remote_path as split_path, MAX_PATH_DEPTH, MAX_PATH_LEN};

/// A path in canonical form (no leading or trailing `/`).
pub fn canonical_path(path: &str) -> Result<String> {
    Ok(split_path(path)?.join("/"))
}

/// Whether an entry is a file or a folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    File,
    Dir,
}

/// One entry of a folder (or the entry at a path).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The entry's own name (for `stat`, the last path component; `""` for the root).
    pub name: String,
    pub kind: Kind,
    /// Bytes of a file; 0 for a folder.
    pub size: u64,
    pub modified: SystemTime,
}

/// One page of a folder listing; `next` is the `after` of the next page.
#[derive(Clone, Debug, Default)]
pub struct Page {
    pub entries: Vec<Entry>,
    pub next: Option<String>,
}

/// An unfinished upload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partial {
    pub path: String,
    /// Bytes staged and verified chunk by chunk (missing chunks excluded).
    pub received: u64,
    pub size: u64,
    pub updated: SystemTime,
}

/// What one user stores.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub files: u64,
    pub file_bytes: u64,
    pub versions: u64,
    pub version_bytes: u64,
    /// Unfinished uploads: path and announced size.
    pub staged: Vec<(String, u64)>,
}

impl Usage {
    /// Bytes counted against a quota.
    pub fn total(&self) -> u64 {
        self.file_bytes + self.version_bytes + self.staged.iter().map(|(_, s)| s).sum::<u64>()
    }
}

/// An earlier version of a path: a file overwritten or removed, or a removed folder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    pub id: String,
    pub kind: Kind,
    pub size: u64,
    /// When it was overwritten or removed.
    pub replaced: SystemTime,
}

/// What a `remove` took away (and kept as a version).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Removed {
    pub files: u64,
    pub bytes: u64,
}

/// What housekeeping deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Expired {
    pub partials: usize,
    pub versions: usize,
}

/// Resolves once a commit is durable. The handler awaits it before acknowledging; an
/// implementation may make many commits durable with one flush (group commit).
pub struct Durable(Option<Pin<Box<dyn Future<Output = Result<()>> + Send>>>);

impl Durable {
    /// Already durable.
    pub fn done() -> Durable {
        Durable(None)
    }

    pub fn later(future: impl Future<Output = Result<()>> + Send + 'static) -> Durable {
        Durable(Some(Box::pin(future)))
    }

    pub async fn wait(self) -> Result<()> {
        match self.0 {
            None => Ok(()),
            Some(future) => future.await,
        }
    }
}

/// A committed upload.
pub struct Committed {
    pub size: u64,
    /// The file's checksum (hex), as computed by the storage from the bytes it holds.
    pub digest: String,
    pub durable: Durable,
}

/// A stored file opened for reading: its size, time and chunk hashes (its manifest),
/// and range reads. The content stays that of the version opened, even if the path is
/// overwritten or removed meanwhile.
#[async_trait]
pub trait FileRead: Send + Sync {
    fn size(&self) -> u64;
    fn modified(&self) -> SystemTime;
    fn chunks(&self) -> &[ChunkHash];
    /// Fill `buf` (or less at the end of the file) from `offset`; returns the buffer and
    /// how many bytes it holds.
    async fn read_at(&self, offset: u64, buf: Vec<u8>) -> Result<(Vec<u8>, usize)>;
}

/// What the server needs from a file store.
#[async_trait]
pub trait Storage: Send + Sync + 'static {
    /// Make the user's (empty) folder. Idempotent.
    async fn create_user(&self, user: &str) -> Result<()>;
    /// Move everything of a user aside (account deleted by hand, name registered again);
    /// returns where it went, for the log. `None` when the user had nothing.
    async fn retire_user(&self, user: &str) -> Result<Option<String>>;
    /// One page of the folder at `dir`: at most `limit` entries with names after `after`.
    async fn list(&self, user: &str, dir: &str, after: Option<&str>, limit: usize) -> Result<Page>;
    /// The entry at `path`.
    async fn stat(&self, user: &str, path: &str) -> Result<Entry>;
    /// Open the file at `path` for reading.
    async fn open(&self, user: &str, path: &str) -> Result<Arc<dyn FileRead>>;
    /// Start or resume staging an upload of `size` bytes to `path`; fails with
    /// [`ErrorCode::Busy`] while another upload of the same path is in progress.
    async fn begin_upload(
        &self,
        user: &str,
        path: &str,
        size: u64,
        restart: bool,
    ) -> Result<Box<dyn Upload>>;
    /// The user's staged uploads.
    async fn list_partial(&self, user: &str) -> Result<Vec<Partial>>;
    /// Drop the staged upload of `path`.
    async fn remove_partial(&self, user: &str, path: &str) -> Result<()>;
    /// Make a folder; with `parents`, the missing ones above it too and no error if it exists.
    async fn mkdir(&self, user: &str, path: &str, parents: bool) -> Result<()>;
    /// Remove a file or an empty folder, or with `recursive` a folder tree; what was
    /// removed is kept as a version of `path`.
    async fn remove(&self, user: &str, path: &str, recursive: bool) -> Result<Removed>;
    /// Move `from` to `to` (an exact path whose folder exists). A file at `to` is replaced
    /// only with `overwrite` (and kept as a version); a folder at `to` is never replaced.
    async fn rename(&self, user: &str, from: &str, to: &str, overwrite: bool) -> Result<()>;
    /// What the user stores.
    async fn usage(&self, user: &str) -> Result<Usage>;
    /// Earlier versions of `path`, newest first.
    async fn versions(&self, user: &str, path: &str) -> Result<Vec<Version>>;
    /// Bring back a version of `path` (default the newest); a file now at `path` becomes a
    /// version itself.
    async fn restore(&self, user: &str, path: &str, version: Option<&str>) -> Result<()>;
    /// Delete the user's oldest versions until at least `bytes` are freed (or none are
    /// left); returns how many versions and bytes went.
    async fn prune_versions(&self, user: &str, bytes: u64) -> Result<(u64, u64)>;
    /// Delete staged uploads idle for longer than `partial_idle` and versions older than
    /// the storage's retention.
    async fn expire(&self, partial_idle: Duration) -> Result<Expired>;
}

/// An upload being staged. Dropping it without `commit` keeps the received prefix (for
/// resumable uploads), so the next `begin_upload` of the same path and size resumes.
#[async_trait]
pub trait Upload: Send {
    /// Where the staged data ends: where the sender must continue.
    fn offset(&self) -> u64;
    /// The announced size of the whole file.
    fn size(&self) -> u64;
    /// Ranges `(offset, length)` before `offset()`, whole chunks, to be sent again.
    fn missing(&self) -> Vec<(u64, u64)>;
    /// Announce `len` bytes at `offset`: the rest of the file from `offset()` to the end,
    /// or whole chunks of a missing range. Anything else is [`ErrorCode::Conflict`].
    fn start_write(&mut self, offset: u64, len: u64) -> Result<()>;
    /// Write `buf[..len]`, the next bytes of the announced range. May return before the
    /// bytes are written (write-behind); returns a buffer the caller can reuse. An error of
    /// an earlier write surfaces here or in `finish_writes`.
    async fn write(&mut self, buf: Vec<u8>, len: usize) -> Result<Option<Vec<u8>>>;
    /// Wait for writes in flight; returns the buffer of the last one, for reuse.
    async fn finish_writes(&mut self) -> Result<Option<Vec<u8>>>;
    /// Verify the whole file, as hashed from the staged bytes, against `digest` (hex) and
    /// give it its name. On a mismatch, `chunks` (the sender's chunk hashes, if sent)
    /// decides what stays staged: matching chunks stay, others become missing.
    async fn commit(
        self: Box<Self>,
        digest: &str,
        chunks: Option<Vec<ChunkHash>>,
    ) -> Result<Committed>;
}

/// Claim of one (user, path) upload slot in this process, released on drop: two
/// connections of one server never stage the same path at once. (Across servers sharing a
/// bucket, the staged upload's record in the bucket is the claim.)
struct UploadLock {
    set: Arc<Mutex<HashSet<(String, String)>>>,
    key: (String, String),
}

impl UploadLock {
    fn take(
        set: &Arc<Mutex<HashSet<(String, String)>>>,
        user: &str,
        path: &str,
    ) -> Result<UploadLock> {
        let key = (user.to_string(), path.to_string());
        if !set.lock().unwrap().insert(key.clone()) {
            return Err(Error::remote(
                ErrorCode::Busy,
                format!("{path} is being uploaded by another connection; try again later"),
            ));
        }
        Ok(UploadLock {
            set: set.clone(),
            key,
        })
    }
}

impl Drop for UploadLock {
    fn drop(&mut self) {
        self.set.lock().unwrap().remove(&self.key);
    }
}

/// A time as ISO 8601 UTC with second precision, e.g. `2026-11-23T17:05:49Z`.
pub fn iso8601(time: SystemTime) -> String {
    let t = time::OffsetDateTime::from(time);
    if !(0..=9999).contains(&t.year()) {
        let format =
            time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
        return t.format(&format).unwrap_or_default();
    }
    // Digits pushed by hand: every entry of every listing has one, and `time`'s general
    // formatter was a tenth of the server's CPU in an `ls` burst.
    let mut text = String::with_capacity(20);
    let mut push = |value: u32, digits: u32, then: char| {
        for place in (0..digits).rev() {
            text.push(char::from(b'0' + (value / 10u32.pow(place) % 10) as u8));
        }
        text.push(then);
    };
    push(t.year() as u32, 4, '-');
    push(t.month() as u32, 2, '-');
    push(t.day().into(), 2, 'T');
    push(t.hour().into(), 2, ':');
    push(t.minute().into(), 2, ':');
    push(t.second().into(), 2, 'Z');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_iso8601_utc() {
        let at = |secs: u64| iso8601(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(1_795_453_549), "2026-11-23T17:05:49Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(253_402_300_799), "9999-12-31T23:59:59Z");
    }

    #[test]
    fn paths_split_into_checked_components() {
        assert_eq!(split_path("").unwrap(), Vec::<&str>::new());
        assert_eq!(split_path("/").unwrap(), Vec::<&str>::new());
        assert_eq!(split_path("a/b c/😀.txt").unwrap(), ["a", "b c", "😀.txt"]);
        assert_eq!(split_path("/a/b/").unwrap(), ["a", "b"]);
        assert_eq!(canonical_path("/x/y/").unwrap(), "x/y");
        let long = "x".repeat(255);
        assert!(split_path(&format!("{long}/{long}")).is_ok());
        for bad in [
            "a//b",
            "../x",
            "a/../b",
            "a/./b",
            "a\\b",
            "a/\nb",
            &"a/".repeat(33),
            &"x".repeat(1025),
        ] {
            let err = split_path(bad).unwrap_err();
            assert_eq!(err.code(), Some(ErrorCode::BadName), "{bad:?}");
        }
    }
}
