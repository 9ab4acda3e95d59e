//! Devices: the meters and sensors of a site, keyed by (site, device id) exactly as the site's
//! agent names them in its readings, with what they measure and the catchment point their
//! measurements belong to. Several devices may feed one point (a flow meter and a level sensor
//! on one well, or meters whose totals are summed into one obra). A device is never deleted, only
//! deactivated.

use crate::core::db::{Db, each_db};
use caudal_common::{DeviceId, SiteId};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use utoipa::ToSchema;

/// Longest device name, characters.
pub const MAX_NAME: usize = 200;
/// Longest profile or extra channel name, bytes.
pub const MAX_LABEL: usize = 64;

/// A quantity of the reading contract (`caudal_common::payload::Reading`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Quantity {
    /// `flow_lps`, L/s.
    Flow,
    /// `total_m3`, m³.
    Totalizer,
    /// `level_m`, m.
    Level,
}

/// A stored device.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Device {
    #[schema(value_type = String, example = "pozo-norte")]
    pub site: SiteId,
    /// As the agent reports it in readings' `device`.
    #[schema(value_type = String, example = "flow-1")]
    pub id: DeviceId,
    pub name: String,
    /// Meter profile (`config/profiles/<profile>.toml`), empty when unknown.
    pub profile: String,
    /// What it measures.
    pub quantities: Vec<Quantity>,
    /// Names of the extra channels it reports (readings' `extra`).
    pub extras: Vec<String>,
    /// The catchment point its measurements belong to.
    pub point_id: Option<i64>,
    pub active: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A device to create (the body of `POST /api/v1/sites/{site}/devices`).
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDevice {
    /// As the agent reports it in readings' `device`.
    #[schema(value_type = String, pattern = "^[A-Za-z0-9._-]{1,64}$", example = "flow-1")]
    pub id: DeviceId,
    /// At most 200 characters.
    #[serde(default)]
    #[schema(max_length = 200)]
    pub name: String,
    /// Meter profile; empty when unknown.
    #[serde(default)]
    #[schema(pattern = "^[A-Za-z0-9._-]{0,64}$")]
    pub profile: String,
    /// What it measures, each once.
    #[serde(default)]
    #[schema(value_type = std::collections::BTreeSet<Quantity>)]
    pub quantities: Vec<Quantity>,
    /// Names of its extra channels, each once.
    #[serde(default)]
    #[schema(value_type = std::collections::BTreeSet<Label>)]
    pub extras: Vec<String>,
    #[serde(default)]
    pub point_id: Option<i64>,
}

/// An extra channel's name, as the agent's configuration allows it.
#[derive(ToSchema)]
#[schema(pattern = "^[A-Za-z0-9._-]{1,64}$")]
#[allow(dead_code)]
struct Label(String);

/// A change to a device: an absent field stays as it is; `"point_id": null` unlinks it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DevicePatch {
    #[schema(max_length = 200)]
    pub name: Option<String>,
    #[schema(pattern = "^[A-Za-z0-9._-]{0,64}$")]
    pub profile: Option<String>,
    #[schema(value_type = Option<std::collections::BTreeSet<Quantity>>)]
    pub quantities: Option<Vec<Quantity>>,
    #[schema(value_type = Option<std::collections::BTreeSet<Label>>)]
    pub extras: Option<Vec<String>>,
    /// `null` unlinks the device from its point.
    #[serde(default, deserialize_with = "super::present")]
    #[schema(value_type = Option<i64>)]
    pub point_id: Option<Option<i64>>,
    pub active: Option<bool>,
}

/// Why a device operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("site {0} is not registered")]
    SiteNotFound(SiteId),
    #[error("point_id: catchment point {0} does not exist")]
    PointNotFound(i64),
    #[error("point_id: catchment point {0} is deactivated")]
    PointInactive(i64),
    #[error("device {device} of site {site} already exists")]
    Exists { site: SiteId, device: DeviceId },
    #[error("device {device} of site {site} does not exist")]
    NotFound { site: SiteId, device: DeviceId },
    #[error("device {site}/{device}: stored row is not valid: {reason}")]
    Corrupt {
        site: String,
        device: String,
        reason: String,
    },
    #[error("devices: {0}")]
    Database(#[from] sqlx::Error),
}

fn invalid(field: &'static str, message: impl Into<String>) -> DeviceError {
    DeviceError::Invalid {
        field,
        message: message.into(),
    }
}

/// A profile or channel name: what the agent's configuration allows in names.
fn label(field: &'static str, s: &str, may_be_empty: bool) -> Result<(), DeviceError> {
    if s.is_empty() {
        return if may_be_empty {
            Ok(())
        } else {
            Err(invalid(field, "a name must not be empty"))
        };
    }
    if s.len() > MAX_LABEL {
        return Err(invalid(
            field,
            format!("{s:?} is longer than {MAX_LABEL} bytes"),
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(invalid(
            field,
            format!(
                "{s:?} contains {c:?}; only ASCII letters, digits, '-', '_' and '.' are allowed"
            ),
        ));
    }
    Ok(())
}

fn check(
    name: Option<&str>,
    profile: Option<&str>,
    quantities: Option<&[Quantity]>,
    extras: Option<&[String]>,
) -> Result<(), DeviceError> {
    if name.is_some_and(|n| n.chars().count() > MAX_NAME) {
        return Err(invalid(
            "name",
            format!("is longer than {MAX_NAME} characters"),
        ));
    }
    if let Some(p) = profile {
        label("profile", p, true)?;
    }
    if let Some(q) = quantities {
        let mut seen = q.to_vec();
        seen.sort();
        if seen.windows(2).any(|w| w[0] == w[1]) {
            return Err(invalid("quantities", "lists a quantity twice"));
        }
    }
    if let Some(x) = extras {
        for e in x {
            label("extras", e, false)?;
        }
        let mut seen = x.to_vec();
        seen.sort();
        if let Some(w) = seen.windows(2).find(|w| w[0] == w[1]) {
            return Err(invalid("extras", format!("lists {:?} twice", w[0])));
        }
    }
    Ok(())
}

const COLUMNS: &str =
    "site, id, name, profile, quantities, extras, point_id, active, created_at, updated_at";

macro_rules! device_rows {
    ($rows:expr, $from_row:ident) => {
        $rows
            .iter()
            .map(|r| {
                let site: String = r.try_get("site")?;
                let id: String = r.try_get("id")?;
                let corrupt = |reason: String| DeviceError::Corrupt {
                    site: site.clone(),
                    device: id.clone(),
                    reason,
                };
                let quantities: String = r.try_get("quantities")?;
                let extras: String = r.try_get("extras")?;
                Ok(Device {
                    site: SiteId::new(&site).map_err(|e| corrupt(e.to_string()))?,
                    id: DeviceId::new(&id).map_err(|e| corrupt(e.to_string()))?,
                    name: r.try_get("name")?,
                    profile: r.try_get("profile")?,
                    quantities: serde_json::from_str(&quantities)
                        .map_err(|e| corrupt(format!("quantities: {e}")))?,
                    extras: serde_json::from_str(&extras)
                        .map_err(|e| corrupt(format!("extras: {e}")))?,
                    point_id: r.try_get("point_id")?,
                    active: r.try_get("active")?,
                    created_at: $from_row(r, "created_at")?,
                    updated_at: $from_row(r, "updated_at")?,
                })
            })
            .collect::<Result<Vec<Device>, DeviceError>>()
    };
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "[]".to_string())
}

/// Refuses a link to a point that does not exist or is deactivated.
async fn check_point(db: &Db, point: Option<i64>) -> Result<(), DeviceError> {
    let Some(id) = point else { return Ok(()) };
    let active: Option<bool> = each_db!(db, |p, _to, _from| {
        sqlx::query_scalar("SELECT active FROM catchment_points WHERE id = $1")
            .bind(id)
            .fetch_optional(p)
            .await?
    });
    match active {
        None => Err(DeviceError::PointNotFound(id)),
        Some(false) => Err(DeviceError::PointInactive(id)),
        Some(true) => Ok(()),
    }
}

async fn site_exists(db: &Db, site: &SiteId) -> Result<(), DeviceError> {
    let found: Option<String> = each_db!(db, |p, _to, _from| {
        sqlx::query_scalar("SELECT id FROM sites WHERE id = $1")
            .bind(site.as_str())
            .fetch_optional(p)
            .await?
    });
    found
        .map(|_| ())
        .ok_or_else(|| DeviceError::SiteNotFound(site.clone()))
}

/// Registers an active device of `site`.
pub async fn create(db: &Db, site: &SiteId, new: &NewDevice) -> Result<Device, DeviceError> {
    check(
        Some(&new.name),
        Some(&new.profile),
        Some(&new.quantities),
        Some(&new.extras),
    )?;
    site_exists(db, site).await?;
    check_point(db, new.point_id).await?;
    let now = Utc::now();
    let inserted = each_db!(db, |p, to_db, _from| {
        sqlx::query(
            "INSERT INTO devices (site, id, name, profile, quantities, extras, point_id, active, \
             created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, TRUE, $8, $8) \
             ON CONFLICT (site, id) DO NOTHING",
        )
        .bind(site.as_str())
        .bind(new.id.as_str())
        .bind(&new.name)
        .bind(&new.profile)
        .bind(json(&new.quantities))
        .bind(json(&new.extras))
        .bind(new.point_id)
        .bind(to_db(now))
        .execute(p)
        .await?
        .rows_affected()
    });
    if inserted == 0 {
        return Err(DeviceError::Exists {
            site: site.clone(),
            device: new.id.clone(),
        });
    }
    get(db, site, &new.id)
        .await?
        .ok_or_else(|| DeviceError::NotFound {
            site: site.clone(),
            device: new.id.clone(),
        })
}

/// Applies `patch`; returns the device as stored afterwards.
pub async fn update(
    db: &Db,
    site: &SiteId,
    id: &DeviceId,
    patch: &DevicePatch,
) -> Result<Device, DeviceError> {
    check(
        patch.name.as_deref(),
        patch.profile.as_deref(),
        patch.quantities.as_deref(),
        patch.extras.as_deref(),
    )?;
    let not_found = || DeviceError::NotFound {
        site: site.clone(),
        device: id.clone(),
    };
    let before = get(db, site, id).await?.ok_or_else(not_found)?;
    if let Some(point) = patch.point_id
        && point != before.point_id
    {
        check_point(db, point).await?;
    }
    let point_id = patch.point_id.unwrap_or(before.point_id);
    let now = Utc::now();
    each_db!(db, |p, to_db, _from| {
        sqlx::query(
            "UPDATE devices SET name = COALESCE($3, name), profile = COALESCE($4, profile), \
             quantities = COALESCE($5, quantities), extras = COALESCE($6, extras), \
             point_id = $7, active = COALESCE($8, active), updated_at = $9 \
             WHERE site = $1 AND id = $2",
        )
        .bind(site.as_str())
        .bind(id.as_str())
        .bind(patch.name.as_deref())
        .bind(patch.profile.as_deref())
        .bind(patch.quantities.as_ref().map(json))
        .bind(patch.extras.as_ref().map(json))
        .bind(point_id)
        .bind(patch.active)
        .bind(to_db(now))
        .execute(p)
        .await?;
    });
    get(db, site, id).await?.ok_or_else(not_found)
}

/// One device.
pub async fn get(db: &Db, site: &SiteId, id: &DeviceId) -> Result<Option<Device>, DeviceError> {
    let sql = format!("SELECT {COLUMNS} FROM devices WHERE site = $1 AND id = $2");
    let mut v = each_db!(db, |p, _to, from_row| {
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(site.as_str())
            .bind(id.as_str())
            .fetch_all(p)
            .await?;
        device_rows!(rows, from_row)?
    });
    Ok(v.pop())
}

/// Every device of `site`, by id; the site must exist.
pub async fn list(db: &Db, site: &SiteId) -> Result<Vec<Device>, DeviceError> {
    site_exists(db, site).await?;
    let sql = format!("SELECT {COLUMNS} FROM devices WHERE site = $1 ORDER BY id");
    each_db!(db, |p, _to, from_row| {
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(site.as_str())
            .fetch_all(p)
            .await?;
        device_rows!(rows, from_row)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_lists_are_checked() {
        let field = |r: Result<(), DeviceError>| match r {
            Err(DeviceError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert!(check(Some(""), Some(""), Some(&[]), Some(&[])).is_ok());
        assert_eq!(field(check(None, Some("a b"), None, None)), "profile");
        assert_eq!(
            field(check(
                None,
                None,
                Some(&[Quantity::Flow, Quantity::Flow]),
                None
            )),
            "quantities"
        );
        assert_eq!(
            field(check(None, None, None, Some(&["t".into(), "t".into()]))),
            "extras"
        );
        assert_eq!(
            field(check(None, None, None, Some(&[String::new()]))),
            "extras"
        );
    }
}
