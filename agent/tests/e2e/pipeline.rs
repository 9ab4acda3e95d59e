//! Normal flow, end to end: the real `caudal-agent` polls three simulated meters of three
//! profiles, the receiver stores their readings with the values the meters' models produce, the
//! retained status shows the agent online with every device, and SIGTERM stops it cleanly with
//! the retained status turned offline. Then the proof: every committed record arrived once.
//! A SIGTERM that comes while the agent is still starting stops it cleanly too.

use crate::support as e2e_support;

use caudal_common::{Flag, SiteId, Status};
use e2e_support::*;
use rusqlite::Connection;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_flow_from_meters_to_the_cloud_and_sigterm_stops_cleanly() {
    let started = Instant::now();
    let mut rig = Rig::start(three_meters()).await;
    rig.spawn_agent();
    let mut status = StatusWatch::start(&rig.broker, "e2e-status-1").await;

    let (_, online) = status
        .until(
            "online with every device polled ok",
            Duration::from_secs(20),
            |_, s| {
                s.online
                    && ["fm1", "fm2", "nivel1"]
                        .iter()
                        .all(|d| s.devices.get(*d).is_some_and(|d| d.result == "ok"))
            },
        )
        .await;
    assert_eq!(online.site.as_str(), SITE);
    assert_eq!(online.clock_synced, Some(true));
    assert!(online.agent_version.is_some() && online.config_version.is_some());
    // What a subscriber that comes later is told first: the retained status, online, with the
    // devices.
    let (retain, first) = StatusWatch::start(&rig.broker, "e2e-status-0")
        .await
        .until("retained", Duration::from_secs(10), |_, _| true)
        .await;
    assert!(
        retain && first.online && first.devices.len() == 3,
        "{first:?}"
    );

    rig.wait_readings(5, Duration::from_secs(20)).await;
    let readings = rig.receiver.readings(SITE).unwrap();
    for m in &rig.meters {
        let mine: Vec<_> = readings
            .iter()
            .filter(|r| r.device.as_str() == m.id)
            .collect();
        for r in &mine {
            // The clock is trusted a moment after start: the first readings may be re-stamped.
            assert!(
                r.q.iter()
                    .all(|f| matches!(f, Flag::ClockUnsynced | Flag::Restamped)),
                "{} reading {} has flags {:?}",
                m.id,
                r.seq,
                r.q
            );
        }
        match m.profile {
            "keller-level" => {
                for r in &mine {
                    let level = r.level_m.expect("level read");
                    assert!(
                        (level - m.model.level_base_m).abs() < 1e-3,
                        "{}: level {level} m, the probe sees {} m",
                        m.id,
                        m.model.level_base_m
                    );
                }
            }
            _ => {
                for r in &mine {
                    let flow = r.flow_lps.expect("flow read");
                    assert!(
                        (flow - m.model.flow_base_lps).abs() < 1e-3 * m.model.flow_base_lps,
                        "{}: flow {flow} L/s, the meter runs at {} L/s",
                        m.id,
                        m.model.flow_base_lps
                    );
                }
                let totals: Vec<f64> = mine.iter().map(|r| r.total_m3.expect("total")).collect();
                assert!(
                    totals.windows(2).all(|w| w[0] <= w[1]),
                    "{}: totalizer went backwards: {totals:?}",
                    m.id
                );
                let (first, last) = (mine[0], mine[mine.len() - 1]);
                assert!(totals[0] >= m.model.initial_total_m3);
                // What flowed between the first and last reading, within the timing of two polls.
                let secs = (last.ts - first.ts).as_seconds_f64();
                let expect = m.model.flow_base_lps * secs / 1000.0;
                let grew = totals[totals.len() - 1] - totals[0];
                assert!(
                    grew > 0.0 && (grew - expect).abs() < 0.25 * expect,
                    "{}: totalizer grew {grew} m3 in {secs} s at {} L/s (expected ~{expect})",
                    m.id,
                    m.model.flow_base_lps
                );
            }
        }
    }
    let started_events = rig
        .receiver
        .events(SITE)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == caudal_common::EventKind::AgentStarted)
        .count();
    assert_eq!(started_events, 1, "one agent_started event per start");

    let drained = rig.wait_drained(Duration::from_secs(20)).await;
    let exit = rig.stop_agent().await;
    assert_eq!(exit.code(), Some(0), "SIGTERM is a clean stop: {exit}");

    let (_, offline) = status
        .until("offline", Duration::from_secs(10), |_, s| !s.online)
        .await;
    assert_eq!(offline, Status::offline(SiteId::new(SITE).unwrap()));
    // Whoever subscribes later is told the agent is offline.
    let mut later = StatusWatch::start(&rig.broker, "e2e-status-2").await;
    let (retain, s) = later
        .until("retained", Duration::from_secs(10), |_, _| true)
        .await;
    assert!(retain && !s.online, "retained status after stop: {s:?}");

    let proof = rig.prove(drained);
    assert!(proof.stored >= 15, "{proof:?}");
    eprintln!(
        "e2e_pipeline: {proof:?}, {} s",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_while_the_agent_starts_is_a_clean_stop_once_it_runs() {
    let mut rig = Rig::start(three_meters()).await;
    // Another process holds the outbox's lock: the agent waits in its start-up, where a
    // SIGTERM must not be lost.
    std::fs::create_dir_all(rig.outbox_path().parent().unwrap()).unwrap();
    let lock = Connection::open(rig.outbox_path()).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    rig.spawn_agent();
    rig.wait("the agent to start up", Duration::from_secs(10), |rig| {
        rig.agent_stderr().contains("wall clock").then_some(())
    })
    .await;
    assert!(
        !rig.agent_stderr().contains("outbox opened"),
        "the agent waits for the outbox"
    );
    let pid = rig.agent_pid().unwrap();
    let stop = {
        // Released shortly after the signal, well within the agent's 5 s busy timeout.
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            lock.execute_batch("ROLLBACK").unwrap();
            drop(lock);
        })
    };
    let exit = rig.stop_agent().await;
    stop.await.unwrap();
    assert_eq!(
        exit.code(),
        Some(0),
        "agent {pid} stopped by a SIGTERM during start-up: {exit}\n{}",
        rig.agent_stderr()
    );
    assert!(rig.agent_stderr().contains("stopped"));
    let kept = rig.inspect().expect("outbox created");
    assert!(kept.last_seq.is_some(), "its start was recorded: {kept:?}");
}
