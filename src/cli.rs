//! Command-line parsing and terminal interaction (prompts, progress bars, messages).

use std::collections::HashMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context};
use bytesize::ByteSize;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use netdisk::client::{
    join_remote, partial_path, Client, ConnectOptions, Progress, TreeReport,
    SHARE_WITH_HELPER_FILES, UPLOAD_HELPERS,
};
use netdisk::config::{self, SavedLogin};
use netdisk::conncheck;
use netdisk::protocol::{EntryType, FileEntry};
use netdisk::scram;
use netdisk::server::{Server, ServerConfig, TlsSetting};
use netdisk::tls::ClientTls;
use netdisk::ErrorCode;

const DEFAULT_SERVER: &str = "127.0.0.1:9000";

/// The exit codes, as `--help` shows them (README too).
const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  other failure (a local file cannot be read or written, ...)
  2  usage: bad arguments or flags
  3  authentication: not logged in, wrong user name or password, session ended,
     wrong connection secret
  4  not found: no such remote file or folder (or pinned server)
  5  network: server unreachable, connection lost, TLS on one side only
  6  verification: a checksum or the server's certificate does not match
  7  refused by the server: bad name, name taken, exists, not empty, quota, busy";

/// netdisk: a self-hosted network drive.
///
/// Start a server with `netdisk serve`, then `netdisk register NAME`, `netdisk login NAME`,
/// `netdisk put FILE`, `netdisk ls`, `netdisk get NAME`.
#[derive(Parser)]
#[command(name = "netdisk", version, about, long_about, after_help = EXIT_CODES)]
struct Cli {
    /// Server address: HOST:PORT, or HOST for port 9000 (IPv6: [::1]:9000 or [::1])
    #[arg(long, global = true, env = "NETDISK_SERVER", default_value = DEFAULT_SERVER)]
    server: String,
    /// Authenticate this one command as USER (password from NETDISK_PASSWORD or a prompt)
    /// instead of using the saved login
    #[arg(long, global = true, value_name = "USER")]
    user: Option<String>,
    /// No progress bars or notes (errors are still printed)
    #[arg(long, short, global = true)]
    quiet: bool,
    /// On an error, also print its underlying cause (library and system messages)
    #[arg(long, short, global = true)]
    verbose: bool,
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
pub(crate) enum Command {
    /// Run the server
    ///
    /// It logs to stderr: an INFO line per connection, login, change, transfer and refusal;
    /// lookups (ls, stat, usage, whoami, versions) only with RUST_LOG=debug.
    Serve(ServeArgs),
    /// Create an account; the server makes the user's folder
    Register {
        /// User name: 1-32 characters of A-Z a-z 0-9 _ . - (not starting with '.')
        user: String,
    },
    /// Log in and save a session token (never the password) for later commands
    Login {
        /// User name to log in as
        user: String,
    },
    /// End the saved session (on the server too); with --user, only if it is that user's
    Logout,
    /// List a remote folder: size, modified time, name (folders end with '/')
    #[command(disable_help_flag = true)]
    Ls {
        /// Remote folder to list, e.g. photos/2024 (default: your root folder); a file
        /// lists just that file
        path: Option<String>,
        /// Print JSON instead of a table (each entry has its `type`: file or dir)
        #[arg(long)]
        json: bool,
        /// List unfinished (staged) uploads instead
        #[arg(long)]
        partial: bool,
        /// Sizes in B, KiB, MiB, GiB... instead of bytes
        #[arg(short = 'h', long)]
        human: bool,
        /// Order: name (A-Z), size (largest first) or time (newest first)
        #[arg(long, value_enum, default_value_t = SortKey::Name)]
        sort: SortKey,
        /// Reverse the order
        #[arg(short, long)]
        reverse: bool,
        /// Print help
        #[arg(long, action = clap::ArgAction::Help)]
        help: Option<bool>,
    },
    /// Upload a file (overwrites it; resumes an interrupted upload), or with -r a folder.
    /// `put - REMOTE` uploads standard input: it is first copied to a temporary file in
    /// the temporary folder ($TMPDIR), then uploaded and verified like a file, and the
    /// copy deleted
    Put {
        /// Local file (with -r: local folder; `-`: standard input, which needs REMOTE)
        local_file: PathBuf,
        /// Remote path, e.g. docs/a.txt (default: the local name in your root folder).
        /// Ending in '/', or an existing remote folder, means the local name inside it.
        /// With -r: the remote folder to fill (default: the local folder's name; ending
        /// in '/' means the local folder's name inside it)
        remote_name: Option<String>,
        /// Discard a staged partial upload and start over
        #[arg(long, conflicts_with = "recursive")]
        restart: bool,
        /// Upload a folder and everything in it, pipelined (from 128 files on, over four
        /// connections of the saved login); files the server
        /// already has (same checksum) are skipped, so running it again resumes it.
        /// Symbolic links are skipped, never followed
        #[arg(short, long)]
        recursive: bool,
    },
    /// Download a file, with resume if the local file exists, or with -r a folder.
    /// `get REMOTE -` writes the file to standard output as it arrives (notes and progress
    /// go to standard error) and checks its checksum at the end: on a mismatch it exits
    /// with code 6 after the bytes were written
    Get {
        /// Remote path, e.g. docs/a.txt (with -r: a remote folder)
        remote_name: String,
        /// Where to save it (default: the remote file's name in the current folder; a
        /// folder means that name inside it; `-`: standard output). With -r: the local
        /// folder to fill (default: the remote folder's name; ending in '/' means that
        /// name inside it)
        local_path: Option<PathBuf>,
        /// If the local file exists, continue it without asking
        #[arg(long, conflicts_with = "restart")]
        resume: bool,
        /// If the local file exists, overwrite it without asking
        #[arg(long)]
        restart: bool,
        /// Download a folder and everything in it, over one connection; local files of
        /// the same size and checksum are kept and partial ones continued, so running
        /// it again resumes it. Never writes through a local symbolic link
        #[arg(short, long, conflicts_with_all = ["resume", "restart"])]
        recursive: bool,
    },
    /// Upload several files, pipelined (like ftp's mput; from 128 files on, over four
    /// connections of the saved login, as the server works on one request per
    /// connection at a time); each keeps
    /// its local file name and replaces a remote file of that name. Resumable: run it
    /// again after an interruption and files the server already has (same size and
    /// checksum) are skipped as unchanged, and a large file's partial upload continues.
    /// Two files with the same name are refused before anything is sent
    Mput {
        /// Local files (each uploaded under its file name)
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Remote folder to put them in (default: your root folder)
        #[arg(long, value_name = "REMOTE_DIR")]
        to: Option<String>,
    },
    /// Download several files over one connection, pipelined (like ftp's mget).
    /// Resumable: run it again after an interruption and each NAME.part is continued;
    /// local files identical to the server's (same size and checksum) are kept as
    /// unchanged
    Mget {
        /// Remote paths; each is saved under its file name
        #[arg(required = true)]
        names: Vec<String>,
        /// Folder to save them in
        #[arg(long, short = 'C', default_value = ".")]
        dir: PathBuf,
        /// Replace local files that differ from the server's (otherwise they are left
        /// alone and reported as failures)
        #[arg(long)]
        overwrite: bool,
    },
    /// Make a remote folder
    Mkdir {
        /// Remote folder to make, e.g. photos/2024
        path: String,
        /// Make missing folders above it too; no error if it exists
        #[arg(short, long)]
        parents: bool,
    },
    /// Remove an empty remote folder
    Rmdir {
        /// Remote folder to remove (must be empty; `rm -r` removes a full one)
        path: String,
    },
    /// Remove remote files (a folder needs -r); the server keeps them as versions
    Rm {
        /// Remote paths to remove (with --partial: names of staged uploads)
        #[arg(required = true)]
        paths: Vec<String>,
        /// Remove folders and everything in them
        #[arg(short, long)]
        recursive: bool,
        /// Drop staged (unfinished) uploads instead (see `ls --partial`)
        #[arg(long, conflicts_with = "recursive")]
        partial: bool,
    },
    /// Rename or move a remote file or folder (like mv)
    Mv {
        /// Remote path to move
        source: String,
        /// New remote path; ending in '/', or an existing folder, means inside it
        destination: String,
        /// Replace an existing file at the destination (it is kept as a version)
        #[arg(short, long)]
        force: bool,
    },
    /// Change your password (asks the current one, then the new one twice; scripts set
    /// NETDISK_PASSWORD and NETDISK_NEW_PASSWORD); your other sessions end
    Passwd {
        /// Keep your other sessions (saved logins elsewhere) logged in
        #[arg(long)]
        keep_sessions: bool,
    },
    /// Print the user you are logged in as
    Whoami,
    /// Space used (files and kept versions), the quota and what is free, like df
    Usage {
        /// Print JSON (bytes) instead
        #[arg(long)]
        json: bool,
    },
    /// Earlier versions of a remote path (overwritten or removed), newest first
    Versions {
        /// Remote path, e.g. docs/a.txt
        path: String,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Bring back an earlier version of a remote path (the current file, if any, becomes
    /// a version itself)
    Restore {
        /// Remote path, e.g. docs/a.txt
        path: String,
        /// Which version (an id from `netdisk versions PATH`; default: the newest)
        #[arg(long, value_name = "V")]
        version: Option<String>,
    },
    /// Interactive prompt: every command above, with line editing, history and completion
    ///
    /// One connection, logged in with the saved login (or --user): every command above with
    /// the same flags, plus lcd [DIR] and lpwd (the local folder for relative local paths),
    /// help and quit. Line editing, history (CONFIG/netdisk/shell_history), Tab completes
    /// commands and remote names. A lost connection (server restart, idle timeout) is
    /// replaced with the same session, said once; Ctrl-C cancels the running command,
    /// Ctrl-D leaves.
    Shell,
    Admin(netdisk::admin::AdminArgs),
    /// The server certificates this client trusts (pinned on first connection, like ssh's
    /// known_hosts); `localhost:9000` and `127.0.0.1:9000` are different entries
    #[command(subcommand)]
    KnownServers(KnownServersCommand),
}

#[derive(Subcommand)]
pub(crate) enum KnownServersCommand {
    /// Print the pinned servers and their certificate fingerprints
    List,
    /// Forget the certificate pinned for a server (like `ssh-keygen -R`), so that the next
    /// connection trusts the certificate it then sees
    Forget {
        /// Server address as given to --server (HOST:PORT, or HOST for port 9000)
        addr: String,
    },
}

/// The default port, added to a `--server` without one.
const DEFAULT_PORT: u16 = 9000;

/// `HOST` → `HOST:9000`, `[::1]` (or a bare `::1`) → `[::1]:9000`; with a port, unchanged.
fn with_default_port(addr: &str) -> String {
    let addr = addr.trim();
    if let Some(rest) = addr.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((_, "")) => format!("{addr}:{DEFAULT_PORT}"),
            _ => addr.to_string(),
        };
    }
    match addr.matches(':').count() {
        0 => format!("{addr}:{DEFAULT_PORT}"),
        1 => addr.to_string(),
        _ => format!("[{addr}]:{DEFAULT_PORT}"), // a bare IPv6 address
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum SortKey {
    Name,
    Size,
    Time,
}

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on
    #[arg(long, env = "NETDISK_LISTEN", default_value = DEFAULT_SERVER)]
    listen: String,
    /// Data folder: users.xlsx, files/USER/, staged uploads
    #[arg(long, env = "NETDISK_ROOT", default_value = "./netdisk-data")]
    root: PathBuf,
    /// Most connections served at once (lowered to fit the open-file limit, ulimit -n)
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    /// Most connections from one IP address at once (handshaking or served)
    #[arg(long, default_value_t = 256, value_name = "N")]
    max_connections_per_address: usize,
    /// Registrations one IP address may make in a burst; then one per 6 seconds
    #[arg(long, default_value_t = 10, value_name = "N")]
    registration_burst: u32,
    /// Earlier versions kept per file (overwritten or removed), for `netdisk restore`
    #[arg(long, default_value_t = 3, value_name = "N")]
    keep_versions: usize,
    /// Days versions and removed files are kept before they are deleted for good
    #[arg(long, default_value_t = 30.0, value_name = "DAYS")]
    trash_days: f64,
    /// Delete unfinished uploads idle for this many hours
    #[arg(long, default_value_t = 24.0)]
    partial_expiry_hours: f64,
    /// On Ctrl-C or SIGTERM: stop accepting, close idle connections, give running
    /// transfers this long to finish, then cut the rest and exit (a second Ctrl-C or
    /// SIGTERM exits at once, with code 1)
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    shutdown_grace: f64,
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
    /// Keep files and users in an S3-compatible bucket, s3://BUCKET[/PREFIX] (default: the
    /// local --root). Endpoint, region and keys: --s3-endpoint, --s3-region or AWS_* variables
    #[cfg(feature = "s3")]
    #[arg(long, env = "NETDISK_STORAGE", value_name = "URL")]
    storage: Option<String>,
    /// S3 endpoint, e.g. http://127.0.0.1:9000 for MinIO (default: AWS_ENDPOINT_URL, or AWS)
    #[cfg(feature = "s3")]
    #[arg(long, value_name = "URL", requires = "storage")]
    s3_endpoint: Option<String>,
    /// S3 region (default: AWS_REGION, or us-east-1)
    #[cfg(feature = "s3")]
    #[arg(long, value_name = "REGION", requires = "storage")]
    s3_region: Option<String>,
}

pub fn main() -> ExitCode {
    let cli = match Cli::from_arg_matches(&cli_command().get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let verbose = cli.verbose;
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
            let (message, code) = explain(&e);
            eprintln!("netdisk: error: {message}");
            if verbose {
                for cause in e.chain().skip(1) {
                    eprintln!("  cause: {cause}");
                }
            }
            ExitCode::from(code)
        }
    }
}

/// The command-line definition as `main` parses it: `serve --help` and `admin --help`
/// show only their own options.
fn cli_command() -> clap::Command {
    let mut command = Cli::command();
    for name in ["serve", "admin"] {
        command = command.mut_subcommand(name, without_client_options);
    }
    command
}

/// Hidden stand-ins for the global options only clients use: clap does not copy a global
/// option into a subcommand that has one of the same name, so these keep them out of its
/// help (still accepted there, and ignored, so `netdisk --server X ...` scripts work).
fn without_client_options(command: clap::Command) -> clap::Command {
    use clap::{Arg, ArgAction};
    command
        .arg(Arg::new("server").long("server").hide(true))
        .arg(Arg::new("user").long("user").hide(true))
        .arg(Arg::new("ca").long("ca").hide(true))
        .arg(
            Arg::new("quiet")
                .long("quiet")
                .short('q')
                .action(ArgAction::SetTrue)
                .hide(true),
        )
}

/// An error as the user should read it: what happened and what to do, one line, and the
/// class of failure (the exit code). The full chain goes to `--verbose`.
#[derive(Debug)]
struct Failure {
    message: String,
    exit: u8,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// Exit codes: one per main class of failure (documented in --help and README).
mod exit {
    pub const GENERAL: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const AUTH: u8 = 3;
    pub const NOT_FOUND: u8 = 4;
    pub const NETWORK: u8 = 5;
    pub const VERIFY: u8 = 6;
    pub const REFUSED: u8 = 7;
}

/// Wrap `cause` in a [`Failure`]: `message` is shown, `cause` only with --verbose.
fn failure(cause: impl Into<anyhow::Error>, exit: u8, message: String) -> anyhow::Error {
    cause.into().context(Failure { message, exit })
}

/// The line to print and the exit code of an error.
pub(crate) fn explain(e: &anyhow::Error) -> (String, u8) {
    if let Some(f) = e.downcast_ref::<Failure>() {
        return (clean(&f.message), f.exit);
    }
    let code = e
        .chain()
        .find_map(|cause| {
            if let Some(f) = cause.downcast_ref::<Failure>() {
                return Some(f.exit);
            }
            cause.downcast_ref::<netdisk::Error>().map(error_class)
        })
        .unwrap_or(exit::GENERAL);
    // The chain on one line, as before, but without system error numbers.
    let text = format!("{e:#}");
    (clean(text.lines().next().unwrap_or_default()), code)
}

fn error_class(e: &netdisk::Error) -> u8 {
    use netdisk::Error;
    match e {
        Error::Remote { code, .. } => match code {
            ErrorCode::AuthFailed | ErrorCode::NotLoggedIn => exit::AUTH,
            ErrorCode::NotFound => exit::NOT_FOUND,
            ErrorCode::ChecksumMismatch => exit::VERIFY,
            _ => exit::REFUSED,
        },
        Error::ChecksumMismatch(_) => exit::VERIFY,
        Error::ConnectionClosed | Error::Protocol(_) => exit::NETWORK,
        Error::Io(io) if is_network_io(io) => exit::NETWORK,
        Error::Io(_) | Error::Invalid(_) => exit::GENERAL,
    }
}

fn is_network_io(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof
            | ConnectionReset
            | ConnectionAborted
            | ConnectionRefused
            | BrokenPipe
            | NotConnected
            | TimedOut
            | InvalidData
    )
}

/// Whether an error means the connection broke (not a refusal or a local problem).
pub(crate) fn is_connection_lost(e: &netdisk::Error) -> bool {
    match e {
        netdisk::Error::ConnectionClosed => true,
        netdisk::Error::Io(io) => is_network_io(io),
        _ => false,
    }
}

/// Drop ` (os error N)` and anything after a URL from a message.
fn clean(message: &str) -> String {
    let mut text = message.to_string();
    while let Some(start) = text.find(" (os error ") {
        match text[start..].find(')') {
            Some(end) => text.replace_range(start..start + end + 1, ""),
            None => break,
        }
    }
    if let Some(url) = text.find("https://").or_else(|| text.find("http://")) {
        text.truncate(url);
        text = text.trim_end_matches([' ', ':', '(']).to_string();
    }
    text
}

/// A transfer's error: a broken connection says how far it got and to run it again.
fn transfer_error(e: netdisk::Error, server: &str, bar: &Bar) -> anyhow::Error {
    if !is_connection_lost(&e) {
        return e.into();
    }
    let progress = if bar.total > 0 {
        format!(
            "{} of {}",
            ByteSize(bar.position.min(bar.total)),
            ByteSize(bar.total)
        )
    } else {
        ByteSize(bar.position).to_string()
    };
    failure(
        e,
        exit::NETWORK,
        format!(
            "connection to {server} lost after {progress}; run the same command again to resume"
        ),
    )
}

async fn run(mut cli: Cli) -> anyhow::Result<()> {
    let ui = Ui { quiet: cli.quiet };
    // One spelling per server, for the saved logins and the pinned certificates too.
    cli.server = with_default_port(&cli.server);
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
    if let Command::KnownServers(action) = cli.command {
        return known_servers(action, ui);
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
    // `put - NAME`: standard input is read whole before connecting (an upload needs its
    // size and checksum first, and the connection would sit idle meanwhile).
    let _spooled = match &mut cli.command {
        Command::Put {
            local_file,
            remote_name,
            recursive,
            ..
        } if local_file.as_os_str() == "-" => match remote_name {
            Some(name) if !*recursive && !name.ends_with('/') => {
                let spooled = spool_stdin()?;
                *local_file = spooled.path.clone();
                Some(spooled)
            }
            _ => return Err(put_stdin_usage()),
        },
        _ => None,
    };
    let remote = Remote {
        server: cli.server.clone(),
        options: ConnectOptions { tls, secret },
        ui,
    };
    match cli.command {
        Command::Serve(_) | Command::Admin(_) | Command::KnownServers(_) => {
            unreachable!("handled above")
        }
        Command::Register { user } => {
            // The name's rules first: no password typed twice for a name that cannot be.
            netdisk::names::check_user_name(&user)?;
            let mut client = remote.connect().await?;
            let password = new_password(&user)?;
            client
                .register(&user, &password, scram::DEFAULT_ITERATIONS)
                .await?;
            ui.say(&format!(
                "registered {user}; now run: netdisk --server {} login {user}",
                cli.server
            ));
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
            // `--user X logout` ends X's saved login only, never another user's.
            if let (Some(user), Some(saved)) = (&cli.user, config::load_login(&cli.server)?) {
                if saved.user != *user {
                    return Err(failure(
                        anyhow!("the saved login is {}'s", saved.user),
                        exit::AUTH,
                        format!(
                            "not logged in to {} as {user} (the saved login is {}'s; it is kept)",
                            cli.server, saved.user
                        ),
                    ));
                }
            }
            let Some(saved) = config::forget_login(&cli.server)? else {
                return Err(failure(
                    anyhow!("no saved login"),
                    exit::AUTH,
                    format!("not logged in to {}", cli.server),
                ));
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
        Command::Shell => crate::shell::run(&remote, cli.user.as_deref()).await,
        command => {
            let mut client = remote.authenticated(cli.user.as_deref()).await?;
            // Many files to upload: more connections of the saved login share them (the
            // server serves each connection one request at a time). Only an optimisation:
            // without it, everything goes over the first.
            let many = match &command {
                Command::Mput { files, .. } => files.len() >= SHARE_WITH_HELPER_FILES,
                Command::Put { recursive, .. } => *recursive,
                _ => false,
            };
            if many && cli.user.is_none() {
                for _ in 0..UPLOAD_HELPERS {
                    match remote.authenticated(None).await {
                        Ok(helper) => client.add_upload_helper(helper),
                        Err(_) => break,
                    }
                }
            }
            let ctx = Ctx {
                server: cli.server.clone(),
                ui,
            };
            exec(command, &mut client, &ctx).await
        }
    }
}

/// `put -` without a remote file name (or in the shell, whose input is the commands).
fn put_stdin_usage() -> anyhow::Error {
    failure(
        anyhow!("put - without a remote file name"),
        exit::USAGE,
        "put - uploads standard input and needs a remote file name (not a folder, not -r, not in the shell): netdisk put - NAME".to_string(),
    )
}

/// Standard input copied to a private temporary file, deleted when dropped.
struct SpooledStdin {
    path: PathBuf,
}

impl Drop for SpooledStdin {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Copy standard input to a new file (mode 0600) in the temporary folder ($TMPDIR).
fn spool_stdin() -> anyhow::Result<SpooledStdin> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut random = [0u8; 8];
    getrandom::fill(&mut random).map_err(|e| anyhow!("no randomness: {e}"))?;
    let path = std::env::temp_dir().join(format!("netdisk-stdin-{}.tmp", hex::encode(random)));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot make a temporary file {}", path.display()))?;
    let spooled = SpooledStdin { path };
    std::io::copy(&mut std::io::stdin().lock(), &mut file).with_context(|| {
        format!(
            "cannot copy standard input to {} (is the temporary folder full? set TMPDIR)",
            spooled.path.display()
        )
    })?;
    Ok(spooled)
}

/// What the file commands need besides their connection.
pub(crate) struct Ctx {
    pub(crate) server: String,
    pub(crate) ui: Ui,
}

/// Run one file command on a logged-in connection (from the command line or the shell).
pub(crate) async fn exec(command: Command, client: &mut Client, ctx: &Ctx) -> anyhow::Result<()> {
    let ui = ctx.ui;
    match command {
        Command::Serve(_)
        | Command::Admin(_)
        | Command::Register { .. }
        | Command::Login { .. }
        | Command::Logout
        | Command::Shell
        | Command::KnownServers(_) => bail!("not available here"),
        Command::Ls {
            path,
            json,
            partial,
            human,
            sort,
            reverse,
            help: _,
        } => {
            if partial {
                let entries = client.list_partial().await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&entries)?);
                } else {
                    for e in entries {
                        println!(
                            "{:>14} / {:<14} {}  {}",
                            size_text(e.received, human),
                            size_text(e.size, human),
                            e.updated,
                            e.name
                        );
                    }
                }
                return Ok(());
            }
            let path = path.unwrap_or_default();
            let mut entries = match client.list_dir(&path).await {
                // `ls FILE` shows that file, like ls(1).
                Err(e) if e.code() == Some(ErrorCode::WrongType) => {
                    vec![client.stat(&path, false).await?]
                }
                other => other?,
            };
            sort_entries(&mut entries, sort, reverse);
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                print_listing(&entries, human);
            }
            Ok(())
        }
        Command::Put {
            local_file,
            remote_name,
            restart,
            recursive,
        } => {
            if local_file.as_os_str() == "-" {
                return Err(put_stdin_usage());
            }
            let base = local_base_name(&local_file)?;
            if recursive {
                let remote = match remote_name {
                    None => base,
                    Some(dir) if dir.ends_with('/') => {
                        join_remote(dir.trim_end_matches('/'), &base)
                    }
                    Some(dir) => dir,
                };
                let mut bar = ui.progress();
                let report = client
                    .put_tree(&local_file, &remote, &mut bar)
                    .await
                    .map_err(|e| transfer_error(e, &ctx.server, &bar))?;
                return report_batch("uploaded", Some(&remote), &report, ui);
            }
            let named_by_user = remote_name.is_some();
            let name = match remote_name {
                None => base,
                Some(dir) if dir.ends_with('/') => join_remote(dir.trim_end_matches('/'), &base),
                Some(name) => match client.stat(&name, false).await {
                    Ok(entry) if entry.kind == EntryType::Dir => join_remote(&name, &base),
                    Err(e) if e.code() == Some(ErrorCode::BadName) => return Err(e.into()),
                    _ => name,
                },
            };
            let mut bar = ui.progress();
            let outcome = client
                .put(&local_file, &name, restart, &mut bar)
                .await
                .map_err(|e| match e.code() {
                    Some(ErrorCode::BadName) if !named_by_user => {
                        let text = e.to_string();
                        let windows = text.contains("reserved device name")
                            || text.contains("ends with a dot or a space");
                        let why = if windows {
                            "names Windows cannot store (such as aux.txt or notes.) are refused, so "
                        } else {
                            ""
                        };
                        let message = format!(
                            "{text}; {why}give the file another remote name: netdisk put {} NEW-NAME",
                            local_file.display()
                        );
                        failure(e, exit::REFUSED, message)
                    }
                    _ => transfer_error(e, &ctx.server, &bar),
                })?;
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
            recursive,
        } => {
            if local_path.as_deref() == Some(Path::new("-")) && !recursive {
                let mut bar = ui.progress();
                let outcome = client
                    .get_to_writer(&remote_name, Box::new(std::io::stdout()), &mut bar)
                    .await
                    .map_err(|e| transfer_error(e, &ctx.server, &bar))?;
                ui.say(&format!(
                    "downloaded {remote_name} to standard output ({}, verified)",
                    ByteSize(outcome.size)
                ));
                return Ok(());
            }
            if recursive {
                let base = remote_base_name(&remote_name);
                let base = if base.is_empty() { "." } else { base };
                let local = match local_path {
                    None => PathBuf::from(base),
                    Some(dir) if dir.as_os_str().to_string_lossy().ends_with('/') => dir.join(base),
                    Some(dir) => dir,
                };
                let mut bar = ui.progress();
                let report = client
                    .get_tree(&remote_name, &local, &mut bar)
                    .await
                    .map_err(|e| transfer_error(e, &ctx.server, &bar))?;
                return report_batch(
                    "downloaded",
                    Some(&local.display().to_string()),
                    &report,
                    ui,
                );
            }
            let local = local_target(&remote_name, local_path);
            let part = partial_path(&local);
            let has_part = std::fs::symlink_metadata(&part).is_ok_and(|m| m.is_file());
            let resume = if has_part && !restart {
                // An interrupted download of it: continue that (the real name is untouched).
                true
            } else {
                // Checked when resuming or about to ask; a script that passes neither flag
                // still gets the "already exists" error (and decides).
                let interactive = std::io::stdin().is_terminal() && std::io::stderr().is_terminal();
                if !restart
                    && (resume || interactive)
                    && already_complete(client, &remote_name, &local).await?
                {
                    ui.say(&format!(
                        "{} is already complete (same size and checksum as {remote_name} on the server); nothing to do",
                        local.display()
                    ));
                    return Ok(());
                }
                match decide_resume(&local, resume, restart)? {
                    Some(resume) => resume,
                    None => {
                        ui.say(&format!("cancelled; {} is unchanged", local.display()));
                        return Ok(());
                    }
                }
            };
            let mut bar = ui.progress();
            let outcome = client
                .get(&remote_name, &local, resume, &mut bar)
                .await
                .map_err(|e| transfer_error(e, &ctx.server, &bar))?;
            ui.say(&format!(
                "downloaded {remote_name} to {} ({} bytes, verified)",
                local.display(),
                outcome.size
            ));
            Ok(())
        }
        Command::Mput { files, to } => {
            let mut pairs: Vec<(PathBuf, String)> = Vec::new();
            // Remote name -> index in `pairs` (a look-up per file, not a scan).
            let mut taken: HashMap<String, usize> = HashMap::new();
            for path in files {
                let name = local_base_name(&path)?;
                let remote = match &to {
                    Some(dir) => join_remote(dir.trim_end_matches('/'), &name),
                    None => name,
                };
                // Refused before anything is sent: one would silently replace the other.
                if let Some(&index) = taken.get(&remote) {
                    let first = &pairs[index].0;
                    return Err(failure(
                        anyhow!("two files for {remote}"),
                        exit::USAGE,
                        format!(
                            "{} and {} would both be uploaded as {remote}; nothing was sent: upload one of them under another name (netdisk put FILE NAME)",
                            first.display(),
                            path.display()
                        ),
                    ));
                }
                taken.insert(remote.clone(), pairs.len());
                pairs.push((path, remote));
            }
            let mut bar = ui.progress();
            let report = client
                .put_files(&pairs, &mut bar)
                .await
                .map_err(|e| transfer_error(e, &ctx.server, &bar))?;
            report_batch("uploaded", None, &report, ui)
        }
        Command::Mget {
            names,
            dir,
            overwrite,
        } => {
            let mut pairs: Vec<(String, PathBuf)> = Vec::new();
            let mut taken: HashMap<PathBuf, usize> = HashMap::new();
            for name in names {
                let local = dir.join(remote_base_name(&name));
                if let Some(&index) = taken.get(&local) {
                    let first = &pairs[index].0;
                    return Err(failure(
                        anyhow!("two files for {}", local.display()),
                        exit::USAGE,
                        format!(
                            "{first} and {name} would both be saved as {}; nothing was fetched: get one of them under another name (netdisk get NAME LOCAL)",
                            local.display()
                        ),
                    ));
                }
                taken.insert(local.clone(), pairs.len());
                pairs.push((name, local));
            }
            let mut bar = ui.progress();
            let report = client
                .get_files(&pairs, overwrite, &mut bar)
                .await
                .map_err(|e| transfer_error(e, &ctx.server, &bar))?;
            report_batch("downloaded", None, &report, ui)
        }
        Command::Mkdir { path, parents } => {
            client.mkdir(&path, parents).await?;
            ui.say(&format!("made folder {path}"));
            Ok(())
        }
        Command::Rmdir { path } => {
            let entry = client.stat(&path, false).await?;
            if entry.kind != EntryType::Dir {
                bail!("{path} is a file, not a folder (use rm)");
            }
            client.rm(&path, false).await?;
            ui.say(&format!("removed folder {path}"));
            Ok(())
        }
        Command::Rm {
            paths,
            recursive,
            partial,
        } => {
            let mut failed = 0;
            let count = paths.len();
            for path in &paths {
                let result = async {
                    if partial {
                        client.rm_partial(path).await?;
                        ui.say(&format!("dropped the staged upload of {path}"));
                        return anyhow::Ok(());
                    }
                    if !recursive {
                        let entry = client.stat(path, false).await?;
                        if entry.kind == EntryType::Dir {
                            bail!("{path} is a folder: use rm -r (or rmdir if it is empty)");
                        }
                    }
                    let removed = client.rm(path, recursive).await?;
                    ui.say(&format!(
                        "removed {path} ({} files, {}; kept as versions)",
                        removed.files,
                        ByteSize(removed.bytes)
                    ));
                    Ok(())
                }
                .await;
                if let Err(e) = result {
                    if count == 1 {
                        return Err(e);
                    }
                    eprintln!("netdisk: {path}: {e:#}");
                    failed += 1;
                }
            }
            if failed > 0 {
                bail!("{failed} of {count} paths failed");
            }
            Ok(())
        }
        Command::Mv {
            source,
            destination,
            force,
        } => {
            let base = remote_base_name(&source).to_string();
            let target = if destination.ends_with('/') {
                join_remote(destination.trim_end_matches('/'), &base)
            } else {
                match client.stat(&destination, false).await {
                    Ok(entry) if entry.kind == EntryType::Dir => join_remote(&destination, &base),
                    Err(e) if e.code() == Some(ErrorCode::BadName) => return Err(e.into()),
                    _ => destination,
                }
            };
            client.mv(&source, &target, force).await?;
            ui.say(&format!("moved {source} to {target}"));
            Ok(())
        }
        Command::Passwd { keep_sessions } => {
            let user = client.whoami().await?;
            let current = match std::env::var("NETDISK_PASSWORD") {
                Ok(password) => password,
                Err(_) => prompt_secret(&format!("current password for {user}: "))?,
            };
            let new = match std::env::var("NETDISK_NEW_PASSWORD") {
                Ok(password) => password,
                Err(_) => {
                    let new = prompt_secret("new password: ")?;
                    check_new_password(&new)?;
                    if prompt_secret("again: ")? != new {
                        bail!("the two passwords differ");
                    }
                    new
                }
            };
            check_new_password(&new)?;
            let (user, token) = client
                .change_password(&current, &new, scram::DEFAULT_ITERATIONS, keep_sessions)
                .await?;
            // The saved login of this user would be revoked with the other sessions.
            if config::load_login(&ctx.server)?.is_some_and(|saved| saved.user == user) {
                config::save_login(
                    &ctx.server,
                    SavedLogin {
                        user: user.clone(),
                        token,
                    },
                )?;
            }
            ui.say(&format!(
                "password changed for {user}{}",
                if keep_sessions {
                    ""
                } else {
                    "; your other sessions are logged out"
                }
            ));
            Ok(())
        }
        Command::Whoami => {
            println!("{}", client.whoami().await?);
            Ok(())
        }
        Command::Usage { json } => {
            let usage = client.usage().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&usage)?);
                return Ok(());
            }
            let used = usage.bytes + usage.version_bytes;
            println!(
                "files     {:>12}  in {} files",
                ByteSize(usage.bytes).to_string(),
                usage.files
            );
            println!(
                "versions  {:>12}  in {} versions (kept for undo; they count toward the quota)",
                ByteSize(usage.version_bytes).to_string(),
                usage.versions
            );
            if usage.staged_bytes > 0 {
                println!(
                    "staged    {:>12}  unfinished uploads",
                    ByteSize(usage.staged_bytes).to_string()
                );
            }
            match usage.quota {
                Some(quota) => {
                    let percent = if quota == 0 {
                        100.0
                    } else {
                        used as f64 * 100.0 / quota as f64
                    };
                    println!(
                        "used      {:>12}  of {} ({percent:.0}%), {} free",
                        ByteSize(used).to_string(),
                        ByteSize(quota),
                        ByteSize(quota.saturating_sub(used))
                    );
                }
                None => println!("used      {:>12}  (no quota)", ByteSize(used).to_string()),
            }
            Ok(())
        }
        Command::Versions { path, json } => {
            let versions = client.versions(&path).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&versions)?);
            } else if versions.is_empty() {
                ui.say(&format!("no earlier versions of {path}"));
            } else {
                for v in versions {
                    let kind = if v.kind == EntryType::Dir {
                        "dir "
                    } else {
                        "file"
                    };
                    println!(
                        "{}  {kind}  {:>12}  {}",
                        v.replaced,
                        ByteSize(v.size).to_string(),
                        v.id
                    );
                }
            }
            Ok(())
        }
        Command::Restore { path, version } => {
            client.restore(&path, version.as_deref()).await?;
            ui.say(&format!("restored {path}"));
            Ok(())
        }
    }
}

async fn serve(args: ServeArgs, no_tls: bool, secret: Option<Vec<u8>>) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        // A log that cannot be written (full disk) drops lines, never breaks a connection.
        .with_writer(|| LossyStderr)
        .log_internal_errors(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let mut config = ServerConfig::new(args.listen, args.root);
    config.max_connections = args.max_connections.max(1);
    config.max_connections_per_address = args.max_connections_per_address.max(1);
    config.registration_burst = args.registration_burst.max(1);
    config.storage.keep_versions = args.keep_versions;
    config.storage.version_max_age =
        std::time::Duration::from_secs_f64(args.trash_days.max(0.0) * 86400.0);
    config.partial_max_idle =
        std::time::Duration::from_secs_f64(args.partial_expiry_hours.max(0.0) * 3600.0);
    config.secret = secret;
    config.quota = args.quota;
    #[cfg(feature = "s3")]
    if let Some(url) = &args.storage {
        let mut store = netdisk::objstore::ObjectStoreConfig::from_url(url)?;
        store.endpoint = args.s3_endpoint.or(store.endpoint);
        store.region = args.s3_region.or(store.region);
        config.object_store = Some(store);
    }
    config.shutdown_grace = std::time::Duration::from_secs_f64(args.shutdown_grace.max(0.0));
    config.tls = match (no_tls, args.tls_cert, args.tls_key) {
        (true, _, _) => TlsSetting::Off,
        (false, Some(cert), Some(key)) => TlsSetting::Files { cert, key },
        _ => TlsSetting::SelfSigned,
    };
    // Installed before serving, so a signal that arrives early still stops gracefully.
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let server = Server::bind(config).await?;
    server
        .run(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
            // A second signal stops at once; cut uploads resume later, as after a crash.
            tokio::spawn(async move {
                tokio::select! {
                    _ = interrupt.recv() => {}
                    _ = terminate.recv() => {}
                }
                tracing::warn!("second signal: stopping now, without waiting for transfers");
                std::process::exit(1);
            });
        })
        .await?;
    Ok(())
}

/// stderr for the server's log, ignoring write errors: tracing's own error path would
/// otherwise print to (the same failing) stderr and panic the task that logged.
struct LossyStderr;

impl Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// The server this command talks to, and how.
pub(crate) struct Remote {
    pub(crate) server: String,
    options: ConnectOptions,
    pub(crate) ui: Ui,
}

impl Remote {
    pub(crate) async fn connect(&self) -> anyhow::Result<Client> {
        let client = Client::connect_with(&self.server, &self.options)
            .await
            .map_err(|e| {
                let message = e.to_string();
                let exit = if message.starts_with("WARNING") {
                    exit::VERIFY
                } else if message.contains("connection secret") {
                    exit::AUTH
                } else if let Some(code) = e.code() {
                    error_class(&netdisk::Error::remote(code, ""))
                } else {
                    exit::NETWORK
                };
                failure(e, exit, message)
            })?;
        if let Some(fingerprint) = client.newly_pinned() {
            // Security-relevant: shown even with --quiet (on stderr, like every note).
            eprintln!(
                "note: first connection to {}: trusting its certificate {fingerprint} from now \
                 on (check it with the server's log; netdisk known-servers list|forget)",
                self.server
            );
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
                    failure(
                        anyhow!("no saved login"),
                        exit::AUTH,
                        format!("not logged in to {server}: run `netdisk login USER` first (or pass --user USER)"),
                    )
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

/// `netdisk known-servers list|forget ADDR`.
pub(crate) fn known_servers(action: KnownServersCommand, ui: Ui) -> anyhow::Result<()> {
    let path = config::config_dir()?.join("known_servers");
    match action {
        KnownServersCommand::List => {
            for (addr, fingerprint) in netdisk::tls::known_servers(&path)? {
                println!("{addr} {fingerprint}");
            }
            Ok(())
        }
        KnownServersCommand::Forget { addr } => {
            let addr = with_default_port(&addr);
            if netdisk::tls::forget_known_server(&path, &addr)? == 0 {
                return Err(failure(
                    anyhow!("not in {}", path.display()),
                    exit::NOT_FOUND,
                    format!("no certificate is pinned for {addr} (see netdisk known-servers list)"),
                ));
            }
            ui.say(&format!(
                "forgot the certificate of {addr}; the next connection trusts the one it sees"
            ));
            Ok(())
        }
    }
}

/// `get PATH [LOCAL]`: LOCAL defaults to PATH's file name here; an existing folder means
/// that name inside it.
fn local_target(remote: &str, local: Option<PathBuf>) -> PathBuf {
    let name = remote_base_name(remote);
    match local {
        Some(path) if path.is_dir() => path.join(name),
        Some(path) => path,
        None => PathBuf::from(name),
    }
}

/// The last component of a remote path (`a/b/c.txt` → `c.txt`; `""` for the root).
fn remote_base_name(path: &str) -> &str {
    path.trim_end_matches('/').rsplit('/').next().unwrap_or("")
}

/// The name a local file or folder gets on the server (`.` is the current folder's name).
fn local_base_name(path: &Path) -> anyhow::Result<String> {
    let named = path.file_name().map(PathBuf::from).or_else(|| {
        std::fs::canonicalize(path)
            .ok()
            .and_then(|p| p.file_name().map(PathBuf::from))
    });
    named
        .as_deref()
        .and_then(|n| n.to_str())
        .map(netdisk::names::to_nfc)
        .ok_or_else(|| {
            anyhow!(
                "cannot take a remote name from {}: give one",
                path.display()
            )
        })
}

/// Bytes as a number, or with `human` as B, KiB, MiB...
fn size_text(bytes: u64, human: bool) -> String {
    if human {
        ByteSize(bytes).to_string()
    } else {
        bytes.to_string()
    }
}

fn sort_entries(entries: &mut [FileEntry], key: SortKey, reverse: bool) {
    match key {
        SortKey::Name => entries.sort_by(|a, b| a.name.cmp(&b.name)),
        SortKey::Size => entries.sort_by(|a, b| b.size.cmp(&a.size).then(a.name.cmp(&b.name))),
        SortKey::Time => {
            entries.sort_by(|a, b| b.modified.cmp(&a.modified).then(a.name.cmp(&b.name)))
        }
    }
    if reverse {
        entries.reverse();
    }
}

/// What a transfer of many files did (`mput`, `mget`, `put -r`, `get -r`): failures one
/// per line, then a summary; an error if any failed.
fn report_batch(
    verb: &str,
    target: Option<&str>,
    report: &TreeReport,
    ui: Ui,
) -> anyhow::Result<()> {
    for (path, e) in &report.failed {
        eprintln!("netdisk: {path}: {e}");
    }
    let target = target.map(|t| format!(" to {t}")).unwrap_or_default();
    let mut summary = format!(
        "{verb} {} ({}, verified){target}; {} unchanged",
        count(report.transferred, "file"),
        ByteSize(report.bytes),
        report.unchanged
    );
    if !report.skipped.is_empty() {
        summary += &format!(", {} skipped", report.skipped.len());
    }
    ui.say(&summary);
    let failed = report.failed.len() as u64;
    if failed > 0 {
        let all = report.transferred + report.unchanged + failed;
        bail!("{failed} of {} failed", count(all, "file"));
    }
    Ok(())
}

/// `1 file`, `2 files`, `0 files`.
fn count(n: u64, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

/// Whether to continue an existing local file (`Some(true)`), download it again and
/// replace it (`Some(false)`), or leave it alone (`None`): the flag, else ask on a terminal.
fn decide_resume(local: &Path, resume: bool, restart: bool) -> anyhow::Result<Option<bool>> {
    if resume || restart || !local.exists() {
        return Ok(Some(resume));
    }
    if !std::io::stdin().is_terminal() || !std::io::stderr().is_terminal() {
        bail!(
            "{} already exists: pass --resume to continue it or --restart to download it again",
            local.display()
        );
    }
    loop {
        let answer = ask(&format!(
            "{} already exists. Resume the download? (y: resume it, n: download it again and replace it, c: cancel) [Y/n/c] ",
            local.display()
        ))?;
        let Some(answer) = answer else {
            return Ok(None); // end of input
        };
        match answer.trim().to_lowercase().as_str() {
            "" | "y" | "yes" => return Ok(Some(true)),
            "n" | "no" => return Ok(Some(false)),
            "c" | "cancel" => return Ok(None),
            _ => eprintln!("please answer y, n or c"),
        }
    }
}

/// Whether `local` is a file of the same size and checksum as `remote` on the server.
async fn already_complete(client: &mut Client, remote: &str, local: &Path) -> anyhow::Result<bool> {
    let Ok(meta) = std::fs::symlink_metadata(local) else {
        return Ok(false);
    };
    if !meta.is_file() {
        return Ok(false);
    }
    let entry = match client.stat(remote, true).await {
        Ok(entry) => entry,
        // The get itself reports what is wrong (not found, a folder, ...).
        Err(e) if e.code().is_some() => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    if entry.kind != EntryType::File || entry.size != meta.len() {
        return Ok(false);
    }
    let Some(remote_digest) = entry.digest else {
        return Ok(false);
    };
    let path = local.to_path_buf();
    let local_digest = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(path)?;
        let chunks = netdisk::digest::hash_reader(file)?;
        std::io::Result::Ok(netdisk::digest::file_digest(&chunks).to_hex().to_string())
    })
    .await??;
    Ok(local_digest == remote_digest)
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

fn print_listing(entries: &[FileEntry], human: bool) {
    for e in entries {
        if e.kind == EntryType::Dir {
            println!("{:>14}  {}  {}/", "-", e.modified, e.name);
        } else {
            println!(
                "{:>14}  {}  {}",
                size_text(e.size, human),
                e.modified,
                e.name
            );
        }
    }
}

/// The password: NETDISK_PASSWORD if set, else asked without echo.
pub(crate) fn password(user: &str) -> anyhow::Result<String> {
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

/// A password typed on a terminal (without echo).
fn prompt_secret(prompt: &str) -> anyhow::Result<String> {
    if !std::io::stdin().is_terminal() {
        bail!("no password: set NETDISK_PASSWORD and NETDISK_NEW_PASSWORD or run on a terminal");
    }
    Ok(rpassword::prompt_password(prompt)?)
}

/// The shortest password this client sets (register, passwd).
const MIN_PASSWORD_CHARS: usize = 8;

/// Refuse a new password that is too short, before anything is sent.
fn check_new_password(password: &str) -> anyhow::Result<()> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        bail!("the password is too short: use at least {MIN_PASSWORD_CHARS} characters");
    }
    Ok(())
}

/// A new password, typed twice on a terminal.
pub(crate) fn new_password(user: &str) -> anyhow::Result<String> {
    let password = password(user)?;
    check_new_password(&password)?;
    if std::env::var_os("NETDISK_PASSWORD").is_none() {
        let again = rpassword::prompt_password("again: ")?;
        if again != password {
            bail!("the two passwords differ");
        }
    }
    Ok(password)
}

/// Ask on the terminal; `None` at the end of input.
fn ask(question: &str) -> anyhow::Result<Option<String>> {
    eprint!("{question}");
    std::io::stderr().flush()?;
    let mut line = String::new();
    if std::io::stdin().lock().read_line(&mut line)? == 0 {
        eprintln!();
        return Ok(None);
    }
    Ok(Some(line))
}

/// Where messages and progress go: stderr, and nothing but errors with --quiet.
#[derive(Clone, Copy)]
pub(crate) struct Ui {
    quiet: bool,
}

impl Ui {
    pub(crate) fn say(&self, message: &str) {
        if !self.quiet {
            eprintln!("{message}");
        }
    }

    /// A progress bar on a terminal; silent otherwise (notes still shown).
    fn progress(&self) -> Bar {
        Bar {
            position: 0,
            total: 0,
            bar: None,
            show_bar: !self.quiet && std::io::stderr().is_terminal(),
            quiet: self.quiet,
            files: None,
        }
    }
}

struct Bar {
    /// Bytes in place and in all, whether or not a bar is drawn (for error messages).
    position: u64,
    total: u64,
    bar: Option<ProgressBar>,
    show_bar: bool,
    quiet: bool,
    /// Files done and to do, in a transfer of many.
    files: Option<(u64, u64)>,
}

impl Bar {
    fn show_files(&self) {
        if let (Some(bar), Some((done, total))) = (&self.bar, self.files) {
            bar.set_message(format!("{done}/{total} files "));
        }
    }
}

impl Progress for Bar {
    fn start(&mut self, total: u64, from: u64) {
        self.total = total;
        self.position = from;
        if !self.show_bar {
            return;
        }
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:25} {binary_bytes}/{binary_total_bytes} {msg}{binary_bytes_per_sec} ETA {eta}",
            )
            .expect("valid template"),
        );
        bar.set_position(from);
        bar.reset_eta();
        self.bar = Some(bar);
        self.show_files();
    }

    fn files_total(&mut self, total: u64) {
        self.files = Some((0, total));
        self.show_files();
    }

    fn file_done(&mut self) {
        if let Some((done, _)) = &mut self.files {
            *done += 1;
        }
        self.show_files();
    }

    fn advance(&mut self, bytes: u64) {
        self.position += bytes;
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }

    fn skip(&mut self, bytes: u64) {
        self.position += bytes;
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
            // The rate and time left count only what moves.
            bar.reset_eta();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_without_a_port_get_9000() {
        assert_eq!(with_default_port("example.org"), "example.org:9000");
        assert_eq!(with_default_port("example.org:1"), "example.org:1");
        assert_eq!(with_default_port("[::1]"), "[::1]:9000");
        assert_eq!(with_default_port("[::1]:7"), "[::1]:7");
        assert_eq!(with_default_port("::1"), "[::1]:9000");
    }

    #[test]
    fn remote_base_names() {
        assert_eq!(remote_base_name("a/b/c.txt"), "c.txt");
        assert_eq!(remote_base_name("c.txt"), "c.txt");
        assert_eq!(remote_base_name("photos/"), "photos");
        assert_eq!(remote_base_name(""), "");
    }

    #[test]
    fn every_positional_argument_has_help() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_positionals() {
                if arg
                    .get_help()
                    .is_none_or(|help| help.to_string().trim().is_empty())
                {
                    missing.push(format!("{path} {}", arg.get_id()));
                }
            }
            for sub in command.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&cli_command(), "netdisk", &mut missing);
        assert_eq!(missing, Vec::<String>::new(), "positionals without help");
        // The walk sees positionals at every depth (a check that cannot pass vacuously).
        let admin = cli_command();
        let delete = admin
            .find_subcommand("admin")
            .and_then(|a| a.find_subcommand("delete"))
            .expect("admin delete");
        assert_eq!(delete.get_positionals().count(), 1);
    }

    #[test]
    fn serve_help_shows_no_client_options() {
        let mut command = cli_command();
        command.build(); // copies the global options into the subcommands
        let serve = command.find_subcommand_mut("serve").expect("serve");
        let help = serve.render_long_help().to_string();
        for client_only in ["--user", "--server", "--ca", "--quiet"] {
            assert!(!help.contains(client_only), "{client_only} in: {help}");
        }
        for server_option in [
            "--listen",
            "--root",
            "--shutdown-grace",
            "--no-tls",
            "--secret-file",
        ] {
            assert!(
                help.contains(server_option),
                "{server_option} missing: {help}"
            );
        }
        // A client command still shows them.
        let ls = command.find_subcommand_mut("ls").expect("ls");
        assert!(ls.render_long_help().to_string().contains("--user"));
        // Parsing is unchanged, before and after the subcommand.
        let parse = |args: &[&str]| {
            Cli::from_arg_matches(&cli_command().try_get_matches_from(args).unwrap()).unwrap()
        };
        let cli = parse(&[
            "netdisk",
            "--server",
            "h:1",
            "serve",
            "--listen",
            "0.0.0.0:7",
        ]);
        assert!(
            matches!(cli.command, Command::Serve(ServeArgs { ref listen, .. }) if listen == "0.0.0.0:7")
        );
        assert_eq!(cli.server, "h:1");
        let cli = parse(&["netdisk", "ls", "--server", "h:2", "--user", "u"]);
        assert_eq!(
            (cli.server.as_str(), cli.user.as_deref()),
            ("h:2", Some("u"))
        );
    }

    #[test]
    fn summaries_count_files_in_words() {
        assert_eq!(count(1, "file"), "1 file");
        assert_eq!(count(0, "file"), "0 files");
        assert_eq!(count(5, "file"), "5 files");
    }

    #[test]
    fn clap_definitions_are_valid() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

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
