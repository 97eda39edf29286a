//! The user table, kept in one Excel file (ROOT/users.xlsx) as the owner asked.
//!
//! Layout: one worksheet `users` with the header row [`HEADER`] and one row per
//! user, sorted by name. Names, timestamps and keys are text cells so Excel never
//! turns a name like `00123` or `TRUE` into something else. The file holds SCRAM
//! verifiers only, never passwords.
//!
//! Every change rewrites the whole file atomically (temp file, fsync, rename,
//! fsync of the folder), so a crash leaves either the old or the new table.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use calamine::{Data, Reader, Xlsx};
use rust_xlsxwriter::Workbook;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::durable::sync_dir;
use crate::names::check_user_name;
use crate::scram::{Verifier, MIN_ITERATIONS};

/// Name of the only worksheet.
pub const SHEET: &str = "users";
/// The header row, exactly.
pub const HEADER: [&str; 7] = [
    "name",
    "registered_at",
    "last_login",
    "scram_salt",
    "scram_iterations",
    "scram_stored_key",
    "scram_server_key",
];

/// One user as stored in the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserRecord {
    pub name: String,
    /// ISO 8601 UTC, e.g. `2026-11-23T17:05:49Z`.
    pub registered_at: String,
    pub last_login: Option<String>,
    pub verifier: Verifier,
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
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Current time in UTC, second precision, `Z` suffix.
pub fn now_iso8601() -> String {
    let now = OffsetDateTime::now_utc();
    let now = now.replace_nanosecond(0).unwrap_or(now);
    now.format(&Rfc3339)
        .expect("a UTC time of this era is always formattable")
}

/// All users in memory, persisted to one xlsx file. Cheap lookups; every change
/// rewrites the file atomically.
pub struct UserTable {
    path: PathBuf,
    /// The current table. Held only for lookups and the final swap, never during
    /// file IO, so `get` stays cheap enough to call from async code.
    users: Mutex<BTreeMap<String, UserRecord>>,
    /// Held for a whole change (check, write, swap): writers are serialized, so
    /// two never race on the file and a name check cannot go stale before its write.
    writer: Mutex<()>,
}

impl UserTable {
    /// Open the table at `path`. A missing file gives an empty table and creates
    /// the file (header row only). A file that exists but cannot be parsed is an
    /// error: better to refuse to start than to start empty and lose every user.
    pub fn open(path: &Path) -> Result<UserTable, UserTableError> {
        let users = match fs::read(path) {
            Ok(bytes) => parse(&bytes).map_err(|reason| UserTableError::Unreadable {
                path: path.to_path_buf(),
                reason,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let empty = BTreeMap::new();
                save(path, &empty)?;
                empty
            }
            Err(e) => return Err(e.into()),
        };
        Ok(UserTable {
            path: path.to_path_buf(),
            users: Mutex::new(users),
            writer: Mutex::new(()),
        })
    }

    pub fn get(&self, name: &str) -> Option<UserRecord> {
        self.lock().get(name).cloned()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Insert a new user and persist before returning. Of concurrent inserts of
    /// the same name exactly one wins; the others get `NameTaken`.
    pub fn insert(&self, record: UserRecord) -> Result<(), UserTableError> {
        validate(&record).map_err(UserTableError::InvalidRecord)?;
        self.update(|users| {
            if users.contains_key(&record.name) {
                return Err(UserTableError::NameTaken);
            }
            users.insert(record.name.clone(), record);
            Ok(())
        })
    }

    /// Set `last_login` and persist.
    pub fn record_login(&self, name: &str, at: &str) -> Result<(), UserTableError> {
        check_timestamp(at).map_err(UserTableError::InvalidRecord)?;
        self.update(|users| {
            let user = users.get_mut(name).ok_or(UserTableError::NoSuchUser)?;
            user.last_login = Some(at.to_string());
            Ok(())
        })
    }

    /// Apply `change` to a copy, write the copy, and only then make it current:
    /// a failed write leaves memory as it was (this is the rollback).
    fn update(
        &self,
        change: impl FnOnce(&mut BTreeMap<String, UserRecord>) -> Result<(), UserTableError>,
    ) -> Result<(), UserTableError> {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = self.lock().clone();
        change(&mut next)?;
        save(&self.path, &next)?;
        *self.lock() = next;
        Ok(())
    }

    /// The map is only ever replaced whole (see `update`), so a panic elsewhere
    /// cannot have left it half-changed and a poisoned lock is safe to use.
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, UserRecord>> {
        self.users.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Everything `parse` would refuse, so a record we write can always be read back.
fn validate(record: &UserRecord) -> Result<(), String> {
    check_user_name(&record.name).map_err(|e| e.to_string())?;
    check_timestamp(&record.registered_at)?;
    if let Some(at) = &record.last_login {
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

    let header_ok = HEADER
        .iter()
        .enumerate()
        .all(|(col, title)| matches!(cell(0, col), Data::String(s) if s == title));
    let Some((last_row, last_col)) = range.end().filter(|_| header_ok) else {
        return Err(format!("row 1 must be the header: {}", HEADER.join(" | ")));
    };

    let mut users = BTreeMap::new();
    for row in 0..=last_row {
        if let Some(col) =
            (HEADER.len() as u32..=last_col).find(|&c| !is_blank(cell(row, c as usize)))
        {
            return Err(format!(
                "row {}: unexpected value in column {} (only {} columns are used)",
                row + 1,
                col + 1,
                HEADER.len()
            ));
        }
        if row == 0 {
            continue;
        }
        let cells: Vec<&Data> = (0..HEADER.len()).map(|col| cell(row, col)).collect();
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
    }
    sheet.autofit();
    workbook.save_to_buffer()
}

/// Distinguishes temp files of concurrent writers in one process.
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Replace `path` atomically: write a temp file next to it, fsync, rename over,
/// fsync the folder. The temp file is removed if anything before the rename fails.
fn save(path: &Path, users: &BTreeMap<String, UserRecord>) -> Result<(), UserTableError> {
    let bytes = to_xlsx(users)?;
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
    if let Err(e) = write_synced(&temp, &bytes).and_then(|()| fs::rename(&temp, path)) {
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

    fn row_of(r: &UserRecord) -> Vec<Data> {
        vec![
            s(&r.name),
            s(&r.registered_at),
            Data::Empty,
            s(&B64.encode(&r.verifier.salt)),
            Data::Float(r.verifier.iterations.into()),
            s(&B64.encode(r.verifier.stored_key)),
            s(&B64.encode(r.verifier.server_key)),
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
    fn record_login_persists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.xlsx");
        let table = UserTable::open(&path).unwrap();
        table.insert(record("alice")).unwrap();
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
        let reopened = UserTable::open(&path).unwrap();
        assert_eq!(reopened.get("alice").unwrap().last_login, Some(at));
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
        assert!(table.record_login("alice", &now_iso8601()).is_err());
        assert_eq!(table.get("bob"), None);
        assert_eq!(table.get("alice"), Some(record("alice")));
        assert_eq!(table.len(), 1);
        // No temp files left behind.
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n != "users.xlsx")
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

        write_sheet(&path, SHEET, &[]);
        assert_unreadable(&path, "row 1 must be the header");

        write_sheet(&path, "Sheet1", &[header()]);
        assert_unreadable(&path, "exactly one worksheet");

        let mut extra = header();
        extra.push(s("notes"));
        write_sheet(&path, SHEET, &[extra]);
        assert_unreadable(&path, "row 1: unexpected value in column 8");
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
        // An emptied row in between is skipped.
        write_sheet(&path, SHEET, &[header(), as_text, vec![], as_number]);
        let table = UserTable::open(&path).unwrap();
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
