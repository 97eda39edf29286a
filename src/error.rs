//! The one error type at the library boundary, with stable machine codes that go on the wire.

use serde::{Deserialize, Serialize};

/// Why a request failed, as a stable code. Sent in error replies (`"code": "name_taken"`)
/// so a client can react without parsing English; the human message travels beside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed frame, unknown `cmd`, missing field, wrong order of messages.
    BadRequest,
    /// The client speaks a protocol version this server does not.
    UnsupportedVersion,
    /// A user or file name that is not allowed.
    BadName,
    /// Registration of a name that exists already.
    NameTaken,
    /// Wrong user name or password (never says which), or a bad/expired session token.
    AuthFailed,
    /// A command that needs a logged-in session arrived before login.
    NotLoggedIn,
    /// No such file or folder.
    NotFound,
    /// The target of `mkdir` or `mv` exists already (`mv -f` replaces a file).
    Exists,
    /// `rm` of a folder that is not empty, without `recursive`.
    NotEmpty,
    /// A folder where a file is needed (`get`, `put` over a folder) or a file where a
    /// folder is needed (a path component, `ls` of a file).
    WrongType,
    /// Someone else is uploading the same name right now.
    Busy,
    /// Data sent at an offset the server did not ask for.
    Conflict,
    /// The data received does not match the checksum the sender announced.
    ChecksumMismatch,
    /// Not enough space (disk full or quota).
    NoSpace,
    /// Too many connections or failed logins; try later.
    TooManyRequests,
    /// Anything else that went wrong on the server; details are in its log.
    Internal,
}

/// Everything that can go wrong in netdisk's library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The peer answered a request with an error reply.
    #[error("{message}")]
    Remote { code: ErrorCode, message: String },
    /// The peer broke the protocol (bad frame, unexpected reply).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The connection ended in the middle of an exchange.
    #[error("connection closed by the peer")]
    ConnectionClosed,
    /// A checksum computed here does not match the peer's.
    #[error("{0}")]
    ChecksumMismatch(String),
    /// Local input that is not acceptable (bad name, missing file, ...).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Error {
    pub fn remote(code: ErrorCode, message: impl Into<String>) -> Error {
        Error::Remote {
            code,
            message: message.into(),
        }
    }

    /// The wire code of this error, when it came from (or is meant for) the peer.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Remote { code, .. } => Some(*code),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
