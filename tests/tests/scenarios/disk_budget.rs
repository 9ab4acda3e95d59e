//! The agent's disk budget exhausted during a long outage. A site with many meters and a 1 MiB
//! outbox budget loses its broker; the agent keeps polling until the budget is reached and
//! evicts its oldest records, recording each eviction as gap records. When the broker is back
//! the gaps travel like any record: in the cloud, every `(site, seq)` the agent committed is
//! stored exactly once or covered by an eviction gap's seq range.

use crate::support;

use std::time::Duration;
use support::*;

/// Meters, all polled every second over two buses: enough records to pass 1 MiB within about
/// 20 s.
const METERS: u8 = 240;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evictions_arrive_as_gap_records() {
    let spec = SiteSpec {
        disk_budget_mb: 1,
        bus: "inter_frame_gap_ms = 0",
        buses: 2,
        // Fewer, larger batches: the backlog drains faster.
        batch_max_records: 500,
        ..SiteSpec::new(METERS)
    };
    let mut scene = Scene::new("disk-budget", BrokerChoice::Separate, &[spec]).await;
    scene.start_cloud().await;
    scene.start_agents();
    scene.wait_readings(1, Duration::from_secs(30)).await;
    scene.wait_drained(Duration::from_secs(30)).await;

    scene.stop_broker();
    let evicted = scene
        .wait(
            "the outbox to evict under its budget",
            Duration::from_secs(90),
            |sc| {
                let i = sc.sites[0].inspect()?;
                (i.evicted_total > 0).then_some(i)
            },
        )
        .await;
    eprintln!(
        "disk-budget: evicting after {:.1} s: {} records waiting ({} bytes), {} evicted",
        scene.elapsed(),
        evicted.backlog,
        evicted.bytes,
        evicted.evicted_total
    );

    scene.start_broker().await;
    scene.wait_drained(Duration::from_secs(60)).await;
    scene.stop_agents();
    let evicted_total = scene.sites[0].inspect().expect("outbox").evicted_total;
    let proof = scene.prove().await;
    assert!(proof.eviction_gaps >= 1, "{proof:?}");
    assert!(proof.evicted > 0, "{proof:?}");
    assert!(
        proof.evicted <= evicted_total,
        "{proof:?}: the agent evicted {evicted_total}"
    );
    scene.stop_cloud();
    eprintln!(
        "disk-budget: {proof:?}, {evicted_total} evicted, {:.1} s",
        scene.elapsed()
    );
}
