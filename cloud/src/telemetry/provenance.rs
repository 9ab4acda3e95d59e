//! Provenance: the signed batches behind the stored records, exported so that an auditor can
//! check where a reading came from with the site's public key alone, and the check itself.
//!
//! The ingest keeps, for every batch it stored signed with its site's enrolled key, the exact
//! bytes the agent signed, the signature and the key (`batch_signatures`, written by
//! `store::store_authenticated` in the commit that stores the records). [`export`] gives them for
//! the batches whose records fall in a time range; [`verify`] checks an export against public
//! keys the auditor got from the site itself (not from the export): every batch's signature
//! must verify over its body with one of them, and every body must be a valid batch of the
//! export's site. Nothing in the export needs to be trusted: altering one byte of a body, a
//! signature or a key makes [`verify`] fail. The format is in `docs/protocol.md`
//! ("Provenance export").

use crate::catchment::site_key::{self, SiteKey, SiteKeyError};
use crate::core::db::{Db, each_db};
use caudal_common::signed::{self, PublicKey, Purpose};
use caudal_common::{Batch, SiteId, payload};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::Row;

/// The `format` of an export.
pub const FORMAT: &str = "caudal-provenance-v1";

/// A site's signed batches over a time range.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProvenanceExport {
    /// `caudal-provenance-v1`.
    pub format: String,
    #[schema(value_type = String)]
    pub site: SiteId,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// Every key the cloud has enrolled for the site, with its validity (informative: the
    /// auditor checks against keys obtained from the site).
    pub keys: Vec<ExportKey>,
    pub batches: Vec<SignedBatch>,
}

/// A key as exported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportKey {
    pub public_key: String,
    pub valid_from: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_to: Option<DateTime<Utc>>,
}

impl From<SiteKey> for ExportKey {
    fn from(k: SiteKey) -> Self {
        ExportKey {
            public_key: k.public_key,
            valid_from: k.valid_from,
            valid_to: k.valid_to,
        }
    }
}

/// One stored signed batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignedBatch {
    pub batch: String,
    pub received_at: DateTime<Utc>,
    /// Base64 of the Ed25519 public key that signed it.
    pub public_key: String,
    /// Base64 of the signature over `caudal/v2/batch\0` followed by `body`'s UTF-8 bytes.
    pub signature: String,
    /// The batch's JSON exactly as the agent signed it.
    pub body: String,
}

/// Why an export could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Keys(#[from] SiteKeyError),
    #[error("batch_signatures: stored body of batch {0} is not UTF-8")]
    Corrupt(String),
    #[error("batch_signatures: {0}")]
    Database(#[from] sqlx::Error),
}

/// The signed batches of `site` that hold a record in `[from, to)`, oldest first.
pub async fn export(
    db: &Db,
    site: &SiteId,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<ProvenanceExport, ExportError> {
    let keys = site_key::keys(db, site).await?;
    let mut batches = Vec::new();
    each_db!(db, |p, to_db, from_row| {
        let rows = sqlx::query(
            "SELECT batch, received_at, public_key, signature, body FROM batch_signatures \
             WHERE site = $1 AND last_ts >= $2 AND first_ts < $3 ORDER BY id",
        )
        .bind(site.as_str())
        .bind(to_db(from))
        .bind(to_db(to))
        .fetch_all(p)
        .await?;
        for r in &rows {
            let batch: String = r.try_get("batch")?;
            let body: Vec<u8> = r.try_get("body")?;
            let body = String::from_utf8(body).map_err(|_| ExportError::Corrupt(batch.clone()))?;
            batches.push(SignedBatch {
                received_at: from_row(r, "received_at")?,
                public_key: r.try_get("public_key")?,
                signature: r.try_get("signature")?,
                body,
                batch,
            });
        }
    });
    Ok(ProvenanceExport {
        format: FORMAT.to_string(),
        site: site.clone(),
        from,
        to,
        keys: keys.into_iter().map(ExportKey::from).collect(),
        batches,
    })
}

/// What a verified export holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Verified {
    pub batches: usize,
    pub readings: usize,
    pub events: usize,
    pub gaps: usize,
}

/// Why an export does not verify; names the batch.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("not a {FORMAT} export")]
    Format,
    #[error("batch {batch}: signed with {key}, which is not one of the given public keys")]
    UnknownKey { batch: String, key: String },
    #[error("batch {batch}: {reason}")]
    Signature { batch: String, reason: String },
    #[error("batch {batch}: body is not a valid batch: {reason}")]
    Body { batch: String, reason: String },
    #[error("batch {batch}: body names site {found}, the export is of site {site}")]
    Site {
        batch: String,
        found: String,
        site: String,
    },
}

/// Checks every batch of `export` against `keys` (the site's public keys, as the auditor got
/// them): signature over the exact body, body a valid batch of the export's site.
pub fn verify(export: &ProvenanceExport, keys: &[PublicKey]) -> Result<Verified, VerifyError> {
    if export.format != FORMAT {
        return Err(VerifyError::Format);
    }
    let mut v = Verified::default();
    for b in &export.batches {
        let key = keys
            .iter()
            .find(|k| k.to_string() == b.public_key)
            .ok_or_else(|| VerifyError::UnknownKey {
                batch: b.batch.clone(),
                key: b.public_key.clone(),
            })?;
        let sig_err = |e: signed::SignedError| VerifyError::Signature {
            batch: b.batch.clone(),
            reason: e.to_string(),
        };
        let sig = signed::decode_signature(&b.signature).map_err(sig_err)?;
        key.verify(Purpose::Batch, b.body.as_bytes(), &sig)
            .map_err(sig_err)?;
        let batch: Batch = payload::decode(b.body.as_bytes()).map_err(|e| VerifyError::Body {
            batch: b.batch.clone(),
            reason: e.to_string(),
        })?;
        if batch.site != export.site {
            return Err(VerifyError::Site {
                batch: b.batch.clone(),
                found: batch.site.to_string(),
                site: export.site.to_string(),
            });
        }
        if batch.batch != b.batch {
            return Err(VerifyError::Body {
                batch: b.batch.clone(),
                reason: format!("body is batch {}", batch.batch),
            });
        }
        v.batches += 1;
        v.readings += batch.readings.len();
        v.events += batch.events.len();
        v.gaps += batch.gaps.len();
    }
    Ok(v)
}
