//! Agents killed with SIGKILL again and again at random moments while they poll, commit and
//! sync, and started again each time. Once the last runs have drained their outboxes, every
//! `(site, seq)` any run committed is in the cloud exactly once; the sequence went on in one
//! epoch per site without holes. The moments come from a seed printed at the start (set
//! `CAUDAL_E2E_SEED` to replay one).

use crate::support;

use std::time::Duration;
use support::*;

const KILLS: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_agents_lose_and_double_nothing() {
    let seed = std::env::var("CAUDAL_E2E_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("agent-sigkill: seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);

    let mut scene = Scene::new(
        "agent-sigkill",
        BrokerChoice::Embedded,
        &[SiteSpec::new(3), SiteSpec::new(2)],
    )
    .await;
    scene.start_cloud().await;
    scene.start_agents();
    scene.wait_readings(1, Duration::from_secs(30)).await;

    let mut last_seqs: Vec<Vec<_>> = vec![Vec::new(); scene.sites.len()];
    for _ in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(rng.u64(200..=1500))).await;
        let i = rng.usize(..scene.sites.len());
        scene.kill_agent(i);
        if let Some(ins) = scene.sites[i].inspect() {
            last_seqs[i].push(ins.last_seq);
        }
        scene.sites[i].agent.spawn();
    }
    for (i, seqs) in last_seqs.iter().enumerate() {
        assert!(
            seqs.windows(2).all(|w| w[0] <= w[1]),
            "site {i}: the last committed seq never went back across crashes: {seqs:?}"
        );
    }

    // The last runs get going (every outbox advances), then drain.
    let before: Vec<_> = scene
        .sites
        .iter_mut()
        .map(|s| s.inspect().and_then(|i| i.last_seq))
        .collect();
    scene
        .wait("every last run to commit", Duration::from_secs(30), |sc| {
            sc.sites
                .iter_mut()
                .zip(&before)
                .all(|(s, b)| s.inspect().and_then(|i| i.last_seq) > *b)
                .then_some(())
        })
        .await;
    scene.wait_drained(Duration::from_secs(30)).await;
    scene.stop_agents();
    let proof = scene.prove().await;
    assert_eq!(proof.evicted, 0, "{proof:?}");
    let runs: usize = scene.sites.iter().map(|s| s.agent.runs()).sum();
    assert_eq!(runs, scene.sites.len() + KILLS);
    scene.stop_cloud();
    eprintln!(
        "agent-sigkill: {runs} agent runs, {KILLS} SIGKILLs, {proof:?}, {:.1} s",
        scene.elapsed()
    );
}
