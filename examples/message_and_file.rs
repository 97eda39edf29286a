//! Messages and file uploads over one connection: the case study "消息 & 文件上传" of
//! section 3 (粘包) in `003_70dbe2ddc8b2ab40.txt`.
//!
//! At the client's prompt, `msg|text` sends a message, `file|path` sends a file and `q`
//! closes. The server prints the messages and stores the files in its folder. Where the
//! tutorial sends a 4-byte size before each piece, this uses netdisk frames: a JSON header
//! (`{"cmd": "msg", "filesize": n}` or `{"cmd": "file", "filename": ..., "filesize": n}`)
//! followed by the body, which for files streams from and to disk without being held in
//! memory ([`netdisk::transfer`]). The server answers every message or file with
//! `{"ok": true}` or an error reply, so the client knows it arrived. File names must be
//! plain names ([`netdisk::names::check_file_name`]): `../x` is refused, never written
//! outside the folder. A file is written under a temporary name and renamed when
//! complete, so the folder never shows half a file.
//!
//! Try it, in two terminals:
//!
//! ```text
//! cargo run --example message_and_file -- server --dir /tmp/received
//! cargo run --example message_and_file -- client
//! >>> msg|你好呀
//! >>> file|Cargo.toml
//! >>> q
//! ```

use std::io::{Read, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use netdisk::names::check_file_name;
use netdisk::protocol::{Connection, Done};
use netdisk::transfer::{receive_body, send_body, BodySink, BodySource};
use netdisk::{Error, ErrorCode, Result};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::UnboundedSender;

/// Largest message accepted (files have no limit).
pub const MAX_MESSAGE_LEN: u64 = 1 << 20;

#[derive(Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
enum Request {
    Msg { filesize: u64 },
    File { filename: String, filesize: u64 },
    Close,
}

/// What the server saw, for it to print.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    Message {
        peer: SocketAddr,
        text: String,
    },
    File {
        peer: SocketAddr,
        name: String,
        size: u64,
    },
    Refused {
        peer: SocketAddr,
        reason: String,
    },
    Closed {
        peer: SocketAddr,
    },
}

struct FileSink(std::fs::File);

impl BodySink for FileSink {
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.0.write_all(bytes).map_err(disk_error)
    }
}

/// A failure of the server's disk, told to the client (unlike a failure of the connection).
fn disk_error(e: std::io::Error) -> Error {
    Error::remote(ErrorCode::Internal, format!("cannot store the file: {e}"))
}

struct FileSource(std::fs::File);

impl BodySource for FileSource {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        Ok(self.0.read(buf)?)
    }
}

/// Accept clients forever, storing their files in `dir` and reporting on `events`.
pub async fn serve(listener: TcpListener, dir: PathBuf, events: UnboundedSender<Event>) {
    let dir: Arc<Path> = dir.into();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("accept failed: {e}");
                continue;
            }
        };
        let dir = Arc::clone(&dir);
        let events = events.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_client(stream, peer, &dir, &events).await {
                let _ = events.send(Event::Refused {
                    peer,
                    reason: e.to_string(),
                });
            }
            let _ = events.send(Event::Closed { peer });
        });
    }
}

async fn serve_client(
    stream: TcpStream,
    peer: SocketAddr,
    dir: &Path,
    events: &UnboundedSender<Event>,
) -> Result<()> {
    let mut conn = Connection::new(stream);
    while let Some(header) = conn.read_header().await? {
        // Without a valid header we cannot know how many body bytes follow: stop here.
        let request = serde_json::from_value(header.into())
            .map_err(|e| Error::remote(ErrorCode::BadRequest, format!("bad request: {e}")))?;
        let outcome = match request {
            Request::Close => break,
            Request::Msg { filesize } => receive_message(&mut conn, filesize)
                .await
                .map(|text| Event::Message { peer, text }),
            Request::File { filename, filesize } => match check_file_name(&filename) {
                Ok(()) => store_file(&mut conn, dir, &filename, filesize).await,
                Err(e) => conn.skip_body(filesize).await.and(Err(e)),
            }
            .map(|()| Event::File {
                peer,
                name: filename,
                size: filesize,
            }),
        };
        match outcome {
            Ok(event) => {
                let _ = events.send(event);
                conn.write_ok(&Done {}).await?;
            }
            // The connection itself failed (disk errors are `Remote`): nobody to answer.
            Err(e @ (Error::Io(_) | Error::ConnectionClosed)) => return Err(e),
            Err(e) => {
                let reason = e.to_string();
                let _ = events.send(Event::Refused { peer, reason });
                let code = e.code().unwrap_or(ErrorCode::Internal);
                conn.write_error(code, &e.to_string()).await?;
            }
        }
        conn.flush().await?;
    }
    Ok(())
}

async fn receive_message(conn: &mut Connection, len: u64) -> Result<String> {
    if len > MAX_MESSAGE_LEN {
        conn.skip_body(len).await?;
        return Err(Error::remote(
            ErrorCode::BadRequest,
            format!("messages are limited to {MAX_MESSAGE_LEN} bytes"),
        ));
    }
    let mut body = vec![0u8; len as usize];
    conn.read_body(&mut body).await?;
    String::from_utf8(body)
        .map_err(|_| Error::remote(ErrorCode::BadRequest, "a message must be UTF-8 text"))
}

/// Receive `len` bytes into `dir/name`, through a temporary file renamed at the end.
async fn store_file(conn: &mut Connection, dir: &Path, name: &str, len: u64) -> Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let temp = dir.join(format!(".incoming-{}-{n}", std::process::id()));
    let stored = async {
        let file = tokio::fs::File::create(&temp).await.map_err(disk_error)?;
        let file = file.into_std().await;
        let FileSink(file) = receive_body(conn, len, FileSink(file), &mut |_| {}).await?;
        drop(file);
        tokio::fs::rename(&temp, dir.join(name))
            .await
            .map_err(disk_error)?;
        Ok(())
    }
    .await;
    if stored.is_err() {
        let _ = tokio::fs::remove_file(&temp).await;
    }
    stored
}

/// A client line, parsed.
#[derive(Debug, PartialEq, Eq)]
pub enum Input<'a> {
    Message(&'a str),
    File(&'a Path),
    Quit,
    Nothing,
}

/// `msg|text`, `file|path`, `q` (or `Q`), or an empty line.
pub fn parse_line(line: &str) -> std::result::Result<Input<'_>, &'static str> {
    let line = line.trim_end_matches(['\r', '\n']);
    match line.split_once('|') {
        Some(("msg", text)) => Ok(Input::Message(text)),
        Some(("file", path)) if !path.is_empty() => Ok(Input::File(Path::new(path))),
        _ if line.trim().is_empty() => Ok(Input::Nothing),
        _ if line.trim().eq_ignore_ascii_case("q") => Ok(Input::Quit),
        _ => Err("use msg|TEXT, file|PATH or q"),
    }
}

pub struct Client {
    conn: Connection,
}

impl Client {
    pub async fn connect(addr: &str) -> anyhow::Result<Client> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        Ok(Client {
            conn: Connection::new(stream),
        })
    }

    pub async fn send_message(&mut self, text: &str) -> Result<()> {
        let filesize = text.len() as u64;
        self.conn.write_header(&Request::Msg { filesize }).await?;
        self.conn.write_body(text.as_bytes()).await?;
        self.conn.flush().await?;
        self.conn.read_reply::<Done>().await?;
        Ok(())
    }

    /// Send the file at `path` under its own name (the last part of the path). Returns
    /// its size.
    pub async fn send_file(&mut self, path: &Path) -> Result<u64> {
        let filename = path
            .file_name()
            .and_then(|name| name.to_str())
            .ok_or_else(|| Error::Invalid(format!("{} has no usable file name", path.display())))?
            .to_owned();
        check_file_name(&filename)?;
        let cannot_read = |e: std::io::Error| Error::Invalid(format!("{}: {e}", path.display()));
        let file = tokio::fs::File::open(path).await.map_err(cannot_read)?;
        let metadata = file.metadata().await.map_err(cannot_read)?;
        if !metadata.is_file() {
            return Err(Error::Invalid(format!("{} is not a file", path.display())));
        }
        let filesize = metadata.len();
        let request = Request::File { filename, filesize };
        self.conn.write_header(&request).await?;
        let source = FileSource(file.into_std().await);
        send_body(&mut self.conn, filesize, source, &mut |_| {}).await?;
        self.conn.flush().await?;
        self.conn.read_reply::<Done>().await?;
        Ok(filesize)
    }

    /// Say goodbye and close the connection.
    pub async fn close(mut self) -> Result<()> {
        self.conn.write_header(&Request::Close).await?;
        self.conn.shutdown().await
    }
}

#[derive(Parser)]
#[command(about = "Send messages and files to a server that prints and stores them")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Print messages and store files in a folder.
    Server {
        #[arg(long, default_value = "127.0.0.1:8001")]
        listen: String,
        /// Where received files go (created if missing).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Send what is typed at the prompt.
    Client {
        #[arg(long, default_value = "127.0.0.1:8001")]
        server: String,
    },
}

async fn run_client(server: &str) -> anyhow::Result<()> {
    let mut client = Client::connect(server).await?;
    println!("connected to {server}: msg|TEXT sends a message, file|PATH a file, q quits");
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        print!(">>> ");
        std::io::stdout().flush()?;
        let line = lines.next_line().await?.unwrap_or_else(|| "q".into());
        let result = match parse_line(&line) {
            Ok(Input::Nothing) => Ok(()),
            Ok(Input::Quit) => break,
            Ok(Input::Message(text)) => client.send_message(text).await,
            Ok(Input::File(path)) => client
                .send_file(path)
                .await
                .map(|size| println!("sent {} ({size} bytes)", path.display())),
            Err(usage) => {
                println!("{usage}");
                Ok(())
            }
        };
        match result {
            Ok(()) => {}
            Err(e @ (Error::Remote { .. } | Error::Invalid(_))) => println!("error: {e}"),
            Err(e) => return Err(e.into()),
        }
    }
    client.close().await?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().mode {
        Mode::Server { listen, dir } => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let listener = TcpListener::bind(&listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            println!(
                "message_and_file listening on {}, storing files in {}",
                listener.local_addr()?,
                dir.display()
            );
            let (events, mut received) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(serve(listener, dir, events));
            while let Some(event) = received.recv().await {
                match event {
                    Event::Message { peer, text } => println!("[{peer}] message: {text:?}"),
                    Event::File { peer, name, size } => {
                        println!("[{peer}] stored file {name:?} ({size} bytes)")
                    }
                    Event::Refused { peer, reason } => println!("[{peer}] refused: {reason}"),
                    Event::Closed { peer } => println!("[{peer}] closed the connection"),
                }
            }
            Ok(())
        }
        Mode::Client { server } => run_client(&server).await,
    }
}
