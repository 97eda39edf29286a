//! Which user and file names are allowed. Checked on both sides: the client to give a
//! clear message early, the server because it trusts nothing.

use crate::error::{Error, ErrorCode, Result};

/// Longest file name, in bytes (the limit of ext4, XFS, btrfs, APFS and NTFS).
pub const MAX_FILE_NAME_LEN: usize = 255;

/// User names: 1-32 characters of `[A-Za-z0-9_.-]`, not starting with `.`.
pub fn check_user_name(name: &str) -> Result<()> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    if name.is_empty() || name.len() > 32 || name.starts_with('.') || !name.chars().all(allowed) {
        return Err(Error::remote(
            ErrorCode::BadName,
            format!(
                "bad user name {name:?}: use 1-32 characters of A-Z a-z 0-9 _ . - (not starting with '.')"
            ),
        ));
    }
    Ok(())
}

/// Remote file names are plain names inside the user's folder: no path separators,
/// no `.` or `..`, no NUL or other control characters, at most 255 bytes, and nothing
/// that common file systems treat specially (trailing dot or space, Windows device names).
pub fn check_file_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name == "." || name == ".." {
        Some("'.' and '..' are not file names")
    } else if name.contains('/') || name.contains('\\') {
        Some("it contains a path separator; names are plain file names")
    } else if name.chars().any(|c| c.is_control()) {
        Some("it contains a control character")
    } else if name.len() > MAX_FILE_NAME_LEN {
        Some("it is longer than 255 bytes")
    } else if name.ends_with('.') || name.ends_with(' ') {
        Some("it ends with a dot or a space")
    } else if is_windows_device_name(name) {
        Some("it is a reserved device name")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::remote(
            ErrorCode::BadName,
            format!("bad file name {name:?}: {reason}"),
        )),
        None => Ok(()),
    }
}

/// CON, PRN, AUX, NUL, COM1-9, LPT1-9, with or without an extension: such files cannot
/// be downloaded to Windows.
fn is_windows_device_name(name: &str) -> bool {
    let stem = name.split('.').next().unwrap_or("").to_ascii_uppercase();
    matches!(stem.as_str(), "CON" | "PRN" | "AUX" | "NUL")
        || ((stem.starts_with("COM") || stem.starts_with("LPT"))
            && stem.len() == 4
            && stem.as_bytes()[3].is_ascii_digit()
            && stem.as_bytes()[3] != b'0')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names() {
        for ok in ["a", "alice", "Bob_1.x-y", "00123", &"x".repeat(32)] {
            assert!(check_user_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".hidden",
            "a b",
            "a/b",
            "ü",
            "a,b",
            "a=b",
            &"x".repeat(33),
        ] {
            assert!(check_user_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn file_names() {
        for ok in [
            "a.bin",
            ".bashrc",
            "with space",
            "résumé.pdf",
            "日本語.txt",
            "COM0",
            "console.log",
            &"x".repeat(255),
        ] {
            assert!(check_file_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "/etc/passwd",
            "..\\x",
            "a\0b",
            "a\nb",
            "trail.",
            "trail ",
            "NUL",
            "com1.txt",
            "LPT9",
            &"x".repeat(256),
        ] {
            let err = check_file_name(bad).unwrap_err();
            assert_eq!(err.code(), Some(ErrorCode::BadName), "{bad:?}");
        }
    }
}
