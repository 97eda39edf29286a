#[allow(unused_imports)]
use crate::prelude::*;

/// `rsync --daemon` with a generated configuration and one writable module.
pub struct Rsync {
    /// Stopped when this is dropped.
    pub _daemon: Daemon,
    pub url: String,
    pub base: PathBuf,
    pub version: String,
}

impl Rsync {
    pub fn start(env: &Env) -> Result<Option<Rsync>> {
        let Some(rsync) = which("rsync") else {
            return Ok(None);
        };
        let base = env.work.join("peer-rsync");
        let data = base.join("data");
        fs::create_dir_all(&data)?;
        let port = free_port()?;
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let config = base.join("rsyncd.conf");
        fs::write(
            &config,
            format!(
                "port = {port}\naddress = 127.0.0.1\nuse chroot = no\npid file = {pid}\n\
                 log file = {log}\n[bench]\n  path = {data}\n  read only = no\n  uid = {uid}\n  gid = {gid}\n",
                pid = base.join("rsyncd.pid").display(),
                log = base.join("rsyncd.log").display(),
                data = data.display(),
            ),
        )?;
        let log = base.join("daemon.stderr");
        let mut cmd = Command::new(&rsync);
        cmd.args(["--daemon", "--no-detach"])
            .arg(format!("--config={}", config.display()))
            .stdout(Stdio::null())
            .stderr(File::create(&log)?);
        let addr = format!("127.0.0.1:{port}");
        let daemon = Daemon::start(cmd, &addr, "rsync --daemon", &log, libc::SIGTERM)?;
        let version = command_output("rsync", &["--version"])
            .and_then(|v| v.lines().next().map(str::to_string))
            .unwrap_or_default();
        Ok(Some(Rsync {
            _daemon: daemon,
            url: format!("rsync://127.0.0.1:{port}/bench"),
            base,
            version,
        }))
    }

    /// `rsync -W -I ARGS...`: whole files (no delta algorithm), never skipped as up to date.
    pub fn run(&self, args: &[String]) -> Result<ChildRun> {
        let mut cmd = Command::new("rsync");
        cmd.args(["-W", "-I"]).args(args);
        run_measured(cmd, &self.base.join("rsync.stderr"))
    }
}
