//! Sites: the places an agent reports from, each one MQTT identity (username = site id) with its
//! own credential. A site is registered before its agent's batches are accepted, and deactivated
//! (never deleted) when it is decommissioned, so its history stays; a deactivated site's agent can
//! no longer log in to the embedded broker.

use crate::core::db::{Db, each_db};
use caudal_common::SiteId;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;

/// Default seconds without news after which a site counts as offline.
pub const DEFAULT_OFFLINE_AFTER_S: u32 = 900;
/// Longest site name, characters.
pub const MAX_NAME: usize = 200;

/// A registered site.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Site {
    #[schema(value_type = String, example = "pozo-norte")]
    pub id: SiteId,
    /// A name for people ("Pozo Norte, Fundo El Olivo").
    pub name: String,
    /// Whether batches from the site are accepted and its agent may log in.
    pub active: bool,
    /// Seconds without news from the agent after which the site counts as offline (alerts).
    #[schema(format = Int64, maximum = 4294967295_u32)]
    pub offline_after_s: u32,
    /// Whether an MQTT password has been issued (the password itself is never shown again).
    pub has_credential: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Why a site operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    #[error("site {0} is already registered")]
    Exists(SiteId),
    #[error("site {0} is not registered")]
    NotFound(SiteId),
    #[error("name: is longer than {MAX_NAME} characters")]
    Name,
    #[error("offline_after_s: must be at least 1")]
    OfflineAfter,
    #[error("site {site}: stored row is not valid: {reason}")]
    Corrupt { site: String, reason: String },
    #[error("sites: {0}")]
    Database(#[from] sqlx::Error),
}

/// A change to a site; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct Change {
    pub name: Option<String>,
    pub active: Option<bool>,
    pub offline_after_s: Option<u32>,
}

fn check(name: Option<&str>, offline_after_s: Option<u32>) -> Result<(), SiteError> {
    if name.is_some_and(|n| n.chars().count() > MAX_NAME) {
        return Err(SiteError::Name);
    }
    if offline_after_s == Some(0) {
        return Err(SiteError::OfflineAfter);
    }
    Ok(())
}

const COLUMNS: &str = "id, name, active, offline_after_s, mqtt_password_hash IS NOT NULL AS has_credential, created_at, updated_at";

macro_rules! site_rows {
    ($rows:expr, $from_row:ident) => {
        $rows
            .iter()
            .map(|r| {
                let raw: String = r.try_get("id")?;
                let corrupt = |reason: String| SiteError::Corrupt {
                    site: raw.clone(),
                    reason,
                };
                let offline: i64 = r.try_get("offline_after_s")?;
                Ok(Site {
                    id: SiteId::new(&raw).map_err(|e| corrupt(e.to_string()))?,
                    name: r.try_get("name")?,
                    active: r.try_get("active")?,
                    offline_after_s: u32::try_from(offline)
                        .map_err(|_| corrupt(format!("offline_after_s {offline}")))?,
                    has_credential: r.try_get("has_credential")?,
                    created_at: $from_row(r, "created_at")?,
                    updated_at: $from_row(r, "updated_at")?,
                })
            })
            .collect::<Result<Vec<Site>, SiteError>>()
    };
}

/// Registers an active site with the default offline threshold and no credential.
pub async fn add(db: &Db, id: &SiteId, name: &str) -> Result<Site, SiteError> {
    create(db, id, name, DEFAULT_OFFLINE_AFTER_S, None).await
}

/// Registers an active site; `password_hash` is its MQTT credential
/// (`credentials::issue().hash`), or `None` to issue one later.
pub async fn create(
    db: &Db,
    id: &SiteId,
    name: &str,
    offline_after_s: u32,
    password_hash: Option<&str>,
) -> Result<Site, SiteError> {
    check(Some(name), Some(offline_after_s))?;
    let now = Utc::now();
    let inserted = each_db!(db, |p, to_db, _from| {
        sqlx::query(
            "INSERT INTO sites (id, name, active, offline_after_s, mqtt_password_hash, \
             created_at, updated_at) VALUES ($1, $2, TRUE, $3, $4, $5, $5) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(id.as_str())
        .bind(name)
        .bind(i64::from(offline_after_s))
        .bind(password_hash)
        .bind(to_db(now))
        .execute(p)
        .await?
        .rows_affected()
    });
    if inserted == 0 {
        return Err(SiteError::Exists(id.clone()));
    }
    get(db, id)
        .await?
        .ok_or_else(|| SiteError::NotFound(id.clone()))
}

/// Applies `change`; returns the site as stored afterwards.
pub async fn update(db: &Db, id: &SiteId, change: &Change) -> Result<Site, SiteError> {
    check(change.name.as_deref(), change.offline_after_s)?;
    let now = Utc::now();
    let n = each_db!(db, |p, to_db, _from| {
        sqlx::query(
            "UPDATE sites SET name = COALESCE($2, name), active = COALESCE($3, active), \
             offline_after_s = COALESCE($4, offline_after_s), updated_at = $5 WHERE id = $1",
        )
        .bind(id.as_str())
        .bind(change.name.as_deref())
        .bind(change.active)
        .bind(change.offline_after_s.map(i64::from))
        .bind(to_db(now))
        .execute(p)
        .await?
        .rows_affected()
    });
    if n == 0 {
        return Err(SiteError::NotFound(id.clone()));
    }
    get(db, id)
        .await?
        .ok_or_else(|| SiteError::NotFound(id.clone()))
}

/// Activates or deactivates a site.
pub async fn set_active(db: &Db, id: &SiteId, active: bool) -> Result<(), SiteError> {
    let change = Change {
        active: Some(active),
        ..Change::default()
    };
    update(db, id, &change).await.map(|_| ())
}

/// Replaces a site's MQTT credential (`credentials::issue().hash`).
pub async fn set_password_hash(db: &Db, id: &SiteId, hash: &str) -> Result<(), SiteError> {
    let now = Utc::now();
    let n = each_db!(db, |p, to_db, _from| {
        sqlx::query("UPDATE sites SET mqtt_password_hash = $2, updated_at = $3 WHERE id = $1")
            .bind(id.as_str())
            .bind(hash)
            .bind(to_db(now))
            .execute(p)
            .await?
            .rows_affected()
    });
    if n == 0 {
        return Err(SiteError::NotFound(id.clone()));
    }
    Ok(())
}

/// The stored credential of an active site, for a broker login.
pub async fn login_hash(db: &Db, id: &str) -> Result<Option<String>, SiteError> {
    let h: Option<Option<String>> = each_db!(db, |p, _to, _from| {
        sqlx::query_scalar("SELECT mqtt_password_hash FROM sites WHERE id = $1 AND active = TRUE")
            .bind(id)
            .fetch_optional(p)
            .await?
    });
    Ok(h.flatten())
}

/// `(site, hash)` of every active site with a credential, by id (the Mosquitto password file).
pub async fn login_hashes(db: &Db) -> Result<Vec<(String, String)>, SiteError> {
    Ok(each_db!(db, |p, _to, _from| {
        sqlx::query_as(
            "SELECT id, mqtt_password_hash FROM sites \
             WHERE active = TRUE AND mqtt_password_hash IS NOT NULL ORDER BY id",
        )
        .fetch_all(p)
        .await?
    }))
}

/// One site, if registered.
pub async fn get(db: &Db, id: &SiteId) -> Result<Option<Site>, SiteError> {
    let sql = format!("SELECT {COLUMNS} FROM sites WHERE id = $1");
    let mut v = each_db!(db, |p, _to, from_row| {
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id.as_str())
            .fetch_all(p)
            .await?;
        site_rows!(rows, from_row)?
    });
    Ok(v.pop())
}

/// Every site, by id.
pub async fn list(db: &Db) -> Result<Vec<Site>, SiteError> {
    let sql = format!("SELECT {COLUMNS} FROM sites ORDER BY id");
    each_db!(db, |p, _to, from_row| {
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql)).fetch_all(p).await?;
        site_rows!(rows, from_row)
    })
}
