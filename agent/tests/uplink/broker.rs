//! The uplink against a real embedded rumqttd broker and the acknowledging test receiver (a real
//! SQLite file): delivery, deletion only after the cloud's ack, live-first ordering, backlog rate,
//! broker outages, misbehaving acks, refused credentials, mutual TLS, commands, retained status
//! and last will.
//!
//! The outbox is the agent's real SQLite outbox in a tempdir: the test appends records through
//! the same `OutboxHandle` the uplink reads and acknowledges through, and reads the file to see
//! what is left.

use caudal_agent::command::CommandRequest;
use caudal_agent::config::{OutboxConfig, Secret, Synchronous, UplinkConfig};
use caudal_agent::metrics::Metrics;
use caudal_agent::outbox::{ClockStamp, Outbox, OutboxHandle, Stamped};
use caudal_agent::uplink::{Uplink, UplinkError};
use caudal_common::payload::{Payload, decode};
use caudal_common::signed::{self, Purpose, SecretKey};
use caudal_common::topic::{self, TopicKind};
use caudal_common::{
    Command, CommandKind, CommandResult, DesiredConfig, DeviceId, DeviceState, Reading,
    SCHEMA_VERSION, Seq, SiteId, Status,
};
use caudal_testkit::broker::{Broker, BrokerOptions, BrokerTls};
use caudal_testkit::receiver::{AckMode, Receiver};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use rusqlite::{Connection, OpenFlags};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

// ---- TestOutbox: the real SQLite outbox in a tempdir, driven from the test ----

/// Boot id of the records a test commits as taken under an untrusted clock.
const HELD_BOOT: &str = "boot-held";

/// The agent's real outbox on a file of its own: the test appends records through the
/// [`OutboxHandle`] the uplink reads from, and reads the file to see what is left.
#[derive(Clone, Debug)]
struct TestOutbox {
    handle: OutboxHandle,
    path: PathBuf,
    /// Readings appended so far, to give each a different totalizer.
    appended: Arc<AtomicU64>,
    _dir: Arc<tempfile::TempDir>,
}

impl TestOutbox {
    fn new() -> TestOutbox {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        TestOutbox::open(dir, Arc::default())
    }

    /// Opens (a start of the agent) the outbox file `outbox.db` in `dir`, numbering the readings
    /// it appends after `appended`.
    fn open(dir: Arc<tempfile::TempDir>, appended: Arc<AtomicU64>) -> TestOutbox {
        let path = dir.path().join("outbox.db");
        let config = OutboxConfig {
            path: None,
            disk_budget_mb: 64,
            synchronous: Synchronous::Normal,
            commit_interval_ms: 0,
        };
        let outbox = Outbox::open(&path, &config, true).unwrap();
        TestOutbox {
            handle: OutboxHandle::spawn(outbox).unwrap(),
            path,
            appended,
            _dir: dir,
        }
    }

    /// Commits `n` readings taken under `clock` in one append and returns their seqs.
    async fn append(&self, n: usize, clock: ClockStamp) -> Vec<Seq> {
        let first = self.appended.fetch_add(n as u64, Ordering::Relaxed);
        let records = (0..n as u64)
            .map(|i| {
                let reading = Reading {
                    seq: Seq(0),
                    device: DeviceId::new("fm1").unwrap(),
                    ts: chrono::Utc::now(),
                    q: Default::default(),
                    flow_lps: Some(12.5),
                    total_m3: Some((first + i + 1) as f64 * 0.1),
                    level_m: None,
                    extra: BTreeMap::new(),
                };
                Stamped::new(reading, clock.clone())
            })
            .collect();
        self.handle.append(records, vec![]).await.unwrap()
    }

    /// Commits `n` readings and returns their seqs.
    async fn commit(&self, n: usize) -> Vec<Seq> {
        let clock = ClockStamp {
            trusted: true,
            boot_id: "boot-now".into(),
            boottime_ms: 1_000,
        };
        self.append(n, clock).await
    }

    /// Commits `n` readings taken under an untrusted clock: the outbox holds them back until
    /// [`TestOutbox::release`].
    async fn commit_held(&self, n: usize) -> Vec<Seq> {
        let clock = ClockStamp {
            trusted: false,
            boot_id: HELD_BOOT.into(),
            boottime_ms: 1_000,
        };
        self.append(n, clock).await
    }

    /// The clock became trusted: the outbox re-stamps the held records, makes them sendable and
    /// tells the uplink to rescan.
    async fn release(&self) {
        let offset = chrono::Utc::now().timestamp_millis() - 2_000;
        let r = self.handle.restamp(HELD_BOOT, offset).await.unwrap();
        assert!(r.released() > 0, "records were held: {r:?}");
    }

    /// The seqs still in the outbox file, sendable or held.
    fn remaining(&self) -> BTreeSet<u64> {
        let conn =
            Connection::open_with_flags(&self.path, OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
        let mut st = conn
            .prepare("SELECT seq FROM records UNION ALL SELECT seq FROM held")
            .unwrap();
        st.query_map([], |r| r.get::<_, i64>(0))
            .unwrap()
            .map(|s| s.unwrap() as u64)
            .collect()
    }

    async fn wait_empty(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.remaining().is_empty() {
            assert!(
                Instant::now() < deadline,
                "{} records still pending after {within:?}",
                self.remaining().len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The uplink counts an ack after the outbox has deleted its records, so a test that saw the
/// outbox empty waits (bounded) for the counter to catch up.
async fn wait_acked(metrics: &Metrics, n: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    while metrics.acked.get() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    metrics.acked.get()
}

// ---- Rig ----

fn site() -> SiteId {
    SiteId::new("pozo-test").unwrap()
}

fn config(broker: &str) -> UplinkConfig {
    UplinkConfig {
        broker: broker.to_string(),
        client_id: None,
        username: None,
        password: None,
        ca_file: None,
        client_cert: None,
        client_key: None,
        keep_alive_s: 5,
        batch_max_records: 100,
        batch_max_age_ms: 50,
        backlog_rate: 100_000,
        max_inflight_batches: 4,
        ack_timeout_s: 2,
        reconnect_min_ms: 50,
        reconnect_max_ms: 400,
        status_interval_s: 60,
        cloud_public_key: None,
    }
}

struct Agent {
    metrics: Arc<Metrics>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), UplinkError>>,
    commands: mpsc::Receiver<CommandRequest>,
    desired: watch::Receiver<Option<DesiredConfig>>,
    _devices: watch::Sender<BTreeMap<String, DeviceState>>,
    _clock: watch::Sender<bool>,
}

impl Agent {
    fn start(cfg: UplinkConfig, spool: TestOutbox) -> Agent {
        let metrics = Metrics::new();
        let devices = BTreeMap::from([(
            "fm1".to_string(),
            DeviceState {
                last_poll: Some(chrono::Utc::now()),
                result: "ok".into(),
                last_error: None,
                consecutive_failures: 0,
            },
        )]);
        let (devices_tx, devices_rx) = watch::channel(devices);
        let (clock_tx, clock_rx) = watch::channel(true);
        let (cmd_tx, cmd_rx) = mpsc::channel(4);
        let uplink = Uplink::new(
            cfg,
            site(),
            spool.handle.clone(),
            devices_rx,
            clock_rx,
            cmd_tx,
            metrics.clone(),
            ("0.1.0-test".into(), "cfg-7".into()),
        )
        .expect("valid uplink config");
        let desired = uplink.desired_config();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(uplink.run(async {
            let _ = stop_rx.await;
        }));
        Agent {
            metrics,
            stop: Some(stop_tx),
            task,
            commands: cmd_rx,
            desired,
            _devices: devices_tx,
            _clock: clock_tx,
        }
    }

    async fn stop(mut self) -> Result<(), UplinkError> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("uplink stops within 10 s")
            .expect("uplink task did not panic")
    }

    fn connects(&self, kind: &str) -> u64 {
        self.metrics
            .connects
            .get_or_create(&Metrics::kind(kind))
            .get()
    }

    async fn wait_connects(&self, kind: &str, n: u64, within: Duration) {
        let deadline = Instant::now() + within;
        while self.connects(kind) < n {
            assert!(
                Instant::now() < deadline,
                "connects{{kind={kind}}} = {} after {within:?}, expected {n}",
                self.connects(kind)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn init_tracing() {
    caudal_testkit::log::init("caudal_agent=info");
}

struct Cloud {
    broker: Broker,
    receiver: Receiver,
    _dir: tempfile::TempDir,
}

async fn cloud() -> Cloud {
    init_tracing();
    let broker = Broker::start().expect("broker starts");
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(broker.v4_addr(), &dir.path().join("cloud.db"))
        .await
        .expect("receiver starts");
    Cloud {
        broker,
        receiver,
        _dir: dir,
    }
}

fn u64s(seqs: &[Seq]) -> BTreeSet<u64> {
    seqs.iter().map(|s| s.0).collect()
}

/// A plain MQTT client that forwards every publish it receives.
async fn probe(
    addr: SocketAddr,
    id: &str,
    filters: &[String],
) -> (
    AsyncClient,
    mpsc::Receiver<rumqttc::Publish>,
    JoinHandle<()>,
) {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(5));
    let (client, mut el) = AsyncClient::new(o, 64);
    let (tx, rx) = mpsc::channel(64);
    let (sub_tx, sub_rx) = oneshot::channel();
    let filters = filters.to_vec();
    let c = client.clone();
    let task = tokio::spawn(async move {
        let mut sub_tx = Some(sub_tx);
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    for f in &filters {
                        c.subscribe(f.clone(), QoS::AtLeastOnce).await.unwrap();
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(t) = sub_tx.take() {
                        let _ = t.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx.send(p).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(5), sub_rx)
        .await
        .expect("probe subscribed")
        .unwrap();
    (client, rx, task)
}

/// The next message on `topic`, skipping others.
async fn next_on(rx: &mut mpsc::Receiver<rumqttc::Publish>, topic: &str) -> rumqttc::Publish {
    loop {
        let p = next_publish(rx).await;
        if p.topic == topic {
            return p;
        }
    }
}

async fn next_publish(rx: &mut mpsc::Receiver<rumqttc::Publish>) -> rumqttc::Publish {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a message within 10 s")
        .expect("probe running")
}

// ---- Scenarios ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_arrives_is_acknowledged_and_only_then_deleted() {
    let c = cloud().await;
    let spool = TestOutbox::new();
    let mut all = spool.commit(1000).await;
    let agent = Agent::start(config(&c.broker.url()), spool.clone());
    agent.wait_connects("ok", 1, Duration::from_secs(10)).await;
    all.extend(spool.commit(150).await);

    spool.wait_empty(Duration::from_secs(20)).await;
    assert_eq!(c.receiver.stored_seqs("pozo-test").unwrap(), u64s(&all));
    assert_eq!(
        wait_acked(&agent.metrics, 1150).await,
        1150,
        "each record acked once"
    );
    assert!(agent.metrics.sent.get() >= 1150);
    let latencies: u64 = agent
        .metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix("caudal_agent_ack_latency_seconds_count "))
        .and_then(|n| n.trim().parse().ok())
        .expect("ack latency histogram exported");
    assert!(
        latencies >= 12,
        "one latency per acknowledged batch, got {latencies}"
    );
    assert_eq!(agent.metrics.connected.get(), 1);
    for a in c.receiver.arrivals() {
        assert!(
            a.seqs.len() <= 100,
            "batch {} has {} records",
            a.batch,
            a.seqs.len()
        );
    }
    agent.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_records_overtake_the_backlog_which_drains_at_its_rate() {
    let c = cloud().await;
    let spool = TestOutbox::new();
    let backlog = spool.commit(2000).await;
    let rate = 1000.0;
    let mut cfg = config(&c.broker.url());
    cfg.backlog_rate = 1000;
    let agent = Agent::start(cfg, spool.clone());
    c.receiver
        .wait_stored(1, Duration::from_secs(10))
        .await
        .unwrap();
    let live = spool.commit(5).await;
    spool.wait_empty(Duration::from_secs(20)).await;

    let arrivals = c.receiver.arrivals();
    let pos = |seq: Seq| {
        arrivals
            .iter()
            .position(|a| a.seqs.contains(&seq.0))
            .expect("every record arrived")
    };
    let last_backlog = backlog.iter().map(|s| pos(*s)).max().unwrap();
    for s in &live {
        assert!(
            pos(*s) < last_backlog,
            "live record {s} arrived in batch {} of {}, after the backlog drained",
            pos(*s),
            arrivals.len()
        );
    }
    // Upper bound on the backlog's pace: never more than the bucket's burst (one batch) plus
    // the rate times the time since the first backlog batch (with 10 % slack for timers), plus
    // one batch of arrival jitter: the receiver stamps arrivals, and on a loaded machine the
    // first batch can reach it late and the next ones bunched up behind it. Without the rate,
    // the 2000 records would all arrive within a fraction of a second.
    let live_set = u64s(&live);
    let first = arrivals[0].at;
    let mut sent = 0usize;
    for a in &arrivals {
        sent += a.seqs.iter().filter(|s| !live_set.contains(s)).count();
        let allowed = 200.0 + rate * 1.1 * a.at.duration_since(first).as_secs_f64();
        assert!(
            sent as f64 <= allowed,
            "{sent} backlog records after {:?}; the rate allows {allowed}",
            a.at.duration_since(first)
        );
    }
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_mid_stream_loses_nothing() {
    let mut c = cloud().await;
    let spool = TestOutbox::new();
    let all = Arc::new(Mutex::new(spool.commit(500).await));
    let mut cfg = config(&c.broker.url());
    cfg.backlog_rate = 300;
    let agent = Agent::start(cfg, spool.clone());
    agent.wait_connects("ok", 1, Duration::from_secs(10)).await;

    let producer = {
        let spool = spool.clone();
        let all = all.clone();
        tokio::spawn(async move {
            for _ in 0..60 {
                let s = spool.commit(10).await;
                all.lock().unwrap().extend(s);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    c.broker.stop();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        agent.metrics.connected.get(),
        0,
        "the agent noticed the outage"
    );
    c.broker.restart().expect("broker restarts");
    producer.await.unwrap();

    spool.wait_empty(Duration::from_secs(30)).await;
    let all = u64s(&all.lock().unwrap());
    assert_eq!(all.len(), 1100);
    assert_eq!(
        c.receiver.stored_seqs("pozo-test").unwrap(),
        all,
        "nothing missing"
    );
    assert!(agent.connects("ok") >= 2, "reconnected");
    assert!(agent.connects("error") >= 1, "failed attempts counted");
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_released_by_the_outbox_are_sent_after_a_rescan() {
    let c = cloud().await;
    let spool = TestOutbox::new();
    let held = spool.commit_held(5).await;
    let free = spool.commit(5).await;
    let agent = Agent::start(config(&c.broker.url()), spool.clone());
    c.receiver
        .wait_stored(5, Duration::from_secs(10))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(spool.remaining(), u64s(&held), "held records are not sent");

    // Below every cursor of the running flow: only the rescan finds them.
    spool.release().await;
    spool.wait_empty(Duration::from_secs(10)).await;
    let mut all = u64s(&held);
    all.extend(u64s(&free));
    assert_eq!(c.receiver.stored_seqs("pozo-test").unwrap(), all);
    assert_eq!(agent.connects("ok"), 1, "without reconnecting");
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_stay_in_the_outbox_until_the_cloud_acknowledges_them() {
    let c = cloud().await;
    c.receiver.set_mode(AckMode::Paused);
    let spool = TestOutbox::new();
    let agent = Agent::start(config(&c.broker.url()), spool.clone());
    agent.wait_connects("ok", 1, Duration::from_secs(10)).await;
    let seqs = spool.commit(50).await;
    while c.receiver.batches_received() == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The broker has PUBACKed the batch; that deletes nothing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(spool.remaining(), u64s(&seqs));
    assert_eq!(agent.metrics.acked.get(), 0);

    // The ingest comes back: the batch is sent again after ack_timeout_s and acknowledged.
    c.receiver.set_mode(AckMode::Normal);
    spool.wait_empty(Duration::from_secs(10)).await;
    assert_eq!(c.receiver.stored_seqs("pozo-test").unwrap(), u64s(&seqs));
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_and_doubled_acks_are_harmless() {
    let c = cloud().await;
    let spool = TestOutbox::new();
    let agent = Agent::start(config(&c.broker.url()), spool.clone());
    agent.wait_connects("ok", 1, Duration::from_secs(10)).await;

    c.receiver.set_mode(AckMode::Twice);
    let first = spool.commit(120).await;
    spool.wait_empty(Duration::from_secs(10)).await;
    assert_eq!(
        wait_acked(&agent.metrics, 120).await,
        120,
        "a repeated ack deletes nothing more"
    );

    c.receiver.set_mode(AckMode::DropAcks);
    let second = spool.commit(30).await;
    c.receiver
        .wait_stored(150, Duration::from_secs(10))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        spool.remaining(),
        u64s(&second),
        "stored in the cloud but not acknowledged"
    );

    c.receiver.set_mode(AckMode::Normal);
    spool.wait_empty(Duration::from_secs(10)).await;
    let mut all = u64s(&first);
    all.extend(u64s(&second));
    assert_eq!(c.receiver.stored_seqs("pozo-test").unwrap(), all);
    assert_eq!(wait_acked(&agent.metrics, 150).await, 150);
    agent.stop().await.unwrap();
}

/// The reasons the uplink counts a refused ack under, and how often each was seen.
fn refused(metrics: &Metrics, reason: &str) -> u64 {
    metrics
        .acks_refused
        .get_or_create(&Metrics::reason(reason))
        .get()
}

/// An `accepted` ack as another MQTT client would forge it.
fn forged_ack(site: &str, batch: &str, ranges: &[(u64, u64)]) -> Vec<u8> {
    let seqs: Vec<serde_json::Value> = ranges
        .iter()
        .map(|(from, to)| serde_json::json!({"from": from, "to": to}))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "v": SCHEMA_VERSION, "site": site, "batch": batch, "status": "accepted", "seqs": seqs,
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_acks_from_another_client_delete_nothing_the_agent_did_not_send() {
    let c = cloud().await;
    // The ingest is down: nothing the agent sends is acknowledged by the cloud.
    c.receiver.set_mode(AckMode::Paused);
    let spool = TestOutbox::new();
    let agent = Agent::start(config(&c.broker.url()), spool.clone());
    agent.wait_connects("ok", 1, Duration::from_secs(10)).await;
    let sent = spool.commit(18).await;
    // Records the uplink has not sent: held back until the clock is trusted.
    let held = spool.commit_held(4).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let in_flight = loop {
        if let Some(a) = c.receiver.arrivals().into_iter().next() {
            break a;
        }
        assert!(Instant::now() < deadline, "no batch reached the broker");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(in_flight.seqs, u64s(&sent).into_iter().collect::<Vec<_>>());

    // Another client on the same broker, with a client id of its own, that can read the site's
    // telemetry, publishes on the site's ack topic.
    let telemetry = topic::topic(&site(), TopicKind::Telemetry);
    let (intruder, _rx, _t) = probe(c.broker.v4_addr(), "intruder", &[telemetry]).await;
    let ack_topic = topic::topic(&site(), TopicKind::Ack);
    let everything = (0, (1u64 << 63) - 1);
    let held_range = (held[0].0, held[held.len() - 1].0);
    let sent_range = (sent[0].0, sent[sent.len() - 1].0);
    let forgeries = [
        // The whole seq space under a batch id the agent never used.
        forged_ack("pozo-test", "forged-1", &[everything]),
        // The real seqs of the pending records under another batch id.
        forged_ack("pozo-test", "other-7", &[sent_range, held_range]),
        // The batch really in flight, listing real seqs of records it does not carry.
        forged_ack("pozo-test", &in_flight.batch, &[held_range]),
        // Another site's batch, on this site's topic.
        forged_ack("pozo-otro", "otro-1", &[everything]),
    ];
    for f in forgeries {
        intruder
            .publish(ack_topic.clone(), QoS::AtLeastOnce, false, f)
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let reasons = ["unknown_batch", "outside_batch", "other_site"];
    while reasons
        .iter()
        .map(|r| refused(&agent.metrics, r))
        .sum::<u64>()
        < 4
    {
        assert!(
            Instant::now() < deadline,
            "refused acks not counted: {:?}",
            reasons.map(|r| refused(&agent.metrics, r))
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(refused(&agent.metrics, "unknown_batch"), 2);
    assert_eq!(refused(&agent.metrics, "outside_batch"), 1);
    assert_eq!(refused(&agent.metrics, "other_site"), 1);
    let mut all = u64s(&sent);
    all.extend(u64s(&held));
    assert_eq!(spool.remaining(), all, "a forged ack deleted records");
    assert_eq!(agent.metrics.acked.get(), 0);

    // The cloud comes back: every record arrives, none was replaced by a gap.
    c.receiver.set_mode(AckMode::Normal);
    spool.release().await;
    spool.wait_empty(Duration::from_secs(15)).await;
    assert_eq!(c.receiver.stored_seqs("pozo-test").unwrap(), all);
    assert!(
        c.receiver.gaps("pozo-test").unwrap().is_empty(),
        "no gap record was written"
    );
    agent.stop().await.unwrap();
}

/// How often the uplink refused a message from the cloud for its signature.
fn not_authentic(metrics: &Metrics, kind: &str, reason: &str) -> u64 {
    metrics
        .cloud_refused
        .get_or_create(&Metrics::kind_reason(kind, reason))
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_cloud_key_only_acks_signed_by_it_delete_anything() {
    let c = cloud().await;
    c.receiver.set_mode(AckMode::Paused);
    let cloud_key = SecretKey::from_seed(&[9; 32]);
    let forger = SecretKey::from_seed(&[6; 32]);
    let mut cfg = config(&c.broker.url());
    cfg.cloud_public_key = Some(cloud_key.public().to_string());
    let spool = TestOutbox::new();
    let agent = Agent::start(cfg, spool.clone());
    agent.wait_connects("ok", 1, Duration::from_secs(10)).await;
    let sent = spool.commit(10).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let in_flight = loop {
        if let Some(a) = c.receiver.arrivals().into_iter().next() {
            break a;
        }
        assert!(Instant::now() < deadline, "no batch reached the broker");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let range = (sent[0].0, sent[sent.len() - 1].0);
    // The right ack for the batch in flight, as only the cloud may send it.
    let genuine = forged_ack("pozo-test", &in_flight.batch, &[range]);
    let telemetry = topic::topic(&site(), TopicKind::Telemetry);
    let (intruder, _rx, _t) = probe(c.broker.v4_addr(), "intruder", &[telemetry]).await;
    let ack_topic = topic::topic(&site(), TopicKind::Ack);
    let mut tampered = signed::seal(&cloud_key, Purpose::Ack, &genuine);
    // One byte of the body changed after signing: the first digit of the range's end.
    let at = tampered
        .windows(5)
        .position(|w| w == b"\"to\":")
        .expect("the ack has a range")
        + 5;
    assert!(tampered[at].is_ascii_digit());
    tampered[at] = if tampered[at] == b'0' { b'1' } else { b'0' };
    let forgeries: [Vec<u8>; 4] = [
        // Unsigned, however right.
        genuine.clone(),
        // Signed by someone else's key.
        signed::seal(&forger, Purpose::Ack, &genuine),
        // Signed by the cloud's key, then altered.
        tampered,
        // The cloud's signature made for another purpose.
        signed::seal(&cloud_key, Purpose::Command, &genuine),
    ];
    for f in forgeries {
        intruder
            .publish(ack_topic.clone(), QoS::AtLeastOnce, false, f)
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while refused(&agent.metrics, "not_authentic") < 4 {
        assert!(
            Instant::now() < deadline,
            "forged acks not counted: {}",
            refused(&agent.metrics, "not_authentic")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(not_authentic(&agent.metrics, "ack", "unsigned"), 1);
    assert_eq!(not_authentic(&agent.metrics, "ack", "unknown_key"), 1);
    assert_eq!(not_authentic(&agent.metrics, "ack", "bad_signature"), 2);
    assert_eq!(
        spool.remaining(),
        u64s(&sent),
        "a forged ack deleted records"
    );
    assert_eq!(agent.metrics.acked.get(), 0);

    // The same ack signed by the cloud's key deletes the batch's records.
    intruder
        .publish(
            ack_topic.clone(),
            QoS::AtLeastOnce,
            false,
            signed::seal(&cloud_key, Purpose::Ack, &genuine),
        )
        .await
        .unwrap();
    spool.wait_empty(Duration::from_secs(10)).await;
    assert_eq!(agent.metrics.acked.get(), sent.len() as u64);
    assert_eq!(refused(&agent.metrics, "not_authentic"), 4);
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_outbox_never_reuses_a_seq_and_loses_nothing() {
    let c = cloud().await;
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let image = dir.path().join("image.db");
    let appended = Arc::new(AtomicU64::new(0));

    // First run: five readings committed; the card's image is taken after a clean stop.
    let ob = TestOutbox::open(dir.clone(), appended.clone());
    let imaged = ob.commit(5).await;
    ob.handle.shutdown().await.unwrap();
    std::fs::copy(&ob.path, &image).unwrap();

    // Second run: three more readings; everything is sent, acknowledged and deleted.
    let ob = TestOutbox::open(dir.clone(), appended.clone());
    let second = ob.commit(3).await;
    let agent = Agent::start(config(&c.broker.url()), ob.clone());
    ob.wait_empty(Duration::from_secs(10)).await;
    agent.stop().await.unwrap();
    ob.handle.shutdown().await.unwrap();

    // The card is restored from the image (the second run's commits are gone), the agent starts
    // again, polls three new readings and sends.
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", ob.path.display()));
    }
    std::fs::copy(&image, &ob.path).unwrap();
    let ob = TestOutbox::open(dir.clone(), appended.clone());
    assert_eq!(
        ob.remaining(),
        u64s(&imaged),
        "the image's records are back"
    );
    let third = ob.commit(3).await;
    let agent = Agent::start(config(&c.broker.url()), ob.clone());
    ob.wait_empty(Duration::from_secs(10)).await;
    agent.stop().await.unwrap();

    let earlier: BTreeSet<u64> = u64s(&imaged).union(&u64s(&second)).copied().collect();
    assert!(
        u64s(&third).is_disjoint(&earlier),
        "seqs reused after the roll-back: {third:?} vs {earlier:?}"
    );
    let mut all = earlier;
    all.extend(u64s(&third));
    assert_eq!(c.receiver.stored_seqs("pozo-test").unwrap(), all);
    let totals: BTreeSet<u64> = c
        .receiver
        .readings("pozo-test")
        .unwrap()
        .iter()
        .filter_map(|r| r.total_m3.map(|t| (t * 10.0).round() as u64))
        .collect();
    assert_eq!(
        totals,
        (1..=11).collect(),
        "every reading of every run is stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_batch_keeps_its_records_without_blocking_the_rest() {
    let c = cloud().await;
    let spool = TestOutbox::new();
    let agent = Agent::start(config(&c.broker.url()), spool.clone());
    agent.wait_connects("ok", 1, Duration::from_secs(10)).await;

    c.receiver
        .set_mode(AckMode::Reject("unknown device fm1".into()));
    let rejected = spool.commit(10).await;
    while agent.metrics.rejected_batches.get() == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.receiver.set_mode(AckMode::Normal);
    let later = spool.commit(25).await;
    c.receiver
        .wait_stored(25, Duration::from_secs(10))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    assert_eq!(
        spool.remaining(),
        u64s(&rejected),
        "rejected records kept, the rest deleted"
    );
    assert_eq!(c.receiver.stored_seqs("pozo-test").unwrap(), u64s(&later));
    assert_eq!(
        agent.metrics.rejected_batches.get(),
        1,
        "held back, not re-sent at once"
    );
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_refused_counted_and_retried() {
    init_tracing();
    let broker = Broker::start_with(BrokerOptions {
        auth: Some(("agent".into(), "right".into())),
        ..Default::default()
    })
    .unwrap();
    let spool = TestOutbox::new();
    spool.commit(5).await;
    let mut cfg = config(&broker.url());
    cfg.username = Some("agent".into());
    cfg.password = Some(Secret::new("wrong"));
    let agent = Agent::start(cfg, spool.clone());
    agent
        .wait_connects("refused", 3, Duration::from_secs(10))
        .await;
    assert!(
        !agent.task.is_finished(),
        "a refusal never stops the uplink"
    );
    assert_eq!(agent.connects("ok"), 0);
    assert_eq!(spool.remaining().len(), 5);
    agent.stop().await.expect("stops cleanly while refused");

    let mut cfg = config(&broker.url());
    cfg.username = Some("agent".into());
    cfg.password = Some(Secret::new("right"));
    let agent = Agent::start(cfg, spool);
    agent.wait_connects("ok", 1, Duration::from_secs(10)).await;
    assert_eq!(agent.connects("refused"), 0);
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_are_answered_on_the_result_topic() {
    let c = cloud().await;
    let spool = TestOutbox::new();
    let mut agent = Agent::start(config(&c.broker.url()), spool.clone());
    agent.wait_connects("ok", 1, Duration::from_secs(10)).await;
    let site = site();
    let result_topic = topic::topic(&site, TopicKind::CommandResult);
    let status_topic = topic::topic(&site, TopicKind::Status);
    let (client, mut results, _t) = probe(
        c.broker.v4_addr(),
        "probe-commands",
        &[result_topic.clone(), status_topic.clone()],
    )
    .await;
    // The retained status comes first on subscription.
    next_on(&mut results, &status_topic).await;
    let cmd_topic = topic::topic(&site, TopicKind::Command);
    let send = |cmd: Command| {
        let client = client.clone();
        let t = cmd_topic.clone();
        async move {
            client
                .publish(t, QoS::AtLeastOnce, false, cmd.encode())
                .await
                .unwrap();
        }
    };

    send(Command {
        v: SCHEMA_VERSION,
        id: "cmd-1".into(),
        kind: CommandKind::Ping,
    })
    .await;
    let r: CommandResult = decode(&next_on(&mut results, &result_topic).await.payload).unwrap();
    assert_eq!((r.id.as_str(), r.ok, &r.site), ("cmd-1", true, &site));

    // publish_status refreshes the retained status, then answers.
    send(Command {
        v: SCHEMA_VERSION,
        id: "cmd-s".into(),
        kind: CommandKind::PublishStatus,
    })
    .await;
    let st: Status = decode(&next_on(&mut results, &status_topic).await.payload).unwrap();
    assert!(st.online);
    let r: CommandResult = decode(&next_on(&mut results, &result_topic).await.payload).unwrap();
    assert_eq!((r.id.as_str(), r.ok), ("cmd-s", true));

    // poll_now goes to the component that can do it; its answer is published.
    send(Command {
        v: SCHEMA_VERSION,
        id: "cmd-2".into(),
        kind: CommandKind::PollNow {
            device: DeviceId::new("fm1").unwrap(),
        },
    })
    .await;
    let req = tokio::time::timeout(Duration::from_secs(5), agent.commands.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(req.command.id, "cmd-2");
    req.reply
        .send(CommandResult {
            v: SCHEMA_VERSION,
            site: site.clone(),
            id: "cmd-2".into(),
            ok: true,
            output: serde_json::json!({"flow_lps": 12.5}),
            error: None,
        })
        .unwrap();
    let r: CommandResult = decode(&next_on(&mut results, &result_topic).await.payload).unwrap();
    assert_eq!((r.id.as_str(), r.ok), ("cmd-2", true));
    assert_eq!(r.output["flow_lps"], 12.5);

    // A command the agent does not understand gets an answer naming the problem, and a count.
    client
        .publish(
            cmd_topic.clone(),
            QoS::AtLeastOnce,
            false,
            br#"{"v":1,"id":"cmd-3","command":"reboot"}"#.to_vec(),
        )
        .await
        .unwrap();
    let r: CommandResult = decode(&next_on(&mut results, &result_topic).await.payload).unwrap();
    assert_eq!((r.id.as_str(), r.ok), ("cmd-3", false));
    assert!(r.error.unwrap().contains("reboot"));
    assert_eq!(
        agent
            .metrics
            .bad_payloads
            .get_or_create(&Metrics::kind("command"))
            .get(),
        1
    );

    // The retained desired configuration is handed over.
    let desired = DesiredConfig {
        v: SCHEMA_VERSION,
        version: "cfg-8".into(),
        config: "[site]\nid = \"pozo-test\"\n".into(),
    };
    client
        .publish(
            topic::topic(&site, TopicKind::DesiredConfig),
            QoS::AtLeastOnce,
            true,
            desired.encode(),
        )
        .await
        .unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        agent.desired.wait_for(|d| d.as_ref() == Some(&desired)),
    )
    .await
    .expect("desired configuration handed over")
    .unwrap();

    // An ack naming another site, for the batch really in flight and its real seqs, is refused
    // and counted, and deletes nothing.
    c.receiver.set_mode(AckMode::Paused);
    let pending = spool.commit(3).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let in_flight = loop {
        if let Some(a) = c.receiver.arrivals().into_iter().last() {
            break a;
        }
        assert!(Instant::now() < deadline, "no batch reached the broker");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        in_flight.seqs,
        u64s(&pending).into_iter().collect::<Vec<_>>()
    );
    let range = (pending[0].0, pending[pending.len() - 1].0);
    client
        .publish(
            topic::topic(&site, TopicKind::Ack),
            QoS::AtLeastOnce,
            false,
            forged_ack("other", &in_flight.batch, &[range]),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while refused(&agent.metrics, "other_site") == 0 {
        assert!(Instant::now() < deadline, "foreign ack not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        spool.remaining(),
        u64s(&pending),
        "a foreign ack deleted records"
    );
    assert_eq!(agent.metrics.acked.get(), 0);
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_retained_and_the_last_will_marks_the_agent_offline() {
    let c = cloud().await;
    let spool = TestOutbox::new();
    spool.commit(3).await;
    c.receiver.set_mode(AckMode::Paused);
    let agent = Agent::start(config(&c.broker.url()), spool);
    agent.wait_connects("ok", 1, Duration::from_secs(10)).await;
    let site = site();
    let status_topic = topic::topic(&site, TopicKind::Status);

    // A subscriber that comes later still gets the retained online status.
    let (_c1, mut rx, t1) = probe(
        c.broker.v4_addr(),
        "probe-status-1",
        std::slice::from_ref(&status_topic),
    )
    .await;
    let p = next_publish(&mut rx).await;
    assert!(p.retain);
    let s: Status = decode(&p.payload).unwrap();
    assert!(s.online);
    assert_eq!(s.agent_version.as_deref(), Some("0.1.0-test"));
    assert_eq!(s.config_version.as_deref(), Some("cfg-7"));
    assert_eq!(s.clock_synced, Some(true));
    assert_eq!(s.backlog, Some(3));
    assert_eq!(s.devices["fm1"].result, "ok");

    // The agent's connection goes away without a DISCONNECT: the broker publishes the will.
    agent.task.abort();
    let s: Status = decode(&next_publish(&mut rx).await.payload).unwrap();
    assert_eq!(s, Status::offline(site.clone()));
    t1.abort();

    let (_c2, mut rx, _t2) = probe(c.broker.v4_addr(), "probe-status-2", &[status_topic]).await;
    let p = next_publish(&mut rx).await;
    assert!(p.retain, "the will is retained");
    assert_eq!(decode::<Status>(&p.payload).unwrap(), Status::offline(site));
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

async fn tls_cloud() -> Cloud {
    init_tracing();
    let broker = Broker::start_with(BrokerOptions {
        tls: Some(BrokerTls {
            cert: fixture("server.pem"),
            key: fixture("server.key"),
            client_ca: fixture("ca.pem"),
        }),
        ..Default::default()
    })
    .expect("TLS broker starts");
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::start(broker.v4_addr(), &dir.path().join("cloud.db"))
        .await
        .expect("receiver starts");
    Cloud {
        broker,
        receiver,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_travel_over_mutual_tls() {
    let c = tls_cloud().await;
    let spool = TestOutbox::new();
    let seqs = spool.commit(40).await;
    let mut cfg = config(&c.broker.tls_url().expect("TLS listener"));
    cfg.ca_file = Some(fixture("ca.pem"));
    cfg.client_cert = Some(fixture("client.pem"));
    cfg.client_key = Some(fixture("client.key"));
    let agent = Agent::start(cfg, spool.clone());
    spool.wait_empty(Duration::from_secs(10)).await;
    assert_eq!(c.receiver.stored_seqs("pozo-test").unwrap(), u64s(&seqs));
    assert_eq!(agent.connects("ok"), 1);
    agent.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_certificate_from_another_ca_is_refused() {
    let c = tls_cloud().await;
    let spool = TestOutbox::new();
    spool.commit(3).await;
    let mut cfg = config(&c.broker.tls_url().expect("TLS listener"));
    cfg.ca_file = Some(fixture("other-ca.pem"));
    cfg.client_cert = Some(fixture("client.pem"));
    cfg.client_key = Some(fixture("client.key"));
    let agent = Agent::start(cfg, spool.clone());
    agent
        .wait_connects("error", 2, Duration::from_secs(10))
        .await;
    assert_eq!(agent.connects("ok"), 0);
    assert_eq!(spool.remaining().len(), 3);
    assert_eq!(c.receiver.batches_received(), 0);
    agent.stop().await.unwrap();
}
