//! Modbus RTU framing for the bus client: one request out, the reply that belongs to it back.
//!
//! RTU frames (unit, PDU, CRC) carry no transaction id, so a reply cannot say which request it
//! answers. A late reply (a slow device after its timeout, or a request sent by an agent that
//! was killed before the answer came) sits in the port's buffer and would be taken for the
//! answer to the next request, and every reply after it would be one request behind. Two rules
//! keep a reply tied to its request:
//!
//! - **Nothing received before a request is sent can answer it.** Every request starts by
//!   discarding what the line holds ([`Line::discard_pending`]: `tcflush` on a serial port, a
//!   non-blocking read on a socket), counted as [`Discard::Stale`]. When a line is opened it is
//!   first drained until it has been quiet for the longest timeout of its devices (the bus
//!   client does that), so a reply still on its way from before a crash is gone too.
//! - **A reply must match the request**: unit id, function code (or its exception), byte count
//!   and CRC. Bytes that form no valid frame are line noise ([`Discard::Noise`]); a valid frame
//!   for another unit or function is someone else's reply ([`Discard::OtherUnit`],
//!   [`Discard::OtherFunction`]); each is thrown away and the wait goes on until the request's
//!   deadline. A valid frame from the right unit with the wrong byte count ends the exchange as
//!   a bad frame: the device answered, wrongly, and nothing better will come.
//!
//! - **A unit asked again right after it timed out** may still be sending its late reply, which
//!   would match the new request in every field. So a request to a unit within one timeout of
//!   that unit's timeout first waits for the late reply (or the end of that window) and throws
//!   it away ([`RtuTransport::discard_late_reply`]). The poller never asks a device again
//!   within its poll after a timeout, so this wait is not part of a dead device's cost.
//!
//! What remains ambiguous is a reply that arrives more than twice its timeout after the
//! request and after the next request to the same unit was sent.

use std::io;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

/// Longest reply frame: unit, fc, byte count, 250 data bytes (125 registers), CRC.
const MAX_FRAME: usize = 256;
/// Bytes kept while looking for a reply; older bytes of a chattering line are noise.
const MAX_BUFFER: usize = 4 * MAX_FRAME;

/// A byte stream that carries RTU frames: a serial port, or a TCP socket to a transparent
/// serial-to-Ethernet converter.
pub trait Line: AsyncRead + AsyncWrite + Unpin + Send {
    /// Throws away the bytes received and not read yet, without waiting; returns how many.
    fn discard_pending(&mut self) -> io::Result<usize>;
}

impl Line for tokio::net::TcpStream {
    fn discard_pending(&mut self) -> io::Result<usize> {
        let mut buf = [0u8; 512];
        let mut dropped = 0;
        loop {
            match self.try_read(&mut buf) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "connection closed by the converter",
                    ));
                }
                Ok(n) => dropped += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(dropped),
                Err(e) => return Err(e),
            }
        }
    }
}

impl Line for tokio_serial::SerialStream {
    fn discard_pending(&mut self) -> io::Result<usize> {
        use tokio_serial::SerialPort;
        let waiting = self.bytes_to_read().map_err(io::Error::from)?;
        self.clear(tokio_serial::ClearBuffer::Input)
            .map_err(io::Error::from)?;
        Ok(usize::try_from(waiting).unwrap_or(usize::MAX))
    }
}

/// Why received bytes were thrown away instead of taken as the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Discard {
    /// Already on the line when the request was sent: the answer to an earlier request.
    Stale,
    /// A valid frame from another unit.
    OtherUnit,
    /// A valid frame from the right unit for another function.
    OtherFunction,
    /// Bytes that form no valid frame (wrong CRC, truncated, garbage).
    Noise,
}

impl Discard {
    pub const ALL: [Discard; 4] = [
        Discard::Stale,
        Discard::OtherUnit,
        Discard::OtherFunction,
        Discard::Noise,
    ];

    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Discard::Stale => "stale",
            Discard::OtherUnit => "other_unit",
            Discard::OtherFunction => "other_function",
            Discard::Noise => "noise",
        }
    }
}

/// Discards since they were last taken, by cause: how many times bytes were thrown away (not
/// how many bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Discards([u64; 4]);

impl Discards {
    pub fn add(&mut self, cause: Discard) {
        self.0[cause as usize] += 1;
    }
    pub fn merge(&mut self, other: Discards) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
    }
    pub fn get(&self, cause: Discard) -> u64 {
        self.0[cause as usize]
    }
    pub fn iter(&self) -> impl Iterator<Item = (Discard, u64)> + '_ {
        Discard::ALL
            .into_iter()
            .map(|d| (d, self.get(d)))
            .filter(|(_, n)| *n > 0)
    }
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|n| *n == 0)
    }
}

/// How a request ended on the wire.
#[derive(Debug)]
pub enum Exchange {
    /// The reply's data bytes (after the byte count).
    Data(Vec<u8>),
    /// The device answered with this exception code.
    Exception(u8),
    /// A valid reply from the unit for the function, with another byte count.
    WrongLength { got: usize, want: usize },
    /// The deadline passed without a reply; `noise` bytes that formed no frame arrived.
    NoReply { noise: usize },
}

/// RTU framing over one line.
pub struct RtuTransport {
    line: Box<dyn Line>,
    buf: Vec<u8>,
    discards: Discards,
}

impl std::fmt::Debug for RtuTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RtuTransport")
            .field("buffered", &self.buf.len())
            .field("discards", &self.discards)
            .finish()
    }
}

impl RtuTransport {
    pub fn new(line: Box<dyn Line>) -> RtuTransport {
        RtuTransport {
            line,
            buf: Vec::with_capacity(MAX_FRAME),
            discards: Discards::default(),
        }
    }

    /// Counts bytes drained from the line when it was opened (an earlier request's reply).
    pub fn count_stale(&mut self) {
        self.discards.add(Discard::Stale);
    }

    /// The discards since the last call.
    pub fn take_discards(&mut self) -> Discards {
        std::mem::take(&mut self.discards)
    }

    /// Waits, until `until` at most, for the late reply of `unit` to a request that timed out,
    /// and throws it away; returns as soon as it came. Whatever else arrives meanwhile is
    /// discarded too.
    pub async fn discard_late_reply(&mut self, unit: u8, fc: u8, until: Instant) -> io::Result<()> {
        let mut chunk = [0u8; MAX_FRAME];
        loop {
            while let Scan::Found { start, len, frame } = scan(&self.buf, unit, fc) {
                self.buf.drain(..start + len);
                self.discards.add(Discard::Stale);
                if frame != Frame::Other(Discard::OtherUnit) {
                    return Ok(());
                }
            }
            match tokio::time::timeout_at(until, self.line.read(&mut chunk)).await {
                Err(_window_over) => return Ok(()),
                Ok(Ok(0)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "line closed while waiting for a late reply",
                    ));
                }
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => return Err(e),
            }
        }
    }

    /// Sends a read request and waits until `deadline` for the reply that answers it.
    /// `want` is the reply's byte count (2 per register, 1 per 8 bits). Errors are the line's.
    pub async fn read(
        &mut self,
        unit: u8,
        fc: u8,
        address: u16,
        count: u16,
        want: usize,
        deadline: Instant,
    ) -> io::Result<Exchange> {
        let stale = self.line.discard_pending()? + self.buf.len();
        self.buf.clear();
        if stale > 0 {
            tracing::debug!(
                unit,
                bytes = stale,
                "discarded bytes received before the request"
            );
            self.discards.add(Discard::Stale);
        }
        let mut request = Vec::with_capacity(8);
        request.push(unit);
        request.push(fc);
        request.extend(address.to_be_bytes());
        request.extend(count.to_be_bytes());
        request.extend(crc16(&request).to_le_bytes());
        self.line.write_all(&request).await?;
        self.line.flush().await?;

        let mut chunk = [0u8; MAX_FRAME];
        loop {
            let n = match tokio::time::timeout_at(deadline, self.line.read(&mut chunk)).await {
                Err(_deadline) => {
                    let noise = self.buf.len();
                    if noise > 0 {
                        self.discards.add(Discard::Noise);
                        self.buf.clear();
                    }
                    return Ok(Exchange::NoReply { noise });
                }
                Ok(r) => r?,
            };
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "line closed while waiting for a reply",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
            loop {
                match scan(&self.buf, unit, fc) {
                    Scan::Incomplete => {
                        if self.buf.len() > MAX_BUFFER {
                            let cut = self.buf.len() - MAX_BUFFER;
                            self.buf.drain(..cut);
                            self.discards.add(Discard::Noise);
                        }
                        break;
                    }
                    Scan::Found { start, len, frame } => {
                        if start > 0 {
                            self.discards.add(Discard::Noise);
                        }
                        let bytes: Vec<u8> = self.buf.drain(..start + len).skip(start).collect();
                        match frame {
                            Frame::Other(cause) => {
                                tracing::debug!(
                                    unit,
                                    cause = cause.label(),
                                    "discarded a frame that is not the reply"
                                );
                                self.discards.add(cause);
                            }
                            Frame::Exception(code) => return Ok(Exchange::Exception(code)),
                            Frame::Reply => {
                                // unit, fc, byte count | data | crc
                                let data = bytes[3..bytes.len() - 2].to_vec();
                                if data.len() != want {
                                    return Ok(Exchange::WrongLength {
                                        got: data.len(),
                                        want,
                                    });
                                }
                                // What follows the reply in the same read is not ours either.
                                if !self.buf.is_empty() {
                                    self.discards.add(Discard::Noise);
                                    self.buf.clear();
                                }
                                return Ok(Exchange::Data(data));
                            }
                        }
                    }
                }
            }
        }
    }
}

/// What a complete, CRC-valid frame in the buffer is.
#[derive(Debug, PartialEq, Eq)]
enum Frame {
    /// The unit's reply to the function (its byte count still to check).
    Reply,
    /// The unit's exception for the function.
    Exception(u8),
    /// Someone else's.
    Other(Discard),
}

#[derive(Debug, PartialEq, Eq)]
enum Scan {
    /// No complete valid frame yet.
    Incomplete,
    /// The first complete valid frame, at `start` (bytes before it are noise).
    Found {
        start: usize,
        len: usize,
        frame: Frame,
    },
}

/// Finds the first complete, CRC-valid read-reply frame in `buf` and says whose it is.
fn scan(buf: &[u8], unit: u8, fc: u8) -> Scan {
    for start in 0..buf.len() {
        let rest = &buf[start..];
        let Some(&frame_fc) = rest.get(1) else {
            break;
        };
        let len = if frame_fc & 0x80 != 0 {
            5
        } else if (0x01..=0x04).contains(&frame_fc) {
            match rest.get(2) {
                Some(&byte_count) => 5 + usize::from(byte_count),
                None => continue,
            }
        } else {
            continue;
        };
        if rest.len() < len {
            continue;
        }
        let crc = u16::from_le_bytes([rest[len - 2], rest[len - 1]]);
        if crc16(&rest[..len - 2]) != crc {
            continue;
        }
        let frame = if rest[0] != unit {
            Frame::Other(Discard::OtherUnit)
        } else if frame_fc == fc | 0x80 {
            Frame::Exception(rest[2])
        } else if frame_fc != fc {
            Frame::Other(Discard::OtherFunction)
        } else {
            Frame::Reply
        };
        return Scan::Found { start, len, frame };
    }
    Scan::Incomplete
}

/// Modbus CRC-16 (polynomial 0xA001 reflected, initial 0xFFFF), sent low byte first.
pub fn crc16(bytes: &[u8]) -> u16 {
    let mut crc = 0xFFFF_u16;
    for b in bytes {
        crc ^= u16::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xA001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(bytes: &[u8]) -> Vec<u8> {
        let mut f = bytes.to_vec();
        f.extend(crc16(bytes).to_le_bytes());
        f
    }

    #[test]
    fn crc_matches_the_specification_example() {
        assert_eq!(crc16(&[0x02, 0x07]), 0x1241);
    }

    #[test]
    fn the_reply_is_found_behind_noise_and_other_frames() {
        let ours = frame(&[0x05, 0x03, 0x04, 0x41, 0x48, 0x00, 0x00]);
        let other_unit = frame(&[0x06, 0x03, 0x04, 1, 2, 3, 4]);
        assert_eq!(
            scan(&ours, 5, 3),
            Scan::Found {
                start: 0,
                len: 9,
                frame: Frame::Reply
            }
        );
        let mut line = vec![0xFF, 0x00, 0x13];
        line.extend(&other_unit);
        line.extend(&ours);
        assert_eq!(
            scan(&line, 5, 3),
            Scan::Found {
                start: 3,
                len: 9,
                frame: Frame::Other(Discard::OtherUnit)
            },
            "the other unit's frame comes first; the caller drops it and scans again"
        );
        assert_eq!(
            scan(&line[3 + 9..], 5, 3),
            Scan::Found {
                start: 0,
                len: 9,
                frame: Frame::Reply
            }
        );
    }

    #[test]
    fn exceptions_other_functions_and_truncated_frames() {
        let exception = frame(&[0x05, 0x83, 0x02]);
        assert_eq!(
            scan(&exception, 5, 3),
            Scan::Found {
                start: 0,
                len: 5,
                frame: Frame::Exception(2)
            }
        );
        let input_reply = frame(&[0x05, 0x04, 0x02, 0, 1]);
        assert_eq!(
            scan(&input_reply, 5, 3),
            Scan::Found {
                start: 0,
                len: 7,
                frame: Frame::Other(Discard::OtherFunction)
            }
        );
        let ours = frame(&[0x05, 0x03, 0x02, 0, 1]);
        assert_eq!(scan(&ours[..6], 5, 3), Scan::Incomplete);
        let mut corrupt = ours.clone();
        corrupt[4] ^= 0x40;
        assert_eq!(scan(&corrupt, 5, 3), Scan::Incomplete, "bad CRC");
    }

    #[test]
    fn an_echoed_request_is_not_a_reply() {
        // Some RS-485 adapters echo what is sent; a request is never a valid read reply.
        let request = frame(&[0x05, 0x03, 0x0B, 0xBA, 0x00, 0x02]);
        assert_eq!(scan(&request, 5, 3), Scan::Incomplete);
    }
}
