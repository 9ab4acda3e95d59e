//! The cloud's own Ed25519 key (`[signing] key_file`), with which it signs acks (and, next,
//! commands and desired configuration) so agents can refuse anything the cloud did not send.
//!
//! **The key file is the cloud's identity towards every agent.** `caudal-cloud signing-key`
//! creates it once, atomically (temporary file with mode 0600, fsync, rename, directory fsync);
//! a process that runs with `key_file` set and finds it missing, unreadable or malformed stops
//! with an error naming the file and never makes a new one: agents configured with the old
//! public key would refuse everything. The format is the agent's key file's
//! (`agent/src/identity.rs`): a header line, then the base64 of the 32-byte seed.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use caudal_common::signed::SecretKey;
use std::io::Write;
use std::path::Path;

const HEADER: &str = "caudal-cloud ed25519 seed v1";

/// Why the cloud's key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum SigningKeyError {
    #[error("signing.key_file {path}: cannot read it: {source}")]
    Unreadable {
        path: String,
        source: std::io::Error,
    },
    #[error("signing.key_file {path}: {reason}")]
    Malformed { path: String, reason: String },
    #[error("signing.key_file {path}: cannot create it: {source}")]
    Create {
        path: String,
        source: std::io::Error,
    },
    #[error("no randomness from the operating system for a new key: {0}")]
    Random(String),
}

/// Loads the key; a missing file is an error (see the module doc).
pub fn load(path: &Path) -> Result<SecretKey, SigningKeyError> {
    let bytes = std::fs::read(path).map_err(|source| SigningKeyError::Unreadable {
        path: path.display().to_string(),
        source,
    })?;
    parse(path, &bytes)
}

/// Loads the key, creating it first when the file does not exist; whether it was created.
pub fn load_or_create(path: &Path) -> Result<(SecretKey, bool), SigningKeyError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok((parse(path, &bytes)?, false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((create(path)?, true)),
        Err(source) => Err(SigningKeyError::Unreadable {
            path: path.display().to_string(),
            source,
        }),
    }
}

fn parse(path: &Path, bytes: &[u8]) -> Result<SecretKey, SigningKeyError> {
    let bad = |reason: &str| SigningKeyError::Malformed {
        path: path.display().to_string(),
        reason: reason.to_string(),
    };
    let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8 text"))?;
    let mut lines = text.lines();
    if lines.next() != Some(HEADER) {
        return Err(bad(&format!("the first line is not {HEADER:?}")));
    }
    let seed = lines.next().ok_or_else(|| bad("no key line"))?;
    let seed = STANDARD
        .decode(seed.trim())
        .map_err(|_| bad("the key line is not base64"))?;
    let seed: [u8; 32] = seed
        .try_into()
        .map_err(|_| bad("the key line is not 32 bytes"))?;
    Ok(SecretKey::from_seed(&seed))
}

fn create(path: &Path) -> Result<SecretKey, SigningKeyError> {
    let err = |source| SigningKeyError::Create {
        path: path.display().to_string(),
        source,
    };
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(|e| SigningKeyError::Random(e.to_string()))?;
    let key = SecretKey::from_seed(&seed);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    let tmp = path.with_extension("tmp");
    {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp).map_err(err)?;
        f.write_all(format!("{HEADER}\n{}\n", STANDARD.encode(key.seed())).as_bytes())
            .map_err(err)?;
        f.sync_all().map_err(err)?;
    }
    std::fs::rename(&tmp, path).map_err(err)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_loaded_the_same_and_a_bad_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloud.key");
        assert!(matches!(
            load(&path),
            Err(SigningKeyError::Unreadable { .. })
        ));
        let (a, created) = load_or_create(&path).unwrap();
        assert!(created);
        let (b, created) = load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(a.public(), b.public());
        assert_eq!(load(&path).unwrap().public(), a.public());
        std::fs::write(&path, "garbage").unwrap();
        assert!(matches!(
            load(&path),
            Err(SigningKeyError::Malformed { .. })
        ));
        assert!(matches!(
            load_or_create(&path),
            Err(SigningKeyError::Malformed { .. })
        ));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "garbage");
    }
}
