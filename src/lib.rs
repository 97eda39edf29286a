//! netdisk: a self-hosted network drive. A TCP server keeps each user's files in a folder
//! and every user record in one Excel table; a command-line client registers, logs in,
//! lists, uploads and downloads with progress, resume and end-to-end checksums.
//!
//! The map, one module per concern:
//! - [`protocol`]: frames (4-byte length, JSON header, raw body) and the message types.
//! - [`error`]: the library's error type and the stable codes sent on the wire.
//! - [`names`]: which user and file names are allowed.
//! - [`digest`]: the chunked BLAKE3 checksum computed while data streams.
//! - [`durable`]: crash-safe small-file writes (temp file, fsync, rename).
//! - [`scram`]: SCRAM-SHA-256 login, so no password ever crosses the wire.
//! - [`users`]: the user table, persisted atomically in `users.xlsx`.
//! - [`sessions`]: server-side session tokens that survive restarts.
//! - [`storage`]: the only code that touches file contents (local disk today).
//! - [`throttle`]: growing delays after failed logins, per user and per address.
//! - [`tls`]: TLS 1.3 (rustls): server certificates, client pinning or CA checks.
//! - [`transfer`]: moving file bodies between the socket and blocking disk code.
//! - [`server`]: the accept loop, per-connection command dispatch.
//! - [`client`]: the client library the `netdisk` command line is built on.
//! - [`conncheck`]: the optional shared-secret HMAC check at connection start.
//! - [`config`]: the client's saved logins under the user's config folder.
//! - `objstore`: where an S3-compatible bucket is (feature `s3`, on by default).
//! - `shared_state`: what servers on one bucket share: users.xlsx, sessions, the server
//!   secret, the self-signed certificate (feature `s3`).

pub mod admin;
pub mod client;
pub mod config;
pub mod conncheck;
pub mod digest;
pub mod durable;
pub mod error;
pub mod limits;
pub mod names;
#[cfg(feature = "s3")]
pub mod objstore;
pub mod protocol;
pub mod rootlock;
pub mod scram;
pub mod server;
pub mod sessions;
#[cfg(feature = "s3")]
pub mod shared_state;
pub mod storage;
pub mod throttle;
pub mod tls;
pub mod transfer;
pub mod users;

pub use error::{Error, ErrorCode, Result};
