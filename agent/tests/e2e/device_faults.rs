//! Failing meters, end to end, on one Modbus TCP bus: one meter goes silent, another answers
//! every request with an exception, the third keeps working. The healthy meter keeps its
//! cadence; `caudal-agent status`, run while the daemon runs, names each failing meter and its
//! error; the cloud receives a `device_unreachable` event for each, and once the faults clear a
//! `device_recovered` event and a `device_unreachable` gap covering the silence. Then the proof.

use crate::support as e2e_support;

use caudal_agent::simulator::{Fault, Model};
use caudal_common::{EventKind, GapCause};
use chrono::{TimeDelta, Utc};
use e2e_support::*;
use std::time::{Duration, Instant};

const SILENT: &str = "fm-silent";
const FAULTY: &str = "fm-exc";
const HEALTHY: &str = "nivel1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_meters_are_reported_and_do_not_hold_up_the_healthy_one() {
    let started = Instant::now();
    // The healthy meter is polled last in every slot, behind the failing ones.
    let meters = vec![
        Meter::new(SILENT, 1, "generic", Model::steady(12.5, 1000.0, 35.0))
            .with("timeout_ms = 300\nretries = 1"),
        Meter::new(
            FAULTY,
            2,
            "siemens-mag6000",
            Model::steady(8.0, 5000.0, 0.0),
        ),
        Meter::new(HEALTHY, 3, "keller-level", Model::steady(0.0, 0.0, 42.17)),
    ];
    let mut rig = Rig::start(meters).await;
    rig.spawn_agent();
    rig.wait_readings(2, Duration::from_secs(20)).await;

    let fault_at = Utc::now();
    rig.sim.set_fault(rig.unit(SILENT), Fault::Silent);
    rig.sim.set_fault(rig.unit(FAULTY), Fault::Exception(0x04));

    // The technician's view while the daemon runs.
    rig.wait(
        "both failing meters recorded as failing",
        Duration::from_secs(15),
        |rig| {
            let i = rig.inspect()?;
            let failing = |id: &str| {
                i.devices
                    .iter()
                    .any(|d| d.device.as_str() == id && d.result != "ok" && d.last_poll > fault_at)
            };
            (failing(SILENT) && failing(FAULTY)).then_some(())
        },
    )
    .await;
    let (_, out) = rig.cli(&["status"]).await;
    let device_lines = |id: &str| -> (String, String) {
        let mut lines = out.lines().skip_while(|l| !l.trim_start().starts_with(id));
        let head = lines.next().unwrap_or_default().to_string();
        let error = lines.next().unwrap_or_default().to_string();
        (head, error)
    };
    let (head, error) = device_lines(SILENT);
    assert!(
        head.contains("timeout") && error.contains("last error:") && error.contains("unit 1"),
        "status names the silent meter's timeout:\n{out}"
    );
    assert!(error.contains("no answer"), "{out}");
    let (head, error) = device_lines(FAULTY);
    assert!(
        head.contains("exception") && error.contains("unit 2") && error.contains("0x04"),
        "status names the meter's exception:\n{out}"
    );
    let (head, _) = device_lines(HEALTHY);
    assert!(head.contains(" ok "), "{out}");

    // After three failed polls each failing meter is reported unreachable.
    rig.wait(
        "device_unreachable for both failing meters",
        Duration::from_secs(30),
        |rig| {
            let events = rig.receiver.events(SITE).ok()?;
            [SILENT, FAULTY]
                .iter()
                .all(|id| {
                    events.iter().any(|e| {
                        e.kind == EventKind::DeviceUnreachable
                            && e.device.as_ref().is_some_and(|d| d.as_str() == *id)
                    })
                })
                .then_some(())
        },
    )
    .await;
    rig.sim.set_fault(rig.unit(SILENT), Fault::None);
    rig.sim.set_fault(rig.unit(FAULTY), Fault::None);
    // Every poll that failed started before this.
    let cleared_at = Utc::now();

    // The healthy meter kept its one-second cadence through the faults.
    let healthy: Vec<_> = rig
        .receiver
        .readings(SITE)
        .unwrap()
        .into_iter()
        .filter(|r| r.device.as_str() == HEALTHY && r.ts >= fault_at && r.ts <= cleared_at)
        .collect();
    let window = (cleared_at - fault_at).as_seconds_f64();
    assert!(
        healthy.len() as f64 >= 0.6 * window,
        "{} readings of the healthy meter in {window:.1} s of faults",
        healthy.len()
    );
    let mut gaps: Vec<f64> = healthy
        .windows(2)
        .map(|w| (w[1].ts - w[0].ts).as_seconds_f64())
        .collect();
    gaps.sort_by(f64::total_cmp);
    let median = gaps[gaps.len() / 2];
    assert!(
        (0.5..=1.5).contains(&median),
        "median interval between healthy readings {median} s, period 1 s: {gaps:?}"
    );

    // The faults clear: each meter is recovered, with a gap over its silence.
    rig.wait(
        "device_recovered and a gap for both meters",
        Duration::from_secs(30),
        |rig| {
            let events = rig.receiver.events(SITE).ok()?;
            let gaps = rig.receiver.gaps(SITE).ok()?;
            [SILENT, FAULTY]
                .iter()
                .all(|id| {
                    let mine = |d: &Option<caudal_common::DeviceId>| {
                        d.as_ref().is_some_and(|d| d.as_str() == *id)
                    };
                    events
                        .iter()
                        .any(|e| e.kind == EventKind::DeviceRecovered && mine(&e.device))
                        && gaps.iter().any(|g| mine(&g.device))
                })
                .then_some(())
        },
    )
    .await;
    let events = rig.receiver.events(SITE).unwrap();
    for id in [SILENT, FAULTY] {
        let of = |kind| {
            events
                .iter()
                .filter(|e| e.kind == kind && e.device.as_ref().is_some_and(|d| d.as_str() == id))
                .collect::<Vec<_>>()
        };
        let (down, up) = (
            of(EventKind::DeviceUnreachable),
            of(EventKind::DeviceRecovered),
        );
        assert_eq!((down.len(), up.len()), (1, 1), "{id}: {events:?}");
        assert!(
            down[0].ts > fault_at && down[0].ts < cleared_at,
            "{id}: {down:?}"
        );
        assert!(
            up[0].ts > down[0].ts && up[0].seq > down[0].seq,
            "{id}: {up:?}"
        );
        let gaps: Vec<_> = rig
            .receiver
            .gaps(SITE)
            .unwrap()
            .into_iter()
            .filter(|g| g.device.as_ref().is_some_and(|d| d.as_str() == id))
            .collect();
        assert_eq!(gaps.len(), 1, "{id}: {gaps:?}");
        let g = &gaps[0];
        assert_eq!(g.cause, GapCause::DeviceUnreachable);
        assert_eq!(g.seqs, None, "nothing was taken, so no seqs are covered");
        assert!(g.count >= 3, "{id}: {g:?}");
        assert!(
            // A poll that started just before the fault was set may have met it.
            g.from > fault_at - TimeDelta::seconds(1)
                && g.from <= down[0].ts
                && g.to >= down[0].ts
                && g.to < cleared_at
                && g.to < up[0].ts,
            "{id}: the gap spans the failed polls: {g:?}, faults {fault_at}..{cleared_at}"
        );
    }

    // Readings resume for every meter.
    rig.wait(
        "readings of the recovered meters",
        Duration::from_secs(15),
        |rig| {
            let readings = rig.receiver.readings(SITE).ok()?;
            [SILENT, FAULTY]
                .iter()
                .all(|id| {
                    readings
                        .iter()
                        .any(|r| r.device.as_str() == *id && r.ts > cleared_at)
                })
                .then_some(())
        },
    )
    .await;

    let drained = rig.wait_drained(Duration::from_secs(20)).await;
    let exit = rig.stop_agent().await;
    assert_eq!(exit.code(), Some(0), "{exit}");
    let proof = rig.prove(drained);
    eprintln!("caudal-agent status during the faults:\n{out}");
    eprintln!(
        "e2e_device_faults: {} healthy readings in {window:.1} s of faults, {proof:?}, {} s",
        healthy.len(),
        started.elapsed().as_secs_f64()
    );
}
