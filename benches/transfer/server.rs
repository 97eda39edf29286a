#[allow(unused_imports)]
use crate::prelude::*;

/// How a netdisk server and its clients talk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// This build has no TLS: plain TCP without any flag.
    PlainOnly,
    /// TLS exists; plain means `--no-tls` on both sides.
    Plain,
    Tls,
}

impl Variant {
    pub fn label(self) -> &'static str {
        match self {
            Variant::PlainOnly | Variant::Plain => "no-tls",
            Variant::Tls => "tls",
        }
    }

    pub fn flags(self) -> &'static [&'static str] {
        match self {
            Variant::Plain => &["--no-tls"],
            Variant::PlainOnly | Variant::Tls => &[],
        }
    }

    /// How the library client connects; TLS pins the server's self-signed certificate on
    /// first use in the same file the command line uses.
    pub fn connect_options(self, config: &Path) -> ConnectOptions {
        let tls = (self == Variant::Tls).then(|| ClientTls::Pinned {
            known_servers: config.join("netdisk").join("known_servers"),
        });
        ConnectOptions { tls, secret: None }
    }
}

/// What an in-process client needs: where, how, and a session token.
#[derive(Clone)]
pub struct Lib {
    pub addr: String,
    pub options: ConnectOptions,
    pub token: String,
}

impl Lib {
    pub async fn client(&self) -> Result<Client> {
        let mut client = Client::connect_with(&self.addr, &self.options).await?;
        client.login_with_token(&self.token).await?;
        Ok(client)
    }
}

/// A `netdisk serve` child process with its own data folder.
pub struct ServerProc {
    pub daemon: Daemon,
    pub addr: String,
    pub root: PathBuf,
    pub log: PathBuf,
    pub variant: Variant,
    pub bin: PathBuf,
    /// XDG_CONFIG_HOME of the command-line clients (saved login).
    pub config: PathBuf,
    pub token: Option<String>,
}

impl ServerProc {
    pub fn start(
        env: &Env,
        name: &str,
        variant: Variant,
        max_connections: usize,
    ) -> Result<ServerProc> {
        let base = env.work.join(name);
        let root = base.join("root");
        let config = base.join("config");
        fs::create_dir_all(&root)?;
        fs::create_dir_all(&config)?;
        let log = base.join("server.log");
        let addr = format!("127.0.0.1:{}", free_port()?);
        let mut cmd = Command::new(&env.bin);
        cmd.arg("serve")
            .args(["--listen", &addr])
            .arg("--root")
            .arg(&root)
            .args(["--max-connections", &max_connections.to_string()])
            .args([
                "--max-connections-per-address",
                &max_connections.to_string(),
            ])
            .args(variant.flags())
            .env_remove("RUST_LOG")
            .env_remove("NETDISK_LISTEN")
            .env_remove("NETDISK_ROOT")
            .env_remove("NETDISK_NO_TLS")
            .env_remove("NETDISK_SECRET_FILE")
            .stdout(Stdio::null())
            .stderr(File::create(&log)?);
        // SIGINT: the server's graceful shutdown.
        let daemon = Daemon::start(cmd, &addr, "netdisk serve", &log, libc::SIGINT)?;
        Ok(ServerProc {
            daemon,
            addr,
            root,
            log,
            variant,
            bin: env.bin.clone(),
            config,
            token: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    pub fn cpu(&self) -> f64 {
        proc_cpu_secs(self.pid())
    }

    pub fn rss_mib(&self) -> f64 {
        proc_status_mib(self.pid(), "VmRSS:")
    }

    pub fn peak_rss_mib(&self) -> f64 {
        proc_status_mib(self.pid(), "VmHWM:")
    }

    /// Start a new peak-RSS window (Linux: `5` to clear_refs resets VmHWM to VmRSS).
    pub fn reset_peak(&self) {
        let _ = fs::write(format!("/proc/{}/clear_refs", self.pid()), "5");
    }

    /// A command-line client of this server (saved login in its own config folder).
    pub fn cli(&self, subcommand: &str) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(["--server", &self.addr, "--quiet", subcommand])
            .args(self.variant.flags())
            .env("XDG_CONFIG_HOME", &self.config)
            .env("HOME", &self.config)
            .env("NETDISK_PASSWORD", PASSWORD)
            .env_remove("NETDISK_SERVER")
            .env_remove("NETDISK_NO_TLS")
            .env_remove("NETDISK_CA")
            .env_remove("NETDISK_SECRET_FILE")
            .env_remove("RUST_LOG");
        cmd
    }

    pub fn errlog(&self) -> PathBuf {
        self.root.with_file_name("client.stderr")
    }

    /// Register the benchmark user with `iterations` SCRAM iterations (through the
    /// library), keep a token for in-process clients, and save a command-line login.
    pub fn add_user(&mut self, rt: &tokio::runtime::Runtime, iterations: u32) -> Result<()> {
        let addr = self.addr.clone();
        let options = self.variant.connect_options(&self.config);
        let token = rt.block_on(async move {
            let mut client = Client::connect_with(&addr, &options).await?;
            client.register(USER, PASSWORD, iterations).await?;
            let token = client.login(USER, PASSWORD).await?;
            client.quit().await?;
            anyhow::Ok(token)
        })?;
        self.token = Some(token);
        let mut cmd = self.cli("login");
        cmd.arg(USER);
        run_measured(cmd, &self.errlog()).context("netdisk login")?;
        Ok(())
    }

    /// How in-process clients reach this server (after `add_user`).
    pub fn lib(&self) -> Result<Lib> {
        Ok(Lib {
            addr: self.addr.clone(),
            options: self.variant.connect_options(&self.config),
            token: self
                .token
                .clone()
                .ok_or_else(|| anyhow!("no user on this server yet"))?,
        })
    }

    /// Body bytes the server logged for its last `get` (the log line of each command).
    pub fn last_get_bytes(&self) -> Option<u64> {
        let log = fs::read_to_string(&self.log).ok()?;
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("cmd=\"get\"") || l.contains("cmd=get "))?;
        let rest = &line[line.find(" bytes=")? + 7..];
        rest.split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    }
}
