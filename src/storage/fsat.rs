//! File-system calls relative to an open folder, one component at a time, never following
//! a symbolic link (what `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` does, done with
//! plain `openat(O_NOFOLLOW)` per component so it works on any Linux). Components reaching
//! here are already checked names: no `/`, `.` or `..`.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;

use crate::error::{Error, ErrorCode};

/// Folders made for users: owner only.
pub const DIR_MODE: u32 = 0o700;
/// Files made for users: owner only.
pub const FILE_MODE: u32 = 0o600;

/// Open folder `name` inside `dir` (no link followed).
pub fn open_dir(dir: impl AsFd, name: impl rustix::path::Arg) -> Result<OwnedFd, Errno> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Walk `components` down from `dir`; with `create`, make missing folders on the way.
pub fn walk(dir: &OwnedFd, components: &[&str], create: bool) -> Result<OwnedFd, Errno> {
    let mut current = dir.try_clone().map_err(|_| Errno::MFILE)?;
    for name in components {
        current = match open_dir(&current, *name) {
            Err(Errno::NOENT) if create => {
                match rustix::fs::mkdirat(&current, *name, Mode::from_raw_mode(DIR_MODE)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(e),
                }
                rustix::fs::fsync(&current)?;
                open_dir(&current, *name)?
            }
            other => other?,
        };
    }
    Ok(current)
}

/// Open a regular file for reading (no link followed).
pub fn open_file(dir: impl AsFd, name: &str) -> Result<File, Errno> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    )?;
    let stat = rustix::fs::fstat(&fd)?;
    match FileType::from_raw_mode(stat.st_mode) {
        FileType::RegularFile => {
            // NONBLOCK only guarded the open against FIFOs; regular files ignore it.
            Ok(File::from(fd))
        }
        FileType::Directory => Err(Errno::ISDIR),
        _ => Err(Errno::NOENT),
    }
}

/// `stat` of `name` in `dir`, not following a link.
pub fn stat(dir: impl AsFd, name: &str) -> Result<Stat, Errno> {
    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW)
}

pub fn kind(stat: &Stat) -> FileType {
    FileType::from_raw_mode(stat.st_mode)
}

pub fn modified(stat: &Stat) -> SystemTime {
    let secs = stat.st_mtime.max(0) as u64;
    UNIX_EPOCH + Duration::new(secs, stat.st_mtime_nsec as u32)
}

/// Names in `dir` (without `.` and `..`), with their types as the folder reports them.
pub fn read_names(dir: impl AsFd) -> Result<Vec<(String, FileType)>, Errno> {
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().to_str() else {
            continue; // not UTF-8: cannot be a netdisk name
        };
        if name == "." || name == ".." {
            continue;
        }
        names.push((name.to_string(), entry.file_type()));
    }
    Ok(names)
}

/// Bytes and regular files in a folder tree (no link followed).
pub fn tree_size(dir: &OwnedFd) -> Result<(u64, u64), Errno> {
    let mut files = 0;
    let mut bytes = 0;
    for (name, _) in read_names(dir)? {
        let stat = stat(dir, &name)?;
        match kind(&stat) {
            FileType::RegularFile => {
                files += 1;
                bytes += stat.st_size as u64;
            }
            FileType::Directory => {
                let (f, b) = tree_size(&open_dir(dir, &name)?)?;
                files += f;
                bytes += b;
            }
            _ => {}
        }
    }
    Ok((files, bytes))
}

/// Delete a folder tree (no link followed: a link is removed, not its target).
pub fn remove_tree(parent: &OwnedFd, name: &str) -> Result<(), Errno> {
    let dir = open_dir(parent, name)?;
    for (child, _) in read_names(&dir)? {
        match kind(&stat(&dir, &child)?) {
            FileType::Directory => remove_tree(&dir, &child)?,
            _ => rustix::fs::unlinkat(&dir, child.as_str(), AtFlags::empty())?,
        }
    }
    rustix::fs::unlinkat(parent, name, AtFlags::REMOVEDIR)
}

/// A file-system error about `path` as the client should see it.
pub fn error(e: Errno, path: &str) -> Error {
    let shown = if path.is_empty() { "/" } else { path };
    match e {
        Errno::NOENT => Error::remote(
            ErrorCode::NotFound,
            format!("no such file or folder: {shown}"),
        ),
        Errno::LOOP | Errno::MLINK => Error::remote(
            ErrorCode::NotFound,
            format!("no such file or folder: {shown} (symbolic links are not followed)"),
        ),
        Errno::NOTDIR => Error::remote(
            ErrorCode::WrongType,
            format!("a file is in the way: a component of {shown} is not a folder"),
        ),
        Errno::ISDIR => Error::remote(ErrorCode::WrongType, format!("{shown} is a folder")),
        Errno::EXIST => Error::remote(ErrorCode::Exists, format!("{shown} exists already")),
        Errno::NOTEMPTY => Error::remote(
            ErrorCode::NotEmpty,
            format!("{shown} is a folder that is not empty (remove it recursively)"),
        ),
        Errno::NOSPC | Errno::DQUOT => {
            Error::remote(ErrorCode::NoSpace, "the server's disk is full")
        }
        Errno::NAMETOOLONG => Error::remote(
            ErrorCode::BadName,
            format!("{shown} is too long for the server's file system"),
        ),
        other => Error::Io(other.into()),
    }
}
