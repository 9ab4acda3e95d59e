//! Profiles as devices use them: overrides, added and disabled points, profile directories.

use caudal_agent::config::{AgentConfig, ConfigError, SourceText};
use caudal_agent::profile::{ProfileError, ProfileOrigin, ProfileSet};
use caudal_agent::register::{ByteOrder, Channel, DataType, Fc};
use caudal_common::units::Unit;
use std::collections::BTreeMap;

fn overrides(text: &str) -> BTreeMap<String, toml::Table> {
    toml::from_str(text).unwrap()
}

#[test]
fn overrides_change_fields_add_points_and_disable_points() {
    let set = ProfileSet::builtin().unwrap();
    let generic = set.get("generic").unwrap();
    let points = generic
        .resolve(&overrides(
            r#"
            [flow]
            unit = "m3/h"
            scale = 0.1
            order = "CDAB"
            [level]
            enabled = false
            [pump_hours]
            fc = 4
            address = 100
            type = "u32"
            rollover_at = 4294967295.0
            "#,
        ))
        .unwrap();
    let channels: Vec<&Channel> = points.iter().map(|p| &p.channel).collect();
    assert_eq!(
        channels,
        [
            &Channel::Flow,
            &Channel::Total,
            &Channel::Extra("pump_hours".into())
        ]
    );
    let flow = &points[0];
    assert_eq!(
        (
            flow.fc,
            flow.address,
            flow.data_type,
            flow.order,
            flow.unit,
            flow.scale
        ),
        (
            Fc::Holding,
            0,
            DataType::F32,
            ByteOrder::CDAB,
            Unit::CubicMetrePerHour,
            0.1
        )
    );
    let extra = &points[2];
    assert_eq!(
        (
            extra.fc,
            extra.address,
            extra.data_type,
            extra.unit,
            extra.rollover_at
        ),
        (
            Fc::Input,
            100,
            DataType::U32,
            Unit::Dimensionless,
            Some(4294967295.0)
        )
    );
    // The profile itself is unchanged.
    assert_eq!(generic.resolve(&BTreeMap::new()).unwrap().len(), 3);
}

#[test]
fn composite_profiles_resolve_with_their_fields() {
    let set = ProfileSet::builtin().unwrap();
    let total = |id: &str| {
        set.get(id)
            .unwrap()
            .resolve(&BTreeMap::new())
            .unwrap()
            .into_iter()
            .find(|p| p.channel == Channel::Total)
            .unwrap()
    };
    let mag8000 = total("siemens-mag8000");
    assert_eq!(
        (mag8000.address, mag8000.data_type),
        (3017, DataType::I32Fraction)
    );
    assert_eq!(mag8000.fraction_scale, 1e-9);
    let promag = total("endress-promag");
    assert_eq!(
        (promag.address, promag.data_type, promag.order),
        (2609, DataType::F32Overflow, ByteOrder::CDAB)
    );
    let badger = total("badger-m2000");
    assert_eq!(badger.overflow_address, Some(231));
    let tuf = total("tuf2000");
    assert_eq!(
        (tuf.address, tuf.data_type, tuf.order),
        (8, DataType::I32F32Fraction, ByteOrder::CDAB)
    );
    let krohne = total("krohne-ifc");
    assert_eq!(
        (krohne.fc, krohne.address, krohne.data_type),
        (Fc::Input, 20, DataType::F64)
    );
    let keller = set
        .get("keller-level")
        .unwrap()
        .resolve(&BTreeMap::new())
        .unwrap();
    assert_eq!(
        (keller[0].channel.clone(), keller[0].unit),
        (Channel::Level, Unit::Bar)
    );
}

#[test]
fn a_new_point_needs_fc_address_and_type() {
    let set = ProfileSet::builtin().unwrap();
    let errors = set
        .get("generic")
        .unwrap()
        .resolve(&overrides("[pressure]\nunit = \"bar\"\n"))
        .unwrap_err();
    let fields: Vec<_> = errors.iter().filter_map(|e| e.field()).collect();
    assert_eq!(fields, ["fc", "address", "type"]);
}

#[test]
fn override_errors_point_at_the_override_line() {
    let text = r#"[site]
id = "s"
[uplink]
broker = "mqtt://h:1883"
[[bus]]
name = "b"
kind = "tcp"
address = "h:502"
[[bus.device]]
id = "fm1"
unit = 1
profile = "generic"
[bus.device.points.total]
type = "f32_overflow"
adress = 7
[bus.device.points.level]
address = 65535
"#;
    let config = AgentConfig::from_source(SourceText::new("agent.toml", text), []).unwrap();
    let errors = config.resolve(&ProfileSet::builtin().unwrap()).unwrap_err();
    let shown: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    for want in [
        "agent.toml:15:1: bus[b].device[fm1].points.total.adress: profile `generic`: point `total`: unknown field `adress`",
        "agent.toml:13:20: bus[b].device[fm1].points.total.overflow_factor: profile `generic`: point `total`: `overflow_factor` is missing",
        "agent.toml:17:1: bus[b].device[fm1].points.level.address: profile `generic`: point `level`: address 65535 + 2 registers runs past 65535",
    ] {
        assert!(
            shown.iter().any(|s| s.starts_with(want)),
            "missing {want:?} in\n{}",
            shown.join("\n")
        );
    }
    assert_eq!(shown.len(), 3, "{}", shown.join("\n"));
}

#[test]
fn a_directory_profile_shadows_a_built_in_and_adds_new_ones() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("mine.toml"),
        r#"id = "tuf2000"
name = "TUF-2000 rewired through a gateway"
confidence = "C"
sources = ["site survey"]
[points.flow]
fc = 4
address = 100
type = "f32"
unit = "L/s"
"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("pulse.toml"),
        r#"id = "pulse-counter"
name = "Pulse counter"
confidence = "C"
sources = ["site"]
[points.total]
fc = 3
address = 0
type = "u32"
unit = "L"
scale = 10.0
"#,
    )
    .unwrap();
    let set = ProfileSet::load(&[dir.path().to_path_buf()]).unwrap();
    let tuf = set.get("tuf2000").unwrap();
    assert_eq!(tuf.points["flow"].address, Some(100));
    assert!(matches!(
        set.origin("tuf2000"),
        Some(ProfileOrigin::File(_))
    ));
    assert!(set.get("pulse-counter").is_ok());
    assert!(matches!(
        set.origin("siemens-mag6000"),
        Some(ProfileOrigin::BuiltIn(_))
    ));
}

#[test]
fn duplicate_ids_in_one_directory_name_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let body = "name = \"x\"\nconfidence = \"C\"\nsources = []\n[points.flow]\nfc = 3\naddress = 0\ntype = \"f32\"\nunit = \"L/s\"\n";
    std::fs::write(dir.path().join("a.toml"), format!("id = \"dup\"\n{body}")).unwrap();
    std::fs::write(dir.path().join("b.toml"), format!("id = \"dup\"\n{body}")).unwrap();
    let errors = ProfileSet::load(&[dir.path().to_path_buf()]).unwrap_err();
    assert_eq!(errors.len(), 1, "{errors:?}");
    let shown = errors[0].to_string();
    assert!(matches!(errors[0], ProfileError::Duplicate { .. }));
    assert!(
        shown.contains("a.toml") && shown.contains("b.toml"),
        "{shown}"
    );
}

#[test]
fn profile_file_errors_carry_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.toml"),
        "id = \"bad\"\nname = \"b\"\nconfidence = \"C\"\nsources = []\n\n[points.flow]\nfc = 3\naddress = 0\ntype = \"f32\"\nunit = \"m3\"\n\n[points.level]\nfc = 3\naddress = 2\ntype = \"f32\"\nunits = \"m\"\n",
    )
    .unwrap();
    let errors = ProfileSet::load(&[dir.path().to_path_buf()]).unwrap_err();
    let shown = errors[0].to_string();
    assert!(
        shown.contains("bad.toml:16:1: points.level.units: unknown field `units`"),
        "{shown}"
    );

    std::fs::write(
        dir.path().join("bad.toml"),
        "id = \"bad\"\nname = \"b\"\nconfidence = \"C\"\nsources = []\n\n[points.flow]\nfc = 3\naddress = 0\ntype = \"f32\"\nunit = \"m3\"\n",
    )
    .unwrap();
    let errors = ProfileSet::load(&[dir.path().to_path_buf()]).unwrap_err();
    let shown = errors[0].to_string();
    assert!(
        shown.contains("bad.toml:10:1: points.flow.unit: profile `bad`: point `flow`: unit `m3` does not fit the channel; it needs a flow unit"),
        "{shown}"
    );
}

#[test]
fn a_missing_profile_directory_is_an_error() {
    let text = "[site]\nid = \"s\"\n[uplink]\nbroker = \"mqtt://h:1883\"\n[profiles]\ndirs = [\"no-such-dir\"]\n";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, text).unwrap();
    let config = AgentConfig::load_with_env(&path, []).unwrap();
    assert_eq!(config.profile_dirs(), [dir.path().join("no-such-dir")]);
    let errors = config.load_profiles().unwrap_err();
    assert!(matches!(
        &errors[..],
        [ConfigError::Profile(e)] if matches!(&**e, ProfileError::Io { path, .. } if path.ends_with("no-such-dir"))
    ));
}
