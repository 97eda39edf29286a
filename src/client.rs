//! The client library: one connection to a server, one method per command.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use base64::Engine;
use tokio::net::TcpStream;

use crate::conncheck;
use crate::digest::{file_digest, hash_reader, ChunkHash, ChunkHasher, CHUNK_SIZE};
use crate::error::{Error, ErrorCode, Result};
use crate::names::{check_file_name, check_user_name};
use crate::protocol::{
    parse_reply, AuthReply, CommitReply, Connection, Done, FileEntry, GetReply, HelloReply,
    ListReply, PartialEntry, PutReply, Request, UserReply, PROTOCOL_VERSION,
};
use crate::scram::{ClientFirst, Verifier};
use crate::tls::{self, ClientTls};
use crate::transfer::{receive_body, send_body, BodySink, BodySource};

/// Largest `ls` reply accepted (a listing, not a file: a few hundred thousand names).
const MAX_LISTING_LEN: u64 = 256 * 1024 * 1024;

/// What a transfer reports while it runs (the command line draws a progress bar).
pub trait Progress: Send {
    /// The transfer of `total` bytes starts, `from` of them already in place.
    fn start(&mut self, _total: u64, _from: u64) {}
    fn advance(&mut self, _bytes: u64) {}
    fn finish(&mut self) {}
    /// Something the user should know (a resume, a restart and why).
    fn notice(&mut self, _message: &str) {}
}

/// Reports nothing.
pub struct NoProgress;
impl Progress for NoProgress {}

/// How a finished transfer went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferOutcome {
    pub size: u64,
    /// Bytes that were already in place and not sent again.
    pub resumed_from: u64,
    /// The verified checksum (hex) of the whole file.
    pub digest: String,
}

/// How to reach a server.
#[derive(Clone, Debug, Default)]
pub struct ConnectOptions {
    /// How to check the server's certificate; `None` is plain TCP (`--no-tls`).
    pub tls: Option<ClientTls>,
    /// The shared secret for the server's connection check (`--secret-file`).
    pub secret: Option<Vec<u8>>,
}

pub struct Client {
    conn: Connection,
    newly_pinned: Option<String>,
}

impl Client {
    /// Connect to `addr` (`host:port`) over plain TCP and agree on the protocol version.
    pub async fn connect(addr: &str) -> Result<Client> {
        Client::connect_with(addr, &ConnectOptions::default()).await
    }

    /// Connect with TLS and/or the connection check as `options` say.
    pub async fn connect_with(addr: &str, options: &ConnectOptions) -> Result<Client> {
        let socket = TcpStream::connect(addr).await.map_err(|e| {
            Error::Invalid(format!("cannot reach the netdisk server at {addr}: {e}"))
        })?;
        socket.set_nodelay(true)?;
        let (mut conn, newly_pinned) = match &options.tls {
            None => (Connection::new(socket), None),
            Some(mode) => {
                let connected = tls::connect(socket, addr, mode).await?;
                (Connection::new(connected.stream), connected.newly_pinned)
            }
        };
        if let Some(secret) = &options.secret {
            conncheck::answer_challenge(&mut conn, secret).await?;
        }
        conn.write_header(&Request::Hello {
            version: PROTOCOL_VERSION,
            client: format!("netdisk {}", env!("CARGO_PKG_VERSION")),
        })
        .await?;
        conn.flush().await?;
        let header = conn.read_header().await.map_err(|e| match e {
            // A TLS server talked to in plain text, or a closed check, ends here.
            Error::ConnectionClosed | Error::Protocol(_) => Error::Invalid(format!(
                "the server at {addr} closed the connection during the greeting (does it use TLS, or require --secret-file?)"
            )),
            other => other,
        })?;
        let header = header.ok_or_else(|| {
            Error::Invalid(format!(
                "the server at {addr} closed the connection during the greeting"
            ))
        })?;
        if header.get("cmd").and_then(|c| c.as_str()) == Some("challenge") {
            return Err(Error::Invalid(format!(
                "the server at {addr} requires a shared secret: pass --secret-file FILE"
            )));
        }
        let _: HelloReply = parse_reply(header)?;
        Ok(Client { conn, newly_pinned })
    }

    /// The server's certificate fingerprint, if this connection recorded it for the
    /// first time (trust on first use).
    pub fn newly_pinned(&self) -> Option<&str> {
        self.newly_pinned.as_deref()
    }

    /// Create an account. Only the SCRAM verifier derived here is sent, never the password.
    pub async fn register(&mut self, user: &str, password: &str, iterations: u32) -> Result<()> {
        check_user_name(user)?;
        let password = password.to_string();
        let verifier = blocking(move || Ok(Verifier::new(&password, iterations))).await?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let _: Done = self
            .conn
            .call(&Request::Register {
                user: user.to_string(),
                salt: b64.encode(&verifier.salt),
                iterations: verifier.iterations,
                stored_key: b64.encode(verifier.stored_key),
                server_key: b64.encode(verifier.server_key),
            })
            .await?;
        Ok(())
    }

    /// Log in with SCRAM-SHA-256; returns the session token. The server proves it holds
    /// the verifier too, so a fake server is noticed.
    pub async fn login(&mut self, user: &str, password: &str) -> Result<String> {
        check_user_name(user)?;
        let first = ClientFirst::new(user).map_err(|e| Error::Invalid(e.to_string()))?;
        let reply: AuthReply = self
            .conn
            .call(&Request::AuthStart {
                message: first.message(),
            })
            .await?;
        let password = password.to_string();
        let last = blocking(move || {
            first
                .handle_server_first(&reply.message, &password)
                .map_err(|e| Error::Protocol(format!("login: {e}")))
        })
        .await?;
        let reply: AuthReply = self
            .conn
            .call(&Request::AuthFinish {
                message: last.message(),
            })
            .await?;
        last.verify_server_final(&reply.message).map_err(|e| {
            Error::Protocol(format!("the server failed to prove its identity: {e}"))
        })?;
        reply
            .token
            .ok_or_else(|| Error::Protocol("login reply without a session token".into()))
    }

    /// Resume a saved session; returns its user.
    pub async fn login_with_token(&mut self, token: &str) -> Result<String> {
        let reply: UserReply = self
            .conn
            .call(&Request::AuthToken {
                token: token.to_string(),
            })
            .await?;
        Ok(reply.user)
    }

    /// End the session on the server (its token stops working).
    pub async fn logout(&mut self) -> Result<()> {
        let _: Done = self.conn.call(&Request::Logout).await?;
        Ok(())
    }

    /// The user's files.
    pub async fn list(&mut self) -> Result<Vec<FileEntry>> {
        self.list_body(false).await
    }

    /// The user's staged, unfinished uploads.
    pub async fn list_partial(&mut self) -> Result<Vec<PartialEntry>> {
        self.list_body(true).await
    }

    async fn list_body<T: serde::de::DeserializeOwned>(&mut self, partial: bool) -> Result<T> {
        let reply: ListReply = self
            .conn
            .call(&Request::Ls {
                path: String::new(),
                partial,
                after: None,
                limit: None,
            })
            .await?;
        if reply.filesize > MAX_LISTING_LEN {
            return Err(Error::Protocol("listing too large".into()));
        }
        let mut body = vec![0u8; reply.filesize as usize];
        self.conn.read_body(&mut body).await?;
        serde_json::from_slice(&body).map_err(|e| Error::Protocol(format!("bad listing: {e}")))
    }

    /// Upload `local` as `remote`, overwriting it. Continues a staged partial upload of
    /// the same name and size unless `restart`. If the staged bytes turn out not to match
    /// the local file, the server keeps the chunks that do and only the others are sent
    /// again; should that fail too (the file changing while it is sent), starts over once.
    pub async fn put(
        &mut self,
        local: &Path,
        remote: &str,
        restart: bool,
        progress: &mut dyn Progress,
    ) -> Result<TransferOutcome> {
        check_file_name(remote)?;
        let mut restart = restart;
        let mut retries = 0;
        loop {
            match self.put_once(local, remote, restart, progress).await {
                Err(Error::Remote {
                    code: ErrorCode::ChecksumMismatch,
                    ..
                }) if retries < 2 => {
                    retries += 1;
                    progress.finish();
                    restart = retries == 2;
                    if restart {
                        progress
                            .notice("the upload did not match the local file again; starting over");
                    }
                }
                other => return other,
            }
        }
    }

    async fn put_once(
        &mut self,
        local: &Path,
        remote: &str,
        restart: bool,
        progress: &mut dyn Progress,
    ) -> Result<TransferOutcome> {
        let mut file = open_local(local)?;
        let size = file.metadata()?.len();
        let reply: PutReply = self
            .conn
            .call(&Request::Put {
                filename: remote.to_string(),
                size,
                restart,
                digest: None,
            })
            .await?;
        let offset = reply.offset;
        if offset > size || !(offset.is_multiple_of(CHUNK_SIZE) || offset == size) {
            return Err(Error::Protocol(format!(
                "server asked to resume at {offset}"
            )));
        }
        // Ranges to send again: whole chunks, in order, before `offset`.
        let mut previous_end = 0u64;
        for &(start, len) in &reply.missing {
            let end = start.saturating_add(len);
            if start < previous_end || !start.is_multiple_of(CHUNK_SIZE) || len == 0 || end > offset
            {
                return Err(Error::Protocol(format!(
                    "server asked for {len} bytes at {start} again"
                )));
            }
            previous_end = end;
        }
        let resend: u64 = reply.missing.iter().map(|&(_, len)| len).sum();
        // (After a mismatch everything may be staged but the chunks that differ.)
        if offset > 0 && (resend == 0 || offset < size) {
            progress.notice(&format!("resuming the upload of {remote} at byte {offset}"));
        }
        if resend > 0 {
            progress.notice(&format!(
                "{resend} bytes staged earlier differ from the local file; sending them again"
            ));
        }
        let to_send = size - offset + resend;
        // The staged prefix is hashed here while the rest streams, never before.
        let prefix = hash_prefix(open_local(local)?, offset);
        progress.start(size, size - to_send);
        // Requests are pipelined; their replies (few: the server lists at most a few
        // hundred missing ranges) are read after the commit.
        for &(start, len) in &reply.missing {
            self.conn
                .write_header(&Request::PutData {
                    offset: start,
                    filesize: len,
                })
                .await?;
            let mut part = open_local(local)?;
            part.seek(SeekFrom::Start(start))?;
            send_body(&mut self.conn, len, PlainReader(part), &mut |n| {
                progress.advance(n)
            })
            .await?;
        }
        file.seek(SeekFrom::Start(offset))?;
        self.conn
            .write_header(&Request::PutData {
                offset,
                filesize: size - offset,
            })
            .await?;
        let source = HashingReader {
            file,
            hasher: ChunkHasher::new(),
        };
        let source = send_body(&mut self.conn, size - offset, source, &mut |n| {
            progress.advance(n)
        })
        .await?;
        let mut chunks = join_prefix(prefix).await?;
        chunks.extend(source.hasher.finish_chunks());
        let digest = self.write_commit(&chunks).await?;
        self.conn.flush().await?;
        // One reply per request, in order: each put_data's, then put_commit's.
        let mut data_reply = Ok(());
        for _ in 0..=reply.missing.len() {
            let this = self.conn.read_reply::<PutReply>().await.map(drop);
            data_reply = data_reply.and(this);
        }
        let commit_reply = self.conn.read_reply::<CommitReply>().await;
        data_reply?;
        let commit = commit_reply?;
        progress.finish();
        verify_commit(&commit, size, digest, size - to_send)
    }

    /// Download `remote` into `local`. With `resume`, an existing local file is taken as a
    /// partial copy and only the rest is fetched; a partial copy that turns out not to be
    /// a prefix of the server's file (it changed, or the data differs) is noticed and the
    /// download starts over. Without `resume` the local file is overwritten.
    pub async fn get(
        &mut self,
        remote: &str,
        local: &Path,
        resume: bool,
        progress: &mut dyn Progress,
    ) -> Result<TransferOutcome> {
        check_file_name(remote)?;
        match self.get_once(remote, local, resume, progress).await {
            Err(Error::ChecksumMismatch(_)) if resume => {
                progress.notice(
                    "the local partial copy does not match the file on the server; starting over",
                );
                self.get_once(remote, local, false, progress).await
            }
            other => other,
        }
    }

    async fn get_once(
        &mut self,
        remote: &str,
        local: &Path,
        resume: bool,
        progress: &mut dyn Progress,
    ) -> Result<TransferOutcome> {
        let local_len = match std::fs::metadata(local) {
            Ok(meta) if resume && meta.is_file() => meta.len(),
            _ => 0,
        };
        // Resume at a chunk boundary, so the prefix and the rest hash independently.
        let wanted = local_len / CHUNK_SIZE * CHUNK_SIZE;
        let check_chunk = if wanted > 0 {
            Some(last_chunk_hash(local, wanted)?)
        } else {
            None
        };
        self.conn
            .write_header(&Request::Get {
                filename: remote.to_string(),
                offset: wanted,
                check_chunk,
            })
            .await?;
        self.conn.flush().await?;
        let reply: GetReply = self.conn.read_reply().await?;
        if reply.offset > wanted {
            return Err(Error::Protocol("inconsistent get reply".into()));
        }
        if let Some(reason) = &reply.restart_reason {
            progress.notice(&format!("{reason}; starting over"));
        } else if reply.offset > 0 {
            progress.notice(&format!(
                "resuming the download of {remote} at byte {}",
                reply.offset
            ));
        }
        self.receive_download(&reply, local, progress).await
    }

    /// Receive the body of a `get` reply into `local` (kept up to `reply.offset`) and
    /// verify the whole file. If `local` cannot be written, the body is skipped so the
    /// connection stays usable.
    async fn receive_download(
        &mut self,
        reply: &GetReply,
        local: &Path,
        progress: &mut dyn Progress,
    ) -> Result<TransferOutcome> {
        let offset = reply.offset;
        if reply.filesize != reply.size.saturating_sub(offset) {
            return Err(Error::Protocol("inconsistent get reply".into()));
        }
        let opened = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(local);
        let mut file = match opened {
            Ok(file) => file,
            Err(e) => {
                self.conn.skip_body(reply.filesize).await?;
                return Err(Error::Invalid(format!(
                    "cannot write {}: {e}",
                    local.display()
                )));
            }
        };
        file.set_len(offset)?;
        file.seek(SeekFrom::Start(offset))?;
        let prefix = hash_prefix(open_local(local)?, offset);
        progress.start(reply.size, offset);
        let sink = HashingWriter {
            file,
            hasher: ChunkHasher::new(),
        };
        let sink = receive_body(&mut self.conn, reply.filesize, sink, &mut |n| {
            progress.advance(n)
        })
        .await?;
        let mut chunks = join_prefix(prefix).await?;
        chunks.extend(sink.hasher.finish_chunks());
        progress.finish();
        let digest = file_digest(&chunks).to_hex().to_string();
        if digest != reply.digest {
            return Err(Error::ChecksumMismatch(format!(
                "{} does not match the server's checksum (got {digest}, expected {})",
                local.display(),
                reply.digest
            )));
        }
        Ok(TransferOutcome {
            size: reply.size,
            resumed_from: offset,
            digest,
        })
    }

    /// Upload many files over this one connection, pipelined (like ftp's `mput`): the
    /// requests of up to [`PIPELINE_WINDOW`] files are in flight before the first reply is
    /// read, so small files cost no round trip each. Each `(local, remote)` replaces the
    /// remote file (no resume). One result per file, in order.
    pub async fn put_many(
        &mut self,
        files: &[(PathBuf, String)],
        progress: &mut dyn Progress,
    ) -> Result<Vec<Result<TransferOutcome>>> {
        let mut results: Vec<Option<Result<TransferOutcome>>> = Vec::new();
        let mut in_flight: VecDeque<(usize, u64, String)> = VecDeque::new();
        for (local, remote) in files {
            let index = results.len();
            results.push(None);
            let content = match check_file_name(remote).and_then(|_| read_small_file(local)) {
                Ok(Some(content)) => content,
                Ok(None) => {
                    // Large: after the pipeline drains, on its own with resume.
                    self.drain_puts(&mut in_flight, &mut results).await?;
                    results[index] = Some(self.put(local, remote, true, progress).await);
                    continue;
                }
                Err(e) => {
                    results[index] = Some(Err(e));
                    continue;
                }
            };
            let mut hasher = ChunkHasher::new();
            hasher.update(&content);
            let size = content.len() as u64;
            self.conn
                .write_header(&Request::Put {
                    filename: remote.clone(),
                    size,
                    restart: true,
                    digest: None,
                })
                .await?;
            self.conn
                .write_header(&Request::PutData {
                    offset: 0,
                    filesize: size,
                })
                .await?;
            self.conn.write_body(&content).await?;
            let digest = self.write_commit(&hasher.finish_chunks()).await?;
            in_flight.push_back((index, size, digest));
            if in_flight.len() >= PIPELINE_WINDOW {
                self.conn.flush().await?;
                self.read_put_replies(&mut in_flight, &mut results, progress)
                    .await?;
            }
        }
        self.drain_puts(&mut in_flight, &mut results).await?;
        Ok(results
            .into_iter()
            .map(|r| r.expect("every file has a result"))
            .collect())
    }

    async fn drain_puts(
        &mut self,
        in_flight: &mut VecDeque<(usize, u64, String)>,
        results: &mut [Option<Result<TransferOutcome>>],
    ) -> Result<()> {
        self.conn.flush().await?;
        while !in_flight.is_empty() {
            self.read_put_replies(in_flight, results, &mut NoProgress)
                .await?;
        }
        Ok(())
    }

    /// Read the three replies (put, put_data, put_commit) of the oldest pipelined file.
    /// A connection-level failure is returned; a refused file becomes its result.
    async fn read_put_replies(
        &mut self,
        in_flight: &mut VecDeque<(usize, u64, String)>,
        results: &mut [Option<Result<TransferOutcome>>],
        progress: &mut dyn Progress,
    ) -> Result<()> {
        let Some((index, size, digest)) = in_flight.pop_front() else {
            return Ok(());
        };
        let put = keep_remote(self.conn.read_reply::<PutReply>().await)?;
        let data = keep_remote(self.conn.read_reply::<PutReply>().await)?;
        let commit = keep_remote(self.conn.read_reply::<CommitReply>().await)?;
        let result = put
            .and(data)
            .and(commit)
            .and_then(|commit| verify_commit(&commit, size, digest, 0));
        progress.advance(size);
        results[index] = Some(result);
        Ok(())
    }

    /// Download many files over this one connection, pipelined (like ftp's `mget`); each
    /// `(remote, local)` overwrites `local`. One result per file, in order.
    pub async fn get_many(
        &mut self,
        files: &[(String, PathBuf)],
        progress: &mut dyn Progress,
    ) -> Result<Vec<Result<TransferOutcome>>> {
        let mut results = Vec::with_capacity(files.len());
        let mut sent = 0;
        for (index, (_, local)) in files.iter().enumerate() {
            // Keep up to PIPELINE_WINDOW requests ahead of the replies.
            while sent < files.len() && sent < index + PIPELINE_WINDOW {
                self.conn
                    .write_header(&Request::Get {
                        filename: files[sent].0.clone(),
                        offset: 0,
                        check_chunk: None,
                    })
                    .await?;
                sent += 1;
            }
            self.conn.flush().await?;
            let result = match keep_remote(self.conn.read_reply::<GetReply>().await)? {
                Ok(reply) if reply.offset == 0 => {
                    let outcome = self.receive_download(&reply, local, &mut NoProgress).await;
                    // A local failure (cannot write, checksum) is this file's; a broken
                    // connection ends everything.
                    match outcome {
                        Err(e @ (Error::Io(_) | Error::ConnectionClosed | Error::Protocol(_))) => {
                            return Err(e)
                        }
                        other => other,
                    }
                }
                Ok(_) => return Err(Error::Protocol("unasked resume in a get reply".into())),
                Err(e) => Err(e),
            };
            if let Ok(outcome) = &result {
                progress.advance(outcome.size);
            }
            results.push(result);
        }
        Ok(results)
    }

    /// Queue a `put_commit` for a file with these chunk hashes; returns its digest. The
    /// chunk hashes go along, so that on a mismatch the server keeps what matches.
    async fn write_commit(&mut self, chunks: &[ChunkHash]) -> Result<String> {
        let digest = file_digest(chunks).to_hex().to_string();
        let hashes = chunks.concat();
        self.conn
            .write_header(&Request::PutCommit {
                digest: digest.clone(),
                filesize: Some(hashes.len() as u64),
            })
            .await?;
        self.conn.write_body(&hashes).await?;
        Ok(digest)
    }

    /// Say goodbye and close the connection.
    pub async fn quit(mut self) -> Result<()> {
        let _: Done = self.conn.call(&Request::Quit).await?;
        Ok(())
    }
}

/// The end-to-end check of an upload: the server stored what was sent.
fn verify_commit(
    commit: &CommitReply,
    size: u64,
    digest: String,
    resumed_from: u64,
) -> Result<TransferOutcome> {
    if commit.digest != digest || commit.size != size {
        return Err(Error::ChecksumMismatch(format!(
            "the server stored {} bytes with checksum {}, expected {size} bytes with {digest}",
            commit.size, commit.digest
        )));
    }
    Ok(TransferOutcome {
        size,
        resumed_from,
        digest,
    })
}

/// Requests of this many files are in flight at once in `put_many` / `get_many`.
pub const PIPELINE_WINDOW: usize = 32;

/// Files up to this size are read whole and pipelined by `put_many`.
const SMALL_FILE: u64 = 1024 * 1024;

/// The content of `path` if it is a small file, `None` if it is large.
fn read_small_file(path: &Path) -> Result<Option<Vec<u8>>> {
    let mut file = open_local(path)?;
    if file.metadata()?.len() > SMALL_FILE {
        return Ok(None);
    }
    let mut content = Vec::new();
    file.read_to_end(&mut content)?;
    Ok(Some(content))
}

/// Split a reply into a connection-level failure (outer) and the server's refusal of this
/// one request (inner), which leaves the connection usable.
fn keep_remote<T>(reply: Result<T>) -> Result<Result<T>> {
    match reply {
        Ok(value) => Ok(Ok(value)),
        Err(e @ Error::Remote { .. }) => Ok(Err(e)),
        Err(e) => Err(e),
    }
}

fn open_local(path: &Path) -> Result<File> {
    let file = File::open(path)
        .map_err(|e| Error::Invalid(format!("cannot read {}: {e}", path.display())))?;
    if !file.metadata()?.is_file() {
        return Err(Error::Invalid(format!("{} is not a file", path.display())));
    }
    Ok(file)
}

/// Hash the first `len` bytes of `file` on a blocking thread.
fn hash_prefix(file: File, len: u64) -> tokio::task::JoinHandle<std::io::Result<Vec<ChunkHash>>> {
    tokio::task::spawn_blocking(move || hash_reader(file.take(len)))
}

async fn join_prefix(
    task: tokio::task::JoinHandle<std::io::Result<Vec<ChunkHash>>>,
) -> Result<Vec<ChunkHash>> {
    Ok(task
        .await
        .map_err(|e| Error::Invalid(format!("hashing failed: {e}")))??)
}

/// BLAKE3 of the chunk that ends at `end` in the local file.
fn last_chunk_hash(path: &Path, end: u64) -> Result<String> {
    let mut file = open_local(path)?;
    file.seek(SeekFrom::Start(end - CHUNK_SIZE))?;
    let chunks = hash_reader(file.take(CHUNK_SIZE))?;
    Ok(chunks.first().map(hex::encode).unwrap_or_default())
}

/// Reads a range of the local file for `put` (chunks sent again; hashed with the prefix).
struct PlainReader(File);

impl BodySource for PlainReader {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        Ok(self.0.read(buf)?)
    }
}

/// Reads the local file for `put`, hashing what it reads.
struct HashingReader {
    file: File,
    hasher: ChunkHasher,
}

impl BodySource for HashingReader {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        let n = self.file.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Writes the local file for `get`, hashing what it writes.
struct HashingWriter {
    file: File,
    hasher: ChunkHasher,
}

impl BodySink for HashingWriter {
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.file.write_all(bytes)?;
        self.hasher.update(bytes);
        Ok(())
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::Invalid(format!("worker failed: {e}")))?
}
