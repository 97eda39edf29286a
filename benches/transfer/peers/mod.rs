//! Peers: sftp (OpenSSH), rsync daemon, dufs; each on its own loopback port

#[allow(unused_imports)]
use crate::prelude::*;

mod dufs;
mod http;
mod rsync;
mod sftp;

pub use dufs::*;
pub use http::*;
pub use rsync::*;
pub use sftp::*;

pub struct Peers {
    pub sftp: Option<Sftp>,
    pub rsync: Option<Rsync>,
    pub dufs: Option<Dufs>,
    pub status: BTreeMap<&'static str, String>,
}

impl Peers {
    pub fn none() -> Peers {
        Peers {
            sftp: None,
            rsync: None,
            dufs: None,
            status: BTreeMap::new(),
        }
    }

    pub fn json(&self) -> Value {
        json!(self.status)
    }
}

pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from));
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

pub fn install_peers(report: &mut Report) {
    let mut apt = Vec::new();
    if which("sshd").is_none() {
        apt.push("openssh-server");
    }
    if which("sftp").is_none() || which("ssh-keygen").is_none() {
        apt.push("openssh-client");
    }
    if which("rsync").is_none() {
        apt.push("rsync");
    }
    if !apt.is_empty() {
        eprintln!("installing peers from apt: {}", apt.join(" "));
        let updated = Command::new("apt-get").args(["update", "-qq"]).status();
        // RUNLEVEL=1 keeps the package scripts from starting a system-wide sshd.
        let installed = Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&apt)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("RUNLEVEL", "1")
            .status();
        match (updated, installed) {
            (_, Ok(s)) if s.success() => {
                report.note(format!("installed from apt: {}", apt.join(" ")))
            }
            (_, other) => report.note(format!(
                "apt-get install {} failed: {other:?}",
                apt.join(" ")
            )),
        }
    }
    if which("dufs").is_none() {
        eprintln!("installing dufs with cargo install (takes a few minutes)");
        match Command::new("cargo")
            .args(["install", "--locked", "dufs"])
            .status()
        {
            Ok(s) if s.success() => report.note("installed dufs with cargo install"),
            other => report.note(format!("cargo install dufs failed: {other:?}")),
        }
    }
}

pub fn start_peers(env: &Env, report: &mut Report, install: bool) -> Peers {
    if install {
        install_peers(report);
    }
    let mut peers = Peers::none();
    match Sftp::start(env) {
        Ok(Some(sftp)) => {
            peers
                .status
                .insert("sftp", format!("ran: {}", sftp.version));
            peers.sftp = Some(sftp);
        }
        Ok(None) => {
            peers
                .status
                .insert("sftp", "not installed (sshd, sftp, ssh-keygen)".into());
        }
        Err(e) => {
            peers
                .status
                .insert("sftp", format!("failed to start: {e:#}"));
        }
    }
    match Rsync::start(env) {
        Ok(Some(rsync)) => {
            peers
                .status
                .insert("rsync", format!("ran: {}", rsync.version));
            peers.rsync = Some(rsync);
        }
        Ok(None) => {
            peers.status.insert("rsync", "not installed".into());
        }
        Err(e) => {
            peers
                .status
                .insert("rsync", format!("failed to start: {e:#}"));
        }
    }
    match Dufs::start(env) {
        Ok(Some(dufs)) => {
            peers
                .status
                .insert("dufs", format!("ran: {}", dufs.version));
            peers.dufs = Some(dufs);
        }
        Ok(None) => {
            peers.status.insert("dufs", "not installed".into());
        }
        Err(e) => {
            peers
                .status
                .insert("dufs", format!("failed to start: {e:#}"));
        }
    }
    for (peer, status) in &peers.status {
        report.note(format!("peer {peer}: {status}"));
    }
    peers
}
