//! Backlog drain figures (prints, asserts nothing): how fast the real uplink empties a real
//! SQLite outbox through an embedded MQTT broker to an acknowledging receiver, every record
//! deleted only after the receiver committed it and published its ack.
//!
//! `cargo bench -p caudal-agent --bench drain`; the figure is the median of `RUNS` runs, each
//! on a fresh outbox of `BACKLOG` readings. The uplink settings are the shipped defaults except
//! `backlog_rate`, which is raised so the rate limit is not what is measured; the bench prints
//! every setting it used. Each run is made twice, with batches signed (as the daemon sends them)
//! and unsigned, alternating, and the ratio of the medians is printed.

use caudal_agent::identity::Identity;
use caudal_agent::metrics::Metrics;
use caudal_agent::outbox::{Outbox, OutboxHandle};
use caudal_agent::uplink::Uplink;
use caudal_common::{DeviceState, SiteId};
use caudal_testkit::backlog::{outbox_config, reading, uplink_config};
use caudal_testkit::broker::Broker;
use caudal_testkit::receiver::Receiver;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

const RUNS: usize = 3;
/// Readings queued before each run.
const BACKLOG: usize = 200_000;
/// A run that has not drained by then is reported as such (the bench stays bounded).
const RUN_LIMIT: Duration = Duration::from_secs(120);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// One run's outcome.
struct Run {
    /// Readings per second from the uplink's start to the outbox being empty.
    rate: f64,
    secs: f64,
    batches: u64,
    stored: u64,
}

/// Fills a fresh outbox, drains it through broker and receiver, returns the figures.
async fn run_once(signed: bool) -> anyhow::Result<Run> {
    let dir = tempfile::tempdir()?;
    let mut outbox = Outbox::open(&dir.path().join("outbox.db"), &outbox_config(), true)?;
    for start in (0..BACKLOG).step_by(1000) {
        outbox.append((start..start + 1000).map(reading).collect(), vec![])?;
    }
    let handle = OutboxHandle::spawn(outbox)?;

    let broker = Broker::start()?;
    let receiver = Receiver::start(broker.v4_addr(), &dir.path().join("cloud.db")).await?;
    let metrics = Metrics::new();
    let (_devices_tx, devices) = watch::channel(BTreeMap::<String, DeviceState>::new());
    let (_clock_tx, clock) = watch::channel(true);
    let (commands, _commands_rx) = mpsc::channel(4);
    let uplink = Uplink::new(
        uplink_config(&broker.url(), None),
        SiteId::new("bench-site")?,
        handle.clone(),
        devices,
        clock,
        commands,
        metrics.clone(),
        ("bench".into(), "bench".into()),
    )?;
    let uplink = if signed {
        uplink.with_identity(Identity::from_seed(&[7; 32]))
    } else {
        uplink
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let start = Instant::now();
    let task = tokio::spawn(uplink.run(async {
        let _ = stopped.await;
    }));
    // The uplink counts an ack after the outbox deleted its records.
    while metrics.acked.get() < BACKLOG as u64 && start.elapsed() < RUN_LIMIT {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let backlog = handle.stats().await?.backlog;
    let _ = stop.send(());
    task.await??;
    handle.shutdown().await?;
    if backlog != 0 {
        anyhow::bail!(
            "{backlog} readings still queued after {RUN_LIMIT:?} ({} acknowledged)",
            metrics.acked.get()
        );
    }
    Ok(Run {
        rate: BACKLOG as f64 / secs,
        secs,
        batches: receiver.batches_received(),
        stored: receiver.stored_count(),
    })
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let u = uplink_config("mqtt://127.0.0.1:0", None);
    let o = outbox_config();
    println!(
        "drain bench: {BACKLOG} readings queued, median of {RUNS} runs, broker and receiver in \
         this process"
    );
    println!(
        "uplink: batch_max_records = {}, max_inflight_batches = {}, backlog_rate = {} (unlimited), \
         ack_timeout_s = {}",
        u.batch_max_records, u.max_inflight_batches, u.backlog_rate, u.ack_timeout_s
    );
    println!(
        "outbox: synchronous = {:?}, commit_interval_ms = {}",
        o.synchronous, o.commit_interval_ms
    );
    println!();
    // Signed (as the daemon sends) and unsigned runs alternate, so both see the same machine.
    let mut rates = [Vec::new(), Vec::new()];
    for i in 1..=RUNS {
        for (k, signed) in [(0, false), (1, true)] {
            let r = rt.block_on(run_once(signed))?;
            println!(
                "run {i} {}: {:.2} s, {} batches, {} stored by the receiver: {:.0} readings/s",
                if signed { "signed" } else { "unsigned" },
                r.secs,
                r.batches,
                r.stored,
                r.rate
            );
            rates[k].push(r.rate);
        }
    }
    let [unsigned, signed] = rates;
    let (unsigned, signed) = (median(unsigned), median(signed));
    println!();
    println!(
        "backlog drain, acknowledged end to end: {signed:.0} readings/s signed, {unsigned:.0} \
         unsigned (medians of {RUNS}); signed / unsigned = {:.3}",
        signed / unsigned
    );
    Ok(())
}
