//! Builders shared by the outbox integration tests: readings, clock stamps, configurations and
//! direct looks into the SQLite file.

#![allow(dead_code)]

use caudal_agent::config::{OutboxConfig, Synchronous};
use caudal_agent::outbox::{ClockStamp, DeviceStatusRow, Stamped};
use caudal_common::{DeviceId, Quality, Reading, Seq};
use chrono::{DateTime, TimeZone, Utc};
use rusqlite::Connection;
use std::collections::BTreeMap;
use std::path::Path;

pub fn config(budget_mb: u64) -> OutboxConfig {
    OutboxConfig {
        path: None,
        disk_budget_mb: budget_mb,
        synchronous: Synchronous::Normal,
        commit_interval_ms: 0,
    }
}

pub fn t(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_750_000_000 + secs, 0).unwrap()
}

pub fn dev(id: &str) -> DeviceId {
    DeviceId::new(id).unwrap()
}

pub fn reading(device: &str, ts: DateTime<Utc>, total: f64) -> Reading {
    Reading {
        seq: Seq(0),
        device: dev(device),
        ts,
        q: Quality::GOOD,
        flow_lps: Some(12.345),
        total_m3: Some(total),
        level_m: Some(23.456),
        extra: BTreeMap::new(),
    }
}

pub fn trusted() -> ClockStamp {
    ClockStamp {
        trusted: true,
        boot_id: "boot-now".into(),
        boottime_ms: 1_000,
    }
}

pub fn untrusted(boot: &str, boottime_ms: u64) -> ClockStamp {
    ClockStamp {
        trusted: false,
        boot_id: boot.into(),
        boottime_ms,
    }
}

/// `n` trusted readings of `device`, one second apart from `start`.
pub fn readings(device: &str, start: i64, n: usize) -> Vec<Stamped> {
    (0..n)
        .map(|i| {
            let s = start + i as i64;
            Stamped::new(reading(device, t(s), s as f64), trusted())
        })
        .collect()
}

pub fn status(device: &str, result: &str, last_reading: Option<&str>) -> DeviceStatusRow {
    DeviceStatusRow {
        device: dev(device),
        bus: "rs485-1".into(),
        last_poll: t(0),
        result: result.into(),
        last_error: (result != "ok").then(|| format!("{device}: {result}")),
        consecutive_failures: u32::from(result != "ok"),
        last_reading: last_reading.map(str::to_string),
    }
}

/// Every seq stored (sendable and held), ascending, read straight from the file.
pub fn stored_seqs(path: &Path) -> Vec<u64> {
    let c = Connection::open(path).unwrap();
    let mut s = c
        .prepare("SELECT seq FROM records UNION ALL SELECT seq FROM held ORDER BY 1")
        .unwrap();
    s.query_map([], |r| r.get::<_, i64>(0))
        .unwrap()
        .map(|r| r.unwrap() as u64)
        .collect()
}

pub fn integrity(path: &Path) -> String {
    let c = Connection::open(path).unwrap();
    c.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap()
}
