//! What several servers on one bucket share, besides the files (feature `s3`):
//!
//! - `users.xlsx`: the user table as one object, replaced with If-Match on its ETag (or
//!   created with If-None-Match), retried by [`UserTable`] on conflict ([`BucketTable`]).
//! - `sessions/USER/SHA256`: one object per session ([`BucketSessions`]). Every lookup
//!   reads the bucket, so a session made on one server resumes on any other, and a logout
//!   (delete) or a password change (`sessions_after` in users.xlsx) ends it everywhere.
//! - `server.secret`: the secret the fake SCRAM salts derive from, so every server answers
//!   an unknown name alike; `tls/self-signed.pem`: the self-signed certificate and its
//!   key, so a client pinning a fingerprint sees one server behind a load balancer. Both
//!   are created once with If-None-Match; a server that loses the race reads the winner's.
//!
//! The callers are synchronous and run on blocking threads (as they do for the local
//! files); the requests themselves run on one small runtime of this module's own, so they
//! make progress whatever runtime (or none) the caller belongs to.

use std::future::Future;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opendal::{ErrorKind, Operator};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, ErrorCode, Result};
use crate::names::check_user_name;
use crate::objstore::ObjectStoreConfig;

/// Tries to read one consistent version of users.xlsx while other servers replace it.
const LOAD_ATTEMPTS: u32 = 30;
use crate::sessions::{Sessions, MAX_SESSIONS_PER_USER, SESSION_LIFETIME};
use crate::users::{SaveError, TableStore, TableVersion, UserTableError};

/// The longest one request may take (a hung bucket must not hang logins forever).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const TABLE: &str = "users.xlsx";
const SECRET: &str = "server.secret";
const TLS_PEM: &str = "tls/self-signed.pem";

/// The bucket (under its prefix) as the servers' shared state.
#[derive(Clone)]
pub struct StateBucket {
    op: Operator,
    url: String,
}

impl StateBucket {
    pub fn open(config: &ObjectStoreConfig) -> Result<StateBucket> {
        Ok(StateBucket {
            op: config.operator()?,
            url: config.url(),
        })
    }

    /// Run one request to completion on this module's runtime, within the timeout.
    fn run<T: Send + 'static>(
        &self,
        what: &str,
        request: impl Future<Output = opendal::Result<T>> + Send + 'static,
    ) -> std::result::Result<T, opendal::Error> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        runtime().spawn(async move {
            let out = match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
                Ok(out) => out,
                Err(_) => Err(opendal::Error::new(ErrorKind::Unexpected, "timed out")),
            };
            let _ = tx.send(out);
        });
        rx.recv().unwrap_or_else(|_| {
            Err(opendal::Error::new(
                ErrorKind::Unexpected,
                format!("{what}: the request task failed"),
            ))
        })
    }

    fn failed(&self, path: &str, e: opendal::Error) -> Error {
        Error::Invalid(format!("{}/{path}: {e}", self.url))
    }

    /// The object at `path`, created with `make()` if missing. Of servers starting
    /// together exactly one creates it (If-None-Match); the others read the winner's.
    pub fn create_once(
        &self,
        path: &str,
        make: impl FnOnce() -> Result<Vec<u8>>,
    ) -> Result<Vec<u8>> {
        if let Some(bytes) = self.read(path)? {
            return Ok(bytes);
        }
        let made = make()?;
        let (op, key, body) = (self.op.clone(), path.to_string(), made.clone());
        let created = self.run(path, async move {
            op.write_with(&key, body).if_not_exists(true).await
        });
        match created {
            Ok(_) => Ok(made),
            Err(e) if e.kind() == ErrorKind::ConditionNotMatch => self
                .read(path)?
                .ok_or_else(|| Error::Invalid(format!("{}/{path} vanished", self.url))),
            Err(e) => Err(self.failed(path, e)),
        }
    }

    fn read(&self, path: &str) -> Result<Option<Vec<u8>>> {
        let (op, key) = (self.op.clone(), path.to_string());
        match self.run(path, async move { op.read(&key).await }) {
            Ok(buffer) => Ok(Some(buffer.to_vec())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.failed(path, e)),
        }
    }

    /// The server secret shared by every server on this bucket (32 random bytes).
    pub fn secret(&self) -> Result<Vec<u8>> {
        let secret = self.create_once(SECRET, || {
            let mut secret = vec![0u8; 32];
            getrandom::fill(&mut secret).map_err(|e| Error::Invalid(e.to_string()))?;
            Ok(secret)
        })?;
        if secret.len() < 32 {
            return Err(Error::Invalid(format!(
                "{}/{SECRET} is too short",
                self.url
            )));
        }
        Ok(secret)
    }

    /// The self-signed certificate (PEM) and its key (PEM), one object so they always match.
    pub fn self_signed_tls(&self) -> Result<crate::tls::ServerTls> {
        let pem = self.create_once(TLS_PEM, || {
            let (cert, key) = crate::tls::make_self_signed()?;
            Ok(format!("{cert}{key}").into_bytes())
        })?;
        // rustls-pki-types picks the certificates and the key out of the same PEM text.
        crate::tls::server_tls_from_pem(&pem, &pem, &format!("{}/{TLS_PEM}", self.url))
    }
}

/// One small runtime for every request of this module, alive for the whole process.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("netdisk-bucket-state")
            .enable_all()
            .build()
            .expect("cannot start the runtime for bucket requests")
    })
}

/// `users.xlsx` as an object in the bucket, versioned by its ETag.
pub struct BucketTable {
    bucket: StateBucket,
}

impl BucketTable {
    pub fn new(bucket: StateBucket) -> BucketTable {
        BucketTable { bucket }
    }

    fn failed(&self, e: opendal::Error) -> UserTableError {
        UserTableError::Bucket(format!("{}/{TABLE}: {e}", self.bucket.url))
    }

    fn etag(&self, meta: &opendal::Metadata) -> Result<TableVersion, UserTableError> {
        meta.etag()
            .map(|etag| TableVersion(etag.to_string()))
            .ok_or_else(|| {
                UserTableError::Bucket(format!(
                    "{}/{TABLE}: the server sent no ETag (conditional writes need one)",
                    self.bucket.url
                ))
            })
    }
}

impl TableStore for BucketTable {
    fn location(&self) -> PathBuf {
        PathBuf::from(format!("{}/{TABLE}", self.bucket.url))
    }

    fn lock(&self) -> Result<Option<std::fs::File>, UserTableError> {
        Ok(None)
    }

    fn version(&self) -> Result<Option<TableVersion>, UserTableError> {
        let op = self.bucket.op.clone();
        match self.bucket.run(TABLE, async move { op.stat(TABLE).await }) {
            Ok(meta) => Ok(Some(self.etag(&meta)?)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.failed(e)),
        }
    }

    /// The bytes read with If-Match on the ETag just seen, so they are that version.
    fn load(&self) -> Result<Option<(TableVersion, Vec<u8>)>, UserTableError> {
        for attempt in 0..LOAD_ATTEMPTS {
            if attempt > 0 {
                // Other servers are writing: give the newest version time to settle.
                std::thread::sleep(crate::users::conflict_pause(attempt));
            }
            let Some(version) = self.version()? else {
                return Ok(None);
            };
            let (op, etag) = (self.bucket.op.clone(), version.0.clone());
            let read = self.bucket.run(
                TABLE,
                async move { op.read_with(TABLE).if_match(&etag).await },
            );
            match read {
                Ok(buffer) => return Ok(Some((version, buffer.to_vec()))),
                // Replaced between the two requests: look again.
                Err(e)
                    if matches!(e.kind(), ErrorKind::ConditionNotMatch | ErrorKind::NotFound) => {}
                Err(e) => return Err(self.failed(e)),
            }
        }
        Err(UserTableError::Busy(LOAD_ATTEMPTS))
    }

    fn save(
        &self,
        bytes: &[u8],
        expected: Option<&TableVersion>,
    ) -> Result<Option<TableVersion>, SaveError> {
        let op = self.bucket.op.clone();
        let body = bytes.to_vec();
        let expected = expected.map(|v| v.0.clone());
        let written = self.bucket.run(TABLE, async move {
            let write = op.write_with(TABLE, body);
            match &expected {
                Some(etag) => write.if_match(etag).await,
                None => write.if_not_exists(true).await,
            }
        });
        match written {
            Ok(meta) => Ok(meta.etag().map(|etag| TableVersion(etag.to_string()))),
            Err(e) if e.kind() == ErrorKind::ConditionNotMatch => Err(SaveError::Conflict),
            Err(e) => Err(SaveError::Failed(self.failed(e))),
        }
    }

    fn is_shared(&self) -> bool {
        true
    }
}

/// Sessions as objects `sessions/USER/SHA256(token)`, holding the creation and expiry
/// times. The token handed out is `USER:HEX` so a lookup finds the object without an
/// index (the user name is no secret to the token's holder); the 256 random bits are.
pub struct BucketSessions {
    bucket: StateBucket,
}

#[derive(Serialize, Deserialize)]
struct SessionObject {
    created: u64,
    expires: u64,
}

impl BucketSessions {
    pub fn new(bucket: StateBucket) -> BucketSessions {
        BucketSessions { bucket }
    }

    fn failed(&self, e: opendal::Error) -> Error {
        Error::remote(
            ErrorCode::Internal,
            format!("sessions in {}: {e}", self.bucket.url),
        )
    }

    /// `(user, object key)` of a well-formed token.
    fn key_of(token: &str) -> Option<(String, String)> {
        let (user, secret) = token.rsplit_once(':')?;
        check_user_name(user).ok()?;
        Some((user.to_string(), session_key(user, secret)))
    }

    /// The user's session objects: (key, creation time as the bucket saw it).
    fn list_user(&self, user: &str) -> Result<Vec<(String, u64)>> {
        let (op, dir) = (self.bucket.op.clone(), format!("sessions/{user}/"));
        let entries = match self
            .bucket
            .run("sessions", async move { op.list(&dir).await })
        {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.failed(e)),
        };
        Ok(entries
            .into_iter()
            .filter(|entry| !entry.path().ends_with('/'))
            .map(|entry| {
                let created = entry
                    .metadata()
                    .last_modified()
                    .map(|at| at.into_inner().as_second().max(0) as u64)
                    .unwrap_or(0);
                (entry.path().to_string(), created)
            })
            .collect())
    }

    fn delete(&self, keys: Vec<String>) -> Result<usize> {
        let count = keys.len();
        for key in keys {
            let op = self.bucket.op.clone();
            self.bucket
                .run("sessions", async move { op.delete(&key).await })
                .map_err(|e| self.failed(e))?;
        }
        Ok(count)
    }

    fn revoke_user_sessions(&self, user: &str, keep: Option<String>) -> Result<usize> {
        let doomed = self
            .list_user(user)?
            .into_iter()
            .map(|(key, _)| key)
            .filter(|key| keep.as_ref() != Some(key))
            .collect();
        self.delete(doomed)
    }
}

impl Sessions for BucketSessions {
    /// One list and one write (and the deletion of expired or excess sessions).
    fn create(&self, user: &str) -> Result<String> {
        check_user_name(user)?;
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| Error::Invalid(e.to_string()))?;
        let secret = hex::encode(secret);
        let now = unix_now();
        // Keep the newest MAX - 1 unexpired ones, so with the new one there are at most MAX.
        let mut own = self.list_user(user)?;
        own.sort_by_key(|(key, created)| (std::cmp::Reverse(*created), key.clone()));
        let lifetime = SESSION_LIFETIME.as_secs();
        let doomed = own
            .into_iter()
            .enumerate()
            .filter(|(i, (_, created))| {
                *i >= MAX_SESSIONS_PER_USER - 1 || created + lifetime <= now
            })
            .map(|(_, (key, _))| key)
            .collect();
        self.delete(doomed)?;
        let body = serde_json::to_vec(&SessionObject {
            created: now,
            expires: now + lifetime,
        })
        .map_err(|e| Error::Invalid(e.to_string()))?;
        let (op, key) = (self.bucket.op.clone(), session_key(user, &secret));
        self.bucket
            .run("sessions", async move { op.write(&key, body).await })
            .map_err(|e| self.failed(e))?;
        Ok(format!("{user}:{secret}"))
    }

    fn session_of(&self, token: &str) -> Result<(String, u64)> {
        let refused = || {
            Error::remote(
                ErrorCode::AuthFailed,
                "session expired or logged out: log in again",
            )
        };
        let (user, key) = Self::key_of(token).ok_or_else(refused)?;
        let op = self.bucket.op.clone();
        let bytes = match self
            .bucket
            .run("sessions", async move { op.read(&key).await })
        {
            Ok(buffer) => buffer.to_vec(),
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(refused()),
            Err(e) => return Err(self.failed(e)),
        };
        let session: SessionObject = serde_json::from_slice(&bytes).map_err(|_| refused())?;
        if session.expires <= unix_now() {
            return Err(refused());
        }
        Ok((user, session.created))
    }

    fn revoke(&self, token: &str) -> Result<()> {
        if let Some((_, key)) = Self::key_of(token) {
            self.delete(vec![key])?;
        }
        Ok(())
    }

    fn revoke_user(&self, user: &str) -> Result<usize> {
        self.revoke_user_sessions(user, None)
    }

    fn revoke_user_except(&self, user: &str, keep_token: &str) -> Result<usize> {
        let keep = Self::key_of(keep_token).map(|(_, key)| key);
        self.revoke_user_sessions(user, keep)
    }
}

/// Only the hash of the secret part is stored: a copy of the bucket lets nobody in.
fn session_key(user: &str, secret: &str) -> String {
    format!(
        "sessions/{user}/{}",
        hex::encode(Sha256::digest(secret.as_bytes()))
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
