//! Login throttling: what a password guesser, or a crowd of logins at once, may cost the cloud.
//!
//! Owns three bounds, all checked by `session::sign_in` before a password is hashed:
//! - **Hash slots.** Argon2id takes ~19 MiB and tens of milliseconds of CPU per check by design;
//!   the checks run on `auth.max_parallel_hashes` threads of their own. A login waits up to
//!   `auth.login_wait_s` for one, then gets `503` with `Retry-After`. So 600 logins at once
//!   cost the memory of a few hashes, not of 600, and the other modules (the ingest acking
//!   batches) keep their CPU. The threads are fixed, not tokio's blocking pool, and each keeps
//!   its hash memory between checks (`auth::verify_password_reusing`): measured with 600
//!   logins at once and two threads, the process's peak grew 31 MiB; on the blocking pool,
//!   allocating per check, 354 MiB (freed hash memory stays with the allocator). The test
//!   `six_hundred_logins_at_once…` holds the bound.
//! - **Per address.** Each client address may try `auth.address_attempts` logins per
//!   `auth.address_window_s`, right or wrong; then `429` with `Retry-After` until the window
//!   ends. Behind a reverse proxy every client shares the proxy's address, so with
//!   `http.trust_forwarded_for` the address is the last `X-Forwarded-For` entry (the one the
//!   proxy appended).
//! - **Per account.** `auth.account_failures` wrong passwords for one email per
//!   `auth.account_window_s` close that email to logins (`429`) until the window ends; a
//!   success clears its count. Unknown emails are counted the same, so the answer does not say
//!   which accounts exist.
//!
//! **Memory rule** (enforced in [`Windows::hit`]): each table holds at most [`MAX_TRACKED`]
//! keys; when full, the expired windows go first, then the oldest, so spraying addresses or
//! emails cannot grow it.

use crate::core::config::AuthConfig;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, oneshot};

/// Most keys one table tracks.
pub const MAX_TRACKED: usize = 50_000;

/// Why a login was not tried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Throttled {
    #[error("too many logins from this address; try again in {retry_after_s} s")]
    Address { retry_after_s: u64 },
    #[error("too many wrong passwords for this account; try again in {retry_after_s} s")]
    Account { retry_after_s: u64 },
    #[error("too many logins at once; try again in {retry_after_s} s")]
    Busy { retry_after_s: u64 },
}

impl Throttled {
    pub fn retry_after_s(&self) -> u64 {
        match self {
            Throttled::Address { retry_after_s }
            | Throttled::Account { retry_after_s }
            | Throttled::Busy { retry_after_s } => *retry_after_s,
        }
    }

    /// The `caudal_cloud_auth_logins_total{kind}` this refusal counts as.
    pub fn kind(&self) -> &'static str {
        match self {
            Throttled::Address { .. } => "throttled_address",
            Throttled::Account { .. } => "throttled_account",
            Throttled::Busy { .. } => "busy",
        }
    }
}

/// Fixed windows of counts per key.
#[derive(Debug)]
struct Windows {
    window: Duration,
    limit: u32,
    counts: HashMap<String, (Instant, u32)>,
}

impl Windows {
    fn new(window: Duration, limit: u32) -> Windows {
        Windows {
            window,
            limit,
            counts: HashMap::new(),
        }
    }

    /// Seconds until `key`'s window ends when it is at its limit, else `None`.
    fn blocked(&self, key: &str, now: Instant) -> Option<u64> {
        let (start, n) = self.counts.get(key)?;
        let ends = *start + self.window;
        (*n >= self.limit && ends > now).then(|| ends.duration_since(now).as_secs().max(1))
    }

    /// Counts one for `key` (a new window when its last one ended).
    fn hit(&mut self, key: &str, now: Instant) {
        if let Some((start, n)) = self.counts.get_mut(key) {
            if *start + self.window <= now {
                *start = now;
                *n = 0;
            }
            *n = n.saturating_add(1);
            return;
        }
        if self.counts.len() >= MAX_TRACKED {
            let window = self.window;
            self.counts.retain(|_, (start, _)| *start + window > now);
        }
        if self.counts.len() >= MAX_TRACKED
            && let Some(oldest) = self
                .counts
                .iter()
                .min_by_key(|(_, (start, _))| *start)
                .map(|(k, _)| k.clone())
        {
            self.counts.remove(&oldest);
        }
        self.counts.insert(key.to_string(), (now, 1));
    }

    fn clear(&mut self, key: &str) {
        self.counts.remove(key);
    }

    fn len(&self) -> usize {
        self.counts.len()
    }
}

/// A password check waiting for a hash thread.
type Job = Box<dyn FnOnce() + Send>;

/// The threads password checks run on: a fixed few, fed through a channel.
#[derive(Debug)]
struct HashThreads {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl HashThreads {
    fn start(n: usize) -> HashThreads {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let rx = std::sync::Arc::new(Mutex::new(rx));
        for i in 0..n {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("caudal-hash-{i}"))
                .spawn(move || {
                    loop {
                        // The lock is held only to take one job; it ends when the guard drops.
                        let job = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(p) => p.into_inner().recv(),
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "a password check thread could not start");
            }
        }
        HashThreads { jobs: tx }
    }

    /// Runs `f` on a hash thread; `None` when no thread runs.
    async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs.send(job).ok()?;
        rx.await.ok()
    }
}

/// The login bounds of one process (shared by the API and the console).
#[derive(Debug)]
pub struct LoginGuard {
    hashes: Semaphore,
    threads: HashThreads,
    wait: Duration,
    addresses: Mutex<Windows>,
    accounts: Mutex<Windows>,
    trust_forwarded_for: bool,
}

impl LoginGuard {
    pub fn new(auth: &AuthConfig, trust_forwarded_for: bool) -> LoginGuard {
        LoginGuard {
            hashes: Semaphore::new(auth.max_parallel_hashes.max(1)),
            threads: HashThreads::start(auth.max_parallel_hashes.max(1)),
            wait: Duration::from_secs(auth.login_wait_s),
            addresses: Mutex::new(Windows::new(
                Duration::from_secs(auth.address_window_s),
                auth.address_attempts,
            )),
            accounts: Mutex::new(Windows::new(
                Duration::from_secs(auth.account_window_s),
                auth.account_failures,
            )),
            trust_forwarded_for,
        }
    }

    /// The address a login counts against.
    pub fn address_of(&self, client: &ClientAddr) -> Option<IpAddr> {
        if self.trust_forwarded_for
            && let Some(forwarded) = client.forwarded
        {
            return Some(forwarded);
        }
        client.peer
    }

    /// Counts an attempt from `address` and checks `email`'s failures: `Err` when either is
    /// over its limit (nothing is hashed then).
    pub fn admit(&self, address: Option<IpAddr>, email: &str) -> Result<(), Throttled> {
        let now = Instant::now();
        if let Some(a) = address {
            let key = a.to_string();
            let mut w = lock(&self.addresses);
            if let Some(retry_after_s) = w.blocked(&key, now) {
                return Err(Throttled::Address { retry_after_s });
            }
            w.hit(&key, now);
        }
        if let Some(retry_after_s) = lock(&self.accounts).blocked(&account_key(email), now) {
            return Err(Throttled::Account { retry_after_s });
        }
        Ok(())
    }

    /// Runs the password check `f` on a hash thread, once one is free within
    /// `auth.login_wait_s`; `Ok(None)` if the thread died with it.
    pub async fn check<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<Option<T>, Throttled> {
        let busy = Throttled::Busy {
            retry_after_s: self.wait.as_secs().max(1),
        };
        let _slot = match tokio::time::timeout(self.wait, self.hashes.acquire()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) | Err(_) => return Err(busy),
        };
        Ok(self.threads.run(f).await)
    }

    /// Records the outcome of a checked password for `email`.
    pub fn checked(&self, email: &str, ok: bool) {
        let key = account_key(email);
        let mut w = lock(&self.accounts);
        if ok {
            w.clear(&key);
        } else {
            w.hit(&key, Instant::now());
        }
    }

    /// Keys tracked (addresses, accounts): for tests and the memory bound.
    pub fn tracked(&self) -> (usize, usize) {
        (lock(&self.addresses).len(), lock(&self.accounts).len())
    }
}

fn account_key(email: &str) -> String {
    email.trim().to_lowercase()
}

/// A poisoned lock only means another request panicked while counting: the counts stay usable.
fn lock(m: &Mutex<Windows>) -> std::sync::MutexGuard<'_, Windows> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Where a request came from: the TCP peer, and the last `X-Forwarded-For` entry if any (used
/// only with `http.trust_forwarded_for`). Never refuses a request.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientAddr {
    pub peer: Option<IpAddr>,
    pub forwarded: Option<IpAddr>,
}

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(a)| a.ip());
        let forwarded = parts
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .next_back()
            .and_then(|a| a.trim().parse().ok());
        Ok(ClientAddr { peer, forwarded })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(addresses: u32, failures: u32) -> LoginGuard {
        let auth = AuthConfig {
            address_attempts: addresses,
            account_failures: failures,
            ..AuthConfig::default()
        };
        LoginGuard::new(&auth, false)
    }

    #[test]
    fn an_address_over_its_attempts_waits_for_its_window() {
        let g = guard(3, 100);
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        for _ in 0..3 {
            g.admit(a, "ana@x.cl").expect("within the limit");
        }
        let refused = g.admit(a, "ana@x.cl").expect_err("over");
        assert!(matches!(refused, Throttled::Address { retry_after_s } if retry_after_s >= 1));
        g.admit(Some(IpAddr::from([10, 0, 0, 2])), "ana@x.cl")
            .expect("another address is not held back");
    }

    #[test]
    fn wrong_passwords_close_an_account_and_a_success_clears_them() {
        let g = guard(1000, 2);
        g.checked("Ana@x.cl", false);
        g.admit(None, "ana@x.cl").expect("one failure");
        g.checked("ana@x.cl", true);
        g.checked("ana@x.cl", false);
        g.admit(None, "ana@x.cl").expect("cleared by the success");
        g.checked("ana@x.cl", false);
        assert!(matches!(
            g.admit(None, " ANA@x.cl"),
            Err(Throttled::Account { .. })
        ));
        g.admit(None, "ben@x.cl").expect("other accounts go on");
    }

    #[test]
    fn a_spray_of_addresses_cannot_grow_the_table() {
        let g = guard(5, 5);
        for i in 0..(MAX_TRACKED as u32 + 1000) {
            g.admit(Some(IpAddr::from(i.to_be_bytes())), "x@x.cl")
                .expect("first attempt");
        }
        assert_eq!(g.tracked().0, MAX_TRACKED);
    }

    #[tokio::test]
    async fn a_login_waits_for_a_hash_thread_then_is_told_to_come_back() {
        let auth = AuthConfig {
            max_parallel_hashes: 1,
            login_wait_s: 1,
            ..AuthConfig::default()
        };
        let g = std::sync::Arc::new(LoginGuard::new(&auth, false));
        let (release, held) = std::sync::mpsc::channel::<()>();
        let first = {
            let g = g.clone();
            tokio::spawn(async move { g.check(move || held.recv().is_ok()).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(matches!(
            g.check(|| true).await,
            Err(Throttled::Busy { retry_after_s: 1 })
        ));
        release.send(()).expect("released");
        assert_eq!(first.await.expect("task"), Ok(Some(true)));
        assert_eq!(g.check(|| 7).await, Ok(Some(7)), "free again");
    }
}
