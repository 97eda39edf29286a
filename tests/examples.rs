//! Runs every example on loopback through the functions its `main` is built on.
//!
//! Each example file is compiled in here as a module; its `main` and command-line types
//! are not used by the tests, hence the `dead_code` allowances.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use netdisk::protocol::{Connection, Done};
use netdisk::{Error, ErrorCode};
use tokio::net::{TcpListener, UdpSocket};

#[allow(dead_code)]
#[path = "../examples/sticky_packets.rs"]
mod sticky_packets;

#[allow(dead_code)]
#[path = "../examples/remote_cmd.rs"]
mod remote_cmd;

#[allow(dead_code)]
#[path = "../examples/udp_time.rs"]
mod udp_time;

#[allow(dead_code)]
#[path = "../examples/udp_chat.rs"]
mod udp_chat;

#[allow(dead_code)]
#[path = "../examples/message_and_file.rs"]
mod message_and_file;

/// A guard against a hung test, not a timing assertion.
const HANG: Duration = Duration::from_secs(60);

async fn bounded<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(HANG, future)
        .await
        .expect("the exchange did not finish")
}

// ---------------------------------------------------------------- sticky_packets

#[tokio::test]
async fn sticky_packets_framed_messages_arrive_intact_and_in_order() {
    let messages: Vec<Vec<u8>> = vec![
        b"hello".to_vec(),
        b"feng".to_vec(),
        "alex正在吃".as_bytes().to_vec(),
        Vec::new(),
        (0..3_000_000u32).map(|i| (i % 251) as u8).collect(),
        b"last".to_vec(),
    ];
    let received = bounded(sticky_packets::framed_exchange(&messages))
        .await
        .unwrap();
    assert_eq!(received.len(), messages.len());
    for (got, sent) in received.iter().zip(&messages) {
        assert!(got == sent, "a message of {} bytes changed", sent.len());
    }
}

#[tokio::test]
async fn sticky_packets_raw_reads_ignore_message_boundaries() {
    // Whatever the reads return, they are pieces of one byte stream.
    let reads = bounded(sticky_packets::raw_exchange(
        &[b"hello", b"feng"],
        &[10, 10],
    ))
    .await
    .unwrap();
    assert_eq!(reads.concat(), b"hellofeng");
    // A 2-byte read cannot hold a 10-byte message: it is split.
    let reads = bounded(sticky_packets::raw_exchange(&[b"hello feng"], &[2, 10]))
        .await
        .unwrap();
    assert!(!reads[0].is_empty() && reads[0].len() <= 2);
    assert!(b"hello feng".starts_with(&reads.concat()));
}

// ---------------------------------------------------------------- remote_cmd

const SECRET: &str = "an example secret of more than sixteen bytes";

fn write_secret(dir: &Path, secret: &str) -> std::path::PathBuf {
    let path = dir.join("secret");
    std::fs::write(&path, secret).unwrap();
    path
}

async fn start_remote_cmd(secret_file: &Path, limits: remote_cmd::Limits) -> String {
    let server = remote_cmd::Server::bind("127.0.0.1:0", secret_file, limits)
        .await
        .unwrap();
    let addr = server.local_addr().unwrap().to_string();
    tokio::spawn(server.run());
    addr
}

#[tokio::test]
async fn remote_cmd_runs_commands_with_exit_code_and_cap() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = write_secret(dir.path(), SECRET);
    let limits = remote_cmd::Limits {
        timeout: Duration::from_secs(20),
        max_output: 4096,
    };
    let addr = start_remote_cmd(&secret_file, limits).await;
    let mut client = remote_cmd::Client::connect(&addr, SECRET.as_bytes())
        .await
        .unwrap();

    let out = bounded(client.run("echo hi")).await.unwrap();
    assert_eq!(out.stdout, b"hi\n");
    assert_eq!(out.stderr, b"");
    assert_eq!(out.exit_code, Some(0));
    assert!(!out.timed_out && !out.truncated);

    let out = bounded(client.run("ls /no/such/dir; echo to-stdout; exit 3"))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"to-stdout\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/dir"));
    assert_eq!(out.exit_code, Some(3));

    // Well over the cap on both streams: each is cut at 4096 bytes.
    let out = bounded(client.run("yes | head -c 100000; yes e | head -c 9000 >&2"))
        .await
        .unwrap();
    assert!(out.truncated);
    assert_eq!(out.stdout.len(), 4096);
    assert!(out.stdout.starts_with(b"y\ny\n"));
    assert_eq!(out.stderr.len(), 4096);
    assert_eq!(out.exit_code, Some(0));
}

#[tokio::test]
async fn remote_cmd_timeout_kills_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = write_secret(dir.path(), SECRET);
    let limits = remote_cmd::Limits {
        timeout: Duration::from_millis(300),
        max_output: 4096,
    };
    let addr = start_remote_cmd(&secret_file, limits).await;
    let mut client = remote_cmd::Client::connect(&addr, SECRET.as_bytes())
        .await
        .unwrap();
    // The shell stays in front of `sleep`, which holds the output pipe: only killing the
    // whole process group ends the command.
    let out = bounded(client.run("echo started; sleep 30; echo never"))
        .await
        .unwrap();
    assert!(out.timed_out);
    assert_eq!(out.exit_code, None);
    assert_eq!(out.stdout, b"started\n");
}

#[tokio::test]
async fn remote_cmd_wrong_secret_gets_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = write_secret(dir.path(), SECRET);
    let limits = remote_cmd::Limits {
        timeout: Duration::from_secs(20),
        max_output: 4096,
    };
    let addr = start_remote_cmd(&secret_file, limits).await;
    let wrong = b"a wrong secret, also long enough";

    // Answer the challenge wrongly and wait: the server closes without a word.
    let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut conn = Connection::new(stream);
    netdisk::conncheck::answer_challenge(&mut conn, wrong)
        .await
        .unwrap();
    let next = bounded(conn.read_header()).await;
    assert!(
        matches!(next, Ok(None) | Err(Error::Io(_))),
        "expected the connection to close, got {next:?}"
    );

    // Through the example's client, the command gets no output, only an error.
    let mut client = remote_cmd::Client::connect(&addr, wrong).await.unwrap();
    assert!(bounded(client.run("echo hi")).await.is_err());
}

#[tokio::test]
async fn remote_cmd_refuses_to_start_without_a_secret_file() {
    let dir = tempfile::tempdir().unwrap();
    let limits = remote_cmd::Limits {
        timeout: Duration::from_secs(1),
        max_output: 1,
    };
    let missing = dir.path().join("missing");
    let err = remote_cmd::Server::bind("127.0.0.1:0", &missing, limits)
        .await
        .err()
        .expect("started without a secret file");
    assert!(format!("{err:#}").contains("secret"), "{err:#}");

    let short = write_secret(dir.path(), "short");
    assert!(remote_cmd::Server::bind("127.0.0.1:0", &short, limits)
        .await
        .is_err());
}

// ---------------------------------------------------------------- udp_time

async fn start_udp_time() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(udp_time::serve(socket, time::UtcOffset::UTC));
    addr
}

#[tokio::test]
async fn udp_time_default_and_custom_formats() {
    let addr = start_udp_time().await;

    let time = bounded(udp_time::request(addr, "")).await.unwrap();
    let shape: String = time
        .chars()
        .map(|c| if c.is_ascii_digit() { 'd' } else { c })
        .collect();
    assert_eq!(shape, "dddd-dd-dd dd:dd:dd", "{time}");

    let time = bounded(udp_time::request(addr, "year %Y, day %j %%"))
        .await
        .unwrap();
    let rest = time.strip_prefix("year ").expect(&time);
    assert!(rest.ends_with(" %"), "{time}");
    assert!(rest[..4].bytes().all(|b| b.is_ascii_digit()), "{time}");
}

#[tokio::test]
async fn udp_time_invalid_format_gets_an_error_reply() {
    let addr = start_udp_time().await;
    let err = bounded(udp_time::request(addr, "%Y %Q")).await.unwrap_err();
    let err = err.downcast::<Error>().expect("a netdisk error");
    assert_eq!(err.code(), Some(ErrorCode::BadRequest));
    assert!(err.to_string().contains("%Q"), "{err}");
    let err = bounded(udp_time::request(addr, "50%")).await.unwrap_err();
    assert!(err.to_string().contains("lone %"), "{err}");
    // The server is still there.
    assert!(bounded(udp_time::request(addr, "%H")).await.is_ok());
}

#[test]
fn udp_time_formats_like_strftime() {
    let t = time::macros::datetime!(2024-03-05 14:07:09 +08:00);
    let cases = [
        ("%Y-%m-%d %X", "2024-03-05 14:07:09"),
        ("%x", "03/05/24"),
        ("%y %j", "24 065"),
        ("%a %A %b %B", "Tue Tuesday Mar March"),
        ("%I:%M %p", "02:07 PM"),
        ("%c", "Tue Mar  5 14:07:09 2024"),
        ("%w %z %%", "2 +0800 %"),
        ("plain", "plain"),
    ];
    for (format, expected) in cases {
        assert_eq!(udp_time::strftime(format, t).unwrap(), expected, "{format}");
    }
    let midnight = time::macros::datetime!(1999-12-31 00:00:00 -05:30);
    assert_eq!(
        udp_time::strftime("%I %p %z %j", midnight).unwrap(),
        "12 AM -0530 365"
    );
    assert!(udp_time::strftime("%Q", t).is_err());
}

// ---------------------------------------------------------------- udp_chat

#[tokio::test]
async fn udp_chat_messages_reach_the_server_and_replies_come_back() {
    let server = udp_chat::ChatServer::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    let alice = udp_chat::ChatClient::connect(addr, "alice").await.unwrap();
    let bob = udp_chat::ChatClient::connect(addr, "bob").await.unwrap();

    alice.send("你好, server").await.unwrap();
    let (alice_addr, message) = bounded(server.recv()).await.unwrap();
    assert_eq!(message.from, "alice");
    assert_eq!(message.text, "你好, server");

    bob.send("hi from bob").await.unwrap();
    let (bob_addr, message) = bounded(server.recv()).await.unwrap();
    assert_eq!(message.from, "bob");
    assert_eq!(message.text, "hi from bob");
    assert_ne!(alice_addr, bob_addr);

    server.reply(bob_addr, "hello bob").await.unwrap();
    server.reply(alice_addr, "hello alice").await.unwrap();
    let reply = bounded(alice.recv()).await.unwrap();
    assert_eq!(
        (reply.from.as_str(), reply.text.as_str()),
        ("server", "hello alice")
    );
    let reply = bounded(bob.recv()).await.unwrap();
    assert_eq!(
        (reply.from.as_str(), reply.text.as_str()),
        ("server", "hello bob")
    );
}

#[tokio::test]
async fn udp_chat_refuses_oversize_messages_before_sending() {
    let server = udp_chat::ChatServer::bind("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let addr = server.local_addr().unwrap();
    let alice = udp_chat::ChatClient::connect(addr, "alice").await.unwrap();

    let err = alice.send(&"x".repeat(70_000)).await.unwrap_err();
    assert!(matches!(err, Error::Invalid(_)), "{err:?}");
    assert!(err.to_string().contains("65507"), "{err}");
    // JSON escaping counts: 20000 newlines take 40000 bytes once encoded.
    assert!(alice.send(&"\n".repeat(40_000)).await.is_err());

    // A message just under the limit goes through, and it is the first the server sees:
    // the refused ones were never sent.
    let fits = "y".repeat(udp_chat::MAX_DATAGRAM - 100);
    alice.send(&fits).await.unwrap();
    let (_, message) = bounded(server.recv()).await.unwrap();
    assert_eq!(message.text, fits);
}

#[test]
fn udp_chat_hides_control_characters() {
    assert_eq!(udp_chat::printable("a\x1b[2Jb\n"), "a\u{fffd}[2Jb\u{fffd}");
}

// ---------------------------------------------------------------- message_and_file

#[tokio::test]
async fn message_and_file_messages_files_bad_names_and_quit() {
    use message_and_file::{Client, Event, Input};

    let root = tempfile::tempdir().unwrap();
    let store = root.path().join("store");
    std::fs::create_dir(&store).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (events, mut seen) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(message_and_file::serve(listener, store.clone(), events));

    let mut client = Client::connect(&addr).await.unwrap();
    let line = "msg|你好呀 | with a bar";
    let Ok(Input::Message(text)) = message_and_file::parse_line(line) else {
        panic!("{line} is a message");
    };
    bounded(client.send_message(text)).await.unwrap();
    match bounded(seen.recv()).await.unwrap() {
        Event::Message { text, .. } => assert_eq!(text, "你好呀 | with a bar"),
        other => panic!("expected a message, got {other:?}"),
    }

    // A file several buffers long, stored byte for byte.
    let source = root.path().join("photo.bin");
    let content: Vec<u8> = (0..1_500_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(&source, &content).unwrap();
    let line = format!("file|{}", source.display());
    let Ok(Input::File(path)) = message_and_file::parse_line(&line) else {
        panic!("{line} is a file");
    };
    let size = bounded(client.send_file(path)).await.unwrap();
    assert_eq!(size, content.len() as u64);
    match bounded(seen.recv()).await.unwrap() {
        Event::File {
            name, size: got, ..
        } => assert_eq!((name.as_str(), got), ("photo.bin", size)),
        other => panic!("expected a file, got {other:?}"),
    }
    assert!(std::fs::read(store.join("photo.bin")).unwrap() == content);
    // The client refuses a path without a file name before sending anything.
    assert!(matches!(
        client.send_file(Path::new("/")).await,
        Err(Error::Invalid(_))
    ));

    // A client that does not check names: the server refuses `../x`, skips its body and
    // stays in step for the next request.
    let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut raw = Connection::new(stream);
    let header = serde_json::json!({"cmd": "file", "filename": "../x", "filesize": 3});
    raw.write_header(&header).await.unwrap();
    raw.write_body(b"abc").await.unwrap();
    raw.flush().await.unwrap();
    let err = bounded(raw.read_reply::<Done>()).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::BadName), "{err}");
    assert!(matches!(
        bounded(seen.recv()).await.unwrap(),
        Event::Refused { .. }
    ));
    raw.write_header(&serde_json::json!({"cmd": "msg", "filesize": 2}))
        .await
        .unwrap();
    raw.write_body(b"ok").await.unwrap();
    raw.flush().await.unwrap();
    bounded(raw.read_reply::<Done>()).await.unwrap();
    assert!(
        matches!(bounded(seen.recv()).await.unwrap(), Event::Message { text, .. } if text == "ok")
    );
    assert!(!root.path().join("x").exists());
    let stored: Vec<_> = std::fs::read_dir(&store)
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert_eq!(stored, ["photo.bin"], "only the file, no leftovers");

    // `q` closes the connection: the server sees the goodbye.
    assert_eq!(message_and_file::parse_line("q"), Ok(Input::Quit));
    assert_eq!(message_and_file::parse_line("Q\n"), Ok(Input::Quit));
    assert_eq!(message_and_file::parse_line(""), Ok(Input::Nothing));
    assert!(message_and_file::parse_line("hello").is_err());
    bounded(client.close()).await.unwrap();
    assert!(matches!(
        bounded(seen.recv()).await.unwrap(),
        Event::Closed { .. }
    ));
}
