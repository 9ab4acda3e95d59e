//! The end-to-end rig shared by the scenarios of this binary: the real `caudal-agent` binary as a
//! child process, polling simulated meters over Modbus TCP and syncing to the embedded broker,
//! where an acknowledging receiver stores every `(site, seq)` in SQLite. And the proof every
//! scenario ends with: every record the agent ever committed reached the receiver (or is covered
//! by an eviction gap), nothing else did. The pieces (processes, broker, receiver, the outbox
//! view, the proof's accounting) are `caudal-testkit`'s, shared with the whole-system rig.
//!
//! Each agent run writes its stdout and stderr to `agent-N.{stdout,stderr}` in the rig's
//! directory; a failing test prints them. Every wait is a bounded poll with a deadline. A rig
//! holds a turn while it lives, so rigs of concurrent tests run one after another.

#![allow(dead_code)]

use caudal_agent::config::Site;
use caudal_agent::outbox::Inspection;
use caudal_agent::simulator::{Framing, Model, SimHandle};
use caudal_common::payload::decode;
use caudal_common::topic::{self, TopicKind};
use caudal_common::{GapCause, Seq, SiteId, Status};
use caudal_testkit::broker::Broker;
use caudal_testkit::outbox::OutboxWatch;
use caudal_testkit::process::{Proc, Turn, command, take_turn};
use caudal_testkit::receiver::Receiver;
use caudal_testkit::serial::PtyPair;
use caudal_testkit::{meters, proof};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The site every scenario runs.
pub const SITE: &str = "e2e-site";
/// How often the bounded waits look again.
const POLL: Duration = Duration::from_millis(50);
/// How long a stopped agent may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);

/// One simulated meter and how the agent is told to poll it.
#[derive(Debug, Clone)]
pub struct Meter {
    pub id: &'static str,
    pub unit: u8,
    pub profile: &'static str,
    pub model: Model,
    /// Extra TOML lines inside the device's `[[bus.device]]` table (timeouts, retries).
    pub extra: &'static str,
}

impl Meter {
    pub fn new(id: &'static str, unit: u8, profile: &'static str, model: Model) -> Meter {
        Meter {
            id,
            unit,
            profile,
            model,
            extra: "",
        }
    }

    pub fn with(mut self, extra: &'static str) -> Meter {
        self.extra = extra;
        self
    }
}

/// Three meters of three profiles on one bus, each with a steady process so the values the
/// agent reports can be checked against the model: a generic flow meter, a SITRANS MAG 6000
/// and a KELLER level probe.
pub fn three_meters() -> Vec<Meter> {
    vec![
        Meter::new("fm1", 1, "generic", Model::steady(12.5, 1000.0, 35.0)),
        Meter::new("fm2", 2, "siemens-mag6000", Model::steady(8.0, 5000.0, 0.0)),
        Meter::new("nivel1", 3, "keller-level", Model::steady(0.0, 0.0, 42.17)),
    ]
}

/// Uplink settings of the rig: small batches sent fast, a short ack timeout and quick
/// reconnects, so outages and lost acks resolve within seconds.
const UPLINK: &str = r#"keep_alive_s = 5
batch_max_records = 100
batch_max_age_ms = 50
ack_timeout_s = 2
reconnect_min_ms = 100
reconnect_max_ms = 1000
status_interval_s = 1"#;

const AGENT_BIN: &str = env!("CARGO_BIN_EXE_caudal-agent");

/// How the agent reaches the simulated meters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusLine {
    /// Modbus TCP.
    ModbusTcp,
    /// RTU through a transparent serial-to-Ethernet converter (`rtu_over_tcp`): one line shared
    /// by the agent's successive connections.
    Converter,
    /// RTU on a serial port (a pty pair made by `socat`).
    Serial,
}

/// The whole scene: broker, receiver, simulator, configuration, and at most one agent process.
pub struct Rig {
    pub broker: Broker,
    pub receiver: Receiver,
    pub sim: SimHandle,
    pub config_path: PathBuf,
    pub site: Site,
    pub meters: Vec<Meter>,
    /// The agent: at most one process runs at a time.
    agent: Proc,
    /// The outbox, and every epoch seen in it during the scenario.
    outbox: OutboxWatch,
    sim_task: JoinHandle<()>,
    _pty: Option<PtyPair>,
    dir: tempfile::TempDir,
    _turn: Turn,
}

impl Rig {
    /// Starts the broker, the receiver and the simulated `meters`, and writes the agent's
    /// configuration. No agent runs yet.
    pub async fn start(meters: Vec<Meter>) -> Rig {
        Rig::start_on(meters, BusLine::ModbusTcp)
            .await
            .expect("Modbus TCP needs nothing installed")
    }

    /// Like [`Rig::start`] with the meters on `line`; `None` when the line cannot be made here
    /// (no `socat` for a serial line).
    pub async fn start_on(meters: Vec<Meter>, line: BusLine) -> Option<Rig> {
        let pty = match line {
            BusLine::Serial => Some(PtyPair::start()?),
            _ => None,
        };
        let turn = take_turn().await;
        caudal_testkit::log::init("warn,rumqttd=off");
        let dir = tempfile::tempdir().expect("tempdir");
        let broker = Broker::start().expect("broker starts");
        let receiver = Receiver::start(broker.v4_addr(), &dir.path().join("cloud.db"))
            .await
            .expect("receiver starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("simulator binds");
        let sim_addr = listener.local_addr().expect("simulator address");

        let bus = match (&pty, line) {
            (Some(pty), _) => format!(
                "kind = \"rtu\"\nport = \"{}\"\nbaud = 19200",
                pty.agent_end.display()
            ),
            (None, BusLine::Converter) => {
                format!("kind = \"rtu_over_tcp\"\naddress = \"{sim_addr}\"")
            }
            (None, _) => format!("kind = \"tcp\"\naddress = \"{sim_addr}\""),
        };
        let mut toml = String::new();
        writeln!(
            toml,
            "[site]\nid = \"{SITE}\"\ndata_dir = \"{}\"\n\n[uplink]\nbroker = \"{}\"\n{UPLINK}\n\n\
             [metrics]\nlisten = \"127.0.0.1:0\"\n\n[clock]\nrequire_ntp_sync = false\n\n\
             [[bus]]\nname = \"sim\"\n{bus}",
            dir.path().join("data").display(),
            broker.url(),
        )
        .unwrap();
        for m in &meters {
            writeln!(
                toml,
                "\n[[bus.device]]\nid = \"{}\"\nunit = {}\nprofile = \"{}\"\nperiod_s = 1\n{}",
                m.id, m.unit, m.profile, m.extra
            )
            .unwrap();
        }
        let config_path = dir.path().join("agent.toml");
        std::fs::write(&config_path, &toml).expect("config written");

        // The simulator serves exactly the points the agent will read.
        let site = meters::resolve(&config_path);
        let sim_line = match (&pty, line) {
            (Some(pty), _) => meters::Line::Serial(pty.meter_end.clone()),
            (None, BusLine::Converter) => meters::Line::Converter(listener),
            (None, _) => meters::Line::Listener(listener, Framing::Tcp),
        };
        let (handle, sim_task) = meters::serve_on(&site, sim_line, |id| {
            meters.iter().find(|m| m.id == id).unwrap().model.clone()
        });
        let cfg = config_path.display().to_string();
        let agent = Proc::new(
            "agent",
            dir.path(),
            Path::new(AGENT_BIN),
            &["--config", &cfg, "run"],
        );

        Some(Rig {
            broker,
            receiver,
            sim: handle,
            config_path,
            outbox: OutboxWatch::new(&site.outbox_path),
            site,
            meters,
            agent,
            sim_task,
            _pty: pty,
            dir,
            _turn: turn,
        })
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn outbox_path(&self) -> &Path {
        &self.site.outbox_path
    }

    /// The unit id of meter `id`.
    pub fn unit(&self, id: &str) -> u8 {
        self.meters.iter().find(|m| m.id == id).unwrap().unit
    }

    /// Starts `caudal-agent run`; panics if one is already running.
    pub fn spawn_agent(&mut self) {
        self.agent.spawn();
    }

    /// How many agent processes were started.
    pub fn runs(&self) -> usize {
        self.agent.runs()
    }

    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.pid()
    }

    /// Sends SIGTERM and waits for the agent to exit; returns how it exited.
    pub async fn stop_agent(&mut self) -> ExitStatus {
        self.signal_and_reap(libc::SIGTERM).await
    }

    /// Kills the agent with SIGKILL (as a power cut or the OOM killer would) and reaps it.
    pub async fn kill_agent(&mut self) -> ExitStatus {
        self.signal_and_reap(libc::SIGKILL).await
    }

    async fn signal_and_reap(&mut self, sig: libc::c_int) -> ExitStatus {
        // Waits on this thread: the receiver and the simulator run on the runtime's workers.
        self.agent
            .signal_and_reap(sig, EXIT_TIMEOUT)
            .unwrap_or_else(|e| self.fail(&e))
    }

    /// Panics with `what` after printing every agent log.
    pub fn fail(&self, what: &str) -> ! {
        panic!("{what}\n{}", self.logs());
    }

    /// What the latest agent run has logged so far.
    pub fn agent_stderr(&self) -> String {
        self.agent.stderr()
    }

    /// Every agent run's stdout and stderr.
    pub fn logs(&self) -> String {
        self.agent.logs()
    }

    /// Runs a one-shot command of the binary (`status`, `check-config`) against the rig's
    /// configuration; returns its exit status and stdout.
    pub async fn cli(&self, args: &[&str]) -> (ExitStatus, String) {
        let out = self.dir().join("cli.stdout");
        let err = self.dir().join("cli.stderr");
        let mut all = vec![
            "--config".to_string(),
            self.config_path.display().to_string(),
        ];
        all.extend(args.iter().map(|a| a.to_string()));
        let mut child = command(Path::new(AGENT_BIN), &all)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("caudal-agent starts");
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = child.try_wait().expect("try_wait") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.fail(&format!("caudal-agent {args:?} did not finish within 20 s"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let stdout = std::fs::read_to_string(&out).unwrap_or_default();
        if !status.success() {
            self.fail(&format!(
                "caudal-agent {args:?} failed: {status}\nstdout:\n{stdout}\nstderr:\n{}",
                std::fs::read_to_string(&err).unwrap_or_default()
            ));
        }
        (status, stdout)
    }

    /// Reads the outbox read-only (as `caudal-agent status` does); `None` while the file does
    /// not exist or cannot be read yet. Remembers the epoch.
    pub fn inspect(&mut self) -> Option<Inspection> {
        self.outbox.inspect()
    }

    /// Polls `f` until it returns `Some`, failing after `within` or as soon as a running agent
    /// exits on its own.
    pub async fn wait<T>(
        &mut self,
        what: &str,
        within: Duration,
        mut f: impl FnMut(&mut Rig) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.agent.exited() {
                self.fail(&format!(
                    "waiting for {what}: the agent exited with {status}"
                ));
            }
            if let Some(v) = f(self) {
                return v;
            }
            if Instant::now() > deadline {
                self.fail(&format!("waited {within:?} for {what}"));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until the outbox holds nothing unacknowledged and returns the last seq committed at
    /// that moment: every seq up to it has been acknowledged, so the receiver stored it.
    pub async fn wait_drained(&mut self, within: Duration) -> Seq {
        self.wait("the outbox backlog to drain", within, |rig| {
            let i = rig.inspect()?;
            (i.backlog == 0).then_some(i.last_seq).flatten()
        })
        .await
    }

    /// Waits until the receiver stored at least `n` readings of every meter.
    pub async fn wait_readings(&mut self, n: usize, within: Duration) {
        let ids: Vec<&'static str> = self.meters.iter().map(|m| m.id).collect();
        self.wait(&format!("{n} readings of each meter"), within, |rig| {
            let readings = rig.receiver.readings(SITE).ok()?;
            ids.iter()
                .all(|id| readings.iter().filter(|r| r.device.as_str() == *id).count() >= n)
                .then_some(())
        })
        .await
    }

    /// The seqs still in the outbox (sendable or held), read-only.
    pub fn outbox_seqs(&self) -> BTreeSet<u64> {
        self.outbox.seqs()
    }

    /// `PRAGMA integrity_check` of the outbox; the agent must be stopped.
    pub fn integrity_check(&self) -> String {
        assert!(!self.agent.is_running(), "stop the agent first");
        self.outbox.integrity_check()
    }

    /// The end of every scenario: with the agent stopped, checks that every seq the agent ever
    /// committed — `(epoch, 1..=last)` in each of its epochs (one per start), since allocation
    /// has no holes — is
    /// stored at the receiver exactly once, or covered by an eviction gap's `seqs`, or (only for
    /// seqs committed after `drained`, the last seq of an observed empty backlog) still waiting in
    /// the outbox for the next start; and that the receiver holds nothing else.
    pub fn prove(&mut self, drained: Seq) -> Proof {
        assert!(!self.agent.is_running(), "stop the agent before the proof");
        let i = self.inspect().expect("outbox readable");
        let last = i.last_seq.expect("the agent committed records");
        let listed: BTreeSet<u32> = i
            .closed_epochs
            .iter()
            .map(|(e, _)| *e)
            .chain([i.epoch])
            .collect();
        assert!(
            self.outbox.epochs().is_subset(&listed),
            "every epoch seen with records is listed by the outbox: seen {:?}, listed {listed:?}",
            self.outbox.epochs()
        );
        assert!(drained <= last);
        let committed = proof::committed_all(&i.closed_epochs, i.epoch, last);

        let stored = self.receiver.stored_seqs(SITE).expect("receiver readable");
        let foreign: Vec<u64> = stored.difference(&committed).copied().collect();
        assert!(
            foreign.is_empty(),
            "the receiver stored seqs the agent never committed: {:?}",
            foreign
                .iter()
                .map(|s| Seq(*s).to_string())
                .collect::<Vec<_>>()
        );
        assert_eq!(
            self.receiver.stored_count(),
            stored.len() as u64,
            "no records of any other site"
        );

        let evicted: Vec<_> = self
            .receiver
            .gaps(SITE)
            .expect("gaps decode")
            .into_iter()
            .filter(|g| g.cause == GapCause::Evicted)
            .filter_map(|g| g.seqs)
            .collect();
        let waiting = self.outbox_seqs();
        let accounted = proof::account(
            &committed,
            |s| stored.contains(&s),
            &evicted,
            &waiting,
            drained,
        );
        let left = accounted.left_in_outbox;
        let missing: Vec<String> = accounted.missing.iter().map(Seq::to_string).collect();
        if !missing.is_empty() {
            self.fail(&format!(
                "{} of {} committed records neither stored nor covered by a gap (drained up to \
                 {drained}, last {last}): {missing:?}",
                missing.len(),
                committed.len()
            ));
        }

        let arrived: usize = self
            .receiver
            .arrivals()
            .iter()
            .filter(|a| a.stored)
            .map(|a| a.seqs.len())
            .sum();
        Proof {
            epoch: i.epoch,
            committed: committed.len() as u64,
            stored: stored.len() as u64,
            evicted: evicted.iter().map(|r| r.len()).sum(),
            left_in_outbox: left,
            duplicates: arrived.saturating_sub(stored.len()) as u64,
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // The agent is killed when `self.agent` is dropped, after this.
        self.sim_task.abort();
        if std::thread::panicking() {
            eprintln!("rig directory {}\n{}", self.dir().display(), self.logs());
        }
    }
}

/// What the proof established.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proof {
    pub epoch: u32,
    /// Records committed: the counters 1..=last of the epoch.
    pub committed: u64,
    /// Distinct records the receiver stored.
    pub stored: u64,
    /// Records covered by eviction gaps.
    pub evicted: u64,
    /// Records committed after the last drain and still in the outbox for the next start.
    pub left_in_outbox: u64,
    /// Deliveries the receiver stored that were repeats of a record it already had.
    pub duplicates: u64,
}

/// An MQTT subscriber to the site's retained status.
pub struct StatusWatch {
    rx: mpsc::Receiver<(bool, Status)>,
    task: JoinHandle<()>,
    _client: AsyncClient,
}

impl StatusWatch {
    /// Subscribes to `caudal/v1/{SITE}/status` on `broker`; returns once subscribed.
    pub async fn start(broker: &Broker, name: &str) -> StatusWatch {
        let addr = broker.v4_addr();
        let mut o = MqttOptions::new(name, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(5));
        let (client, mut el) = AsyncClient::new(o, 16);
        let (tx, rx) = mpsc::channel(64);
        let (sub_tx, sub_rx) = tokio::sync::oneshot::channel();
        let filter = topic::topic(&SiteId::new(SITE).unwrap(), TopicKind::Status);
        let c = client.clone();
        let task = tokio::spawn(async move {
            let mut sub_tx = Some(sub_tx);
            loop {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = c.subscribe(filter.clone(), QoS::AtLeastOnce).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(t) = sub_tx.take() {
                            let _ = t.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => match decode::<Status>(&p.payload) {
                        Ok(s) => {
                            if tx.send((p.retain, s)).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => panic!("undecodable status {:?}: {e}", p.payload),
                    },
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), sub_rx)
            .await
            .expect("status watch subscribed within 10 s")
            .expect("status watch running");
        StatusWatch {
            rx,
            task,
            _client: client,
        }
    }

    /// The next status (with its retain flag) that satisfies `f`, skipping others.
    pub async fn until(
        &mut self,
        what: &str,
        within: Duration,
        mut f: impl FnMut(bool, &Status) -> bool,
    ) -> (bool, Status) {
        let deadline = tokio::time::Instant::now() + within;
        let mut last = None;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some((retain, s))) => {
                    if f(retain, &s) {
                        return (retain, s);
                    }
                    last = Some(s);
                }
                Ok(None) => panic!("status watch stopped while waiting for {what}"),
                Err(_) => panic!("no status {what} within {within:?}; last seen: {last:?}"),
            }
        }
    }
}

impl Drop for StatusWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}
