//! A simulated well meter that answers Modbus like a real one, for tests, demos and training.
//!
//! One [`Simulator`] serves any number of unit ids on one listener (Modbus TCP framing, or RTU
//! framing over TCP or any byte stream such as a serial port). Each unit is a
//! [`SimulatedMeter`]: the resolved points of a profile plus a process [`Model`] (a flow that
//! varies smoothly, a totalizer that integrates it over elapsed time, a level that drifts).
//! Every register is produced by [`Point::encode`] from the model's values, so any profile's
//! layout, byte order and unit is served as the meter would. Unmapped addresses answer exception
//! 02 as real meters do; units the simulator does not serve stay silent (RTU) or, if asked, get
//! a gateway exception (TCP).
//!
//! A [`SimHandle`] changes things while it runs: per-unit [`Fault`]s (silence, exceptions,
//! malformed replies, delays), a preset totalizer (reset, rollover), frozen registers, and
//! overridden channel values (NaN like an E+H meter on fault). Time is tokio time, so tests with
//! paused time see the totalizer advance exactly with the clock.

use crate::modbus::rtu::crc16;
use crate::register::{Channel, Fc, MAX_BITS_PER_READ, MAX_REGISTERS_PER_READ, Point};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::f64::consts::TAU;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// How the simulated process behaves. Flow in L/s, level in m, total in m³.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    /// Mean flow.
    pub flow_base_lps: f64,
    /// Amplitude of the slow sinusoid around the mean.
    pub flow_amplitude_lps: f64,
    pub flow_period: Duration,
    /// Uniform measurement noise (±) on the reported flow; the totalizer integrates the
    /// noiseless flow, as a meter's own totalizer does.
    pub flow_noise_lps: f64,
    /// Let the flow go below zero (reverse flow); clamped at zero otherwise.
    pub allow_reverse_flow: bool,
    /// Totalizer at start.
    pub initial_total_m3: f64,
    pub level_base_m: f64,
    pub level_amplitude_m: f64,
    pub level_period: Duration,
    /// Seed of the noise, so runs repeat.
    pub seed: u64,
}

impl Default for Model {
    fn default() -> Self {
        Model {
            flow_base_lps: 12.0,
            flow_amplitude_lps: 3.0,
            flow_period: Duration::from_secs(600),
            flow_noise_lps: 0.05,
            allow_reverse_flow: false,
            initial_total_m3: 123_456.0,
            level_base_m: 35.0,
            level_amplitude_m: 0.5,
            level_period: Duration::from_secs(3600),
            seed: 1,
        }
    }
}

impl Model {
    /// A constant flow and level without noise: the totalizer grows by exactly
    /// `flow × elapsed`.
    pub fn steady(flow_lps: f64, total_m3: f64, level_m: f64) -> Model {
        Model {
            flow_base_lps: flow_lps,
            flow_amplitude_lps: 0.0,
            flow_noise_lps: 0.0,
            initial_total_m3: total_m3,
            level_base_m: level_m,
            level_amplitude_m: 0.0,
            ..Model::default()
        }
    }

    fn clean_flow(&self, t: f64) -> f64 {
        let f = self.flow_base_lps
            + self.flow_amplitude_lps * (TAU * t / self.flow_period.as_secs_f64().max(1e-3)).sin();
        if self.allow_reverse_flow {
            f
        } else {
            f.max(0.0)
        }
    }

    fn level(&self, t: f64) -> f64 {
        self.level_base_m
            + self.level_amplitude_m * (TAU * t / self.level_period.as_secs_f64().max(1e-3)).sin()
    }
}

/// What a unit does wrong, switchable at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    #[default]
    None,
    /// Never answers.
    Silent,
    /// Answers every request with this exception code.
    Exception(u8),
    /// Answers with a malformed frame (TCP: a byte count that does not match the data; RTU:
    /// line noise).
    Garbage,
    /// Answers correctly after this delay.
    Delay(Duration),
    /// Answers only every other request (the first, the third, ...); silent on the others.
    EveryOther,
    /// Answers correctly but in the name of another unit id (RTU; a miswired or readdressed
    /// device).
    AnswerAs(u8),
    /// Answers with a well-formed frame (valid CRC) carrying one register more than asked.
    WrongLength,
    /// Sends a burst of line noise, then the correct answer.
    NoiseFirst,
}

/// One request a unit received and what it served, kept by the simulator (the last
/// [`SERVED_KEPT`]) so a test can prove each stored value is what was served to its request.
#[derive(Debug, Clone, PartialEq)]
pub struct Served {
    pub unit: u8,
    /// When the request arrived, wall-clock.
    pub received: chrono::DateTime<chrono::Utc>,
    /// When the reply was written; `None` while delayed or when the unit stayed silent.
    pub replied: Option<chrono::DateTime<chrono::Utc>>,
    pub fc: Option<Fc>,
    pub address: u16,
    pub count: u16,
    /// The canonical values the reply was made from; `None` when no data was served
    /// (exception, silence, noise).
    pub values: Option<Snapshot>,
}

/// How many [`Served`] entries a simulator keeps (the oldest go first).
pub const SERVED_KEPT: usize = 100_000;

/// How requests and replies are framed on the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Framing {
    /// Modbus TCP (MBAP header).
    #[default]
    Tcp,
    /// Modbus RTU frames (unit, PDU, CRC), as on a serial line or through a transparent
    /// serial-to-Ethernet converter.
    Rtu,
}

/// One simulated device: a profile's points and a process model.
#[derive(Debug, Clone)]
pub struct SimulatedMeter {
    points: Vec<Point>,
    model: Model,
    strict_map: bool,
    max_regs_per_read: Option<u16>,
    mapped: HashSet<(Fc, u16)>,
}

impl SimulatedMeter {
    pub fn new(points: Vec<Point>, model: Model) -> SimulatedMeter {
        let mut mapped = HashSet::new();
        for p in &points {
            for i in 0..p.data_type.registers() {
                mapped.insert((p.fc, p.address.wrapping_add(i)));
            }
            if let Some(counter) = p.overflow_address {
                mapped.insert((p.fc, counter));
            }
        }
        SimulatedMeter {
            points,
            model,
            strict_map: false,
            max_regs_per_read: None,
            mapped,
        }
    }

    /// Refuse (exception 02) any request touching an unmapped register. By default a request
    /// is served when its first and last registers are mapped, holes reading as zero.
    pub fn strict_map(mut self, strict: bool) -> SimulatedMeter {
        self.strict_map = strict;
        self
    }

    /// Refuse (exception 03) requests longer than `n` registers, like a Promag 800.
    pub fn max_regs_per_read(mut self, n: u16) -> SimulatedMeter {
        self.max_regs_per_read = Some(n);
        self
    }

    pub fn points(&self) -> &[Point] {
        &self.points
    }
}

/// The canonical values a unit serves at one instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    pub flow_lps: f64,
    pub total_m3: f64,
    pub level_m: f64,
}

struct UnitState {
    meter: SimulatedMeter,
    start: Instant,
    integrated_to: Instant,
    total_m3: f64,
    fault: Fault,
    frozen: Option<Snapshot>,
    overrides: HashMap<Channel, f64>,
    requests: u64,
    rng: fastrand::Rng,
    /// The snapshot the last read was served from.
    last_served: Option<Snapshot>,
}

/// Longest integration step of the totalizer; the sinusoid's period is minutes.
const INTEGRATION_STEP_S: f64 = 1.0;
const MAX_INTEGRATION_STEPS: f64 = 10_000.0;

impl UnitState {
    fn new(meter: SimulatedMeter) -> UnitState {
        let now = Instant::now();
        UnitState {
            total_m3: meter.model.initial_total_m3,
            rng: fastrand::Rng::with_seed(meter.model.seed),
            meter,
            start: now,
            integrated_to: now,
            fault: Fault::None,
            frozen: None,
            overrides: HashMap::new(),
            requests: 0,
            last_served: None,
        }
    }

    fn elapsed(&self, at: Instant) -> f64 {
        at.duration_since(self.start).as_secs_f64()
    }

    /// Integrates the flow up to now (trapezoids of at most a second).
    fn advance(&mut self) {
        let now = Instant::now();
        let (t0, t1) = (self.elapsed(self.integrated_to), self.elapsed(now));
        if t1 <= t0 {
            return;
        }
        let steps = ((t1 - t0) / INTEGRATION_STEP_S)
            .ceil()
            .clamp(1.0, MAX_INTEGRATION_STEPS);
        let h = (t1 - t0) / steps;
        let model = &self.meter.model;
        let mut litres = 0.0;
        for i in 0..steps as u64 {
            let a = t0 + h * i as f64;
            litres += 0.5 * (model.clean_flow(a) + model.clean_flow(a + h)) * h;
        }
        self.total_m3 += litres / 1000.0;
        self.integrated_to = now;
    }

    fn snapshot(&mut self) -> Snapshot {
        self.advance();
        if let Some(frozen) = self.frozen {
            return frozen;
        }
        let t = self.elapsed(self.integrated_to);
        let model = &self.meter.model;
        let noise = model.flow_noise_lps * (self.rng.f64() * 2.0 - 1.0);
        let mut flow = model.clean_flow(t) + noise;
        if !model.allow_reverse_flow {
            flow = flow.max(0.0);
        }
        Snapshot {
            flow_lps: flow,
            total_m3: self.total_m3,
            level_m: model.level(t),
        }
    }

    fn value(&self, snap: &Snapshot, channel: &Channel) -> f64 {
        if let Some(v) = self.overrides.get(channel) {
            return *v;
        }
        match channel {
            Channel::Flow => snap.flow_lps,
            Channel::Total => snap.total_m3,
            Channel::Level => snap.level_m,
            Channel::Direction => f64::from(u8::from(snap.flow_lps < 0.0)),
            Channel::Extra(_) => 0.0,
        }
    }

    /// The PDU answering a read, or an exception code.
    fn read(&mut self, fc: Fc, address: u16, count: u16) -> Result<Vec<u8>, u8> {
        let limit = if fc.is_bits() {
            MAX_BITS_PER_READ
        } else {
            MAX_REGISTERS_PER_READ.min(
                self.meter
                    .max_regs_per_read
                    .unwrap_or(MAX_REGISTERS_PER_READ),
            )
        };
        if count == 0 || count > limit {
            return Err(0x03);
        }
        let end = u32::from(address) + u32::from(count);
        if end > 0x1_0000 {
            return Err(0x02);
        }
        let mapped = |a: u32| self.meter.mapped.contains(&(fc, a as u16));
        let covered = if self.meter.strict_map {
            (u32::from(address)..end).all(mapped)
        } else {
            mapped(u32::from(address)) && mapped(end - 1)
        };
        if !covered {
            return Err(0x02);
        }

        let snap = self.snapshot();
        self.last_served = Some(Snapshot {
            flow_lps: self.value(&snap, &Channel::Flow),
            total_m3: self.value(&snap, &Channel::Total),
            level_m: self.value(&snap, &Channel::Level),
        });
        let mut words = vec![0u16; usize::from(count)];
        let mut put = |a: u16, w: u16| {
            if let Some(i) = a.checked_sub(address).filter(|i| *i < count) {
                words[usize::from(i)] = w;
            }
        };
        for p in self.meter.points.iter().filter(|p| p.fc == fc) {
            let mut value = self.value(&snap, &p.channel);
            if let Some(wrap) = p.rollover_at.filter(|w| *w > 0.0) {
                value = p.to_stored(p.from_stored(value).rem_euclid(wrap));
            }
            let encoded = p.encode(value).map_err(|e| {
                tracing::warn!(error = %e, "simulated meter cannot encode its value");
                0x04
            })?;
            for (i, w) in encoded
                .iter()
                .take(usize::from(p.data_type.registers()))
                .enumerate()
            {
                put(p.address.wrapping_add(i as u16), *w);
            }
            if let (Some(counter), Some(w)) = (p.overflow_address, encoded.get(2)) {
                if p.data_type == crate::register::DataType::F32U16Rollover {
                    put(counter, *w);
                }
            }
        }

        let mut pdu = vec![fc.code()];
        if fc.is_bits() {
            let mut bytes = vec![0u8; usize::from(count).div_ceil(8)];
            for (i, w) in words.iter().enumerate() {
                if *w & 1 != 0 {
                    bytes[i / 8] |= 1 << (i % 8);
                }
            }
            pdu.push(bytes.len() as u8);
            pdu.extend(bytes);
        } else {
            pdu.push((words.len() * 2) as u8);
            for w in words {
                pdu.extend(w.to_be_bytes());
            }
        }
        Ok(pdu)
    }
}

/// What a unit does with one request.
enum Answer {
    Silent,
    Pdu(Vec<u8>),
    Garbage,
    /// A PDU sent with another unit id (RTU).
    As(u8, Vec<u8>),
    /// Noise, then the PDU.
    Noisy(Vec<u8>),
}

struct Shared {
    units: Mutex<BTreeMap<u8, UnitState>>,
    served: Mutex<ServedLog>,
}

#[derive(Default)]
struct ServedLog {
    next_id: u64,
    entries: std::collections::VecDeque<(u64, Served)>,
}

/// How a listener frames and whom it answers.
#[derive(Debug, Clone, Copy)]
struct Serving {
    framing: Framing,
    /// Exception sent for units nobody simulates (TCP framing only); silent when `None`.
    unknown_unit_exception: Option<u8>,
}

impl Shared {
    fn units(&self) -> MutexGuard<'_, BTreeMap<u8, UnitState>> {
        self.units.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn served(&self) -> MutexGuard<'_, ServedLog> {
        self.served.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The answer to a request PDU, how long to wait before giving it, and the id of its
    /// [`Served`] entry (for [`Shared::replied`]).
    fn answer(&self, unit: u8, pdu: &[u8], serving: Serving) -> (Answer, Duration, Option<u64>) {
        let received = chrono::Utc::now();
        let mut units = self.units();
        let Some(state) = units.get_mut(&unit) else {
            let answer = match (serving.framing, serving.unknown_unit_exception, pdu.first()) {
                (Framing::Tcp, Some(code), Some(fc)) => Answer::Pdu(vec![fc | 0x80, code]),
                _ => Answer::Silent,
            };
            return (answer, Duration::ZERO, None);
        };
        state.requests += 1;
        state.last_served = None;
        let fc_byte = pdu.first().copied().unwrap_or(0);
        let (address, count) = match pdu {
            [_, a0, a1, c0, c1] => (
                u16::from_be_bytes([*a0, *a1]),
                u16::from_be_bytes([*c0, *c1]),
            ),
            _ => (0, 0),
        };
        let exception = |code: u8| Answer::Pdu(vec![fc_byte | 0x80, code]);
        let read = |state: &mut UnitState| match (Fc::from_code(fc_byte), pdu.len()) {
            (Some(fc), 5) => match state.read(fc, address, count) {
                Ok(reply) => reply,
                Err(code) => vec![fc_byte | 0x80, code],
            },
            (Some(_), _) => vec![fc_byte | 0x80, 0x03],
            (None, _) => vec![fc_byte | 0x80, 0x01],
        };
        let (answer, delay) = match state.fault {
            Fault::None => (Answer::Pdu(read(state)), Duration::ZERO),
            Fault::Delay(d) => (Answer::Pdu(read(state)), d),
            Fault::Silent => (Answer::Silent, Duration::ZERO),
            Fault::Exception(code) => (exception(code), Duration::ZERO),
            Fault::Garbage => (Answer::Garbage, Duration::ZERO),
            Fault::EveryOther if state.requests % 2 == 0 => (Answer::Silent, Duration::ZERO),
            Fault::EveryOther => (Answer::Pdu(read(state)), Duration::ZERO),
            Fault::AnswerAs(other) => (Answer::As(other, read(state)), Duration::ZERO),
            Fault::NoiseFirst => (Answer::Noisy(read(state)), Duration::ZERO),
            Fault::WrongLength => {
                let mut pdu = read(state);
                if pdu.len() >= 2 && pdu[0] & 0x80 == 0 {
                    pdu[1] = pdu[1].saturating_add(2);
                    pdu.extend([0, 0]);
                }
                (Answer::Pdu(pdu), Duration::ZERO)
            }
        };
        let values = match answer {
            Answer::Pdu(_) | Answer::As(..) | Answer::Noisy(_) => state.last_served,
            Answer::Silent | Answer::Garbage => None,
        };
        drop(units);
        let mut log = self.served();
        let id = log.next_id;
        log.next_id += 1;
        if log.entries.len() >= SERVED_KEPT {
            log.entries.pop_front();
        }
        log.entries.push_back((
            id,
            Served {
                unit,
                received,
                replied: None,
                fc: Fc::from_code(fc_byte),
                address,
                count,
                values,
            },
        ));
        (answer, delay, Some(id))
    }

    /// Notes when the reply of entry `id` was written.
    fn replied(&self, id: Option<u64>) {
        let Some(id) = id else { return };
        let now = chrono::Utc::now();
        let mut log = self.served();
        if let Some((_, entry)) = log.entries.iter_mut().rev().find(|(i, _)| *i == id) {
            entry.replied = Some(now);
        }
    }
}

/// Serves simulated meters. Build it, take a [`SimHandle`], then serve.
pub struct Simulator {
    shared: Arc<Shared>,
    serving: Serving,
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator")
            .field("units", &self.shared.units().keys().collect::<Vec<_>>())
            .field("serving", &self.serving)
            .finish()
    }
}

impl Default for Simulator {
    fn default() -> Self {
        Simulator::new()
    }
}

impl Simulator {
    /// An empty simulator with Modbus TCP framing.
    pub fn new() -> Simulator {
        Simulator {
            shared: Arc::new(Shared {
                units: Mutex::new(BTreeMap::new()),
                served: Mutex::new(ServedLog::default()),
            }),
            serving: Serving {
                framing: Framing::Tcp,
                unknown_unit_exception: None,
            },
        }
    }

    /// Serves `meter` as `unit` (replacing any meter already there).
    pub fn with_unit(self, unit: u8, meter: SimulatedMeter) -> Simulator {
        self.shared.units().insert(unit, UnitState::new(meter));
        self
    }

    pub fn framing(mut self, framing: Framing) -> Simulator {
        self.serving.framing = framing;
        self
    }

    /// Answer requests for units nobody simulates with this exception (a Modbus TCP gateway
    /// sends 0x0B "target device failed to respond"). Silent by default; RTU is always silent.
    pub fn unknown_units_answer(mut self, code: u8) -> Simulator {
        self.serving.unknown_unit_exception = Some(code);
        self
    }

    /// A handle to change faults and values while serving.
    pub fn handle(&self) -> SimHandle {
        SimHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Accepts connections until `shutdown` completes; each connection is served on its own
    /// task and ends with it.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                accepted = listener.accept() => {
                    let (stream, peer) = accepted?;
                    stream.set_nodelay(true)?;
                    let shared = Arc::clone(&self.shared);
                    let serving = self.serving;
                    connections.spawn(async move {
                        if let Err(e) = serve_connection(&shared, stream, serving).await {
                            tracing::debug!(%peer, error = %e, "simulator connection ended");
                        }
                    });
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    }

    /// Serves one byte stream (a serial port, a pty) until it closes or `shutdown` completes.
    pub async fn serve_stream<S>(
        self,
        stream: S,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        tokio::select! {
            () = shutdown => Ok(()),
            r = serve_connection(&self.shared, stream, self.serving) => r,
        }
    }

    /// Serves RTU framing the way a transparent serial-to-Ethernet converter does: one serial
    /// line behind the listener, shared by whichever TCP client is connected (a new client
    /// replaces the old one). What the meters send while no client is connected is kept for the
    /// next one, so a reply to a request of a client that went away (an agent killed mid-request)
    /// reaches the client that connects next, as it does through many converters.
    pub async fn serve_converter(
        mut self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> io::Result<()> {
        /// Bytes kept for the next client; a converter's buffer is small.
        const KEPT: usize = 4096;
        self.serving.framing = Framing::Rtu;
        let (line, meters) = tokio::io::duplex(KEPT);
        let shared = Arc::clone(&self.shared);
        let serving = self.serving;
        let line_task = tokio::spawn(async move {
            if let Err(e) = serve_connection(&shared, meters, serving).await {
                tracing::debug!(error = %e, "converter line ended");
            }
        });
        let _abort = AbortOnDrop(line_task);
        let (mut from_meters, mut to_meters) = tokio::io::split(line);
        let mut client: Option<tokio::net::TcpStream> = None;
        let mut kept: Vec<u8> = Vec::new();
        let mut meter_buf = [0u8; 512];
        let mut client_buf = [0u8; 512];
        tokio::pin!(shutdown);
        loop {
            let from_client = async {
                match client.as_mut() {
                    Some(c) => c.read(&mut client_buf).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                accepted = listener.accept() => {
                    let (mut stream, _) = accepted?;
                    stream.set_nodelay(true)?;
                    if !kept.is_empty() && stream.write_all(&kept).await.is_ok() {
                        kept.clear();
                    }
                    client = Some(stream);
                }
                n = from_meters.read(&mut meter_buf) => {
                    let n = n?;
                    if n == 0 {
                        return Ok(());
                    }
                    let bytes = &meter_buf[..n];
                    let sent = match client.as_mut() {
                        Some(c) => c.write_all(bytes).await.is_ok(),
                        None => false,
                    };
                    if !sent {
                        client = None;
                        kept.extend_from_slice(bytes);
                        let excess = kept.len().saturating_sub(KEPT);
                        kept.drain(..excess);
                    }
                }
                n = from_client => match n {
                    Ok(0) | Err(_) => client = None,
                    Ok(n) => to_meters.write_all(&client_buf[..n]).await?,
                },
            }
        }
    }

    /// Binds 127.0.0.1 on a free port and serves there until the returned value is dropped.
    pub async fn start(self) -> io::Result<RunningSimulator> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let handle = self.handle();
        let task = tokio::spawn(async move {
            if let Err(e) = self.serve(listener, std::future::pending()).await {
                tracing::warn!(error = %e, "simulator stopped");
            }
        });
        Ok(RunningSimulator { addr, handle, task })
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A simulator serving on a local port; stops when dropped.
#[derive(Debug)]
pub struct RunningSimulator {
    pub addr: SocketAddr,
    pub handle: SimHandle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RunningSimulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Changes a running simulator. Methods return `false` when the unit is not simulated.
#[derive(Clone)]
pub struct SimHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SimHandle")
    }
}

impl SimHandle {
    fn with<R>(&self, unit: u8, f: impl FnOnce(&mut UnitState) -> R) -> Option<R> {
        self.shared.units().get_mut(&unit).map(f)
    }

    pub fn set_fault(&self, unit: u8, fault: Fault) -> bool {
        self.with(unit, |u| u.fault = fault).is_some()
    }

    /// Makes the unit refuse (exception 02) any request touching a register it does not map,
    /// from now on, as [`SimulatedMeter::strict_map`] does from the start.
    pub fn set_strict_map(&self, unit: u8, strict: bool) -> bool {
        self.with(unit, |u| u.meter.strict_map = strict).is_some()
    }

    /// Presets the totalizer (0 for a reset, just below `rollover_at` to test a rollover); it
    /// keeps integrating from there.
    pub fn set_total(&self, unit: u8, total_m3: f64) -> bool {
        self.with(unit, |u| {
            u.advance();
            u.total_m3 = total_m3;
        })
        .is_some()
    }

    /// Freezes every register at its current value (the process goes on underneath: on thaw
    /// the totalizer shows what flowed meanwhile).
    pub fn freeze(&self, unit: u8, frozen: bool) -> bool {
        self.with(unit, |u| {
            u.frozen = None;
            if frozen {
                u.frozen = Some(u.snapshot());
            }
        })
        .is_some()
    }

    /// Serves `value` (canonical units; NaN allowed) for `channel` instead of the model's, or
    /// the model's again with `None`.
    pub fn set_value(&self, unit: u8, channel: Channel, value: Option<f64>) -> bool {
        self.with(unit, |u| match value {
            Some(v) => {
                u.overrides.insert(channel, v);
            }
            None => {
                u.overrides.remove(&channel);
            }
        })
        .is_some()
    }

    /// Replaces the process model, keeping the totalizer where it is.
    pub fn set_model(&self, unit: u8, model: Model) -> bool {
        self.with(unit, |u| {
            u.advance();
            u.meter.model = model;
        })
        .is_some()
    }

    /// The values the unit would serve now (with a fresh noise draw on the flow).
    pub fn snapshot(&self, unit: u8) -> Option<Snapshot> {
        self.with(unit, |u| u.snapshot())
    }

    /// Requests this unit received (answered or not).
    pub fn requests(&self, unit: u8) -> u64 {
        self.with(unit, |u| u.requests).unwrap_or(0)
    }

    /// What the simulated units were asked and served, oldest first (the last
    /// [`SERVED_KEPT`]).
    pub fn served(&self) -> Vec<Served> {
        self.shared
            .served()
            .entries
            .iter()
            .map(|(_, s)| s.clone())
            .collect()
    }
}

// ---- Framing ----

/// Silence after which a partial RTU frame is thrown away (3.5 characters at slow bauds, with
/// room for a converter's buffering).
const RTU_FRAME_SILENCE: Duration = Duration::from_millis(50);

async fn serve_connection<S>(shared: &Shared, stream: S, serving: Serving) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match serving.framing {
        Framing::Tcp => serve_tcp(shared, stream, serving).await,
        Framing::Rtu => serve_rtu(shared, stream, serving).await,
    }
}

async fn serve_tcp<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    mut stream: S,
    serving: Serving,
) -> io::Result<()> {
    loop {
        let mut header = [0u8; 7];
        match stream.read_exact(&mut header).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let len = usize::from(u16::from_be_bytes([header[4], header[5]]));
        if !(2..=254).contains(&len) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("MBAP length {len}"),
            ));
        }
        let unit = header[6];
        let mut pdu = vec![0u8; len - 1];
        stream.read_exact(&mut pdu).await?;
        let (answer, delay, id) = shared.answer(unit, &pdu, serving);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let reply_pdu = match answer {
            Answer::Silent => continue,
            // MBAP carries the unit in its header, and a TCP stream has no line noise.
            Answer::Pdu(p) | Answer::As(_, p) | Answer::Noisy(p) => p,
            // Claims 255 data bytes, carries one: no decoder can take it.
            Answer::Garbage => vec![pdu.first().copied().unwrap_or(3), 0xFF, 0x12],
        };
        let mut frame = Vec::with_capacity(7 + reply_pdu.len());
        frame.extend_from_slice(&header[..4]);
        frame.extend_from_slice(&((reply_pdu.len() + 1) as u16).to_be_bytes());
        frame.push(unit);
        frame.extend(reply_pdu);
        stream.write_all(&frame).await?;
        shared.replied(id);
    }
}

/// The length of the RTU request frame at the start of `buf`: `Ok(Some(n))`, `Ok(None)` when
/// more bytes are needed, `Err(())` when the first byte cannot start a frame.
fn rtu_request_len(buf: &[u8]) -> Result<Option<usize>, ()> {
    let Some(&fc) = buf.get(1) else {
        return Ok(None);
    };
    let n = match fc {
        0x01..=0x06 => 8,
        0x0F | 0x10 => match buf.get(6) {
            Some(&byte_count) => 9 + usize::from(byte_count),
            None => return Ok(None),
        },
        _ => return Err(()),
    };
    if buf.len() < n {
        return Ok(None);
    }
    let crc = u16::from_le_bytes([buf[n - 2], buf[n - 1]]);
    if crc16(&buf[..n - 2]) == crc {
        Ok(Some(n))
    } else {
        Err(())
    }
}

async fn serve_rtu<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    mut stream: S,
    serving: Serving,
) -> io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(512);
    let mut chunk = [0u8; 256];
    loop {
        let n = if buf.is_empty() {
            stream.read(&mut chunk).await?
        } else {
            match tokio::time::timeout(RTU_FRAME_SILENCE, stream.read(&mut chunk)).await {
                Ok(r) => r?,
                Err(_silence) => {
                    buf.clear();
                    continue;
                }
            }
        };
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        loop {
            match rtu_request_len(&buf) {
                Ok(None) => break,
                Err(()) => {
                    buf.remove(0);
                }
                Ok(Some(len)) => {
                    let frame: Vec<u8> = buf.drain(..len).collect();
                    let unit = frame[0];
                    if unit == 0 {
                        continue; // broadcast: never answered
                    }
                    let (answer, delay, id) = shared.answer(unit, &frame[1..len - 2], serving);
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    let rtu_frame = |unit: u8, pdu: Vec<u8>| {
                        let mut f = Vec::with_capacity(pdu.len() + 3);
                        f.push(unit);
                        f.extend(pdu);
                        let crc = crc16(&f);
                        f.extend(crc.to_le_bytes());
                        f
                    };
                    // Line noise: bytes no RTU decoder can frame.
                    let noise = || (0xE0..=0xFF_u8).rev().collect::<Vec<u8>>();
                    let reply = match answer {
                        Answer::Silent => continue,
                        Answer::Garbage => noise(),
                        Answer::Pdu(pdu) => rtu_frame(unit, pdu),
                        Answer::As(other, pdu) => rtu_frame(other, pdu),
                        Answer::Noisy(pdu) => {
                            let mut bytes = noise();
                            bytes.extend(rtu_frame(unit, pdu));
                            bytes
                        }
                    };
                    stream.write_all(&reply).await?;
                    shared.replied(id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::register::{ByteOrder, DataType};
    use caudal_common::units::Unit;

    fn point(channel: Channel, address: u16, data_type: DataType, unit: Unit) -> Point {
        Point {
            channel,
            fc: Fc::Holding,
            address,
            data_type,
            order: ByteOrder::ABCD,
            scale: 1.0,
            offset: 0.0,
            unit,
            fraction_scale: 1e-9,
            overflow_factor: 1.0,
            overflow_address: None,
            rollover_at: None,
            water_column: None,
        }
    }

    #[test]
    fn crc_matches_the_specification_example() {
        // Modbus over serial line, §6.2.2 example: 02 07 -> CRC 0x1241 sent as 41 12.
        assert_eq!(crc16(&[0x02, 0x07]), 0x1241);
        // Read holding registers 01 03 00 00 00 01 -> 84 0A
        assert_eq!(
            crc16(&[0x01, 0x03, 0x00, 0x00, 0x00, 0x01]).to_le_bytes(),
            [0x84, 0x0A]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn totalizer_integrates_flow_over_elapsed_time() {
        let meter = SimulatedMeter::new(
            vec![point(Channel::Flow, 0, DataType::F32, Unit::LitrePerSecond)],
            Model::steady(10.0, 100.0, 5.0),
        );
        let sim = Simulator::new().with_unit(1, meter);
        let h = sim.handle();
        tokio::time::advance(Duration::from_secs(3600)).await;
        let s = h.snapshot(1).unwrap();
        assert!((s.total_m3 - 136.0).abs() < 1e-9, "{s:?}"); // 10 L/s for an hour = 36 m3
        assert_eq!((s.flow_lps, s.level_m), (10.0, 5.0));

        // The sinusoid integrates to zero over whole periods.
        let model = Model {
            flow_noise_lps: 0.0,
            ..Model::default()
        };
        h.set_model(1, model.clone());
        h.set_total(1, 0.0);
        tokio::time::advance(model.flow_period * 6).await;
        let s = h.snapshot(1).unwrap();
        let expect = model.flow_base_lps * model.flow_period.as_secs_f64() * 6.0 / 1000.0;
        assert!(
            (s.total_m3 - expect).abs() < 1e-6,
            "{} vs {expect}",
            s.total_m3
        );
    }

    #[tokio::test(start_paused = true)]
    async fn freeze_holds_values_while_the_process_goes_on() {
        let meter = SimulatedMeter::new(vec![], Model::steady(1.0, 0.0, 1.0));
        let sim = Simulator::new().with_unit(7, meter);
        let h = sim.handle();
        h.freeze(7, true);
        tokio::time::advance(Duration::from_secs(1000)).await;
        assert_eq!(h.snapshot(7).unwrap().total_m3, 0.0);
        h.freeze(7, false);
        assert!((h.snapshot(7).unwrap().total_m3 - 1.0).abs() < 1e-9);
        assert!(!h.freeze(8, true), "unit 8 is not simulated");
    }

    #[tokio::test(start_paused = true)]
    async fn reads_follow_the_map() {
        let points = vec![
            point(Channel::Flow, 10, DataType::F32, Unit::CubicMetrePerHour),
            point(Channel::Level, 14, DataType::U16, Unit::Centimetre),
        ];
        let sim = Simulator::new().with_unit(
            1,
            SimulatedMeter::new(points.clone(), Model::steady(10.0, 0.0, 2.5)),
        );
        let shared = Arc::clone(&sim.shared);
        let serving = sim.serving;
        let ask = |fc: u8, a: u16, n: u16| {
            let mut pdu = vec![fc];
            pdu.extend(a.to_be_bytes());
            pdu.extend(n.to_be_bytes());
            match shared.answer(1, &pdu, serving).0 {
                Answer::Pdu(p) => p,
                _ => panic!("no pdu"),
            }
        };
        // 10..15 with a hole at 12..14 reads as zero.
        let pdu = ask(3, 10, 5);
        assert_eq!(&pdu[..2], [3, 10]);
        let words: Vec<u16> = pdu[2..]
            .chunks(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
            .collect();
        assert!((points[0].decode(&words[..2]).unwrap() - 10.0).abs() < 1e-5);
        assert_eq!(words[2..], [0, 0, 250]);
        assert_eq!(ask(3, 9, 2), [0x83, 0x02], "unmapped start");
        assert_eq!(ask(4, 10, 2), [0x84, 0x02], "wrong function");
        assert_eq!(ask(3, 10, 0), [0x83, 0x03]);
        assert_eq!(ask(6, 10, 1), [0x86, 0x01], "writes are refused");
        let strict = Simulator::new().with_unit(
            1,
            SimulatedMeter::new(points, Model::default()).strict_map(true),
        );
        let pdu = [3, 0, 10, 0, 5];
        assert!(
            matches!(strict.shared.answer(1, &pdu, strict.serving).0, Answer::Pdu(p) if p == [0x83, 0x02])
        );
    }
}
