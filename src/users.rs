//! The user table, kept in one Excel workbook (`users.xlsx`) as the owner asked: a
//! file in ROOT, or an object in the bucket when several servers share it.
//!
//! Layout: one worksheet `users` with the header row [`HEADER`] and one row per
//! user, sorted by name. Names, timestamps and keys are text cells so Excel never
//! turns a name like `00123` or `TRUE` into something else. The file holds SCRAM
//! verifiers only, never passwords.
//!
//! Where the bytes live is a [`TableStore`]: [`LocalTableFile`] here, the bucket's object
//! in `shared_state`. Every change is "apply to the freshest version, save if the table is
//! still that version, else reload and apply again" (bounded retries), so two writers
//! never lose each other's rows.
//!
//! A local file is rewritten atomically (temp file, fsync, rename, fsync of the folder),
//! so a crash leaves either the old or the new table. `netdisk admin` edits the same file
//! while the server runs: every writer holds an exclusive flock on `users.xlsx.lock`
//! (beside the table) for its whole read-change-write, and first reloads the file if
//! another process replaced it; readers notice a replaced file by its stamp (size, mtime,
//! inode) on each lookup. In a bucket the object's ETag plays the stamp and If-Match the
//! lock.
//! `last_login` is kept in memory and written in batches ([`UserTable::flush_logins`]),
//! so a login never depends on a table write succeeding.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Cursor, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use calamine::{Data, Reader, Xlsx};
use rust_xlsxwriter::Workbook;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::durable::sync_dir;
use crate::names::check_user_name;
use crate::rootlock::lock_file;
use crate::scram::{Verifier, MIN_ITERATIONS};

/// Name of the only worksheet.
pub const SHEET: &str = "users";
/// The header row, exactly. Tables written before the last two columns existed
/// ([`OLD_COLUMNS`] columns) still load, with those two empty.
pub const HEADER: [&str; 9] = [
    "name",
    "registered_at",
    "last_login",
    "scram_salt",
    "scram_iterations",
    "scram_stored_key",
    "scram_server_key",
    "disabled",
    "sessions_after",
];
/// Columns of a table written before `disabled` and `sessions_after` were added.
pub const OLD_COLUMNS: usize = 7;

/// One user as stored in the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserRecord {
    pub name: String,
    /// ISO 8601 UTC, e.g. `2026-11-23T17:05:49Z`.
    pub registered_at: String,
    pub last_login: Option<String>,
    pub verifier: Verifier,
    /// Logins with a password or a session are refused (`disabled` cell `yes`).
    pub disabled: bool,
    /// ISO 8601 UTC: sessions created before this instant are invalid.
    pub sessions_after: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum UserTableError {
    #[error("user name is already taken")]
    NameTaken,
    #[error("no such user")]
    NoSuchUser,
    #[error("cannot read {}: {reason}", path.display())]
    Unreadable { path: PathBuf, reason: String },
    /// Refused before touching the table, because the file could not be read back.
    #[error("invalid user record: {0}")]
    InvalidRecord(String),
    #[error("cannot build the user table workbook: {0}")]
    Xlsx(#[from] rust_xlsxwriter::XlsxError),
    #[error("the user table kept changing while this change was tried {0} times (other servers writing); try again")]
    Busy(u32),
    /// The bucket holding a shared table refused or failed a request.
    #[error("user table in the bucket: {0}")]
    Bucket(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Current time in UTC, second precision, `Z` suffix.
pub fn now_iso8601() -> String {
    format_utc(OffsetDateTime::now_utc())
}

/// A `sessions_after` value that revokes every session created up to now: the next
/// whole second, because session creation times are whole seconds.
pub fn revocation_time() -> String {
    format_utc(OffsetDateTime::now_utc() + time::Duration::SECOND)
}

fn format_utc(at: OffsetDateTime) -> String {
    let at = at.replace_nanosecond(0).unwrap_or(at);
    at.format(&Rfc3339)
        .expect("a UTC time of this era is always formattable")
}

/// Seconds since the Unix epoch of an ISO 8601 timestamp (as stored in the table).
pub fn unix_seconds(at: &str) -> Option<i64> {
    OffsetDateTime::parse(at, &Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

/// Which version of the stored table memory reflects: a file's stamp, an object's ETag.
/// Opaque; only compared for equality.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableVersion(pub String);

/// Why a conditional save did not happen.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// Someone else saved since `expected`: reload, re-apply the change, save again.
    #[error("the user table changed since it was read")]
    Conflict,
    #[error(transparent)]
    Failed(#[from] UserTableError),
}

/// Where the workbook's bytes live. [`UserTable`] does the parsing, the change and the
/// retries; a store only reads and writes whole versions, conditionally.
pub trait TableStore: Send + Sync {
    /// For messages: a file path or an `s3://` URL.
    fn location(&self) -> PathBuf;
    /// Held around a whole read-change-write where the store has such a lock (a file:
    /// the flock every process takes); `None` where only conditional writes order writers.
    fn lock(&self) -> Result<Option<File>, UserTableError>;
    /// The current version without reading the bytes (`None`: no table yet).
    fn version(&self) -> Result<Option<TableVersion>, UserTableError>;
    /// The bytes and the version of exactly those bytes (`None`: no table yet).
    fn load(&self) -> Result<Option<(TableVersion, Vec<u8>)>, UserTableError>;
    /// Replace the table if it is still at `expected` (`None`: create it, it must not
    /// exist). Returns the new version when the store reports it.
    fn save(
        &self,
        bytes: &[u8],
        expected: Option<&TableVersion>,
    ) -> Result<Option<TableVersion>, SaveError>;
    /// Shared by several servers over a network (a bucket): listings check for a new
    /// version at most every [`SHARED_POLL`], and `last_login` is written in batches only.
    /// A local file is checked on every lookup (a stat) and logins are written at once.
    fn is_shared(&self) -> bool;
}

/// How often a listing checks a shared table for a new version.
pub const SHARED_POLL: Duration = Duration::from_secs(1);
/// Conditional saves tried before a change gives up (each conflict means another writer
/// succeeded, so only a very busy table gets there).
const SAVE_ATTEMPTS: u32 = 30;

/// The table as one local file, `users.xlsx`, with `users.xlsx.lock` beside it.
pub struct LocalTableFile {
    path: PathBuf,
    lock_path: PathBuf,
}

impl LocalTableFile {
    pub fn new(path: &Path) -> LocalTableFile {
        let mut lock_name = path.file_name().unwrap_or_default().to_os_string();
        lock_name.push(".lock");
        LocalTableFile {
            path: path.to_path_buf(),
            lock_path: path.with_file_name(lock_name),
        }
    }
}

impl TableStore for LocalTableFile {
    fn location(&self) -> PathBuf {
        self.path.clone()
    }

    /// The exclusive lock every writer (server or `netdisk admin`) holds; released
    /// when the returned file is closed.
    fn lock(&self) -> Result<Option<File>, UserTableError> {
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true);
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options.open(&self.lock_path)?;
        lock_file(&file, true)?;
        Ok(Some(file))
    }

    fn version(&self) -> Result<Option<TableVersion>, UserTableError> {
        match fs::metadata(&self.path) {
            Ok(meta) => Ok(Some(stamp(&meta))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn load(&self) -> Result<Option<(TableVersion, Vec<u8>)>, UserTableError> {
        read_table(&self.path)
    }

    /// Called under the flock, so the check and the rename cannot interleave with another
    /// writer; a conflict means someone replaced the file without the lock (by hand).
    fn save(
        &self,
        bytes: &[u8],
        expected: Option<&TableVersion>,
    ) -> Result<Option<TableVersion>, SaveError> {
        if self.version()?.as_ref() != expected {
            return Err(SaveError::Conflict);
        }
        save(&self.path, bytes)?;
        Ok(self.version()?)
    }

    fn is_shared(&self) -> bool {
        false
    }
}

/// A file's version: a replaced file (new inode on every atomic write), a rewrite in
/// place or a resize all change it.
fn stamp(meta: &fs::Metadata) -> TableVersion {
    let mtime_ns = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
    TableVersion(format!(
        "{}-{}-{}-{}",
        meta.size(),
        mtime_ns,
        meta.ino(),
        meta.dev()
    ))
}

#[derive(Default)]
struct State {
    users: BTreeMap<String, UserRecord>,
    /// The version `users` reflects (`None`: unknown, reload at the next chance).
    loaded: Option<TableVersion>,
    /// The last version looked at, even one that failed to parse (warn once per version).
    seen: Option<TableVersion>,
    /// When the last check for a new version started (shared stores poll).
    checked: Option<Instant>,
    /// Logins not written yet: name -> (registered_at, last_login). The registration
    /// time keeps a login of a deleted account off a new account of the same name.
    logins: BTreeMap<String, (String, String)>,
}

impl State {
    /// Put the pending logins into `users` (after a reload or a write).
    fn apply_logins(&self, users: &mut BTreeMap<String, UserRecord>) {
        for (name, (registered_at, at)) in &self.logins {
            if let Some(user) = users.get_mut(name) {
                if &user.registered_at == registered_at {
                    user.last_login = Some(at.clone());
                }
            }
        }
    }
}

/// All users in memory, persisted as one xlsx workbook in a [`TableStore`] that other
/// processes (or servers) may change too. Cheap lookups; every change is applied to the
/// freshest version and saved conditionally, retried on conflict.
pub struct UserTable {
    store: Box<dyn TableStore>,
    /// Held only for lookups and swaps, never during IO, so `get` stays cheap.
    state: Mutex<State>,
    /// Held for a whole change (check, write, swap): writers in this process are
    /// serialized (the flock or the conditional write orders processes).
    writer: Mutex<()>,
    /// One reload at a time; lookups that find it taken use memory as it is.
    reloading: Mutex<()>,
}

impl UserTable {
    /// Open the table at `path`. A missing file gives an empty table and creates
    /// the file (header row only). A file that exists but cannot be parsed is an
    /// error: better to refuse to start than to start empty and lose every user.
    pub fn open(path: &Path) -> Result<UserTable, UserTableError> {
        UserTable::open_store(Box::new(LocalTableFile::new(path)))
    }

    /// Open the table kept in `store` (created empty if missing), as [`UserTable::open`].
    pub fn open_store(store: Box<dyn TableStore>) -> Result<UserTable, UserTableError> {
        let table = UserTable {
            store,
            state: Mutex::new(State::default()),
            writer: Mutex::new(()),
            reloading: Mutex::new(()),
        };
        // Locked, so two processes starting on a new root do not both create it (in a
        // bucket, the create is conditional: the loser reads the winner's table).
        let _lock = table.store.lock()?;
        let (version, users) = loop {
            if let Some((version, bytes)) = table.store.load()? {
                let users = parse(&bytes).map_err(|reason| table.unreadable(reason))?;
                break (Some(version), users);
            }
            match table.store.save(&to_xlsx(&BTreeMap::new())?, None) {
                Ok(version) => break (version, BTreeMap::new()),
                Err(SaveError::Conflict) => continue,
                Err(SaveError::Failed(e)) => return Err(e),
            }
        };
        let mut state = table.lock();
        state.users = users;
        state.seen = version.clone();
        state.loaded = version;
        state.checked = Some(Instant::now());
        drop(state);
        drop(_lock);
        Ok(table)
    }

    /// Where the table is kept (a file path or an `s3://` URL).
    pub fn location(&self) -> PathBuf {
        self.store.location()
    }

    /// Whether the server should write `last_login` at each login (a local file) or
    /// leave it to the periodic [`UserTable::flush_logins`] (a shared table: a login must
    /// not cost a conditional write that races every other server's).
    pub fn writes_logins_at_once(&self) -> bool {
        !self.store.is_shared()
    }

    /// The user `name`, as of the latest version of the table. A local file is checked
    /// on every call (a stat) and parsed only when another process replaced it. A shared
    /// table is checked on every call too (one ETag request, shared by the lookups waiting
    /// at that moment), so a registration, password change or `disable` made on another
    /// server counts here at once.
    pub fn get(&self, name: &str) -> Option<UserRecord> {
        if self.store.is_shared() {
            self.recheck_after(Instant::now());
        } else {
            self.refresh();
        }
        self.lock().users.get(name).cloned()
    }

    /// Every user, sorted by name.
    pub fn list(&self) -> Vec<UserRecord> {
        self.refresh();
        self.lock().users.values().cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().users.is_empty()
    }

    /// Reload the table if another process replaced it since it was last read.
    /// `Ok(true)` if memory changed. A table that does not parse leaves memory as it
    /// was (the error is reported once per version).
    pub fn reload_if_changed(&self) -> Result<bool, UserTableError> {
        let Ok(_reloading) = self.reloading.try_lock() else {
            return Ok(false);
        };
        if self.store.is_shared() {
            let recent = self
                .lock()
                .checked
                .is_some_and(|at| at.elapsed() < SHARED_POLL);
            if recent {
                return Ok(false);
            }
        }
        self.reload(false)
    }

    fn refresh(&self) {
        if let Err(e) = self.reload_if_changed() {
            tracing::warn!(error = %e, "user table changed but cannot be reloaded; using the previous version");
        }
    }

    /// A check that started after `since`, waiting for one in progress rather than
    /// skipping it; concurrent misses share one check.
    fn recheck_after(&self, since: Instant) {
        let _reloading = self
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.lock().checked.is_some_and(|at| at >= since) {
            return;
        }
        if let Err(e) = self.reload(false) {
            tracing::warn!(error = %e, "user table changed but cannot be reloaded; using the previous version");
        }
    }

    /// `strict` (writers): reload even a version that failed before, so the error
    /// stops the write instead of overwriting a table we could not read.
    fn reload(&self, strict: bool) -> Result<bool, UserTableError> {
        self.lock().checked = Some(Instant::now());
        let current = self.store.version()?;
        {
            let state = self.lock();
            if current.is_some() && (state.loaded == current || (!strict && state.seen == current))
            {
                return Ok(false);
            }
        }
        let (version, bytes) = self.store.load()?.ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, "user table vanished")
        })?;
        let parsed = parse(&bytes);
        let mut state = self.lock();
        state.seen = Some(version.clone());
        let mut users = parsed.map_err(|reason| self.unreadable(reason))?;
        state.apply_logins(&mut users);
        state.users = users;
        state.loaded = Some(version);
        Ok(true)
    }

    /// Insert a new user and persist before returning. Of concurrent inserts of
    /// the same name exactly one wins; the others get `NameTaken`.
    pub fn insert(&self, record: UserRecord) -> Result<(), UserTableError> {
        validate(&record).map_err(UserTableError::InvalidRecord)?;
        self.update(|users| {
            if users.contains_key(&record.name) {
                return Err(UserTableError::NameTaken);
            }
            users.insert(record.name.clone(), record.clone());
            Ok(())
        })
    }

    /// Remove a user's row and persist; returns the removed record.
    pub fn remove(&self, name: &str) -> Result<UserRecord, UserTableError> {
        self.update(|users| users.remove(name).ok_or(UserTableError::NoSuchUser))
    }

    /// Disable (refuse every login) or enable a user, and persist.
    pub fn set_disabled(&self, name: &str, disabled: bool) -> Result<(), UserTableError> {
        self.change_user(name, |user| user.disabled = disabled)
    }

    /// Replace a user's SCRAM verifier (password reset) and, with `revoke_sessions_at`,
    /// invalidate the sessions created before that instant, in one write.
    pub fn set_verifier(
        &self,
        name: &str,
        verifier: Verifier,
        revoke_sessions_at: Option<String>,
    ) -> Result<(), UserTableError> {
        self.change_user(name, |user| {
            user.verifier = verifier.clone();
            if let Some(at) = &revoke_sessions_at {
                user.sessions_after = Some(at.clone());
            }
        })
    }

    /// Invalidate the user's sessions created before `at` (ISO 8601 UTC).
    pub fn revoke_sessions(&self, name: &str, at: String) -> Result<(), UserTableError> {
        self.change_user(name, |user| user.sessions_after = Some(at.clone()))
    }

    /// Change one existing user; the result is validated before it is written.
    fn change_user(
        &self,
        name: &str,
        mut change: impl FnMut(&mut UserRecord),
    ) -> Result<(), UserTableError> {
        self.update(|users| {
            let user = users.get_mut(name).ok_or(UserTableError::NoSuchUser)?;
            change(user);
            validate(user).map_err(UserTableError::InvalidRecord)
        })
    }

    /// Set `last_login` in memory only; [`UserTable::flush_logins`] (or any other
    /// write) persists it. A full disk must not stop people logging in.
    pub fn record_login(&self, name: &str, at: &str) -> Result<(), UserTableError> {
        check_timestamp(at).map_err(UserTableError::InvalidRecord)?;
        let mut state = self.lock();
        let user = state
            .users
            .get_mut(name)
            .ok_or(UserTableError::NoSuchUser)?;
        user.last_login = Some(at.to_string());
        let pending = (user.registered_at.clone(), at.to_string());
        state.logins.insert(name.to_string(), pending);
        Ok(())
    }

    /// Write the `last_login` values recorded since the last write; returns how many.
    /// On failure they stay pending for the next try.
    pub fn flush_logins(&self) -> Result<usize, UserTableError> {
        let pending = self.lock().logins.len();
        if pending == 0 {
            return Ok(0);
        }
        // Memory already holds them: any write persists them.
        self.update(|_| Ok(()))?;
        Ok(pending)
    }

    /// Under the store's lock (if any): bring memory up to date with the stored table,
    /// apply `change` to a copy, save the copy if the table is still the version it came
    /// from, and only then make it current. A conflict (another writer was first) means
    /// reload and apply the change again. A failed write leaves the table and memory as
    /// they were (this is the rollback).
    fn update<T>(
        &self,
        mut change: impl FnMut(&mut BTreeMap<String, UserRecord>) -> Result<T, UserTableError>,
    ) -> Result<T, UserTableError> {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let _lock = self.store.lock()?;
        // No lookup's reload may swap in an older version while we write.
        let _reloading = self
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for attempt in 0..SAVE_ATTEMPTS {
            self.reload(true)?;
            let (mut next, written_logins, base) = {
                let state = self.lock();
                (
                    state.users.clone(),
                    state.logins.clone(),
                    state.loaded.clone(),
                )
            };
            let out = change(&mut next)?;
            let version = match self.store.save(&to_xlsx(&next)?, base.as_ref()) {
                Ok(version) => version,
                Err(SaveError::Conflict) => {
                    // The other writer won this round; let it finish before we reload.
                    std::thread::sleep(conflict_pause(attempt));
                    continue;
                }
                Err(SaveError::Failed(e)) => return Err(e),
            };
            let mut state = self.lock();
            // Logins recorded during the write stay pending (and in memory).
            state
                .logins
                .retain(|name, login| written_logins.get(name) != Some(login));
            state.apply_logins(&mut next);
            state.users = next;
            // Unknown (the store did not say): the next look reloads.
            state.seen = version.clone();
            state.loaded = version;
            return Ok(out);
        }
        Err(UserTableError::Busy(SAVE_ATTEMPTS))
    }

    fn unreadable(&self, reason: String) -> UserTableError {
        UserTableError::Unreadable {
            path: self.store.location(),
            reason,
        }
    }

    /// The state is only ever replaced in short sections that cannot panic halfway,
    /// so a poisoned lock is safe to use.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A short, growing, jittered pause after a lost conditional write, so two writers that
/// keep colliding drift apart.
pub(crate) fn conflict_pause(attempt: u32) -> Duration {
    let mut jitter = [0u8; 2];
    let _ = getrandom::fill(&mut jitter);
    let jitter = u64::from(u16::from_le_bytes(jitter) % 20);
    Duration::from_millis(5 * u64::from(attempt.min(10)) + jitter)
}

/// Logins not yet written get a last chance when the table goes away (server shutdown).
impl Drop for UserTable {
    fn drop(&mut self) {
        if let Err(e) = self.flush_logins() {
            tracing::warn!(error = %e, "cannot write the last logins to the user table");
        }
    }
}

/// The file's bytes and the version of exactly those bytes (`None`: no file).
fn read_table(path: &Path) -> Result<Option<(TableVersion, Vec<u8>)>, UserTableError> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let meta = file.metadata()?;
    let mut bytes = Vec::with_capacity(meta.size() as usize);
    file.read_to_end(&mut bytes)?;
    Ok(Some((stamp(&meta), bytes)))
}

/// Everything `parse` would refuse, so a record we write can always be read back.
fn validate(record: &UserRecord) -> Result<(), String> {
    check_user_name(&record.name).map_err(|e| e.to_string())?;
    check_timestamp(&record.registered_at)?;
    if let Some(at) = &record.last_login {
        check_timestamp(at)?;
    }
    if let Some(at) = &record.sessions_after {
        check_timestamp(at)?;
    }
    if record.verifier.salt.is_empty() {
        return Err("empty salt".to_string());
    }
    if record.verifier.iterations < MIN_ITERATIONS {
        return Err(format!(
            "{} iterations is below the minimum of {MIN_ITERATIONS}",
            record.verifier.iterations
        ));
    }
    Ok(())
}

fn check_timestamp(value: &str) -> Result<(), String> {
    OffsetDateTime::parse(value, &Rfc3339)
        .map(|_| ())
        .map_err(|_| format!("{value:?} is not an ISO 8601 (RFC 3339) timestamp"))
}

/// Read the whole workbook; the error text names the row that is wrong.
fn parse(bytes: &[u8]) -> Result<BTreeMap<String, UserRecord>, String> {
    let mut workbook =
        Xlsx::new(Cursor::new(bytes)).map_err(|e| format!("not a readable xlsx workbook ({e})"))?;
    // Anything else in the workbook would be silently dropped by the next write.
    let sheets = workbook.sheet_names();
    if sheets != [SHEET] {
        return Err(format!(
            "expected exactly one worksheet named {SHEET:?}, found {sheets:?}"
        ));
    }
    let range = workbook
        .worksheet_range(SHEET)
        .map_err(|e| format!("worksheet {SHEET:?}: {e}"))?;
    let cell = |row: u32, col: usize| range.get_value((row, col as u32)).unwrap_or(&Data::Empty);

    let title_at = |col: usize| matches!(cell(0, col), Data::String(s) if s == HEADER[col]);
    // An old table (before `disabled`, `sessions_after`) lacks the last columns.
    let columns = if (0..HEADER.len()).all(title_at) {
        Some(HEADER.len())
    } else if (0..OLD_COLUMNS).all(title_at)
        && (OLD_COLUMNS..HEADER.len()).all(|c| is_blank(cell(0, c)))
    {
        Some(OLD_COLUMNS)
    } else {
        None
    };
    let (Some(columns), Some((last_row, last_col))) = (columns, range.end()) else {
        return Err(format!("row 1 must be the header: {}", HEADER.join(" | ")));
    };

    let mut users = BTreeMap::new();
    for row in 0..=last_row {
        if let Some(col) = (columns as u32..=last_col).find(|&c| !is_blank(cell(row, c as usize))) {
            return Err(format!(
                "row {}: unexpected value in column {} (only {columns} columns are used)",
                row + 1,
                col + 1,
            ));
        }
        if row == 0 {
            continue;
        }
        // Columns an old table lacks read as blank: enabled, no revocation.
        let cells: Vec<&Data> = (0..HEADER.len())
            .map(|col| {
                if col < columns {
                    cell(row, col)
                } else {
                    &Data::Empty
                }
            })
            .collect();
        // Tolerate rows a person emptied by hand in Excel.
        if cells.iter().all(|c| is_blank(c)) {
            continue;
        }
        let record = parse_row(&cells).map_err(|e| format!("row {}: {e}", row + 1))?;
        let name = record.name.clone();
        if users.insert(name.clone(), record).is_some() {
            return Err(format!("row {}: duplicate user name {name:?}", row + 1));
        }
    }
    Ok(users)
}

fn parse_row(cells: &[&Data]) -> Result<UserRecord, String> {
    let name = text(cells[0], 0)?.to_string();
    let registered_at = text(cells[1], 1)?.to_string();
    let last_login = match cells[2] {
        c if is_blank(c) => None,
        c => Some(text(c, 2)?.to_string()),
    };
    let record = UserRecord {
        name,
        registered_at,
        last_login,
        verifier: Verifier {
            salt: base64_cell(cells[3], 3)?,
            iterations: iterations(cells[4])?,
            stored_key: key(cells[5], 5)?,
            server_key: key(cells[6], 6)?,
        },
        disabled: yes_no(cells[7], 7)?,
        sessions_after: match cells[8] {
            c if is_blank(c) => None,
            c => Some(text(c, 8)?.to_string()),
        },
    };
    validate(&record)?;
    Ok(record)
}

fn is_blank(cell: &Data) -> bool {
    match cell {
        Data::Empty => true,
        Data::String(s) => s.is_empty(),
        _ => false,
    }
}

/// `yes` or blank; a hand edit may also give `no` or an Excel boolean.
fn yes_no(cell: &Data, col: usize) -> Result<bool, String> {
    match cell {
        c if is_blank(c) => Ok(false),
        Data::Bool(b) => Ok(*b),
        Data::String(s) if s.trim().eq_ignore_ascii_case("yes") => Ok(true),
        Data::String(s) if s.trim().eq_ignore_ascii_case("no") => Ok(false),
        other => Err(format!(
            "{} must be \"yes\" or empty, found {other:?}",
            HEADER[col]
        )),
    }
}

/// Only real text cells: a number cell means Excel already rewrote the value.
fn text(cell: &Data, col: usize) -> Result<&str, String> {
    match cell {
        Data::String(s) if !s.is_empty() => Ok(s),
        c if is_blank(c) => Err(format!("{} is missing", HEADER[col])),
        other => Err(format!(
            "{} must be a text cell, found {other:?}",
            HEADER[col]
        )),
    }
}

fn base64_cell(cell: &Data, col: usize) -> Result<Vec<u8>, String> {
    B64.decode(text(cell, col)?)
        .map_err(|e| format!("{} is not valid base64 ({e})", HEADER[col]))
}

fn key(cell: &Data, col: usize) -> Result<[u8; 32], String> {
    base64_cell(cell, col)?
        .try_into()
        .map_err(|_| format!("{} must decode to 32 bytes", HEADER[col]))
}

/// We write a number, but a hand-edited file may hold text or a float.
fn iterations(cell: &Data) -> Result<u32, String> {
    let bad = || format!("{} must be a whole number, found {cell:?}", HEADER[4]);
    match cell {
        Data::Int(i) => u32::try_from(*i).map_err(|_| bad()),
        Data::Float(f) if f.fract() == 0.0 && (0.0..=u32::MAX as f64).contains(f) => Ok(*f as u32),
        Data::String(s) => s.trim().parse().map_err(|_| bad()),
        _ => Err(bad()),
    }
}

/// Serialize the table; every name, timestamp and key is a text cell.
fn to_xlsx(users: &BTreeMap<String, UserRecord>) -> Result<Vec<u8>, rust_xlsxwriter::XlsxError> {
    let mut workbook = Workbook::new();
    let sheet = workbook.add_worksheet();
    sheet.set_name(SHEET)?;
    for (col, title) in (0..).zip(HEADER) {
        sheet.write_string(0, col, title)?;
    }
    for (row, user) in (1..).zip(users.values()) {
        let v = &user.verifier;
        sheet.write_string(row, 0, &user.name)?;
        sheet.write_string(row, 1, &user.registered_at)?;
        if let Some(at) = &user.last_login {
            sheet.write_string(row, 2, at)?;
        }
        sheet.write_string(row, 3, B64.encode(&v.salt))?;
        sheet.write_number(row, 4, v.iterations)?;
        sheet.write_string(row, 5, B64.encode(v.stored_key))?;
        sheet.write_string(row, 6, B64.encode(v.server_key))?;
        if user.disabled {
            sheet.write_string(row, 7, "yes")?;
        }
        if let Some(at) = &user.sessions_after {
            sheet.write_string(row, 8, at)?;
        }
    }
    sheet.autofit();
    workbook.save_to_buffer()
}

/// Distinguishes temp files of concurrent writers in one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Replace `path` atomically: write a temp file next to it, fsync, rename over,
/// fsync the folder. The temp file is removed if anything before the rename fails.
fn save(path: &Path, bytes: &[u8]) -> Result<(), UserTableError> {
    let file_name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} is not a file path", path.display()),
        )
    })?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let temp = dir.join(format!(
        ".{}.tmp-{}-{}",
        file_name.to_string_lossy(),
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    if let Err(e) = write_synced(&temp, bytes).and_then(|()| fs::rename(&temp, path)) {
        let _ = fs::remove_file(&temp);
        return Err(e.into());
    }
    // The new table is already visible; reporting failure now would make the
    // caller's view disagree with the file, so only warn.
    if let Err(e) = sync_dir(dir) {
        tracing::warn!(
            dir = %dir.display(),
            error = %e,
            "cannot fsync folder after replacing the user table"
        );
    }
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    // Verifiers are not passwords, but they are still worth keeping private.
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const SALT: &[u8] = b"0123456789abcdef";

    fn record(name: &str) -> UserRecord {
        UserRecord {
            name: name.to_string(),
            registered_at: "2026-11-23T17:05:49Z".to_string(),
            last_login: None,
            verifier: Verifier::with_salt(name, SALT, MIN_ITERATIONS),
            disabled: false,
            sessions_after: None,
        }
    }

    fn read_cells(path: &Path) -> (Vec<String>, calamine::Range<Data>) {
        let mut workbook: Xlsx<_> = calamine::open_workbook(path).unwrap();
        let range = workbook.worksheet_range(SHEET).unwrap();
        (workbook.sheet_names(), range)
    }

    /// Write a workbook by hand, bypassing UserTable, to test what `open` refuses.
    fn write_sheet(path: &Path, sheet_name: &str, rows: &[Vec<Data>]) {
        let mut workbook = Workbook::new();
        let sheet = workbook.add_worksheet();
        sheet.set_name(sheet_name).unwrap();
        for (r, row) in (0..).zip(rows) {
            for (c, value) in (0..).zip(row) {
                match value {
                    Data::String(s) => sheet.write_string(r, c, s).unwrap(),
                    Data::Float(f) => sheet.write_number(r, c, *f).unwrap(),
                    Data::Bool(b) => sheet.write_boolean(r, c, *b).unwrap(),
                    Data::Empty => sheet,
                    other => panic!("unsupported test cell {other:?}"),
                };
            }
        }
        workbook.save(path).unwrap();
    }

    fn s(text: &str) -> Data {
        Data::String(text.to_string())
    }

    fn header() -> Vec<Data> {
        HEADER.iter().map(|h| s(h)).collect()
    }

    /// A row as written before `disabled` and `sessions_after` existed.
    fn old_row_of(r: &UserRecord) -> Vec<Data> {
        row_of(r)[..OLD_COLUMNS].to_vec()
    }

    fn row_of(r: &UserRecord) -> Vec<Data> {
        vec![
            s(&r.name),
            s(&r.registered_at),
            Data::Empty,
            s(&B64.encode(&r.verifier.salt)),
            Data::Float(r.verifier.iterations.into()),
            s(&B64.encode(r.verifier.stored_key)),
            s(&B64.encode(r.verifier.server_key)),
            Data::Empty,
            Data::Empty,
        ]
    }

    fn assert_unreadable(path: &Path, expected: &str) {
        match UserTable::open(path) {
            Err(UserTableError::Unreadable { path: p, reason }) => {
                assert_eq!(p, path);
                assert!(reason.contains(expected), "{reason:?} lacks {expected:?}");
            }
            Err(e) => panic!("expected Unreadable, got {e}"),
            Ok(_) => panic!("expected Unreadable, got a table"),
        }
    }

    #[test]
    fn table_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<UserTable>();
    }

    #[test]
    fn open_missing_creates_header_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.xlsx");
        let table = UserTable::open(&path).unwrap();
        assert!(table.is_empty());
        let (sheets, range) = read_cells(&path);
        assert_eq!(sheets, [SHEET]);
        assert_eq!(range.get_size(), (1, HEADER.len()));
        for (col, title) in HEADER.iter().enumerate() {
            assert_eq!(range.get_value((0, col as u32)), Some(&s(title)));
        }
        // Reopening the freshly created file works.
        assert!(UserTable::open(&path).unwrap().is_empty());
    }

    #[test]
    fn insert_then_reopen_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.xlsx");
        let table = UserTable::open(&path).unwrap();
        let alice = record("alice");
        let bob = UserRecord {
            last_login: Some("2026-11-24T08:00:00Z".to_string()),
            verifier: Verifier::with_salt("pw", b"other salt", MIN_ITERATIONS + 1),
            ..record("bob")
        };
        table.insert(bob.clone()).unwrap();
        table.insert(alice.clone()).unwrap();
        assert_eq!(table.len(), 2);
        assert_eq!(table.get("alice"), Some(alice.clone()));

        let reopened = UserTable::open(&path).unwrap();
        assert_eq!(reopened.len(), 2);
        assert_eq!(reopened.get("alice"), Some(alice));
        assert_eq!(reopened.get("bob"), Some(bob));
        assert_eq!(reopened.get("carol"), None);
    }

    #[test]
    fn file_holds_text_cells_sorted_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.xlsx");
        let table = UserTable::open(&path).unwrap();
        for name in ["TRUE", "1e5", "00123"] {
            table.insert(record(name)).unwrap();
        }
        let (_, range) = read_cells(&path);
        assert_eq!(range.get_size(), (4, HEADER.len()));
        let cell = |r: u32, c: u32| range.get_value((r, c)).unwrap().clone();
        for (row, name) in [(1, "00123"), (2, "1e5"), (3, "TRUE")] {
            let v = Verifier::with_salt(name, SALT, MIN_ITERATIONS);
            assert_eq!(cell(row, 0), s(name));
            assert_eq!(cell(row, 1), s("2026-11-23T17:05:49Z"));
            assert_eq!(cell(row, 2), Data::Empty);
            assert_eq!(cell(row, 3), s(&B64.encode(SALT)));
            assert!(matches!(cell(row, 4), Data::Float(f) if f == f64::from(MIN_ITERATIONS)));
            assert_eq!(cell(row, 5), s(&B64.encode(v.stored_key)));
            assert_eq!(cell(row, 6), s(&B64.encode(v.server_key)));
            assert_eq!(cell(row, 7), Data::Empty);
            assert_eq!(cell(row, 8), Data::Empty);
        }
    }

    #[test]
    fn duplicate_name_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.xlsx");
        let table = UserTable::open(&path).unwrap();
        table.insert(record("alice")).unwrap();
        let again = UserRecord {
            registered_at: "2027-01-01T00:00:00Z".to_string(),
            ..record("alice")
        };
        assert!(matches!(
            table.insert(again),
            Err(UserTableError::NameTaken)
        ));
        assert_eq!(table.get("alice"), Some(record("alice")));
        assert_eq!(UserTable::open(&path).unwrap().len(), 1);
    }

    #[test]
    fn invalid_records_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let table = UserTable::open(&dir.path().join("users.xlsx")).unwrap();
        let long = "x".repeat(33);
        let bad = [
            record(""),
            record("a b"),
            record("a,b"),
            record("ünï"),
            record(".hidden"),
            record(&long),
            UserRecord {
                registered_at: "yesterday".to_string(),
                ..record("a")
            },
            UserRecord {
                last_login: Some("2026-13-01T00:00:00Z".to_string()),
                ..record("a")
            },
            UserRecord {
                verifier: Verifier::with_salt("pw", SALT, MIN_ITERATIONS - 1),
                ..record("a")
            },
            UserRecord {
                verifier: Verifier::with_salt("pw", b"", MIN_ITERATIONS),
                ..record("a")
            },
        ];
        for r in bad {
            assert!(
                matches!(
                    table.insert(r.clone()),
                    Err(UserTableError::InvalidRecord(_))
                ),
                "{r:?}"
            );
        }
        assert!(table.is_empty());
    }

    #[test]
    fn concurrent_inserts_of_different_names_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.xlsx");
        let table = Arc::new(UserTable::open(&path).unwrap());
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let table = Arc::clone(&table);
                std::thread::spawn(move || table.insert(record(&format!("user{i:02}"))))
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        assert_eq!(table.len(), 16);
        let reopened = UserTable::open(&path).unwrap();
        assert_eq!(reopened.len(), 16);
        for i in 0..16 {
            let name = format!("user{i:02}");
            assert_eq!(reopened.get(&name), Some(record(&name)));
        }
    }

    #[test]
    fn concurrent_inserts_of_same_name_one_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.xlsx");
        let table = UserTable::open(&path).unwrap();
        let results: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|_| scope.spawn(|| table.insert(record("same"))))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
        assert!(results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| matches!(e, UserTableError::NameTaken)));
        assert_eq!(UserTable::open(&path).unwrap().len(), 1);
    }

    #[test]
    fn record_login_is_written_by_flush_or_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.xlsx");
        let table = UserTable::open(&path).unwrap();
        table.insert(record("alice")).unwrap();
        table.insert(record("bob")).unwrap();
        let at = now_iso8601();
        table.record_login("alice", &at).unwrap();
        assert_eq!(table.get("alice").unwrap().last_login, Some(at.clone()));
        assert!(matches!(
            table.record_login("nobody", &at),
            Err(UserTableError::NoSuchUser)
        ));
        assert!(matches!(
            table.record_login("alice", "not a time"),
            Err(UserTableError::InvalidRecord(_))
        ));
        // Memory only until flushed.
        let on_disk = |name: &str| {
            UserTable::open(&path)
                .unwrap()
                .get(name)
                .unwrap()
                .last_login
        };
        assert_eq!(on_disk("alice"), None);
        assert_eq!(table.flush_logins().unwrap(), 1);
        assert_eq!(table.flush_logins().unwrap(), 0);
        assert_eq!(on_disk("alice"), Some(at.clone()));

        // Dropping the table (server shutdown) writes what is pending.
        table.record_login("bob", &at).unwrap();
        drop(table);
        assert_eq!(on_disk("bob"), Some(at));
    }

    #[test]
    fn pending_login_survives_a_reload_but_not_a_new_account() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.xlsx");
        let server = UserTable::open(&path).unwrap();
        server.insert(record("alice")).unwrap();
        server.insert(record("bob")).unwrap();
        let at = now_iso8601();
        server.record_login("alice", &at).unwrap();
        server.record_login("bob", &at).unwrap();
        // Another process (admin) disables alice and re-creates bob.
        let admin = UserTable::open(&path).unwrap();
        admin.set_disabled("alice", true).unwrap();
        admin.remove("bob").unwrap();
        let new_bob = UserRecord {
            registered_at: "2027-01-01T00:00:00Z".to_string(),
            ..record("bob")
        };
        admin.insert(new_bob.clone()).unwrap();
        drop(admin);

        let alice = server.get("alice").unwrap();
        assert!(alice.disabled);
        assert_eq!(alice.last_login, Some(at.clone()));
        assert_eq!(server.get("bob"), Some(new_bob.clone()));
        server.flush_logins().unwrap();
        let reopened = UserTable::open(&path).unwrap();
        assert_eq!(reopened.get("alice").unwrap().last_login, Some(at));
        assert!(reopened.get("alice").unwrap().disabled);
        assert_eq!(reopened.get("bob"), Some(new_bob));
    }

    #[test]
    fn admin_changes_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.xlsx");
        let table = UserTable::open(&path).unwrap();
        table.insert(record("carol")).unwrap();
        table.set_disabled("carol", true).unwrap();
        table
            .revoke_sessions("carol", "2026-12-01T00:00:00Z".to_string())
            .unwrap();
        let verifier = Verifier::with_salt("new", b"new salt 0123456", MIN_ITERATIONS);
        table
            .set_verifier(
                "carol",
                verifier.clone(),
                Some("2026-12-02T00:00:00Z".into()),
            )
            .unwrap();
        let expected = UserRecord {
            disabled: true,
            sessions_after: Some("2026-12-02T00:00:00Z".to_string()),
            verifier,
            ..record("carol")
        };
        assert_eq!(table.get("carol"), Some(expected.clone()));
        let (_, range) = read_cells(&path);
        assert_eq!(range.get_value((1, 7)), Some(&s("yes")));
        assert_eq!(range.get_value((1, 8)), Some(&s("2026-12-02T00:00:00Z")));
        assert_eq!(UserTable::open(&path).unwrap().get("carol"), Some(expected));

        assert!(matches!(
            table.revoke_sessions("carol", "soon".into()),
            Err(UserTableError::InvalidRecord(_))
        ));
        for result in [
            table.set_disabled("nobody", true),
            table.revoke_sessions("nobody", now_iso8601()),
            table.remove("nobody").map(|_| ()),
        ] {
            assert!(matches!(result, Err(UserTableError::NoSuchUser)));
        }
        table.set_disabled("carol", false).unwrap();
        assert_eq!(table.remove("carol").unwrap().name, "carol");
        assert!(UserTable::open(&path).unwrap().is_empty());
    }

    #[test]
    fn old_seven_column_table_loads_and_is_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.xlsx");
        let old_header = header()[..OLD_COLUMNS].to_vec();
        write_sheet(
            &path,
            SHEET,
            &[old_header.clone(), old_row_of(&record("alice"))],
        );
        let table = UserTable::open(&path).unwrap();
        assert_eq!(table.get("alice"), Some(record("alice")));
        table.insert(record("bob")).unwrap();
        let (_, range) = read_cells(&path);
        assert_eq!(range.get_value((0, 8)), Some(&s("sessions_after")));
        assert_eq!(UserTable::open(&path).unwrap().len(), 2);

        // Under the old header, anything beyond its columns is still refused.
        let mut extra = old_row_of(&record("bob"));
        extra.push(s("yes"));
        write_sheet(&path, SHEET, &[old_header, extra]);
        assert_unreadable(&path, "row 2: unexpected value in column 8");
    }

    #[test]
    fn writers_in_two_instances_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.xlsx");
        let tables = [
            UserTable::open(&path).unwrap(),
            UserTable::open(&path).unwrap(),
        ];
        std::thread::scope(|scope| {
            for (t, table) in tables.iter().enumerate() {
                scope.spawn(move || {
                    for i in 0..20 {
                        table.insert(record(&format!("t{t}-{i:02}"))).unwrap();
                    }
                });
            }
        });
        assert_eq!(UserTable::open(&path).unwrap().len(), 40);
        // Each instance sees the other's rows once it looks.
        for table in &tables {
            assert_eq!(table.list().len(), 40);
        }
    }

    #[test]
    fn a_reader_notices_another_writer_and_survives_a_broken_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.xlsx");
        let server = UserTable::open(&path).unwrap();
        server.insert(record("alice")).unwrap();
        let admin = UserTable::open(&path).unwrap();
        admin.set_disabled("alice", true).unwrap();
        assert!(server.get("alice").unwrap().disabled);

        // A broken hand edit: lookups keep the last good version, writes refuse.
        fs::write(&path, b"not a workbook").unwrap();
        assert!(server.reload_if_changed().is_err());
        assert!(server.get("alice").unwrap().disabled);
        assert!(matches!(
            server.insert(record("bob")),
            Err(UserTableError::Unreadable { .. })
        ));
        assert_eq!(fs::read(&path).unwrap(), b"not a workbook");
    }

    #[test]
    fn failed_write_leaves_memory_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.xlsx");
        let table = UserTable::open(&path).unwrap();
        table.insert(record("alice")).unwrap();
        // A non-empty folder where the file was makes the rename fail (even as root).
        fs::remove_file(&path).unwrap();
        fs::create_dir(&path).unwrap();
        fs::write(path.join("keep"), b"x").unwrap();

        assert!(matches!(
            table.insert(record("bob")),
            Err(UserTableError::Io(_))
        ));
        assert!(table.set_disabled("alice", true).is_err());
        assert_eq!(table.get("bob"), None);
        assert_eq!(table.get("alice"), Some(record("alice")));
        assert_eq!(table.len(), 1);
        // No temp files left behind.
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != "users.xlsx" && n != "users.xlsx.lock")
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn garbage_file_is_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.xlsx");
        let mut garbage = vec![0u8; 4096];
        getrandom::fill(&mut garbage).unwrap();
        fs::write(&path, &garbage).unwrap();
        assert_unreadable(&path, "not a readable xlsx workbook");
        assert_eq!(fs::read(&path).unwrap(), garbage);

        fs::write(&path, b"").unwrap();
        assert_unreadable(&path, "not a readable xlsx workbook");
    }

    #[test]
    fn wrong_header_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.xlsx");
        let mut wrong = header();
        wrong[3] = s("salt");
        write_sheet(&path, SHEET, &[wrong]);
        assert_unreadable(&path, "row 1 must be the header");

        write_sheet(&path, SHEET, &[header()[..6].to_vec()]);
        assert_unreadable(&path, "row 1 must be the header");

        write_sheet(&path, SHEET, &[header()[..8].to_vec()]);
        assert_unreadable(&path, "row 1 must be the header");

        write_sheet(&path, SHEET, &[]);
        assert_unreadable(&path, "row 1 must be the header");

        write_sheet(&path, "Sheet1", &[header()]);
        assert_unreadable(&path, "exactly one worksheet");

        let mut extra = header();
        extra.push(s("notes"));
        write_sheet(&path, SHEET, &[extra]);
        assert_unreadable(&path, "row 1: unexpected value in column 10");
    }

    #[test]
    fn bad_rows_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.xlsx");
        let good = row_of(&record("alice"));
        let with = |col: usize, value: Data| {
            let mut row = row_of(&record("bob"));
            row[col] = value;
            row
        };
        let cases = [
            (with(0, Data::Empty), "name is missing"),
            (with(0, Data::Float(123.0)), "name must be a text cell"),
            (with(0, s("bad name")), "bad user name"),
            (with(1, Data::Empty), "registered_at is missing"),
            (with(1, s("2026-11-23")), "timestamp"),
            (with(2, s("later")), "timestamp"),
            (with(3, s("not base64!")), "scram_salt is not valid base64"),
            (
                with(4, s("many")),
                "scram_iterations must be a whole number",
            ),
            (
                with(4, Data::Float(4096.5)),
                "scram_iterations must be a whole number",
            ),
            (with(4, Data::Float(100.0)), "below the minimum"),
            (
                with(4, Data::Empty),
                "scram_iterations must be a whole number",
            ),
            (
                with(5, s(&B64.encode([0u8; 31]))),
                "scram_stored_key must decode to 32 bytes",
            ),
            (with(6, Data::Empty), "scram_server_key is missing"),
            (with(7, s("maybe")), "disabled must be \"yes\" or empty"),
            (with(8, s("tomorrow")), "timestamp"),
            (good.clone(), "row 3: duplicate user name \"alice\""),
        ];
        for (bad, expected) in cases {
            write_sheet(&path, SHEET, &[header(), good.clone(), bad]);
            assert_unreadable(&path, expected);
            assert_unreadable(&path, "row 3");
        }
    }

    #[test]
    fn hand_edited_cells_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.xlsx");
        let mut as_text = row_of(&record("alice"));
        as_text[4] = s("4096");
        let as_number = row_of(&record("bob"));
        let mut flags = row_of(&record("dan"));
        flags[7] = s("No");
        let mut excel_bool = row_of(&record("eve"));
        excel_bool[7] = Data::Bool(true);
        // An emptied row in between is skipped.
        write_sheet(
            &path,
            SHEET,
            &[header(), as_text, vec![], as_number, flags, excel_bool],
        );
        let table = UserTable::open(&path).unwrap();
        assert_eq!(table.get("dan"), Some(record("dan")));
        assert!(table.get("eve").unwrap().disabled);
        assert_eq!(table.get("alice"), Some(record("alice")));
        assert_eq!(table.get("bob"), Some(record("bob")));
    }

    #[test]
    fn leftover_temp_file_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.xlsx");
        UserTable::open(&path)
            .unwrap()
            .insert(record("alice"))
            .unwrap();
        let temp = dir.path().join(".users.xlsx.tmp-1-0");
        fs::write(&temp, b"half a workbook").unwrap();
        let table = UserTable::open(&path).unwrap();
        assert_eq!(table.get("alice"), Some(record("alice")));
        table.insert(record("bob")).unwrap();
        assert_eq!(UserTable::open(&path).unwrap().len(), 2);
    }

    #[cfg(unix)]
    #[test]
    fn file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.xlsx");
        UserTable::open(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn now_is_iso8601_utc_seconds() {
        let now = now_iso8601();
        assert_eq!(now.len(), "2026-11-23T17:05:49Z".len(), "{now}");
        assert!(now.ends_with('Z'));
        assert!(check_timestamp(&now).is_ok());
    }
}
