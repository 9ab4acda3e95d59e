//! The console's page handlers: signing in and out, the language switch, the fleet overview
//! and its live rows. Each page checks the session first; a request without one goes to the
//! login page and comes back after.

use super::Console;
use super::fleet::{self, SiteRow, Sort};
use super::i18n::{Lang, Texts};
use super::session::{self, SESSION_COOKIE};
use crate::core::api::ApiError;
use crate::core::auth::Permission;
use crate::core::config::Secret;
use crate::users::account::User;
use askama::Template;
use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;

/// The signed-in account of a page request, or the response that sends it to sign in (or
/// refuses it: 403 when its role may not `need`).
pub(super) async fn viewer(
    console: &Console,
    headers: &HeaderMap,
    uri: &Uri,
    need: Permission,
) -> Result<User, Response> {
    let token = session::cookie(headers, SESSION_COOKIE);
    match crate::users::session::account_of(&console.api, token.as_deref()).await {
        Ok(u) if u.role.allows(need) => Ok(u),
        Ok(_) => Err(StatusCode::FORBIDDEN.into_response()),
        Err(ApiError::Unauthorized(_)) => Err(session::to_login(headers, uri)),
        Err(e) => Err(e.into_response()),
    }
}

/// The request's path and query: where a form on the page sends back to.
pub(super) fn here(uri: &Uri) -> String {
    uri.path_and_query()
        .map_or("/".to_string(), |p| p.as_str().to_string())
}

/// 503 for a page whose data could not be read; the cause goes to the log.
pub(super) fn unavailable(what: &str, e: &dyn std::fmt::Display) -> Response {
    tracing::error!(error = %e, "reading {what}");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "the database does not answer",
    )
        .into_response()
}

pub(super) fn page(
    html: Result<String, askama::Error>,
    cookies: &[Option<HeaderValue>],
) -> Response {
    let mut r = match html {
        Ok(h) => Html(h).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "rendering a console page");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    };
    for c in cookies.iter().flatten() {
        r.headers_mut().append(header::SET_COOKIE, c.clone());
    }
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

#[derive(Template)]
#[template(path = "console/login.html")]
struct LoginPage<'a> {
    t: &'a Texts,
    lang: &'a str,
    csrf: &'a str,
    next: &'a str,
    email: &'a str,
    error: Option<&'a str>,
}

#[derive(Debug, Deserialize)]
pub(super) struct LoginQuery {
    next: Option<String>,
    expired: Option<String>,
}

pub(super) async fn login_form(
    State(console): State<Console>,
    headers: HeaderMap,
    Query(q): Query<LoginQuery>,
) -> Response {
    let lang = Lang::of(&headers);
    let t = lang.texts();
    let (csrf, set) = session::csrf(&console, &headers);
    let next = session::safe_next(q.next.as_deref());
    let error = q.expired.as_ref().map(|_| t.session_expired);
    page(
        LoginPage {
            t,
            lang: lang.code(),
            csrf: &csrf,
            next: &next,
            email: "",
            error,
        }
        .render(),
        &[set],
    )
}

#[derive(Deserialize)]
pub(super) struct LoginForm {
    email: String,
    password: Secret,
    csrf: String,
    next: Option<String>,
}

pub(super) async fn login(
    State(console): State<Console>,
    from: crate::users::throttle::ClientAddr,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    let lang = Lang::of(&headers);
    let t = lang.texts();
    let next = session::safe_next(f.next.as_deref());
    let again = |status: StatusCode, error: &str| {
        let (csrf, set) = session::csrf(&console, &headers);
        let mut r = page(
            LoginPage {
                t,
                lang: lang.code(),
                csrf: &csrf,
                next: &next,
                email: &f.email,
                error: Some(error),
            }
            .render(),
            &[set],
        );
        *r.status_mut() = status;
        r
    };
    if !session::csrf_ok(&headers, &f.csrf) {
        return again(StatusCode::FORBIDDEN, t.form_expired);
    }
    match crate::users::session::sign_in(&console.api, &f.email, f.password, &from).await {
        Ok((_, token, expires_at)) => {
            let age = (expires_at - Utc::now()).num_seconds().max(0);
            let mut r = Redirect::to(&next).into_response();
            if let Some(c) =
                session::set_cookie(&console, &headers, SESSION_COOKIE, &token, Some(age))
            {
                r.headers_mut().append(header::SET_COOKIE, c);
            }
            r
        }
        Err(ApiError::Unauthorized(_)) => again(StatusCode::UNAUTHORIZED, t.wrong_credentials),
        Err(ApiError::Throttled(th)) => {
            let status = ApiError::Throttled(th.clone()).status();
            let mut r = again(status, t.too_many_logins);
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(th.retry_after_s()));
            r
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
pub(super) struct CsrfForm {
    csrf: String,
}

pub(super) async fn logout(
    State(console): State<Console>,
    headers: HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Response {
    if !session::csrf_ok(&headers, &f.csrf) {
        return StatusCode::FORBIDDEN.into_response();
    }
    let mut r = Redirect::to("/login").into_response();
    if let Some(c) = session::set_cookie(&console, &headers, SESSION_COOKIE, "", Some(0)) {
        r.headers_mut().append(header::SET_COOKIE, c);
    }
    r
}

#[derive(Deserialize)]
pub(super) struct LangForm {
    lang: String,
    csrf: String,
    back: Option<String>,
}

/// The language switch: remembers the choice for a year, back to the page it was made on.
pub(super) async fn set_lang(
    State(console): State<Console>,
    headers: HeaderMap,
    Form(f): Form<LangForm>,
) -> Response {
    if !session::csrf_ok(&headers, &f.csrf) {
        return StatusCode::FORBIDDEN.into_response();
    }
    let Some(lang) = Lang::parse(&f.lang) else {
        return (StatusCode::BAD_REQUEST, "lang: one of es, en").into_response();
    };
    let mut r = Redirect::to(&session::safe_next(f.back.as_deref())).into_response();
    if let Some(c) = session::set_cookie(
        &console,
        &headers,
        session::LANG_COOKIE,
        lang.code(),
        Some(365 * 86_400),
    ) {
        r.headers_mut().append(header::SET_COOKIE, c);
    }
    r
}

/// One row as the template shows it (times already put in words).
struct RowView {
    id: String,
    name: String,
    /// `online`, `offline`, `never` or `inactive`: the CSS class and the state's text.
    state: &'static str,
    state_text: &'static str,
    last_seen: String,
    last_seen_iso: String,
    backlog: String,
    oldest_unsent: String,
    devices: Vec<DeviceView>,
    open_alerts: usize,
    /// `12 / 720 (2 %)`, or empty when no reported obra takes a value from the site.
    dga: String,
}

struct DeviceView {
    device: String,
    values: String,
    age: String,
    flagged: bool,
}

fn age(t: &Texts, s: i64) -> String {
    let s = s.max(0);
    let words = if s < 120 {
        format!("{s} s")
    } else if s < 7200 {
        format!("{} min", s / 60)
    } else if s < 2 * 86_400 {
        format!("{} h", s / 3600)
    } else {
        format!("{} d", s / 86_400)
    };
    match t.ago {
        "hace" => format!("hace {words}"),
        ago => format!("{words} {ago}"),
    }
}

fn view(t: &Texts, r: SiteRow, now: DateTime<Utc>) -> RowView {
    let (state, state_text) = match (r.active, r.online) {
        (false, _) => ("inactive", t.inactive),
        (true, None) => ("never", t.never_seen),
        (true, Some(true)) => ("online", t.online),
        (true, Some(false)) => ("offline", t.offline),
    };
    RowView {
        state,
        state_text,
        last_seen: r
            .last_seen
            .map_or_else(|| "—".into(), |l| age(t, (now - l).num_seconds())),
        last_seen_iso: r.last_seen.map(|l| l.to_rfc3339()).unwrap_or_default(),
        backlog: r.backlog.map_or_else(|| "—".into(), |b| b.to_string()),
        oldest_unsent: r
            .oldest_unsent_age_s
            .filter(|a| *a > 0)
            .map_or_else(|| "—".into(), |a| age(t, a)),
        devices: r
            .devices
            .into_iter()
            .map(|d| DeviceView {
                age: age(t, (now - d.ts).num_seconds()),
                device: d.device,
                values: d.values,
                flagged: d.flagged,
            })
            .collect(),
        open_alerts: r.open_alerts,
        dga: r.dga.map_or_else(String::new, |(ok, due)| {
            format!(
                "{ok} / {due} ({} %)",
                (ok * 100).checked_div(due).unwrap_or(0)
            )
        }),
        id: r.id,
        name: r.name,
    }
}

#[derive(Template)]
#[template(path = "console/fleet.html")]
struct FleetPage<'a> {
    t: &'a Texts,
    lang: &'a str,
    csrf: &'a str,
    user: &'a str,
    back: &'a str,
    q: &'a str,
    sort: &'a str,
    rows_url: &'a str,
    rows: Vec<RowView>,
}

#[derive(Template)]
#[template(path = "console/fleet_rows.html")]
struct FleetRows<'a> {
    t: &'a Texts,
    rows: Vec<RowView>,
}

#[derive(Debug, Deserialize)]
pub(super) struct FleetQuery {
    q: Option<String>,
    sort: Option<String>,
}

async fn fleet_rows(
    console: &Console,
    t: &Texts,
    q: &FleetQuery,
) -> Result<Vec<RowView>, Response> {
    let sort = Sort::parse(q.sort.as_deref());
    let rows = fleet::rows(
        &console.api.db,
        &console.dga,
        q.q.as_deref().unwrap_or(""),
        sort,
    )
    .await
    .map_err(|e| unavailable("the fleet overview", &e))?;
    let now = Utc::now();
    Ok(rows.into_iter().map(|r| view(t, r, now)).collect())
}

/// `/`: the fleet overview.
pub(super) async fn fleet(
    State(console): State<Console>,
    headers: HeaderMap,
    uri: Uri,
    Query(q): Query<FleetQuery>,
) -> Response {
    let user = match viewer(&console, &headers, &uri, Permission::Read).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    let lang = Lang::of(&headers);
    let t = lang.texts();
    let (csrf, set) = session::csrf(&console, &headers);
    let rows = match fleet_rows(&console, t, &q).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let sort = Sort::parse(q.sort.as_deref()).code();
    let filter = q.q.clone().unwrap_or_default();
    let rows_url = format!("/fleet/rows?q={}&sort={sort}", session::url_escape(&filter));
    let back = here(&uri);
    page(
        FleetPage {
            t,
            lang: lang.code(),
            csrf: &csrf,
            user: &user.name,
            back: &back,
            q: &filter,
            sort,
            rows_url: &rows_url,
            rows,
        }
        .render(),
        &[set],
    )
}

/// `/fleet/rows`: the overview's table body, fetched again every few seconds by the page.
pub(super) async fn fleet_live(
    State(console): State<Console>,
    headers: HeaderMap,
    uri: Uri,
    Query(q): Query<FleetQuery>,
) -> Response {
    if let Err(r) = viewer(&console, &headers, &uri, Permission::Read).await {
        return r;
    }
    let t = Lang::of(&headers).texts();
    match fleet_rows(&console, t, &q).await {
        Ok(rows) => page(FleetRows { t, rows }.render(), &[]),
        Err(r) => r,
    }
}

struct RangeLink {
    code: &'static str,
    text: &'static str,
    current: bool,
}

struct DeviceStatusView {
    device: String,
    last_poll: String,
    result: String,
    ok: bool,
}

struct ChartView {
    device: String,
    /// The chart's data as JSON, for the page's script.
    json: String,
    points: usize,
    has_flow: bool,
    has_level: bool,
    volume_total: String,
}

#[derive(Template)]
#[template(path = "console/site.html")]
struct SitePage<'a> {
    t: &'a Texts,
    lang: &'a str,
    csrf: &'a str,
    user: &'a str,
    back: &'a str,
    id: &'a str,
    name: &'a str,
    row: RowView,
    agent_version: String,
    ranges: Vec<RangeLink>,
    /// The range shown, `from – to` in UTC.
    span: String,
    devices: Vec<DeviceStatusView>,
    charts: Vec<ChartView>,
    events: Vec<super::site_page::EventLine>,
    summary: crate::telemetry::query::CompletenessSummary,
}

#[derive(Debug, Deserialize)]
pub(super) struct SiteQuery {
    range: Option<String>,
}

/// `/sites/{site}`: one site over a range.
pub(super) async fn site(
    State(console): State<Console>,
    headers: HeaderMap,
    uri: Uri,
    axum::extract::Path(id): axum::extract::Path<String>,
    Query(q): Query<SiteQuery>,
) -> Response {
    use super::site_page::{self, Range};
    let user = match viewer(&console, &headers, &uri, Permission::Read).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    let lang = Lang::of(&headers);
    let t = lang.texts();
    let Ok(sid) = caudal_common::SiteId::new(&id) else {
        return (StatusCode::NOT_FOUND, t.not_found).into_response();
    };
    let range = Range::parse(q.range.as_deref());
    let data = match site_page::read(&console.api.db, &sid, range).await {
        Ok(Some(d)) => d,
        Ok(None) => return (StatusCode::NOT_FOUND, t.not_found).into_response(),
        Err(e) => return unavailable(&format!("the page of site {sid}"), &e),
    };
    let (csrf, set) = session::csrf(&console, &headers);
    let now = Utc::now();
    let status = data.status.clone();
    let row = view(
        t,
        SiteRow {
            id: data.site.id.as_str().to_string(),
            name: data.site.name.clone(),
            active: data.site.active,
            online: status.as_ref().map(|s| s.online),
            last_seen: status.as_ref().and_then(|s| s.last_seen),
            backlog: status.as_ref().and_then(|s| s.backlog),
            oldest_unsent_age_s: status.as_ref().and_then(|s| s.oldest_unsent_age_s),
            devices: Vec::new(),
            open_alerts: 0,
            dga: None,
        },
        now,
    );
    let devices = status
        .as_ref()
        .and_then(|s| s.devices.as_ref())
        .and_then(|d| d.as_object())
        .map(|m| {
            m.iter()
                .map(|(device, v)| {
                    let result = v["result"].as_str().unwrap_or("—").to_string();
                    DeviceStatusView {
                        device: device.clone(),
                        last_poll: v["last_poll"].as_str().unwrap_or("—").to_string(),
                        ok: result == "ok",
                        result: match v["last_error"].as_str() {
                            Some(e) => format!("{result}: {e}"),
                            None => result,
                        },
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let ranges = Range::ALL
        .iter()
        .map(|r| RangeLink {
            code: r.code(),
            text: match r {
                Range::Hour => t.range_hour,
                Range::Day => t.range_day,
                Range::Week => t.range_week,
                Range::Month => t.range_month,
                Range::Year => t.range_year,
            },
            current: *r == range,
        })
        .collect();
    let charts = data
        .charts
        .iter()
        .map(|c| ChartView {
            device: c.device.clone(),
            json: serde_json::to_string(c)
                .unwrap_or_default()
                // Inside <script>: a "</" in a string must not close it.
                .replace("</", "<\\/"),
            points: c.x.len(),
            has_flow: c.has_flow(),
            has_level: c.has_level(),
            volume_total: format!("{:.1}", c.volume_total()),
        })
        .collect();
    let back = here(&uri);
    page(
        SitePage {
            t,
            lang: lang.code(),
            csrf: &csrf,
            user: &user.name,
            back: &back,
            id: data.site.id.as_str(),
            name: &data.site.name,
            row,
            agent_version: status
                .as_ref()
                .and_then(|s| s.agent_version.clone())
                .unwrap_or_else(|| "—".into()),
            ranges,
            span: format!(
                "{} – {} UTC",
                data.from.format("%Y-%m-%d %H:%M"),
                data.to.format("%Y-%m-%d %H:%M")
            ),
            devices,
            charts,
            events: data.events.iter().map(site_page::EventLine::of).collect(),
            summary: data.completeness.summary,
        }
        .render(),
        &[set],
    )
}

struct AlertRow {
    id: i64,
    kind: &'static str,
    site: String,
    device: String,
    since: String,
    message: String,
    open: bool,
    closed_by: String,
    close_note: String,
}

struct StateLink {
    code: &'static str,
    text: &'static str,
    current: bool,
}

#[derive(Template)]
#[template(path = "console/alerts.html")]
struct AlertsPage<'a> {
    t: &'a Texts,
    lang: &'a str,
    csrf: &'a str,
    user: &'a str,
    back: &'a str,
    states: Vec<StateLink>,
    site: &'a str,
    may_close: bool,
    error: Option<&'a str>,
    rows: Vec<AlertRow>,
}

#[derive(Debug, Deserialize)]
pub(super) struct AlertsQuery {
    state: Option<String>,
    site: Option<String>,
    error: Option<String>,
}

/// `/alerts`: the fleet's alerts, open by default; a closing form on each open one for the
/// roles that may close alerts.
pub(super) async fn alerts(
    State(console): State<Console>,
    headers: HeaderMap,
    uri: Uri,
    Query(q): Query<AlertsQuery>,
) -> Response {
    use crate::telemetry::alert::{self, AlertState, Filter};
    let user = match viewer(&console, &headers, &uri, Permission::Read).await {
        Ok(u) => u,
        Err(r) => return r,
    };
    let lang = Lang::of(&headers);
    let t = lang.texts();
    let state = match q.state.as_deref() {
        Some("closed") => Some(AlertState::Closed),
        Some("all") => None,
        _ => Some(AlertState::Open),
    };
    let site = q.site.clone().filter(|s| !s.trim().is_empty());
    let list = alert::list(
        &console.api.db,
        &Filter {
            state,
            kind: None,
            site: site.clone(),
            before: None,
            limit: 500,
        },
    )
    .await;
    let list = match list {
        Ok(l) => l,
        Err(e) => return unavailable("alerts", &e),
    };
    let rows = list
        .into_iter()
        .map(|a| AlertRow {
            id: a.id,
            kind: a.kind.as_str(),
            site: a.site.unwrap_or_default(),
            device: a.device.unwrap_or_default(),
            since: a.since.format("%Y-%m-%d %H:%M").to_string(),
            message: a.message,
            open: a.state == AlertState::Open,
            closed_by: a.closed_by.unwrap_or_default(),
            close_note: a.close_note,
        })
        .collect();
    let current = match state {
        Some(AlertState::Open) => "open",
        Some(AlertState::Closed) => "closed",
        None => "all",
    };
    let states = [
        ("open", t.state_open),
        ("closed", t.state_closed),
        ("all", t.state_all),
    ]
    .into_iter()
    .map(|(code, text)| StateLink {
        code,
        text,
        current: code == current,
    })
    .collect();
    let error = match q.error.as_deref() {
        Some("note") => Some(t.note_too_long),
        Some("closed") => Some(t.already_closed),
        _ => None,
    };
    let (csrf, set) = session::csrf(&console, &headers);
    let back = here(&uri);
    page(
        AlertsPage {
            t,
            lang: lang.code(),
            csrf: &csrf,
            user: &user.name,
            back: &back,
            states,
            site: site.as_deref().unwrap_or(""),
            may_close: user.role.allows(Permission::ManageCatchment),
            error,
            rows,
        }
        .render(),
        &[set],
    )
}

#[derive(Deserialize)]
pub(super) struct CloseForm {
    csrf: String,
    note: String,
    back: Option<String>,
}

/// `POST /alerts/{id}/close`: closes an open alert with a note, as the API does.
pub(super) async fn close_alert(
    State(console): State<Console>,
    headers: HeaderMap,
    uri: Uri,
    axum::extract::Path(id): axum::extract::Path<String>,
    Form(f): Form<CloseForm>,
) -> Response {
    use crate::telemetry::alert::{self, AlertError};
    let t = Lang::of(&headers).texts();
    if !session::csrf_ok(&headers, &f.csrf) {
        return (StatusCode::FORBIDDEN, t.form_expired).into_response();
    }
    let user = match viewer(&console, &headers, &uri, Permission::ManageCatchment).await {
        Ok(u) => u,
        Err(r) if r.status() == StatusCode::FORBIDDEN => {
            return (StatusCode::FORBIDDEN, t.forbidden).into_response();
        }
        Err(r) => return r,
    };
    let Ok(id) = id.parse::<i64>() else {
        return (StatusCode::NOT_FOUND, "no such alert").into_response();
    };
    let back = session::safe_next(f.back.as_deref());
    let with_error = |code: &str| {
        let sep = if back.contains('?') { '&' } else { '?' };
        Redirect::to(&format!("{back}{sep}error={code}")).into_response()
    };
    if f.note.chars().count() > 2000 {
        return with_error("note");
    }
    match alert::close(&console.api.db, id, &user.email, f.note.trim(), Utc::now()).await {
        Ok(_) => {
            tracing::info!(alert = id, by = %user.email, "alert closed from the console");
            Redirect::to(&back).into_response()
        }
        Err(AlertError::Closed(_)) => with_error("closed"),
        Err(AlertError::NotFound(_)) => (StatusCode::NOT_FOUND, "no such alert").into_response(),
        Err(e) => unavailable(&format!("alert {id} to close it"), &e),
    }
}
