//! The disk budget and the full disk on real SQLite files: what eviction deletes, the gap
//! records that report it, and the file size.

use crate::support as outbox_support;

use caudal_agent::metrics::Metrics;
use caudal_agent::outbox::{Outbox, OutboxError, Stamped};
use caudal_common::payload::RecordKind;
use caudal_common::{Event, EventKind, Gap, GapCause, Seq, SeqRange};
use outbox_support::*;
use std::collections::BTreeMap;

const MIB: u64 = 1024 * 1024;

/// What the test appended: device and timestamp (ms) of every seq.
type Appended = BTreeMap<u64, (Option<String>, i64)>;

fn current_gaps(ob: &Outbox) -> Vec<Gap> {
    ob.pending(Seq(0), None, usize::MAX)
        .unwrap()
        .into_iter()
        .filter(|p| p.kind == RecordKind::Gap)
        .map(|p| serde_json::from_str(&p.json).unwrap())
        .collect()
}

/// Every appended record is either still stored or covered by an evicted-gap of its device
/// whose seq range and time span include it; the counts of the gaps add up to the appended
/// records that are gone; what is left is one run of consecutive seqs (eviction cuts from the
/// oldest end only).
fn check_accounting(ob: &Outbox, path: &std::path::Path, appended: &Appended) {
    let stored = stored_seqs(path);
    let last = ob.state().committed.0;
    let first = *stored.first().unwrap();
    assert_eq!(
        stored,
        (first..=last).collect::<Vec<_>>(),
        "what is left is consecutive up to the last seq"
    );
    let gaps = current_gaps(ob);
    assert!(gaps.iter().all(|g| g.cause == GapCause::Evicted));
    let mut gone = 0;
    for (seq, (device, ts)) in appended.range(..first) {
        gone += 1;
        // Gaps of one device may overlap in seqs (a gap record that outlived a later eviction
        // is folded into a still later one), so any of them may be the one that covers it.
        let mine: Vec<&Gap> = gaps
            .iter()
            .filter(|g| g.device.as_ref().map(|d| d.as_str().to_string()) == *device)
            .collect();
        assert!(
            mine.iter()
                .any(|g| g.seqs.is_some_and(|r| r.contains(Seq(*seq)))
                    && g.from.timestamp_millis() <= *ts
                    && *ts <= g.to.timestamp_millis()),
            "evicted seq {seq} of {device:?} at {ts} has no gap spanning it: {mine:?}"
        );
    }
    assert_eq!(
        gaps.iter().map(|g| g.count).sum::<u64>(),
        gone,
        "gap counts add up to the evicted readings and events"
    );
}

#[test]
fn eviction_keeps_the_budget_and_reports_gaps_per_device() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let metrics = Metrics::new();
    let mut ob = Outbox::open(&path, &config(1), true)
        .unwrap()
        .with_metrics(metrics.clone());
    let mut appended = Appended::new();
    let devices = ["fm1", "fm2", "lvl1"];
    for round in 0..300i64 {
        let mut batch: Vec<Stamped> = Vec::new();
        for (i, d) in devices.iter().enumerate() {
            batch.extend(readings(d, round * 100 + i as i64 * 10, 10));
        }
        if round % 7 == 0 {
            let ev = Event {
                seq: Seq(0),
                ts: t(round * 100 + 99),
                device: None,
                kind: EventKind::AgentStarted,
                message: "agent started".into(),
                previous: None,
                current: None,
                wrap: None,
            };
            batch.push(Stamped::new(ev, trusted()));
        }
        let ts: Vec<(Option<String>, i64)> = batch
            .iter()
            .map(|s| {
                (
                    s.draft.device().map(|d| d.as_str().to_string()),
                    s.draft.ts().timestamp_millis(),
                )
            })
            .collect();
        let seqs = ob.append(batch, vec![]).unwrap();
        for (s, x) in seqs.into_iter().zip(ts) {
            appended.insert(s.0, x);
        }
        assert!(
            ob.budget_used() <= MIB,
            "round {round}: {} bytes used of a 1 MiB budget",
            ob.budget_used()
        );
    }
    let stats = ob.stats().unwrap();
    assert!(stats.evicted_total > 1000, "{stats:?}");
    let gaps = current_gaps(&ob);
    let mut gap_devices: Vec<Option<&str>> = gaps
        .iter()
        .map(|g| g.device.as_ref().map(|d| d.as_str()))
        .collect();
    gap_devices.sort();
    gap_devices.dedup();
    assert_eq!(
        gap_devices,
        vec![None, Some("fm1"), Some("fm2"), Some("lvl1")],
        "one gap per device, and one for device-less records"
    );
    check_accounting(&ob, &path, &appended);
    assert!(metrics.encode().contains(&format!(
        "caudal_agent_records_evicted_total {}",
        stats.evicted_total
    )));

    ob.close().unwrap();
    // The budget's per-row overhead is honest: the file itself stays within it (plus the
    // schema's own pages).
    let file = std::fs::metadata(&path).unwrap().len();
    assert!(
        file <= MIB + 64 * 1024,
        "file is {file} bytes for a 1 MiB budget"
    );
    let ob = Outbox::open(&path, &config(1), true).unwrap();
    assert_eq!(ob.stats().unwrap().evicted_total, stats.evicted_total);
    assert_eq!(integrity(&path), "ok");
}

#[test]
fn an_append_larger_than_the_budget_fails_and_keeps_what_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let mut ob = Outbox::open(&path, &config(1), true).unwrap();
    ob.append(readings("fm1", 0, 100), vec![]).unwrap();
    let err = ob.append(readings("fm1", 100, 10_000), vec![]).unwrap_err();
    assert!(matches!(err, OutboxError::Full), "{err}");
    let stats = ob.stats().unwrap();
    assert_eq!(stats.backlog, 100);
    assert_eq!(
        stats.evicted_total, 0,
        "the failed append's eviction rolled back"
    );
    let next = ob.append(readings("fm1", 100, 1), vec![]).unwrap();
    assert_eq!(next[0].counter(), 101);
}

/// `SQLITE_FULL` for real, from a capped database file: appends keep succeeding by evicting
/// the oldest records, the file never passes the cap, and nothing is corrupted.
#[test]
fn a_full_disk_evicts_and_retries() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let metrics = Metrics::new();
    let mut ob = Outbox::open(&path, &config(256), true)
        .unwrap()
        .with_metrics(metrics.clone());
    let cap = 2 * MIB;
    ob.set_max_file_bytes(cap).unwrap();
    let mut appended = Appended::new();
    for round in 0..400i64 {
        let batch = readings("fm1", round * 50, 50);
        let ts: Vec<_> = batch
            .iter()
            .map(|s| (Some("fm1".to_string()), s.draft.ts().timestamp_millis()))
            .collect();
        let seqs = ob.append(batch, vec![status("fm1", "ok", None)]).unwrap();
        for (s, x) in seqs.into_iter().zip(ts) {
            appended.insert(s.0, x);
        }
    }
    let stats = ob.stats().unwrap();
    assert!(stats.evicted_total > 0, "{stats:?}");
    check_accounting(&ob, &path, &appended);
    assert!(
        metrics
            .encode()
            .contains("caudal_agent_store_errors_total{kind=\"disk_full\"}")
    );

    // An append that cannot fit even in an emptied file fails without evicting anything.
    let before = ob.stats().unwrap();
    let err = ob.append(readings("fm1", 0, 40_000), vec![]).unwrap_err();
    assert!(matches!(err, OutboxError::Full), "{err}");
    assert_eq!(ob.stats().unwrap(), before);
    ob.close().unwrap();
    assert!(std::fs::metadata(&path).unwrap().len() <= cap);
    assert_eq!(integrity(&path), "ok");
}

/// Once a large backlog is acknowledged the file gives its free pages back.
#[test]
fn the_file_shrinks_after_a_backlog_drains() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let mut ob = Outbox::open(&path, &config(256), true).unwrap();
    let mut all = Vec::new();
    for round in 0..100 {
        all.extend(
            ob.append(readings("fm1", round * 1000, 1000), vec![])
                .unwrap(),
        );
    }
    let full = std::fs::metadata(&path).unwrap().len()
        + std::fs::metadata(dir.path().join("o.db-wal"))
            .map(|m| m.len())
            .unwrap_or(0);
    assert!(full > 10 * MIB, "{full}");
    for chunk in all.chunks(5000) {
        let n = ob
            .ack(&[SeqRange {
                from: chunk[0],
                to: *chunk.last().unwrap(),
            }])
            .unwrap();
        assert_eq!(n, chunk.len() as u64);
    }
    ob.close().unwrap();
    let drained = std::fs::metadata(&path).unwrap().len();
    assert!(
        drained < full / 4,
        "file {drained} bytes after draining, {full} before"
    );
    assert_eq!(integrity(&path), "ok");
}

/// With many devices, an eviction's gap records (one per device that lost records) can cost
/// more than the slack freed beyond the append: the eviction goes on until the append and its
/// gaps fit, instead of refusing every append from then on.
#[test]
fn many_devices_evict_enough_for_their_gap_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let mut ob = Outbox::open(&path, &config(1), true).unwrap();
    let mut appended = Appended::new();
    let devices: Vec<String> = (0..300)
        .map(|i| format!("meter-with-a-long-identifier-number-{i:03}"))
        .collect();
    for round in 0..60i64 {
        let batch: Vec<Stamped> = devices
            .iter()
            .flat_map(|d| readings(d, round * 10, 1))
            .collect();
        let ts: Vec<(Option<String>, i64)> = batch
            .iter()
            .map(|s| {
                (
                    s.draft.device().map(|d| d.as_str().to_string()),
                    s.draft.ts().timestamp_millis(),
                )
            })
            .collect();
        let seqs = ob
            .append(batch, vec![])
            .unwrap_or_else(|e| panic!("round {round}: append of one poll of every device: {e}"));
        for (s, x) in seqs.into_iter().zip(ts) {
            appended.insert(s.0, x);
        }
        assert!(
            ob.budget_used() <= MIB,
            "round {round}: {} bytes used of a 1 MiB budget",
            ob.budget_used()
        );
    }
    assert!(ob.stats().unwrap().evicted_total > 1000);
    check_accounting(&ob, &path, &appended);
}
