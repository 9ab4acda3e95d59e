//! The normal flow, whole system: three sites with three meters each, one `caudal-agent` process
//! per site, one `caudal-cloud` process with its embedded broker. After every site has several
//! readings stored and its backlog drained, every `(site, seq)` the agents committed is in the
//! cloud's database exactly once and nothing else is.

use crate::support;

use std::time::Duration;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_sites_and_devices_arrive_once() {
    let mut scene = Scene::new(
        "normal",
        BrokerChoice::Embedded,
        &[SiteSpec::new(3), SiteSpec::new(3), SiteSpec::new(3)],
    )
    .await;
    scene.start_cloud().await;
    scene.start_agents();
    scene.wait_readings(15, Duration::from_secs(40)).await;
    scene.wait_drained(Duration::from_secs(20)).await;
    scene.stop_agents();

    let stored = scene.db.stored().await;
    for s in &scene.sites {
        assert!(
            stored.count(&s.id, "events") >= 1,
            "{}: the agent's start event arrived",
            s.id
        );
    }
    let proof = scene.prove().await;
    assert_eq!(proof.evicted, 0, "{proof:?}");
    assert!(proof.stored >= 45, "{proof:?}");
    scene.stop_cloud();
    eprintln!("normal: {proof:?}, {:.1} s", scene.elapsed());
}
