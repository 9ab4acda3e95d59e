//! The bus scheduler: one task per physical bus polls its devices, one at a time.
//!
//! Devices on one RS-485 line share the wire, so a bus task sends one request, waits for the
//! answer (or the device's timeout), keeps the configured inter-frame gap, and only then talks
//! to the next device. Separate buses have separate tasks and run in parallel.
//!
//! Polls align to the wall clock: a device with a 60 s period is read at :00 of every minute,
//! so readings of different devices and sites line up, and a poll that ran late does not shift
//! the grid (the next one is due at the next boundary).
//!
//! **The bound on a dead device**: a request that gets no answer is never retried within the
//! poll, and the device's remaining blocks are not asked, so a device that does not answer
//! takes at most its configured timeout plus one inter-frame gap from the bus per poll, the
//! first poll after start included. Healthy devices behind it on the same line are read at most
//! that much after their slot. A failing device is also backed off (its period doubles up to a
//! cap). Retries are spent only on answers that may come out right when asked again (a
//! corrupted frame, a busy device). The link itself (TCP connection, serial port) is re-opened
//! on the next poll after it fails.
//!
//! **Timestamps**: a reading's `ts` is when the first reply carrying its data arrived, not when
//! the poll began (a slow device or a wait behind another one would make the value younger than
//! its stamp). A poll that read its device at or after the next boundary of its period has
//! slipped past its slot and its reading carries the `late` flag.
//!
//! **Every failed poll leaves a record**: a `poll_failed` event whose message starts with the
//! cause (`timeout`, `exception`, `bad_frame`, `io`). After [`UNREACHABLE_AFTER`] failures in a
//! row a `device_unreachable` event follows; when the device answers again, `device_recovered`
//! and a gap covering the silent time.
//!
//! **Holes**: a device that refuses (exception 02) a block read spanning registers between its
//! points is read point by point from then on ([`plan_reads_apart`]), logged once.
//!
//! Each poll produces a [`PollOutput`] for the store task: the reading (with the validator's
//! flags), any events, and the device's status row. The output channel is bounded: when the
//! outbox cannot keep up the bus task waits, so polls slip rather than readings being dropped.
//! Every record carries the [`ClockStamp`] it was taken under; whether that makes a reading
//! `clock_unsynced` is the outbox's rule (see [`Stamped::wire_json`]), not the poller's.
//!
//! A [`PollNow`] (the `poll_now` command, from [`crate::command`]) is served between slots: the
//! device is polled at once, the output goes to the store like any other, and the reading (or
//! why there is none) goes back to the requester.

use crate::clock::Clock;
use crate::config::{Bus, Device};
use crate::metrics::{DiscardLabels, FlagLabels, Metrics, PollLabels};
use crate::modbus::{BusClient, ModbusError};
use crate::outbox::{ClockStamp, DeviceStatusRow, Stamped};
use crate::register::{Channel, ReadBlock, assemble, plan_reads, plan_reads_apart};
use crate::validation::{Sample, Validator};
use crate::watchdog::Heartbeat;
use caudal_common::quality::Flag;
use caudal_common::{DeviceId, DeviceState, Event, EventKind, Gap, GapCause, Reading, Seq};
use chrono::{DateTime, TimeDelta, Utc};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// Consecutive failed polls after which a device is reported unreachable (event) and, when it
/// answers again, a `device_unreachable` gap covers the time it was silent.
pub const UNREACHABLE_AFTER: u32 = 3;
/// Longest back-off for a device that does not answer, unless its period is longer.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// What one poll of one device produced, for the store task.
#[derive(Debug)]
pub struct PollOutput {
    pub records: Vec<Stamped>,
    pub status: DeviceStatusRow,
}

/// A request to poll one device now (the `poll_now` command).
#[derive(Debug)]
pub struct PollNow {
    pub device: DeviceId,
    /// The reading as the outbox commits it (wire JSON, before its seq), or why there is none.
    pub reply: oneshot::Sender<Result<serde_json::Value, PollNowError>>,
}

/// Why a `poll_now` produced no reading.
#[derive(Debug, thiserror::Error)]
pub enum PollNowError {
    #[error("device {device} is not on bus {bus}")]
    NotOnBus { device: DeviceId, bus: String },
    /// The poll read nothing: the error the device's status row records.
    #[error("{0}")]
    Failed(String),
    #[error("reading not encodable: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Device states shared with the uplink's status.
pub type DeviceStates = watch::Sender<BTreeMap<String, DeviceState>>;

struct DeviceRun {
    device: Device,
    blocks: Vec<ReadBlock>,
    validator: Validator,
    next_due: DateTime<Utc>,
    failures: u32,
    /// Timestamp of the first failed poll of the current failure streak.
    failing_since: Option<DateTime<Utc>>,
    last_failed: Option<DateTime<Utc>>,
    /// The device refused a block read across a hole: its points are read apart from now on.
    apart: bool,
}

/// The scheduler of one bus.
pub struct BusPoller {
    bus: Bus,
    client: Option<BusClient>,
    devices: Vec<DeviceRun>,
    out: mpsc::Sender<PollOutput>,
    states: Arc<DeviceStates>,
    clock: Clock,
    metrics: Arc<Metrics>,
    requests: mpsc::Receiver<PollNow>,
    /// Beaten every time round the loop and after every request, answered or timed out.
    heartbeat: Heartbeat,
}

/// How one device poll ended, stamped when it ended: at the first reply that carried data (the
/// moment the device was read), or when the poll gave up.
struct Outcome {
    ts: DateTime<Utc>,
    stamp: ClockStamp,
    result: Result<(Reading, Vec<Event>), PollFailure>,
}

/// Why a poll read nothing.
#[derive(Debug, thiserror::Error)]
enum PollFailure {
    /// The first Modbus error of the poll.
    #[error(transparent)]
    Modbus(ModbusError),
    /// Every block that answered held registers that did not decode.
    #[error("bus {bus} device {device} (unit {unit}): no register decoded")]
    NothingDecoded {
        bus: String,
        device: DeviceId,
        unit: u8,
    },
}

impl PollFailure {
    /// The label of the failure in metrics and in the device's status: the Modbus error's kind
    /// (`timeout`, `exception`, `bad_frame`, `io`); registers that do not decode are a bad frame.
    fn label(&self) -> &'static str {
        match self {
            PollFailure::Modbus(e) => e.kind(),
            PollFailure::NothingDecoded { .. } => "bad_frame",
        }
    }
}

impl BusPoller {
    /// `last_readings` seeds each device's validator with the last reading the outbox kept, so a
    /// totalizer reset across an agent restart is still noticed.
    pub fn new(
        bus: Bus,
        out: mpsc::Sender<PollOutput>,
        states: Arc<DeviceStates>,
        clock: Clock,
        metrics: Arc<Metrics>,
        requests: mpsc::Receiver<PollNow>,
        last_readings: &BTreeMap<DeviceId, Reading>,
    ) -> BusPoller {
        let now = Utc::now();
        let devices = bus
            .devices
            .iter()
            .map(|d| {
                let mut validator = Validator::new(d.id.clone(), d.limits.clone(), rollover_m3(d));
                if let Some(r) = last_readings.get(&d.id) {
                    if let Err(e) = validator.seed(r) {
                        tracing::warn!(device = %d.id, error = %e, "last reading not used to seed validation");
                    }
                }
                DeviceRun {
                    blocks: plan_reads(&d.points, d.max_regs_per_read),
                    validator,
                    next_due: next_aligned(now, d.period),
                    failures: 0,
                    failing_since: None,
                    last_failed: None,
                    apart: false,
                    device: d.clone(),
                }
            })
            .collect();
        BusPoller {
            bus,
            client: None,
            devices,
            out,
            states,
            clock,
            metrics,
            requests,
            heartbeat: Heartbeat::unwatched(),
        }
    }

    /// Beats `heartbeat` for the watchdog while the poller makes progress.
    pub fn with_heartbeat(mut self, heartbeat: Heartbeat) -> BusPoller {
        self.heartbeat = heartbeat;
        self
    }

    /// Polls until `shutdown` resolves. Returns early only if the store task is gone.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        tracing::info!(bus = %self.bus.name, devices = self.devices.len(), "bus poller started");
        loop {
            self.heartbeat.beat();
            let now = Utc::now();
            self.repair_schedule(now);
            let Some(due) = self.devices.iter().map(|d| d.next_due).min() else {
                // A bus without devices: nothing to do but wait for shutdown.
                (&mut shutdown).await;
                return;
            };
            if due > now {
                // Wake at least once per beat interval: an idle bus is alive too.
                let wait = (due - now)
                    .to_std()
                    .unwrap_or_default()
                    .min(self.heartbeat.every());
                tokio::select! {
                    _ = &mut shutdown => return,
                    _ = tokio::time::sleep(wait) => continue,
                    Some(req) = self.requests.recv() => {
                        if !self.poll_now(req).await {
                            return;
                        }
                        continue;
                    }
                }
            }
            let mut order: Vec<usize> = (0..self.devices.len())
                .filter(|&i| self.devices[i].next_due <= now)
                .collect();
            order.sort_by_key(|&i| self.devices[i].next_due);
            for i in order {
                let slot = self.devices[i].next_due;
                let output = self.poll_device(i, Some(slot)).await;
                let run = &mut self.devices[i];
                let after = Utc::now();
                run.next_due = if run.failures == 0 {
                    next_aligned(after, run.device.period)
                } else {
                    next_aligned(
                        after + backoff(run.device.period, run.failures),
                        run.device.period,
                    )
                };
                if !self.send(output).await {
                    tracing::warn!(bus = %self.bus.name, "store task stopped; bus poller exits");
                    return;
                }
            }
        }
    }

    /// Hands a poll output to the store task, waiting while its queue is full (and beating
    /// meanwhile: a poller held back by a slow disk is not hung). `false` when the store task
    /// is gone.
    async fn send(&mut self, output: PollOutput) -> bool {
        loop {
            self.heartbeat.beat();
            match tokio::time::timeout(self.heartbeat.every(), self.out.reserve()).await {
                Ok(Ok(permit)) => {
                    permit.send(output);
                    return true;
                }
                Ok(Err(_)) => return false,
                Err(_) => {}
            }
        }
    }

    /// Handles a `poll_now` request; `false` when the store task is gone.
    async fn poll_now(&mut self, req: PollNow) -> bool {
        let Some(i) = self.devices.iter().position(|d| d.device.id == req.device) else {
            let _ = req.reply.send(Err(PollNowError::NotOnBus {
                device: req.device,
                bus: self.bus.name.clone(),
            }));
            return true;
        };
        let output = self.poll_device(i, None).await;
        let answer = match &output.status.last_reading {
            Some(json) => serde_json::from_str(json).map_err(PollNowError::from),
            None => Err(PollNowError::Failed(
                output
                    .status
                    .last_error
                    .clone()
                    .unwrap_or_else(|| output.status.result.clone()),
            )),
        };
        let _ = req.reply.send(answer);
        self.send(output).await
    }

    /// A clock step (NTP correcting a 1970 boot, or a step backwards) leaves due times far from
    /// now; put them back on the grid.
    fn repair_schedule(&mut self, now: DateTime<Utc>) {
        for d in &mut self.devices {
            let period = TimeDelta::from_std(d.device.period).unwrap_or(TimeDelta::MAX);
            let horizon = TimeDelta::from_std(backoff(d.device.period, d.failures.max(1)))
                .unwrap_or(TimeDelta::MAX)
                + period;
            if d.next_due - now > horizon {
                d.next_due = next_aligned(now, d.device.period);
            }
        }
    }

    /// Polls device `i` for its `slot` (`None` for a `poll_now`, which has no slot).
    async fn poll_device(&mut self, i: usize, slot: Option<DateTime<Utc>>) -> PollOutput {
        let started = Instant::now();
        let Outcome { ts, stamp, result } = self.read_device(i).await;
        let elapsed = started.elapsed();
        self.metrics.poll_duration.observe(elapsed.as_secs_f64());

        let bus = self.bus.name.clone();
        let run = &mut self.devices[i];
        let device = run.device.id.clone();
        let mut records = Vec::new();
        let (result, last_error, last_reading) = match result {
            Ok((mut reading, events)) => {
                if run.failures >= UNREACHABLE_AFTER {
                    let from = run.failing_since.unwrap_or(ts);
                    let to = run.last_failed.unwrap_or(ts);
                    tracing::info!(%bus, %device, failures = run.failures, "device answers again");
                    records.push(Stamped::new(
                        event(
                            &device,
                            ts,
                            EventKind::DeviceRecovered,
                            format!(
                                "device {device} on bus {bus} answers again after {} failed polls",
                                run.failures
                            ),
                        ),
                        stamp.clone(),
                    ));
                    records.push(Stamped::new(
                        Gap {
                            seq: Seq(0),
                            device: Some(device.clone()),
                            from,
                            to,
                            seqs: None,
                            count: u64::from(run.failures),
                            cause: GapCause::DeviceUnreachable,
                        },
                        stamp.clone(),
                    ));
                }
                run.failures = 0;
                run.failing_since = None;
                run.last_failed = None;
                if slot.is_some_and(|slot| slipped(slot, run.device.period, ts)) {
                    reading.q.set(Flag::Late);
                    self.metrics
                        .flags
                        .get_or_create(&FlagLabels {
                            device: device.to_string(),
                            flag: Flag::Late.name().to_string(),
                        })
                        .inc();
                }
                let reading = Stamped::new(reading, stamp.clone());
                let json = reading.wire_json(Seq(0)).ok();
                records.push(reading);
                for e in events {
                    records.push(Stamped::new(e, stamp.clone()));
                }
                ("ok".to_string(), None, json)
            }
            Err(failure) => {
                let message = failure.to_string();
                run.failures = run.failures.saturating_add(1);
                run.failing_since.get_or_insert(ts);
                run.last_failed = Some(ts);
                // Every failed poll leaves a record, so a short outage is seen in the cloud.
                records.push(Stamped::new(
                    event(
                        &device,
                        ts,
                        EventKind::PollFailed,
                        format!("{}: {message}", failure.label()),
                    ),
                    stamp.clone(),
                ));
                if run.failures == UNREACHABLE_AFTER {
                    tracing::warn!(%bus, %device, error = %message, "device unreachable; backing off");
                    records.push(Stamped::new(
                        event(&device, ts, EventKind::DeviceUnreachable, message.clone()),
                        stamp.clone(),
                    ));
                } else {
                    tracing::debug!(%bus, %device, error = %message, failures = run.failures, "poll failed");
                }
                (failure.label().to_string(), Some(message), None)
            }
        };
        self.metrics
            .polls
            .get_or_create(&PollLabels {
                bus: bus.clone(),
                device: device.to_string(),
                result: result.clone(),
            })
            .inc();
        let failures = run.failures;
        self.states.send_modify(|m| {
            m.insert(
                device.to_string(),
                DeviceState {
                    last_poll: Some(ts),
                    result: result.clone(),
                    last_error: last_error.clone(),
                    consecutive_failures: failures,
                },
            );
        });
        PollOutput {
            records,
            status: DeviceStatusRow {
                device,
                bus,
                last_poll: ts,
                result,
                last_error,
                consecutive_failures: failures,
                last_reading,
            },
        }
    }

    /// Reads every block of a device. A block gets the configured retries only after an
    /// answer that may come out right when asked again ([`ModbusError::is_worth_retrying`]:
    /// a corrupted frame, a busy device). A request that got no answer at all (or only line
    /// noise) is not retried and ends the poll, so a dead device costs the bus its timeout
    /// (plus the inter-frame gap) per poll and nothing more, first poll after start included.
    ///
    /// A device that refuses (exception 02) a block spanning a hole between its points gets
    /// its points read apart from then on (logged once), and the poll is read again that way.
    async fn read_device(&mut self, i: usize) -> Outcome {
        let device = self.devices[i].device.clone();
        let mut read_at: Option<(DateTime<Utc>, ClockStamp)> = None;
        let mut replies: Vec<Option<Vec<u16>>>;
        let mut first_error: Option<ModbusError>;
        let mut blocks;
        loop {
            blocks = self.devices[i].blocks.clone();
            replies = Vec::with_capacity(blocks.len());
            first_error = None;
            let mut refused_hole = false;
            for block in &blocks {
                let mut reply = None;
                for _ in 0..=device.retries {
                    let result = self.read_block(&device, block).await;
                    // A timeout is progress too: the loop is alive, the device is not.
                    self.heartbeat.beat();
                    match result {
                        Ok(regs) => {
                            read_at.get_or_insert_with(|| self.clock.stamp());
                            reply = Some(regs);
                            break;
                        }
                        Err(e) => {
                            let retry = e.is_worth_retrying();
                            if e.exception_code() == Some(0x02) && has_hole(block) {
                                refused_hole = true;
                            }
                            first_error.get_or_insert(e);
                            if !retry {
                                break;
                            }
                        }
                    }
                }
                let silent = reply.is_none()
                    && first_error
                        .as_ref()
                        .is_some_and(|e| e.is_silent() || matches!(e, ModbusError::Noise { .. }));
                replies.push(reply);
                if silent || refused_hole {
                    // Not answering at all: the remaining blocks would time out too.
                    break;
                }
            }
            let run = &mut self.devices[i];
            if refused_hole && !run.apart {
                tracing::warn!(
                    bus = %self.bus.name,
                    device = %device.id,
                    "device refuses reads across holes in its register map (exception 02); \
                     reading its points apart from now on"
                );
                run.apart = true;
                run.blocks = plan_reads_apart(&device.points, device.max_regs_per_read);
                read_at = None;
                continue;
            }
            break;
        }
        let (ts, stamp) = read_at.unwrap_or_else(|| self.clock.stamp());
        let words = assemble(device.points.len(), &blocks, &replies);
        let mut values: Vec<(Channel, f64)> = Vec::new();
        let mut missing: Vec<Channel> = Vec::new();
        for (point, w) in device.points.iter().zip(words) {
            match w.map(|w| point.decode(&w)) {
                Some(Ok(v)) => values.push((point.channel.clone(), v)),
                Some(Err(e)) => {
                    tracing::warn!(bus = %self.bus.name, device = %device.id, error = %e, "register decode failed");
                    missing.push(point.channel.clone());
                }
                None => missing.push(point.channel.clone()),
            }
        }
        if values.is_empty() {
            let failure = match first_error {
                Some(e) => PollFailure::Modbus(e),
                None => PollFailure::NothingDecoded {
                    bus: self.bus.name.clone(),
                    device: device.id.clone(),
                    unit: device.unit,
                },
            };
            return Outcome {
                ts,
                stamp,
                result: Err(failure),
            };
        }
        let run = &mut self.devices[i];
        let verdict = run.validator.check(Sample {
            ts,
            boottime_ms: Some(stamp.boottime_ms),
            values,
            missing,
        });
        verdict.count(&device.id, &self.metrics);
        let records = verdict.into_records(&device.id, ts);
        Outcome {
            ts,
            stamp,
            result: Ok(records),
        }
    }

    /// Reads one block. The client is opened on first use and then kept: it re-opens its own
    /// transport after a failure and keeps the bus's inter-frame gap between exchanges.
    async fn read_block(
        &mut self,
        device: &Device,
        block: &ReadBlock,
    ) -> Result<Vec<u16>, ModbusError> {
        let client = match &mut self.client {
            Some(c) => c,
            None => {
                // A newly opened RTU line is drained for the longest timeout of its devices:
                // a reply to a request sent before a restart can arrive until then.
                let longest = self
                    .bus
                    .devices
                    .iter()
                    .map(|d| d.timeout)
                    .max()
                    .unwrap_or(device.timeout);
                let mut c = BusClient::connect(&self.bus.name, &self.bus.link, longest).await?;
                c.set_inter_frame_gap(self.bus.inter_frame_gap);
                self.client.insert(c)
            }
        };
        let result = client
            .read(
                device.unit,
                block.fc,
                block.address,
                block.count,
                device.timeout,
            )
            .await;
        for (cause, n) in client.take_discards().iter() {
            self.metrics
                .discarded
                .get_or_create(&DiscardLabels {
                    bus: self.bus.name.clone(),
                    cause: cause.label().to_string(),
                })
                .inc_by(n);
        }
        result
    }
}

fn event(device: &DeviceId, ts: DateTime<Utc>, kind: EventKind, message: String) -> Event {
    Event {
        seq: Seq(0),
        ts,
        device: Some(device.clone()),
        kind,
        message,
        previous: None,
        current: None,
        wrap: None,
    }
}

/// Whether a poll for `slot` that read the device at `ts` slipped past its slot: it read at or
/// after the next boundary of the device's period.
fn slipped(slot: DateTime<Utc>, period: Duration, ts: DateTime<Utc>) -> bool {
    let period = TimeDelta::from_std(period).unwrap_or(TimeDelta::MAX);
    ts >= slot
        .checked_add_signed(period)
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Whether `block` reads registers that none of the device's points maps (a hole).
fn has_hole(block: &ReadBlock) -> bool {
    let mut covered = vec![false; usize::from(block.count)];
    for piece in &block.pieces {
        let from = usize::from(piece.offset);
        let to = (from + usize::from(piece.len)).min(covered.len());
        for c in covered.iter_mut().take(to).skip(from) {
            *c = true;
        }
    }
    covered.iter().any(|c| !c)
}

/// The totalizer's wrap value in m³, when its profile says where the register wraps.
fn rollover_m3(d: &Device) -> Option<f64> {
    d.points
        .iter()
        .find(|p| p.channel == Channel::Total)
        .and_then(|p| p.rollover_at.map(|r| p.unit.to_canonical(r)))
}

/// The first multiple of `period` (since the Unix epoch) strictly after `now`.
pub fn next_aligned(now: DateTime<Utc>, period: Duration) -> DateTime<Utc> {
    let p = i64::try_from(period.as_millis()).unwrap_or(i64::MAX).max(1);
    let ms = now.timestamp_millis();
    let next = (ms.div_euclid(p) + 1).saturating_mul(p);
    DateTime::from_timestamp_millis(next).unwrap_or(now)
}

/// How long a device that failed `failures` polls in a row waits: its period doubled per
/// failure, capped at [`MAX_BACKOFF`] (or the period itself when that is longer).
pub fn backoff(period: Duration, failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let doubled = period.saturating_mul(1u32 << (failures - 1).min(16));
    doubled.min(MAX_BACKOFF.max(period))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(h: u32, m: u32, s: u32, ms: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 28, h, m, s)
            .single()
            .expect("valid")
            + TimeDelta::milliseconds(i64::from(ms))
    }

    #[test]
    fn polls_align_to_wall_clock_boundaries() {
        let minute = Duration::from_secs(60);
        assert_eq!(next_aligned(at(19, 0, 17, 250), minute), at(19, 1, 0, 0));
        assert_eq!(
            next_aligned(at(19, 0, 0, 0), minute),
            at(19, 1, 0, 0),
            "strictly after"
        );
        assert_eq!(
            next_aligned(at(19, 0, 0, 999), Duration::from_secs(1)),
            at(19, 0, 1, 0)
        );
        assert_eq!(
            next_aligned(at(19, 7, 3, 0), Duration::from_secs(900)),
            at(19, 15, 0, 0)
        );
    }

    #[test]
    fn a_reading_after_the_next_boundary_slipped() {
        let second = Duration::from_secs(1);
        let slot = at(19, 0, 0, 0);
        assert!(!slipped(slot, second, at(19, 0, 0, 0)));
        assert!(!slipped(slot, second, at(19, 0, 0, 999)));
        assert!(
            slipped(slot, second, at(19, 0, 1, 0)),
            "at the next boundary"
        );
        assert!(slipped(slot, second, at(19, 0, 5, 0)));
        assert!(
            !slipped(slot, Duration::MAX, at(23, 0, 0, 0)),
            "no overflow"
        );
    }

    #[test]
    fn a_block_with_unmapped_registers_has_a_hole() {
        let point = |address: u16| crate::register::Point {
            channel: Channel::Flow,
            fc: crate::register::Fc::Holding,
            address,
            data_type: crate::register::DataType::F32,
            order: crate::register::ByteOrder::ABCD,
            scale: 1.0,
            offset: 0.0,
            unit: caudal_common::units::Unit::LitrePerSecond,
            fraction_scale: 1e-9,
            overflow_factor: 1.0,
            overflow_address: None,
            rollover_at: None,
            water_column: None,
        };
        let touching = plan_reads(&[point(100), point(102)], 125);
        assert_eq!(touching.len(), 1);
        assert!(!has_hole(&touching[0]));
        let gapped = plan_reads(&[point(100), point(106)], 125);
        assert_eq!((gapped.len(), gapped[0].count), (1, 8));
        assert!(has_hole(&gapped[0]), "{gapped:?}");
        let apart = plan_reads_apart(&[point(100), point(106)], 125);
        assert_eq!(apart.len(), 2, "{apart:?}");
        assert!(apart.iter().all(|b| !has_hole(b) && b.count == 2));
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let p = Duration::from_secs(60);
        assert_eq!(backoff(p, 0), Duration::ZERO);
        assert_eq!(backoff(p, 1), p);
        assert_eq!(backoff(p, 2), 2 * p);
        assert_eq!(backoff(p, 3), 4 * p);
        assert_eq!(backoff(p, 30), MAX_BACKOFF);
        let hour = Duration::from_secs(3600);
        assert_eq!(backoff(hour, 9), hour, "a long period is its own cap");
    }
}
