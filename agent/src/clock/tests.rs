//! Tests of clock trust with a driven time source and paused tokio time, and of the system
//! source on this machine.

use super::*;
use chrono::Datelike;
use proptest::prelude::*;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

const BOOT: &str = "2d0c5a3e-9b1f-4f7e-8a47-6f1e3c2b9d10";

fn unix(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, 0).expect("timestamp")
}

fn after_floor(days: i64) -> DateTime<Utc> {
    floor() + TimeDelta::days(days)
}

struct Rig {
    source: Arc<ManualTime>,
    clock: Clock,
    trusted: watch::Receiver<bool>,
    changes: mpsc::Receiver<ClockChange>,
    metrics: Arc<Metrics>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Rig {
    /// The next change; fails rather than waits forever (paused time would run on endlessly).
    async fn next(&mut self) -> ClockChange {
        tokio::time::timeout(Duration::from_secs(3600), self.changes.recv())
            .await
            .expect("a clock change within an hour")
            .expect("the guard runs")
    }

    fn is_trusted(&self) -> bool {
        *self.trusted.borrow()
    }
}

/// A guard over a manual clock reading `wall` and `boottime_ms`, already running.
fn rig(wall: DateTime<Utc>, boottime_ms: u64, synced: Option<bool>, require: bool) -> Rig {
    let source = Arc::new(ManualTime::new(BOOT, wall, boottime_ms, synced));
    let (trusted_tx, trusted) = watch::channel(false);
    let (changes_tx, changes) = mpsc::channel(8);
    let metrics = Metrics::new();
    let config = ClockConfig {
        require_ntp_sync: require,
    };
    let guard = ClockGuard::new(
        &config,
        source.clone(),
        metrics.clone(),
        trusted_tx,
        changes_tx,
    );
    let clock = Clock::new(source.clone(), trusted.clone());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(guard.run(async {
        let _ = stopped.await;
    }));
    Rig {
        source,
        clock,
        trusted,
        changes,
        metrics,
        stop,
        task,
    }
}

fn offset_of(change: &ClockChange) -> i64 {
    match change {
        ClockChange::Trusted {
            boot_id,
            wall_minus_boottime_ms,
            ..
        } => {
            assert_eq!(boot_id, BOOT);
            *wall_minus_boottime_ms
        }
        other => panic!("expected Trusted, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_board_booted_in_1970_is_trusted_once_ntp_syncs_with_the_right_offset() {
    let mut r = rig(unix(5), 5_000, Some(false), true);
    assert!(!r.is_trusted(), "known before the guard first runs");
    assert_eq!(r.metrics.clock_trusted.get(), 0);
    let first = r.next().await;
    assert!(
        matches!(
            first,
            ClockChange::Untrusted {
                reason: Distrust::BeforeBuild { .. },
                ..
            }
        ),
        "{first:?}"
    );
    assert_eq!(first.event().kind, EventKind::ClockUnsynced);
    assert!(first.event().message.contains("1970-01-01 00:00:05"));

    let (ts0, s0) = r.clock.stamp();
    assert!(!s0.trusted);
    assert_eq!(s0.boot_id, BOOT);
    assert_eq!(s0.boottime_ms, 5_000);
    assert_eq!(
        ts0,
        floor() + TimeDelta::seconds(5),
        "never 1970 on the wire"
    );

    tokio::time::sleep(Duration::from_secs(30)).await;
    let (ts1, s1) = r.clock.stamp();
    assert_eq!(s1.boottime_ms, 35_000);
    assert_eq!(
        ts1,
        floor() + TimeDelta::seconds(35),
        "ordered within the boot"
    );

    // NTP steps the clock to the real time and the kernel reports it synchronised.
    let real = after_floor(40);
    r.source.set_wall(real);
    r.source.set_synced(Some(true));
    let synced_at = Instant::now();
    let change = r.next().await;
    assert!(Instant::now() - synced_at <= UNTRUSTED_POLL);
    let offset = offset_of(&change);
    assert_eq!(offset, real.timestamp_millis() - 35_000);
    assert_eq!(change.event().kind, EventKind::ClockSynced);
    // What the outbox's re-stamping computes for the two held readings.
    assert_eq!(s1.boottime_ms as i64 + offset, real.timestamp_millis());
    assert_eq!(
        s0.boottime_ms as i64 + offset,
        real.timestamp_millis() - 30_000
    );

    assert!(r.is_trusted());
    assert_eq!(r.metrics.clock_trusted.get(), 1);
    let (ts2, s2) = r.clock.stamp();
    assert!(s2.trusted);
    assert_eq!(ts2, r.source.wall());
}

#[tokio::test(start_paused = true)]
async fn a_plausible_clock_the_kernel_calls_unsynced_is_trusted_only_without_require_ntp_sync() {
    let wall = after_floor(100);
    let mut strict = rig(wall, 60_000, Some(false), true);
    assert!(!strict.is_trusted());
    let change = strict.next().await;
    assert_eq!(
        change,
        ClockChange::Untrusted {
            reason: Distrust::KernelUnsynced,
            at: wall
        }
    );
    let (ts, stamp) = strict.clock.stamp();
    assert!(!stamp.trusted);
    assert_eq!(ts, wall, "a plausible wall clock is the best estimate");

    let mut lax = rig(wall, 60_000, Some(false), false);
    assert!(lax.is_trusted());
    assert_eq!(
        offset_of(&lax.next().await),
        wall.timestamp_millis() - 60_000
    );
    assert!(lax.clock.stamp().1.trusted);
}

#[tokio::test(start_paused = true)]
async fn a_kernel_that_cannot_be_asked_is_not_synchronised() {
    let wall = after_floor(100);
    let mut strict = rig(wall, 1_000, None, true);
    match strict.next().await {
        ClockChange::Untrusted {
            reason: Distrust::KernelUnknown(e),
            ..
        } => assert!(e.contains("does not answer"), "{e}"),
        other => panic!("{other:?}"),
    }
    let mut lax = rig(wall, 1_000, None, false);
    offset_of(&lax.next().await);
}

#[tokio::test(start_paused = true)]
async fn a_step_while_trusted_is_reported_and_the_new_offset_sent() {
    let mut r = rig(after_floor(100), 60_000, Some(true), true);
    let start = offset_of(&r.next().await);

    // NTP slewing moves the offset a little at a time: no step.
    r.source.set_wall(r.source.wall() + TimeDelta::seconds(2));
    tokio::time::sleep(TRUSTED_POLL * 2).await;
    assert!(r.changes.try_recv().is_err(), "2 s is not a step");

    r.source.set_wall(r.source.wall() + TimeDelta::hours(1));
    let stepped = r.next().await;
    let ClockChange::Stepped { from_ms, to_ms, .. } = stepped.clone() else {
        panic!("expected Stepped, got {stepped:?}");
    };
    assert_eq!(from_ms, start + 2_000);
    assert_eq!(to_ms - from_ms, 3_600_000);
    let event = stepped.event();
    assert_eq!(event.kind, EventKind::ClockUnsynced);
    assert!(event.message.contains("+3600.000 s"), "{}", event.message);
    assert_eq!(
        event.current.zip(event.previous).map(|(c, p)| c - p),
        Some(3600.0)
    );
    assert_eq!(
        offset_of(&r.next().await),
        to_ms,
        "trusted again, new offset"
    );
    assert!(r.is_trusted());

    // Just above the threshold is a step too.
    let just_above = STEP_THRESHOLD_MS as i64 + 1;
    r.source
        .set_wall(r.source.wall() - TimeDelta::milliseconds(just_above));
    let ClockChange::Stepped { from_ms, to_ms, .. } = r.next().await else {
        panic!("expected a step back");
    };
    assert_eq!(from_ms - to_ms, just_above);
    offset_of(&r.next().await);
}

#[tokio::test(start_paused = true)]
async fn trust_is_lost_and_regained_with_the_kernels_sync() {
    let mut r = rig(after_floor(100), 60_000, Some(true), true);
    let before = offset_of(&r.next().await);

    r.source.set_synced(Some(false));
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(r.is_trusted(), "a trusted clock is looked at once a minute");
    let lost = r.next().await;
    assert!(matches!(
        lost,
        ClockChange::Untrusted {
            reason: Distrust::KernelUnsynced,
            ..
        }
    ));
    assert!(!r.is_trusted());
    assert_eq!(r.metrics.clock_trusted.get(), 0);
    assert!(!r.clock.stamp().1.trusted);

    r.source.set_synced(Some(true));
    let lost_at = Instant::now();
    let after = offset_of(&r.next().await);
    assert!(Instant::now() - lost_at <= UNTRUSTED_POLL);
    assert_eq!(
        after, before,
        "no step: the boot clock and wall clock moved together"
    );
}

#[tokio::test(start_paused = true)]
async fn a_clock_set_back_to_1970_while_trusted_is_not_trusted() {
    let mut r = rig(after_floor(100), 60_000, Some(true), true);
    offset_of(&r.next().await);
    r.source.set_wall(unix(120));
    let (ts, stamp) = r.clock.stamp();
    assert!(!stamp.trusted, "the stamp checks plausibility itself");
    assert!(ts >= floor());
    assert!(matches!(
        r.next().await,
        ClockChange::Untrusted {
            reason: Distrust::BeforeBuild { .. },
            ..
        }
    ));
    assert!(!r.is_trusted());
}

#[tokio::test(start_paused = true)]
async fn the_guard_stops_on_shutdown() {
    let mut r = rig(after_floor(1), 0, Some(true), true);
    r.next().await;
    r.stop.send(()).expect("guard waiting");
    r.task.await.expect("guard returns");
    assert!(
        r.changes.recv().await.is_none(),
        "the guard dropped its sender"
    );
}

#[test]
fn a_clock_far_in_the_future_is_not_plausible() {
    let f = floor();
    assert!(plausible(f, f).is_ok());
    assert!(plausible(f + TimeDelta::days(PLAUSIBLE_SPAN_DAYS), f).is_ok());
    assert!(matches!(
        plausible(f + TimeDelta::days(PLAUSIBLE_SPAN_DAYS + 1), f),
        Err(Distrust::TooFarAhead { .. })
    ));
    assert!(matches!(
        plausible(f - TimeDelta::seconds(1), f),
        Err(Distrust::BeforeBuild { .. })
    ));
}

#[test]
fn the_floor_is_this_build_and_not_before_2024() {
    let f = floor();
    assert!(f >= unix(EPOCH_ORIGIN_UNIX));
    assert!(f <= Utc::now(), "built in the past");
}

#[test]
fn boot_ids_must_be_uuids() {
    assert!(is_uuid(BOOT));
    assert!(!is_uuid(""));
    assert!(!is_uuid("2d0c5a3e9b1f4f7e8a476f1e3c2b9d10"));
    assert!(!is_uuid("2d0c5a3e-9b1f-4f7e-8a47-6f1e3c2b9d1g"));
}

#[test]
fn the_system_source_reads_this_machine() {
    let s = SystemTimeSource::new().expect("a Linux system");
    let file = std::fs::read_to_string(BOOT_ID_PATH).expect("boot id");
    assert_eq!(s.boot_id(), file.trim());
    assert!(is_uuid(s.boot_id()));

    let a = s.boottime_ms();
    std::thread::sleep(Duration::from_millis(20));
    let b = s.boottime_ms();
    assert!(b >= a + 20, "{a} then {b}");
    // /proc/uptime counts from boot including suspend, like CLOCK_BOOTTIME.
    let uptime: f64 = std::fs::read_to_string("/proc/uptime")
        .expect("uptime")
        .split_whitespace()
        .next()
        .and_then(|x| x.parse().ok())
        .expect("uptime seconds");
    assert!(
        (b as f64 / 1000.0 - uptime).abs() < 5.0,
        "{b} ms vs {uptime} s"
    );

    let synced = s
        .kernel_synced()
        .expect("adjtimex answers without privilege");
    println!("kernel reports this machine's clock synchronised: {synced}");
    assert!(plausible(s.wall(), floor()).is_ok());
}

proptest! {
    /// Whatever the wall clock reads, a stamp's time is never before the build.
    #[test]
    fn a_stamp_is_never_before_the_floor(
        secs in -8_000_000_000_000i64..8_000_000_000_000,
        boottime_ms in any::<u64>(),
        trusted in any::<bool>(),
    ) {
        let wall = DateTime::from_timestamp(secs, 0).unwrap_or_default();
        let source = Arc::new(ManualTime::new(BOOT, wall, boottime_ms, Some(true)));
        let (_tx, rx) = watch::channel(trusted);
        let (ts, stamp) = Clock::new(source, rx).stamp();
        prop_assert!(ts >= floor());
        prop_assert!(ts.year() >= 2024);
        prop_assert!(!stamp.trusted || ts == wall);
    }
}
