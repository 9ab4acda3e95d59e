//! The release agent's footprint (prints, asserts nothing): resident memory while it polls 32
//! simulated meters every second with a million readings queued and no broker to send them to,
//! idle CPU with devices polled once a minute and a broker connected, and the binary's size.
//!
//! `cargo bench -p caudal-agent --bench footprint`. Cargo builds `caudal-agent` with the bench
//! profile (the release settings) and hands the bench its path, so the process measured is the
//! release binary in `target/release/`. The meters are the agent's own `simulator` served from
//! this process on free loopback ports (4 buses of 8 meters, Modbus TCP); the broker for the
//! idle phase is the test broker of `caudal-testkit`. Memory is `VmRSS` sampled once a second
//! from `/proc/<pid>/status` (median and maximum) and the kernel's `VmHWM` peak; CPU is
//! `utime + stime` of `/proc/<pid>/stat` (all threads, in USER_HZ = 100 ticks per second) over
//! the window. `CAUDAL_BENCH_SECS` shortens or lengthens each window (default 60).

use caudal_agent::config::{AgentConfig, OutboxConfig, Synchronous};
use caudal_agent::outbox::{Outbox, Stamped};
use caudal_agent::simulator::{Model, SimHandle, SimulatedMeter, Simulator};
use caudal_common::{DeviceId, Quality, Reading, Seq};
use caudal_testkit::backlog::stamp;
use caudal_testkit::broker::Broker;
use caudal_testkit::receiver::Receiver;
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const AGENT: &str = env!("CARGO_BIN_EXE_caudal-agent");
const BUSES: usize = 4;
const METERS_PER_BUS: usize = 8;
/// Readings queued in the outbox before the memory run starts.
const QUEUED: usize = 1_000_000;
/// Clock ticks per second in `/proc/<pid>/stat` (USER_HZ, 100 on every Linux ABI).
const USER_HZ: f64 = 100.0;
/// Profiles the meters cycle through: two flow meters and a level probe.
const PROFILES: [&str; 3] = ["generic", "siemens-mag6000", "keller-level"];
/// Time the agent gets to open its outbox and start polling before a window opens.
const WARM_UP: Duration = Duration::from_secs(5);

fn window() -> Duration {
    let secs = std::env::var("CAUDAL_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn mib(bytes: f64) -> f64 {
    bytes / (1024.0 * 1024.0)
}

/// A field of `/proc/<pid>/status` in bytes (the file says kB).
fn status_bytes(pid: u32, field: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024.0)
}

fn threads(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
}

/// `utime + stime` of the whole process, in seconds.
fn cpu_secs(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; the fields after it are plain.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// A queued reading of one of the configured meters.
fn reading(i: usize) -> Stamped {
    let ts: DateTime<Utc> =
        DateTime::from_timestamp_millis(1_750_000_000_000 + i as i64 * 31).unwrap_or_default();
    let r = Reading {
        seq: Seq(0),
        device: DeviceId::new(format!("m{:02}", i % (BUSES * METERS_PER_BUS))).expect("valid id"),
        ts,
        q: Quality::GOOD,
        flow_lps: Some(12.0 + (i % 1000) as f64 * 0.013),
        total_m3: Some(1_234_567.0 + i as f64 * 0.037),
        level_m: Some(23.0 + (i % 97) as f64 * 0.011),
        extra: BTreeMap::new(),
    };
    Stamped::new(r, stamp())
}

/// The meters, the configuration file and the agent's data directory of one phase.
struct Scene {
    config: PathBuf,
    outbox: PathBuf,
    sims: Vec<SimHandle>,
    _tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Starts `BUSES` simulated Modbus TCP gateways of `METERS_PER_BUS` meters each and writes a
/// configuration that polls every meter every `period_s` and sends to `broker`.
async fn scene(dir: &Path, broker: &str, period_s: u64) -> anyhow::Result<Scene> {
    let mut listeners = Vec::new();
    for _ in 0..BUSES {
        listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await?);
    }
    let mut toml = String::new();
    writeln!(
        toml,
        "[site]\nid = \"bench-site\"\ndata_dir = \"{}\"\n\n[uplink]\nbroker = \"{broker}\"\n\n\
         [outbox]\ndisk_budget_mb = 1024\n\n[metrics]\nlisten = \"127.0.0.1:0\"\n\n\
         [clock]\nrequire_ntp_sync = false",
        dir.join("data").display()
    )?;
    for (b, l) in listeners.iter().enumerate() {
        writeln!(
            toml,
            "\n[[bus]]\nname = \"gw{b}\"\nkind = \"tcp\"\naddress = \"{}\"",
            l.local_addr()?
        )?;
        for m in 0..METERS_PER_BUS {
            let n = b * METERS_PER_BUS + m;
            writeln!(
                toml,
                "\n[[bus.device]]\nid = \"m{n:02}\"\nunit = {}\nprofile = \"{}\"\nperiod_s = {period_s}",
                m + 1,
                PROFILES[n % PROFILES.len()]
            )?;
        }
    }
    let config = dir.join("agent.toml");
    std::fs::write(&config, &toml)?;

    // The simulators serve exactly the points the agent will read.
    let cfg = AgentConfig::load(&config)?;
    let profiles = cfg.load_profiles().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let site = cfg
        .resolve(&profiles)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    std::fs::create_dir_all(dir.join("data"))?;
    let (mut sims, mut tasks) = (Vec::new(), Vec::new());
    for (bus, listener) in site.buses.iter().zip(listeners) {
        let mut sim = Simulator::new();
        for d in &bus.devices {
            let model = Model {
                seed: u64::from(d.unit),
                ..Model::default()
            };
            sim = sim.with_unit(d.unit, SimulatedMeter::new(d.points.clone(), model));
        }
        sims.push(sim.handle());
        tasks.push(tokio::spawn(async move {
            let _ = sim.serve(listener, std::future::pending()).await;
        }));
    }
    Ok(Scene {
        config,
        outbox: site.outbox_path,
        sims,
        _tasks: tasks,
    })
}

impl Scene {
    /// Modbus requests the meters answered so far.
    fn requests(&self) -> u64 {
        let units = 1..=METERS_PER_BUS as u8;
        self.sims
            .iter()
            .flat_map(|s| units.clone().map(move |u| s.requests(u)))
            .sum()
    }

    fn spawn_agent(&self, log: &Path) -> anyhow::Result<Child> {
        let mut cmd = Command::new(AGENT);
        cmd.arg("--config")
            .arg(&self.config)
            .arg("run")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?);
        // Only the file configures the agent.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CAUDAL_") {
                cmd.env_remove(k);
            }
        }
        Ok(cmd.spawn()?)
    }
}

/// Stops the agent with SIGTERM (as systemd does), waits for it, kills it if it hangs.
fn stop(mut child: Child) -> anyhow::Result<()> {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill()?;
    child.wait()?;
    anyhow::bail!("the agent did not stop within 15 s of SIGTERM; killed")
}

/// Fails if the agent exited (and says where its log is).
fn alive(child: &mut Child, log: &Path) -> anyhow::Result<()> {
    if let Some(status) = child.try_wait()? {
        anyhow::bail!(
            "the agent exited ({status}); its log is {}:\n{}",
            log.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    Ok(())
}

/// Rows in the outbox's `records` table.
fn queued(outbox: &Path) -> anyhow::Result<u64> {
    let conn =
        rusqlite::Connection::open_with_flags(outbox, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    Ok(conn.query_row("SELECT COUNT(*) FROM records", [], |r| r.get::<_, i64>(0))? as u64)
}

/// A port nothing listens on: connections to it are refused, so the backlog stays queued.
fn refused_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Resident memory with `QUEUED` readings waiting and 32 meters polled every second.
async fn memory(dir: &Path) -> anyhow::Result<()> {
    let broker = format!("mqtt://127.0.0.1:{}", refused_port()?);
    let scene = scene(dir, &broker, 1).await?;
    let fill = Instant::now();
    let cfg = OutboxConfig {
        path: None,
        disk_budget_mb: 1024,
        synchronous: Synchronous::Normal,
        commit_interval_ms: 0,
    };
    let mut outbox = Outbox::open(&scene.outbox, &cfg, true)?;
    for start in (0..QUEUED).step_by(5000) {
        outbox.append((start..start + 5000).map(reading).collect(), vec![])?;
    }
    outbox.close()?;
    let file = std::fs::metadata(&scene.outbox)?.len();
    println!(
        "queued {QUEUED} readings in {:.1} s ({:.0} MiB outbox); broker {broker} refuses connections",
        fill.elapsed().as_secs_f64(),
        mib(file as f64)
    );

    let log = dir.join("memory.log");
    let mut child = scene.spawn_agent(&log)?;
    let pid = child.id();
    tokio::time::sleep(WARM_UP).await;
    alive(&mut child, &log)?;
    let (requests0, window) = (scene.requests(), window());
    let start = Instant::now();
    let mut samples = Vec::new();
    while start.elapsed() < window {
        tokio::time::sleep(Duration::from_secs(1)).await;
        alive(&mut child, &log)?;
        if let Some(rss) = status_bytes(pid, "VmRSS:") {
            samples.push(rss);
        }
    }
    let requests = scene.requests() - requests0;
    let hwm = status_bytes(pid, "VmHWM:").unwrap_or(f64::NAN);
    let nthreads = threads(pid).unwrap_or(0);
    let cpu = cpu_secs(pid).unwrap_or(f64::NAN);
    let secs = start.elapsed().as_secs_f64();
    stop(child)?;
    let after = queued(&scene.outbox)?;
    println!(
        "{} meters polled every 1 s for {secs:.0} s: {requests} Modbus requests answered, \
         {} readings committed (outbox now {after})",
        BUSES * METERS_PER_BUS,
        after.saturating_sub(QUEUED as u64),
    );
    println!(
        "resident memory: median {:.1} MiB, max {:.1} MiB of {} samples; peak (VmHWM) {:.1} MiB; \
         {nthreads} threads; CPU since start {cpu:.2} s",
        mib(median(samples.clone())),
        mib(samples.iter().copied().fold(0.0, f64::max)),
        samples.len(),
        mib(hwm),
    );
    Ok(())
}

/// CPU of an agent with nothing to do between once-a-minute polls, connected to a broker.
async fn idle(dir: &Path) -> anyhow::Result<()> {
    let broker = Broker::start()?;
    let receiver = Receiver::start(broker.v4_addr(), &dir.join("cloud.db")).await?;
    let scene = scene(dir, &broker.url(), 60).await?;
    let log = dir.join("idle.log");
    let mut child = scene.spawn_agent(&log)?;
    let pid = child.id();
    tokio::time::sleep(WARM_UP).await;
    alive(&mut child, &log)?;
    let window = window();
    let (cpu0, requests0, start) = (cpu_secs(pid), scene.requests(), Instant::now());
    let mut samples = Vec::new();
    while start.elapsed() < window {
        tokio::time::sleep(Duration::from_secs(1)).await;
        alive(&mut child, &log)?;
        if let Some(rss) = status_bytes(pid, "VmRSS:") {
            samples.push(rss);
        }
    }
    let (cpu1, secs) = (cpu_secs(pid), start.elapsed().as_secs_f64());
    let requests = scene.requests() - requests0;
    stop(child)?;
    let (Some(cpu0), Some(cpu1)) = (cpu0, cpu1) else {
        anyhow::bail!("could not read /proc/{pid}/stat");
    };
    println!(
        "{} meters polled every 60 s, broker connected: {requests} Modbus requests in {secs:.0} s, \
         {} readings acknowledged by the receiver since start",
        BUSES * METERS_PER_BUS,
        receiver.stored_count()
    );
    let used = cpu1 - cpu0;
    // The counters move in whole ticks: below one tick only an upper bound is known.
    let figure = if used < 1.0 / USER_HZ {
        format!(
            "under one tick ({:.2} s) in {secs:.0} s = under {:.3} % of one core",
            1.0 / USER_HZ,
            100.0 / USER_HZ / secs
        )
    } else {
        format!(
            "{used:.2} s in {secs:.0} s = {:.3} % of one core",
            used / secs * 100.0
        )
    };
    println!(
        "idle CPU: {figure}; resident memory median {:.1} MiB",
        mib(median(samples)),
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let size = std::fs::metadata(AGENT)?.len();
    println!("footprint bench: {AGENT}");
    if !AGENT.contains("/release/") {
        println!(
            "(not a release build: run it with `cargo bench`, which builds with release settings)"
        );
    }
    println!(
        "binary size: {size} bytes ({:.2} MiB), symbols stripped",
        mib(size as f64)
    );
    println!();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let dir = tempfile::tempdir()?;
    std::fs::create_dir_all(dir.path().join("memory"))?;
    std::fs::create_dir_all(dir.path().join("idle"))?;
    rt.block_on(memory(&dir.path().join("memory")))?;
    println!();
    rt.block_on(idle(&dir.path().join("idle")))?;
    Ok(())
}
