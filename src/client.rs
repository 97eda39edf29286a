//! The client library: one connection to a server, one method per command.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;

use base64::Engine;
use tokio::net::TcpStream;

use crate::conncheck;
use crate::digest::{file_digest, hash_reader, ChunkHash, ChunkHasher, CHUNK_SIZE};
use crate::error::{Error, ErrorCode, Result};
use crate::names::{check_file_name, check_user_name, split_remote_path, to_nfc};
use crate::protocol::{
    parse_reply, AuthReply, CommitReply, Connection, Done, EntryType, FileEntry, GetReply,
    HelloReply, ListReply, PartialEntry, PutReply, Request, RmReply, UsageReply, UserReply,
    VersionEntry, VersionsReply, PROTOCOL_VERSION,
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
    /// Bytes that need not move (already in place, unchanged): counted as done, but not
    /// in the transfer rate.
    fn skip(&mut self, bytes: u64) {
        self.advance(bytes);
    }
    fn finish(&mut self) {}
    /// Something the user should know (a resume, a restart and why).
    fn notice(&mut self, _message: &str) {}
    /// A transfer of many files will move `total` files (`put -r`, `get -r`).
    fn files_total(&mut self, _total: u64) {}
    /// One more of those files is done (sent, fetched, unchanged or failed).
    fn file_done(&mut self) {}
}

/// One progress shared by the connections of a batch (see `put_many_shared`).
struct SharedProgress<'a, 'b>(&'a std::sync::Mutex<&'b mut dyn Progress>);

impl SharedProgress<'_, '_> {
    fn with(&self, f: impl FnOnce(&mut dyn Progress)) {
        let mut progress = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut **progress);
    }
}

impl Progress for SharedProgress<'_, '_> {
    fn start(&mut self, total: u64, from: u64) {
        self.with(|p| p.start(total, from));
    }
    fn advance(&mut self, bytes: u64) {
        self.with(|p| p.advance(bytes));
    }
    fn skip(&mut self, bytes: u64) {
        self.with(|p| p.skip(bytes));
    }
    fn finish(&mut self) {
        self.with(|p| p.finish());
    }
    fn notice(&mut self, message: &str) {
        self.with(|p| p.notice(message));
    }
    fn files_total(&mut self, total: u64) {
        self.with(|p| p.files_total(total));
    }
    fn file_done(&mut self) {
        self.with(|p| p.file_done());
    }
}

/// One overall progress for a batch: the per-file `start`/`finish` of the single-file
/// transfers inside become plain advances of the batch's bar.
struct Overall<'a>(&'a mut dyn Progress);

impl Progress for Overall<'_> {
    fn start(&mut self, _total: u64, from: u64) {
        self.0.skip(from);
    }
    fn advance(&mut self, bytes: u64) {
        self.0.advance(bytes);
    }
    fn skip(&mut self, bytes: u64) {
        self.0.skip(bytes);
    }
    fn notice(&mut self, message: &str) {
        self.0.notice(message);
    }
    fn files_total(&mut self, total: u64) {
        self.0.files_total(total);
    }
    fn file_done(&mut self) {
        self.0.file_done();
    }
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
    /// More connections, logged in as the same user, that many-file uploads share their
    /// files with (see [`Client::add_upload_helper`]).
    helpers: Vec<Client>,
}

impl Client {
    /// Connect to `addr` (`host:port`) over plain TCP and agree on the protocol version.
    pub async fn connect(addr: &str) -> Result<Client> {
        Client::connect_with(addr, &ConnectOptions::default()).await
    }

    /// Connect with TLS and/or the connection check as `options` say.
    pub async fn connect_with(addr: &str, options: &ConnectOptions) -> Result<Client> {
        let socket = TcpStream::connect(addr).await.map_err(|e| {
            Error::Invalid(format!(
                "cannot reach the netdisk server at {addr}: {e}; is it running, and is --server right?"
            ))
        })?;
        socket.set_nodelay(true)?;
        let (mut conn, newly_pinned) = match &options.tls {
            None => (Connection::new(socket), None),
            Some(mode) => {
                let connected = tls::connect(socket, addr, mode).await?;
                (Connection::new(connected.stream), connected.newly_pinned)
            }
        };
        // What a failure at each step of the greeting most likely means.
        let tls_on_there = || {
            Error::Invalid(format!(
                "the server at {addr} uses TLS but this client has TLS off: drop --no-tls (and NETDISK_NO_TLS)"
            ))
        };
        if let Some(secret) = &options.secret {
            conncheck::answer_challenge(&mut conn, secret)
                .await
                .map_err(|e| match e {
                    Error::Remote { .. } => e,
                    _ if options.tls.is_none() => tls_on_there(),
                    _ => Error::Invalid(format!(
                        "the server at {addr} closed the connection before its connection check (does it use --secret-file?)"
                    )),
                })?;
        }
        conn.write_header(&Request::Hello {
            version: PROTOCOL_VERSION,
            client: format!("netdisk {}", env!("CARGO_PKG_VERSION")),
        })
        .await?;
        conn.flush().await?;
        let closed = || {
            if options.secret.is_some() {
                Error::Invalid(
                    "the server refused the connection secret: use the same --secret-file as the server"
                        .to_string(),
                )
            } else if options.tls.is_none() {
                tls_on_there()
            } else {
                Error::Invalid(format!(
                    "the server at {addr} closed the connection during the greeting (does it require --secret-file?)"
                ))
            }
        };
        let header = conn.read_header().await.map_err(|e| match e {
            // A TLS server talked to in plain text, or a failed check, ends here.
            Error::ConnectionClosed | Error::Protocol(_) | Error::Io(_) => closed(),
            other => other,
        })?;
        let header = header.ok_or_else(closed)?;
        if header.get("cmd").and_then(|c| c.as_str()) == Some("challenge") {
            return Err(Error::Invalid(format!(
                "the server at {addr} requires a shared secret: pass --secret-file FILE"
            )));
        }
        let _: HelloReply = parse_reply(header)?;
        Ok(Client {
            conn,
            newly_pinned,
            helpers: Vec::new(),
        })
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
        // A password SASLprep refuses is refused here, not discovered at the first login.
        let verifier = blocking(move || {
            Verifier::try_new(&password, iterations).map_err(|e| Error::Invalid(e.to_string()))
        })
        .await?;
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

    /// The files and folders in the user's root folder.
    pub async fn list(&mut self) -> Result<Vec<FileEntry>> {
        self.list_dir("").await
    }

    /// The files and folders in one remote folder (`""` is the root), sorted by name: all
    /// pages of the listing collected.
    pub async fn list_dir(&mut self, path: &str) -> Result<Vec<FileEntry>> {
        let path = remote_path(path)?;
        self.list_pages(&path, false).await
    }

    /// The user's staged, unfinished uploads.
    pub async fn list_partial(&mut self) -> Result<Vec<PartialEntry>> {
        self.list_pages("", true).await
    }

    async fn list_pages<T: serde::de::DeserializeOwned>(
        &mut self,
        path: &str,
        partial: bool,
    ) -> Result<Vec<T>> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let (page, next) = self.list_page(path, partial, after.clone()).await?;
            all.extend(page);
            match next {
                Some(next) if after.as_deref() != Some(next.as_str()) => after = Some(next),
                Some(_) => return Err(Error::Protocol("the listing does not advance".into())),
                None => return Ok(all),
            }
        }
    }

    /// One page of a listing, and the name to continue after (none on the last page).
    async fn list_page<T: serde::de::DeserializeOwned>(
        &mut self,
        path: &str,
        partial: bool,
        after: Option<String>,
    ) -> Result<(Vec<T>, Option<String>)> {
        let reply: ListReply = self
            .conn
            .call(&Request::Ls {
                path: path.to_string(),
                partial,
                after,
                limit: None,
            })
            .await?;
        if reply.filesize > MAX_LISTING_LEN {
            return Err(Error::Protocol("listing too large".into()));
        }
        let mut body = vec![0u8; reply.filesize as usize];
        self.conn.read_body(&mut body).await?;
        let page: Vec<T> = serde_json::from_slice(&body)
            .map_err(|e| Error::Protocol(format!("bad listing: {e}")))?;
        Ok((page, reply.next))
    }

    /// One file or folder; with `digest`, a file's checksum too.
    pub async fn stat(&mut self, path: &str, digest: bool) -> Result<FileEntry> {
        let path = remote_path(path)?;
        self.conn.call(&Request::Stat { path, digest }).await
    }

    /// Make a folder; with `parents`, also the missing ones above it (and no error if it
    /// exists).
    pub async fn mkdir(&mut self, path: &str, parents: bool) -> Result<()> {
        let path = non_root(remote_path(path)?)?;
        let _: Done = self.conn.call(&Request::Mkdir { path, parents }).await?;
        Ok(())
    }

    /// Remove a file or an empty folder; with `recursive`, a folder and all inside it.
    /// What is removed is kept on the server as a version (see [`Client::versions`]).
    pub async fn rm(&mut self, path: &str, recursive: bool) -> Result<RmReply> {
        let path = non_root(remote_path(path)?)?;
        self.call_lenient(&Request::Rm {
            path,
            recursive,
            partial: false,
        })
        .await
    }

    /// Drop a staged (unfinished) upload.
    pub async fn rm_partial(&mut self, path: &str) -> Result<RmReply> {
        let path = non_root(remote_path(path)?)?;
        self.call_lenient(&Request::Rm {
            path,
            recursive: false,
            partial: true,
        })
        .await
    }

    /// Rename or move `from` to exactly `to`; an existing `to` is an `exists` error unless
    /// `overwrite` (files only).
    pub async fn mv(&mut self, from: &str, to: &str, overwrite: bool) -> Result<()> {
        let from = non_root(remote_path(from)?)?;
        let to = non_root(remote_path(to)?)?;
        let _: Done = self
            .conn
            .call(&Request::Mv {
                from,
                to,
                overwrite,
            })
            .await?;
        Ok(())
    }

    /// Space used, versions kept and the quota.
    pub async fn usage(&mut self) -> Result<UsageReply> {
        self.conn.call(&Request::Usage).await
    }

    /// The user this connection is logged in as.
    pub async fn whoami(&mut self) -> Result<String> {
        let reply: UserReply = self.conn.call(&Request::Whoami).await?;
        Ok(reply.user)
    }

    /// Earlier versions of `path` (overwritten or removed), newest first.
    pub async fn versions(&mut self, path: &str) -> Result<Vec<VersionEntry>> {
        let path = non_root(remote_path(path)?)?;
        let reply: VersionsReply = self.conn.call(&Request::Versions { path }).await?;
        Ok(reply.versions)
    }

    /// Bring back a version of `path` (default the newest); the current file, if any,
    /// becomes a version itself.
    pub async fn restore(&mut self, path: &str, version: Option<&str>) -> Result<()> {
        let path = non_root(remote_path(path)?)?;
        let _: Done = self
            .conn
            .call(&Request::Restore {
                path,
                version: version.map(str::to_string),
            })
            .await?;
        Ok(())
    }

    /// Change the logged-in user's password: SCRAM proves `current` (the server proves
    /// itself too), and only the verifier of `new` is sent. Returns the user and a new
    /// session token; the user's other sessions end unless `keep_sessions`.
    pub async fn change_password(
        &mut self,
        current: &str,
        new: &str,
        iterations: u32,
        keep_sessions: bool,
    ) -> Result<(String, String)> {
        let user = self.whoami().await?;
        let first = ClientFirst::new(&user).map_err(|e| Error::Invalid(e.to_string()))?;
        let reply: AuthReply = self
            .conn
            .call(&Request::PasswdStart {
                message: first.message(),
            })
            .await?;
        let (current, new) = (current.to_string(), new.to_string());
        let (last, verifier) = blocking(move || {
            let last = first
                .handle_server_first(&reply.message, &current)
                .map_err(|e| Error::Protocol(format!("passwd: {e}")))?;
            let verifier =
                Verifier::try_new(&new, iterations).map_err(|e| Error::Invalid(e.to_string()))?;
            Ok((last, verifier))
        })
        .await?;
        let b64 = base64::engine::general_purpose::STANDARD;
        let reply: AuthReply = self
            .conn
            .call(&Request::PasswdFinish {
                message: last.message(),
                salt: b64.encode(&verifier.salt),
                iterations: verifier.iterations,
                stored_key: b64.encode(verifier.stored_key),
                server_key: b64.encode(verifier.server_key),
                keep_sessions,
            })
            .await?;
        last.verify_server_final(&reply.message).map_err(|e| {
            Error::Protocol(format!("the server failed to prove its identity: {e}"))
        })?;
        let token = reply
            .token
            .ok_or_else(|| Error::Protocol("passwd reply without a session token".into()))?;
        Ok((reply.user.unwrap_or(user), token))
    }

    /// A call whose reply fields are optional to this client (missing ones are defaults).
    async fn call_lenient<T: serde::de::DeserializeOwned + Default>(
        &mut self,
        request: &Request,
    ) -> Result<T> {
        let reply: serde_json::Map<String, serde_json::Value> = self.conn.call(request).await?;
        Ok(serde_json::from_value(serde_json::Value::Object(reply)).unwrap_or_default())
    }

    /// A pipelined `stat` of each of `paths` (with its checksum when `digest`).
    async fn stat_many<S: ToString>(
        &mut self,
        paths: impl IntoIterator<Item = (S, bool)>,
    ) -> Result<Vec<Result<FileEntry>>> {
        let requests: Vec<Request> = paths
            .into_iter()
            .map(|(path, digest)| Request::Stat {
                path: path.to_string(),
                digest,
            })
            .collect();
        self.pipelined(&requests).await
    }

    /// Send `requests` pipelined (at most [`PIPELINE_WINDOW`] unanswered) and collect one
    /// reply per request, in order. A server's refusal is that request's result; a broken
    /// connection ends everything.
    pub async fn pipelined<T: serde::de::DeserializeOwned>(
        &mut self,
        requests: &[Request],
    ) -> Result<Vec<Result<T>>> {
        let mut results = Vec::with_capacity(requests.len());
        let mut sent = 0;
        while results.len() < requests.len() {
            while sent < requests.len() && sent < results.len() + PIPELINE_WINDOW {
                self.conn.write_header(&requests[sent]).await?;
                sent += 1;
            }
            self.conn.flush().await?;
            results.push(keep_remote(self.conn.read_reply::<T>().await)?);
        }
        Ok(results)
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
        self.put_checked(local, remote, restart, None, progress)
            .await
            .map(|(outcome, _)| outcome)
    }

    /// `put`, sending the local file's checksum if known: `true` with the outcome when the
    /// remote file already had it and nothing was sent.
    async fn put_checked(
        &mut self,
        local: &Path,
        remote: &str,
        restart: bool,
        digest: Option<String>,
        progress: &mut dyn Progress,
    ) -> Result<(TransferOutcome, bool)> {
        let remote = &non_root(remote_path(remote)?)?;
        let mut restart = restart;
        let mut retries = 0;
        loop {
            match self
                .put_once(local, remote, restart, digest.clone(), progress)
                .await
            {
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
        digest: Option<String>,
        progress: &mut dyn Progress,
    ) -> Result<(TransferOutcome, bool)> {
        let mut file = open_local(local)?;
        let size = file.metadata()?.len();
        let reply: PutReply = self
            .conn
            .call(&Request::Put {
                filename: remote.to_string(),
                size,
                restart,
                digest: digest.clone(),
            })
            .await?;
        if let (true, Some(digest)) = (reply.unchanged, digest) {
            progress.start(size, size);
            progress.finish();
            let outcome = TransferOutcome {
                size,
                resumed_from: size,
                digest,
            };
            return Ok((outcome, true));
        }
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
        verify_commit(&commit, size, digest, size - to_send).map(|outcome| (outcome, false))
    }

    /// Download `remote` into `local`. The bytes go to the partial file beside it
    /// ([`partial_path`], `NAME.part`), which is renamed over `local` only once the whole
    /// file's checksum matches the server's: an interrupted download never leaves a
    /// partial file under the real name. With `resume`, the partial file (or, when there
    /// is none, an existing `local`, taken as a partial copy) is continued and only the
    /// rest is fetched; a partial copy that turns out not to be a prefix of the server's
    /// file (it changed, or the data differs) is noticed and the download starts over.
    /// Without `resume` a partial file is discarded and `local` is replaced at the end.
    pub async fn get(
        &mut self,
        remote: &str,
        local: &Path,
        resume: bool,
        progress: &mut dyn Progress,
    ) -> Result<TransferOutcome> {
        let remote = &non_root(remote_path(remote)?)?;
        let part = partial_path(local);
        if resume {
            let part_exists = std::fs::symlink_metadata(&part).is_ok();
            let local_is_file = std::fs::symlink_metadata(local).is_ok_and(|m| m.is_file());
            if !part_exists && local_is_file {
                std::fs::rename(local, &part).map_err(|e| {
                    Error::Invalid(format!("cannot rename {}: {e}", local.display()))
                })?;
            }
        } else {
            remove_if_exists(&part)?;
        }
        match self.get_once(remote, local, &part, resume, progress).await {
            Err(Error::ChecksumMismatch(_)) if resume => {
                progress.notice(
                    "the local partial copy does not match the file on the server; starting over",
                );
                self.get_once(remote, local, &part, false, progress).await
            }
            other => other,
        }
    }

    async fn get_once(
        &mut self,
        remote: &str,
        local: &Path,
        part: &Path,
        resume: bool,
        progress: &mut dyn Progress,
    ) -> Result<TransferOutcome> {
        let local_len = match std::fs::symlink_metadata(part) {
            Ok(meta) if resume && meta.is_file() => meta.len(),
            _ => 0,
        };
        // Resume at a chunk boundary, so the prefix and the rest hash independently.
        let wanted = local_len / CHUNK_SIZE * CHUNK_SIZE;
        let check_chunk = if wanted > 0 {
            Some(last_chunk_hash(part, wanted)?)
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
                "resuming the download of {remote} at byte {} (from {})",
                reply.offset,
                part.display()
            ));
        }
        self.receive_download(&reply, local, progress).await
    }

    /// Receive the body of a `get` reply into the partial file of `local` (kept up to
    /// `reply.offset`), verify the whole file and only then rename it to `local`. If the
    /// partial file cannot be written, the body is skipped so the connection stays usable.
    async fn receive_download(
        &mut self,
        reply: &GetReply,
        local: &Path,
        progress: &mut dyn Progress,
    ) -> Result<TransferOutcome> {
        self.receive_verified(reply, local, progress)
            .await?
            .finish()
    }

    /// Receive and verify a download into its partial file, not yet durable nor named
    /// (see [`VerifiedDownload`]).
    async fn receive_verified(
        &mut self,
        reply: &GetReply,
        local: &Path,
        progress: &mut dyn Progress,
    ) -> Result<VerifiedDownload> {
        let offset = reply.offset;
        if reply.filesize != reply.size.saturating_sub(offset) {
            return Err(Error::Protocol("inconsistent get reply".into()));
        }
        let part = partial_path(local);
        progress.start(reply.size, offset);
        if offset == 0 && reply.filesize <= SMALL_DOWNLOAD {
            // One buffer's worth (mget of many small files): read whole and verified in
            // memory; the `.part` file is created, written, fsynced and named later, off
            // the receive loop (see `VerifiedDownload::finish`). A mismatch creates no file.
            let mut body = vec![0u8; reply.filesize as usize];
            self.conn.read_body(&mut body).await?;
            progress.advance(reply.filesize);
            let mut hasher = ChunkHasher::new();
            hasher.update(&body);
            progress.finish();
            let digest = check_download(&hasher.finish_chunks(), reply, &part, local)?;
            return Ok(VerifiedDownload {
                content: Received::Memory(body),
                part,
                local: local.to_path_buf(),
                outcome: TransferOutcome {
                    size: reply.size,
                    resumed_from: 0,
                    digest,
                },
            });
        }
        let opened = {
            use std::os::unix::fs::OpenOptionsExt;
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&part)
        };
        let mut file = match opened {
            Ok(file) => file,
            Err(e) => {
                self.conn.skip_body(reply.filesize).await?;
                return Err(Error::Invalid(format!(
                    "cannot write {}: {e}",
                    part.display()
                )));
            }
        };
        file.set_len(offset)?;
        file.seek(SeekFrom::Start(offset))?;
        let prefix = hash_prefix(open_local(&part)?, offset);
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
        let digest = check_download(&chunks, reply, &part, local)?;
        Ok(VerifiedDownload {
            content: Received::File(sink.file),
            part,
            local: local.to_path_buf(),
            outcome: TransferOutcome {
                size: reply.size,
                resumed_from: offset,
                digest,
            },
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
        let files: Vec<_> = files
            .iter()
            .map(|(local, remote)| (local.clone(), remote.clone(), None))
            .collect();
        let results = self.put_many_shared(&files, progress).await?;
        Ok(results
            .into_iter()
            .map(|r| r.map(|(outcome, _)| outcome))
            .collect())
    }

    /// Let `put_many`, `put_files` and `put_tree` share the files of a large batch with
    /// `helper`, another connection logged in as the same user: the server then works on
    /// one file per connection at once (each connection is served one request at a time).
    pub fn add_upload_helper(&mut self, helper: Client) {
        self.helpers.push(helper);
    }

    /// `put_many_checked`, shared with the helper connections when there are any and the
    /// batch is large enough: file `i` goes to connection `i % connections` (this one
    /// first), and the results come back in order. A broken helper connection ends the
    /// batch as a broken main one would.
    async fn put_many_shared(
        &mut self,
        files: &[(PathBuf, String, Option<String>)],
        progress: &mut dyn Progress,
    ) -> Result<Vec<Result<(TransferOutcome, bool)>>> {
        if self.helpers.is_empty() || files.len() < SHARE_WITH_HELPER_FILES {
            return self.put_many_checked(files, progress).await;
        }
        let connections = 1 + self.helpers.len();
        let groups: Vec<Vec<_>> = (0..connections)
            .map(|c| files.iter().skip(c).step_by(connections).cloned().collect())
            .collect();
        let shared = std::sync::Mutex::new(progress);
        let mut helpers = std::mem::take(&mut self.helpers);
        let (ours, theirs) = {
            let mut for_ours = SharedProgress(&shared);
            tokio::join!(
                self.put_many_checked(&groups[0], &mut for_ours),
                put_on_each(&mut helpers, &groups[1..], &shared),
            )
        };
        self.helpers = helpers;
        let mut each = vec![ours?.into_iter()];
        for results in theirs {
            each.push(results?.into_iter());
        }
        (0..files.len())
            .map(|i| {
                each[i % connections]
                    .next()
                    .ok_or_else(|| Error::Invalid("a result is missing".into()))
            })
            .collect()
    }

    /// `put_many` with the local checksum of files when known, which large files send
    /// along so that an unchanged one is not sent (`true` in its result).
    async fn put_many_checked(
        &mut self,
        files: &[(PathBuf, String, Option<String>)],
        progress: &mut dyn Progress,
    ) -> Result<Vec<Result<(TransferOutcome, bool)>>> {
        let mut results: Vec<Option<Result<TransferOutcome>>> = Vec::new();
        let mut unchanged = vec![false; files.len()];
        let mut in_flight: VecDeque<(usize, u64, String)> = VecDeque::new();
        for (local, remote, digest) in files {
            let index = results.len();
            results.push(None);
            let checked = remote_path(remote).and_then(non_root);
            let content = match checked.as_ref() {
                Ok(_) => read_small_file(local),
                Err(e) => Err(Error::remote(ErrorCode::BadName, e.to_string())),
            };
            let content = match content {
                Ok(Some(content)) => content,
                Ok(None) => {
                    // Large: after the pipeline drains, on its own with resume.
                    self.drain_puts(&mut in_flight, &mut results, progress)
                        .await?;
                    let result = self
                        .put_checked(
                            local,
                            remote,
                            false,
                            digest.clone(),
                            &mut Overall(&mut *progress),
                        )
                        .await;
                    // A broken connection ends everything.
                    let result = match result {
                        Err(e @ (Error::Io(_) | Error::ConnectionClosed | Error::Protocol(_))) => {
                            return Err(e)
                        }
                        other => other,
                    };
                    results[index] = Some(result.map(|(outcome, same)| {
                        unchanged[index] = same;
                        outcome
                    }));
                    progress.file_done();
                    continue;
                }
                Err(e) => {
                    results[index] = Some(Err(e));
                    progress.file_done();
                    continue;
                }
            };
            let mut hasher = ChunkHasher::new();
            hasher.update(&content);
            let size = content.len() as u64;
            self.conn
                .write_header(&Request::Put {
                    filename: checked?,
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
        self.drain_puts(&mut in_flight, &mut results, progress)
            .await?;
        Ok(results
            .into_iter()
            .zip(unchanged)
            .map(|(r, same)| r.expect("every file has a result").map(|o| (o, same)))
            .collect())
    }

    async fn drain_puts(
        &mut self,
        in_flight: &mut VecDeque<(usize, u64, String)>,
        results: &mut [Option<Result<TransferOutcome>>],
        progress: &mut dyn Progress,
    ) -> Result<()> {
        self.conn.flush().await?;
        while !in_flight.is_empty() {
            self.read_put_replies(in_flight, results, progress).await?;
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
        progress.file_done();
        results[index] = Some(result);
        Ok(())
    }

    /// Download many files over this one connection, pipelined (like ftp's `mget`); each
    /// `(remote, local)` overwrites `local`. One result per file, in order. Verified files
    /// are written, made durable and named in batches on blocking threads while the next
    /// replies are read (see [`Finisher`]), so the disk flushes once per batch rather than
    /// once per file; a broken connection still names those already verified before it
    /// returns.
    pub async fn get_many(
        &mut self,
        files: &[(String, PathBuf)],
        progress: &mut dyn Progress,
    ) -> Result<Vec<Result<TransferOutcome>>> {
        let mut results: Vec<Option<Result<TransferOutcome>>> = Vec::with_capacity(files.len());
        let mut finisher = Finisher::default();
        let received = self
            .receive_many(files, &mut results, &mut finisher, progress)
            .await;
        finisher.finish_all(&mut results).await;
        received?;
        Ok(results
            .into_iter()
            .map(|r| r.expect("every file has a result"))
            .collect())
    }

    /// `get_many`'s transfers: a result per file in `results`, or (verified, not yet
    /// named) its download handed to `finisher`, which stores its result when done.
    async fn receive_many(
        &mut self,
        files: &[(String, PathBuf)],
        results: &mut Vec<Option<Result<TransferOutcome>>>,
        finisher: &mut Finisher,
        progress: &mut dyn Progress,
    ) -> Result<()> {
        let mut sent = 0;
        let names: Vec<Result<String>> = files
            .iter()
            .map(|(remote, _)| remote_path(remote).and_then(non_root))
            .collect();
        for (index, (_, local)) in files.iter().enumerate() {
            // Keep up to PIPELINE_WINDOW requests ahead of the replies.
            while sent < files.len() && sent < index + PIPELINE_WINDOW {
                // A bad name is asked for anyway (the server refuses it too), so that
                // there stays exactly one reply per file.
                let filename = match &names[sent] {
                    Ok(name) => name.clone(),
                    Err(_) => files[sent].0.clone(),
                };
                self.conn
                    .write_header(&Request::Get {
                        filename,
                        offset: 0,
                        check_chunk: None,
                    })
                    .await?;
                sent += 1;
            }
            self.conn.flush().await?;
            let reply = keep_remote(self.conn.read_reply::<GetReply>().await)?;
            let reply = match (&names[index], reply) {
                (Err(e), Ok(reply)) => {
                    // Never write what was not asked for properly.
                    self.conn.skip_body(reply.filesize).await?;
                    Err(Error::remote(ErrorCode::BadName, e.to_string()))
                }
                (_, reply) => reply,
            };
            results.push(None);
            if finisher.waiting_for(local) {
                // The same local name twice: the first must be named before its `.part`
                // file is reused.
                finisher.finish_all(results).await;
            }
            let result = match reply {
                Ok(reply) if reply.offset == 0 => {
                    let outcome = self
                        .receive_verified(&reply, local, &mut Overall(&mut *progress))
                        .await;
                    // A local failure (cannot write, checksum) is this file's; a broken
                    // connection ends everything.
                    if let Err(e @ (Error::Io(_) | Error::ConnectionClosed | Error::Protocol(_))) =
                        outcome
                    {
                        return Err(e);
                    }
                    outcome
                }
                Ok(_) => return Err(Error::Protocol("unasked resume in a get reply".into())),
                Err(e) => Err(e),
            };
            progress.file_done();
            match result {
                Ok(download) => finisher.push(index, download, results).await,
                Err(e) => results[index] = Some(Err(e)),
            }
        }
        Ok(())
    }

    /// Download many files over this one connection, like ftp's `mget` but resumable:
    /// each `(remote, local)` continues its partial file ([`partial_path`]) if there is
    /// one, a local file with the same size and checksum as the server's is kept
    /// (unchanged), and another existing local file is a failure unless `overwrite`.
    /// The rest are fetched pipelined. A broken connection ends everything.
    pub async fn get_files(
        &mut self,
        files: &[(String, PathBuf)],
        overwrite: bool,
        progress: &mut dyn Progress,
    ) -> Result<TreeReport> {
        let mut report = TreeReport::default();
        let is_file = |path: &Path| std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file());
        // The server's sizes (the bar's total), and checksums where a local file exists.
        let digests: Vec<bool> = files
            .iter()
            .map(|(_, local)| is_file(local) && !is_file(&partial_path(local)))
            .collect();
        // Files that need no checksum may come from a listing; a name missing from it
        // gets its stat too, for the server's own error.
        let remotes: Vec<&String> = files.iter().map(|(remote, _)| remote).collect();
        let no_digest: Vec<bool> = digests.iter().map(|d| !d).collect();
        let mut listed = self.listed(&remotes, &no_digest).await?;
        let unknown: Vec<usize> = (0..files.len())
            .filter(|&i| !matches!(listed[i], Some(Some(_))))
            .collect();
        let requests = unknown.iter().map(|&i| {
            let path = remote_path(&files[i].0).unwrap_or_else(|_| files[i].0.clone());
            (path, digests[i])
        });
        let fetched = self.stat_many(requests).await?;
        let mut stats: Vec<Option<Result<FileEntry>>> = listed
            .iter_mut()
            .map(|l| l.take().flatten().map(Ok))
            .collect();
        for (i, stat) in unknown.into_iter().zip(fetched) {
            stats[i] = Some(stat);
        }
        let stats: Vec<Result<FileEntry>> = stats
            .into_iter()
            .map(|s| s.expect("every file is listed or has a stat"))
            .collect();
        progress.files_total(files.len() as u64);
        let total = stats.iter().flatten().map(|entry| entry.size).sum();
        progress.start(total, 0);
        let mut fetch = Vec::new();
        let mut resume = Vec::new();
        let mut compare = Vec::new();
        for ((remote, local), stat) in files.iter().zip(stats) {
            let failed = |why: Error, report: &mut TreeReport, progress: &mut dyn Progress| {
                report.failed.push((remote.clone(), why));
                progress.file_done();
            };
            let entry = match stat {
                Ok(entry) if entry.kind == EntryType::File => entry,
                Ok(_) => {
                    let why = Error::remote(
                        ErrorCode::WrongType,
                        format!("{remote} is a folder (use get -r)"),
                    );
                    failed(why, &mut report, progress);
                    continue;
                }
                Err(e) => {
                    failed(e, &mut report, progress);
                    continue;
                }
            };
            if is_file(&partial_path(local)) {
                resume.push((remote.clone(), local.clone()));
            } else if std::fs::symlink_metadata(local).is_err() {
                fetch.push((remote.clone(), local.clone()));
            } else if !is_file(local) {
                let why = Error::Invalid(format!(
                    "{} exists and is not a regular file",
                    local.display()
                ));
                failed(why, &mut report, progress);
            } else if entry.digest.is_some()
                && std::fs::metadata(local).is_ok_and(|m| m.len() == entry.size)
            {
                compare.push((remote.clone(), local.clone(), entry));
            } else if overwrite {
                fetch.push((remote.clone(), local.clone()));
            } else {
                let why = Error::Invalid(format!(
                    "{} exists and differs (use --overwrite)",
                    local.display()
                ));
                failed(why, &mut report, progress);
            }
        }
        // Same size: the same file if the checksums match too.
        let paths: Vec<PathBuf> = compare.iter().map(|c| c.1.clone()).collect();
        let digests = blocking(move || {
            Ok(paths
                .iter()
                .map(|path| {
                    open_local(path)
                        .and_then(|file| Ok(hash_reader(file)?))
                        .map(|chunks| file_digest(&chunks).to_hex().to_string())
                        .ok()
                })
                .collect::<Vec<Option<String>>>())
        })
        .await?;
        for ((remote, local, entry), digest) in compare.into_iter().zip(digests) {
            if digest.is_some() && digest == entry.digest {
                report.unchanged += 1;
                progress.skip(entry.size);
                progress.file_done();
            } else if overwrite {
                fetch.push((remote, local));
            } else {
                let why = Error::Invalid(format!(
                    "{} exists and differs (use --overwrite)",
                    local.display()
                ));
                report.failed.push((remote, why));
                progress.file_done();
            }
        }
        let results = self.get_many(&fetch, progress).await?;
        for ((remote, _), result) in fetch.iter().zip(results) {
            match result {
                Ok(outcome) => {
                    report.transferred += 1;
                    report.bytes += outcome.size;
                }
                Err(e) => report.failed.push((remote.clone(), e)),
            }
        }
        for (remote, local) in resume {
            match self
                .get(&remote, &local, true, &mut Overall(&mut *progress))
                .await
            {
                Ok(outcome) => {
                    report.transferred += 1;
                    report.bytes += outcome.size;
                }
                Err(e @ (Error::Io(_) | Error::ConnectionClosed | Error::Protocol(_))) => {
                    return Err(e)
                }
                Err(e) => report.failed.push((remote, e)),
            }
            progress.file_done();
        }
        progress.finish();
        Ok(report)
    }

    /// Download `remote` into `out` (standard output, a pipe) as it arrives, and verify
    /// the whole file's checksum at the end: a mismatch can only be reported after the
    /// bytes were written. Nothing is resumed.
    pub async fn get_to_writer(
        &mut self,
        remote: &str,
        out: Box<dyn Write + Send>,
        progress: &mut dyn Progress,
    ) -> Result<TransferOutcome> {
        let remote = non_root(remote_path(remote)?)?;
        self.conn
            .write_header(&Request::Get {
                filename: remote.clone(),
                offset: 0,
                check_chunk: None,
            })
            .await?;
        self.conn.flush().await?;
        let reply: GetReply = self.conn.read_reply().await?;
        if reply.offset != 0 || reply.filesize != reply.size {
            return Err(Error::Protocol("inconsistent get reply".into()));
        }
        progress.start(reply.size, 0);
        let sink = StreamWriter {
            out,
            hasher: ChunkHasher::new(),
        };
        let mut sink = receive_body(&mut self.conn, reply.filesize, sink, &mut |n| {
            progress.advance(n)
        })
        .await?;
        sink.out.flush().map_err(stream_error)?;
        progress.finish();
        let digest = file_digest(&sink.hasher.finish_chunks())
            .to_hex()
            .to_string();
        if digest != reply.digest {
            return Err(Error::ChecksumMismatch(format!(
                "the bytes of {remote} written out do not match the server's checksum (got {digest}, expected {})",
                reply.digest
            )));
        }
        Ok(TransferOutcome {
            size: reply.size,
            resumed_from: 0,
            digest,
        })
    }

    /// Upload the folder `local_dir` and everything in it as the remote folder
    /// `remote_dir` (made if missing), over this one connection, pipelined like
    /// [`Client::put_many`]. Resumable: files whose remote copy already has the local
    /// checksum are not sent, and large files continue their staged uploads. Symbolic links
    /// (and other special files) are never followed: they are skipped with a notice.
    /// Names go to the server in Unicode NFC.
    pub async fn put_tree(
        &mut self,
        local_dir: &Path,
        remote_dir: &str,
        progress: &mut dyn Progress,
    ) -> Result<TreeReport> {
        let remote_dir = remote_path(remote_dir)?;
        let mut report = TreeReport::default();
        if !std::fs::metadata(local_dir)
            .map_err(|e| Error::Invalid(format!("cannot read {}: {e}", local_dir.display())))?
            .is_dir()
        {
            return Err(Error::Invalid(format!(
                "{} is not a folder",
                local_dir.display()
            )));
        }
        let (dirs, files) = walk_local(local_dir, &mut report, progress)?;
        let total: u64 = files.iter().map(|f| f.2).sum();
        progress.files_total(files.len() as u64);
        progress.start(total, 0);

        // Folders first (put makes missing parents, but empty folders must exist too).
        let mut folders = Vec::new();
        if !remote_dir.is_empty() {
            folders.push(remote_dir.clone());
        }
        folders.extend(dirs.iter().map(|rel| join_remote(&remote_dir, rel)));
        let requests: Vec<Request> = folders
            .iter()
            .map(|path| Request::Mkdir {
                path: path.clone(),
                parents: true,
            })
            .collect();
        for (path, result) in folders.iter().zip(self.pipelined::<Done>(&requests).await?) {
            match result {
                Ok(_) => report.folders += 1,
                Err(e) => report.failed.push((path.clone(), e)),
            }
        }

        let files = files
            .into_iter()
            .map(|(local, rel, size)| (local, join_remote(&remote_dir, &rel), size))
            .collect();
        self.put_changed(files, &mut report, progress).await?;
        progress.finish();
        Ok(report)
    }

    /// Upload many files over this one connection, like ftp's `mput` but resumable (like
    /// rsync): a remote file that already has the local file's size and checksum is not
    /// sent again, and a large file's staged upload continues. Each `(local, remote)`
    /// otherwise replaces the remote file. A local file that cannot be read is a failure
    /// in the report, as is a refusal; a broken connection ends everything.
    pub async fn put_files(
        &mut self,
        files: &[(PathBuf, String)],
        progress: &mut dyn Progress,
    ) -> Result<TreeReport> {
        let mut report = TreeReport::default();
        let mut sized = Vec::new();
        for (local, remote) in files {
            match std::fs::metadata(local) {
                Ok(meta) if meta.is_file() => {
                    sized.push((local.clone(), remote.clone(), meta.len()))
                }
                Ok(_) => report.failed.push((
                    remote.clone(),
                    Error::Invalid(format!("{} is not a file", local.display())),
                )),
                Err(e) => report.failed.push((
                    remote.clone(),
                    Error::Invalid(format!("cannot read {}: {e}", local.display())),
                )),
            }
        }
        progress.files_total(files.len() as u64);
        progress.start(sized.iter().map(|f| f.2).sum(), 0);
        for _ in &report.failed {
            progress.file_done();
        }
        self.put_changed(sized, &mut report, progress).await?;
        progress.finish();
        Ok(report)
    }

    /// Send the `(local, remote path, size)` files whose remote copy differs, counting
    /// them in `report`. Only files whose remote copy has the same size are hashed here,
    /// and their checksums compared with the server's.
    async fn put_changed(
        &mut self,
        files: Vec<(PathBuf, String, u64)>,
        report: &mut TreeReport,
        progress: &mut dyn Progress,
    ) -> Result<()> {
        let remote_paths: Vec<&String> = files.iter().map(|f| &f.1).collect();
        let sizes = self.remote_files(&remote_paths).await?;
        let same_size: Vec<bool> = files
            .iter()
            .zip(&sizes)
            .map(|((_, _, size), remote)| *remote == Some(*size))
            .collect();
        // Same size: hash the local file and ask for the server's checksum.
        let candidates: Vec<usize> = (0..files.len()).filter(|&i| same_size[i]).collect();
        let paths: Vec<PathBuf> = candidates.iter().map(|&i| files[i].0.clone()).collect();
        let local_digests = blocking(move || {
            Ok(paths
                .iter()
                .map(|path| {
                    let file = open_local(path)?;
                    Ok(file_digest(&hash_reader(file)?).to_hex().to_string())
                })
                .collect::<Vec<Result<String>>>())
        })
        .await?;
        let remote_digests = self
            .stat_many(candidates.iter().map(|&i| (&files[i].1, true)))
            .await?;
        let mut digests: Vec<Option<Result<String>>> = (0..files.len()).map(|_| None).collect();
        let mut same = vec![false; files.len()];
        for ((&i, local), remote) in candidates.iter().zip(local_digests).zip(remote_digests) {
            same[i] = matches!((&local, &remote), (Ok(l), Ok(r)) if r.digest.as_deref() == Some(l.as_str()));
            digests[i] = Some(local);
        }
        let mut to_send = Vec::new();
        for (((local, remote, size), digest), same) in files.into_iter().zip(digests).zip(same) {
            match digest {
                Some(Err(e)) => {
                    report.failed.push((remote, e));
                    progress.file_done();
                }
                _ if same => {
                    report.unchanged += 1;
                    progress.skip(size);
                    progress.file_done();
                }
                digest => to_send.push((local, remote, digest.and_then(Result::ok))),
            }
        }
        let results = self.put_many_shared(&to_send, progress).await?;
        for ((_, remote, _), result) in to_send.iter().zip(results) {
            match result {
                Ok((_, true)) => report.unchanged += 1,
                Ok((outcome, false)) => {
                    report.transferred += 1;
                    report.bytes += outcome.size;
                }
                Err(e) => report.failed.push((remote.clone(), e)),
            }
        }
        Ok(())
    }

    /// The size of each of `paths` that is a file on the server (`None`: not there, or not
    /// a file), from [`Client::listed`] and a pipelined `stat` for the rest.
    async fn remote_files(&mut self, paths: &[&String]) -> Result<Vec<Option<u64>>> {
        let mut known = self.listed(paths, &vec![true; paths.len()]).await?;
        let unknown: Vec<usize> = (0..paths.len()).filter(|&i| known[i].is_none()).collect();
        let entries = self
            .stat_many(unknown.iter().map(|&i| (paths[i], false)))
            .await?;
        for (i, entry) in unknown.into_iter().zip(entries) {
            known[i] = Some(entry.ok());
        }
        Ok(known
            .into_iter()
            .map(|known| match known.flatten() {
                Some(entry) if entry.kind == EntryType::File => Some(entry.size),
                _ => None,
            })
            .collect())
    }

    /// What listings tell of `paths` (those with `wanted`): a folder that holds
    /// [`LIST_RATHER_THAN_STAT`] or more of them is listed rather than asked about once
    /// per path. `None`: not known (the folder was not listed, or not that far);
    /// `Some(None)`: not in the folder.
    async fn listed(
        &mut self,
        paths: &[&String],
        wanted: &[bool],
    ) -> Result<Vec<Option<Option<FileEntry>>>> {
        let mut known: Vec<Option<Option<FileEntry>>> = vec![None; paths.len()];
        let mut by_folder: HashMap<String, Vec<(usize, String)>> = HashMap::new();
        for (i, path) in paths.iter().enumerate().filter(|(i, _)| wanted[*i]) {
            let Ok(path) = remote_path(path) else {
                continue; // a stat reports it
            };
            let (folder, name) = path.rsplit_once('/').unwrap_or(("", &path));
            by_folder
                .entry(folder.to_string())
                .or_default()
                .push((i, name.to_string()));
        }
        for (folder, names) in by_folder {
            if names.len() < LIST_RATHER_THAN_STAT {
                continue;
            }
            // Pages come in name order: after reading up to a name, a name up to it that
            // was not listed is not there. At most a page per LIST_RATHER_THAN_STAT names,
            // so a huge folder with few names asked for costs no more than their stats.
            let mut entries: HashMap<String, FileEntry> = HashMap::new();
            let mut read_up_to: Option<String> = None;
            let mut complete = false;
            for _ in 0..names.len() / LIST_RATHER_THAN_STAT + 1 {
                match self.list_page(&folder, false, read_up_to.clone()).await {
                    Ok((page, next)) => {
                        entries.extend(page.into_iter().map(|e: FileEntry| (e.name.clone(), e)));
                        match next {
                            Some(next) if read_up_to.as_deref() < Some(next.as_str()) => {
                                read_up_to = Some(next)
                            }
                            Some(_) => {
                                return Err(Error::Protocol("the listing does not advance".into()))
                            }
                            None => {
                                complete = true;
                                break;
                            }
                        }
                    }
                    Err(e) if e.code() == Some(ErrorCode::NotFound) && read_up_to.is_none() => {
                        complete = true; // no such folder: none of the names is there
                        break;
                    }
                    Err(e) if e.code().is_some() => break, // the stats say what is wrong
                    Err(e) => return Err(e),
                }
            }
            for (i, name) in names {
                known[i] = match entries.remove(&name) {
                    Some(entry) => Some(Some(entry)),
                    None if complete || read_up_to.as_deref() >= Some(name.as_str()) => Some(None),
                    None => None,
                };
            }
        }
        Ok(known)
    }

    /// Download the remote folder `remote_dir` and everything in it into the local folder
    /// `local_dir` (made if missing), over this one connection, pipelined like
    /// [`Client::get_many`]. Resumable: local files of the same size and checksum are
    /// kept, shorter ones are continued as [`Client::get`] does. Never writes through a
    /// local symbolic link: such entries are skipped with a notice.
    pub async fn get_tree(
        &mut self,
        remote_dir: &str,
        local_dir: &Path,
        progress: &mut dyn Progress,
    ) -> Result<TreeReport> {
        let remote_dir = remote_path(remote_dir)?;
        let mut report = TreeReport::default();
        if !remote_dir.is_empty() {
            let entry = self.stat(&remote_dir, false).await?;
            if entry.kind != EntryType::Dir {
                return Err(Error::remote(
                    ErrorCode::WrongType,
                    format!("{remote_dir} is not a folder"),
                ));
            }
        }
        // The whole tree, folder by folder (parents before children).
        let mut dirs: Vec<String> = Vec::new();
        let mut files: Vec<(String, u64)> = Vec::new();
        let mut queue = VecDeque::from([String::new()]);
        while let Some(rel) = queue.pop_front() {
            for entry in self.list_dir(&join_remote(&remote_dir, &rel)).await? {
                let child = join_remote(&rel, &entry.name);
                if let Err(e) = check_file_name(&entry.name) {
                    // The server's names are not trusted with the local disk either.
                    report.failed.push((child, e));
                    continue;
                }
                match entry.kind {
                    EntryType::Dir => {
                        dirs.push(child.clone());
                        queue.push_back(child);
                    }
                    EntryType::File => files.push((child, entry.size)),
                }
            }
        }
        let total: u64 = files.iter().map(|f| f.1).sum();
        progress.files_total(files.len() as u64);
        progress.start(total, 0);

        std::fs::create_dir_all(local_dir)
            .map_err(|e| Error::Invalid(format!("cannot make {}: {e}", local_dir.display())))?;
        let mut blocked: Vec<String> = Vec::new();
        let under = |blocked: &[String], rel: &str| {
            blocked.iter().any(|b| {
                rel.strip_prefix(b.as_str())
                    .is_some_and(|r| r.starts_with('/'))
            })
        };
        for rel in &dirs {
            if under(&blocked, rel) {
                continue;
            }
            let path = local_dir.join(rel);
            match std::fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    let why = format!(
                        "{}: exists and is not a folder (symbolic links are not followed); skipped",
                        path.display()
                    );
                    progress.notice(&why);
                    report.skipped.push(why);
                    blocked.push(rel.clone());
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    match std::fs::create_dir(&path) {
                        Ok(()) => report.folders += 1,
                        Err(e) => {
                            report.failed.push((
                                rel.clone(),
                                Error::Invalid(format!("cannot make {}: {e}", path.display())),
                            ));
                            blocked.push(rel.clone());
                        }
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }

        // What each local file is: missing, a partial copy, the same size, or in the way.
        let mut fetch: Vec<(String, PathBuf)> = Vec::new();
        let mut resume: Vec<(String, PathBuf)> = Vec::new();
        let mut compare: Vec<(String, PathBuf, u64)> = Vec::new();
        for (rel, size) in files {
            let remote = join_remote(&remote_dir, &rel);
            let path = local_dir.join(&rel);
            if under(&blocked, &rel) {
                progress.skip(size);
                progress.file_done();
                continue;
            }
            if std::fs::symlink_metadata(partial_path(&path)).is_ok_and(|m| m.is_file()) {
                // An interrupted download of it: continue that.
                resume.push((remote, path));
                continue;
            }
            match std::fs::symlink_metadata(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => fetch.push((remote, path)),
                Err(e) => return Err(e.into()),
                Ok(meta) if !meta.is_file() => {
                    let why = format!(
                        "{}: exists and is not a regular file (symbolic links are not followed); skipped",
                        path.display()
                    );
                    progress.notice(&why);
                    report.skipped.push(why);
                    progress.skip(size);
                    progress.file_done();
                }
                Ok(meta) if meta.len() == size => compare.push((remote, path, size)),
                Ok(meta) if meta.len() > 0 && meta.len() < size => resume.push((remote, path)),
                Ok(_) => fetch.push((remote, path)),
            }
        }

        // Same size: the same file if the checksums match too.
        let paths: Vec<PathBuf> = compare.iter().map(|c| c.1.clone()).collect();
        let digests = blocking(move || {
            Ok(paths
                .iter()
                .map(|path| {
                    open_local(path)
                        .and_then(|file| Ok(hash_reader(file)?))
                        .map(|chunks| file_digest(&chunks).to_hex().to_string())
                        .ok()
                })
                .collect::<Vec<Option<String>>>())
        })
        .await?;
        let stats = self
            .stat_many(compare.iter().map(|(remote, _, _)| (remote, true)))
            .await?;
        for (((remote, path, size), local), stat) in compare.into_iter().zip(digests).zip(stats) {
            let same = match (&local, &stat) {
                (Some(local), Ok(entry)) => entry.digest.as_deref() == Some(local.as_str()),
                _ => false,
            };
            if same {
                report.unchanged += 1;
                progress.skip(size);
                progress.file_done();
            } else {
                fetch.push((remote, path));
            }
        }

        let results = self.get_many(&fetch, progress).await?;
        for ((remote, _), result) in fetch.iter().zip(results) {
            match result {
                Ok(outcome) => {
                    report.transferred += 1;
                    report.bytes += outcome.size;
                }
                Err(e) => report.failed.push((remote.clone(), e)),
            }
        }
        for (remote, path) in resume {
            match self
                .get(&remote, &path, true, &mut Overall(&mut *progress))
                .await
            {
                Ok(outcome) => {
                    report.transferred += 1;
                    report.bytes += outcome.size;
                }
                Err(e @ (Error::Io(_) | Error::ConnectionClosed | Error::Protocol(_))) => {
                    return Err(e)
                }
                Err(e) => report.failed.push((remote, e)),
            }
            progress.file_done();
        }
        progress.finish();
        Ok(report)
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

    /// Whether the server has closed this idle connection (a restart, its idle timeout),
    /// checked without waiting, so a caller can reconnect before sending a request into it.
    /// Between requests the server sends nothing: anything readable is its end.
    pub async fn peer_closed(&mut self) -> bool {
        tokio::time::timeout(std::time::Duration::ZERO, self.conn.wait_readable())
            .await
            .is_ok()
    }

    /// Say goodbye and close the connection.
    pub async fn quit(mut self) -> Result<()> {
        let _: Done = self.conn.call(&Request::Quit).await?;
        Ok(())
    }
}

/// What a folder transfer (`put_tree`, `get_tree`) did.
#[derive(Debug, Default)]
pub struct TreeReport {
    /// Files sent or fetched.
    pub transferred: u64,
    /// Their sizes.
    pub bytes: u64,
    /// Files already the same on both sides, not sent again.
    pub unchanged: u64,
    /// Folders made (or found) on the receiving side.
    pub folders: u64,
    /// Entries left out on purpose (symbolic links, special files), with why.
    pub skipped: Vec<String>,
    /// Paths that failed, with why.
    pub failed: Vec<(String, Error)>,
}

/// A remote path as it goes on the wire: Unicode NFC, components joined by '/', each a
/// valid file name (no `.` or `..`, so it cannot leave the user's folder). `""` (or `/`)
/// is the user's root folder; a leading `/` is that root, one trailing `/` is dropped.
pub fn remote_path(path: &str) -> Result<String> {
    let nfc = to_nfc(path);
    Ok(split_remote_path(&nfc)?.join("/"))
}

/// Where a download of `local` is written until it is verified: `NAME.part` beside it.
/// (A name too long for that gets a hidden `.netdisk-HASH.part` instead.)
pub fn partial_path(local: &Path) -> PathBuf {
    let mut name = local
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    if name.len() + ".part".len() > 255 {
        let hash = blake3::hash(name.as_encoded_bytes()).to_hex();
        return local.with_file_name(format!(".netdisk-{}.part", &hash[..32]));
    }
    name.push(".part");
    local.with_file_name(name)
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::Invalid(format!(
            "cannot remove {}: {e}",
            path.display()
        ))),
        _ => Ok(()),
    }
}

/// Refuse the root folder where a file or folder inside it is needed.
fn non_root(path: String) -> Result<String> {
    if path.is_empty() {
        return Err(Error::remote(
            ErrorCode::BadName,
            "the root folder cannot be used here: give a path inside it",
        ));
    }
    Ok(path)
}

/// `dir/name`, or `name` in the root.
pub fn join_remote(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// The folders (relative paths, parents first) and regular files (local path, relative
/// remote path in NFC, size) under `root`. Symbolic links and special files are skipped
/// with a notice, names that cannot go remote are failures; nothing is followed.
#[allow(clippy::type_complexity)]
fn walk_local(
    root: &Path,
    report: &mut TreeReport,
    progress: &mut dyn Progress,
) -> Result<(Vec<String>, Vec<(PathBuf, String, u64)>)> {
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    let mut queue = VecDeque::from([(root.to_path_buf(), String::new())]);
    while let Some((dir, rel)) = queue.pop_front() {
        let read = std::fs::read_dir(&dir)
            .map_err(|e| Error::Invalid(format!("cannot read {}: {e}", dir.display())));
        let mut entries = match read {
            Ok(read) => read.collect::<std::io::Result<Vec<_>>>()?,
            Err(e) if rel.is_empty() => return Err(e),
            Err(e) => {
                report.failed.push((rel, e));
                continue;
            }
        };
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            let Some(name) = entry.file_name().to_str().map(to_nfc) else {
                report.failed.push((
                    path.display().to_string(),
                    Error::Invalid(format!("{}: the name is not UTF-8", path.display())),
                ));
                continue;
            };
            let child = join_remote(&rel, &name);
            let kind = entry.file_type()?;
            if kind.is_symlink() || !(kind.is_dir() || kind.is_file()) {
                let what = if kind.is_symlink() {
                    "a symbolic link, not followed"
                } else {
                    "not a regular file"
                };
                let why = format!("{}: {what}; skipped", path.display());
                progress.notice(&why);
                report.skipped.push(why);
                continue;
            }
            if let Err(e) = check_file_name(&name) {
                report.failed.push((path.display().to_string(), e));
                continue;
            }
            if kind.is_dir() {
                dirs.push(child.clone());
                queue.push_back((path, child));
            } else {
                let size = entry.metadata()?.len();
                files.push((path, child, size));
            }
        }
    }
    Ok((dirs, files))
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

/// Each of `clients` sends its group of `groups` (all at once), with one shared progress.
fn put_on_each<'a>(
    clients: &'a mut [Client],
    groups: &'a [Vec<(PathBuf, String, Option<String>)>],
    shared: &'a std::sync::Mutex<&mut dyn Progress>,
) -> Pin<Box<dyn Future<Output = Vec<PutResults>> + 'a>> {
    Box::pin(async move {
        let Some((client, rest)) = clients.split_first_mut() else {
            return Vec::new();
        };
        let mut progress = SharedProgress(shared);
        let (first, others) = tokio::join!(
            client.put_many_checked(&groups[0], &mut progress),
            put_on_each(rest, &groups[1..], shared),
        );
        let mut all = vec![first];
        all.extend(others);
        all
    })
}

/// What `put_many_checked` returns.
type PutResults = Result<Vec<Result<(TransferOutcome, bool)>>>;

/// Requests of this many files are in flight at once in `put_many` / `get_many`.
pub const PIPELINE_WINDOW: usize = 64;

/// Extra connections `mput` and `put -r` open for a batch of many files (with the saved
/// login): the server serves each connection one request at a time.
pub const UPLOAD_HELPERS: usize = 3;

/// Files to send from which a batch is shared with the helper connections, if any.
pub const SHARE_WITH_HELPER_FILES: usize = 2 * PIPELINE_WINDOW;

/// Files bound for (or taken from) one remote folder from which `mput`, `put -r` and
/// `mget` list the folder to learn which are there, instead of a `stat` each; also the
/// names per listing page read, at most.
const LIST_RATHER_THAN_STAT: usize = 16;

/// Files up to this size are read whole and pipelined by `put_many`.
const SMALL_FILE: u64 = 1024 * 1024;

/// Downloads up to this size are received whole in memory and written inline.
const SMALL_DOWNLOAD: u64 = 256 * 1024;

/// Threads that fsync a batch of `get_many`'s downloads at once.
const SYNC_THREADS: usize = 8;

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

/// Writes a download to a stream (`get REMOTE -`), hashing what it writes.
struct StreamWriter {
    out: Box<dyn Write + Send>,
    hasher: ChunkHasher,
}

impl BodySink for StreamWriter {
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes).map_err(stream_error)?;
        self.hasher.update(bytes);
        Ok(())
    }
}

/// A failed write to the output stream is a local failure, not a network one (a closed
/// pipe is not a lost connection to the server).
fn stream_error(e: std::io::Error) -> Error {
    Error::Invalid(format!("cannot write the output: {e}"))
}

/// The whole download's digest if it matches the server's; on a mismatch the partial file
/// is removed (nothing in it can be trusted to resume from).
fn check_download(
    chunks: &[ChunkHash],
    reply: &GetReply,
    part: &Path,
    local: &Path,
) -> Result<String> {
    let digest = file_digest(chunks).to_hex().to_string();
    if digest != reply.digest {
        let _ = std::fs::remove_file(part);
        return Err(Error::ChecksumMismatch(format!(
            "the download of {} does not match the server's checksum (got {digest}, expected {})",
            local.display(),
            reply.digest
        )));
    }
    Ok(digest)
}

/// A download verified against the server's checksum, but neither durable nor under its
/// name yet.
struct VerifiedDownload {
    content: Received,
    part: PathBuf,
    local: PathBuf,
    outcome: TransferOutcome,
}

/// Where a verified download's bytes are.
enum Received {
    /// Written into its partial file (`part`), as it arrived.
    File(File),
    /// A small download, still in memory: its partial file is not created yet.
    Memory(Vec<u8>),
}

impl VerifiedDownload {
    /// Write the bytes to the partial file if they are still in memory, make them
    /// durable, then give the file its name: a crash never leaves a short file under the
    /// real name. Blocking: `get_many` runs it on blocking threads.
    fn finish(self) -> Result<TransferOutcome> {
        let file = match self.content {
            Received::File(file) => file,
            Received::Memory(body) => write_part(&self.part, &body)?,
        };
        file.sync_all()?;
        std::fs::rename(&self.part, &self.local).map_err(|e| {
            Error::Invalid(format!(
                "cannot rename {} to {}: {e}",
                self.part.display(),
                self.local.display()
            ))
        })?;
        Ok(self.outcome)
    }
}

/// Create (or truncate) the partial file `part` and write `body` into it; a failed
/// write removes it (a short file is nothing to resume from).
fn write_part(part: &Path, body: &[u8]) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let cannot =
        |e: std::io::Error| Error::Invalid(format!("cannot write {}: {e}", part.display()));
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(part)
        .map_err(cannot)?;
    if let Err(e) = file.write_all(body) {
        let _ = std::fs::remove_file(part);
        return Err(cannot(e));
    }
    Ok(file)
}

/// Batches of this many verified downloads are finished together by `get_many`.
const FINISH_BATCH: usize = PIPELINE_WINDOW;

/// Batches being finished while `get_many` reads the next replies: at most this many;
/// then the receive loop waits for the oldest (bounds the memory and threads in use).
const BATCHES_IN_FLIGHT: usize = 3;

/// `get_many`'s verified downloads on their way to their names. Each batch of
/// [`FINISH_BATCH`] files is split over [`SYNC_THREADS`] blocking threads, which write,
/// fsync and rename each of their files in turn (so the disk flushes a batch's files
/// together instead of once per file in turn), while the receive loop goes on reading
/// the next replies. Each file is renamed only after its own fsync; only these files are
/// synced, not the whole file system.
#[derive(Default)]
struct Finisher {
    /// The batch being filled: (index in the results, download).
    batch: Vec<(usize, VerifiedDownload)>,
    /// Groups of files being finished on blocking threads, oldest first: their indices,
    /// local names, and the task.
    running: VecDeque<FinishGroup>,
    /// The local names of every file in `batch` or `running`.
    unnamed: std::collections::HashSet<PathBuf>,
}

type FinishGroup = (
    Vec<usize>,
    Vec<PathBuf>,
    tokio::task::JoinHandle<Vec<Result<TransferOutcome>>>,
);

impl Finisher {
    /// Whether a download for `local` is still waiting for its name (its `.part` file
    /// must not be reused before).
    fn waiting_for(&self, local: &Path) -> bool {
        self.unnamed.contains(local)
    }

    /// Add a verified download; start its batch when full, and if too many batches are
    /// running, wait for the oldest, storing their outcomes in `results`.
    async fn push(
        &mut self,
        index: usize,
        download: VerifiedDownload,
        results: &mut [Option<Result<TransferOutcome>>],
    ) {
        self.unnamed.insert(download.local.clone());
        self.batch.push((index, download));
        if self.batch.len() >= FINISH_BATCH {
            self.start_batch();
        }
        while self.running.len() > BATCHES_IN_FLIGHT * SYNC_THREADS {
            self.collect_oldest(results).await;
        }
    }

    /// Hand the batch being filled to blocking threads.
    fn start_batch(&mut self) {
        let per_thread = self.batch.len().div_ceil(SYNC_THREADS).max(1);
        let mut rest = std::mem::take(&mut self.batch).into_iter();
        loop {
            let group: Vec<(usize, VerifiedDownload)> = rest.by_ref().take(per_thread).collect();
            if group.is_empty() {
                break;
            }
            let indices = group.iter().map(|(index, _)| *index).collect();
            let locals = group.iter().map(|(_, d)| d.local.clone()).collect();
            let task = tokio::task::spawn_blocking(move || {
                group
                    .into_iter()
                    .map(|(_, download)| download.finish())
                    .collect()
            });
            self.running.push_back((indices, locals, task));
        }
    }

    /// Wait for the oldest running group and store its outcomes.
    async fn collect_oldest(&mut self, results: &mut [Option<Result<TransferOutcome>>]) {
        let Some((indices, locals, task)) = self.running.pop_front() else {
            return;
        };
        let outcomes = match task.await {
            Ok(outcomes) => outcomes,
            Err(e) => (0..indices.len())
                .map(|_| Err(Error::Invalid(format!("writing the download failed: {e}"))))
                .collect(),
        };
        for (index, outcome) in indices.into_iter().zip(outcomes) {
            results[index] = Some(outcome);
        }
        for local in locals {
            self.unnamed.remove(&local);
        }
    }

    /// Finish everything: the batch being filled and every running group.
    async fn finish_all(&mut self, results: &mut [Option<Result<TransferOutcome>>]) {
        self.start_batch();
        while !self.running.is_empty() {
            self.collect_oldest(results).await;
        }
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
