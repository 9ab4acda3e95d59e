//! Field fidelity on RTU lines, whole system: a site's meters behind a transparent
//! serial-to-Ethernet converter, and on a serial line (a `socat` pty pair at 19200 8E1), polled
//! by `caudal-agent` and stored by `caudal-cloud`. On the line: a slow meter (answers after
//! 200 ms of its 1 s timeout), an ARAD Octave that refuses reads across the holes in its
//! register map, and a dead unit. The agent is killed three times with the slow meter's reply
//! in flight.
//!
//! The usual proof (every committed record stored once, nothing else), plus the fidelity proof
//! from the cloud's database: every stored flow is the value the simulator served to exactly
//! one request of that meter, stamped when that reply was written; the dead unit left one
//! `poll_failed` event per poll naming the timeout, which the cloud's completeness lists, and
//! the meters behind it kept their slot
//! within one timeout, flagged `late` when they slipped.

use crate::support;

use caudal_agent::simulator::{Fault, Model};
use caudal_testkit::meters::prove_fidelity;
use chrono::{DurationRound, TimeDelta, Utc};
use std::time::Duration;
use support::*;

/// The slow meter answers this late, well inside its timeout.
/// The line's cycle: the dead unit's 300 ms, the ARAD's five requests (50 ms apart: its
/// profile's inter-request gap) and this, each with a gap: about 850 ms of the 1 s period.
const SLOW: Duration = Duration::from_millis(200);
const DEAD_TIMEOUT_MS: i64 = 300;

fn noisy(flow: f64, total: f64) -> Model {
    // Noise on the flow makes every served value unique, so a value names its request.
    Model {
        flow_noise_lps: 0.5,
        ..Model::steady(flow, total, 0.0)
    }
}

fn site(line: MeterLine) -> SiteSpec {
    let meter = |id: &str, unit, profile, model, extra| Meter {
        id: id.to_string(),
        unit,
        profile,
        model,
        extra,
    };
    SiteSpec {
        meters: vec![
            meter("dead", 3, "generic", noisy(1.0, 0.0), "timeout_ms = 300"),
            meter(
                "arad",
                2,
                "arad-octave",
                noisy(4.0, 500.0),
                "timeout_ms = 1000",
            ),
            meter(
                "slow",
                1,
                "generic",
                noisy(12.5, 1000.0),
                "timeout_ms = 1000",
            ),
        ],
        line,
        ..SiteSpec::new(0)
    }
}

async fn fidelity_on(line: MeterLine, name: &'static str) {
    if line == MeterLine::Serial
        && std::process::Command::new("socat")
            .arg("-V")
            .output()
            .is_err()
    {
        eprintln!("socat not available: serial scenario skipped");
        return;
    }
    let mut scene = Scene::new(name, BrokerChoice::Embedded, &[site(line)]).await;
    let sim = scene.sites[0].sim.clone();
    sim.set_fault(3, Fault::Silent);
    sim.set_fault(1, Fault::Delay(SLOW));
    assert!(sim.set_strict_map(2, true));
    scene.start_cloud().await;
    scene.start_agents();
    scene.wait_readings(6, Duration::from_secs(40)).await;

    for kill in 0..3 {
        scene
            .wait(
                "a request to the slow meter in flight",
                Duration::from_secs(10),
                |_| {
                    let served = sim.served();
                    let last = served.iter().rev().find(|s| s.unit == 1)?;
                    (last.replied.is_none()
                        && Utc::now() - last.received < TimeDelta::milliseconds(200))
                    .then_some(())
                },
            )
            .await;
        scene.kill_agent(0);
        scene.sites[0].agent.spawn();
        let id = scene.sites[0].id.clone();
        let before = scene.db.stored().await.count(&id, "readings");
        scene
            .wait_stored(
                &format!("readings after restart {kill}"),
                Duration::from_secs(30),
                |st| (st.count(&id, "readings") >= before + 6).then_some(()),
            )
            .await;
    }
    scene.wait_drained(Duration::from_secs(30)).await;
    scene.stop_agents();
    let proof = scene.prove().await;
    assert_eq!(proof.evicted, 0, "{proof:?}");

    let id = scene.sites[0].id.clone();
    let readings = scene.db.readings(&id).await;
    let served = sim.served();
    let rows = || {
        readings
            .iter()
            .map(|r| (r.device.as_str(), r.ts, r.flow_lps))
    };
    let slow = prove_fidelity(rows(), &served, "slow", 1);
    let arad = prove_fidelity(rows(), &served, "arad", 2);
    let events = scene.db.events(&id).await;
    let mut summary = std::collections::BTreeMap::new();
    for e in &events {
        *summary
            .entry((e.device.clone().unwrap_or_default(), e.kind.clone()))
            .or_insert(0) += 1;
    }
    for r in &readings {
        *summary
            .entry((r.device.clone(), format!("reading {:?}", r.quality)))
            .or_insert(0) += 1;
    }
    assert!(
        slow >= 6 && arad >= 10,
        "checked {slow} and {arad}: {summary:?}"
    );
    assert!(
        !readings.iter().any(|r| r.device == "dead"),
        "nothing stored for the dead unit"
    );
    let late = readings
        .iter()
        .filter(|r| r.quality.iter().any(|q| q == "late"))
        .count();

    // The dead unit: every poll of it failed, each recorded with its cause. It is polled first
    // in every slot and the ARAD next, so the ARAD is read at most the dead unit's timeout (and
    // scheduling noise) after its slot, or its reading says it was late (the first poll after a
    // restart waits for the line to be quiet).
    let failed: Vec<_> = events
        .iter()
        .filter(|e| e.kind == "poll_failed" && e.device.as_deref() == Some("dead"))
        .collect();
    let dead_polls = served.iter().filter(|s| s.unit == 3).count();
    // Never asked twice in a poll, backed off between polls; a poll cut by a kill leaves no
    // event.
    assert!(
        failed.len() >= 5 && failed.len() <= dead_polls && failed.len() + 3 >= dead_polls,
        "{} poll_failed events for {dead_polls} requests to the dead unit",
        failed.len()
    );
    assert!(
        failed.iter().all(|e| e.message.starts_with("timeout: ")),
        "the cause leads the message"
    );
    // The cloud's completeness lists every one of them.
    let c = scene.db.completeness(&id).await;
    assert_eq!(
        c.summary.failed_polls,
        failed.len() as u64,
        "{:?}",
        c.summary
    );
    assert!(
        c.failed_polls
            .iter()
            .all(|f| f.device.as_deref() == Some("dead") && f.cause == "timeout"),
        "{:?}",
        c.failed_polls
    );
    let bound = TimeDelta::milliseconds(DEAD_TIMEOUT_MS + 400);
    for r in readings.iter().filter(|r| r.device == "arad") {
        let slot =
            r.ts.duration_trunc(TimeDelta::seconds(1))
                .expect("truncates");
        let after = r.ts - slot;
        assert!(
            after <= bound || r.quality.iter().any(|q| q == "late"),
            "arad read {after} after its slot at {}, not flagged late",
            r.ts
        );
    }
    scene.stop_cloud();
    eprintln!(
        "{name}: {proof:?}; {slow} + {arad} readings equal their own request's reply, \
         {} poll_failed for the dead unit, {late} late; {:.1} s",
        failed.len(),
        scene.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtu_through_a_converter_stores_what_the_meter_served() {
    fidelity_on(MeterLine::Converter, "rtu-converter").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rtu_on_a_serial_line_stores_what_the_meter_served() {
    fidelity_on(MeterLine::Serial, "rtu-serial").await;
}
