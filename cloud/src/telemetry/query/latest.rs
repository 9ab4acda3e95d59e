//! Latest values: each device's most recent reading and the latest value of each quantity.

use super::readings::{ReadingView, view};
use super::scan::{READING_COLUMNS, ReadingRow, flag_names, quality, reading_row};
use super::{LOOKBACK_DAYS, QueryError, devices};
use crate::core::db::{Db, each_db};
use caudal_common::SiteId;
use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use sqlx::Row;
use utoipa::ToSchema;

/// A quantity's latest value.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Latest {
    pub value: f64,
    pub ts: DateTime<Utc>,
    pub seq: i64,
    /// Quality flag names of the reading it comes from; empty is good.
    pub quality: Vec<String>,
}

/// The latest values of one device.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct DeviceLatest {
    pub device: String,
    /// The device's most recent reading, whatever it holds.
    pub last_reading: ReadingView,
    /// The latest flow, L/s (looked for within [`LOOKBACK_DAYS`] of the last reading).
    pub flow_lps: Option<Latest>,
    /// The latest totalizer, m³.
    pub total_m3: Option<Latest>,
    /// The latest level, m.
    pub level_m: Option<Latest>,
}

/// A quantity a reading may carry, by its column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// `flow_lps`, L/s.
    Flow,
    /// `total_m3`, m³.
    Total,
    /// `level_m`, m.
    Level,
}

impl Channel {
    pub const ALL: [Channel; 3] = [Channel::Flow, Channel::Total, Channel::Level];

    fn column(self) -> &'static str {
        match self {
            Channel::Flow => "flow_lps",
            Channel::Total => "total_m3",
            Channel::Level => "level_m",
        }
    }
}

/// The latest reading and the latest value of each quantity, per device of `site`.
pub async fn latest(db: &Db, site: &SiteId) -> Result<Vec<DeviceLatest>, QueryError> {
    let mut out = Vec::new();
    for d in devices(db, site).await? {
        let sql = format!(
            "SELECT {READING_COLUMNS} FROM readings WHERE site = $1 AND device = $2 \
             ORDER BY ts DESC, seq DESC LIMIT 1"
        );
        let row: Option<ReadingRow> = each_db!(db, |pool, to_db, from_row| {
            match sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(site.as_str())
                .bind(&d)
                .fetch_optional(pool)
                .await?
            {
                Some(row) => Some(reading_row!(&row, from_row)),
                None => None,
            }
        });
        let Some(row) = row else { continue };
        let since = row.ts - Duration::days(LOOKBACK_DAYS);
        let q = quality(site, row.seq, row.quality)?;
        let here = |v: Option<f64>| {
            v.map(|value| Latest {
                value,
                ts: row.ts,
                seq: row.seq,
                quality: flag_names(q),
            })
        };
        let mut values = [here(row.flow), here(row.total), here(row.level)];
        for (slot, channel) in values.iter_mut().zip(Channel::ALL) {
            if slot.is_none() {
                *slot = latest_value(db, site, &d, channel, since).await?;
            }
        }
        let [flow_lps, total_m3, level_m] = values;
        out.push(DeviceLatest {
            device: d,
            last_reading: view(site, row)?,
            flow_lps,
            total_m3,
            level_m,
        });
    }
    Ok(out)
}

/// The device's latest value of `channel` read at or after `since`.
pub async fn latest_value(
    db: &Db,
    site: &SiteId,
    device: &str,
    channel: Channel,
    since: DateTime<Utc>,
) -> Result<Option<Latest>, QueryError> {
    let column = channel.column();
    let sql = format!(
        "SELECT seq, ts, quality, {column} AS value FROM readings WHERE site = $1 AND device = $2 \
         AND ts >= $3 AND {column} IS NOT NULL ORDER BY ts DESC, seq DESC LIMIT 1"
    );
    let found: Option<(i64, DateTime<Utc>, i32, f64)> = each_db!(db, |pool, to_db, from_row| {
        match sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(site.as_str())
            .bind(device)
            .bind(to_db(since))
            .fetch_optional(pool)
            .await?
        {
            Some(r) => Some((
                r.try_get("seq")?,
                from_row(&r, "ts")?,
                r.try_get("quality")?,
                r.try_get("value")?,
            )),
            None => None,
        }
    });
    found
        .map(|(seq, ts, bits, value)| {
            Ok(Latest {
                value,
                ts,
                seq,
                quality: flag_names(quality(site, seq, bits)?),
            })
        })
        .transpose()
}

/// When the device's latest reading was taken. One probe of the (site, device, ts) index: a
/// filter on `ts` alone would read the whole table, which no index leads with.
pub async fn last_reading_at(
    db: &Db,
    site: &SiteId,
    device: &str,
) -> Result<Option<DateTime<Utc>>, QueryError> {
    let sql = "SELECT ts FROM readings WHERE site = $1 AND device = $2 ORDER BY ts DESC LIMIT 1";
    Ok(each_db!(db, |pool, to_db, from_row| {
        let row = sqlx::query(sql)
            .bind(site.as_str())
            .bind(device)
            .fetch_optional(pool)
            .await?;
        row.map(|r| from_row(&r, "ts")).transpose()?
    }))
}

/// Whether the device has a reading taken in `[from, to]` that arrived after `since`: the
/// probe that tells the compliance submitter late telemetry reached a slot held for missing
/// data. One range of the (site, device, ts) index, filtered on `received_at`.
pub async fn received_since(
    db: &Db,
    site: &SiteId,
    device: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    since: DateTime<Utc>,
) -> Result<bool, QueryError> {
    let sql = "SELECT 1 FROM readings WHERE site = $1 AND device = $2 AND ts >= $3 AND ts <= $4 \
               AND received_at > $5 LIMIT 1";
    Ok(each_db!(db, |pool, to_db, _from| {
        sqlx::query(sql)
            .bind(site.as_str())
            .bind(device)
            .bind(to_db(from))
            .bind(to_db(to))
            .bind(to_db(since))
            .fetch_optional(pool)
            .await?
            .is_some()
    }))
}
