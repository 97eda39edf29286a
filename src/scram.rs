//! SCRAM-SHA-256 (RFC 5802, RFC 7677) without channel binding.
//!
//! The password never leaves the client: registration sends a [`Verifier`], and
//! login proves knowledge of the password without revealing it. The messages are
//! the exact RFC strings; our JSON frames only carry them.
//!
//! Passwords are SASLprep'd (RFC 4013, as RFC 5802 section 2.2 asks) before key
//! derivation, so the same password typed as NFC or NFD, or with invisible soft hyphens,
//! derives the same keys. ASCII passwords without control characters are unchanged.
//!
//! Deliberate simplifications: no channel binding (gs2 header `n,,`, `c=biws`),
//! no authzid, no extensions.

use std::borrow::Cow;
use std::fmt;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// OWASP 2023 recommendation for PBKDF2-HMAC-SHA256; the client pays it at login/register.
pub const DEFAULT_ITERATIONS: u32 = 600_000;
/// RFC 7677 minimum; the server refuses verifiers below it.
pub const MIN_ITERATIONS: u32 = 4096;
/// Length of the random salt in a fresh [`Verifier`].
pub const SALT_LEN: usize = 16;

/// Without channel binding the gs2 header is fixed, and `c=` carries its base64.
const GS2_HEADER: &str = "n,,";
const CHANNEL_BINDING: &str = "biws";
/// 18 random bytes = 144 bits, 24 base64 characters.
const NONCE_BYTES: usize = 18;

/// What the server stores per user: enough to check a proof, not enough to log in.
#[derive(Clone, PartialEq, Eq)]
pub struct Verifier {
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

/// Keys are redacted so a stray `{:?}` in a log line cannot leak them.
impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("salt", &B64.encode(&self.salt))
            .field("iterations", &self.iterations)
            .field("stored_key", &"<redacted>")
            .field("server_key", &"<redacted>")
            .finish()
    }
}

impl Verifier {
    /// What registration sends (never the password): derive from password with a fresh random salt.
    /// A password SASLprep refuses is an error ([`ScramError::BadPassword`]).
    pub fn try_new(password: &str, iterations: u32) -> Result<Verifier, ScramError> {
        let mut salt = [0u8; SALT_LEN];
        getrandom::fill(&mut salt).map_err(ScramError::Random)?;
        Verifier::try_with_salt(password, &salt, iterations)
    }

    /// Deterministic derivation, for tests and for re-deriving with a known salt.
    pub fn try_with_salt(
        password: &str,
        salt: &[u8],
        iterations: u32,
    ) -> Result<Verifier, ScramError> {
        let password = prepare_password(password)?;
        Ok(Verifier::from_prepared(&password, salt, iterations))
    }

    /// [`Verifier::try_new`] for callers that cannot handle an error; prefer `try_new`.
    ///
    /// A password SASLprep refuses falls back to its raw UTF-8 bytes (the behaviour before
    /// SASLprep) instead of panicking on user input. Such a verifier cannot be logged into
    /// with [`ClientFirst::handle_server_first`], which refuses the same password with a clear
    /// error, so registration code should call `try_new` to report it up front.
    ///
    /// Panics only if the operating system cannot provide random numbers.
    pub fn new(password: &str, iterations: u32) -> Verifier {
        let mut salt = [0u8; SALT_LEN];
        getrandom::fill(&mut salt).expect("operating system random number generator failed");
        Verifier::with_salt(password, &salt, iterations)
    }

    /// [`Verifier::try_with_salt`] without the error; same fallback as [`Verifier::new`].
    pub fn with_salt(password: &str, salt: &[u8], iterations: u32) -> Verifier {
        let password = prepare_password(password)
            .map(Cow::Owned)
            .unwrap_or(Cow::Borrowed(password));
        Verifier::from_prepared(&password, salt, iterations)
    }

    fn from_prepared(prepared_password: &str, salt: &[u8], iterations: u32) -> Verifier {
        let keys = Keys::derive(prepared_password, salt, iterations);
        Verifier {
            salt: salt.to_vec(),
            iterations,
            stored_key: keys.stored_key,
            server_key: keys.server_key,
        }
    }
}

/// SASLprep (RFC 4013) `password`: what key derivation must use, so that equivalent
/// spellings of one password give the same keys. Refuses control, private-use and other
/// prohibited characters, code points unassigned in Unicode 3.2 (which includes most emoji),
/// and mixed right-to-left/left-to-right text, with a message saying which.
pub fn prepare_password(password: &str) -> Result<String, ScramError> {
    match stringprep::saslprep(password) {
        Ok(prepared) => Ok(prepared.into_owned()),
        Err(_) => Err(ScramError::BadPassword(saslprep_refusal(password))),
    }
}

/// Why SASLprep refused `password`. Names the offending character by code point only, so
/// a control character in the message cannot garble a terminal.
fn saslprep_refusal(password: &str) -> String {
    // A character refused on its own is prohibited or unassigned; if every character passes
    // alone, only the whole-string bidirectional rule can have failed.
    match password
        .chars()
        .find(|c| stringprep::saslprep(c.encode_utf8(&mut [0; 4])).is_err())
    {
        Some(c) => format!(
            "the password contains U+{:04X}, which SASLprep (RFC 4013) does not allow \
             (control, private-use, or unassigned in Unicode 3.2, as most emoji are); \
             choose another password",
            c as u32
        ),
        None => "the password mixes right-to-left and left-to-right text in a way \
                 SASLprep (RFC 4013) does not allow; choose another password"
            .to_string(),
    }
}

/// Everything that can go wrong during an exchange.
#[derive(Debug, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("user name is empty or contains ',' or '='")]
    InvalidUser,
    #[error("server nonce does not extend the client nonce")]
    NonceMismatch,
    #[error("iteration count {0} is below the minimum of {MIN_ITERATIONS}")]
    TooFewIterations(u32),
    /// Wrong password, unknown user, or tampered messages: deliberately indistinguishable.
    #[error("authentication failed")]
    InvalidProof,
    /// The server does not hold our verifier: it may be an impostor.
    #[error("server signature mismatch: the server could not prove it knows the verifier")]
    ServerSignatureMismatch,
    /// The server answered the final message with `e=...`.
    #[error("server rejected authentication: {0}")]
    ServerError(String),
    #[error("no random numbers available: {0}")]
    Random(getrandom::Error),
    /// The password is refused by SASLprep; the message says why.
    #[error("{0}")]
    BadPassword(String),
}

/// Client side, before the server has answered.
#[derive(Debug)]
pub struct ClientFirst {
    nonce: String,
    bare: String,
}

impl ClientFirst {
    /// Start a login with a fresh random nonce.
    pub fn new(user: &str) -> Result<ClientFirst, ScramError> {
        ClientFirst::with_nonce(user, &random_nonce()?)
    }

    /// Start a login with a given nonce (for test vectors).
    pub fn with_nonce(user: &str, nonce: &str) -> Result<ClientFirst, ScramError> {
        check_user(user)?;
        check_nonce(nonce)?;
        Ok(ClientFirst {
            nonce: nonce.to_string(),
            bare: format!("n={user},r={nonce}"),
        })
    }

    /// The client-first message: `n,,n=user,r=nonce`.
    pub fn message(&self) -> String {
        format!("{GS2_HEADER}{}", self.bare)
    }

    /// Parse server-first (`r=...,s=...,i=...`), check the nonce prefix and the
    /// iteration count, then run PBKDF2 (the expensive part).
    pub fn handle_server_first(
        self,
        server_first: &str,
        password: &str,
    ) -> Result<ClientFinal, ScramError> {
        let [r, s, i] = split_exact(server_first)?;
        let nonce = attr(r, "r=")?;
        let salt = decode_b64(attr(s, "s=")?)?;
        let iterations = parse_iterations(attr(i, "i=")?)?;
        check_nonce(nonce)?;
        // The server must append its own part, otherwise it could replay an old exchange.
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(ScramError::NonceMismatch);
        }
        if salt.is_empty() {
            return Err(ScramError::Malformed("empty salt"));
        }
        if iterations < MIN_ITERATIONS {
            return Err(ScramError::TooFewIterations(iterations));
        }

        let keys = Keys::derive(&prepare_password(password)?, &salt, iterations);
        let without_proof = format!("c={CHANNEL_BINDING},r={nonce}");
        let auth_message = format!("{},{server_first},{without_proof}", self.bare);
        let client_signature = hmac(&keys.stored_key, auth_message.as_bytes());
        let proof = xor(&keys.client_key, &client_signature);
        Ok(ClientFinal {
            message: format!("{without_proof},p={}", B64.encode(proof)),
            server_signature: hmac(&keys.server_key, auth_message.as_bytes()),
        })
    }
}

/// Client side, after the proof has been computed.
#[derive(Debug)]
pub struct ClientFinal {
    message: String,
    server_signature: [u8; 32],
}

impl ClientFinal {
    /// The client-final message: `c=biws,r=...,p=...`.
    pub fn message(&self) -> String {
        self.message.clone()
    }

    /// Check server-final `v=...` in constant time; `e=...` becomes an error.
    pub fn verify_server_final(&self, server_final: &str) -> Result<(), ScramError> {
        if let Some(error) = server_final.strip_prefix("e=") {
            return Err(ScramError::ServerError(error.to_string()));
        }
        let signature = decode_b64(attr(server_final, "v=")?)?;
        if bool::from(signature.ct_eq(&self.server_signature)) {
            Ok(())
        } else {
            Err(ScramError::ServerSignatureMismatch)
        }
    }
}

/// Server side, after answering client-first.
#[derive(Debug)]
pub struct ServerFirst {
    verifier: Verifier,
    nonce: String,
    client_first_bare: String,
    message: String,
}

impl ServerFirst {
    /// Parse client-first and return the user name it claims, so the caller can
    /// look up the verifier without committing to anything.
    pub fn parse_user(client_first: &str) -> Result<String, ScramError> {
        let (user, _) = parse_client_first(client_first)?;
        Ok(user.to_string())
    }

    /// `verifier` is the real one, or for an unknown user [`fake_verifier`], so the
    /// answer looks the same either way.
    pub fn new(client_first: &str, verifier: Verifier) -> Result<ServerFirst, ScramError> {
        ServerFirst::with_nonce(client_first, verifier, &random_nonce()?)
    }

    /// Like [`ServerFirst::new`] with a given server nonce (for test vectors).
    pub fn with_nonce(
        client_first: &str,
        verifier: Verifier,
        server_nonce: &str,
    ) -> Result<ServerFirst, ScramError> {
        let (_, client_nonce) = parse_client_first(client_first)?;
        check_nonce(server_nonce)?;
        let nonce = format!("{client_nonce}{server_nonce}");
        let message = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        Ok(ServerFirst {
            verifier,
            nonce,
            client_first_bare: client_first[GS2_HEADER.len()..].to_string(),
            message,
        })
    }

    /// The server-first message: `r=...,s=base64salt,i=N`.
    pub fn message(&self) -> String {
        self.message.clone()
    }

    /// Verify the client-final proof in constant time; on success return server-final `v=...`.
    pub fn handle_client_final(self, client_final: &str) -> Result<String, ScramError> {
        let [c, r, p] = split_exact(client_final)?;
        if attr(c, "c=")? != CHANNEL_BINDING {
            return Err(ScramError::Malformed("channel binding is not supported"));
        }
        if attr(r, "r=")? != self.nonce {
            return Err(ScramError::NonceMismatch);
        }
        let proof: [u8; 32] = decode_b64(attr(p, "p=")?)?
            .try_into()
            .map_err(|_| ScramError::Malformed("proof must be 32 bytes"))?;

        let without_proof = &client_final[..c.len() + 1 + r.len()];
        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.message
        );
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let client_key = xor(&proof, &client_signature);
        if bool::from(sha256(&client_key).ct_eq(&self.verifier.stored_key)) {
            let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
            Ok(format!("v={}", B64.encode(server_signature)))
        } else {
            Err(ScramError::InvalidProof)
        }
    }
}

/// Deterministic fake verifier for unknown users, so probing cannot tell them
/// from known ones: the same name always gets the same salt and iteration count,
/// and the keys come from the server secret, so no password matches in practice.
pub fn fake_verifier(server_secret: &[u8], user: &str) -> Verifier {
    let salt = hmac(server_secret, format!("fake-salt:{user}").as_bytes());
    let key = hmac(server_secret, format!("fake-key:{user}").as_bytes());
    Verifier {
        salt: salt[..SALT_LEN].to_vec(),
        iterations: DEFAULT_ITERATIONS,
        stored_key: sha256(&key),
        server_key: hmac(&key, b"Server Key"),
    }
}

/// The RFC 5802 key schedule for one password.
struct Keys {
    client_key: [u8; 32],
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl Keys {
    /// `prepared_password` must already be SASLprep'd.
    fn derive(prepared_password: &str, salt: &[u8], iterations: u32) -> Keys {
        let salted =
            pbkdf2::pbkdf2_hmac_array::<Sha256, 32>(prepared_password.as_bytes(), salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        Keys {
            client_key,
            stored_key: sha256(&client_key),
            server_key: hmac(&salted, b"Server Key"),
        }
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn xor(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    std::array::from_fn(|i| a[i] ^ b[i])
}

fn random_nonce() -> Result<String, ScramError> {
    let mut bytes = [0u8; NONCE_BYTES];
    getrandom::fill(&mut bytes).map_err(ScramError::Random)?;
    Ok(B64.encode(bytes))
}

/// Returns (user, client nonce) from `n,,n=user,r=nonce`.
fn parse_client_first(client_first: &str) -> Result<(&str, &str), ScramError> {
    let Some(bare) = client_first.strip_prefix(GS2_HEADER) else {
        return Err(ScramError::Malformed(
            "client-first must start with \"n,,\" (no channel binding, no authzid)",
        ));
    };
    let [n, r] = split_exact(bare)?;
    let user = attr(n, "n=")?;
    let nonce = attr(r, "r=")?;
    check_user(user)?;
    check_nonce(nonce)?;
    Ok((user, nonce))
}

/// Split on ',' into exactly N attributes; extensions are not supported.
fn split_exact<const N: usize>(message: &str) -> Result<[&str; N], ScramError> {
    let parts: Vec<&str> = message.split(',').collect();
    parts
        .try_into()
        .map_err(|_| ScramError::Malformed("unexpected number of attributes"))
}

fn attr<'a>(part: &'a str, prefix: &'static str) -> Result<&'a str, ScramError> {
    part.strip_prefix(prefix)
        .ok_or(ScramError::Malformed("missing or out-of-order attribute"))
}

fn decode_b64(value: &str) -> Result<Vec<u8>, ScramError> {
    B64.decode(value)
        .map_err(|_| ScramError::Malformed("invalid base64"))
}

fn parse_iterations(value: &str) -> Result<u32, ScramError> {
    // u32::from_str would also accept "+4096"; the grammar allows digits only.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ScramError::Malformed("iteration count is not a number"));
    }
    value
        .parse()
        .map_err(|_| ScramError::Malformed("iteration count out of range"))
}

/// Names are restricted elsewhere; here we only refuse what would need saslname escaping.
fn check_user(user: &str) -> Result<(), ScramError> {
    if user.is_empty() || user.contains([',', '=']) {
        return Err(ScramError::InvalidUser);
    }
    Ok(())
}

/// RFC 5802 `printable`: visible ASCII except ','.
fn check_nonce(nonce: &str) -> Result<(), ScramError> {
    let printable = |b: u8| (0x21..=0x7e).contains(&b) && b != b',';
    if nonce.is_empty() || !nonce.bytes().all(printable) {
        return Err(ScramError::Malformed(
            "nonce must be printable ASCII without ','",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 7677 section 3.
    const USER: &str = "user";
    const PASSWORD: &str = "pencil";
    const CLIENT_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
    const SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const SALT_B64: &str = "W22ZaJ0SNY7soEsUEjb6gQ==";
    const CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_verifier() -> Verifier {
        Verifier::with_salt(PASSWORD, &B64.decode(SALT_B64).unwrap(), 4096)
    }

    fn rfc_server() -> ServerFirst {
        ServerFirst::with_nonce(CLIENT_FIRST, rfc_verifier(), SERVER_NONCE).unwrap()
    }

    fn rfc_client_final(password: &str) -> ClientFinal {
        ClientFirst::with_nonce(USER, CLIENT_NONCE)
            .unwrap()
            .handle_server_first(SERVER_FIRST, password)
            .unwrap()
    }

    /// A full exchange with random nonces; returns the client's verdict.
    fn login(user: &str, password: &str, verifier: Verifier) -> Result<(), ScramError> {
        let client = ClientFirst::new(user)?;
        let server = ServerFirst::new(&client.message(), verifier)?;
        let client = client.handle_server_first(&server.message(), password)?;
        let server_final = server.handle_client_final(&client.message())?;
        client.verify_server_final(&server_final)
    }

    #[test]
    fn rfc7677_client_side() {
        let client = ClientFirst::with_nonce(USER, CLIENT_NONCE).unwrap();
        assert_eq!(client.message(), CLIENT_FIRST);
        let client = client.handle_server_first(SERVER_FIRST, PASSWORD).unwrap();
        assert_eq!(client.message(), CLIENT_FINAL);
        client.verify_server_final(SERVER_FINAL).unwrap();
    }

    #[test]
    fn rfc7677_server_side() {
        assert_eq!(ServerFirst::parse_user(CLIENT_FIRST).unwrap(), USER);
        let server = rfc_server();
        assert_eq!(server.message(), SERVER_FIRST);
        assert_eq!(
            server.handle_client_final(CLIENT_FINAL).unwrap(),
            SERVER_FINAL
        );
    }

    #[test]
    fn random_round_trip() {
        let verifier = Verifier::new("correct horse", MIN_ITERATIONS);
        assert_eq!(verifier.salt.len(), SALT_LEN);
        login("alice", "correct horse", verifier).unwrap();
    }

    #[test]
    fn fresh_salts_and_nonces_differ() {
        let a = Verifier::new("pw", MIN_ITERATIONS);
        let b = Verifier::new("pw", MIN_ITERATIONS);
        assert_ne!(a.salt, b.salt);
        assert_ne!(a.stored_key, b.stored_key);
        let n1 = ClientFirst::new("u").unwrap().message();
        let n2 = ClientFirst::new("u").unwrap().message();
        assert_ne!(n1, n2);
        assert!(n1.len() >= "n,,n=u,r=".len() + 24);
    }

    #[test]
    fn wrong_password_rejected() {
        let client = rfc_client_final("pencil2");
        assert!(matches!(
            rfc_server().handle_client_final(&client.message()),
            Err(ScramError::InvalidProof)
        ));
        let verifier = Verifier::new("right", MIN_ITERATIONS);
        assert!(matches!(
            login("bob", "wrong", verifier),
            Err(ScramError::InvalidProof)
        ));
    }

    #[test]
    fn tampered_nonce_rejected() {
        // Server side: client-final carrying a different nonce.
        let tampered = CLIENT_FINAL.replace("k0,p=", "k1,p=");
        assert!(matches!(
            rfc_server().handle_client_final(&tampered),
            Err(ScramError::NonceMismatch)
        ));
        // Client side: server nonce that does not extend ours, or adds nothing.
        for r in ["r=XOprNGfwEbeRWgbNEkqO%abc", "r=rOprNGfwEbeRWgbNEkqO"] {
            let server_first = format!("{r},s={SALT_B64},i=4096");
            let client = ClientFirst::with_nonce(USER, CLIENT_NONCE).unwrap();
            assert!(matches!(
                client.handle_server_first(&server_first, PASSWORD),
                Err(ScramError::NonceMismatch)
            ));
        }
    }

    #[test]
    fn tampered_proof_rejected() {
        let tampered = CLIENT_FINAL.replace("p=dHzb", "p=dHzc");
        assert!(matches!(
            rfc_server().handle_client_final(&tampered),
            Err(ScramError::InvalidProof)
        ));
    }

    #[test]
    fn tampered_server_signature_rejected() {
        let client = rfc_client_final(PASSWORD);
        let tampered = SERVER_FINAL.replace("v=6rri", "v=6rrj");
        assert!(matches!(
            client.verify_server_final(&tampered),
            Err(ScramError::ServerSignatureMismatch)
        ));
        assert!(matches!(
            client.verify_server_final("e=invalid-proof"),
            Err(ScramError::ServerError(e)) if e == "invalid-proof"
        ));
        // A server holding some other verifier cannot impersonate the real one.
        let impostor = ServerFirst::with_nonce(
            CLIENT_FIRST,
            Verifier::with_salt("other", &B64.decode(SALT_B64).unwrap(), 4096),
            SERVER_NONCE,
        )
        .unwrap();
        assert!(impostor.handle_client_final(&client.message()).is_err());
    }

    #[test]
    fn too_few_iterations_rejected() {
        let server_first = format!("r={CLIENT_NONCE}x,s={SALT_B64},i=4095");
        let client = ClientFirst::with_nonce(USER, CLIENT_NONCE).unwrap();
        assert!(matches!(
            client.handle_server_first(&server_first, PASSWORD),
            Err(ScramError::TooFewIterations(4095))
        ));
    }

    #[test]
    fn fake_verifier_is_deterministic_per_user() {
        let secret = b"server secret";
        let a = fake_verifier(secret, "ghost");
        assert_eq!(a, fake_verifier(secret, "ghost"));
        assert_eq!(a.salt.len(), SALT_LEN);
        assert_eq!(a.iterations, DEFAULT_ITERATIONS);
        let b = fake_verifier(secret, "phantom");
        assert_ne!(a.salt, b.salt);
        assert_ne!(a.stored_key, b.stored_key);
        assert_ne!(a, fake_verifier(b"other secret", "ghost"));
    }

    #[test]
    fn fake_verifier_rejects_any_password() {
        // Lower the cost so the test stays fast; the shape of the exchange is unchanged.
        let verifier = Verifier {
            iterations: MIN_ITERATIONS,
            ..fake_verifier(b"secret", "ghost")
        };
        for password in ["", "ghost", "secret", "password"] {
            assert!(matches!(
                login("ghost", password, verifier.clone()),
                Err(ScramError::InvalidProof)
            ));
        }
    }

    #[test]
    fn invalid_user_names_rejected() {
        for user in ["", "a,b", "a=b"] {
            assert!(matches!(
                ClientFirst::new(user),
                Err(ScramError::InvalidUser)
            ));
        }
        assert!(matches!(
            ServerFirst::parse_user("n,,n=a=2Cb,r=abc"),
            Err(ScramError::InvalidUser)
        ));
    }

    #[test]
    fn malformed_client_first_is_error() {
        for message in [
            "",
            "n,,",
            "n,",
            "y,,n=user,r=abc",
            "p=tls-unique,,n=user,r=abc",
            "n,a=admin,n=user,r=abc",
            "n,,r=abc,n=user",
            "n,,n=user",
            "n,,n=user,r=",
            "n,,n=user,r=abc,x=ext",
            "n,,m=ext,n=user,r=abc",
            "n,,n=user,r=ab\u{e9}",
            "n,,n=user,r=a b",
            "n,,\u{e9}",
        ] {
            assert!(ServerFirst::parse_user(message).is_err(), "{message:?}");
            assert!(
                ServerFirst::with_nonce(message, rfc_verifier(), "x").is_err(),
                "{message:?}"
            );
        }
    }

    #[test]
    fn malformed_server_first_is_error() {
        for message in [
            "",
            "r=rOprNGfwEbeRWgbNEkqOx",
            "r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==",
            "r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=",
            "r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=+4096",
            "r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=99999999999",
            "r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=-1",
            "r=rOprNGfwEbeRWgbNEkqOx,s=not base64!,i=4096",
            "r=rOprNGfwEbeRWgbNEkqOx,s=,i=4096",
            "s=W22ZaJ0SNY7soEsUEjb6gQ==,r=rOprNGfwEbeRWgbNEkqOx,i=4096",
            "r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,x=1",
            "e=other-error",
        ] {
            let client = ClientFirst::with_nonce(USER, CLIENT_NONCE).unwrap();
            assert!(
                client.handle_server_first(message, PASSWORD).is_err(),
                "{message:?}"
            );
        }
    }

    #[test]
    fn malformed_client_final_is_error() {
        for message in [
            "",
            "c=biws",
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
            "c=eSws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzb",
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=!!!",
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,x=1,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,c=biws,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
        ] {
            assert!(
                rfc_server().handle_client_final(message).is_err(),
                "{message:?}"
            );
        }
    }

    #[test]
    fn malformed_server_final_is_error() {
        let client = rfc_client_final(PASSWORD);
        for message in [
            "",
            "v=",
            "v=!!",
            "x=abc",
            "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4",
            "e=",
        ] {
            assert!(client.verify_server_final(message).is_err(), "{message:?}");
        }
    }

    #[test]
    fn debug_does_not_leak_keys() {
        let text = format!("{:?}", rfc_verifier());
        assert!(text.contains("stored_key: \"<redacted>\""), "{text}");
        assert!(text.contains("server_key: \"<redacted>\""), "{text}");
    }

    fn salt() -> Vec<u8> {
        B64.decode(SALT_B64).unwrap()
    }

    #[test]
    fn equivalent_unicode_passwords_give_the_same_verifier() {
        let nfc = Verifier::try_with_salt("caf\u{e9}", &salt(), MIN_ITERATIONS).unwrap();
        let nfd = Verifier::try_with_salt("cafe\u{301}", &salt(), MIN_ITERATIONS).unwrap();
        assert_eq!(nfc, nfd);
        assert_eq!(
            nfc,
            Verifier::with_salt("cafe\u{301}", &salt(), MIN_ITERATIONS)
        );
        // RFC 4013 section 3: the soft hyphen maps to nothing.
        assert_eq!(prepare_password("I\u{AD}X").unwrap(), "IX");
        assert_eq!(
            Verifier::try_with_salt("I\u{AD}X", &salt(), MIN_ITERATIONS).unwrap(),
            Verifier::with_salt("IX", &salt(), MIN_ITERATIONS)
        );
        // Without the mapping the keys would differ: the test above is not vacuous.
        assert_ne!(
            Verifier::from_prepared("I\u{AD}X", &salt(), MIN_ITERATIONS),
            Verifier::from_prepared("IX", &salt(), MIN_ITERATIONS)
        );
    }

    #[test]
    fn ascii_passwords_are_unchanged() {
        for password in [
            "pencil",
            "",
            "correct horse battery staple",
            "!#$%&'()*+,-./:;<=>?@[]^_`{|}~",
        ] {
            assert_eq!(prepare_password(password).unwrap(), password);
        }
        assert_eq!(
            Verifier::try_with_salt(PASSWORD, &salt(), 4096).unwrap(),
            rfc_verifier()
        );
    }

    #[test]
    fn client_proof_uses_the_prepared_password() {
        // Registered as NFC, logging in typed as NFD (as macOS input may give it).
        let verifier = Verifier::try_new("caf\u{e9}", MIN_ITERATIONS).unwrap();
        login("alice", "cafe\u{301}", verifier).unwrap();
        let verifier = Verifier::try_new("IX", MIN_ITERATIONS).unwrap();
        login("alice", "I\u{AD}X", verifier).unwrap();
    }

    #[test]
    fn prohibited_passwords_refused_with_a_clear_error() {
        for (password, expected) in [
            ("tab\there", "U+0009"),
            ("bell\u{7}", "U+0007"),
            ("private\u{E000}", "U+E000"),
            ("crab\u{1F980}", "U+1F980"),
            ("\u{5D0}1", "right-to-left"),
        ] {
            let message = prepare_password(password).unwrap_err().to_string();
            assert!(message.contains(expected), "{password:?}: {message}");
            assert!(Verifier::try_new(password, MIN_ITERATIONS).is_err());
            let client = ClientFirst::with_nonce(USER, CLIENT_NONCE).unwrap();
            assert!(matches!(
                client.handle_server_first(SERVER_FIRST, password),
                Err(ScramError::BadPassword(_))
            ));
        }
        // The infallible constructor does not panic on them.
        let _ = Verifier::with_salt("tab\there", &salt(), MIN_ITERATIONS);
    }
}
