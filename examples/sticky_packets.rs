//! The sticky-packet problem (粘包) and how netdisk's framing avoids it.
//!
//! TCP carries a stream of bytes, not messages: two quick sends can come out of one
//! `recv`, and a `recv` shorter than a message leaves the rest for the next one. This
//! example shows both on a raw loopback connection, exactly as in the tutorial's sections
//! 九-十 (粘包现象, 什么是粘包; `001_0d7bd97c93c5717e.txt`, also 003 section 3), then sends
//! messages through [`netdisk::protocol::Connection`]: every frame is a 4-byte length, a
//! JSON header announcing the body size (`filesize`) and the body, the fix of section 十二.
//! The receiver gets every message whole and in order, whatever TCP did to the bytes.
//!
//! Try it (it runs both ends itself, on 127.0.0.1):
//!
//! ```text
//! cargo run --example sticky_packets
//! ```

use netdisk::protocol::Connection;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest message the framed receiver accepts: the size comes from the peer, so it is
/// checked before anything is allocated.
pub const MAX_MESSAGE_LEN: u64 = 16 << 20;

/// The header of one framed message: only the size of the body that follows.
#[derive(Serialize, Deserialize)]
struct MessageHeader {
    filesize: u64,
}

/// Two ends of a fresh TCP connection on 127.0.0.1.
async fn tcp_pair() -> std::io::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (sender, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    Ok((sender?, accepted?.0))
}

/// Raw TCP, as the tutorial does it: the sender writes each message with its own call and
/// closes; only then does the receiver call `read` once per entry of `read_sizes` (like
/// `recv(10)`) and return what each call gave. Messages must be small (they are all
/// written before anything is read).
pub async fn raw_exchange(
    messages: &[&[u8]],
    read_sizes: &[usize],
) -> std::io::Result<Vec<Vec<u8>>> {
    let (mut sender, mut receiver) = tcp_pair().await?;
    for message in messages {
        sender.write_all(message).await?;
    }
    sender.shutdown().await?;
    let mut reads = Vec::new();
    for &size in read_sizes {
        let mut buf = vec![0u8; size];
        let n = receiver.read(&mut buf).await?;
        buf.truncate(n);
        reads.push(buf);
    }
    Ok(reads)
}

/// The same exchange with netdisk frames: one frame per message, read back with
/// `read_header` and `read_body`. Returns the messages as the receiver got them.
pub async fn framed_exchange(messages: &[Vec<u8>]) -> anyhow::Result<Vec<Vec<u8>>> {
    let (sender, receiver) = tcp_pair().await?;
    let outgoing = messages.to_vec();
    // The sender runs on its own task: a large message does not fit in the socket buffers,
    // so it can only be written while the receiver reads.
    let send = tokio::spawn(async move {
        let mut conn = Connection::new(sender);
        for message in &outgoing {
            let header = MessageHeader {
                filesize: message.len() as u64,
            };
            conn.write_header(&header).await?;
            conn.write_body(message).await?;
        }
        conn.shutdown().await
    });

    let mut conn = Connection::new(receiver);
    let mut received = Vec::new();
    // `None` is a clean end of the stream between two frames.
    while let Some(header) = conn.read_header().await? {
        let header: MessageHeader = serde_json::from_value(header.into())?;
        anyhow::ensure!(
            header.filesize <= MAX_MESSAGE_LEN,
            "a message of {} bytes is over the {MAX_MESSAGE_LEN}-byte limit",
            header.filesize
        );
        let mut body = vec![0u8; header.filesize as usize];
        conn.read_body(&mut body).await?;
        received.push(body);
    }
    send.await??;
    Ok(received)
}

fn show(bytes: &[u8]) -> String {
    if bytes.len() > 40 {
        format!("{} bytes (not shown)", bytes.len())
    } else {
        format!("{:?}", String::from_utf8_lossy(bytes))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    println!("Raw TCP: send(\"hello\"), send(\"feng\"), then recv(10) twice:");
    let reads = raw_exchange(&[b"hello", b"feng"], &[10, 10]).await?;
    for (i, read) in reads.iter().enumerate() {
        println!("  recv {}: {}", i + 1, show(read));
    }
    if reads[0] == b"hellofeng" {
        println!("  -> two messages came out of one recv: they stuck together.\n");
    } else {
        println!("  -> this time the reads happened to match the sends; nothing guarantees it.\n");
    }

    println!("Raw TCP: send(\"hello feng\"), then recv(2) and recv(10):");
    let reads = raw_exchange(&[b"hello feng"], &[2, 10]).await?;
    for (i, read) in reads.iter().enumerate() {
        println!("  recv {}: {}", i + 1, show(read));
    }
    println!("  -> one message was split over two recv calls.\n");

    let messages: Vec<Vec<u8>> = vec![
        b"hello".to_vec(),
        b"feng".to_vec(),
        "alex正在吃".as_bytes().to_vec(),
        "翔".as_bytes().to_vec(),
        Vec::new(),
        vec![b'x'; 1 << 20],
    ];
    println!("netdisk frames (4-byte length + JSON header + body), sent back to back:");
    let received = framed_exchange(&messages).await?;
    for (i, message) in received.iter().enumerate() {
        println!("  message {}: {}", i + 1, show(message));
    }
    anyhow::ensure!(
        received == messages,
        "the framed messages did not arrive intact"
    );
    println!(
        "  -> all {} messages arrived whole and in order.",
        received.len()
    );
    Ok(())
}
