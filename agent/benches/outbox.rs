//! Outbox figures on this machine (prints, asserts nothing): durable append throughput by
//! `synchronous` mode and group size, the handle's group commit under concurrent producers,
//! bytes written per commit (flash wear), pending + ack drain throughput, the file size per
//! million readings (which sets `ROW_OVERHEAD_BYTES`), and what a start costs (open, with the
//! new epoch's commit).
//!
//! `cargo bench -p caudal-agent --bench outbox`; each figure is the median of 3 runs.
//! `cargo bench -p caudal-agent --bench outbox -- open` prints only the start's cost.

use caudal_agent::config::{OutboxConfig, Synchronous};
use caudal_agent::outbox::{Outbox, OutboxHandle, Stamped};
use caudal_common::{Seq, SeqRange};
// A reading like a flow meter's: ~150 bytes of JSON, the same the backlog benches queue.
use caudal_testkit::backlog::reading;
use std::path::Path;
use std::time::{Duration, Instant};

const RUNS: usize = 3;
/// Each throughput run appends for this long (or up to `MAX_READINGS`).
const RUN_FOR: Duration = Duration::from_secs(2);
const MAX_READINGS: usize = 400_000;

fn cfg(sync: Synchronous) -> OutboxConfig {
    OutboxConfig {
        path: None,
        disk_budget_mb: 4096,
        synchronous: sync,
        commit_interval_ms: 0,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Bytes this process passed to write(2) so far.
fn written() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("wchar:").map(|v| v.trim().parse().ok()))
                .flatten()
        })
        .unwrap_or(0)
}

fn file_size(path: &Path) -> u64 {
    let wal = path.with_extension("db-wal");
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
        + std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0)
}

/// (readings/s, bytes written per commit) appending `group` readings per transaction.
fn append_run(sync: Synchronous, group: usize) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ob = Outbox::open(&dir.path().join("o.db"), &cfg(sync), true).expect("open");
    let (start, w0) = (Instant::now(), written());
    let (mut n, mut commits) = (0, 0u64);
    while start.elapsed() < RUN_FOR && n < MAX_READINGS {
        let batch: Vec<Stamped> = (n..n + group).map(reading).collect();
        ob.append(batch, vec![]).expect("append");
        n += group;
        commits += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    let per_commit = (written() - w0) as f64 / commits as f64;
    (n as f64 / secs, per_commit)
}

/// Readings/s from `producers` concurrent tasks appending `group` readings each through the
/// handle (group commit).
fn handle_run(sync: Synchronous, producers: usize, group: usize) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let ob = Outbox::open(&dir.path().join("o.db"), &cfg(sync), true).expect("open");
    let h = OutboxHandle::spawn(ob).expect("spawn");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let start = Instant::now();
    let total: usize = rt.block_on(async {
        let mut tasks = Vec::new();
        for p in 0..producers {
            let h = h.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = 0;
                while start.elapsed() < RUN_FOR {
                    let batch: Vec<Stamped> = (0..group).map(|i| reading(p + i + n)).collect();
                    h.append(batch, vec![]).await.expect("append");
                    n += group;
                }
                n
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.expect("task");
        }
        h.shutdown().await.expect("shutdown");
        total
    });
    total as f64 / start.elapsed().as_secs_f64()
}

/// Records/s drained by `pending` (500 at a time) + `ack` of what it returned.
fn drain_run(sync: Synchronous, backlog: usize) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ob = Outbox::open(&dir.path().join("o.db"), &cfg(sync), true).expect("open");
    for start in (0..backlog).step_by(1000) {
        ob.append((start..start + 1000).map(reading).collect(), vec![])
            .expect("append");
    }
    let t0 = Instant::now();
    let (mut after, mut drained) = (Seq(0), 0u64);
    loop {
        let batch = ob.pending(after, None, 500).expect("pending");
        let Some(last) = batch.last() else { break };
        after = last.seq;
        let ranges = SeqRange::compact(batch.iter().map(|p| p.seq));
        drained += ob.ack(&ranges).expect("ack");
    }
    drained as f64 / t0.elapsed().as_secs_f64()
}

/// (file bytes, JSON bytes) after a million readings.
fn size_run() -> (u64, u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("o.db");
    let mut ob = Outbox::open(&path, &cfg(Synchronous::Normal), true).expect("open");
    for start in (0..1_000_000).step_by(1000) {
        ob.append((start..start + 1000).map(reading).collect(), vec![])
            .expect("append");
    }
    let json = ob.stats().expect("stats").bytes;
    ob.close().expect("close");
    (file_size(&path), json)
}

/// Milliseconds and bytes written for one start (close, then open: the new epoch is committed
/// at open) of an outbox holding `backlog` readings, the median of `starts` starts.
fn open_run(sync: Synchronous, backlog: usize, starts: usize) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("outbox.db");
    let mut ob = Outbox::open(&path, &cfg(sync), true).expect("open");
    for start in (0..backlog).step_by(1000) {
        ob.append((start..start + 1000).map(reading).collect(), vec![])
            .expect("append");
    }
    ob.close().expect("close");
    let mut times = Vec::with_capacity(starts);
    let mut bytes = Vec::with_capacity(starts);
    for _ in 0..starts {
        let w = written();
        let t = Instant::now();
        let ob = Outbox::open(&path, &cfg(sync), false).expect("open");
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        bytes.push((written() - w) as f64);
        ob.close().expect("close");
    }
    (median(times), median(bytes))
}

fn print_open() {
    println!("start (Outbox::open of an existing file, its new epoch committed)");
    println!(
        "{:<8} {:>10} {:>10} {:>12}",
        "sync", "backlog", "ms/start", "written"
    );
    for sync in [Synchronous::Full, Synchronous::Normal] {
        for backlog in [0, 100_000] {
            let runs: Vec<(f64, f64)> = (0..RUNS).map(|_| open_run(sync, backlog, 20)).collect();
            println!(
                "{:<8} {:>10} {:>10.2} {:>8.1} KiB",
                format!("{sync:?}"),
                backlog,
                median(runs.iter().map(|r| r.0).collect()),
                median(runs.iter().map(|r| r.1).collect()) / 1024.0
            );
        }
    }
}

fn main() {
    if std::env::args().skip(1).any(|a| a == "open") {
        print_open();
        return;
    }
    println!("outbox bench: median of {RUNS} runs, {RUN_FOR:?} each");
    println!();
    println!("durable append, one transaction per group (Outbox::append)");
    println!(
        "{:<8} {:>6} {:>14} {:>18}",
        "sync", "group", "readings/s", "written/commit"
    );
    for sync in [Synchronous::Full, Synchronous::Normal] {
        for group in [1, 10, 100, 1000] {
            let runs: Vec<(f64, f64)> = (0..RUNS).map(|_| append_run(sync, group)).collect();
            let rate = median(runs.iter().map(|r| r.0).collect());
            let wc = median(runs.iter().map(|r| r.1).collect());
            println!(
                "{:<8} {:>6} {:>14.0} {:>14.1} KiB",
                format!("{sync:?}"),
                group,
                rate,
                wc / 1024.0
            );
        }
    }
    println!();
    println!("group commit through OutboxHandle (commit_interval_ms = 0)");
    println!(
        "{:<8} {:>10} {:>6} {:>14}",
        "sync", "producers", "group", "readings/s"
    );
    for (producers, group) in [(1, 1), (16, 1), (16, 10)] {
        let sync = Synchronous::Full;
        let rate = median(
            (0..RUNS)
                .map(|_| handle_run(sync, producers, group))
                .collect(),
        );
        println!(
            "{:<8} {:>10} {:>6} {:>14.0}",
            format!("{sync:?}"),
            producers,
            group,
            rate
        );
    }
    println!();
    let backlog = 200_000;
    let rate = median(
        (0..RUNS)
            .map(|_| drain_run(Synchronous::Full, backlog))
            .collect(),
    );
    println!("drain (pending 500 + ack, Full) of {backlog} records: {rate:.0} records/s");
    println!();
    let (file, json) = size_run();
    let rows = 1_000_000u64;
    println!(
        "file per million readings: {:.1} MiB ({} B/reading: {} B JSON + {} B overhead)",
        file as f64 / (1024.0 * 1024.0),
        file / rows,
        json / rows,
        (file - json) / rows
    );
    println!();
    print_open();
}
