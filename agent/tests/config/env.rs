//! `CAUDAL_*` environment overrides, passed as an explicit map so tests do not share the
//! process environment.

use caudal_agent::config::{AgentConfig, ConfigError, SourceText};

const FILE: &str = r#"[site]
id = "from-file"

[uplink]
broker = "mqtt://127.0.0.1:1883"
password = "file-secret"
"#;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn load(text: &str, pairs: &[(&str, &str)]) -> Result<AgentConfig, ConfigError> {
    AgentConfig::from_source(SourceText::new("agent.toml", text), env(pairs))
}

#[test]
fn variables_override_file_values() {
    let c = load(
        FILE,
        &[
            ("CAUDAL_UPLINK__PASSWORD", "env-secret"),
            ("CAUDAL_SITE__ID", "from-env"),
            ("CAUDAL_OUTBOX__DISK_BUDGET_MB", "64"),
            ("CAUDAL_CLOCK__REQUIRE_NTP_SYNC", "false"),
            ("CAUDAL_LOG__FORMAT", "json"),
        ],
    )
    .unwrap();
    assert_eq!(c.site.id.as_str(), "from-env");
    assert_eq!(c.uplink.password.as_ref().unwrap().expose(), "env-secret");
    assert_eq!(c.outbox.disk_budget_mb, 64);
    assert!(!c.clock.require_ntp_sync);
    assert_eq!(c.log.format, caudal_agent::config::LogFormat::Json);
    assert!(
        !format!("{c:?}").contains("env-secret"),
        "secrets do not print"
    );
}

#[test]
fn numeric_looking_strings_stay_strings() {
    let c = load(
        FILE,
        &[
            ("CAUDAL_UPLINK__PASSWORD", "007"),
            ("CAUDAL_SITE__ID", "0042"),
        ],
    )
    .unwrap();
    assert_eq!(c.uplink.password.unwrap().expose(), "007");
    assert_eq!(c.site.id.as_str(), "0042");
}

#[test]
fn unrelated_and_single_level_variables_are_ignored() {
    let c = load(
        FILE,
        &[
            ("CAUDAL_CONFIG", "/etc/caudal/agent.toml"),
            ("CAUDAL_LOG", "debug"),
            ("PATH", "/usr/bin"),
            ("caudal_uplink__password", "lowercase-ignored"),
            ("CAUDAL_UPLINK__USERNAME", ""),
        ],
    )
    .unwrap();
    assert_eq!(c.uplink.password.unwrap().expose(), "file-secret");
    assert_eq!(c.uplink.username, None, "empty counts as unset");
}

#[test]
fn a_required_key_may_come_from_the_environment_only() {
    let text = "[uplink]\nbroker = \"mqtt://127.0.0.1:1883\"\n[site]\n";
    let c = load(text, &[("CAUDAL_SITE__ID", "env-only")]).unwrap();
    assert_eq!(c.site.id.as_str(), "env-only");
    let e = load(text, &[]).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("agent.toml:3:1: site.id: missing field `id`"),
        "{e}"
    );
}

#[test]
fn a_bad_value_names_the_variable() {
    let e = load(
        FILE,
        &[
            ("CAUDAL_UPLINK__PASSWORD", "fine"),
            ("CAUDAL_OUTBOX__DISK_BUDGET_MB", "lots"),
        ],
    )
    .unwrap_err();
    match &e {
        ConfigError::Env { var, message } => {
            assert_eq!(var, "CAUDAL_OUTBOX__DISK_BUDGET_MB");
            assert!(message.contains("lots"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        e.to_string()
            .starts_with("environment variable CAUDAL_OUTBOX__DISK_BUDGET_MB: ")
    );
}

#[test]
fn an_unknown_key_names_the_variable() {
    let e = load(FILE, &[("CAUDAL_UPLINK__PASWORD", "x")]).unwrap_err();
    match e {
        ConfigError::Env { var, message } => {
            assert_eq!(var, "CAUDAL_UPLINK__PASWORD");
            assert!(message.contains("unknown field `pasword`"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_bad_id_from_the_environment_is_refused() {
    let e = load(FILE, &[("CAUDAL_SITE__ID", "a/b")]).unwrap_err();
    assert!(
        matches!(&e, ConfigError::Env { var, .. } if var == "CAUDAL_SITE__ID"),
        "{e:?}"
    );
}

#[test]
fn file_errors_win_over_environment_ones() {
    let text = format!("{FILE}\n[outbox]\ndisk_budget_mb = \"big\"\n");
    let e = load(&text, &[("CAUDAL_UPLINK__PASSWORD", "x")]).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("agent.toml:9:18: outbox.disk_budget_mb: "),
        "{e}"
    );
}
