//! What the backlog benches (the agent's `drain`, the whole system's `pipeline`) feed the real
//! outbox and uplink with: readings shaped like a flow meter's, the outbox settings as shipped,
//! and the uplink settings as shipped with the backlog rate lifted, so both benches measure the
//! same thing. The agent's `outbox` and `footprint` benches take their readings from here too.

use caudal_agent::config::{OutboxConfig, Synchronous, UplinkConfig};
use caudal_agent::outbox::{ClockStamp, Stamped};
use caudal_common::{DeviceId, Quality, Reading, Seq};
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;

/// Backlog records per second the benches allow: so many that the configured rate limit is not
/// what is measured.
pub const BACKLOG_RATE: u32 = 10_000_000;

/// `[uplink]` as shipped (`config/agent.example.toml`), with the backlog rate lifted.
pub fn uplink_config(broker: &str, client_id: Option<String>) -> UplinkConfig {
    UplinkConfig {
        broker: broker.to_string(),
        client_id,
        username: None,
        password: None,
        ca_file: None,
        client_cert: None,
        client_key: None,
        keep_alive_s: 30,
        batch_max_records: 500,
        batch_max_age_ms: 1000,
        backlog_rate: BACKLOG_RATE,
        max_inflight_batches: 8,
        ack_timeout_s: 30,
        reconnect_min_ms: 500,
        reconnect_max_ms: 60_000,
        status_interval_s: 60,
        cloud_public_key: None,
    }
}

/// `[outbox]` as shipped: every acknowledgement's delete is fsynced.
pub fn outbox_config() -> OutboxConfig {
    OutboxConfig {
        path: None,
        disk_budget_mb: 1024,
        synchronous: Synchronous::Full,
        commit_interval_ms: 200,
    }
}

/// A trusted clock stamp (one boot).
pub fn stamp() -> ClockStamp {
    ClockStamp {
        trusted: true,
        boot_id: "2f1a9c1e-93a4-4c36-9d55-6f0d3c1b2a77".into(),
        boottime_ms: 123_456_789,
    }
}

/// The `i`-th reading of three meters taking turns: ~150 bytes of JSON; the outbox gives it its
/// seq.
pub fn reading(i: usize) -> Stamped {
    let devices = ["pozo-norte-fm1", "pozo-norte-fm2", "pozo-sur-lvl1"];
    let ts: DateTime<Utc> =
        DateTime::from_timestamp_millis(1_750_000_000_000 + i as i64 * 1_003).unwrap_or_default();
    let r = Reading {
        seq: Seq(0),
        device: DeviceId::new(devices[i % 3]).expect("valid id"),
        ts,
        q: Quality::GOOD,
        flow_lps: Some(12.0 + (i % 1000) as f64 * 0.013),
        total_m3: Some(1_234_567.0 + i as f64 * 0.037),
        level_m: Some(23.0 + (i % 97) as f64 * 0.011),
        extra: BTreeMap::new(),
    };
    Stamped::new(r, stamp())
}
