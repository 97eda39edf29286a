//! Session tokens: what `netdisk login` saves so later commands need no password.
//!
//! A token is 32 random bytes given to the client once; the server keeps only its SHA-256,
//! so a copy of `sessions.json` lets nobody in. The table is persisted atomically, so
//! logins survive a server restart and `logout` revokes for good.
//!
//! The file is written outside the table's lock: a change takes a snapshot and a generation
//! number under the lock, then writes under a separate writer lock, skipping the write when
//! a newer generation is already on disk. A slow fsync therefore never stalls `user_of`.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::durable::write_atomically;
use crate::error::{Error, ErrorCode, Result};

/// How long a login lasts.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// Most sessions one user keeps; creating another drops the oldest. Bounds the table (and
/// the file) against a client that logs in in a loop.
pub const MAX_SESSIONS_PER_USER: usize = 64;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Session {
    user: String,
    /// Expiry, seconds since the Unix epoch.
    expires: u64,
    /// Creation, seconds since the Unix epoch; 0 in files written before it was recorded.
    #[serde(default)]
    created: u64,
}

#[derive(Default)]
struct Table {
    /// Keyed by hex SHA-256 of the token.
    sessions: HashMap<String, Session>,
    /// Bumped on every change; tells a writer whether its snapshot is still the newest.
    generation: u64,
}

/// A serialized table and the generation it shows.
struct Snapshot {
    generation: u64,
    bytes: Vec<u8>,
}

pub struct SessionStore {
    path: PathBuf,
    /// A std mutex: held only for in-memory edits and taking a snapshot, never for I/O and
    /// never across an await.
    table: Mutex<Table>,
    /// Serialises file writes; holds the newest generation written so far.
    writer: Mutex<u64>,
}

impl SessionStore {
    /// Load `path` (missing means no sessions). Expired entries are dropped.
    pub fn open(path: &Path) -> Result<SessionStore> {
        let sessions: HashMap<String, Session> = match fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| Error::Invalid(format!("cannot parse {}: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => return Err(e.into()),
        };
        let now = unix_now();
        let sessions = sessions
            .into_iter()
            .filter(|(_, s)| s.expires > now)
            .collect();
        Ok(SessionStore {
            path: path.to_path_buf(),
            table: Mutex::new(Table {
                sessions,
                generation: 0,
            }),
            writer: Mutex::new(0),
        })
    }

    /// A new session for `user`; returns the token to give the client. If `user` already has
    /// [`MAX_SESSIONS_PER_USER`] sessions, the oldest are dropped to make room.
    pub fn create(&self, user: &str) -> Result<String> {
        let mut token = [0u8; 32];
        getrandom::fill(&mut token).map_err(|e| Error::Invalid(e.to_string()))?;
        let token = hex::encode(token);
        let now = unix_now();
        self.change(|sessions| {
            add_session(sessions, user, token_key(&token), now);
            ((), true)
        })?;
        Ok(token)
    }

    /// The user a valid token belongs to.
    pub fn user_of(&self, token: &str) -> Result<String> {
        self.session_of(token).map(|(user, _)| user)
    }

    /// The user a valid token belongs to, and when the session was created (Unix seconds;
    /// 0 for sessions from files written before creation times were recorded).
    pub fn session_of(&self, token: &str) -> Result<(String, u64)> {
        let table = lock(&self.table);
        match table.sessions.get(&token_key(token)) {
            Some(session) if session.expires > unix_now() => {
                Ok((session.user.clone(), session.created))
            }
            _ => Err(Error::remote(
                ErrorCode::AuthFailed,
                "session expired or logged out: log in again",
            )),
        }
    }

    /// Forget a token (logout). Unknown tokens are fine.
    pub fn revoke(&self, token: &str) -> Result<()> {
        let key = token_key(token);
        self.change(|sessions| ((), sessions.remove(&key).is_some()))
    }

    /// Forget every session of `user` (e.g. after a password change); returns how many.
    pub fn revoke_user(&self, user: &str) -> Result<usize> {
        self.revoke_user_sessions(user, None)
    }

    /// Forget every session of `user` but the one `keep_token` names (log out the other
    /// devices); returns how many were forgotten.
    pub fn revoke_user_except(&self, user: &str, keep_token: &str) -> Result<usize> {
        self.revoke_user_sessions(user, Some(token_key(keep_token)))
    }

    fn revoke_user_sessions(&self, user: &str, keep_key: Option<String>) -> Result<usize> {
        self.change(|sessions| {
            let before = sessions.len();
            sessions.retain(|key, s| s.user != user || keep_key.as_ref() == Some(key));
            let revoked = before - sessions.len();
            (revoked, revoked > 0)
        })
    }

    /// Apply `edit` (which returns its result and whether it changed anything) under the
    /// table lock, then persist the change after releasing it.
    fn change<R>(
        &self,
        edit: impl FnOnce(&mut HashMap<String, Session>) -> (R, bool),
    ) -> Result<R> {
        let (result, snapshot) = {
            let mut table = lock(&self.table);
            let (result, changed) = edit(&mut table.sessions);
            if !changed {
                return Ok(result);
            }
            table.generation += 1;
            let bytes =
                serde_json::to_vec(&table.sessions).map_err(|e| Error::Invalid(e.to_string()))?;
            let snapshot = Snapshot {
                generation: table.generation,
                bytes,
            };
            (result, snapshot)
        };
        self.write(snapshot)?;
        Ok(result)
    }

    /// Persist a snapshot unless a newer one is already on disk (it includes this change);
    /// a crash leaves the old file or the new one, never half.
    fn write(&self, snapshot: Snapshot) -> Result<()> {
        let mut written = lock(&self.writer);
        if *written >= snapshot.generation {
            return Ok(());
        }
        write_atomically(&self.path, &snapshot.bytes, 0o600)?;
        *written = snapshot.generation;
        Ok(())
    }
}

/// What the server asks of a session store: a local `sessions.json` ([`SessionStore`]) or
/// objects in a bucket several servers share (`shared_state::BucketSessions`). Calls may do
/// IO: the server makes them from blocking threads.
pub trait Sessions: Send + Sync {
    /// A new session for `user`; returns the token to give the client.
    fn create(&self, user: &str) -> Result<String>;
    /// The user a valid token belongs to and when the session was created (Unix seconds).
    fn session_of(&self, token: &str) -> Result<(String, u64)>;
    /// Forget a token (logout). Unknown tokens are fine.
    fn revoke(&self, token: &str) -> Result<()>;
    /// Forget every session of `user`; returns how many.
    fn revoke_user(&self, user: &str) -> Result<usize>;
    /// Forget every session of `user` but `keep_token`'s; returns how many.
    fn revoke_user_except(&self, user: &str, keep_token: &str) -> Result<usize>;
}

impl Sessions for SessionStore {
    fn create(&self, user: &str) -> Result<String> {
        SessionStore::create(self, user)
    }
    fn session_of(&self, token: &str) -> Result<(String, u64)> {
        SessionStore::session_of(self, token)
    }
    fn revoke(&self, token: &str) -> Result<()> {
        SessionStore::revoke(self, token)
    }
    fn revoke_user(&self, user: &str) -> Result<usize> {
        SessionStore::revoke_user(self, user)
    }
    fn revoke_user_except(&self, user: &str, keep_token: &str) -> Result<usize> {
        SessionStore::revoke_user_except(self, user, keep_token)
    }
}

/// The in-memory part of [`SessionStore::create`]: drop expired sessions and, if `user` is
/// at the cap, their oldest, then add the new one.
fn add_session(sessions: &mut HashMap<String, Session>, user: &str, key: String, now: u64) {
    sessions.retain(|_, s| s.expires > now);
    drop_oldest_sessions(sessions, user, MAX_SESSIONS_PER_USER - 1);
    sessions.insert(
        key,
        Session {
            user: user.to_string(),
            expires: now + SESSION_LIFETIME.as_secs(),
            created: now,
        },
    );
}

/// Drop `user`'s oldest sessions until at most `keep` remain.
fn drop_oldest_sessions(sessions: &mut HashMap<String, Session>, user: &str, keep: usize) {
    let mut own: Vec<(u64, u64, String)> = sessions
        .iter()
        .filter(|(_, s)| s.user == user)
        .map(|(key, s)| (s.created, s.expires, key.clone()))
        .collect();
    if own.len() <= keep {
        return;
    }
    own.sort_unstable();
    let excess = own.len() - keep;
    for (_, _, key) in own.into_iter().take(excess) {
        sessions.remove(&key);
    }
}

/// A poisoned lock means a panic during an in-memory edit of plain data; carrying on beats
/// failing every later login.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn token_key(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, PathBuf, SessionStore) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions.json");
        let store = SessionStore::open(&path).unwrap();
        (dir, path, store)
    }

    #[test]
    fn tokens_survive_reopen_and_revoke_is_permanent() {
        let (_dir, path, store) = store();
        let token = store.create("alice").unwrap();
        assert_eq!(store.user_of(&token).unwrap(), "alice");
        assert!(!fs::read_to_string(&path).unwrap().contains(&token));

        let reopened = SessionStore::open(&path).unwrap();
        assert_eq!(reopened.user_of(&token).unwrap(), "alice");
        reopened.revoke(&token).unwrap();
        assert!(SessionStore::open(&path).unwrap().user_of(&token).is_err());
        assert!(reopened.user_of("not-a-token").is_err());
    }

    #[test]
    fn session_of_gives_user_and_creation_time_which_survive_reopen() {
        let (_dir, path, store) = store();
        let before = unix_now();
        let token = store.create("alice").unwrap();
        let (user, created) = store.session_of(&token).unwrap();
        assert_eq!(user, "alice");
        assert!(created >= before && created <= unix_now(), "{created}");
        let reopened = SessionStore::open(&path).unwrap();
        assert_eq!(reopened.session_of(&token).unwrap(), (user, created));
        assert!(store.session_of("not-a-token").is_err());
    }

    #[test]
    fn files_without_creation_times_load_with_zero() {
        let (_dir, path, _) = store();
        let token = "old-token";
        let expires = unix_now() + 3600;
        let old_file = format!(
            r#"{{"{}":{{"user":"bob","expires":{expires}}}}}"#,
            token_key(token)
        );
        fs::write(&path, old_file).unwrap();
        let store = SessionStore::open(&path).unwrap();
        assert_eq!(store.session_of(token).unwrap(), ("bob".to_string(), 0));
    }

    #[test]
    fn sessions_per_user_are_capped_dropping_the_oldest() {
        let (_dir, path, store) = store();
        let other = store.create("bob").unwrap();
        // The sessions created within one second tie on `created`, so make the first one
        // visibly the oldest: it must be the one to go.
        let oldest = store.create("alice").unwrap();
        lock(&store.table)
            .sessions
            .get_mut(&token_key(&oldest))
            .unwrap()
            .created = 1;
        let mut tokens: Vec<String> = (1..MAX_SESSIONS_PER_USER)
            .map(|_| store.create("alice").unwrap())
            .collect();
        assert_eq!(store.user_of(&oldest).unwrap(), "alice", "64 fit");
        tokens.push(store.create("alice").unwrap());
        assert!(store.user_of(&oldest).is_err(), "the 65th drops the oldest");
        for token in &tokens {
            assert_eq!(store.user_of(token).unwrap(), "alice");
        }
        assert_eq!(
            store.user_of(&other).unwrap(),
            "bob",
            "other users keep theirs"
        );

        let small = fs::metadata(&path).unwrap().len();
        // 10,000 logins, without 10,000 fsyncs (minutes of test time): the in-memory part
        // of create, then one real create writes the file.
        {
            let mut table = lock(&store.table);
            for i in 0..10_000 {
                add_session(
                    &mut table.sessions,
                    "alice",
                    token_key(&i.to_string()),
                    unix_now(),
                );
            }
        }
        store.create("alice").unwrap();
        let alice_sessions = lock(&store.table)
            .sessions
            .values()
            .filter(|s| s.user == "alice")
            .count();
        assert_eq!(alice_sessions, MAX_SESSIONS_PER_USER);
        // Still 65 sessions of ~150 bytes each; without the cap it would be ~1.5 MB.
        let size = fs::metadata(&path).unwrap().len();
        assert!(size <= small + 1024, "{size} bytes, was {small}");
        let reopened = SessionStore::open(&path).unwrap();
        assert_eq!(
            reopened.revoke_user("alice").unwrap(),
            MAX_SESSIONS_PER_USER
        );
    }

    #[test]
    fn revoke_user_forgets_all_of_that_users_sessions_only() {
        let (_dir, path, store) = store();
        let alice = [
            store.create("alice").unwrap(),
            store.create("alice").unwrap(),
        ];
        let bob = store.create("bob").unwrap();
        assert_eq!(store.revoke_user("alice").unwrap(), 2);
        assert_eq!(store.revoke_user("alice").unwrap(), 0);
        let reopened = SessionStore::open(&path).unwrap();
        for token in &alice {
            assert!(reopened.user_of(token).is_err());
        }
        assert_eq!(reopened.user_of(&bob).unwrap(), "bob");
    }

    #[test]
    fn revoke_user_except_keeps_the_named_session() {
        let (_dir, path, store) = store();
        let keep = store.create("alice").unwrap();
        let others = [
            store.create("alice").unwrap(),
            store.create("alice").unwrap(),
        ];
        let bob = store.create("bob").unwrap();
        // Another user's token does not protect anything of alice's, nor is it revoked.
        assert_eq!(store.revoke_user_except("alice", &keep).unwrap(), 2);
        let reopened = SessionStore::open(&path).unwrap();
        assert_eq!(reopened.user_of(&keep).unwrap(), "alice");
        for token in &others {
            assert!(reopened.user_of(token).is_err());
        }
        assert_eq!(reopened.revoke_user_except("alice", &bob).unwrap(), 1);
        assert_eq!(reopened.user_of(&bob).unwrap(), "bob");
    }

    #[test]
    fn lookups_do_not_wait_for_the_file_writer() {
        let (_dir, _path, store) = store();
        let token = store.create("alice").unwrap();
        // A write in progress holds the writer lock; a lookup must not need it. (If it did,
        // this would deadlock rather than pass.)
        let _writing = lock(&store.writer);
        assert_eq!(store.user_of(&token).unwrap(), "alice");
    }

    #[test]
    fn an_older_snapshot_never_overwrites_a_newer_one() {
        let (_dir, path, store) = store();
        store.create("alice").unwrap();
        let newest = fs::read(&path).unwrap();
        let stale = Snapshot {
            generation: 0,
            bytes: b"{}".to_vec(),
        };
        store.write(stale).unwrap();
        assert_eq!(fs::read(&path).unwrap(), newest);
    }

    #[test]
    fn concurrent_changes_all_reach_the_file() {
        let (_dir, path, store) = store();
        let tokens: Vec<String> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let store = &store;
                    scope.spawn(move || store.create(&format!("user{i}")).unwrap())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let reopened = SessionStore::open(&path).unwrap();
        for (i, token) in tokens.iter().enumerate() {
            assert_eq!(reopened.user_of(token).unwrap(), format!("user{i}"));
        }
    }
}
