//! The console's languages: Spanish (the default) and English. A page's language is the
//! `lang` cookie (the switch in every page's header), else the browser's `Accept-Language`,
//! else Spanish.

use axum::http::HeaderMap;

/// A language the console speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    Es,
    En,
}

impl Lang {
    pub fn code(self) -> &'static str {
        match self {
            Lang::Es => "es",
            Lang::En => "en",
        }
    }

    pub fn parse(code: &str) -> Option<Lang> {
        match code.trim().to_ascii_lowercase().as_str() {
            "es" => Some(Lang::Es),
            "en" => Some(Lang::En),
            _ => None,
        }
    }

    /// The request's language: its `lang` cookie, else the first of its `Accept-Language`
    /// entries (by weight) that the console speaks, else Spanish.
    pub fn of(headers: &HeaderMap) -> Lang {
        if let Some(l) = super::session::cookie(headers, super::session::LANG_COOKIE)
            .as_deref()
            .and_then(Lang::parse)
        {
            return l;
        }
        let Some(accept) = headers
            .get(axum::http::header::ACCEPT_LANGUAGE)
            .and_then(|v| v.to_str().ok())
        else {
            return Lang::Es;
        };
        let mut choices: Vec<(f32, Lang)> = accept
            .split(',')
            .filter_map(|part| {
                let mut it = part.split(';');
                let tag = it.next()?.trim();
                let primary = tag.split('-').next()?;
                let lang = Lang::parse(primary)?;
                let q = it
                    .find_map(|p| p.trim().strip_prefix("q="))
                    .and_then(|q| q.parse::<f32>().ok())
                    .unwrap_or(1.0);
                Some((q, lang))
            })
            .collect();
        choices.sort_by(|a, b| b.0.total_cmp(&a.0));
        choices.first().map_or(Lang::Es, |c| c.1)
    }

    /// The texts of the pages in this language.
    pub fn texts(self) -> &'static Texts {
        match self {
            Lang::Es => &ES,
            Lang::En => &EN,
        }
    }
}

/// Every text the pages show, in one language.
#[derive(Debug)]
pub struct Texts {
    pub product: &'static str,
    pub sign_in: &'static str,
    pub sign_out: &'static str,
    pub email: &'static str,
    pub password: &'static str,
    pub wrong_credentials: &'static str,
    pub too_many_logins: &'static str,
    pub session_expired: &'static str,
    pub form_expired: &'static str,
    pub language: &'static str,
    pub fleet: &'static str,
    pub fleet_lead: &'static str,
    pub filter: &'static str,
    pub filter_placeholder: &'static str,
    pub sort: &'static str,
    pub sort_site: &'static str,
    pub sort_last_seen: &'static str,
    pub sort_backlog: &'static str,
    pub apply: &'static str,
    pub site: &'static str,
    pub state: &'static str,
    pub online: &'static str,
    pub offline: &'static str,
    pub never_seen: &'static str,
    pub inactive: &'static str,
    pub last_seen: &'static str,
    pub backlog: &'static str,
    pub oldest_unsent: &'static str,
    pub devices: &'static str,
    pub open_alerts: &'static str,
    pub no_sites: &'static str,
    pub updated_live: &'static str,
    pub ago: &'static str,
    pub signed_in_as: &'static str,
    pub range: &'static str,
    pub range_hour: &'static str,
    pub range_day: &'static str,
    pub range_week: &'static str,
    pub range_month: &'static str,
    pub range_year: &'static str,
    pub flow: &'static str,
    pub flow_band: &'static str,
    pub volume: &'static str,
    pub level: &'static str,
    pub events: &'static str,
    pub completeness: &'static str,
    pub missing: &'static str,
    pub unexplained: &'static str,
    pub time_gaps: &'static str,
    pub failed_polls: &'static str,
    pub gap_records: &'static str,
    pub device: &'static str,
    pub last_poll: &'static str,
    pub result: &'static str,
    pub agent: &'static str,
    pub version: &'static str,
    pub no_data: &'static str,
    pub no_events: &'static str,
    pub back_to_fleet: &'static str,
    pub kind: &'static str,
    pub message: &'static str,
    pub time: &'static str,
    pub not_found: &'static str,
    pub total_in_range: &'static str,
    pub alerts: &'static str,
    pub alerts_lead: &'static str,
    pub alert_state: &'static str,
    pub state_open: &'static str,
    pub state_closed: &'static str,
    pub state_all: &'static str,
    pub since: &'static str,
    pub close: &'static str,
    pub note: &'static str,
    pub closed_by: &'static str,
    pub no_alerts: &'static str,
    pub note_too_long: &'static str,
    pub already_closed: &'static str,
    pub forbidden: &'static str,
    pub see_chart: &'static str,
}

static ES: Texts = Texts {
    product: "Caudal",
    sign_in: "Ingresar",
    sign_out: "Salir",
    email: "Correo electrónico",
    password: "Contraseña",
    wrong_credentials: "El correo o la contraseña no son correctos.",
    too_many_logins: "Demasiados intentos de ingreso. Espere unos minutos e intente de nuevo.",
    session_expired: "Su sesión terminó: ingrese de nuevo.",
    form_expired: "El formulario expiró: vuelva a enviarlo.",
    language: "Idioma",
    fleet: "Puntos de captación",
    fleet_lead: "Cada sitio con su estado, su último dato y sus alertas abiertas.",
    filter: "Filtrar",
    filter_placeholder: "sitio o nombre",
    sort: "Ordenar por",
    sort_site: "sitio",
    sort_last_seen: "última conexión",
    sort_backlog: "pendientes",
    apply: "Aplicar",
    site: "Sitio",
    state: "Estado",
    online: "en línea",
    offline: "sin conexión",
    never_seen: "nunca conectado",
    inactive: "inactivo",
    last_seen: "Última conexión",
    backlog: "Pendientes",
    oldest_unsent: "Más antiguo sin enviar",
    devices: "Último dato por equipo",
    open_alerts: "Alertas abiertas",
    no_sites: "Ningún sitio coincide.",
    updated_live: "Se actualiza solo cada 5 s.",
    ago: "hace",
    signed_in_as: "Sesión de",
    range: "Rango",
    range_hour: "última hora",
    range_day: "último día",
    range_week: "última semana",
    range_month: "último mes",
    range_year: "último año",
    flow: "Caudal (L/s)",
    flow_band: "mín. y máx.",
    volume: "Volumen extraído (m³)",
    level: "Nivel (m)",
    events: "Eventos",
    completeness: "Completitud",
    missing: "Registros faltantes",
    unexplained: "sin explicación",
    time_gaps: "Lapsos sin datos",
    failed_polls: "Lecturas fallidas",
    gap_records: "Registros de brecha",
    device: "Equipo",
    last_poll: "Última lectura",
    result: "Resultado",
    agent: "Agente",
    version: "versión",
    no_data: "Sin datos en este rango.",
    no_events: "Sin eventos en este rango.",
    back_to_fleet: "Todos los sitios",
    kind: "Tipo",
    message: "Detalle",
    time: "Hora (UTC)",
    not_found: "No existe ese sitio.",
    total_in_range: "en el rango",
    alerts: "Alertas",
    alerts_lead: "Las alertas de la flota: ciérrelas con una nota cuando estén atendidas.",
    alert_state: "Estado",
    state_open: "abiertas",
    state_closed: "cerradas",
    state_all: "todas",
    since: "Desde",
    close: "Cerrar",
    note: "Nota",
    closed_by: "Cerrada por",
    no_alerts: "Ninguna alerta coincide.",
    note_too_long: "La nota tiene más de 2000 caracteres.",
    already_closed: "Esa alerta ya estaba cerrada.",
    forbidden: "Su rol no permite esta acción.",
    see_chart: "ver gráfico",
};

static EN: Texts = Texts {
    product: "Caudal",
    sign_in: "Sign in",
    sign_out: "Sign out",
    email: "Email",
    password: "Password",
    wrong_credentials: "The email or the password is wrong.",
    too_many_logins: "Too many sign-in attempts. Wait a few minutes and try again.",
    session_expired: "Your session ended: sign in again.",
    form_expired: "The form expired: send it again.",
    language: "Language",
    fleet: "Catchment points",
    fleet_lead: "Every site with its state, its latest data and its open alerts.",
    filter: "Filter",
    filter_placeholder: "site or name",
    sort: "Sort by",
    sort_site: "site",
    sort_last_seen: "last seen",
    sort_backlog: "backlog",
    apply: "Apply",
    site: "Site",
    state: "State",
    online: "online",
    offline: "offline",
    never_seen: "never seen",
    inactive: "inactive",
    last_seen: "Last seen",
    backlog: "Backlog",
    oldest_unsent: "Oldest unsent",
    devices: "Latest per device",
    open_alerts: "Open alerts",
    no_sites: "No site matches.",
    updated_live: "Updates by itself every 5 s.",
    ago: "ago",
    signed_in_as: "Signed in as",
    range: "Range",
    range_hour: "last hour",
    range_day: "last day",
    range_week: "last week",
    range_month: "last month",
    range_year: "last year",
    flow: "Flow (L/s)",
    flow_band: "min and max",
    volume: "Extracted volume (m³)",
    level: "Level (m)",
    events: "Events",
    completeness: "Completeness",
    missing: "Missing records",
    unexplained: "unexplained",
    time_gaps: "Time gaps",
    failed_polls: "Failed polls",
    gap_records: "Gap records",
    device: "Device",
    last_poll: "Last poll",
    result: "Result",
    agent: "Agent",
    version: "version",
    no_data: "No data in this range.",
    no_events: "No events in this range.",
    back_to_fleet: "All sites",
    kind: "Kind",
    message: "Detail",
    time: "Time (UTC)",
    not_found: "No such site.",
    total_in_range: "in the range",
    alerts: "Alerts",
    alerts_lead: "The fleet's alerts: close them with a note once they are dealt with.",
    alert_state: "State",
    state_open: "open",
    state_closed: "closed",
    state_all: "all",
    since: "Since",
    close: "Close",
    note: "Note",
    closed_by: "Closed by",
    no_alerts: "No alert matches.",
    note_too_long: "The note is longer than 2000 characters.",
    already_closed: "That alert was already closed.",
    forbidden: "Your role does not allow this.",
    see_chart: "see chart",
};

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn with(name: &'static str, value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_static(value));
        h
    }

    #[test]
    fn the_cookie_then_the_browser_then_spanish() {
        assert_eq!(Lang::of(&HeaderMap::new()), Lang::Es);
        assert_eq!(
            Lang::of(&with("accept-language", "en-GB,en;q=0.9")),
            Lang::En
        );
        assert_eq!(
            Lang::of(&with("accept-language", "de-DE,en;q=0.5,es;q=0.8")),
            Lang::Es
        );
        assert_eq!(Lang::of(&with("accept-language", "fr, de")), Lang::Es);
        assert_eq!(Lang::of(&with("cookie", "x=1; caudal_lang=en")), Lang::En);
    }
}
