//! The raw TCP copy: the yardstick

#[allow(unused_imports)]
use crate::prelude::*;

/// Copy `src` over a loopback TCP connection into `dst` (created), optionally fsyncing
/// at the end: no framing, no hashing, no TLS. Returns (seconds, CPU seconds of both ends).
///
/// One task per side on a two-worker runtime; each does its file IO inline (a page-cache
/// copy, like the socket IO) rather than hand every block to another thread: this is the
/// bare minimum a copy costs, the ceiling netdisk is measured against.
pub fn raw_copy(
    rt: &tokio::runtime::Runtime,
    src: &Path,
    dst: &Path,
    fsync: bool,
) -> Result<(f64, f64)> {
    let (src, dst) = (src.to_path_buf(), dst.to_path_buf());
    let cpu_before = self_cpu_secs();
    let started = Instant::now();
    rt.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let receiver = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await?;
            let mut file = File::create(&dst)?;
            let mut buf = vec![0u8; BLOCK];
            loop {
                let n = socket.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                file.write_all(&buf[..n])?;
            }
            if fsync {
                file.sync_all()?;
            }
            anyhow::Ok(())
        });
        let sender = tokio::spawn(async move {
            let mut socket = TcpStream::connect(addr).await?;
            socket.set_nodelay(true)?;
            let mut file = File::open(&src)?;
            let mut buf = vec![0u8; BLOCK];
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                socket.write_all(&buf[..n]).await?;
            }
            socket.shutdown().await?;
            anyhow::Ok(())
        });
        sender.await??;
        receiver.await??;
        anyhow::Ok(())
    })?;
    Ok((
        started.elapsed().as_secs_f64(),
        self_cpu_secs() - cpu_before,
    ))
}
