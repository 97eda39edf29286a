//! File storage: the only code that touches file contents.
//!
//! [`Storage`] is the interface the server uses; [`LocalStorage`] keeps files on a local
//! disk. Methods block (disk IO, fsync): the server calls them from blocking tasks.
//! Every name reaching this module is checked again with [`check_file_name`], so no path
//! built here can leave the user's folder; files are opened with `O_NOFOLLOW` and only
//! regular files are listed or served.
//!
//! Layout under the root:
//! ```text
//! files/USER/NAME          complete files, the only thing `ls` shows
//! partial/USER/KEY.data    a staged upload's bytes (KEY = hash of NAME)
//! partial/USER/KEY.hashes  BLAKE3 of each chunk whose bytes are all staged, in order; all
//!                          zeros for a chunk to be sent again (see `StagedUpload::missing`)
//! partial/USER/KEY.json    name, announced size, start time
//! meta/USER/KEY.meta       cached chunk hashes of files/USER/NAME (a cache: rebuilt when stale)
//! ```

use std::collections::{BTreeSet, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::digest::{file_digest, hash_reader, ChunkHash, ChunkHasher, CHUNK_SIZE};
use crate::durable::sync_dir;
use crate::error::{Error, ErrorCode, Result};
use crate::names::check_file_name;
use crate::protocol::{CommitReply, FileEntry, PartialEntry};

/// A stored file opened for reading from some offset.
pub struct StoredFile {
    pub size: u64,
    pub modified: SystemTime,
    /// Chunk hashes of the whole file (see [`crate::digest`]).
    pub chunks: Vec<ChunkHash>,
    /// The file's bytes, positioned at the start.
    pub reader: Box<dyn FileReader>,
}

/// A stored file's bytes: readable from any offset.
pub trait FileReader: Read + Seek + Send {}
impl<T: Read + Seek + Send> FileReader for T {}

/// What the server needs from a file store. Local disk today; object storage can
/// implement the same calls (a staged upload maps to a multipart upload).
pub trait Storage: Send + Sync + 'static {
    /// Make the user's (empty) folder. Idempotent.
    fn create_user(&self, user: &str) -> Result<()>;
    /// The user's complete files, one level, sorted by name.
    fn list(&self, user: &str) -> Result<Vec<FileEntry>>;
    /// The user's staged (unfinished) uploads.
    fn list_partial(&self, user: &str) -> Result<Vec<PartialEntry>>;
    /// Open a file for download, with its chunk hashes.
    fn open_file(&self, user: &str, name: &str) -> Result<StoredFile>;
    /// Start or resume staging an upload of `size` bytes; fails with
    /// [`ErrorCode::Busy`] while another upload of the same name is in progress.
    fn begin_upload(
        &self,
        user: &str,
        name: &str,
        size: u64,
        restart: bool,
        durability: Durability,
    ) -> Result<Box<dyn StagedUpload>>;
    /// Delete staged uploads idle for longer than `max_idle`; returns how many.
    fn expire_partials(&self, max_idle: Duration) -> Result<usize>;
    /// Make every change so far durable (after uploads committed with deferred
    /// durability, before acknowledging them): one flush for a whole batch.
    fn sync(&self) -> Result<()>;
}

/// An upload being staged. Dropping it without `commit` keeps the received prefix, so the
/// next `put` of the same name and size resumes.
pub trait StagedUpload: Send {
    /// Where the staged data ends: where the sender must continue.
    fn offset(&self) -> u64;
    /// The announced size of the whole file.
    fn size(&self) -> u64;
    /// Ranges `(offset, length)` before [`StagedUpload::offset`], whole chunks, that must be
    /// sent again: staged chunks a failed commit found to differ from the sender's.
    fn missing(&self) -> Vec<(u64, u64)>;
    /// Announce `len` bytes at `offset`: the rest of the file from [`StagedUpload::offset`]
    /// to the end, or whole chunks of a [`StagedUpload::missing`] range. The following
    /// writes go there. Anything else is refused with [`ErrorCode::Conflict`].
    fn start_write(&mut self, offset: u64, len: u64) -> Result<()>;
    /// Write the next bytes of the announced range (by default, append at
    /// [`StagedUpload::offset`]).
    fn write(&mut self, bytes: &[u8]) -> Result<()>;
    /// Verify the whole file, as hashed here from the staged bytes, against `digest` (hex),
    /// make it durable and give it its real name, replacing any old file in one step.
    /// On a mismatch, `chunks` (the sender's chunk hashes, if it sent them) decides what
    /// stays staged: the chunks that match stay, the others become
    /// [`StagedUpload::missing`]. Without them the staged data is dropped.
    fn commit(self: Box<Self>, digest: &str, chunks: Option<&[ChunkHash]>) -> Result<CommitReply>;
}

/// Most `missing` ranges one upload asks for (they are listed in a header); differing
/// chunks further apart are merged into larger ranges.
pub const MAX_MISSING_RANGES: usize = 256;

/// The `.hashes` entry of a chunk that must be sent again.
const MISSING_CHUNK: ChunkHash = [0; 32];

/// How an upload is made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// The upload syncs as it goes and at its commit; an interrupted upload resumes.
    EachUpload,
    /// For small files in a batch (group commit): no record of what was received (a
    /// crash means starting over; the upload always starts at 0), and only the data's
    /// fsync at the commit; the caller calls [`Storage::sync`] (which makes the renames
    /// durable) before acknowledging the commit.
    Batched,
}

/// Files on a local disk under one root folder.
pub struct LocalStorage {
    root: PathBuf,
    /// (user, name) pairs with an upload in progress: one uploader per name at a time.
    uploading: Arc<Mutex<HashSet<(String, String)>>>,
}

#[derive(Serialize, Deserialize)]
struct PartialInfo {
    name: String,
    size: u64,
}

impl LocalStorage {
    pub fn open(root: &Path) -> Result<LocalStorage> {
        for dir in ["files", "partial", "meta"] {
            fs::create_dir_all(root.join(dir))?;
        }
        remove_orphan_data(&root.join("partial"))?;
        Ok(LocalStorage {
            root: root.to_path_buf(),
            uploading: Arc::default(),
        })
    }

    /// The user's folder, refusing a symlink in its place.
    fn user_dir(&self, area: &str, user: &str) -> Result<PathBuf> {
        let dir = self.root.join(area).join(user);
        match fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => Ok(dir),
            Ok(_) => Err(internal(format!("{} is not a folder", dir.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound && area != "files" => {
                fs::create_dir_all(&dir)?;
                Ok(dir)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn file_path(&self, user: &str, name: &str) -> Result<PathBuf> {
        check_file_name(name)?;
        Ok(self.user_dir("files", user)?.join(name))
    }

    fn meta_path(&self, user: &str, name: &str) -> Result<PathBuf> {
        Ok(self
            .user_dir("meta", user)?
            .join(format!("{}.meta", name_key(name))))
    }

    fn partial_paths(&self, user: &str, name: &str) -> Result<PartialPaths> {
        let base = self.user_dir("partial", user)?.join(name_key(name));
        Ok(PartialPaths {
            data: base.with_extension("data"),
            hashes: base.with_extension("hashes"),
            info: base.with_extension("json"),
        })
    }
}

impl Storage for LocalStorage {
    fn create_user(&self, user: &str) -> Result<()> {
        let dir = self.root.join("files").join(user);
        fs::create_dir_all(&dir)?;
        sync_dir(&self.root.join("files"))?;
        Ok(())
    }

    fn list(&self, user: &str) -> Result<Vec<FileEntry>> {
        let mut entries = Vec::new();
        for entry in fs::read_dir(self.user_dir("files", user)?)? {
            let entry = entry?;
            // Only regular files with valid names; symlinks and folders are not served.
            let (Ok(name), Ok(meta)) = (entry.file_name().into_string(), entry.metadata()) else {
                continue;
            };
            if meta.is_file() && check_file_name(&name).is_ok() {
                entries.push(FileEntry {
                    kind: crate::protocol::EntryType::File,
                    digest: None,
                    name,
                    size: meta.len(),
                    modified: iso8601(meta.modified()?),
                });
            }
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    fn list_partial(&self, user: &str) -> Result<Vec<PartialEntry>> {
        let mut entries = Vec::new();
        for entry in fs::read_dir(self.user_dir("partial", user)?)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "json") {
                let Ok(info) = read_partial_info(&path) else {
                    continue;
                };
                let Ok(data) = fs::metadata(path.with_extension("data")) else {
                    continue;
                };
                let missing = missing_bytes(&path.with_extension("hashes"), info.size);
                entries.push(PartialEntry {
                    name: info.name,
                    received: data.len().saturating_sub(missing),
                    size: info.size,
                    updated: iso8601(data.modified()?),
                });
            }
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    }

    fn open_file(&self, user: &str, name: &str) -> Result<StoredFile> {
        let path = self.file_path(user, name)?;
        let mut file = match open_no_follow(&path) {
            Ok(file) => file,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ELOOP)) => {
                return Err(Error::remote(
                    ErrorCode::NotFound,
                    format!("no such file: {name}"),
                ))
            }
            Err(e) => return Err(e.into()),
        };
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(Error::remote(
                ErrorCode::NotFound,
                format!("no such file: {name}"),
            ));
        }
        let chunks = self.cached_chunks(user, name, &meta, &mut file)?;
        file.seek(SeekFrom::Start(0))?;
        Ok(StoredFile {
            size: meta.len(),
            modified: meta.modified()?,
            chunks,
            reader: Box::new(file),
        })
    }

    fn begin_upload(
        &self,
        user: &str,
        name: &str,
        size: u64,
        restart: bool,
        durability: Durability,
    ) -> Result<Box<dyn StagedUpload>> {
        let target = self.file_path(user, name)?;
        let lock = UploadLock::take(&self.uploading, user, name)?;
        let paths = self.partial_paths(user, name)?;
        let deferred = durability == Durability::Batched;
        let prefix = if restart || deferred {
            None
        } else {
            staged_prefix(&paths, name, size)
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
            None if deferred => {
                // Only the data file: creating files is most of a small upload's cost.
                paths.remove();
                let data = File::create(&paths.data).map_err(storage_error)?;
                (data, None, Vec::new())
            }
            None => {
                paths.remove();
                let info = serde_json::to_vec(&PartialInfo {
                    name: name.to_string(),
                    size,
                })
                .map_err(|e| internal(e.to_string()))?;
                fs::write(&paths.info, info).map_err(storage_error)?;
                let data = File::create(&paths.data).map_err(storage_error)?;
                let hashes = File::create(&paths.hashes).map_err(storage_error)?;
                (data, Some(hashes), Vec::new())
            }
        };
        let offset = (chunks.len() as u64 * CHUNK_SIZE).min(size);
        let missing = (0..chunks.len() as u64)
            .filter(|&i| chunks[i as usize] == MISSING_CHUNK)
            .collect();
        let mut data = data;
        data.seek(SeekFrom::Start(offset))?;
        let mut hashes = hashes;
        if let Some(hashes) = hashes.as_mut() {
            hashes.seek(SeekFrom::End(0))?;
        }
        Ok(Box::new(LocalUpload {
            name: name.to_string(),
            size,
            received: offset,
            data,
            hashes,
            hasher: ChunkHasher::resume(chunks),
            missing,
            repaired: Vec::new(),
            writing: Writing::Append,
            deferred,
            paths,
            target,
            meta_path: self.meta_path(user, name)?,
            _lock: lock,
        }))
    }

    fn expire_partials(&self, max_idle: Duration) -> Result<usize> {
        let mut expired = 0;
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
                if idle.is_none_or(|idle| idle > max_idle) {
                    // An upload in progress is never expired under its sender.
                    if let Ok(_lock) = UploadLock::take(&self.uploading, &user, &info.name) {
                        PartialPaths::from_info(&path).remove();
                        expired += 1;
                    }
                }
            }
        }
        Ok(expired)
    }

    fn sync(&self) -> Result<()> {
        let root = File::open(&self.root)?;
        // syncfs: one flush of the file system for every file and rename of the batch.
        // SAFETY: a valid open descriptor; syncfs only reads it.
        if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&root)) } != 0 {
            return Err(storage_error(io::Error::last_os_error()));
        }
        Ok(())
    }
}

impl LocalStorage {
    /// Chunk hashes of an open file: for a one-chunk file computed now (as cheap as reading
    /// a cache); otherwise from the cache when it describes this exact file
    /// (size, mtime, inode), else computed now and cached.
    fn cached_chunks(
        &self,
        user: &str,
        name: &str,
        meta: &fs::Metadata,
        file: &mut File,
    ) -> Result<Vec<ChunkHash>> {
        if meta.len() <= CHUNK_SIZE {
            file.seek(SeekFrom::Start(0))?;
            return Ok(hash_reader(&mut *file)?);
        }
        let meta_path = self.meta_path(user, name)?;
        let stamp = FileStamp::of(meta);
        if let Some(chunks) = read_meta(&meta_path, &stamp) {
            return Ok(chunks);
        }
        file.seek(SeekFrom::Start(0))?;
        let chunks = hash_reader(&mut *file)?;
        write_meta(&meta_path, &stamp, &chunks)?;
        Ok(chunks)
    }
}

struct LocalUpload {
    name: String,
    size: u64,
    /// Where the staged data ends; appends go here.
    received: u64,
    data: File,
    /// The `.hashes` record (none for [`Durability::Batched`] uploads).
    hashes: Option<File>,
    /// Hashes of the staged chunks ([`MISSING_CHUNK`] for missing ones), continued by appends.
    hasher: ChunkHasher,
    /// Chunks (indices) to be sent again; their `.hashes` entries are zeros.
    missing: BTreeSet<u64>,
    /// Missing chunks sent again on this connection, with their new hashes.
    repaired: Vec<(u64, ChunkHash)>,
    writing: Writing,
    /// Group commit: no fsyncs here; the server syncs the batch before acknowledging.
    deferred: bool,
    paths: PartialPaths,
    target: PathBuf,
    meta_path: PathBuf,
    _lock: UploadLock,
}

/// Where [`StagedUpload::write`] puts bytes.
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
    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        if self.received + bytes.len() as u64 > self.size {
            return Err(Error::remote(
                ErrorCode::Conflict,
                "more data than the announced size",
            ));
        }
        self.data.write_all(bytes).map_err(storage_error)?;
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
        // Record each finished chunk's hash once its bytes are durable, so a resume, even
        // after a power cut, never trusts a chunk whose bytes are not on disk.
        if let Some(hashes) = self.hashes.as_mut().filter(|_| !done.is_empty()) {
            self.data.sync_data().map_err(storage_error)?;
            for hash in &done {
                hashes.write_all(hash).map_err(storage_error)?;
            }
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
        self.data.write_all_at(bytes, *at).map_err(storage_error)?;
        let before = hasher.complete_chunks().len();
        hasher.update(bytes);
        *at += bytes.len() as u64;
        let mut done = hasher.complete_chunks()[before..].to_vec();
        if *at == self.size && !bytes.is_empty() && !self.size.is_multiple_of(CHUNK_SIZE) {
            done.extend(hasher.clone().finish_chunks().last());
        }
        // Repairs happen only to resumable uploads, which keep a `.hashes` record.
        if let Some(hashes) = self.hashes.as_ref().filter(|_| !done.is_empty()) {
            self.data.sync_data().map_err(storage_error)?;
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
                        self.name,
                        differ.len(),
                        ours.len()
                    ),
                );
            }
        }
        self.paths.remove();
        Error::remote(
            ErrorCode::ChecksumMismatch,
            format!(
                "checksum mismatch for {}: the upload was discarded",
                self.name
            ),
        )
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

impl Drop for LocalUpload {
    /// A batched upload that was not committed leaves nothing behind (it cannot resume).
    fn drop(&mut self) {
        if self.deferred {
            let _ = fs::remove_file(&self.paths.data);
        }
    }
}

impl StagedUpload for LocalUpload {
    fn offset(&self) -> u64 {
        self.received
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn missing(&self) -> Vec<(u64, u64)> {
        chunk_runs(self.missing.iter().copied(), usize::MAX)
            .into_iter()
            .map(|(first, count)| {
                let offset = first * CHUNK_SIZE;
                (offset, (count * CHUNK_SIZE).min(self.size - offset))
            })
            .collect()
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

    fn commit(self: Box<Self>, digest: &str, sent: Option<&[ChunkHash]>) -> Result<CommitReply> {
        let mut upload = *self;
        if upload.received != upload.size || !upload.missing.is_empty() {
            let missing: u64 = upload
                .missing
                .iter()
                .map(|&i| chunk_len(i, upload.size))
                .sum();
            return Err(Error::remote(
                ErrorCode::Conflict,
                format!(
                    "upload incomplete: {} of {} bytes received",
                    upload.received - missing,
                    upload.size
                ),
            ));
        }
        // The server's own hashes of the bytes it holds decide; the sender's chunk hashes
        // only say which chunks to keep after a mismatch.
        let mut chunks = std::mem::take(&mut upload.hasher).finish_chunks();
        for &(index, hash) in &upload.repaired {
            if let Some(chunk) = chunks.get_mut(index as usize) {
                *chunk = hash;
            }
        }
        let actual = file_digest(&chunks).to_hex().to_string();
        if !digest.eq_ignore_ascii_case(&actual) {
            return Err(upload.keep_matching(&chunks, digest, sent));
        }
        // The bytes are durable before the file takes its name, even in a batch: a power
        // cut must never leave a short file under a real name. Only the folder's fsync
        // (the rename itself) is left to the batch's `Storage::sync`.
        upload.data.sync_data().map_err(storage_error)?;
        fs::rename(&upload.paths.data, &upload.target).map_err(storage_error)?;
        if let Some(dir) = upload.target.parent().filter(|_| !upload.deferred) {
            sync_dir(dir)?;
        }
        // The cache is only an optimisation (a failure costs a re-hash later), and only
        // worth a file for files of several chunks.
        if chunks.len() > 1 {
            let meta = fs::metadata(&upload.target)?;
            let _ = write_meta(&upload.meta_path, &FileStamp::of(&meta), &chunks);
        }
        upload.paths.remove();
        Ok(CommitReply {
            pruned_versions: 0,
            size: upload.size,
            digest: actual,
        })
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

/// Claim of one (user, name) upload slot, released on drop.
struct UploadLock {
    set: Arc<Mutex<HashSet<(String, String)>>>,
    key: (String, String),
}

impl UploadLock {
    fn take(
        set: &Arc<Mutex<HashSet<(String, String)>>>,
        user: &str,
        name: &str,
    ) -> Result<UploadLock> {
        let key = (user.to_string(), name.to_string());
        if !set.lock().unwrap().insert(key.clone()) {
            return Err(Error::remote(
                ErrorCode::Busy,
                format!("{name} is being uploaded by another connection; try again later"),
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
    serde_json::from_slice(&bytes).map_err(|e| internal(e.to_string()))
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

fn open_no_follow(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
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

fn internal(message: String) -> Error {
    Error::remote(ErrorCode::Internal, message)
}

/// A time as ISO 8601 UTC with second precision, e.g. `2026-11-23T17:05:49Z`.
pub fn iso8601(time: SystemTime) -> String {
    let time = time::OffsetDateTime::from(time);
    let format =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    time.format(&format).unwrap_or_default()
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
