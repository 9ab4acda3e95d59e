//! The whole-system rig shared by the scenarios: the real agent and cloud binaries as child
//! processes on free loopback ports, simulated meters, a broker that can go away, the cloud's
//! database read back, and the proof every scenario ends with: every `(site, seq)` an agent
//! committed is in the cloud's database exactly once or covered by an eviction gap record, and
//! the database holds nothing else.
//!
//! What runs where:
//! - meters: one in-process Modbus TCP simulator per site (the agent's `simulator`);
//! - agents: `e2e-agent run` (the `caudal-agent` entry point), one process per site;
//! - cloud: `e2e-cloud run` (the `caudal-cloud` entry point) on a SQLite file in the scene's
//!   directory, or on a fresh PostgreSQL schema when `CAUDAL_TEST_DATABASE_URL` is set;
//! - broker: the cloud's embedded one ([`BrokerChoice::Embedded`]), or one that can stop on its
//!   own ([`BrokerChoice::Separate`]: `caudal_testkit::broker::Broker` with the cloud pointed at it
//!   by URL). When `CAUDAL_TEST_MQTT_URL` is set (a local Mosquitto), both choices use that
//!   broker, and a separate one is reached through a loopback relay the scene can cut.
//!
//! Every scene uses site ids and an ingest group of its own, so scenes sharing one Mosquitto
//! (or another cloud on it) do not see each other's records. Every process logs to files in the
//! scene's directory; a failing scenario prints them all. Every wait is a bounded poll. A scene
//! holds a turn while it lives, so scenes of concurrent tests run one after another. The pieces
//! (processes, the test broker, the database, the outbox view, the proof's accounting) are
//! `caudal-testkit`'s, shared with the agent's own rig.

#![allow(dead_code)]

use caudal_agent::outbox::Inspection;
use caudal_agent::simulator::{Framing, Model, SimHandle};
use caudal_cloud::core::db::Db;
use caudal_cloud::telemetry::query::{
    Completeness, EventView, ReadingView, completeness, events, raw_readings,
};
use caudal_common::{Seq, SeqRange, SiteId};
use caudal_testkit::broker::Broker;
use caudal_testkit::database::TestDb;
use caudal_testkit::meters;
use caudal_testkit::outbox::OutboxWatch;
use caudal_testkit::process::{Proc, Turn, command, take_turn};
use caudal_testkit::proof::{account, committed_all};
use caudal_testkit::serial::PtyPair;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::task::{JoinHandle, JoinSet};

pub use caudal_testkit::loopback::free_addr;

pub const AGENT_BIN: &str = env!("CARGO_BIN_EXE_e2e-agent");
pub const CLOUD_BIN: &str = env!("CARGO_BIN_EXE_e2e-cloud");
/// How often bounded waits look again.
const POLL: Duration = Duration::from_millis(100);
/// How long a signalled process may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

/// A short random tag that keeps ids of concurrent scenes apart.
fn tag() -> String {
    format!("{:08x}", fastrand::u32(..))
}

// ---------------------------------------------------------------------------------------------
// The cloud's database

/// The cloud's database for one scene (a SQLite file, or a fresh PostgreSQL schema dropped at
/// the end), read back through the cloud's own database access.
pub struct CloudDb {
    test_db: TestDb,
    db: Option<Db>,
}

/// Every telemetry row the cloud stored, keyed by `(site, seq)`.
#[derive(Debug, Default, Clone)]
pub struct Stored {
    /// `(site, seq)` → table it is in (`readings`, `events`, `gaps`); one entry per row.
    pub rows: Vec<(String, u64, &'static str)>,
    /// Eviction gaps: site → seq ranges they cover.
    pub evicted: BTreeMap<String, Vec<SeqRange>>,
    /// Dead letters naming each site.
    pub dead_letters: BTreeMap<String, u64>,
}

impl Stored {
    /// Distinct seqs stored for `site` in any table.
    pub fn seqs(&self, site: &str) -> BTreeSet<u64> {
        self.rows
            .iter()
            .filter(|r| r.0 == site)
            .map(|r| r.1)
            .collect()
    }

    /// Rows of `site` in `table`.
    pub fn count(&self, site: &str, table: &str) -> usize {
        self.rows
            .iter()
            .filter(|r| r.0 == site && r.2 == table)
            .count()
    }
}

macro_rules! fetch {
    ($db:expr, $t:ty, $sql:expr) => {
        match $db {
            Db::Sqlite(p) => sqlx::query_as::<_, $t>($sql).fetch_all(p).await,
            Db::Postgres(p) => sqlx::query_as::<_, $t>($sql).fetch_all(p).await,
        }
    };
}

impl CloudDb {
    async fn create(dir: &Path) -> CloudDb {
        CloudDb {
            test_db: TestDb::postgres_or_sqlite_file(&dir.join("cloud.db")).await,
            db: None,
        }
    }

    /// What the cloud's `database.url` is set to.
    pub fn url(&self) -> &str {
        &self.test_db.url
    }

    /// `sqlite` or `postgres`.
    pub fn backend(&self) -> &'static str {
        self.test_db.name
    }

    async fn db(&mut self) -> &Db {
        if self.db.is_none() {
            self.db = Some(
                Db::connect(&self.test_db.url, 2)
                    .await
                    .expect("cloud database opens"),
            );
        }
        self.db.as_ref().expect("just opened")
    }

    /// Every reading the cloud stored for `site` in the last day (at most 10 000), through the
    /// telemetry query the API serves (PostgreSQL's timestamps do not reach chrono's extremes).
    pub async fn readings(&mut self, site: &str) -> Vec<ReadingView> {
        let db = self.db().await;
        let site = SiteId::new(site).expect("valid site id");
        let page = raw_readings(
            db,
            &site,
            None,
            chrono::Utc::now() - chrono::TimeDelta::days(1),
            chrono::Utc::now() + chrono::TimeDelta::minutes(1),
            None,
            None,
            10_000,
        )
        .await
        .expect("readings read");
        assert!(page.next_cursor.is_none(), "more than one page of readings");
        page.readings
    }

    /// The completeness of `site` over the last day, as the API reports it.
    pub async fn completeness(&mut self, site: &str) -> Completeness {
        let db = self.db().await;
        let site = SiteId::new(site).expect("valid site id");
        let now = chrono::Utc::now();
        completeness(
            db,
            &site,
            now - chrono::TimeDelta::days(1),
            now + chrono::TimeDelta::minutes(1),
            None,
        )
        .await
        .expect("completeness read")
    }

    /// Every event the cloud stored for `site` in the last day (at most 10 000).
    pub async fn events(&mut self, site: &str) -> Vec<EventView> {
        let db = self.db().await;
        let site = SiteId::new(site).expect("valid site id");
        let page = events(
            db,
            &site,
            None,
            &[],
            chrono::Utc::now() - chrono::TimeDelta::days(1),
            chrono::Utc::now() + chrono::TimeDelta::minutes(1),
            None,
            10_000,
        )
        .await
        .expect("events read");
        assert!(page.next_cursor.is_none(), "more than one page of events");
        page.events
    }

    /// Reads every telemetry row, eviction gap and dead letter.
    pub async fn stored(&mut self) -> Stored {
        let db = self.db().await;
        let mut s = Stored::default();
        for table in ["readings", "events", "gaps"] {
            let sql = match table {
                "readings" => "SELECT site, seq FROM readings",
                "events" => "SELECT site, seq FROM events",
                _ => "SELECT site, seq FROM gaps",
            };
            let rows = fetch!(db, (String, i64), sql).expect("telemetry rows read");
            s.rows.extend(
                rows.into_iter()
                    .map(|(site, seq)| (site, seq as u64, table)),
            );
        }
        let gaps = fetch!(
            db,
            (String, Option<i64>, Option<i64>),
            "SELECT site, seq_from, seq_to FROM gaps WHERE cause = 'evicted'"
        )
        .expect("gaps read");
        for (site, from, to) in gaps {
            let (Some(from), Some(to)) = (from, to) else {
                panic!("an eviction gap of {site} without its seq range");
            };
            s.evicted.entry(site).or_default().push(SeqRange {
                from: Seq(from as u64),
                to: Seq(to as u64),
            });
        }
        let dead = fetch!(db, (Option<String>,), "SELECT site FROM dead_letters")
            .expect("dead letters read");
        for (site,) in dead {
            *s.dead_letters.entry(site.unwrap_or_default()).or_default() += 1;
        }
        s
    }
}

// ---------------------------------------------------------------------------------------------
// The broker

/// Which broker a scene needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerChoice {
    /// The cloud's embedded broker: it goes away with the cloud.
    Embedded,
    /// A broker the scene can stop while the cloud runs.
    Separate,
}

enum Mqtt {
    Embedded {
        v4: SocketAddr,
        v5: SocketAddr,
    },
    Standalone(Broker),
    /// An external broker (`CAUDAL_TEST_MQTT_URL`), reached directly or through a relay.
    External {
        url: String,
        relay: Option<Relay>,
    },
}

impl Mqtt {
    fn agent_url(&self) -> String {
        match self {
            Mqtt::Embedded { v4, .. } => format!("mqtt://{v4}"),
            Mqtt::Standalone(b) => b.url(),
            Mqtt::External { relay: Some(r), .. } => format!("mqtt://{}", r.addr),
            Mqtt::External { url, .. } => url.clone(),
        }
    }

    /// The broker lines of the cloud's configuration: keys of `[mqtt]`, then tables after it.
    fn cloud_toml(&self) -> String {
        match self {
            Mqtt::Embedded { v4, v5 } => {
                format!("\n[mqtt.embedded]\nlisten = \"{v4}\"\nlisten_v5 = \"{v5}\"\n")
            }
            Mqtt::Standalone(b) => format!("url = \"mqtt://{}\"\n", b.v5_addr()),
            Mqtt::External { relay: Some(r), .. } => format!("url = \"mqtt://{}\"\n", r.addr),
            Mqtt::External { url, .. } => format!("url = \"{url}\"\n"),
        }
    }

    /// The address a raw MQTT client of the test connects to.
    fn addr(&self) -> SocketAddr {
        match self {
            Mqtt::Embedded { v4, .. } => *v4,
            Mqtt::Standalone(b) => b.v4_addr(),
            Mqtt::External { relay: Some(r), .. } => r.addr,
            Mqtt::External { url, .. } => {
                let hostport = url.trim_start_matches("mqtt://").trim_end_matches('/');
                hostport
                    .parse()
                    .expect("CAUDAL_TEST_MQTT_URL is mqtt://<ip>:<port>")
            }
        }
    }
}

/// A TCP relay on a loopback port to an external broker: stopping it closes its port and every
/// connection through it at once, which agents and cloud see as the broker going away.
struct Relay {
    addr: SocketAddr,
    target: SocketAddr,
    tasks: Option<JoinSet<()>>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Relay {
        let mut r = Relay {
            addr: free_addr(),
            target,
            tasks: None,
        };
        r.restart().await;
        r
    }

    fn stop(&mut self) {
        if let Some(mut t) = self.tasks.take() {
            t.abort_all();
        }
    }

    async fn restart(&mut self) {
        self.stop();
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .unwrap_or_else(|e| panic!("relay binds {} again: {e}", self.addr));
        let target = self.target;
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            // Connections live in this task's set: aborting it drops them all.
            let mut conns = JoinSet::new();
            while let Ok((mut inbound, _)) = listener.accept().await {
                conns.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        self.tasks = Some(tasks);
    }
}

// ---------------------------------------------------------------------------------------------
// Sites: simulated meters and an agent

/// One simulated meter of a site.
#[derive(Debug, Clone)]
pub struct Meter {
    pub id: String,
    pub unit: u8,
    pub profile: &'static str,
    pub model: Model,
    /// Extra TOML lines of its `[[bus.device]]` table (timeouts).
    pub extra: &'static str,
}

/// `n` meters cycling through three profiles, each with a steady process.
pub fn meters(n: u8) -> Vec<Meter> {
    (1..=n)
        .map(|unit| {
            let (profile, model) = match unit % 3 {
                1 => ("generic", Model::steady(12.5, 1000.0, 35.0)),
                2 => ("siemens-mag6000", Model::steady(8.0, 5000.0, 0.0)),
                _ => ("keller-level", Model::steady(0.0, 0.0, 42.17)),
            };
            Meter {
                id: format!("m{unit}"),
                unit,
                profile,
                model,
                extra: "",
            }
        })
        .collect()
}

/// How a site's agent is set up.
#[derive(Debug, Clone)]
pub struct SiteSpec {
    pub meters: Vec<Meter>,
    /// `[outbox] disk_budget_mb`.
    pub disk_budget_mb: u64,
    /// Extra lines of `[uplink]`.
    pub uplink: &'static str,
    /// Extra lines of every bus table.
    pub bus: &'static str,
    /// `[uplink] batch_max_records`.
    pub batch_max_records: u32,
    /// Buses (TCP connections to the site's simulator) the meters are spread over, polled in
    /// parallel. Modbus TCP only: an RTU line is one bus.
    pub buses: usize,
    /// How the agent reaches the meters.
    pub line: MeterLine,
}

/// How a site's agent reaches its simulated meters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MeterLine {
    /// Modbus TCP.
    #[default]
    ModbusTcp,
    /// RTU through a transparent serial-to-Ethernet converter (`rtu_over_tcp`): one line that
    /// hands a reply to a client that went away to the next one.
    Converter,
    /// RTU on a serial port at 19200 8E1 (a pty pair made by `socat`).
    Serial,
}

impl SiteSpec {
    pub fn new(n_meters: u8) -> SiteSpec {
        SiteSpec {
            meters: meters(n_meters),
            disk_budget_mb: 64,
            uplink: "",
            bus: "",
            batch_max_records: 50,
            buses: 1,
            line: MeterLine::ModbusTcp,
        }
    }
}

/// Uplink settings: small batches sent fast, a short ack timeout and quick reconnects, so
/// outages and lost acks resolve within seconds.
const UPLINK: &str = "keep_alive_s = 5\nbatch_max_age_ms = 100\n\
                      ack_timeout_s = 2\nreconnect_min_ms = 100\nreconnect_max_ms = 1000\n\
                      status_interval_s = 2";

/// A site: its meters (simulated in this process) and its agent (a child process).
pub struct Site {
    pub id: String,
    pub agent: Proc,
    pub outbox_path: PathBuf,
    pub config_path: PathBuf,
    pub sim: SimHandle,
    /// The outbox, and the epochs seen in it during the scene.
    outbox: OutboxWatch,
    /// The last seq of an observed empty backlog, if any.
    drained: Option<Seq>,
    sim_task: JoinHandle<()>,
    _pty: Option<PtyPair>,
}

impl Site {
    async fn start(dir: &Path, id: String, spec: &SiteSpec, broker_url: &str) -> Site {
        let sdir = dir.join(&id);
        std::fs::create_dir_all(&sdir).expect("site dir");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("simulator binds");
        let sim_addr = listener.local_addr().expect("simulator address");
        let mut toml = String::new();
        writeln!(
            toml,
            "[site]\nid = \"{id}\"\ndata_dir = \"{}\"\n\n[outbox]\ndisk_budget_mb = {}\n\n\
             [uplink]\nbroker = \"{broker_url}\"\nbatch_max_records = {}\n{UPLINK}\n{}\n\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n\n[clock]\nrequire_ntp_sync = false",
            sdir.join("data").display(),
            spec.disk_budget_mb,
            spec.batch_max_records,
            spec.uplink,
        )
        .expect("write");
        assert!(
            spec.buses == 1 || spec.line == MeterLine::ModbusTcp,
            "an RTU line is one bus"
        );
        let pty = match spec.line {
            MeterLine::Serial => Some(PtyPair::start().expect("socat makes the serial line")),
            _ => None,
        };
        for b in 0..spec.buses {
            let link = match (spec.line, &pty) {
                (MeterLine::ModbusTcp, _) => format!("kind = \"tcp\"\naddress = \"{sim_addr}\""),
                (MeterLine::Converter, _) => {
                    format!("kind = \"rtu_over_tcp\"\naddress = \"{sim_addr}\"")
                }
                (MeterLine::Serial, Some(pty)) => format!(
                    "kind = \"rtu\"\nport = \"{}\"\nbaud = 19200\nparity = \"even\"\n\
                     data_bits = 8\nstop_bits = 1",
                    pty.agent_end.display()
                ),
                (MeterLine::Serial, None) => unreachable!("made above"),
            };
            writeln!(toml, "\n[[bus]]\nname = \"sim{b}\"\n{link}\n{}", spec.bus).expect("write");
            for m in spec.meters.iter().skip(b).step_by(spec.buses) {
                writeln!(
                    toml,
                    "\n[[bus.device]]\nid = \"{}\"\nunit = {}\nprofile = \"{}\"\nperiod_s = 1\n{}",
                    m.id, m.unit, m.profile, m.extra
                )
                .expect("write");
            }
        }
        let config_path = sdir.join("agent.toml");
        std::fs::write(&config_path, &toml).expect("agent config written");

        // The simulator serves exactly the points the agent will read.
        let resolved = meters::resolve(&config_path);
        let line = match (spec.line, &pty) {
            (MeterLine::ModbusTcp, _) => meters::Line::Listener(listener, Framing::Tcp),
            (MeterLine::Converter, _) => meters::Line::Converter(listener),
            (MeterLine::Serial, Some(pty)) => meters::Line::Serial(pty.meter_end.clone()),
            (MeterLine::Serial, None) => unreachable!("made above"),
        };
        let (handle, sim_task) = meters::serve_on(&resolved, line, |id| {
            let m = spec.meters.iter().find(|m| m.id == id);
            m.expect("meter of device").model.clone()
        });
        let cfg = config_path.display().to_string();
        Site {
            agent: Proc::new(
                &format!("agent-{id}"),
                dir,
                Path::new(AGENT_BIN),
                &["--config", &cfg, "run"],
            ),
            id,
            outbox_path: resolved.outbox_path.clone(),
            outbox: OutboxWatch::new(&resolved.outbox_path),
            config_path,
            sim: handle,
            drained: None,
            sim_task,
            _pty: pty,
        }
    }

    /// The agent's public key, from `caudal-agent identity` (which creates the key pair).
    pub fn identity(&self) -> String {
        let cfg = self.config_path.display().to_string();
        let args = ["--config".to_string(), cfg, "identity".to_string()];
        let out = command(Path::new(AGENT_BIN), &args)
            .stdin(Stdio::null())
            .output()
            .expect("caudal-agent starts");
        assert!(
            out.status.success(),
            "caudal-agent identity: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Reads the outbox read-only (as `caudal-agent status` does); `None` while it does not
    /// exist yet. Remembers the epoch.
    pub fn inspect(&mut self) -> Option<Inspection> {
        self.outbox.inspect()
    }

    /// Seqs still in the outbox (sendable or held).
    pub fn outbox_seqs(&self) -> BTreeSet<u64> {
        self.outbox.seqs()
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.sim_task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// The scene

/// Everything one scenario runs.
pub struct Scene {
    pub name: &'static str,
    pub db: CloudDb,
    pub cloud: Proc,
    pub sites: Vec<Site>,
    mqtt: Mqtt,
    pub http: SocketAddr,
    cloud_config: PathBuf,
    started: Instant,
    dir: tempfile::TempDir,
    _turn: Turn,
}

impl Scene {
    /// Sets up the database, the broker, one simulator and agent configuration per site, and
    /// the cloud's configuration with every site registered. Nothing runs yet but the
    /// simulators (and a separate broker).
    pub async fn new(name: &'static str, broker: BrokerChoice, sites: &[SiteSpec]) -> Scene {
        Scene::set_up(name, broker, sites, false).await
    }

    /// [`Scene::new`] with the embedded broker's authentication on (`mqtt.embedded.authenticate`):
    /// the cloud logs in with its own user, each agent with its site's credential as `site add`
    /// printed it. Through an external broker (`CAUDAL_TEST_MQTT_URL`) the logins are sent and
    /// that broker's own rules apply.
    pub async fn authenticated(name: &'static str, sites: &[SiteSpec]) -> Scene {
        Scene::set_up(name, BrokerChoice::Embedded, sites, true).await
    }

    async fn set_up(
        name: &'static str,
        broker: BrokerChoice,
        sites: &[SiteSpec],
        authenticate: bool,
    ) -> Scene {
        let turn = take_turn().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let db = CloudDb::create(dir.path()).await;
        let external = caudal_testkit::services::mqtt_url();
        let mqtt = match (external, broker) {
            (Some(url), BrokerChoice::Embedded) => Mqtt::External { url, relay: None },
            (Some(url), BrokerChoice::Separate) => {
                let target = Mqtt::External {
                    url: url.clone(),
                    relay: None,
                }
                .addr();
                Mqtt::External {
                    url,
                    relay: Some(Relay::start(target).await),
                }
            }
            (None, BrokerChoice::Embedded) => Mqtt::Embedded {
                v4: free_addr(),
                v5: free_addr(),
            },
            (None, BrokerChoice::Separate) => {
                Mqtt::Standalone(Broker::start().expect("standalone broker starts"))
            }
        };
        let run = tag();
        let mut rigs = Vec::new();
        for (i, spec) in sites.iter().enumerate() {
            let id = format!("{name}-{run}-{}", i + 1);
            rigs.push(Site::start(dir.path(), id, spec, &mqtt.agent_url()).await);
        }

        let http = free_addr();
        let cloud_config = dir.path().join("cloud.toml");
        let toml = format!(
            "services = [\"all\"]\ndata_dir = \"{}\"\n\n[http]\nlisten = \"{http}\"\n\n\
             [database]\nurl = \"{}\"\nmax_connections = 4\n\n\
             [ingest]\ngroup = \"e2e-{run}\"\nworkers = 2\n\n\
             [log]\nlevel = \"info,sqlx=warn,rumqttd=warn,rumqttd::server::broker=off\"\n\n\
             [mqtt]\nclient_id = \"caudal-cloud-e2e-{run}\"\nkeep_alive_s = 5\n{}{}",
            dir.path().join("cloud").display(),
            db.url(),
            if authenticate {
                "username = \"caudal-cloud\"\npassword = \"the cloud's own e2e password\"\n"
            } else {
                ""
            },
            mqtt.cloud_toml(),
        );
        let toml = match (&mqtt, authenticate) {
            (Mqtt::Embedded { .. }, true) => format!("{toml}authenticate = true\n"),
            _ => toml,
        };
        std::fs::write(&cloud_config, toml).expect("cloud config written");
        let cfg = cloud_config.display().to_string();
        let cloud = Proc::new(
            "cloud",
            dir.path(),
            Path::new(CLOUD_BIN),
            &["--config", &cfg, "run"],
        );
        let scene = Scene {
            name,
            db,
            cloud,
            sites: rigs,
            mqtt,
            http,
            cloud_config,
            started: Instant::now(),
            dir,
            _turn: turn,
        };
        for s in &scene.sites {
            // Each agent's key pair is made before its first start, as a technician does at
            // installation, and its public key enrolled with the site: batches must be signed.
            let public_key = s.identity();
            let out = scene.cloud_cli(&[
                "site",
                "add",
                "--id",
                &s.id,
                "--name",
                &s.id,
                "--public-key",
                &public_key,
            ]);
            if authenticate {
                let password = out
                    .lines()
                    .find_map(|l| l.strip_prefix("mqtt password: "))
                    .unwrap_or_else(|| panic!("no password in {out:?}"));
                let agent = std::fs::read_to_string(&s.config_path).expect("agent config");
                let agent = agent.replacen(
                    "[uplink]\n",
                    &format!(
                        "[uplink]\nusername = \"{}\"\npassword = \"{password}\"\n",
                        s.id
                    ),
                    1,
                );
                std::fs::write(&s.config_path, agent).expect("agent config written");
            }
        }
        eprintln!(
            "{name}: {} sites, database {}, broker {}, directory {}",
            scene.sites.len(),
            scene.db.backend(),
            scene.mqtt.agent_url(),
            scene.dir().display()
        );
        scene
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Seconds since the scene was set up.
    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Runs a one-shot cloud command (`site add`, ...) to completion.
    pub fn cloud_cli(&self, args: &[&str]) -> String {
        let mut all = vec![
            "--config".to_string(),
            self.cloud_config.display().to_string(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        let out = command(Path::new(CLOUD_BIN), &all)
            .stdin(Stdio::null())
            .output()
            .expect("caudal-cloud starts");
        if !out.status.success() {
            self.fail(&format!(
                "caudal-cloud {args:?} failed: {}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts the cloud and waits until its ingest is subscribed.
    pub async fn start_cloud(&mut self) {
        self.cloud.spawn();
        let http = self.http;
        self.wait(
            "the cloud's ingest to subscribe",
            Duration::from_secs(30),
            |_| {
                http_get(http, "/metrics")
                    .filter(|m| m.contains("caudal_cloud_ingest_subscribed 1"))
                    .map(|_| ())
            },
        )
        .await;
    }

    /// SIGKILLs the cloud (as a crash or the OOM killer would).
    pub fn kill_cloud(&mut self) {
        let status = self
            .cloud
            .signal_and_reap(libc::SIGKILL, EXIT_TIMEOUT)
            .unwrap_or_else(|e| self.fail(&e));
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "the cloud ran until killed: {status}"
        );
    }

    /// SIGTERMs the cloud and expects a clean exit.
    pub fn stop_cloud(&mut self) {
        let status = self
            .cloud
            .signal_and_reap(libc::SIGTERM, EXIT_TIMEOUT)
            .unwrap_or_else(|e| self.fail(&e));
        if !status.success() {
            self.fail(&format!("the cloud stopped with {status}"));
        }
    }

    pub fn start_agents(&mut self) {
        for s in &mut self.sites {
            s.agent.spawn();
        }
    }

    /// SIGKILLs agent `i`; it must have been running until then.
    pub fn kill_agent(&mut self, i: usize) {
        let status = self.sites[i]
            .agent
            .signal_and_reap(libc::SIGKILL, EXIT_TIMEOUT)
            .unwrap_or_else(|e| self.fail(&e));
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "agent {i} ran until killed: {status}"
        );
    }

    /// SIGTERMs every running agent and expects clean exits.
    pub fn stop_agents(&mut self) {
        for i in 0..self.sites.len() {
            if !self.sites[i].agent.is_running() {
                continue;
            }
            let status = self.sites[i]
                .agent
                .signal_and_reap(libc::SIGTERM, EXIT_TIMEOUT)
                .unwrap_or_else(|e| self.fail(&e));
            if status.code() != Some(0) {
                self.fail(&format!("agent {i} stopped with {status}"));
            }
        }
    }

    /// Stops the separate broker (or cuts the relay to the external one).
    pub fn stop_broker(&mut self) {
        match &mut self.mqtt {
            Mqtt::Standalone(b) => b.stop(),
            Mqtt::External { relay: Some(r), .. } => r.stop(),
            _ => panic!("this scene's broker cannot stop on its own (BrokerChoice::Separate)"),
        }
    }

    /// Starts the separate broker again (or restores the relay).
    pub async fn start_broker(&mut self) {
        match &mut self.mqtt {
            Mqtt::Standalone(b) => b.restart().expect("broker restarts"),
            Mqtt::External { relay: Some(r), .. } => r.restart().await,
            _ => panic!("this scene's broker cannot stop on its own (BrokerChoice::Separate)"),
        }
    }

    /// Where a raw MQTT v3.1.1 client of the test connects.
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt.addr()
    }

    /// Panics with `what` after printing every process's log.
    pub fn fail(&self, what: &str) -> ! {
        panic!("{what}\n{}", self.logs());
    }

    pub fn logs(&self) -> String {
        let mut s = self.cloud.logs();
        for site in &self.sites {
            s.push_str(&site.agent.logs());
        }
        s
    }

    /// Polls `f` until it returns `Some`, failing after `within` or as soon as a process that
    /// should be running has exited.
    pub async fn wait<T>(
        &mut self,
        what: &str,
        within: Duration,
        mut f: impl FnMut(&mut Scene) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + within;
        loop {
            self.check_alive(what);
            if let Some(v) = f(self) {
                return v;
            }
            if Instant::now() > deadline {
                self.fail(&format!("{}: waited {within:?} for {what}", self.name));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Like [`Scene::wait`], for a condition on what the cloud stored.
    pub async fn wait_stored<T>(
        &mut self,
        what: &str,
        within: Duration,
        mut f: impl FnMut(&Stored) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + within;
        loop {
            self.check_alive(what);
            let stored = self.db.stored().await;
            if let Some(v) = f(&stored) {
                return v;
            }
            if Instant::now() > deadline {
                self.fail(&format!("{}: waited {within:?} for {what}", self.name));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn check_alive(&mut self, what: &str) {
        if let Some(status) = self.cloud.exited() {
            self.fail(&format!(
                "waiting for {what}: the cloud exited with {status}"
            ));
        }
        for i in 0..self.sites.len() {
            if let Some(status) = self.sites[i].agent.exited() {
                self.fail(&format!(
                    "waiting for {what}: agent {i} exited with {status}"
                ));
            }
        }
    }

    /// Waits until the cloud stored at least `n` readings of every site.
    pub async fn wait_readings(&mut self, n: usize, within: Duration) {
        let ids: Vec<String> = self.sites.iter().map(|s| s.id.clone()).collect();
        self.wait_stored(&format!("{n} readings of every site"), within, |st| {
            ids.iter()
                .all(|id| st.count(id, "readings") >= n)
                .then_some(())
        })
        .await;
    }

    /// Waits until every site's outbox holds nothing unacknowledged, and remembers each site's
    /// last seq at that moment: every seq up to it was acknowledged, so the cloud stored it.
    pub async fn wait_drained(&mut self, within: Duration) {
        self.wait("every outbox backlog to drain", within, |scene| {
            let mut all = true;
            for s in &mut scene.sites {
                match s.inspect() {
                    Some(i) if i.backlog == 0 && i.last_seq.is_some() => s.drained = i.last_seq,
                    _ => all = false,
                }
            }
            all.then_some(())
        })
        .await;
    }

    /// Sum of the backlogs of every outbox.
    pub fn backlog(&mut self) -> u64 {
        self.sites
            .iter_mut()
            .filter_map(|s| s.inspect())
            .map(|i| i.backlog)
            .sum()
    }

    /// The end of every scenario, with every agent stopped: for each site, every seq the agent
    /// committed — `(epoch, 1..=last)`, since allocation has no holes within an epoch — is stored
    /// in the cloud exactly once (in one of `readings`, `events`, `gaps`) or covered by an
    /// eviction gap's seq range, or, only when committed after the site's last observed drain,
    /// still in the outbox for the agent's next start. The cloud holds no row of any other seq or
    /// site, and no dead letter of these sites.
    pub async fn prove(&mut self) -> Proof {
        for s in &self.sites {
            assert!(
                !s.agent.is_running(),
                "stop agent {} before the proof",
                s.id
            );
        }
        let stored = self.db.stored().await;
        let mut proof = Proof::default();
        let ids: BTreeSet<&str> = self.sites.iter().map(|s| s.id.as_str()).collect();
        let foreign: BTreeSet<&str> = stored
            .rows
            .iter()
            .map(|r| r.0.as_str())
            .filter(|s| !ids.contains(s))
            .collect();
        if !foreign.is_empty() {
            self.fail(&format!(
                "the cloud stored rows of other sites: {foreign:?}"
            ));
        }
        let mut problems = Vec::new();
        for i in 0..self.sites.len() {
            let site = &mut self.sites[i];
            let ins = site.inspect().expect("outbox readable");
            let last = ins.last_seq.expect("the agent committed records");
            let listed: BTreeSet<u32> = ins
                .closed_epochs
                .iter()
                .map(|(e, _)| *e)
                .chain([ins.epoch])
                .collect();
            if !site.outbox.epochs().is_subset(&listed) {
                problems.push(format!(
                    "{}: epochs seen with records {:?}, the outbox lists {listed:?}",
                    site.id,
                    site.outbox.epochs()
                ));
            }
            let committed = committed_all(&ins.closed_epochs, ins.epoch, last);
            let mut seen: BTreeMap<u64, Vec<&str>> = BTreeMap::new();
            for r in stored.rows.iter().filter(|r| r.0 == site.id) {
                seen.entry(r.1).or_default().push(r.2);
            }
            let doubled: Vec<String> = seen
                .iter()
                .filter(|(_, t)| t.len() > 1)
                .map(|(s, t)| format!("{} in {t:?}", Seq(*s)))
                .collect();
            if !doubled.is_empty() {
                problems.push(format!("{}: stored more than once: {doubled:?}", site.id));
            }
            let invented: Vec<String> = seen
                .keys()
                .filter(|s| !committed.contains(s))
                .map(|s| Seq(*s).to_string())
                .collect();
            if !invented.is_empty() {
                problems.push(format!(
                    "{}: stored seqs the agent never committed: {invented:?}",
                    site.id
                ));
            }
            let evicted = stored.evicted.get(&site.id).cloned().unwrap_or_default();
            let waiting = site.outbox_seqs();
            let drained = site.drained.unwrap_or(Seq(0));
            let accounted = account(
                &committed,
                |s| seen.contains_key(&s),
                &evicted,
                &waiting,
                drained,
            );
            proof.stored += accounted.stored;
            proof.evicted += accounted.evicted;
            proof.left_in_outbox += accounted.left_in_outbox;
            let missing: Vec<String> = accounted.missing.iter().map(Seq::to_string).collect();
            if !missing.is_empty() {
                problems.push(format!(
                    "{}: {} of {} committed records neither stored nor covered by a gap \
                     (drained up to {}): {:?}",
                    site.id,
                    missing.len(),
                    committed.len(),
                    drained,
                    missing
                ));
            }
            if let Some(n) = stored.dead_letters.get(&site.id) {
                problems.push(format!("{}: {n} dead letters", site.id));
            }
            proof.committed += committed.len() as u64;
            proof.eviction_gaps += evicted.len() as u64;
        }
        if !problems.is_empty() {
            self.fail(&format!(
                "{}: the proof failed:\n{}",
                self.name,
                problems.join("\n")
            ));
        }
        proof.sites = self.sites.len();
        proof
    }
}

/// What the proof established, over every site.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Proof {
    pub sites: usize,
    /// Records the agents committed.
    pub committed: u64,
    /// Of those, stored in the cloud (once).
    pub stored: u64,
    /// Of those, covered by eviction gaps instead.
    pub evicted: u64,
    /// Eviction gap records in the cloud.
    pub eviction_gaps: u64,
    /// Committed after the last drain and still in the outbox for the next start.
    pub left_in_outbox: u64,
}

impl Drop for Scene {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}: scene directory {}", self.name, self.dir().display());
        }
    }
}

/// `GET path` over a fresh connection; the body when the answer is 200.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    buf.starts_with("HTTP/1.1 200").then_some(buf)
}
