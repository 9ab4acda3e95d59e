//! The broker down for a while, then back. Two sites poll through it into the cloud; the broker
//! (separate from the cloud, or the relay to the local Mosquitto) goes away for several poll
//! periods: both agents keep polling and their backlogs grow while the cloud stores nothing new.
//! When the broker is back, agents and cloud reconnect on their own, the backlogs drain, and
//! every `(site, seq)` committed is in the cloud exactly once.

use crate::support;

use caudal_common::Seq;
use std::time::Duration;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_drains_after_the_broker_returns() {
    let mut scene = Scene::new(
        "broker-outage",
        BrokerChoice::Separate,
        &[SiteSpec::new(3), SiteSpec::new(2)],
    )
    .await;
    scene.start_cloud().await;
    scene.start_agents();
    scene.wait_readings(2, Duration::from_secs(30)).await;
    scene.wait_drained(Duration::from_secs(20)).await;

    scene.stop_broker();
    let down_at: Vec<Seq> = scene
        .sites
        .iter_mut()
        .map(|s| s.inspect().and_then(|i| i.last_seq).expect("committed"))
        .collect();
    scene
        .wait(
            "every backlog to grow over 4 poll periods",
            Duration::from_secs(30),
            |sc| {
                sc.sites
                    .iter_mut()
                    .all(|s| s.inspect().is_some_and(|i| i.backlog >= 8))
                    .then_some(())
            },
        )
        .await;
    // Read well inside the outage (a batch the cloud took just before the broker went away may
    // still have been committing when it did): two more poll periods store nothing.
    let before = scene.db.stored().await.rows.len();
    let grown: Vec<u64> = scene
        .sites
        .iter_mut()
        .map(|s| s.inspect().map(|i| i.backlog).unwrap_or(0))
        .collect();
    scene
        .wait(
            "two more poll periods of backlog",
            Duration::from_secs(20),
            |sc| {
                sc.sites
                    .iter_mut()
                    .zip(&grown)
                    .all(|(s, g)| s.inspect().is_some_and(|i| i.backlog >= g + 4))
                    .then_some(())
            },
        )
        .await;
    let during = scene.db.stored().await.rows.len();
    assert_eq!(during, before, "nothing reached the cloud without a broker");
    let outage_last: Vec<Seq> = scene
        .sites
        .iter_mut()
        .map(|s| s.inspect().and_then(|i| i.last_seq).expect("committed"))
        .collect();

    scene.start_broker().await;
    scene.wait_drained(Duration::from_secs(45)).await;
    let stored = scene.db.stored().await;
    for (i, s) in scene.sites.iter().enumerate() {
        let have = stored.seqs(&s.id);
        let outage: Vec<u64> = (down_at[i].counter() + 1..=outage_last[i].counter())
            .map(|c| Seq::new(down_at[i].epoch(), c).0)
            .collect();
        assert!(
            outage.iter().all(|q| have.contains(q)),
            "{}: every record committed during the outage arrived",
            s.id
        );
    }
    scene.stop_agents();
    let proof = scene.prove().await;
    assert_eq!(proof.evicted, 0, "{proof:?}");
    scene.stop_cloud();
    eprintln!("broker-outage: {proof:?}, {:.1} s", scene.elapsed());
}
