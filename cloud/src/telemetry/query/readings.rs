//! Raw readings: keyset pages of a site's readings in `(ts, seq)` order, optionally of one
//! device and only flagged ones.

use super::scan::{ReadingRow, Scan, flag_names, quality, scan_readings};
use super::{Cursor, QueryError, devices, take_page};
use crate::core::db::Db;
use caudal_common::{Flag, SiteId};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::BTreeMap;
use utoipa::ToSchema;

/// One stored reading, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ReadingView {
    pub seq: i64,
    pub device: String,
    pub ts: DateTime<Utc>,
    /// Quality flag names; empty is good.
    pub quality: Vec<String>,
    /// L/s.
    pub flow_lps: Option<f64>,
    /// Totalizer, m³.
    pub total_m3: Option<f64>,
    /// m.
    pub level_m: Option<f64>,
    /// Extra channels, in the unit the meter profile names.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, f64>,
}

pub(super) fn view(site: &SiteId, r: ReadingRow) -> Result<ReadingView, QueryError> {
    let extra = match &r.extra {
        Some(e) => serde_json::from_str(e)
            .map_err(|e| QueryError::Corrupt(format!("{site} seq {}: extra: {e}", r.seq)))?,
        None => BTreeMap::new(),
    };
    Ok(ReadingView {
        seq: r.seq,
        quality: flag_names(quality(site, r.seq, r.quality)?),
        device: r.device,
        ts: r.ts,
        flow_lps: r.flow,
        total_m3: r.total,
        level_m: r.level,
        extra,
    })
}

/// A page of raw readings and where the next one starts.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ReadingPage {
    pub readings: Vec<ReadingView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// Raw readings of `site` in `[from, to)`, ordered by `(ts, seq)`, at most `limit`, after
/// `after`, optionally one device and only readings with any of the `quality` bits.
#[allow(clippy::too_many_arguments)]
pub async fn raw_readings(
    db: &Db,
    site: &SiteId,
    device: Option<&str>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    after: Option<Cursor>,
    quality: Option<u16>,
    limit: i64,
) -> Result<ReadingPage, QueryError> {
    // Without a device, each device's readings are read through the (site, device, ts) index
    // and merged: the first `limit + 1` of the site are among the first `limit + 1` of each
    // device, and no query has to go through the site's whole history to sort it by time.
    let one;
    let all;
    let devices: &[String] = match device {
        Some(d) => {
            one = [d.to_string()];
            &one
        }
        None => {
            all = devices(db, site).await?;
            &all
        }
    };
    let mut rows = Vec::new();
    for d in devices {
        let scan = Scan {
            after,
            quality,
            limit: Some(limit + 1),
            ..Scan::device(site, d, from, to)
        };
        scan_readings(db, &scan, |r| {
            rows.push(r);
            Ok(true)
        })
        .await?;
    }
    if devices.len() > 1 {
        rows.sort_unstable_by_key(|r| (r.ts, r.seq));
    }
    let next_cursor = take_page(&mut rows, limit, |r| (r.ts, r.seq));
    let readings = rows
        .into_iter()
        .map(|r| view(site, r))
        .collect::<Result<_, _>>()?;
    Ok(ReadingPage {
        readings,
        next_cursor,
    })
}

/// Quality bits for a filter: every flag named, or any flag for `flagged`.
pub fn quality_filter(names: &str) -> Result<u16, String> {
    let mut bits = 0u16;
    for n in names.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if n == "flagged" {
            bits |= Flag::ALL.iter().fold(0, |b, f| b | *f as u16);
            continue;
        }
        let f = Flag::from_name(n).ok_or_else(|| {
            let known: Vec<&str> = Flag::ALL.iter().map(|f| f.name()).collect();
            format!(
                "unknown quality flag {n:?}; known: flagged, {}",
                known.join(", ")
            )
        })?;
        bits |= f as u16;
    }
    if bits == 0 {
        return Err("name at least one quality flag".into());
    }
    Ok(bits)
}
