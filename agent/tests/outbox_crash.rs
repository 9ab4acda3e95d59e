//! Crash safety of the outbox, for real: a child process appends through the handle and prints
//! every seq once `append` returned; the parent kills it with SIGKILL at random moments, then
//! reopens the file and checks that every reported seq is there, that within each epoch (one
//! per start) seqs are consecutive from 1 with no holes, that the running totals match the rows, and that SQLite finds the file intact.
//!
//! The child is this same test binary started again with `CAUDAL_OUTBOX_CRASH_CHILD` set (the
//! file has its own `main`: `harness = false`).

#[path = "outbox/support.rs"]
mod outbox_support;

use caudal_agent::config::{OutboxConfig, Synchronous};
use caudal_agent::outbox::{Outbox, OutboxHandle};
use caudal_common::{Reading, Seq};
use outbox_support::*;
use rusqlite::Connection;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const CHILD_ENV: &str = "CAUDAL_OUTBOX_CRASH_CHILD";
const SYNC_ENV: &str = "CAUDAL_OUTBOX_CRASH_SYNC";
const KILLS: usize = 30;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("outbox_crash: test");
        return;
    }
    if let Ok(path) = std::env::var(CHILD_ENV) {
        child(Path::new(&path));
        return;
    }
    let committed = parent();
    println!("outbox_crash: {KILLS} SIGKILLs, {committed} reported seqs all present");
}

fn cfg(sync: Synchronous) -> OutboxConfig {
    OutboxConfig {
        synchronous: sync,
        ..config(256)
    }
}

/// Appends forever from four tasks, printing each seq after its append returned.
fn child(path: &Path) {
    let sync = match std::env::var(SYNC_ENV).as_deref() {
        Ok("normal") => Synchronous::Normal,
        _ => Synchronous::Full,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    rt.block_on(async {
        let outbox = Outbox::open(path, &cfg(sync), true).unwrap();
        let h = OutboxHandle::spawn(outbox).unwrap();
        for task in 0..4 {
            let h = h.clone();
            tokio::spawn(async move {
                let device = format!("fm{task}");
                let mut i = 0i64;
                loop {
                    let n = fastrand::usize(1..=40);
                    let seqs = h
                        .append(readings(&device, i, n), vec![status(&device, "ok", None)])
                        .await
                        .unwrap_or_else(|e| {
                            // Exit so the parent sees a child that stopped on its own.
                            eprintln!("append failed: {e}");
                            std::process::exit(2)
                        });
                    i += n as i64;
                    let mut out = std::io::stdout().lock();
                    for s in seqs {
                        writeln!(out, "{}", s.0).unwrap();
                    }
                    out.flush().unwrap();
                }
            });
        }
        // Until the parent kills the process.
        std::future::pending::<()>().await
    });
}

fn parent() -> usize {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let exe = std::env::current_exe().unwrap();
    let mut reported: Vec<u64> = Vec::new();
    let mut checked = 0u64;
    for round in 0..KILLS {
        let sync = if round % 2 == 0 { "full" } else { "normal" };
        let mut child = Command::new(&exe)
            .env(CHILD_ENV, &path)
            .env(SYNC_ENV, sync)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map(|l| l.unwrap().parse::<u64>().unwrap())
                .collect::<Vec<u64>>()
        });
        // Early kills land in the database's creation and the first appends; later ones in
        // the middle of group commits.
        std::thread::sleep(Duration::from_millis(fastrand::u64(1..300)));
        assert!(
            child.try_wait().unwrap().is_none(),
            "round {round}: the child stopped on its own"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        let got = reader.join().unwrap();
        reported.extend(&got);
        check(&path, &reported, round, &mut checked);
    }
    assert!(
        reported.len() > 1000,
        "the children committed too little to test anything: {}",
        reported.len()
    );
    reported.len()
}

fn check(path: &Path, reported: &[u64], round: usize, checked: &mut u64) {
    if !path.exists() {
        assert!(reported.is_empty());
        return;
    }
    // Reopening recovers the WAL like the agent would.
    let ob = Outbox::open(path, &cfg(Synchronous::Full), true).unwrap();
    let stats = ob.stats().unwrap();
    ob.close().unwrap();
    assert_eq!(integrity(path), "ok", "round {round}");

    let stored = stored_seqs(path);
    if stored.is_empty() {
        assert!(
            reported.is_empty(),
            "round {round}: reported seqs but none stored"
        );
        return;
    }
    // Every start opens a new epoch: within each, counters run from 1 with no hole.
    let mut by_epoch: std::collections::BTreeMap<u32, Vec<u32>> = Default::default();
    for s in &stored {
        by_epoch
            .entry(Seq(*s).epoch())
            .or_default()
            .push(Seq(*s).counter());
    }
    for (epoch, counters) in &by_epoch {
        let expected: Vec<u32> = (1..=counters.len() as u32).collect();
        assert_eq!(
            counters, &expected,
            "round {round}: epoch {epoch}'s seqs are consecutive from 1"
        );
    }
    let missing: Vec<&u64> = reported
        .iter()
        .filter(|s| stored.binary_search(s).is_err())
        .collect();
    assert!(
        missing.is_empty(),
        "round {round}: committed seqs lost: {missing:?}"
    );

    let c = Connection::open(path).unwrap();
    let (rows, bytes): (i64, i64) = c
        .query_row(
            "SELECT count(*), coalesce(sum(length(json)), 0) FROM records",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        stats.backlog, rows as u64,
        "round {round}: row count in meta"
    );
    assert_eq!(
        stats.bytes, bytes as u64,
        "round {round}: byte total in meta"
    );
    // Rows that existed at the previous check were verified then.
    let mut s = c
        .prepare("SELECT seq, json FROM records WHERE seq > ?1")
        .unwrap();
    let mut q = s.query([*checked as i64]).unwrap();
    while let Some(r) = q.next().unwrap() {
        let seq: i64 = r.get(0).unwrap();
        let json: String = r.get(1).unwrap();
        let reading: Reading = serde_json::from_str(&json).unwrap();
        assert_eq!(
            reading.seq.0, seq as u64,
            "round {round}: JSON carries its row's seq"
        );
        *checked = seq as u64;
    }
}
