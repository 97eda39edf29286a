//! The byte-by-byte example of docs/PROTOCOL.md, replayed against a real server: the
//! document and the code cannot drift apart.

mod common;

use common::*;
use netdisk::scram::MIN_ITERATIONS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

enum Step {
    /// Bytes the client sends.
    Send(Vec<u8>),
    /// The reply header the server must send, as JSON.
    Expect(serde_json::Value),
}

/// The exchange from the document, with its fake token replaced by a real one.
fn documented_exchange(token: &str) -> Vec<Step> {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/PROTOCOL.md")).unwrap();
    let section = doc
        .split("## A whole exchange, byte by byte")
        .nth(1)
        .unwrap();
    let block = section.split("```").nth(1).unwrap();
    let mut steps = Vec::new();
    for line in block.lines().filter(|l| !l.trim().is_empty()) {
        let (direction, rest) = line.split_at(line.find("  ").unwrap());
        let rest = rest.trim_start();
        if rest == "hello" {
            steps.push(Step::Send(b"hello".to_vec()));
            continue;
        }
        if rest.starts_with("(32 raw bytes") {
            steps.push(Step::Send(blake3::hash(b"hello").as_bytes().to_vec()));
            continue;
        }
        let (prefix, json) = rest.split_at(rest.find('{').unwrap());
        let announced: Vec<u8> = prefix
            .split_whitespace()
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect();
        assert_eq!(
            announced,
            (json.len() as u32).to_le_bytes(),
            "length prefix of {json}"
        );
        let mut value: serde_json::Value = serde_json::from_str(json).unwrap();
        if value.get("token").is_some() {
            value["token"] = serde_json::Value::String(token.to_string());
        }
        if direction.starts_with('C') {
            let json = serde_json::to_vec(&value).unwrap();
            let mut frame = (json.len() as u32).to_le_bytes().to_vec();
            frame.extend(json);
            steps.push(Step::Send(frame));
        } else {
            steps.push(Step::Expect(value));
        }
    }
    steps
}

#[tokio::test]
async fn the_documented_exchange_works_byte_for_byte() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    client
        .register("carol", PASSWORD, MIN_ITERATIONS)
        .await
        .unwrap();
    let token = client.login("carol", PASSWORD).await.unwrap();
    drop(client);

    let mut socket = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let steps = documented_exchange(&token);
    assert!(steps.len() >= 14);
    for step in steps {
        match step {
            Step::Send(bytes) => socket.write_all(&bytes).await.unwrap(),
            Step::Expect(expected) => {
                let mut len = [0u8; 4];
                socket.read_exact(&mut len).await.unwrap();
                let mut json = vec![0u8; u32::from_le_bytes(len) as usize];
                socket.read_exact(&mut json).await.unwrap();
                let got: serde_json::Value = serde_json::from_slice(&json).unwrap();
                assert_eq!(got, expected);
            }
        }
    }
    assert_eq!(
        std::fs::read(server.user_file("carol", "hi.txt")).unwrap(),
        b"hello"
    );
}
