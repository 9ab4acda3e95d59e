//! The telemetry API: a site's readings (raw or aggregated), latest values, completeness and
//! events, each a read of [`super::query`] behind the caller's token. Times are RFC 3339
//! (`2026-11-28T00:00:00Z`); ranges are `[from, to)`, by default the 24 hours before now.

use super::provenance::{self, ProvenanceExport};
use super::query::{
    self, Bucket, BucketView, Completeness, Cursor, DeviceLatest, EventView, MAX_LIMIT, QueryError,
    ReadingView,
};
use super::store;
use crate::catchment::site;
use crate::core::api::{ApiError, ApiPath, ApiQuery, ApiState, ErrorBody};
use crate::core::auth::Permission;
use crate::core::openapi::{SiteNotFound, SitePath, Unauthorized};
use crate::users::Caller;
use axum::Json;
use axum::extract::State;
use caudal_common::{DeviceId, EventKind, SiteId};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Rows per page when `limit` is not given.
pub const DEFAULT_LIMIT: i64 = 1_000;
/// The longest range a completeness answer covers.
pub const MAX_COMPLETENESS_DAYS: i64 = 366;

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> ApiError {
        match e {
            QueryError::TooLarge { field, message } => ApiError::bad(field, message),
            QueryError::Corrupt(_) => ApiError::corrupt("telemetry", &e),
            QueryError::Database(_) => ApiError::database("reading telemetry", &e),
        }
    }
}

/// The site named by the path: 400 when it cannot be a site id, 404 when not registered.
async fn known_site(state: &ApiState, raw: &str) -> Result<SiteId, ApiError> {
    let id = SiteId::new(raw).map_err(|e| ApiError::bad("site", e.to_string()))?;
    match site::get(&state.db, &id).await {
        Ok(Some(_)) => Ok(id),
        Ok(None) => Err(ApiError::NotFound(format!("site {id}"))),
        Err(e) => Err(ApiError::database("looking up a site", &e)),
    }
}

fn time(field: &str, raw: &str) -> Result<DateTime<Utc>, ApiError> {
    // A `+` in a query string decodes to a space: take it back.
    let fixed = raw.trim().replace(' ', "+");
    DateTime::parse_from_rfc3339(&fixed)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            ApiError::bad(
                field,
                format!("{raw:?} is not an RFC 3339 time such as 2026-11-28T00:00:00Z: {e}"),
            )
        })
}

/// `[from, to)`: `to` defaults to now, `from` to 24 hours before `to`.
fn range(from: Option<&str>, to: Option<&str>) -> Result<(DateTime<Utc>, DateTime<Utc>), ApiError> {
    let to = to
        .map(|t| time("to", t))
        .transpose()?
        .unwrap_or_else(Utc::now);
    let from = from
        .map(|f| time("from", f))
        .transpose()?
        .unwrap_or(to - Duration::hours(24));
    if from >= to {
        return Err(ApiError::bad(
            "from",
            format!("from ({from}) must be before to ({to})"),
        ));
    }
    Ok((from, to))
}

/// A `device` parameter: 400 when it cannot be a device id.
fn device(raw: Option<&str>) -> Result<Option<&str>, ApiError> {
    match raw {
        Some(d) => DeviceId::new(d)
            .map(|_| Some(d))
            .map_err(|e| ApiError::bad("device", e.to_string())),
        None => Ok(None),
    }
}

fn limit(raw: Option<i64>) -> Result<i64, ApiError> {
    match raw {
        None => Ok(DEFAULT_LIMIT),
        Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::bad(
            "limit",
            format!("{n} is not between 1 and {MAX_LIMIT}"),
        )),
    }
}

fn cursor(raw: Option<&str>) -> Result<Option<Cursor>, ApiError> {
    raw.map(|c| {
        Cursor::decode(c).ok_or_else(|| {
            ApiError::bad(
                "cursor",
                format!("{c:?} is not a cursor from a previous page"),
            )
        })
    })
    .transpose()
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct ReadingsParams {
    /// One device; every device of the site when absent.
    #[param(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    device: Option<String>,
    /// Start, inclusive (RFC 3339). Default: 24 hours before `to`.
    #[param(format = DateTime)]
    from: Option<String>,
    /// End, exclusive (RFC 3339). Default: now.
    #[param(format = DateTime)]
    to: Option<String>,
    /// `raw` (default), `minute`, `hour` or `day` (UTC-aligned unless `offset` says otherwise).
    /// At most 10000 buckets.
    #[param(pattern = "^(raw|minute|hour|day)$")]
    bucket: Option<String>,
    /// Buckets only: align them to this fixed UTC offset's wall clock, `±HH:MM` (default
    /// `+00:00`); `-04:00` gives DGA days (fixed UTC-4, no daylight saving).
    #[param(pattern = "^[+-][0-9]{2}:[0-9]{2}$")]
    offset: Option<String>,
    /// Raw only: rows per page, 1..=10000 (default 1000).
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<i64>,
    /// Raw only: `next_cursor` of the previous page.
    #[param(pattern = "^-?[0-9]{1,19}_[0-9]{1,19}$")]
    cursor: Option<String>,
    /// Raw only: readings carrying any of these quality flags (comma-separated names), or
    /// `flagged` for any flag.
    #[param(
        pattern = "^(flagged|not_finite|out_of_range|frozen|totalizer_backwards|totalizer_rollover|totalizer_reset|meter_replaced|reverse_flow|clock_unsynced|restamped|time_unknown|partial|late)(,(flagged|not_finite|out_of_range|frozen|totalizer_backwards|totalizer_rollover|totalizer_reset|meter_replaced|reverse_flow|clock_unsynced|restamped|time_unknown|partial|late))*$"
    )]
    quality: Option<String>,
}

/// Readings of a site: raw rows (`readings`, paged) or aggregates (`buckets`).
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct ReadingsAnswer {
    #[schema(value_type = String)]
    site: SiteId,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    /// `raw`, `minute`, `hour` or `day`.
    bucket: String,
    /// Raw rows ordered by `(ts, seq)` (bucket `raw`).
    #[serde(skip_serializing_if = "Option::is_none")]
    readings: Option<Vec<ReadingView>>,
    /// Pass as `cursor` for the next page; absent on the last page (bucket `raw`).
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
    /// Buckets holding readings, by device then start (other buckets).
    #[serde(skip_serializing_if = "Option::is_none")]
    buckets: Option<Vec<BucketView>>,
}

/// Readings of a site, raw or aggregated.
///
/// Aggregates give flow and level count/avg/min/max and the extracted volume: the sum of the
/// totalizer steps between consecutive readings of a device, each attributed to the bucket of
/// its later reading (the first step is measured from the device's last total before `from`).
/// A reset or meter replacement counts nothing and counting starts again from the new total; a
/// rollover adds the wrap the agent's event names; a decrease counts nothing.
#[utoipa::path(
    get,
    path = "/api/v1/sites/{site}/readings",
    tag = "telemetry",
    security(("bearer" = [])),
    params(SitePath, ReadingsParams),
    responses(
        (status = 200, description = "The readings, raw or aggregated", body = ReadingsAnswer),
        (status = 400, description = "A parameter is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        SiteNotFound,
    ),
)]
pub(super) async fn readings(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(site): ApiPath<String>,
    ApiQuery(p): ApiQuery<ReadingsParams>,
) -> Result<Json<ReadingsAnswer>, ApiError> {
    caller.require(Permission::Read)?;
    let site = known_site(&state, &site).await?;
    let (from, to) = range(p.from.as_deref(), p.to.as_deref())?;
    let bucket = match p.bucket.as_deref().unwrap_or("raw") {
        "raw" => None,
        "minute" => Some(Bucket::Minute),
        "hour" => Some(Bucket::Hour),
        "day" => Some(Bucket::Day),
        other => {
            return Err(ApiError::bad(
                "bucket",
                format!("unknown bucket {other:?}; one of raw, minute, hour, day"),
            ));
        }
    };
    let device = device(p.device.as_deref())?;
    let mut answer = ReadingsAnswer {
        site: site.clone(),
        from,
        to,
        bucket: p.bucket.clone().unwrap_or_else(|| "raw".into()),
        readings: None,
        next_cursor: None,
        buckets: None,
    };
    match bucket {
        None => {
            if p.offset.is_some() {
                return Err(ApiError::bad(
                    "offset",
                    "offset applies to bucketed readings only".to_string(),
                ));
            }
            let quality = p
                .quality
                .as_deref()
                .map(query::quality_filter)
                .transpose()
                .map_err(|m| ApiError::bad("quality", m))?;
            let page = query::raw_readings(
                &state.db,
                &site,
                device,
                from,
                to,
                cursor(p.cursor.as_deref())?,
                quality,
                limit(p.limit)?,
            )
            .await?;
            answer.readings = Some(page.readings);
            answer.next_cursor = page.next_cursor;
        }
        Some(b) => {
            for (field, given) in [
                ("limit", p.limit.is_some()),
                ("cursor", p.cursor.is_some()),
                ("quality", p.quality.is_some()),
            ] {
                if given {
                    return Err(ApiError::bad(
                        field,
                        format!("{field} applies to bucket=raw only"),
                    ));
                }
            }
            let offset = offset(p.offset.as_deref())?;
            answer.buckets =
                Some(query::aggregate_at(&state.db, &site, device, from, to, b, offset).await?);
        }
    }
    Ok(Json(answer))
}

/// A fixed UTC offset `±HH:MM`, at most 14 hours either way (UTC when absent).
fn offset(raw: Option<&str>) -> Result<chrono::FixedOffset, ApiError> {
    let bad = || {
        ApiError::bad(
            "offset",
            format!(
                "{:?} is not a UTC offset: give ±HH:MM, at most 14:00 (e.g. -04:00)",
                raw.unwrap_or_default()
            ),
        )
    };
    let Some(raw) = raw else {
        return chrono::FixedOffset::east_opt(0).ok_or_else(bad);
    };
    let (sign, rest) = match raw.as_bytes().first() {
        Some(b'+') => (1, &raw[1..]),
        Some(b'-') => (-1, &raw[1..]),
        _ => return Err(bad()),
    };
    let (h, m) = rest.split_once(':').ok_or_else(bad)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(bad());
    }
    let h: i32 = h.parse().map_err(|_| bad())?;
    let m: i32 = m.parse().map_err(|_| bad())?;
    if m >= 60 || h * 60 + m > 14 * 60 {
        return Err(bad());
    }
    chrono::FixedOffset::east_opt(sign * (h * 3600 + m * 60)).ok_or_else(bad)
}

/// What the cloud last heard from a site's agent.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct StatusView {
    online: bool,
    /// When the cloud last heard from the agent (a status or a batch).
    last_seen: Option<DateTime<Utc>>,
    /// Records the agent holds that the cloud has not acknowledged.
    backlog: Option<i64>,
    oldest_unsent_age_s: Option<i64>,
    agent_version: Option<String>,
    config_version: Option<String>,
    /// Device id → last poll state, as the agent reported it.
    #[schema(value_type = Option<Object>)]
    devices: Option<serde_json::Value>,
    updated_at: DateTime<Utc>,
}

/// The latest values of a site.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct LatestAnswer {
    #[schema(value_type = String)]
    site: SiteId,
    /// Absent until the agent has sent anything.
    status: Option<StatusView>,
    devices: Vec<DeviceLatest>,
}

/// The latest value of each device and quantity (with its time and quality), and the agent's
/// status.
#[utoipa::path(
    get,
    path = "/api/v1/sites/{site}/latest",
    tag = "telemetry",
    security(("bearer" = [])),
    params(SitePath),
    responses(
        (status = 200, description = "The latest values and the agent's status", body = LatestAnswer),
        (status = 400, description = "A field, parameter or the path is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        SiteNotFound,
    ),
)]
pub(super) async fn latest(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(site): ApiPath<String>,
) -> Result<Json<LatestAnswer>, ApiError> {
    caller.require(Permission::Read)?;
    let site = known_site(&state, &site).await?;
    let status = store::site_status(&state.db, &site)
        .await
        .map_err(|e| match e {
            store::StoreError::Database(_) => ApiError::database("reading site status", &e),
            other => ApiError::corrupt("site status", &other),
        })?
        .map(|s| StatusView {
            online: s.online,
            last_seen: s.last_seen,
            backlog: s.backlog,
            oldest_unsent_age_s: s.oldest_unsent_age_s,
            agent_version: s.agent_version,
            config_version: s.config_version,
            devices: s.devices,
            updated_at: s.updated_at,
        });
    let devices = query::latest(&state.db, &site).await?;
    Ok(Json(LatestAnswer {
        site,
        status,
        devices,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct CompletenessParams {
    /// Start, inclusive (RFC 3339). Default: 24 hours before `to`. At most 366 days before `to`.
    #[param(format = DateTime)]
    from: Option<String>,
    /// End, exclusive (RFC 3339). Default: now.
    #[param(format = DateTime)]
    to: Option<String>,
    /// An interval between two readings of a device longer than this many seconds is a time
    /// gap. Default: 3 × the device's median interval.
    #[param(value_type = Option<f64>, exclusive_minimum = 0)]
    gap_after: Option<String>,
}

/// Completeness of a site: per epoch, the sequence numbers missing among stored readings,
/// events and gaps (and how many eviction gap records account for); per device, stretches
/// without readings; the gap records overlapping the range; totals.
#[utoipa::path(
    get,
    path = "/api/v1/sites/{site}/completeness",
    tag = "telemetry",
    security(("bearer" = [])),
    params(SitePath, CompletenessParams),
    responses(
        (status = 200, description = "The site's completeness over the range", body = Completeness),
        (status = 400, description = "A parameter is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        SiteNotFound,
    ),
)]
pub(super) async fn completeness(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(site): ApiPath<String>,
    ApiQuery(p): ApiQuery<CompletenessParams>,
) -> Result<Json<Completeness>, ApiError> {
    caller.require(Permission::Read)?;
    let site = known_site(&state, &site).await?;
    let (from, to) = range(p.from.as_deref(), p.to.as_deref())?;
    if to - from > Duration::days(MAX_COMPLETENESS_DAYS) {
        return Err(ApiError::bad(
            "from",
            format!("the range is longer than {MAX_COMPLETENESS_DAYS} days"),
        ));
    }
    let gap_after = p
        .gap_after
        .as_deref()
        .map(|g| match g.trim().parse::<f64>() {
            Ok(s) if s.is_finite() && s > 0.0 => Ok(s),
            _ => Err(ApiError::bad(
                "gap_after",
                format!("{g:?} is not a positive number of seconds"),
            )),
        })
        .transpose()?;
    Ok(Json(
        query::completeness(&state.db, &site, from, to, gap_after).await?,
    ))
}

/// A `kind` parameter: event kinds, comma-separated; at least one.
fn event_kinds(raw: &str) -> Result<Vec<String>, ApiError> {
    let kinds = raw
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(|k| {
            serde_json::from_value::<EventKind>(serde_json::Value::String(k.to_string()))
                .map(|_| k.to_string())
                .map_err(|e| ApiError::bad("kind", e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if kinds.is_empty() {
        // An empty filter would match every kind: say so rather than guess what was meant.
        return Err(ApiError::bad(
            "kind",
            "name at least one event kind, or leave `kind` out for every kind",
        ));
    }
    Ok(kinds)
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct EventsParams {
    /// Start, inclusive (RFC 3339). Default: 24 hours before `to`.
    #[param(format = DateTime)]
    from: Option<String>,
    /// End, exclusive (RFC 3339). Default: now.
    #[param(format = DateTime)]
    to: Option<String>,
    /// Only these kinds (comma-separated), e.g. `totalizer_reset,meter_replaced`.
    #[param(
        pattern = "^(not_finite|out_of_range|frozen|totalizer_backwards|totalizer_rollover|totalizer_reset|meter_replaced|reverse_flow|clock_unsynced|clock_synced|device_unreachable|poll_failed|device_recovered|agent_started)(,(not_finite|out_of_range|frozen|totalizer_backwards|totalizer_rollover|totalizer_reset|meter_replaced|reverse_flow|clock_unsynced|clock_synced|device_unreachable|poll_failed|device_recovered|agent_started))*$"
    )]
    kind: Option<String>,
    /// Only this device's events.
    #[param(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    device: Option<String>,
    /// Rows per page, 1..=10000 (default 1000).
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<i64>,
    /// `next_cursor` of the previous page.
    #[param(pattern = "^-?[0-9]{1,19}_[0-9]{1,19}$")]
    cursor: Option<String>,
}

/// A page of events.
#[derive(Debug, Serialize, ToSchema)]
pub(super) struct EventsAnswer {
    #[schema(value_type = String)]
    site: SiteId,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    events: Vec<EventView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    next_cursor: Option<String>,
}

/// Events of a site (quality events, totalizer resets, rollovers and replacements, devices
/// unreachable, agent starts…), ordered by `(ts, seq)`.
#[utoipa::path(
    get,
    path = "/api/v1/sites/{site}/events",
    tag = "telemetry",
    security(("bearer" = [])),
    params(SitePath, EventsParams),
    responses(
        (status = 200, description = "A page of events", body = EventsAnswer),
        (status = 400, description = "A parameter is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        SiteNotFound,
    ),
)]
pub(super) async fn events(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(site): ApiPath<String>,
    ApiQuery(p): ApiQuery<EventsParams>,
) -> Result<Json<EventsAnswer>, ApiError> {
    caller.require(Permission::Read)?;
    let site = known_site(&state, &site).await?;
    let (from, to) = range(p.from.as_deref(), p.to.as_deref())?;
    let kinds = p.kind.as_deref().map(event_kinds).transpose()?;
    let page = query::events(
        &state.db,
        &site,
        device(p.device.as_deref())?,
        kinds.as_deref().unwrap_or_default(),
        from,
        to,
        cursor(p.cursor.as_deref())?,
        limit(p.limit)?,
    )
    .await?;
    Ok(Json(EventsAnswer {
        site,
        from,
        to,
        events: page.events,
        next_cursor: page.next_cursor,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use caudal_common::Flag;
    use utoipa::openapi::schema::Schema;
    use utoipa::openapi::{RefOr, path::Parameter};

    /// The names a `^(a|b)(,(a|b))*$` pattern documents for the parameter `name`.
    fn listed(params: Vec<Parameter>, name: &str) -> Vec<String> {
        let p = params
            .into_iter()
            .find(|p| p.name == name)
            .expect("documented");
        let Some(RefOr::T(Schema::Object(o))) = p.schema else {
            panic!("{name} has an inline schema");
        };
        let pattern = o.pattern.expect("a pattern");
        let alternation = pattern
            .strip_prefix("^(")
            .and_then(|r| r.split_once(')'))
            .expect("^(a|b)…")
            .0;
        assert_eq!(pattern, format!("^({alternation})(,({alternation}))*$"));
        alternation.split('|').map(str::to_string).collect()
    }

    #[test]
    fn documented_event_kinds_are_event_kinds() {
        let names = listed(EventsParams::into_params(|| None), "kind");
        assert!(names.len() >= 13, "{names:?}");
        for n in &names {
            assert!(event_kinds(n).is_ok(), "{n}");
        }
        assert!(event_kinds("").is_err());
        assert!(event_kinds(" , ").is_err());
    }

    #[test]
    fn documented_quality_flags_are_every_flag() {
        let mut names = listed(ReadingsParams::into_params(|| None), "quality");
        let mut known: Vec<String> = Flag::ALL.iter().map(|f| f.name().to_string()).collect();
        known.push("flagged".into());
        names.sort();
        known.sort();
        assert_eq!(names, known);
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct ProvenanceParams {
    /// Records from, inclusive (RFC 3339). Default: 24 hours before `to`.
    #[param(format = DateTime)]
    from: Option<String>,
    /// Records until, exclusive (RFC 3339). Default: now.
    #[param(format = DateTime)]
    to: Option<String>,
}

/// The signed batches behind the site's records in a time range, with their signatures and the
/// site's keys: an auditor checks it with `caudal-cloud verify-export` and the site's public key
/// alone (any role).
#[utoipa::path(
    get,
    path = "/api/v1/sites/{site}/provenance",
    tag = "telemetry",
    security(("bearer" = [])),
    params(SitePath, ProvenanceParams),
    responses(
        (status = 200, description = "The provenance export", body = ProvenanceExport),
        (status = 400, description = "A parameter is wrong; `field` names it", body = ErrorBody),
        Unauthorized,
        SiteNotFound,
    ),
)]
pub(super) async fn provenance(
    State(state): State<ApiState>,
    caller: Caller,
    ApiPath(site): ApiPath<String>,
    ApiQuery(p): ApiQuery<ProvenanceParams>,
) -> Result<Json<ProvenanceExport>, ApiError> {
    caller.require(Permission::Read)?;
    let site = known_site(&state, &site).await?;
    let (from, to) = range(p.from.as_deref(), p.to.as_deref())?;
    provenance::export(&state.db, &site, from, to)
        .await
        .map(Json)
        .map_err(|e| ApiError::database("reading the provenance export", &e))
}
