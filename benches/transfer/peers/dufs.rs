#[allow(unused_imports)]
use crate::prelude::*;

/// dufs (an HTTP file server) with uploads allowed.
pub struct Dufs {
    pub daemon: Daemon,
    pub addr: String,
    pub data: PathBuf,
    pub version: String,
}

impl Dufs {
    pub fn start(env: &Env) -> Result<Option<Dufs>> {
        let Some(dufs) = which("dufs") else {
            return Ok(None);
        };
        let base = env.work.join("peer-dufs");
        let data = base.join("data");
        fs::create_dir_all(&data)?;
        let port = free_port()?;
        let log = base.join("dufs.log");
        let mut cmd = Command::new(&dufs);
        cmd.arg(&data)
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--allow-all",
            ])
            .stdout(File::create(&log)?)
            .stderr(Stdio::null());
        let addr = format!("127.0.0.1:{port}");
        let daemon = Daemon::start(cmd, &addr, "dufs", &log, libc::SIGTERM)?;
        let version =
            command_output(dufs.to_str().unwrap_or("dufs"), &["--version"]).unwrap_or_default();
        Ok(Some(Dufs {
            daemon,
            addr,
            data,
            version,
        }))
    }

    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }
}
