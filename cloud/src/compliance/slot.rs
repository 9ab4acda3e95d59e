//! The slot grid: the instants a point owes the DGA a measurement, by standard, in the fixed
//! UTC-4 the DGA counts in (Res. DGA 2.170/2025 §2; `catchment::dga_time`), never in Chile's
//! civil time: America/Santiago is UTC-3 in summer, and a grid in civil time would skip an hour
//! in September and repeat one in April. Everything here is computed with a fixed offset, so the
//! server's time zone (`TZ`) changes nothing.
//!
//! | period | slots (UTC-4) | default for |
//! |---|---|---|
//! | hourly | every `HH:00:00` | Mayor |
//! | daily | every day at `00:00:00` | Medio |
//! | monthly | day 1 at `00:00:00` | Menor |
//! | semiannual | 1 January and 1 July at `00:00:00` | Caudales Muy Pequeños |
//!
//! The allowed lag ("desfase máximo" between measurement and transmission, Res. DGA 1.238;
//! research notes §2, secondary and not yet checked against the resolution's text), past which
//! an unsent measurement is a "falla de transmisión" (Res. 2.170 §6.3) and an accepted one was
//! late ([`deadline`]):
//!
//! | standard | allowed lag |
//! |---|---|
//! | Mayor | 7 days |
//! | Medio | 15 days |
//! | Menor | 1 month |
//! | Caudales Muy Pequeños | 1 month |

use crate::catchment::point::DgaStandard;
use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Timelike, Utc};
use serde::{Deserialize, Serialize};
use std::str::FromStr;
use utoipa::ToSchema;

/// How often a point reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    Hourly,
    Daily,
    Monthly,
    Semiannual,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Hourly => "hourly",
            Period::Daily => "daily",
            Period::Monthly => "monthly",
            Period::Semiannual => "semiannual",
        }
    }

    /// The period a standard reports at (research notes §2: what operators schedule).
    pub fn of_standard(s: DgaStandard) -> Period {
        match s {
            DgaStandard::Mayor => Period::Hourly,
            DgaStandard::Medio => Period::Daily,
            DgaStandard::Menor => Period::Monthly,
            DgaStandard::CaudalesMuyPequenos => Period::Semiannual,
        }
    }
}

/// How long after its slot a measurement may reach the DGA (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lag {
    Days(i64),
    /// Calendar months, counted in UTC-4.
    Months(u32),
}

/// The allowed lag of a standard (Res. DGA 1.238 as the research notes §2 give it).
pub fn allowed_lag(s: DgaStandard) -> Lag {
    match s {
        DgaStandard::Mayor => Lag::Days(7),
        DgaStandard::Medio => Lag::Days(15),
        DgaStandard::Menor | DgaStandard::CaudalesMuyPequenos => Lag::Months(1),
    }
}

/// The standard whose lag applies to a point: its own, or the one its period is the default
/// of when it has none.
pub fn standard_for(s: Option<DgaStandard>, p: Period) -> DgaStandard {
    s.unwrap_or(match p {
        Period::Hourly => DgaStandard::Mayor,
        Period::Daily => DgaStandard::Medio,
        Period::Monthly => DgaStandard::Menor,
        Period::Semiannual => DgaStandard::CaudalesMuyPequenos,
    })
}

/// The last instant the measurement of slot `at` may reach the DGA under standard `s`: a
/// measurement received after it was late; one not received by then is a falla de
/// transmisión.
pub fn deadline(s: DgaStandard, at: DateTime<Utc>) -> DateTime<Utc> {
    match allowed_lag(s) {
        Lag::Days(d) => at + Duration::days(d),
        Lag::Months(m) => {
            let local = at.with_timezone(&dga_zone());
            local
                .checked_add_months(chrono::Months::new(m))
                .map(|t| t.with_timezone(&Utc))
                .unwrap_or(DateTime::<Utc>::MAX_UTC)
        }
    }
}

impl FromStr for Period {
    type Err = String;
    fn from_str(s: &str) -> Result<Period, String> {
        [
            Period::Hourly,
            Period::Daily,
            Period::Monthly,
            Period::Semiannual,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
        .ok_or_else(|| format!("unknown period {s:?}"))
    }
}

pub use crate::catchment::dga_time::dga_zone;

fn midnight(d: NaiveDate) -> DateTime<Utc> {
    let tz = dga_zone();
    // A fixed offset has exactly one instant for every wall time.
    tz.from_local_datetime(&d.and_time(chrono::NaiveTime::MIN))
        .single()
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// The slot at or before `t`.
pub fn floor(p: Period, t: DateTime<Utc>) -> DateTime<Utc> {
    let local = t.with_timezone(&dga_zone());
    let day = local.date_naive();
    match p {
        Period::Hourly => midnight(day) + Duration::hours(i64::from(local.hour())),
        Period::Daily => midnight(day),
        Period::Monthly => midnight(day.with_day(1).unwrap_or(day)),
        Period::Semiannual => {
            let month = if local.month() >= 7 { 7 } else { 1 };
            midnight(NaiveDate::from_ymd_opt(local.year(), month, 1).unwrap_or(day))
        }
    }
}

/// The slot after slot `s`.
pub fn next(p: Period, s: DateTime<Utc>) -> DateTime<Utc> {
    let day = s.with_timezone(&dga_zone()).date_naive();
    match p {
        Period::Hourly => s + Duration::hours(1),
        Period::Daily => s + Duration::days(1),
        Period::Monthly => midnight(
            day.checked_add_months(chrono::Months::new(1))
                .unwrap_or(day),
        ),
        Period::Semiannual => midnight(
            day.checked_add_months(chrono::Months::new(6))
                .unwrap_or(day),
        ),
    }
}

/// The slot before slot `s`.
pub fn previous(p: Period, s: DateTime<Utc>) -> DateTime<Utc> {
    let day = s.with_timezone(&dga_zone()).date_naive();
    match p {
        Period::Hourly => s - Duration::hours(1),
        Period::Daily => s - Duration::days(1),
        Period::Monthly => midnight(
            day.checked_sub_months(chrono::Months::new(1))
                .unwrap_or(day),
        ),
        Period::Semiannual => midnight(
            day.checked_sub_months(chrono::Months::new(6))
                .unwrap_or(day),
        ),
    }
}

/// The slots in `[from, to)`, at most `limit`.
pub fn grid(p: Period, from: DateTime<Utc>, to: DateTime<Utc>, limit: usize) -> Vec<DateTime<Utc>> {
    let mut s = floor(p, from);
    if s < from {
        s = next(p, s);
    }
    let mut out = Vec::new();
    while s < to && out.len() < limit {
        out.push(s);
        s = next(p, s);
    }
    out
}

/// `fechaMedicion` (`YYYY-MM-DD`) and `horaMedicion` (`HH:MM:SS`) of an instant, in UTC-4.
pub fn fecha_hora(t: DateTime<Utc>) -> (String, String) {
    let local = t.with_timezone(&dga_zone());
    (
        local.format("%Y-%m-%d").to_string(),
        local.format("%H:%M:%S").to_string(),
    )
}

/// The `timeStampOrigen` header: the current UTC-4 wall time with the literal suffix `-0000`,
/// as the manual writes the pattern (`yyyy-MM-ddTHH:mm:ss-0000`; research notes §7).
pub fn timestamp_origen(now: DateTime<Utc>) -> String {
    format!(
        "{}-0000",
        now.with_timezone(&dga_zone()).format("%Y-%m-%dT%H:%M:%S")
    )
}

/// The UTC instant of 00:00 UTC-4 of a date (a point's start date).
pub fn start_of(d: NaiveDate) -> DateTime<Utc> {
    midnight(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default()
    }

    /// Chile left summer time on Sunday 2026-04-05 (00:00 UTC-3 became 23:00 UTC-4 of the 4th)
    /// and enters it on Sunday 2026-09-06 (00:00 UTC-4 became 01:00 UTC-3). Across both, the
    /// hourly grid is one slot every 3600 s, each labelled with a distinct UTC-4 hour.
    #[test]
    fn the_hourly_grid_neither_skips_nor_repeats_across_chile_dst_changes() {
        for (from, to) in [
            ("2026-04-04T00:00:00Z", "2026-04-06T12:00:00Z"),
            ("2026-09-05T00:00:00Z", "2026-09-07T12:00:00Z"),
        ] {
            let g = grid(Period::Hourly, at(from), at(to), 1000);
            assert_eq!(g.len(), 60, "{from}");
            for w in g.windows(2) {
                assert_eq!((w[1] - w[0]).num_seconds(), 3600);
            }
            let labels: Vec<(String, String)> = g.iter().map(|t| fecha_hora(*t)).collect();
            let mut sorted = labels.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(sorted, labels, "labels are strictly increasing and unique");
            assert!(labels.iter().all(|(_, h)| h.ends_with(":00:00")));
        }
        // 03:00Z on the 5th of April is 23:00 of the 4th in UTC-4 (00:00 in civil time).
        assert_eq!(
            fecha_hora(at("2026-04-05T03:00:00Z")),
            ("2026-04-04".to_string(), "23:00:00".to_string())
        );
        // 04:00Z on the 6th of September is 00:00 UTC-4 (01:00 in civil summer time).
        assert_eq!(
            fecha_hora(at("2026-09-06T04:00:00Z")),
            ("2026-09-06".to_string(), "00:00:00".to_string())
        );
        // Whatever the process's time zone, the answer is the same instant.
        assert_eq!(
            floor(Period::Hourly, at("2026-09-06T04:59:59Z")),
            at("2026-09-06T04:00:00Z")
        );
    }

    #[test]
    fn daily_monthly_and_semiannual_slots_fall_at_utc4_midnight() {
        assert_eq!(
            grid(
                Period::Daily,
                at("2026-04-04T00:00:00Z"),
                at("2026-04-07T00:00:00Z"),
                10
            ),
            vec![
                at("2026-04-04T04:00:00Z"),
                at("2026-04-05T04:00:00Z"),
                at("2026-04-06T04:00:00Z")
            ]
        );
        assert_eq!(
            grid(
                Period::Monthly,
                at("2026-01-15T00:00:00Z"),
                at("2026-04-01T05:00:00Z"),
                10
            ),
            vec![
                at("2026-02-01T04:00:00Z"),
                at("2026-03-01T04:00:00Z"),
                at("2026-04-01T04:00:00Z")
            ]
        );
        assert_eq!(
            grid(
                Period::Semiannual,
                at("2026-01-01T04:00:00Z"),
                at("2027-01-01T04:00:00Z"),
                10
            ),
            vec![at("2026-01-01T04:00:00Z"), at("2026-07-01T04:00:00Z")]
        );
        for p in [
            Period::Hourly,
            Period::Daily,
            Period::Monthly,
            Period::Semiannual,
        ] {
            let s = at("2026-07-01T04:00:00Z");
            assert_eq!(previous(p, next(p, s)), s, "{p:?}");
            assert_eq!(floor(p, s), s, "{p:?}");
        }
        // 2026-01-01T02:00Z is still 31 December in UTC-4.
        assert_eq!(
            floor(Period::Monthly, at("2026-01-01T02:00:00Z")),
            at("2025-12-01T04:00:00Z")
        );
    }

    #[test]
    fn the_deadline_is_the_standards_lag_after_the_slot() {
        let at0 = at("2026-01-31T04:00:00Z");
        assert_eq!(
            deadline(DgaStandard::Mayor, at0),
            at("2026-02-07T04:00:00Z")
        );
        assert_eq!(
            deadline(DgaStandard::Medio, at0),
            at("2026-02-15T04:00:00Z")
        );
        // One calendar month in UTC-4; 31 January ends at the last day of February.
        assert_eq!(
            deadline(DgaStandard::Menor, at0),
            at("2026-02-28T04:00:00Z")
        );
        assert_eq!(
            deadline(DgaStandard::CaudalesMuyPequenos, at("2026-07-01T04:00:00Z")),
            at("2026-08-01T04:00:00Z")
        );
        assert_eq!(standard_for(None, Period::Daily), DgaStandard::Medio);
        assert_eq!(
            standard_for(Some(DgaStandard::Mayor), Period::Daily),
            DgaStandard::Mayor
        );
    }

    #[test]
    fn the_origin_timestamp_is_utc4_wall_time_with_a_literal_suffix() {
        assert_eq!(
            timestamp_origen(at("2026-01-15T13:05:09Z")),
            "2026-01-15T09:05:09-0000"
        );
        assert_eq!(
            start_of(NaiveDate::from_ymd_opt(2026, 3, 1).expect("date")),
            at("2026-03-01T04:00:00Z")
        );
    }
}
