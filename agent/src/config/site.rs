//! The runtime model that [`AgentConfig::resolve`](super::AgentConfig::resolve) produces (a
//! [`Site`], its [`Bus`]es and their [`Device`]s), and the defaults it fills in where neither
//! the file nor a profile says.

use super::{ConfigWarning, LimitsConfig, Parity};
use crate::register::Point;
use caudal_common::{DeviceId, SiteId};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Everything the agent runs, resolved.
#[derive(Debug, Clone)]
pub struct Site {
    pub id: SiteId,
    pub outbox_path: PathBuf,
    pub buses: Vec<Bus>,
    /// What resolution found worth a look without refusing it (`check-config` prints them).
    pub warnings: Vec<ConfigWarning>,
}

/// One physical bus and the devices on it.
#[derive(Debug, Clone)]
pub struct Bus {
    pub name: String,
    pub link: Link,
    pub inter_frame_gap: Duration,
    pub devices: Vec<Device>,
}

/// How to reach a bus.
#[derive(Debug, Clone, PartialEq)]
pub enum Link {
    Tcp {
        address: String,
    },
    RtuOverTcp {
        address: String,
    },
    Rtu {
        port: PathBuf,
        baud: u32,
        parity: Parity,
        data_bits: u8,
        stop_bits: u8,
    },
}

/// For messages: `tcp 10.0.0.5:502`, `rtu_over_tcp 10.0.0.9:4001` (the `kind` spelling of the configuration), `rtu /dev/ttyUSB0 19200 8E1`.
impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Link::Tcp { address } => write!(f, "tcp {address}"),
            Link::RtuOverTcp { address } => write!(f, "rtu_over_tcp {address}"),
            Link::Rtu {
                port,
                baud,
                parity,
                data_bits,
                stop_bits,
            } => write!(
                f,
                "rtu {} {baud} {data_bits}{}{stop_bits}",
                port.display(),
                parity.letter()
            ),
        }
    }
}

/// One device, with its profile merged and overrides applied.
#[derive(Debug, Clone)]
pub struct Device {
    pub id: DeviceId,
    pub unit: u8,
    pub profile: String,
    pub period: Duration,
    pub timeout: Duration,
    pub retries: u32,
    pub max_regs_per_read: u16,
    pub points: Vec<Point>,
    pub limits: LimitsConfig,
}

/// Poll period when neither the device nor anything else says, seconds.
pub const DEFAULT_PERIOD_S: u64 = 60;
/// Response timeout when neither the device nor its profile says, milliseconds.
pub const DEFAULT_TIMEOUT_MS: u64 = 1000;
/// Retries when neither the device nor its profile says.
pub const DEFAULT_RETRIES: u32 = 1;
/// Serial settings when neither the bus nor any of its devices' profiles say: 9600 8N1.
pub const DEFAULT_BAUD: u32 = 9600;
pub const DEFAULT_PARITY: Parity = Parity::None;
pub const DEFAULT_DATA_BITS: u8 = 8;
pub const DEFAULT_STOP_BITS: u8 = 1;
/// Gap between a reply and the next request on a serial line (`rtu`, `rtu_over_tcp`) when
/// neither the bus nor a profile says, milliseconds: 3.5 characters at 9600 baud plus margin
/// for USB adapters and converters.
pub const DEFAULT_SERIAL_GAP_MS: u64 = 10;
