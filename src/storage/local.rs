//! [`Storage`] on a local disk under one root folder.
//!
//! Layout under the root (folders 0700, files 0600):
//! ```text
//! files/USER/PATH             complete files and folders, the only thing `ls` shows
//! partial/USER/KEY.data       a staged upload's bytes (KEY = hash of the path)
//! partial/USER/KEY.hashes     BLAKE3 of each chunk whose bytes are all staged, in order; all
//!                             zeros for a chunk to be sent again
//! partial/USER/KEY.json       path, announced size
//! meta/USER/KEY.meta          cached chunk hashes of files/USER/PATH (rebuilt when stale)
//! versions/USER/KEY/path      the path the versions below belonged to
//! versions/USER/KEY/ID.f|.d   an overwritten or removed file (.f) or removed folder (.d);
//!                             ID = nanoseconds since 1970 when it was replaced
//! ```
//! Every path is resolved one component at a time from the user's folder with
//! `O_NOFOLLOW` ([`fsat`]), so no symbolic link is followed and nothing leaves the folder.
//! One server process owns the root (the server's lock file), so the in-memory upload
//! locks and usage cache are the whole truth.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use rustix::fs::{AtFlags, FileType, RenameFlags};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};

use super::fsat::{self, DIR_MODE, FILE_MODE};
use super::{
    split_path, Committed, Durable, Entry, Expired, FileRead, Kind, Page, Partial, Removed,
    Storage, Upload, UploadLock, Usage, Version,
};
use crate::digest::{file_digest, hash_reader, ChunkHash, ChunkHasher, CHUNK_SIZE};
use crate::error::{Error, ErrorCode, Result};
use crate::names::check_user_name;

/// Most `missing` ranges one upload asks for (they are listed in a header); differing
/// chunks further apart are merged into larger ranges.
pub const MAX_MISSING_RANGES: usize = 256;

/// Uploads up to this size are made durable in batches (group commit): only a data file
/// is staged (no resume record), its bytes are fsynced at the commit, and the rename is
/// made durable by one `syncfs` shared by every commit waiting at that moment.
const GROUP_COMMIT_FILE_MAX: u64 = 1024 * 1024;

/// Folder scans (listings, usage) running at once: a huge folder costs memory while it
/// is scanned, so many clients listing at once wait their turn instead of adding up.
const CONCURRENT_SCANS: usize = 16;
/// Scans of one user at once: one user's huge folder never makes the others wait.
const CONCURRENT_SCANS_PER_USER: usize = 2;

/// A resumable upload's chunk records are written in batches: after at least this many
/// bytes of complete chunks, their data is fsynced and then their hashes recorded, on a
/// thread of its own while the upload goes on (and at the end of each `put_data`). So the
/// record trails the data, never leads it, and no write waits for a per-chunk fsync.
const CHECKPOINT_BYTES: u64 = 16 * 1024 * 1024;

/// The `.hashes` entry of a chunk that must be sent again.
const MISSING_CHUNK: ChunkHash = [0; 32];

/// How long versions are kept.
#[derive(Clone, Debug)]
pub struct StorageOptions {
    /// Versions kept per path (older ones are deleted when a new one is made).
    pub keep_versions: usize,
    /// Versions older than this are deleted by [`Storage::expire`].
    pub version_max_age: Duration,
}

impl Default for StorageOptions {
    fn default() -> StorageOptions {
        StorageOptions {
            keep_versions: 3,
            version_max_age: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// Files on a local disk under one root folder.
pub struct LocalStorage {
    inner: Arc<Inner>,
    scans: tokio::sync::Semaphore,
    user_scans: Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

struct Inner {
    root: PathBuf,
    /// `ROOT/files`, `ROOT/partial`, `ROOT/meta`, `ROOT/versions`, opened once: every
    /// user folder is opened from these (no path lookup from `/` per operation).
    areas: [(&'static str, OwnedFd); 4],
    options: StorageOptions,
    /// (user, path) pairs with an upload in progress: one uploader per path at a time.
    uploading: Arc<Mutex<HashSet<(String, String)>>>,
    group: Arc<GroupCommit>,
    /// Usage per user, dropped on every change of that user's files.
    usage: Mutex<HashMap<String, Usage>>,
    /// Complete listings of small folders, per user, dropped on every change of that user's
    /// files: most `ls` then need no blocking task, folder scan or stats.
    listings: Mutex<Listings>,
}

#[derive(Serialize, Deserialize)]
struct PartialInfo {
    /// The upload's path (called `name` when paths were plain names).
    name: String,
    size: u64,
}

impl LocalStorage {
    pub fn open(root: &Path, options: StorageOptions) -> Result<LocalStorage> {
        for area in ["files", "partial", "meta", "versions"] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(DIR_MODE)
                .create(root.join(area))?;
        }
        remove_orphan_data(&root.join("partial"))?;
        let area = |name: &'static str| {
            fsat::open_dir(rustix::fs::CWD, root.join(name))
                .map(|dir| (name, dir))
                .map_err(|e| internal(name, e))
        };
        Ok(LocalStorage {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                areas: [
                    area("files")?,
                    area("partial")?,
                    area("meta")?,
                    area("versions")?,
                ],
                options,
                uploading: Arc::default(),
                group: Arc::new(GroupCommit {
                    queue: Mutex::default(),
                    running: tokio::sync::Mutex::new(()),
                }),
                usage: Mutex::default(),
                listings: Mutex::default(),
            }),
            scans: tokio::sync::Semaphore::new(CONCURRENT_SCANS),
            user_scans: Mutex::default(),
        })
    }

    /// Run `work` on a blocking thread with this storage's state.
    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let inner = self.inner.clone();
        blocking(move || work(&inner)).await
    }

    /// Like [`LocalStorage::run`], for work that scans whole folders of `user`: a few per
    /// user, a few more in all.
    async fn scan<T: Send + 'static>(
        &self,
        user: &str,
        work: impl FnOnce(&Inner) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let closed = |_| Error::Invalid("storage closed".into());
        let mine = self
            .user_scans
            .lock()
            .unwrap()
            .entry(user.to_string())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(CONCURRENT_SCANS_PER_USER)))
            .clone();
        let result = async {
            let _mine = mine.acquire().await.map_err(closed)?;
            let _all = self.scans.acquire().await.map_err(closed)?;
            self.run(work).await
        }
        .await;
        // Forget the user's semaphore when no one else holds it (the map stays small).
        let mut user_scans = self.user_scans.lock().unwrap();
        if Arc::strong_count(&mine) == 2 {
            user_scans.remove(user);
        }
        result
    }
}

#[async_trait]
impl Storage for LocalStorage {
    async fn create_user(&self, user: &str) -> Result<()> {
        let user = user.to_string();
        self.run(move |inner| {
            inner.user_dir("files", &user)?;
            Ok(())
        })
        .await
    }

    async fn retire_user(&self, user: &str) -> Result<Option<String>> {
        let user = user.to_string();
        self.run(move |inner| inner.retire_user(&user)).await
    }

    async fn list(&self, user: &str, dir: &str, after: Option<&str>, limit: usize) -> Result<Page> {
        let dir = split_path(dir)?.join("/");
        let limit = limit.max(1);
        let generation = {
            let listings = self.inner.listings.lock().unwrap();
            if let Some(entries) = listings.get(user, &dir) {
                return Ok(page_of(entries, after, limit));
            }
            listings.generation(user)
        };
        // A first page as large as a cached listing may be: if it is the whole folder, it
        // is kept (unless the folder changed meanwhile).
        let first = after.is_none();
        let want = if first { LISTING_CACHE_ENTRIES } else { limit };
        let (owner, folder, after) = (user.to_string(), dir.clone(), after.map(String::from));
        let page = self
            .scan(user, move |inner| {
                inner.list(&owner, &folder, after.as_deref(), want)
            })
            .await?;
        if !first {
            return Ok(page);
        }
        let entries = Arc::new(page.entries);
        if page.next.is_none() {
            let mut listings = self.inner.listings.lock().unwrap();
            listings.insert(user, &dir, generation, entries.clone());
        } else if entries.len() <= limit {
            return Ok(Page {
                entries: Arc::unwrap_or_clone(entries),
                next: page.next,
            });
        }
        Ok(page_of(&entries, None, limit))
    }

    async fn stat(&self, user: &str, path: &str) -> Result<Entry> {
        let (user, path) = (user.to_string(), path.to_string());
        self.run(move |inner| inner.stat(&user, &path)).await
    }

    async fn open(&self, user: &str, path: &str) -> Result<Arc<dyn FileRead>> {
        let (user, path) = (user.to_string(), path.to_string());
        let file = self.run(move |inner| inner.open(&user, &path)).await?;
        Ok(Arc::new(file))
    }

    async fn begin_upload(
        &self,
        user: &str,
        path: &str,
        size: u64,
        restart: bool,
    ) -> Result<Box<dyn Upload>> {
        let (user, path) = (user.to_string(), path.to_string());
        let inner = self.inner.clone();
        let state = if size <= GROUP_COMMIT_FILE_MAX {
            // No disk yet: a small upload's one blocking hop is its write (see `write`).
            inner.claim_small_upload(&user, &path, size)?
        } else {
            blocking(move || inner.begin_upload(&user, &path, size, restart)).await?
        };
        Ok(Box::new(LocalUpload {
            size,
            state: Arc::new(Mutex::new(state)),
            inflight: None,
            inner: self.inner.clone(),
        }))
    }

    async fn list_partial(&self, user: &str) -> Result<Vec<Partial>> {
        let user = user.to_string();
        self.run(move |inner| inner.list_partial(&user)).await
    }

    async fn remove_partial(&self, user: &str, path: &str) -> Result<()> {
        let (user, path) = (user.to_string(), path.to_string());
        self.run(move |inner| inner.remove_partial(&user, &path))
            .await
    }

    async fn mkdir(&self, user: &str, path: &str, parents: bool) -> Result<()> {
        let (user, path) = (user.to_string(), path.to_string());
        self.run(move |inner| inner.mkdir(&user, &path, parents))
            .await
    }

    async fn remove(&self, user: &str, path: &str, recursive: bool) -> Result<Removed> {
        let (user, path) = (user.to_string(), path.to_string());
        self.run(move |inner| inner.remove(&user, &path, recursive))
            .await
    }

    async fn rename(&self, user: &str, from: &str, to: &str, overwrite: bool) -> Result<()> {
        let (user, from, to) = (user.to_string(), from.to_string(), to.to_string());
        self.run(move |inner| inner.rename(&user, &from, &to, overwrite))
            .await
    }

    async fn usage(&self, user: &str) -> Result<Usage> {
        if let Some(usage) = self.inner.usage.lock().unwrap().get(user) {
            return Ok(usage.clone());
        }
        let user = user.to_string();
        self.scan(&user.clone(), move |inner| inner.usage(&user))
            .await
    }

    async fn versions(&self, user: &str, path: &str) -> Result<Vec<Version>> {
        let (user, path) = (user.to_string(), path.to_string());
        self.run(move |inner| inner.versions(&user, &path)).await
    }

    async fn restore(&self, user: &str, path: &str, version: Option<&str>) -> Result<()> {
        let (user, path, version) = (
            user.to_string(),
            path.to_string(),
            version.map(String::from),
        );
        self.run(move |inner| inner.restore(&user, &path, version.as_deref()))
            .await
    }

    async fn prune_versions(&self, user: &str, bytes: u64) -> Result<(u64, u64)> {
        let user = user.to_string();
        self.run(move |inner| inner.prune_oldest(&user, bytes))
            .await
    }

    async fn expire(&self, partial_idle: Duration) -> Result<Expired> {
        self.run(move |inner| inner.expire(partial_idle)).await
    }
}

/// Folders of at most this many entries have their listing cached.
const LISTING_CACHE_ENTRIES: usize = 1000;
/// Folders cached at most, all users together (then the cache starts over).
const LISTING_CACHE_FOLDERS: usize = 4096;

/// Cached complete listings of small folders. Each user has a generation, bumped on every
/// change of their files: a listing read before a change is never cached after it.
#[derive(Default)]
struct Listings {
    /// user → folder → its entries, sorted by name.
    users: HashMap<String, HashMap<String, Arc<Vec<Entry>>>>,
    folders: usize,
    generations: HashMap<String, u64>,
}

impl Listings {
    fn get(&self, user: &str, dir: &str) -> Option<&Arc<Vec<Entry>>> {
        self.users.get(user)?.get(dir)
    }

    fn generation(&self, user: &str) -> u64 {
        self.generations.get(user).copied().unwrap_or(0)
    }

    fn insert(&mut self, user: &str, dir: &str, generation: u64, entries: Arc<Vec<Entry>>) {
        if self.generation(user) != generation {
            return;
        }
        if self.folders >= LISTING_CACHE_FOLDERS {
            self.users.clear();
            self.folders = 0;
        }
        let folders = self.users.entry(user.to_string()).or_default();
        if folders.insert(dir.to_string(), entries).is_none() {
            self.folders += 1;
        }
    }

    fn forget(&mut self, user: &str) {
        *self.generations.entry(user.to_string()).or_insert(0) += 1;
        if let Some(folders) = self.users.remove(user) {
            self.folders -= folders.len();
        }
    }
}

/// One page of a complete, sorted listing.
fn page_of(entries: &[Entry], after: Option<&str>, limit: usize) -> Page {
    let start = after.map_or(0, |after| {
        entries.partition_point(|e| e.name.as_str() <= after)
    });
    let rest = &entries[start..];
    let page = &rest[..rest.len().min(limit)];
    Page {
        entries: page.to_vec(),
        next: (rest.len() > limit).then(|| page[page.len() - 1].name.clone()),
    }
}

/// Group commit of small uploads, in two phases: their bytes are written without an fsync
/// each; then one `syncfs` makes every queued upload's bytes durable, all are renamed to
/// their names, and a second `syncfs` makes the renames durable. A file never has its name
/// before its bytes are on disk, and each commit is acknowledged only after the second
/// sync. Whoever waits first runs the batch; everyone queued before it started shares it.
struct GroupCommit {
    queue: Mutex<Vec<Placement>>,
    /// Held while a batch runs: one batch at a time.
    running: tokio::sync::Mutex<()>,
}

/// A verified upload waiting for its name, and where its outcome goes.
struct Placement {
    state: Arc<Mutex<UploadState>>,
    placed: tokio::sync::oneshot::Sender<Result<()>>,
}

type Placed = tokio::sync::oneshot::Receiver<Result<()>>;

impl GroupCommit {
    fn enqueue(&self, state: Arc<Mutex<UploadState>>) -> Placed {
        let (placed, outcome) = tokio::sync::oneshot::channel();
        self.queue.lock().unwrap().push(Placement { state, placed });
        outcome
    }

    async fn wait(self: Arc<Self>, inner: Arc<Inner>, mut placed: Placed) -> Result<()> {
        use tokio::sync::oneshot::error::TryRecvError;
        loop {
            let _running = self.running.lock().await;
            match placed.try_recv() {
                Ok(outcome) => return outcome,
                Err(TryRecvError::Closed) => {
                    return Err(Error::remote(ErrorCode::Internal, "group commit lost"))
                }
                Err(TryRecvError::Empty) => {}
            }
            let batch = std::mem::take(&mut *self.queue.lock().unwrap());
            let inner = inner.clone();
            blocking(move || {
                place_batch(&inner, batch);
                Ok(())
            })
            .await?;
        }
    }
}

/// The folders one group commit renames into, each opened once for the batch. Every
/// upload in the batch holds its upload lock until it is named, so no folder above it can
/// be moved or removed meanwhile (`busy_under`): the folder opened stays the one named.
#[derive(Default)]
struct ParentDirs(HashMap<(String, String), Arc<OwnedFd>>);

impl ParentDirs {
    fn parent_of<'a>(
        &mut self,
        inner: &Inner,
        user: &str,
        components: &[&'a str],
        path: &str,
    ) -> Result<(Arc<OwnedFd>, &'a str)> {
        let key = (
            user.to_string(),
            components[..components.len().saturating_sub(1)].join("/"),
        );
        if let (Some(dir), Some(name)) = (self.0.get(&key), components.last()) {
            return Ok((dir.clone(), name));
        }
        let (dir, name) = inner.parent_of(user, components, path, true)?;
        let dir = Arc::new(dir);
        self.0.insert(key, dir.clone());
        Ok((dir, name))
    }
}

/// Phase one `syncfs`, the renames, phase two `syncfs`; each upload learns its outcome.
fn place_batch(inner: &Inner, batch: Vec<Placement>) {
    let sync = || match inner.area("files") {
        Ok(files) => rustix::fs::syncfs(files).map_err(|e| format!("syncfs: {e}")),
        Err(e) => Err(e.to_string()),
    };
    let bytes_durable = sync();
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut dirs = ParentDirs::default();
    for Placement { state, placed } in batch {
        let outcome = match &bytes_durable {
            Ok(()) => {
                let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
                state.place(inner, &[], Some(&mut dirs))
            }
            Err(e) => Err(Error::remote(ErrorCode::Internal, e.clone())),
        };
        drop(state); // its upload lock too, once named
        outcomes.push((placed, outcome));
    }
    let names_durable = sync();
    for (placed, outcome) in outcomes {
        let outcome = outcome.and_then(|()| {
            names_durable
                .clone()
                .map_err(|e| Error::remote(ErrorCode::Internal, e))
        });
        let _ = placed.send(outcome);
    }
}

impl Inner {
    /// `ROOT/AREA/USER` as an open folder, made (0700) if missing.
    fn user_dir(&self, area: &str, user: &str) -> Result<OwnedFd> {
        check_user_name(user)?;
        match fsat::walk(self.area(area)?, &[user], true) {
            Ok(dir) => Ok(dir),
            Err(e) => Err(internal(area, e)),
        }
    }

    /// `ROOT/AREA`, open since the start.
    fn area(&self, area: &str) -> Result<&OwnedFd> {
        match self.areas.iter().find(|(name, _)| *name == area) {
            Some((_, dir)) => Ok(dir),
            None => Err(internal(area, Errno::NOENT)),
        }
    }

    fn user_path(&self, area: &str, user: &str) -> PathBuf {
        self.root.join(area).join(user)
    }

    /// The folder that holds `components`' last one, and that name.
    fn parent_of<'a>(
        &self,
        user: &str,
        components: &[&'a str],
        path: &str,
        create: bool,
    ) -> Result<(OwnedFd, &'a str)> {
        let Some((name, parents)) = components.split_last() else {
            return Err(whole_folder());
        };
        let files = self.user_dir("files", user)?;
        let dir = fsat::walk(&files, parents, create).map_err(|e| fsat::error(e, path))?;
        Ok((dir, name))
    }

    /// After any change of `user`'s files: drop what is cached about them.
    fn forget_cached(&self, user: &str) {
        self.usage.lock().unwrap().remove(user);
        self.listings.lock().unwrap().forget(user);
    }

    fn busy_under(&self, user: &str, path: &str) -> Result<()> {
        let uploading = self.uploading.lock().unwrap();
        let prefix = format!("{path}/");
        if uploading
            .iter()
            .any(|(u, p)| u == user && (p == path || p.starts_with(&prefix)))
        {
            return Err(Error::remote(
                ErrorCode::Busy,
                format!("{path} is being uploaded by another connection; try again later"),
            ));
        }
        Ok(())
    }

    fn list(&self, user: &str, dir: &str, after: Option<&str>, limit: usize) -> Result<Page> {
        let components = split_path(dir)?;
        let files = self.user_dir("files", user)?;
        let folder = fsat::walk(&files, &components, false).map_err(|e| fsat::error(e, dir))?;
        let mut names: Vec<String> = fsat::read_names(&folder)
            .map_err(|e| fsat::error(e, dir))?
            .into_iter()
            .filter(|(name, kind)| {
                matches!(
                    kind,
                    FileType::RegularFile | FileType::Directory | FileType::Unknown
                ) && after.is_none_or(|after| name.as_str() > after)
                    && crate::names::check_file_name(name).is_ok()
            })
            .map(|(name, _)| name)
            .collect();
        // Only the page is sorted and stat'ed: a folder of 100,000 names costs one scan.
        if names.len() > limit {
            names.select_nth_unstable(limit);
        }
        let more = names.len() > limit;
        names.truncate(limit);
        names.sort_unstable();
        let next = if more { names.last().cloned() } else { None };
        let mut entries = Vec::with_capacity(names.len());
        for name in names {
            if let Ok(stat) = fsat::stat(&folder, &name) {
                if let Some(entry) = entry_of(name, &stat) {
                    entries.push(entry);
                }
            }
        }
        Ok(Page { entries, next })
    }

    fn stat(&self, user: &str, path: &str) -> Result<Entry> {
        let components = split_path(path)?;
        if components.is_empty() {
            let files = self.user_dir("files", user)?;
            let stat = rustix::fs::fstat(&files).map_err(|e| internal("files", e))?;
            return Ok(Entry {
                name: String::new(),
                kind: Kind::Dir,
                size: 0,
                modified: fsat::modified(&stat),
            });
        }
        let (dir, name) = self.parent_of(user, &components, path, false)?;
        let stat = fsat::stat(&dir, name).map_err(|e| fsat::error(e, path))?;
        entry_of(name.to_string(), &stat).ok_or_else(|| fsat::error(Errno::NOENT, path))
    }

    fn open(&self, user: &str, path: &str) -> Result<LocalFile> {
        let components = split_path(path)?;
        let (dir, name) = self.parent_of(user, &components, path, false)?;
        let mut file = fsat::open_file(&dir, name).map_err(|e| fsat::error(e, path))?;
        let meta = file.metadata()?;
        let chunks = self.cached_chunks(user, &components.join("/"), &meta, &mut file)?;
        Ok(LocalFile {
            size: meta.len(),
            modified: meta.modified()?,
            chunks,
            file: Arc::new(file),
        })
    }

    /// Chunk hashes of an open file: for a one-chunk file computed now (as cheap as reading
    /// a cache); otherwise from the cache when it describes this exact file (size, mtime,
    /// inode), else computed now and cached.
    fn cached_chunks(
        &self,
        user: &str,
        path: &str,
        meta: &fs::Metadata,
        file: &mut File,
    ) -> Result<Vec<ChunkHash>> {
        file.seek(SeekFrom::Start(0))?;
        if meta.len() <= CHUNK_SIZE {
            return Ok(hash_reader(&mut *file)?);
        }
        let meta_path = self.meta_path(user, path)?;
        let stamp = FileStamp::of(meta);
        if let Some(chunks) = read_meta(&meta_path, &stamp) {
            return Ok(chunks);
        }
        let chunks = hash_reader(&mut *file)?;
        let _ = write_meta(&meta_path, &stamp, &chunks);
        Ok(chunks)
    }

    fn meta_path(&self, user: &str, path: &str) -> Result<PathBuf> {
        self.user_dir("meta", user)?;
        Ok(self
            .user_path("meta", user)
            .join(format!("{}.meta", name_key(path))))
    }

    fn partial_paths(&self, user: &str, path: &str) -> Result<PartialPaths> {
        self.user_dir("partial", user)?;
        let base = self.user_path("partial", user).join(name_key(path));
        Ok(PartialPaths {
            data: base.with_extension("data"),
            hashes: base.with_extension("hashes"),
            info: base.with_extension("json"),
        })
    }

    fn begin_upload(
        &self,
        user: &str,
        path: &str,
        size: u64,
        restart: bool,
    ) -> Result<UploadState> {
        let components = split_path(path)?;
        let canonical = components.join("/");
        // A folder in the way is refused now, not after the data has been sent.
        match self.parent_of(user, &components, path, false) {
            Ok((dir, name)) => {
                if let Ok(stat) = fsat::stat(&dir, name) {
                    if fsat::kind(&stat) == FileType::Directory {
                        return Err(fsat::error(Errno::ISDIR, path));
                    }
                }
            }
            Err(e) if e.code() == Some(ErrorCode::NotFound) => {} // parents made at commit
            Err(e) => return Err(e),
        }
        let lock = UploadLock::take(&self.uploading, user, &canonical)?;
        let paths = self.partial_paths(user, &canonical)?;
        let prefix = if restart {
            None
        } else {
            staged_prefix(&paths, &canonical, size)
        };
        let (data, hashes, chunks) = match prefix {
            Some(chunks) => {
                let offset = (chunks.len() as u64 * CHUNK_SIZE).min(size);
                let data = OpenOptions::new().write(true).open(&paths.data)?;
                data.set_len(offset)?;
                let hashes = OpenOptions::new().write(true).open(&paths.hashes)?;
                hashes.set_len(chunks.len() as u64 * 32)?;
                (data, Some(hashes), chunks)
            }
            None => {
                paths.remove();
                let info = serde_json::to_vec(&PartialInfo {
                    name: canonical.clone(),
                    size,
                })
                .map_err(|e| Error::Invalid(e.to_string()))?;
                create_file(&paths.info)?
                    .write_all(&info)
                    .map_err(storage_error)?;
                let data = create_file(&paths.data)?;
                let hashes = create_file(&paths.hashes)?;
                (data, Some(hashes), Vec::new())
            }
        };
        self.forget_cached(user); // a staged upload counts toward usage
        let offset = (chunks.len() as u64 * CHUNK_SIZE).min(size);
        let missing = (0..chunks.len() as u64)
            .filter(|&i| chunks[i as usize] == MISSING_CHUNK)
            .collect();
        let mut data = data;
        data.seek(SeekFrom::Start(offset))?;
        Ok(UploadState {
            user: user.to_string(),
            path: canonical,
            size,
            received: offset,
            recorded: chunks.len() as u64,
            unrecorded: Vec::new(),
            checkpoint: None,
            data: Some(data),
            hashes,
            hasher: ChunkHasher::resume(chunks),
            missing,
            repaired: Vec::new(),
            writing: Writing::Append,
            deferred: false,
            committed: false,
            paths,
            _lock: lock,
        })
    }

    /// Claim the upload of a small file (batched, see [`GROUP_COMMIT_FILE_MAX`]) without
    /// touching the disk: its data file is made by its first write (`open_small`), and a
    /// folder in the way is refused by its last one (`check_small_target`).
    fn claim_small_upload(&self, user: &str, path: &str, size: u64) -> Result<UploadState> {
        check_user_name(user)?;
        let components = split_path(path)?;
        if components.is_empty() {
            return Err(whole_folder());
        }
        let canonical = components.join("/");
        let lock = UploadLock::take(&self.uploading, user, &canonical)?;
        let base = self.user_path("partial", user).join(name_key(&canonical));
        Ok(UploadState {
            user: user.to_string(),
            path: canonical,
            size,
            received: 0,
            recorded: 0,
            unrecorded: Vec::new(),
            checkpoint: None,
            data: None,
            hashes: None,
            hasher: ChunkHasher::new(),
            missing: BTreeSet::new(),
            repaired: Vec::new(),
            writing: Writing::Append,
            deferred: true,
            committed: false,
            paths: PartialPaths::from_info(&base.with_extension("json")),
            _lock: lock,
        })
    }

    fn list_partial(&self, user: &str) -> Result<Vec<Partial>> {
        self.user_dir("partial", user)?;
        let mut entries = Vec::new();
        for entry in fs::read_dir(self.user_path("partial", user))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "json") {
                let Ok(info) = read_partial_info(&path) else {
                    continue;
                };
                let Ok(data) = fs::metadata(path.with_extension("data")) else {
                    continue;
                };
                let missing = missing_bytes(&path.with_extension("hashes"), info.size);
                entries.push(Partial {
                    path: info.name,
                    received: data.len().saturating_sub(missing),
                    size: info.size,
                    updated: data.modified()?,
                });
            }
        }
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(entries)
    }

    fn remove_partial(&self, user: &str, path: &str) -> Result<()> {
        let canonical = split_path(path)?.join("/");
        let _lock = UploadLock::take(&self.uploading, user, &canonical)?;
        let paths = self.partial_paths(user, &canonical)?;
        match read_partial_info(&paths.info) {
            Ok(info) if info.name == canonical => {
                paths.remove();
                self.forget_cached(user);
                Ok(())
            }
            _ => Err(Error::remote(
                ErrorCode::NotFound,
                format!("no unfinished upload of {canonical}"),
            )),
        }
    }

    fn mkdir(&self, user: &str, path: &str, parents: bool) -> Result<()> {
        let components = split_path(path)?;
        let (dir, name) = self.parent_of(user, &components, path, parents)?;
        match rustix::fs::mkdirat(&dir, name, rustix::fs::Mode::from_raw_mode(DIR_MODE)) {
            Ok(()) => {}
            Err(Errno::EXIST) if parents => {
                let stat = fsat::stat(&dir, name).map_err(|e| fsat::error(e, path))?;
                if fsat::kind(&stat) != FileType::Directory {
                    return Err(fsat::error(Errno::EXIST, path));
                }
                return Ok(());
            }
            Err(e) => return Err(fsat::error(e, path)),
        }
        rustix::fs::fsync(&dir).map_err(|e| fsat::error(e, path))?;
        self.forget_cached(user);
        Ok(())
    }

    fn remove(&self, user: &str, path: &str, recursive: bool) -> Result<Removed> {
        let components = split_path(path)?;
        let canonical = components.join("/");
        if components.is_empty() {
            return Err(Error::remote(
                ErrorCode::BadRequest,
                "refusing to remove your whole folder; remove what is inside it",
            ));
        }
        self.busy_under(user, &canonical)?;
        let (dir, name) = self.parent_of(user, &components, path, false)?;
        let stat = fsat::stat(&dir, name).map_err(|e| fsat::error(e, path))?;
        let removed = match fsat::kind(&stat) {
            FileType::RegularFile => {
                self.keep_version_pruned(user, &canonical, &dir, name, Keep::Move, Kind::File)?;
                Removed {
                    files: 1,
                    bytes: stat.st_size as u64,
                }
            }
            FileType::Directory if !recursive => {
                rustix::fs::unlinkat(&dir, name, AtFlags::REMOVEDIR)
                    .map_err(|e| fsat::error(e, path))?;
                Removed::default()
            }
            FileType::Directory => {
                let tree = fsat::open_dir(&dir, name).map_err(|e| fsat::error(e, path))?;
                let (files, bytes) = fsat::tree_size(&tree).map_err(|e| fsat::error(e, path))?;
                // One rename takes the whole tree away: after a crash it is either all
                // there or all in the trash, never half.
                self.keep_version_pruned(user, &canonical, &dir, name, Keep::Move, Kind::Dir)?;
                Removed { files, bytes }
            }
            _ => return Err(fsat::error(Errno::NOENT, path)),
        };
        rustix::fs::fsync(&dir).map_err(|e| fsat::error(e, path))?;
        self.forget_cached(user);
        Ok(removed)
    }

    fn rename(&self, user: &str, from: &str, to: &str, overwrite: bool) -> Result<()> {
        let source = split_path(from)?;
        let target = split_path(to)?;
        let (from_path, to_path) = (source.join("/"), target.join("/"));
        if target.starts_with(&source) && target.len() > source.len() {
            return Err(Error::remote(
                ErrorCode::BadRequest,
                format!("cannot move {from_path} inside itself"),
            ));
        }
        if source == target {
            return Ok(());
        }
        self.busy_under(user, &from_path)?;
        self.busy_under(user, &to_path)?;
        let (from_dir, from_name) = self.parent_of(user, &source, from, false)?;
        let (to_dir, to_name) = self.parent_of(user, &target, to, false)?;
        let stat = fsat::stat(&from_dir, from_name).map_err(|e| fsat::error(e, from))?;
        let kind = match fsat::kind(&stat) {
            FileType::RegularFile => Kind::File,
            FileType::Directory => Kind::Dir,
            _ => return Err(fsat::error(Errno::NOENT, from)),
        };
        match rustix::fs::renameat_with(
            &from_dir,
            from_name,
            &to_dir,
            to_name,
            RenameFlags::NOREPLACE,
        ) {
            Ok(()) => {}
            Err(Errno::EXIST) if !overwrite => {
                return Err(Error::remote(
                    ErrorCode::Exists,
                    format!("{to_path} exists already (replace it with --force)"),
                ))
            }
            Err(Errno::EXIST) => {
                let existing = fsat::stat(&to_dir, to_name).map_err(|e| fsat::error(e, to))?;
                if fsat::kind(&existing) != FileType::RegularFile || kind != Kind::File {
                    return Err(Error::remote(
                        ErrorCode::Exists,
                        format!("{to_path} exists and is not a file replaced by a file"),
                    ));
                }
                self.keep_version_pruned(user, &to_path, &to_dir, to_name, Keep::Link, Kind::File)?;
                rustix::fs::renameat(&from_dir, from_name, &to_dir, to_name)
                    .map_err(|e| fsat::error(e, to))?;
            }
            Err(e) => return Err(fsat::error(e, to)),
        }
        rustix::fs::fsync(&to_dir).map_err(|e| fsat::error(e, to))?;
        rustix::fs::fsync(&from_dir).map_err(|e| fsat::error(e, from))?;
        if kind == Kind::File {
            // The cached hashes stay valid (same inode and time): keep them.
            if let (Ok(old), Ok(new)) = (
                self.meta_path(user, &from_path),
                self.meta_path(user, &to_path),
            ) {
                let _ = fs::rename(old, new);
            }
        }
        self.forget_cached(user);
        Ok(())
    }

    /// The folder of `path`'s versions, made if missing (with its `path` record).
    fn version_dir(&self, user: &str, path: &str) -> Result<OwnedFd> {
        let versions = self.user_dir("versions", user)?;
        let key = name_key(path);
        let dir = fsat::walk(&versions, &[&key], true).map_err(|e| internal("versions", e))?;
        let record = self.user_path("versions", user).join(&key).join("path");
        if !record.exists() {
            crate::durable::write_atomically(&record, path.as_bytes(), FILE_MODE)?;
        }
        Ok(dir)
    }

    /// Keep the entry `name` in `dir` (the content of `path`) as its newest version: moved
    /// there, or hard-linked when a rename is about to replace it in one step.
    fn keep_version(
        &self,
        user: &str,
        path: &str,
        dir: &OwnedFd,
        name: &str,
        how: Keep,
        kind: Kind,
    ) -> Result<OwnedFd> {
        let versions = self.version_dir(user, path)?;
        let suffix = if kind == Kind::File { "f" } else { "d" };
        let mut id = unix_nanos();
        loop {
            let version = format!("{id:020}.{suffix}");
            let done = match how {
                Keep::Move => rustix::fs::renameat_with(
                    dir,
                    name,
                    &versions,
                    version.as_str(),
                    RenameFlags::NOREPLACE,
                ),
                Keep::Link => {
                    rustix::fs::linkat(dir, name, &versions, version.as_str(), AtFlags::empty())
                }
            };
            match done {
                Ok(()) => break,
                Err(Errno::EXIST) => id += 1,
                Err(e) => return Err(fsat::error(e, path)),
            }
        }
        rustix::fs::fsync(&versions).map_err(|e| fsat::error(e, path))?;
        Ok(versions)
    }

    /// Keep a version (see [`Inner::keep_version`]), then only the newest versions of it.
    fn keep_version_pruned(
        &self,
        user: &str,
        path: &str,
        dir: &OwnedFd,
        name: &str,
        how: Keep,
        kind: Kind,
    ) -> Result<()> {
        let versions = self.keep_version(user, path, dir, name, how, kind)?;
        self.prune_path(&versions, self.options.keep_versions)
    }

    /// Version files of one path, newest first.
    fn version_ids(dir: &OwnedFd) -> Result<Vec<(String, Kind)>> {
        let mut ids: Vec<(String, Kind)> = fsat::read_names(dir)
            .map_err(|e| internal("versions", e))?
            .into_iter()
            .filter_map(|(name, _)| {
                let kind = if name.ends_with(".f") {
                    Kind::File
                } else if name.ends_with(".d") {
                    Kind::Dir
                } else {
                    return None;
                };
                Some((name, kind))
            })
            .collect();
        ids.sort_by(|a, b| b.0.cmp(&a.0));
        Ok(ids)
    }

    fn prune_path(&self, dir: &OwnedFd, keep: usize) -> Result<()> {
        for (id, kind) in Self::version_ids(dir)?.into_iter().skip(keep) {
            delete_version(dir, &id, kind)?;
        }
        Ok(())
    }

    fn versions(&self, user: &str, path: &str) -> Result<Vec<Version>> {
        let canonical = split_path(path)?.join("/");
        let versions = self.user_dir("versions", user)?;
        let key = name_key(&canonical);
        let Ok(dir) = fsat::open_dir(&versions, &key) else {
            return Ok(Vec::new());
        };
        let record = fs::read(self.user_path("versions", user).join(&key).join("path"));
        if record.ok().as_deref() != Some(canonical.as_bytes()) {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for (id, kind) in Self::version_ids(&dir)? {
            let size = version_size(&dir, &id, kind).unwrap_or(0);
            out.push(Version {
                replaced: id_time(&id),
                id: public_id(&id).to_string(),
                kind,
                size,
            });
        }
        Ok(out)
    }

    fn restore(&self, user: &str, path: &str, version: Option<&str>) -> Result<()> {
        let components = split_path(path)?;
        let canonical = components.join("/");
        self.busy_under(user, &canonical)?;
        let versions = self.user_dir("versions", user)?;
        let no_version = || {
            Error::remote(
                ErrorCode::NotFound,
                format!(
                    "no version {}of {canonical}",
                    version.map(|v| format!("{v} ")).unwrap_or_default()
                ),
            )
        };
        let vdir = fsat::open_dir(&versions, name_key(&canonical)).map_err(|_| no_version())?;
        let ids = Self::version_ids(&vdir)?;
        let (id, kind) = match version {
            None => ids.first(),
            Some(v) => ids.iter().find(|(id, _)| public_id(id) == v),
        }
        .cloned()
        .ok_or_else(no_version)?;
        let (dir, name) = self.parent_of(user, &components, path, true)?;
        if let Ok(stat) = fsat::stat(&dir, name) {
            match fsat::kind(&stat) {
                FileType::RegularFile => {
                    // The current file becomes a version (a restore can be undone too);
                    // pruning waits until the restored version has left the folder.
                    self.keep_version(user, &canonical, &dir, name, Keep::Move, Kind::File)?;
                }
                _ => {
                    return Err(Error::remote(
                        ErrorCode::Exists,
                        format!("a folder is at {canonical}; move it away first"),
                    ))
                }
            }
        }
        rustix::fs::renameat_with(&vdir, id.as_str(), &dir, name, RenameFlags::NOREPLACE)
            .map_err(|e| fsat::error(e, path))?;
        rustix::fs::fsync(&dir).map_err(|e| fsat::error(e, path))?;
        rustix::fs::fsync(&vdir).map_err(|e| fsat::error(e, path))?;
        self.prune_path(&vdir, self.options.keep_versions)?;
        if kind == Kind::File {
            // Cached hashes of the restored file were keyed by its path before: stale now.
            if let Ok(meta) = self.meta_path(user, &canonical) {
                let _ = fs::remove_file(meta);
            }
        }
        self.forget_cached(user);
        Ok(())
    }

    /// Every version of a user: (id, key folder, kind).
    fn all_versions(&self, user: &str) -> Result<Vec<(String, String, Kind)>> {
        let versions = self.user_dir("versions", user)?;
        let mut all = Vec::new();
        for (key, kind) in fsat::read_names(&versions).map_err(|e| internal("versions", e))? {
            if kind != FileType::Directory && kind != FileType::Unknown {
                continue;
            }
            let Ok(dir) = fsat::open_dir(&versions, &key) else {
                continue;
            };
            for (id, kind) in Self::version_ids(&dir)? {
                all.push((id, key.clone(), kind));
            }
        }
        Ok(all)
    }

    fn prune_oldest(&self, user: &str, bytes: u64) -> Result<(u64, u64)> {
        let mut all = self.all_versions(user)?;
        all.sort();
        let versions = self.user_dir("versions", user)?;
        let (mut count, mut freed) = (0, 0);
        for (id, key, kind) in all {
            if freed >= bytes {
                break;
            }
            let Ok(dir) = fsat::open_dir(&versions, &key) else {
                continue;
            };
            freed += version_size(&dir, &id, kind).unwrap_or(0);
            delete_version(&dir, &id, kind)?;
            count += 1;
        }
        if count > 0 {
            self.forget_cached(user);
        }
        Ok((count, freed))
    }

    fn usage(&self, user: &str) -> Result<Usage> {
        let files = self.user_dir("files", user)?;
        let (file_count, file_bytes) = fsat::tree_size(&files).map_err(|e| internal("files", e))?;
        let versions = self.user_dir("versions", user)?;
        let (mut version_count, mut version_bytes) = (0, 0);
        for (id, key, kind) in self.all_versions(user)? {
            if let Ok(dir) = fsat::open_dir(&versions, &key) {
                version_count += 1;
                version_bytes += version_size(&dir, &id, kind).unwrap_or(0);
            }
        }
        let staged = self
            .list_partial(user)?
            .into_iter()
            .map(|partial| (partial.path, partial.size))
            .collect();
        let usage = Usage {
            files: file_count,
            file_bytes,
            versions: version_count,
            version_bytes,
            staged,
        };
        self.usage
            .lock()
            .unwrap()
            .insert(user.to_string(), usage.clone());
        Ok(usage)
    }

    fn expire(&self, partial_idle: Duration) -> Result<Expired> {
        let mut expired = Expired::default();
        let now = SystemTime::now();
        for user_dir in fs::read_dir(self.root.join("partial"))? {
            let user_dir = user_dir?;
            let user = user_dir.file_name().to_string_lossy().into_owned();
            for entry in fs::read_dir(user_dir.path())? {
                let path = entry?.path();
                if path.extension().is_none_or(|e| e != "json") {
                    continue;
                }
                let idle = fs::metadata(path.with_extension("data"))
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| now.duration_since(t).ok());
                let Ok(info) = read_partial_info(&path) else {
                    continue;
                };
                if idle.is_none_or(|idle| idle > partial_idle) {
                    // An upload in progress is never expired under its sender.
                    if let Ok(_lock) = UploadLock::take(&self.uploading, &user, &info.name) {
                        PartialPaths::from_info(&path).remove();
                        self.forget_cached(&user);
                        expired.partials += 1;
                    }
                }
            }
        }
        let oldest = now
            .checked_sub(self.options.version_max_age)
            .unwrap_or(UNIX_EPOCH);
        for user_dir in fs::read_dir(self.root.join("versions"))? {
            let user = user_dir?.file_name().to_string_lossy().into_owned();
            if check_user_name(&user).is_err() {
                continue;
            }
            let versions = self.user_dir("versions", &user)?;
            for (id, key, kind) in self.all_versions(&user)? {
                if id_time(&id) < oldest {
                    if let Ok(dir) = fsat::open_dir(&versions, &key) {
                        delete_version(&dir, &id, kind)?;
                        self.forget_cached(&user);
                        expired.versions += 1;
                    }
                }
            }
        }
        Ok(expired)
    }

    fn retire_user(&self, user: &str) -> Result<Option<String>> {
        // The same move as `netdisk admin delete`, so both leave the same layout.
        let moved = crate::admin::move_user_data_aside(&self.root, user)?;
        self.forget_cached(user);
        Ok(moved.map(|place| place.display().to_string()))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Keep {
    Move,
    Link,
}

fn delete_version(dir: &OwnedFd, id: &str, kind: Kind) -> Result<()> {
    let done = match kind {
        Kind::File => rustix::fs::unlinkat(dir, id, AtFlags::empty()),
        Kind::Dir => fsat::remove_tree(dir, id),
    };
    match done {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(internal("versions", e)),
    }
}

fn version_size(dir: &OwnedFd, id: &str, kind: Kind) -> Option<u64> {
    match kind {
        Kind::File => fsat::stat(dir, id).ok().map(|s| s.st_size as u64),
        Kind::Dir => fsat::open_dir(dir, id)
            .ok()
            .and_then(|tree| fsat::tree_size(&tree).ok())
            .map(|(_, bytes)| bytes),
    }
}

/// A version's id as clients see it: its file name without the `.f`/`.d` kind.
fn public_id(id: &str) -> &str {
    id.split('.').next().unwrap_or(id)
}

/// When a version was made, from its id (nanoseconds since 1970).
fn id_time(id: &str) -> SystemTime {
    let nanos: u64 = id
        .split('.')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    UNIX_EPOCH + Duration::from_nanos(nanos)
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn entry_of(name: String, stat: &rustix::fs::Stat) -> Option<Entry> {
    let (kind, size) = match fsat::kind(stat) {
        FileType::RegularFile => (Kind::File, stat.st_size as u64),
        FileType::Directory => (Kind::Dir, 0),
        _ => return None, // links and devices are not served
    };
    Some(Entry {
        name,
        kind,
        size,
        modified: fsat::modified(stat),
    })
}

/// An open stored file; reads come from the opened version even if the path changes.
struct LocalFile {
    size: u64,
    modified: SystemTime,
    chunks: Vec<ChunkHash>,
    file: Arc<File>,
}

#[async_trait]
impl FileRead for LocalFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn modified(&self) -> SystemTime {
        self.modified
    }

    fn chunks(&self) -> &[ChunkHash] {
        &self.chunks
    }

    async fn read_at(&self, offset: u64, mut buf: Vec<u8>) -> Result<(Vec<u8>, usize)> {
        let file = self.file.clone();
        let want = buf.len().min(self.size.saturating_sub(offset) as usize);
        blocking(move || {
            let mut filled = 0;
            while filled < want {
                match file.read_at(&mut buf[filled..want], offset + filled as u64) {
                    Ok(0) => {
                        return Err(Error::Invalid("the file shrank while it was read".into()))
                    }
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Ok((buf, filled))
        })
        .await
    }
}

/// An upload being staged. Writes run on blocking threads one behind the socket
/// (write-behind), so receiving and writing overlap while a stalled sender holds no thread.
struct LocalUpload {
    size: u64,
    state: Arc<Mutex<UploadState>>,
    /// The write in progress; it gives its buffer back.
    inflight: Option<tokio::task::JoinHandle<Result<Vec<u8>>>>,
    inner: Arc<Inner>,
}

struct UploadState {
    user: String,
    path: String,
    size: u64,
    /// Where the staged data ends; appends go here.
    received: u64,
    /// The `.data` file (a batched upload's is made by its first write).
    data: Option<File>,
    /// The `.hashes` record (none for batched uploads).
    hashes: Option<File>,
    /// Chunk entries in `.hashes` (recorded or being recorded by `checkpoint`).
    recorded: u64,
    /// Hashes of appended complete chunks not recorded yet (their bytes may not be durable).
    unrecorded: Vec<ChunkHash>,
    /// A checkpoint running in the background: fsync the data, then record chunks.
    checkpoint: Option<std::thread::JoinHandle<io::Result<()>>>,
    /// Hashes of the staged chunks ([`MISSING_CHUNK`] for missing ones), continued by appends.
    hasher: ChunkHasher,
    /// Chunks (indices) to be sent again; their `.hashes` entries are zeros.
    missing: BTreeSet<u64>,
    /// Missing chunks sent again on this connection, with their new hashes.
    repaired: Vec<(u64, ChunkHash)>,
    writing: Writing,
    /// Group commit: no resume record, durable through the shared sync.
    deferred: bool,
    committed: bool,
    paths: PartialPaths,
    /// Released when the state is dropped, after any write still running on it.
    _lock: UploadLock,
}

/// Where writes put bytes.
enum Writing {
    /// At the end of the staged data.
    Append,
    /// Over missing chunks from chunk `first`: the next byte goes to `at`; the range
    /// ends at `end`.
    Repair {
        first: u64,
        at: u64,
        end: u64,
        hasher: Box<ChunkHasher>,
    },
}

impl LocalUpload {
    fn state(&self) -> std::sync::MutexGuard<'_, UploadState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl Upload for LocalUpload {
    fn offset(&self) -> u64 {
        self.state().received
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn missing(&self) -> Vec<(u64, u64)> {
        let state = self.state();
        chunk_runs(state.missing.iter().copied(), usize::MAX)
            .into_iter()
            .map(|(first, count)| {
                let offset = first * CHUNK_SIZE;
                (offset, (count * CHUNK_SIZE).min(state.size - offset))
            })
            .collect()
    }

    fn start_write(&mut self, offset: u64, len: u64) -> Result<()> {
        self.state().start_write(offset, len)
    }

    async fn write(&mut self, buf: Vec<u8>, len: usize) -> Result<Option<Vec<u8>>> {
        let previous = match self.inflight.take() {
            Some(write) => Some(join(write).await?),
            None => None,
        };
        let (state, inner) = (self.state.clone(), self.inner.clone());
        self.inflight = Some(tokio::task::spawn_blocking(move || {
            let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
            if state.deferred {
                state.open_small(&inner)?;
            }
            state.write(&buf[..len])?;
            if state.deferred && state.received == state.size {
                state.check_small_target(&inner)?;
            }
            Ok(buf)
        }));
        Ok(previous)
    }

    async fn finish_writes(&mut self) -> Result<Option<Vec<u8>>> {
        let buf = match self.inflight.take() {
            Some(write) => Some(join(write).await?),
            None => None,
        };
        if !self.state().needs_checkpoint() {
            return Ok(buf); // batched uploads keep no record: no blocking hop
        }
        let state = self.state.clone();
        blocking(move || state.lock().unwrap_or_else(|e| e.into_inner()).checkpoint()).await?;
        Ok(buf)
    }

    async fn commit(
        mut self: Box<Self>,
        digest: &str,
        chunks: Option<Vec<ChunkHash>>,
    ) -> Result<Committed> {
        self.finish_writes().await?;
        let written = {
            let state = self.state();
            state.deferred && state.data.is_some() && state.received == state.size
        };
        let (size, actual, deferred) = if written {
            // A batched upload written whole: its last write checked where it goes, so
            // only the digest is left to verify, which needs no disk.
            let (size, actual) = self.state().verify_small(digest)?;
            (size, actual, true)
        } else {
            self.commit_on_disk(digest, chunks).await?
        };
        let durable = if deferred {
            let placed = self.inner.group.enqueue(self.state.clone());
            Durable::later(self.inner.group.clone().wait(self.inner.clone(), placed))
        } else {
            Durable::done()
        };
        Ok(Committed {
            size,
            digest: actual,
            durable,
        })
    }
}

impl LocalUpload {
    /// The commit's work on a blocking thread: verify, and fsync and name (resumable
    /// uploads) or check where it goes (batched ones).
    async fn commit_on_disk(
        &self,
        digest: &str,
        chunks: Option<Vec<ChunkHash>>,
    ) -> Result<(u64, String, bool)> {
        let state = self.state.clone();
        let inner = self.inner.clone();
        let digest = digest.to_string();
        blocking(move || {
            let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
            state.commit(&inner, &digest, chunks.as_deref())
        })
        .await
    }
}

impl Drop for UploadState {
    /// A batched upload that was not committed leaves nothing behind (it cannot resume).
    fn drop(&mut self) {
        if self.deferred && !self.committed && self.data.is_some() {
            let _ = fs::remove_file(&self.paths.data);
        }
    }
}

impl UploadState {
    /// The `.data` file: a resumable upload's is open from the start, a batched one's
    /// from its first write.
    fn file(&self) -> Result<&File> {
        opened(&self.data)
    }

    /// Make a batched upload's data file (created or truncated), once: only this one file,
    /// as creating files is most of a small upload's cost. A resumable upload staged for
    /// the same path is replaced.
    fn open_small(&mut self, inner: &Inner) -> Result<()> {
        if self.data.is_some() {
            return Ok(());
        }
        if self.paths.info.exists() {
            self.paths.remove();
        }
        let data = match create_file(&self.paths.data) {
            Err(_) if !self.paths.data.parent().is_some_and(Path::exists) => {
                inner.user_dir("partial", &self.user)?; // the user's first staged upload
                create_file(&self.paths.data)
            }
            other => other,
        }?;
        self.data = Some(data);
        Ok(())
    }

    /// A folder in the way of a batched upload is refused before its commit is queued
    /// (missing parent folders are made when it is named).
    fn check_small_target(&self, inner: &Inner) -> Result<()> {
        let components = split_path(&self.path)?;
        match inner.parent_of(&self.user, &components, &self.path, false) {
            Ok((dir, name)) => {
                if fsat::stat(&dir, name).is_ok_and(|s| fsat::kind(&s) == FileType::Directory) {
                    return Err(fsat::error(Errno::ISDIR, &self.path));
                }
                Ok(())
            }
            Err(e) if e.code() == Some(ErrorCode::NotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Verify a batched upload written whole (no disk: its bytes were hashed as they were
    /// written). Returns (size, digest). On a mismatch nothing stays staged.
    fn verify_small(&mut self, digest: &str) -> Result<(u64, String)> {
        let chunks = std::mem::take(&mut self.hasher).finish_chunks();
        let actual = file_digest(&chunks).to_hex().to_string();
        if !digest.eq_ignore_ascii_case(&actual) {
            return Err(discarded(&self.path));
        }
        Ok((self.size, actual))
    }

    fn start_write(&mut self, offset: u64, len: u64) -> Result<()> {
        let end = offset.checked_add(len).filter(|&end| end <= self.size);
        if offset == self.received && end == Some(self.size) {
            self.writing = Writing::Append;
            return Ok(());
        }
        if let Some(end) = end {
            let whole_chunks = len > 0
                && offset.is_multiple_of(CHUNK_SIZE)
                && (end.is_multiple_of(CHUNK_SIZE) || end == self.size);
            let first = offset / CHUNK_SIZE;
            if whole_chunks && (first..end.div_ceil(CHUNK_SIZE)).all(|i| self.missing.contains(&i))
            {
                self.writing = Writing::Repair {
                    first,
                    at: offset,
                    end,
                    hasher: Box::default(),
                };
                return Ok(());
            }
        }
        let or_missing = if self.missing.is_empty() {
            ""
        } else {
            ", or a missing range"
        };
        Err(Error::remote(
            ErrorCode::Conflict,
            format!(
                "{len} bytes sent at offset {offset}; expected the rest from offset {} to the \
                 announced size {}{or_missing}",
                self.received, self.size
            ),
        ))
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let written = match self.writing {
            Writing::Append => self.append(bytes),
            Writing::Repair { .. } => self.repair(bytes),
        };
        // On a full disk the staged bytes would only keep it full: they are dropped (the
        // space is freed when this upload is) and the next put starts over.
        if written
            .as_ref()
            .is_err_and(|e| e.code() == Some(ErrorCode::NoSpace))
        {
            self.paths.remove();
        }
        written
    }

    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        if self.received + bytes.len() as u64 > self.size {
            return Err(Error::remote(
                ErrorCode::Conflict,
                "more data than the announced size",
            ));
        }
        self.file()?.write_all(bytes).map_err(storage_error)?;
        let complete_before = self.hasher.complete_chunks().len();
        self.hasher.update(bytes);
        self.received += bytes.len() as u64;
        let mut done = self.hasher.complete_chunks()[complete_before..].to_vec();
        // The short last chunk too, once all bytes are in: a cut before the commit then
        // leaves nothing to send again.
        if self.received == self.size && !bytes.is_empty() && !self.size.is_multiple_of(CHUNK_SIZE)
        {
            done.extend(self.hasher.clone().finish_chunks().last());
        }
        // Each finished chunk's hash is recorded once its bytes are durable (a checkpoint),
        // so a resume, even after a power cut, never trusts a chunk not on disk.
        if self.hashes.is_some() && !done.is_empty() {
            let first = self.recorded + self.unrecorded.len() as u64;
            self.unrecorded.extend(done);
            let end = self.recorded + self.unrecorded.len() as u64;
            // Start writing the finished chunks back now, so later fsyncs find little left.
            start_writeback(self.file()?, first * CHUNK_SIZE, (end - first) * CHUNK_SIZE);
            if self.unrecorded.len() as u64 * CHUNK_SIZE >= CHECKPOINT_BYTES {
                self.start_checkpoint()?;
            }
        }
        Ok(())
    }

    /// Record the unrecorded chunks on a thread of its own (fsync the data first), unless
    /// the previous checkpoint is still running: then at a later chunk.
    fn start_checkpoint(&mut self) -> Result<()> {
        if self.checkpoint.as_ref().is_some_and(|c| !c.is_finished()) {
            return Ok(());
        }
        self.join_checkpoint()?;
        let Some(hashes) = &self.hashes else {
            return Ok(());
        };
        let (data, hashes) = (self.file()?.try_clone()?, hashes.try_clone()?);
        let records = std::mem::take(&mut self.unrecorded).concat();
        let at = self.recorded * 32;
        self.recorded += records.len() as u64 / 32;
        self.checkpoint = Some(std::thread::spawn(move || {
            data.sync_data()?;
            hashes.write_all_at(&records, at)
        }));
        Ok(())
    }

    fn join_checkpoint(&mut self) -> Result<()> {
        match self.checkpoint.take().map(|c| c.join()) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(storage_error(e)),
            Some(Err(_)) => Err(Error::remote(
                ErrorCode::Internal,
                "checkpoint thread panicked",
            )),
        }
    }

    fn needs_checkpoint(&self) -> bool {
        self.checkpoint.is_some() || !self.unrecorded.is_empty()
    }

    /// Make every appended chunk durable and recorded (the end of a `put_data`, or a cut):
    /// a resume then continues after the last byte received.
    fn checkpoint(&mut self) -> Result<()> {
        self.join_checkpoint()?;
        if let Some(hashes) = self.hashes.as_ref().filter(|_| !self.unrecorded.is_empty()) {
            self.file()?.sync_data().map_err(storage_error)?;
            let records = std::mem::take(&mut self.unrecorded).concat();
            hashes
                .write_all_at(&records, self.recorded * 32)
                .map_err(storage_error)?;
            self.recorded += records.len() as u64 / 32;
        }
        Ok(())
    }

    /// Overwrite missing chunks. A chunk's new hash replaces its zero entry only once its
    /// bytes are durable, so a cut in between leaves it missing, never trusted.
    fn repair(&mut self, bytes: &[u8]) -> Result<()> {
        let Writing::Repair {
            first,
            at,
            end,
            hasher,
        } = &mut self.writing
        else {
            return Err(Error::remote(ErrorCode::Conflict, "data without a range"));
        };
        if *at + bytes.len() as u64 > *end {
            return Err(Error::remote(
                ErrorCode::Conflict,
                "more data than the announced range",
            ));
        }
        let data = opened(&self.data)?; // (not `self.file()`: `self.writing` is borrowed)
        data.write_all_at(bytes, *at).map_err(storage_error)?;
        let before = hasher.complete_chunks().len();
        hasher.update(bytes);
        *at += bytes.len() as u64;
        let mut done = hasher.complete_chunks()[before..].to_vec();
        if *at == self.size && !bytes.is_empty() && !self.size.is_multiple_of(CHUNK_SIZE) {
            done.extend(hasher.clone().finish_chunks().last());
        }
        if let Some(hashes) = self.hashes.as_ref().filter(|_| !done.is_empty()) {
            data.sync_data().map_err(storage_error)?;
            for (index, hash) in (*first + before as u64..).zip(done) {
                hashes
                    .write_all_at(&hash, index * 32)
                    .map_err(storage_error)?;
                self.missing.remove(&index);
                self.repaired.push((index, hash));
            }
        }
        Ok(())
    }

    /// Verify, make the bytes durable, keep the old file as a version and rename the new
    /// one over it. Returns (size, digest, whether the rename waits for the group sync).
    fn commit(
        &mut self,
        inner: &Inner,
        digest: &str,
        sent: Option<&[ChunkHash]>,
    ) -> Result<(u64, String, bool)> {
        if self.received != self.size || !self.missing.is_empty() {
            let missing: u64 = self.missing.iter().map(|&i| chunk_len(i, self.size)).sum();
            return Err(Error::remote(
                ErrorCode::Conflict,
                format!(
                    "upload incomplete: {} of {} bytes received",
                    self.received - missing,
                    self.size
                ),
            ));
        }
        // A background fsync's error is reported once, to it: it must not be lost here.
        self.join_checkpoint()?;
        // The server's own hashes of the bytes it holds decide; the sender's chunk hashes
        // only say which chunks to keep after a mismatch.
        let mut chunks = std::mem::take(&mut self.hasher).finish_chunks();
        for &(index, hash) in &self.repaired {
            if let Some(chunk) = chunks.get_mut(index as usize) {
                *chunk = hash;
            }
        }
        let actual = file_digest(&chunks).to_hex().to_string();
        if !digest.eq_ignore_ascii_case(&actual) {
            return Err(self.keep_matching(&chunks, digest, sent));
        }
        if self.deferred {
            // Named later by the group commit, after one sync of the batch's bytes; a
            // folder in the way is refused now. (An empty file had no write to make it.)
            self.open_small(inner)?;
            self.check_small_target(inner)?;
            return Ok((self.size, actual, true));
        }
        // The bytes are durable before the file takes its name: a power cut must never
        // leave a short file under a real name.
        self.file()?.sync_data().map_err(storage_error)?;
        self.place(inner, &chunks, None)?;
        Ok((self.size, actual, false))
    }

    /// Give the staged file its name: the file there becomes a version, the rename replaces
    /// it in one step. The bytes must be durable already.
    fn place(
        &mut self,
        inner: &Inner,
        chunks: &[ChunkHash],
        dirs: Option<&mut ParentDirs>,
    ) -> Result<()> {
        let components = split_path(&self.path)?;
        let (dir, name) = match dirs {
            Some(dirs) => dirs.parent_of(inner, &self.user, &components, &self.path)?,
            None => {
                let (dir, name) = inner.parent_of(&self.user, &components, &self.path, true)?;
                (Arc::new(dir), name)
            }
        };
        if let Ok(stat) = fsat::stat(&dir, name) {
            match fsat::kind(&stat) {
                FileType::RegularFile => inner.keep_version_pruned(
                    &self.user,
                    &self.path,
                    &dir,
                    name,
                    Keep::Link,
                    Kind::File,
                )?,
                FileType::Directory => return Err(fsat::error(Errno::ISDIR, &self.path)),
                _ => {}
            }
        }
        rustix::fs::renameat(rustix::fs::CWD, &self.paths.data, &dir, name)
            .map_err(|e| fsat::error(e, &self.path))?;
        self.committed = true;
        if !self.deferred {
            rustix::fs::fsync(&dir).map_err(|e| fsat::error(e, &self.path))?;
        }
        // The cache is only an optimisation (a failure costs a re-hash later), and only
        // worth a file for files of several chunks (never a batched one).
        if chunks.len() > 1 {
            if let (Ok(meta), Ok(meta_path)) = (
                self.file().and_then(|f| Ok(f.metadata()?)),
                inner.meta_path(&self.user, &self.path),
            ) {
                let _ = write_meta(&meta_path, &FileStamp::of(&meta), chunks);
            }
        }
        if !self.deferred {
            self.paths.remove(); // a batched upload has only its data file, renamed now
        }
        inner.forget_cached(&self.user);
        Ok(())
    }

    /// After a failed commit: keep the staged chunks that match the sender's hashes and
    /// mark the others missing. Without usable hashes (absent, or not those of `digest`)
    /// the staged upload is dropped. Returns the error for the sender.
    fn keep_matching(
        &self,
        ours: &[ChunkHash],
        digest: &str,
        theirs: Option<&[ChunkHash]>,
    ) -> Error {
        let theirs = theirs.filter(|theirs| {
            theirs.len() == ours.len()
                && file_digest(theirs)
                    .to_hex()
                    .as_str()
                    .eq_ignore_ascii_case(digest)
        });
        if let Some(theirs) = theirs {
            let differ: Vec<u64> = (0..ours.len())
                .filter(|&i| ours[i] != theirs[i])
                .map(|i| i as u64)
                .collect();
            let runs = chunk_runs(differ.iter().copied(), MAX_MISSING_RANGES);
            if self.mark_missing(&runs).is_ok() {
                return Error::remote(
                    ErrorCode::ChecksumMismatch,
                    format!(
                        "checksum mismatch for {}: {} of {} chunks differ from the sender's; \
                         the others stay staged",
                        self.path,
                        differ.len(),
                        ours.len()
                    ),
                );
            }
        }
        self.paths.remove();
        discarded(&self.path)
    }

    /// Zero the `.hashes` entries of the chunks in `runs` (durably, before any of their
    /// bytes can be overwritten).
    fn mark_missing(&self, runs: &[(u64, u64)]) -> io::Result<()> {
        let Some(hashes) = &self.hashes else {
            return Err(io::Error::other(
                "a batched upload keeps no record to repair",
            ));
        };
        for &(first, count) in runs {
            let zeros = vec![0u8; count as usize * 32];
            hashes.write_all_at(&zeros, first * 32)?;
        }
        hashes.sync_data()
    }
}
/// Sorted chunk indices as runs `(first, count)`. While there are more than `max`, runs
/// separated by small gaps are merged (the chunks in between are then sent again, which
/// costs time, not correctness).
fn chunk_runs(indices: impl IntoIterator<Item = u64>, max: usize) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for i in indices {
        match runs.last_mut() {
            Some((first, count)) if *first + *count == i => *count += 1,
            _ => runs.push((i, 1)),
        }
    }
    let mut gap = 1u64;
    while runs.len() > max.max(1) {
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
        for (first, count) in runs {
            match merged.last_mut() {
                Some((f, c)) if first - (*f + *c) <= gap => *c = first + count - *f,
                _ => merged.push((first, count)),
            }
        }
        runs = merged;
        gap = gap.saturating_mul(2);
    }
    runs
}

/// Length of chunk `index` of a file of `size` bytes.
fn chunk_len(index: u64, size: u64) -> u64 {
    size.saturating_sub(index.saturating_mul(CHUNK_SIZE))
        .min(CHUNK_SIZE)
}

/// Bytes of a staged upload's missing chunks (zero entries of its `.hashes` file).
fn missing_bytes(hashes: &Path, size: u64) -> u64 {
    let Ok(raw) = fs::read(hashes) else {
        return 0;
    };
    raw.chunks_exact(32)
        .enumerate()
        .filter(|(_, hash)| *hash == &MISSING_CHUNK[..])
        .map(|(i, _)| chunk_len(i as u64, size))
        .sum()
}

struct PartialPaths {
    data: PathBuf,
    hashes: PathBuf,
    info: PathBuf,
}

impl PartialPaths {
    fn from_info(info: &Path) -> PartialPaths {
        PartialPaths {
            data: info.with_extension("data"),
            hashes: info.with_extension("hashes"),
            info: info.to_path_buf(),
        }
    }

    fn remove(&self) {
        for path in [&self.info, &self.hashes, &self.data] {
            let _ = fs::remove_file(path);
        }
    }
}

/// Delete the data of batched uploads a crash interrupted (a `.data` file without its
/// `.json`): they cannot resume. Run at start, when no upload is in progress.
fn remove_orphan_data(partial: &Path) -> Result<()> {
    for user_dir in fs::read_dir(partial)? {
        for entry in fs::read_dir(user_dir?.path())? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "data")
                && !path.with_extension("json").exists()
            {
                fs::remove_file(&path)?;
            }
        }
    }
    Ok(())
}

/// The chunk hashes of a staged upload that can be continued: same name and size, and
/// only chunks whose bytes are all on disk (whole chunks, and the short last one once
/// every byte is). Missing chunks have [`MISSING_CHUNK`].
fn staged_prefix(paths: &PartialPaths, name: &str, size: u64) -> Option<Vec<ChunkHash>> {
    let info = read_partial_info(&paths.info).ok()?;
    if info.name != name || info.size != size {
        return None;
    }
    let data_len = fs::metadata(&paths.data).ok()?.len();
    let raw = fs::read(&paths.hashes).ok()?;
    let on_disk = if data_len >= size {
        size.div_ceil(CHUNK_SIZE)
    } else {
        data_len / CHUNK_SIZE
    };
    let mut chunks: Vec<ChunkHash> = raw
        .chunks_exact(32)
        .take(on_disk as usize)
        .map(|c| c.try_into().unwrap())
        .collect();
    // No more missing ranges than a reply lists (only a damaged file has more): else
    // continue from the first missing chunk.
    let missing = (0..chunks.len()).filter(|&i| chunks[i] == MISSING_CHUNK);
    if chunk_runs(missing.map(|i| i as u64), usize::MAX).len() > MAX_MISSING_RANGES {
        let first = chunks.iter().position(|c| *c == MISSING_CHUNK);
        chunks.truncate(first.unwrap_or(chunks.len()));
    }
    Some(chunks)
}

fn read_partial_info(path: &Path) -> Result<PartialInfo> {
    let bytes = fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Invalid(e.to_string()))
}

/// What identifies one version of a file for the chunk-hash cache.
#[derive(PartialEq, Eq)]
struct FileStamp {
    size: u64,
    mtime_ns: i128,
    inode: u64,
}

impl FileStamp {
    fn of(meta: &fs::Metadata) -> FileStamp {
        FileStamp {
            size: meta.len(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            inode: meta.ino(),
        }
    }

    fn encode(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out[..8].copy_from_slice(&self.size.to_le_bytes());
        out[8..24].copy_from_slice(&self.mtime_ns.to_le_bytes());
        out[24..].copy_from_slice(&self.inode.to_le_bytes());
        out
    }
}

/// The cache file: a 32-byte [`FileStamp`] then the chunk hashes.
fn read_meta(path: &Path, stamp: &FileStamp) -> Option<Vec<ChunkHash>> {
    let raw = fs::read(path).ok()?;
    let expected_chunks = stamp.size.div_ceil(CHUNK_SIZE) as usize;
    if raw.len() != 32 + expected_chunks * 32 || raw[..32] != stamp.encode() {
        return None;
    }
    Some(
        raw[32..]
            .chunks_exact(32)
            .map(|c| c.try_into().unwrap())
            .collect(),
    )
}

fn write_meta(path: &Path, stamp: &FileStamp, chunks: &[ChunkHash]) -> Result<()> {
    let mut raw = Vec::with_capacity(32 + chunks.len() * 32);
    raw.extend_from_slice(&stamp.encode());
    for chunk in chunks {
        raw.extend_from_slice(chunk);
    }
    let tmp = path.with_extension("meta.tmp");
    fs::write(&tmp, raw)?;
    fs::rename(&tmp, path)?;
    Ok(())
}

/// Staging and cache files are named by a hash of the file name: fixed length, no
/// characters the file system could mind.
fn name_key(name: &str) -> String {
    blake3::hash(name.as_bytes()).to_hex()[..32].to_string()
}

/// A disk-full or quota error becomes [`ErrorCode::NoSpace`]; others stay IO errors.
fn storage_error(e: io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
            Error::remote(ErrorCode::NoSpace, "the server's disk is full")
        }
        _ => Error::Io(e),
    }
}

/// A failure of the server's own folders: the client learns which area, never a path.
fn internal(area: &str, e: Errno) -> Error {
    match e {
        Errno::NOSPC | Errno::DQUOT => {
            Error::remote(ErrorCode::NoSpace, "the server's disk is full")
        }
        e => Error::remote(ErrorCode::Internal, format!("storage error ({area}): {e}")),
    }
}

/// Start writing `len` bytes of `file` at `offset` back to disk without waiting for it
/// (a hint: an error shows up in the fsync that follows).
fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open descriptor; the call only schedules writeback.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

fn create_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(path)
        .map_err(storage_error)
}

fn opened(data: &Option<File>) -> Result<&File> {
    data.as_ref()
        .ok_or_else(|| Error::remote(ErrorCode::Internal, "upload data file not open"))
}

fn discarded(path: &str) -> Error {
    Error::remote(
        ErrorCode::ChecksumMismatch,
        format!("checksum mismatch for {path}: the upload was discarded"),
    )
}

fn whole_folder() -> Error {
    Error::remote(
        ErrorCode::WrongType,
        "the path is your whole folder; give a file or folder inside it",
    )
}

/// Run blocking work (disk, fsync) off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::remote(ErrorCode::Internal, format!("storage worker failed: {e}")))?
}

async fn join<T>(task: tokio::task::JoinHandle<Result<T>>) -> Result<T> {
    task.await
        .map_err(|e| Error::remote(ErrorCode::Internal, format!("storage worker failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_runs_coalesce_and_merge_down_to_the_limit() {
        assert_eq!(
            chunk_runs([1, 2, 3, 7, 9, 10], 10),
            [(1, 3), (7, 1), (9, 2)]
        );
        assert!(chunk_runs([], 1).is_empty());
        // Every other chunk of 1000: merged into at most 4 runs that still cover them all.
        let runs = chunk_runs((0..1000).map(|i| i * 2), 4);
        assert!(runs.len() <= 4, "{runs:?}");
        for i in (0..1000).map(|i| i * 2) {
            assert!(runs.iter().any(|&(f, c)| f <= i && i < f + c), "{i}");
        }
        assert_eq!(chunk_len(2, 2 * CHUNK_SIZE + 5), 5);
        assert_eq!(chunk_len(3, 2 * CHUNK_SIZE + 5), 0);
    }
}
