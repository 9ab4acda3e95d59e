//! Configuration errors name the file, line and key, and `resolve` reports every problem.

use caudal_agent::config::{AgentConfig, ConfigError, Link, Parity, Problem, check_with_env};
use caudal_agent::profile::ProfileSet;
use std::path::PathBuf;
use std::time::Duration;

const HEAD: &str = r#"[site]
id = "s1"

[uplink]
broker = "mqtt://127.0.0.1:1883"
"#;

fn write(dir: &tempfile::TempDir, text: &str) -> PathBuf {
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn load(text: &str) -> (tempfile::TempDir, PathBuf, Result<AgentConfig, ConfigError>) {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, text);
    let r = AgentConfig::load_with_env(&path, []);
    (dir, path, r)
}

fn resolve(
    text: &str,
) -> (
    PathBuf,
    Result<caudal_agent::config::Site, Vec<ConfigError>>,
) {
    let (_dir, path, r) = load(text);
    let config = r.unwrap_or_else(|e| panic!("{e}"));
    (path, config.resolve(&ProfileSet::builtin().unwrap()))
}

fn file_error(r: Result<AgentConfig, ConfigError>) -> (usize, usize, String, String) {
    match r {
        Err(ConfigError::File { at, message }) => {
            (at.line.unwrap(), at.column.unwrap(), at.key, message)
        }
        other => panic!("expected a file error, got {other:?}"),
    }
}

#[test]
fn unknown_key_names_file_line_and_key() {
    let text = format!(
        "{HEAD}\n[[bus]]\nname = \"rs485\"\nkind = \"rtu\"\nport = \"/dev/ttyS0\"\n\n[[bus.device]]\nid = \"fm1\"\nunit = 1\nprofile = \"generic\"\nperod_s = 5\n"
    );
    let (_d, path, r) = load(&text);
    let e = r.unwrap_err();
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!(
            "{}:16:1: bus[rs485].device[fm1].perod_s: unknown field `perod_s`, expected one of",
            path.display()
        )),
        "{shown}"
    );
    let (line, col, key, _) = file_error(Err(e));
    assert_eq!(
        (line, col, key.as_str()),
        (16, 1, "bus[rs485].device[fm1].perod_s")
    );
}

#[test]
fn unknown_top_level_section_is_an_error() {
    let (_d, _p, r) = load(&format!("{HEAD}\n[poller]\nperiod_s = 5\n"));
    let (line, _, key, message) = file_error(r);
    assert_eq!((line, key.as_str()), (7, "poller"));
    assert!(message.contains("unknown field `poller`"), "{message}");
}

#[test]
fn wrong_type_names_line_column_and_key() {
    let text = format!(
        "{HEAD}\n[[bus]]\nname = \"b\"\nkind = \"tcp\"\naddress = \"127.0.0.1:502\"\n\n[[bus.device]]\nid = \"fm1\"\nunit = \"one\"\nprofile = \"generic\"\n"
    );
    let (_d, _p, r) = load(&text);
    let (line, col, key, message) = file_error(r);
    assert_eq!(
        (line, col, key.as_str()),
        (14, 8, "bus[b].device[fm1].unit")
    );
    assert!(message.contains("expected u8"), "{message}");
}

#[test]
fn wrong_enum_value_and_out_of_range_integer() {
    let (_d, _p, r) = load(&format!("{HEAD}\n[log]\nformat = \"xml\"\n"));
    let (line, _, key, message) = file_error(r);
    assert_eq!((line, key.as_str()), (8, "log.format"));
    assert!(
        message.contains("plain") && message.contains("json"),
        "{message}"
    );

    let text = format!(
        "{HEAD}\n[[bus]]\nname = \"b\"\nkind = \"tcp\"\naddress = \"h:502\"\n[[bus.device]]\nid = \"fm1\"\nunit = 300\nprofile = \"generic\"\n"
    );
    let (_d, _p, r) = load(&text);
    let (line, _, key, _) = file_error(r);
    assert_eq!((line, key.as_str()), (13, "bus[b].device[fm1].unit"));
}

#[test]
fn float_where_an_integer_belongs_is_not_rounded() {
    let (_d, _p, r) = load(&format!("{HEAD}\n[outbox]\ndisk_budget_mb = 25.5\n"));
    let (line, _, key, _) = file_error(r);
    assert_eq!((line, key.as_str()), (8, "outbox.disk_budget_mb"));
}

#[test]
fn missing_required_key_names_its_table() {
    let text = format!(
        "{HEAD}\n[[bus]]\nname = \"b\"\nkind = \"tcp\"\naddress = \"h:502\"\n\n[[bus.device]]\nid = \"fm1\"\nunit = 1\n"
    );
    let (_d, _p, r) = load(&text);
    let (line, col, key, message) = file_error(r);
    assert_eq!((line, col), (12, 1), "points at the [[bus.device]] header");
    assert_eq!(key, "bus[b].device[fm1].profile");
    assert_eq!(message, "missing field `profile`");

    let (_d, _p, r) = load("[uplink]\nbroker = \"mqtt://h:1\"\n");
    let (_, _, key, _) = file_error(r);
    assert_eq!(key, "site");
}

#[test]
fn syntax_error_names_the_line() {
    let (_d, _path, r) = load(&format!("{HEAD}\n[metrics\nlisten = \"\"\n"));
    let (line, _, _, _) = file_error(r);
    assert_eq!(line, 7);
}

#[test]
fn unreadable_file_is_a_read_error() {
    let r = AgentConfig::load_with_env("/nonexistent/caudal/agent.toml", []);
    assert!(matches!(r, Err(ConfigError::Read { .. })), "{r:?}");
}

/// One file with many problems: every one is reported, each with its line and key.
#[test]
fn resolve_collects_every_problem() {
    let text = format!(
        r#"{HEAD}
[[bus]]
name = "serial"
kind = "rtu"

[[bus.device]]
id = "fm1"
unit = 0
profile = "siemens-mag800"

[[bus.device]]
id = "fm2"
unit = 3
profile = "generic"
period_s = 0

[[bus.device]]
id = "fm3"
unit = 3
profile = "tuf2000"

[bus.device.points.flow]
unit = "m3"

[[bus]]
name = "net"
kind = "tcp"

[[bus.device]]
id = "fm2"
unit = 1
profile = "generic"
"#
    );
    let (path, r) = resolve(&text);
    let errors = r.unwrap_err();
    let shown: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    let f = path.display().to_string();
    let expect = [
        format!("{f}:7:1: bus[serial].port: a rtu bus needs `port`"),
        format!("{f}:13:1: bus[serial].device[fm1].unit: unit 0: 0 is the broadcast address"),
        format!(
            "{f}:14:1: bus[serial].device[fm1].profile: unknown profile `siemens-mag800` (did you mean `siemens-mag8000`?); known profiles: abb-aquamaster3,"
        ),
        format!("{f}:20:1: bus[serial].device[fm2].period_s: period_s = 0 is out of range"),
        format!(
            "{f}:24:1: bus[serial].device[fm3].unit: unit 3 is already used by device `fm2` on this bus"
        ),
        format!(
            "{f}:28:1: bus[serial].device[fm3].points.flow.unit: profile `tuf2000`: point `flow`: unit `m3` does not fit the channel"
        ),
        format!("{f}:30:1: bus[net].address: a tcp bus needs `address`"),
        format!(
            "{f}:35:1: bus[net].device[fm2].id: device id `fm2` is already used on bus `serial`"
        ),
    ];
    for want in &expect {
        assert!(
            shown.iter().any(|s| s.starts_with(want.as_str())),
            "missing {want:?} in\n{}",
            shown.join("\n")
        );
    }
    assert_eq!(shown.len(), expect.len(), "{}", shown.join("\n"));
}

#[test]
fn check_report_lists_errors_one_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        &dir,
        &format!(
            "{HEAD}\n[[bus]]\nname = \"n\"\nkind = \"tcp\"\naddress = \"nohost\"\nport = \"/dev/ttyS0\"\n"
        ),
    );
    let report = check_with_env(&path, []);
    assert!(!report.is_ok());
    let text = report.to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(
        lines[0].contains(":11:1: bus[n].port: `port` does not apply to a tcp bus"),
        "{text}"
    );
    assert!(
        lines[1].contains(":10:1: bus[n].address: address `nohost`: expected host:port"),
        "{text}"
    );
    assert!(lines[2].ends_with("2 problems"), "{text}");
}

#[test]
fn serial_settings_come_from_the_bus_then_the_profiles_then_defaults() {
    let bus = |extra: &str, profiles: &[&str]| {
        let mut t = format!(
            "{HEAD}\n[[bus]]\nname = \"b\"\nkind = \"rtu\"\nport = \"/dev/ttyS0\"\n{extra}\n"
        );
        for (i, p) in profiles.iter().enumerate() {
            t.push_str(&format!(
                "[[bus.device]]\nid = \"d{i}\"\nunit = {}\nprofile = \"{p}\"\n",
                i + 1
            ));
        }
        t
    };
    let link = |text: &str| {
        let (_p, r) = resolve(text);
        let site = r.unwrap_or_else(|e| panic!("{e:?}"));
        site.buses[0].link.clone()
    };
    assert_eq!(
        link(&bus("", &["siemens-mag6000", "generic"])),
        Link::Rtu {
            port: "/dev/ttyS0".into(),
            baud: 19200,
            parity: Parity::Even,
            data_bits: 8,
            stop_bits: 1
        }
    );
    assert_eq!(
        link(&bus("", &["generic"])),
        Link::Rtu {
            port: "/dev/ttyS0".into(),
            baud: 9600,
            parity: Parity::None,
            data_bits: 8,
            stop_bits: 1
        }
    );
    let Link::Rtu { baud, parity, .. } = link(&bus(
        "baud = 38400\nparity = \"none\"",
        &["siemens-mag6000", "tuf2000"],
    )) else {
        panic!("not rtu")
    };
    assert_eq!((baud, parity), (38400, Parity::None));
    let (_p, r) = resolve(&bus("", &["siemens-mag6000", "tuf2000"]));
    let errors = r.unwrap_err();
    assert_eq!(errors.len(), 2, "baud and parity: {errors:?}");
    assert!(
        errors
            .iter()
            .all(|e| matches!(e.problem(), Some(Problem::ProfilesDisagree { .. })))
    );
    assert!(errors[0].to_string().contains(
        "the profiles on this bus disagree on baud: `siemens-mag6000` says 19200, `tuf2000` says 9600; set baud on the bus"
    ), "{}", errors[0]);
}

#[test]
fn timing_comes_from_the_device_then_the_profile_then_defaults() {
    let text = format!(
        r#"{HEAD}
[[bus]]
name = "b"
kind = "rtu_over_tcp"
address = "10.0.0.7:4001"

[[bus.device]]
id = "own"
unit = 1
profile = "abb-aquamaster3"
timeout_ms = 3000
retries = 4
max_regs_per_read = 4
period_s = 300

[[bus.device]]
id = "profiled"
unit = 2
profile = "abb-aquamaster3"

[[bus.device]]
id = "defaults"
unit = 3
profile = "generic"
"#
    );
    let (_p, r) = resolve(&text);
    let site = r.unwrap_or_else(|e| panic!("{e:?}"));
    let bus = &site.buses[0];
    assert_eq!(
        bus.inter_frame_gap,
        Duration::from_millis(100),
        "largest profile gap"
    );
    let d = &bus.devices;
    assert_eq!(
        (
            d[0].timeout,
            d[0].retries,
            d[0].max_regs_per_read,
            d[0].period
        ),
        (Duration::from_millis(3000), 4, 4, Duration::from_secs(300))
    );
    assert_eq!(
        (
            d[1].timeout,
            d[1].retries,
            d[1].max_regs_per_read,
            d[1].period
        ),
        (Duration::from_millis(2000), 2, 8, Duration::from_secs(60))
    );
    assert_eq!(
        (d[2].timeout, d[2].retries, d[2].max_regs_per_read),
        (Duration::from_millis(1000), 1, 125)
    );
    assert_eq!(site.outbox_path, PathBuf::from("/var/lib/caudal/outbox.db"));
}

#[test]
fn a_block_smaller_than_a_point_is_refused() {
    let text = format!(
        "{HEAD}\n[[bus]]\nname = \"b\"\nkind = \"tcp\"\naddress = \"h:502\"\n[[bus.device]]\nid = \"d\"\nunit = 1\nprofile = \"siemens-mag6000\"\nmax_regs_per_read = 2\n"
    );
    let (path, r) = resolve(&text);
    let errors = r.unwrap_err();
    let shown: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    assert!(
        shown.iter().any(|s| s.starts_with(&format!(
            "{}:15:1: bus[b].device[d].max_regs_per_read: point `total` needs 4 registers",
            path.display()
        ))),
        "{shown:?}"
    );
}

#[test]
fn a_client_id_that_brokers_treat_specially_is_refused_with_its_line() {
    let text = r#"[site]
id = "s1"

[uplink]
broker = "mqtt://127.0.0.1:1883"
client_id = "pozo/1"

[[bus]]
name = "net"
kind = "tcp"
address = "127.0.0.1:502"

[[bus.device]]
id = "fm1"
unit = 1
profile = "generic"
"#;
    let (path, r) = resolve(text);
    let shown: Vec<String> = r.unwrap_err().iter().map(|e| e.to_string()).collect();
    let f = path.display().to_string();
    assert!(
        shown.iter().any(|s| s.starts_with(&format!("{f}:6:"))
            && s.contains("uplink.client_id")
            && s.contains("contains '/'")),
        "{shown:?}"
    );
}

#[test]
fn a_cloud_public_key_that_is_not_a_key_is_refused_with_its_line() {
    let text = r#"[site]
id = "s1"

[uplink]
broker = "mqtt://127.0.0.1:1883"
cloud_public_key = "not-a-key"

[[bus]]
name = "net"
kind = "tcp"
address = "127.0.0.1:502"

[[bus.device]]
id = "fm1"
unit = 1
profile = "generic"
"#;
    let (path, r) = resolve(text);
    let shown: Vec<String> = r.unwrap_err().iter().map(|e| e.to_string()).collect();
    let f = path.display().to_string();
    assert!(
        shown.iter().any(|s| s.starts_with(&format!("{f}:6:"))
            && s.contains("uplink.cloud_public_key")
            && s.contains("not a base64 Ed25519 public key")),
        "{shown:?}"
    );
}
