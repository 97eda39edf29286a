//! A remote command runner: the client sends a shell command, the server runs it and
//! answers with one frame holding the exit code, stdout and stderr.
//!
//! This is the program the tutorial uses to show sticky packets (section 九 粘包现象 and
//! the fixes of sections 十一-十二 in `001_0d7bd97c93c5717e.txt`), guarded by the HMAC
//! connection check of section 十三. Unlike the tutorial it cannot mix up replies: each
//! reply is a netdisk frame whose JSON header gives the exit code and the sizes, followed
//! by stdout then stderr as the body. It is also careful with what it exposes:
//!
//! - it listens on 127.0.0.1 unless told otherwise, and refuses to start without a secret
//!   file; a client with a wrong secret gets no reply at all, the connection just closes;
//! - each command runs under `sh -c` with stdin closed, in its own process group, and is
//!   killed with everything it started when the timeout (`--timeout-secs`) expires;
//! - stdout and stderr are each cut at `--max-output` bytes (the reply says `truncated`).
//!
//! Still: anyone holding the secret can run any command as the server's user.
//!
//! Try it, in two terminals:
//!
//! ```text
//! head -c 32 /dev/urandom | base64 > /tmp/remote_cmd.secret
//! cargo run --example remote_cmd -- server --secret-file /tmp/remote_cmd.secret
//! cargo run --example remote_cmd -- client --secret-file /tmp/remote_cmd.secret
//! cargo run --example remote_cmd -- client --secret-file /tmp/remote_cmd.secret -- ls -l
//! ```
//!
//! Without a command the client prompts (`>> `) for commands until `quit`; with one, it
//! runs it and exits with the command's exit code.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use netdisk::conncheck::{answer_challenge, challenge_client, load_secret};
use netdisk::protocol::Connection;
use netdisk::ErrorCode;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt};
use tokio::net::{TcpListener, TcpStream};

/// How long a client has to answer the connection check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest reply body the client accepts (the server's `--max-output` is per stream).
const MAX_REPLY_BODY: u64 = 256 << 20;

/// What a command may use on the server.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The command and everything it starts are killed after this long.
    pub timeout: Duration,
    /// Bytes of stdout, and of stderr, kept; the rest is read and dropped.
    pub max_output: usize,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
enum Request {
    Run { command: String },
}

/// The reply header; `filesize` body bytes follow: stdout (`stdout_len` bytes), then stderr.
#[derive(Serialize, Deserialize)]
struct RunReply {
    exit_code: Option<i32>,
    timed_out: bool,
    truncated: bool,
    stdout_len: u64,
    filesize: u64,
}

/// The result of one command.
#[derive(Debug)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// `None` when the command was ended by a signal (for instance by the timeout).
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    /// Whether stdout or stderr was cut at the output limit.
    pub truncated: bool,
}

/// Run `command` with `sh -c` under `limits`.
pub async fn run_command(command: &str, limits: Limits) -> std::io::Result<Output> {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that a timeout can end everything it started.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()?;
    let pgid = child
        .id()
        .expect("a child that was not waited for has an id");
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut stdout = tokio::spawn(read_capped(stdout, limits.max_output));
    let mut stderr = tokio::spawn(read_capped(stderr, limits.max_output));

    let finished = tokio::time::timeout(limits.timeout, async {
        tokio::join!(child.wait(), &mut stdout, &mut stderr)
    })
    .await;
    let (status, out, err, timed_out) = match finished {
        Ok((status, out, err)) => (status?, out, err, false),
        Err(_) => {
            // The pipes stay open as long as any process of the group lives: end them all.
            // SAFETY: killpg takes plain integers and touches no memory of this process.
            unsafe { libc::killpg(pgid as libc::pid_t, libc::SIGKILL) };
            (child.wait().await?, stdout.await, stderr.await, true)
        }
    };
    let (stdout, out_cut) = out.map_err(std::io::Error::other)?;
    let (stderr, err_cut) = err.map_err(std::io::Error::other)?;
    Ok(Output {
        stdout,
        stderr,
        exit_code: status.code(),
        timed_out,
        truncated: out_cut || err_cut,
    })
}

/// Read a pipe to its end, keeping the first `cap` bytes. Returns them and whether more came.
async fn read_capped(mut pipe: impl AsyncRead + Unpin, cap: usize) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut buf = [0u8; 8192];
    while let Ok(n @ 1..) = pipe.read(&mut buf).await {
        let room = cap - kept.len();
        kept.extend_from_slice(&buf[..n.min(room)]);
        truncated |= n > room;
    }
    (kept, truncated)
}

/// A bound server that holds its secret.
pub struct Server {
    listener: TcpListener,
    secret: Arc<[u8]>,
    limits: Limits,
}

impl Server {
    /// Load the secret, then bind. Without a readable secret file of at least 16 bytes
    /// the server does not start.
    pub async fn bind(listen: &str, secret_file: &Path, limits: Limits) -> anyhow::Result<Server> {
        let secret = load_secret(secret_file)
            .context("remote_cmd will not start without its secret file")?;
        let listener = TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        Ok(Server {
            listener,
            secret: secret.into(),
            limits,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serve clients, each on its own task, until the process ends.
    pub async fn run(self) {
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    eprintln!("accept failed: {e}");
                    continue;
                }
            };
            let secret = Arc::clone(&self.secret);
            let limits = self.limits;
            tokio::spawn(async move {
                match serve_client(stream, peer, &secret, limits).await {
                    Ok(()) => eprintln!("{peer}: disconnected"),
                    Err(e) => eprintln!("{peer}: {e}"),
                }
            });
        }
    }
}

async fn serve_client(
    stream: TcpStream,
    peer: SocketAddr,
    secret: &[u8],
    limits: Limits,
) -> netdisk::Result<()> {
    let mut conn = Connection::new(stream);
    // A wrong, late or missing answer ends the connection here, with no reply.
    challenge_client(&mut conn, secret, CHECK_TIMEOUT).await?;
    while let Some(header) = conn.read_header().await? {
        let Ok(Request::Run { command }) = serde_json::from_value(header.into()) else {
            conn.write_error(
                ErrorCode::BadRequest,
                r#"expected {"cmd": "run", "command": ...}"#,
            )
            .await?;
            conn.flush().await?;
            continue;
        };
        eprintln!("{peer}: $ {command}");
        match run_command(&command, limits).await {
            Ok(output) => {
                let reply = RunReply {
                    exit_code: output.exit_code,
                    timed_out: output.timed_out,
                    truncated: output.truncated,
                    stdout_len: output.stdout.len() as u64,
                    filesize: (output.stdout.len() + output.stderr.len()) as u64,
                };
                conn.write_ok(&reply).await?;
                conn.write_body(&output.stdout).await?;
                conn.write_body(&output.stderr).await?;
            }
            Err(e) => {
                let message = format!("cannot run the command: {e}");
                conn.write_error(ErrorCode::Internal, &message).await?;
            }
        }
        conn.flush().await?;
    }
    Ok(())
}

/// A client that passed (or at least answered) the connection check.
pub struct Client {
    conn: Connection,
}

impl Client {
    pub async fn connect(addr: &str, secret: &[u8]) -> anyhow::Result<Client> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        let mut conn = Connection::new(stream);
        answer_challenge(&mut conn, secret).await?;
        Ok(Client { conn })
    }

    /// Run one command on the server. With a wrong secret this fails: the server has
    /// closed the connection without a word.
    pub async fn run(&mut self, command: &str) -> anyhow::Result<Output> {
        let request = Request::Run {
            command: command.to_owned(),
        };
        self.conn.write_header(&request).await?;
        self.conn.flush().await?;
        let reply: RunReply = self
            .conn
            .read_reply()
            .await
            .context("no reply (is the secret right?)")?;
        anyhow::ensure!(
            reply.stdout_len <= reply.filesize && reply.filesize <= MAX_REPLY_BODY,
            "bad reply sizes"
        );
        let mut stdout = vec![0u8; reply.filesize as usize];
        self.conn.read_body(&mut stdout).await?;
        let stderr = stdout.split_off(reply.stdout_len as usize);
        Ok(Output {
            stdout,
            stderr,
            exit_code: reply.exit_code,
            timed_out: reply.timed_out,
            truncated: reply.truncated,
        })
    }
}

#[derive(Parser)]
#[command(about = "Run shell commands on a server that checks a shared secret")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Run commands for clients that hold the secret.
    Server {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// File holding the shared secret (at least 16 bytes).
        #[arg(long)]
        secret_file: PathBuf,
        #[arg(long, default_value_t = 10)]
        timeout_secs: u64,
        /// Bytes of stdout, and of stderr, sent back per command.
        #[arg(long, default_value_t = 1 << 20)]
        max_output: usize,
    },
    /// Send commands (the arguments, or lines typed at the prompt).
    Client {
        #[arg(long, default_value = "127.0.0.1:8080")]
        server: String,
        #[arg(long)]
        secret_file: PathBuf,
        /// A command to run once; without it, commands are read from the prompt.
        command: Vec<String>,
    },
}

/// Print one command's result the way a shell would; returns its exit code.
fn show(output: &Output) -> anyhow::Result<u8> {
    std::io::stdout().write_all(&output.stdout)?;
    std::io::stdout().flush()?;
    std::io::stderr().write_all(&output.stderr)?;
    if output.truncated {
        eprintln!("[output cut at the server's limit]");
    }
    if output.timed_out {
        eprintln!("[killed: the command ran out of time]");
    }
    Ok(match output.exit_code {
        Some(0) => 0,
        Some(code) => {
            eprintln!("[exit code {code}]");
            u8::try_from(code).unwrap_or(1)
        }
        None => 1,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    match Cli::parse().mode {
        Mode::Server {
            listen,
            secret_file,
            timeout_secs,
            max_output,
        } => {
            let limits = Limits {
                timeout: Duration::from_secs(timeout_secs),
                max_output,
            };
            let server = Server::bind(&listen, &secret_file, limits).await?;
            let addr = server.local_addr()?;
            if !addr.ip().is_loopback() {
                eprintln!("warning: whoever reaches {addr} with the secret can run commands here");
            }
            println!("remote_cmd listening on {addr}");
            server.run().await;
            Ok(ExitCode::SUCCESS)
        }
        Mode::Client {
            server,
            secret_file,
            command,
        } => {
            let secret = load_secret(&secret_file)?;
            let mut client = Client::connect(&server, &secret).await?;
            if !command.is_empty() {
                let output = client.run(&command.join(" ")).await?;
                return Ok(ExitCode::from(show(&output)?));
            }
            let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
            loop {
                print!(">> ");
                std::io::stdout().flush()?;
                let Some(line) = lines.next_line().await? else {
                    break;
                };
                match line.trim() {
                    "" => continue,
                    "quit" => break,
                    command => {
                        show(&client.run(command).await?)?;
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
