//! The submitter: the background task that builds each reported point's slots from stored
//! telemetry, checks them, and sends the due ones to the DGA, one durable state at a time.
//!
//! A submission is an enum of states with one function per state ([`Submission`]):
//!
//! ```text
//!  Pending ──claim (commit)──▶ InFlight ──POST──▶ Answered ──record (commit)──▶ Done(state)
//!  (pending, or failed and due)                      │
//!                                                    ├ 00 + receipt ............ accepted
//!                                                    ├ 400 "Ya existe … Comprobante: X" . accepted_duplicate
//!                                                    ├ 00 without receipt ...... accepted_no_receipt
//!                                                    ├ wrong informante/password  rejected_config (point stops)
//!                                                    └ 5xx, reset, timeout, … .. failed (again in a day)
//! ```
//!
//! Durability (where it is enforced: `store::claim`, `store::record`): the in-flight state, its
//! owner and its lease, and the redacted request are committed **before** the POST leaves; the
//! answer is committed after. A crash between the two leaves the slot in flight, and
//! [`Submitter::recover`] (at start and at every round, in any process) makes it failed —
//! unanswered — once its lease (`compliance.claim_lease_s`) has passed, so it is sent again the
//! next day, where a measurement that did reach the DGA comes back as the duplicate-400 with
//! its receipt. A slot another process holds, lease running, is never touched. Only `pending`
//! and due `failed` slots are claimed, so **an accepted slot is never POSTed again**. A slot
//! sent `max_attempts` times without a `00` becomes a transmission failure.
//!
//! Pacing (enforced in `store::claim`, under the one lock every claim takes, so it holds across
//! processes and restarts): a round every `compliance.interval_s` (30 s) sends at most one slot
//! per point; an obra's POSTs are at least `obra_spacing_s` (300 s, Res. 2.170 §6.1) apart,
//! measured from its last POST as stored; all POSTs draw on one token bucket of
//! `max_posts_per_minute` holding at most `burst`, and a round stops sending when it is empty.
//! A point's oldest due slot goes first, unless the backlog ahead of its live slot (within the
//! hour) would make that one late: then the live slot goes first (`store::due`). Data past the
//! standard's allowed lag is still sent.
//!
//! Late telemetry: a slot held for missing data (`no_data`), never reviewed, is built again
//! when its sources received readings covering it after it was built ([`Submitter::round`]'s
//! re-open step): pending if its values now pass the checks, held with the new reason if not.
//! A slot held for a suspicious value, or one a person released or discarded, is never rebuilt.

use super::dga::{
    DgaClient, Endpoint, Measurement, Outcome, PostRequest, RawResponse, TransportError, classify,
};
use super::secret::Sealer;
use super::slot::{self, Period};
use super::store::{
    self, Answered, Claim, NewSlot, Pacing, PointConfig, Slot, SlotState, Source, StoreError,
};
use super::value::{self, FlowMethod, Inputs, Rules};
use crate::catchment::point::{self, DgaStandard, Point};
use crate::core::Shutdown;
use crate::core::config::ComplianceConfig;
use crate::core::db::Db;
use crate::core::metrics::{KindLabels, ReasonLabels};
use crate::telemetry::alert::BACKWARDS_EVENTS;
use crate::telemetry::query;
use caudal_common::SiteId;
use chrono::{DateTime, Duration, Utc};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// How far from the slot instant a reading may be to count as the slot's.
pub const SAMPLE_WINDOW_S: i64 = 300;
/// Most slots one point gets built in one round (a long backlog is built over several).
pub const MAX_BUILT_PER_ROUND: usize = 500;
/// Most slots held for missing data one point gets probed for late telemetry in one round; a
/// longer list is gone through over several rounds.
pub const MAX_REOPEN_PROBES_PER_ROUND: i64 = 200;
/// Seconds between two counts of slots by state (the `compliance_slots` gauges).
pub const GAUGES_EVERY_S: i64 = 300;

/// Where the submitter takes the time from, so tests can move it.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
}

/// The system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// What the submitter counts.
#[derive(Debug, Clone, Default)]
pub struct ComplianceMetrics {
    rounds: Counter,
    built: Family<KindLabels, Counter>,
    submissions: Family<KindLabels, Counter>,
    blocked: Family<ReasonLabels, Counter>,
    errors: Counter,
    slots: Family<KindLabels, Gauge>,
    rebuilt: Family<KindLabels, Counter>,
    paced: Family<ReasonLabels, Counter>,
}

impl ComplianceMetrics {
    pub fn register(r: &mut Registry) -> ComplianceMetrics {
        let m = ComplianceMetrics::default();
        r.register(
            "compliance_rounds",
            "Submitter rounds run",
            m.rounds.clone(),
        );
        r.register(
            "compliance_slots_built",
            "Slots built, by the state they were built in (pending, held)",
            m.built.clone(),
        );
        r.register(
            "compliance_submissions",
            "Answers from the DGA, by outcome",
            m.submissions.clone(),
        );
        r.register(
            "compliance_blocked",
            "Slots that could not be built or sent for a point's configuration, by reason",
            m.blocked.clone(),
        );
        r.register(
            "compliance_round_errors",
            "Submitter rounds that failed on the database",
            m.errors.clone(),
        );
        r.register(
            "compliance_slots_rebuilt",
            "Slots held for missing data built again from late telemetry, by their new state",
            m.rebuilt.clone(),
        );
        r.register(
            "compliance_paced",
            "Slots due that waited, by what held them: obra_spacing, rate",
            m.paced.clone(),
        );
        r.register(
            "compliance_slots",
            "Slots by state after the last round",
            m.slots.clone(),
        );
        m
    }
}

/// Why a round failed.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("catchment points: {0}")]
    Point(#[from] point::PointError),
    #[error("telemetry: {0}")]
    Query(#[from] query::QueryError),
}

/// A point's configuration that stops its slots from being built or sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Blocked {
    #[error("point {0}: no código de obra")]
    NoObra(i64),
    #[error("point {0}: no informante RUT")]
    NoInformant(i64),
    #[error("no Centro de Control RUT (rutEmpresa) in the compliance settings")]
    NoRutEmpresa,
    #[error("point {0}: no informante password")]
    NoPassword(i64),
    #[error("point {0}: the password cannot be opened (no compliance key, or a different one)")]
    Password(i64),
    #[error("point {point}: no {what} source (site and device)")]
    NoSource { point: i64, what: &'static str },
    #[error("point {0}: no DGA standard and no period")]
    NoPeriod(i64),
    #[error("point {0}: inactive")]
    Inactive(i64),
}

impl Blocked {
    fn label(&self) -> &'static str {
        match self {
            Blocked::NoObra(_) => "no_obra",
            Blocked::NoInformant(_) => "no_informant",
            Blocked::NoRutEmpresa => "no_rut_empresa",
            Blocked::NoPassword(_) => "no_password",
            Blocked::Password(_) => "password",
            Blocked::NoSource { .. } => "no_source",
            Blocked::NoPeriod(_) => "no_period",
            Blocked::Inactive(_) => "inactive",
        }
    }
}

/// What one round did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Round {
    pub built: u64,
    pub sent: u64,
    pub blocked: u64,
    /// Slots held for missing data built again from late telemetry.
    pub rebuilt: u64,
    /// Slots that waited for their obra's spacing or the global rate.
    pub paced: u64,
}

/// One slot's submission, state by state.
#[derive(Debug)]
pub enum Submission {
    /// Due to be sent (pending, or failed and due).
    Pending(Slot),
    /// Committed as in flight; the request is ready to go.
    InFlight {
        slot: Slot,
        exchange: i64,
        attempt: i64,
        request: PostRequest,
    },
    /// The answer (or its absence) is in; not recorded yet.
    Answered {
        slot: Slot,
        exchange: i64,
        attempt: i64,
        answer: Result<RawResponse, TransportError>,
    },
    /// Nothing more this round: the slot's state now.
    Done(SlotState),
    /// The global rate is spent: nothing more is sent this round.
    RateLimited,
}

/// The background task.
pub struct Submitter<C: DgaClient, K: Clock> {
    db: Db,
    client: Arc<C>,
    clock: Arc<K>,
    sealer: Option<Arc<Sealer>>,
    config: ComplianceConfig,
    metrics: ComplianceMetrics,
    pacing: Pacing,
    /// Per point, the last held slot probed for late telemetry (the next round goes on after it).
    reopen_cursor: Mutex<HashMap<i64, DateTime<Utc>>>,
    /// When the slots-by-state gauges were last counted.
    gauges_at: Mutex<Option<DateTime<Utc>>>,
}

impl<C: DgaClient, K: Clock> std::fmt::Debug for Submitter<C, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submitter")
            .field("owner", &self.pacing.owner)
            .finish_non_exhaustive()
    }
}

/// The rules a point's slots are built by, or what is missing for them.
pub fn rules_of(p: &Point, c: &PointConfig) -> Result<Rules, Blocked> {
    let period = match (c.period, p.dga_standard) {
        (Some(period), _) => period,
        (None, Some(s)) => Period::of_standard(s),
        (None, None) => return Err(Blocked::NoPeriod(p.id)),
    };
    Ok(Rules {
        endpoint: c.endpoint,
        period,
        method: c.flow_method.unwrap_or(FlowMethod::default_for(period)),
        slot_seconds: 0.0,
        low_flow_lps: c.low_flow_lps,
        authorized_flow_lps: p.authorized_flow_lps,
        level_sensor_depth_m: p.level_sensor_depth_m,
        level_optional: p.dga_standard == Some(DgaStandard::CaudalesMuyPequenos),
    })
}

/// The nearest good reading of `pick` from `src` within [`SAMPLE_WINDOW_S`] of `at`.
async fn nearest(
    db: &Db,
    src: &Source,
    at: DateTime<Utc>,
    pick: fn(&query::ReadingView) -> Option<f64>,
) -> Result<Option<f64>, SubmitError> {
    let Ok(site) = SiteId::new(&src.site) else {
        return Ok(None);
    };
    let w = Duration::seconds(SAMPLE_WINDOW_S);
    let page = query::raw_readings(
        db,
        &site,
        Some(&src.device),
        at - w,
        at + w + Duration::seconds(1),
        None,
        None,
        1000,
    )
    .await?;
    Ok(page
        .readings
        .iter()
        .filter(|r| r.quality.is_empty())
        .filter_map(|r| pick(r).map(|v| ((r.ts - at).num_milliseconds().abs(), v)))
        .min_by_key(|(d, _)| *d)
        .map(|(_, v)| v))
}

/// What stored telemetry says about slot `at` of a point.
pub async fn inputs(
    db: &Db,
    c: &PointConfig,
    r: &Rules,
    at: DateTime<Utc>,
) -> Result<Inputs, SubmitError> {
    let prev = slot::previous(r.period, at);
    let mut i = Inputs::default();
    if let Some(s) = &c.flow {
        i.flow = nearest(db, s, at, |r| r.flow_lps).await?;
    }
    if let Some(s) = &c.total {
        i.total = nearest(db, s, at, |r| r.total_m3).await?;
        i.total_prev = nearest(db, s, prev, |r| r.total_m3).await?;
        if let Ok(site) = SiteId::new(&s.site) {
            let kinds: Vec<String> = BACKWARDS_EVENTS.iter().map(|k| k.to_string()).collect();
            let events =
                query::events(db, &site, Some(&s.device), &kinds, prev, at, None, 1).await?;
            i.backwards_event = events.events.first().map(|e| e.kind.clone());
        }
    }
    if let Some(s) = &c.level {
        i.level = nearest(db, s, at, |r| r.level_m).await?;
    }
    Ok(i)
}

/// A slot built: its values and checks, in the state it starts in.
pub fn build_slot(point: i64, at: DateTime<Utc>, i: &Inputs, r: &Rules) -> NewSlot {
    let (state, values, hold) = match value::values(i, r) {
        Err(h) => (SlotState::Held, None, Some(h)),
        Ok(v) => match value::check(i, r) {
            Some(h) => (SlotState::Held, Some(v), Some(h)),
            None => (SlotState::Pending, Some(v), None),
        },
    };
    NewSlot {
        point_id: point,
        slot_at: at,
        state,
        values,
        reason: hold.as_ref().map(|h| h.reason.as_str().to_string()),
        detail: hold.map(|h| h.detail).unwrap_or_default(),
    }
}

impl<C: DgaClient, K: Clock> Submitter<C, K> {
    pub fn new(
        db: Db,
        client: Arc<C>,
        clock: Arc<K>,
        sealer: Option<Arc<Sealer>>,
        config: ComplianceConfig,
        metrics: ComplianceMetrics,
    ) -> Self {
        let pacing = Pacing {
            owner: format!("pid{}-{:016x}", std::process::id(), fastrand::u64(..)),
            lease: Duration::seconds(config.claim_lease_s as i64),
            obra_spacing: Duration::seconds(config.obra_spacing_s as i64),
            tokens_per_s: f64::from(config.max_posts_per_minute.max(1)) / 60.0,
            burst: f64::from(config.burst.max(1)),
        };
        Submitter {
            db,
            client,
            clock,
            sealer,
            config,
            metrics,
            pacing,
            reopen_cursor: Mutex::new(HashMap::new()),
            gauges_at: Mutex::new(None),
        }
    }

    /// The name this submitter's claims carry (`claimed_by`).
    pub fn owner(&self) -> &str {
        &self.pacing.owner
    }

    /// Slots left in flight whose claim's lease has passed become failed (unanswered): their
    /// process stopped or lost the answer. A slot another running process holds is left to it.
    /// Run at start and at the start of every round.
    pub async fn recover(&self) -> Result<u64, SubmitError> {
        let n = store::recover_in_flight(&self.db, self.clock.now()).await?;
        if n > 0 {
            tracing::warn!(
                slots = n,
                "slots left in flight past their lease are treated as unanswered"
            );
        }
        Ok(n)
    }

    /// Runs rounds every `interval_s` until `shutdown`.
    pub async fn run(self, mut shutdown: Shutdown) {
        if self.config.obra_spacing_s < 300 {
            tracing::warn!(
                obra_spacing_s = self.config.obra_spacing_s,
                "compliance: POSTs of one obra less than 5 minutes apart; Res. DGA 2.170 §6.1 \
                 asks at least 5 minutes for a backlog"
            );
        }
        let every = std::time::Duration::from_secs(self.config.interval_s.max(1));
        loop {
            if let Err(e) = self.round().await {
                self.metrics.errors.inc();
                tracing::warn!(error = %e, "compliance round failed");
            }
            tokio::select! {
                _ = shutdown.wait() => break,
                _ = tokio::time::sleep(every) => {}
            }
        }
    }

    /// One round: recover expired claims, build what is due, re-open slots held for missing
    /// data that late telemetry now covers, then send at most one slot per point, as the
    /// obras' spacing and the global rate allow.
    pub async fn round(&self) -> Result<Round, SubmitError> {
        self.metrics.rounds.inc();
        let mut round = Round::default();
        self.recover().await?;
        self.build(&mut round).await?;
        self.reopen(&mut round).await?;
        self.send_due(&mut round).await?;
        self.count_slots().await?;
        Ok(round)
    }

    /// The slots-by-state gauges, refreshed at most every [`GAUGES_EVERY_S`]: the count reads
    /// the whole state index, too much for every short round.
    async fn count_slots(&self) -> Result<(), SubmitError> {
        let now = self.clock.now();
        {
            let mut at = self.gauges_at.lock().unwrap_or_else(|p| p.into_inner());
            if at.is_some_and(|t| now >= t && now - t < Duration::seconds(GAUGES_EVERY_S)) {
                return Ok(());
            }
            *at = Some(now);
        }
        for state in SlotState::ALL {
            self.metrics
                .slots
                .get_or_create(&KindLabels::new(state.as_str()))
                .set(0);
        }
        for (state, n) in store::state_counts(&self.db).await? {
            self.metrics
                .slots
                .get_or_create(&KindLabels::new(&state))
                .set(n);
        }
        Ok(())
    }

    fn paced(&self, round: &mut Round, by: &'static str) {
        round.paced += 1;
        self.metrics
            .paced
            .get_or_create(&ReasonLabels::new(by))
            .inc();
    }

    fn blocked(&self, round: &mut Round, b: &Blocked) {
        round.blocked += 1;
        self.metrics
            .blocked
            .get_or_create(&ReasonLabels::new(b.label()))
            .inc();
        tracing::debug!(reason = %b, "compliance: point blocked");
    }

    async fn build(&self, round: &mut Round) -> Result<(), SubmitError> {
        let now = self.clock.now();
        let until = now - Duration::seconds(self.config.settle_s as i64);
        for c in store::point_configs(&self.db).await? {
            if c.mode == store::Mode::Off {
                continue;
            }
            let Some(start) = c.start_at else { continue };
            let Some(p) = point::get(&self.db, c.point_id).await? else {
                continue;
            };
            if !p.active {
                self.blocked(round, &Blocked::Inactive(p.id));
                continue;
            }
            let mut rules = match rules_of(&p, &c) {
                Ok(r) => r,
                Err(b) => {
                    self.blocked(round, &b);
                    continue;
                }
            };
            let from = match store::last_slot_at(&self.db, p.id).await? {
                Some(last) => slot::next(rules.period, last),
                None => start,
            };
            let mut built = Vec::new();
            for at in slot::grid(
                rules.period,
                from,
                until + Duration::seconds(1),
                MAX_BUILT_PER_ROUND,
            ) {
                rules.slot_seconds = (at - slot::previous(rules.period, at)).num_seconds() as f64;
                let i = inputs(&self.db, &c, &rules, at).await?;
                let s = build_slot(p.id, at, &i, &rules);
                self.metrics
                    .built
                    .get_or_create(&KindLabels::new(s.state.as_str()))
                    .inc();
                built.push(s);
            }
            round.built += store::insert_slots(&self.db, &built, now).await?;
        }
        Ok(())
    }

    /// Slots held for missing data (never reviewed) whose sources received telemetry covering
    /// them since they were built are built again: pending if their values now pass the checks,
    /// held with the new reason if not. Each probe is one index range per source; at most
    /// [`MAX_REOPEN_PROBES_PER_ROUND`] slots per point a round, going on where the last round
    /// stopped.
    async fn reopen(&self, round: &mut Round) -> Result<(), SubmitError> {
        let now = self.clock.now();
        let w = Duration::seconds(SAMPLE_WINDOW_S);
        for c in store::point_configs(&self.db).await? {
            if c.mode == store::Mode::Off {
                continue;
            }
            let after = self.cursor(c.point_id);
            let held = store::held_for_missing_data(
                &self.db,
                c.point_id,
                after,
                MAX_REOPEN_PROBES_PER_ROUND,
            )
            .await?;
            let next = match held.last() {
                Some(s) if held.len() as i64 == MAX_REOPEN_PROBES_PER_ROUND => Some(s.slot_at),
                _ => None,
            };
            self.set_cursor(c.point_id, next);
            if held.is_empty() {
                continue;
            }
            let Some(p) = point::get(&self.db, c.point_id).await? else {
                continue;
            };
            let Ok(mut rules) = rules_of(&p, &c) else {
                continue;
            };
            for s in held {
                let prev = slot::previous(rules.period, s.slot_at);
                let mut arrived = false;
                for src in [&c.flow, &c.total, &c.level].into_iter().flatten() {
                    let Ok(site) = SiteId::new(&src.site) else {
                        continue;
                    };
                    if query::received_since(
                        &self.db,
                        &site,
                        &src.device,
                        prev - w,
                        s.slot_at + w,
                        s.updated_at,
                    )
                    .await?
                    {
                        arrived = true;
                        break;
                    }
                }
                if !arrived {
                    continue;
                }
                rules.slot_seconds = (s.slot_at - prev).num_seconds() as f64;
                let i = inputs(&self.db, &c, &rules, s.slot_at).await?;
                let built = build_slot(p.id, s.slot_at, &i, &rules);
                if store::rebuild_held(&self.db, &built, now).await? {
                    round.rebuilt += 1;
                    self.metrics
                        .rebuilt
                        .get_or_create(&KindLabels::new(built.state.as_str()))
                        .inc();
                    tracing::info!(
                        point = p.id,
                        slot = %s.slot_at,
                        state = built.state.as_str(),
                        "compliance: a slot held for missing data was built again from late telemetry"
                    );
                }
            }
        }
        Ok(())
    }

    fn cursor(&self, point: i64) -> Option<DateTime<Utc>> {
        let map = self.reopen_cursor.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&point).copied()
    }

    fn set_cursor(&self, point: i64, at: Option<DateTime<Utc>>) {
        let mut map = self.reopen_cursor.lock().unwrap_or_else(|p| p.into_inner());
        match at {
            Some(at) => map.insert(point, at),
            None => map.remove(&point),
        };
    }

    async fn send_due(&self, round: &mut Round) -> Result<(), SubmitError> {
        let now = self.clock.now();
        let spacing = self.pacing.obra_spacing;
        let margin = Duration::seconds(self.config.interval_s as i64);
        for s in store::due(&self.db, now, spacing, margin).await? {
            let mut sub = Submission::Pending(s);
            loop {
                sub = match sub {
                    Submission::Pending(slot) => self.on_pending(slot, round).await?,
                    Submission::InFlight {
                        slot,
                        exchange,
                        attempt,
                        request,
                    } => self.on_in_flight(slot, exchange, attempt, request).await,
                    Submission::Answered {
                        slot,
                        exchange,
                        attempt,
                        answer,
                    } => {
                        round.sent += 1;
                        self.on_answered(slot, exchange, attempt, answer).await?
                    }
                    Submission::Done(_) => break,
                    Submission::RateLimited => return Ok(()),
                };
            }
        }
        Ok(())
    }

    /// The measurement of a slot, or what the point's configuration lacks for it.
    async fn measurement(
        &self,
        slot: &Slot,
    ) -> Result<Result<(Measurement, super::secret::Password), Blocked>, SubmitError> {
        let id = slot.point_id;
        let Some(p) = point::get(&self.db, id).await? else {
            return Ok(Err(Blocked::Inactive(id)));
        };
        let Some(c) = store::point_config(&self.db, id).await? else {
            return Ok(Err(Blocked::Inactive(id)));
        };
        let settings = store::settings(&self.db).await?;
        let blocked = |b| Ok(Err(b));
        let Some(obra) = p.obra_code.clone() else {
            return blocked(Blocked::NoObra(id));
        };
        let Some(rut_usuario) = p.informant_rut.clone() else {
            return blocked(Blocked::NoInformant(id));
        };
        let Some(rut_empresa) = settings.rut_empresa.clone() else {
            return blocked(Blocked::NoRutEmpresa);
        };
        let Some(sealed) = &c.password_enc else {
            return blocked(Blocked::NoPassword(id));
        };
        let Some(password) = self.sealer.as_ref().and_then(|s| s.open(id, sealed).ok()) else {
            return blocked(Blocked::Password(id));
        };
        let Some(values) = slot.values.clone() else {
            return blocked(Blocked::NoSource {
                point: id,
                what: "caudal",
            });
        };
        Ok(Ok((
            Measurement {
                endpoint: c.endpoint,
                obra,
                rut_empresa,
                rut_usuario,
                fecha: slot.fecha.clone(),
                hora: slot.hora.clone(),
                values,
            },
            password,
        )))
    }

    /// Pending → in flight: the request is built and the in-flight state committed before it
    /// goes; or the slot gives up (cap reached), or waits for its configuration.
    async fn on_pending(&self, slot: Slot, round: &mut Round) -> Result<Submission, SubmitError> {
        let now = self.clock.now();
        if slot.state == SlotState::Failed && slot.attempts >= i64::from(self.config.max_attempts) {
            store::give_up(&self.db, slot.point_id, slot.slot_at, now).await?;
            tracing::error!(
                point = slot.point_id,
                slot = %slot.slot_at,
                attempts = slot.attempts,
                "compliance: falla de transmisión; report it in the MEE software"
            );
            return Ok(Submission::Done(SlotState::TransmissionFailure));
        }
        if let Some(last) = store::obra_last_post(&self.db, slot.point_id).await?
            && now < last + self.pacing.obra_spacing
        {
            self.paced(round, "obra_spacing");
            return Ok(Submission::Done(slot.state));
        }
        let (m, password) = match self.measurement(&slot).await? {
            Ok(x) => x,
            Err(b) => {
                store::set_reason(&self.db, slot.point_id, slot.slot_at, &b.to_string()).await?;
                self.blocked(round, &b);
                return Ok(Submission::Done(slot.state));
            }
        };
        let settings = store::settings(&self.db).await?;
        let request = PostRequest {
            base_url: settings.dga_base_url,
            endpoint: m.endpoint,
            codigo_obra: m.obra.to_string(),
            timestamp_origen: slot::timestamp_origen(now),
            body: m.body(&password).to_string().into_bytes(),
        };
        let logged = serde_json::json!({
            "url": format!("{}{}", request.base_url, m.endpoint.path()),
            "headers": {
                "codigoObra": request.codigo_obra,
                "timeStampOrigen": request.timestamp_origen,
            },
            "body": m.redacted(),
        });
        let claim = store::claim(
            &self.db,
            slot.point_id,
            slot.slot_at,
            &request.codigo_obra,
            &logged,
            &self.pacing,
            now,
        )
        .await?;
        match claim {
            Claim::Claimed { exchange, attempt } => Ok(Submission::InFlight {
                slot,
                exchange,
                attempt,
                request,
            }),
            Claim::NotDue => Ok(Submission::Done(slot.state)),
            Claim::ObraPaced { until } => {
                self.paced(round, "obra_spacing");
                tracing::debug!(point = slot.point_id, %until, "compliance: obra paced");
                Ok(Submission::Done(slot.state))
            }
            Claim::RateLimited { until } => {
                self.paced(round, "rate");
                tracing::debug!(%until, "compliance: global rate spent for this round");
                Ok(Submission::RateLimited)
            }
        }
    }

    /// In flight → answered: the POST.
    async fn on_in_flight(
        &self,
        slot: Slot,
        exchange: i64,
        attempt: i64,
        request: PostRequest,
    ) -> Submission {
        let answer = self.client.post(&request).await;
        Submission::Answered {
            slot,
            exchange,
            attempt,
            answer,
        }
    }

    /// Answered → done: what the answer means, committed with the answer.
    async fn on_answered(
        &self,
        slot: Slot,
        exchange: i64,
        attempt: i64,
        answer: Result<RawResponse, TransportError>,
    ) -> Result<Submission, SubmitError> {
        let now = self.clock.now();
        let outcome = classify(&answer);
        self.metrics
            .submissions
            .get_or_create(&KindLabels::new(outcome.name()))
            .inc();
        let (state, receipt, reason) = match &outcome {
            Outcome::Accepted { receipt } => (SlotState::Accepted, Some(receipt.clone()), None),
            Outcome::Duplicate { receipt } => {
                (SlotState::AcceptedDuplicate, Some(receipt.clone()), None)
            }
            Outcome::AcceptedNoReceipt { detail } => {
                (SlotState::AcceptedNoReceipt, None, Some(detail.clone()))
            }
            Outcome::RejectedConfig { message } => {
                (SlotState::RejectedConfig, None, Some(message.clone()))
            }
            Outcome::Failed { reason } => (SlotState::Failed, None, Some(reason.clone())),
        };
        let (http_status, response) = match &answer {
            Ok(r) => (Some(r.status), r.body.clone()),
            Err(e) => (None, e.to_string()),
        };
        let a = Answered {
            exchange,
            http_status,
            response,
            outcome: outcome.name().to_string(),
            state,
            receipt,
            reason: reason.clone(),
            next_attempt_at: (state == SlotState::Failed).then(|| now + Duration::days(1)),
        };
        if !store::record(&self.db, slot.point_id, slot.slot_at, attempt, &a, now).await? {
            tracing::warn!(
                point = slot.point_id,
                slot = %slot.slot_at,
                "compliance: the answer came after the slot was claimed again; kept on its exchange only"
            );
        }
        match &outcome {
            Outcome::RejectedConfig { message } => {
                store::stop_point(&self.db, slot.point_id, message, now).await?;
                tracing::error!(
                    point = slot.point_id,
                    message = %message,
                    "compliance: the DGA refused the point's configuration; its reporting stopped"
                );
            }
            Outcome::AcceptedNoReceipt { detail } => tracing::warn!(
                point = slot.point_id,
                slot = %slot.slot_at,
                detail = %detail,
                "compliance: accepted without a receipt; follow it up"
            ),
            Outcome::Failed { reason } => tracing::warn!(
                point = slot.point_id,
                slot = %slot.slot_at,
                reason = %reason,
                "compliance: submission failed; sent again in a day"
            ),
            _ => {}
        }
        Ok(Submission::Done(state))
    }
}

/// The endpoint a point reports to unless set.
pub fn default_endpoint(p: &Point) -> Endpoint {
    Endpoint::of_kind(p.kind)
}
