//! The client's saved logins: `$XDG_CONFIG_HOME/netdisk/logins.json` (or
//! `~/.config/netdisk/logins.json`), readable by the owner only. It holds session tokens
//! per server address, never a password.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::durable::write_atomically;
use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedLogin {
    pub user: String,
    pub token: String,
}

/// The folder for netdisk's client files.
pub fn config_dir() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(home) => PathBuf::from(home).join(".config"),
            None => {
                return Err(Error::Invalid(
                    "cannot find a config folder: set HOME or XDG_CONFIG_HOME".into(),
                ))
            }
        },
    };
    Ok(base.join("netdisk"))
}

fn logins_path() -> Result<PathBuf> {
    Ok(config_dir()?.join("logins.json"))
}

fn read_all() -> Result<BTreeMap<String, SavedLogin>> {
    let path = logins_path()?;
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| Error::Invalid(format!("cannot parse {}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(e.into()),
    }
}

fn write_all(logins: &BTreeMap<String, SavedLogin>) -> Result<()> {
    let dir = config_dir()?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    let bytes = serde_json::to_vec_pretty(logins).map_err(|e| Error::Invalid(e.to_string()))?;
    write_atomically(&logins_path()?, &bytes, 0o600)?;
    Ok(())
}

/// The saved login for `server`, if any.
pub fn load_login(server: &str) -> Result<Option<SavedLogin>> {
    Ok(read_all()?.remove(server))
}

pub fn save_login(server: &str, login: SavedLogin) -> Result<()> {
    let mut logins = read_all()?;
    logins.insert(server.to_string(), login);
    write_all(&logins)
}

/// Forget the login for `server`; returns the one that was saved.
pub fn forget_login(server: &str) -> Result<Option<SavedLogin>> {
    let mut logins = read_all()?;
    let removed = logins.remove(server);
    if removed.is_some() {
        write_all(&logins)?;
    }
    Ok(removed)
}
