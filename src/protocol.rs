//! The wire format: frames of a 4-byte little-endian header length, a UTF-8 JSON header,
//! then as many raw body bytes as the header's `filesize` announces.
//!
//! This module knows bytes and headers, nothing about users or files. See `docs/PROTOCOL.md`.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};

use crate::error::{Error, ErrorCode, Result};

/// The protocol version this build speaks; exchanged in `hello`.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest JSON header accepted. A larger announced length is refused before allocating.
pub const MAX_HEADER_LEN: usize = 64 * 1024;
/// Size of the blocks file bodies move in: large enough for few system calls.
pub const IO_BUFFER_SIZE: usize = 256 * 1024;
/// A connection's input buffer, for headers and small bodies. Body blocks of
/// [`IO_BUFFER_SIZE`] bypass it, so it stays small: memory per connection matters with
/// thousands of clients (and with hundreds of uploads, each of which fills it).
const READ_BUFFER_SIZE: usize = 16 * 1024;
/// A connection's output buffer. The server keeps acknowledgments here until they are
/// durable and settles them before more than [`MAX_HELD_REPLIES`] wait, so it must hold
/// that much plus the largest reply written without settling first (a few KiB).
const WRITE_BUFFER_SIZE: usize = 32 * 1024;
/// Bytes of replies that may wait in the output buffer for a group commit.
pub const MAX_HELD_REPLIES: usize = 16 * 1024;

/// A byte stream the protocol can run over (plain TCP today, TLS later).
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Requests a client sends, tagged by `cmd`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// First message on every connection: which protocol version the client speaks.
    Hello {
        version: u32,
        #[serde(default)]
        client: String,
    },
    /// Create a user. Carries the SCRAM verifier (base64 fields), never the password.
    Register {
        user: String,
        salt: String,
        iterations: u32,
        stored_key: String,
        server_key: String,
    },
    /// SCRAM client-first message (`n,,n=USER,r=NONCE`).
    AuthStart { message: String },
    /// SCRAM client-final message (`c=biws,r=NONCE,p=PROOF`).
    AuthFinish { message: String },
    /// Log in with a session token from an earlier `auth_finish`.
    AuthToken { token: String },
    /// Revoke the session token this connection logged in with.
    Logout,
    /// List one folder of the user's drive (`path`, default the user's root), one page of
    /// at most `limit` entries sorted by name, starting after the name `after` (or, with
    /// `partial`, the staged uploads).
    Ls {
        #[serde(default, skip_serializing_if = "String::is_empty")]
        path: String,
        #[serde(default, skip_serializing_if = "is_false")]
        partial: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
    },
    /// One entry: a file or a folder; with `digest`, a file's checksum too.
    Stat {
        path: String,
        #[serde(default, skip_serializing_if = "is_false")]
        digest: bool,
    },
    /// Make a folder (with `parents`, also the missing folders above it, and no error if
    /// it exists).
    Mkdir {
        path: String,
        #[serde(default, skip_serializing_if = "is_false")]
        parents: bool,
    },
    /// Remove a file (kept as a version for undo), a folder with `recursive`, or with
    /// `partial` a staged upload.
    Rm {
        path: String,
        #[serde(default, skip_serializing_if = "is_false")]
        recursive: bool,
        #[serde(default, skip_serializing_if = "is_false")]
        partial: bool,
    },
    /// Rename or move a file or folder; refused if `to` exists unless `overwrite`.
    Mv {
        from: String,
        to: String,
        #[serde(default, skip_serializing_if = "is_false")]
        overwrite: bool,
    },
    /// Bytes and files used, and the quota.
    Usage,
    /// Who this connection is logged in as.
    Whoami,
    /// Change the password, step 1: a SCRAM client-first message for the logged-in user.
    PasswdStart { message: String },
    /// Change the password, step 2: the SCRAM client-final proving the current password,
    /// and the new verifier. Other sessions are revoked unless `keep_sessions`.
    PasswdFinish {
        message: String,
        salt: String,
        iterations: u32,
        stored_key: String,
        server_key: String,
        #[serde(default, skip_serializing_if = "is_false")]
        keep_sessions: bool,
    },
    /// Earlier versions of a path (overwritten or removed), newest first.
    Versions { path: String },
    /// Bring back a version of `path` (default the newest); the current file, if any,
    /// becomes a version itself.
    Restore {
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<String>,
    },
    /// Start (or resume) uploading `size` bytes as `filename`; the reply says from which offset.
    Put {
        filename: String,
        size: u64,
        #[serde(default)]
        restart: bool,
        /// The sender's checksum of the whole file, if known: when the file at `filename`
        /// already has it, the reply says `unchanged` and nothing needs to be sent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        digest: Option<String>,
    },
    /// The upload's bytes from `offset`; `filesize` body bytes follow this header.
    PutData { offset: u64, filesize: u64 },
    /// End of the upload: the sender's checksum of the whole file. With `filesize`, the
    /// sender's chunk hashes follow as the body (32 raw bytes per chunk, in order), so a
    /// mismatch keeps the staged chunks that match and only the others are sent again.
    PutCommit {
        digest: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        filesize: Option<u64>,
    },
    /// Download `filename` from `offset` (a multiple of the chunk size).
    Get {
        filename: String,
        #[serde(default)]
        offset: u64,
        /// BLAKE3 of the chunk just before `offset`, as the client has it, so a changed
        /// server file is noticed before any byte moves.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        check_chunk: Option<String>,
    },
    /// Polite goodbye; the server closes the connection.
    Quit,
}

impl Request {
    /// The `cmd` string of this request, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Register { .. } => "register",
            Request::AuthStart { .. } => "auth_start",
            Request::AuthFinish { .. } => "auth_finish",
            Request::AuthToken { .. } => "auth_token",
            Request::Logout => "logout",
            Request::Ls { .. } => "ls",
            Request::Stat { .. } => "stat",
            Request::Mkdir { .. } => "mkdir",
            Request::Rm { .. } => "rm",
            Request::Mv { .. } => "mv",
            Request::Usage => "usage",
            Request::Whoami => "whoami",
            Request::PasswdStart { .. } => "passwd_start",
            Request::PasswdFinish { .. } => "passwd_finish",
            Request::Versions { .. } => "versions",
            Request::Restore { .. } => "restore",
            Request::Put { .. } => "put",
            Request::PutData { .. } => "put_data",
            Request::PutCommit { .. } => "put_commit",
            Request::Get { .. } => "get",
            Request::Quit => "quit",
        }
    }
}

impl Request {
    /// Whether this request may carry a body (`filesize` bytes after the header). A body
    /// on any other request is refused and skipped, never parsed as frames.
    pub fn takes_body(&self) -> bool {
        matches!(self, Request::PutData { .. } | Request::PutCommit { .. })
    }
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// The body of an error reply: `{"ok": false, "code": ..., "message": ...}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
}

/// Replies to `hello`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HelloReply {
    pub version: u32,
    pub server: String,
}

/// Replies to `auth_start` (server-first) and `auth_finish` (server-final plus session).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AuthReply {
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// Reply to `auth_token`: whose session it is.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct UserReply {
    pub user: String,
}

/// Reply to `ls`: a JSON array of [`FileEntry`] (or [`PartialEntry`]) follows as the body.
/// `next`, when present, is the `after` of the next page.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ListReply {
    pub count: usize,
    pub filesize: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// Most entries in one `ls` page (and the default `limit`).
pub const MAX_LIST_PAGE: u32 = 1000;

/// Whether an entry is a file or a folder.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryType {
    #[default]
    File,
    Dir,
}

/// One entry of `ls` (a name inside the listed folder) or `stat` (a whole path).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    #[serde(rename = "type", default)]
    pub kind: EntryType,
    /// Bytes of a file; 0 for a folder.
    pub size: u64,
    /// Last modification, ISO 8601 UTC.
    pub modified: String,
    /// Checksum of a file, only in `stat` with `digest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// Reply to `rm`: what was removed (files inside a removed folder included).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RmReply {
    pub files: u64,
    pub bytes: u64,
}

/// Reply to `usage`: like `df` for one user. Versions (overwritten or removed files kept
/// for undo) count toward the quota.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct UsageReply {
    pub files: u64,
    pub bytes: u64,
    pub versions: u64,
    pub version_bytes: u64,
    /// Announced sizes of unfinished uploads.
    pub staged_bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<u64>,
}

/// One earlier version of a path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionEntry {
    /// Give this to `restore`.
    pub id: String,
    #[serde(rename = "type", default)]
    pub kind: EntryType,
    pub size: u64,
    /// When it was overwritten or removed, ISO 8601 UTC.
    pub replaced: String,
}

/// Reply to `versions`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct VersionsReply {
    pub versions: Vec<VersionEntry>,
}

/// One staged upload of `ls --partial`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartialEntry {
    pub name: String,
    pub received: u64,
    pub size: u64,
    /// Last time data arrived, ISO 8601 UTC.
    pub updated: String,
}

/// Reply to `put` and `put_data`: where the staged upload stands (0, or the end of the
/// staged data).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PutReply {
    pub offset: u64,
    /// Ranges before `offset` to send again, as `[offset, length]` pairs of whole chunks:
    /// staged chunks a failed `put_commit` found not to match the sender's. Only in `put`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<(u64, u64)>,
    /// Only in `put` with `digest`: the file already has that checksum; the upload is
    /// over (send no `put_data` or `put_commit`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub unchanged: bool,
}

/// Reply to `put_commit`: the file is complete, verified and durable under its name.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CommitReply {
    pub size: u64,
    pub digest: String,
    /// Old versions deleted (oldest first) to keep the user within the quota.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pruned_versions: u64,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

/// Reply to `get`: `filesize` body bytes (the file from `offset`) follow.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GetReply {
    pub size: u64,
    pub digest: String,
    pub modified: String,
    /// Where the body starts. May be 0 although the client asked for more, when its
    /// partial copy cannot be a prefix of the file (`restart_reason` says why).
    pub offset: u64,
    pub filesize: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_reason: Option<String>,
}

/// An empty success reply: `{"ok": true}`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Done {}

type Buffered = BufReader<BufWriter<Box<dyn Stream>>>;

/// A framed, buffered connection: read and write whole headers, and stream bodies.
///
/// The buffers exist only while something is buffered or a frame is on its way: a
/// connection waiting for its next header with both empty frees them (`bare`), so an idle
/// client holds no buffer (each one's touched pages would stay resident, times thousands
/// of clients); they are allocated again when the next frame starts.
pub struct Connection {
    /// The buffered stream; `None` exactly while `bare` holds the stream.
    stream: Option<Buffered>,
    bare: Option<Box<dyn Stream>>,
    /// Longest wait for the peer to send or accept a byte inside a frame or body.
    stall_timeout: Option<Duration>,
}

impl Connection {
    pub fn new(stream: impl Stream + 'static) -> Connection {
        let boxed: Box<dyn Stream> = Box::new(stream);
        Connection {
            stream: None,
            bare: Some(boxed),
            stall_timeout: None,
        }
    }

    /// The buffered stream, allocating its buffers if they were freed.
    fn stream(&mut self) -> &mut Buffered {
        if let Some(bare) = self.bare.take() {
            self.stream = Some(BufReader::with_capacity(
                READ_BUFFER_SIZE,
                BufWriter::with_capacity(WRITE_BUFFER_SIZE, bare),
            ));
        }
        self.stream.as_mut().expect("either buffered or bare")
    }

    /// Free both buffers if nothing is in them (nothing is lost: they are empty).
    fn release_buffers(&mut self) {
        let empty = self.stream.as_ref().is_some_and(|stream| {
            stream.buffer().is_empty() && stream.get_ref().buffer().is_empty()
        });
        if empty {
            self.bare = self.stream.take().map(|s| s.into_inner().into_inner());
        }
    }

    /// Whether the peer has already sent more (a pipelined request is waiting), so replies
    /// can wait in the buffer and go out together.
    pub fn has_buffered_input(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| !s.buffer().is_empty())
    }

    /// Bytes of replies waiting in the output buffer (not yet handed to the socket).
    pub fn pending_output(&self) -> usize {
        self.stream
            .as_ref()
            .map_or(0, |s| s.get_ref().buffer().len())
    }

    /// Give up on a peer that stops sending or receiving for `timeout` in the middle of a
    /// body (a trickling or stuck client must not hold an upload or a file forever).
    pub fn set_stall_timeout(&mut self, timeout: Duration) {
        self.stall_timeout = Some(timeout);
    }

    async fn within<T>(
        timeout: Option<Duration>,
        io: impl std::future::Future<Output = std::io::Result<T>>,
    ) -> std::io::Result<T> {
        match timeout {
            None => io.await,
            Some(timeout) => tokio::time::timeout(timeout, io).await.unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the peer stalled",
                ))
            }),
        }
    }

    /// Read one header. `Ok(None)` when the peer closed cleanly between frames; an error
    /// when it closed mid-frame, announced an oversized header or sent something that is
    /// not a JSON object.
    pub async fn read_header(&mut self) -> Result<Option<Map<String, Value>>> {
        // Between frames: an idle connection waits for the next one without buffers.
        self.release_buffers();
        let mut len_bytes = [0u8; 4];
        let mut filled = 0;
        while filled < 4 {
            let n = match &mut self.bare {
                Some(bare) => bare.read(&mut len_bytes[filled..]).await?,
                None => self.stream().read(&mut len_bytes[filled..]).await?,
            };
            if n == 0 {
                return if filled == 0 {
                    Ok(None)
                } else {
                    Err(Error::ConnectionClosed)
                };
            }
            filled += n;
        }
        let len = u32::from_le_bytes(len_bytes) as usize;
        if len == 0 || len > MAX_HEADER_LEN {
            return Err(Error::Protocol(format!(
                "header length {len} is outside 1..={MAX_HEADER_LEN}"
            )));
        }
        let mut header = vec![0u8; len];
        Self::within(self.stall_timeout, self.stream().read_exact(&mut header))
            .await
            .map_err(eof_is_closed)?;
        decode_header(&header).map(Some)
    }

    /// Read the next reply and decode it as `T`; an error reply becomes [`Error::Remote`].
    pub async fn read_reply<T: DeserializeOwned>(&mut self) -> Result<T> {
        let header = self.read_header().await?.ok_or(Error::ConnectionClosed)?;
        parse_reply(header)
    }

    /// Queue a request (or any header) for sending. Call [`Connection::flush`] to send.
    pub async fn write_header(&mut self, header: &impl Serialize) -> Result<()> {
        let bytes = encode_header(header)?;
        Self::within(self.stall_timeout, self.stream().write_all(&bytes)).await?;
        Ok(())
    }

    /// Queue a success reply: the fields of `reply` plus `"ok": true`.
    pub async fn write_ok(&mut self, reply: &impl Serialize) -> Result<()> {
        let mut value = serde_json::to_value(reply).map_err(|e| Error::Protocol(e.to_string()))?;
        match value.as_object_mut() {
            Some(map) => {
                map.insert("ok".into(), Value::Bool(true));
            }
            None => return Err(Error::Protocol("a reply must be a JSON object".into())),
        }
        self.write_header(&value).await
    }

    /// Queue an error reply.
    pub async fn write_error(&mut self, code: ErrorCode, message: &str) -> Result<()> {
        self.write_header(&serde_json::json!({"ok": false, "code": code, "message": message}))
            .await
    }

    /// Send a request and wait for its reply.
    pub async fn call<T: DeserializeOwned>(&mut self, request: &Request) -> Result<T> {
        self.write_header(request).await?;
        self.flush().await?;
        self.read_reply().await
    }

    pub async fn flush(&mut self) -> Result<()> {
        Self::within(self.stall_timeout, self.stream().flush()).await?;
        Ok(())
    }

    /// Wait (within the stall timeout) until body bytes can be read without waiting.
    /// EOF is [`Error::ConnectionClosed`].
    pub async fn wait_readable(&mut self) -> Result<()> {
        use tokio::io::AsyncBufReadExt;
        let available = Self::within(self.stall_timeout, self.stream().fill_buf())
            .await?
            .len();
        if available == 0 {
            return Err(Error::ConnectionClosed);
        }
        Ok(())
    }

    /// Read exactly `buf.len()` body bytes.
    pub async fn read_body(&mut self, buf: &mut [u8]) -> Result<()> {
        Self::within(self.stall_timeout, self.stream().read_exact(buf))
            .await
            .map_err(eof_is_closed)?;
        Ok(())
    }

    /// Read up to `buf.len()` body bytes (at least one); EOF is [`Error::ConnectionClosed`].
    pub async fn read_body_some(&mut self, buf: &mut [u8]) -> Result<usize> {
        match Self::within(self.stall_timeout, self.stream().read(buf)).await? {
            0 => Err(Error::ConnectionClosed),
            n => Ok(n),
        }
    }

    /// Read at least one body byte into `buf` (waiting within the stall timeout), then as
    /// many more as have already arrived, without waiting again: full buffers for the disk
    /// while data flows, and no buffer held while the peer is silent.
    pub async fn read_body_available(&mut self, buf: &mut [u8]) -> Result<usize> {
        let mut filled = self.read_body_some(buf).await?;
        while filled < buf.len() {
            // A zero timeout polls the read once: data already here, or stop.
            match tokio::time::timeout(Duration::ZERO, self.stream().read(&mut buf[filled..])).await
            {
                Ok(Ok(0)) | Err(_) => break,
                Ok(Ok(n)) => filled += n,
                Ok(Err(e)) => return Err(e.into()),
            }
        }
        Ok(filled)
    }

    /// Read and throw away `len` body bytes (to stay in step after refusing a body).
    pub async fn skip_body(&mut self, mut len: u64) -> Result<()> {
        let mut sink = vec![0u8; IO_BUFFER_SIZE.min(len as usize)];
        while len > 0 {
            let want = sink.len().min(len as usize);
            let n = self.read_body_some(&mut sink[..want]).await?;
            len -= n as u64;
        }
        Ok(())
    }

    /// Queue body bytes.
    pub async fn write_body(&mut self, bytes: &[u8]) -> Result<()> {
        Self::within(self.stall_timeout, self.stream().write_all(bytes)).await?;
        Ok(())
    }

    /// Flush and close the sending side (TCP FIN), so the peer sees a clean end.
    pub async fn shutdown(&mut self) -> Result<()> {
        Self::within(self.stall_timeout, self.stream().shutdown()).await?;
        Ok(())
    }
}

fn eof_is_closed(e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        Error::ConnectionClosed
    } else {
        Error::Io(e)
    }
}

/// Encode one header as its length prefix plus JSON.
pub fn encode_header(header: &impl Serialize) -> Result<Vec<u8>> {
    let json = serde_json::to_vec(header).map_err(|e| Error::Protocol(e.to_string()))?;
    if json.len() > MAX_HEADER_LEN {
        return Err(Error::Protocol(format!(
            "header of {} bytes exceeds the {MAX_HEADER_LEN}-byte limit",
            json.len()
        )));
    }
    let mut frame = Vec::with_capacity(4 + json.len());
    frame.extend_from_slice(&(json.len() as u32).to_le_bytes());
    frame.extend_from_slice(&json);
    Ok(frame)
}

/// Decode the JSON of one header (without its length prefix); it must be an object.
pub fn decode_header(bytes: &[u8]) -> Result<Map<String, Value>> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Error::Protocol("a header must be a JSON object".into())),
        Err(e) => Err(Error::Protocol(format!("header is not valid JSON: {e}"))),
    }
}

/// Decode a request header into a [`Request`]; unknown commands and missing fields are
/// [`ErrorCode::BadRequest`] errors the server answers without closing.
pub fn parse_request(header: Map<String, Value>) -> Result<Request> {
    serde_json::from_value(Value::Object(header))
        .map_err(|e| Error::remote(ErrorCode::BadRequest, format!("bad request: {e}")))
}

/// Decode a reply header: `"ok": false` becomes [`Error::Remote`], otherwise `T`.
pub fn parse_reply<T: DeserializeOwned>(header: Map<String, Value>) -> Result<T> {
    match header.get("ok") {
        Some(Value::Bool(true)) => serde_json::from_value(Value::Object(header))
            .map_err(|e| Error::Protocol(format!("unexpected reply: {e}"))),
        Some(Value::Bool(false)) => {
            let reply: ErrorReply = serde_json::from_value(Value::Object(header))
                .map_err(|e| Error::Protocol(format!("unexpected error reply: {e}")))?;
            Err(Error::Remote {
                code: reply.code,
                message: reply.message,
            })
        }
        _ => Err(Error::Protocol("reply without an \"ok\" field".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_is_length_prefixed_little_endian() {
        let frame = encode_header(&Request::Usage).unwrap();
        let json = br#"{"cmd":"usage"}"#;
        assert_eq!(&frame[..4], &(json.len() as u32).to_le_bytes());
        assert_eq!(&frame[4..], json);
        let request = parse_request(decode_header(&frame[4..]).unwrap()).unwrap();
        assert_eq!(request, Request::Usage);
    }

    #[test]
    fn unknown_command_is_bad_request() {
        let err = parse_request(decode_header(br#"{"cmd":"erase","filename":"x"}"#).unwrap())
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::BadRequest));
    }

    #[test]
    fn non_object_and_invalid_json_are_refused() {
        assert!(decode_header(b"[1,2]").is_err());
        assert!(decode_header(b"{\"cmd\":").is_err());
        assert!(decode_header(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn error_reply_becomes_remote_error() {
        let header =
            decode_header(br#"{"ok":false,"code":"name_taken","message":"taken"}"#).unwrap();
        let err = parse_reply::<Done>(header).unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::NameTaken));
        assert_eq!(err.to_string(), "taken");
    }

    #[tokio::test]
    async fn oversized_header_is_refused_before_reading_it() {
        let (client, server) = tokio::io::duplex(1024);
        let mut server = Connection::new(server);
        let mut client = client;
        client
            .write_all(&((MAX_HEADER_LEN as u32) + 1).to_le_bytes())
            .await
            .unwrap();
        let err = server.read_header().await.unwrap_err();
        assert!(matches!(err, Error::Protocol(_)), "{err}");
    }

    #[tokio::test]
    async fn frames_survive_split_and_merged_writes() {
        let (client, server) = tokio::io::duplex(7);
        let mut server = Connection::new(server);
        let mut bytes = encode_header(&Request::Quit).unwrap();
        bytes.extend(encode_header(&Request::Logout).unwrap());
        let writer = tokio::spawn(async move {
            let mut client = client;
            for piece in bytes.chunks(3) {
                client.write_all(piece).await.unwrap();
            }
        });
        let first = parse_request(server.read_header().await.unwrap().unwrap()).unwrap();
        let second = parse_request(server.read_header().await.unwrap().unwrap()).unwrap();
        writer.await.unwrap();
        assert_eq!((first, second), (Request::Quit, Request::Logout));
        assert!(server.read_header().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn buffers_are_freed_between_frames_and_kept_while_anything_is_buffered() {
        let (client, server) = tokio::io::duplex(4096);
        let (mut client, mut server) = (Connection::new(client), Connection::new(server));
        let next = |header: Option<Map<String, Value>>| parse_request(header.unwrap()).unwrap();
        // Two pipelined requests: the second waits in the input buffer.
        client.write_header(&Request::Usage).await.unwrap();
        client.write_header(&Request::Logout).await.unwrap();
        client.flush().await.unwrap();
        assert_eq!(next(server.read_header().await.unwrap()), Request::Usage);
        assert!(server.has_buffered_input());
        // A reply held in the output buffer survives reading the next request.
        server.write_ok(&Done {}).await.unwrap();
        assert_eq!(next(server.read_header().await.unwrap()), Request::Logout);
        assert!(server.pending_output() > 0);
        server.flush().await.unwrap();
        client.read_reply::<Done>().await.unwrap();
        // Nothing buffered either way: waiting for the next frame holds no buffer.
        tokio::select! {
            biased;
            _ = server.read_header() => panic!("no frame was sent"),
            _ = std::future::ready(()) => {}
        }
        assert!(server.stream.is_none());
        client.write_header(&Request::Quit).await.unwrap();
        client.flush().await.unwrap();
        assert_eq!(next(server.read_header().await.unwrap()), Request::Quit);
    }

    #[tokio::test]
    async fn eof_inside_a_frame_is_an_error() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut server = Connection::new(server);
        client.write_all(&10u32.to_le_bytes()).await.unwrap();
        client.write_all(b"{\"cmd\"").await.unwrap();
        drop(client);
        assert!(matches!(
            server.read_header().await,
            Err(Error::ConnectionClosed)
        ));
    }
}
