//! The synchronous outbox on real SQLite files: sequence assignment, atomic appends, pending,
//! acknowledgements, device rows, schema versions.

use crate::support as outbox_support;

use caudal_agent::metrics::Metrics;
use caudal_agent::outbox::{Draft, Outbox, OutboxError, Stamped};
use caudal_common::payload::RecordKind;
use caudal_common::seq::time_epoch;
use caudal_common::{Event, EventKind, Reading, Seq, SeqRange};
use outbox_support::*;
use rusqlite::Connection;

fn range(from: Seq, to: Seq) -> SeqRange {
    SeqRange { from, to }
}

#[test]
fn seqs_are_consecutive_and_continue_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let before = chrono::Utc::now().timestamp();
    let mut ob = Outbox::open(&path, &config(16), true).unwrap();
    let first = ob.append(readings("fm1", 0, 3), vec![]).unwrap();
    let epoch = first[0].epoch();
    let expected = time_epoch(before).unwrap();
    assert!(
        (expected..=expected + 5).contains(&epoch),
        "a trusted clock picks the time epoch: {epoch} vs {expected}"
    );
    assert_eq!(
        first,
        vec![Seq::new(epoch, 1), Seq::new(epoch, 2), Seq::new(epoch, 3)]
    );
    assert_eq!(ob.state().committed, Seq::new(epoch, 3));
    ob.close().unwrap();

    // Every start opens a new epoch (the file may have been rolled back): with an untrusted
    // clock a little above the stored one, its counter from 1.
    let mut ob = Outbox::open(&path, &config(16), false).unwrap();
    assert_eq!(ob.state().committed, Seq::new(epoch, 3));
    let next = ob.append(readings("fm1", 3, 2), vec![]).unwrap();
    let second = next[0].epoch();
    assert!(
        (epoch + 1..=epoch + 1024).contains(&second),
        "a start without a trusted clock steps the epoch: {epoch} → {second}"
    );
    assert_eq!(next, vec![Seq::new(second, 1), Seq::new(second, 2)]);
    assert!(first[2] < next[0], "seqs keep increasing across starts");

    let pending = ob.pending(Seq(0), None, 100).unwrap();
    assert_eq!(pending.len(), 5);
    let r: Reading = serde_json::from_str(&pending[4].json).unwrap();
    assert_eq!(
        r.seq,
        Seq::new(second, 2),
        "the stored JSON carries its seq"
    );
    assert_eq!(pending[4].kind, RecordKind::Reading);
    assert_eq!(pending[4].ts, t(4));
}

#[test]
fn untrusted_clock_picks_a_random_epoch_for_a_new_database() {
    let dir = tempfile::tempdir().unwrap();
    let mut ob = Outbox::open(&dir.path().join("o.db"), &config(16), false).unwrap();
    let s = ob.append(readings("fm1", 0, 1), vec![]).unwrap();
    assert!(
        s[0].epoch() >= 1 << 30,
        "random epochs live in the upper half"
    );
    assert_eq!(s[0].counter(), 1);
}

#[test]
fn a_used_up_counter_starts_the_next_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let mut ob = Outbox::open(&path, &config(16), true).unwrap();
    let epoch = ob.append(readings("fm1", 0, 1), vec![]).unwrap()[0].epoch();
    // The writer reloads `meta` inside each transaction, so this is what its next append sees.
    Connection::open(&path)
        .unwrap()
        .execute(
            "UPDATE meta SET next_counter = ?1",
            [i64::from(u32::MAX) - 1],
        )
        .unwrap();
    let s = ob.append(readings("fm1", 1, 3), vec![]).unwrap();
    assert_eq!(s[0], Seq::new(epoch, u32::MAX - 1));
    assert_eq!(s[1], Seq::new(epoch, u32::MAX));
    assert!(s[2].epoch() > epoch, "next epoch after {epoch}: {}", s[2]);
    assert!(s[2].epoch() < 1 << 30, "stays in the time range");
    assert_eq!(s[2].counter(), 1);
    assert!(s[1] < s[2], "seqs keep increasing across epochs");
    ob.close().unwrap();
    let ob = Outbox::open(&path, &config(16), false).unwrap();
    assert_eq!(ob.state().committed, s[2]);
}

/// A real failure in the middle of an append (a trigger aborts the third insert) rolls the
/// whole append back and burns no seq.
#[test]
fn a_failed_append_leaves_nothing_and_burns_no_seq() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let metrics = Metrics::new();
    let mut ob = Outbox::open(&path, &config(16), true)
        .unwrap()
        .with_metrics(metrics.clone());
    let ok = ob.append(readings("fm1", 0, 2), vec![]).unwrap();
    Connection::open(&path)
        .unwrap()
        .execute_batch(
            "CREATE TRIGGER poison BEFORE INSERT ON records WHEN NEW.device = 'poison'
             BEGIN SELECT RAISE(ABORT, 'poisoned'); END;",
        )
        .unwrap();
    let mut bad = readings("fm1", 2, 2);
    bad.extend(readings("poison", 4, 1));
    let err = ob
        .append(bad, vec![status("fm1", "ok", Some("{}"))])
        .unwrap_err();
    assert!(matches!(err, OutboxError::Sqlite(_)), "{err}");
    assert_eq!(ob.stats().unwrap().backlog, 2);
    assert!(
        ob.device_status().unwrap().is_empty(),
        "device row rolled back too"
    );

    let next = ob.append(readings("fm1", 5, 1), vec![]).unwrap();
    assert_eq!(
        next[0].counter(),
        ok[1].counter() + 1,
        "no hole after the failure"
    );
    let stored = stored_seqs(&path);
    assert_eq!(stored.len(), 3);
    assert!(
        metrics
            .encode()
            .contains("caudal_agent_store_errors_total{kind=\"sqlite\"} 1")
    );
    assert!(
        metrics
            .encode()
            .contains("caudal_agent_records_stored_total{kind=\"reading\"} 3")
    );
}

#[test]
fn ack_deletes_exactly_the_acked_seqs_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let mut ob = Outbox::open(&path, &config(16), true).unwrap();
    let s = ob.append(readings("fm1", 0, 10), vec![]).unwrap();
    let stats = ob.stats().unwrap();
    assert_eq!(stats.backlog, 10);
    let bytes_before = stats.bytes;

    let acked = vec![range(s[0], s[2]), range(s[5], s[5])];
    assert_eq!(ob.ack(&acked).unwrap(), 4);
    assert_eq!(ob.ack(&acked).unwrap(), 0, "acking again deletes nothing");
    let unknown = Seq::new(s[0].epoch() + 1, 1);
    assert_eq!(
        ob.ack(&[range(unknown, unknown), range(s[9], s[8])])
            .unwrap(),
        0,
        "unknown seqs and reversed ranges are ignored"
    );
    // Overlapping an already-acked range counts only what still existed.
    assert_eq!(ob.ack(&[range(s[0], s[3])]).unwrap(), 1);

    let left: Vec<Seq> = ob
        .pending(Seq(0), None, 100)
        .unwrap()
        .iter()
        .map(|p| p.seq)
        .collect();
    assert_eq!(left, vec![s[4], s[6], s[7], s[8], s[9]]);
    let stats = ob.stats().unwrap();
    assert_eq!(stats.backlog, 5);
    assert!(stats.bytes < bytes_before && stats.bytes > 0);
    assert_eq!(stats.oldest, Some(t(4)));

    ob.close().unwrap();
    let ob = Outbox::open(&path, &config(16), true).unwrap();
    assert_eq!(ob.stats().unwrap().backlog, 5, "totals survive a reopen");
}

#[test]
fn pending_honours_after_upto_and_limit() {
    let dir = tempfile::tempdir().unwrap();
    let mut ob = Outbox::open(&dir.path().join("o.db"), &config(16), true).unwrap();
    let s = ob.append(readings("fm1", 0, 10), vec![]).unwrap();
    let seqs =
        |v: Vec<caudal_agent::outbox::Pending>| v.into_iter().map(|p| p.seq).collect::<Vec<_>>();
    assert_eq!(seqs(ob.pending(s[2], None, 3).unwrap()), s[3..6].to_vec());
    assert_eq!(
        seqs(ob.pending(s[2], Some(s[4]), 10).unwrap()),
        s[3..5].to_vec()
    );
    assert!(ob.pending(s[9], None, 10).unwrap().is_empty());
    assert!(ob.pending(Seq(0), None, 0).unwrap().is_empty());
}

#[test]
fn events_and_device_less_records_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let mut ob = Outbox::open(&dir.path().join("o.db"), &config(16), true).unwrap();
    let ev = Event {
        seq: Seq(0),
        ts: t(7),
        device: None,
        kind: EventKind::AgentStarted,
        message: "caudal-agent 0.1.0".into(),
        previous: None,
        current: None,
        wrap: None,
    };
    let s = ob
        .append(vec![Stamped::new(ev.clone(), trusted())], vec![])
        .unwrap();
    let p = ob.pending(Seq(0), None, 10).unwrap();
    assert_eq!(p[0].kind, RecordKind::Event);
    let back: Event = serde_json::from_str(&p[0].json).unwrap();
    assert_eq!(back, Event { seq: s[0], ..ev });
    assert_eq!(Draft::from(back).device(), None);
}

#[test]
fn device_rows_are_upserted_and_keep_the_last_reading() {
    let dir = tempfile::tempdir().unwrap();
    let mut ob = Outbox::open(&dir.path().join("o.db"), &config(16), true).unwrap();
    ob.append(vec![], vec![status("fm1", "ok", Some(r#"{"a":1}"#))])
        .unwrap();
    ob.append(
        vec![],
        vec![status("fm1", "timeout", None), status("lvl1", "ok", None)],
    )
    .unwrap();
    let rows = ob.device_status().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].device.as_str(), "fm1");
    assert_eq!(rows[0].result, "timeout");
    assert_eq!(rows[0].consecutive_failures, 1);
    assert_eq!(rows[0].last_error.as_deref(), Some("fm1: timeout"));
    assert_eq!(
        rows[0].last_reading.as_deref(),
        Some(r#"{"a":1}"#),
        "a failed poll keeps the previous reading"
    );
    assert_eq!(rows[1].device.as_str(), "lvl1");
    assert_eq!(ob.stats().unwrap().backlog, 0);
}

#[test]
fn a_database_from_a_newer_agent_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    Outbox::open(&path, &config(16), true)
        .unwrap()
        .close()
        .unwrap();
    Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    let err = Outbox::open(&path, &config(16), true).unwrap_err();
    assert!(
        matches!(err, OutboxError::Schema { found: 99, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("o.db"), "{err}");
}

#[test]
fn a_new_database_is_wal_with_incremental_vacuum() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let ob = Outbox::open(&path, &config(16), true).unwrap();
    let c = Connection::open(&path).unwrap();
    let mode: String = c
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    let vacuum: i64 = c
        .pragma_query_value(None, "auto_vacuum", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    assert_eq!(vacuum, 2, "incremental");
    drop(ob);
}
