//! Whole-pipeline figures (prints, asserts only that nothing was lost or doubled): N simulated
//! sites, each a real agent outbox (SQLite file) holding a backlog and a real `Uplink`, drained
//! through an MQTT broker into the real cloud (`Cloud::start` with telemetry) on PostgreSQL.
//! Timed from the uplinks' start until every outbox is empty, i.e. every reading was committed
//! by the cloud, acknowledged, and deleted from its outbox.
//!
//! ```text
//! cargo bench -p caudal-tests --bench pipeline -- [--pg URL] [--mosquitto [URL] | --embedded]
//!     [--sites 8] [--readings 50000] [--runs 3]
//! ```
//!
//! PostgreSQL comes from `--pg` or `CAUDAL_TEST_DATABASE_URL`; each run gets a schema of its own,
//! dropped afterwards; without either the cloud stores into a SQLite file, and the bench says so.
//! The broker is Mosquitto (`--mosquitto`, default `mqtt://127.0.0.1:1883`) when it answers,
//! otherwise the cloud's embedded broker, and the bench says which. Site ids, client ids and the
//! ingest's shared-subscription group are unique to each run, so a shared broker is fine.
//!
//! Stage shares come from the components' own Prometheus metrics, read in process: the agents'
//! `ack_latency` (publish to ack, per batch) and the cloud's `ingest_batch_seconds` (receipt to
//! ack published, per batch, which contains the database transaction), plus the process's CPU
//! time from `/proc/self/stat`. Batches overlap (several in flight per site, several sites, several
//! ingest workers), so a stage's summed time can exceed the wall time: the share printed is
//! summed time / wall time and stages do not add up to 100 %.

use caudal_agent::metrics::Metrics;
use caudal_agent::outbox::{Outbox, OutboxHandle};
use caudal_agent::uplink::Uplink;
use caudal_cloud::Cloud;
use caudal_cloud::catchment::site;
use caudal_cloud::core::config::{CloudConfig, Secret};
use caudal_cloud::core::db::Db;
use caudal_common::{DeviceState, SiteId};
use caudal_testkit::backlog::{outbox_config, reading, uplink_config};
use caudal_testkit::database::TestDb;
use caudal_testkit::http;
use caudal_testkit::metrics::{sample, wait_metric};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// A run that has not drained by then is reported as broken (the bench stays bounded).
const RUN_LIMIT: Duration = Duration::from_secs(180);

#[derive(Debug, Clone)]
struct Args {
    pg: Option<String>,
    mosquitto: Option<String>,
    sites: usize,
    readings: usize,
    runs: usize,
}

impl Args {
    fn parse() -> anyhow::Result<Args> {
        let mut a = Args {
            pg: std::env::var("CAUDAL_TEST_DATABASE_URL")
                .ok()
                .filter(|s| !s.is_empty()),
            mosquitto: Some("mqtt://127.0.0.1:1883".to_string()),
            sites: 8,
            readings: 50_000,
            runs: 3,
        };
        let args: Vec<String> = std::env::args().skip(1).collect();
        let mut i = 0;
        let value = |i: &mut usize, name: &str| -> anyhow::Result<String> {
            *i += 1;
            args.get(*i)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("{name} needs a value"))
        };
        let number = |s: String, name: &str| -> anyhow::Result<usize> {
            s.parse()
                .map_err(|_| anyhow::anyhow!("{name}: {s:?} is not a number"))
        };
        while i < args.len() {
            match args[i].as_str() {
                "--pg" => a.pg = Some(value(&mut i, "--pg")?),
                "--mosquitto" => {
                    if let Some(u) = args.get(i + 1).filter(|u| u.starts_with("mqtt://")) {
                        a.mosquitto = Some(u.clone());
                        i += 1;
                    }
                }
                "--embedded" => a.mosquitto = None,
                "--sites" => a.sites = number(value(&mut i, "--sites")?, "--sites")?.max(1),
                "--readings" => {
                    a.readings = number(value(&mut i, "--readings")?, "--readings")?.max(1)
                }
                "--runs" => a.runs = number(value(&mut i, "--runs")?, "--runs")?.max(1),
                // `cargo bench` passes `--bench`; other harness flags do not apply.
                _ => {}
            }
            i += 1;
        }
        Ok(a)
    }
}

/// CPU seconds (user + system) used by this process so far: agents, outboxes and cloud. From
/// `/proc/self/stat`, whose times are in USER_HZ ticks, fixed at 100 per second on Linux; 0
/// where there is no `/proc`.
fn process_cpu() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name, which is in parentheses and may contain spaces; utime
    // and stime are fields 14 and 15 of the whole line, 12 and 13 after `) `.
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

async fn count_readings(db: &Db, prefix: &str) -> anyhow::Result<i64> {
    let like = format!("{prefix}-%");
    Ok(match db {
        Db::Sqlite(p) => {
            sqlx::query_scalar("SELECT count(*) FROM readings WHERE site LIKE ?")
                .bind(like)
                .fetch_one(p)
                .await?
        }
        Db::Postgres(p) => {
            sqlx::query_scalar("SELECT count(*) FROM readings WHERE site LIKE $1")
                .bind(like)
                .fetch_one(p)
                .await?
        }
    })
}

/// One site: its outbox and the uplink draining it.
struct Site {
    handle: OutboxHandle,
    metrics: Arc<Metrics>,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), caudal_agent::uplink::UplinkError>>,
}

/// Figures of one run.
struct Run {
    secs: f64,
    rate: f64,
    /// Summed publish-to-ack time of every batch, over all sites.
    uplink_secs: f64,
    uplink_batches: u64,
    /// Summed receipt-to-ack time of every batch in the cloud's ingest.
    ingest_secs: f64,
    ingest_batches: u64,
    batches_per_tx: f64,
    cpu_secs: f64,
}

async fn run_once(args: &Args, pg: Option<&str>, mosquitto: Option<&str>) -> anyhow::Result<Run> {
    let db = match pg {
        Some(base) => TestDb::postgres_at(base).await?,
        None => TestDb::sqlite(),
    };
    let prefix = format!(
        "pipe-{:x}-{:06x}",
        std::process::id(),
        fastrand::u32(..1 << 24)
    );
    let mut c = CloudConfig {
        services: vec!["telemetry".to_string()],
        ..Default::default()
    };
    c.http.listen = "127.0.0.1:0".parse()?;
    c.database.url = Some(Secret::new(&db.url));
    c.mqtt.embedded.listen = "127.0.0.1:0".parse()?;
    c.mqtt.embedded.listen_v5 = "127.0.0.1:0".parse()?;
    if let Some(m) = mosquitto {
        c.mqtt.url = Some(m.to_string());
        c.ingest.group = format!("{prefix}-ingest");
    }
    let cloud = Cloud::start(c).await?;
    wait_metric(cloud.http_addr(), "caudal_cloud_ingest_subscribed 1").await;
    let broker = match mosquitto {
        Some(m) => m.to_string(),
        None => cloud
            .broker()
            .map(|b| format!("mqtt://{}", b.v4_addr()))
            .ok_or_else(|| anyhow::anyhow!("no embedded broker"))?,
    };

    // Register and fill every site before the clock starts.
    let dir = tempfile::tempdir()?;
    let mut pending = Vec::with_capacity(args.sites);
    for s in 0..args.sites {
        let id = SiteId::new(format!("{prefix}-{s}"))?;
        site::add(cloud.db(), &id, "").await?;
        let mut outbox = Outbox::open(
            &dir.path().join(format!("outbox-{s}.db")),
            &outbox_config(),
            true,
        )?;
        for start in (0..args.readings).step_by(1000) {
            let end = (start + 1000).min(args.readings);
            outbox.append((start..end).map(reading).collect(), vec![])?;
        }
        pending.push((id, OutboxHandle::spawn(outbox)?));
    }

    let cpu0 = process_cpu();
    let start = Instant::now();
    let mut sites = Vec::with_capacity(args.sites);
    for (id, handle) in pending {
        let metrics = Metrics::new();
        let (_devices_tx, devices) = watch::channel(BTreeMap::<String, DeviceState>::new());
        let (_clock_tx, clock) = watch::channel(true);
        let (commands, _commands_rx) = mpsc::channel(4);
        let uplink = Uplink::new(
            uplink_config(&broker, Some(format!("{id}-agent"))),
            id,
            handle.clone(),
            devices,
            clock,
            commands,
            metrics.clone(),
            ("bench".into(), "bench".into()),
        )?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(uplink.run(async move {
            let _ = stopped.await;
            // The watch senders live until the uplink stops.
            drop((_devices_tx, _clock_tx));
        }));
        sites.push(Site {
            handle,
            metrics,
            stop,
            task,
        });
    }
    // The uplink counts an ack after its outbox deleted the records.
    let want = args.readings as u64;
    while sites.iter().any(|s| s.metrics.acked.get() < want) && start.elapsed() < RUN_LIMIT {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let cpu_secs = process_cpu() - cpu0;

    let mut left = 0;
    let (mut uplink_secs, mut uplink_batches) = (0.0, 0);
    for s in sites {
        left += s.handle.stats().await?.backlog;
        let text = s.metrics.encode();
        uplink_secs += sample(&text, "caudal_agent_ack_latency_seconds_sum");
        uplink_batches += sample(&text, "caudal_agent_ack_latency_seconds_count") as u64;
        let _ = s.stop.send(());
        s.task.await??;
        s.handle.shutdown().await?;
    }
    anyhow::ensure!(
        left == 0,
        "{left} readings still queued after {RUN_LIMIT:?}"
    );
    let stored = count_readings(cloud.db(), &prefix).await?;
    anyhow::ensure!(
        stored as usize == args.sites * args.readings,
        "the cloud stored {stored} readings, expected exactly {}",
        args.sites * args.readings
    );
    let (_, m) = http::get(cloud.http_addr(), "/metrics").await;
    let groups = sample(&m, "caudal_cloud_ingest_group_batches_count");
    let grouped = sample(&m, "caudal_cloud_ingest_group_batches_sum");
    let run = Run {
        secs,
        rate: (args.sites * args.readings) as f64 / secs,
        uplink_secs,
        uplink_batches,
        ingest_secs: sample(&m, "caudal_cloud_ingest_batch_seconds_sum"),
        ingest_batches: sample(&m, "caudal_cloud_ingest_batch_seconds_count") as u64,
        batches_per_tx: if groups > 0.0 { grouped / groups } else { 0.0 },
        cpu_secs,
    };
    cloud.stop().await;
    // The schema (PostgreSQL) goes with `db`.
    drop(db);
    Ok(run)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Whether something accepts TCP connections at the `mqtt://host:port` URL.
async fn reachable(url: &str) -> bool {
    let addr = url.trim_start_matches("mqtt://");
    matches!(
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await,
        Ok(Ok(_))
    )
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mosquitto = match &args.mosquitto {
            Some(m) if reachable(m).await => Some(m.clone()),
            Some(m) => {
                println!("Mosquitto at {m} does not answer: using the cloud's embedded broker");
                None
            }
            None => None,
        };
        let broker = mosquitto
            .as_deref()
            .map_or("the cloud's embedded rumqttd".to_string(), |m| {
                format!("Mosquitto at {m}")
            });
        let database = match &args.pg {
            Some(_) => "PostgreSQL (a fresh schema per run)".to_string(),
            None => "a SQLite file: no --pg or CAUDAL_TEST_DATABASE_URL given".to_string(),
        };
        let u = uplink_config("mqtt://127.0.0.1:0", Some("-".to_string()));
        println!(
            "pipeline bench: {} sites x {} readings queued = {} per run, median of {} runs, {} CPUs",
            args.sites,
            args.readings,
            args.sites * args.readings,
            args.runs,
            cores
        );
        println!("broker: {broker}; cloud database: {database}");
        println!(
            "uplink: batch_max_records = {}, max_inflight_batches = {}, backlog_rate unlimited; \
             outbox: synchronous = {:?}",
            u.batch_max_records,
            u.max_inflight_batches,
            outbox_config().synchronous
        );
        println!();
        let mut runs = Vec::new();
        for i in 1..=args.runs {
            let r = run_once(&args, args.pg.as_deref(), mosquitto.as_deref()).await?;
            println!(
                "run {i}: {:.2} s, {:.0} readings/s; uplink publish->ack {:.1} ms/batch over {} \
                 batches; cloud receipt->ack {:.1} ms/batch over {} batches, {:.1} batches per \
                 transaction; process CPU {:.1} s",
                r.secs,
                r.rate,
                1e3 * r.uplink_secs / r.uplink_batches.max(1) as f64,
                r.uplink_batches,
                1e3 * r.ingest_secs / r.ingest_batches.max(1) as f64,
                r.ingest_batches,
                r.batches_per_tx,
                r.cpu_secs
            );
            runs.push(r);
        }
        let pick = |f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
        println!();
        println!(
            "end to end, outboxes filled -> cloud committed -> acked -> deleted: {:.0} readings/s \
             (median of {})",
            pick(|r| r.rate),
            args.runs
        );
        println!(
            "stage shares (medians). Summed busy time / wall time: batches overlap (8 in flight \
             per site, {} sites, several ingest workers), so these exceed 100 % and are the mean \
             number of batches in that stage at once:",
            args.sites
        );
        println!(
            "  agents, publish -> ack (uplink ack_latency sum, all sites): {:.0} %",
            100.0 * pick(|r| r.uplink_secs / r.secs)
        );
        println!(
            "  cloud, receipt -> commit -> ack published (ingest_batch_seconds sum; contains the \
             database transaction): {:.0} %",
            100.0 * pick(|r| r.ingest_secs / r.secs)
        );
        println!(
            "  this process's CPU (agents, outboxes, cloud; /proc/self/stat): {:.0} % of one core, {:.0} \
             % of {cores}",
            100.0 * pick(|r| r.cpu_secs / r.secs),
            100.0 * pick(|r| r.cpu_secs / r.secs) / cores as f64
        );
        println!(
            "  not measured separately: the outbox's reads and deletes, the broker, the \
             database server's own CPU"
        );
        println!(
            "each batch's round trip (publish -> ack at the agent) split, summing to 100 %: {:.0} % \
             inside the cloud (queue, decode, transaction, ack), {:.0} % outside it (broker both \
             ways, MQTT client, uplink)",
            100.0 * pick(|r| r.ingest_secs / r.uplink_secs),
            100.0 * (1.0 - pick(|r| r.ingest_secs / r.uplink_secs))
        );
        anyhow::Ok(())
    })
}
