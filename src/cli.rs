//! Command-line parsing and terminal interaction (prompts, progress bars, messages).

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use netdisk::client::{Client, ConnectOptions, Progress};
use netdisk::config::{self, SavedLogin};
use netdisk::conncheck;
use netdisk::protocol::FileEntry;
use netdisk::scram;
use netdisk::server::{Server, ServerConfig, TlsSetting};
use netdisk::tls::ClientTls;

const DEFAULT_SERVER: &str = "127.0.0.1:9000";

/// netdisk: a self-hosted network drive.
///
/// Start a server with `netdisk serve`, then `netdisk register NAME`, `netdisk login NAME`,
/// `netdisk put FILE`, `netdisk ls`, `netdisk get NAME`.
#[derive(Parser)]
#[command(name = "netdisk", version, about, long_about)]
struct Cli {
    /// Server address (HOST:PORT)
    #[arg(long, global = true, env = "NETDISK_SERVER", default_value = DEFAULT_SERVER)]
    server: String,
    /// Authenticate this one command as USER (password from NETDISK_PASSWORD or a prompt)
    /// instead of using the saved login
    #[arg(long, global = true, value_name = "USER")]
    user: Option<String>,
    /// No progress bars or notes (errors are still printed)
    #[arg(long, short, global = true)]
    quiet: bool,
    /// Plain TCP without TLS, on the server or the client (both sides must agree).
    /// Logins stay SCRAM, but file contents and session tokens travel unencrypted
    #[arg(long, global = true, env = "NETDISK_NO_TLS")]
    no_tls: bool,
    /// Verify the server's certificate with this CA file (PEM) instead of pinning it on
    /// first use (fingerprints are kept in CONFIG/netdisk/known_servers)
    #[arg(long, global = true, env = "NETDISK_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Shared secret file for the connection check (server and clients use the same file)
    #[arg(long, global = true, env = "NETDISK_SECRET_FILE", value_name = "FILE")]
    secret_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server
    Serve(ServeArgs),
    /// Create an account; the server makes the user's folder
    Register {
        /// User name: 1-32 characters of A-Z a-z 0-9 _ . - (not starting with '.')
        user: String,
    },
    /// Log in and save a session token (never the password) for later commands
    Login {
        user: String,
    },
    /// End the saved session (on the server too)
    Logout,
    /// List your files: name, size in bytes, modified time
    Ls {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
        /// List unfinished (staged) uploads instead
        #[arg(long)]
        partial: bool,
    },
    /// Upload a file (overwrites a file of the same name; resumes an interrupted upload)
    Put {
        local_file: PathBuf,
        /// Name on the server (default: the local file's name)
        remote_name: Option<String>,
        /// Discard a staged partial upload and start over
        #[arg(long)]
        restart: bool,
    },
    /// Download a file, with resume if the local file exists
    Get {
        remote_name: String,
        /// Where to save it (default: the remote name in the current folder; a folder
        /// means the remote name inside it)
        local_path: Option<PathBuf>,
        /// If the local file exists, continue it without asking
        #[arg(long, conflicts_with = "restart")]
        resume: bool,
        /// If the local file exists, overwrite it without asking
        #[arg(long)]
        restart: bool,
    },
    /// Upload several files over one connection, pipelined (like ftp's mput); each keeps
    /// its local file name and replaces a remote file of that name
    Mput {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Download several files over one connection, pipelined (like ftp's mget)
    Mget {
        #[arg(required = true)]
        names: Vec<String>,
        /// Folder to save them in
        #[arg(long, short = 'C', default_value = ".")]
        dir: PathBuf,
        /// Replace local files that exist (otherwise they are skipped with an error)
        #[arg(long)]
        overwrite: bool,
    },
    /// Interactive prompt: register, login, ls, put, get, help, quit
    Shell,
    Admin(netdisk::admin::AdminArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on
    #[arg(long, env = "NETDISK_LISTEN", default_value = DEFAULT_SERVER)]
    listen: String,
    /// Data folder: users.xlsx, files/USER/, staged uploads
    #[arg(long, env = "NETDISK_ROOT", default_value = "./netdisk-data")]
    root: PathBuf,
    /// Most connections served at once
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Delete unfinished uploads idle for this many hours
    #[arg(long, default_value_t = 24.0)]
    partial_expiry_hours: f64,
    /// TLS certificate chain (PEM) to use instead of the self-signed one in ROOT/tls/
    #[arg(
        long,
        env = "NETDISK_TLS_CERT",
        value_name = "FILE",
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// Most bytes each user may store, e.g. 500MiB, 10GiB, 2TB (default: unlimited)
    #[arg(long, env = "NETDISK_QUOTA", value_name = "SIZE", value_parser = parse_size)]
    quota: Option<u64>,
    /// Private key (PEM) of --tls-cert
    #[arg(
        long,
        env = "NETDISK_TLS_KEY",
        value_name = "FILE",
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("netdisk: error: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netdisk: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let ui = Ui { quiet: cli.quiet };
    let secret = cli
        .secret_file
        .as_deref()
        .map(conncheck::load_secret)
        .transpose()?;
    if let Command::Serve(args) = cli.command {
        return serve(args, cli.no_tls, secret).await;
    }
    if let Command::Admin(args) = cli.command {
        return netdisk::admin::run(args);
    }
    let tls = match (cli.no_tls, cli.ca) {
        (true, _) => {
            ui.say("warning: --no-tls: this connection is not encrypted (the password still never crosses it)");
            None
        }
        (false, Some(ca_file)) => Some(ClientTls::Ca { ca_file }),
        (false, None) => Some(ClientTls::Pinned {
            known_servers: config::config_dir()?.join("known_servers"),
        }),
    };
    let remote = Remote {
        server: cli.server.clone(),
        options: ConnectOptions { tls, secret },
        ui,
    };
    match cli.command {
        Command::Serve(_) | Command::Admin(_) => unreachable!("handled above"),
        Command::Register { user } => {
            let mut client = remote.connect().await?;
            let password = new_password(&user)?;
            client
                .register(&user, &password, scram::DEFAULT_ITERATIONS)
                .await?;
            ui.say(&format!("registered {user}; now run: netdisk login {user}"));
            Ok(())
        }
        Command::Login { user } => {
            let mut client = remote.connect().await?;
            let password = password(&user)?;
            let token = client.login(&user, &password).await?;
            config::save_login(
                &cli.server,
                SavedLogin {
                    user: user.clone(),
                    token,
                },
            )?;
            ui.say(&format!("logged in to {} as {user}", cli.server));
            Ok(())
        }
        Command::Logout => {
            let Some(saved) = config::forget_login(&cli.server)? else {
                bail!("not logged in to {}", cli.server);
            };
            // The local token is gone either way; revoking it on the server is best effort.
            let revoked = async {
                let mut client = remote.connect().await?;
                client.login_with_token(&saved.token).await?;
                client.logout().await?;
                anyhow::Ok(())
            };
            if let Err(e) = revoked.await {
                ui.say(&format!(
                    "note: could not end the session on the server: {e}"
                ));
            }
            ui.say(&format!("logged out {}", saved.user));
            Ok(())
        }
        Command::Ls { json, partial } => {
            let mut client = remote.authenticated(cli.user.as_deref()).await?;
            if partial {
                let entries = client.list_partial().await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&entries)?);
                } else {
                    for e in entries {
                        println!(
                            "{:>14} / {:<14} {}  {}",
                            e.received, e.size, e.updated, e.name
                        );
                    }
                }
            } else {
                let entries = client.list().await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&entries)?);
                } else {
                    print_listing(&entries);
                }
            }
            Ok(())
        }
        Command::Put {
            local_file,
            remote_name,
            restart,
        } => {
            let name = match remote_name {
                Some(name) => name,
                None => file_name_of(&local_file)?,
            };
            let mut client = remote.authenticated(cli.user.as_deref()).await?;
            let mut bar = ui.progress();
            let outcome = client.put(&local_file, &name, restart, &mut bar).await?;
            ui.say(&format!(
                "uploaded {name} ({} bytes, verified)",
                outcome.size
            ));
            Ok(())
        }
        Command::Get {
            remote_name,
            local_path,
            resume,
            restart,
        } => {
            let local = local_target(&remote_name, local_path);
            let resume = decide_resume(&local, resume, restart)?;
            let mut client = remote.authenticated(cli.user.as_deref()).await?;
            let mut bar = ui.progress();
            let outcome = client.get(&remote_name, &local, resume, &mut bar).await?;
            ui.say(&format!(
                "downloaded {remote_name} to {} ({} bytes, verified)",
                local.display(),
                outcome.size
            ));
            Ok(())
        }
        Command::Mput { files } => {
            let mut pairs = Vec::new();
            for path in files {
                let name = file_name_of(&path)?;
                pairs.push((path, name));
            }
            let total = pairs
                .iter()
                .filter_map(|(path, _)| std::fs::metadata(path).ok())
                .map(|m| m.len())
                .sum();
            let mut client = remote.authenticated(cli.user.as_deref()).await?;
            let mut bar = ui.progress();
            bar.start(total, 0);
            let results = client.put_many(&pairs, &mut bar).await?;
            bar.finish();
            let names = pairs.iter().map(|(_, name)| name.as_str());
            report_many("uploaded", names, &results, ui)
        }
        Command::Mget {
            names,
            dir,
            overwrite,
        } => {
            let mut wanted = Vec::new();
            let mut skipped = 0;
            for name in &names {
                let local = dir.join(name);
                if local.exists() && !overwrite {
                    eprintln!(
                        "netdisk: {name}: {} exists (use --overwrite)",
                        local.display()
                    );
                    skipped += 1;
                } else {
                    wanted.push((name.clone(), local));
                }
            }
            let mut client = remote.authenticated(cli.user.as_deref()).await?;
            let mut bar = ui.progress();
            bar.start(0, 0);
            let results = client.get_many(&wanted, &mut bar).await?;
            bar.finish();
            let fetched = wanted.iter().map(|(name, _)| name.as_str());
            report_many("downloaded", fetched, &results, ui)?;
            if skipped > 0 {
                bail!("{skipped} of {} files skipped", names.len());
            }
            Ok(())
        }
        Command::Shell => shell(&remote).await,
    }
}

async fn serve(args: ServeArgs, no_tls: bool, secret: Option<Vec<u8>>) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let mut config = ServerConfig::new(args.listen, args.root);
    config.max_connections = args.max_connections.max(1);
    config.partial_max_idle =
        std::time::Duration::from_secs_f64(args.partial_expiry_hours.max(0.0) * 3600.0);
    config.secret = secret;
    config.quota = args.quota;
    config.tls = match (no_tls, args.tls_cert, args.tls_key) {
        (true, _, _) => TlsSetting::Off,
        (false, Some(cert), Some(key)) => TlsSetting::Files { cert, key },
        _ => TlsSetting::SelfSigned,
    };
    let server = Server::bind(config).await?;
    server
        .run(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

/// The server this command talks to, and how.
struct Remote {
    server: String,
    options: ConnectOptions,
    ui: Ui,
}

impl Remote {
    async fn connect(&self) -> anyhow::Result<Client> {
        let client = Client::connect_with(&self.server, &self.options).await?;
        if let Some(fingerprint) = client.newly_pinned() {
            self.ui.say(&format!(
                "note: first connection to {}: trusting its certificate {fingerprint} from now on",
                self.server
            ));
        }
        Ok(client)
    }

    /// A client logged in with `--user` (password now) or with the saved session.
    async fn authenticated(&self, user: Option<&str>) -> anyhow::Result<Client> {
        let server = self.server.as_str();
        let mut client = self.connect().await?;
        match user {
            Some(user) => {
                let password = password(user)?;
                client.login(user, &password).await?;
            }
            None => {
                let saved = config::load_login(server)?.ok_or_else(|| {
                anyhow!("not logged in to {server}: run `netdisk login USER` first (or pass --user USER)")
            })?;
                client
                    .login_with_token(&saved.token)
                    .await
                    .with_context(|| format!("saved login for {} no longer works", saved.user))?;
            }
        }
        Ok(client)
    }
}

/// `get NAME [LOCAL]`: LOCAL defaults to NAME here; an existing folder means NAME inside it.
fn local_target(remote: &str, local: Option<PathBuf>) -> PathBuf {
    match local {
        Some(path) if path.is_dir() => path.join(remote),
        Some(path) => path,
        None => PathBuf::from(remote),
    }
}

/// Whether to continue an existing local file: the flag, else ask on a terminal.
fn decide_resume(local: &Path, resume: bool, restart: bool) -> anyhow::Result<bool> {
    if resume || restart || !local.exists() {
        return Ok(resume);
    }
    if !std::io::stdin().is_terminal() || !std::io::stderr().is_terminal() {
        bail!(
            "{} already exists: pass --resume to continue it or --restart to download it again",
            local.display()
        );
    }
    let answer = ask(&format!(
        "{} already exists. Resume the download? [Y/n] ",
        local.display()
    ))?;
    Ok(!matches!(answer.trim().to_lowercase().as_str(), "n" | "no"))
}

/// `10GiB`, `500MB`, `4096`: binary (KiB, MiB, GiB, TiB, or K, M, G, T) and decimal
/// (KB, MB, GB, TB) units, case-insensitive.
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 10GiB"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit {other:?} (use KiB, MiB, GiB, TiB)"
            ))
        }
    };
    Ok((number * scale as f64) as u64)
}

/// One line per failed file, a summary, and an error if anything failed.
fn report_many<'a>(
    verb: &str,
    names: impl Iterator<Item = &'a str>,
    results: &[netdisk::Result<netdisk::client::TransferOutcome>],
    ui: Ui,
) -> anyhow::Result<()> {
    let mut failed = 0;
    let mut bytes = 0;
    for (name, result) in names.zip(results) {
        match result {
            Ok(outcome) => bytes += outcome.size,
            Err(e) => {
                failed += 1;
                eprintln!("netdisk: {name}: {e}");
            }
        }
    }
    let done = results.len() - failed;
    ui.say(&format!("{verb} {done} files ({bytes} bytes, verified)"));
    if failed > 0 {
        bail!("{failed} of {} files failed", results.len());
    }
    Ok(())
}

fn file_name_of(path: &Path) -> anyhow::Result<String> {
    path.file_name()
        .and_then(|n| n.to_str())
        .map(str::to_string)
        .ok_or_else(|| {
            anyhow!(
                "cannot take a remote name from {}: give one",
                path.display()
            )
        })
}

fn print_listing(entries: &[FileEntry]) {
    for e in entries {
        println!("{:>14}  {}  {}", e.size, e.modified, e.name);
    }
}

/// The password: NETDISK_PASSWORD if set, else asked without echo.
fn password(user: &str) -> anyhow::Result<String> {
    if let Ok(password) = std::env::var("NETDISK_PASSWORD") {
        return Ok(password);
    }
    if !std::io::stdin().is_terminal() {
        bail!("no password: set NETDISK_PASSWORD or run on a terminal");
    }
    Ok(rpassword::prompt_password(format!(
        "password for {user}: "
    ))?)
}

/// A new password, typed twice on a terminal.
fn new_password(user: &str) -> anyhow::Result<String> {
    let password = password(user)?;
    if std::env::var_os("NETDISK_PASSWORD").is_none() {
        let again = rpassword::prompt_password("again: ")?;
        if again != password {
            bail!("the two passwords differ");
        }
    }
    if password.is_empty() {
        bail!("the password must not be empty");
    }
    Ok(password)
}

fn ask(question: &str) -> anyhow::Result<String> {
    eprint!("{question}");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line)
}

/// Where messages and progress go: stderr, and nothing but errors with --quiet.
#[derive(Clone, Copy)]
struct Ui {
    quiet: bool,
}

impl Ui {
    fn say(&self, message: &str) {
        if !self.quiet {
            eprintln!("{message}");
        }
    }

    /// A progress bar on a terminal; silent otherwise (notes still shown).
    fn progress(&self) -> Bar {
        Bar {
            bar: None,
            show_bar: !self.quiet && std::io::stderr().is_terminal(),
            quiet: self.quiet,
        }
    }
}

struct Bar {
    bar: Option<ProgressBar>,
    show_bar: bool,
    quiet: bool,
}

impl Progress for Bar {
    fn start(&mut self, total: u64, from: u64) {
        if !self.show_bar {
            return;
        }
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
            )
            .expect("valid template"),
        );
        bar.set_position(from);
        bar.reset_eta();
        self.bar = Some(bar);
    }

    fn advance(&mut self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }

    fn notice(&mut self, message: &str) {
        if !self.quiet {
            match &self.bar {
                Some(bar) => bar.println(format!("note: {message}")),
                None => eprintln!("note: {message}"),
            }
        }
    }
}

/// The interactive prompt of the tutorials: one connection, one command per line.
async fn shell(remote: &Remote) -> anyhow::Result<()> {
    let (server, ui) = (remote.server.as_str(), remote.ui);
    let mut client = remote.connect().await?;
    let mut user: Option<String> = None;
    eprintln!("connected to {server}; type help for the commands");
    let stdin = std::io::stdin();
    loop {
        eprint!(
            "netdisk{}> ",
            user.as_deref().map(|u| format!(" {u}")).unwrap_or_default()
        );
        std::io::stderr().flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            return Ok(());
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let result: anyhow::Result<()> = match words.as_slice() {
            [] => Ok(()),
            ["help"] => {
                eprintln!("commands: register USER | login USER | ls | put LOCAL [REMOTE] | get REMOTE [LOCAL] | help | quit");
                Ok(())
            }
            ["quit"] | ["exit"] => return Ok(()),
            ["register", name] => {
                async {
                    let password = new_password(name)?;
                    client
                        .register(name, &password, scram::DEFAULT_ITERATIONS)
                        .await?;
                    eprintln!("registered {name}");
                    Ok(())
                }
                .await
            }
            ["login", name] => {
                async {
                    let password = password(name)?;
                    client.login(name, &password).await?;
                    user = Some(name.to_string());
                    eprintln!("logged in as {name}");
                    Ok(())
                }
                .await
            }
            ["ls"] => {
                async {
                    print_listing(&client.list().await?);
                    Ok(())
                }
                .await
            }
            ["put", local, rest @ ..] if rest.len() <= 1 => {
                async {
                    let local = PathBuf::from(local);
                    let remote = match rest.first() {
                        Some(name) => name.to_string(),
                        None => file_name_of(&local)?,
                    };
                    let outcome = client
                        .put(&local, &remote, false, &mut ui.progress())
                        .await?;
                    eprintln!("uploaded {remote} ({} bytes, verified)", outcome.size);
                    Ok(())
                }
                .await
            }
            ["get", remote, rest @ ..] if rest.len() <= 1 => {
                async {
                    let local = local_target(remote, rest.first().map(PathBuf::from));
                    let resume = decide_resume(&local, false, false)?;
                    let outcome = client
                        .get(remote, &local, resume, &mut ui.progress())
                        .await?;
                    eprintln!("downloaded {remote} ({} bytes, verified)", outcome.size);
                    Ok(())
                }
                .await
            }
            _ => Err(anyhow!("unknown command; type help")),
        };
        if let Err(e) = result {
            eprintln!("error: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert_eq!(parse_size("2TB"), Ok(2_000_000_000_000));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5XB").is_err());
    }
}
