//! Catchment points: the works water is taken from (the DGA's "obras"), with what the regulator
//! knows them by and what compliance needs to report on them.
//!
//! Besides the point's identity, kind, location and water right, two per-obra facts that the
//! DGA's MEE transmission needs are kept here (see `docs/operations.md`):
//!
//! - `informant_rut`: the RUT of the informante the DGA registered for the obra (`rutUsuario` in
//!   every transmission; the DGA refuses a measurement from anyone else). The informante's MEE
//!   password is not kept here: it belongs with the submission that uses it, encrypted.
//! - `level_sensor_depth_m`: the DGA wants `nivelFreaticoDelPozo`, the depth to water below the
//!   reference point. A pressure sensor reports the water column above itself; with its
//!   installation depth the depth to water is `level_sensor_depth_m − column`. Unset: the level
//!   device reports depth to water directly.
//!
//! A point is never deleted, only deactivated, so measurements declared against it stay
//! attributable.

use super::obra::ObraCode;
use super::rut::Rut;
use crate::core::db::{Db, each_db};
use caudal_common::SiteId;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Row;
use std::str::FromStr;
use utoipa::ToSchema;

/// Longest point name, characters.
pub const MAX_NAME: usize = 200;

/// What a point takes water from and how it is measured; it decides which DGA endpoint its
/// measurements go to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PointKind {
    /// A well: flow, totalizer and depth to water (`mediciones/subterraneas`).
    Groundwater,
    /// A surface intake with a flow meter: flow and totalizer
    /// (`mediciones/superficiales/flujometro`).
    SurfaceFlow,
    /// A surface intake with a level gauge: gauge height and flow (`mediciones/superficiales`).
    SurfaceLevel,
}

/// The DGA monitoring standard (Res. DGA 1.238/2019) the point is assigned; it sets how often
/// measurements are reported and through which channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DgaStandard {
    Mayor,
    Medio,
    Menor,
    CaudalesMuyPequenos,
}

macro_rules! str_enum {
    ($ty:ident { $($v:ident => $s:literal),+ $(,)? }) => {
        impl $ty {
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$v => $s),+ }
            }
        }
        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<$ty, String> {
                match s {
                    $($s => Ok($ty::$v),)+
                    other => Err(format!("unknown {} {other:?}", stringify!($ty))),
                }
            }
        }
    };
}

str_enum!(PointKind {
    Groundwater => "groundwater",
    SurfaceFlow => "surface_flow",
    SurfaceLevel => "surface_level",
});
str_enum!(DgaStandard {
    Mayor => "mayor",
    Medio => "medio",
    Menor => "menor",
    CaudalesMuyPequenos => "caudales_muy_pequenos",
});

/// A stored catchment point.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Point {
    pub id: i64,
    pub name: String,
    /// DGA código de obra; `None` until the DGA assigns one.
    pub obra_code: Option<ObraCode>,
    pub kind: PointKind,
    /// WGS84 degrees; both or neither.
    pub latitude: Option<f64>,
    pub longitude: Option<f64>,
    /// Authorized flow of the water right, L/s.
    pub authorized_flow_lps: Option<f64>,
    /// Authorized annual volume, m³.
    pub annual_volume_m3: Option<f64>,
    pub dga_standard: Option<DgaStandard>,
    /// RUT of the informante the DGA registered for this obra.
    pub informant_rut: Option<Rut>,
    /// Depth of the level sensor below the reference point, m (see the module doc).
    pub level_sensor_depth_m: Option<f64>,
    pub active: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A point to create (the body of `POST /api/v1/points`).
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPoint {
    /// At most 200 characters, not blank.
    #[schema(min_length = 1, max_length = 200)]
    pub name: String,
    #[serde(default)]
    pub obra_code: Option<ObraCode>,
    pub kind: PointKind,
    #[serde(default)]
    #[schema(minimum = -90, maximum = 90)]
    pub latitude: Option<f64>,
    #[serde(default)]
    #[schema(minimum = -180, maximum = 180)]
    pub longitude: Option<f64>,
    #[serde(default)]
    #[schema(exclusive_minimum = 0)]
    pub authorized_flow_lps: Option<f64>,
    #[serde(default)]
    #[schema(exclusive_minimum = 0)]
    pub annual_volume_m3: Option<f64>,
    #[serde(default)]
    pub dga_standard: Option<DgaStandard>,
    #[serde(default)]
    pub informant_rut: Option<Rut>,
    #[serde(default)]
    #[schema(exclusive_minimum = 0)]
    pub level_sensor_depth_m: Option<f64>,
}

/// A change to a point (the body of `PATCH /api/v1/points/{id}`): an absent field stays as it is,
/// `null` clears an optional one.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PointPatch {
    /// At most 200 characters, not blank.
    #[schema(min_length = 1, max_length = 200)]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "super::present")]
    #[schema(value_type = Option<ObraCode>)]
    pub obra_code: Option<Option<ObraCode>>,
    pub kind: Option<PointKind>,
    #[serde(default, deserialize_with = "super::present")]
    #[schema(value_type = Option<f64>, minimum = -90, maximum = 90)]
    pub latitude: Option<Option<f64>>,
    #[serde(default, deserialize_with = "super::present")]
    #[schema(value_type = Option<f64>, minimum = -180, maximum = 180)]
    pub longitude: Option<Option<f64>>,
    #[serde(default, deserialize_with = "super::present")]
    #[schema(value_type = Option<f64>, exclusive_minimum = 0)]
    pub authorized_flow_lps: Option<Option<f64>>,
    #[serde(default, deserialize_with = "super::present")]
    #[schema(value_type = Option<f64>, exclusive_minimum = 0)]
    pub annual_volume_m3: Option<Option<f64>>,
    #[serde(default, deserialize_with = "super::present")]
    #[schema(value_type = Option<DgaStandard>)]
    pub dga_standard: Option<Option<DgaStandard>>,
    #[serde(default, deserialize_with = "super::present")]
    #[schema(value_type = Option<Rut>)]
    pub informant_rut: Option<Option<Rut>>,
    #[serde(default, deserialize_with = "super::present")]
    #[schema(value_type = Option<f64>, exclusive_minimum = 0)]
    pub level_sensor_depth_m: Option<Option<f64>>,
    pub active: Option<bool>,
}

/// Why a point operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PointError {
    #[error("{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("obra_code: a catchment point with código de obra {0} already exists")]
    ObraExists(String),
    #[error("catchment point {0} does not exist")]
    NotFound(i64),
    #[error("catchment point {id}: stored row is not valid: {reason}")]
    Corrupt { id: i64, reason: String },
    #[error("catchment points: {0}")]
    Database(#[from] sqlx::Error),
}

fn invalid(field: &'static str, message: impl Into<String>) -> PointError {
    PointError::Invalid {
        field,
        message: message.into(),
    }
}

fn positive(field: &'static str, v: Option<f64>) -> Result<(), PointError> {
    match v {
        Some(x) if !x.is_finite() || x <= 0.0 => Err(invalid(
            field,
            format!("must be a positive number (got {x})"),
        )),
        _ => Ok(()),
    }
}

impl NewPoint {
    /// Checks what the types alone do not: name, ranges, the coordinate pair.
    pub fn validate(&self) -> Result<(), PointError> {
        if self.name.trim().is_empty() {
            return Err(invalid("name", "must not be empty"));
        }
        if self.name.chars().count() > MAX_NAME {
            return Err(invalid(
                "name",
                format!("is longer than {MAX_NAME} characters"),
            ));
        }
        for (field, v, limit) in [
            ("latitude", self.latitude, 90.0),
            ("longitude", self.longitude, 180.0),
        ] {
            if let Some(x) = v
                && !(x.is_finite() && (-limit..=limit).contains(&x))
            {
                return Err(invalid(
                    field,
                    format!("{x} is outside -{limit}..{limit} degrees"),
                ));
            }
        }
        match (self.latitude, self.longitude) {
            (Some(_), None) => return Err(invalid("longitude", "is required with latitude")),
            (None, Some(_)) => return Err(invalid("latitude", "is required with longitude")),
            _ => {}
        }
        positive("authorized_flow_lps", self.authorized_flow_lps)?;
        positive("annual_volume_m3", self.annual_volume_m3)?;
        positive("level_sensor_depth_m", self.level_sensor_depth_m)?;
        Ok(())
    }

    fn apply(mut self, p: PointPatch) -> NewPoint {
        fn set<T>(field: &mut T, v: Option<T>) {
            if let Some(v) = v {
                *field = v;
            }
        }
        set(&mut self.name, p.name);
        set(&mut self.obra_code, p.obra_code);
        set(&mut self.kind, p.kind);
        set(&mut self.latitude, p.latitude);
        set(&mut self.longitude, p.longitude);
        set(&mut self.authorized_flow_lps, p.authorized_flow_lps);
        set(&mut self.annual_volume_m3, p.annual_volume_m3);
        set(&mut self.dga_standard, p.dga_standard);
        set(&mut self.informant_rut, p.informant_rut);
        set(&mut self.level_sensor_depth_m, p.level_sensor_depth_m);
        self
    }
}

impl From<Point> for NewPoint {
    fn from(p: Point) -> NewPoint {
        NewPoint {
            name: p.name,
            obra_code: p.obra_code,
            kind: p.kind,
            latitude: p.latitude,
            longitude: p.longitude,
            authorized_flow_lps: p.authorized_flow_lps,
            annual_volume_m3: p.annual_volume_m3,
            dga_standard: p.dga_standard,
            informant_rut: p.informant_rut,
            level_sensor_depth_m: p.level_sensor_depth_m,
        }
    }
}

const COLUMNS: &str = "id, name, obra_code, kind, latitude, longitude, authorized_flow_lps, \
    annual_volume_m3, dga_standard, informant_rut, level_sensor_depth_m, active, created_at, \
    updated_at";

fn parse<T: FromStr>(id: i64, raw: Option<String>) -> Result<Option<T>, PointError>
where
    T::Err: std::fmt::Display,
{
    raw.map(|s| {
        s.parse().map_err(|e: T::Err| PointError::Corrupt {
            id,
            reason: e.to_string(),
        })
    })
    .transpose()
}

macro_rules! point_rows {
    ($rows:expr, $from_row:ident) => {
        $rows
            .iter()
            .map(|r| {
                let id: i64 = r.try_get("id")?;
                let kind: String = r.try_get("kind")?;
                Ok(Point {
                    id,
                    name: r.try_get("name")?,
                    obra_code: parse(id, r.try_get("obra_code")?)?,
                    kind: kind
                        .parse()
                        .map_err(|reason| PointError::Corrupt { id, reason })?,
                    latitude: r.try_get("latitude")?,
                    longitude: r.try_get("longitude")?,
                    authorized_flow_lps: r.try_get("authorized_flow_lps")?,
                    annual_volume_m3: r.try_get("annual_volume_m3")?,
                    dga_standard: parse(id, r.try_get("dga_standard")?)?,
                    informant_rut: parse(id, r.try_get("informant_rut")?)?,
                    level_sensor_depth_m: r.try_get("level_sensor_depth_m")?,
                    active: r.try_get("active")?,
                    created_at: $from_row(r, "created_at")?,
                    updated_at: $from_row(r, "updated_at")?,
                })
            })
            .collect::<Result<Vec<Point>, PointError>>()
    };
}

fn unique(e: sqlx::Error, code: Option<&ObraCode>) -> PointError {
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => {
            PointError::ObraExists(code.map(ToString::to_string).unwrap_or_default())
        }
        _ => PointError::Database(e),
    }
}

/// Binds the ten stored fields of a [`NewPoint`] to `q`, in the order both the `INSERT` and
/// the `UPDATE` name them (a macro: the query type differs per backend).
macro_rules! bind_fields {
    ($q:expr, $new:expr) => {{
        let new = $new;
        $q.bind(&new.name)
            .bind(new.obra_code.as_ref().map(ObraCode::as_str))
            .bind(new.kind.as_str())
            .bind(new.latitude)
            .bind(new.longitude)
            .bind(new.authorized_flow_lps)
            .bind(new.annual_volume_m3)
            .bind(new.dga_standard.map(DgaStandard::as_str))
            .bind(new.informant_rut.as_ref().map(Rut::as_str))
            .bind(new.level_sensor_depth_m)
    }};
}

/// Creates an active point.
pub async fn create(db: &Db, new: &NewPoint) -> Result<Point, PointError> {
    new.validate()?;
    let now = Utc::now();
    let id: i64 = each_db!(db, |p, to_db, _from| {
        let insert = sqlx::query_scalar(
            "INSERT INTO catchment_points (name, obra_code, kind, latitude, longitude, \
             authorized_flow_lps, annual_volume_m3, dga_standard, informant_rut, \
             level_sensor_depth_m, active, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, TRUE, $11, $11) RETURNING id",
        );
        bind_fields!(insert, new)
            .bind(to_db(now))
            .fetch_one(p)
            .await
            .map_err(|e| unique(e, new.obra_code.as_ref()))?
    });
    get(db, id).await?.ok_or(PointError::NotFound(id))
}

/// Applies `patch` to point `id` (validated as a whole afterwards); returns the stored point.
pub async fn update(db: &Db, id: i64, patch: PointPatch) -> Result<Point, PointError> {
    let before = get(db, id).await?.ok_or(PointError::NotFound(id))?;
    let active = patch.active.unwrap_or(before.active);
    let new = NewPoint::from(before).apply(patch);
    new.validate()?;
    let now = Utc::now();
    each_db!(db, |p, to_db, _from| {
        let update = sqlx::query(
            "UPDATE catchment_points SET name = $2, obra_code = $3, kind = $4, latitude = $5, \
             longitude = $6, authorized_flow_lps = $7, annual_volume_m3 = $8, \
             dga_standard = $9, informant_rut = $10, level_sensor_depth_m = $11, \
             active = $12, updated_at = $13 WHERE id = $1",
        );
        bind_fields!(update.bind(id), &new)
            .bind(active)
            .bind(to_db(now))
            .execute(p)
            .await
            .map_err(|e| unique(e, new.obra_code.as_ref()))?;
    });
    get(db, id).await?.ok_or(PointError::NotFound(id))
}

/// One point by id.
pub async fn get(db: &Db, id: i64) -> Result<Option<Point>, PointError> {
    let sql = format!("SELECT {COLUMNS} FROM catchment_points WHERE id = $1");
    let mut v = each_db!(db, |p, _to, from_row| {
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_all(p)
            .await?;
        point_rows!(rows, from_row)?
    });
    Ok(v.pop())
}

/// Every point, by id.
pub async fn list(db: &Db) -> Result<Vec<Point>, PointError> {
    let sql = format!("SELECT {COLUMNS} FROM catchment_points ORDER BY id");
    each_db!(db, |p, _to, from_row| {
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(p).await?;
        point_rows!(rows, from_row)
    })
}

/// A water right a point may hold: what it may extract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Right {
    /// `authorized_flow_lps`, L/s.
    AuthorizedFlow,
    /// `annual_volume_m3`, m³ in a DGA year.
    AnnualVolume,
}

impl Right {
    fn column(self) -> &'static str {
        match self {
            Right::AuthorizedFlow => "authorized_flow_lps",
            Right::AnnualVolume => "annual_volume_m3",
        }
    }
}

/// An active point's right, with the devices that measure it.
#[derive(Debug, Clone, PartialEq)]
pub struct MeasuredRight {
    pub id: i64,
    pub name: String,
    pub obra_code: Option<String>,
    /// The right's value, in its unit.
    pub limit: f64,
    /// `(site, device)` of each active device on an active site linked to the point, by site
    /// then device.
    pub devices: Vec<(SiteId, String)>,
}

/// Active points holding `right` and measured by at least one active device on an active
/// site, by id.
pub async fn measured_rights(db: &Db, right: Right) -> Result<Vec<MeasuredRight>, PointError> {
    let column = right.column();
    let sql = format!(
        "SELECT p.id, p.name, p.obra_code, p.{column} AS limit_value, d.site, d.id AS device \
         FROM catchment_points p \
         JOIN devices d ON d.point_id = p.id AND d.active \
         JOIN sites s ON s.id = d.site AND s.active \
         WHERE p.active AND p.{column} IS NOT NULL ORDER BY p.id, d.site, d.id"
    );
    let rows: Vec<(i64, String, Option<String>, f64, String, String)> =
        each_db!(db, |p, _to, _from| {
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .fetch_all(p)
                .await?
        });
    let mut out: Vec<MeasuredRight> = Vec::new();
    for (id, name, obra_code, limit, site, device) in rows {
        let Ok(site) = SiteId::new(&site) else {
            continue;
        };
        match out.last_mut() {
            Some(p) if p.id == id => p.devices.push((site, device)),
            _ => out.push(MeasuredRight {
                id,
                name,
                obra_code,
                limit,
                devices: vec![(site, device)],
            }),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn well() -> NewPoint {
        serde_json::from_str(r#"{"name":"Pozo 1","kind":"groundwater"}"#).expect("minimal point")
    }

    #[test]
    fn ranges_and_pairs_name_the_field() {
        let field = |p: NewPoint| match p.validate() {
            Err(PointError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert!(well().validate().is_ok());
        assert_eq!(
            field(NewPoint {
                latitude: Some(-91.0),
                longitude: Some(-70.0),
                ..well()
            }),
            "latitude"
        );
        assert_eq!(
            field(NewPoint {
                latitude: Some(-33.4),
                ..well()
            }),
            "longitude"
        );
        assert_eq!(
            field(NewPoint {
                annual_volume_m3: Some(0.0),
                ..well()
            }),
            "annual_volume_m3"
        );
        assert_eq!(
            field(NewPoint {
                name: "  ".into(),
                ..well()
            }),
            "name"
        );
    }

    #[test]
    fn patches_tell_absent_from_null() {
        let p: PointPatch = serde_json::from_str(r#"{"obra_code":null}"#).expect("valid");
        assert_eq!(p.obra_code, Some(None));
        assert_eq!(p.latitude, None);
        let p: PointPatch = serde_json::from_str(r#"{"obra_code":"OB-0602-7"}"#).expect("valid");
        assert!(matches!(p.obra_code, Some(Some(_))));
        assert!(serde_json::from_str::<PointPatch>(r#"{"obra_code":"OB-0602-0"}"#).is_err());
    }
}
