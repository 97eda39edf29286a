//! Which user and file names are allowed. Checked on both sides: the client to give a
//! clear message early, the server because it trusts nothing.

use unicode_normalization::{is_nfc, UnicodeNormalization};
use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};

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

/// Deepest remote path accepted by [`split_remote_path`], in components.
pub const MAX_PATH_DEPTH: usize = 32;
/// Longest remote path accepted by [`split_remote_path`], in bytes.
pub const MAX_PATH_LEN: usize = 1024;

/// Remote file names are plain names inside the user's folder: no path separators,
/// no `.` or `..`, no NUL or other control characters, at most 255 bytes, and nothing
/// that common file systems treat specially (trailing dot or space, Windows device names).
/// Invisible format characters and line separators are refused (they make names that look
/// alike or reorder on screen, e.g. U+202E), and so are names not in Unicode NFC, so that
/// "é" typed on Linux and "é" from macOS (NFD) cannot become two different files.
pub fn check_file_name(name: &str) -> Result<()> {
    match file_name_problem(name) {
        Some(reason) => Err(Error::remote(
            ErrorCode::BadName,
            format!("bad file name {name:?}: {reason}"),
        )),
        None => Ok(()),
    }
}

/// The NFC form of `name`: what a client should send for a local name, which on macOS is
/// often NFD. Already-NFC names come back unchanged.
pub fn to_nfc(name: &str) -> String {
    name.nfc().collect()
}

/// Split a remote path, relative to the user's folder, into checked components.
///
/// Components are separated by '/'; one leading and one trailing '/' are ignored, and ""
/// or "/" is the user's root (an empty Vec). Empty components ("a//b"), any component
/// [`check_file_name`] refuses (so '.', '..', backslash, control characters), more than
/// [`MAX_PATH_DEPTH`] components and more than [`MAX_PATH_LEN`] bytes are refused.
pub fn split_remote_path(path: &str) -> Result<Vec<&str>> {
    let bad_path =
        |reason: String| Error::remote(ErrorCode::BadName, format!("bad path {path:?}: {reason}"));
    // Checked first, so no further work is done on an oversized path.
    if path.len() > MAX_PATH_LEN {
        return Err(bad_path(format!("it is longer than {MAX_PATH_LEN} bytes")));
    }
    if path.is_empty() || path == "/" {
        return Ok(Vec::new());
    }
    let inner = path.strip_prefix('/').unwrap_or(path);
    let inner = inner.strip_suffix('/').unwrap_or(inner);
    let mut components = Vec::new();
    for component in inner.split('/') {
        if component.is_empty() {
            return Err(bad_path("it has an empty component ('//')".to_string()));
        }
        if components.len() == MAX_PATH_DEPTH {
            return Err(bad_path(format!(
                "it is deeper than {MAX_PATH_DEPTH} components"
            )));
        }
        if let Some(reason) = file_name_problem(component) {
            return Err(bad_path(format!("component {component:?}: {reason}")));
        }
        components.push(component);
    }
    Ok(components)
}

/// [`split_remote_path`] for callers that only need the verdict.
pub fn check_remote_path(path: &str) -> Result<()> {
    split_remote_path(path).map(|_| ())
}

/// Why `name` is not an acceptable file name, or None if it is.
fn file_name_problem(name: &str) -> Option<String> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name == "." || name == ".." {
        "'.' and '..' are not file names"
    } else if name.contains('/') || name.contains('\\') {
        "it contains a path separator; names are plain file names"
    } else if name.chars().any(|c| c.is_control()) {
        "it contains a control character"
    } else if let Some(c) = name.chars().find(|&c| is_invisible_format_or_separator(c)) {
        return Some(format!(
            "it contains the invisible format or line-separator character U+{:04X}",
            c as u32
        ));
    } else if !is_nfc(name) {
        "it is not in Unicode NFC form; normalise it to NFC (composed characters) first"
    } else if name.len() > MAX_FILE_NAME_LEN {
        "it is longer than 255 bytes"
    } else if name.ends_with('.') || name.ends_with(' ') {
        "it ends with a dot or a space"
    } else if is_windows_device_name(name) {
        "it is a reserved device name"
    } else {
        return None;
    };
    Some(reason.to_string())
}

/// General categories Cf (format: bidi overrides, zero-width characters, BOM), Zl and Zp
/// (line and paragraph separators): invisible, or breaking listings into lines.
fn is_invisible_format_or_separator(c: char) -> bool {
    matches!(
        c.general_category(),
        GeneralCategory::Format
            | GeneralCategory::LineSeparator
            | GeneralCategory::ParagraphSeparator
    )
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
            "\u{1F600}\u{1F680} party",
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

    #[test]
    fn invisible_and_unnormalised_file_names_refused_with_a_reason() {
        for (bad, reason) in [
            ("evil\u{202E}fdp.exe", "U+202E"),
            ("zero\u{200B}width", "U+200B"),
            ("line\u{2028}sep", "U+2028"),
            ("para\u{2029}sep", "U+2029"),
            ("\u{FEFF}bom", "U+FEFF"),
            ("soft\u{AD}hyphen", "U+00AD"),
            ("cafe\u{301}", "not in Unicode NFC"),
        ] {
            let message = check_file_name(bad).unwrap_err().to_string();
            assert!(message.contains(reason), "{bad:?}: {message}");
        }
    }

    #[test]
    fn to_nfc_composes_and_the_result_is_accepted() {
        let nfd = "re\u{301}sume\u{301}.pdf";
        assert!(check_file_name(nfd).is_err());
        let nfc = to_nfc(nfd);
        assert_eq!(nfc, "r\u{e9}sum\u{e9}.pdf");
        check_file_name(&nfc).unwrap();
        assert_eq!(to_nfc("plain.txt"), "plain.txt");
    }

    #[test]
    fn remote_paths_split_into_components() {
        let max_component = "x".repeat(MAX_FILE_NAME_LEN);
        let deepest = vec!["d"; MAX_PATH_DEPTH].join("/");
        // 4 components of 255 bytes and 3 separators: 1023 bytes, just under the limit.
        let longest = [max_component.as_str(); 4].join("/");
        let cases: Vec<(&str, Vec<&str>)> = vec![
            ("", vec![]),
            ("/", vec![]),
            ("a", vec!["a"]),
            ("/a/", vec!["a"]),
            (
                "photos/2024/\u{1F600} beach.jpg",
                vec!["photos", "2024", "\u{1F600} beach.jpg"],
            ),
            (
                "with space/r\u{e9}sum\u{e9}.pdf",
                vec!["with space", "r\u{e9}sum\u{e9}.pdf"],
            ),
            (&max_component, vec![max_component.as_str()]),
            (&deepest, vec!["d"; MAX_PATH_DEPTH]),
            (&longest, vec![max_component.as_str(); 4]),
        ];
        for (path, expected) in cases {
            assert_eq!(split_remote_path(path).unwrap(), expected, "{path:?}");
            check_remote_path(path).unwrap();
        }
    }

    #[test]
    fn bad_remote_paths_refused_naming_path_and_reason() {
        let too_deep = vec!["d"; MAX_PATH_DEPTH + 1].join("/");
        // Five valid components, one byte over the limit.
        let too_long = format!("{}/a", vec!["x".repeat(255); 4].join("/"));
        assert_eq!(too_long.len(), MAX_PATH_LEN + 1);
        for (bad, reason) in [
            ("a\nb/c", "control character"),
            ("a/\u{202E}gpj.exe", "U+202E"),
            ("a/zero\u{200B}width", "U+200B"),
            ("a\u{2028}b", "U+2028"),
            ("e\u{301}/x", "NFC"),
            ("a/../b", "'..'"),
            ("../x", "'..'"),
            ("./x", "'.'"),
            ("a\\b", "path separator"),
            ("a//b", "empty component"),
            ("//", "empty component"),
            ("///a", "empty component"),
            ("a/b//", "empty component"),
            (&too_deep, "deeper than 32"),
            (&too_long, "longer than 1024 bytes"),
        ] {
            let err = split_remote_path(bad).unwrap_err();
            assert_eq!(err.code(), Some(ErrorCode::BadName), "{bad:?}");
            let message = err.to_string();
            assert!(message.contains(&format!("{bad:?}")), "{message}");
            assert!(message.contains(reason), "{bad:?}: {message}");
            assert!(check_remote_path(bad).is_err());
        }
    }
}
