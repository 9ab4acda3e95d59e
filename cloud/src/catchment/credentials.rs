//! Per-site MQTT credentials: each agent logs in to the broker with username = its site id and a
//! password the cloud generates.
//!
//! - The password is 24 random bytes from the OS (192 bits), written as 32 URL-safe base64
//!   characters. It is shown once, when the site is created or its credential rotated, and never
//!   stored: the site row keeps a Mosquitto `$7$` string (PBKDF2-HMAC-SHA512, 12-byte salt),
//!   exactly what `mosquitto_passwd` writes, so one stored value serves both the embedded broker
//!   and an external Mosquitto (`caudal-cloud site mosquitto-passwd` prints the password file).
//!   The iteration count is modest ([`ITERATIONS`]) because the secret is random: guessing 192
//!   bits is out of reach however fast the hash, and a cheap check keeps a reconnect storm of a
//!   whole fleet cheap for the broker.
//! - The embedded broker checks logins through [`LoginCheck`]: its listener threads send each
//!   CONNECT's username and password over a bounded channel to a task on the main runtime, which
//!   reads the site's hash from the database (so a new, rotated or deactivated credential takes
//!   effect at the next connect, whichever process changed it) and answers yes or no. When the
//!   channel is full, connects wait; when the database fails, the login is refused and counted.
//!
//! What a logged-in site may publish and read is not decided here: the embedded broker's gate
//! enforces it (`core::broker`, ADR 007), and [`mosquitto_acl_file`] writes the same rules for
//! Mosquitto (`caudal-cloud site mosquitto-acl`).

use crate::core::Shutdown;
use crate::core::config::Secret;
use crate::core::db::Db;
use crate::core::metrics::KindLabels;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{KeyInit, Mac};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use sha2::Sha512;
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, oneshot};

/// PBKDF2 iterations of newly issued hashes (Mosquitto's own default is 101).
pub const ITERATIONS: u32 = 1000;
/// Most iterations accepted when checking a stored hash (bounds the work one CONNECT costs).
const MAX_ITERATIONS: u32 = 100_000;
/// Mosquitto 2.0 refuses any other salt length.
const SALT_BYTES: usize = 12;
const PASSWORD_BYTES: usize = 24;
/// Logins waiting for the checker; beyond this, connects wait.
const QUEUE: usize = 64;

/// A new password and its stored form.
#[derive(Debug)]
pub struct Issued {
    /// Shown once to whoever configures the agent.
    pub password: Secret,
    /// `$7$<iterations>$<salt>$<hash>`, base64 with padding, as `mosquitto_passwd` writes.
    pub hash: String,
}

fn random(buf: &mut [u8]) {
    argon2::password_hash::rand_core::RngCore::fill_bytes(
        &mut argon2::password_hash::rand_core::OsRng,
        buf,
    );
}

/// PBKDF2-HMAC-SHA512 with one output block (64 bytes, the length Mosquitto uses).
fn pbkdf2_sha512(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 64] {
    let prf = |msg: &[&[u8]]| -> [u8; 64] {
        // HMAC accepts keys of any length.
        let mut mac = <hmac::Hmac<Sha512> as KeyInit>::new_from_slice(password)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        for m in msg {
            mac.update(m);
        }
        let mut out = [0u8; 64];
        out.copy_from_slice(&mac.finalize().into_bytes());
        out
    };
    let mut u = prf(&[salt, &1u32.to_be_bytes()]);
    let mut t = u;
    for _ in 1..iterations {
        u = prf(&[&u]);
        for (a, b) in t.iter_mut().zip(u.iter()) {
            *a ^= b;
        }
    }
    t
}

/// Hashes `password` in Mosquitto's `$7$` form with a fresh salt.
pub fn hash(password: &Secret) -> String {
    let mut salt = [0u8; SALT_BYTES];
    random(&mut salt);
    let dk = pbkdf2_sha512(password.expose().as_bytes(), &salt, ITERATIONS);
    format!(
        "$7${ITERATIONS}${}${}",
        STANDARD.encode(salt),
        STANDARD.encode(dk)
    )
}

/// Generates a password and its hash.
pub fn issue() -> Issued {
    let mut raw = [0u8; PASSWORD_BYTES];
    random(&mut raw);
    let password = Secret::new(URL_SAFE_NO_PAD.encode(raw));
    let hash = hash(&password);
    Issued { password, hash }
}

/// Whether `password` matches a stored `$7$` string. Anything malformed matches nothing.
pub fn verify(password: &str, stored: &str) -> bool {
    let mut parts = stored.split('$');
    let (Some(""), Some("7"), Some(iter), Some(salt), Some(dk), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return false;
    };
    let Ok(iterations) = iter.parse::<u32>() else {
        return false;
    };
    if !(1..=MAX_ITERATIONS).contains(&iterations) {
        return false;
    }
    let (Ok(salt), Ok(dk)) = (STANDARD.decode(salt), STANDARD.decode(dk)) else {
        return false;
    };
    if dk.len() != 64 {
        return false;
    }
    let got = pbkdf2_sha512(password.as_bytes(), &salt, iterations);
    got.ct_eq(dk.as_slice()).into()
}

/// A Mosquitto `password_file` with one line per site that has a credential, `site:$7$…`, in
/// `sites` order.
pub fn mosquitto_password_file<'a>(sites: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    sites
        .into_iter()
        .map(|(user, hash)| format!("{user}:{hash}\n"))
        .collect()
}

/// A Mosquitto `acl_file` with the embedded broker's rules (`core::broker`): a site's agent
/// (username = site id) publishes only its own `telemetry`, `status` and `command/result` and
/// reads only its own `ack`, `command` and `config/desired`; `cloud_user` reads every site's
/// agent topics and alone publishes acks, commands and desired configuration. Built from
/// [`TopicKind::publisher`], the rule the embedded broker enforces, so the two cannot drift.
/// It names no site: `%u` patterns cover every site in the password file.
pub fn mosquitto_acl_file(cloud_user: &str) -> String {
    use caudal_common::topic::{PREFIX, Publisher, TopicKind};
    let mut agents = String::new();
    let mut cloud = String::new();
    for kind in TopicKind::ALL {
        let suffix = kind.suffix();
        let (agent, by_cloud) = match kind.publisher() {
            Publisher::Agent => ("write", "read"),
            Publisher::Cloud => ("read", "write"),
        };
        agents.push_str(&format!("pattern {agent} {PREFIX}/%u/{suffix}\n"));
        cloud.push_str(&format!("topic {by_cloud} {PREFIX}/+/{suffix}\n"));
    }
    format!(
        "# Caudal's topic rules for Mosquitto (>= 2.0), written by `caudal-cloud site mosquitto-acl`.\n\
         # Agents log in with their site id as username (the password file of\n\
         # `caudal-cloud site mosquitto-passwd`); `%u` is that site id.\n\
         {agents}\n\
         # The cloud's own login (mqtt.username).\n\
         user {cloud_user}\n\
         {cloud}"
    )
}

/// Counters of broker logins checked against site credentials.
#[derive(Clone, Debug, Default)]
pub struct LoginMetrics {
    /// By outcome: `ok`, `refused`, `unavailable` (the database did not answer).
    pub logins: Family<KindLabels, Counter>,
}

impl LoginMetrics {
    pub fn register(registry: &mut Registry) -> LoginMetrics {
        let m = LoginMetrics::default();
        registry.register(
            "mqtt_logins",
            "Embedded broker logins checked against site credentials, by outcome (kind: ok, refused, unavailable)",
            m.logins.clone(),
        );
        m
    }
}

struct LoginRequest {
    site: String,
    password: Secret,
    reply: oneshot::Sender<bool>,
}

/// The broker side of the login check: cheap to clone into every listener.
#[derive(Clone, Debug)]
pub struct SiteLogins {
    tx: mpsc::Sender<LoginRequest>,
}

impl SiteLogins {
    /// Whether `site` may log in with `password`. False when the checker has stopped.
    pub async fn check(&self, site: String, password: String) -> bool {
        let (reply, answer) = oneshot::channel();
        let req = LoginRequest {
            site,
            password: Secret::new(password),
            reply,
        };
        if self.tx.send(req).await.is_err() {
            return false;
        }
        answer.await.unwrap_or(false)
    }
}

/// The task that answers [`SiteLogins`] from the database.
pub struct LoginCheck {
    db: Db,
    rx: mpsc::Receiver<LoginRequest>,
    metrics: LoginMetrics,
}

impl LoginCheck {
    pub fn new(db: Db, metrics: LoginMetrics) -> (LoginCheck, SiteLogins) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (LoginCheck { db, rx, metrics }, SiteLogins { tx })
    }

    /// Answers logins until shutdown.
    pub async fn run(mut self, mut shutdown: Shutdown) {
        loop {
            let req = tokio::select! {
                _ = shutdown.wait() => return,
                r = self.rx.recv() => match r {
                    Some(r) => r,
                    None => return,
                },
            };
            let ok = self.answer(&req.site, req.password).await;
            let _ = req.reply.send(ok);
        }
    }

    async fn answer(&self, site: &str, password: Secret) -> bool {
        let count = |kind: &str| {
            self.metrics
                .logins
                .get_or_create(&KindLabels::new(kind))
                .inc();
        };
        let stored = match super::site::login_hash(&self.db, site).await {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(site, error = %e, "MQTT login refused: the database did not answer");
                count("unavailable");
                return false;
            }
        };
        let ok = match stored {
            Some(hash) => tokio::task::spawn_blocking(move || verify(password.expose(), &hash))
                .await
                .unwrap_or(false),
            None => false,
        };
        if ok {
            count("ok");
        } else {
            tracing::info!(
                site,
                "MQTT login refused: unknown or inactive site, or wrong password"
            );
            count("refused");
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pbkdf2_sha512_matches_the_published_vector() {
        // PBKDF2-HMAC-SHA512, P = "password", S = "salt", c = 1 and c = 2, dkLen = 64.
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        assert_eq!(
            hex(&pbkdf2_sha512(b"password", b"salt", 1)),
            "867f70cf1ade02cff3752599a3a53dc4af34c7a669815ae5d513554e1c8cf252\
             c02d470a285a0501bad999bfe943c08f050235d7d68b1da55e63f73b60a57fce"
        );
        assert_eq!(
            hex(&pbkdf2_sha512(b"password", b"salt", 2)),
            "e1d9c16aa681708a45f5c7c4e215ceb66e011a2e9f0040713f18aefdb866d53c\
             f76cab2868a39b9f7840edce4fef5a82be67335c77a6068e04112754f27ccf4e"
        );
    }

    #[test]
    fn a_line_written_by_mosquitto_passwd_verifies() {
        // `mosquitto_passwd -b file alice secretpw` (Mosquitto 2.0.11).
        let line = "$7$101$N7lQi+0JFvCjUJ9c$Cp/NxEjAcV8ZfM/SpiniRlIyN7wOA8/xddmhcEU4c072Oj03qH5UhPU9T7dILGCcsoR2btsqekM9UA9b8i2iIQ==";
        assert!(verify("secretpw", line));
        assert!(!verify("secretpW", line));
    }

    #[test]
    fn issued_passwords_verify_and_differ() {
        let a = issue();
        let b = issue();
        assert_eq!(a.password.expose().len(), 32);
        assert_ne!(a.password.expose(), b.password.expose());
        assert!(a.hash.starts_with("$7$1000$"));
        assert!(verify(a.password.expose(), &a.hash));
        assert!(!verify(b.password.expose(), &a.hash));
        for bad in [
            "",
            "$7$",
            "$6$1$c2FsdA==$AAAA",
            "$7$0$c2FsdA==$AAAA",
            "$7$x$a$b",
            "plain",
        ] {
            assert!(!verify("pw", bad), "{bad:?}");
        }
    }

    #[test]
    fn acl_file_states_who_publishes_each_topic() {
        let acl = mosquitto_acl_file("caudal-cloud");
        let rules: Vec<&str> = acl
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .collect();
        assert_eq!(
            rules,
            [
                "pattern write caudal/v1/%u/telemetry",
                "pattern read caudal/v1/%u/ack",
                "pattern write caudal/v1/%u/status",
                "pattern read caudal/v1/%u/command",
                "pattern write caudal/v1/%u/command/result",
                "pattern read caudal/v1/%u/config/desired",
                "user caudal-cloud",
                "topic read caudal/v1/+/telemetry",
                "topic write caudal/v1/+/ack",
                "topic read caudal/v1/+/status",
                "topic write caudal/v1/+/command",
                "topic read caudal/v1/+/command/result",
                "topic write caudal/v1/+/config/desired",
            ]
        );
    }

    #[test]
    fn password_file_has_one_line_per_site() {
        let f = mosquitto_password_file([("pozo-1", "$7$1$a$b"), ("pozo-2", "$7$1$c$d")]);
        assert_eq!(f, "pozo-1:$7$1$a$b\npozo-2:$7$1$c$d\n");
    }
}
