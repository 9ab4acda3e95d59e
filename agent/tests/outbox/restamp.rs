//! Clock hold-back on a real SQLite file: records taken with an untrusted clock wait, and are
//! re-stamped (this boot) or marked time-unknown (earlier boots) when the clock is trusted.

use crate::support as outbox_support;

use caudal_agent::outbox::{Outbox, Restamped, Stamped};
use caudal_common::payload::RecordKind;
use caudal_common::{Event, EventKind, Flag, Gap, GapCause, Quality, Reading, Seq, SeqRange};
use chrono::{DateTime, Duration, Utc};
use outbox_support::*;

/// Unix ms = boottime + this offset, for the current boot once the clock is trusted.
const OFFSET_MS: i64 = 1_760_000_000_000;

#[test]
fn held_records_wait_for_the_clock_then_are_restamped_or_marked_unknown() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let mut ob = Outbox::open(&path, &config(16), false).unwrap();
    // The wall clock says 1970 + a bit: untrusted.
    let bogus = DateTime::<Utc>::from_timestamp(86_400, 0).unwrap();

    // An earlier boot that never got a trusted clock.
    let old = ob
        .append(
            vec![Stamped::new(
                reading("fm1", bogus, 1.0),
                untrusted("boot-old", 5_000),
            )],
            vec![],
        )
        .unwrap();
    // This boot: a reading, an event and a device-unreachable gap, all before sync.
    let gap = Gap {
        seq: Seq(0),
        device: Some(dev("fm1")),
        from: bogus - Duration::seconds(60),
        to: bogus,
        seqs: None,
        count: 0,
        cause: GapCause::DeviceUnreachable,
    };
    let ev = Event {
        seq: Seq(0),
        ts: bogus,
        device: None,
        kind: EventKind::ClockUnsynced,
        message: String::new(),
        previous: None,
        current: None,
        wrap: None,
    };
    let now_boot = ob
        .append(
            vec![
                Stamped::new(reading("fm1", bogus, 2.0), untrusted("boot-now", 10_000)),
                Stamped::new(ev, untrusted("boot-now", 10_500)),
                Stamped::new(gap, untrusted("boot-now", 11_000)),
            ],
            vec![],
        )
        .unwrap();
    // A trusted reading in between (the clock was briefly fine).
    let good = ob.append(readings("fm2", 0, 1), vec![]).unwrap();

    let pending = ob.pending(Seq(0), None, 100).unwrap();
    assert_eq!(
        pending.iter().map(|p| p.seq).collect::<Vec<_>>(),
        good,
        "held records are not sendable"
    );
    let stats = ob.stats().unwrap();
    assert_eq!((stats.backlog, stats.held), (5, 4));

    // Held records survive a restart.
    ob.close().unwrap();
    let mut ob = Outbox::open(&path, &config(16), true).unwrap();
    let mut watch = ob.watch();
    let generation = watch.borrow_and_update().generation;

    let release = t(3600);
    let done = ob.restamp_at("boot-now", OFFSET_MS, release).unwrap();
    assert_eq!(
        done,
        Restamped {
            restamped: 3,
            time_unknown: 1
        }
    );
    assert!(watch.has_changed().unwrap());
    assert_eq!(watch.borrow_and_update().generation, generation + 1);

    let pending = ob.pending(Seq(0), None, 100).unwrap();
    let mut expected: Vec<Seq> = old.iter().chain(&now_boot).chain(&good).copied().collect();
    expected.sort();
    assert_eq!(
        pending.iter().map(|p| p.seq).collect::<Vec<_>>(),
        expected,
        "all released, ascending"
    );
    let json = |s: Seq| &pending.iter().find(|p| p.seq == s).unwrap().json;

    let r: Reading = serde_json::from_str(json(now_boot[0])).unwrap();
    assert_eq!(r.ts.timestamp_millis(), 10_000 + OFFSET_MS);
    assert_eq!(
        r.q,
        Quality::GOOD
            .with(Flag::ClockUnsynced)
            .with(Flag::Restamped)
    );
    let e: Event = serde_json::from_str(json(now_boot[1])).unwrap();
    assert_eq!(e.ts.timestamp_millis(), 10_500 + OFFSET_MS);
    let g: Gap = serde_json::from_str(json(now_boot[2])).unwrap();
    assert_eq!(g.to.timestamp_millis(), 11_000 + OFFSET_MS);
    assert_eq!(
        g.to - g.from,
        Duration::seconds(60),
        "the gap keeps its span"
    );

    let r: Reading = serde_json::from_str(json(old[0])).unwrap();
    assert_eq!(
        r.ts, release,
        "an earlier boot's time is only bounded by the release"
    );
    assert!(r.q.has(Flag::TimeUnknown) && r.q.has(Flag::ClockUnsynced));
    assert!(!r.q.has(Flag::Restamped));
    let p = pending.iter().find(|p| p.seq == old[0]).unwrap();
    assert_eq!((p.kind, p.ts), (RecordKind::Reading, release));

    let stats = ob.stats().unwrap();
    assert_eq!((stats.backlog, stats.held), (5, 0));
    let json_bytes: u64 = pending.iter().map(|p| p.json.len() as u64).sum();
    assert_eq!(
        stats.bytes, json_bytes,
        "byte totals follow the rewritten JSON"
    );

    // Nothing left to release: no new generation.
    assert_eq!(
        ob.restamp("boot-now", OFFSET_MS).unwrap(),
        Restamped::default()
    );
    assert!(!watch.has_changed().unwrap());

    // Released records are acknowledged like any other.
    let all = SeqRange {
        from: expected[0],
        to: *expected.last().unwrap(),
    };
    assert_eq!(ob.ack(&[all]).unwrap(), 5);
}

#[test]
fn an_untrusted_reading_is_flagged_even_if_the_poller_forgot() {
    let dir = tempfile::tempdir().unwrap();
    let mut ob = Outbox::open(&dir.path().join("o.db"), &config(16), false).unwrap();
    ob.append(
        vec![Stamped::new(reading("fm1", t(0), 1.0), untrusted("b", 1))],
        vec![],
    )
    .unwrap();
    ob.restamp_at("b", OFFSET_MS, t(10)).unwrap();
    let p = ob.pending(Seq(0), None, 10).unwrap();
    let r: Reading = serde_json::from_str(&p[0].json).unwrap();
    assert!(r.q.has(Flag::ClockUnsynced) && r.q.has(Flag::Restamped));
}
