//! Informante passwords at rest: AES-256-GCM with the deployment's compliance key, the point id
//! as associated data (a ciphertext copied onto another point does not open).
//!
//! The key comes from `compliance.key_file` or `compliance.key` (`CAUDAL_COMPLIANCE__KEY`), 32
//! bytes in base64. It is never logged; neither is a password: [`Password`] does not print, and
//! the request log of each exchange shows `****` in its place.

use crate::core::config::ComplianceConfig;
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine;
use std::fmt;

/// Bytes of the key.
pub const KEY_LEN: usize = 32;
/// What a password is shown as wherever it would otherwise appear (audit, exchange log).
pub const REDACTED: &str = "****";

/// A decrypted informante password; prints as `****`.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub fn new(s: impl Into<String>) -> Password {
        Password(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// Why the key could not be loaded or a password could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error(
        "compliance.key_file or compliance.key (CAUDAL_COMPLIANCE__KEY) is required to store \
         informante passwords"
    )]
    NoKey,
    #[error("compliance.key_file {path}: {source}")]
    KeyFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("compliance key: {0}")]
    BadKey(String),
    #[error("point {0}: the stored password does not open with this key")]
    Open(i64),
    #[error("the system random generator failed")]
    Random,
}

/// The key that seals and opens informante passwords.
pub struct Sealer {
    key: LessSafeKey,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sealer(***)")
    }
}

impl Sealer {
    /// The key of `config`: the file wins over the inline key.
    pub fn from_config(config: &ComplianceConfig) -> Result<Sealer, SecretError> {
        let text = match (&config.key_file, &config.key) {
            (Some(path), _) => {
                std::fs::read_to_string(path).map_err(|source| SecretError::KeyFile {
                    path: path.clone(),
                    source,
                })?
            }
            (None, Some(k)) => k.expose().to_string(),
            (None, None) => return Err(SecretError::NoKey),
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| SecretError::BadKey("is not base64".into()))?;
        Sealer::new(&bytes)
    }

    pub fn new(key: &[u8]) -> Result<Sealer, SecretError> {
        if key.len() != KEY_LEN {
            return Err(SecretError::BadKey(format!(
                "is {} bytes; {KEY_LEN} are required (e.g. `openssl rand -base64 32`)",
                key.len()
            )));
        }
        let unbound = UnboundKey::new(&AES_256_GCM, key)
            .map_err(|_| SecretError::BadKey("refused by AES-256-GCM".into()))?;
        Ok(Sealer {
            key: LessSafeKey::new(unbound),
        })
    }

    /// A fresh random nonce, then the ciphertext with its tag.
    pub fn seal(&self, point: i64, password: &Password) -> Result<Vec<u8>, SecretError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SecretError::Random)?;
        let mut data = password.expose().as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(point.to_be_bytes()),
                &mut data,
            )
            .map_err(|_| SecretError::Random)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(out)
    }

    pub fn open(&self, point: i64, sealed: &[u8]) -> Result<Password, SecretError> {
        if sealed.len() < NONCE_LEN {
            return Err(SecretError::Open(point));
        }
        let (nonce, data) = sealed.split_at(NONCE_LEN);
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| SecretError::Open(point))?;
        let mut data = data.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(point.to_be_bytes()), &mut data)
            .map_err(|_| SecretError::Open(point))?;
        String::from_utf8(plain.to_vec())
            .map(Password)
            .map_err(|_| SecretError::Open(point))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_opens_only_with_its_key_and_point() {
        let s = Sealer::new(&[7u8; 32]).expect("key");
        let pw = Password::new("clave-secreta");
        let sealed = s.seal(3, &pw).expect("seal");
        assert!(
            !sealed.windows(5).any(|w| w == b"clave"),
            "ciphertext leaks"
        );
        assert_eq!(s.open(3, &sealed).expect("open"), pw);
        assert!(s.open(4, &sealed).is_err(), "another point");
        assert!(
            Sealer::new(&[8u8; 32])
                .expect("key")
                .open(3, &sealed)
                .is_err()
        );
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(s.open(3, &tampered).is_err());
        assert_ne!(s.seal(3, &pw).expect("seal"), sealed, "nonces repeat");
    }

    #[test]
    fn keys_are_checked_and_never_printed() {
        assert!(matches!(
            Sealer::new(&[0u8; 16]),
            Err(SecretError::BadKey(_))
        ));
        let c = ComplianceConfig {
            key: Some(crate::core::config::Secret::new("not base64!")),
            ..ComplianceConfig::default()
        };
        assert!(matches!(
            Sealer::from_config(&c),
            Err(SecretError::BadKey(_))
        ));
        assert!(matches!(
            Sealer::from_config(&ComplianceConfig::default()),
            Err(SecretError::NoKey)
        ));
        assert_eq!(format!("{:?}", Password::new("x")), "****");
    }
}
