//! Reconciliation: brings the alerts of one kind in step with what its rule fires now, under
//! the invariant of the module (at most one open alert per `(kind, subject)`).

use super::{AlertKind, Firing};
use crate::core::db::{Db, each_db};
use chrono::{DateTime, Utc};
use sqlx::Row;
use std::collections::HashMap;

/// Key of the PostgreSQL advisory lock that serialises reconciliations ("caudal-alerts").
const PG_LOCK_KEY: i64 = 0x6361_7564_616c_6172;

/// What one reconciliation changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reconciled {
    pub opened: u64,
    pub refreshed: u64,
    pub closed: u64,
}

/// Brings the alerts of `kind` in step with what fires now. See the module doc for condition
/// and event alerts. Runs in one transaction that holds the write lock (SQLite `BEGIN
/// IMMEDIATE`, a PostgreSQL advisory lock), so replicas evaluating at once do not interleave.
pub async fn reconcile(
    db: &Db,
    kind: AlertKind,
    firing: &[Firing],
    now: DateTime<Utc>,
) -> Result<Reconciled, sqlx::Error> {
    each_db!(db, |pool, to_db, from_row| {
        let mut tx = pool.begin_reconcile().await?;
        let rows = sqlx::query(
            "SELECT id, subject, state, since FROM alerts WHERE kind = $1 \
             AND (state = 'open' OR since = (SELECT MAX(a.since) FROM alerts a \
                  WHERE a.kind = alerts.kind AND a.subject = alerts.subject))",
        )
        .bind(kind.as_str())
        .fetch_all(&mut *tx)
        .await?;
        let mut known = Known {
            open: HashMap::new(),
            latest_since: HashMap::new(),
        };
        for r in rows {
            let subject: String = r.try_get("subject")?;
            let since = from_row(&r, "since")?;
            if r.try_get::<String, _>("state")? == "open" {
                known.open.insert(subject.clone(), r.try_get("id")?);
            }
            let e = known.latest_since.entry(subject).or_insert(since);
            *e = (*e).max(since);
        }
        let mut out = Reconciled::default();
        let mut seen = std::collections::HashSet::new();
        for f in firing {
            seen.insert(f.subject.as_str());
            match step(kind, f, &known) {
                Step::Skip => {}
                Step::Refresh(id) => {
                    sqlx::query(
                        "UPDATE alerts SET updated_at = $1, since = COALESCE($2, since), \
                         value = $3, threshold = $4, message = $5 WHERE id = $6",
                    )
                    .bind(to_db(now))
                    .bind((!kind.closes_itself()).then(|| to_db(f.since)))
                    .bind(f.value)
                    .bind(f.threshold)
                    .bind(&f.message)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                    out.refreshed += 1;
                }
                Step::Insert => {
                    let n = sqlx::query(
                        "INSERT INTO alerts (kind, subject, site, device, point_id, state, since, \
                         opened_at, updated_at, value, threshold, message) \
                         VALUES ($1, $2, $3, $4, $5, 'open', $6, $7, $7, $8, $9, $10) \
                         ON CONFLICT (kind, subject) WHERE state = 'open' DO NOTHING",
                    )
                    .bind(kind.as_str())
                    .bind(&f.subject)
                    .bind(&f.site)
                    .bind(&f.device)
                    .bind(f.point_id)
                    .bind(to_db(f.since))
                    .bind(to_db(now))
                    .bind(f.value)
                    .bind(f.threshold)
                    .bind(&f.message)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    out.opened += n;
                }
            }
        }
        if kind.closes_itself() {
            for (subject, id) in &known.open {
                if !seen.contains(subject.as_str()) {
                    sqlx::query(
                        "UPDATE alerts SET state = 'closed', closed_at = $1, \
                         closed_by = 'cleared', updated_at = $1 WHERE id = $2 AND state = 'open'",
                    )
                    .bind(to_db(now))
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                    out.closed += 1;
                }
            }
        }
        tx.commit().await?;
        Ok(out)
    })
}

/// A write transaction that serializes alert reconciles: SQLite takes its write lock up front,
/// PostgreSQL an advisory lock held until the transaction ends.
trait ReconcileTx: Sized {
    type Database: sqlx::Database;
    fn begin_reconcile(
        &self,
    ) -> impl std::future::Future<
        Output = Result<sqlx::Transaction<'static, Self::Database>, sqlx::Error>,
    > + Send;
}

impl ReconcileTx for sqlx::SqlitePool {
    type Database = sqlx::Sqlite;
    async fn begin_reconcile(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
        self.begin_with("BEGIN IMMEDIATE").await
    }
}

impl ReconcileTx for sqlx::PgPool {
    type Database = sqlx::Postgres;
    async fn begin_reconcile(
        &self,
    ) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
        let mut tx = self.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(PG_LOCK_KEY)
            .execute(&mut *tx)
            .await?;
        Ok(tx)
    }
}

/// For each subject of a kind: the open alert (id) if any, and the latest `since` of any alert.
struct Known {
    open: HashMap<String, i64>,
    latest_since: HashMap<String, DateTime<Utc>>,
}

/// What to do with one firing, given what is known.
enum Step {
    Insert,
    Refresh(i64),
    Skip,
}

fn step(kind: AlertKind, f: &Firing, known: &Known) -> Step {
    if !kind.closes_itself()
        && known
            .latest_since
            .get(&f.subject)
            .is_some_and(|s| *s >= f.since)
    {
        // This event (or a later one) was alerted on already, open or closed.
        return Step::Skip;
    }
    match known.open.get(&f.subject) {
        Some(id) => Step::Refresh(*id),
        None => Step::Insert,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn firing(subject: &str, since: i64) -> Firing {
        Firing {
            subject: subject.to_string(),
            site: None,
            device: None,
            point_id: None,
            since: DateTime::from_timestamp(since, 0).unwrap_or_default(),
            value: None,
            threshold: None,
            message: String::new(),
        }
    }

    #[test]
    fn an_event_already_alerted_on_is_not_raised_again() {
        let mut known = Known {
            open: HashMap::new(),
            latest_since: HashMap::new(),
        };
        let f = firing("device/s/d", 100);
        assert!(matches!(
            step(AlertKind::TotalizerBackwards, &f, &known),
            Step::Insert
        ));
        known.latest_since.insert("device/s/d".into(), f.since);
        assert!(matches!(
            step(AlertKind::TotalizerBackwards, &f, &known),
            Step::Skip
        ));
        // A later event re-opens (closed) or refreshes (open).
        let later = firing("device/s/d", 200);
        assert!(matches!(
            step(AlertKind::TotalizerBackwards, &later, &known),
            Step::Insert
        ));
        known.open.insert("device/s/d".into(), 7);
        assert!(matches!(
            step(AlertKind::TotalizerBackwards, &later, &known),
            Step::Refresh(7)
        ));
        // Condition alerts ignore `since` history: an open one is refreshed.
        assert!(matches!(
            step(AlertKind::NoData, &f, &known),
            Step::Refresh(7)
        ));
    }
}
