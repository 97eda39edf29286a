//! The tutorial's UDP "QQ" chat: any number of clients send messages to one server, which
//! shows who sent what (address and nickname) and can answer.
//!
//! From section 八 (基于UDP的套接字, "qq聊天") of `001_0d7bd97c93c5717e.txt`: UDP needs no
//! connection, so several clients can talk to the server at once, and each datagram is one
//! message (no sticky packets). Each datagram holds one netdisk frame (4-byte length and a
//! JSON header `{"from": ..., "text": ...}`, no body). A datagram cannot carry more than
//! 65507 bytes (65535 minus the 20-byte IP and 8-byte UDP headers, as the tutorials note):
//! a longer message is refused before sending, with a clear error, rather than lost.
//!
//! Try it, in three terminals:
//!
//! ```text
//! cargo run --example udp_chat -- server
//! cargo run --example udp_chat -- client --name alice
//! cargo run --example udp_chat -- client --name bob
//! ```
//!
//! Clients send each line typed (`quit` leaves) and print the answers. On the server, a
//! typed line answers whoever wrote last; `@alice text` answers alice.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;

use clap::{Parser, Subcommand};
use netdisk::protocol::{decode_header, encode_header};
use netdisk::{Error, Result};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;
use tokio::net::UdpSocket;

/// Largest UDP payload over IPv4: 65535 - 20 (IP header) - 8 (UDP header).
pub const MAX_DATAGRAM: usize = 65507;
/// The name the server signs its answers with.
pub const SERVER_NAME: &str = "server";

/// One chat line, as it travels.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub from: String,
    pub text: String,
}

impl ChatMessage {
    /// The message as one datagram, or a clear error if it does not fit in one.
    fn to_datagram(&self) -> Result<Vec<u8>> {
        // (encode_header itself refuses headers over 64 KiB, also too large here.)
        match encode_header(self) {
            Ok(datagram) if datagram.len() <= MAX_DATAGRAM => Ok(datagram),
            _ => Err(Error::Invalid(format!(
                "message not sent: encoded, it takes more than the {MAX_DATAGRAM} bytes \
                 a UDP datagram can carry (65535 minus 20 for the IP header and 8 for UDP)"
            ))),
        }
    }

    fn from_datagram(bytes: &[u8]) -> Result<ChatMessage> {
        let header = match bytes.split_first_chunk::<4>() {
            Some((len, json)) if u32::from_le_bytes(*len) as usize == json.len() => {
                decode_header(json)?
            }
            _ => {
                return Err(Error::Protocol(
                    "the datagram is not one netdisk frame".into(),
                ))
            }
        };
        serde_json::from_value(header.into())
            .map_err(|_| Error::Protocol("the datagram is not a chat message".into()))
    }
}

/// Control characters from the network are not sent to the terminal.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect()
}

/// The server end: receives from anyone, answers one sender at a time.
pub struct ChatServer {
    socket: UdpSocket,
}

impl ChatServer {
    pub async fn bind(addr: SocketAddr) -> Result<ChatServer> {
        Ok(ChatServer {
            socket: UdpSocket::bind(addr).await?,
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.socket.local_addr()?)
    }

    /// The next chat message and its sender's address. Other datagrams are skipped.
    pub async fn recv(&self) -> Result<(SocketAddr, ChatMessage)> {
        let mut buf = vec![0u8; 65536];
        loop {
            let (n, from) = self.socket.recv_from(&mut buf).await?;
            match ChatMessage::from_datagram(&buf[..n]) {
                Ok(message) => return Ok((from, message)),
                Err(e) => eprintln!("ignoring a datagram from {from}: {e}"),
            }
        }
    }

    pub async fn reply(&self, to: SocketAddr, text: &str) -> Result<()> {
        let message = ChatMessage {
            from: SERVER_NAME.into(),
            text: text.into(),
        };
        self.socket.send_to(&message.to_datagram()?, to).await?;
        Ok(())
    }
}

/// A client: sends under its nickname to one server, receives only from it.
pub struct ChatClient {
    socket: UdpSocket,
    name: String,
}

impl ChatClient {
    pub async fn connect(server: SocketAddr, name: &str) -> Result<ChatClient> {
        let local: SocketAddr = if server.ip().is_loopback() {
            (server.ip(), 0).into()
        } else if server.is_ipv4() {
            "0.0.0.0:0".parse().expect("valid address")
        } else {
            "[::]:0".parse().expect("valid address")
        };
        let socket = UdpSocket::bind(local).await?;
        socket.connect(server).await?;
        Ok(ChatClient {
            socket,
            name: name.into(),
        })
    }

    /// Send one message. One that does not fit in a datagram is refused here, unsent.
    pub async fn send(&self, text: &str) -> Result<()> {
        let message = ChatMessage {
            from: self.name.clone(),
            text: text.into(),
        };
        self.socket.send(&message.to_datagram()?).await?;
        Ok(())
    }

    /// The next message from the server.
    pub async fn recv(&self) -> Result<ChatMessage> {
        let mut buf = vec![0u8; 65536];
        loop {
            let n = self.socket.recv(&mut buf).await?;
            match ChatMessage::from_datagram(&buf[..n]) {
                Ok(message) => return Ok(message),
                Err(e) => eprintln!("ignoring a datagram: {e}"),
            }
        }
    }
}

#[derive(Parser)]
#[command(about = "The tutorial's UDP chat")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Show incoming messages; typed lines answer them.
    Server {
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
    },
    /// Send typed lines to the server.
    Client {
        #[arg(long, default_value = "127.0.0.1:8081")]
        server: SocketAddr,
        #[arg(long)]
        name: String,
    },
}

async fn run_server(listen: SocketAddr) -> anyhow::Result<()> {
    let server = ChatServer::bind(listen).await?;
    println!("udp_chat listening on {}", server.local_addr()?);
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut last: Option<SocketAddr> = None;
    let mut known: HashMap<String, SocketAddr> = HashMap::new();
    loop {
        tokio::select! {
            received = server.recv() => {
                let (from, message) = received?;
                println!("[{from}] {}: {}", printable(&message.from), printable(&message.text));
                known.insert(message.from, from);
                last = Some(from);
            }
            line = lines.next_line() => {
                let Some(line) = line? else { return Ok(()) };
                let addressed = line
                    .strip_prefix('@')
                    .and_then(|rest| rest.split_once(' '))
                    .and_then(|(name, text)| Some((*known.get(name)?, text)));
                match addressed.or(last.map(|to| (to, line.as_str()))) {
                    Some((to, text)) => match server.reply(to, text).await {
                        Ok(()) => println!("-> {to}"),
                        Err(e) => println!("error: {e}"),
                    },
                    None => println!("nobody to answer yet"),
                }
            }
        }
    }
}

async fn run_client(server: SocketAddr, name: &str) -> anyhow::Result<()> {
    let client = ChatClient::connect(server, name).await?;
    println!("chatting with {server} as {name}; type messages, `quit` to leave");
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    loop {
        print!("> ");
        std::io::stdout().flush()?;
        tokio::select! {
            received = client.recv() => match received {
                Ok(ChatMessage { from, text }) => {
                    println!("\r[{server}] {}: {}", printable(&from), printable(&text));
                }
                // For instance "connection refused": nobody listens at the server's address.
                Err(e) => println!("\rerror: {e}"),
            },
            line = lines.next_line() => match line?.as_deref().map(str::trim) {
                None | Some("quit") => return Ok(()),
                Some("") => {}
                Some(text) => {
                    if let Err(e) = client.send(text).await {
                        println!("error: {e}");
                    }
                }
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().mode {
        Mode::Server { listen } => run_server(listen).await,
        Mode::Client { server, name } => run_client(server, &name).await,
    }
}
