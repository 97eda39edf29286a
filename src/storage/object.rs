//! [`Storage`] on object storage through Apache OpenDAL: S3 (and compatible servers) in
//! production, OpenDAL's in-memory service in the contract tests.
//!
//! Keys under the operator's root (the bucket's prefix):
//! ```text
//! files/USER/PATH              a complete file
//! files/USER/PATH/             a folder marker (empty folders exist and are listed)
//! manifests/USER/KEY           chunk hashes of files/USER/PATH, first line the object's
//!                              stamp (ETag) so a stale manifest is detected (KEY = hash
//!                              of the path); only for files of more than one chunk
//! partial/USER/KEY.json        a staged upload's record: path, size, part size, the
//!                              multipart upload id, each part's ETag and chunk hashes,
//!                              and a lease (owner, expiry) that makes it busy elsewhere
//! partial/USER/KEY.parts/N     staged parts, only on services without multipart ids
//! versions/USER/KEY/path       the path the versions below belonged to
//! versions/USER/KEY/ID.f       an overwritten or removed file (a server-side copy)
//! versions/USER/KEY/ID.d/...   a removed folder's objects
//! retired/USER-TIME/...        what `retire_user` moved aside
//! retiring/USER                a retirement in progress (its destination), finished by
//!                              the next `create_user` after a crash
//! ```
//! Nothing is locked in memory across servers: an upload's claim is its record, written
//! conditionally (If-None-Match / If-Match) with a lease; a commit is a conditional PUT
//! or the completion of the upload's own multipart upload. Several servers can share the
//! bucket; each keeps only caches (usage, for a few seconds).

mod multipart;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use opendal::{EntryMode, ErrorKind, Operator};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};

pub use multipart::S3Multipart;

use super::fsat;
use super::{
    split_path, Committed, Durable, Entry, Expired, FileRead, Kind, Page, Partial, Removed,
    Storage, StorageOptions, Upload, UploadLock, Usage, Version,
};
use crate::digest::{file_digest, ChunkHash, ChunkHasher, CHUNK_SIZE};
use crate::error::{Error, ErrorCode, Result};
use crate::names::check_user_name;

/// S3 refuses parts under 5 MiB (but the last) and more than 10,000 parts.
const MIN_PART: u64 = 5 * 1024 * 1024;
const MAX_PARTS: u64 = 10_000;

/// How long a staged upload stays claimed by its server without news from it: a crashed
/// server's uploads can be resumed elsewhere after this.
const LEASE: Duration = Duration::from_secs(60);

/// How long another server's changes may take to show in a cached usage.
const USAGE_TTL: Duration = Duration::from_secs(10);

/// Part size for a file of `size` bytes: whole 4 MiB chunks, at least 5 MiB (so two
/// chunks), and large enough for at most 10,000 parts.
pub fn part_size(size: u64) -> u64 {
    let min_chunks = MIN_PART.div_ceil(CHUNK_SIZE);
    let chunks = size
        .div_ceil(MAX_PARTS)
        .div_ceil(CHUNK_SIZE)
        .max(min_chunks);
    chunks * CHUNK_SIZE
}

/// Files on an OpenDAL operator.
pub struct ObjectStorage {
    inner: Arc<Inner>,
}

struct Inner {
    op: Operator,
    /// Multipart calls with visible upload ids (S3); `None`: parts staged as objects.
    multipart: Option<S3Multipart>,
    options: StorageOptions,
    /// This instance's name in upload leases.
    node: String,
    /// Uploads in progress on this instance (other servers are kept out by the lease).
    uploading: Arc<Mutex<HashSet<(String, String)>>>,
    usage: Mutex<HashMap<String, (Instant, Usage)>>,
}

impl ObjectStorage {
    pub fn new(
        op: Operator,
        multipart: Option<S3Multipart>,
        options: StorageOptions,
    ) -> ObjectStorage {
        let mut id = [0u8; 8];
        let _ = getrandom::fill(&mut id);
        ObjectStorage {
            inner: Arc::new(Inner {
                op,
                multipart,
                options,
                node: hex::encode(id),
                uploading: Arc::default(),
                usage: Mutex::default(),
            }),
        }
    }

    /// Storage in the bucket `config` names, with S3 multipart uploads.
    pub fn open(
        config: &crate::objstore::ObjectStoreConfig,
        options: StorageOptions,
    ) -> Result<ObjectStorage> {
        Ok(ObjectStorage::new(
            config.operator()?,
            Some(S3Multipart::new(config)?),
            options,
        ))
    }

    /// The record of `path`'s staged upload as JSON (tests check the multipart id).
    pub async fn partial_record(&self, user: &str, path: &str) -> Result<Option<String>> {
        let key = self.inner.record_key(user, &canonical(path)?);
        match self.inner.op.read(&key).await {
            Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes.to_vec()).into_owned())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(object_error(e)),
        }
    }
}

fn canonical(path: &str) -> Result<String> {
    Ok(split_path(path)?.join("/"))
}

fn object_error(e: opendal::Error) -> Error {
    Error::remote(
        ErrorCode::Internal,
        format!("object storage error: {}", e.kind()),
    )
    .context_log(&e)
}

trait LogContext {
    fn context_log(self, e: &opendal::Error) -> Self;
}

impl LogContext for Error {
    /// The client sees the kind; the log gets the whole error.
    fn context_log(self, e: &opendal::Error) -> Self {
        tracing::warn!(error = %e, "object storage");
        self
    }
}

fn not_found(e: &opendal::Error) -> bool {
    e.kind() == ErrorKind::NotFound
}

fn busy(path: &str) -> Error {
    Error::remote(
        ErrorCode::Busy,
        format!("{path} is being uploaded by another connection; try again later"),
    )
}

fn name_key(path: &str) -> String {
    blake3::hash(path.as_bytes()).to_hex()[..32].to_string()
}

fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn unix_secs() -> u64 {
    unix_nanos() / 1_000_000_000
}

fn id_time(id: &str) -> SystemTime {
    let nanos: u64 = id
        .split('.')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    UNIX_EPOCH + Duration::from_nanos(nanos)
}

fn modified(meta: &opendal::Metadata) -> SystemTime {
    meta.last_modified()
        .map(SystemTime::from)
        .unwrap_or(UNIX_EPOCH)
}

/// What identifies one version of an object: its ETag, else size and time (services
/// without ETags).
fn stamp(meta: &opendal::Metadata) -> String {
    match meta.etag() {
        Some(tag) => tag.to_string(),
        None => format!("{}@{:?}", meta.content_length(), meta.last_modified()),
    }
}

/// Length of part `index` of a file of `size` bytes cut in parts of `part`.
fn part_len(index: u64, part: u64, size: u64) -> u64 {
    size.saturating_sub(index * part).min(part)
}

/// A staged upload's record (`partial/USER/KEY.json`).
#[derive(Clone, Serialize, Deserialize)]
struct Record {
    path: String,
    size: u64,
    part_size: u64,
    /// The S3 multipart upload; `None` where parts are staged as objects.
    upload_id: Option<String>,
    /// Parts in order; `None` for a part to be sent again.
    parts: Vec<Option<PartDone>>,
    /// The server holding the upload, until `lease_until` (seconds since 1970).
    owner: String,
    lease_until: u64,
    updated: u64,
}

#[derive(Clone, Serialize, Deserialize)]
struct PartDone {
    etag: String,
    /// BLAKE3 of each chunk of the part, hex.
    chunks: Vec<String>,
}

impl Record {
    fn received(&self) -> u64 {
        let missing: u64 = (0..self.parts.len() as u64)
            .filter(|&i| self.parts[i as usize].is_none())
            .map(|i| part_len(i, self.part_size, self.size))
            .sum();
        (self.parts.len() as u64 * self.part_size).min(self.size) - missing
    }
}

impl Inner {
    fn file_key(user: &str, path: &str) -> String {
        format!("files/{user}/{path}")
    }

    /// The folder's marker (and its listing prefix); the user's folder for `""`.
    fn dir_key(user: &str, path: &str) -> String {
        if path.is_empty() {
            format!("files/{user}/")
        } else {
            format!("files/{user}/{path}/")
        }
    }

    fn manifest_key(user: &str, path: &str) -> String {
        format!("manifests/{user}/{}", name_key(path))
    }

    fn record_key(&self, user: &str, path: &str) -> String {
        format!("partial/{user}/{}.json", name_key(path))
    }

    fn parts_prefix(user: &str, path: &str) -> String {
        format!("partial/{user}/{}.parts/", name_key(path))
    }

    fn versions_prefix(user: &str, path: &str) -> String {
        format!("versions/{user}/{}/", name_key(path))
    }

    fn forget_usage(&self, user: &str) {
        self.usage.lock().unwrap().remove(user);
    }

    fn busy_under(&self, user: &str, path: &str) -> Result<()> {
        let prefix = format!("{path}/");
        let uploading = self.uploading.lock().unwrap();
        if uploading
            .iter()
            .any(|(u, p)| u == user && (p == path || p.starts_with(&prefix)))
        {
            return Err(busy(path));
        }
        Ok(())
    }

    async fn stat_object(&self, key: &str) -> Result<Option<opendal::Metadata>> {
        match self.op.stat(key).await {
            Ok(meta) => Ok(Some(meta)),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(object_error(e)),
        }
    }

    /// Every object under `prefix` (recursive), markers included.
    async fn list_tree(&self, prefix: &str) -> Result<Vec<opendal::Entry>> {
        match self.op.list_with(prefix).recursive(true).await {
            Ok(entries) => Ok(entries.into_iter().filter(|e| e.path() != prefix).collect()),
            Err(e) if not_found(&e) => Ok(Vec::new()),
            Err(e) => Err(object_error(e)),
        }
    }

    /// What is at `path`: a file (with its metadata), a folder, or nothing. A folder
    /// exists by its marker or by anything below it. Two requests at most: the file's HEAD,
    /// then one listing of the folder's prefix.
    async fn kind_at(&self, user: &str, path: &str) -> Result<Option<(Kind, opendal::Metadata)>> {
        if path.is_empty() {
            return Ok(Some((Kind::Dir, opendal::MetadataBuilder::dir().build())));
        }
        if let Some(meta) = self.stat_object(&Self::file_key(user, path)).await? {
            if meta.mode() == EntryMode::FILE {
                return Ok(Some((Kind::File, meta)));
            }
        }
        let folder = self.folder_at(&Self::dir_key(user, path)).await?;
        Ok(folder.map(|meta| (Kind::Dir, meta)))
    }

    /// The folder whose marker (and listing prefix) is `dir`: its marker's metadata (or a
    /// folder's without a time when only keys below it exist), or `None`.
    async fn folder_at(&self, dir: &str) -> Result<Option<opendal::Metadata>> {
        use futures_util::TryStreamExt;
        if let Some(s3) = &self.multipart {
            // The marker is the smallest key with the prefix: one request says it all.
            let listed = s3.list_keys(dir, None, None, 1).await?;
            let mut meta = opendal::MetadataBuilder::dir();
            if let Some((_, _, modified, _)) = listed.objects.iter().find(|o| o.0 == dir) {
                if let Ok(time) = opendal::raw::Timestamp::try_from(*modified) {
                    meta.last_modified(time);
                }
            }
            let any = !listed.objects.is_empty() || !listed.folders.is_empty();
            return Ok(any.then(|| meta.build()));
        }
        if let Some(meta) = self.stat_object(dir).await? {
            return Ok(Some(meta));
        }
        let below = match self.op.lister_with(dir).limit(1).await {
            Ok(mut lister) => lister.try_next().await.map_err(object_error)?.is_some(),
            Err(e) if not_found(&e) => false,
            Err(e) => return Err(object_error(e)),
        };
        Ok(below.then(|| opendal::MetadataBuilder::dir().build()))
    }

    /// The folder holding `path` exists (else NotFound, or WrongType for a file).
    async fn check_parent(&self, user: &str, components: &[&str], path: &str) -> Result<()> {
        let parent = components[..components.len().saturating_sub(1)].join("/");
        match self.kind_at(user, &parent).await? {
            Some((Kind::Dir, _)) => Ok(()),
            Some((Kind::File, _)) => Err(fsat::error(Errno::NOTDIR, path)),
            None => Err(fsat::error(Errno::NOENT, path)),
        }
    }

    /// Markers for every folder above `components`' last one (a file committed to a new
    /// folder, `mkdir -p`). A file in the way is refused.
    async fn make_parents(&self, user: &str, components: &[&str], path: &str) -> Result<()> {
        // netdisk makes every folder above the ones it makes: the deepest marker found
        // means the folders above it exist (one request for a file put into a folder).
        let mut depth = components.len().saturating_sub(1);
        while depth > 0 {
            let dir = components[..depth].join("/");
            if self
                .stat_object(&Self::dir_key(user, &dir))
                .await?
                .is_some()
            {
                break;
            }
            depth -= 1;
        }
        for depth in depth + 1..components.len() {
            let dir = components[..depth].join("/");
            match self.kind_at(user, &dir).await? {
                Some((Kind::Dir, _)) => {}
                Some((Kind::File, _)) => return Err(fsat::error(Errno::NOTDIR, path)),
                None => self
                    .op
                    .create_dir(&Self::dir_key(user, &dir))
                    .await
                    .map_err(object_error)?,
            }
        }
        Ok(())
    }

    /// Copy one object (server-side on S3; read and write where the service cannot copy).
    async fn copy(&self, from: &str, to: &str) -> Result<()> {
        if from.ends_with('/') {
            return self.op.create_dir(to).await.map_err(object_error);
        }
        if self.op.info().capability().copy {
            return self.op.copy(from, to).await.map(drop).map_err(object_error);
        }
        let bytes = self.op.read(from).await.map_err(object_error)?;
        self.op
            .write(to, bytes)
            .await
            .map(drop)
            .map_err(object_error)
    }

    /// Write `body` to `key`, replacing `old` (what was looked at; `None`: nothing) only
    /// if it is still there, where the service can check: If-Match on its ETag, or
    /// If-None-Match.
    async fn put_replacing(
        &self,
        key: &str,
        body: opendal::Buffer,
        old: Option<&opendal::Metadata>,
    ) -> Result<Stored> {
        let capability = self.op.info().capability();
        let mut write = self.op.write_with(key, body);
        match old.map(|meta| meta.etag()) {
            Some(Some(etag)) if capability.write_with_if_match => write = write.if_match(etag),
            None if capability.write_with_if_not_exists => write = write.if_not_exists(true),
            _ => {}
        }
        match write.await {
            Ok(meta) => Ok(Stored::Done(meta.etag().map(str::to_string))),
            // NotFound: If-Match on a file removed meanwhile.
            Err(e) if e.kind() == ErrorKind::ConditionNotMatch || not_found(&e) => Ok(Stored::Lost),
            Err(e) => Err(object_error(e)),
        }
    }

    /// Delete `key` only while it is the version `etag` names (where the service checks
    /// it): an object another server replaced meanwhile stays, as the newer write. `false`
    /// when it stayed.
    async fn delete_if(&self, key: &str, etag: Option<&str>) -> Result<bool> {
        let mut delete = self.op.delete_with(key);
        if let Some(etag) = etag {
            if self.op.info().capability().delete_with_if_match {
                delete = delete.if_match(etag);
            }
        }
        match delete.await {
            Ok(()) => Ok(true),
            Err(e) if not_found(&e) => Ok(true),
            Err(e) if e.kind() == ErrorKind::ConditionNotMatch => Ok(false),
            Err(e) => Err(object_error(e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<()> {
        match self.op.delete(key).await {
            Ok(()) => Ok(()),
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(object_error(e)),
        }
    }

    /// Keep the file at `path` (of `size` bytes) as its newest version (a server-side
    /// copy), then only the newest `keep_versions`. `false`: the file is gone (removed by
    /// another server since it was looked at).
    async fn keep_file_version(&self, user: &str, path: &str, size: u64) -> Result<bool> {
        let dir = self.version_dir(user, path).await?;
        let to = format!("{dir}{:020}.f", unix_nanos());
        let from = Self::file_key(user, path);
        let copied = if self.op.info().capability().copy {
            // The size is known: no HEAD of the source first. The copy is of whatever is
            // there now; a writer replacing the file checks its ETag afterwards.
            self.op
                .copy_with(&from, &to)
                .source_content_length_hint(size)
                .await
                .map(drop)
        } else {
            match self.op.read(&from).await {
                Ok(bytes) => self.op.write(&to, bytes).await.map(drop),
                Err(e) => Err(e),
            }
        };
        match copied {
            Ok(()) => {}
            Err(e) if not_found(&e) => return Ok(false),
            Err(e) => return Err(object_error(e)),
        }
        self.prune_path(&dir, self.options.keep_versions).await?;
        Ok(true)
    }

    /// `versions/USER/KEY/`, with its `path` record written on first use.
    async fn version_dir(&self, user: &str, path: &str) -> Result<String> {
        let dir = Self::versions_prefix(user, path);
        let record = format!("{dir}path");
        if self.stat_object(&record).await?.is_none() {
            self.op
                .write(&record, path.as_bytes().to_vec())
                .await
                .map_err(object_error)?;
        }
        Ok(dir)
    }

    /// Versions in `dir` (a `versions/USER/KEY/`), newest first: (id with kind, size).
    async fn version_ids(&self, dir: &str) -> Result<Vec<(String, Kind, u64)>> {
        let mut ids: HashMap<String, (Kind, u64)> = HashMap::new();
        for entry in self.list_tree(dir).await? {
            let rel = &entry.path()[dir.len()..];
            let (top, rest) = rel.split_once('/').unwrap_or((rel, ""));
            let size = if entry.metadata().is_file() {
                entry.metadata().content_length()
            } else {
                0
            };
            if let Some(id) = top.strip_suffix(".f").filter(|_| rest.is_empty()) {
                ids.insert(format!("{id}.f"), (Kind::File, size));
            } else if top.ends_with(".d") {
                ids.entry(top.to_string()).or_insert((Kind::Dir, 0)).1 += size;
            }
        }
        let mut ids: Vec<(String, Kind, u64)> =
            ids.into_iter().map(|(id, (k, s))| (id, k, s)).collect();
        ids.sort_by(|a, b| b.0.cmp(&a.0));
        Ok(ids)
    }

    async fn delete_version(&self, dir: &str, id: &str, kind: Kind) -> Result<()> {
        match kind {
            Kind::File => self.delete(&format!("{dir}{id}")).await,
            Kind::Dir => self.delete_tree(&format!("{dir}{id}/")).await,
        }
    }

    async fn delete_tree(&self, prefix: &str) -> Result<()> {
        for entry in self.list_tree(prefix).await? {
            self.delete(entry.path()).await?;
        }
        self.delete(prefix).await
    }

    async fn prune_path(&self, dir: &str, keep: usize) -> Result<()> {
        for (id, kind, _) in self.version_ids(dir).await?.into_iter().skip(keep) {
            self.delete_version(dir, &id, kind).await?;
        }
        Ok(())
    }

    /// The chunk hashes of a file from its manifest, if the manifest describes this very
    /// object.
    async fn read_manifest(&self, user: &str, path: &str, stamp: &str) -> Option<Vec<ChunkHash>> {
        let raw = self
            .op
            .read(&Self::manifest_key(user, path))
            .await
            .ok()?
            .to_vec();
        let newline = raw.iter().position(|&b| b == b'\n')?;
        if &raw[..newline] != stamp.as_bytes() || (raw.len() - newline - 1) % 32 != 0 {
            return None;
        }
        Some(
            raw[newline + 1..]
                .chunks_exact(32)
                .map(|c| c.try_into().unwrap())
                .collect(),
        )
    }

    async fn write_manifest(
        &self,
        user: &str,
        path: &str,
        stamp: &str,
        chunks: &[ChunkHash],
    ) -> Result<()> {
        let mut raw = Vec::with_capacity(stamp.len() + 1 + chunks.len() * 32);
        raw.extend_from_slice(stamp.as_bytes());
        raw.push(b'\n');
        for chunk in chunks {
            raw.extend_from_slice(chunk);
        }
        self.op
            .write(&Self::manifest_key(user, path), raw)
            .await
            .map(drop)
            .map_err(object_error)
    }

    /// Give the manifest of `from` to `to`, now the same content under a new stamp.
    async fn move_manifest(&self, user: &str, from: &str, to: &str) -> Result<()> {
        let old = self.stat_object(&Self::file_key(user, from)).await?;
        let new = self.stat_object(&Self::file_key(user, to)).await?;
        if let (Some(old), Some(new)) = (old, new) {
            if let Some(chunks) = self.read_manifest(user, from, &stamp(&old)).await {
                self.write_manifest(user, to, &stamp(&new), &chunks).await?;
            }
        }
        self.delete(&Self::manifest_key(user, from)).await
    }

    async fn read_record(&self, key: &str) -> Result<Option<(Record, opendal::Metadata)>> {
        let Some(meta) = self.stat_object(key).await? else {
            return Ok(None);
        };
        let bytes = match self.op.read(key).await {
            Ok(bytes) => bytes.to_vec(),
            Err(e) if not_found(&e) => return Ok(None),
            Err(e) => return Err(object_error(e)),
        };
        Ok(serde_json::from_slice(&bytes).ok().map(|r| (r, meta)))
    }

    /// Write a record only if it is still the one read (`tag`), or absent (`None`):
    /// two servers racing for one upload cannot both win. Returns the new tag.
    async fn write_record(
        &self,
        key: &str,
        record: &Record,
        tag: Option<&str>,
    ) -> Result<Option<String>> {
        let bytes = serde_json::to_vec(record).map_err(|e| Error::Invalid(e.to_string()))?;
        let capability = self.op.info().capability();
        let mut write = self.op.write_with(key, bytes);
        match tag {
            Some(tag) if capability.write_with_if_match => write = write.if_match(tag),
            Some(_) => {} // services without If-Match: this server's lock is all there is
            None if capability.write_with_if_not_exists => write = write.if_not_exists(true),
            None => {}
        }
        match write.await {
            Ok(meta) if meta.etag().is_some() => Ok(meta.etag().map(str::to_string)),
            // Not every reply carries the new tag: ask for it.
            Ok(_) => Ok(self
                .stat_object(key)
                .await?
                .and_then(|meta| meta.etag().map(str::to_string))),
            Err(e) if e.kind() == ErrorKind::ConditionNotMatch => Err(busy(&record.path)),
            Err(e) => Err(object_error(e)),
        }
    }

    /// Drop a staged upload: its multipart upload or part objects, and its record.
    async fn drop_staged(&self, user: &str, record: &Record) -> Result<()> {
        if let (Some(multipart), Some(id)) = (&self.multipart, &record.upload_id) {
            if let Err(e) = multipart
                .abort(&Self::file_key(user, &record.path), id)
                .await
            {
                tracing::warn!(error = %e, "cannot abort a multipart upload");
            }
        }
        self.delete_tree(&Self::parts_prefix(user, &record.path))
            .await?;
        self.delete(&self.record_key(user, &record.path)).await
    }

    async fn list_partial(&self, user: &str) -> Result<Vec<(Record, SystemTime)>> {
        let prefix = format!("partial/{user}/");
        let mut out = Vec::new();
        for entry in self.list_tree(&prefix).await? {
            if !entry.path().ends_with(".json") {
                continue;
            }
            if let Some((record, meta)) = self.read_record(entry.path()).await? {
                out.push((record, modified(&meta)));
            }
        }
        out.sort_by(|a, b| a.0.path.cmp(&b.0.path));
        Ok(out)
    }

    async fn usage(&self, user: &str) -> Result<Usage> {
        let mut usage = Usage::default();
        for entry in self.list_tree(&format!("files/{user}/")).await? {
            if entry.metadata().is_file() {
                usage.files += 1;
                usage.file_bytes += entry.metadata().content_length();
            }
        }
        for entry in self.list_tree(&format!("versions/{user}/")).await? {
            let rel = entry.path().split('/').nth(3).unwrap_or("");
            if entry.metadata().is_file() && rel.ends_with(".f") {
                usage.versions += 1;
                usage.version_bytes += entry.metadata().content_length();
            } else if entry.metadata().is_file() && rel.ends_with(".d") {
                usage.version_bytes += entry.metadata().content_length();
            } else if rel.ends_with(".d") && entry.path().matches('/').count() == 4 {
                usage.versions += 1; // the folder version's own marker
            }
        }
        usage.staged = self
            .list_partial(user)
            .await?
            .into_iter()
            .map(|(record, _)| (record.path, record.size))
            .collect();
        Ok(usage)
    }
}

impl Inner {
    fn retiring_key(user: &str) -> String {
        format!("retiring/{user}")
    }

    /// Move everything of `user` under `place`; whether there was anything. Staged uploads
    /// are aborted, not moved (no one could resume them, and an aborted multipart upload
    /// cannot be completed by a connection of the old account still open on another
    /// server); files go before versions, as a commit writes the version first; an object
    /// replaced meanwhile is moved again rather than deleted unseen.
    async fn retire_into(&self, user: &str, place: &str) -> Result<bool> {
        let mut moved = false;
        for (record, _) in self.list_partial(user).await? {
            self.drop_staged(user, &record).await?;
        }
        for area in ["files", "versions", "manifests", "partial"] {
            let prefix = format!("{area}/{user}/");
            for entry in self.list_tree(&prefix).await? {
                let to = format!("{place}{area}/{}", &entry.path()[prefix.len()..]);
                let mut etag = entry.metadata().etag().map(str::to_string);
                for _ in 0..COMMIT_TRIES {
                    self.copy(entry.path(), &to).await?;
                    if self.delete_if(entry.path(), etag.as_deref()).await? {
                        break;
                    }
                    match self.stat_object(entry.path()).await? {
                        Some(meta) => etag = meta.etag().map(str::to_string),
                        None => break,
                    }
                }
                moved = true;
            }
            self.delete(&prefix).await?;
        }
        self.forget_usage(user);
        Ok(moved)
    }
}

/// One page of a folder: the `limit` smallest entry names after `after`, from the folder's
/// keys offered in any order (memory stays bounded however big the folder is).
///
/// A folder's key is its name and `/`, so keys and names sort alike except around bytes
/// below `/`: the folder `a` (key `a/`) sorts after the file `a.txt` by key but before it
/// by name. [`PageOfNames::settled`] says when no key still to come can enter the page.
struct PageOfNames<'a> {
    after: Option<&'a str>,
    limit: usize,
    entries: BTreeMap<String, (Kind, u64, SystemTime)>,
    /// A valid name after the kept ones was seen: there is a next page.
    more: bool,
    /// Any key under the folder was seen (so the folder exists).
    seen: bool,
}

impl<'a> PageOfNames<'a> {
    fn new(after: Option<&'a str>, limit: usize) -> PageOfNames<'a> {
        PageOfNames {
            after,
            limit,
            entries: BTreeMap::new(),
            more: false,
            seen: false,
        }
    }

    /// A key relative to the folder (`NAME` for a file, `NAME/` for a folder).
    fn offer(&mut self, key: &str, size: u64, modified: SystemTime) {
        self.seen = true;
        let (name, kind) = match key.strip_suffix('/') {
            Some(name) => (name, Kind::Dir),
            None => (key, Kind::File),
        };
        if name.is_empty()
            || name.contains('/')
            || self.after.is_some_and(|after| name <= after)
            || crate::names::check_file_name(name).is_err()
        {
            return;
        }
        if let Some(kept) = self.entries.get_mut(name) {
            // A name both a file and a folder (keys written by hand): the file, as `stat`.
            if kind == Kind::File {
                *kept = (kind, size, modified);
            }
            return;
        }
        if self.entries.len() == self.limit {
            let largest = self.entries.last_key_value().map(|(n, _)| n.as_str());
            if largest.is_some_and(|largest| name > largest) {
                self.more = true;
                return;
            }
        }
        let size = if kind == Kind::File { size } else { 0 };
        self.entries
            .insert(name.to_string(), (kind, size, modified));
        if self.entries.len() > self.limit {
            self.entries.pop_last();
            self.more = true;
        }
    }

    /// Whether the page is final once every key up to `listed` (relative to the folder)
    /// has been offered: it is full, and no later key can have a smaller name than its last
    /// one. Only a folder whose name is a prefix of that last name, followed there by a
    /// byte below `/`, can (`a/` after `a.txt`); the shortest such prefix has the largest key.
    fn settled(&self, listed: &str) -> bool {
        if self.entries.len() < self.limit {
            return false;
        }
        let Some((last, _)) = self.entries.last_key_value() else {
            return false;
        };
        match last.bytes().skip(1).position(|b| b < b'/') {
            None => true,
            Some(at) => format!("{}/", &last[..at + 1]).as_str() <= listed,
        }
    }

    /// The page; `complete`: every key of the folder was offered.
    fn finish(self, complete: bool) -> Page {
        let next = (self.more || !complete)
            .then(|| self.entries.last_key_value().map(|(n, _)| n.clone()))
            .flatten();
        let entries = self
            .entries
            .into_iter()
            .map(|(name, (kind, size, modified))| Entry {
                name,
                kind,
                size,
                modified,
            })
            .collect();
        Page { entries, next }
    }
}

impl Inner {
    /// A page of the folder at `prefix` from S3, one ListObjectsV2 response at a time from
    /// the page's first possible key, until the page is settled: a page of a folder of any
    /// size usually costs one request. Returns whether the folder was listed to its end.
    async fn list_folder_s3(
        &self,
        s3: &S3Multipart,
        prefix: &str,
        page: &mut PageOfNames<'_>,
    ) -> Result<bool> {
        // Every name after `after` has a key after it (a name is a prefix of its key); the
        // folder's own marker (`prefix`) is skipped on the first page.
        let start = format!("{prefix}{}", page.after.unwrap_or(""));
        let max_keys = (page.limit + 1).min(1000);
        let mut token = None;
        loop {
            let listed = s3
                .list_keys(prefix, Some(&start), token.as_deref(), max_keys)
                .await?;
            let mut last = "";
            for (key, size, modified, _) in &listed.objects {
                if let Some(rel) = key.strip_prefix(prefix) {
                    page.offer(rel, *size, *modified);
                    last = last.max(rel);
                }
            }
            for folder in &listed.folders {
                if let Some(rel) = folder.strip_prefix(prefix) {
                    page.offer(rel, 0, UNIX_EPOCH);
                    last = last.max(rel);
                }
            }
            match listed.next {
                None => return Ok(true),
                Some(_) if page.settled(last) => return Ok(false),
                next => token = next,
            }
        }
    }

    /// A page of the folder at `prefix` on other services: every key is offered (from
    /// `after` where the service can start there).
    async fn list_folder_scan(&self, prefix: &str, page: &mut PageOfNames<'_>) -> Result<bool> {
        use futures_util::TryStreamExt;
        let mut list = self.op.lister_with(prefix);
        if let Some(after) = page.after {
            if self.op.info().capability().list_with_start_after {
                list = list.start_after(&format!("{prefix}{after}"));
            }
        }
        let mut lister = match list.await {
            Ok(lister) => lister,
            Err(e) if not_found(&e) => return Ok(true),
            Err(e) => return Err(object_error(e)),
        };
        while let Some(entry) = lister.try_next().await.map_err(object_error)? {
            if let Some(rel) = entry.path().strip_prefix(prefix) {
                let meta = entry.metadata();
                page.offer(rel, meta.content_length(), modified(meta));
            }
        }
        Ok(true)
    }
}

impl ObjectStorage {
    /// Claim the staged upload of `path` for this server: its record, resumed when it
    /// matches (same size, not `restart`), else a new one with a new multipart upload.
    /// `None` for a file of one part (kept in memory, no record).
    async fn claim(
        &self,
        user: &str,
        path: &str,
        size: u64,
        restart: bool,
    ) -> Result<Option<(Record, Option<String>)>> {
        let path = path.to_string();
        let part = part_size(size);
        let key = self.inner.record_key(user, &path);
        let old = self.inner.read_record(&key).await?;
        if let Some((record, _)) = &old {
            let mine = record.owner == self.inner.node;
            if !mine && record.lease_until > unix_secs() {
                return Err(busy(&path));
            }
        }
        if size <= part {
            // One part: kept in memory and stored by one PUT at the commit (not resumable,
            // as a small upload is not on a local disk either).
            if let Some((record, _)) = old {
                self.inner.drop_staged(user, &record).await?;
                self.inner.forget_usage(user);
            }
            return Ok(None);
        }
        let (mut record, tag) = match old {
            Some((record, meta))
                if !restart
                    && record.path == path
                    && record.size == size
                    && record.part_size == part
                    && (record.upload_id.is_some() == self.inner.multipart.is_some()) =>
            {
                (record, meta.etag().map(str::to_string))
            }
            old => {
                let tag = match &old {
                    Some((record, meta)) => {
                        // Another size, or a restart: the old parts go.
                        if let (Some(multipart), Some(id)) =
                            (&self.inner.multipart, &record.upload_id)
                        {
                            let _ = multipart
                                .abort(&Inner::file_key(user, &record.path), id)
                                .await;
                        }
                        self.inner
                            .delete_tree(&Inner::parts_prefix(user, &record.path))
                            .await?;
                        meta.etag().map(str::to_string)
                    }
                    None => None,
                };
                let upload_id = match &self.inner.multipart {
                    Some(multipart) => Some(multipart.create(&Inner::file_key(user, &path)).await?),
                    None => None,
                };
                let record = Record {
                    path: path.clone(),
                    size,
                    part_size: part,
                    upload_id,
                    parts: Vec::new(),
                    owner: String::new(),
                    lease_until: 0,
                    updated: 0,
                };
                (record, tag)
            }
        };
        record.owner = self.inner.node.clone();
        record.lease_until = unix_secs() + LEASE.as_secs();
        record.updated = unix_secs();
        let tag = if tag.is_none() && self.inner.stat_object(&key).await?.is_some() {
            // A record without an ETag (services without them): this server's lock decides.
            Some(String::new())
        } else {
            tag
        };
        let tag = self
            .inner
            .write_record(&key, &record, tag.as_deref())
            .await?;
        Ok(Some((record, tag)))
    }
}

#[async_trait]
impl Storage for ObjectStorage {
    /// Also finishes a retirement of the name cut short by a crash (`retiring/USER`), so
    /// the new account, whose first login comes here, never sees the old one's files.
    async fn create_user(&self, user: &str) -> Result<()> {
        check_user_name(user)?;
        let journal = Inner::retiring_key(user);
        match self.inner.op.read(&journal).await {
            Ok(place) => {
                let place = String::from_utf8_lossy(&place.to_vec()).into_owned();
                tracing::warn!(user, place, "finishing a retirement cut short");
                self.inner.retire_into(user, &place).await?;
                self.inner.delete(&journal).await?;
            }
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(object_error(e)),
        }
        self.inner
            .op
            .create_dir(&Inner::dir_key(user, ""))
            .await
            .map_err(object_error)
    }

    /// Not atomic on S3 (one copy and delete per object; see docs/DEPLOY.md), so the
    /// destination is written first to `retiring/USER`: a crash midway is finished by the
    /// next `create_user` of the name.
    async fn retire_user(&self, user: &str) -> Result<Option<String>> {
        check_user_name(user)?;
        let place = format!("retired/{user}-{}/", unix_secs());
        let journal = Inner::retiring_key(user);
        self.inner
            .op
            .write(&journal, place.clone().into_bytes())
            .await
            .map_err(object_error)?;
        let moved = self.inner.retire_into(user, &place).await?;
        self.inner.delete(&journal).await?;
        Ok(moved.then_some(place))
    }

    async fn list(&self, user: &str, dir: &str, after: Option<&str>, limit: usize) -> Result<Page> {
        check_user_name(user)?;
        let dir = canonical(dir)?;
        let prefix = Inner::dir_key(user, &dir);
        let mut page = PageOfNames::new(after, limit.max(1));
        let complete = match &self.inner.multipart {
            Some(s3) => self.inner.list_folder_s3(s3, &prefix, &mut page).await?,
            None => self.inner.list_folder_scan(&prefix, &mut page).await?,
        };
        // Keys under the folder prove it exists; without any, ask what is at the path.
        if !page.seen && !dir.is_empty() {
            match self.inner.kind_at(user, &dir).await? {
                Some((Kind::Dir, _)) => {}
                Some((Kind::File, _)) => return Err(fsat::error(Errno::NOTDIR, &dir)),
                None => return Err(fsat::error(Errno::NOENT, &dir)),
            }
        }
        Ok(page.finish(complete))
    }

    async fn stat(&self, user: &str, path: &str) -> Result<Entry> {
        check_user_name(user)?;
        let components = split_path(path)?;
        let canonical = components.join("/");
        match self.inner.kind_at(user, &canonical).await? {
            Some((kind, meta)) => Ok(Entry {
                name: components.last().unwrap_or(&"").to_string(),
                kind,
                size: if kind == Kind::File {
                    meta.content_length()
                } else {
                    0
                },
                modified: modified(&meta),
            }),
            None => Err(fsat::error(Errno::NOENT, path)),
        }
    }

    async fn open(&self, user: &str, path: &str) -> Result<Arc<dyn FileRead>> {
        check_user_name(user)?;
        let path = canonical(path)?;
        let key = Inner::file_key(user, &path);
        let meta = match self.inner.kind_at(user, &path).await? {
            Some((Kind::File, meta)) => meta,
            Some((Kind::Dir, _)) => return Err(fsat::error(Errno::ISDIR, &path)),
            None => return Err(fsat::error(Errno::NOENT, &path)),
        };
        let stamp = stamp(&meta);
        let mut file = ObjectFile {
            op: self.inner.op.clone(),
            key,
            size: meta.content_length(),
            modified: modified(&meta),
            etag: meta.etag().map(str::to_string),
            chunks: Vec::new(),
            block: tokio::sync::Mutex::new((0, Vec::new())),
        };
        if file.size <= CHUNK_SIZE {
            // No manifest for one chunk: the whole file is read and hashed here, and kept
            // for the reads that follow (one GET in all).
            let bytes = match file.size {
                0 => Vec::new(),
                size => file.read_range(0, size).await?.to_vec(),
            };
            let mut hasher = ChunkHasher::new();
            hasher.update(&bytes);
            file.chunks = hasher.finish_chunks();
            file.block = tokio::sync::Mutex::new((0, bytes));
            return Ok(Arc::new(file));
        }
        file.chunks = match self.inner.read_manifest(user, &path, &stamp).await {
            Some(chunks) if chunks.len() as u64 == file.size.div_ceil(CHUNK_SIZE) => chunks,
            // A file written without netdisk, or a lost manifest: hash it once.
            _ => {
                let chunks = file.hash().await?;
                let _ = self
                    .inner
                    .write_manifest(user, &path, &stamp, &chunks)
                    .await;
                chunks
            }
        };
        Ok(Arc::new(file))
    }

    async fn begin_upload(
        &self,
        user: &str,
        path: &str,
        size: u64,
        restart: bool,
    ) -> Result<Box<dyn Upload>> {
        check_user_name(user)?;
        let components = split_path(path)?;
        let path = components.join("/");
        if components.is_empty() {
            return Err(fsat::error(Errno::ISDIR, ""));
        }
        // A folder in the way of a file of several parts is refused now, not after the data
        // has been sent. A file of one part (held in memory) is checked once, at the commit.
        if size > part_size(size) {
            if let Some((Kind::Dir, _)) = self.inner.kind_at(user, &path).await? {
                return Err(fsat::error(Errno::ISDIR, &path));
            }
            // A file in place of a folder above it, too (looking up to the nearest folder).
            for depth in (1..components.len()).rev() {
                match self
                    .inner
                    .kind_at(user, &components[..depth].join("/"))
                    .await?
                {
                    Some((Kind::Dir, _)) => break,
                    Some((Kind::File, _)) => return Err(fsat::error(Errno::NOTDIR, &path)),
                    None => {}
                }
            }
        }
        let lock = UploadLock::take(&self.inner.uploading, user, &path)?;
        let mut upload = ObjectUpload {
            inner: self.inner.clone(),
            user: user.to_string(),
            path: path.clone(),
            size,
            staged: Staged::Single(Vec::new()),
            cursor: None,
            buf: Vec::new(),
            hasher: ChunkHasher::new(),
            committed: false,
            _lock: lock,
        };
        // A retry once: the release of this server's own dropped upload may race the claim.
        let claimed = match self.claim(user, &path, size, restart).await {
            Err(e) if e.code() == Some(ErrorCode::Busy) => {
                self.claim(user, &path, size, restart).await?
            }
            claimed => claimed?,
        };
        if let Some((record, tag)) = claimed {
            upload.staged = Staged::Parts { record, tag };
        }
        self.inner.forget_usage(user);
        Ok(Box::new(upload))
    }

    async fn list_partial(&self, user: &str) -> Result<Vec<Partial>> {
        check_user_name(user)?;
        Ok(self
            .inner
            .list_partial(user)
            .await?
            .into_iter()
            .map(|(record, updated)| Partial {
                received: record.received(),
                path: record.path,
                size: record.size,
                updated,
            })
            .collect())
    }

    async fn remove_partial(&self, user: &str, path: &str) -> Result<()> {
        check_user_name(user)?;
        let path = canonical(path)?;
        let _lock = UploadLock::take(&self.inner.uploading, user, &path)?;
        let key = self.inner.record_key(user, &path);
        match self.inner.read_record(&key).await? {
            Some((record, _)) if record.path == path => {
                if record.owner != self.inner.node && record.lease_until > unix_secs() {
                    return Err(busy(&path));
                }
                self.inner.drop_staged(user, &record).await?;
                self.inner.forget_usage(user);
                Ok(())
            }
            _ => Err(Error::remote(
                ErrorCode::NotFound,
                format!("no unfinished upload of {path}"),
            )),
        }
    }

    async fn mkdir(&self, user: &str, path: &str, parents: bool) -> Result<()> {
        check_user_name(user)?;
        let components = split_path(path)?;
        let canonical = components.join("/");
        if components.is_empty() {
            return if parents {
                Ok(())
            } else {
                Err(fsat::error(Errno::EXIST, path))
            };
        }
        match self.inner.kind_at(user, &canonical).await? {
            Some((Kind::Dir, _)) if parents => return Ok(()),
            Some(_) => return Err(fsat::error(Errno::EXIST, path)),
            None => {}
        }
        if parents {
            self.inner.make_parents(user, &components, path).await?;
        } else {
            self.inner.check_parent(user, &components, path).await?;
        }
        self.inner
            .op
            .create_dir(&Inner::dir_key(user, &canonical))
            .await
            .map_err(object_error)
    }

    async fn remove(&self, user: &str, path: &str, recursive: bool) -> Result<Removed> {
        check_user_name(user)?;
        let components = split_path(path)?;
        let canonical = components.join("/");
        if components.is_empty() {
            return Err(Error::remote(
                ErrorCode::BadRequest,
                "refusing to remove your whole folder; remove what is inside it",
            ));
        }
        self.inner.busy_under(user, &canonical)?;
        let inner = &self.inner;
        let removed = match inner.kind_at(user, &canonical).await? {
            None => return Err(fsat::error(Errno::NOENT, path)),
            Some((Kind::File, meta)) => {
                if !inner
                    .keep_file_version(user, &canonical, meta.content_length())
                    .await?
                {
                    return Err(fsat::error(Errno::NOENT, path));
                }
                // Only the version kept: a file another server committed meanwhile stays.
                let key = Inner::file_key(user, &canonical);
                if inner.delete_if(&key, meta.etag()).await? {
                    inner.delete(&Inner::manifest_key(user, &canonical)).await?;
                }
                Removed {
                    files: 1,
                    bytes: meta.content_length(),
                }
            }
            Some((Kind::Dir, _)) => {
                let prefix = Inner::dir_key(user, &canonical);
                let objects = inner.list_tree(&prefix).await?;
                if !recursive {
                    if !objects.is_empty() {
                        return Err(fsat::error(Errno::NOTEMPTY, path));
                    }
                    inner.delete(&prefix).await?;
                    Removed::default()
                } else {
                    // One copy and one delete per object: a big tree takes a while and a
                    // crash midway leaves it split between the folder and its version.
                    let dir = inner.version_dir(user, &canonical).await?;
                    let version = format!("{dir}{:020}.d/", unix_nanos());
                    inner.op.create_dir(&version).await.map_err(object_error)?;
                    let mut removed = Removed::default();
                    for entry in &objects {
                        let rel = &entry.path()[prefix.len()..];
                        inner.copy(entry.path(), &format!("{version}{rel}")).await?;
                        if entry.metadata().is_file() {
                            removed.files += 1;
                            removed.bytes += entry.metadata().content_length();
                        }
                    }
                    for entry in &objects {
                        // What another server replaced meanwhile stays, as the newer write.
                        let etag = entry.metadata().etag();
                        if !inner.delete_if(entry.path(), etag).await? {
                            continue;
                        }
                        if entry.metadata().is_file() {
                            let rel = &entry.path()[format!("files/{user}/").len()..];
                            inner.delete(&Inner::manifest_key(user, rel)).await?;
                        }
                    }
                    inner.delete(&prefix).await?;
                    inner.prune_path(&dir, inner.options.keep_versions).await?;
                    removed
                }
            }
        };
        inner.forget_usage(user);
        Ok(removed)
    }

    async fn rename(&self, user: &str, from: &str, to: &str, overwrite: bool) -> Result<()> {
        check_user_name(user)?;
        let source = split_path(from)?;
        let target = split_path(to)?;
        let (from_path, to_path) = (source.join("/"), target.join("/"));
        if target.starts_with(&source) && target.len() > source.len() {
            return Err(Error::remote(
                ErrorCode::BadRequest,
                format!("cannot move {from_path} inside itself"),
            ));
        }
        if source.is_empty() || target.is_empty() {
            return Err(Error::remote(
                ErrorCode::WrongType,
                "the path is your whole folder; give a file or folder inside it",
            ));
        }
        if source == target {
            return Ok(());
        }
        let inner = &self.inner;
        inner.busy_under(user, &from_path)?;
        inner.busy_under(user, &to_path)?;
        let (kind, source) = match inner.kind_at(user, &from_path).await? {
            Some(found) => found,
            None => return Err(fsat::error(Errno::NOENT, from)),
        };
        inner.check_parent(user, &target, to).await?;
        match inner.kind_at(user, &to_path).await? {
            None => {}
            Some(_) if !overwrite => {
                return Err(Error::remote(
                    ErrorCode::Exists,
                    format!("{to_path} exists already (replace it with --force)"),
                ))
            }
            Some((Kind::File, meta)) if kind == Kind::File => {
                inner
                    .keep_file_version(user, &to_path, meta.content_length())
                    .await?;
            }
            Some(_) => {
                return Err(Error::remote(
                    ErrorCode::Exists,
                    format!("{to_path} exists and is not a file replaced by a file"),
                ))
            }
        }
        // S3 has no rename: a copy then a delete per object (server-side, but O(size)).
        if kind == Kind::File {
            let (old, new) = (
                Inner::file_key(user, &from_path),
                Inner::file_key(user, &to_path),
            );
            inner.copy(&old, &new).await?;
            inner.move_manifest(user, &from_path, &to_path).await?;
            // A file another server committed to `from` meanwhile stays there.
            inner.delete_if(&old, source.etag()).await?;
        } else {
            let (old, new) = (
                Inner::dir_key(user, &from_path),
                Inner::dir_key(user, &to_path),
            );
            inner.op.create_dir(&new).await.map_err(object_error)?;
            let files = format!("files/{user}/");
            for entry in inner.list_tree(&old).await? {
                let rel = &entry.path()[old.len()..];
                inner.copy(entry.path(), &format!("{new}{rel}")).await?;
                if entry.metadata().is_file() {
                    let (a, b) = (&entry.path()[files.len()..], format!("{to_path}/{rel}"));
                    inner.move_manifest(user, a, &b).await?;
                }
                inner
                    .delete_if(entry.path(), entry.metadata().etag())
                    .await?;
            }
            inner.delete(&old).await?;
        }
        inner.forget_usage(user);
        Ok(())
    }

    async fn usage(&self, user: &str) -> Result<Usage> {
        check_user_name(user)?;
        if let Some((at, usage)) = self.inner.usage.lock().unwrap().get(user) {
            if at.elapsed() < USAGE_TTL {
                return Ok(usage.clone());
            }
        }
        let usage = self.inner.usage(user).await?;
        self.inner
            .usage
            .lock()
            .unwrap()
            .insert(user.to_string(), (Instant::now(), usage.clone()));
        Ok(usage)
    }

    async fn versions(&self, user: &str, path: &str) -> Result<Vec<Version>> {
        check_user_name(user)?;
        let path = canonical(path)?;
        let dir = Inner::versions_prefix(user, &path);
        let record = self.inner.op.read(&format!("{dir}path")).await;
        if record.map(|r| r.to_vec()).ok().as_deref() != Some(path.as_bytes()) {
            return Ok(Vec::new());
        }
        Ok(self
            .inner
            .version_ids(&dir)
            .await?
            .into_iter()
            .map(|(id, kind, size)| Version {
                replaced: id_time(&id),
                id: id.split('.').next().unwrap_or(&id).to_string(),
                kind,
                size,
            })
            .collect())
    }

    async fn restore(&self, user: &str, path: &str, version: Option<&str>) -> Result<()> {
        check_user_name(user)?;
        let components = split_path(path)?;
        let canonical = components.join("/");
        let inner = &self.inner;
        inner.busy_under(user, &canonical)?;
        let no_version = || {
            Error::remote(
                ErrorCode::NotFound,
                format!(
                    "no version {}of {canonical}",
                    version.map(|v| format!("{v} ")).unwrap_or_default()
                ),
            )
        };
        let versions = self.versions(user, &canonical).await?;
        let chosen = match version {
            None => versions.first(),
            Some(v) => versions.iter().find(|found| found.id == v),
        }
        .ok_or_else(no_version)?
        .clone();
        match inner.kind_at(user, &canonical).await? {
            Some((Kind::File, meta)) => {
                inner
                    .keep_file_version(user, &canonical, meta.content_length())
                    .await?;
            }
            Some((Kind::Dir, _)) => {
                return Err(Error::remote(
                    ErrorCode::Exists,
                    format!("a folder is at {canonical}; move it away first"),
                ))
            }
            None => {}
        }
        inner.make_parents(user, &components, path).await?;
        let dir = Inner::versions_prefix(user, &canonical);
        match chosen.kind {
            Kind::File => {
                let from = format!("{dir}{}.f", chosen.id);
                inner
                    .copy(&from, &Inner::file_key(user, &canonical))
                    .await?;
                inner.delete(&from).await?;
            }
            Kind::Dir => {
                let from = format!("{dir}{}.d/", chosen.id);
                let to = Inner::dir_key(user, &canonical);
                inner.op.create_dir(&to).await.map_err(object_error)?;
                for entry in inner.list_tree(&from).await? {
                    let rel = &entry.path()[from.len()..];
                    inner.copy(entry.path(), &format!("{to}{rel}")).await?;
                }
                inner.delete_tree(&from).await?;
            }
        }
        inner.prune_path(&dir, inner.options.keep_versions).await?;
        inner.forget_usage(user);
        Ok(())
    }

    async fn prune_versions(&self, user: &str, bytes: u64) -> Result<(u64, u64)> {
        check_user_name(user)?;
        let prefix = format!("versions/{user}/");
        let mut all = Vec::new();
        let mut keys = HashSet::new();
        for entry in self.inner.list_tree(&prefix).await? {
            if let Some(key) = entry.path()[prefix.len()..].split('/').next() {
                keys.insert(key.to_string());
            }
        }
        for key in keys {
            let dir = format!("{prefix}{key}/");
            for (id, kind, size) in self.inner.version_ids(&dir).await? {
                all.push((id, dir.clone(), kind, size));
            }
        }
        all.sort();
        let (mut count, mut freed) = (0, 0);
        for (id, dir, kind, size) in all {
            if freed >= bytes {
                break;
            }
            self.inner.delete_version(&dir, &id, kind).await?;
            freed += size;
            count += 1;
        }
        if count > 0 {
            self.inner.forget_usage(user);
        }
        Ok((count, freed))
    }

    async fn expire(&self, partial_idle: Duration) -> Result<Expired> {
        let mut expired = Expired::default();
        let now = SystemTime::now();
        for entry in self.inner.list_tree("partial/").await? {
            if !entry.path().ends_with(".json") {
                continue;
            }
            let Some(user) = entry.path().split('/').nth(1) else {
                continue;
            };
            let Some((record, meta)) = self.inner.read_record(entry.path()).await? else {
                continue;
            };
            let idle = now.duration_since(modified(&meta)).unwrap_or_default();
            if idle > partial_idle && record.lease_until <= unix_secs() {
                // An upload in progress here is never expired under its sender.
                if let Ok(_lock) = UploadLock::take(&self.inner.uploading, user, &record.path) {
                    self.inner.drop_staged(user, &record).await?;
                    self.inner.forget_usage(user);
                    expired.partials += 1;
                }
            }
        }
        let oldest = now
            .checked_sub(self.inner.options.version_max_age)
            .unwrap_or(UNIX_EPOCH);
        let mut dirs = HashSet::new();
        for entry in self.inner.list_tree("versions/").await? {
            let mut parts = entry.path().split('/');
            if let (Some(_), Some(user), Some(key)) = (parts.next(), parts.next(), parts.next()) {
                dirs.insert((user.to_string(), format!("versions/{user}/{key}/")));
            }
        }
        for (user, dir) in dirs {
            for (id, kind, _) in self.inner.version_ids(&dir).await? {
                if id_time(&id) < oldest {
                    self.inner.delete_version(&dir, &id, kind).await?;
                    self.inner.forget_usage(&user);
                    expired.versions += 1;
                }
            }
        }
        Ok(expired)
    }
}

/// A stored object opened for reading. Reads ask for the ETag seen at open (where the
/// service supports If-Match), so an overwrite meanwhile fails the read instead of mixing
/// two versions.
struct ObjectFile {
    op: Operator,
    key: String,
    size: u64,
    modified: SystemTime,
    etag: Option<String>,
    chunks: Vec<ChunkHash>,
    /// The last block fetched (offset, bytes): the server reads 256 KiB at a time, and one
    /// request per 256 KiB would make every download a few thousand round trips per GiB.
    block: tokio::sync::Mutex<(u64, Vec<u8>)>,
}

/// Bytes fetched per ranged GET of a download (one such block is held per open file).
const READ_BLOCK: u64 = 8 * 1024 * 1024;

impl ObjectFile {
    async fn read_range(&self, offset: u64, len: u64) -> Result<opendal::Buffer> {
        let mut read = self.op.read_with(&self.key).range(offset..offset + len);
        if let Some(tag) = &self.etag {
            if self.op.info().capability().read_with_if_match {
                read = read.if_match(tag);
            }
        }
        read.await.map_err(|e| match e.kind() {
            ErrorKind::ConditionNotMatch | ErrorKind::NotFound => Error::remote(
                ErrorCode::Conflict,
                "the file changed while it was read; get it again",
            ),
            _ => object_error(e),
        })
    }

    /// Chunk hashes from the content (a file without a valid manifest).
    async fn hash(&self) -> Result<Vec<ChunkHash>> {
        let mut hasher = ChunkHasher::new();
        let mut offset = 0;
        while offset < self.size {
            let len = (self.size - offset).min(CHUNK_SIZE);
            for piece in self.read_range(offset, len).await? {
                hasher.update(&piece);
            }
            offset += len;
        }
        Ok(hasher.finish_chunks())
    }
}

#[async_trait]
impl FileRead for ObjectFile {
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
        let want = buf.len().min(self.size.saturating_sub(offset) as usize);
        if want == 0 {
            return Ok((buf, 0));
        }
        let mut block = self.block.lock().await;
        let (start, bytes) = &mut *block;
        let cached = offset >= *start && offset + want as u64 <= *start + bytes.len() as u64;
        if !cached {
            let len = READ_BLOCK.max(want as u64).min(self.size - offset);
            bytes.clear();
            for piece in self.read_range(offset, len).await? {
                bytes.extend_from_slice(&piece);
            }
            *start = offset;
        }
        let from = (offset - *start) as usize;
        let filled = want.min(bytes.len().saturating_sub(from));
        buf[..filled].copy_from_slice(&bytes[from..from + filled]);
        if filled < want {
            return Err(Error::Invalid("the object shrank while it was read".into()));
        }
        Ok((buf, filled))
    }
}

/// How a conditional write ended.
enum Stored {
    /// Written; the new object's ETag when the reply had it.
    Done(Option<String>),
    /// What it was to replace changed meanwhile: nothing was written.
    Lost,
}

/// How often a commit looks again after losing a race with another server's change.
const COMMIT_TRIES: usize = 5;

/// Where an upload's bytes go.
enum Staged {
    /// A file of one part: its bytes in memory until the commit's single PUT.
    Single(Vec<u8>),
    /// Parts stored as they fill (S3 multipart, or part objects), listed in the record.
    Parts { record: Record, tag: Option<String> },
}

/// Where the next written bytes go (parts mode): part `part`, up to byte `end`.
struct Cursor {
    part: u64,
    end: u64,
}

/// An upload being staged. Parts mode buffers one part in memory (8 MiB for files up to
/// 80 GB; more for larger files, as 10,000 parts must cover them) and stores it when full.
struct ObjectUpload {
    inner: Arc<Inner>,
    user: String,
    path: String,
    size: u64,
    staged: Staged,
    cursor: Option<Cursor>,
    /// The bytes of the part being received.
    buf: Vec<u8>,
    /// Chunk hashes of the part being received (single mode: of the whole file).
    hasher: ChunkHasher,
    committed: bool,
    _lock: UploadLock,
}

impl ObjectUpload {
    fn record(&self) -> Option<&Record> {
        match &self.staged {
            Staged::Parts { record, .. } => Some(record),
            Staged::Single(_) => None,
        }
    }

    /// Store the full part buffer as part `index`, and record it.
    async fn store_part(&mut self, index: u64) -> Result<()> {
        let body = std::mem::take(&mut self.buf);
        let chunks = std::mem::take(&mut self.hasher).finish_chunks();
        let inner = self.inner.clone();
        let Staged::Parts { record, tag } = &mut self.staged else {
            return Err(Error::remote(ErrorCode::Internal, "no parts to store"));
        };
        let etag = match (&inner.multipart, &record.upload_id) {
            (Some(multipart), Some(id)) => {
                let key = Inner::file_key(&self.user, &self.path);
                multipart
                    .upload_part(&key, id, index as u16 + 1, body)
                    .await?
            }
            _ => {
                let key = format!("{}{index:05}", Inner::parts_prefix(&self.user, &self.path));
                inner.op.write(&key, body).await.map_err(object_error)?;
                String::new()
            }
        };
        let done = PartDone {
            etag,
            chunks: chunks
                .iter()
                .map(|c| blake3::Hash::from_bytes(*c).to_hex().to_string())
                .collect(),
        };
        let index = index as usize;
        if index < record.parts.len() {
            record.parts[index] = Some(done);
        } else {
            record.parts.push(Some(done));
        }
        record.lease_until = unix_secs() + LEASE.as_secs();
        record.updated = unix_secs();
        let key = inner.record_key(&self.user, &self.path);
        let written = inner
            .write_record(&key, record, Some(tag.as_deref().unwrap_or("")))
            .await?;
        *tag = written;
        Ok(())
    }

    fn part_chunks(record: &Record) -> Option<Vec<ChunkHash>> {
        let mut all = Vec::new();
        for part in &record.parts {
            for chunk in &part.as_ref()?.chunks {
                all.push(*blake3::Hash::from_hex(chunk).ok()?.as_bytes());
            }
        }
        Some(all)
    }

    /// Join the stored parts into the file object, replacing `old` (what was looked at;
    /// `None`: nothing) only if it is still there, where the service can check.
    async fn join_parts(&self, old: Option<&opendal::Metadata>) -> Result<Stored> {
        let Some(record) = self.record() else {
            return Err(Error::remote(ErrorCode::Internal, "no parts to join"));
        };
        let key = Inner::file_key(&self.user, &self.path);
        match (&self.inner.multipart, &record.upload_id) {
            (Some(multipart), Some(id)) => {
                let etags: Vec<String> = record
                    .parts
                    .iter()
                    .map(|p| p.as_ref().map(|p| p.etag.clone()).unwrap_or_default())
                    .collect();
                let replacing = match old {
                    None => Some(None),
                    Some(meta) => meta.etag().map(Some),
                };
                Ok(
                    match multipart.complete(&key, id, &etags, replacing).await? {
                        Some(etag) => Stored::Done(Some(etag)),
                        None => Stored::Lost,
                    },
                )
            }
            _ => {
                // Services without multipart ids: the parts are read back and written once
                // more (a copy, unlike S3's completion).
                let prefix = Inner::parts_prefix(&self.user, &self.path);
                let mut writer = self.inner.op.writer(&key).await.map_err(object_error)?;
                for index in 0..record.parts.len() {
                    let part = self
                        .inner
                        .op
                        .read(&format!("{prefix}{index:05}"))
                        .await
                        .map_err(object_error)?;
                    writer.write(part).await.map_err(object_error)?;
                }
                let meta = writer.close().await.map_err(object_error)?;
                self.inner.delete_tree(&prefix).await?;
                Ok(Stored::Done(meta.etag().map(str::to_string)))
            }
        }
    }

    /// After a digest mismatch: parts whose chunks all match the sender's stay, the
    /// others are to be sent again. Without usable hashes the upload is dropped.
    async fn keep_matching(
        &mut self,
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
        let inner = self.inner.clone();
        if let (Some(theirs), Staged::Parts { record, tag }) = (theirs, &mut self.staged) {
            let per_part = (record.part_size / CHUNK_SIZE) as usize;
            let mut differ = 0;
            for (index, part) in record.parts.iter_mut().enumerate() {
                let range = index * per_part..((index + 1) * per_part).min(ours.len());
                let bad = range.filter(|&i| ours[i] != theirs[i]).count();
                if bad > 0 {
                    differ += bad;
                    *part = None;
                }
            }
            let key = inner.record_key(&self.user, &self.path);
            if let Ok(written) = inner
                .write_record(&key, record, Some(tag.as_deref().unwrap_or("")))
                .await
            {
                *tag = written;
                return Error::remote(
                    ErrorCode::ChecksumMismatch,
                    format!(
                        "checksum mismatch for {}: {differ} of {} chunks differ from the \
                         sender's; the others stay staged",
                        self.path,
                        ours.len()
                    ),
                );
            }
        }
        if let Some(record) = self.record() {
            let _ = inner.drop_staged(&self.user, &record.clone()).await;
        }
        Error::remote(
            ErrorCode::ChecksumMismatch,
            format!(
                "checksum mismatch for {}: the upload was discarded",
                self.path
            ),
        )
    }
}

#[async_trait]
impl Upload for ObjectUpload {
    fn offset(&self) -> u64 {
        match &self.staged {
            Staged::Single(bytes) => bytes.len() as u64,
            Staged::Parts { record, .. } => {
                (record.parts.len() as u64 * record.part_size).min(self.size)
            }
        }
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn missing(&self) -> Vec<(u64, u64)> {
        let Some(record) = self.record() else {
            return Vec::new();
        };
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for (index, part) in record.parts.iter().enumerate() {
            if part.is_some() {
                continue;
            }
            let offset = index as u64 * record.part_size;
            let len = part_len(index as u64, record.part_size, self.size);
            match ranges.last_mut() {
                Some((o, l)) if *o + *l == offset => *l += len,
                _ => ranges.push((offset, len)),
            }
        }
        ranges
    }

    fn start_write(&mut self, offset: u64, len: u64) -> Result<()> {
        let end = offset.checked_add(len).filter(|&end| end <= self.size);
        let here = self.offset();
        self.buf.clear();
        if let Staged::Single(_) = self.staged {
            if offset == here && end == Some(self.size) {
                return Ok(());
            }
        }
        if let (Some(record), Some(end)) = (self.record(), end) {
            let part = record.part_size;
            let first = offset / part;
            let whole =
                offset.is_multiple_of(part) && (end.is_multiple_of(part) || end == self.size);
            if offset == here && end == self.size {
                self.hasher = ChunkHasher::new();
                self.cursor = Some(Cursor { part: first, end });
                return Ok(());
            }
            if len > 0
                && whole
                && (first..end.div_ceil(part))
                    .all(|i| record.parts.get(i as usize).is_some_and(Option::is_none))
            {
                self.hasher = ChunkHasher::new();
                self.cursor = Some(Cursor { part: first, end });
                return Ok(());
            }
        }
        Err(Error::remote(
            ErrorCode::Conflict,
            format!(
                "{len} bytes sent at offset {offset}; expected the rest from offset {here} to \
                 the announced size {}, or a missing range",
                self.size
            ),
        ))
    }

    async fn write(&mut self, buf: Vec<u8>, len: usize) -> Result<Option<Vec<u8>>> {
        let mut bytes = &buf[..len];
        if let Staged::Single(data) = &mut self.staged {
            if data.len() + len > self.size as usize {
                return Err(Error::remote(
                    ErrorCode::Conflict,
                    "more data than the announced size",
                ));
            }
            data.extend_from_slice(bytes);
            self.hasher.update(bytes);
            return Ok(Some(buf));
        }
        let part_size = self.record().map(|r| r.part_size).unwrap_or(CHUNK_SIZE);
        while !bytes.is_empty() {
            let Some(cursor) = &self.cursor else {
                return Err(Error::remote(
                    ErrorCode::Conflict,
                    "more data than the announced range",
                ));
            };
            let index = cursor.part;
            let want = part_len(index, part_size, self.size) as usize;
            let take = (want - self.buf.len()).min(bytes.len());
            self.buf.extend_from_slice(&bytes[..take]);
            self.hasher.update(&bytes[..take]);
            bytes = &bytes[take..];
            if self.buf.len() == want {
                let end = cursor.end;
                self.store_part(index).await?;
                let next = index + 1;
                self.cursor = (next * part_size < end).then_some(Cursor { part: next, end });
            }
        }
        Ok(Some(buf))
    }

    async fn finish_writes(&mut self) -> Result<Option<Vec<u8>>> {
        Ok(None) // every write gave its buffer back at once
    }

    async fn commit(
        mut self: Box<Self>,
        digest: &str,
        sent: Option<Vec<ChunkHash>>,
    ) -> Result<Committed> {
        let incomplete = |received: u64, size: u64| {
            Error::remote(
                ErrorCode::Conflict,
                format!("upload incomplete: {received} of {size} bytes received"),
            )
        };
        let components = split_path(&self.path)?;
        let key = Inner::file_key(&self.user, &self.path);
        let chunks = match &self.staged {
            Staged::Single(data) => {
                if data.len() as u64 != self.size {
                    return Err(incomplete(data.len() as u64, self.size));
                }
                std::mem::take(&mut self.hasher).finish_chunks()
            }
            Staged::Parts { record, .. } => {
                let parts = self.size.div_ceil(record.part_size) as usize;
                match Self::part_chunks(record).filter(|_| record.parts.len() == parts) {
                    Some(chunks) => chunks,
                    None => return Err(incomplete(record.received(), self.size)),
                }
            }
        };
        let actual = file_digest(&chunks).to_hex().to_string();
        if !digest.eq_ignore_ascii_case(&actual) {
            return Err(self.keep_matching(&chunks, digest, sent.as_deref()).await);
        }
        let inner = self.inner.clone();
        inner
            .make_parents(&self.user, &components, &self.path)
            .await?;
        let body = match &mut self.staged {
            Staged::Single(data) => Some(opendal::Buffer::from(std::mem::take(data))),
            Staged::Parts { .. } => None,
        };
        // Look, keep what is there as a version, then replace it only while it is what was
        // looked at: another server's commit or removal meanwhile means looking again, so
        // no file is ever replaced without having been kept.
        let mut tries = 0;
        let (old, etag) = loop {
            tries += 1;
            if tries > COMMIT_TRIES {
                return Err(busy(&self.path));
            }
            let old = match inner.kind_at(&self.user, &self.path).await? {
                Some((Kind::Dir, _)) => return Err(fsat::error(Errno::ISDIR, &self.path)),
                Some((Kind::File, meta)) => Some(meta),
                None => None,
            };
            if let Some(meta) = &old {
                let size = meta.content_length();
                if !inner
                    .keep_file_version(&self.user, &self.path, size)
                    .await?
                {
                    continue; // removed meanwhile
                }
            }
            let stored = match &body {
                Some(body) => {
                    inner
                        .put_replacing(&key, body.clone(), old.as_ref())
                        .await?
                }
                None => self.join_parts(old.as_ref()).await?,
            };
            match stored {
                Stored::Done(etag) => break (old, etag),
                Stored::Lost => continue,
            }
        };
        self.committed = true;
        if let Staged::Parts { .. } = &self.staged {
            inner
                .delete(&inner.record_key(&self.user, &self.path))
                .await?;
        }
        if chunks.len() > 1 {
            // Files of one chunk have no manifest: their hash is computed when they are
            // opened (one GET of at most 4 MiB, which the first read then uses).
            let stamp = match etag {
                Some(etag) => Some(etag),
                None => inner.stat_object(&key).await?.map(|meta| stamp(&meta)),
            };
            if let Some(stamp) = stamp {
                inner
                    .write_manifest(&self.user, &self.path, &stamp, &chunks)
                    .await?;
            }
        } else if old.is_some_and(|meta| meta.content_length() > CHUNK_SIZE) {
            inner
                .delete(&Inner::manifest_key(&self.user, &self.path))
                .await?;
        }
        inner.forget_usage(&self.user);
        Ok(Committed {
            size: self.size,
            digest: actual,
            durable: Durable::done(), // S3 acknowledges a write once it is durable
        })
    }
}

impl Drop for ObjectUpload {
    /// Give up the lease at once, so another server may resume without waiting for it
    /// to expire (best effort: the lease expires anyway).
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let Staged::Parts { record, tag } = &self.staged else {
            return;
        };
        let (inner, user, mut record, tag) = (
            self.inner.clone(),
            self.user.clone(),
            record.clone(),
            tag.clone(),
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                record.lease_until = 0;
                let key = inner.record_key(&user, &record.path);
                // Only over this upload's own record: a record removed meanwhile
                // (`remove_partial`) must not come back. If-Match says so on S3; the
                // look first also covers stores that ignore it.
                let ours = matches!(
                    inner.read_record(&key).await,
                    Ok(Some((_, meta))) if meta.etag() == tag.as_deref()
                );
                if ours {
                    let _ = inner
                        .write_record(&key, &record, Some(tag.as_deref().unwrap_or("")))
                        .await;
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_are_whole_chunks_of_at_least_5_mib_and_at_most_10000() {
        assert_eq!(part_size(0), 2 * CHUNK_SIZE);
        assert_eq!(part_size(20 << 20), 2 * CHUNK_SIZE);
        for size in [80 << 30, 1 << 40, 5 << 40] {
            let part = part_size(size);
            assert!(part.is_multiple_of(CHUNK_SIZE));
            assert!(size.div_ceil(part) <= MAX_PARTS, "{size}");
        }
        assert_eq!(part_size(1 << 40), 27 * CHUNK_SIZE);
    }
}
