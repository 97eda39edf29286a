//! The end-to-end suites again, with the server's files, users.xlsx and sessions in a
//! bucket of a real S3-compatible server (moto on loopback) instead of the local disk:
//! the same test code, whose fixtures (`tests/common`) notice the `on_s3::` module path
//! and start every server with `--storage s3://BUCKET/PREFIX`. The few tests that look
//! at the local file system itself (symlinks, inodes, modes) say so and return early.
#![cfg(feature = "s3")]
// Each suite declares `mod common;`: here each keeps its own copy of the fixtures (and of
// their moto server), exactly as when it runs alone.
#![allow(clippy::duplicate_mod)]

#[path = "accounts.rs"]
mod accounts;
#[path = "cli.rs"]
mod cli;
#[path = "folders.rs"]
mod folders;
#[path = "resume_put.rs"]
mod resume_put;
#[path = "transfer.rs"]
mod transfer;
