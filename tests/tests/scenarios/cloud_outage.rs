//! The cloud down for a while. The broker stays up (separate from the cloud, or the local
//! Mosquitto) and the cloud process is stopped: the agents keep polling and publishing, the
//! broker takes their batches but nobody acknowledges them, so every record stays in the outbox
//! and is sent again after the ack timeout. When the cloud is back the backlog drains, and every
//! `(site, seq)` committed is in the cloud exactly once.

use crate::support;

use std::time::Duration;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_keep_polling_and_the_backlog_drains_when_the_cloud_returns() {
    let mut scene = Scene::new(
        "cloud-outage",
        BrokerChoice::Separate,
        &[SiteSpec::new(3), SiteSpec::new(3)],
    )
    .await;
    scene.start_cloud().await;
    scene.start_agents();
    scene.wait_readings(2, Duration::from_secs(30)).await;
    scene.wait_drained(Duration::from_secs(20)).await;

    scene.stop_cloud();
    let before = scene.db.stored().await.rows.len();
    // Longer than two ack timeouts: batches go out again and are still kept.
    scene
        .wait(
            "every backlog to grow over 5 poll periods",
            Duration::from_secs(30),
            |sc| {
                sc.sites
                    .iter_mut()
                    .all(|s| s.inspect().is_some_and(|i| i.backlog >= 15))
                    .then_some(())
            },
        )
        .await;
    assert_eq!(
        scene.db.stored().await.rows.len(),
        before,
        "nothing is stored while the cloud is down"
    );

    scene.start_cloud().await;
    scene.wait_drained(Duration::from_secs(45)).await;
    scene.stop_agents();
    let proof = scene.prove().await;
    assert_eq!(proof.evicted, 0, "{proof:?}");
    assert!(proof.stored >= 30, "{proof:?}");
    scene.stop_cloud();
    eprintln!("cloud-outage: {proof:?}, {:.1} s", scene.elapsed());
}
