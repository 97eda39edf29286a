//! The connection check of the tutorials (HMAC over a random challenge): before anything
//! else, a server configured with a shared secret sends 32 random bytes and the client must
//! answer HMAC-SHA256(secret, challenge). A wrong, late or missing answer closes the
//! connection with no other reply. It proves the client holds the secret file; it is not
//! a login (that is SCRAM) and does not encrypt.

use std::path::Path;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::error::{Error, Result};
use crate::protocol::{parse_reply, Connection};

/// Secrets shorter than this are refused: they could be guessed.
pub const MIN_SECRET_LEN: usize = 16;

#[derive(Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
enum CheckMessage {
    /// Server to client: prove you hold the secret.
    Challenge { nonce: String },
    /// Client to server: hex HMAC-SHA256(secret, nonce bytes).
    ChallengeResponse { hmac: String },
}

/// Read a secret file (its bytes, surrounding whitespace trimmed).
pub fn load_secret(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::Invalid(format!("cannot read secret file {}: {e}", path.display())))?;
    let secret = bytes.trim_ascii().to_vec();
    if secret.len() < MIN_SECRET_LEN {
        return Err(Error::Invalid(format!(
            "secret file {} holds fewer than {MIN_SECRET_LEN} bytes",
            path.display()
        )));
    }
    Ok(secret)
}

fn answer(secret: &[u8], nonce: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(nonce);
    mac.finalize().into_bytes().into()
}

/// Server side: challenge the client and check its answer within `timeout`.
pub async fn challenge_client(
    conn: &mut Connection,
    secret: &[u8],
    timeout: Duration,
) -> Result<()> {
    let mut nonce = [0u8; 32];
    getrandom::fill(&mut nonce).map_err(|e| Error::Invalid(e.to_string()))?;
    conn.write_header(&CheckMessage::Challenge {
        nonce: hex::encode(nonce),
    })
    .await?;
    conn.flush().await?;
    let header = tokio::time::timeout(timeout, conn.read_header())
        .await
        .map_err(|_| Error::Protocol("no answer to the connection check".into()))??
        .ok_or(Error::ConnectionClosed)?;
    let response: CheckMessage = serde_json::from_value(serde_json::Value::Object(header))
        .map_err(|_| Error::Protocol("bad answer to the connection check".into()))?;
    let CheckMessage::ChallengeResponse { hmac } = response else {
        return Err(Error::Protocol("bad answer to the connection check".into()));
    };
    let given = hex::decode(hmac).unwrap_or_default();
    if bool::from(given.ct_eq(&answer(secret, &nonce))) {
        Ok(())
    } else {
        Err(Error::Protocol(
            "wrong answer to the connection check".into(),
        ))
    }
}

/// Client side: answer the server's challenge.
pub async fn answer_challenge(conn: &mut Connection, secret: &[u8]) -> Result<()> {
    let header = conn.read_header().await?.ok_or(Error::ConnectionClosed)?;
    if header.get("ok").is_some() {
        // An error reply instead of a challenge (e.g. the server is full).
        parse_reply::<serde_json::Value>(header)?;
        return Err(Error::Protocol(
            "expected a connection check challenge".into(),
        ));
    }
    let message: CheckMessage = serde_json::from_value(serde_json::Value::Object(header))
        .map_err(|_| Error::Protocol("expected a connection check challenge".into()))?;
    let CheckMessage::Challenge { nonce } = message else {
        return Err(Error::Protocol(
            "expected a connection check challenge".into(),
        ));
    };
    let nonce = hex::decode(nonce).map_err(|_| Error::Protocol("bad challenge".into()))?;
    conn.write_header(&CheckMessage::ChallengeResponse {
        hmac: hex::encode(answer(secret, &nonce)),
    })
    .await?;
    conn.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn check(server_secret: &'static [u8], client_secret: &'static [u8]) -> Result<()> {
        let (a, b) = tokio::io::duplex(4096);
        let client = tokio::spawn(async move {
            let mut conn = Connection::new(a);
            let _ = answer_challenge(&mut conn, client_secret).await;
        });
        let mut conn = Connection::new(b);
        let result = challenge_client(&mut conn, server_secret, Duration::from_secs(5)).await;
        client.await.unwrap();
        result
    }

    #[tokio::test]
    async fn right_secret_passes_wrong_secret_fails() {
        check(b"0123456789abcdef", b"0123456789abcdef")
            .await
            .unwrap();
        assert!(check(b"0123456789abcdef", b"0123456789abcdeX")
            .await
            .is_err());
    }

    #[tokio::test]
    async fn silent_client_times_out() {
        let (_a, b) = tokio::io::duplex(4096);
        let mut conn = Connection::new(b);
        let result =
            challenge_client(&mut conn, b"0123456789abcdef", Duration::from_millis(50)).await;
        assert!(matches!(result, Err(Error::Protocol(_))));
    }
}
