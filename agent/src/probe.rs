//! Technician tools: read registers now and show every way to read them, read a configured
//! device through its profile, and find which unit ids answer on a bus.
//!
//! These are library functions returning printable reports (`Display`); the command line only
//! wires them up. They open their own [`BusClient`], so they must not run against a bus the
//! poller is using at the same moment on a serial line (two masters on one RS-485 pair collide).

use crate::config::{Device, Link};
use crate::modbus::{BusClient, ModbusError, describe_link, exception_name};
use crate::register::{ByteOrder, Channel, DataType, Fc, Point, RawValue, assemble, plan_reads};
use caudal_common::units::{Dimension, Unit};
use std::fmt;
use std::ops::RangeInclusive;
use std::time::Duration;

/// Bus name the tools use in messages.
const PROBE_BUS: &str = "probe";

/// One way of reading the probed registers.
#[derive(Debug, Clone, PartialEq)]
pub struct Interpretation {
    pub data_type: DataType,
    pub order: ByteOrder,
    pub value: RawValue,
    /// Why the value cannot be what the meter means (NaN, denormal, absurd), if it cannot.
    pub flag: Option<&'static str>,
}

/// Registers read now, and what they would mean as every primitive type in every byte order.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeReport {
    pub link: String,
    pub unit: u8,
    pub fc: Fc,
    pub address: u16,
    pub registers: Vec<u16>,
    pub interpretations: Vec<Interpretation>,
}

/// Every primitive type that fits in `registers` (from the first one), in every byte order
/// that makes a difference: 16-bit values only have the byte swap.
pub fn interpret(registers: &[u16]) -> Vec<Interpretation> {
    let mut out = Vec::new();
    for t in DataType::PRIMITIVES {
        let n = usize::from(t.registers());
        if registers.len() < n {
            continue;
        }
        for order in ByteOrder::ALL {
            if n == 1 && matches!(order, ByteOrder::CDAB | ByteOrder::DCBA) {
                continue;
            }
            if let Some(value) = RawValue::decode(t, order, &registers[..n]) {
                out.push(Interpretation {
                    data_type: t,
                    order,
                    value,
                    flag: value.implausibility(),
                });
            }
        }
    }
    out
}

/// Reads `count` registers (or bits) from `unit` now and interprets them.
pub async fn probe(
    link: &Link,
    unit: u8,
    fc: Fc,
    address: u16,
    count: u16,
    timeout: Duration,
) -> Result<ProbeReport, ModbusError> {
    let mut client = BusClient::connect(PROBE_BUS, link, timeout).await?;
    let registers = client.read(unit, fc, address, count, timeout).await?;
    let interpretations = if fc.is_bits() {
        Vec::new()
    } else {
        interpret(&registers)
    };
    Ok(ProbeReport {
        link: describe_link(link),
        unit,
        fc,
        address,
        registers,
        interpretations,
    })
}

impl fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}  unit {}  {}  address {}  count {}",
            self.link,
            self.unit,
            self.fc,
            self.address,
            self.registers.len()
        )?;
        if self.fc.is_bits() {
            writeln!(f, "{:>7}  bit", "addr")?;
            for (i, b) in self.registers.iter().enumerate() {
                writeln!(f, "{:>7}  {}", usize::from(self.address) + i, b)?;
            }
            return Ok(());
        }
        writeln!(f, "{:>7}  {:>6}  {:>6}", "addr", "hex", "dec")?;
        for (i, r) in self.registers.iter().enumerate() {
            writeln!(f, "{:>7}  0x{r:04X}  {r:>6}", usize::from(self.address) + i)?;
        }
        writeln!(
            f,
            "{:<4} {:<5} {:>24}  (from address {})",
            "type", "order", "value", self.address
        )?;
        for i in &self.interpretations {
            write!(
                f,
                "{:<4} {:<5} {:>24}",
                i.data_type.name(),
                i.order,
                i.value.to_string()
            )?;
            match i.flag {
                Some(flag) => writeln!(f, "  {flag}")?,
                None => writeln!(f)?,
            }
        }
        Ok(())
    }
}

/// The name of the unit `channel`'s values in `unit` are stored in: the canonical unit of the
/// dimension for flow, total and level, the unit itself for every other channel (kept as read).
fn stored_unit_name(channel: &Channel, unit: Unit) -> &'static str {
    if !channel.is_canonical() {
        return unit.name();
    }
    match unit.dimension() {
        Dimension::Flow => "L/s",
        Dimension::Volume => "m3",
        Dimension::Length => "m",
        Dimension::Other => unit.name(),
    }
}

/// One profile point of a probed device.
#[derive(Debug, Clone, PartialEq)]
pub struct PointProbe {
    pub channel: Channel,
    pub fc: Fc,
    pub address: u16,
    pub data_type: DataType,
    pub order: ByteOrder,
    /// The words read for the point (`None` when its read failed).
    pub words: Option<Vec<u16>>,
    /// Value in the point's unit (what the display shows) and as stored (canonical units for
    /// flow, total and level), or why not.
    pub value: Result<(f64, f64), String>,
    pub unit: Unit,
}

/// A configured device read through its profile.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceProbe {
    pub link: String,
    pub device: String,
    pub unit: u8,
    pub profile: String,
    pub points: Vec<PointProbe>,
}

/// Reads every point of `device` once, as the poller would (same read plan), without retries.
/// Fails only when the link cannot be opened; a failed read is reported on its points.
pub async fn probe_device(
    link: &Link,
    device: &Device,
    timeout: Duration,
) -> Result<DeviceProbe, ModbusError> {
    let mut client = BusClient::connect(PROBE_BUS, link, timeout).await?;
    let blocks = plan_reads(&device.points, device.max_regs_per_read);
    let mut replies = Vec::with_capacity(blocks.len());
    let mut failures = vec![None; device.points.len()];
    for b in &blocks {
        match client
            .read(device.unit, b.fc, b.address, b.count, timeout)
            .await
        {
            Ok(words) => replies.push(Some(words)),
            Err(e) => {
                for piece in &b.pieces {
                    failures[piece.point] = Some(e.to_string());
                }
                replies.push(None);
            }
        }
    }
    let words = assemble(device.points.len(), &blocks, &replies);
    let points = device
        .points
        .iter()
        .zip(words)
        .zip(failures)
        .map(|((p, words), failure)| PointProbe {
            value: match (&words, failure) {
                (_, Some(e)) => Err(e),
                (Some(w), None) => decode_point(p, w),
                (None, None) => Err("not read".to_string()),
            },
            channel: p.channel.clone(),
            fc: p.fc,
            address: p.address,
            data_type: p.data_type,
            order: p.order,
            unit: p.unit,
            words,
        })
        .collect();
    Ok(DeviceProbe {
        link: describe_link(link),
        device: device.id.to_string(),
        unit: device.unit,
        profile: device.profile.clone(),
        points,
    })
}

fn decode_point(p: &Point, words: &[u16]) -> Result<(f64, f64), String> {
    let in_unit = p.decode_in_unit(words).map_err(|e| e.to_string())?;
    Ok((in_unit, p.to_stored(in_unit)))
}

impl fmt::Display for DeviceProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}  device {}  unit {}  profile {}",
            self.link, self.device, self.unit, self.profile
        )?;
        for p in &self.points {
            let words = match &p.words {
                Some(w) => w
                    .iter()
                    .map(|w| format!("{w:04X}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                None => "-".to_string(),
            };
            write!(
                f,
                "{:<10} {} {:>5} {:<16} {:<4} [{words}]  ",
                p.channel.to_string(),
                p.fc,
                p.address,
                p.data_type.name(),
                p.order
            )?;
            match &p.value {
                Ok((in_unit, canonical)) => {
                    let canonical_unit = stored_unit_name(&p.channel, p.unit);
                    write!(f, "{in_unit} {}", p.unit)?;
                    if canonical_unit != p.unit.name() {
                        write!(f, " = {canonical} {canonical_unit}")?;
                    }
                    if !in_unit.is_finite() {
                        write!(f, "  (no data: the meter reports a fault)")?;
                    }
                    writeln!(f)?;
                }
                Err(e) => writeln!(f, "error: {e}")?,
            }
        }
        Ok(())
    }
}

/// What one unit id did when asked.
#[derive(Debug, Clone, PartialEq)]
pub enum ScanOutcome {
    /// A normal answer, with the words read.
    Answered(Vec<u16>),
    /// A Modbus exception from the device itself: someone is there.
    Exception(u8),
    /// Something answered but not with a valid frame (often a wrong baud rate or parity).
    Garbled(String),
    /// No answer, or a gateway saying no device answered (exceptions 0x0A, 0x0B).
    Absent,
    /// The link failed while asking this unit.
    Failed(String),
}

/// One line of a scan.
#[derive(Debug, Clone, PartialEq)]
pub struct ScanLine {
    pub unit: u8,
    pub outcome: ScanOutcome,
}

impl ScanLine {
    /// Something at this unit id answered.
    pub fn present(&self) -> bool {
        matches!(
            self.outcome,
            ScanOutcome::Answered(_) | ScanOutcome::Exception(_) | ScanOutcome::Garbled(_)
        )
    }
}

impl fmt::Display for ScanLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unit {:>3}: ", self.unit)?;
        match &self.outcome {
            ScanOutcome::Answered(w) => write!(
                f,
                "answered [{}]",
                w.iter()
                    .map(|w| format!("0x{w:04X}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            ScanOutcome::Exception(c) => {
                write!(f, "present, exception {c:#04x} ({})", exception_name(*c))
            }
            ScanOutcome::Garbled(r) => write!(f, "something answered, garbled: {r}"),
            ScanOutcome::Absent => write!(f, "no answer"),
            ScanOutcome::Failed(e) => write!(f, "link failed: {e}"),
        }
    }
}

/// The result of scanning a range of unit ids.
#[derive(Debug, Clone, PartialEq)]
pub struct ScanReport {
    pub link: String,
    pub fc: Fc,
    pub address: u16,
    pub lines: Vec<ScanLine>,
}

impl ScanReport {
    /// The unit ids where something answered.
    pub fn found(&self) -> Vec<u8> {
        self.lines
            .iter()
            .filter(|l| l.present())
            .map(|l| l.unit)
            .collect()
    }
}

impl fmt::Display for ScanReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}  {}  address {}", self.link, self.fc, self.address)?;
        for l in self
            .lines
            .iter()
            .filter(|l| !matches!(l.outcome, ScanOutcome::Absent))
        {
            writeln!(f, "{l}")?;
        }
        let found = self.found();
        write!(f, "found {} of {} unit ids", found.len(), self.lines.len())?;
        if !found.is_empty() {
            let ids: Vec<String> = found.iter().map(u8::to_string).collect();
            write!(f, ": {}", ids.join(", "))?;
        }
        writeln!(f)
    }
}

/// Asks every unit id in `units` for one register (or bit) at `address`. Use a short
/// `timeout`: absent units cost one timeout each (plus a short drain on RTU links).
pub async fn scan(
    link: &Link,
    units: RangeInclusive<u8>,
    fc: Fc,
    address: u16,
    timeout: Duration,
) -> Result<ScanReport, ModbusError> {
    scan_with_progress(link, units, fc, address, timeout, |_| {}).await
}

/// [`scan`], calling `progress` after each unit id (for a live display).
pub async fn scan_with_progress(
    link: &Link,
    units: RangeInclusive<u8>,
    fc: Fc,
    address: u16,
    timeout: Duration,
    mut progress: impl FnMut(&ScanLine),
) -> Result<ScanReport, ModbusError> {
    let mut client = BusClient::connect(PROBE_BUS, link, timeout).await?;
    let mut lines = Vec::new();
    for unit in units {
        let outcome = match client.read(unit, fc, address, 1, timeout).await {
            Ok(words) => ScanOutcome::Answered(words),
            Err(ModbusError::Exception {
                code: 0x0A | 0x0B, ..
            })
            | Err(ModbusError::Timeout { .. }) => ScanOutcome::Absent,
            Err(ModbusError::Exception { code, .. }) => ScanOutcome::Exception(code),
            Err(ModbusError::BadFrame { reason, .. }) => ScanOutcome::Garbled(reason),
            Err(ModbusError::InvalidRequest { reason, .. }) => {
                ScanOutcome::Failed(reason.to_string())
            }
            Err(e) => ScanOutcome::Failed(e.to_string()),
        };
        let line = ScanLine { unit, outcome };
        progress(&line);
        lines.push(line);
    }
    Ok(ScanReport {
        link: describe_link(link),
        fc,
        address,
        lines,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpretations_flag_what_cannot_be_meant() {
        // 12.5 as f32 ABCD; word-swapped it is a denormal.
        let all = interpret(&[0x4148, 0x0000]);
        let find = |t: DataType, o: ByteOrder| {
            all.iter()
                .find(|i| i.data_type == t && i.order == o)
                .cloned()
                .unwrap()
        };
        assert_eq!(
            find(DataType::F32, ByteOrder::ABCD).value,
            RawValue::F32(12.5)
        );
        assert_eq!(find(DataType::F32, ByteOrder::ABCD).flag, None);
        assert_eq!(find(DataType::F32, ByteOrder::CDAB).flag, Some("denormal"));
        assert_eq!(
            find(DataType::U32, ByteOrder::ABCD).value,
            RawValue::Unsigned(0x4148_0000)
        );
        assert!(
            all.iter().all(|i| i.data_type.registers() <= 2),
            "no 64-bit from 2 registers"
        );
        // u16/i16 in ABCD and BADC only; 32-bit types in all four.
        assert_eq!(all.len(), 2 * 2 + 3 * 4);
        let nan = interpret(&[0x7FC0, 0x0000]);
        assert!(nan.iter().any(|i| i.flag == Some("NaN")));
    }

    #[test]
    fn scan_report_lists_only_who_answered() {
        let report = ScanReport {
            link: "tcp x".into(),
            fc: Fc::Holding,
            address: 0,
            lines: vec![
                ScanLine {
                    unit: 1,
                    outcome: ScanOutcome::Answered(vec![7]),
                },
                ScanLine {
                    unit: 2,
                    outcome: ScanOutcome::Absent,
                },
                ScanLine {
                    unit: 3,
                    outcome: ScanOutcome::Exception(2),
                },
            ],
        };
        assert_eq!(report.found(), [1, 3]);
        let text = report.to_string();
        assert!(text.contains("found 2 of 3 unit ids: 1, 3"), "{text}");
        assert!(
            text.contains("illegal data address") && !text.contains("unit   2"),
            "{text}"
        );
    }
}
