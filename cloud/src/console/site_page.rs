//! The site page's data: the agent's status and its devices' last polls, flow / volume / level
//! per device over a chosen range (aggregated to a width that suits the range), the events and
//! the completeness of that range. Read through the telemetry queries the API serves.

use crate::catchment::site::{self, Site};
use crate::core::db::Db;
use crate::telemetry::query::{self, Bucket, EventView};
use crate::telemetry::store::{self, SiteStatus};
use caudal_common::SiteId;
use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

/// The ranges the page offers, and the bucket each is drawn with (about 60 to 1 500 points).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Range {
    Hour,
    #[default]
    Day,
    Week,
    Month,
    Year,
}

impl Range {
    pub const ALL: [Range; 5] = [
        Range::Hour,
        Range::Day,
        Range::Week,
        Range::Month,
        Range::Year,
    ];

    pub fn parse(s: Option<&str>) -> Range {
        match s {
            Some("hour") => Range::Hour,
            Some("week") => Range::Week,
            Some("month") => Range::Month,
            Some("year") => Range::Year,
            _ => Range::Day,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            Range::Hour => "hour",
            Range::Day => "day",
            Range::Week => "week",
            Range::Month => "month",
            Range::Year => "year",
        }
    }

    fn span(self) -> Duration {
        match self {
            Range::Hour => Duration::hours(1),
            Range::Day => Duration::days(1),
            Range::Week => Duration::days(7),
            Range::Month => Duration::days(31),
            Range::Year => Duration::days(365),
        }
    }

    /// The aggregate the range is drawn with.
    pub fn bucket(self) -> Bucket {
        match self {
            Range::Hour | Range::Day => Bucket::Minute,
            Range::Week | Range::Month => Bucket::Hour,
            Range::Year => Bucket::Day,
        }
    }
}

/// One device's chart data, in uPlot's column layout: `x` (bucket starts, Unix seconds) and
/// one column per series, `null` where the bucket has no value.
#[derive(Debug, Clone, Serialize)]
pub struct Chart {
    pub device: String,
    pub x: Vec<i64>,
    pub flow_avg: Vec<Option<f64>>,
    pub flow_min: Vec<Option<f64>>,
    pub flow_max: Vec<Option<f64>>,
    pub volume: Vec<Option<f64>>,
    pub level_avg: Vec<Option<f64>>,
}

impl Chart {
    pub fn has_flow(&self) -> bool {
        self.flow_avg.iter().any(Option::is_some)
    }
    pub fn has_level(&self) -> bool {
        self.level_avg.iter().any(Option::is_some)
    }
    pub fn volume_total(&self) -> f64 {
        self.volume.iter().flatten().sum()
    }
}

/// Everything the site page shows.
#[derive(Debug)]
pub struct SiteData {
    pub site: Site,
    pub status: Option<SiteStatus>,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub charts: Vec<Chart>,
    pub events: Vec<EventView>,
    pub completeness: query::Completeness,
}

/// Why the site page could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SitePageError {
    #[error("site: {0}")]
    Site(#[from] site::SiteError),
    #[error("status: {0}")]
    Status(#[from] store::StoreError),
    #[error("telemetry: {0}")]
    Query(#[from] query::QueryError),
}

/// The site page of `id` over the `range` ending now; `None` when there is no such site.
pub async fn read(db: &Db, id: &SiteId, range: Range) -> Result<Option<SiteData>, SitePageError> {
    let Some(site) = site::get(db, id).await? else {
        return Ok(None);
    };
    let status = store::site_status(db, id).await?;
    let to = Utc::now();
    let from = to - range.span();
    let buckets = query::aggregate(db, id, None, from, to, range.bucket()).await?;
    let mut charts: Vec<Chart> = Vec::new();
    for b in buckets {
        if charts.last().is_none_or(|c| c.device != b.device) {
            charts.push(Chart {
                device: b.device.clone(),
                x: Vec::new(),
                flow_avg: Vec::new(),
                flow_min: Vec::new(),
                flow_max: Vec::new(),
                volume: Vec::new(),
                level_avg: Vec::new(),
            });
        }
        let Some(c) = charts.last_mut() else { continue };
        c.x.push(b.start.timestamp());
        c.flow_avg.push(b.flow_lps.map(|s| s.avg));
        c.flow_min.push(b.flow_lps.map(|s| s.min));
        c.flow_max.push(b.flow_lps.map(|s| s.max));
        c.volume.push(b.volume_m3);
        c.level_avg.push(b.level_m.map(|s| s.avg));
    }
    let events = query::events(db, id, None, &[], from, to, None, 100)
        .await?
        .events;
    let completeness = query::completeness(db, id, from, to, None).await?;
    Ok(Some(SiteData {
        site,
        status,
        from,
        to,
        charts,
        events,
        completeness,
    }))
}

/// An event as the page lists it.
#[derive(Debug, Clone)]
pub struct EventLine {
    pub ts: String,
    pub device: String,
    pub kind: String,
    pub message: String,
}

impl EventLine {
    pub fn of(e: &EventView) -> EventLine {
        EventLine {
            ts: e.ts.format("%Y-%m-%d %H:%M:%S").to_string(),
            device: e.device.clone().unwrap_or_default(),
            kind: e.kind.clone(),
            message: e.message.clone(),
        }
    }
}
