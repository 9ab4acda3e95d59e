//! The v2 envelope: a v1 payload signed with Ed25519, so its receiver (and later an auditor)
//! can prove who wrote it.
//!
//! ```text
//! {"v":2,"key":"<public key, base64>","sig":"<signature, base64>","body":<the v1 payload>}
//! ```
//!
//! **What is signed is the exact bytes of `body`**, as they stand in the envelope, behind a
//! context string naming the kind of payload ([`Purpose::context`]): never a re-serialisation.
//! [`seal`] writes the body into the envelope verbatim (no escaping, so the envelope costs about
//! 165 bytes whatever the body's size); [`open`] finds the same bytes with serde_json's
//! `RawValue` and verifies them with `verify_strict` (no malleable or small-order keys) before
//! anything reads the body. So a receiver can keep the body bytes, the key and the signature,
//! and anyone holding the public key can check them again, with any Ed25519 library
//! (`docs/protocol.md`, "Signed envelope").
//!
//! The context string separates purposes: a signed ack cannot be replayed as a command or a
//! batch, even by someone holding a key that signs both.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::Deserialize;
use serde_json::value::RawValue;

/// The `v` of an envelope.
pub const SIGNED_VERSION: u32 = 2;

/// What a signature is for; each has its own context string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Agent → cloud: a [`crate::Batch`].
    Batch,
    /// Cloud → agent: an [`crate::Ack`].
    Ack,
    /// Cloud → agent: a [`crate::Command`].
    Command,
    /// Cloud → agent: a [`crate::DesiredConfig`].
    DesiredConfig,
}

impl Purpose {
    /// The bytes signed ahead of the body: the context, then a NUL.
    pub fn context(self) -> &'static [u8] {
        match self {
            Purpose::Batch => b"caudal/v2/batch\0",
            Purpose::Ack => b"caudal/v2/ack\0",
            Purpose::Command => b"caudal/v2/command\0",
            Purpose::DesiredConfig => b"caudal/v2/config\0",
        }
    }

    /// The message an Ed25519 signature covers: the context, then the body's bytes.
    pub fn message(self, body: &[u8]) -> Vec<u8> {
        let ctx = self.context();
        let mut m = Vec::with_capacity(ctx.len() + body.len());
        m.extend_from_slice(ctx);
        m.extend_from_slice(body);
        m
    }
}

/// Why an envelope, key or signature was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignedError {
    #[error("signed payload is not a v2 envelope: {0}")]
    Malformed(String),
    #[error("public key {0:?} is not a base64 Ed25519 public key")]
    BadKey(String),
    #[error("signature is not 64 bytes of base64")]
    BadSignatureEncoding,
    /// The signature does not match the body and key: altered, or signed by another key.
    #[error("signature does not verify with key {0}")]
    BadSignature(PublicKey),
}

impl SignedError {
    /// A short, bounded label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            SignedError::Malformed(_) => "malformed_envelope",
            SignedError::BadKey(_) | SignedError::BadSignatureEncoding => "bad_signature",
            SignedError::BadSignature(_) => "bad_signature",
        }
    }
}

/// An Ed25519 public key (checked to be a valid, not weak, point when parsed); written as the
/// base64 (standard, padded) of its 32 bytes. Kept as those bytes, so it is small to carry.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Verifies `sig` over `purpose`'s context and `body`.
    pub fn verify(&self, purpose: Purpose, body: &[u8], sig: &[u8; 64]) -> Result<(), SignedError> {
        let sig = Signature::from_bytes(sig);
        VerifyingKey::from_bytes(&self.0)
            .and_then(|k| k.verify_strict(&purpose.message(body), &sig))
            .map_err(|_| SignedError::BadSignature(*self))
    }
}

impl std::str::FromStr for PublicKey {
    type Err = SignedError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || SignedError::BadKey(s.chars().take(64).collect());
        let bytes = STANDARD.decode(s.trim()).map_err(|_| bad())?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| bad())?;
        let key = VerifyingKey::from_bytes(&bytes).map_err(|_| bad())?;
        if key.is_weak() {
            return Err(bad());
        }
        Ok(PublicKey(bytes))
    }
}

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&STANDARD.encode(self.as_bytes()))
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// An Ed25519 private key. It does not print, and its bytes are wiped when dropped.
#[derive(Clone)]
pub struct SecretKey(SigningKey);

impl SecretKey {
    /// The key whose seed is `seed` (32 random bytes).
    pub fn from_seed(seed: &[u8; 32]) -> SecretKey {
        SecretKey(SigningKey::from_bytes(seed))
    }

    /// The 32-byte seed, for writing the key file.
    pub fn seed(&self) -> &[u8; 32] {
        self.0.as_bytes()
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key().to_bytes())
    }

    /// The signature of `purpose`'s context and `body`.
    pub fn sign(&self, purpose: Purpose, body: &[u8]) -> [u8; 64] {
        self.0.sign(&purpose.message(body)).to_bytes()
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey(public {})", self.public())
    }
}

/// Wraps `body` (a v1 payload's JSON, written verbatim) in a signed envelope.
pub fn seal(key: &SecretKey, purpose: Purpose, body: &[u8]) -> Vec<u8> {
    let sig = STANDARD.encode(key.sign(purpose, body));
    let head = format!(
        "{{\"v\":{SIGNED_VERSION},\"key\":\"{}\",\"sig\":\"{sig}\",\"body\":",
        key.public()
    );
    let mut out = Vec::with_capacity(head.len() + body.len() + 1);
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(body);
    out.push(b'}');
    out
}

/// A verified envelope: the key that signed, the signature, and the exact body bytes it covers.
#[derive(Debug, Clone, Copy)]
pub struct Opened<'a> {
    pub key: PublicKey,
    pub sig: [u8; 64],
    pub body: &'a [u8],
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope<'a> {
    v: u32,
    key: &'a str,
    sig: &'a str,
    #[serde(borrow)]
    body: &'a RawValue,
}

/// Parses an envelope and verifies its signature for `purpose`. Only then may the body be
/// decoded; the key's enrolment (is it this site's, or the cloud's?) is the caller's check.
pub fn open(bytes: &[u8], purpose: Purpose) -> Result<Opened<'_>, SignedError> {
    let env: Envelope<'_> =
        serde_json::from_slice(bytes).map_err(|e| SignedError::Malformed(e.to_string()))?;
    if env.v != SIGNED_VERSION {
        return Err(SignedError::Malformed(format!(
            "version {} is not {SIGNED_VERSION}",
            env.v
        )));
    }
    let key: PublicKey = env.key.parse()?;
    let sig = decode_signature(env.sig)?;
    let body = env.body.get().as_bytes();
    if !body.starts_with(b"{") {
        return Err(SignedError::Malformed("body is not a JSON object".into()));
    }
    key.verify(purpose, body, &sig)?;
    Ok(Opened { key, sig, body })
}

/// The 64 bytes of a base64 signature.
pub fn decode_signature(s: &str) -> Result<[u8; 64], SignedError> {
    let bytes = STANDARD
        .decode(s)
        .map_err(|_| SignedError::BadSignatureEncoding)?;
    bytes
        .try_into()
        .map_err(|_| SignedError::BadSignatureEncoding)
}

/// The base64 text of a signature.
pub fn encode_signature(sig: &[u8; 64]) -> String {
    STANDARD.encode(sig)
}

/// The `v` of a payload (1: plain, 2: signed envelope), without decoding the rest; `None` when
/// it is not a JSON object with a numeric `v`.
pub fn version_of(bytes: &[u8]) -> Option<u32> {
    #[derive(Deserialize)]
    struct Header {
        v: u32,
    }
    // A v2 envelope starts with `{"v":2,`, as `seal` writes it; anything else is parsed.
    if bytes.starts_with(b"{\"v\":2,") {
        return Some(SIGNED_VERSION);
    }
    serde_json::from_slice::<Header>(bytes).ok().map(|h| h.v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed(&[n; 32])
    }

    #[test]
    fn seal_then_open_gives_the_exact_body() {
        let body = br#"{"v":1,"site":"s","batch":"b","sent_at":"2026-01-01T00:00:00Z","readings":[],"events":[],"gaps":[]}"#;
        let sealed = seal(&key(1), Purpose::Batch, body);
        let opened = open(&sealed, Purpose::Batch).unwrap();
        assert_eq!(opened.body, body);
        assert_eq!(opened.key, key(1).public());
        assert_eq!(version_of(&sealed), Some(2));
        assert_eq!(version_of(body), Some(1));
    }

    #[test]
    fn an_altered_byte_or_another_purpose_fails() {
        let body = br#"{"v":1,"x":12.5}"#;
        let sealed = seal(&key(1), Purpose::Batch, body);
        let altered = String::from_utf8(sealed.clone())
            .unwrap()
            .replace("12.5", "12.6");
        assert!(matches!(
            open(altered.as_bytes(), Purpose::Batch),
            Err(SignedError::BadSignature(_))
        ));
        assert!(matches!(
            open(&sealed, Purpose::Ack),
            Err(SignedError::BadSignature(_))
        ));
    }

    #[test]
    fn another_key_named_in_the_envelope_fails() {
        let body = br#"{"v":1}"#;
        let sealed = String::from_utf8(seal(&key(1), Purpose::Ack, body)).unwrap();
        let forged = sealed.replace(&key(1).public().to_string(), &key(2).public().to_string());
        assert_eq!(
            open(forged.as_bytes(), Purpose::Ack).unwrap_err(),
            SignedError::BadSignature(key(2).public())
        );
    }

    #[test]
    fn keys_round_trip_and_bad_text_is_refused() {
        let k = key(7).public();
        assert_eq!(k.to_string().parse::<PublicKey>().unwrap(), k);
        assert!("not base64!".parse::<PublicKey>().is_err());
        assert!(STANDARD.encode([0u8; 31]).parse::<PublicKey>().is_err());
        // The identity point is a weak key.
        let mut weak = [0u8; 32];
        weak[0] = 1;
        assert!(STANDARD.encode(weak).parse::<PublicKey>().is_err());
        assert!(format!("{:?}", key(7)).contains("public"));
    }

    #[test]
    fn garbage_never_panics() {
        for b in [
            &b""[..],
            b"{",
            b"{\"v\":2,",
            b"{\"v\":2,\"key\":1}",
            b"[1]",
            b"\xff\xfe",
        ] {
            assert!(open(b, Purpose::Batch).is_err());
        }
        let body_not_object = br#"{"v":2,"key":"AAAA","sig":"AAAA","body":[1]}"#;
        assert!(open(body_not_object, Purpose::Batch).is_err());
    }
}
