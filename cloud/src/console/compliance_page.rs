//! The console's compliance pages: per month, every reported obra's figures; per obra and
//! month, its slot grid coloured by where each slot stands (accepted, late, held, failed,
//! pending, not yet due, discarded), each slot's values and receipt, and the held slots with
//! their reason, to release or discard with a note. Read through `compliance::report` and
//! changed through `compliance::settings::review`, exactly as the API does, with its roles
//! (any role reads; admin and operator review).

use super::pages::{here, page, unavailable, viewer};
use super::{Console, i18n::Lang, i18n::Texts, session};
use crate::compliance::report::{self, Filter, Month, PointReport, Standing};
use crate::compliance::settings::{self, SettingsError};
use crate::compliance::store;
use crate::core::auth::Permission;
use askama::Template;
use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
pub(super) struct MonthQuery {
    month: Option<String>,
    error: Option<String>,
}

/// The month asked for, or this one (in the DGA's UTC-4); `Err` names the bad value.
fn month_of(q: &MonthQuery) -> Result<Month, String> {
    match q.month.as_deref().filter(|m| !m.trim().is_empty()) {
        Some(m) => Month::parse(m.trim()),
        None => Ok(Month::of(Utc::now())),
    }
}

struct ObraRow {
    id: i64,
    name: String,
    obra: String,
    mode: &'static str,
    expected: u64,
    accepted: u64,
    accepted_late: u64,
    held: u64,
    failed: u64,
    pending: u64,
    not_yet_due: u64,
    /// Accepted of the slots already due, percent (0 when none is due).
    complete_pct: u64,
}

fn obra_row(r: PointReport) -> ObraRow {
    let c = &r.counts;
    let due = c.expected.saturating_sub(c.not_yet_due + c.discarded);
    ObraRow {
        id: r.point_id,
        name: r.name,
        obra: r.obra_code.unwrap_or_default(),
        mode: r.mode.as_str(),
        expected: c.expected,
        accepted: c.accepted,
        accepted_late: c.accepted_late,
        held: c.held,
        failed: c.failed,
        pending: c.pending,
        not_yet_due: c.not_yet_due,
        complete_pct: (c.accepted * 100).checked_div(due).unwrap_or(0),
    }
}

#[derive(Template)]
#[template(path = "console/compliance.html")]
struct CompliancePage<'a> {
    t: &'a Texts,
    lang: &'a str,
    csrf: &'a str,
    user: &'a str,
    back: &'a str,
    month: String,
    error: Option<String>,
    rows: Vec<ObraRow>,
}

/// `/compliance?month=YYYY-MM`: every reported obra's month.
pub(super) async fn month(
    State(console): State<Console>,
    headers: HeaderMap,
    uri: Uri,
    Query(q): Query<MonthQuery>,
) -> Response {
    let user = match viewer(&console, &headers, &uri, Permission::Read).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    let lang = Lang::of(&headers);
    let t = lang.texts();
    let (month, error, rows) = match month_of(&q) {
        Ok(m) => {
            match report::month_report(&console.api.db, m, &Filter::default(), Utc::now()).await {
                Ok(r) => (m, None, r.into_iter().map(obra_row).collect()),
                Err(e) => return unavailable("the compliance month", &e),
            }
        }
        Err(e) => (
            Month::of(Utc::now()),
            Some(format!("{}: {e}", t.month)),
            Vec::new(),
        ),
    };
    let (csrf, set) = session::csrf(&console, &headers);
    let back = here(&uri);
    let mut r = page(
        CompliancePage {
            t,
            lang: lang.code(),
            csrf: &csrf,
            user: &user.email,
            back: &back,
            month: month.to_string(),
            error: error.clone(),
            rows,
        }
        .render(),
        &[set],
    );
    if error.is_some() {
        *r.status_mut() = StatusCode::BAD_REQUEST;
    }
    r
}

struct SlotCell {
    at: String,
    day: String,
    hora: String,
    /// The CSS class and the legend's word.
    class: &'static str,
    word: &'static str,
    caudal: String,
    totalizador: String,
    receipt: String,
}

struct HeldRow {
    at: String,
    fecha: String,
    hora: String,
    reason: String,
    caudal: String,
    releasable: bool,
}

#[derive(Template)]
#[template(path = "console/compliance_point.html")]
struct PointPage<'a> {
    t: &'a Texts,
    lang: &'a str,
    csrf: &'a str,
    user: &'a str,
    back: &'a str,
    month: String,
    id: i64,
    name: String,
    obra: String,
    mode: &'static str,
    row: ObraRow,
    cells: Vec<SlotCell>,
    held: Vec<HeldRow>,
    may_review: bool,
    error: Option<&'a str>,
}

fn standing(t: &Texts, s: Standing, late: bool) -> (&'static str, &'static str) {
    match (s, late) {
        (Standing::Accepted, true) => ("late", t.slot_late),
        (Standing::Accepted, false) => ("accepted", t.slot_accepted),
        (Standing::Held, _) => ("held", t.slot_held),
        (Standing::Failed, _) => ("failed", t.slot_failed),
        (Standing::Pending, _) => ("pending", t.slot_pending),
        (Standing::NotYetDue, _) => ("not-due", t.slot_not_due),
        (Standing::Discarded, _) => ("discarded", t.slot_discarded),
    }
}

/// `/compliance/points/{id}?month=YYYY-MM`: one obra's month, slot by slot.
pub(super) async fn point(
    State(console): State<Console>,
    headers: HeaderMap,
    uri: Uri,
    Path(id): Path<String>,
    Query(q): Query<MonthQuery>,
) -> Response {
    let user = match viewer(&console, &headers, &uri, Permission::Read).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    let lang = Lang::of(&headers);
    let t = lang.texts();
    let Ok(id) = id.parse::<i64>() else {
        return (StatusCode::NOT_FOUND, t.not_found).into_response();
    };
    let month = match month_of(&q) {
        Ok(m) => m,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("{}: {e}", t.month)).into_response(),
    };
    let pm = match report::point_month(&console.api.db, id, month, Utc::now()).await {
        Ok(Some(pm)) => pm,
        Ok(None) => return (StatusCode::NOT_FOUND, t.not_found).into_response(),
        Err(e) => return unavailable("the compliance point month", &e),
    };
    let mut held = Vec::new();
    let mut cells = Vec::with_capacity(pm.slots.len());
    for s in &pm.slots {
        let (class, word) = standing(t, s.standing, s.late);
        let at = s.slot_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        if s.standing == Standing::Held {
            let stored = store::slot(&console.api.db, id, s.slot_at).await;
            let reason = match stored {
                Ok(Some(st)) => [st.reason.unwrap_or_default(), st.detail]
                    .into_iter()
                    .filter(|x| !x.is_empty())
                    .collect::<Vec<_>>()
                    .join(": "),
                Ok(None) => String::new(),
                Err(e) => return unavailable("a held slot", &e),
            };
            held.push(HeldRow {
                at: at.clone(),
                fecha: s.fecha.clone(),
                hora: s.hora.clone(),
                reason,
                caudal: s
                    .values
                    .as_ref()
                    .map(|v| v.caudal.clone())
                    .unwrap_or_default(),
                releasable: s.values.is_some(),
            });
        }
        cells.push(SlotCell {
            at,
            day: s.fecha.clone(),
            hora: s.hora.clone(),
            class,
            word,
            caudal: s
                .values
                .as_ref()
                .map(|v| v.caudal.clone())
                .unwrap_or_default(),
            totalizador: s
                .values
                .as_ref()
                .and_then(|v| v.totalizador.clone())
                .unwrap_or_default(),
            receipt: s.receipt.clone().unwrap_or_default(),
        });
    }
    let error = match q.error.as_deref() {
        Some("note") => Some(t.review_note_needed),
        Some("held") => Some(t.slot_no_longer_held),
        Some("values") => Some(t.slot_nothing_to_send),
        _ => None,
    };
    let (csrf, set) = session::csrf(&console, &headers);
    let back = here(&uri);
    let r = pm.report;
    page(
        PointPage {
            t,
            lang: lang.code(),
            csrf: &csrf,
            user: &user.email,
            back: &back,
            month: month.to_string(),
            id,
            name: r.name.clone(),
            obra: r.obra_code.clone().unwrap_or_default(),
            mode: r.mode.as_str(),
            row: obra_row(r),
            cells,
            held,
            may_review: user.role.allows(Permission::ManageCompliance),
            error,
        }
        .render(),
        &[set],
    )
}

#[derive(Deserialize)]
pub(super) struct ReviewForm {
    csrf: String,
    /// `release` or `discard`.
    action: String,
    #[serde(default)]
    note: String,
    back: Option<String>,
}

/// `POST /compliance/points/{id}/slots/{slot}/review`: a person's review of a held slot, as
/// `POST /api/v1/compliance/points/{id}/slots/{slot}/release|discard` does.
pub(super) async fn review(
    State(console): State<Console>,
    headers: HeaderMap,
    uri: Uri,
    Path((id, at)): Path<(String, String)>,
    Form(f): Form<ReviewForm>,
) -> Response {
    let t = Lang::of(&headers).texts();
    if !session::csrf_ok(&headers, &f.csrf) {
        return (StatusCode::FORBIDDEN, t.form_expired).into_response();
    }
    let user = match viewer(&console, &headers, &uri, Permission::ManageCompliance).await {
        Ok(u) => u,
        Err(r) if r.status() == StatusCode::FORBIDDEN => {
            return (StatusCode::FORBIDDEN, t.forbidden).into_response();
        }
        Err(r) => return r,
    };
    let (Ok(id), Ok(at)) = (id.parse::<i64>(), at.parse::<DateTime<Utc>>()) else {
        return (StatusCode::NOT_FOUND, t.not_found).into_response();
    };
    let release = match f.action.as_str() {
        "release" => true,
        "discard" => false,
        _ => return (StatusCode::BAD_REQUEST, "action: release or discard").into_response(),
    };
    let back = session::safe_next(f.back.as_deref());
    let with_error = |code: &str| {
        let sep = if back.contains('?') { '&' } else { '?' };
        Redirect::to(&format!("{back}{sep}error={code}")).into_response()
    };
    let reviewed = settings::review(
        &console.api.db,
        id,
        at,
        release,
        &user.email,
        &f.note,
        Utc::now(),
    )
    .await;
    match reviewed {
        Ok(_) => {
            tracing::info!(point = id, slot = %at, by = %user.email, release,
                "held slot reviewed from the console");
            Redirect::to(&back).into_response()
        }
        Err(SettingsError::Invalid { .. }) => with_error("note"),
        Err(SettingsError::NotHeld(..)) => with_error("held"),
        Err(SettingsError::NothingToSend(..)) => with_error("values"),
        Err(SettingsError::NoSlot(..)) => (StatusCode::NOT_FOUND, t.not_found).into_response(),
        Err(e) => unavailable("a held slot to review it", &e),
    }
}
