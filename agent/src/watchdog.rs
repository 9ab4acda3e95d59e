//! Liveness towards the service manager: `READY=1` once the agent runs, `STOPPING=1` when it
//! stops, and a watchdog petted (`WATCHDOG=1`) only while every live loop makes progress.
//!
//! Each live loop (one poller per bus, the store task, the uplink) holds a [`Heartbeat`] and
//! beats it every time round its loop. A loop that is waiting for something slow still loops:
//! a poller whose device is dead times out and beats after every attempt, the uplink waiting
//! for a broker wakes from its back-off at least every [`Heartbeat::every`]. Only a loop stuck
//! in an `await` that never returns (a hung serial driver, a wedged SQLite call, a deadlock)
//! stops beating. The [`Watchdog`] task pets the service manager every `WatchdogSec / 4`, and
//! only if every heartbeat is younger than `WatchdogSec / 2`; when one is not, it stops petting
//! and names the loop in the log, and systemd restarts the agent `WatchdogSec` after the last
//! pet. A restart loses nothing committed: the outbox is on disk.
//!
//! Without a watchdog (no `WATCHDOG_USEC`, e.g. run by hand or in tests) the heartbeats are
//! kept all the same and nothing is sent; without `NOTIFY_SOCKET` every notification is a no-op.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// How often live loops wake to beat when no watchdog is configured.
const UNWATCHED_EVERY: Duration = Duration::from_secs(30);
/// Shortest beat interval, whatever `WatchdogSec` says (a loop waking more often is waste).
const MIN_EVERY: Duration = Duration::from_millis(100);

/// The heartbeats of every live loop of one agent.
#[derive(Clone, Debug)]
pub struct Liveness {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    origin: Instant,
    every: Duration,
    loops: Mutex<Vec<(String, Arc<AtomicU64>)>>,
}

/// One live loop's heartbeat: beat it every time round the loop.
#[derive(Clone, Debug)]
pub struct Heartbeat {
    origin: Instant,
    every: Duration,
    /// Milliseconds from `origin` to the last beat.
    last_ms: Arc<AtomicU64>,
}

/// A live loop whose last beat is too old.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stale {
    pub name: String,
    pub silent_for: Duration,
}

impl Liveness {
    /// Heartbeats for a watchdog of period `watchdog` (systemd's `WatchdogSec`), or for none.
    pub fn new(watchdog: Option<Duration>) -> Liveness {
        let every = watchdog.map_or(UNWATCHED_EVERY, |w| (w / 4).max(MIN_EVERY));
        Liveness {
            inner: Arc::new(Inner {
                origin: Instant::now(),
                every,
                loops: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Registers a live loop (named in the log when it goes silent); it counts as having just
    /// beaten.
    pub fn register(&self, name: impl Into<String>) -> Heartbeat {
        let beat = Heartbeat {
            origin: self.inner.origin,
            every: self.inner.every,
            last_ms: Arc::new(AtomicU64::new(0)),
        };
        beat.beat();
        self.inner
            .loops
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((name.into(), beat.last_ms.clone()));
        beat
    }

    /// How often a live loop must beat at the latest (and how often the watchdog looks).
    pub fn every(&self) -> Duration {
        self.inner.every
    }

    /// The loops that have not beaten within `max_silence`, oldest first.
    pub fn stale(&self, max_silence: Duration) -> Vec<Stale> {
        let now = elapsed_ms(self.inner.origin);
        let limit = u64::try_from(max_silence.as_millis()).unwrap_or(u64::MAX);
        let loops = self
            .inner
            .loops
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut stale: Vec<Stale> = loops
            .iter()
            .filter_map(|(name, last)| {
                let silent = now.saturating_sub(last.load(Ordering::Relaxed));
                (silent > limit).then(|| Stale {
                    name: name.clone(),
                    silent_for: Duration::from_millis(silent),
                })
            })
            .collect();
        stale.sort_by_key(|s| std::cmp::Reverse(s.silent_for));
        stale
    }
}

impl Heartbeat {
    /// A heartbeat nobody watches, for a component run on its own (tests, tools).
    pub fn unwatched() -> Heartbeat {
        Liveness::new(None).register("unwatched")
    }

    /// Records progress now.
    pub fn beat(&self) {
        self.last_ms
            .store(elapsed_ms(self.origin), Ordering::Relaxed);
    }

    /// The longest a loop may wait before it wakes to beat.
    pub fn every(&self) -> Duration {
        self.every
    }
}

fn elapsed_ms(origin: Instant) -> u64 {
    u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The service manager's watchdog period for this process (`WATCHDOG_USEC`, if `WATCHDOG_PID`
/// is absent or ours).
pub fn configured() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// Tells the service manager the agent is up (outbox open, every task running).
pub fn ready() {
    notify(sd_notify::NotifyState::Ready);
}

/// Tells the service manager the agent is stopping (so a slow drain is not taken for a hang).
pub fn stopping() {
    notify(sd_notify::NotifyState::Stopping);
}

fn notify(state: sd_notify::NotifyState<'_>) {
    // Not running under a service manager is normal; failing to reach one is worth a line, not
    // a stop: the agent's work does not depend on it.
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// Pets the service manager's watchdog while every live loop is fresh.
#[derive(Debug)]
pub struct Watchdog {
    liveness: Liveness,
    period: Duration,
}

impl Watchdog {
    /// `period` is the service manager's watchdog period (`WatchdogSec`).
    pub fn new(liveness: Liveness, period: Duration) -> Watchdog {
        Watchdog { liveness, period }
    }

    /// Whether the watchdog may be petted now: `Ok` when every loop beat within half the
    /// period, else the silent loops.
    pub fn check(&self) -> Result<(), Vec<Stale>> {
        let stale = self.liveness.stale(self.period / 2);
        if stale.is_empty() { Ok(()) } else { Err(stale) }
    }

    /// Checks every quarter period and pets when [`Watchdog::check`] allows, until `shutdown`.
    /// `pet` is the seam to the service manager ([`Watchdog::run`] passes `WATCHDOG=1`).
    pub async fn run_with(
        self,
        shutdown: impl std::future::Future<Output = ()>,
        mut pet: impl FnMut(),
    ) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(self.liveness.every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut silent: Vec<String> = Vec::new();
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => return,
                _ = tick.tick() => {}
            }
            match self.check() {
                Ok(()) => {
                    if !silent.is_empty() {
                        tracing::info!("every live loop beats again; watchdog petted");
                        silent.clear();
                    }
                    pet();
                }
                Err(stale) => {
                    let names: Vec<String> = stale.iter().map(|s| s.name.clone()).collect();
                    // Once per change of the silent set: the error repeats every tick otherwise.
                    if names != silent {
                        tracing::error!(
                            loops = %names.join(", "),
                            silent_s = stale[0].silent_for.as_secs(),
                            "live loop stopped making progress; not petting the watchdog, the service manager will restart the agent"
                        );
                        silent = names;
                    }
                }
            }
        }
    }

    /// [`Watchdog::run_with`] petting the service manager.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        self.run_with(shutdown, || notify(sd_notify::NotifyState::Watchdog))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::time::{advance, sleep};

    const PERIOD: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn beats_are_fresh_then_stale_after_half_the_period() {
        let live = Liveness::new(Some(PERIOD));
        assert_eq!(live.every(), Duration::from_secs(15));
        let a = live.register("poller:rs485");
        let b = live.register("uplink");
        let dog = Watchdog::new(live.clone(), PERIOD);
        assert_eq!(dog.check(), Ok(()));

        advance(Duration::from_secs(29)).await;
        a.beat();
        assert_eq!(dog.check(), Ok(()));

        advance(Duration::from_secs(2)).await;
        // b last beat 31 s ago; a 2 s ago.
        let stale = dog.check().unwrap_err();
        assert_eq!(stale.len(), 1);
        assert_eq!(stale[0].name, "uplink");
        assert_eq!(stale[0].silent_for, Duration::from_secs(31));

        b.beat();
        assert_eq!(dog.check(), Ok(()));
    }

    #[tokio::test(start_paused = true)]
    async fn stale_loops_are_listed_oldest_first() {
        let live = Liveness::new(Some(PERIOD));
        let _store = live.register("store");
        advance(Duration::from_secs(10)).await;
        let _uplink = live.register("uplink");
        advance(Duration::from_secs(40)).await;
        let names: Vec<String> = live.stale(PERIOD / 2).into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["store", "uplink"]);
    }

    /// A loop that keeps looping (like a poller timing out against a dead device) keeps the
    /// watchdog petted; one stuck in an await that never returns stops it.
    #[tokio::test(start_paused = true)]
    async fn pets_while_loops_run_and_stops_when_one_hangs() {
        let live = Liveness::new(Some(PERIOD));
        let looping = live.register("poller:dead-device");
        let hung = live.register("uplink");
        let hang = tokio_util::sync::CancellationToken::new();

        tokio::spawn(async move {
            loop {
                // A request that times out after 3 s, then the next one.
                sleep(Duration::from_secs(3)).await;
                looping.beat();
            }
        });
        let release = hang.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = release.cancelled() => std::future::pending::<()>().await,
                    () = sleep(hung.every()) => hung.beat(),
                }
            }
        });

        let pets = Arc::new(AtomicUsize::new(0));
        let counted = pets.clone();
        let stop = tokio_util::sync::CancellationToken::new();
        let dog = tokio::spawn(Watchdog::new(live, PERIOD).run_with(
            stop.clone().cancelled_owned(),
            move || {
                counted.fetch_add(1, Ordering::Relaxed);
            },
        ));

        sleep(Duration::from_secs(10 * 60)).await;
        let healthy = pets.load(Ordering::Relaxed);
        // One pet every 15 s over 10 min (the first at once).
        assert!(healthy >= 40, "pets while healthy: {healthy}");

        hang.cancel();
        // From here the uplink never beats again: within half a period petting stops for good.
        sleep(PERIOD / 2 + Duration::from_secs(15)).await;
        let at_hang = pets.load(Ordering::Relaxed);
        sleep(Duration::from_secs(10 * 60)).await;
        assert_eq!(
            pets.load(Ordering::Relaxed),
            at_hang,
            "petted while a loop hung"
        );

        stop.cancel();
        dog.await.unwrap();
    }

    #[test]
    fn period_sets_the_beat_interval() {
        assert_eq!(Liveness::new(None).every(), UNWATCHED_EVERY);
        assert_eq!(
            Liveness::new(Some(Duration::from_secs(120))).every(),
            Duration::from_secs(30)
        );
        assert_eq!(
            Liveness::new(Some(Duration::from_millis(100))).every(),
            MIN_EVERY
        );
    }
}
