//! Read-only inspection of an outbox file for `caudal-agent status`, safe while the daemon
//! writes it (WAL readers see the last committed state and never block the writer).

use super::schema::{self, Meta};
use super::{DeviceStatusRow, OutboxError};
use caudal_common::{Reading, Seq};
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What `caudal-agent status` shows about the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Inspection {
    pub path: PathBuf,
    /// When the file was read.
    pub at: DateTime<Utc>,
    /// Records not yet acknowledged, held ones included.
    pub backlog: u64,
    /// Records held back until the clock is trusted.
    pub held: u64,
    /// Timestamp of the oldest sendable record not yet acknowledged.
    pub oldest: Option<DateTime<Utc>>,
    /// Bytes of record JSON.
    pub bytes: u64,
    /// Size of the database file and its WAL.
    pub file_bytes: u64,
    /// Records evicted by the disk budget since the database was created.
    pub evicted_total: u64,
    pub epoch: u32,
    /// The epochs earlier starts closed that have records, ascending, each with the counter of
    /// its last record (the latest 1000 starts).
    pub closed_epochs: Vec<(u32, u32)>,
    /// The last committed seq, if any record was ever committed.
    pub last_seq: Option<Seq>,
    /// Every device's last poll, by device id.
    pub devices: Vec<DeviceStatusRow>,
}

/// Reads the outbox at `path` without writing to it.
pub fn inspect(path: &Path) -> Result<Inspection, OutboxError> {
    let name = path.display().to_string();
    let open_err = |source| OutboxError::Open {
        path: name.clone(),
        source,
    };
    let mut conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(open_err)?;
    conn.busy_timeout(Duration::from_secs(2))
        .map_err(open_err)?;
    schema::check_readable(&conn, &name)?;
    // One read transaction: every figure comes from the same commit.
    let tx = conn.transaction()?;
    let meta = Meta::load(&tx)?;
    let oldest = schema::oldest(&tx)?;
    let devices = schema::device_rows(&tx)?;
    let closed_epochs = if schema::user_version(&tx)? >= 2 {
        schema::closed_epochs(&tx)?
    } else {
        Vec::new()
    };
    tx.commit()?;
    let size = |suffix: &str| {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
    };
    Ok(Inspection {
        path: path.to_path_buf(),
        at: Utc::now(),
        backlog: meta.record_count,
        held: meta.held_count,
        oldest,
        bytes: meta.record_bytes,
        file_bytes: size("") + size("-wal"),
        evicted_total: meta.evicted_total,
        epoch: meta.epoch,
        closed_epochs,
        last_seq: meta.last_seq,
        devices,
    })
}

struct Bytes(u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0 as f64;
        if b < 1024.0 {
            write!(f, "{} B", self.0)
        } else if b < 1024.0 * 1024.0 {
            write!(f, "{:.1} KiB", b / 1024.0)
        } else if b < 1024.0 * 1024.0 * 1024.0 {
            write!(f, "{:.1} MiB", b / (1024.0 * 1024.0))
        } else {
            write!(f, "{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
        }
    }
}

struct Age(chrono::Duration);

impl fmt::Display for Age {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.num_seconds();
        if s < 0 {
            write!(f, "in the future")
        } else if s < 120 {
            write!(f, "{s}s ago")
        } else if s < 2 * 3600 {
            write!(f, "{}m ago", s / 60)
        } else if s < 2 * 86_400 {
            write!(f, "{}h {}m ago", s / 3600, s % 3600 / 60)
        } else {
            write!(f, "{}d {}h ago", s / 86_400, s % 86_400 / 3600)
        }
    }
}

/// A reading's values for a person: each canonical quantity with its unit, extras as read, and
/// the quality flags when it is not good.
struct Values<'a>(&'a Reading);

impl fmt::Display for Values<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.0;
        let mut parts = Vec::new();
        if let Some(v) = r.flow_lps {
            parts.push(format!("flow {v:.2} L/s"));
        }
        if let Some(v) = r.total_m3 {
            parts.push(format!("total {v:.3} m³"));
        }
        if let Some(v) = r.level_m {
            parts.push(format!("level {v:.2} m"));
        }
        // Extras travel in the unit their profile names, which the record does not carry.
        parts.extend(r.extra.iter().map(|(name, v)| format!("{name} {v}")));
        if parts.is_empty() {
            parts.push("no value".to_string());
        }
        f.write_str(&parts.join(", "))?;
        if !r.q.is_good() {
            write!(f, " [{}]", r.q)?;
        }
        Ok(())
    }
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "outbox {}", self.path.display())?;
        writeln!(
            f,
            "  backlog    {} records not yet acknowledged ({} held until the clock is trusted)",
            self.backlog, self.held
        )?;
        match self.oldest {
            Some(t) => writeln!(
                f,
                "  oldest     {} ({})",
                t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                Age(self.at - t)
            )?,
            None => writeln!(f, "  oldest     -")?,
        }
        writeln!(
            f,
            "  storage    {} of records, file {}",
            Bytes(self.bytes),
            Bytes(self.file_bytes)
        )?;
        writeln!(
            f,
            "  evicted    {} records since the outbox was created",
            self.evicted_total
        )?;
        match self.last_seq {
            Some(s) => writeln!(
                f,
                "  sequence   epoch {}, last seq {} ({s})",
                self.epoch, s.0
            )?,
            None => writeln!(
                f,
                "  sequence   epoch {}, nothing committed yet",
                self.epoch
            )?,
        }
        if self.devices.is_empty() {
            return writeln!(f, "devices      none polled yet");
        }
        writeln!(f, "devices")?;
        for d in &self.devices {
            writeln!(
                f,
                "  {:<16} bus {:<12} {:<9} {} ({}), {} consecutive failures",
                d.device.as_str(),
                d.bus,
                d.result,
                d.last_poll
                    .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                Age(self.at - d.last_poll),
                d.consecutive_failures
            )?;
            if let Some(e) = &d.last_error {
                writeln!(f, "  {:<16} last error: {e}", "")?;
            }
            if let Some(r) = &d.last_reading {
                if let Ok(reading) = serde_json::from_str::<Reading>(r) {
                    writeln!(
                        f,
                        "  {:<16} values: {} (read {})",
                        "",
                        Values(&reading),
                        Age(self.at - reading.ts)
                    )?;
                }
                writeln!(f, "  {:<16} last reading: {r}", "")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_name_each_quantity_with_its_unit_and_the_flags() {
        let json = r#"{"seq":5,"device":"fm1","ts":"2026-12-03T12:00:00Z","q":["frozen"],
            "flow_lps":12.345,"total_m3":128734.5625,"extra":{"temperature":21.5}}"#;
        let r: Reading = serde_json::from_str(json).unwrap();
        assert_eq!(
            Values(&r).to_string(),
            "flow 12.35 L/s, total 128734.562 m³, temperature 21.5 [frozen]"
        );
        let empty: Reading =
            serde_json::from_str(r#"{"seq":6,"device":"fm1","ts":"2026-12-03T12:00:00Z"}"#)
                .unwrap();
        assert_eq!(Values(&empty).to_string(), "no value");
    }
}
