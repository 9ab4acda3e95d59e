//! The agent's identity: its Ed25519 key pair, kept in `identity.key` in the state directory
//! (beside the outbox), with which every batch is signed (`docs/adr/010-signed-messages.md`).
//!
//! **The key file is the site's identity.** It is created once, on the first start (or by
//! `caudal-agent identity`), atomically: the seed is written to a temporary file opened with mode
//! 0600, fsynced, renamed over `identity.key`, and the directory fsynced; a crash at any line
//! leaves either no key file (the next start creates one) or a complete one. An existing key
//! file that cannot be read or does not hold a key is an error naming the file: it is **never**
//! replaced, because a new key would no longer match the public key enrolled in the cloud and
//! every batch would be refused. The private key never leaves this file and this process: only
//! its public key is printed, logged or sent.

use caudal_common::signed::{PublicKey, SecretKey};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The key file's name in the state directory.
pub const KEY_FILE: &str = "identity.key";

/// The first line of a key file; the second is the base64 of the 32-byte seed.
const HEADER: &str = "caudal-agent ed25519 seed v1";

/// The state directory: where the outbox is.
pub fn state_dir(outbox_path: &Path) -> &Path {
    match outbox_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Why the identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "key file {path}: cannot read it: {source}; it is not replaced (that would change the site's identity)"
    )]
    Unreadable {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "key file {path}: {reason}; it is not replaced (that would change the site's identity)"
    )]
    Malformed { path: String, reason: String },
    #[error("key file {path}: cannot create it: {source}")]
    Create {
        path: String,
        source: std::io::Error,
    },
    #[error("no randomness from the operating system for a new key: {0}")]
    Random(String),
}

/// The agent's key pair.
#[derive(Debug, Clone)]
pub struct Identity {
    key: SecretKey,
    path: PathBuf,
}

impl Identity {
    /// Loads the key from `dir/identity.key`, creating it first when the file does not exist.
    /// Returns whether it was created.
    pub fn load_or_create(dir: &Path) -> Result<(Identity, bool), IdentityError> {
        let path = dir.join(KEY_FILE);
        match std::fs::read(&path) {
            Ok(bytes) => Ok((Identity::parse(&path, &bytes)?, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok((Identity::create(dir, &path)?, true))
            }
            Err(source) => Err(IdentityError::Unreadable {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    /// An identity from a seed, kept in memory only (tests, benchmarks).
    pub fn from_seed(seed: &[u8; 32]) -> Identity {
        Identity {
            key: SecretKey::from_seed(seed),
            path: PathBuf::new(),
        }
    }

    pub fn public(&self) -> PublicKey {
        self.key.public()
    }

    pub fn key(&self) -> &SecretKey {
        &self.key
    }

    /// Where the key file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn parse(path: &Path, bytes: &[u8]) -> Result<Identity, IdentityError> {
        let bad = |reason: &str| IdentityError::Malformed {
            path: path.display().to_string(),
            reason: reason.to_string(),
        };
        let text = std::str::from_utf8(bytes).map_err(|_| bad("not UTF-8 text"))?;
        let mut lines = text.lines();
        if lines.next() != Some(HEADER) {
            return Err(bad(&format!("the first line is not {HEADER:?}")));
        }
        let seed = lines.next().ok_or_else(|| bad("no key line"))?;
        use base64::Engine;
        let seed = base64::engine::general_purpose::STANDARD
            .decode(seed.trim())
            .map_err(|_| bad("the key line is not base64"))?;
        let seed: [u8; 32] = seed
            .try_into()
            .map_err(|_| bad("the key line is not 32 bytes"))?;
        if lines.any(|l| !l.trim().is_empty()) {
            return Err(bad("unexpected lines after the key"));
        }
        Ok(Identity {
            key: SecretKey::from_seed(&seed),
            path: path.to_path_buf(),
        })
    }

    fn create(dir: &Path, path: &Path) -> Result<Identity, IdentityError> {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).map_err(|e| IdentityError::Random(e.to_string()))?;
        let key = SecretKey::from_seed(&seed);
        let err = |source| IdentityError::Create {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        use base64::Engine;
        let text = format!(
            "{HEADER}\n{}\n",
            base64::engine::general_purpose::STANDARD.encode(key.seed())
        );
        let tmp = dir.join(format!("{KEY_FILE}.tmp"));
        {
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            let mut f = opts.open(&tmp).map_err(err)?;
            f.write_all(text.as_bytes()).map_err(err)?;
            f.sync_all().map_err(err)?;
        }
        // `create_new` semantics for the final name: never rename over a key that appeared
        // meanwhile (another process starting at the same moment).
        if path.exists() {
            let _ = std::fs::remove_file(&tmp);
            let bytes = std::fs::read(path).map_err(|source| IdentityError::Unreadable {
                path: path.display().to_string(),
                source,
            })?;
            return Identity::parse(path, &bytes);
        }
        std::fs::rename(&tmp, path).map_err(err)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(err)?;
        Ok(Identity {
            key,
            path: path.to_path_buf(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_loaded_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let (a, created) = Identity::load_or_create(dir.path()).unwrap();
        assert!(created);
        let (b, created) = Identity::load_or_create(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(a.public(), b.public());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(!dir.path().join("identity.key.tmp").exists());
    }

    #[test]
    fn a_malformed_key_file_is_an_error_and_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        for bad in [
            &b"garbage"[..],
            b"caudal-agent ed25519 seed v1\n",
            b"caudal-agent ed25519 seed v1\nAAAA\n",
            b"caudal-agent ed25519 seed v1\n!!!\n",
        ] {
            std::fs::write(&path, bad).unwrap();
            let e = Identity::load_or_create(dir.path()).unwrap_err();
            assert!(matches!(e, IdentityError::Malformed { .. }), "{e}");
            assert!(e.to_string().contains("identity.key"), "{e}");
            assert_eq!(std::fs::read(&path).unwrap(), bad);
        }
    }

    #[cfg(unix)]
    #[test]
    fn an_unreadable_key_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the file should be: reading it fails with something else than
        // "not found".
        std::fs::create_dir(dir.path().join(KEY_FILE)).unwrap();
        let e = Identity::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(e, IdentityError::Unreadable { .. }), "{e}");
    }
}
