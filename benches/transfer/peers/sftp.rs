#[allow(unused_imports)]
use crate::prelude::*;

/// OpenSSH's sshd on a loopback port with a generated host key and one authorized key;
/// the sftp command line client in batch mode.
pub struct Sftp {
    /// Stopped when this is dropped.
    pub _daemon: Daemon,
    pub port: u16,
    pub key: PathBuf,
    pub user: String,
    /// The server's folder (same disk; sftp sees absolute paths).
    pub data: PathBuf,
    pub base: PathBuf,
    pub version: String,
}

impl Sftp {
    pub fn start(env: &Env) -> Result<Option<Sftp>> {
        let (Some(sshd), Some(_), Some(keygen)) =
            (which("sshd"), which("sftp"), which("ssh-keygen"))
        else {
            return Ok(None);
        };
        let base = env.work.join("peer-sftp");
        let data = base.join("data");
        fs::create_dir_all(&data)?;
        for (name, kind) in [("host_key", "ed25519"), ("client_key", "ed25519")] {
            let path = base.join(name);
            let status = Command::new(&keygen)
                .args(["-q", "-t", kind, "-N", "", "-f"])
                .arg(&path)
                .stdin(Stdio::null())
                .status()?;
            if !status.success() {
                bail!("ssh-keygen failed");
            }
        }
        fs::copy(base.join("client_key.pub"), base.join("authorized_keys"))?;
        // sshd insists on its privilege-separation folder.
        let _ = fs::create_dir_all("/run/sshd");
        let port = free_port()?;
        let sftp_server = [
            "/usr/lib/openssh/sftp-server",
            "/usr/libexec/openssh/sftp-server",
        ]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("internal-sftp");
        let config = base.join("sshd_config");
        fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {host}\nAuthorizedKeysFile {auth}\n\
                 PidFile {pid}\nUsePAM no\nStrictModes no\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
                 PermitRootLogin prohibit-password\nSubsystem sftp {sftp_server}\nLogLevel ERROR\n",
                host = base.join("host_key").display(),
                auth = base.join("authorized_keys").display(),
                pid = base.join("sshd.pid").display(),
            ),
        )?;
        let log = base.join("sshd.log");
        let mut cmd = Command::new(&sshd);
        cmd.args(["-D", "-e", "-f"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(File::create(&log)?);
        let addr = format!("127.0.0.1:{port}");
        let daemon = Daemon::start(cmd, &addr, "sshd", &log, libc::SIGTERM)?;
        let version = Command::new("ssh")
            .arg("-V")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
            .unwrap_or_default();
        let user = command_output("id", &["-un"]).unwrap_or_else(|| "root".into());
        let sftp = Sftp {
            _daemon: daemon,
            port,
            key: base.join("client_key"),
            user,
            data,
            base,
            version,
        };
        // One trial login, so a broken setup fails here and not in the middle.
        sftp.batch(&["pwd".to_string()])?;
        Ok(Some(sftp))
    }

    pub fn batch(&self, lines: &[String]) -> Result<ChildRun> {
        let batch = self.base.join("batch");
        fs::write(&batch, lines.join("\n") + "\n")?;
        let mut cmd = Command::new("sftp");
        cmd.args(["-q", "-b"])
            .arg(&batch)
            .args(["-P", &self.port.to_string(), "-i"])
            .arg(&self.key)
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "LogLevel=ERROR",
            ])
            .arg(format!("{}@127.0.0.1", self.user));
        run_measured(cmd, &self.base.join("sftp.stderr"))
    }
}
