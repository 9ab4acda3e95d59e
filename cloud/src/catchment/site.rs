//! Sites: the places an agent reports from. A site is registered before its agent's batches are
//! accepted, and deactivated (never deleted) when it is decommissioned, so its history stays.

use crate::core::db::{Db, from_sqlite_time, sqlite_time};
use caudal_common::SiteId;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;

/// A registered site.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Site {
    #[schema(value_type = String, example = "pozo-norte")]
    pub id: SiteId,
    /// A name for people ("Pozo Norte, Fundo El Olivo").
    pub name: String,
    /// Whether batches from the site are accepted.
    pub active: bool,
    pub created_at: DateTime<Utc>,
}

/// Why a site operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    #[error("site {0} is already registered")]
    Exists(SiteId),
    #[error("site {0} is not registered")]
    NotFound(SiteId),
    #[error("site {site}: stored row is not valid: {reason}")]
    Corrupt { site: String, reason: String },
    #[error("sites: {0}")]
    Database(#[from] sqlx::Error),
}

/// Registers an active site.
pub async fn add(db: &Db, id: &SiteId, name: &str) -> Result<Site, SiteError> {
    let now = Utc::now();
    let inserted = match db {
        Db::Sqlite(p) => sqlx::query(
            "INSERT INTO sites (id, name, active, created_at) VALUES (?, ?, 1, ?) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(id.as_str())
        .bind(name)
        .bind(sqlite_time(now))
        .execute(p)
        .await?
        .rows_affected(),
        Db::Postgres(p) => sqlx::query(
            "INSERT INTO sites (id, name, active, created_at) VALUES ($1, $2, TRUE, $3) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(id.as_str())
        .bind(name)
        .bind(now)
        .execute(p)
        .await?
        .rows_affected(),
    };
    if inserted == 0 {
        return Err(SiteError::Exists(id.clone()));
    }
    get(db, id)
        .await?
        .ok_or_else(|| SiteError::NotFound(id.clone()))
}

/// Activates or deactivates a site.
pub async fn set_active(db: &Db, id: &SiteId, active: bool) -> Result<(), SiteError> {
    let n = match db {
        Db::Sqlite(p) => sqlx::query("UPDATE sites SET active = ? WHERE id = ?")
            .bind(active)
            .bind(id.as_str())
            .execute(p)
            .await?
            .rows_affected(),
        Db::Postgres(p) => sqlx::query("UPDATE sites SET active = $1 WHERE id = $2")
            .bind(active)
            .bind(id.as_str())
            .execute(p)
            .await?
            .rows_affected(),
    };
    if n == 0 {
        return Err(SiteError::NotFound(id.clone()));
    }
    Ok(())
}

/// One site, if registered.
pub async fn get(db: &Db, id: &SiteId) -> Result<Option<Site>, SiteError> {
    let mut v = select(db, Some(id)).await?;
    Ok(v.pop())
}

/// Every site, by id.
pub async fn list(db: &Db) -> Result<Vec<Site>, SiteError> {
    select(db, None).await
}

async fn select(db: &Db, id: Option<&SiteId>) -> Result<Vec<Site>, SiteError> {
    let id = id.map(SiteId::as_str);
    match db {
        Db::Sqlite(p) => {
            let rows = sqlx::query(
                "SELECT id, name, active, created_at FROM sites \
                 WHERE ?1 IS NULL OR id = ?1 ORDER BY id",
            )
            .bind(id)
            .fetch_all(p)
            .await?;
            rows.iter()
                .map(|r| {
                    let raw: String = r.try_get("id")?;
                    let created: i64 = r.try_get("created_at")?;
                    site(
                        raw.clone(),
                        r.try_get("name")?,
                        r.try_get("active")?,
                        from_sqlite_time(created).ok_or_else(|| SiteError::Corrupt {
                            site: raw,
                            reason: format!("created_at {created} is out of range"),
                        })?,
                    )
                })
                .collect()
        }
        Db::Postgres(p) => {
            let rows = sqlx::query(
                "SELECT id, name, active, created_at FROM sites \
                 WHERE $1::text IS NULL OR id = $1 ORDER BY id",
            )
            .bind(id)
            .fetch_all(p)
            .await?;
            rows.iter()
                .map(|r| {
                    site(
                        r.try_get("id")?,
                        r.try_get("name")?,
                        r.try_get("active")?,
                        r.try_get("created_at")?,
                    )
                })
                .collect()
        }
    }
}

fn site(
    id: String,
    name: String,
    active: bool,
    created_at: DateTime<Utc>,
) -> Result<Site, SiteError> {
    let id = SiteId::new(&id).map_err(|e| SiteError::Corrupt {
        site: id.clone(),
        reason: e.to_string(),
    })?;
    Ok(Site {
        id,
        name,
        active,
        created_at,
    })
}
