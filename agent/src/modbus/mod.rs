//! The Modbus bus client: one connection per physical bus, shared by every device on it.
//!
//! A [`BusClient`] is built from a [`Link`]: Modbus TCP (MBAP framing), RTU framing through a TCP
//! socket (serial-to-Ethernet converter in transparent mode), or RTU on a local serial port.
//! It reads registers and bits for any unit on the bus, one request at a time, and turns every
//! outcome into a [`ModbusError`] a caller can match: the device said no (exception), it did not
//! answer (timeout), it answered nonsense (bad frame), or the link itself failed (io).
//!
//! Replies are tied to their requests. On Modbus TCP the MBAP transaction id does that, and a
//! connection whose request failed (timeout, bad frame, I/O) is dropped, so a late answer goes
//! to the closed socket. RTU frames have no transaction id, so RTU links (serial, RTU over TCP
//! through a converter that keeps its serial side) use Caudal's own framing in [`rtu`]: the line
//! is drained when it is opened (until quiet for the longest device timeout, see
//! [`BusClient::connect`]), whatever it holds is discarded before every request, and a reply
//! must match the request's unit, function, byte count and CRC; everything else is discarded
//! and counted by cause ([`BusClient::take_discards`]). An RTU line stays open across timeouts
//! and bad frames (those cost the request's timeout and nothing more); it is reopened, and
//! drained again, only after the line itself failed.

pub mod rtu;

use crate::config::{Link, Parity};
use crate::register::{Fc, MAX_BITS_PER_READ, MAX_REGISTERS_PER_READ};
use rtu::{Discards, Exchange, Line, RtuTransport};
use std::io;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_modbus::client::{Client, Context};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{Request, Response, Slave};

/// Shortest silence that tells a newly opened RTU line holds no late reply any more.
pub const DRAIN_QUIET: Duration = Duration::from_millis(50);

/// Longest silence an open drain waits for, and longest it goes on discarding a chattering line.
pub const DRAIN_MAX: Duration = Duration::from_secs(2);

/// A read that failed, naming the bus, unit, function code and 0-based address.
#[derive(Debug, thiserror::Error)]
pub enum ModbusError {
    /// The link could not be opened: TCP connect refused or timed out, serial port missing.
    #[error("bus {bus}: cannot open {target}: {source}")]
    Connect {
        bus: String,
        target: String,
        #[source]
        source: io::Error,
    },
    /// The link's settings cannot be used (e.g. 9 data bits).
    #[error("bus {bus}: invalid link settings: {reason}")]
    InvalidLink { bus: String, reason: String },
    /// No answer within the timeout.
    #[error(
        "bus {bus}: unit {unit} {fc} address {address} count {count}: no answer within {timeout:?}"
    )]
    Timeout {
        bus: String,
        unit: u8,
        fc: Fc,
        address: u16,
        count: u16,
        timeout: Duration,
    },
    /// The device answered with a Modbus exception.
    #[error("bus {bus}: unit {unit} {fc} address {address}: exception {code:#04x} ({})", exception_name(*code))]
    Exception {
        bus: String,
        unit: u8,
        fc: Fc,
        address: u16,
        code: u8,
    },
    /// An answer arrived that is not a valid answer to the request.
    #[error("bus {bus}: unit {unit} {fc} address {address}: bad frame: {reason}")]
    BadFrame {
        bus: String,
        unit: u8,
        fc: Fc,
        address: u16,
        reason: String,
    },
    /// Bytes came back within the timeout, but none formed a valid reply (RTU line noise).
    #[error(
        "bus {bus}: unit {unit} {fc} address {address}: no valid reply within {timeout:?}, {noise} bytes of line noise"
    )]
    Noise {
        bus: String,
        unit: u8,
        fc: Fc,
        address: u16,
        timeout: Duration,
        noise: usize,
    },
    /// The transport failed while reading or writing.
    #[error("bus {bus}: unit {unit} {fc} address {address}: {source}")]
    Io {
        bus: String,
        unit: u8,
        fc: Fc,
        address: u16,
        #[source]
        source: io::Error,
    },
    /// The peer closed the connection.
    #[error("bus {bus}: unit {unit} {fc} address {address}: connection closed")]
    Disconnected {
        bus: String,
        unit: u8,
        fc: Fc,
        address: u16,
    },
    /// The request cannot be sent as asked (count 0 or above the protocol limit, broadcast unit
    /// on RTU, address range past 65535). A device would answer exception 03 to most of these.
    #[error("bus {bus}: unit {unit} {fc} address {address} count {count}: {reason}")]
    InvalidRequest {
        bus: String,
        unit: u8,
        fc: Fc,
        address: u16,
        count: u16,
        reason: &'static str,
    },
}

impl ModbusError {
    /// The metrics label: `timeout`, `exception`, `bad_frame` or `io` (also the device status's
    /// `result`). A request refused before it was sent counts as `exception`, the answer a
    /// device would have given. A label only: code that decides something matches the variants
    /// (or [`ModbusError::is_silent`], [`ModbusError::is_link_down`]).
    pub fn kind(&self) -> &'static str {
        match self {
            ModbusError::Timeout { .. } => "timeout",
            ModbusError::Exception { .. } | ModbusError::InvalidRequest { .. } => "exception",
            ModbusError::BadFrame { .. } | ModbusError::Noise { .. } => "bad_frame",
            ModbusError::Connect { .. }
            | ModbusError::InvalidLink { .. }
            | ModbusError::Io { .. }
            | ModbusError::Disconnected { .. } => "io",
        }
    }

    /// The link itself is down (not one device): the caller should back off the whole bus.
    /// The client reconnects by itself on the next read.
    pub fn is_link_down(&self) -> bool {
        matches!(
            self,
            ModbusError::Connect { .. }
                | ModbusError::InvalidLink { .. }
                | ModbusError::Io { .. }
                | ModbusError::Disconnected { .. }
        )
    }

    /// Nothing came back at all: the device did not answer in time, or the link is down. The
    /// rest of the same poll would fail the same way, so a caller stops there.
    pub fn is_silent(&self) -> bool {
        matches!(self, ModbusError::Timeout { .. }) || self.is_link_down()
    }

    /// Whether sending the same request again at once may succeed: the answer came back
    /// corrupted (bad frame), or the device said it is busy or failed for now (exceptions 04,
    /// 05, 06). Not after silence or noise (that costs another whole timeout), nor after a
    /// refusal that will not change (02 illegal address, 03 illegal value).
    pub fn is_worth_retrying(&self) -> bool {
        match self {
            ModbusError::BadFrame { .. } => true,
            ModbusError::Exception { code, .. } => matches!(code, 0x04..=0x06),
            _ => false,
        }
    }

    /// The exception code, when the device answered with one.
    pub fn exception_code(&self) -> Option<u8> {
        match self {
            ModbusError::Exception { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// The standard name of a Modbus exception code.
pub fn exception_name(code: u8) -> &'static str {
    match code {
        0x01 => "illegal function",
        0x02 => "illegal data address",
        0x03 => "illegal data value",
        0x04 => "server device failure",
        0x05 => "acknowledge",
        0x06 => "server device busy",
        0x08 => "memory parity error",
        0x0A => "gateway path unavailable",
        0x0B => "gateway target device failed to respond",
        _ => "non-standard",
    }
}

/// A human description of a link, for messages: `tcp 10.0.0.5:502`, `rtu /dev/ttyUSB0 19200 8E1`.
pub fn describe_link(link: &Link) -> String {
    link.to_string()
}

/// One connection to a physical bus. Requests are serialised by `&mut self`: a bus carries one
/// request at a time.
pub struct BusClient {
    bus: String,
    link: Link,
    connect_timeout: Duration,
    /// `None` after a failure: the next read reconnects.
    transport: Option<Transport>,
    /// How long a newly opened RTU line must stay quiet before the first request.
    open_quiet: Duration,
    inter_frame_gap: Duration,
    last_exchange: Option<Instant>,
    reconnects: u64,
    /// Discards of transports already dropped, not taken yet.
    discards: Discards,
    /// The RTU unit (and function) whose last request timed out, and until when its late
    /// reply may still come (one more timeout).
    late_window: Option<(u8, Fc, Instant)>,
}

/// The open transport of a bus.
enum Transport {
    /// Modbus TCP, through tokio-modbus (MBAP transaction ids match replies to requests).
    Tcp(Context),
    /// RTU framing on a serial port or a converter's socket.
    Rtu(RtuTransport),
}

impl std::fmt::Debug for BusClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusClient")
            .field("bus", &self.bus)
            .field("link", &describe_link(&self.link))
            .field("connected", &self.transport.is_some())
            .finish()
    }
}

impl BusClient {
    /// Opens the link. `timeout` bounds the TCP connect (and every later reconnect) and is how
    /// long a newly opened RTU line must stay quiet before the first request (clamped to
    /// [`DRAIN_QUIET`]..[`DRAIN_MAX`]): a reply to a request sent before the agent restarted
    /// can arrive until then. Give the longest response timeout of the bus's devices.
    pub async fn connect(
        bus_name: &str,
        link: &Link,
        timeout: Duration,
    ) -> Result<BusClient, ModbusError> {
        let mut client = BusClient {
            bus: bus_name.to_string(),
            link: link.clone(),
            connect_timeout: timeout,
            transport: None,
            open_quiet: timeout.clamp(DRAIN_QUIET, DRAIN_MAX),
            inter_frame_gap: Duration::ZERO,
            last_exchange: None,
            reconnects: 0,
            discards: Discards::default(),
            late_window: None,
        };
        client.transport =
            Some(Self::open(bus_name, link, client.connect_timeout, client.open_quiet).await?);
        Ok(client)
    }

    /// Silence kept between the end of one exchange and the next request (RS-485 turnaround,
    /// slow converters). Zero by default.
    pub fn set_inter_frame_gap(&mut self, gap: Duration) {
        self.inter_frame_gap = gap;
    }

    /// The bus's name, as given to [`BusClient::connect`].
    pub fn bus(&self) -> &str {
        &self.bus
    }

    /// How many times the transport was reopened after a failure.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// Received bytes thrown away since the last call, by cause (RTU links; always empty on
    /// Modbus TCP).
    pub fn take_discards(&mut self) -> Discards {
        let mut all = std::mem::take(&mut self.discards);
        if let Some(Transport::Rtu(t)) = &mut self.transport {
            all.merge(t.take_discards());
        }
        all
    }

    fn is_rtu(&self) -> bool {
        !matches!(self.link, Link::Tcp { .. })
    }

    // Takes the parts it needs rather than `&self`: the client holds a transport that is
    // `Send` but not `Sync`, and a borrow of it held across an await would make every poller
    // future non-`Send`.
    async fn open(
        bus: &str,
        link: &Link,
        connect_timeout: Duration,
        open_quiet: Duration,
    ) -> Result<Transport, ModbusError> {
        let connect_err = |source: io::Error| ModbusError::Connect {
            bus: bus.to_string(),
            target: describe_link(link),
            source,
        };
        match link {
            Link::Tcp { address } => {
                let stream = tcp_connect(address, connect_timeout)
                    .await
                    .map_err(connect_err)?;
                Ok(Transport::Tcp(tokio_modbus::client::tcp::attach(stream)))
            }
            Link::RtuOverTcp { address } => {
                let mut stream = tcp_connect(address, connect_timeout)
                    .await
                    .map_err(connect_err)?;
                let drained = drain_quiet(&mut stream, open_quiet)
                    .await
                    .map_err(connect_err)?;
                Ok(Transport::Rtu(rtu_transport(
                    bus,
                    Box::new(stream),
                    drained,
                )))
            }
            Link::Rtu {
                port,
                baud,
                parity,
                data_bits,
                stop_bits,
            } => {
                let invalid = |reason: String| ModbusError::InvalidLink {
                    bus: bus.to_string(),
                    reason,
                };
                let data_bits = match data_bits {
                    5 => tokio_serial::DataBits::Five,
                    6 => tokio_serial::DataBits::Six,
                    7 => tokio_serial::DataBits::Seven,
                    8 => tokio_serial::DataBits::Eight,
                    n => return Err(invalid(format!("data bits {n}; use 5 to 8"))),
                };
                let stop_bits = match stop_bits {
                    1 => tokio_serial::StopBits::One,
                    2 => tokio_serial::StopBits::Two,
                    n => return Err(invalid(format!("stop bits {n}; use 1 or 2"))),
                };
                let parity = match parity {
                    Parity::None => tokio_serial::Parity::None,
                    Parity::Even => tokio_serial::Parity::Even,
                    Parity::Odd => tokio_serial::Parity::Odd,
                };
                let builder = tokio_serial::new(port.to_string_lossy(), *baud)
                    .data_bits(data_bits)
                    .stop_bits(stop_bits)
                    .parity(parity);
                let mut stream = tokio_serial::SerialStream::open(&builder)
                    .map_err(|e| connect_err(io::Error::from(e)))?;
                // What the port buffered while nobody read it, then what is still on its way.
                let flushed = stream.discard_pending().map_err(connect_err)?;
                let drained = drain_quiet(&mut stream, open_quiet)
                    .await
                    .map_err(connect_err)?;
                Ok(Transport::Rtu(rtu_transport(
                    bus,
                    Box::new(stream),
                    flushed + drained,
                )))
            }
        }
    }

    /// Reads `count` registers (fc 03/04) or bits (fc 01/02, returned as 0/1 words) from
    /// `unit`, starting at the 0-based `address`. `timeout` bounds the exchange. After the
    /// link failed the transport is reopened first, bounded by the connect timeout, and an RTU
    /// line drained (see the module doc).
    pub async fn read(
        &mut self,
        unit: u8,
        fc: Fc,
        address: u16,
        count: u16,
        timeout: Duration,
    ) -> Result<Vec<u16>, ModbusError> {
        let invalid = |reason| ModbusError::InvalidRequest {
            bus: self.bus.clone(),
            unit,
            fc,
            address,
            count,
            reason,
        };
        let limit = if fc.is_bits() {
            MAX_BITS_PER_READ
        } else {
            MAX_REGISTERS_PER_READ
        };
        if count == 0 || count > limit {
            return Err(invalid(
                "count outside the protocol's limit for this function",
            ));
        }
        if u32::from(address) + u32::from(count) > 0x1_0000 {
            return Err(invalid("range runs past address 65535"));
        }
        if unit == 0 && self.is_rtu() {
            return Err(invalid("unit 0 is broadcast on RTU and never answers"));
        }

        if let Some(last) = self
            .last_exchange
            .filter(|_| !self.inter_frame_gap.is_zero())
        {
            tokio::time::sleep_until(last + self.inter_frame_gap).await;
        }
        let transport = match self.transport.take() {
            Some(t) => t,
            None => {
                let t = Self::open(&self.bus, &self.link, self.connect_timeout, self.open_quiet)
                    .await?;
                self.reconnects += 1;
                t
            }
        };
        let (transport, result) = match transport {
            Transport::Tcp(ctx) => {
                let (ctx, result) =
                    Self::read_tcp(&self.bus, ctx, unit, fc, address, count, timeout).await;
                (ctx.map(Transport::Tcp), result)
            }
            Transport::Rtu(mut rtu) => {
                if let Some((late_unit, late_fc, until)) = self.late_window.take() {
                    if late_unit == unit && Instant::now() < until {
                        if let Err(e) = rtu.discard_late_reply(unit, late_fc.code(), until).await {
                            self.discards.merge(rtu.take_discards());
                            return Err(io_error(&self.bus, unit, fc, address, e));
                        }
                    }
                }
                let (mut rtu, result) =
                    Self::read_rtu(&self.bus, rtu, unit, fc, address, count, timeout).await;
                if matches!(result, Err(ModbusError::Timeout { .. })) {
                    self.late_window = Some((unit, fc, Instant::now() + timeout));
                }
                if result.as_ref().is_err_and(ModbusError::is_link_down) {
                    // The line failed: reopened (and drained) by the next read. What it
                    // discarded is still counted.
                    self.discards.merge(rtu.take_discards());
                    (None, result)
                } else {
                    (Some(Transport::Rtu(rtu)), result)
                }
            }
        };
        self.last_exchange = Some(Instant::now());
        if let (Err(e), None) = (&result, &transport) {
            tracing::debug!(bus = %self.bus, unit, %fc, address, error = %e, "dropping transport");
        }
        self.transport = transport;
        result
    }

    /// One Modbus TCP exchange; the context comes back unless the connection is in doubt (an
    /// exception is a complete, well-formed exchange; anything else but success is not).
    async fn read_tcp(
        bus: &str,
        mut ctx: Context,
        unit: u8,
        fc: Fc,
        address: u16,
        count: u16,
        timeout: Duration,
    ) -> (Option<Context>, Result<Vec<u16>, ModbusError>) {
        ctx.set_slave(Slave(unit));
        let request = match fc {
            Fc::Coils => Request::ReadCoils(address, count),
            Fc::DiscreteInputs => Request::ReadDiscreteInputs(address, count),
            Fc::Holding => Request::ReadHoldingRegisters(address, count),
            Fc::Input => Request::ReadInputRegisters(address, count),
        };
        let outcome = tokio::time::timeout(timeout, ctx.call(request)).await;
        let bad_frame = |reason: String| ModbusError::BadFrame {
            bus: bus.to_string(),
            unit,
            fc,
            address,
            reason,
        };
        let result = match outcome {
            Err(_elapsed) => Err(timeout_error(bus, unit, fc, address, count, timeout)),
            Ok(Ok(Ok(response))) => words_of(response, fc, count).map_err(bad_frame),
            Ok(Ok(Err(exception))) => Err(ModbusError::Exception {
                bus: bus.to_string(),
                unit,
                fc,
                address,
                code: u8::from(exception),
            }),
            Ok(Err(tokio_modbus::Error::Protocol(e))) => Err(bad_frame(e.to_string())),
            Ok(Err(tokio_modbus::Error::Transport(e))) => Err(match e.kind() {
                io::ErrorKind::InvalidData
                | io::ErrorKind::InvalidInput
                | io::ErrorKind::UnexpectedEof => bad_frame(e.to_string()),
                _ => io_error(bus, unit, fc, address, e),
            }),
        };
        match &result {
            Ok(_) | Err(ModbusError::Exception { .. }) => (Some(ctx), result),
            Err(_) => (None, result),
        }
    }

    /// One RTU exchange. The caller keeps the line after a timeout or a bad frame (the next
    /// request discards whatever arrives late, see [`rtu`]) and drops it when the line failed.
    async fn read_rtu(
        bus: &str,
        mut rtu: RtuTransport,
        unit: u8,
        fc: Fc,
        address: u16,
        count: u16,
        timeout: Duration,
    ) -> (RtuTransport, Result<Vec<u16>, ModbusError>) {
        let want = if fc.is_bits() {
            usize::from(count.div_ceil(8))
        } else {
            usize::from(count) * 2
        };
        let deadline = Instant::now() + timeout;
        let bad_frame = |reason: String| ModbusError::BadFrame {
            bus: bus.to_string(),
            unit,
            fc,
            address,
            reason,
        };
        let result = match rtu
            .read(unit, fc.code(), address, count, want, deadline)
            .await
        {
            Ok(Exchange::Data(bytes)) => Ok(if fc.is_bits() {
                (0..usize::from(count))
                    .map(|i| u16::from(bytes[i / 8] >> (i % 8) & 1))
                    .collect()
            } else {
                bytes
                    .chunks_exact(2)
                    .map(|w| u16::from_be_bytes([w[0], w[1]]))
                    .collect()
            }),
            Ok(Exchange::Exception(code)) => Err(ModbusError::Exception {
                bus: bus.to_string(),
                unit,
                fc,
                address,
                code,
            }),
            Ok(Exchange::WrongLength { got, want }) => Err(bad_frame(format!(
                "reply carries {got} data bytes for {want} asked"
            ))),
            Ok(Exchange::NoReply { noise: 0 }) => {
                Err(timeout_error(bus, unit, fc, address, count, timeout))
            }
            Ok(Exchange::NoReply { noise }) => Err(ModbusError::Noise {
                bus: bus.to_string(),
                unit,
                fc,
                address,
                timeout,
                noise,
            }),
            Err(e) => Err(io_error(bus, unit, fc, address, e)),
        };
        (rtu, result)
    }
}

fn timeout_error(
    bus: &str,
    unit: u8,
    fc: Fc,
    address: u16,
    count: u16,
    timeout: Duration,
) -> ModbusError {
    ModbusError::Timeout {
        bus: bus.to_string(),
        unit,
        fc,
        address,
        count,
        timeout,
    }
}

fn io_error(bus: &str, unit: u8, fc: Fc, address: u16, e: io::Error) -> ModbusError {
    match e.kind() {
        io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::NotConnected
        | io::ErrorKind::UnexpectedEof => ModbusError::Disconnected {
            bus: bus.to_string(),
            unit,
            fc,
            address,
        },
        _ => ModbusError::Io {
            bus: bus.to_string(),
            unit,
            fc,
            address,
            source: e,
        },
    }
}

/// An RTU transport on a newly opened line, counting what the open drain threw away.
fn rtu_transport(bus: &str, line: Box<dyn Line>, drained: usize) -> RtuTransport {
    let mut t = RtuTransport::new(line);
    if drained > 0 {
        tracing::info!(
            bus,
            bytes = drained,
            "discarded bytes found on the line when it was opened"
        );
        t.count_stale();
    }
    t
}

/// The words of a response, checked against what was asked.
fn words_of(response: Response, fc: Fc, count: u16) -> Result<Vec<u16>, String> {
    let want = usize::from(count);
    let words: Vec<u16> = match (fc, response) {
        (Fc::Coils, Response::ReadCoils(bits))
        | (Fc::DiscreteInputs, Response::ReadDiscreteInputs(bits)) => {
            if bits.len() < want {
                return Err(format!("{} bits for {count} asked", bits.len()));
            }
            bits.into_iter().take(want).map(u16::from).collect()
        }
        (Fc::Holding, Response::ReadHoldingRegisters(words))
        | (Fc::Input, Response::ReadInputRegisters(words)) => words,
        (_, other) => return Err(format!("answer of another function: {other:?}")),
    };
    if words.len() != want {
        return Err(format!("{} registers for {count} asked", words.len()));
    }
    Ok(words)
}

async fn tcp_connect(address: &str, timeout: Duration) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(address))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no connection within {timeout:?}"),
            )
        })??;
    // Requests are small and latency-bound.
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Reads and discards whatever arrives until the line has been quiet for `quiet`, or
/// [`DRAIN_MAX`] past that on a line that never goes quiet.
async fn drain_quiet<T: AsyncRead + Unpin>(stream: &mut T, quiet: Duration) -> io::Result<usize> {
    let deadline = Instant::now() + quiet + DRAIN_MAX;
    let mut buf = [0u8; 256];
    let mut dropped = 0;
    while Instant::now() < deadline {
        match tokio::time::timeout(quiet, stream.read(&mut buf)).await {
            Err(_quiet) => break,
            Ok(Ok(0)) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed while draining",
                ));
            }
            Ok(Ok(n)) => dropped += n,
            Ok(Err(e)) => return Err(e),
        }
    }
    if dropped > 0 {
        tracing::debug!(dropped, "discarded late bytes after resync");
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_no_answer_at_all_is_silent() {
        let (bus, unit, fc, address) = ("rs485".to_string(), 1, Fc::Holding, 0);
        let timeout = ModbusError::Timeout {
            bus: bus.clone(),
            unit,
            fc,
            address,
            count: 2,
            timeout: Duration::from_millis(500),
        };
        let closed = ModbusError::Disconnected {
            bus: bus.clone(),
            unit,
            fc,
            address,
        };
        let exception = ModbusError::Exception {
            bus: bus.clone(),
            unit,
            fc,
            address,
            code: 2,
        };
        let bad_frame = ModbusError::BadFrame {
            bus,
            unit,
            fc,
            address,
            reason: "crc".into(),
        };
        assert!(timeout.is_silent() && closed.is_silent());
        assert!(
            !exception.is_silent() && !bad_frame.is_silent(),
            "the device answered"
        );
        let labels = [&timeout, &closed, &exception, &bad_frame].map(ModbusError::kind);
        assert_eq!(labels, ["timeout", "io", "exception", "bad_frame"]);
    }
}
