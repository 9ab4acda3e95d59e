//! The cloud restarted in the middle of ingest. Two agents build a backlog while the cloud (and
//! its embedded broker) is down; the cloud comes up and, while the backlogs are still draining
//! (the agents send their backlog at a limited rate), it is killed with SIGKILL, started, and
//! later stopped with SIGTERM and started again. Batches it stored but could not acknowledge are
//! sent again and absorbed; in the end every `(site, seq)` committed is in the cloud exactly once.

use crate::support;

use std::time::Duration;
use support::*;

fn site() -> SiteSpec {
    SiteSpec {
        // A slow backlog drain, so the restarts land while it is going on.
        uplink: "backlog_rate = 20",
        ..SiteSpec::new(10)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_mid_ingest_lose_and_double_nothing() {
    let mut scene = Scene::new("cloud-restart", BrokerChoice::Embedded, &[site(), site()]).await;
    scene.start_agents();
    scene
        .wait(
            "a backlog of 60 records at every site",
            Duration::from_secs(30),
            |sc| {
                sc.sites
                    .iter_mut()
                    .all(|s| s.inspect().is_some_and(|i| i.backlog >= 60))
                    .then_some(())
            },
        )
        .await;

    for (round, crash) in [(1, true), (2, false)] {
        scene.start_cloud().await;
        let before = scene.db.stored().await.rows.len();
        let ids: Vec<String> = scene.sites.iter().map(|s| s.id.clone()).collect();
        scene
            .wait_stored("the ingest under way", Duration::from_secs(30), |st| {
                (st.rows.len() >= before + 20 && ids.iter().all(|id| !st.seqs(id).is_empty()))
                    .then_some(())
            })
            .await;
        if crash {
            scene.kill_cloud();
        } else {
            scene.stop_cloud();
        }
        let backlog = scene.backlog();
        assert!(
            backlog > 0,
            "round {round}: the cloud went down with records still to ingest"
        );
        eprintln!("cloud-restart: round {round}: down with {backlog} records waiting");
    }

    scene.start_cloud().await;
    scene.wait_drained(Duration::from_secs(60)).await;
    scene.stop_agents();
    let proof = scene.prove().await;
    assert_eq!(proof.evicted, 0, "{proof:?}");
    scene.stop_cloud();
    eprintln!("cloud-restart: {proof:?}, {:.1} s", scene.elapsed());
}
