//! The fleet overview's data: every site with what the operator asks first (is it online,
//! when was it last heard, what is it holding back, what did each device read last, which
//! alerts are open, is this month declared to the DGA). Read through the catchment, telemetry,
//! alert and compliance functions the API uses.

use crate::catchment::site;
use crate::core::db::Db;
use crate::telemetry::alert::{self, AlertState, Filter};
use crate::telemetry::{query, store};
use chrono::{DateTime, Utc};

/// One site's row.
#[derive(Debug, Clone)]
pub struct SiteRow {
    pub id: String,
    pub name: String,
    pub active: bool,
    /// `None` until the agent has sent anything.
    pub online: Option<bool>,
    pub last_seen: Option<DateTime<Utc>>,
    pub backlog: Option<i64>,
    pub oldest_unsent_age_s: Option<i64>,
    pub devices: Vec<DeviceCell>,
    pub open_alerts: usize,
    /// This month's DGA slots of the obras fed by this site: (accepted, due); `None` when no
    /// reported obra takes a value from it.
    pub dga: Option<(u64, u64)>,
}

/// A device's latest reading, as the overview shows it.
#[derive(Debug, Clone)]
pub struct DeviceCell {
    pub device: String,
    pub ts: DateTime<Utc>,
    /// `12.50 L/s · 1 234.5 m³`: the channels the reading holds.
    pub values: String,
    pub flagged: bool,
}

/// How the rows are ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sort {
    #[default]
    Site,
    /// Longest silent first.
    LastSeen,
    /// Largest backlog first.
    Backlog,
}

impl Sort {
    pub fn parse(s: Option<&str>) -> Sort {
        match s {
            Some("last_seen") => Sort::LastSeen,
            Some("backlog") => Sort::Backlog,
            _ => Sort::Site,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            Sort::Site => "site",
            Sort::LastSeen => "last_seen",
            Sort::Backlog => "backlog",
        }
    }
}

/// Why the overview could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("sites: {0}")]
    Sites(#[from] site::SiteError),
    #[error("site status: {0}")]
    Status(#[from] store::StoreError),
    #[error("latest values: {0}")]
    Latest(#[from] query::QueryError),
    #[error("alerts: {0}")]
    Alerts(#[from] alert::AlertError),
    #[error("DGA month: {0}")]
    Compliance(#[from] crate::compliance::report::ReportError),
    #[error("DGA settings: {0}")]
    ComplianceSettings(#[from] crate::compliance::store::StoreError),
}

/// How long the overview's DGA figures are reused: the month report reads every obra's slots
/// (seconds for 1 000 obras on SQLite, see docs/performance.md), while the rows refresh every
/// 5 s in every open browser. A change of any point's reporting settings recomputes them at
/// once; a slot's new state shows within this long.
pub const DGA_FIGURES_FOR: std::time::Duration = std::time::Duration::from_secs(60);

type DgaBySite = std::collections::HashMap<String, (u64, u64)>;

/// What the cached figures were computed from: the month, and the reporting settings (how many
/// points, when last changed).
type DgaKey = (String, usize, Option<DateTime<Utc>>);

/// This month's DGA figures per site, computed at most once per [`DGA_FIGURES_FOR`] per
/// process, whoever asks.
#[derive(Debug, Default)]
pub struct DgaFigures {
    last: tokio::sync::Mutex<Option<(std::time::Instant, DgaKey, DgaBySite)>>,
}

impl DgaFigures {
    async fn get(&self, db: &Db) -> Result<DgaBySite, FleetError> {
        use crate::compliance::report::Month;
        let now = Utc::now();
        let configs = crate::compliance::store::point_configs(db).await?;
        let key: DgaKey = (
            Month::of(now).to_string(),
            configs.len(),
            configs.iter().map(|c| c.updated_at).max(),
        );
        // Held across the computation: concurrent refreshes wait for one report, not run many.
        let mut last = self.last.lock().await;
        if let Some((at, k, figures)) = last.as_ref()
            && *k == key
            && at.elapsed() < DGA_FIGURES_FOR
        {
            return Ok(figures.clone());
        }
        let figures = dga_by_site(db, configs, now).await?;
        *last = Some((std::time::Instant::now(), key, figures.clone()));
        Ok(figures)
    }
}

/// This month's (UTC-4) DGA figures per site: the accepted and due slots of every reported
/// obra that takes a value from the site, summed. One month report for the whole fleet.
async fn dga_by_site(
    db: &Db,
    configs: Vec<crate::compliance::store::PointConfig>,
    now: DateTime<Utc>,
) -> Result<DgaBySite, FleetError> {
    use crate::compliance::report::{self, Month};
    let month = report::month_report(db, Month::of(now), &report::Filter::default(), now).await?;
    let configs: std::collections::HashMap<i64, crate::compliance::store::PointConfig> =
        configs.into_iter().map(|c| (c.point_id, c)).collect();
    let mut out = DgaBySite::new();
    for r in month {
        let Some(c) = configs.get(&r.point_id) else {
            continue;
        };
        let mut sites: Vec<&str> = [&c.flow, &c.total, &c.level]
            .into_iter()
            .flatten()
            .map(|s| s.site.as_str())
            .collect();
        sites.sort_unstable();
        sites.dedup();
        let due = r
            .counts
            .expected
            .saturating_sub(r.counts.not_yet_due + r.counts.discarded);
        for site in sites {
            let e = out.entry(site.to_string()).or_default();
            e.0 += r.counts.accepted;
            e.1 += due;
        }
    }
    Ok(out)
}

/// The sites whose id or name contains `filter` (case-insensitive), in `sort` order.
pub async fn rows(
    db: &Db,
    dga: &DgaFigures,
    filter: &str,
    sort: Sort,
) -> Result<Vec<SiteRow>, FleetError> {
    let needle = filter.trim().to_lowercase();
    let dga = dga.get(db).await?;
    let mut out = Vec::new();
    for s in site::list(db).await? {
        if !needle.is_empty()
            && !s.id.as_str().to_lowercase().contains(&needle)
            && !s.name.to_lowercase().contains(&needle)
        {
            continue;
        }
        let status = store::site_status(db, &s.id).await?;
        let devices = query::latest(db, &s.id)
            .await?
            .into_iter()
            .map(|d| DeviceCell {
                values: values(&d),
                flagged: !d.last_reading.quality.is_empty(),
                ts: d.last_reading.ts,
                device: d.device,
            })
            .collect();
        let open_alerts = alert::list(
            db,
            &Filter {
                state: Some(AlertState::Open),
                kind: None,
                site: Some(s.id.as_str().to_string()),
                before: None,
                limit: i64::MAX,
            },
        )
        .await?
        .len();
        out.push(SiteRow {
            id: s.id.as_str().to_string(),
            name: s.name,
            active: s.active,
            online: status.as_ref().map(|st| st.online),
            last_seen: status.as_ref().and_then(|st| st.last_seen),
            backlog: status.as_ref().and_then(|st| st.backlog),
            oldest_unsent_age_s: status.as_ref().and_then(|st| st.oldest_unsent_age_s),
            devices,
            open_alerts,
            dga: dga.get(s.id.as_str()).copied(),
        });
    }
    match sort {
        Sort::Site => out.sort_by(|a, b| a.id.cmp(&b.id)),
        Sort::LastSeen => out.sort_by(|a, b| a.last_seen.cmp(&b.last_seen).then(a.id.cmp(&b.id))),
        Sort::Backlog => out.sort_by(|a, b| b.backlog.cmp(&a.backlog).then(a.id.cmp(&b.id))),
    }
    Ok(out)
}

fn values(d: &query::DeviceLatest) -> String {
    let r = &d.last_reading;
    let mut parts = Vec::new();
    if let Some(f) = r.flow_lps {
        parts.push(format!("{f:.2} L/s"));
    }
    if let Some(t) = r.total_m3 {
        parts.push(format!("{t:.1} m³"));
    }
    if let Some(l) = r.level_m {
        parts.push(format!("{l:.2} m"));
    }
    for (k, v) in &r.extra {
        parts.push(format!("{k} {v}"));
    }
    parts.join(" · ")
}
