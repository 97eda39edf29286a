//! One server per data root: `ROOT/netdisk.lock` is flocked for as long as a server
//! serves, and holds its pid so a second `netdisk serve` can say who is in the way.
//! Two servers on one root would each keep their own sessions and throttle in memory
//! and race on staged uploads. `netdisk admin` does not take this lock.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::error::{Error, Result};

/// The held lock; released when dropped (or when the process dies, however it dies).
#[derive(Debug)]
pub struct RootLock {
    _file: File,
}

/// Create ROOT (mode 0700) if missing and lock it for this process, or explain which
/// process holds it.
pub fn acquire(root: &Path) -> Result<RootLock> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)
        .map_err(|e| Error::Invalid(format!("cannot create {}: {e}", root.display())))?;
    let path = root.join("netdisk.lock");
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::Invalid(format!("cannot open {}: {e}", path.display())))?;
    match lock_file(&file, false) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            let pid =
                holder_pid(&mut file).map_or_else(|| "unknown".to_string(), |p| p.to_string());
            return Err(Error::Invalid(format!(
                "another netdisk server (pid {pid}) is already serving {}; stop it first or use another --root",
                root.display()
            )));
        }
        Err(e) => {
            return Err(Error::Invalid(format!(
                "cannot lock {}: {e}",
                path.display()
            )))
        }
    }
    // Only informative, so not fsynced: a stale pid after a crash is harmless because
    // the lock, not the file's content, decides.
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))?;
    writeln!(file, "{}", std::process::id())?;
    Ok(RootLock { _file: file })
}

/// The pid the holder wrote; it may not have written it yet, so try a few times.
fn holder_pid(file: &mut File) -> Option<u32> {
    for _ in 0..20 {
        let mut text = String::new();
        if file.seek(SeekFrom::Start(0)).is_ok() && file.read_to_string(&mut text).is_ok() {
            if let Ok(pid) = text.trim().parse() {
                return Some(pid);
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    None
}

/// Exclusive flock on `file`: waits if `wait`, else fails with `WouldBlock`. Released
/// when the file is closed. flock (not fcntl) locks belong to the open file, so two
/// opens in one process exclude each other too.
pub(crate) fn lock_file(file: &File, wait: bool) -> io::Result<()> {
    let operation = if wait {
        libc::LOCK_EX
    } else {
        libc::LOCK_EX | libc::LOCK_NB
    };
    loop {
        // SAFETY: flock on a file descriptor we own; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn second_lock_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        let first = acquire(&root).unwrap();
        let mode = std::fs::metadata(&root).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        let err = acquire(&root).unwrap_err().to_string();
        let expected = format!(
            "another netdisk server (pid {}) is already serving {}",
            std::process::id(),
            root.display()
        );
        assert!(err.contains(&expected), "{err}");
        drop(first);
        acquire(&root).unwrap();
    }
}
