//! Time as Chile's water regulator (the DGA) counts it: a fixed UTC-4 all year, in which water
//! years and the annual allowance of a water right run on calendar years. Alerts forecast the
//! year's volume with it; compliance reports count in it.

use chrono::{DateTime, FixedOffset, Utc};

/// Offset of the time the DGA counts in (Chile, fixed UTC-4 all year): water years and the
/// annual allowance run on calendar years in that time.
pub const DGA_OFFSET_HOURS: i32 = -4;

/// The DGA's fixed UTC-4, as a time zone.
pub fn dga_zone() -> FixedOffset {
    FixedOffset::east_opt(DGA_OFFSET_HOURS * 3600).expect("a constant offset under 24 h")
}

/// Start of the calendar year (DGA time) that `now` falls in, and of the next one, in UTC.
pub fn dga_year(now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    use chrono::{Datelike, TimeZone};
    let tz = dga_zone();
    let year = now.with_timezone(&tz).year();
    let start = |y: i32| {
        tz.with_ymd_and_hms(y, 1, 1, 0, 0, 0)
            .single()
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or(now)
    };
    (start(year), start(year + 1))
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
    fn the_dga_year_runs_on_utc_minus_4() {
        // 2027-01-01T02:00Z is still 2026-12-31 22:00 in Chile's DGA time.
        let (start, end) = dga_year(at("2027-01-01T02:00:00Z"));
        assert_eq!(start, at("2026-01-01T04:00:00Z"));
        assert_eq!(end, at("2027-01-01T04:00:00Z"));
        assert_eq!(
            dga_year(at("2027-01-01T04:00:00Z")).0,
            at("2027-01-01T04:00:00Z")
        );
    }
}
