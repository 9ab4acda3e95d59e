//! Sites' Ed25519 public keys (`site_keys`): the key each site's agent signs its batches with,
//! and the keys it had before.
//!
//! **Rotation rule** (enforced by [`enroll`], in one transaction): a site has at most one
//! current key (no `valid_to`); enrolling another closes the current one at that instant and
//! opens the new one. Closed keys are kept forever with their validity range, so the
//! provenance export can still show the key each stored batch was verified with. A key once
//! closed is not enrolled again (it may be why it was rotated away).

use crate::core::db::{Db, each_db};
use caudal_common::SiteId;
use caudal_common::signed::PublicKey;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::Row;

/// One public key of a site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct SiteKey {
    /// Base64 of the 32-byte Ed25519 public key.
    #[schema(value_type = String)]
    pub public_key: String,
    pub valid_from: DateTime<Utc>,
    /// When it was rotated away; absent for the current key.
    pub valid_to: Option<DateTime<Utc>>,
}

/// Why a key could not be enrolled or listed.
#[derive(Debug, thiserror::Error)]
pub enum SiteKeyError {
    #[error("site {0} is not registered")]
    NotFound(SiteId),
    #[error("site {site}: key {key} was rotated away before and is not enrolled again")]
    Reused { site: SiteId, key: PublicKey },
    #[error("site_keys: {0}")]
    Database(#[from] sqlx::Error),
}

/// Makes `key` the site's current key from `now` on, closing the previous one. Enrolling the
/// current key again changes nothing. Returns whether anything changed.
pub async fn enroll(
    db: &Db,
    site: &SiteId,
    key: &PublicKey,
    now: DateTime<Utc>,
) -> Result<bool, SiteKeyError> {
    let text = key.to_string();
    each_db!(db, |p, to_db, _from| {
        let mut tx = p.begin().await?;
        let exists: Option<String> = sqlx::query_scalar("SELECT id FROM sites WHERE id = $1")
            .bind(site.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Err(SiteKeyError::NotFound(site.clone()));
        }
        let known: Option<bool> = sqlx::query_scalar(
            "SELECT valid_to IS NULL FROM site_keys WHERE site = $1 AND public_key = $2",
        )
        .bind(site.as_str())
        .bind(&text)
        .fetch_optional(&mut *tx)
        .await?;
        match known {
            Some(true) => return Ok(false),
            Some(false) => {
                return Err(SiteKeyError::Reused {
                    site: site.clone(),
                    key: *key,
                });
            }
            None => {}
        }
        sqlx::query("UPDATE site_keys SET valid_to = $2 WHERE site = $1 AND valid_to IS NULL")
            .bind(site.as_str())
            .bind(to_db(now))
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO site_keys (site, public_key, valid_from) VALUES ($1, $2, $3)")
            .bind(site.as_str())
            .bind(&text)
            .bind(to_db(now))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    })
}

/// Every key the site has had, oldest first.
pub async fn keys(db: &Db, site: &SiteId) -> Result<Vec<SiteKey>, SiteKeyError> {
    each_db!(db, |p, _to, from_row| {
        let rows = sqlx::query(
            "SELECT public_key, valid_from, valid_to, valid_to IS NULL AS current FROM site_keys WHERE site = $1 \
             ORDER BY valid_from, public_key",
        )
        .bind(site.as_str())
        .fetch_all(p)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let current: bool = r.try_get("current")?;
            let valid_to = if current {
                None
            } else {
                Some(from_row(r, "valid_to")?)
            };
            out.push(SiteKey {
                public_key: r.try_get("public_key")?,
                valid_from: from_row(r, "valid_from")?,
                valid_to,
            });
        }
        Ok(out)
    })
}
