//! The server: accept loop, connection limits, and one [`Handler`] per connection that
//! dispatches commands. Sessions and authentication state live here; file contents are
//! the business of [`crate::storage`], user records of [`crate::users`].
//!
//! What one client can cost the others is bounded: connections count against the global
//! limit only after their TLS handshake (handshakes have their own small limits, per
//! address too); a stalled transfer waits on the async side, holding no thread; replies
//! wait in a small buffer, and a client that does not read them stops being read from
//! (backpressure); listings are pages; quota is reserved before an upload starts.

use std::collections::HashMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Map, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, error, info, warn};

use crate::conncheck;
use crate::digest::{file_digest, ChunkHash, CHUNK_SIZE};
use crate::error::{Error, ErrorCode, Result};
use crate::limits;
use crate::names::check_user_name;
use crate::protocol::{
    parse_request, AuthReply, CommitReply, Connection, Done, EntryType, FileEntry, GetReply,
    HelloReply, ListReply, PartialEntry, PutReply, Request, RmReply, UsageReply, UserReply,
    VersionEntry, VersionsReply, MAX_HELD_REPLIES, MAX_LIST_PAGE, PROTOCOL_VERSION,
};
use crate::scram::{self, ServerFirst, Verifier};
use crate::sessions::{SessionStore, Sessions};
use crate::storage::{
    canonical_path, iso8601, Durable, Entry, FileRead, Kind, LocalStorage, Storage, StorageOptions,
    Upload,
};
use crate::throttle::{LoginAttempt, LoginThrottle};
use crate::tls::{self, ServerTls};
use crate::transfer::{BufferLease, BufferPool};
use crate::users::{now_iso8601, unix_seconds, UserRecord, UserTable, UserTableError};

/// Most acknowledgments held back for one group commit.
const GROUP_COMMIT_MAX: usize = 64;
/// TLS handshakes (and connection checks) in progress at once, in all and per address.
const MAX_HANDSHAKES: usize = 256;
const MAX_HANDSHAKES_PER_ADDRESS: usize = 64;
/// Registrations per address: a burst (`ServerConfig::registration_burst`), then one per
/// this interval.
const REGISTRATION_INTERVAL: Duration = Duration::from_secs(6);

/// Server settings; [`ServerConfig::new`] gives the defaults.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: String,
    pub root: PathBuf,
    /// Connections served at once (after their handshake); more are refused with a
    /// `too_many_requests` reply. Lowered at start to what the file-descriptor limit allows.
    pub max_connections: usize,
    /// Connections from one address (IPv6: one /64... counted per exact address here),
    /// handshaking or served.
    pub max_connections_per_address: usize,
    /// Time a new connection has to finish TLS, the connection check and `hello`.
    pub handshake_timeout: Duration,
    /// An idle connection (no complete request) is closed after this long; also the
    /// longest a peer may stall inside a frame, a body or while a reply is written.
    pub idle_timeout: Duration,
    /// Staged uploads idle for longer are deleted.
    pub partial_max_idle: Duration,
    /// Transport security.
    pub tls: TlsSetting,
    /// Shared secret of the optional connection check (`--secret-file`).
    pub secret: Option<Vec<u8>>,
    /// Most bytes each user may store (`--quota`), versions included; `None` is unlimited.
    pub quota: Option<u64>,
    /// Versions kept per path and for how long.
    pub storage: StorageOptions,
    /// Registrations one address may make at once; then one per 6 s.
    pub registration_burst: u32,
    /// Files and shared state (users.xlsx, sessions, secret) in an S3-compatible bucket
    /// (`--storage s3://BUCKET/PREFIX`) instead of under `root`; `root` then keeps only
    /// what is this node's own (its lock, a local TLS key when not shared).
    #[cfg(feature = "s3")]
    pub object_store: Option<crate::objstore::ObjectStoreConfig>,
    /// At shutdown, how long running transfers may take to finish before their
    /// connections are cut (idle connections are closed at once).
    pub shutdown_grace: Duration,
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
            max_connections_per_address: 256,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(300),
            partial_max_idle: Duration::from_secs(24 * 3600),
            tls: TlsSetting::SelfSigned,
            secret: None,
            quota: None,
            storage: StorageOptions::default(),
            registration_burst: 10,
            #[cfg(feature = "s3")]
            object_store: None,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// State shared by all connections.
struct Shared {
    users: UserTable,
    /// `sessions.json` in ROOT, or objects in the bucket several servers share.
    sessions: Box<dyn Sessions>,
    storage: Arc<dyn Storage>,
    /// Server secret: derives fake SCRAM salts for unknown users.
    secret: Vec<u8>,
    tls: Option<ServerTls>,
    throttle: LoginThrottle,
    quota: QuotaLedger,
    registrations: RateLimiter,
    addresses: AddressCounts,
    buffers: BufferPool,
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
    pub async fn bind(mut config: ServerConfig) -> Result<Server> {
        // Each connection needs descriptors (socket, files): never promise more
        // connections than the process can open.
        match limits::raise_fd_limit() {
            Ok((soft, _hard)) => {
                let allowed = limits::clamp_max_connections(config.max_connections, soft);
                if allowed < config.max_connections {
                    warn!(
                        requested = config.max_connections,
                        allowed,
                        fd_limit = soft,
                        "--max-connections lowered to fit the open-file limit (ulimit -n)"
                    );
                    config.max_connections = allowed;
                }
            }
            Err(e) => warn!(error = %e, "cannot read the open-file limit"),
        }
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
                let flushed =
                    blocking(move || shared.users.flush_logins().map_err(user_table_error));
                if let Err(e) = flushed.await {
                    warn!(error = %e, "cannot write last logins to the user table");
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

    /// Serve until `shutdown` completes, then stop gracefully: no new connections, idle
    /// ones closed at once, running transfers given `shutdown_grace` to finish, the rest
    /// cut. Returns once every connection has ended.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        info!(
            addr = %self.local_addr()?,
            root = %self.shared.config.root.display(),
            users = self.shared.users.len(),
            tls = self.fingerprint().unwrap_or("off (--no-tls)"),
            secret_check = self.shared.config.secret.is_some(),
            max_connections = self.shared.config.max_connections,
            "netdisk server listening"
        );
        let housekeeping = spawn_housekeeping(self.shared.clone());
        let limit = Arc::new(Semaphore::new(self.shared.config.max_connections));
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let (stop, stopping) = tokio::sync::watch::channel(false);
        let mut connections = tokio::task::JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            // Reap finished connections, so the set holds only live ones.
            while connections.try_join_next().is_some() {}
            let (socket, peer) = tokio::select! {
                _ = &mut shutdown => break,
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
            // Cheap refusals first: an address over its share, or too many handshakes.
            let Some(slot) = self.shared.addresses.enter(peer.ip(), &self.shared.config) else {
                info!(%peer, "connection refused: too many from this address");
                continue;
            };
            let Ok(handshake) = handshakes.clone().try_acquire_owned() else {
                info!(%peer, "connection refused: too many handshakes in progress");
                continue;
            };
            let _ = socket.set_nodelay(true);
            let shared = self.shared.clone();
            let limit = limit.clone();
            let stopping = stopping.clone();
            connections.spawn(async move {
                let conn = open_connection(socket, peer, &shared).await;
                drop(handshake);
                let Some(conn) = conn else { return };
                let slot = slot.handshake_done();
                match limit.try_acquire_owned() {
                    Ok(_permit) => Handler::new(conn, peer, shared, stopping).run().await,
                    Err(_) => refuse_busy(conn, peer).await,
                }
                drop(slot);
            });
        }
        // Closing the listener refuses new connections from here on.
        housekeeping.abort();
        let grace = self.shared.config.shutdown_grace;
        let Server {
            listener,
            _root_lock,
            ..
        } = self;
        drop(listener);
        while connections.try_join_next().is_some() {}
        info!(
            connections = connections.len(),
            grace_secs = grace.as_secs_f64(),
            "shutting down: no new connections; running transfers may finish"
        );
        let _ = stop.send(true);
        let all_ended = async { while connections.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(grace, all_ended).await;
        let cut = connections.len();
        if cut > 0 {
            warn!(
                connections = cut,
                "shutdown grace over; cutting the connections still running"
            );
        }
        connections.shutdown().await;
        info!(connections_cut = cut, "netdisk server stopped");
        Ok(())
    }
}

/// Open the root folder: storage areas, users.xlsx, sessions, the server secret.
fn open_root(root: &Path, config: ServerConfig) -> Result<Shared> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .map_err(|e| Error::Invalid(format!("cannot create {}: {e}", root.display())))?;
    let Accounts {
        users,
        sessions,
        secret,
        tls,
    } = open_accounts(root, &config)?;
    // Files in the bucket when one is configured (users, sessions, secret too: above).
    let storage: Arc<dyn Storage> = match &config.object_store {
        #[cfg(feature = "s3")]
        Some(store) => Arc::new(crate::storage::ObjectStorage::open(
            store,
            config.storage.clone(),
        )?),
        _ => Arc::new(LocalStorage::open(root, config.storage.clone())?),
    };
    Ok(Shared {
        users,
        sessions,
        storage,
        secret,
        tls,
        throttle: LoginThrottle::default(),
        quota: QuotaLedger::default(),
        registrations: RateLimiter::default(),
        addresses: AddressCounts::default(),
        buffers: BufferPool::default(),
        config,
    })
}

/// Who may log in and how the server proves itself: in ROOT, or (with `--storage s3://`)
/// shared through the bucket by every server on it.
struct Accounts {
    users: UserTable,
    sessions: Box<dyn Sessions>,
    secret: Vec<u8>,
    tls: Option<ServerTls>,
}

fn open_accounts(root: &Path, config: &ServerConfig) -> Result<Accounts> {
    let given_tls = |setting: &TlsSetting| match setting {
        TlsSetting::Off => Ok(None),
        TlsSetting::SelfSigned => tls::server_tls(root, None).map(Some),
        TlsSetting::Files { cert, key } => tls::server_tls(root, Some((cert, key))).map(Some),
    };
    #[cfg(feature = "s3")]
    if let Some(store) = &config.object_store {
        use crate::shared_state::{BucketSessions, BucketTable, StateBucket};
        let bucket = StateBucket::open(store)?;
        let users = UserTable::open_store(Box::new(BucketTable::new(bucket.clone())))
            .map_err(|e| Error::Invalid(e.to_string()))?;
        let tls = match &config.tls {
            TlsSetting::SelfSigned => Some(bucket.self_signed_tls()?),
            other => given_tls(other)?,
        };
        return Ok(Accounts {
            users,
            secret: bucket.secret()?,
            sessions: Box::new(BucketSessions::new(bucket)),
            tls,
        });
    }
    Ok(Accounts {
        users: UserTable::open(&root.join("users.xlsx"))
            .map_err(|e| Error::Invalid(e.to_string()))?,
        sessions: Box::new(SessionStore::open(&root.join("sessions.json"))?),
        secret: load_or_create_secret(&root.join("server.secret"))?,
        tls: given_tls(&config.tls)?,
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

/// Deletes stale staged uploads and expired versions now and then.
fn spawn_housekeeping(shared: Arc<Shared>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let max_idle = shared.config.partial_max_idle;
        let every = (max_idle / 4).clamp(Duration::from_secs(1), Duration::from_secs(3600));
        loop {
            match shared.storage.expire(max_idle).await {
                Ok(expired) if expired.partials + expired.versions == 0 => {}
                Ok(expired) => info!(
                    partials = expired.partials,
                    versions = expired.versions,
                    "deleted stale partial uploads and expired versions"
                ),
                Err(e) => warn!(error = %e, "housekeeping failed"),
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
    conn.set_stall_timeout(timeout);
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

/// Connections per address, handshaking and served.
#[derive(Default)]
struct AddressCounts {
    counts: Arc<Mutex<HashMap<IpAddr, (usize, usize)>>>,
}

/// One connection's place in [`AddressCounts`]; gives it back on drop.
struct AddressSlot {
    counts: Arc<Mutex<HashMap<IpAddr, (usize, usize)>>>,
    ip: IpAddr,
    handshaking: bool,
}

impl AddressCounts {
    fn enter(&self, ip: IpAddr, config: &ServerConfig) -> Option<AddressSlot> {
        let mut counts = self.counts.lock().unwrap();
        let (handshaking, served) = counts.entry(ip).or_default();
        if *handshaking >= MAX_HANDSHAKES_PER_ADDRESS
            || *handshaking + *served >= config.max_connections_per_address
        {
            return None;
        }
        *handshaking += 1;
        Some(AddressSlot {
            counts: self.counts.clone(),
            ip,
            handshaking: true,
        })
    }
}

impl AddressSlot {
    fn handshake_done(mut self) -> AddressSlot {
        let mut counts = self.counts.lock().unwrap();
        if let Some((handshaking, served)) = counts.get_mut(&self.ip) {
            *handshaking -= 1;
            *served += 1;
        }
        self.handshaking = false;
        drop(counts);
        self
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap();
        if let Some((handshaking, served)) = counts.get_mut(&self.ip) {
            if self.handshaking {
                *handshaking -= 1;
            } else {
                *served -= 1;
            }
            if *handshaking == 0 && *served == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// Registrations per address: a token bucket (a burst, then one per interval).
#[derive(Default)]
struct RateLimiter {
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl RateLimiter {
    fn allow(&self, ip: IpAddr, burst: u32, now: Instant) -> std::result::Result<(), Duration> {
        let burst = burst.max(1) as f64;
        let mut buckets = self.buckets.lock().unwrap();
        if buckets.len() > 10_000 {
            // Full buckets are the default: forgetting them loses nothing.
            buckets.retain(|_, (tokens, at)| *tokens + refill(*at, now) < burst);
        }
        let (tokens, at) = buckets.entry(ip).or_insert((burst, now));
        *tokens = (*tokens + refill(*at, now)).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(REGISTRATION_INTERVAL.mul_f64(1.0 - *tokens))
        }
    }
}

fn refill(since: Instant, now: Instant) -> f64 {
    now.saturating_duration_since(since).as_secs_f64() / REGISTRATION_INTERVAL.as_secs_f64()
}

/// Quota reservations: uploads in progress, per user, so concurrent uploads cannot
/// together pass a check each passes alone. A user's check and reservation happen under
/// that user's lock.
#[derive(Default)]
struct QuotaLedger {
    users: Mutex<HashMap<String, Arc<ReservationBook>>>,
    next_id: std::sync::atomic::AtomicU64,
}

/// One user's reservations: id -> (path, bytes).
type ReservationBook = tokio::sync::Mutex<HashMap<u64, (String, u64)>>;

/// An upload's reserved bytes; released on drop (commit or abandon).
struct Reservation {
    book: Arc<ReservationBook>,
    id: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let id = self.id;
        // Usually free at once; otherwise a task waits for the lock.
        if let Ok(mut book) = self.book.try_lock() {
            book.remove(&id);
            return;
        }
        let book = self.book.clone();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                book.lock().await.remove(&id);
            });
        }
    }
}

impl QuotaLedger {
    fn book(&self, user: &str) -> Arc<ReservationBook> {
        let mut users = self.users.lock().unwrap();
        users.entry(user.to_string()).or_default().clone()
    }
}

/// What a command did, for the log.
#[derive(Default)]
struct Outcome {
    bytes: u64,
    close: bool,
}

/// The upload between `put` and `put_commit`, with its quota reservation.
struct ActiveUpload {
    upload: Box<dyn Upload>,
    _reservation: Option<Reservation>,
}

/// A SCRAM exchange in progress (login or password change).
struct ScramExchange {
    user: String,
    exists: bool,
    server_first: ServerFirst,
    attempt: LoginAttempt,
}

/// One client connection.
struct Handler {
    /// Declared (so dropped) before `conn`: when a client sees this connection closed, the
    /// upload's name is free again.
    upload: Option<ActiveUpload>,
    conn: Connection,
    peer: SocketAddr,
    shared: Arc<Shared>,
    greeted: bool,
    /// The logged-in user.
    user: Option<String>,
    /// The session token this connection logged in with or was given.
    token: Option<String>,
    login: Option<ScramExchange>,
    passwd: Option<ScramExchange>,
    /// Commits whose acknowledgments wait in the output buffer until they are durable.
    unsynced: Vec<Durable>,
    /// Quota reservations of those commits (their files count once they are named).
    held_reservations: Vec<Reservation>,
    /// A group commit failed: acknowledgments of files that may not be durable are in the
    /// output buffer, so the connection ends without sending (or flushing) anything more.
    commit_failed: bool,
    /// Body bytes the current request announced and no one has read yet.
    body_left: u64,
    /// Becomes true when the server shuts down: an idle connection closes then.
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl Handler {
    fn new(
        mut conn: Connection,
        peer: SocketAddr,
        shared: Arc<Shared>,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> Handler {
        conn.set_stall_timeout(shared.config.idle_timeout);
        Handler {
            conn,
            peer,
            shared,
            greeted: false,
            user: None,
            token: None,
            login: None,
            passwd: None,
            upload: None,
            unsynced: Vec::new(),
            held_reservations: Vec::new(),
            commit_failed: false,
            body_left: 0,
            stopping,
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
            // At shutdown a connection waiting for its next request closes; one inside an
            // upload (between its put, data and commit) or with requests queued goes on.
            let idle = self.upload.is_none() && !self.conn.has_buffered_input();
            let stopping = &mut self.stopping;
            let stop = async move {
                let _ = stopping.wait_for(|stop| *stop).await;
            };
            let read = tokio::select! {
                biased;
                read = tokio::time::timeout(timeout, self.conn.read_header()) => read,
                _ = stop, if idle => {
                    info!(peer = %self.peer, "server shutting down; closing the idle connection");
                    let _ = self.conn.shutdown().await;
                    break;
                }
            };
            let header = match read {
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
            let (cmd, result) = match announced_body(&header) {
                Err(e) => ("?", Err(e)),
                Ok(len) => {
                    // Acknowledgments waiting for durability must not be pushed out by a
                    // buffer filling up with later replies: settle them first.
                    if !self.unsynced.is_empty() && self.conn.pending_output() > MAX_HELD_REPLIES {
                        if let Err(e) = self.settle().await {
                            error!(peer = %self.peer, error = %e, "group commit failed; closing");
                            break;
                        }
                    }
                    self.body_left = len;
                    match parse_request(header) {
                        Ok(request) if len > 0 && !request.takes_body() => (
                            request.name(),
                            Err(Error::remote(
                                ErrorCode::BadRequest,
                                format!("{} carries no body", request.name()),
                            )),
                        ),
                        // Boxed: a command's future (put's and get's are large) exists
                        // only while the command runs, instead of inside every idle
                        // connection's task for its whole life.
                        Ok(request) => (request.name(), Box::pin(self.apply(request)).await),
                        Err(e) => ("?", Err(e)),
                    }
                }
            };
            // A body nobody read (a refused request's) is skipped, never parsed as frames.
            let result = match (result, std::mem::take(&mut self.body_left)) {
                (result, 0) => result,
                (result @ (Ok(_) | Err(Error::Remote { .. })), left) => {
                    match self.conn.skip_body(left).await {
                        Ok(()) => result,
                        Err(e) => Err(e),
                    }
                }
                (other, _) => other,
            };
            if self.commit_failed {
                error!(peer = %self.peer, "group commit failed; closing without replying");
                break;
            }
            let user = self.user.as_deref().unwrap_or("-");
            let ms = command_started.elapsed().as_millis() as u64;
            match result {
                Ok(outcome) => {
                    bytes += outcome.bytes;
                    if QUIET_COMMANDS.contains(&cmd) {
                        debug!(peer = %self.peer, user, cmd, bytes = outcome.bytes, ms, "ok");
                    } else {
                        info!(peer = %self.peer, user, cmd, bytes = outcome.bytes, ms, "ok");
                    }
                    if self.send_replies(outcome.close).await.is_err() || outcome.close {
                        break;
                    }
                }
                Err(Error::Remote { code, message }) => {
                    // Internal details (paths, OS errors) stay in the log.
                    let shown = if code == ErrorCode::Internal {
                        warn!(peer = %self.peer, user, cmd, %message, ms, "internal error");
                        "internal server error (details are in the server's log)".to_string()
                    } else if code == ErrorCode::NoSpace && !message.starts_with("quota") {
                        // The disk (or the file system's quota) is full: the operator must act.
                        error!(peer = %self.peer, user, cmd, %message, ms, "disk full");
                        message
                    } else {
                        info!(peer = %self.peer, user, cmd, ?code, %message, ms, "refused");
                        message
                    };
                    let closing = !self.greeted || code == ErrorCode::UnsupportedVersion;
                    let sent = self.conn.write_error(code, &shown).await;
                    if sent.is_err() || self.send_replies(closing).await.is_err() || closing {
                        break;
                    }
                }
                Err(Error::Protocol(message)) => {
                    warn!(peer = %self.peer, user, cmd, %message, "bad frame; closing");
                    let _ = self.conn.write_error(ErrorCode::BadRequest, &message).await;
                    if self.send_replies(true).await.is_ok() {
                        let _ = self.conn.shutdown().await;
                    }
                    break;
                }
                Err(Error::ConnectionClosed) => {
                    info!(peer = %self.peer, user, cmd, ms, "connection lost mid-command");
                    // The peer may only have stopped sending: it still gets the replies
                    // to its earlier (pipelined) requests.
                    let _ = self.send_replies(true).await;
                    break;
                }
                Err(Error::Io(e)) if is_disconnect(&e) => {
                    info!(peer = %self.peer, user, cmd, error = %e, ms, "connection lost");
                    break;
                }
                Err(e) => {
                    error!(peer = %self.peer, user, cmd, error = %e, ms, "failed; closing");
                    let _ = self
                        .conn
                        .write_error(ErrorCode::Internal, "internal server error")
                        .await;
                    // (A failed group commit sends nothing: shutting down would flush.)
                    if self.send_replies(true).await.is_ok() {
                        let _ = self.conn.shutdown().await;
                    }
                    break;
                }
            }
        }
        // Commits not yet durable are finished (a batch does not wait for a later one).
        let _ = self.settle().await;
        // Writes still running on the upload finish before its name is free again.
        if let Some(mut active) = self.upload.take() {
            let _ = active.upload.finish_writes().await;
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
    /// they go out with the next replies. Commits are made durable first, so no
    /// acknowledgment leaves before its file is on stable storage. A client that does not
    /// read its replies blocks this flush, and so stops being read from (backpressure).
    async fn send_replies(&mut self, closing: bool) -> Result<()> {
        if self.commit_failed {
            return Err(Error::Invalid("a group commit failed".into()));
        }
        let batch_full = self.unsynced.len() >= GROUP_COMMIT_MAX;
        if self.conn.has_buffered_input() && !closing && !batch_full {
            return Ok(());
        }
        self.settle().await?;
        self.conn.flush().await
    }

    /// Wait until every commit acknowledged in the output buffer is durable (implementations
    /// share one flush among many commits: group commit).
    async fn settle(&mut self) -> Result<()> {
        let settled = async {
            for durable in std::mem::take(&mut self.unsynced) {
                durable.wait().await?;
            }
            Ok(())
        }
        .await;
        self.held_reservations.clear();
        self.commit_failed |= settled.is_err();
        settled
    }

    async fn apply(&mut self, request: Request) -> Result<Outcome> {
        if !self.greeted && !matches!(request, Request::Hello { .. }) {
            return Err(Error::remote(
                ErrorCode::BadRequest,
                "the first message must be hello",
            ));
        }
        // Only the steps of an upload go on while earlier commits wait for their group
        // commit: any other request sees them done (read your writes), and its reply (a
        // listing, a file) never pushes their held acknowledgments out early.
        let upload_step = matches!(
            request,
            Request::Put { .. } | Request::PutData { .. } | Request::PutCommit { .. }
        );
        if !upload_step {
            self.settle().await?;
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
                let verifier = decode_verifier(&salt, iterations, &stored_key, &server_key)?;
                self.register(user, verifier).await
            }
            Request::AuthStart { message } => self.auth_start(&message).await,
            Request::AuthFinish { message } => self.auth_finish(&message).await,
            Request::AuthToken { token } => self.auth_token(token).await,
            Request::Logout => self.logout().await,
            Request::Ls {
                path,
                partial,
                after,
                limit,
            } => self.list(&path, partial, after, limit).await,
            Request::Stat { path, digest } => self.stat(&path, digest).await,
            Request::Mkdir { path, parents } => {
                let user = self.logged_in_user()?;
                self.shared.storage.mkdir(&user, &path, parents).await?;
                self.done().await
            }
            Request::Rm {
                path,
                recursive,
                partial,
            } => self.remove(&path, recursive, partial).await,
            Request::Mv {
                from,
                to,
                overwrite,
            } => {
                let user = self.logged_in_user()?;
                self.shared
                    .storage
                    .rename(&user, &from, &to, overwrite)
                    .await?;
                self.done().await
            }
            Request::Usage => self.usage().await,
            Request::Whoami => {
                let user = self.logged_in_user()?;
                self.conn.write_ok(&UserReply { user }).await?;
                Ok(Outcome::default())
            }
            Request::PasswdStart { message } => self.passwd_start(&message).await,
            Request::PasswdFinish {
                message,
                salt,
                iterations,
                stored_key,
                server_key,
                keep_sessions,
            } => {
                let verifier = decode_verifier(&salt, iterations, &stored_key, &server_key)?;
                self.passwd_finish(&message, verifier, keep_sessions).await
            }
            Request::Versions { path } => self.versions(&path).await,
            Request::Restore { path, version } => {
                let user = self.logged_in_user()?;
                self.shared
                    .storage
                    .restore(&user, &path, version.as_deref())
                    .await?;
                self.done().await
            }
            Request::Put {
                filename,
                size,
                restart,
                digest,
            } => self.put(filename, size, restart, digest).await,
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

    async fn done(&mut self) -> Result<Outcome> {
        self.conn.write_ok(&Done {}).await?;
        Ok(Outcome::default())
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

    async fn register(&mut self, user: String, verifier: Verifier) -> Result<Outcome> {
        check_user_name(&user)?;
        if let Err(wait) = self.shared.registrations.allow(
            self.peer.ip(),
            self.shared.config.registration_burst,
            Instant::now(),
        ) {
            return Err(Error::remote(
                ErrorCode::TooManyRequests,
                format!(
                    "too many registrations from your address; try again in {} s",
                    wait.as_secs().max(1)
                ),
            ));
        }
        let record = UserRecord {
            name: user.clone(),
            registered_at: now_iso8601(),
            last_login: None,
            verifier,
            disabled: false,
            sessions_after: None,
        };
        let shared = self.shared.clone();
        let name = user.clone();
        blocking(move || {
            shared.users.insert(record).map_err(|e| match e {
                UserTableError::NameTaken => Error::remote(
                    ErrorCode::NameTaken,
                    format!("the user name {name} is already taken"),
                ),
                other => user_table_error(other),
            })
        })
        .await?;
        // The name had no row, so sessions and a folder under it are a removed account's:
        // a new account must never inherit them. (Only after the row is ours: a refused
        // registration must not end the current owner's sessions.)
        let shared = self.shared.clone();
        let name = user.clone();
        blocking(move || shared.sessions.revoke_user(&name)).await?;
        if let Some(place) = self.shared.storage.retire_user(&user).await? {
            warn!(user, moved_to = %place, "the new account's name had an earlier account's files; moved them aside");
        }
        self.shared.storage.create_user(&user).await?;
        self.done().await
    }

    /// Start a SCRAM exchange: the attempt counts against the throttle from now on.
    /// (Not a method: `Handler` is not `Sync`, so no future may hold `&self` across an await.)
    async fn scram_start(
        shared: Arc<Shared>,
        peer: IpAddr,
        client_first: &str,
    ) -> Result<ScramExchange> {
        let bad = |e: scram::ScramError| Error::remote(ErrorCode::BadRequest, e.to_string());
        let name = ServerFirst::parse_user(client_first).map_err(bad)?;
        let valid = check_user_name(&name).is_ok();
        let attempt =
            shared
                .throttle
                .begin(valid.then_some(name.as_str()), peer, Instant::now())?;
        // Unknown (or impossible) names get a fake verifier, so the answer looks the same.
        let known = match valid {
            true => user_record(&shared, &name)
                .await?
                .map(|record| record.verifier),
            false => None,
        };
        let exists = known.is_some();
        let verifier = known.unwrap_or_else(|| scram::fake_verifier(&shared.secret, &name));
        let server_first = ServerFirst::new(client_first, verifier).map_err(bad)?;
        Ok(ScramExchange {
            user: name,
            exists,
            server_first,
            attempt,
        })
    }

    /// Finish a SCRAM exchange: the server-final message when the proof is right.
    fn scram_finish(exchange: ScramExchange, client_final: &str) -> Result<(String, String)> {
        match exchange.server_first.handle_client_final(client_final) {
            Ok(server_final) if exchange.exists => {
                exchange.attempt.succeeded();
                Ok((exchange.user, server_final))
            }
            _ => {
                exchange.attempt.failed();
                Err(Error::remote(
                    ErrorCode::AuthFailed,
                    "wrong user name or password",
                ))
            }
        }
    }

    async fn auth_start(&mut self, client_first: &str) -> Result<Outcome> {
        self.login = None; // an unfinished earlier attempt counts as failed
        let exchange = Self::scram_start(self.shared.clone(), self.peer.ip(), client_first).await?;
        let message = exchange.server_first.message();
        self.login = Some(exchange);
        self.server_first(message).await
    }

    /// The SCRAM server-first reply of a login or password change.
    async fn server_first(&mut self, message: String) -> Result<Outcome> {
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
        let Some(exchange) = self.login.take() else {
            return Err(Error::remote(
                ErrorCode::BadRequest,
                "auth_finish without auth_start",
            ));
        };
        let (name, server_final) = Self::scram_finish(exchange, client_final)?;
        // Only after a correct proof, so it tells a guesser nothing. The row is read
        // again: an administrator may have changed it during the exchange.
        let sessions_after = match user_record(&self.shared, &name).await? {
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
        // A full disk must not stop logins: the login time is best effort (kept in
        // memory and written with the next successful table write or flush).
        let shared = self.shared.clone();
        let user = name.clone();
        blocking(move || {
            let recorded = shared.users.record_login(&user, &now_iso8601());
            // A shared table gets them with the next periodic flush: a login must not cost
            // a conditional write racing every other server's.
            let at_once = shared.users.writes_logins_at_once();
            let flushed =
                recorded.and_then(|()| at_once.then(|| shared.users.flush_logins()).transpose());
            if let Err(e) = flushed {
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
            Ok(())
        })
        .await?;
        self.shared.storage.create_user(&name).await?;
        let shared = self.shared.clone();
        let user = name.clone();
        let token = blocking(move || shared.sessions.create(&user)).await?;
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
        let shared = self.shared.clone();
        let lookup = token.clone();
        let (user, created) = blocking(move || shared.sessions.session_of(&lookup)).await?;
        let refused = |message: &str| Err(Error::remote(ErrorCode::AuthFailed, message));
        match user_record(&self.shared, &user).await? {
            // A user removed from the table (by hand or `admin delete`) has no sessions.
            None => return refused("session expired or logged out: log in again"),
            Some(record) if record.disabled => {
                return refused("account disabled: ask the server's administrator")
            }
            Some(record) => {
                // A session older than the account belongs to an earlier account of this
                // name (registration also revokes those; this covers a failed revocation).
                let registered = unix_seconds(&record.registered_at);
                if registered.is_some_and(|at| (created as i64) < at) {
                    return refused("session expired or logged out: log in again");
                }
                let after = record.sessions_after.as_deref().and_then(unix_seconds);
                if after.is_some_and(|after| (created as i64) < after) {
                    return refused("session ended by the server's administrator: log in again");
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
        self.done().await
    }

    async fn passwd_start(&mut self, client_first: &str) -> Result<Outcome> {
        let user = self.logged_in_user()?;
        self.passwd = None;
        let exchange = Self::scram_start(self.shared.clone(), self.peer.ip(), client_first).await?;
        if exchange.user != user {
            return Err(Error::remote(
                ErrorCode::BadRequest,
                format!(
                    "passwd_start names {:?}, not the logged-in user",
                    exchange.user
                ),
            ));
        }
        let message = exchange.server_first.message();
        self.passwd = Some(exchange);
        self.server_first(message).await
    }

    async fn passwd_finish(
        &mut self,
        client_final: &str,
        verifier: Verifier,
        keep_sessions: bool,
    ) -> Result<Outcome> {
        let user = self.logged_in_user()?;
        let Some(exchange) = self.passwd.take() else {
            return Err(Error::remote(
                ErrorCode::BadRequest,
                "passwd_finish without passwd_start",
            ));
        };
        let (_, server_final) = Self::scram_finish(exchange, client_final)?;
        let shared = self.shared.clone();
        let name = user.clone();
        let old_token = self.token.clone();
        let token = blocking(move || {
            shared
                .users
                .set_verifier(&name, verifier, None)
                .map_err(user_table_error)?;
            let token = shared.sessions.create(&name)?;
            if !keep_sessions {
                shared.sessions.revoke_user_except(&name, &token)?;
            } else if let Some(old) = old_token {
                shared.sessions.revoke(&old)?;
            }
            Ok(token)
        })
        .await?;
        info!(user, keep_sessions, "password changed");
        self.token = Some(token.clone());
        self.conn
            .write_ok(&AuthReply {
                message: server_final,
                token: Some(token),
                user: Some(user),
            })
            .await?;
        Ok(Outcome::default())
    }

    fn logged_in_user(&self) -> Result<String> {
        self.user
            .clone()
            .ok_or_else(|| Error::remote(ErrorCode::NotLoggedIn, "not logged in: log in first"))
    }

    /// One page of a folder (or of the staged uploads), as a JSON body.
    async fn list(
        &mut self,
        path: &str,
        partial: bool,
        after: Option<String>,
        limit: Option<u32>,
    ) -> Result<Outcome> {
        let user = self.logged_in_user()?;
        let limit = limit.unwrap_or(MAX_LIST_PAGE).clamp(1, MAX_LIST_PAGE) as usize;
        let storage = self.shared.storage.clone();
        let (count, body, next) = if partial {
            let entries: Vec<PartialEntry> = storage
                .list_partial(&user)
                .await?
                .into_iter()
                .filter(|p| after.as_deref().is_none_or(|after| p.path.as_str() > after))
                .take(limit + 1)
                .map(|p| PartialEntry {
                    name: p.path,
                    received: p.received,
                    size: p.size,
                    updated: iso8601(p.updated),
                })
                .collect();
            let mut entries = entries;
            let next = (entries.len() > limit).then(|| {
                entries.truncate(limit);
                entries.last().map(|e| e.name.clone()).unwrap_or_default()
            });
            (entries.len(), to_json(&entries)?, next)
        } else {
            let page = storage.list(&user, path, after.as_deref(), limit).await?;
            let entries: Vec<FileEntry> = page.entries.into_iter().map(file_entry).collect();
            (entries.len(), to_json(&entries)?, page.next)
        };
        self.conn
            .write_ok(&ListReply {
                count,
                filesize: body.len() as u64,
                next,
            })
            .await?;
        self.conn.write_body(&body).await?;
        Ok(Outcome {
            bytes: body.len() as u64,
            close: false,
        })
    }

    async fn stat(&mut self, path: &str, digest: bool) -> Result<Outcome> {
        let user = self.logged_in_user()?;
        let entry = self.shared.storage.stat(&user, path).await?;
        let mut reply = file_entry(entry);
        if digest && reply.kind == EntryType::File {
            let file = self.shared.storage.open(&user, path).await?;
            reply.digest = Some(file_digest(file.chunks()).to_hex().to_string());
        }
        self.conn.write_ok(&reply).await?;
        Ok(Outcome::default())
    }

    async fn remove(&mut self, path: &str, recursive: bool, partial: bool) -> Result<Outcome> {
        let user = self.logged_in_user()?;
        if partial {
            self.shared.storage.remove_partial(&user, path).await?;
            return self.done().await;
        }
        let removed = self.shared.storage.remove(&user, path, recursive).await?;
        self.conn
            .write_ok(&RmReply {
                files: removed.files,
                bytes: removed.bytes,
            })
            .await?;
        Ok(Outcome::default())
    }

    async fn usage(&mut self) -> Result<Outcome> {
        let user = self.logged_in_user()?;
        let usage = self.shared.storage.usage(&user).await?;
        self.conn
            .write_ok(&UsageReply {
                files: usage.files,
                bytes: usage.file_bytes,
                versions: usage.versions,
                version_bytes: usage.version_bytes,
                staged_bytes: usage.staged.iter().map(|(_, size)| size).sum(),
                quota: self.shared.config.quota,
            })
            .await?;
        Ok(Outcome::default())
    }

    async fn versions(&mut self, path: &str) -> Result<Outcome> {
        let user = self.logged_in_user()?;
        let versions = self.shared.storage.versions(&user, path).await?;
        let reply = VersionsReply {
            versions: versions
                .into_iter()
                .map(|v| VersionEntry {
                    id: v.id,
                    kind: entry_type(v.kind),
                    size: v.size,
                    replaced: iso8601(v.replaced),
                })
                .collect(),
        };
        self.conn.write_ok(&reply).await?;
        Ok(Outcome::default())
    }

    async fn put(
        &mut self,
        path: String,
        size: u64,
        restart: bool,
        digest: Option<String>,
    ) -> Result<Outcome> {
        let user = self.logged_in_user()?;
        let path = canonical_path(&path)?;
        self.upload = None; // a new put abandons (but keeps staged) any earlier one
        let storage = self.shared.storage.clone();
        if let Some(digest) = digest {
            // Already there with the same content: nothing to send (like rsync).
            if let Ok(file) = storage.open(&user, &path).await {
                let same = file.size() == size
                    && file_digest(file.chunks())
                        .to_hex()
                        .as_str()
                        .eq_ignore_ascii_case(&digest);
                if same {
                    self.conn
                        .write_ok(&PutReply {
                            offset: size,
                            missing: Vec::new(),
                            unchanged: true,
                        })
                        .await?;
                    return Ok(Outcome::default());
                }
            }
        }
        let (upload, reservation) = match self.shared.config.quota {
            Some(quota) => {
                let (reservation, mut book) =
                    reserve_quota(&self.shared, &user, &path, size, quota).await?;
                let upload = storage.begin_upload(&user, &path, size, restart).await?;
                book.insert(reservation.id, (path.clone(), size));
                (upload, Some(reservation))
            }
            None => (
                storage.begin_upload(&user, &path, size, restart).await?,
                None,
            ),
        };
        let reply = PutReply {
            offset: upload.offset(),
            missing: upload.missing(),
            unchanged: false,
        };
        self.upload = Some(ActiveUpload {
            upload,
            _reservation: reservation,
        });
        self.conn.write_ok(&reply).await?;
        Ok(Outcome::default())
    }

    async fn put_data(&mut self, offset: u64, filesize: u64) -> Result<Outcome> {
        let started = match self.upload.as_mut() {
            None => Err(Error::remote(ErrorCode::BadRequest, "put_data without put")),
            Some(active) => active.upload.start_write(offset, filesize),
        };
        started?; // a refusal's body is skipped by the caller
        self.body_left = 0;
        let mut active = self.upload.take().expect("checked above");
        let received = self.receive_into(&mut active.upload, filesize).await;
        // On a lost connection the writes in flight finish before the upload is dropped,
        // so its name is free and its staged files settled when this connection ends.
        let finished = active.upload.finish_writes().await;
        received?;
        if let Some(buf) = finished? {
            self.shared.buffers.put(buf);
        }
        let offset = active.upload.offset();
        self.upload = Some(active);
        self.conn
            .write_ok(&PutReply {
                offset,
                missing: Vec::new(),
                unchanged: false,
            })
            .await?;
        Ok(Outcome {
            bytes: filesize,
            close: false,
        })
    }

    /// Move `len` body bytes into `upload`. The socket is waited on here, on the async
    /// side, holding no buffer: a stalled sender costs no thread and little memory. If
    /// the upload fails, the rest of the body is skipped so the connection stays in step.
    async fn receive_into(&mut self, upload: &mut Box<dyn Upload>, len: u64) -> Result<()> {
        let mut remaining = len;
        // Leases of the pool buffers this upload holds (the one being filled, the one
        // being written).
        let mut leases = Vec::with_capacity(2);
        while remaining > 0 {
            self.conn.wait_readable().await?;
            let (mut buf, lease) = match self.shared.buffers.try_get() {
                Some(taken) => taken,
                None => {
                    // All buffers are out: give back the one being written before waiting,
                    // so uploads never wait on each other's held buffers.
                    if let Some(buf) = upload.finish_writes().await? {
                        self.shared.buffers.put(buf);
                    }
                    leases.clear();
                    self.shared.buffers.get().await
                }
            };
            leases.push(lease);
            let want = buf.len().min(remaining as usize);
            let n = self.conn.read_body_available(&mut buf[..want]).await?;
            remaining -= n as u64;
            match upload.write(buf, n).await {
                Ok(Some(done)) => {
                    self.shared.buffers.put(done);
                    leases.pop();
                }
                Ok(None) => {}
                Err(e) => {
                    self.conn.skip_body(remaining).await?;
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    async fn put_commit(&mut self, digest: String, filesize: Option<u64>) -> Result<Outcome> {
        let Some(active) = self.upload.take() else {
            return Err(Error::remote(
                ErrorCode::BadRequest,
                "put_commit without a complete put",
            ));
        };
        let upload = &active.upload;
        // The body, if any: the sender's chunk hashes. Read into memory only when all the
        // data is staged, so its length is bounded by what actually arrived.
        let expected = upload.size().div_ceil(CHUNK_SIZE) * 32;
        let chunks = match filesize {
            Some(len) if len == expected && upload.offset() == upload.size() => {
                let mut body = vec![0u8; len as usize];
                self.body_left = 0;
                self.conn.read_body(&mut body).await?;
                let chunks: Vec<ChunkHash> = body
                    .chunks_exact(32)
                    .map(|c| c.try_into().expect("32 bytes"))
                    .collect();
                Some(chunks)
            }
            Some(len) if len != expected => {
                return Err(Error::remote(
                    ErrorCode::BadRequest,
                    format!("put_commit: {len} bytes of chunk hashes, expected {expected}"),
                ));
            }
            _ => None, // incomplete: the commit says so (a body is skipped by the caller)
        };
        let ActiveUpload {
            upload,
            _reservation: reservation,
        } = active;
        let committed = upload.commit(&digest, chunks).await?;
        // Awaited before the acknowledgment leaves (and when the connection ends). The
        // reservation lasts until then: a batched file counts once it has its name.
        self.unsynced.push(committed.durable);
        self.held_reservations.extend(reservation);
        let mut pruned = 0;
        if let (Some(quota), Some(user)) = (self.shared.config.quota, self.user.clone()) {
            // The replaced file became a version: old versions make room for it.
            let usage = self.shared.storage.usage(&user).await?;
            if usage.total() > quota {
                let (count, _) = self
                    .shared
                    .storage
                    .prune_versions(&user, usage.total() - quota)
                    .await?;
                pruned = count;
            }
        }
        self.conn
            .write_ok(&CommitReply {
                size: committed.size,
                digest: committed.digest,
                pruned_versions: pruned,
            })
            .await?;
        Ok(Outcome::default())
    }

    async fn get(
        &mut self,
        path: String,
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
        let file = self.shared.storage.open(&user, &path).await?;
        let (offset, restart_reason) =
            resume_offset(offset, check_chunk.as_deref(), file.chunks(), file.size());
        let filesize = file.size() - offset;
        let reply = GetReply {
            size: file.size(),
            digest: file_digest(file.chunks()).to_hex().to_string(),
            modified: iso8601(file.modified()),
            offset,
            filesize,
            restart_reason,
        };
        self.conn.write_ok(&reply).await?;
        self.send_file(file, offset, filesize).await?;
        Ok(Outcome {
            bytes: filesize,
            close: false,
        })
    }

    /// Stream `len` bytes of `file` from `offset`, reading the next block while the
    /// current one is sent. A reader that stops reading blocks only this task.
    async fn send_file(&mut self, file: Arc<dyn FileRead>, offset: u64, len: u64) -> Result<()> {
        let end = offset + len;
        let read = |at: u64, (buf, lease): (Vec<u8>, BufferLease)| {
            let file = file.clone();
            let task = tokio::spawn(async move { file.read_at(at, buf).await });
            (task, lease)
        };
        let mut at = offset;
        let mut next = if at < end {
            Some(read(at, self.shared.buffers.get().await))
        } else {
            None
        };
        while let Some((pending, lease)) = next.take() {
            let (buf, n) = pending
                .await
                .map_err(|e| Error::remote(ErrorCode::Internal, e.to_string()))??;
            let n = n.min((end - at) as usize);
            if n == 0 {
                return Err(Error::Invalid("the file shrank while it was sent".into()));
            }
            at += n as u64;
            // Read ahead while this block is sent, if a buffer is free now; else after.
            if at < end {
                next = self.shared.buffers.try_get().map(|taken| read(at, taken));
            }
            let sent = self.conn.write_body(&buf[..n]).await;
            self.shared.buffers.put(buf);
            drop(lease);
            sent?;
            if at < end && next.is_none() {
                next = Some(read(at, self.shared.buffers.get().await));
            }
        }
        Ok(())
    }
}

/// Reserve quota for an upload of `size` bytes to `path`: the user's files, versions,
/// staged uploads and other uploads in progress, plus this one, must fit. Versions are
/// deleted oldest first to make room (the file being replaced will become one).
async fn reserve_quota(
    shared: &Shared,
    user: &str,
    path: &str,
    size: u64,
    quota: u64,
) -> Result<(
    Reservation,
    tokio::sync::OwnedMutexGuard<HashMap<u64, (String, u64)>>,
)> {
    let book = shared.quota.book(user);
    let guard = book.clone().lock_owned().await;
    let storage = &shared.storage;
    let replaced = match storage.stat(user, path).await {
        Ok(entry) if entry.kind == Kind::File => entry.size,
        _ => 0,
    };
    let usage = storage.usage(user).await?;
    let in_flight: u64 = guard
        .values()
        .filter(|(p, _)| p != path)
        .map(|(_, s)| s)
        .sum();
    // A staged upload of a path in flight is already counted by its reservation.
    let staged: u64 = usage
        .staged
        .iter()
        .filter(|(p, _)| p != path && !guard.values().any(|(q, _)| q == p))
        .map(|(_, s)| s)
        .sum();
    let used = usage.file_bytes + usage.version_bytes + staged + in_flight;
    let fixed = used - usage.version_bytes - replaced.min(usage.file_bytes);
    if fixed.saturating_add(size) > quota {
        return Err(Error::remote(
            ErrorCode::NoSpace,
            format!(
                "quota exceeded: {path} needs {size} bytes, {} of your {quota}-byte quota are free",
                quota.saturating_sub(fixed)
            ),
        ));
    }
    if used.saturating_add(size) > quota {
        let (count, freed) = storage.prune_versions(user, used + size - quota).await?;
        info!(
            user,
            count, freed, "deleted old versions to stay within the quota"
        );
    }
    let id = shared
        .quota
        .next_id
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok((Reservation { book, id }, guard))
}

/// The body length a header announces: `filesize` if present. A `filesize` that is not a
/// u64 leaves the connection out of step: it is closed.
fn announced_body(header: &Map<String, Value>) -> Result<u64> {
    match header.get("filesize") {
        None | Some(Value::Null) => Ok(0),
        Some(value) => value
            .as_u64()
            .ok_or_else(|| Error::Protocol("filesize must be a whole number of bytes".into())),
    }
}

fn is_disconnect(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof | TimedOut
    )
}

/// Commands whose success is logged at DEBUG, not INFO: lookups that change nothing (a
/// browsing client or an `mput` sends one per file), and the start of an upload (its
/// `put_data` and `put_commit` are logged). Changes, transfers and every refusal are INFO.
const QUIET_COMMANDS: [&str; 6] = ["put", "ls", "stat", "usage", "whoami", "versions"];

fn to_json<T: serde::Serialize>(value: &[T]) -> Result<Vec<u8>> {
    // About 100 bytes per listed entry: a page is serialized without regrowing.
    let mut json = Vec::with_capacity(64 + 112 * value.len());
    serde_json::to_writer(&mut json, value).map_err(|e| Error::Invalid(e.to_string()))?;
    Ok(json)
}

fn entry_type(kind: Kind) -> EntryType {
    match kind {
        Kind::File => EntryType::File,
        Kind::Dir => EntryType::Dir,
    }
}

fn file_entry(entry: Entry) -> FileEntry {
    FileEntry {
        name: entry.name,
        kind: entry_type(entry.kind),
        size: entry.size,
        modified: iso8601(entry.modified),
        digest: None,
    }
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
    if let UserTableError::Busy(_) = e {
        // Other servers sharing the table kept winning: the client may simply retry.
        return Error::remote(ErrorCode::Busy, "the user table is busy; try again");
    }
    Error::remote(ErrorCode::Internal, format!("user table: {e}"))
}

/// A user's row, looked up on a blocking thread (a shared table may ask the bucket).
async fn user_record(shared: &Arc<Shared>, name: &str) -> Result<Option<UserRecord>> {
    let shared = shared.clone();
    let name = name.to_string();
    blocking(move || Ok(shared.users.get(&name))).await
}

/// Run blocking work (disk, fsync, the xlsx) off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::remote(ErrorCode::Internal, format!("worker failed: {e}")))?
}
