//! Session tokens: what `netdisk login` saves so later commands need no password.
//!
//! A token is 32 random bytes given to the client once; the server keeps only its SHA-256,
//! so a copy of `sessions.json` lets nobody in. The table is persisted atomically, so
//! logins survive a server restart and `logout` revokes for good.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::durable::write_atomically;
use crate::error::{Error, ErrorCode, Result};

/// How long a login lasts.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Session {
    user: String,
    /// Expiry, seconds since the Unix epoch.
    expires: u64,
}

pub struct SessionStore {
    path: PathBuf,
    /// Keyed by hex SHA-256 of the token. A std mutex: held only for in-memory edits and
    /// the small file write, never across an await.
    sessions: Mutex<HashMap<String, Session>>,
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
            sessions: Mutex::new(sessions),
        })
    }

    /// A new session for `user`; returns the token to give the client.
    pub fn create(&self, user: &str) -> Result<String> {
        let mut token = [0u8; 32];
        getrandom::fill(&mut token).map_err(|e| Error::Invalid(e.to_string()))?;
        let token = hex::encode(token);
        let mut sessions = self.sessions.lock().unwrap();
        let now = unix_now();
        sessions.retain(|_, s| s.expires > now);
        sessions.insert(
            token_key(&token),
            Session {
                user: user.to_string(),
                expires: now + SESSION_LIFETIME.as_secs(),
            },
        );
        self.persist(&sessions)?;
        Ok(token)
    }

    /// The user a valid token belongs to.
    pub fn user_of(&self, token: &str) -> Result<String> {
        let sessions = self.sessions.lock().unwrap();
        match sessions.get(&token_key(token)) {
            Some(session) if session.expires > unix_now() => Ok(session.user.clone()),
            _ => Err(Error::remote(
                ErrorCode::AuthFailed,
                "session expired or logged out: log in again",
            )),
        }
    }

    /// Forget a token (logout). Unknown tokens are fine.
    pub fn revoke(&self, token: &str) -> Result<()> {
        let mut sessions = self.sessions.lock().unwrap();
        if sessions.remove(&token_key(token)).is_some() {
            self.persist(&sessions)?;
        }
        Ok(())
    }

    /// Persist the table; a crash leaves the old or the new one, never half.
    fn persist(&self, sessions: &HashMap<String, Session>) -> Result<()> {
        let bytes = serde_json::to_vec(sessions).map_err(|e| Error::Invalid(e.to_string()))?;
        write_atomically(&self.path, &bytes, 0o600)?;
        Ok(())
    }
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

    #[test]
    fn tokens_survive_reopen_and_revoke_is_permanent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sessions.json");
        let store = SessionStore::open(&path).unwrap();
        let token = store.create("alice").unwrap();
        assert_eq!(store.user_of(&token).unwrap(), "alice");
        assert!(!fs::read_to_string(&path).unwrap().contains(&token));

        let reopened = SessionStore::open(&path).unwrap();
        assert_eq!(reopened.user_of(&token).unwrap(), "alice");
        reopened.revoke(&token).unwrap();
        assert!(SessionStore::open(&path).unwrap().user_of(&token).is_err());
        assert!(reopened.user_of("not-a-token").is_err());
    }
}
