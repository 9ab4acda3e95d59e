//! The running agent: creates every channel and spawns every task, so the whole flow reads in
//! one place.
//!
//! ```text
//! [bus pollers] --PollOutput (bounded)--> [store] --append--> [outbox thread]
//! [clock guard] --ClockChange-----------> [clock] --restamp-->      |  watch(committed)
//! [uplink] <--pending/ack------------------------------------------+
//! [uplink] --CommandRequest (bounded)--> [commands] --PollNow (bounded)--> [bus poller]
//! [uplink] <--CommandResult (oneshot), within COMMAND_TIMEOUT--+        (see crate::command)
//! [watchdog] reads the heartbeats of the pollers, the store task and the uplink
//! ```
//!
//! Under systemd (`Type=notify`): `READY=1` once the outbox is open and every task runs,
//! `WATCHDOG=1` while every live loop beats (see [`crate::watchdog`]), `STOPPING=1` at shutdown.
//!
//! Shutdown order: pollers stop first, the store task commits what they produced, the uplink
//! publishes its offline status and disconnects, the other tasks (clock, commands, metrics,
//! watchdog) stop, then the outbox closes. Nothing committed is ever lost by stopping: what is
//! not acknowledged stays in the outbox for the next start.

use crate::clock::{Clock, ClockChange, ClockGuard, SystemTimeSource, TimeSource};
use crate::command::{self, CommandRequest, Commands};
use crate::config::{AgentConfig, Site};
use crate::identity::{Identity, IdentityError, state_dir};
use crate::metrics::{self, Metrics};
use crate::outbox::{Outbox, OutboxError, OutboxHandle, Stamped};
use crate::poller::{BusPoller, PollNow, PollOutput};
use crate::uplink::{Uplink, UplinkError};
use crate::watchdog::{self, Heartbeat, Liveness, Watchdog};
use caudal_common::{DeviceId, Event, EventKind, Gap, GapCause, Reading, Seq};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

/// Most poll outputs waiting for the store task; a full queue makes pollers wait.
const STORE_QUEUE: usize = 64;
/// A failed outbox write is retried after this long (the records stay in memory meanwhile and
/// the pollers wait behind them).
const STORE_RETRY: Duration = Duration::from_secs(1);
/// Failed outbox writes in a row after which the store task stops beating its heartbeat, so
/// the watchdog (when one is configured) has the agent restarted: a write failing this long
/// (an I/O error, a corrupt page) is not going to mend itself in this process, and a restart
/// reopens the file (or sets an unreadable one aside). The writes go on being retried.
pub const STORE_MAX_TRIES: u32 = 30;
/// `poll_now` requests waiting for one bus poller; a full queue makes the commands task wait
/// (within the command's timeout).
const POLL_NOW_QUEUE: usize = 4;

/// Why the agent could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("system clock: {0}")]
    Clock(#[from] crate::clock::ClockError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error(transparent)]
    Uplink(#[from] UplinkError),
    #[error("metrics address {addr:?}: {reason}")]
    Metrics { addr: String, reason: String },
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(
    config: AgentConfig,
    site: Site,
    config_version: String,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let metrics = Metrics::new();
    let watchdog_period = watchdog::configured();
    let liveness = Liveness::new(watchdog_period);
    if let Some(dir) = site.outbox_path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| DaemonError::DataDir {
            path: dir.display().to_string(),
            source,
        })?;
    }

    // The site's identity: created on the first start, never replaced (`identity`).
    let (identity, created) = Identity::load_or_create(state_dir(&site.outbox_path))?;
    if created {
        tracing::warn!(public_key = %identity.public(), path = %identity.path().display(),
            "created this agent's key; enroll its public key with the cloud (site add --public-key)");
    } else {
        tracing::info!(public_key = %identity.public(), "agent identity loaded");
    }

    // Clock first: the outbox picks its epoch from whether the clock can be trusted.
    let source: Arc<dyn TimeSource> = Arc::new(SystemTimeSource::new()?);
    let (trusted_tx, trusted_rx) = watch::channel(false);
    let (changes_tx, changes_rx) = mpsc::channel(16);
    let guard = ClockGuard::new(
        &config.clock,
        source.clone(),
        metrics.clone(),
        trusted_tx,
        changes_tx,
    );
    let clock = Clock::new(source, trusted_rx.clone());

    // An unreadable outbox file is moved aside rather than stopping the agent for good: the
    // records it held are lost either way, the ones still to come are not.
    let (outbox, set_aside) =
        Outbox::open_or_set_aside(&site.outbox_path, &config.outbox, *trusted_rx.borrow())?;
    let outbox = OutboxHandle::spawn(outbox.with_metrics(metrics.clone()))?;
    let last_readings = last_readings(&outbox).await?;
    let (started_at, stamp) = clock.stamp();
    let mut first = Vec::with_capacity(2);
    if let Some(aside) = &set_aside {
        first.push(Stamped::new(outbox_lost(aside, started_at), stamp.clone()));
    }
    first.push(Stamped::new(
        Event {
            seq: Seq(0),
            ts: started_at,
            device: None,
            kind: EventKind::AgentStarted,
            message: format!("caudal-agent {} started", env!("CARGO_PKG_VERSION")),
            previous: None,
            current: None,
            wrap: None,
        },
        stamp,
    ));
    outbox.append(first, vec![]).await?;

    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(guard.run(stop.clone().cancelled_owned()));

    // Pollers → store.
    let (store_tx, store_rx) = mpsc::channel::<PollOutput>(STORE_QUEUE);
    let (states_tx, states_rx) = watch::channel(BTreeMap::new());
    let states = Arc::new(states_tx);
    let poll_stop = CancellationToken::new();
    let mut pollers = tokio::task::JoinSet::new();
    let mut routes: BTreeMap<DeviceId, mpsc::Sender<PollNow>> = BTreeMap::new();
    for bus in site.buses.iter().cloned() {
        let bus_name = bus.name.clone();
        let (req_tx, req_rx) = mpsc::channel(POLL_NOW_QUEUE);
        for d in &bus.devices {
            routes.insert(d.id.clone(), req_tx.clone());
        }
        let poller = BusPoller::new(
            bus,
            store_tx.clone(),
            states.clone(),
            clock.clone(),
            metrics.clone(),
            req_rx,
            &last_readings,
        )
        .with_heartbeat(liveness.register(format!("poller:{bus_name}")));
        pollers.spawn(poller.run(poll_stop.clone().cancelled_owned()));
    }
    drop(store_tx);
    let store = tokio::spawn(store(
        outbox.clone(),
        store_rx,
        metrics.clone(),
        liveness.register("store"),
    ));
    tasks.spawn(clock_changes(
        changes_rx,
        outbox.clone(),
        clock.clone(),
        metrics.clone(),
    ));

    // Commands from the cloud the uplink does not answer itself (`poll_now`, ...).
    let (cmd_tx, cmd_rx) = mpsc::channel::<CommandRequest>(command::QUEUE);
    let commands = Commands::new(site.id.clone(), cmd_rx, routes);
    tasks.spawn(commands.run(stop.clone().cancelled_owned()));

    let uplink = Uplink::new(
        config.uplink.clone(),
        site.id.clone(),
        outbox.clone(),
        states_rx,
        trusted_rx,
        cmd_tx,
        metrics.clone(),
        (env!("CARGO_PKG_VERSION").to_string(), config_version),
    )?
    .with_heartbeat(liveness.register("uplink"))
    .with_identity(identity);
    if config.uplink.cloud_public_key.is_none() {
        tracing::warn!(
            "uplink.cloud_public_key is not set: acks, commands and desired configuration are \
             taken unsigned; set it to the key `caudal-cloud signing-key` prints"
        );
    }
    let uplink_stop = CancellationToken::new();
    let uplink = tokio::spawn(uplink.run(uplink_stop.clone().cancelled_owned()));

    let addr = config.metrics.addr().map_err(|e| DaemonError::Metrics {
        addr: config.metrics.listen.clone(),
        reason: e.to_string(),
    })?;
    if let Some(addr) = addr {
        let listener = metrics::bind(addr)
            .await
            .map_err(|e| DaemonError::Metrics {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?;
        tracing::info!(addr = %listener.local_addr().unwrap_or(addr), "metrics endpoint listening");
        let m = metrics.clone();
        let s = stop.clone();
        tasks.spawn(async move {
            if let Err(e) = metrics::serve(listener, m, s.cancelled_owned()).await {
                tracing::warn!(error = %e, "metrics endpoint stopped");
            }
        });
    }

    tracing::info!(
        site = %site.id,
        buses = site.buses.len(),
        devices = site.buses.iter().map(|b| b.devices.len()).sum::<usize>(),
        outbox = %site.outbox_path.display(),
        watchdog_s = watchdog_period.map(|d| d.as_secs_f64()),
        "agent running"
    );
    if let Some(period) = watchdog_period {
        tasks.spawn(Watchdog::new(liveness, period).run(stop.clone().cancelled_owned()));
    }
    watchdog::ready();
    shutdown.await;
    tracing::info!("shutting down");
    watchdog::stopping();

    poll_stop.cancel();
    while pollers.join_next().await.is_some() {}
    // The pollers' senders are gone: the store task commits what is queued and ends.
    let _ = store.await;
    uplink_stop.cancel();
    match uplink.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "uplink stopped with an error"),
        Err(e) => tracing::warn!(error = %e, "uplink task failed"),
        Ok(Ok(())) => {}
    }
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    outbox.shutdown().await?;
    tracing::info!("stopped");
    Ok(())
}

/// The last reading of each device, kept by the outbox, to seed validation.
async fn last_readings(outbox: &OutboxHandle) -> Result<BTreeMap<DeviceId, Reading>, OutboxError> {
    let mut out = BTreeMap::new();
    for row in outbox.device_status().await? {
        if let Some(json) = row.last_reading {
            match serde_json::from_str::<Reading>(&json) {
                Ok(r) => {
                    out.insert(row.device, r);
                }
                Err(e) => {
                    tracing::warn!(device = %row.device, error = %e, "stored last reading unreadable; validation starts fresh")
                }
            }
        }
    }
    Ok(out)
}

/// The gap record saying that an outbox file moved aside took an unknown range of records
/// with it, up to `now`.
fn outbox_lost(aside: &crate::outbox::SetAside, now: chrono::DateTime<chrono::Utc>) -> Gap {
    Gap {
        seq: Seq(0),
        device: None,
        from: aside.modified.filter(|m| *m <= now).unwrap_or(now),
        to: now,
        seqs: None,
        count: 0,
        cause: GapCause::OutboxLost,
    }
}

/// Commits poll outputs, grouping whatever is queued into one append. A failed write is retried
/// (the pollers wait behind it) rather than dropped: these readings exist nowhere else. Beats
/// `heartbeat` while idle and between attempts; an append that never returns (a wedged outbox
/// thread), or [`STORE_MAX_TRIES`] failed in a row, stops the beats.
async fn store(
    outbox: OutboxHandle,
    mut rx: mpsc::Receiver<PollOutput>,
    metrics: Arc<Metrics>,
    heartbeat: Heartbeat,
) {
    let mut buf = Vec::new();
    loop {
        heartbeat.beat();
        // `recv_many` is cancel-safe: a timeout loses nothing.
        match tokio::time::timeout(heartbeat.every(), rx.recv_many(&mut buf, STORE_QUEUE)).await {
            Err(_) => continue,
            Ok(0) => return,
            Ok(_) => {}
        }
        let mut records = Vec::new();
        let mut statuses = Vec::new();
        for out in buf.drain(..) {
            records.extend(out.records);
            statuses.push(out.status);
        }
        let mut failed = 0u32;
        loop {
            match outbox.append(records.clone(), statuses.clone()).await {
                Ok(_) => break,
                Err(OutboxError::Stopped) => {
                    tracing::error!(
                        records = records.len(),
                        "outbox stopped; readings not stored"
                    );
                    return;
                }
                Err(e) => {
                    metrics
                        .store_errors
                        .get_or_create(&Metrics::kind("append"))
                        .inc();
                    failed = failed.saturating_add(1);
                    if failed < STORE_MAX_TRIES {
                        tracing::error!(error = %e, records = records.len(), failed, "storing readings failed; retrying");
                        heartbeat.beat();
                    } else if failed == STORE_MAX_TRIES {
                        tracing::error!(error = %e, records = records.len(), failed,
                            "storing readings failed {STORE_MAX_TRIES} times in a row; no longer telling the watchdog \
                             all is well, so the service manager restarts the agent");
                    }
                    tokio::time::sleep(STORE_RETRY).await;
                }
            }
        }
    }
}

/// Re-stamps held readings when the clock becomes trustworthy and records clock events.
async fn clock_changes(
    mut rx: mpsc::Receiver<ClockChange>,
    outbox: OutboxHandle,
    clock: Clock,
    metrics: Arc<Metrics>,
) {
    while let Some(change) = rx.recv().await {
        let mut event = change.event();
        if let ClockChange::Trusted {
            boot_id,
            wall_minus_boottime_ms,
            ..
        } = &change
        {
            match outbox.restamp(boot_id, *wall_minus_boottime_ms).await {
                Ok(r) => {
                    metrics.restamped.inc_by(r.restamped);
                    tracing::info!(
                        restamped = r.restamped,
                        time_unknown = r.time_unknown,
                        "clock trusted; held records released"
                    );
                    event.current = Some(r.restamped as f64);
                }
                Err(e) => tracing::error!(error = %e, "re-stamping held records failed"),
            }
        }
        let (_, stamp) = clock.stamp();
        if let Err(e) = outbox
            .append(vec![Stamped::new(event, stamp)], vec![])
            .await
        {
            tracing::warn!(error = %e, "clock event not stored");
        }
    }
}
