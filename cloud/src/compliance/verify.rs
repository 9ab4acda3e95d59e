//! Receipt verification: asks the DGA's GET endpoint what it stored under an accepted slot's
//! receipt and compares it with what was declared, field by field ([`verify_slot`]), on a
//! person's request (`POST …/slots/{slot}/verify`) or for a small random sample of accepted
//! slots in the background ([`Verifier`]). The answer is kept with the slot in
//! `compliance_verifications`, one row per check (the latest is the slot's verification):
//!
//! | outcome | when |
//! |---|---|
//! | `ok` | the GET answers `00` and every field of the endpoint equals what was sent |
//! | `mismatch` | it answers `00` with a field that differs (`detail` names each one); the `receipt_mismatch` alert opens |
//! | `unverified` | no usable answer: a transport error, a non-2xx, HTML, a status other than `00`, no `data` (`detail` says which) |
//!
//! What was declared is the body of the accepting exchange, exactly as it was sent (the slot's
//! values when no body was kept). The GET writes `fechaMedicion` as `DD-MM-YYYY`; it is
//! normalised before comparing (`dga::stored`). Numbers compare by value (`"10.50"` and `10.5`
//! are the same), everything else as text; an absent field equals an empty one.
//!
//! Nothing here changes a slot's state: a mismatch is a fact for a person (and for a
//! rectification request to the DGA, `report::dossier`), never a reason to send again: **an
//! accepted slot is never POSTed again**.

use super::dga::{self, DgaClient, Endpoint, GetRequest, RawResponse, Stored, TransportError};
use super::store::{self, StoreError};
use crate::catchment::point;
use crate::core::Shutdown;
use crate::core::config::ComplianceConfig;
use crate::core::db::{Db, each_db};
use crate::core::metrics::KindLabels;
use chrono::{DateTime, Utc};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Serialize;
use sqlx::Row;
use std::sync::Arc;
use utoipa::ToSchema;

/// Who a background check is recorded as.
pub const SAMPLER: &str = "sample";

/// Why a slot could not be checked (the GET's own failures are an `unverified` outcome, not
/// an error).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("slot {1} of point {0} not found")]
    NoSlot(i64, DateTime<Utc>),
    #[error("slot {1} of point {0} is {2}: only an accepted slot with a receipt can be checked")]
    NotVerifiable(i64, DateTime<Utc>, &'static str),
    #[error("point {0} has no código de obra or no reporting settings")]
    NoObra(i64),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("catchment points: {0}")]
    Point(#[from] point::PointError),
}

impl From<sqlx::Error> for VerifyError {
    fn from(e: sqlx::Error) -> VerifyError {
        VerifyError::Store(StoreError::Database(e))
    }
}

/// What a check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum VerifyOutcome {
    Ok,
    Mismatch,
    Unverified,
}

impl VerifyOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            VerifyOutcome::Ok => "ok",
            VerifyOutcome::Mismatch => "mismatch",
            VerifyOutcome::Unverified => "unverified",
        }
    }

    fn parse(s: &str) -> Result<VerifyOutcome, StoreError> {
        match s {
            "ok" => Ok(VerifyOutcome::Ok),
            "mismatch" => Ok(VerifyOutcome::Mismatch),
            "unverified" => Ok(VerifyOutcome::Unverified),
            other => Err(StoreError::Corrupt(format!(
                "verification outcome {other:?}"
            ))),
        }
    }
}

/// One field the DGA holds otherwise than it was sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Difference {
    /// The MEE field name (`caudal`, `fechaMedicion`, …).
    pub field: String,
    pub declared: String,
    /// What the GET answered; absent when it left the field out.
    pub dga: Option<String>,
}

/// One check of a slot's receipt, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Verification {
    pub id: i64,
    pub point_id: i64,
    pub slot_at: DateTime<Utc>,
    pub receipt: String,
    pub checked_at: DateTime<Utc>,
    pub outcome: VerifyOutcome,
    /// What differs (a mismatch), or why nothing could be read (unverified); empty when ok.
    pub detail: String,
    pub http_status: Option<i64>,
    /// The GET's answer, at most `dga::MAX_KEPT_BODY` characters.
    pub response: Option<String>,
    /// `sample` (the background check) or the account that asked.
    pub requested_by: String,
}

/// The MEE fields of an endpoint's measurement object, in the manual's order.
pub fn fields(e: Endpoint) -> &'static [&'static str] {
    match e {
        Endpoint::Subterranea => &[
            "caudal",
            "fechaMedicion",
            "horaMedicion",
            "nivelFreaticoDelPozo",
            "totalizador",
        ],
        Endpoint::SuperficialFlujometro => {
            &["caudal", "fechaMedicion", "horaMedicion", "totalizador"]
        }
        Endpoint::Superficial => &[
            "alturaLimnimetrica",
            "caudal",
            "fechaMedicion",
            "horaMedicion",
        ],
    }
}

fn stored_field<'a>(s: &'a Stored, field: &str) -> Option<&'a str> {
    match field {
        "caudal" => s.caudal.as_deref(),
        "fechaMedicion" => s.fecha.as_deref(),
        "horaMedicion" => s.hora.as_deref(),
        "totalizador" => s.totalizador.as_deref(),
        "nivelFreaticoDelPozo" => s.nivel.as_deref(),
        "alturaLimnimetrica" => s.altura.as_deref(),
        _ => None,
    }
}

fn same(declared: &str, dga: Option<&str>) -> bool {
    let (d, g) = (declared.trim(), dga.unwrap_or_default().trim());
    if d == g {
        return true;
    }
    match (d.parse::<f64>(), g.parse::<f64>()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// The fields of `endpoint` whose stored value differs from the declared one (`declared`:
/// MEE field name → value as sent).
pub fn compare(
    endpoint: Endpoint,
    declared: &serde_json::Map<String, serde_json::Value>,
    stored: &Stored,
) -> Vec<Difference> {
    fields(endpoint)
        .iter()
        .filter_map(|f| {
            let d = declared
                .get(*f)
                .and_then(|v| v.as_str())
                .unwrap_or_default();
            let g = stored_field(stored, f);
            (!same(d, g)).then(|| Difference {
                field: (*f).to_string(),
                declared: d.to_string(),
                dga: g.map(str::to_string),
            })
        })
        .collect()
}

/// What an answer to the GET means for a slot that declared `declared`.
pub fn judge(
    endpoint: Endpoint,
    declared: &serde_json::Map<String, serde_json::Value>,
    answer: &Result<RawResponse, TransportError>,
) -> (VerifyOutcome, String) {
    let r = match answer {
        Err(e) => return (VerifyOutcome::Unverified, e.to_string()),
        Ok(r) => r,
    };
    match dga::stored(r) {
        Err(why) => (VerifyOutcome::Unverified, why),
        Ok(s) => {
            let diff = compare(endpoint, declared, &s);
            if diff.is_empty() {
                (VerifyOutcome::Ok, String::new())
            } else {
                let what: Vec<String> = diff
                    .iter()
                    .map(|d| {
                        format!(
                            "{}: declared {:?}, the DGA holds {}",
                            d.field,
                            d.declared,
                            d.dga
                                .as_ref()
                                .map_or("nothing".to_string(), |g| format!("{g:?}"))
                        )
                    })
                    .collect();
                (VerifyOutcome::Mismatch, what.join("; "))
            }
        }
    }
}

/// The measurement object a slot declared, exactly as sent in its accepting exchange (or
/// built from the slot's values when no exchange kept a body).
pub async fn declared(
    db: &Db,
    slot: &store::Slot,
) -> Result<serde_json::Map<String, serde_json::Value>, StoreError> {
    let exchanges = store::exchanges(db, slot.point_id, slot.slot_at).await?;
    let sent = exchanges
        .iter()
        .rev()
        .find(|x| {
            matches!(
                x.outcome.as_deref(),
                Some("accepted" | "duplicate" | "accepted_no_receipt")
            )
        })
        .and_then(|x| x.request["body"].as_object())
        .and_then(|b| {
            b.iter()
                .find(|(k, _)| k.starts_with("medicion"))
                .and_then(|(_, v)| v.as_object().cloned())
        });
    if let Some(m) = sent {
        return Ok(m);
    }
    let v = slot.values.clone().unwrap_or_default();
    let mut m = serde_json::Map::new();
    let mut put = |k: &str, v: &str| {
        m.insert(k.to_string(), serde_json::Value::String(v.to_string()));
    };
    put("caudal", &v.caudal);
    put("fechaMedicion", &slot.fecha);
    put("horaMedicion", &slot.hora);
    put("totalizador", v.totalizador.as_deref().unwrap_or_default());
    put(
        "nivelFreaticoDelPozo",
        v.nivel.as_deref().unwrap_or_default(),
    );
    put(
        "alturaLimnimetrica",
        v.altura.as_deref().unwrap_or_default(),
    );
    Ok(m)
}

/// Checks one slot's receipt with the DGA and stores what was found.
pub async fn verify_slot<C: DgaClient>(
    db: &Db,
    client: &C,
    point_id: i64,
    at: DateTime<Utc>,
    by: &str,
    now: DateTime<Utc>,
) -> Result<Verification, VerifyError> {
    let slot = store::slot(db, point_id, at)
        .await?
        .ok_or(VerifyError::NoSlot(point_id, at))?;
    let receipt = match (&slot.receipt, slot.state) {
        (Some(r), s) if s.is_accepted() => r.clone(),
        (_, s) => {
            let what = if s.is_accepted() {
                "accepted without a receipt"
            } else {
                s.as_str()
            };
            return Err(VerifyError::NotVerifiable(point_id, at, what));
        }
    };
    let config = store::point_config(db, point_id)
        .await?
        .ok_or(VerifyError::NoObra(point_id))?;
    let obra = point::get(db, point_id)
        .await?
        .and_then(|p| p.obra_code)
        .ok_or(VerifyError::NoObra(point_id))?;
    let settings = store::settings(db).await?;
    let declared = declared(db, &slot).await?;
    let req = GetRequest {
        base_url: settings.dga_base_url,
        endpoint: config.endpoint,
        codigo_obra: obra.to_string(),
        receipt: receipt.clone(),
    };
    let answer = client.get(&req).await;
    let (outcome, detail) = judge(config.endpoint, &declared, &answer);
    let (http_status, response) = match &answer {
        Ok(r) => (
            Some(i64::from(r.status)),
            Some(r.body.chars().take(dga::MAX_KEPT_BODY).collect::<String>()),
        ),
        Err(_) => (None, None),
    };
    let v = Verification {
        id: 0,
        point_id,
        slot_at: at,
        receipt,
        checked_at: now,
        outcome,
        detail,
        http_status,
        response,
        requested_by: by.to_string(),
    };
    let id = insert(db, &v).await?;
    match outcome {
        VerifyOutcome::Mismatch => tracing::error!(
            point = point_id,
            slot = %at,
            detail = %v.detail,
            "compliance: the DGA holds other values than were declared; a rectification is needed"
        ),
        VerifyOutcome::Unverified => tracing::warn!(
            point = point_id,
            slot = %at,
            reason = %v.detail,
            "compliance: receipt not verified"
        ),
        VerifyOutcome::Ok => {
            tracing::debug!(point = point_id, slot = %at, "compliance: receipt verified")
        }
    }
    Ok(Verification { id, ..v })
}

async fn insert(db: &Db, v: &Verification) -> Result<i64, StoreError> {
    each_db!(db, |p, to_db, _from| {
        Ok(sqlx::query_scalar(
            "INSERT INTO compliance_verifications (point_id, slot_at, receipt, checked_at, \
             outcome, detail, http_status, response, requested_by) VALUES ($1, $2, $3, $4, $5, \
             $6, $7, $8, $9) RETURNING id",
        )
        .bind(v.point_id)
        .bind(to_db(v.slot_at))
        .bind(&v.receipt)
        .bind(to_db(v.checked_at))
        .bind(v.outcome.as_str())
        .bind(&v.detail)
        .bind(v.http_status)
        .bind(v.response.clone())
        .bind(&v.requested_by)
        .fetch_one(p)
        .await?)
    })
}

const COLUMNS: &str = "id, point_id, slot_at, receipt, checked_at, outcome, detail, http_status, \
    response, requested_by";

macro_rules! verification {
    ($r:expr, $from_row:ident) => {{
        let r = $r;
        let outcome: String = r.try_get("outcome")?;
        Ok::<Verification, StoreError>(Verification {
            id: r.try_get("id")?,
            point_id: r.try_get("point_id")?,
            slot_at: $from_row(r, "slot_at")?,
            receipt: r.try_get("receipt")?,
            checked_at: $from_row(r, "checked_at")?,
            outcome: VerifyOutcome::parse(&outcome)?,
            detail: r.try_get("detail")?,
            http_status: r.try_get("http_status")?,
            response: r.try_get("response")?,
            requested_by: r.try_get("requested_by")?,
        })
    }};
}

/// Every check of one slot, oldest first (the last is the slot's verification).
pub async fn history(
    db: &Db,
    point_id: i64,
    at: DateTime<Utc>,
) -> Result<Vec<Verification>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM compliance_verifications WHERE point_id = $1 AND slot_at = $2 \
         ORDER BY id"
    );
    each_db!(db, |p, to_db, from_row| {
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(point_id)
            .bind(to_db(at))
            .fetch_all(p)
            .await?;
        rows.iter().map(|r| verification!(r, from_row)).collect()
    })
}

/// The checks of a point's slots made in `[from, to)`, oldest first.
pub async fn checked_between(
    db: &Db,
    point_id: i64,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<Verification>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM compliance_verifications WHERE point_id = $1 AND checked_at >= $2 \
         AND checked_at < $3 ORDER BY id"
    );
    each_db!(db, |p, to_db, from_row| {
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(point_id)
            .bind(to_db(from))
            .bind(to_db(to))
            .fetch_all(p)
            .await?;
        rows.iter().map(|r| verification!(r, from_row)).collect()
    })
}

/// The latest mismatch found for each point since `from` (what the `receipt_mismatch` alert
/// reads).
pub async fn mismatches_since(
    db: &Db,
    from: DateTime<Utc>,
) -> Result<Vec<Verification>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM compliance_verifications v WHERE outcome = 'mismatch' AND \
         checked_at >= $1 AND id = (SELECT MAX(w.id) FROM compliance_verifications w WHERE \
         w.point_id = v.point_id AND w.outcome = 'mismatch') ORDER BY point_id"
    );
    each_db!(db, |p, to_db, from_row| {
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(to_db(from))
            .fetch_all(p)
            .await?;
        rows.iter().map(|r| verification!(r, from_row)).collect()
    })
}

/// Up to `n` accepted slots with a receipt that no check has read yet (`ok` or `mismatch`),
/// at random.
pub async fn candidates(db: &Db, n: i64) -> Result<Vec<(i64, DateTime<Utc>)>, StoreError> {
    let sql = "SELECT s.point_id, s.slot_at FROM compliance_slots s WHERE s.state IN \
               ('accepted', 'accepted_duplicate') AND s.receipt IS NOT NULL AND NOT EXISTS \
               (SELECT 1 FROM compliance_verifications v WHERE v.point_id = s.point_id AND \
               v.slot_at = s.slot_at AND v.outcome <> 'unverified') ORDER BY RANDOM() LIMIT $1";
    each_db!(db, |p, _to, from_row| {
        let rows = sqlx::query(sql).bind(n).fetch_all(p).await?;
        rows.iter()
            .map(|r| Ok((r.try_get("point_id")?, from_row(r, "slot_at")?)))
            .collect()
    })
}

/// What the receipt check counts.
#[derive(Debug, Clone, Default)]
pub struct VerifyMetrics {
    checks: Family<KindLabels, Counter>,
    errors: Counter,
}

impl VerifyMetrics {
    pub fn register(r: &mut Registry) -> VerifyMetrics {
        let m = VerifyMetrics::default();
        r.register(
            "compliance_verifications",
            "Receipt checks against the DGA's GET endpoint, by outcome (ok, mismatch, unverified)",
            m.checks.clone(),
        );
        r.register(
            "compliance_verification_errors",
            "Receipt checks that could not run (database, a slot no longer checkable)",
            m.errors.clone(),
        );
        m
    }

    /// Counts one check's outcome.
    pub fn count(&self, o: VerifyOutcome) {
        self.checks
            .get_or_create(&KindLabels::new(o.as_str()))
            .inc();
    }
}

/// The background check: every `verify_interval_s`, `verify_per_round` accepted slots never
/// read back, one GET at a time.
pub struct Verifier<C: DgaClient> {
    db: Db,
    client: Arc<C>,
    config: ComplianceConfig,
    metrics: VerifyMetrics,
}

impl<C: DgaClient> std::fmt::Debug for Verifier<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").finish_non_exhaustive()
    }
}

impl<C: DgaClient> Verifier<C> {
    pub fn new(db: Db, client: Arc<C>, config: ComplianceConfig, metrics: VerifyMetrics) -> Self {
        Verifier {
            db,
            client,
            config,
            metrics,
        }
    }

    /// Rounds every `verify_interval_s` (the first one interval after the start) until
    /// `shutdown`; nothing when the interval is 0.
    pub async fn run(self, mut shutdown: Shutdown) {
        if self.config.verify_interval_s == 0 {
            return;
        }
        let every = std::time::Duration::from_secs(self.config.verify_interval_s);
        loop {
            tokio::select! {
                _ = shutdown.wait() => break,
                _ = tokio::time::sleep(every) => {}
            }
            if let Err(e) = self.round(Utc::now()).await {
                self.metrics.errors.inc();
                tracing::warn!(error = %e, "compliance: receipt check round failed");
            }
        }
    }

    /// One round: the checks it made.
    pub async fn round(&self, now: DateTime<Utc>) -> Result<Vec<Verification>, VerifyError> {
        let mut done = Vec::new();
        for (point_id, at) in candidates(&self.db, i64::from(self.config.verify_per_round)).await? {
            match verify_slot(&self.db, self.client.as_ref(), point_id, at, SAMPLER, now).await {
                Ok(v) => {
                    self.metrics.count(v.outcome);
                    done.push(v);
                }
                // The slot changed between the pick and the check: nothing to read.
                Err(VerifyError::NotVerifiable(..) | VerifyError::NoSlot(..)) => {
                    self.metrics.errors.inc();
                }
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn declared() -> serde_json::Map<String, serde_json::Value> {
        serde_json::json!({
            "caudal": "10.50", "fechaMedicion": "2026-04-04", "horaMedicion": "10:00:00",
            "nivelFreaticoDelPozo": "9.85", "totalizador": "1010",
        })
        .as_object()
        .cloned()
        .unwrap_or_default()
    }

    fn answer(body: &str) -> Result<RawResponse, TransportError> {
        Ok(RawResponse {
            status: 200,
            body: body.into(),
        })
    }

    #[test]
    fn the_dgas_copy_is_compared_field_by_field() {
        let same = answer(
            r#"{"status":"00","message":"ok","data":{"fechaMedicion":"04-04-2026","horaMedicion":"10:00:00","caudal":10.5,"totalizador":"1010","nivelFreaticoDelPozo":"9.85"}}"#,
        );
        assert_eq!(
            judge(Endpoint::Subterranea, &declared(), &same),
            (VerifyOutcome::Ok, String::new())
        );
        let other = answer(
            r#"{"status":"00","data":{"fechaMedicion":"04-04-2026","horaMedicion":"11:00:00","caudal":"10.50","totalizador":"1011","nivelFreaticoDelPozo":"9.85"}}"#,
        );
        let (o, detail) = judge(Endpoint::Subterranea, &declared(), &other);
        assert_eq!(o, VerifyOutcome::Mismatch);
        assert!(
            detail.contains("horaMedicion") && detail.contains("totalizador"),
            "{detail}"
        );
        assert!(!detail.contains("caudal"), "{detail}");
        // A field the endpoint does not carry is not compared.
        let surface = answer(
            r#"{"status":"00","data":{"fechaMedicion":"04-04-2026","horaMedicion":"10:00:00","caudal":"10.50","totalizador":"1010"}}"#,
        );
        assert_eq!(
            judge(Endpoint::SuperficialFlujometro, &declared(), &surface).0,
            VerifyOutcome::Ok
        );
        assert_eq!(
            judge(Endpoint::Subterranea, &declared(), &surface).0,
            VerifyOutcome::Mismatch,
            "the level is missing from the DGA's copy"
        );
        let (o, why) = judge(
            Endpoint::Subterranea,
            &declared(),
            &Err(TransportError::Timeout(10)),
        );
        assert_eq!(o, VerifyOutcome::Unverified);
        assert!(why.contains("10 s"), "{why}");
    }
}
