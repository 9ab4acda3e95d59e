//! The uplink: carries the outbox's records to the cloud over MQTT and deletes them only when the
//! cloud says it has stored them.
//!
//! **Durability invariant.** The uplink never deletes a record on its own account. A record
//! leaves the outbox only through [`Spool::ack`] with the sequence ranges listed by an `accepted`
//! [`Ack`] on `caudal/v1/{site}/ack`, which the cloud publishes after it committed the batch,
//! and only those of them the named batch carried (`ledger`): an ack for a batch this uplink did
//! not send, for another site, or listing seqs beyond its batch deletes nothing more, and is
//! counted (`caudal_agent_acks_refused_total{reason}`) and logged with its batch id. The
//! broker's PUBACK only means the broker has the batch. A crash at any point leaves every record
//! not yet acknowledged in the outbox, and a restart sends it again (the cloud stores by
//! `(site, seq)`, so a record sent twice is stored once).
//!
//! **Connection protocol.** [`Uplink::run`] is a loop over the states of [`State`]: `Connecting`
//! waits for the CONNACK, `Online` sends and receives, `Backoff` waits (exponential back-off with
//! full jitter) before the next attempt. rumqttc's event loop runs in a task of its own that
//! forwards every event and, after an error, waits for the uplink to say when to try again, so
//! the back-off is the uplink's and rumqttc never retries in a tight loop. The session is clean:
//! after every (re)connect the uplink subscribes again, publishes its retained status and starts
//! a fresh [`flow::Flow`] that rescans the outbox from its start.
//!
//! **What is sent first.** Records committed after the connection started (live) go out as they
//! arrive, in batches of at most `batch_max_records` or after `batch_max_age_ms`; the backlog
//! drains oldest-first behind them at `backlog_rate` records per second. At most
//! `max_inflight_batches` batches wait for an acknowledgement; one not acknowledged within
//! `ack_timeout_s` is rebuilt from what is still pending and sent again. A rejected batch's
//! records stay in the outbox and are held back without stopping the others: [`REJECT_HOLD`]
//! after one rejection, doubling with each rejection in a row up to [`REJECT_HOLD_MAX`]
//! ([`reject_hold`]), back to the start at the next accepted batch. So an agent the cloud
//! refuses (an unknown or deactivated site, a rule it breaks) asks less and less often.
//!
//! **Commands.** A command on `caudal/v1/{site}/command` is executed by whoever
//! [`command::Executor::of`] names: the uplink answers `ping` and `publish_status` itself and
//! hands the rest to the commands task as a [`CommandRequest`], which answers within
//! [`command::COMMAND_TIMEOUT`]; the uplink publishes each [`CommandResult`] as it comes back.
//!
//! **Queues.** rumqttc's request queue holds one slot per in-flight batch plus a few for control
//! messages; the uplink only ever `try_`publishes into it, and when it is full a batch waits for
//! the next turn and a control message (status, command result) waits in a small queue that drops
//! its oldest entry when full. Events from the broker wait in a bounded channel, which makes the
//! event-loop task wait when the uplink is busy.

mod flow;
mod ledger;
pub mod options;
#[cfg(test)]
mod tests;

pub use options::{BrokerUrl, client_id_problem, default_client_id, mqtt_options, tls_config};

use crate::command::{
    self, CommandError, CommandRequest, Executor, MAX_COMMANDS_IN_PROGRESS, UplinkCommand,
};
use crate::config::UplinkConfig;
use crate::metrics::Metrics;
use crate::outbox::{OutboxError, Spool, SpoolState};
use crate::watchdog::Heartbeat;
use caudal_common::payload::{Payload, RawBatch, decode};
use caudal_common::topic::{self, Topic, TopicKind};
use caudal_common::{
    Ack, AckStatus, Command, CommandResult, DesiredConfig, DeviceState, SCHEMA_VERSION, Seq,
    SeqRange, SiteId, Status,
};
use flow::{Flow, FlowConfig, Holds};
use ledger::{Checked, Ledger};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS, StateError,
    SubscribeFilter,
};
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior, sleep_until};
use tracing::{debug, error, info, warn};

/// How long the records of a rejected batch are held back before they are sent again, after
/// one rejection.
pub const REJECT_HOLD: Duration = Duration::from_secs(60);
/// The longest hold, however many rejections in a row.
pub const REJECT_HOLD_MAX: Duration = Duration::from_secs(3600);

/// The hold after the `n`th rejection in a row (`n` ≥ 1): 60 s, 120 s, 240 s, … at most
/// [`REJECT_HOLD_MAX`].
pub fn reject_hold(n: u32) -> Duration {
    let doublings = n.saturating_sub(1).min(16);
    REJECT_HOLD
        .saturating_mul(1 << doublings)
        .min(REJECT_HOLD_MAX)
}
/// Control messages (status, command results) waiting for room in the request queue, at most.
const DEFERRED_CAP: usize = 32;
/// Events from the event-loop task waiting for the uplink.
const EVENT_QUEUE: usize = 64;
/// A connection that lasted this long resets the back-off.
const STABLE_AFTER: Duration = Duration::from_secs(30);
/// How long a clean shutdown waits for the offline status and DISCONNECT to leave.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);
/// After the request queue was found full, when to try again.
const QUEUE_FULL_RETRY: Duration = Duration::from_millis(20);
/// After an outbox read error, when to try again.
const OUTBOX_RETRY: Duration = Duration::from_secs(1);
/// Batches the [`Ledger`] remembers per in-flight slot: the ones in flight, and those timed out
/// or sent before a reconnect whose late ack may still come.
const LEDGER_PER_INFLIGHT: usize = 4;

/// Errors of the uplink: configuration problems found by [`Uplink::new`], and the two ways
/// [`Uplink::run`] stops without being asked to.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("uplink.broker {url:?}: {reason}")]
    BrokerUrl { url: String, reason: String },
    #[error("{0}")]
    Config(String),
    #[error("uplink.{key} {path}: {source}", path = path.display())]
    File {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("uplink.{key} {path}: {reason}", path = path.display())]
    Pem {
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("uplink TLS, {what}: {source}")]
    Tls {
        what: String,
        source: rumqttc::tokio_rustls::rustls::Error,
    },
    /// The outbox worker is gone; nothing can be sent or deleted.
    #[error("uplink: the outbox stopped")]
    OutboxStopped,
    /// rumqttc's event loop task ended.
    #[error("uplink: the MQTT event loop stopped")]
    TransportStopped,
}

/// The states of the connection protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The event-loop task is connecting; waiting for the CONNACK or an error.
    Connecting,
    /// Connected: batches, acknowledgements, commands and status flow.
    Online,
    /// The last attempt or connection failed; waiting this long before the next attempt.
    Backoff(Duration),
    /// Shutdown was requested.
    Stopped,
}

/// The uplink task. Build it with [`Uplink::new`], drive it with [`Uplink::run`].
pub struct Uplink<S: Spool> {
    cfg: UplinkConfig,
    site: SiteId,
    broker: BrokerUrl,
    options: MqttOptions,
    spool: S,
    devices: watch::Receiver<BTreeMap<String, DeviceState>>,
    clock_trusted: watch::Receiver<bool>,
    commands: mpsc::Sender<CommandRequest>,
    metrics: Arc<Metrics>,
    agent_version: String,
    config_version: String,
    desired: watch::Sender<Option<DesiredConfig>>,
    /// Beaten every time round each state's loop; every state wakes at least this often.
    heartbeat: Heartbeat,
}

impl<S: Spool> std::fmt::Debug for Uplink<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uplink")
            .field("site", &self.site)
            .field("broker", &self.broker)
            .finish_non_exhaustive()
    }
}

impl<S: Spool> Uplink<S> {
    /// Checks the configuration (broker URL, TLS files, limits) and builds the uplink.
    /// `versions` is `(agent_version, config_version)` as reported in the status.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: UplinkConfig,
        site: SiteId,
        spool: S,
        devices: watch::Receiver<BTreeMap<String, DeviceState>>,
        clock_trusted: watch::Receiver<bool>,
        commands: mpsc::Sender<CommandRequest>,
        metrics: Arc<Metrics>,
        versions: (String, String),
    ) -> Result<Uplink<S>, UplinkError> {
        let broker = BrokerUrl::parse(&cfg.broker)?;
        let options = mqtt_options(&cfg, &site)?;
        let (desired, _) = watch::channel(None);
        Ok(Uplink {
            cfg,
            site,
            broker,
            options,
            spool,
            devices,
            clock_trusted,
            commands,
            metrics,
            agent_version: versions.0,
            config_version: versions.1,
            desired,
            heartbeat: Heartbeat::unwatched(),
        })
    }

    /// Beats `heartbeat` for the watchdog while the uplink makes progress (connected or not).
    pub fn with_heartbeat(mut self, heartbeat: Heartbeat) -> Uplink<S> {
        self.heartbeat = heartbeat;
        self
    }

    /// The latest desired configuration the cloud published (retained on
    /// `caudal/v1/{site}/config/desired`), for the component that applies it.
    pub fn desired_config(&self) -> watch::Receiver<Option<DesiredConfig>> {
        self.desired.subscribe()
    }

    /// Runs until `shutdown` resolves (then publishes an offline status and disconnects
    /// cleanly), or until the outbox or the MQTT event loop stops.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), UplinkError> {
        let capacity = options::request_capacity(&self.cfg);
        let (client, eventloop) = AsyncClient::new(self.options.clone(), capacity);
        let (event_tx, events) = mpsc::channel(EVENT_QUEUE);
        let (resume, resume_rx) = mpsc::channel(1);
        let transport = AbortOnDrop(tokio::spawn(drive(eventloop, event_tx, resume_rx)));
        let mut d = Driver::new(self, client, events, resume);
        let mut shutdown = std::pin::pin!(shutdown);
        let mut state = State::Connecting;
        let result = loop {
            let next = match state {
                State::Connecting => d.connecting(shutdown.as_mut()).await,
                State::Online => d.online(shutdown.as_mut()).await,
                State::Backoff(delay) => d.backoff(delay, shutdown.as_mut()).await,
                State::Stopped => break Ok(()),
            };
            match next {
                Ok(s) => state = s,
                Err(e) => break Err(e),
            }
        };
        d.up.metrics.connected.set(0);
        drop(transport);
        result
    }
}

/// Aborts the event-loop task when the uplink returns.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Polls rumqttc's event loop and forwards every event. After an error it waits for `resume`
/// before polling again (polling is what reconnects), so the uplink owns the back-off.
async fn drive(
    mut eventloop: EventLoop,
    events: mpsc::Sender<Result<Event, ConnectionError>>,
    mut resume: mpsc::Receiver<()>,
) {
    loop {
        let r = eventloop.poll().await;
        let failed = r.is_err();
        if events.send(r).await.is_err() {
            return;
        }
        if failed && resume.recv().await.is_none() {
            return;
        }
    }
}

/// Batch ids: a random prefix drawn at start (so ids differ across restarts) and a counter.
#[derive(Debug)]
struct BatchIds {
    prefix: String,
    next: u64,
}

impl BatchIds {
    fn new() -> BatchIds {
        BatchIds {
            prefix: format!("{:012x}", fastrand::u64(..) & 0xffff_ffff_ffff),
            next: 1,
        }
    }

    fn next(&mut self) -> String {
        let id = format!("{}-{}", self.prefix, self.next);
        self.next += 1;
        id
    }
}

/// A message waiting for room in the request queue.
#[derive(Debug)]
struct Control {
    topic: String,
    retain: bool,
    payload: Vec<u8>,
}

/// Everything [`Uplink::run`] keeps while it runs.
struct Driver<S: Spool> {
    up: Uplink<S>,
    client: AsyncClient,
    events: mpsc::Receiver<Result<Event, ConnectionError>>,
    resume: mpsc::Sender<()>,
    spool_rx: watch::Receiver<SpoolState>,
    holds: Holds,
    /// What each published batch carried: the most an ack of it may delete.
    ledger: Ledger,
    ids: BatchIds,
    deferred: VecDeque<Control>,
    /// Dispatched commands waiting for their result (at most [`MAX_COMMANDS_IN_PROGRESS`]).
    in_progress: JoinSet<CommandResult>,
    /// Consecutive failed attempts, for the back-off.
    attempt: u32,
    /// Batches rejected in a row, for their hold ([`reject_hold`]).
    rejections: u32,
    online: bool,
    /// False once the clock watch's sender is gone (its branch would fire forever).
    clock_open: bool,
    /// When to read the outbox again after a read error or a full request queue.
    retry_at: Option<Instant>,
}

type Shutdown<'a, F> = Pin<&'a mut F>;

impl<S: Spool> Driver<S> {
    fn new(
        up: Uplink<S>,
        client: AsyncClient,
        events: mpsc::Receiver<Result<Event, ConnectionError>>,
        resume: mpsc::Sender<()>,
    ) -> Driver<S> {
        let spool_rx = up.spool.watch();
        let ledger = Ledger::new(
            up.cfg
                .max_inflight_batches
                .saturating_mul(LEDGER_PER_INFLIGHT),
        );
        Driver {
            up,
            client,
            events,
            resume,
            spool_rx,
            holds: Holds::default(),
            rejections: 0,
            ledger,
            ids: BatchIds::new(),
            deferred: VecDeque::new(),
            in_progress: JoinSet::new(),
            attempt: 0,
            online: false,
            clock_open: true,
            retry_at: None,
        }
    }

    // ---- States ----

    async fn connecting<F: Future<Output = ()>>(
        &mut self,
        mut shutdown: Shutdown<'_, F>,
    ) -> Result<State, UplinkError> {
        loop {
            self.up.heartbeat.beat();
            tokio::select! {
                biased;
                _ = shutdown.as_mut() => return Ok(State::Stopped),
                _ = tokio::time::sleep(self.up.heartbeat.every()) => {}
                ev = self.events.recv() => match ev {
                    None => return Err(UplinkError::TransportStopped),
                    Some(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                        self.up.metrics.connects.get_or_create(&Metrics::kind("ok")).inc();
                        self.up.metrics.connected.set(1);
                        info!(broker = %self.up.broker, "connected");
                        return Ok(State::Online);
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Ok(self.attempt_failed(&e)),
                },
                Some(r) = self.in_progress.join_next(), if !self.in_progress.is_empty() => {
                    self.command_finished(r);
                }
            }
        }
    }

    async fn backoff<F: Future<Output = ()>>(
        &mut self,
        delay: Duration,
        mut shutdown: Shutdown<'_, F>,
    ) -> Result<State, UplinkError> {
        let until = Instant::now() + delay;
        loop {
            self.up.heartbeat.beat();
            tokio::select! {
                biased;
                _ = shutdown.as_mut() => return Ok(State::Stopped),
                _ = tokio::time::sleep(self.up.heartbeat.every()) => {}
                _ = sleep_until(until) => {
                    return match self.resume.send(()).await {
                        Ok(()) => Ok(State::Connecting),
                        Err(_) => Err(UplinkError::TransportStopped),
                    };
                }
                Some(r) = self.in_progress.join_next(), if !self.in_progress.is_empty() => {
                    self.command_finished(r);
                }
            }
        }
    }

    async fn online<F: Future<Output = ()>>(
        &mut self,
        mut shutdown: Shutdown<'_, F>,
    ) -> Result<State, UplinkError> {
        let since = Instant::now();
        self.online = true;
        self.subscribe();
        let state = *self.spool_rx.borrow_and_update();
        let mut generation = state.generation;
        let mut flow = Flow::new(self.flow_config(), state.committed, since);
        info!(
            site = %self.up.site,
            boundary = %flow.boundary(),
            "sending live records first, the backlog behind them"
        );
        self.publish_status().await?;
        let period = Duration::from_secs(self.up.cfg.status_interval_s);
        let mut status_tick = tokio::time::interval_at(since + period, period);
        status_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let next = loop {
            self.up.heartbeat.beat();
            self.pump(&mut flow).await?;
            // Wake at least once per beat interval: a quiet connection is alive too.
            let beat_due = Instant::now() + self.up.heartbeat.every();
            let wake = [
                flow.next_deadline(&self.holds),
                self.retry_at,
                Some(beat_due),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(beat_due);
            let sleep = sleep_until(wake);
            tokio::select! {
                biased;
                _ = shutdown.as_mut() => {
                    self.goodbye().await;
                    break State::Stopped;
                }
                ev = self.events.recv() => match ev {
                    None => return Err(UplinkError::TransportStopped),
                    Some(Ok(Event::Incoming(Packet::Publish(p)))) => {
                        self.on_publish(&p.topic, &p.payload, &mut flow).await?;
                    }
                    Some(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                        // Not expected (the event-loop task waits after an error), but if the
                        // transport did reconnect, the clean session lost our subscriptions.
                        self.subscribe();
                        flow = Flow::new(self.flow_config(), self.spool_rx.borrow().committed, Instant::now());
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        self.up.metrics.connected.set(0);
                        if since.elapsed() >= STABLE_AFTER {
                            self.attempt = 0;
                        }
                        let delay = self.next_delay();
                        warn!(
                            broker = %self.up.broker, error = %e, retry_in_ms = delay.as_millis() as u64,
                            in_flight = flow.inflight_len(),
                            "connection lost; unacknowledged records stay in the outbox"
                        );
                        break State::Backoff(delay);
                    }
                },
                changed = self.spool_rx.changed() => {
                    if changed.is_err() {
                        return Err(UplinkError::OutboxStopped);
                    }
                    let s = *self.spool_rx.borrow_and_update();
                    if s.generation != generation {
                        generation = s.generation;
                        info!(generation, "outbox released held records; rescanning from the start");
                        flow.rescan(s.committed);
                    }
                }
                _ = sleep => {}
                _ = status_tick.tick() => self.publish_status().await?,
                changed = self.up.clock_trusted.changed(), if self.clock_open => {
                    match changed {
                        Ok(()) => self.publish_status().await?,
                        Err(_) => self.clock_open = false,
                    }
                }
                Some(r) = self.in_progress.join_next(), if !self.in_progress.is_empty() => {
                    self.command_finished(r);
                }
            }
        };
        self.online = false;
        Ok(next)
    }

    // ---- Connection ----

    fn flow_config(&self) -> FlowConfig {
        let c = &self.up.cfg;
        FlowConfig {
            max_records: c.batch_max_records,
            max_age: Duration::from_millis(c.batch_max_age_ms),
            rate: c.backlog_rate,
            max_inflight: c.max_inflight_batches,
            ack_timeout: Duration::from_secs(c.ack_timeout_s),
        }
    }

    fn subscribe(&mut self) {
        let filters = [TopicKind::Ack, TopicKind::Command, TopicKind::DesiredConfig]
            .map(|k| SubscribeFilter::new(topic::topic(&self.up.site, k), QoS::AtLeastOnce));
        if let Err(e) = self.client.try_subscribe_many(filters) {
            // Only a full request queue gets here, right after a CONNACK: the connection is
            // unusable, and the keep-alive will notice.
            error!(error = %e, "could not subscribe to the ack and command topics");
        }
    }

    /// Classifies a failed connection attempt, logs and counts it, and picks the back-off.
    fn attempt_failed(&mut self, e: &ConnectionError) -> State {
        let delay = self.next_delay();
        let retry_in_ms = delay.as_millis() as u64;
        let broker = &self.up.broker;
        let kind = match e {
            ConnectionError::ConnectionRefused(code) => {
                error!(
                    %broker, code = ?code, retry_in_ms,
                    "broker refused the connection; check uplink.username, uplink.password and client_id"
                );
                "refused"
            }
            // MQTT 3.1.1 lets a broker close the connection instead of sending a CONNACK with a
            // refusal code; rumqttd does so for bad credentials.
            ConnectionError::MqttState(StateError::ConnectionAborted) => {
                error!(
                    %broker, code = "none (connection closed before CONNACK)", retry_in_ms,
                    "broker refused the connection; check uplink.username, uplink.password and client_id"
                );
                "refused"
            }
            ConnectionError::Tls(tls) => {
                error!(%broker, error = %tls, retry_in_ms, "TLS handshake with the broker failed; check uplink.ca_file and the client certificate");
                "error"
            }
            other => {
                warn!(%broker, error = %other, retry_in_ms, "could not connect to the broker");
                "error"
            }
        };
        self.up
            .metrics
            .connects
            .get_or_create(&Metrics::kind(kind))
            .inc();
        State::Backoff(delay)
    }

    /// Exponential back-off with full jitter: uniform between the minimum and
    /// `min * 2^attempt`, capped at the maximum.
    fn next_delay(&mut self) -> Duration {
        let min = self.up.cfg.reconnect_min_ms;
        let max = self.up.cfg.reconnect_max_ms.max(min);
        let cap = min.saturating_mul(1u64 << self.attempt.min(32)).min(max);
        self.attempt = self.attempt.saturating_add(1);
        Duration::from_millis(fastrand::u64(min..=cap))
    }

    /// On shutdown: the retained status goes offline (a clean DISCONNECT does not fire the last
    /// will), then DISCONNECT, waiting a little for both to leave.
    async fn goodbye(&mut self) {
        let offline = Status::offline(self.up.site.clone()).encode();
        let status = topic::topic(&self.up.site, TopicKind::Status);
        let sent = self
            .client
            .try_publish(status, QoS::AtLeastOnce, true, offline)
            .and_then(|()| self.client.try_disconnect());
        if sent.is_err() {
            return;
        }
        let _ = tokio::time::timeout(GOODBYE_TIMEOUT, async {
            while let Some(ev) = self.events.recv().await {
                match ev {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        info!(broker = %self.up.broker, "disconnected");
    }

    // ---- Sending ----

    /// Publishes every batch that is due, as far as the in-flight window allows.
    async fn pump(&mut self, flow: &mut Flow) -> Result<(), UplinkError> {
        let now = Instant::now();
        for id in flow.expire(&mut self.holds, now) {
            debug!(batch = %id, "no acknowledgement in time; sending what is still pending again");
        }
        self.flush_deferred();
        if self.retry_at.is_some_and(|t| now < t) {
            return Ok(());
        }
        self.retry_at = None;
        loop {
            let committed = self.spool_rx.borrow().committed;
            let out = match flow.next(&self.up.spool, committed, &self.holds, now).await {
                Ok(Some(out)) => out,
                Ok(None) => return Ok(()),
                Err(OutboxError::Stopped) => return Err(UplinkError::OutboxStopped),
                Err(e) => {
                    error!(error = %e, "could not read pending records from the outbox; retrying");
                    self.retry_at = Some(now + OUTBOX_RETRY);
                    return Ok(());
                }
            };
            let id = self.ids.next();
            let mut raw = RawBatch::new();
            for r in &out.records {
                raw.push(r.kind, &r.json);
            }
            let payload = raw.finish(&self.up.site, &id, chrono::Utc::now());
            let t = topic::topic(&self.up.site, TopicKind::Telemetry);
            match self.client.try_publish(t, QoS::AtLeastOnce, false, payload) {
                Ok(()) => {
                    let n = out.records.len() as u64;
                    self.up.metrics.sent.inc_by(n);
                    debug!(batch = %id, records = n, class = out.class.as_str(), "batch published");
                    self.ledger
                        .sent(id.clone(), out.records.iter().map(|r| r.seq).collect());
                    flow.sent(id, &out.records, out.class, Instant::now());
                }
                Err(_) => {
                    // The request queue is full: the event loop is behind. Try again shortly
                    // (not at once: the batch's records are due and would wake the loop at once).
                    flow.unsent(&out.records);
                    self.retry_at = Some(now + QUEUE_FULL_RETRY);
                    return Ok(());
                }
            }
        }
    }

    /// Publishes a control message now, or queues it for when there is room.
    fn send_control(&mut self, topic: String, retain: bool, payload: Vec<u8>) {
        self.deferred.push_back(Control {
            topic,
            retain,
            payload,
        });
        if self.deferred.len() > DEFERRED_CAP
            && let Some(dropped) = self.deferred.pop_front()
        {
            warn!(topic = %dropped.topic, "control message queue full; dropped the oldest");
        }
        self.flush_deferred();
    }

    fn flush_deferred(&mut self) {
        if !self.online {
            return;
        }
        while let Some(c) = self.deferred.pop_front() {
            let Control {
                topic,
                retain,
                payload,
            } = c;
            if let Err(e) =
                self.client
                    .try_publish(topic.clone(), QoS::AtLeastOnce, retain, payload)
            {
                let payload = match e {
                    rumqttc::ClientError::Request(rumqttc::Request::Publish(p))
                    | rumqttc::ClientError::TryRequest(rumqttc::Request::Publish(p)) => {
                        p.payload.to_vec()
                    }
                    _ => return,
                };
                self.deferred.push_front(Control {
                    topic,
                    retain,
                    payload,
                });
                return;
            }
        }
    }

    async fn publish_status(&mut self) -> Result<(), UplinkError> {
        let stats = match self.up.spool.stats().await {
            Ok(s) => Some(s),
            Err(OutboxError::Stopped) => return Err(UplinkError::OutboxStopped),
            Err(e) => {
                warn!(error = %e, "outbox figures unavailable for the status");
                None
            }
        };
        let now = chrono::Utc::now();
        let status = Status {
            v: SCHEMA_VERSION,
            site: self.up.site.clone(),
            online: true,
            ts: Some(now),
            agent_version: Some(self.up.agent_version.clone()),
            config_version: Some(self.up.config_version.clone()),
            backlog: stats.as_ref().map(|s| s.backlog),
            oldest_unsent_age_s: stats
                .as_ref()
                .and_then(|s| s.oldest)
                .map(|t| (now - t).num_seconds().max(0) as u64),
            clock_synced: Some(*self.up.clock_trusted.borrow()),
            evicted: stats.as_ref().map(|s| s.evicted_total),
            devices: self.up.devices.borrow().clone(),
        };
        let t = topic::topic(&self.up.site, TopicKind::Status);
        // An older status still waiting is superseded by this one.
        self.deferred.retain(|c| c.topic != t);
        self.send_control(t, true, status.encode());
        Ok(())
    }

    // ---- Receiving ----

    async fn on_publish(
        &mut self,
        topic_name: &str,
        payload: &[u8],
        flow: &mut Flow,
    ) -> Result<(), UplinkError> {
        let t = match Topic::parse(topic_name) {
            Ok(t) => t,
            Err(e) => {
                self.bad_payload("topic");
                warn!(topic = topic_name, error = %e, "message on a topic the uplink does not know");
                return Ok(());
            }
        };
        if t.site != self.up.site {
            self.bad_payload(t.kind.suffix());
            warn!(topic = topic_name, "message for another site; ignored");
            return Ok(());
        }
        match t.kind {
            TopicKind::Ack => self.on_ack(payload, flow).await,
            TopicKind::Command => self.on_command(payload).await,
            TopicKind::DesiredConfig => {
                self.on_desired(payload);
                Ok(())
            }
            other => {
                debug!(topic = topic_name, kind = other.suffix(), "ignoring");
                Ok(())
            }
        }
    }

    fn bad_payload(&self, kind: &str) {
        self.up
            .metrics
            .bad_payloads
            .get_or_create(&Metrics::kind(kind))
            .inc();
    }

    async fn on_ack(&mut self, payload: &[u8], flow: &mut Flow) -> Result<(), UplinkError> {
        let ack: Ack = match decode(payload) {
            Ok(a) => a,
            Err(e) => {
                self.bad_payload("ack");
                warn!(error = %e, "undecodable ack; ignored");
                return Ok(());
            }
        };
        if ack.site != self.up.site {
            self.refuse_ack("other_site");
            warn!(batch = %ack.batch, ack_site = %ack.site, reason = "other_site",
                "ack names another site; refused, nothing deleted");
            return Ok(());
        }
        let now = Instant::now();
        match ack.status {
            AckStatus::Accepted => {
                // Only what the named batch carried may be deleted (see `ledger`).
                let delete = match self.ledger.accept(&ack.batch, &ack.seqs) {
                    Checked::UnknownBatch => {
                        self.refuse_ack("unknown_batch");
                        warn!(batch = %ack.batch, reason = "unknown_batch",
                            "ack for a batch this agent did not send (or no longer remembers); nothing deleted");
                        return Ok(());
                    }
                    Checked::Settled => {
                        debug!(batch = %ack.batch, "repeated ack of a settled batch; nothing more to delete");
                        return Ok(());
                    }
                    Checked::Known { delete, outside } => {
                        if outside {
                            self.refuse_ack("outside_batch");
                            warn!(batch = %ack.batch, reason = "outside_batch",
                                "ack lists seqs the batch did not carry; only the batch's own are deleted");
                        }
                        if delete.is_empty() {
                            // Nothing the batch carried: it stays in flight for its real ack.
                            return Ok(());
                        }
                        delete
                    }
                };
                let entry = flow.take(&ack.batch);
                let deleted = match self.up.spool.ack(delete).await {
                    Ok(n) => n,
                    Err(OutboxError::Stopped) => return Err(UplinkError::OutboxStopped),
                    Err(e) => {
                        error!(batch = %ack.batch, error = %e,
                            "could not delete acknowledged records; they will be sent again");
                        if let Some(f) = entry {
                            flow.requeue(SeqRange::compact(f.seqs));
                        }
                        return Ok(());
                    }
                };
                self.up.metrics.acked.inc_by(deleted);
                let Some(f) = entry else {
                    debug!(batch = %ack.batch, deleted, "ack for a batch no longer in flight (late or repeated)");
                    return Ok(());
                };
                self.rejections = 0;
                let latency = now.saturating_duration_since(f.sent);
                self.up.metrics.ack_latency.observe(latency.as_secs_f64());
                let missing: Vec<Seq> = f
                    .seqs
                    .iter()
                    .copied()
                    .filter(|s| !ack.seqs.iter().any(|r| r.contains(*s)))
                    .collect();
                if !missing.is_empty() {
                    warn!(batch = %ack.batch, missing = missing.len(), hold_s = REJECT_HOLD.as_secs(),
                        "ack does not list every record of the batch; holding the rest back");
                    self.holds
                        .hold(SeqRange::compact(missing), now + REJECT_HOLD);
                }
                debug!(batch = %ack.batch, deleted, latency_ms = latency.as_millis() as u64,
                    class = f.class.as_str(), "batch acknowledged");
            }
            AckStatus::Rejected => {
                self.ledger.take(&ack.batch);
                let entry = flow.take(&ack.batch);
                self.up.metrics.rejected_batches.inc();
                let reason = ack.reason.as_deref().unwrap_or("no reason given");
                match entry {
                    Some(f) => {
                        self.rejections = self.rejections.saturating_add(1);
                        let hold = reject_hold(self.rejections);
                        warn!(batch = %ack.batch, records = f.seqs.len(), reason,
                            hold_s = hold.as_secs(), in_a_row = self.rejections,
                            "cloud rejected the batch; its records stay in the outbox and are retried later");
                        self.holds.hold(SeqRange::compact(f.seqs), now + hold);
                    }
                    None => {
                        warn!(batch = %ack.batch, reason, "cloud rejected a batch not in flight");
                    }
                }
            }
        }
        Ok(())
    }

    /// Counts an ack that named something this agent did not send in that batch.
    fn refuse_ack(&self, reason: &str) {
        self.up
            .metrics
            .acks_refused
            .get_or_create(&Metrics::reason(reason))
            .inc();
    }

    fn on_desired(&mut self, payload: &[u8]) {
        match decode::<DesiredConfig>(payload) {
            Ok(d) => {
                info!(version = %d.version, "desired configuration received");
                self.up.desired.send_replace(Some(d));
            }
            Err(e) => {
                self.bad_payload(TopicKind::DesiredConfig.suffix());
                warn!(error = %e, "undecodable desired configuration; ignored");
            }
        }
    }

    async fn on_command(&mut self, payload: &[u8]) -> Result<(), UplinkError> {
        let cmd: Command = match decode(payload) {
            Ok(c) => c,
            Err(e) => {
                self.bad_payload("command");
                let id = serde_json::from_slice::<serde_json::Value>(payload)
                    .ok()
                    .and_then(|v| v.get("id")?.as_str().map(str::to_string));
                match id {
                    Some(id) => {
                        warn!(command = %id, error = %e, "command not understood");
                        let r = command::result(
                            &self.up.site,
                            &id,
                            Err(CommandError::NotUnderstood(e)),
                        );
                        self.send_result(r);
                    }
                    None => warn!(error = %e, "undecodable command without an id; no result sent"),
                }
                return Ok(());
            }
        };
        info!(command = %cmd.id, kind = ?cmd.kind, "command received");
        match Executor::of(&cmd.kind) {
            Executor::Uplink(UplinkCommand::Ping) => {
                let r = command::result(&self.up.site, &cmd.id, Ok(serde_json::Value::Null));
                self.send_result(r);
            }
            Executor::Uplink(UplinkCommand::PublishStatus) => {
                self.publish_status().await?;
                let r = command::result(&self.up.site, &cmd.id, Ok(serde_json::Value::Null));
                self.send_result(r);
            }
            Executor::Dispatched(_) => self.dispatch(cmd),
        }
        Ok(())
    }

    /// Hands a command to the commands task; its result is published when it comes back. No
    /// timeout here: the commands task answers within [`command::COMMAND_TIMEOUT`].
    fn dispatch(&mut self, cmd: Command) {
        let site = self.up.site.clone();
        let id = cmd.id.clone();
        if self.in_progress.len() >= MAX_COMMANDS_IN_PROGRESS {
            self.send_result(command::result(&site, &id, Err(CommandError::Busy)));
            return;
        }
        let (reply, answer) = oneshot::channel();
        let refused = match self.up.commands.try_send(CommandRequest {
            command: cmd,
            reply,
        }) {
            Ok(()) => {
                self.in_progress.spawn(async move {
                    answer
                        .await
                        .unwrap_or_else(|_| command::result(&site, &id, Err(CommandError::Dropped)))
                });
                return;
            }
            Err(mpsc::error::TrySendError::Full(_)) => CommandError::QueueFull,
            Err(mpsc::error::TrySendError::Closed(_)) => CommandError::NoExecutor,
        };
        self.send_result(command::result(&site, &id, Err(refused)));
    }

    fn command_finished(&mut self, r: Result<CommandResult, tokio::task::JoinError>) {
        match r {
            Ok(result) => self.send_result(result),
            Err(e) => error!(error = %e, "command task failed"),
        }
    }

    fn send_result(&mut self, r: CommandResult) {
        if !r.ok {
            debug!(command = %r.id, error = ?r.error, "command failed");
        }
        let t = topic::topic(&self.up.site, TopicKind::CommandResult);
        self.send_control(t, false, r.encode());
    }
}
