//! The UDP time service: the client sends a strftime-style format, the server answers
//! with the current time in that format (an empty format means `%Y-%m-%d %X`).
//!
//! From the tutorial's section 八 (基于UDP的套接字, "时间服务器", in
//! `001_0d7bd97c93c5717e.txt`). Each datagram holds one netdisk frame (4-byte length and
//! JSON header, no body): the request is `{"format": "..."}`, the answer the usual reply
//! `{"ok": true, "time": "..."}`, or an error reply for a format the server cannot
//! handle (an unknown directive such as `%Q`), so a bad format never stops the server.
//!
//! Supported directives: `%Y %y %m %d %e %j %H %I %M %S %p %a %A %b %B %w %z %x %X %c %%`,
//! as in the C locale (`%x` is `%m/%d/%y`, `%X` is `%H:%M:%S`).
//!
//! Local time: the server reads the local UTC offset once, at start-up, while it still has
//! a single thread (the offset is not safely readable later). If that fails it serves UTC
//! and says so; a daylight-saving change while it runs is not picked up.
//!
//! Try it, in two terminals:
//!
//! ```text
//! cargo run --example udp_time -- server
//! cargo run --example udp_time -- client
//! cargo run --example udp_time -- client '%H:%M on %A %d %B %Y'
//! ```
//!
//! Without a format the client prompts for formats (an empty line asks for the default)
//! until end of input.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use netdisk::protocol::{decode_header, encode_header, parse_reply};
use netdisk::{Error, ErrorCode};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::{OffsetDateTime, UtcOffset};
use tokio::io::AsyncBufReadExt;
use tokio::net::UdpSocket;

pub const DEFAULT_FORMAT: &str = "%Y-%m-%d %X";
/// Longest format accepted, which also keeps every answer far below the datagram limit.
pub const MAX_FORMAT_LEN: usize = 1000;
/// UDP does not resend a lost datagram: the client gives up after this long.
const REPLY_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Serialize, Deserialize)]
struct TimeRequest {
    format: String,
}

#[derive(Serialize, Deserialize)]
struct TimeReply {
    time: String,
}

/// Format `t` following a strftime-style `format`; an unknown directive is an error.
pub fn strftime(format: &str, t: OffsetDateTime) -> Result<String, String> {
    let weekday = t.weekday().number_days_from_sunday();
    let day_name = t.weekday().to_string();
    let month_name = t.month().to_string();
    let hour12 = match t.hour() % 12 {
        0 => 12,
        h => h,
    };
    let offset = t.offset().whole_minutes();
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        // Writing to a String cannot fail.
        let _ = match chars.next() {
            Some('Y') => write!(out, "{}", t.year()),
            Some('y') => write!(out, "{:02}", t.year().rem_euclid(100)),
            Some('m') => write!(out, "{:02}", u8::from(t.month())),
            Some('d') => write!(out, "{:02}", t.day()),
            Some('e') => write!(out, "{:2}", t.day()),
            Some('j') => write!(out, "{:03}", t.ordinal()),
            Some('H') => write!(out, "{:02}", t.hour()),
            Some('I') => write!(out, "{hour12:02}"),
            Some('M') => write!(out, "{:02}", t.minute()),
            Some('S') => write!(out, "{:02}", t.second()),
            Some('p') => write!(out, "{}", if t.hour() < 12 { "AM" } else { "PM" }),
            Some('a') => write!(out, "{}", &day_name[..3]),
            Some('A') => write!(out, "{day_name}"),
            Some('b') => write!(out, "{}", &month_name[..3]),
            Some('B') => write!(out, "{month_name}"),
            Some('w') => write!(out, "{weekday}"),
            Some('z') => {
                let sign = if offset < 0 { '-' } else { '+' };
                let minutes = offset.unsigned_abs();
                write!(out, "{sign}{:02}{:02}", minutes / 60, minutes % 60)
            }
            Some('x') => write!(out, "{}", strftime("%m/%d/%y", t)?),
            Some('X') => write!(out, "{}", strftime("%H:%M:%S", t)?),
            Some('c') => write!(out, "{}", strftime("%a %b %e %H:%M:%S %Y", t)?),
            Some('%') => write!(out, "%"),
            Some(other) => return Err(format!("unknown directive %{other} in the format")),
            None => return Err("the format ends with a lone %".into()),
        };
    }
    Ok(out)
}

/// One netdisk frame as a datagram: the whole datagram must be exactly one header.
fn decode_datagram(bytes: &[u8]) -> netdisk::Result<Map<String, Value>> {
    match bytes.split_first_chunk::<4>() {
        Some((len, json)) if u32::from_le_bytes(*len) as usize == json.len() => decode_header(json),
        _ => Err(Error::Protocol(
            "the datagram is not one netdisk frame".into(),
        )),
    }
}

/// The server's answer to one request datagram at time `now`: the time, or why not.
pub fn answer(request: &[u8], now: OffsetDateTime) -> Result<String, String> {
    let format = decode_datagram(request).and_then(|header| {
        serde_json::from_value::<TimeRequest>(header.into())
            .map_err(|_| Error::Protocol(r#"expected {"format": "..."}"#.into()))
    });
    match format {
        Ok(TimeRequest { format }) if format.len() > MAX_FORMAT_LEN => {
            Err(format!("the format is longer than {MAX_FORMAT_LEN} bytes"))
        }
        Ok(TimeRequest { format }) if format.is_empty() => strftime(DEFAULT_FORMAT, now),
        Ok(TimeRequest { format }) => strftime(&format, now),
        Err(e) => Err(e.to_string()),
    }
}

/// An answer as a reply datagram: `{"ok": true, "time": ...}` or an error reply.
fn reply_datagram(answer: &Result<String, String>) -> Vec<u8> {
    let header = match answer {
        Ok(time) => serde_json::json!({"ok": true, "time": time}),
        Err(message) => {
            serde_json::json!({"ok": false, "code": ErrorCode::BadRequest, "message": message})
        }
    };
    encode_header(&header).expect("a reply of a bounded format fits in a header")
}

/// Answer requests on `socket` forever, with local time at `offset`.
pub async fn serve(socket: UdpSocket, offset: UtcOffset) -> std::io::Result<()> {
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = socket.recv_from(&mut buf).await?;
        let now = OffsetDateTime::now_utc().to_offset(offset);
        let answer = answer(&buf[..n], now);
        println!("===> {from}: {answer:?}");
        let reply = reply_datagram(&answer);
        // A client that went away is no reason to stop serving the others.
        if let Err(e) = socket.send_to(&reply, from).await {
            eprintln!("cannot answer {from}: {e}");
        }
    }
}

/// Where a client socket should bind to reach `server`: loopback stays on loopback.
fn local_addr_for(server: SocketAddr) -> SocketAddr {
    match server {
        SocketAddr::V4(a) if a.ip().is_loopback() => "127.0.0.1:0".parse().unwrap(),
        SocketAddr::V4(_) => "0.0.0.0:0".parse().unwrap(),
        SocketAddr::V6(a) if a.ip().is_loopback() => "[::1]:0".parse().unwrap(),
        SocketAddr::V6(_) => "[::]:0".parse().unwrap(),
    }
}

/// Ask the server at `server` for the time in `format`. The server's refusal of a format
/// is an [`Error::Remote`] with code `bad_request`.
pub async fn request(server: SocketAddr, format: &str) -> anyhow::Result<String> {
    let socket = UdpSocket::bind(local_addr_for(server)).await?;
    // Connected: only the server's datagrams are received.
    socket.connect(server).await?;
    let datagram = encode_header(&TimeRequest {
        format: format.to_owned(),
    })?;
    socket.send(&datagram).await?;
    let mut buf = vec![0u8; 65536];
    let n = tokio::time::timeout(REPLY_TIMEOUT, socket.recv(&mut buf))
        .await
        .map_err(|_| {
            anyhow::anyhow!("no answer from {server}: is it running? (UDP never resends)")
        })?
        .with_context(|| format!("no answer from {server}"))?;
    let reply: TimeReply = parse_reply(decode_datagram(&buf[..n])?)?;
    Ok(reply.time)
}

/// The local UTC offset now. Only sound while the process has a single thread: `main`
/// calls it before the async runtime starts its threads.
fn local_offset() -> Option<UtcOffset> {
    let now = OffsetDateTime::now_utc().unix_timestamp() as libc::time_t;
    let mut tm = std::mem::MaybeUninit::<libc::tm>::zeroed();
    // SAFETY: localtime_r only writes into `tm`. It reads the environment (TZ), which is
    // safe here because no other thread exists yet that could be changing it.
    let tm = unsafe {
        if libc::localtime_r(&now, tm.as_mut_ptr()).is_null() {
            return None;
        }
        tm.assume_init()
    };
    UtcOffset::from_whole_seconds(i32::try_from(tm.tm_gmtoff).ok()?).ok()
}

#[derive(Parser)]
#[command(about = "A UDP time service with strftime-style formats")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Answer time requests.
    Server {
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
    },
    /// Ask for the time.
    Client {
        #[arg(long, default_value = "127.0.0.1:9000")]
        server: SocketAddr,
        /// A format to ask for once; without it, formats are read from the prompt.
        format: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Before the runtime exists, while this is the only thread.
    let offset = local_offset();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        match cli.mode {
            Mode::Server { listen } => {
                let socket = UdpSocket::bind(listen)
                    .await
                    .with_context(|| format!("cannot bind {listen}"))?;
                match offset {
                    Some(offset) => {
                        let now = OffsetDateTime::now_utc().to_offset(offset);
                        println!("local time: UTC{}", strftime("%z", now).unwrap_or_default());
                    }
                    None => println!("the local time zone is unknown: serving UTC"),
                }
                println!("udp_time listening on {}", socket.local_addr()?);
                serve(socket, offset.unwrap_or(UtcOffset::UTC)).await?;
            }
            Mode::Client {
                server,
                format: Some(format),
            } => println!("{}", request(server, &format).await?),
            Mode::Client {
                server,
                format: None,
            } => {
                let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
                loop {
                    print!("format (e.g. %Y %m %d) >> ");
                    std::io::stdout().flush()?;
                    let Some(line) = lines.next_line().await? else {
                        break;
                    };
                    match request(server, line.trim()).await {
                        Ok(time) => println!("{time}"),
                        Err(e) => println!("error: {e}"),
                    }
                }
            }
        }
        Ok(())
    })
}
