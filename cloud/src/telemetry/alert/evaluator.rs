//! The evaluator: the background task that, every `alerts.interval_s`, asks each rule what
//! fires now and reconciles that with the open alerts, counting what it does.

use super::reconcile::reconcile;
use super::rules::{self, RuleError};
use super::store::open_counts;
use super::{AlertKind, Firing};
use crate::core::Shutdown;
use crate::core::config::AlertsConfig;
use crate::core::db::Db;
use crate::core::metrics::KindLabels;
use chrono::{DateTime, Duration, Utc};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Counters of the evaluator.
#[derive(Debug, Clone, Default)]
pub struct AlertMetrics {
    evaluations: Counter,
    rule_errors: Family<KindLabels, Counter>,
    opened: Family<KindLabels, Counter>,
    closed: Family<KindLabels, Counter>,
    open: Family<KindLabels, Gauge>,
}

impl AlertMetrics {
    pub fn register(r: &mut Registry) -> AlertMetrics {
        let m = AlertMetrics::default();
        r.register(
            "alert_evaluations",
            "Alert evaluation rounds run",
            m.evaluations.clone(),
        );
        r.register(
            "alert_rule_errors",
            "Alert rules that could not be evaluated, by alert kind",
            m.rule_errors.clone(),
        );
        r.register("alerts_opened", "Alerts opened, by kind", m.opened.clone());
        r.register(
            "alerts_closed",
            "Alerts closed (cleared or by a person), by kind",
            m.closed.clone(),
        );
        r.register(
            "alerts_open",
            "Alerts open after the last evaluation, by kind",
            m.open.clone(),
        );
        m
    }
}

/// Runs the rules on a timer and keeps the alerts table in step with them.
#[derive(Debug)]
pub struct Evaluator {
    config: AlertsConfig,
    db: Db,
    metrics: AlertMetrics,
    /// When the annual-volume rule last ran: it reads the year's readings, so it runs every
    /// `volume_interval_s`, not every round.
    volume_ran: std::sync::Mutex<Option<DateTime<Utc>>>,
}

impl Evaluator {
    pub fn new(config: AlertsConfig, db: Db, metrics: AlertMetrics) -> Evaluator {
        Evaluator {
            config,
            db,
            metrics,
            volume_ran: std::sync::Mutex::new(None),
        }
    }

    /// Evaluates every `interval_s` until shutdown.
    pub async fn run(self, mut shutdown: Shutdown) {
        let period = std::time::Duration::from_secs(self.config.interval_s.max(1));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = tick.tick() => {
                    self.evaluate(Utc::now()).await;
                }
            }
        }
    }

    /// One round: every rule, each reconciled on its own so one failing rule leaves the others
    /// working.
    pub async fn evaluate(&self, now: DateTime<Utc>) {
        self.metrics.evaluations.inc();
        for kind in AlertKind::ALL {
            let firing = match self.rule(kind, now).await {
                Ok(Some(f)) => f,
                Ok(None) => continue,
                Err(e) => {
                    self.fail(kind, &e);
                    continue;
                }
            };
            match reconcile(&self.db, kind, &firing, now).await {
                Ok(r) => {
                    let labels = KindLabels::new(kind.as_str());
                    self.metrics.opened.get_or_create(&labels).inc_by(r.opened);
                    self.metrics.closed.get_or_create(&labels).inc_by(r.closed);
                    if r.opened + r.closed > 0 {
                        tracing::info!(
                            kind = kind.as_str(),
                            opened = r.opened,
                            closed = r.closed,
                            "alerts changed"
                        );
                    }
                }
                Err(e) => self.fail(kind, &e),
            }
        }
        match open_counts(&self.db).await {
            Ok(counts) => {
                for kind in AlertKind::ALL {
                    let n = counts.get(&kind).copied().unwrap_or(0);
                    self.metrics
                        .open
                        .get_or_create(&KindLabels::new(kind.as_str()))
                        .set(n);
                }
            }
            Err(e) => tracing::warn!(error = %e, "counting open alerts failed"),
        }
    }

    fn fail(&self, kind: AlertKind, e: &dyn std::fmt::Display) {
        self.metrics
            .rule_errors
            .get_or_create(&KindLabels::new(kind.as_str()))
            .inc();
        tracing::warn!(kind = kind.as_str(), error = %e, "alert rule failed");
    }

    /// What fires now for `kind`; `None` when the rule has nothing to judge by in this
    /// deployment (its alerts are then left as they are).
    async fn rule(
        &self,
        kind: AlertKind,
        now: DateTime<Utc>,
    ) -> Result<Option<Vec<Firing>>, RuleError> {
        let c = &self.config;
        Ok(Some(match kind {
            AlertKind::SiteOffline => rules::site_offline(&self.db, now).await?,
            AlertKind::NoData => {
                rules::no_data(
                    &self.db,
                    now,
                    Duration::seconds(secs(c.no_data_after_s)),
                    Duration::days(i64::from(c.lookback_days)),
                )
                .await?
            }
            AlertKind::TotalizerBackwards => {
                rules::totalizer_backwards(
                    &self.db,
                    now - Duration::days(i64::from(c.lookback_days)),
                )
                .await?
            }
            AlertKind::SeqConflict => {
                rules::seq_conflict(&self.db, now - Duration::days(i64::from(c.lookback_days)))
                    .await?
            }
            AlertKind::FlowAboveAuthorized => {
                rules::flow_above_authorized(
                    &self.db,
                    now - Duration::seconds(secs(c.no_data_after_s)),
                )
                .await?
            }
            AlertKind::ComplianceStopped => rules::compliance_stopped(&self.db).await?,
            AlertKind::ReceiptMismatch => {
                rules::receipt_mismatch(&self.db, now - Duration::days(i64::from(c.lookback_days)))
                    .await?
            }
            AlertKind::AnnualVolume => {
                let due = {
                    let last = self
                        .volume_ran
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    last.is_none_or(|t| now - t >= Duration::seconds(secs(c.volume_interval_s)))
                };
                if !due {
                    return Ok(None);
                }
                let firing = rules::annual_volume(&self.db, now).await?;
                *self
                    .volume_ran
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(now);
                firing
            }
        }))
    }
}

fn secs(s: u64) -> i64 {
    i64::try_from(s).unwrap_or(i64::MAX / 1_000_000)
}
