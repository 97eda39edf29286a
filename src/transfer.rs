//! Moving file bodies between a connection and blocking disk code.
//!
//! The socket side runs on the async runtime; reading or writing the file (and hashing)
//! runs on a blocking thread. A few large buffers circulate between the two, so disk IO,
//! hashing and socket IO overlap and no buffer is allocated per chunk.

use std::sync::{mpsc, Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{Error, ErrorCode, Result};
use crate::protocol::{Connection, IO_BUFFER_SIZE};

/// Buffers in flight per transfer: enough to keep both sides busy, few enough to keep
/// memory per connection small.
const PIPE_BUFFERS: usize = 3;

/// Where received body bytes go (a staged upload, a local file being downloaded).
pub trait BodySink: Send + 'static {
    fn write(&mut self, bytes: &[u8]) -> Result<()>;
}

/// Where sent body bytes come from. Returns 0 only at the end.
pub trait BodySource: Send + 'static {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize>;
}

/// Receive exactly `len` body bytes into `sink`. If the sink fails, the rest of the body
/// is read and dropped so the connection stays in step, and the sink's error is returned.
pub async fn receive_body<S: BodySink>(
    conn: &mut Connection,
    len: u64,
    sink: S,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<S> {
    let (full_tx, full_rx) = mpsc::sync_channel::<(Vec<u8>, usize)>(PIPE_BUFFERS);
    let (empty_tx, mut empty_rx) = tokio::sync::mpsc::channel::<Vec<u8>>(PIPE_BUFFERS);
    for _ in 0..PIPE_BUFFERS {
        let _ = empty_tx.try_send(vec![0u8; IO_BUFFER_SIZE.min(len.max(1) as usize)]);
    }
    let worker = tokio::task::spawn_blocking(move || -> Result<S> {
        let mut sink = sink;
        for (buf, n) in full_rx {
            sink.write(&buf[..n])?;
            // If the connection is gone, still write what already arrived (more to resume from).
            let _ = empty_tx.blocking_send(buf);
        }
        Ok(sink)
    });

    let mut remaining = len;
    while remaining > 0 {
        // None: the worker stopped early because the sink failed.
        let Some(mut buf) = empty_rx.recv().await else {
            break;
        };
        let want = buf.len().min(remaining as usize);
        let n = match conn.read_body_some(&mut buf[..want]).await {
            Ok(n) => n,
            Err(e) => {
                // Connection lost: let the worker write what already arrived and drop the
                // sink (freeing what it holds) before the caller learns of the loss.
                drop(full_tx);
                let _ = join(worker).await;
                return Err(e);
            }
        };
        remaining -= n as u64;
        progress(n as u64);
        // Never blocks: the channel holds as many entries as there are buffers.
        if full_tx.send((buf, n)).is_err() {
            break;
        }
    }
    drop(full_tx);
    let result = join(worker).await;
    if remaining > 0 {
        conn.skip_body(remaining).await?;
    }
    result
}

/// Send exactly `len` body bytes from `source`. A source that ends early or fails leaves
/// the connection out of step: the caller must close it.
pub async fn send_body<S: BodySource>(
    conn: &mut Connection,
    len: u64,
    source: S,
    progress: &mut (dyn FnMut(u64) + Send),
) -> Result<S> {
    let (full_tx, mut full_rx) = tokio::sync::mpsc::channel::<(Vec<u8>, usize)>(PIPE_BUFFERS);
    let (empty_tx, empty_rx) = mpsc::sync_channel::<Vec<u8>>(PIPE_BUFFERS);
    for _ in 0..PIPE_BUFFERS {
        let _ = empty_tx.try_send(vec![0u8; IO_BUFFER_SIZE.min(len.max(1) as usize)]);
    }
    let worker = tokio::task::spawn_blocking(move || -> Result<S> {
        let mut source = source;
        let mut remaining = len;
        while remaining > 0 {
            let Ok(mut buf) = empty_rx.recv() else { break };
            let want = buf.len().min(remaining as usize);
            let mut filled = 0;
            while filled < want {
                match source.read(&mut buf[filled..want])? {
                    0 => break,
                    n => filled += n,
                }
            }
            if filled == 0 {
                return Err(Error::Invalid(
                    "the file shrank while it was being sent".into(),
                ));
            }
            remaining -= filled as u64;
            if full_tx.blocking_send((buf, filled)).is_err() {
                break;
            }
        }
        Ok(source)
    });

    let mut remaining = len;
    while remaining > 0 {
        let Some((buf, n)) = full_rx.recv().await else {
            break;
        };
        conn.write_body(&buf[..n]).await?;
        remaining -= n as u64;
        progress(n as u64);
        let _ = empty_tx.send(buf);
    }
    drop(empty_tx);
    let source = join(worker).await?;
    if remaining > 0 {
        return Err(Error::Invalid(
            "the file shrank while it was being sent".into(),
        ));
    }
    Ok(source)
}

async fn join<T>(worker: tokio::task::JoinHandle<Result<T>>) -> Result<T> {
    worker
        .await
        .map_err(|e| Error::remote(ErrorCode::Internal, format!("transfer worker failed: {e}")))?
}

/// Body buffers shared by all transfers of a server: a transfer takes one only when bytes
/// are ready to move and gives it back right after, so idle or stalled transfers hold
/// none, and buffers are reused rather than allocated per block. At most
/// [`POOL_MAX_BUFFERS`] are out at once (a cap on the server's body memory, however many
/// transfers run): a transfer that finds none free waits for one.
pub struct BufferPool {
    idle: Mutex<Vec<Vec<u8>>>,
    out: Arc<Semaphore>,
}

/// Buffers out at once, all transfers together (16 MiB of 256 KiB): enough to keep the
/// disk and the sockets busy; concurrent transfers share them.
pub const POOL_MAX_BUFFERS: usize = 64;

/// The right to hold one pool buffer; dropping it lets another transfer take one.
pub type BufferLease = OwnedSemaphorePermit;

impl Default for BufferPool {
    fn default() -> BufferPool {
        BufferPool {
            idle: Mutex::default(),
            out: Arc::new(Semaphore::new(POOL_MAX_BUFFERS)),
        }
    }
}

impl BufferPool {
    /// A buffer, waiting while [`POOL_MAX_BUFFERS`] are out. A caller that already holds
    /// a lease must not wait here (use [`BufferPool::try_get`]) or transfers could wait
    /// for each other.
    pub async fn get(&self) -> (Vec<u8>, BufferLease) {
        let lease = self
            .out
            .clone()
            .acquire_owned()
            .await
            .expect("the pool's semaphore is never closed");
        (self.take(), lease)
    }

    /// A buffer if one is free now.
    pub fn try_get(&self) -> Option<(Vec<u8>, BufferLease)> {
        let lease = self.out.clone().try_acquire_owned().ok()?;
        Some((self.take(), lease))
    }

    fn take(&self) -> Vec<u8> {
        let reused = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        reused.unwrap_or_else(|| vec![0u8; IO_BUFFER_SIZE])
    }

    /// Give a buffer back for reuse (its lease is dropped separately).
    pub fn put(&self, buf: Vec<u8>) {
        if buf.len() != IO_BUFFER_SIZE {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < POOL_MAX_BUFFERS {
            idle.push(buf);
        }
    }
}
