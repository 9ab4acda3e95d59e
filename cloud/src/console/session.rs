//! The console's session and form protection.
//!
//! **Session**: signing in sets `caudal_session`, the same signed token the API hands out,
//! in a cookie that scripts cannot read (`HttpOnly`), that the browser sends only to this site's
//! own pages (`SameSite=Strict`), and only over HTTPS (`Secure`) unless the request came over
//! plain HTTP to a server configured for it (see [`Console::secure`]). Every page checks it
//! through [`crate::users::session::account_of`], exactly as the API checks a bearer token, so
//! a deactivated account or a new password ends a console session at the next page.
//!
//! **CSRF**: every form carries the value of the `caudal_csrf` cookie in a hidden field, and
//! every POST is refused unless the two are equal (double submit). Another site can make the
//! browser send the cookie, never read it, so it cannot forge the field; `SameSite=Strict` on
//! the session is a second line.

use super::Console;
use axum::http::{HeaderMap, HeaderValue, Uri, header};
use axum::response::{IntoResponse, Redirect, Response};
use subtle::ConstantTimeEq;

pub const SESSION_COOKIE: &str = "caudal_session";
pub const CSRF_COOKIE: &str = "caudal_csrf";
pub const LANG_COOKIE: &str = "caudal_lang";

/// The value of cookie `name` in the request, if sent.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// A fresh CSRF token: 32 random bytes, hex.
pub fn new_csrf() -> String {
    let mut b = [0u8; 32];
    argon2::password_hash::rand_core::RngCore::fill_bytes(
        &mut argon2::password_hash::rand_core::OsRng,
        &mut b,
    );
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The request's CSRF token and, when it had none (or a malformed one), the `Set-Cookie` that
/// gives it the new one.
pub fn csrf(console: &Console, headers: &HeaderMap) -> (String, Option<HeaderValue>) {
    match cookie(headers, CSRF_COOKIE) {
        Some(t) if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) => (t, None),
        _ => {
            let t = new_csrf();
            let set = set_cookie(console, headers, CSRF_COOKIE, &t, None);
            (t, set)
        }
    }
}

/// Whether a form's `field` matches the request's CSRF cookie.
pub fn csrf_ok(headers: &HeaderMap, field: &str) -> bool {
    match cookie(headers, CSRF_COOKIE) {
        Some(c) if !c.is_empty() => c.as_bytes().ct_eq(field.as_bytes()).into(),
        _ => false,
    }
}

/// A `Set-Cookie` value for `name=value` (a session cookie when `max_age_s` is `None`).
pub fn set_cookie(
    console: &Console,
    headers: &HeaderMap,
    name: &str,
    value: &str,
    max_age_s: Option<i64>,
) -> Option<HeaderValue> {
    let mut c = format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict");
    if let Some(age) = max_age_s {
        c.push_str(&format!("; Max-Age={age}"));
    }
    if console.secure(headers) {
        c.push_str("; Secure");
    }
    HeaderValue::from_str(&c).ok()
}

/// Where to go back to after signing in: a path of this site only (never another host).
pub fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n.to_string(),
        _ => "/".to_string(),
    }
}

/// Sends a request without a valid session to the login page, to come back to `uri` after.
/// An htmx request (a live update) gets `HX-Redirect`, so the whole page goes, not a fragment.
pub fn to_login(headers: &HeaderMap, uri: &Uri) -> Response {
    let back = uri
        .path_and_query()
        .map_or("/".to_string(), |p| p.as_str().to_string());
    let target = format!("/login?expired=1&next={}", url_escape(&back));
    if headers.contains_key("hx-request") {
        let mut r = axum::http::StatusCode::UNAUTHORIZED.into_response();
        if let Ok(v) = HeaderValue::from_str(&target) {
            r.headers_mut().insert("hx-redirect", v);
        }
        return r;
    }
    Redirect::to(&target).into_response()
}

/// Percent-encodes everything but unreserved characters and `/`.
pub fn url_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_by_exact_name() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("caudal_session_x=1; caudal_session=abc; other=2"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE).as_deref(), Some("abc"));
        assert_eq!(cookie(&h, "missing"), None);
    }

    #[test]
    fn next_stays_on_this_site() {
        assert_eq!(safe_next(Some("/sites/a?x=1")), "/sites/a?x=1");
        for bad in ["https://evil.example/", "//evil.example", "/\\evil", "evil"] {
            assert_eq!(safe_next(Some(bad)), "/", "{bad}");
        }
        assert_eq!(safe_next(None), "/");
    }

    #[test]
    fn csrf_needs_the_cookie_and_the_same_field() {
        let mut h = HeaderMap::new();
        assert!(!csrf_ok(&h, ""));
        h.insert(header::COOKIE, HeaderValue::from_static("caudal_csrf=abcd"));
        assert!(csrf_ok(&h, "abcd"));
        assert!(!csrf_ok(&h, "abce"));
        assert!(!csrf_ok(&h, ""));
    }
}
