//! Which real services a test run must have. The storage and broker variants of the suite run
//! against PostgreSQL (`CAUDAL_TEST_DATABASE_URL`) and Mosquitto (`CAUDAL_TEST_MQTT_URL`); a
//! developer's plain `cargo test` has neither, and the tests that need them skip. CI sets
//! `CAUDAL_TEST_REQUIRE_SERVICES` (comma-separated: `postgres`, `mqtt`) for its variants, so a
//! service URL that is missing or empty there fails the test instead of skipping it — a variant
//! that silently ran on SQLite and the embedded broker alone would prove nothing.
//!
//! Every test and rig reads the service URLs through [`database_url`] and [`mqtt_url`].

/// The variable naming the services a run requires.
pub const REQUIRE_VAR: &str = "CAUDAL_TEST_REQUIRE_SERVICES";

/// Whether `service` is in the comma-separated `list`.
pub fn listed(list: &str, service: &str) -> bool {
    list.split(',').any(|s| s.trim() == service)
}

/// Whether this run requires `service` (`postgres` or `mqtt`).
pub fn required(service: &str) -> bool {
    std::env::var(REQUIRE_VAR).is_ok_and(|l| listed(&l, service))
}

/// The non-empty value of `var`, or `None` (the test skips what needs it); panics when
/// `service` is required and `var` is missing or empty.
fn url(var: &str, service: &str) -> Option<String> {
    let v = std::env::var(var).ok().filter(|v| !v.is_empty());
    if v.is_none() && required(service) {
        panic!("{REQUIRE_VAR} requires {service}, but {var} is not set");
    }
    v
}

/// `CAUDAL_TEST_DATABASE_URL`, the PostgreSQL the storage variant runs on.
pub fn database_url() -> Option<String> {
    url("CAUDAL_TEST_DATABASE_URL", "postgres")
}

/// `CAUDAL_TEST_MQTT_URL`, the external broker (Mosquitto) the broker variant runs through.
pub fn mqtt_url() -> Option<String> {
    url("CAUDAL_TEST_MQTT_URL", "mqtt")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_are_a_comma_separated_list() {
        assert!(listed("postgres", "postgres"));
        assert!(listed("mqtt, postgres", "postgres"));
        assert!(!listed("postgresql", "postgres"));
        assert!(!listed("", "mqtt"));
    }
}
