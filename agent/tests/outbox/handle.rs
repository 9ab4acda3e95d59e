//! The outbox handle and its worker thread on a real SQLite file: concurrent appends through
//! group commits, the `Spool` seam, shutdown, and inspection while the writer runs.

use crate::support as outbox_support;

use caudal_agent::config::OutboxConfig;
use caudal_agent::outbox::{Outbox, OutboxError, OutboxHandle, Spool, inspect};
use caudal_common::{Seq, SeqRange};
use outbox_support::*;
use rusqlite::Connection;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

fn spawn(path: &std::path::Path, cfg: OutboxConfig) -> OutboxHandle {
    OutboxHandle::spawn(Outbox::open(path, &cfg, true).unwrap()).unwrap()
}

async fn concurrent_appends_get_consecutive_seqs(commit_interval_ms: u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let cfg = OutboxConfig {
        commit_interval_ms,
        ..config(64)
    };
    let h = spawn(&path, cfg);
    let mut tasks = Vec::new();
    for task in 0..16i64 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            let device = format!("fm{task}");
            let mut mine = Vec::new();
            for i in 0..25i64 {
                let n = (i % 3 + 1) as usize;
                let s = h
                    .append(
                        readings(&device, i * 10, n),
                        vec![status(&device, "ok", None)],
                    )
                    .await
                    .unwrap();
                assert_eq!(s.len(), n);
                mine.extend(s);
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let mine = t.await.unwrap();
        assert!(
            mine.windows(2).all(|w| w[0] < w[1]),
            "a task's seqs increase"
        );
        all.extend(mine);
    }
    all.sort();
    let first = all[0];
    let expected: Vec<Seq> = (0..all.len() as u32)
        .map(|i| Seq::new(first.epoch(), first.counter() + i))
        .collect();
    assert_eq!(all, expected, "no duplicates, no holes");
    assert_eq!(h.watch().borrow().committed, *all.last().unwrap());
    assert_eq!(h.stats().await.unwrap().backlog, all.len() as u64);
    assert_eq!(h.device_status().await.unwrap().len(), 16);
    h.shutdown().await.unwrap();
    assert_eq!(stored_seqs(&path).len(), all.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_commit_as_soon_as_possible() {
    concurrent_appends_get_consecutive_seqs(0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_with_paced_commits() {
    concurrent_appends_get_consecutive_seqs(5).await;
}

/// One append that cannot be stored fails alone; the appends committed in the same group
/// succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_append_does_not_fail_its_group() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let cfg = OutboxConfig {
        commit_interval_ms: 100,
        ..config(64)
    };
    let h = spawn(&path, cfg);
    h.append(readings("fm1", 0, 1), vec![]).await.unwrap();
    Connection::open(&path)
        .unwrap()
        .execute_batch(
            "CREATE TRIGGER poison BEFORE INSERT ON records WHEN NEW.device = 'poison'
             BEGIN SELECT RAISE(ABORT, 'poisoned'); END;",
        )
        .unwrap();
    // Sent together right after a commit: the worker gathers them into one group.
    let mut tasks = Vec::new();
    for i in 0..8 {
        let h = h.clone();
        let device = if i == 3 { "poison" } else { "fm1" };
        tasks.push(tokio::spawn(async move {
            h.append(readings(device, i, 2), vec![]).await
        }));
    }
    let mut ok = 0;
    for (i, t) in tasks.into_iter().enumerate() {
        match t.await.unwrap() {
            Ok(s) => {
                assert_ne!(i, 3);
                assert_eq!(s.len(), 2);
                ok += 1;
            }
            Err(e) => {
                assert_eq!(i, 3, "only the poisoned append fails: {e}");
                assert!(matches!(e, OutboxError::Sqlite(_)));
            }
        }
    }
    assert_eq!(ok, 7);
    let stored = stored_seqs(&path);
    assert_eq!(stored.len(), 1 + 7 * 2);
    assert!(
        stored.windows(2).all(|w| w[1] == w[0] + 1),
        "the failed append burnt no seq: {stored:?}"
    );
    h.shutdown().await.unwrap();
}

/// The uplink drives the outbox only through `Spool`.
async fn drain<S: Spool>(spool: &S) -> u64 {
    let mut acked = 0;
    let mut after = Seq(0);
    loop {
        let batch = spool.pending(after, None, 7).await.unwrap();
        let Some(last) = batch.last() else {
            return acked;
        };
        after = last.seq;
        let ranges = SeqRange::compact(batch.iter().map(|p| p.seq));
        acked += spool.ack(ranges).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spool_seam_drains_the_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let h = spawn(&dir.path().join("o.db"), config(64));
    let mut rx = Spool::watch(&h);
    let s = h.append(readings("fm1", 0, 50), vec![]).await.unwrap();
    assert!(rx.has_changed().unwrap());
    assert_eq!(rx.borrow_and_update().committed, s[49]);
    assert_eq!(drain(&h).await, 50);
    assert_eq!(Spool::stats(&h).await.unwrap().backlog, 0);
    h.shutdown().await.unwrap();
    let err = h.append(readings("fm1", 0, 1), vec![]).await.unwrap_err();
    assert!(matches!(err, OutboxError::Stopped), "{err}");
}

/// `caudal-agent status` reads the file while the daemon writes it: every inspection sees a
/// committed state, never an error, and the figures only grow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_while_the_writer_is_active() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("o.db");
    let h = spawn(&path, config(64));
    h.append(
        readings("fm1", 0, 1),
        vec![status("fm1", "ok", Some("{\"x\":1}"))],
    )
    .await
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (h, stop) = (h.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 1;
            while !stop.load(Ordering::Relaxed) {
                h.append(
                    readings("fm1", i, 20),
                    vec![status("fm1", "ok", None), status("lvl1", "timeout", None)],
                )
                .await
                .unwrap();
                i += 20;
            }
        })
    };
    let p = path.clone();
    let seen = tokio::task::spawn_blocking(move || {
        let mut seen = Vec::new();
        for _ in 0..60 {
            let i = inspect(&p).unwrap();
            seen.push((i.last_seq, i.backlog));
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        seen
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    let distinct: BTreeSet<_> = seen.iter().collect();
    assert!(
        distinct.len() > 1,
        "the writer made progress while inspected"
    );

    h.shutdown().await.unwrap();
    let i = inspect(&path).unwrap();
    assert_eq!(i.backlog as usize, stored_seqs(&path).len());
    assert_eq!(i.last_seq.unwrap().0, *stored_seqs(&path).last().unwrap());
    assert_eq!(i.held, 0);
    assert_eq!(i.devices.len(), 2);
    // The status row keeps the stored JSON of the reading appended with it (seq included),
    // not the draft the poller encoded before the seq existed.
    let first = stored_seqs(&path)[0];
    let last = i.devices[0].last_reading.as_deref().unwrap();
    assert!(last.contains(&format!("\"seq\":{first}")), "{last}");
    assert!(last.contains("\"device\":\"fm1\""), "{last}");
    let text = i.to_string();
    for needle in [
        "backlog",
        "fm1",
        "lvl1",
        "timeout",
        "last error: lvl1: timeout",
        "last reading: {\"seq\":",
    ] {
        assert!(text.contains(needle), "{needle:?} missing from:\n{text}");
    }
}

#[test]
fn inspect_refuses_a_missing_file_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let err = inspect(&dir.path().join("nope.db")).unwrap_err();
    assert!(matches!(err, OutboxError::Open { .. }));
    assert!(err.to_string().contains("nope.db"), "{err}");
}
