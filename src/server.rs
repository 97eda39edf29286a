//! The server: accept loop, connection limit, and one [`Handler`] per connection that
//! dispatches commands. Sessions and authentication state live here; file contents are
//! the business of [`crate::storage`], user records of [`crate::users`].

use std::io::{Read, Seek, SeekFrom, Write};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{error, info, warn};

use crate::conncheck;
use crate::digest::{ChunkHash, CHUNK_SIZE};
use crate::error::{Error, ErrorCode, Result};
use crate::names::check_user_name;
use crate::protocol::{
    parse_request, AuthReply, Connection, Done, GetReply, HelloReply, ListReply, PutReply, Request,
    UserReply, IO_BUFFER_SIZE, PROTOCOL_VERSION,
};
use crate::scram::{self, ServerFirst, Verifier};
use crate::sessions::SessionStore;
use crate::storage::{iso8601, Durability, FileReader, LocalStorage, StagedUpload, Storage};
use crate::throttle::LoginThrottle;
use crate::tls::{self, ServerTls};
use crate::transfer::{receive_body, send_body, BodySink, BodySource};
use crate::users::{now_iso8601, unix_seconds, UserRecord, UserTable, UserTableError};

/// Uploads up to this size that start from 0 are made durable in batches: one
/// file-system sync for many files before their acknowledgments leave (group commit).
const GROUP_COMMIT_FILE_MAX: u64 = 1024 * 1024;
/// Most acknowledgments held back for one group commit.
const GROUP_COMMIT_MAX: usize = 64;

/// Server settings; [`ServerConfig::new`] gives the defaults.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: String,
    pub root: PathBuf,
    /// Connections served at once; more are refused with a `too_many_requests` reply.
    pub max_connections: usize,
    /// Time a new connection has to send its `hello`.
    pub handshake_timeout: Duration,
    /// An idle connection (no complete request) is closed after this long.
    pub idle_timeout: Duration,
    /// Staged uploads idle for longer are deleted.
    pub partial_max_idle: Duration,
    /// Transport security.
    pub tls: TlsSetting,
    /// Shared secret of the optional connection check (`--secret-file`).
    pub secret: Option<Vec<u8>>,
    /// Most bytes each user may store (`--quota`); `None` is unlimited.
    pub quota: Option<u64>,
}

/// Where the server's TLS certificate comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsSetting {
    /// Plain TCP (`--no-tls`).
    Off,
    /// A self-signed certificate made on first start in `ROOT/tls/`.
    SelfSigned,
    /// A real certificate chain and its key (PEM).
    Files { cert: PathBuf, key: PathBuf },
}

impl ServerConfig {
    pub fn new(listen: impl Into<String>, root: impl Into<PathBuf>) -> ServerConfig {
        ServerConfig {
            listen: listen.into(),
            root: root.into(),
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            partial_max_idle: Duration::from_secs(24 * 3600),
            tls: TlsSetting::SelfSigned,
            secret: None,
            quota: None,
        }
    }
}

/// State shared by all connections.
struct Shared {
    users: UserTable,
    sessions: SessionStore,
    storage: Arc<dyn Storage>,
    /// Server secret: derives fake SCRAM salts for unknown users.
    secret: Vec<u8>,
    tls: Option<ServerTls>,
    throttle: LoginThrottle,
    config: ServerConfig,
}

pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
    /// ROOT/netdisk.lock, held while this server serves (released when `run` returns,
    /// even if connections still hold the shared state, so a restart can take it).
    _root_lock: crate::rootlock::RootLock,
}

impl Server {
    /// Open (or create) the data root and bind the listening socket. Fails rather than
    /// start with a users.xlsx it cannot read.
    pub async fn bind(config: ServerConfig) -> Result<Server> {
        let root = config.root.clone();
        let (root_lock, shared) = tokio::task::spawn_blocking(move || {
            let lock = crate::rootlock::acquire(&root)?;
            Ok::<_, Error>((lock, open_root(&root, config)?))
        })
        .await
        .map_err(|e| Error::Invalid(e.to_string()))??;
        let listener = TcpListener::bind(&shared.config.listen)
            .await
            .map_err(|e| {
                Error::Invalid(format!("cannot listen on {}: {e}", shared.config.listen))
            })?;
        let shared = Arc::new(shared);
        // Logins are recorded in memory; write them every minute (and at drop).
        let weak = Arc::downgrade(&shared);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                let Some(shared) = weak.upgrade() else { return };
                match tokio::task::spawn_blocking(move || shared.users.flush_logins()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => warn!(error = %e, "cannot write last logins to the user table"),
                    Err(e) => warn!(error = %e, "cannot write last logins to the user table"),
                }
            }
        });
        Ok(Server {
            listener,
            shared,
            _root_lock: root_lock,
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// The SHA-256 fingerprint of the TLS certificate (`None` without TLS).
    pub fn fingerprint(&self) -> Option<&str> {
        self.shared.tls.as_ref().map(|tls| tls.fingerprint.as_str())
    }

    /// Serve until `shutdown` completes. Connections in progress are left to finish.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        info!(
            addr = %self.local_addr()?,
            root = %self.shared.config.root.display(),
            users = self.shared.users.len(),
            tls = self.fingerprint().unwrap_or("off (--no-tls)"),
            secret_check = self.shared.config.secret.is_some(),
            "netdisk server listening"
        );
        let expiry = spawn_partial_expiry(self.shared.clone());
        let limit = Arc::new(Semaphore::new(self.shared.config.max_connections));
        tokio::pin!(shutdown);
        loop {
            let (socket, peer) = tokio::select! {
                _ = &mut shutdown => {
                    info!("shutting down");
                    expiry.abort();
                    return Ok(());
                }
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = socket.set_nodelay(true);
            let shared = self.shared.clone();
            let permit = limit.clone().try_acquire_owned();
            tokio::spawn(async move {
                let Some(conn) = open_connection(socket, peer, &shared).await else {
                    return;
                };
                match permit {
                    Ok(_permit) => Handler::new(conn, peer, shared).run().await,
                    Err(_) => refuse_busy(conn, peer).await,
                }
            });
        }
    }
}

/// Open the root folder: storage areas, users.xlsx, sessions, the server secret.
fn open_root(root: &Path, config: ServerConfig) -> Result<Shared> {
    std::fs::create_dir_all(root)
        .map_err(|e| Error::Invalid(format!("cannot create {}: {e}", root.display())))?;
    let users =
        UserTable::open(&root.join("users.xlsx")).map_err(|e| Error::Invalid(e.to_string()))?;
    let sessions = SessionStore::open(&root.join("sessions.json"))?;
    let storage: Arc<dyn Storage> = Arc::new(LocalStorage::open(root)?);
    let secret = load_or_create_secret(&root.join("server.secret"))?;
    let tls = match &config.tls {
        TlsSetting::Off => None,
        TlsSetting::SelfSigned => Some(tls::server_tls(root, None)?),
        TlsSetting::Files { cert, key } => Some(tls::server_tls(root, Some((cert, key)))?),
    };
    Ok(Shared {
        users,
        sessions,
        storage,
        secret,
        tls,
        throttle: LoginThrottle::default(),
        config,
    })
}

/// The server secret: 32 random bytes made on first start, readable by the owner only.
fn load_or_create_secret(path: &Path) -> Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(secret) if secret.len() >= 32 => return Ok(secret),
        Ok(_) => return Err(Error::Invalid(format!("{} is too short", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let mut secret = vec![0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| Error::Invalid(e.to_string()))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(&secret)?;
    file.sync_all()?;
    Ok(secret)
}

fn spawn_partial_expiry(shared: Arc<Shared>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let max_idle = shared.config.partial_max_idle;
        let every = (max_idle / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600));
        loop {
            let storage = shared.storage.clone();
            match tokio::task::spawn_blocking(move || storage.expire_partials(max_idle)).await {
                Ok(Ok(0)) => {}
                Ok(Ok(n)) => info!(expired = n, "deleted stale partial uploads"),
                Ok(Err(e)) => warn!(error = %e, "expiring partial uploads failed"),
                Err(e) => warn!(error = %e, "expiring partial uploads failed"),
            }
            tokio::time::sleep(every).await;
        }
    })
}

/// TLS handshake and the optional connection check, within the handshake timeout.
/// `None` (and the connection closed without a word) when either fails.
async fn open_connection(
    socket: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
) -> Option<Connection> {
    let timeout = shared.config.handshake_timeout;
    let mut conn = match &shared.tls {
        Some(tls) => match tokio::time::timeout(timeout, tls.acceptor.accept(socket)).await {
            Ok(Ok(stream)) => Connection::new(stream),
            Ok(Err(e)) => {
                info!(%peer, error = %e, "TLS handshake failed");
                return None;
            }
            Err(_) => {
                info!(%peer, "TLS handshake timed out");
                return None;
            }
        },
        None => Connection::new(socket),
    };
    if let Some(secret) = &shared.config.secret {
        if let Err(e) = conncheck::challenge_client(&mut conn, secret, timeout).await {
            warn!(%peer, error = %e, "connection check failed; closing");
            return None;
        }
    }
    Some(conn)
}

async fn refuse_busy(mut conn: Connection, peer: SocketAddr) {
    warn!(%peer, "connection refused: too many connections");
    let _ = conn
        .write_error(
            ErrorCode::TooManyRequests,
            "the server is at its connection limit; try again later",
        )
        .await;
    let _ = conn.shutdown().await;
}

/// What a command did, for the log.
#[derive(Default)]
struct Outcome {
    bytes: u64,
    close: bool,
}

/// One client connection.
struct Handler {
    /// The upload between `put` and `put_commit`. Declared (so dropped) before `conn`: when
    /// a client sees this connection closed, the upload's name is free again.
    upload: Option<Box<dyn StagedUpload>>,
    conn: Connection,
    peer: SocketAddr,
    shared: Arc<Shared>,
    greeted: bool,
    /// The logged-in user.
    user: Option<String>,
    /// The session token this connection logged in with or was given.
    token: Option<String>,
    /// A SCRAM exchange between `auth_start` and `auth_finish`: the claimed name,
    /// whether it exists, and the server state.
    login: Option<(String, bool, ServerFirst)>,
    /// Commits made with deferred durability whose acknowledgments wait in the output
    /// buffer for one [`Storage::sync`] (group commit).
    unsynced_commits: usize,
    /// Whether `upload` was started with deferred durability.
    upload_deferred: bool,
}

impl Handler {
    fn new(mut conn: Connection, peer: SocketAddr, shared: Arc<Shared>) -> Handler {
        conn.set_stall_timeout(shared.config.idle_timeout);
        Handler {
            conn,
            peer,
            shared,
            greeted: false,
            user: None,
            token: None,
            login: None,
            upload: None,
            unsynced_commits: 0,
            upload_deferred: false,
        }
    }

    async fn run(mut self) {
        let started = Instant::now();
        info!(peer = %self.peer, "connected");
        let mut requests = 0u64;
        let mut bytes = 0u64;
        loop {
            let timeout = if self.greeted {
                self.shared.config.idle_timeout
            } else {
                self.shared.config.handshake_timeout
            };
            let header = match tokio::time::timeout(timeout, self.conn.read_header()).await {
                Err(_) => {
                    info!(peer = %self.peer, "closing idle connection");
                    break;
                }
                Ok(Ok(None)) => break,
                Ok(Ok(Some(header))) => header,
                Ok(Err(Error::Protocol(message))) => {
                    warn!(peer = %self.peer, %message, "bad frame; closing");
                    let _ = self.conn.write_error(ErrorCode::BadRequest, &message).await;
                    let _ = self.conn.shutdown().await;
                    break;
                }
                Ok(Err(_)) => break,
            };
            requests += 1;
            let command_started = Instant::now();
            let (cmd, result) = match parse_request(header) {
                Ok(request) => (request.name(), self.apply(request).await),
                Err(e) => ("?", Err(e)),
            };
            let user = self.user.as_deref().unwrap_or("-");
            let ms = command_started.elapsed().as_millis() as u64;
            match result {
                Ok(outcome) => {
                    bytes += outcome.bytes;
                    info!(peer = %self.peer, user, cmd, bytes = outcome.bytes, ms, "ok");
                    if self.send_replies(outcome.close).await.is_err() || outcome.close {
                        break;
                    }
                }
                Err(Error::Remote { code, message }) => {
                    info!(peer = %self.peer, user, cmd, ?code, %message, ms, "refused");
                    let sent = self.conn.write_error(code, &message).await;
                    let closing = !self.greeted || code == ErrorCode::UnsupportedVersion;
                    if sent.is_err() || self.send_replies(closing).await.is_err() {
                        break;
                    }
                    if !self.greeted || code == ErrorCode::UnsupportedVersion {
                        break;
                    }
                }
                Err(Error::ConnectionClosed) => {
                    info!(peer = %self.peer, user, cmd, ms, "connection lost mid-command");
                    // The peer may only have stopped sending: it still gets the replies
                    // to its earlier (pipelined) requests.
                    let _ = self.send_replies(true).await;
                    break;
                }
                Err(e) => {
                    error!(peer = %self.peer, user, cmd, error = %e, ms, "failed; closing");
                    let _ = self
                        .conn
                        .write_error(ErrorCode::Internal, "internal server error")
                        .await;
                    let _ = self.conn.shutdown().await;
                    break;
                }
            }
        }
        let user = self.user.as_deref().unwrap_or("-");
        info!(
            peer = %self.peer,
            user,
            requests,
            bytes,
            secs = started.elapsed().as_secs_f64(),
            "disconnected"
        );
    }

    /// Flush the replies, unless the client has already pipelined more requests: then
    /// they go out with the next replies. Deferred commits are made durable first, so no
    /// acknowledgment leaves before its file is on stable storage.
    async fn send_replies(&mut self, closing: bool) -> Result<()> {
        let batch_full = self.unsynced_commits >= GROUP_COMMIT_MAX;
        if self.conn.has_buffered_input() && !closing && !batch_full {
            return Ok(());
        }
        self.settle().await?;
        self.conn.flush().await
    }

    /// Make deferred commits durable (one file-system sync for the batch).
    async fn settle(&mut self) -> Result<()> {
        if self.unsynced_commits > 0 {
            let storage = self.shared.storage.clone();
            blocking(move || storage.sync()).await?;
            self.unsynced_commits = 0;
        }
        Ok(())
    }

    async fn apply(&mut self, request: Request) -> Result<Outcome> {
        if !self.greeted && !matches!(request, Request::Hello { .. }) {
            return Err(Error::remote(
                ErrorCode::BadRequest,
                "the first message must be hello",
            ));
        }
        match request {
            Request::Hello { version, .. } => self.hello(version).await,
            Request::Register {
                user,
                salt,
                iterations,
                stored_key,
                server_key,
            } => {
                self.register(user, &salt, iterations, &stored_key, &server_key)
                    .await
            }
            Request::AuthStart { message } => self.auth_start(&message).await,
            Request::AuthFinish { message } => self.auth_finish(&message).await,
            Request::AuthToken { token } => self.auth_token(token).await,
            Request::Logout => self.logout().await,
            Request::Ls { partial } => self.list(partial).await,
            Request::Put {
                filename,
                size,
                restart,
            } => self.put(filename, size, restart).await,
            Request::PutData { offset, filesize } => self.put_data(offset, filesize).await,
            Request::PutCommit { digest, filesize } => self.put_commit(digest, filesize).await,
            Request::Get {
                filename,
                offset,
                check_chunk,
            } => self.get(filename, offset, check_chunk).await,
            Request::Quit => {
                self.conn.write_ok(&Done {}).await?;
                Ok(Outcome {
                    close: true,
                    ..Outcome::default()
                })
            }
        }
    }

    async fn hello(&mut self, version: u32) -> Result<Outcome> {
        if version != PROTOCOL_VERSION {
            return Err(Error::remote(
                ErrorCode::UnsupportedVersion,
                format!("this server speaks protocol version {PROTOCOL_VERSION}, not {version}"),
            ));
        }
        self.greeted = true;
        self.conn
            .write_ok(&HelloReply {
                version: PROTOCOL_VERSION,
                server: format!("netdisk {}", env!("CARGO_PKG_VERSION")),
            })
            .await?;
        Ok(Outcome::default())
    }

    async fn register(
        &mut self,
        user: String,
        salt: &str,
        iterations: u32,
        stored_key: &str,
        server_key: &str,
    ) -> Result<Outcome> {
        check_user_name(&user)?;
        let verifier = decode_verifier(salt, iterations, stored_key, server_key)?;
        let record = UserRecord {
            name: user.clone(),
            registered_at: now_iso8601(),
            last_login: None,
            verifier,
            disabled: false,
            sessions_after: None,
        };
        let shared = self.shared.clone();
        blocking(move || {
            shared.users.insert(record).map_err(|e| match e {
                UserTableError::NameTaken => Error::remote(
                    ErrorCode::NameTaken,
                    format!("the user name {user} is already taken"),
                ),
                other => user_table_error(other),
            })?;
            // The name had no row, so any folder under it is a removed account's: a new
            // account must never inherit its files.
            let root = &shared.config.root;
            if let Some(place) = crate::admin::move_user_data_aside(root, &user)? {
                warn!(user, moved_to = %place.display(), "new account's name had data of an earlier account; moved it aside");
            }
            shared.storage.create_user(&user)
        })
        .await?;
        self.conn.write_ok(&Done {}).await?;
        Ok(Outcome::default())
    }

    async fn auth_start(&mut self, client_first: &str) -> Result<Outcome> {
        let bad = |e: scram::ScramError| Error::remote(ErrorCode::BadRequest, e.to_string());
        let name = ServerFirst::parse_user(client_first).map_err(bad)?;
        if let Err(wait) = self
            .shared
            .throttle
            .check(&self.throttle_keys(&name), Instant::now())
        {
            return Err(Error::remote(
                ErrorCode::TooManyRequests,
                format!(
                    "too many failed logins; try again in {} s",
                    wait.as_secs().max(1)
                ),
            ));
        }
        // Unknown (or impossible) names get a fake verifier, so the answer looks the same.
        let known = check_user_name(&name)
            .ok()
            .and_then(|_| self.shared.users.get(&name));
        let exists = known.is_some();
        let verifier = match known {
            Some(record) => record.verifier,
            None => scram::fake_verifier(&self.shared.secret, &name),
        };
        let server_first = ServerFirst::new(client_first, verifier).map_err(bad)?;
        let message = server_first.message();
        self.login = Some((name, exists, server_first));
        self.conn
            .write_ok(&AuthReply {
                message,
                token: None,
                user: None,
            })
            .await?;
        Ok(Outcome::default())
    }

    async fn auth_finish(&mut self, client_final: &str) -> Result<Outcome> {
        let Some((name, exists, server_first)) = self.login.take() else {
            return Err(Error::remote(
                ErrorCode::BadRequest,
                "auth_finish without auth_start",
            ));
        };
        let keys = self.throttle_keys(&name);
        let server_final = match server_first.handle_client_final(client_final) {
            Ok(server_final) if exists => {
                self.shared.throttle.succeeded(&keys);
                server_final
            }
            _ => {
                self.shared.throttle.failed(&keys, Instant::now());
                return Err(Error::remote(
                    ErrorCode::AuthFailed,
                    "wrong user name or password",
                ));
            }
        };
        // Only after a correct proof, so it tells a guesser nothing. The row is read
        // again: an administrator may have changed it during the exchange.
        let sessions_after = match self.shared.users.get(&name) {
            Some(record) if record.disabled => {
                return Err(Error::remote(
                    ErrorCode::AuthFailed,
                    "account disabled: ask the server's administrator",
                ))
            }
            Some(record) => record.sessions_after,
            None => {
                return Err(Error::remote(
                    ErrorCode::AuthFailed,
                    "wrong user name or password",
                ))
            }
        };
        let shared = self.shared.clone();
        let user = name.clone();
        let token = blocking(move || {
            // Written now as before, but best effort: a full disk must not stop logins
            // (what is not written stays pending for the periodic flush).
            let recorded = shared.users.record_login(&user, &now_iso8601());
            if let Err(e) = recorded.and_then(|()| shared.users.flush_logins()) {
                warn!(user, error = %e, "cannot record the login time");
            }
            // Session times are whole seconds: wait out a revocation made this second, or
            // the new session would count as revoked (at most a second, once).
            if let Some(after) = sessions_after.as_deref().and_then(unix_seconds) {
                let wait = after - time::OffsetDateTime::now_utc().unix_timestamp();
                if (1..=2).contains(&wait) {
                    std::thread::sleep(Duration::from_secs(wait as u64));
                }
            }
            shared.storage.create_user(&user)?;
            shared.sessions.create(&user)
        })
        .await?;
        self.user = Some(name.clone());
        self.token = Some(token.clone());
        self.conn
            .write_ok(&AuthReply {
                message: server_final,
                token: Some(token),
                user: Some(name),
            })
            .await?;
        Ok(Outcome::default())
    }

    async fn auth_token(&mut self, token: String) -> Result<Outcome> {
        let user = self.shared.sessions.user_of(&token)?;
        let refused = |message: &str| Err(Error::remote(ErrorCode::AuthFailed, message));
        match self.shared.users.get(&user) {
            None => return refused("session expired or logged out: log in again"),
            Some(record) if record.disabled => {
                return refused("account disabled: ask the server's administrator")
            }
            Some(record) => {
                if let Some(after) = record.sessions_after.as_deref().and_then(unix_seconds) {
                    let root = self.shared.config.root.clone();
                    let probe = token.clone();
                    // Creation time = expiry - lifetime, read from sessions.json (the
                    // store does not expose it yet).
                    let created = blocking(move || {
                        use sha2::Digest;
                        let key = hex::encode(sha2::Sha256::digest(probe.as_bytes()));
                        let table: serde_json::Value = std::fs::read(root.join("sessions.json"))
                            .ok()
                            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
                            .unwrap_or_default();
                        let lifetime = crate::sessions::SESSION_LIFETIME.as_secs() as i64;
                        Ok(table[key]["expires"].as_i64().map(|e| e - lifetime))
                    })
                    .await?;
                    // Unknown age: treat as revoked; logging in again is cheap.
                    if created.is_none_or(|created| created < after) {
                        return refused(
                            "session ended by the server's administrator: log in again",
                        );
                    }
                }
            }
        }
        self.user = Some(user.clone());
        self.token = Some(token);
        self.conn.write_ok(&UserReply { user }).await?;
        Ok(Outcome::default())
    }

    async fn logout(&mut self) -> Result<Outcome> {
        if let Some(token) = self.token.take() {
            let shared = self.shared.clone();
            blocking(move || shared.sessions.revoke(&token)).await?;
        }
        self.user = None;
        self.upload = None;
        self.conn.write_ok(&Done {}).await?;
        Ok(Outcome::default())
    }

    /// Failed logins count against the user name and the client's address.
    fn throttle_keys(&self, user: &str) -> Vec<String> {
        vec![format!("user:{user}"), format!("addr:{}", self.peer.ip())]
    }

    fn logged_in_user(&self) -> Result<String> {
        self.user
            .clone()
            .ok_or_else(|| Error::remote(ErrorCode::NotLoggedIn, "not logged in: log in first"))
    }

    async fn list(&mut self, partial: bool) -> Result<Outcome> {
        let user = self.logged_in_user()?;
        self.settle().await?;
        let storage = self.shared.storage.clone();
        let (count, body) = blocking(move || {
            let json = if partial {
                let entries = storage.list_partial(&user)?;
                (entries.len(), serde_json::to_vec(&entries))
            } else {
                let entries = storage.list(&user)?;
                (entries.len(), serde_json::to_vec(&entries))
            };
            Ok((json.0, json.1.map_err(|e| Error::Invalid(e.to_string()))?))
        })
        .await?;
        self.conn
            .write_ok(&ListReply {
                count,
                filesize: body.len() as u64,
            })
            .await?;
        self.conn.write_body(&body).await?;
        Ok(Outcome {
            bytes: body.len() as u64,
            close: false,
        })
    }

    async fn put(&mut self, filename: String, size: u64, restart: bool) -> Result<Outcome> {
        let user = self.logged_in_user()?;
        self.upload = None; // a new put abandons (but keeps staged) any earlier one
        let storage = self.shared.storage.clone();
        let quota = self.shared.config.quota;
        // Small files join the group commit; large ones sync as they go and can resume.
        let durability = if size <= GROUP_COMMIT_FILE_MAX {
            Durability::Batched
        } else {
            Durability::EachUpload
        };
        let upload = blocking(move || {
            if let Some(quota) = quota {
                check_quota(storage.as_ref(), &user, &filename, size, quota)?;
            }
            storage.begin_upload(&user, &filename, size, restart, durability)
        })
        .await?;
        self.upload_deferred = durability == Durability::Batched;
        let reply = PutReply {
            offset: upload.offset(),
            missing: upload.missing(),
        };
        self.upload = Some(upload);
        self.conn.write_ok(&reply).await?;
        Ok(Outcome::default())
    }

    async fn put_data(&mut self, offset: u64, filesize: u64) -> Result<Outcome> {
        // The storage accepts the rest of the file, or missing chunks it asked for.
        let refusal = match self.upload.as_mut() {
            None => Some(Error::remote(ErrorCode::BadRequest, "put_data without put")),
            Some(upload) => upload.start_write(offset, filesize).err(),
        };
        if let Some(refusal) = refusal {
            // Stay in step with the client: the body follows the header regardless.
            self.conn.skip_body(filesize).await?;
            return Err(refusal);
        }
        let upload = self.upload.take().expect("checked above");
        // On a lost connection, receive_body returns only once the upload is dropped, so
        // its name is free and its staged files settled before this connection ends.
        let sink = receive_body(&mut self.conn, filesize, UploadSink(upload), &mut |_| {}).await?;
        let received = sink.0.offset();
        self.upload = Some(sink.0);
        self.conn
            .write_ok(&PutReply {
                offset: received,
                missing: Vec::new(),
            })
            .await?;
        Ok(Outcome {
            bytes: filesize,
            close: false,
        })
    }

    async fn put_commit(&mut self, digest: String, filesize: Option<u64>) -> Result<Outcome> {
        let Some(upload) = self.upload.take() else {
            if let Some(len) = filesize {
                self.conn.skip_body(len).await?;
            }
            return Err(Error::remote(
                ErrorCode::BadRequest,
                "put_commit without a complete put",
            ));
        };
        // The body, if any: the sender's chunk hashes. Read into memory only when all the
        // data is staged, so its length is bounded by what actually arrived.
        let expected = upload.size().div_ceil(CHUNK_SIZE) * 32;
        let chunks = match filesize {
            Some(len) if len == expected && upload.offset() == upload.size() => {
                let mut body = vec![0u8; len as usize];
                self.conn.read_body(&mut body).await?;
                let chunks: Vec<ChunkHash> = body
                    .chunks_exact(32)
                    .map(|c| c.try_into().expect("32 bytes"))
                    .collect();
                Some(chunks)
            }
            Some(len) => {
                self.conn.skip_body(len).await?;
                if len != expected {
                    return Err(Error::remote(
                        ErrorCode::BadRequest,
                        format!("put_commit: {len} bytes of chunk hashes, expected {expected}"),
                    ));
                }
                None // incomplete: the commit says so
            }
            None => None,
        };
        let reply = blocking(move || upload.commit(&digest, chunks.as_deref())).await?;
        if self.upload_deferred {
            self.unsynced_commits += 1;
        }
        self.conn.write_ok(&reply).await?;
        Ok(Outcome::default())
    }

    async fn get(
        &mut self,
        filename: String,
        offset: u64,
        check_chunk: Option<String>,
    ) -> Result<Outcome> {
        let user = self.logged_in_user()?;
        if !offset.is_multiple_of(CHUNK_SIZE) {
            return Err(Error::remote(
                ErrorCode::BadRequest,
                format!("offset {offset} is not a multiple of the chunk size {CHUNK_SIZE}"),
            ));
        }
        // A body larger than the output buffer would push waiting acknowledgments out.
        self.settle().await?;
        let storage = self.shared.storage.clone();
        // One blocking task opens, positions and (for a small file) reads the body, so a
        // small file costs one hop to the blocking pool.
        let (reply, body) = blocking(move || {
            let file = storage.open_file(&user, &filename)?;
            let (offset, restart_reason) =
                resume_offset(offset, check_chunk.as_deref(), &file.chunks, file.size);
            let mut reader = file.reader;
            reader.seek(SeekFrom::Start(offset))?;
            let filesize = file.size - offset;
            let body = if filesize <= IO_BUFFER_SIZE as u64 {
                let mut bytes = Vec::with_capacity(filesize as usize);
                reader.take(filesize).read_to_end(&mut bytes)?;
                if bytes.len() as u64 != filesize {
                    return Err(Error::Invalid("the file shrank while it was read".into()));
                }
                Body::Small(bytes)
            } else {
                Body::Streamed(reader)
            };
            let reply = GetReply {
                size: file.size,
                digest: crate::digest::file_digest(&file.chunks)
                    .to_hex()
                    .to_string(),
                modified: iso8601(file.modified),
                offset,
                filesize,
                restart_reason,
            };
            Ok((reply, body))
        })
        .await?;
        self.conn.write_ok(&reply).await?;
        match body {
            Body::Small(bytes) => self.conn.write_body(&bytes).await?,
            Body::Streamed(reader) => {
                send_body(
                    &mut self.conn,
                    reply.filesize,
                    FileSource(reader),
                    &mut |_| {},
                )
                .await?;
            }
        }
        Ok(Outcome {
            bytes: reply.filesize,
            close: false,
        })
    }
}

/// Refuse an upload that would take the user's stored bytes (complete files, plus the
/// announced sizes of other unfinished uploads) over `quota`. The file being replaced
/// does not count.
fn check_quota(storage: &dyn Storage, user: &str, name: &str, size: u64, quota: u64) -> Result<()> {
    let stored: u64 = storage
        .list(user)?
        .iter()
        .filter(|file| file.name != name)
        .map(|file| file.size)
        .sum();
    let staged: u64 = storage
        .list_partial(user)?
        .iter()
        .filter(|partial| partial.name != name)
        .map(|partial| partial.size)
        .sum();
    let used = stored + staged;
    if used.saturating_add(size) > quota {
        return Err(Error::remote(
            ErrorCode::NoSpace,
            format!(
                "quota exceeded: {name} needs {size} bytes, {} of your {quota}-byte quota are free",
                quota.saturating_sub(used)
            ),
        ));
    }
    Ok(())
}

/// Where a download continues: the client's offset if its partial copy can be a prefix
/// of this file, else 0 with the reason.
fn resume_offset(
    offset: u64,
    check_chunk: Option<&str>,
    chunks: &[crate::digest::ChunkHash],
    size: u64,
) -> (u64, Option<String>) {
    if offset == 0 {
        return (0, None);
    }
    if offset > size {
        return (
            0,
            Some("the file on the server is shorter than the local copy".into()),
        );
    }
    let index = (offset / CHUNK_SIZE) as usize - 1;
    match (check_chunk, chunks.get(index)) {
        (Some(check), Some(hash)) if !check.eq_ignore_ascii_case(&hex::encode(hash)) => (
            0,
            Some("the local copy does not match the file on the server".into()),
        ),
        _ => (offset, None),
    }
}

/// A staged upload receiving a body; the sender half signals (by being dropped) that the
/// upload is no longer in use.
struct UploadSink(Box<dyn StagedUpload>);

impl BodySink for UploadSink {
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.0.write(bytes)
    }
}

/// A download's body: read already (small files), or streamed from the file.
enum Body {
    Small(Vec<u8>),
    Streamed(Box<dyn FileReader>),
}

struct FileSource(Box<dyn FileReader>);

impl BodySource for FileSource {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        Ok(self.0.read(buf)?)
    }
}

fn decode_verifier(
    salt: &str,
    iterations: u32,
    stored_key: &str,
    server_key: &str,
) -> Result<Verifier> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let bad = |what: &str| Error::remote(ErrorCode::BadRequest, format!("bad {what} in register"));
    let salt = b64.decode(salt).map_err(|_| bad("salt"))?;
    let key = |text: &str, what: &str| -> Result<[u8; 32]> {
        b64.decode(text)
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or_else(|| bad(what))
    };
    if iterations < scram::MIN_ITERATIONS {
        return Err(Error::remote(
            ErrorCode::BadRequest,
            format!("at least {} iterations are required", scram::MIN_ITERATIONS),
        ));
    }
    if salt.len() < 16 {
        return Err(bad("salt (at least 16 bytes)"));
    }
    Ok(Verifier {
        salt,
        iterations,
        stored_key: key(stored_key, "stored_key")?,
        server_key: key(server_key, "server_key")?,
    })
}

fn user_table_error(e: UserTableError) -> Error {
    Error::remote(ErrorCode::Internal, format!("user table: {e}"))
}

/// Run blocking work (disk, fsync, the xlsx) off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::remote(ErrorCode::Internal, format!("worker failed: {e}")))?
}
