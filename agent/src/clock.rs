//! Whether the wall clock can be trusted, and the [`ClockStamp`] every record carries.
//!
//! Boards without a battery-backed clock (Raspberry Pi) boot in 1970, or at the time
//! fake-hwclock saved at the last clean shutdown, and jump to the real time when NTP syncs,
//! minutes or days later on a cellular link. A reading stamped before that is wrong by years.
//!
//! The wall clock is **trusted** when it is plausible and, if `[clock] require_ntp_sync` is on
//! (the default), the kernel reports it synchronised (`adjtimex` does not return `TIME_ERROR`;
//! chrony, ntpd and systemd-timesyncd clear that state when they sync, and the kernel sets it
//! again when no sync has happened for hours). Plausible means not before [`floor`] (this
//! build's time, never before 2024-01-01) and less than [`PLAUSIBLE_SPAN_DAYS`] after it.
//!
//! Every record also carries the boot it was taken in and `CLOCK_BOOTTIME`, which starts at boot,
//! never steps and counts time suspended. When the clock becomes trusted, [`ClockGuard`] sends
//! [`ClockChange::Trusted`] with `wall − boottime`; the outbox re-stamps the held readings of that
//! boot as `boottime_ms + wall_minus_boottime_ms`. A later change of the offset by more than
//! [`STEP_THRESHOLD_MS`] is a step ([`ClockChange::Stepped`]), followed by a new `Trusted` offset.
//!
//! The timestamp of an untrusted stamp is the best estimate available and never 1970: the wall
//! clock when it is plausible (a fake-hwclock time, or a clock the kernel does not call synced, is
//! usually close), otherwise `floor + boottime` (ordered within a boot, never before the build).
//! The outbox holds these records back until they are re-stamped; the estimate only reaches the
//! cloud for a boot whose clock never became trusted, flagged `time_unknown`.

use crate::config::ClockConfig;
use crate::metrics::Metrics;
use crate::outbox::ClockStamp;
use caudal_common::seq::EPOCH_ORIGIN_UNIX;
use caudal_common::{Event, EventKind, Seq};
use chrono::{DateTime, TimeDelta, Utc};
use std::fmt;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

include!(concat!(env!("OUT_DIR"), "/build_time.rs"));

/// A wall clock more than this many days after [`floor`] is implausible (≈ 30 years).
pub const PLAUSIBLE_SPAN_DAYS: i64 = 30 * 365 + 7;

/// How often [`ClockGuard`] looks at the clock while it is not trusted.
pub const UNTRUSTED_POLL: Duration = Duration::from_secs(5);

/// How often [`ClockGuard`] looks at the clock while it is trusted.
pub const TRUSTED_POLL: Duration = Duration::from_secs(60);

/// A change of `wall − boottime` larger than this between two looks, while trusted, is a step.
/// NTP slews at most 0.5 ms/s, 30 ms per [`TRUSTED_POLL`]; a suspend does not move the offset.
pub const STEP_THRESHOLD_MS: u64 = 10_000;

/// Where Linux publishes the id of the current boot.
pub const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// The earliest plausible wall clock: this build's time, and never before 2024-01-01 (a build
/// machine with a broken clock must not lower it to 1970).
pub fn floor() -> DateTime<Utc> {
    // The build script keeps BUILD_UNIX_TIME within chrono's range.
    DateTime::from_timestamp(BUILD_UNIX_TIME.max(EPOCH_ORIGIN_UNIX), 0)
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Errors of the clock's system interface.
#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    #[error("cannot read the boot id from {path}: {source}")]
    BootId {
        path: &'static str,
        source: io::Error,
    },
    #[error("boot id {0:?} read from {BOOT_ID_PATH} is not a UUID")]
    BadBootId(String),
    #[error("clock_gettime(CLOCK_BOOTTIME) failed: {0}")]
    Boottime(io::Error),
    #[error("adjtimex (kernel clock synchronisation state) failed: {0}")]
    Kernel(io::Error),
}

/// Why the wall clock is not trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Distrust {
    /// Not looked at yet.
    Unchecked,
    /// Before this build was made: a board without a clock that booted in 1970 or at an old
    /// fake-hwclock save.
    BeforeBuild { wall: DateTime<Utc> },
    /// More than [`PLAUSIBLE_SPAN_DAYS`] after the build.
    TooFarAhead { wall: DateTime<Utc> },
    /// Plausible, but the kernel reports it unsynchronised and `require_ntp_sync` is on.
    KernelUnsynced,
    /// The kernel could not be asked and `require_ntp_sync` is on.
    KernelUnknown(String),
}

impl fmt::Display for Distrust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Distrust::Unchecked => f.write_str("not checked yet"),
            Distrust::BeforeBuild { wall } => write!(
                f,
                "wall clock reads {wall}, before this build ({})",
                floor()
            ),
            Distrust::TooFarAhead { wall } => write!(
                f,
                "wall clock reads {wall}, more than {PLAUSIBLE_SPAN_DAYS} days after this build ({})",
                floor()
            ),
            Distrust::KernelUnsynced => {
                f.write_str("the kernel reports the clock unsynchronised (no NTP sync yet)")
            }
            Distrust::KernelUnknown(e) => {
                write!(
                    f,
                    "cannot ask the kernel whether the clock is synchronised: {e}"
                )
            }
        }
    }
}

/// Whether `wall` is plausible given the build `floor`.
pub fn plausible(wall: DateTime<Utc>, floor: DateTime<Utc>) -> Result<(), Distrust> {
    if wall < floor {
        return Err(Distrust::BeforeBuild { wall });
    }
    match floor.checked_add_signed(TimeDelta::days(PLAUSIBLE_SPAN_DAYS)) {
        Some(ceiling) if wall > ceiling => Err(Distrust::TooFarAhead { wall }),
        _ => Ok(()),
    }
}

/// The best estimate of the time for a stamp that is not trusted: the wall clock if plausible,
/// else `floor + boottime`.
fn estimate(wall: DateTime<Utc>, boottime_ms: u64, floor: DateTime<Utc>) -> DateTime<Utc> {
    if plausible(wall, floor).is_ok() {
        return wall;
    }
    i64::try_from(boottime_ms)
        .ok()
        .and_then(TimeDelta::try_milliseconds)
        .and_then(|d| floor.checked_add_signed(d))
        .unwrap_or(floor)
}

/// `wall − boottime`, milliseconds.
fn offset_ms(wall: DateTime<Utc>, boottime_ms: u64) -> i64 {
    wall.timestamp_millis()
        .saturating_sub(i64::try_from(boottime_ms).unwrap_or(i64::MAX))
}

/// The clock as the agent sees it; the seam that lets tests drive time and NTP.
pub trait TimeSource: Send + Sync + 'static {
    /// The wall clock (`CLOCK_REALTIME`).
    fn wall(&self) -> DateTime<Utc>;
    /// `CLOCK_BOOTTIME` in milliseconds: from boot, never steps, counts suspend.
    fn boottime_ms(&self) -> u64;
    /// Whether the kernel reports the wall clock synchronised.
    fn kernel_synced(&self) -> Result<bool, ClockError>;
    /// The id of the current boot (a UUID on Linux).
    fn boot_id(&self) -> &str;
}

/// The running system's clocks.
#[derive(Debug)]
pub struct SystemTimeSource {
    boot_id: String,
    /// The last boot time read, returned again should the clock ever fail to read.
    last_boottime_ms: AtomicU64,
}

impl SystemTimeSource {
    /// Reads the boot id and checks that `CLOCK_BOOTTIME` can be read.
    pub fn new() -> Result<Self, ClockError> {
        let raw = std::fs::read_to_string(BOOT_ID_PATH).map_err(|source| ClockError::BootId {
            path: BOOT_ID_PATH,
            source,
        })?;
        let id = raw.trim();
        if !is_uuid(id) {
            return Err(ClockError::BadBootId(id.to_string()));
        }
        let boot = sys::boottime().map_err(ClockError::Boottime)?;
        Ok(SystemTimeSource {
            boot_id: id.to_string(),
            last_boottime_ms: AtomicU64::new(millis(boot)),
        })
    }
}

impl TimeSource for SystemTimeSource {
    fn wall(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn boottime_ms(&self) -> u64 {
        match sys::boottime() {
            Ok(d) => {
                let ms = millis(d);
                self.last_boottime_ms.fetch_max(ms, Ordering::Relaxed);
                ms
            }
            // `new` read this clock, so the kernel has it; a failure now cannot happen short of
            // a broken kernel, and a repeated value beats a made-up one.
            Err(e) => {
                tracing::warn!(error = %e, "clock_gettime(CLOCK_BOOTTIME) failed");
                self.last_boottime_ms.load(Ordering::Relaxed)
            }
        }
    }

    fn kernel_synced(&self) -> Result<bool, ClockError> {
        sys::ntp_state()
            .map(|state| state != libc::TIME_ERROR)
            .map_err(ClockError::Kernel)
    }

    fn boot_id(&self) -> &str {
        &self.boot_id
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// The two system calls behind [`SystemTimeSource`].
mod sys {
    use std::io;
    use std::time::Duration;

    /// `clock_gettime(CLOCK_BOOTTIME)`.
    #[allow(unsafe_code)]
    pub(super) fn boottime() -> io::Result<Duration> {
        // SAFETY: `timespec` is plain old data, for which all-zero bytes are a valid value.
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        // SAFETY: `ts` is a valid, writable `timespec` that outlives the call.
        if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
        let nanos = u32::try_from(ts.tv_nsec).unwrap_or(0);
        Ok(Duration::new(secs, nanos))
    }

    /// The kernel's clock state from `adjtimex` with no modes set (read only, no privilege):
    /// `TIME_ERROR` while unsynchronised.
    #[allow(unsafe_code)]
    pub(super) fn ntp_state() -> io::Result<i32> {
        // SAFETY: `timex` is plain old data, for which all-zero bytes are a valid value; zero
        // `modes` asks the kernel to change nothing.
        let mut tx: libc::timex = unsafe { std::mem::zeroed() };
        // SAFETY: `tx` is a valid, writable `timex` that outlives the call.
        let state = unsafe { libc::adjtimex(&mut tx) };
        if state < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(state)
    }
}

/// A [`TimeSource`] for tests and simulations: wall and boot clocks advance with tokio's clock
/// (paused time included), and the wall clock and kernel state are set by hand.
#[derive(Debug)]
pub struct ManualTime {
    boot_id: String,
    state: Mutex<Manual>,
}

#[derive(Debug)]
struct Manual {
    origin: tokio::time::Instant,
    wall_at_origin: DateTime<Utc>,
    boottime_at_origin_ms: u64,
    synced: Option<bool>,
}

impl Manual {
    fn elapsed_ms(&self) -> u64 {
        millis(tokio::time::Instant::now().saturating_duration_since(self.origin))
    }
}

impl ManualTime {
    /// Clocks reading `wall` and `boottime_ms` now. `synced`: the kernel's answer, `None` when
    /// the kernel cannot be asked.
    pub fn new(
        boot_id: impl Into<String>,
        wall: DateTime<Utc>,
        boottime_ms: u64,
        synced: Option<bool>,
    ) -> Self {
        ManualTime {
            boot_id: boot_id.into(),
            state: Mutex::new(Manual {
                origin: tokio::time::Instant::now(),
                wall_at_origin: wall,
                boottime_at_origin_ms: boottime_ms,
                synced,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Manual> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Steps the wall clock to `wall` (what NTP or `date -s` does); the boot clock goes on.
    pub fn set_wall(&self, wall: DateTime<Utc>) {
        let mut s = self.lock();
        let back = TimeDelta::try_milliseconds(i64::try_from(s.elapsed_ms()).unwrap_or(i64::MAX))
            .unwrap_or(TimeDelta::MAX);
        s.wall_at_origin = wall.checked_sub_signed(back).unwrap_or(wall);
    }

    /// Sets the kernel's answer; `None` when it cannot be asked.
    pub fn set_synced(&self, synced: Option<bool>) {
        self.lock().synced = synced;
    }
}

impl TimeSource for ManualTime {
    fn wall(&self) -> DateTime<Utc> {
        let s = self.lock();
        TimeDelta::try_milliseconds(i64::try_from(s.elapsed_ms()).unwrap_or(i64::MAX))
            .and_then(|d| s.wall_at_origin.checked_add_signed(d))
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }

    fn boottime_ms(&self) -> u64 {
        let s = self.lock();
        s.boottime_at_origin_ms.saturating_add(s.elapsed_ms())
    }

    fn kernel_synced(&self) -> Result<bool, ClockError> {
        self.lock().synced.ok_or_else(|| {
            ClockError::Kernel(io::Error::other("the simulated kernel does not answer"))
        })
    }

    fn boot_id(&self) -> &str {
        &self.boot_id
    }
}

/// Stamps records; cheap to clone, one per component that takes readings or events.
#[derive(Clone)]
pub struct Clock {
    source: Arc<dyn TimeSource>,
    trusted: watch::Receiver<bool>,
    floor: DateTime<Utc>,
}

impl Clock {
    /// A clock reading `source`, trusted while [`ClockGuard`] says so on `trusted`.
    pub fn new(source: Arc<dyn TimeSource>, trusted: watch::Receiver<bool>) -> Clock {
        Clock {
            source,
            trusted,
            floor: floor(),
        }
    }

    /// The timestamp for a record taken now, and how the clock stood. Never 1970: see the
    /// module doc for the estimate an untrusted stamp carries.
    pub fn stamp(&self) -> (DateTime<Utc>, ClockStamp) {
        let boottime_ms = self.source.boottime_ms();
        let wall = self.source.wall();
        // The guard looks every minute; a wall clock that became absurd since is caught here.
        let trusted = *self.trusted.borrow() && plausible(wall, self.floor).is_ok();
        let ts = if trusted {
            wall
        } else {
            estimate(wall, boottime_ms, self.floor)
        };
        let stamp = ClockStamp {
            trusted,
            boot_id: self.source.boot_id().to_string(),
            boottime_ms,
        };
        (ts, stamp)
    }

    /// Whether records stamped now are trusted.
    pub fn is_trusted(&self) -> bool {
        *self.trusted.borrow()
    }
}

/// A change of the clock's trust, sent by [`ClockGuard`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClockChange {
    /// The clock is trusted (at start, after being untrusted, or after a step). Readings of
    /// `boot_id` get `ts = boottime_ms + wall_minus_boottime_ms`: pass both to the outbox's
    /// `restamp`.
    Trusted {
        boot_id: String,
        wall_minus_boottime_ms: i64,
        at: DateTime<Utc>,
    },
    /// The clock is not trusted (at start, or trust was lost); `at` is the stamp's estimate.
    Untrusted { reason: Distrust, at: DateTime<Utc> },
    /// While trusted, `wall − boottime` jumped from `from_ms` to `to_ms`: records stamped since
    /// the previous look may carry the old time. A `Trusted` change with `to_ms` follows when the
    /// clock is still trusted.
    Stepped {
        boot_id: String,
        from_ms: i64,
        to_ms: i64,
        at: DateTime<Utc>,
    },
}

impl ClockChange {
    /// The event recording this change (its `seq` is left to the outbox). For `Trusted` it is
    /// `clock_synced`, whose `current` the caller sets to the number of readings re-stamped. A
    /// step is `clock_unsynced` (the clock was wrong before or after it), with the offsets in
    /// seconds as `previous` and `current`.
    pub fn event(&self) -> Event {
        let (ts, kind, message, previous, current) = match self {
            ClockChange::Trusted {
                boot_id,
                wall_minus_boottime_ms,
                at,
            } => (
                *at,
                EventKind::ClockSynced,
                format!(
                    "wall clock trusted; boot {boot_id}: wall − boottime = {wall_minus_boottime_ms} ms"
                ),
                None,
                None,
            ),
            ClockChange::Untrusted { reason, at } => (
                *at,
                EventKind::ClockUnsynced,
                format!("wall clock not trusted: {reason}"),
                None,
                None,
            ),
            ClockChange::Stepped {
                boot_id,
                from_ms,
                to_ms,
                at,
            } => (
                *at,
                EventKind::ClockUnsynced,
                format!(
                    "wall clock stepped {:+.3} s while trusted; boot {boot_id}: wall − boottime {from_ms} → {to_ms} ms",
                    to_ms.saturating_sub(*from_ms) as f64 / 1000.0
                ),
                Some(*from_ms as f64 / 1000.0),
                Some(*to_ms as f64 / 1000.0),
            ),
        };
        Event {
            seq: Seq(0),
            ts,
            device: None,
            kind,
            message,
            previous,
            current,
            wrap: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Trust {
    Untrusted(Distrust),
    Trusted { offset_ms: i64 },
}

/// Watches the wall clock: publishes whether it is trusted, sets `metrics.clock_trusted`, and
/// sends a [`ClockChange`] whenever trust or the offset changes.
pub struct ClockGuard {
    require_ntp_sync: bool,
    source: Arc<dyn TimeSource>,
    metrics: Arc<Metrics>,
    trusted: watch::Sender<bool>,
    changes: mpsc::Sender<ClockChange>,
    floor: DateTime<Utc>,
    state: Trust,
    /// Changes not yet sent.
    pending: Vec<ClockChange>,
}

impl ClockGuard {
    /// Looks at the clock once, so `trusted` holds the right value before [`run`] starts, and
    /// queues the first change (`Trusted` or `Untrusted`) for it. `changes` is bounded: when it
    /// is full the guard waits (changes are rare and the outbox needs every `Trusted`).
    ///
    /// [`run`]: ClockGuard::run
    pub fn new(
        config: &ClockConfig,
        source: Arc<dyn TimeSource>,
        metrics: Arc<Metrics>,
        trusted: watch::Sender<bool>,
        changes: mpsc::Sender<ClockChange>,
    ) -> Self {
        let mut guard = ClockGuard {
            require_ntp_sync: config.require_ntp_sync,
            source,
            metrics,
            trusted,
            changes,
            floor: floor(),
            state: Trust::Untrusted(Distrust::Unchecked),
            pending: Vec::new(),
        };
        guard.pending = guard.check();
        guard
    }

    /// Looks at the clock every [`UNTRUSTED_POLL`] or [`TRUSTED_POLL`] until `shutdown`.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            for change in std::mem::take(&mut self.pending) {
                tokio::select! {
                    biased;
                    () = &mut shutdown => return,
                    sent = self.changes.send(change) => if sent.is_err() {
                        tracing::debug!("nobody receives clock changes");
                    },
                }
            }
            let period = match self.state {
                Trust::Trusted { .. } => TRUSTED_POLL,
                Trust::Untrusted(_) => UNTRUSTED_POLL,
            };
            tokio::select! {
                biased;
                () = &mut shutdown => return,
                () = tokio::time::sleep(period) => {}
            }
            self.pending = self.check();
        }
    }

    fn assess(&self, wall: DateTime<Utc>) -> Result<(), Distrust> {
        plausible(wall, self.floor)?;
        if self.require_ntp_sync {
            match self.source.kernel_synced() {
                Ok(true) => {}
                Ok(false) => return Err(Distrust::KernelUnsynced),
                Err(e) => return Err(Distrust::KernelUnknown(e.to_string())),
            }
        }
        Ok(())
    }

    /// One look at the clock: the new state, published, and the changes to send.
    fn check(&mut self) -> Vec<ClockChange> {
        let boottime_ms = self.source.boottime_ms();
        let wall = self.source.wall();
        let offset = offset_ms(wall, boottime_ms);
        let at = estimate(wall, boottime_ms, self.floor);
        let boot_id = self.source.boot_id().to_string();
        let trusted = |boot_id: String| ClockChange::Trusted {
            boot_id,
            wall_minus_boottime_ms: offset,
            at,
        };
        let mut changes = Vec::new();
        let next = match (&self.state, self.assess(wall)) {
            (Trust::Trusted { offset_ms: last }, Ok(())) => {
                if last.abs_diff(offset) > STEP_THRESHOLD_MS {
                    tracing::warn!(
                        %boot_id,
                        from_ms = last,
                        to_ms = offset,
                        "wall clock stepped while trusted"
                    );
                    changes.push(ClockChange::Stepped {
                        boot_id: boot_id.clone(),
                        from_ms: *last,
                        to_ms: offset,
                        at,
                    });
                    changes.push(trusted(boot_id));
                }
                // Following the offset every look lets NTP's slow slewing never add up to a step.
                Trust::Trusted { offset_ms: offset }
            }
            (Trust::Untrusted(_), Ok(())) => {
                tracing::info!(
                    %boot_id,
                    wall_minus_boottime_ms = offset,
                    %wall,
                    "wall clock trusted"
                );
                changes.push(trusted(boot_id));
                Trust::Trusted { offset_ms: offset }
            }
            (Trust::Trusted { .. }, Err(reason)) => {
                tracing::warn!(%reason, "wall clock no longer trusted");
                changes.push(ClockChange::Untrusted {
                    reason: reason.clone(),
                    at,
                });
                Trust::Untrusted(reason)
            }
            (Trust::Untrusted(old), Err(reason)) => {
                if *old == Distrust::Unchecked {
                    tracing::warn!(%reason, "wall clock not trusted; readings are held until it is");
                    changes.push(ClockChange::Untrusted {
                        reason: reason.clone(),
                        at,
                    });
                } else if *old != reason {
                    tracing::info!(%reason, "wall clock still not trusted");
                }
                Trust::Untrusted(reason)
            }
        };
        self.state = next;
        let is_trusted = matches!(self.state, Trust::Trusted { .. });
        self.metrics.clock_trusted.set(i64::from(is_trusted));
        self.trusted.send_if_modified(|t| {
            let changed = *t != is_trusted;
            *t = is_trusted;
            changed
        });
        changes
    }
}

#[cfg(test)]
mod tests;
