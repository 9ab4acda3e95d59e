//! Ingest throughput end to end: simulated agents publish real batches through an MQTT broker
//! to the cloud's ingest and wait for each batch's ack, which the cloud sends only after the
//! commit. Timed from the first publish to the last ack, on a SQLite file and, when configured,
//! on PostgreSQL, where the same rows are then also written with the database's own `COPY` into
//! an identical scratch table, for the ratio ingest / COPY. Prints medians; asserts only that
//! every reading was stored exactly once. Every run is made twice, alternating: batches signed
//! with each site's enrolled key (as agents send them) and plain v1 batches
//! (`ingest.accept_unsigned`), and the ratio of the medians is printed.
//!
//! ```text
//! cargo bench -p caudal-cloud --bench ingest -- [--pg URL] [--mosquitto [URL]] [--no-sqlite]
//!     [--no-embedded] [--gate] [--runs 3] [--readings 300000] [--sites 20] [--batch 500] [--inflight 8]
//!     [--workers 4] [--pool 8] [--group-bytes 4194304]
//! ```
//!
//! PostgreSQL runs when `--pg` or `CAUDAL_TEST_DATABASE_URL` names a database; each run gets a
//! schema of its own, dropped at the end. `--mosquitto` (or `CAUDAL_BENCH_MOSQUITTO=1`) also runs
//! through an external broker (default `mqtt://127.0.0.1:1883`) with site names, client ids and
//! a shared-subscription group unique to the run. `--gate` also runs through the embedded broker
//! with `mqtt.embedded.authenticate`: the agents log in with their sites' credentials and pass
//! the gate that authorizes their topics.

use caudal_cloud::Cloud;
use caudal_cloud::catchment::{site, site_key};
use caudal_cloud::core::config::{CloudConfig, Secret};
use caudal_cloud::core::db::Db;
use caudal_common::payload::Payload;
use caudal_common::signed::{self, Purpose, SecretKey};
use caudal_common::{Ack, AckStatus, Batch, DeviceId, Quality, Reading, Seq, SiteId};
use caudal_testkit::database::TestDb;
use caudal_testkit::http;
use caudal_testkit::metrics::{sample, wait_metric};
use caudal_testkit::stand_in::{Agent, StandIn};
use chrono::{DateTime, TimeZone, Utc};
use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Seq epoch of the measured readings; warm-up batches use the next one.
const EPOCH: u32 = 90_000_000;
/// Longest wait for one ack before the run is declared broken.
const ACK_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
struct Args {
    pg: Option<String>,
    mosquitto: Option<String>,
    sqlite: bool,
    embedded: bool,
    gate: bool,
    runs: usize,
    readings: usize,
    sites: usize,
    batch: usize,
    inflight: usize,
    workers: usize,
    pool: u32,
    group_bytes: Option<usize>,
}

impl Args {
    fn parse() -> Args {
        let mut a = Args {
            pg: std::env::var("CAUDAL_TEST_DATABASE_URL")
                .ok()
                .filter(|s| !s.is_empty()),
            mosquitto: std::env::var("CAUDAL_BENCH_MOSQUITTO")
                .ok()
                .filter(|v| !v.is_empty() && v != "0")
                .map(|_| "mqtt://127.0.0.1:1883".to_string()),
            sqlite: true,
            embedded: true,
            gate: false,
            runs: 3,
            readings: 300_000,
            sites: 20,
            batch: 500,
            inflight: 8,
            workers: 4,
            pool: 8,
            group_bytes: None,
        };
        let args: Vec<String> = std::env::args().skip(1).collect();
        let mut i = 0;
        let value = |i: &mut usize, name: &str| -> String {
            *i += 1;
            args.get(*i)
                .cloned()
                .unwrap_or_else(|| panic!("{name} needs a value"))
        };
        let number = |s: String, name: &str| -> usize {
            s.parse()
                .unwrap_or_else(|_| panic!("{name}: {s:?} is not a number"))
        };
        while i < args.len() {
            match args[i].as_str() {
                "--pg" => a.pg = Some(value(&mut i, "--pg")),
                "--mosquitto" => {
                    let url = match args.get(i + 1) {
                        Some(u) if u.starts_with("mqtt://") => {
                            i += 1;
                            u.clone()
                        }
                        _ => "mqtt://127.0.0.1:1883".to_string(),
                    };
                    a.mosquitto = Some(url);
                }
                "--no-sqlite" => a.sqlite = false,
                "--no-embedded" => a.embedded = false,
                "--gate" => a.gate = true,
                "--runs" => a.runs = number(value(&mut i, "--runs"), "--runs").max(1),
                "--readings" => a.readings = number(value(&mut i, "--readings"), "--readings"),
                "--sites" => a.sites = number(value(&mut i, "--sites"), "--sites").max(1),
                "--batch" => a.batch = number(value(&mut i, "--batch"), "--batch").max(1),
                "--inflight" => {
                    a.inflight = number(value(&mut i, "--inflight"), "--inflight").max(1)
                }
                "--workers" => a.workers = number(value(&mut i, "--workers"), "--workers"),
                "--pool" => a.pool = number(value(&mut i, "--pool"), "--pool") as u32,
                "--group-bytes" => {
                    a.group_bytes = Some(number(value(&mut i, "--group-bytes"), "--group-bytes"))
                }
                // `cargo bench` passes `--bench`; other harness flags do not apply.
                _ => {}
            }
            i += 1;
        }
        a
    }
}

/// One site's batches, encoded before the clock starts.
struct SitePlan {
    site: SiteId,
    warmup: Vec<u8>,
    batches: Vec<(String, Vec<u8>)>,
    readings: Vec<Reading>,
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 28, 0, 0, 0)
        .single()
        .expect("time")
}

fn reading(device: &DeviceId, epoch: u32, k: u32) -> Reading {
    Reading {
        seq: Seq::new(epoch, k + 1),
        device: device.clone(),
        ts: t0() + chrono::Duration::seconds(i64::from(k)),
        q: Quality::GOOD,
        flow_lps: Some(12.5 + f64::from(k % 100) / 10.0),
        total_m3: Some(123_456.789 + f64::from(k) * 0.0125),
        level_m: Some(42.17),
        extra: Default::default(),
    }
}

/// The key of the bench's site number `s`.
fn site_key(s: usize) -> SecretKey {
    let mut seed = [7u8; 32];
    seed[..8].copy_from_slice(&(s as u64).to_le_bytes());
    SecretKey::from_seed(&seed)
}

fn plan(args: &Args, prefix: &str, signed: bool) -> Vec<SitePlan> {
    let device = DeviceId::new("fm1").expect("id");
    let per_site = args.readings.div_ceil(args.sites);
    let mut left = args.readings;
    (0..args.sites)
        .map(|s| {
            let site = SiteId::new(format!("{prefix}-{s}")).expect("site id");
            let n = per_site.min(left);
            left -= n;
            let readings: Vec<Reading> =
                (0..n as u32).map(|k| reading(&device, EPOCH, k)).collect();
            let encode = |id: String, readings: Vec<Reading>| {
                Batch {
                    v: 1,
                    site: site.clone(),
                    batch: id,
                    sent_at: t0(),
                    readings,
                    events: Vec::new(),
                    gaps: Vec::new(),
                }
                .encode()
            };
            // Signed as the agent signs: an envelope around the exact v1 bytes.
            let key = site_key(s);
            let encode = |id: String, readings: Vec<Reading>| {
                let body = encode(id, readings);
                if signed {
                    signed::seal(&key, Purpose::Batch, &body)
                } else {
                    body
                }
            };
            let batches = readings
                .chunks(args.batch)
                .enumerate()
                .map(|(i, chunk)| {
                    let id = format!("b-{i}");
                    (id.clone(), encode(id, chunk.to_vec()))
                })
                .collect();
            let warmup = encode("warmup".into(), vec![reading(&device, EPOCH + 1, 0)]);
            SitePlan {
                site,
                warmup,
                batches,
                readings,
            }
        })
        .collect()
}

/// A simulated agent (MQTT v3.1.1 like the real one, subscribed to its site's acks) with
/// `inflight` batches in flight at once.
async fn connect(
    broker: SocketAddr,
    site: &SiteId,
    inflight: usize,
    login: Option<(String, String)>,
) -> Agent {
    let how = StandIn {
        keep_alive: Duration::from_secs(30),
        max_packet_bytes: 4 << 20,
        inflight: Some(inflight.clamp(1, u16::MAX as usize) as u16),
        login,
        ..StandIn::default()
    };
    Agent::connect_with(broker, site, &how).await
}

/// The next ack. Acks from another ingest on a shared broker (rejecting a site it does not
/// know) are counted in `foreign` and skipped.
/// `None` when no ack came within [`ACK_TIMEOUT`].
async fn accepted(agent: &mut Agent, foreign: &mut u64) -> Option<Ack> {
    loop {
        let ack = agent.ack_within(ACK_TIMEOUT).await?;
        match ack.status {
            AckStatus::Accepted => return Some(ack),
            AckStatus::Rejected
                if ack
                    .reason
                    .as_deref()
                    .is_some_and(|r| r.contains("not registered")) =>
            {
                *foreign += 1
            }
            AckStatus::Rejected => panic!("batch {} rejected: {:?}", ack.batch, ack.reason),
        }
    }
}

/// Publishes a site's batches keeping `inflight` unacknowledged, until every one is acked; the
/// batch ids still waiting when an ack did not come in time.
async fn drive(mut agent: Agent, plan: SitePlan, inflight: usize) -> Result<u64, Vec<String>> {
    let mut waiting: HashSet<String> = HashSet::new();
    let mut foreign = 0;
    let mut next = plan.batches.into_iter();
    loop {
        while waiting.len() < inflight {
            let Some((id, payload)) = next.next() else {
                break;
            };
            waiting.insert(id);
            agent.publish(None, payload).await;
        }
        if waiting.is_empty() {
            break;
        }
        let Some(ack) = accepted(&mut agent, &mut foreign).await else {
            agent.kill();
            let mut ids: Vec<String> = waiting.into_iter().collect();
            ids.sort();
            return Err(ids);
        };
        waiting.remove(&ack.batch);
    }
    agent.kill();
    Ok(foreign)
}

/// Figures of one run.
struct RunResult {
    ingest: f64,
    copy: Option<f64>,
    group_note: String,
}

async fn count_readings(db: &Db, prefix: &str) -> i64 {
    let like = format!("{prefix}-%");
    match db {
        Db::Sqlite(p) => sqlx::query_scalar("SELECT count(*) FROM readings WHERE site LIKE ?")
            .bind(like)
            .fetch_one(p)
            .await
            .expect("count"),
        Db::Postgres(p) => sqlx::query_scalar("SELECT count(*) FROM readings WHERE site LIKE $1")
            .bind(like)
            .fetch_one(p)
            .await
            .expect("count"),
    }
}

/// `COPY` (text format) of the measured rows into an empty copy of `readings`: readings/s.
async fn pg_copy(url: &str, plans: &[SitePlan]) -> f64 {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await.expect("postgres");
    sqlx::query("CREATE TABLE readings_copy (LIKE readings INCLUDING ALL)")
        .execute(&mut conn)
        .await
        .expect("scratch table");
    let received = Utc::now().format("%Y-%m-%d %H:%M:%S%.6f+00").to_string();
    let mut data = String::new();
    let mut rows = 0usize;
    for p in plans {
        for r in &p.readings {
            let opt = |v: Option<f64>| v.map_or("\\N".to_string(), |v| format!("{v:?}"));
            let _ = writeln!(
                data,
                "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t\\N\t{received}",
                p.site,
                r.seq.0,
                r.device,
                r.ts.format("%Y-%m-%d %H:%M:%S%.6f+00"),
                r.q.bits(),
                opt(r.flow_lps),
                opt(r.total_m3),
                opt(r.level_m),
            );
            rows += 1;
        }
    }
    let start = Instant::now();
    let mut copy = conn
        .copy_in_raw(
            "COPY readings_copy (site, seq, device, ts, quality, flow_lps, total_m3, level_m, \
             extra, received_at) FROM STDIN",
        )
        .await
        .expect("copy in");
    copy.send(data.as_bytes()).await.expect("copy data");
    let n = copy.finish().await.expect("copy finish");
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(n as usize, rows);
    let _ = conn.close().await;
    rows as f64 / secs
}

async fn run_once(
    args: &Args,
    pg: Option<&str>,
    mosquitto: Option<&str>,
    gate: bool,
    run: usize,
    signed: bool,
) -> RunResult {
    let db = match pg {
        Some(base) => TestDb::postgres_at(base).await.expect("postgres"),
        None => TestDb::sqlite(),
    };
    let url = db.url.clone();
    let prefix = format!(
        "bench-{:x}-{run}-{:04x}",
        std::process::id(),
        fastrand::u16(..)
    );
    let mut c = CloudConfig {
        services: vec!["telemetry".to_string()],
        ..Default::default()
    };
    c.http.listen = "127.0.0.1:0".parse().expect("addr");
    c.database.url = Some(Secret::new(&url));
    c.database.max_connections = args.pool.max(1);
    c.mqtt.embedded.listen = "127.0.0.1:0".parse().expect("addr");
    c.mqtt.embedded.listen_v5 = "127.0.0.1:0".parse().expect("addr");
    c.mqtt.embedded.max_payload_bytes = 4 << 20;
    c.ingest.workers = args.workers.max(1);
    // Unsigned runs are the figures before signing: batches of sites without a key.
    c.ingest.accept_unsigned = !signed;
    if let Some(g) = args.group_bytes {
        c.ingest.group_bytes = g;
    }
    if let Some(m) = mosquitto {
        c.mqtt.url = Some(m.to_string());
        c.ingest.group = format!("{prefix}-ingest");
    }
    if gate {
        c.mqtt.embedded.authenticate = true;
        c.mqtt.username = Some("caudal-cloud".to_string());
        c.mqtt.password = Some(Secret::new("the bench's cloud password"));
    }
    let cloud = Cloud::start(c).await.expect("cloud starts");
    wait_metric(cloud.http_addr(), "caudal_cloud_ingest_subscribed 1").await;
    let broker: SocketAddr = match mosquitto {
        Some(m) => m
            .trim_start_matches("mqtt://")
            .parse()
            .expect("--mosquitto takes mqtt://ip:port"),
        None => cloud.broker().expect("embedded broker").v4_addr(),
    };

    let plans = plan(args, &prefix, signed);
    let mut agents = Vec::with_capacity(plans.len());
    let mut foreign = 0;
    for p in &plans {
        let issued = caudal_cloud::catchment::credentials::issue();
        site::create(cloud.db(), &p.site, "", 900, Some(&issued.hash))
            .await
            .expect("add site");
        if signed {
            let n: usize = p
                .site
                .as_str()
                .rsplit('-')
                .next()
                .and_then(|n| n.parse().ok())
                .expect("site number");
            site_key::enroll(cloud.db(), &p.site, &site_key(n).public(), Utc::now())
                .await
                .expect("enroll key");
        }
        let login = gate.then(|| (p.site.to_string(), issued.password.expose().to_string()));
        let mut a = connect(broker, &p.site, args.inflight, login).await;
        a.publish(None, p.warmup.clone()).await;
        let ack = accepted(&mut a, &mut foreign)
            .await
            .expect("warm-up ack in time");
        assert_eq!(ack.batch, "warmup");
        agents.push(a);
    }

    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut copies = Vec::with_capacity(plans.len());
    for (a, p) in agents.into_iter().zip(plans) {
        copies.push(SitePlan {
            site: p.site.clone(),
            warmup: Vec::new(),
            batches: Vec::new(),
            readings: p.readings.clone(),
        });
        let site = p.site.clone();
        let inflight = args.inflight;
        tasks.spawn(async move { drive(a, p, inflight).await.map_err(|ids| (site, ids)) });
    }
    let mut late = Vec::new();
    while let Some(r) = tasks.join_next().await {
        match r.expect("agent task") {
            Ok(f) => foreign += f,
            Err((site, ids)) => late.push(format!("{site}: {}", ids.join(" "))),
        }
    }
    if !late.is_empty() {
        // Leave what the ingest knew for whoever reads the failure.
        let (_, metrics) = http::get(cloud.http_addr(), "/metrics").await;
        for l in metrics
            .lines()
            .filter(|l| l.starts_with("caudal_cloud_ingest"))
        {
            eprintln!("  {l}");
        }
        panic!("no ack within {ACK_TIMEOUT:?} for: {}", late.join("; "));
    }
    let secs = start.elapsed().as_secs_f64();
    let stored = count_readings(cloud.db(), &prefix).await;
    assert_eq!(
        stored as usize,
        args.readings + args.sites,
        "every reading (and one warm-up reading per site) stored exactly once"
    );
    let (_, metrics) = http::get(cloud.http_addr(), "/metrics").await;
    let groups = sample(&metrics, "caudal_cloud_ingest_group_batches_count");
    let batches = sample(&metrics, "caudal_cloud_ingest_group_batches_sum");
    let mut group_note = format!(
        "{:.1} batches/transaction",
        if groups > 0.0 { batches / groups } else { 0.0 }
    );
    if foreign > 0 {
        let _ = write!(group_note, ", {foreign} foreign rejections skipped");
    }
    cloud.stop().await;
    let copy = match pg {
        Some(_) => Some(pg_copy(&url, &copies).await),
        None => None,
    };
    // The schema (PostgreSQL) goes with `db`, after the COPY.
    drop(db);
    RunResult {
        ingest: args.readings as f64 / secs,
        copy,
        group_note,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn bench(args: &Args, name: &str, pg: Option<&str>, mosquitto: Option<&str>, gate: bool) {
    // Signed and unsigned runs alternate, so both see the same machine.
    let mut ingest = [Vec::new(), Vec::new()];
    let mut copy = Vec::new();
    let mut ratio = Vec::new();
    for run in 0..args.runs {
        for (k, signed) in [(0, false), (1, true)] {
            let r = run_once(args, pg, mosquitto, gate, run, signed).await;
            let kind = if signed { "signed" } else { "unsigned" };
            let mut line = format!(
                "  {name} run {} {kind}: {:.0} readings/s",
                run + 1,
                r.ingest
            );
            if let Some(c) = r.copy {
                let _ = write!(line, ", COPY {c:.0} readings/s, ratio {:.2}", r.ingest / c);
                copy.push(c);
                ratio.push(r.ingest / c);
            }
            println!("{line} ({})", r.group_note);
            ingest[k].push(r.ingest);
        }
    }
    let [unsigned, signed] = ingest;
    let (unsigned, signed) = (median(unsigned), median(signed));
    let mut line = format!(
        "{name}: median {signed:.0} readings/s signed, {unsigned:.0} unsigned through the broker \
         with acks; signed / unsigned = {:.3}",
        signed / unsigned
    );
    if !copy.is_empty() {
        let _ = write!(
            line,
            "; PostgreSQL COPY of the same rows {:.0} readings/s; ingest/COPY {:.2}",
            median(copy),
            median(ratio)
        );
    }
    println!("{line}");
}

async fn synchronous_commit(url: &str) -> String {
    let pool = sqlx::PgPool::connect(url).await.expect("postgres");
    let v: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&pool)
        .await
        .expect("show");
    pool.close().await;
    v
}

fn main() {
    let args = Args::parse();
    // The cloud's own logs, when asked for (`RUST_LOG=warn`): a stalled run says why.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        println!(
            "{} readings from {} sites in batches of {}, {} in flight per site, {} ingest \
             workers, pool {}, group_bytes {}, {} runs, {} CPUs",
            args.readings,
            args.sites,
            args.batch,
            args.inflight,
            args.workers,
            args.pool,
            args.group_bytes
                .map_or("default".to_string(), |g| g.to_string()),
            args.runs,
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        let mut brokers = Vec::new();
        if args.embedded {
            brokers.push(("embedded rumqttd", None, false));
        }
        if args.gate {
            brokers.push(("embedded rumqttd behind the gate", None, true));
        }
        if let Some(m) = &args.mosquitto {
            brokers.push(("mosquitto", Some(m.as_str()), false));
        }
        for (broker, url, gate) in brokers {
            if args.sqlite {
                bench(&args, &format!("sqlite via {broker}"), None, url, gate).await;
            }
            if let Some(pg) = &args.pg {
                let sc = synchronous_commit(pg).await;
                println!("postgres synchronous_commit = {sc}");
                bench(
                    &args,
                    &format!("postgres via {broker}"),
                    Some(pg),
                    url,
                    gate,
                )
                .await;
            }
        }
    });
}
