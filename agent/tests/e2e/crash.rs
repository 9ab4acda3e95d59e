//! Crash safety of the whole agent: the real `caudal-agent` is killed with SIGKILL again and
//! again at random moments while it polls, commits and syncs, and started again each time. Once
//! a last run has drained the outbox, every record any run committed is at the receiver exactly
//! once, the sequence continued in one epoch without holes, and SQLite finds the file intact.
//!
//! The first kill comes while the receiver stores batches but its acknowledgements are lost, so
//! the restarted agent certainly sends records the receiver already has: the duplicates are
//! absorbed. The random moments come from a seed printed at the start (set `CAUDAL_E2E_SEED` to
//! replay one).

use crate::support as e2e_support;

use caudal_testkit::receiver::AckMode;
use e2e_support::*;
use std::time::{Duration, Instant};

const KILLS: usize = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_and_doubles_nothing() {
    let started = Instant::now();
    let seed = std::env::var("CAUDAL_E2E_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("e2e_crash: seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);

    let mut rig = Rig::start(three_meters()).await;
    rig.spawn_agent();
    rig.wait_readings(1, Duration::from_secs(20)).await;

    // Stored by the cloud, acknowledgement lost, then a crash: the records are still in the
    // outbox and go out again after the restart.
    rig.receiver.set_mode(AckMode::DropAcks);
    let before = rig.receiver.stored_count();
    rig.wait(
        "a batch stored without acknowledgement",
        Duration::from_secs(10),
        |rig| (rig.receiver.stored_count() > before).then_some(()),
    )
    .await;
    let unacked = rig.inspect().map(|i| i.backlog).unwrap_or(0);
    assert!(
        unacked > 0,
        "stored but unacknowledged records stay in the outbox"
    );
    let _ = rig.kill_agent().await;
    rig.receiver.set_mode(AckMode::Normal);
    rig.spawn_agent();

    let mut last_seqs = Vec::new();
    for _ in 1..KILLS {
        tokio::time::sleep(Duration::from_millis(rng.u64(200..=1500))).await;
        let status = rig.kill_agent().await;
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "the agent was running until killed: {status}"
        );
        if let Some(i) = rig.inspect() {
            last_seqs.push(i.last_seq);
        }
        rig.spawn_agent();
    }
    assert!(
        last_seqs.windows(2).all(|w| w[0] <= w[1]),
        "the last committed seq never went back across crashes: {last_seqs:?}"
    );

    // The last run gets going (the outbox advances) and then drains everything.
    let before = rig.inspect().and_then(|i| i.last_seq);
    rig.wait("the last run to commit", Duration::from_secs(20), |rig| {
        (rig.inspect()?.last_seq > before).then_some(())
    })
    .await;
    let drained = rig.wait_drained(Duration::from_secs(30)).await;
    let exit = rig.stop_agent().await;
    assert_eq!(exit.code(), Some(0), "{exit}");
    assert_eq!(rig.integrity_check(), "ok");

    let proof = rig.prove(drained);
    assert!(
        proof.duplicates > 0,
        "records re-sent after the lost acknowledgement were stored once: {proof:?}"
    );
    assert_eq!(proof.evicted, 0);
    let starts = rig
        .receiver
        .events(SITE)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == caudal_common::EventKind::AgentStarted)
        .count();
    assert!(
        (2..=rig.runs()).contains(&starts),
        "{starts} agent_started events for {} runs",
        rig.runs()
    );
    eprintln!(
        "e2e_crash: {} runs, {KILLS} SIGKILLs, {proof:?}, {} s",
        rig.runs(),
        started.elapsed().as_secs_f64()
    );
}
