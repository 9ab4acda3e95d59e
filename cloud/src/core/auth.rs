//! Auth primitives every module uses: roles and what they allow, password hashes, and API
//! tokens.
//!
//! - Passwords are stored as Argon2id PHC strings (`$argon2id$v=19$m=19456,t=2,p=1$…`, the
//!   `argon2` crate's defaults, OWASP's recommended minimum). Hashing takes tens of milliseconds
//!   on purpose, so callers run it on a blocking thread.
//! - Tokens are JWTs signed with HS256 and the deployment's shared key (`auth.jwt_secret`): one
//!   scheme for every process, so a token issued by a `core` process is accepted by a
//!   `telemetry` process that shares the configuration. A token names the account and its
//!   session version; the account's current role and state are read from the database on each
//!   request (see `users::Caller`), so a role change, a deactivation or a new password takes
//!   effect at once rather than when the token expires.

use crate::core::config::{AuthConfig, Secret};
use argon2::Argon2;
use argon2::password_hash::rand_core::{OsRng, RngCore};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

use crate::core::metrics::{KindLabels, ReasonLabels};

/// What a person may do through the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Everything, including managing accounts.
    Admin,
    /// Reads everything; changes sites, catchment points and devices.
    Operator,
    /// Field staff: reads everything; changes sites, catchment points and devices.
    Technician,
    /// Reads everything, changes nothing.
    Viewer,
}

/// A kind of action a route performs; each route requires one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Permission {
    /// Read sites, points, devices, telemetry.
    Read,
    /// Create and change sites, catchment points and devices.
    ManageCatchment,
    /// Create, change and deactivate accounts.
    ManageUsers,
    /// Change what is reported to the regulator (settings, passwords, releasing or discarding
    /// a held slot): admins and operators, who answer for the declarations.
    ManageCompliance,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Admin, Role::Operator, Role::Technician, Role::Viewer];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Technician => "technician",
            Role::Viewer => "viewer",
        }
    }

    /// Whether this role may perform `p`.
    pub fn allows(self, p: Permission) -> bool {
        match p {
            Permission::Read => true,
            Permission::ManageCatchment => {
                matches!(self, Role::Admin | Role::Operator | Role::Technician)
            }
            Permission::ManageUsers => self == Role::Admin,
            Permission::ManageCompliance => matches!(self, Role::Admin | Role::Operator),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!("unknown role {s:?}; known: admin, operator, technician, viewer")
            })
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Permission::Read => "read",
            Permission::ManageCatchment => "manage sites, catchment points and devices",
            Permission::ManageUsers => "manage accounts",
            Permission::ManageCompliance => "manage regulatory reporting",
        })
    }
}

/// Shortest accepted password, characters.
pub const MIN_PASSWORD_CHARS: usize = 10;
/// Longest accepted password, bytes (bounds the hashing work a request can ask for).
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// Why a password was refused or could not be hashed.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("password is {0} characters long; at least {MIN_PASSWORD_CHARS} are required")]
    TooShort(usize),
    #[error("password is longer than {MAX_PASSWORD_BYTES} bytes")]
    TooLong,
    #[error("password could not be hashed: {0}")]
    Hash(String),
}

/// Checks a new password's length.
pub fn check_password(password: &str) -> Result<(), PasswordError> {
    let chars = password.chars().count();
    if chars < MIN_PASSWORD_CHARS {
        return Err(PasswordError::TooShort(chars));
    }
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(PasswordError::TooLong);
    }
    Ok(())
}

/// Hashes a new password (checked first) into an Argon2id PHC string. CPU-bound: call from a
/// blocking thread.
pub fn hash_password(password: &Secret) -> Result<String, PasswordError> {
    check_password(password.expose())?;
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.expose().as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| PasswordError::Hash(e.to_string()))
}

/// Whether `password` matches the stored `hash`. A malformed hash matches nothing. CPU-bound:
/// call from a blocking thread.
pub fn verify_password(password: &Secret, hash: &str) -> bool {
    if password.expose().len() > MAX_PASSWORD_BYTES {
        return false;
    }
    PasswordHash::new(hash).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.expose().as_bytes(), &h)
            .is_ok()
    })
}

/// Largest Argon2 memory a stored hash may ask of [`verify_password_reusing`], KiB: ours take
/// 19 456; a hash asking for more is not one of ours and is refused rather than allocated.
pub const MAX_HASH_MEMORY_KIB: u32 = 256 * 1024;

std::thread_local! {
    /// The Argon2 memory of this thread's last check, kept for its next one.
    static HASH_MEMORY: std::cell::RefCell<Vec<argon2::Block>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// [`verify_password`] on memory kept by the calling thread between checks, so a thread that
/// checks passwords all day holds one hash's memory (~19 MiB) for good instead of leaving
/// freed ones to the allocator. Call it only from a few long-lived threads of its own (see
/// `users::throttle`), never from a pool that grows.
pub fn verify_password_reusing(password: &Secret, hash: &str) -> bool {
    use argon2::{Params, Version};
    use subtle::ConstantTimeEq;
    if password.expose().len() > MAX_PASSWORD_BYTES {
        return false;
    }
    let Ok(h) = PasswordHash::new(hash) else {
        return false;
    };
    let (Ok(algorithm), Ok(params)) = (
        argon2::Algorithm::try_from(h.algorithm),
        Params::try_from(&h),
    ) else {
        return false;
    };
    let version = match h.version.map(Version::try_from) {
        None => Version::default(),
        Some(Ok(v)) => v,
        Some(Err(_)) => return false,
    };
    let (Some(salt), Some(expected)) = (h.salt, h.hash) else {
        return false;
    };
    if params.m_cost() > MAX_HASH_MEMORY_KIB {
        return false;
    }
    let mut salt_bytes = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_bytes) else {
        return false;
    };
    let mut out = vec![0u8; expected.len()];
    let blocks = params.block_count();
    let hashed = HASH_MEMORY.with_borrow_mut(|memory| {
        if memory.len() < blocks {
            memory.resize(blocks, argon2::Block::default());
        }
        Argon2::new(algorithm, version, params).hash_password_into_with_memory(
            password.expose().as_bytes(),
            salt,
            &mut out,
            &mut memory[..blocks],
        )
    });
    hashed.is_ok() && bool::from(out.as_slice().ct_eq(expected.as_bytes()))
}

/// What a token says. `sub` is the account id; `sv` its session version when the token was
/// issued (a token from an older version is refused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: i64,
    pub sv: i64,
    pub role: Role,
    pub iat: i64,
    pub exp: i64,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token has expired")]
    Expired,
    #[error("token is not valid: {0}")]
    Invalid(String),
}

impl TokenError {
    /// Short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Expired => "expired",
            TokenError::Invalid(_) => "invalid",
        }
    }
}

/// Signs and checks tokens with the deployment's key.
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: chrono::Duration,
}

impl fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenKeys")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl TokenKeys {
    /// Keys from `auth.jwt_secret`, or a random key for this process when it is unset.
    pub fn from_config(cfg: &AuthConfig) -> TokenKeys {
        let secret: Vec<u8> = match &cfg.jwt_secret {
            Some(s) => s.expose().as_bytes().to_vec(),
            None => {
                tracing::warn!(
                    "auth.jwt_secret is not set: tokens are signed with a random key and end \
                     with this process; set CAUDAL_AUTH__JWT_SECRET when several processes serve \
                     the API"
                );
                let mut key = vec![0u8; 32];
                OsRng.fill_bytes(&mut key);
                key
            }
        };
        let ttl_s = i64::try_from(cfg.token_ttl_s).unwrap_or(i64::MAX / 1_000_000);
        TokenKeys::new(&secret, chrono::Duration::seconds(ttl_s))
    }

    /// Keys from raw secret bytes.
    pub fn new(secret: &[u8], ttl: chrono::Duration) -> TokenKeys {
        let mut validation = Validation::new(Algorithm::HS256);
        // Processes share one clock source (NTP); a few seconds cover skew between machines.
        validation.leeway = 5;
        // `sub` is a number here; serde requires it, the spec check only knows string subjects.
        validation.set_required_spec_claims(&["exp"]);
        TokenKeys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            ttl,
        }
    }

    /// A token for account `sub` at session version `sv`, valid from `now` for the configured
    /// lifetime; returns it with its expiry.
    pub fn issue(
        &self,
        sub: i64,
        sv: i64,
        role: Role,
        now: DateTime<Utc>,
    ) -> Result<(String, DateTime<Utc>), TokenError> {
        let exp = now + self.ttl;
        self.sign(&Claims {
            sub,
            sv,
            role,
            iat: now.timestamp(),
            exp: exp.timestamp(),
        })
        .map(|t| (t, exp))
    }

    /// Signs arbitrary claims (tests build expired tokens with it).
    pub fn sign(&self, claims: &Claims) -> Result<String, TokenError> {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .map_err(|e| TokenError::Invalid(e.to_string()))
    }

    /// Checks the signature, algorithm and expiry of a token and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|d| d.claims)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid(e.to_string()),
            })
    }
}

/// Counters of logins and refused tokens.
#[derive(Clone, Debug, Default)]
pub struct AuthMetrics {
    /// Logins by outcome (`ok`, `wrong_credentials`, `inactive`).
    pub logins: Family<KindLabels, Counter>,
    /// Requests refused for their token, by reason (`missing`, `expired`, `invalid`, `revoked`).
    pub refused: Family<ReasonLabels, Counter>,
}

impl AuthMetrics {
    pub fn register(registry: &mut Registry) -> AuthMetrics {
        let m = AuthMetrics::default();
        registry.register(
            "auth_logins",
            "Login attempts by outcome (kind: ok, wrong_credentials, inactive, throttled_address, throttled_account, busy)",
            m.logins.clone(),
        );
        registry.register(
            "auth_refused",
            "API requests refused for their token, by reason",
            m.refused.clone(),
        );
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_allow_what_the_policy_says() {
        use Permission::*;
        for r in Role::ALL {
            assert!(r.allows(Read));
            assert_eq!(r.allows(ManageUsers), r == Role::Admin);
            assert_eq!(r.allows(ManageCatchment), r != Role::Viewer);
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn password_round_trip_and_rules() {
        let pw = Secret::new("correct horse battery");
        let h = hash_password(&pw).expect("hash");
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password(&pw, &h));
        assert!(!verify_password(&Secret::new("correct horse battery!"), &h));
        assert!(!verify_password(&pw, "not a hash"));
        // The check on kept memory agrees, also on a second use of the same memory, and
        // refuses a hash asking for more memory than ours ever do.
        for _ in 0..2 {
            assert!(verify_password_reusing(&pw, &h));
            assert!(!verify_password_reusing(
                &Secret::new("correct horse battery!"),
                &h
            ));
        }
        assert!(!verify_password_reusing(&pw, "not a hash"));
        let greedy = h.replace("m=19456", "m=4194304");
        assert!(!verify_password_reusing(&pw, &greedy));
        assert!(matches!(
            hash_password(&Secret::new("short")),
            Err(PasswordError::TooShort(5))
        ));
    }

    #[test]
    fn tokens_verify_expire_and_resist_forgery() {
        let keys = TokenKeys::new(
            b"0123456789abcdef0123456789abcdef",
            chrono::Duration::hours(1),
        );
        let now = Utc::now();
        let (t, exp) = keys.issue(7, 3, Role::Operator, now).expect("issue");
        assert_eq!(exp.timestamp(), now.timestamp() + 3600);
        let c = keys.verify(&t).expect("valid");
        assert_eq!((c.sub, c.sv, c.role), (7, 3, Role::Operator));

        let (old, _) = keys
            .issue(7, 3, Role::Operator, now - chrono::Duration::hours(2))
            .expect("issue");
        assert_eq!(keys.verify(&old), Err(TokenError::Expired));

        let other = TokenKeys::new(
            b"another key another key another!",
            chrono::Duration::hours(1),
        );
        let (forged, _) = other.issue(7, 3, Role::Admin, now).expect("issue");
        assert!(matches!(keys.verify(&forged), Err(TokenError::Invalid(_))));
        assert!(matches!(
            keys.verify("abc.def.ghi"),
            Err(TokenError::Invalid(_))
        ));
    }
}
