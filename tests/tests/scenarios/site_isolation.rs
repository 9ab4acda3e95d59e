//! Site isolation, whole system: the cloud's embedded broker with `mqtt.embedded.authenticate`,
//! two `caudal-agent` processes logged in with their sites' credentials through the broker's
//! gate (ADR 007). A genuine agent's traffic (its subscriptions, retained status and last will,
//! batches and acks) is never refused: every `(site, seq)` arrives once and no refusal is
//! counted. What a site may not do is tested in `cloud/tests/service/broker.rs`.

use crate::support;

use std::time::Duration;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn genuine_agents_pass_the_gate() {
    let mut scene = Scene::authenticated("isolation", &[SiteSpec::new(2), SiteSpec::new(2)]).await;
    scene.start_cloud().await;
    scene.start_agents();
    scene.wait_readings(10, Duration::from_secs(40)).await;
    scene.wait_drained(Duration::from_secs(20)).await;
    scene.stop_agents();

    let proof = scene.prove().await;
    assert_eq!(proof.evicted, 0, "{proof:?}");
    assert!(proof.stored >= 20, "{proof:?}");
    let metrics = http_get(scene.http, "/metrics").unwrap_or_default();
    if std::env::var("CAUDAL_TEST_MQTT_URL").is_err() {
        assert!(
            metrics.contains("caudal_cloud_mqtt_logins_total{kind=\"ok\"}"),
            "the agents logged in with their credentials:\n{metrics}"
        );
    }
    assert!(
        !metrics.contains("caudal_cloud_mqtt_refused_total{"),
        "nothing a genuine agent does is refused:\n{metrics}"
    );
    scene.stop_cloud();
    eprintln!("isolation: {proof:?}, {:.1} s", scene.elapsed());
}
