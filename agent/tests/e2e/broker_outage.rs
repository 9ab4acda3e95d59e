//! The cloud out of reach, end to end. First the broker goes away for several poll periods: the
//! real `caudal-agent` keeps polling and its outbox backlog grows, survives a stop and start of
//! the agent, and drains when the broker is back. Then the broker stays up but the cloud's
//! ingest stops acknowledging: batches reach it (the broker PUBACKs them) yet every record stays
//! in the outbox until the ingest resumes. Then the proof: every committed record arrived once.

use crate::support as e2e_support;

use caudal_common::Seq;
use caudal_testkit::receiver::AckMode;
use e2e_support::*;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_grows_while_the_cloud_is_away_and_drains_when_it_returns() {
    let started = Instant::now();
    let mut rig = Rig::start(three_meters()).await;
    rig.spawn_agent();
    rig.wait_readings(2, Duration::from_secs(20)).await;
    rig.wait_drained(Duration::from_secs(20)).await;

    // Broker down: polling goes on, records pile up in the outbox.
    rig.broker.stop();
    let down_at = rig.inspect().unwrap().last_seq.unwrap();
    let stored_before = rig.receiver.stored_count();
    let grown = rig
        .wait(
            "the backlog to grow over 4 poll periods",
            Duration::from_secs(20),
            |rig| {
                let i = rig.inspect()?;
                (i.backlog >= 12).then_some(i)
            },
        )
        .await;
    assert!(
        grown.last_seq.unwrap() > down_at,
        "the agent kept committing"
    );
    assert_eq!(
        rig.receiver.stored_count(),
        stored_before,
        "nothing reached the cloud without a broker"
    );

    // Stopped and started again while the broker is still away: the backlog is kept, and the
    // new run adds to it.
    let exit = rig.stop_agent().await;
    assert_eq!(
        exit.code(),
        Some(0),
        "a stop without a broker is clean too: {exit}"
    );
    let kept = rig.inspect().unwrap();
    assert!(kept.backlog >= grown.backlog, "{kept:?}");
    rig.spawn_agent();
    let outage_last = rig
        .wait(
            "the second run to add to the backlog",
            Duration::from_secs(20),
            |rig| {
                let i = rig.inspect()?;
                (i.backlog >= kept.backlog + 3).then_some(i.last_seq)?
            },
        )
        .await;

    // Broker back: the agent reconnects and the backlog drains.
    rig.broker.restart().expect("broker restarts");
    let drained = rig.wait_drained(Duration::from_secs(30)).await;
    assert!(drained >= outage_last);
    let stored = rig.receiver.stored_seqs(SITE).unwrap();
    let outage: Vec<u64> = (down_at.counter() + 1..=outage_last.counter())
        .map(|c| Seq::new(down_at.epoch(), c).0)
        .collect();
    assert!(
        outage.iter().all(|s| stored.contains(s)),
        "every record committed during the outage arrived"
    );

    // Ingest paused: batches arrive and are PUBACKed, nothing is acknowledged, nothing deleted.
    rig.receiver.set_mode(AckMode::Paused);
    let seen = rig.receiver.arrivals().len();
    let unacked: BTreeSet<u64> = rig
        .wait(
            "two batches while the ingest is paused",
            Duration::from_secs(20),
            |rig| {
                // A batch being answered as the mode changed may still be stored: skip it.
                let paused: Vec<_> = rig.receiver.arrivals().split_off(seen);
                let paused: Vec<_> = paused.into_iter().filter(|a| !a.stored).collect();
                (paused.len() >= 2).then(|| paused.iter().flat_map(|a| a.seqs.clone()).collect())
            },
        )
        .await;
    // Longer than the ack timeout: unacknowledged batches are sent again, still kept.
    let resent = rig
        .wait(
            "a batch sent again after the ack timeout",
            Duration::from_secs(20),
            |rig| {
                let arrivals = rig.receiver.arrivals();
                let mut seen_once = BTreeSet::new();
                arrivals[seen..]
                    .iter()
                    .filter(|a| !a.stored)
                    .flat_map(|a| a.seqs.iter())
                    .find(|s| !seen_once.insert(**s))
                    .copied()
            },
        )
        .await;
    let waiting = rig.outbox_seqs();
    let lost: Vec<String> = unacked
        .iter()
        .filter(|s| !waiting.contains(s))
        .map(|s| Seq(*s).to_string())
        .collect();
    assert!(
        lost.is_empty(),
        "records the broker took but the cloud never acknowledged left the outbox: {lost:?}"
    );
    assert!(waiting.contains(&resent));

    // Ingest back: what waited is acknowledged and deleted.
    rig.receiver.set_mode(AckMode::Normal);
    let drained = rig.wait_drained(Duration::from_secs(30)).await;
    let stored = rig.receiver.stored_seqs(SITE).unwrap();
    assert!(unacked.iter().all(|s| stored.contains(s)));

    let exit = rig.stop_agent().await;
    assert_eq!(exit.code(), Some(0), "{exit}");
    let proof = rig.prove(drained);
    eprintln!(
        "e2e_broker_outage: {} records committed during the broker outage, {} sent while the \
         ingest was paused, {proof:?}, {} s",
        outage.len(),
        unacked.len(),
        started.elapsed().as_secs_f64()
    );
}
