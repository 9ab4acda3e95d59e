//! Field fidelity on RTU lines, end to end with the real `caudal-agent`: what the cloud stores is
//! what the meter served to that very request, stamped when it was read, also after the agent
//! was killed with a slow meter's reply in flight; and a dead meter costs the line its timeout,
//! no more.
//!
//! The fidelity proof: the simulator records every request it received and the values it
//! served for it ([`Served`]). Each stored reading must equal the values of exactly one served
//! request of its unit, and must be stamped by the poll that read that reply (within
//! [`meters::STAMP_SLACK`] after it, [`meters::POLL_SPAN`] before it). A
//! reading taken from an earlier request's late reply fails both: its value is the earlier
//! request's, and it arrived long before the agent stamped it.
//!
//! Two lines: RTU through a transparent serial-to-Ethernet converter (which hands a reply to a
//! client that went away to the next client) and RTU on a serial line (a `socat` pty pair).

use crate::support as e2e_support;

use caudal_agent::simulator::{Fault, Model, Served};
use caudal_common::{EventKind, Flag, Reading};
use caudal_testkit::meters;
use chrono::{TimeDelta, Utc};
use e2e_support::*;
use std::time::Duration;

/// The slow meter answers this late, well inside its timeout.
const SLOW: Duration = Duration::from_millis(400);

fn noisy(flow: f64, total: f64) -> Model {
    // Noise on the flow makes every served value unique, so a value names its request.
    Model {
        flow_noise_lps: 0.5,
        ..Model::steady(flow, total, 0.0)
    }
}

/// The fidelity proof over the readings the receiver stored.
fn prove_fidelity(readings: &[Reading], served: &[Served], id: &str, unit: u8) -> usize {
    meters::prove_fidelity(
        readings
            .iter()
            .map(|r| (r.device.as_str(), r.ts, r.flow_lps)),
        served,
        id,
        unit,
    )
}

async fn killed_with_a_reply_in_flight(line: BusLine) {
    let meters = vec![
        Meter::new("slow", 1, "generic", noisy(12.5, 1000.0)).with("timeout_ms = 1000"),
        Meter::new("quick", 2, "generic", noisy(4.0, 500.0)).with("timeout_ms = 1000"),
    ];
    let Some(mut rig) = Rig::start_on(meters, line).await else {
        return;
    };
    rig.sim.set_fault(1, Fault::Delay(SLOW));
    rig.spawn_agent();
    rig.wait_readings(3, Duration::from_secs(30)).await;

    // Kill the agent while the slow meter is answering: its request received, no reply yet.
    for kill in 0..3 {
        rig.wait(
            "a request to the slow meter in flight",
            Duration::from_secs(10),
            |rig| {
                let served = rig.sim.served();
                let last = served.iter().rev().find(|s| s.unit == 1)?;
                (last.replied.is_none()
                    && Utc::now() - last.received < TimeDelta::milliseconds(200))
                .then_some(())
            },
        )
        .await;
        rig.kill_agent().await;
        rig.spawn_agent();
        let before = rig.receiver.readings(SITE).expect("readings").len();
        rig.wait(
            &format!("readings after restart {kill}"),
            Duration::from_secs(30),
            |rig| (rig.receiver.readings(SITE).ok()?.len() >= before + 6).then_some(()),
        )
        .await;
    }
    let drained = rig.wait_drained(Duration::from_secs(30)).await;
    rig.stop_agent().await;
    let proof = rig.prove(drained);
    assert_eq!(proof.duplicates, 0);

    let readings = rig.receiver.readings(SITE).expect("readings");
    let served = rig.sim.served();
    let slow = prove_fidelity(&readings, &served, "slow", 1);
    let quick = prove_fidelity(&readings, &served, "quick", 2);
    assert!(slow >= 10 && quick >= 10, "checked {slow} and {quick}");
    // The late replies were there, and were thrown away rather than taken.
    let late_replies = served
        .iter()
        .filter(|s| s.unit == 1 && s.replied.is_some())
        .count()
        - slow;
    assert!(late_replies >= 1, "a reply was in flight at each kill");
    eprintln!(
        "{line:?}: {slow} + {quick} readings equal their own request's reply; \
         {late_replies} replies not taken (in flight at a kill, or lost)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_with_a_reply_in_flight_through_a_converter() {
    killed_with_a_reply_in_flight(BusLine::Converter).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_with_a_reply_in_flight_on_a_serial_line() {
    killed_with_a_reply_in_flight(BusLine::Serial).await;
}

/// A dead meter ahead of two healthy ones on an RTU line, its timeout longer than the period:
/// each of its polls costs the line one timeout (one request, never retried, first poll
/// included); the healthy meters are read at most one timeout after their slot, flagged `late`
/// when that passes the next slot; every failed poll is a `poll_failed` event, and a 2 s outage
/// of a healthy meter leaves its trace too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_meter_costs_its_timeout_and_every_failed_poll_is_recorded() {
    const DEAD_TIMEOUT: Duration = Duration::from_millis(1200);
    let meters = vec![
        Meter::new("dead", 1, "generic", noisy(1.0, 10.0)).with("timeout_ms = 1200\nretries = 2"),
        Meter::new("fm2", 2, "generic", noisy(4.0, 500.0)).with("timeout_ms = 500\nretries = 2"),
        Meter::new("fm3", 3, "generic", noisy(6.0, 900.0)).with("timeout_ms = 500\nretries = 2"),
    ];
    let mut rig = Rig::start_on(meters, BusLine::Converter)
        .await
        .expect("converter line");
    rig.sim.set_fault(1, Fault::Silent);
    rig.spawn_agent();
    rig.wait(
        "readings of the healthy meters",
        Duration::from_secs(30),
        |rig| {
            let r = rig.receiver.readings(SITE).ok()?;
            (r.iter().filter(|r| r.device.as_str() == "fm3").count() >= 12).then_some(())
        },
    )
    .await;
    // A short outage of a healthy meter.
    rig.sim.set_fault(2, Fault::Silent);
    tokio::time::sleep(Duration::from_secs(2)).await;
    rig.sim.set_fault(2, Fault::None);
    rig.wait("fm2 read again", Duration::from_secs(20), |rig| {
        let r = rig.receiver.readings(SITE).ok()?;
        (r.iter().filter(|r| r.device.as_str() == "fm2").count() >= 14).then_some(())
    })
    .await;
    let drained = rig.wait_drained(Duration::from_secs(30)).await;
    rig.stop_agent().await;
    rig.prove(drained);

    let served = rig.sim.served();
    // Every request to the dead meter is followed by the next request on the line after its
    // timeout and not much later: no retry, no drain.
    let dead: Vec<usize> = (0..served.len()).filter(|&i| served[i].unit == 1).collect();
    assert!(dead.len() >= 3, "{} polls of the dead meter", dead.len());
    let mut costs = Vec::new();
    for &i in &dead {
        let Some(next) = served.get(i + 1) else {
            continue;
        };
        assert_ne!(next.unit, 1, "the dead meter was asked twice in a row");
        let cost = (next.received - served[i].received)
            .to_std()
            .expect("in order");
        costs.push(cost);
        assert!(
            cost >= DEAD_TIMEOUT - Duration::from_millis(50)
                && cost <= DEAD_TIMEOUT + Duration::from_millis(300),
            "a poll of the dead meter took the line for {cost:?} (timeout {DEAD_TIMEOUT:?})"
        );
    }
    costs.sort();
    eprintln!(
        "dead meter: {} polls, line held {:?} (median) / {:?} (max) per poll, timeout {DEAD_TIMEOUT:?}",
        costs.len(),
        costs[costs.len() / 2],
        costs[costs.len() - 1]
    );

    let readings = rig.receiver.readings(SITE).expect("readings");
    // Healthy meters: read within one dead timeout of their slot, stamped when read, `late`
    // exactly when read at or after the next slot.
    for id in ["fm2", "fm3"] {
        let mine: Vec<&Reading> = readings
            .iter()
            .filter(|r| r.device.as_str() == id)
            .collect();
        let mut late = 0;
        for r in &mine {
            let slot = r.ts.timestamp_millis() / 1000 * 1000;
            let after_slot = r.ts.timestamp_millis() - slot;
            assert!(
                after_slot < DEAD_TIMEOUT.as_millis() as i64 + 300,
                "{id} read {after_slot} ms after a slot"
            );
            late += usize::from(r.q.has(Flag::Late));
        }
        assert!(
            late >= 1,
            "{id}: the poll behind the dead meter slipped past its slot"
        );
        assert!(prove_fidelity(&readings, &served, id, if id == "fm2" { 2 } else { 3 }) >= 10);
    }

    // Every failed poll is an event naming its cause.
    let events = rig.receiver.events(SITE).expect("events");
    let failed = |id: &str| {
        events
            .iter()
            .filter(|e| {
                e.kind == EventKind::PollFailed && e.device.as_ref().map(|d| d.as_str()) == Some(id)
            })
            .count()
    };
    assert_eq!(
        failed("dead"),
        dead.len(),
        "one poll_failed per poll of the dead meter"
    );
    assert!(
        events
            .iter()
            .filter(|e| e.kind == EventKind::PollFailed)
            .all(|e| e.message.starts_with("timeout: ")),
        "the cause leads the message"
    );
    assert!(
        failed("fm2") >= 1,
        "a 2 s outage of fm2 left poll_failed events"
    );
}

/// A meter that refuses (exception 02) any read spanning registers it does not map, with a
/// profile whose points are a few registers apart (the ARAD Octave's totals and flow): the
/// agent notices on the first poll, logs it once, and reads that meter point by point from then
/// on, instead of losing it as unreachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meter_that_refuses_reads_across_holes_is_read_point_by_point() {
    let meters = vec![Meter::new(
        "arad",
        5,
        "arad-octave",
        Model::steady(4.0, 777.0, 0.0),
    )];
    let mut rig = Rig::start(meters).await;
    assert!(rig.sim.set_strict_map(5, true));
    rig.spawn_agent();
    rig.wait_readings(4, Duration::from_secs(20)).await;
    rig.stop_agent().await;

    let readings = rig.receiver.readings(SITE).expect("readings");
    for r in &readings {
        let flow = r.flow_lps.expect("flow read");
        assert!((flow - 4.0).abs() < 1e-6, "flow {flow}");
        let total = r.total_m3.expect("total read");
        assert!((777.0..800.0).contains(&total), "total {total}");
    }
    let stderr = rig.agent_stderr();
    assert_eq!(
        stderr.matches("reading its points apart").count(),
        1,
        "logged once:\n{stderr}"
    );
    let events = rig.receiver.events(SITE).expect("events");
    assert!(
        !events
            .iter()
            .any(|e| e.kind == EventKind::DeviceUnreachable),
        "{events:?}"
    );
    // Only the first poll's block read was refused; every read since fits the map.
    let refused = rig
        .sim
        .served()
        .iter()
        .filter(|s| s.unit == 5 && s.values.is_none())
        .count();
    assert_eq!(refused, 1, "one refused read, then the points apart");
}
