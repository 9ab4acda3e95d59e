//! Dead letters: the messages the ingest refused, kept for a person to look at, and kept
//! bounded. Owns the `dead_letters` table's writes, the throttle of refusals from sites the
//! cloud does not accept, and the sweeper that expires and caps the table.
//!
//! **Boundedness rule** (enforced by [`keep`], [`RefusedSites::admit`] and [`sweep`]): a
//! refused message is one row per fingerprint — the same payload on the same topic, or, for a
//! site the cloud does not know or has deactivated, one row per site and reason — counted, with
//! its first and last arrival; its payload is cut at `ingest.dead_letter_max_payload_bytes`
//! (the size it had is kept). Such a site's refusals are written at most once per
//! `ingest.refused_site_interval_s`, the ones between counted into the next write. Rows not
//! seen for `ingest.dead_letter_retention_days`, and the oldest beyond
//! `ingest.dead_letter_max_rows`, are removed. So a replaying or misconfigured agent, or
//! someone publishing garbage, costs a row and a counter, not the disk. The refusal itself
//! (counted by reason, answered with a `rejected` ack) is never throttled.

use crate::core::Shutdown;
use crate::core::config::IngestConfig;
use crate::core::db::{Db, each_db};
use caudal_common::SiteId;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the sweeper runs.
pub const SWEEP_EVERY: Duration = Duration::from_secs(600);
/// Most sites [`RefusedSites`] tracks at once.
pub const MAX_REFUSED_SITES: usize = 10_000;

/// What makes two refusals the same dead letter.
pub fn fingerprint(
    topic: &str,
    site: Option<&SiteId>,
    summarised: Option<&str>,
    payload: &[u8],
) -> String {
    match (summarised, site) {
        (Some(reason), Some(site)) => format!("site:{reason}:{}", site.as_str()),
        _ => {
            let mut h = Sha256::new();
            h.update(topic.as_bytes());
            h.update([0]);
            h.update(payload);
            let digest = h.finalize();
            let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
            format!("payload:{hex}")
        }
    }
}

/// One refusal to keep.
#[derive(Debug, Clone, Copy)]
pub struct Refused<'a> {
    pub topic: &'a str,
    pub site: Option<&'a SiteId>,
    pub payload: &'a [u8],
    pub reason: &'a str,
    /// `Some(reason code)` for a refusal summarised per site (unknown or inactive site).
    pub summarised: Option<&'a str>,
    pub received_at: DateTime<Utc>,
    /// Refusals it stands for (itself and the ones the throttle did not write).
    pub count: u64,
}

/// Keeps `r`: a new row, or one more on the row of its fingerprint (its latest payload, reason
/// and arrival).
pub async fn keep(db: &Db, r: Refused<'_>, max_payload_bytes: usize) -> Result<(), sqlx::Error> {
    let kept = &r.payload[..r.payload.len().min(max_payload_bytes)];
    let fp = fingerprint(r.topic, r.site, r.summarised, r.payload);
    let site = r.site.map(SiteId::as_str);
    let count = i64::try_from(r.count).unwrap_or(i64::MAX);
    let bytes = i64::try_from(r.payload.len()).unwrap_or(i64::MAX);
    each_db!(db, |pool, to_db, from_row| {
        sqlx::query(
            "INSERT INTO dead_letters (topic, site, payload, reason, received_at, fingerprint, \
             count, last_received_at, payload_bytes) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $5, $8) \
             ON CONFLICT (fingerprint) DO UPDATE SET count = dead_letters.count + excluded.count, \
             topic = excluded.topic, payload = excluded.payload, reason = excluded.reason, \
             last_received_at = excluded.last_received_at, payload_bytes = excluded.payload_bytes",
        )
        .bind(r.topic)
        .bind(site)
        .bind(kept)
        .bind(r.reason)
        .bind(to_db(r.received_at))
        .bind(&fp)
        .bind(count)
        .bind(bytes)
        .execute(pool)
        .await?;
    });
    Ok(())
}

/// What the sweeper removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub expired: u64,
    pub over_cap: u64,
}

/// Removes the dead letters last seen before `now - retention`, then the oldest beyond
/// `max_rows`.
pub async fn sweep(
    db: &Db,
    retention: chrono::Duration,
    max_rows: u64,
    now: DateTime<Utc>,
) -> Result<Swept, sqlx::Error> {
    let cutoff = now - retention;
    let max_rows = i64::try_from(max_rows).unwrap_or(i64::MAX);
    Ok(each_db!(db, |pool, to_db, from_row| {
        let expired = sqlx::query(
            "DELETE FROM dead_letters WHERE COALESCE(last_received_at, received_at) < $1",
        )
        .bind(to_db(cutoff))
        .execute(pool)
        .await?
        .rows_affected();
        let over_cap = sqlx::query(
            "DELETE FROM dead_letters WHERE id IN (SELECT id FROM dead_letters \
             ORDER BY COALESCE(last_received_at, received_at) DESC, id DESC \
             LIMIT 9223372036854775807 OFFSET $1)",
        )
        .bind(max_rows)
        .execute(pool)
        .await?
        .rows_affected();
        Swept { expired, over_cap }
    }))
}

/// Runs [`sweep`] at start and every [`SWEEP_EVERY`] until `shutdown`.
pub async fn run_sweeper(db: Db, cfg: IngestConfig, mut shutdown: Shutdown) {
    let retention = chrono::Duration::days(i64::from(cfg.dead_letter_retention_days));
    loop {
        match sweep(&db, retention, cfg.dead_letter_max_rows, Utc::now()).await {
            Ok(s) if s.expired + s.over_cap > 0 => {
                tracing::info!(
                    expired = s.expired,
                    over_cap = s.over_cap,
                    "dead letters removed"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "dead letters not swept; trying again later"),
        }
        tokio::select! {
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
            _ = shutdown.wait() => return,
        }
    }
}

/// When each refused site's refusals were last written, and how many came since.
#[derive(Debug)]
pub struct RefusedSites {
    interval: Duration,
    sites: Mutex<HashMap<String, (Instant, u64)>>,
}

impl RefusedSites {
    pub fn new(interval: Duration) -> RefusedSites {
        RefusedSites {
            interval,
            sites: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(n)`: write this refusal now, standing for `n` (itself and the ones held back
    /// since the last write); `None`: held back, counted into the next.
    pub fn admit(&self, site: &SiteId, now: Instant) -> Option<u64> {
        let mut sites = self
            .sites
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((last, held)) = sites.get_mut(site.as_str()) {
            if now.saturating_duration_since(*last) < self.interval {
                *held += 1;
                return None;
            }
            let n = *held + 1;
            *last = now;
            *held = 0;
            return Some(n);
        }
        if sites.len() >= MAX_REFUSED_SITES {
            let interval = self.interval;
            // Sites whose window passed with nothing held lose nothing by being forgotten.
            sites.retain(|_, (last, held)| {
                *held > 0 || now.saturating_duration_since(*last) < interval
            });
        }
        if sites.len() < MAX_REFUSED_SITES {
            sites.insert(site.as_str().to_string(), (now, 0));
        }
        Some(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(s: &str) -> SiteId {
        SiteId::new(s).expect("site")
    }

    #[test]
    fn a_refused_site_is_written_once_per_interval_with_the_count_between() {
        let r = RefusedSites::new(Duration::from_secs(60));
        let t0 = Instant::now();
        let a = site("pozo-a");
        assert_eq!(r.admit(&a, t0), Some(1));
        assert_eq!(r.admit(&a, t0 + Duration::from_secs(1)), None);
        assert_eq!(r.admit(&a, t0 + Duration::from_secs(2)), None);
        assert_eq!(r.admit(&site("pozo-b"), t0), Some(1), "sites apart");
        assert_eq!(r.admit(&a, t0 + Duration::from_secs(61)), Some(3));
        assert_eq!(r.admit(&a, t0 + Duration::from_secs(62)), None);
    }

    #[test]
    fn fingerprints_tell_payloads_and_summaries_apart() {
        let a = site("pozo-a");
        let p1 = fingerprint("caudal/v1/pozo-a/telemetry", Some(&a), None, b"x");
        assert_eq!(
            p1,
            fingerprint("caudal/v1/pozo-a/telemetry", Some(&a), None, b"x")
        );
        assert_ne!(
            p1,
            fingerprint("caudal/v1/pozo-a/telemetry", Some(&a), None, b"y")
        );
        assert_ne!(
            p1,
            fingerprint("caudal/v1/pozo-a/status", Some(&a), None, b"x")
        );
        let s = fingerprint("t", Some(&a), Some("unknown_site"), b"x");
        assert_eq!(
            s,
            fingerprint("t2", Some(&a), Some("unknown_site"), b"other")
        );
        assert_ne!(s, fingerprint("t", Some(&a), Some("inactive_site"), b"x"));
    }
}
