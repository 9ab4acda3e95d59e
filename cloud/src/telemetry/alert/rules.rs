//! The rules: for each alert kind, what fires now. A rule reads stored telemetry (through
//! [`query`] and [`store`]) and what the catchment module says a site or point is (through its
//! functions, never its tables); it writes nothing: [`super::reconcile`] decides what that does
//! to the alerts.

use super::Firing;
use crate::catchment::dga_time::dga_year;
use crate::catchment::point::{self, MeasuredRight, PointError, Right};
use crate::catchment::site::{self, SiteError};
use crate::core::db::Db;
use crate::telemetry::query::{self, Bucket, Channel, QueryError};
use crate::telemetry::store;
use chrono::{DateTime, Duration, Utc};
use std::collections::HashMap;

/// Why a rule could not say what fires.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error(transparent)]
    Site(#[from] SiteError),
    #[error(transparent)]
    Point(#[from] PointError),
    #[error(transparent)]
    Compliance(#[from] crate::compliance::store::StoreError),
}

/// Points whose DGA reporting stopped because the regulator refused their configuration
/// (read through the compliance module's store).
pub async fn compliance_stopped(db: &Db) -> Result<Vec<Firing>, RuleError> {
    Ok(crate::compliance::store::stopped(db)
        .await?
        .into_iter()
        .map(|s| Firing {
            subject: format!("point/{}", s.point_id),
            site: None,
            device: None,
            point_id: Some(s.point_id),
            since: s.since,
            value: None,
            threshold: None,
            message: format!(
                "point {}: the DGA refused its configuration, nothing is sent until its \
                 compliance settings change: {}",
                s.point_id, s.reason
            ),
        })
        .collect())
}

/// The latest receipt check of each point that found the DGA holding other values than were
/// declared, since `from` (read through the compliance module's `verify`).
pub async fn receipt_mismatch(db: &Db, from: DateTime<Utc>) -> Result<Vec<Firing>, RuleError> {
    Ok(crate::compliance::verify::mismatches_since(db, from)
        .await?
        .into_iter()
        .map(|v| Firing {
            subject: format!("point/{}", v.point_id),
            site: None,
            device: None,
            point_id: Some(v.point_id),
            since: v.checked_at,
            value: None,
            threshold: None,
            message: format!(
                "point {}: the DGA holds other values under receipt {} (slot {}) than were \
                 declared; ask the DGA for a rectification (dossier): {}",
                v.point_id,
                v.receipt,
                v.slot_at.format("%Y-%m-%dT%H:%M:%SZ"),
                v.detail
            ),
        })
        .collect())
}

fn ago(d: Duration) -> String {
    let s = d.num_seconds();
    if s >= 2 * 86_400 {
        format!("{} d", s / 86_400)
    } else if s >= 2 * 3600 {
        format!("{} h", s / 3600)
    } else if s >= 120 {
        format!("{} min", s / 60)
    } else {
        format!("{s} s")
    }
}

/// Active sites whose agent was last heard (status or batch) longer ago than the site's
/// `offline_after_s`, or never heard and registered longer ago than that.
pub async fn site_offline(db: &Db, now: DateTime<Utc>) -> Result<Vec<Firing>, RuleError> {
    let heard = store::last_seen(db).await?;
    let mut out = Vec::new();
    for s in site::list(db).await?.into_iter().filter(|s| s.active) {
        let site = s.id.to_string();
        let (t, heard) = match heard.get(&site) {
            Some(t) => (*t, true),
            None => (s.created_at, false),
        };
        let after = Duration::seconds(i64::from(s.offline_after_s));
        if now - t <= after {
            continue;
        }
        out.push(Firing {
            subject: format!("site/{site}"),
            message: if heard {
                format!("site {site}: agent not heard from for {}", ago(now - t))
            } else {
                format!(
                    "site {site}: agent never heard from since the site was registered {} ago",
                    ago(now - t)
                )
            },
            site: Some(site),
            device: None,
            point_id: None,
            since: t,
            value: Some((now - t).num_seconds() as f64),
            threshold: Some(after.num_seconds() as f64),
        });
    }
    Ok(out)
}

/// Devices of active sites that sent readings within the lookback and none for longer than
/// `after`. A site already offline still gets these: they say which devices are missing.
pub async fn no_data(
    db: &Db,
    now: DateTime<Utc>,
    after: Duration,
    lookback: Duration,
) -> Result<Vec<Firing>, RuleError> {
    let from = now - lookback;
    let mut last: Vec<(String, String, DateTime<Utc>)> = Vec::new();
    for s in site::list(db).await?.into_iter().filter(|s| s.active) {
        for device in query::devices(db, &s.id).await? {
            let t = query::last_reading_at(db, &s.id, &device).await?;
            if let Some(t) = t.filter(|t| *t >= from) {
                last.push((s.id.to_string(), device, t));
            }
        }
    }
    Ok(last
        .into_iter()
        .filter(|(_, _, t)| now - *t > after)
        .map(|(site, device, t)| Firing {
            subject: format!("device/{site}/{device}"),
            message: format!(
                "site {site}, device {device}: no reading for {} (last at {})",
                ago(now - t),
                t.format("%Y-%m-%dT%H:%M:%SZ")
            ),
            site: Some(site),
            device: Some(device),
            point_id: None,
            since: t,
            value: Some((now - t).num_seconds() as f64),
            threshold: Some(after.num_seconds() as f64),
        })
        .collect())
}

/// Event kinds that mean a totalizer went backwards. A rollover (the counter wrapping at its
/// maximum) is normal and not among them.
pub const BACKWARDS_EVENTS: [&str; 4] = [
    "totalizer_backwards",
    "totalizer_reset",
    "meter_replaced",
    "reverse_flow",
];

/// The latest backwards event of each device since `from`.
pub async fn totalizer_backwards(db: &Db, from: DateTime<Utc>) -> Result<Vec<Firing>, RuleError> {
    let events = query::events_since(db, &BACKWARDS_EVENTS, from).await?;
    // Ordered by time: the last event of each device wins.
    let mut latest: HashMap<String, Firing> = HashMap::new();
    for (site, e) in events {
        let dev = e.device.unwrap_or_default();
        let subject = format!("device/{site}/{dev}");
        let what = e.kind.replace('_', " ");
        let values = match (e.previous, e.current) {
            (Some(p), Some(c)) => format!(" ({p} → {c} m³)"),
            _ => String::new(),
        };
        let detail = if e.message.is_empty() {
            String::new()
        } else {
            format!(": {}", e.message)
        };
        latest.insert(
            subject.clone(),
            Firing {
                subject,
                message: format!(
                    "site {site}, device {dev}: {what} at {}{values}{detail}",
                    e.ts.format("%Y-%m-%dT%H:%M:%SZ")
                ),
                site: Some(site),
                device: (!dev.is_empty()).then_some(dev),
                point_id: None,
                since: e.ts,
                value: e.current,
                threshold: e.previous,
            },
        );
    }
    let mut v: Vec<Firing> = latest.into_values().collect();
    v.sort_by(|a, b| a.subject.cmp(&b.subject));
    Ok(v)
}

/// The latest `(site, seq)` conflict of each site since `from`: a record arrived under a stored
/// record's identity with other content, and the ingest refused its batch.
pub async fn seq_conflict(db: &Db, from: DateTime<Utc>) -> Result<Vec<Firing>, RuleError> {
    let recorded = crate::telemetry::conflict::latest_since(db, from).await?;
    Ok(recorded
        .into_iter()
        .map(|c| Firing {
            subject: format!("site/{}", c.site),
            message: format!(
                "{} (batch {}, {} conflict(s) since {}); the batch was refused and \
                 dead-lettered, the stored record kept",
                c.detail,
                c.batch,
                c.count,
                from.format("%Y-%m-%dT%H:%M:%SZ")
            ),
            site: Some(c.site),
            device: None,
            point_id: None,
            since: c.received_at,
            value: Some(c.count as f64),
            threshold: None,
        })
        .collect())
}

/// How alert messages name a point: `point 7 (Pozo Norte, OB-0101-23)`.
fn label(p: &MeasuredRight) -> String {
    match &p.obra_code {
        Some(code) => format!("point {} ({}, {code})", p.id, p.name),
        None => format!("point {} ({})", p.id, p.name),
    }
}

/// Points whose flow now — the sum of each of their devices' latest flow reading since
/// `fresh_from` — is above the authorized flow.
pub async fn flow_above_authorized(
    db: &Db,
    fresh_from: DateTime<Utc>,
) -> Result<Vec<Firing>, RuleError> {
    let mut out = Vec::new();
    for point in point::measured_rights(db, Right::AuthorizedFlow).await? {
        let mut total = 0.0;
        let mut latest: Option<DateTime<Utc>> = None;
        for (site, device) in &point.devices {
            let flow = query::latest_value(db, site, device, Channel::Flow, fresh_from).await?;
            if let Some(flow) = flow.filter(|f| f.value.is_finite()) {
                total += flow.value;
                latest = latest.max(Some(flow.ts));
            }
        }
        let Some(at) = latest else { continue };
        if total > point.limit {
            out.push(Firing {
                subject: format!("point/{}", point.id),
                site: point.devices.first().map(|(s, _)| s.to_string()),
                device: None,
                point_id: Some(point.id),
                since: at,
                value: Some(total),
                threshold: Some(point.limit),
                message: format!(
                    "{}: flow {total:.2} L/s at {}, above the authorized {:.2} L/s",
                    label(&point),
                    at.format("%Y-%m-%dT%H:%M:%SZ"),
                    point.limit
                ),
            });
        }
    }
    Ok(out)
}

/// Days the pace of extraction is taken over.
const PACE_DAYS: i64 = 30;

/// What a point is on course to extract in the year: so far, and at the pace of the last
/// [`PACE_DAYS`] days until the year ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Forecast {
    pub so_far_m3: f64,
    pub year_end_m3: f64,
}

/// The forecast from the daily volumes of the year so far (`(day start, m³)`).
pub fn forecast(
    days: &[(DateTime<Utc>, f64)],
    year: (DateTime<Utc>, DateTime<Utc>),
    now: DateTime<Utc>,
) -> Forecast {
    let so_far: f64 = days.iter().map(|(_, v)| v).sum();
    let pace_from = (now - Duration::days(PACE_DAYS)).max(year.0);
    let recent: f64 = days
        .iter()
        .filter(|(t, _)| *t >= pace_from)
        .map(|(_, v)| v)
        .sum();
    let window = (now - pace_from).num_seconds().max(3600) as f64;
    let remaining = (year.1 - now).num_seconds().max(0) as f64;
    Forecast {
        so_far_m3: so_far,
        year_end_m3: so_far + recent / window * remaining,
    }
}

/// Points whose extracted volume this year, at the pace of the last 30 days, ends the year past
/// their annual allowance (or already is past it).
pub async fn annual_volume(db: &Db, now: DateTime<Utc>) -> Result<Vec<Firing>, RuleError> {
    let year = dga_year(now);
    let mut out = Vec::new();
    for point in point::measured_rights(db, Right::AnnualVolume).await? {
        let label = label(&point);
        let mut days: Vec<(DateTime<Utc>, f64)> = Vec::new();
        for (site, device) in &point.devices {
            let buckets =
                query::aggregate(db, site, Some(device), year.0, now, Bucket::Day).await?;
            days.extend(
                buckets
                    .into_iter()
                    .filter_map(|b| b.volume_m3.map(|v| (b.start, v))),
            );
        }
        if days.is_empty() {
            continue;
        }
        let f = forecast(&days, year, now);
        if f.year_end_m3 <= point.limit {
            continue;
        }
        let pct = |v: f64| v / point.limit * 100.0;
        let message = if f.so_far_m3 > point.limit {
            format!(
                "{}: {:.0} m³ extracted this year, past the annual allowance of {:.0} m³ ({:.0} %)",
                label,
                f.so_far_m3,
                point.limit,
                pct(f.so_far_m3)
            )
        } else {
            format!(
                "{}: {:.0} m³ extracted this year ({:.0} % of {:.0} m³); at the last {PACE_DAYS} \
                 days' pace the year ends at {:.0} m³ ({:.0} %)",
                label,
                f.so_far_m3,
                pct(f.so_far_m3),
                point.limit,
                f.year_end_m3,
                pct(f.year_end_m3)
            )
        };
        out.push(Firing {
            subject: format!("point/{}", point.id),
            site: point.devices.first().map(|(s, _)| s.to_string()),
            device: None,
            point_id: Some(point.id),
            since: now,
            value: Some(f.year_end_m3),
            threshold: Some(point.limit),
            message,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default()
    }

    #[test]
    fn the_forecast_adds_the_recent_pace_for_the_rest_of_the_year() {
        let year = (at("2026-01-01T04:00:00Z"), at("2027-01-01T04:00:00Z"));
        let now = at("2026-07-02T16:00:00Z"); // half the year gone
        // 100 m³ long ago, then 3 m³ a day for the last 30 days.
        let mut days = vec![(at("2026-02-01T00:00:00Z"), 100.0)];
        for d in 1..=30 {
            days.push((now - Duration::days(d), 3.0));
        }
        let f = forecast(&days, year, now);
        assert!((f.so_far_m3 - 190.0).abs() < 1e-9);
        let expected = 190.0 + 3.0 * (year.1 - now).num_seconds() as f64 / 86_400.0;
        assert!(
            (f.year_end_m3 - expected).abs() < 1e-6,
            "{f:?} vs {expected}"
        );
        // Nothing recent: the year ends where it stands.
        let quiet = forecast(&days[..1], year, now);
        assert_eq!(quiet.year_end_m3, 100.0);
        // At the year's end nothing is left to add.
        assert_eq!(forecast(&days, year, year.1).year_end_m3, 190.0);
    }
}
