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

/// A site of one Modbus TCP bus with one device, `device` being the lines of its
/// `[[bus.device]]` table and any `[bus.device.points.*]` below it.
fn one_device(device: &str) -> String {
    format!(
        "[site]\nid = \"s\"\n[uplink]\nbroker = \"mqtt://h:1883\"\n[[bus]]\nname = \"b\"\nkind = \"tcp\"\naddress = \"h:502\"\n[[bus.device]]\nid = \"fm1\"\nunit = 1\n{device}"
    )
}

fn resolve_text(text: &str) -> Result<caudal_agent::config::Site, Vec<ConfigError>> {
    let config = AgentConfig::from_source(SourceText::new("agent.toml", text.to_string()), [])
        .map_err(|e| vec![e])?;
    config.resolve(&ProfileSet::builtin().unwrap())
}

fn shown(errors: &[ConfigError]) -> String {
    errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn an_extra_in_bar_stays_in_bar() {
    let site = resolve_text(&one_device(
        "profile = \"generic\"\n[bus.device.points.pressure]\nfc = 3\naddress = 50\ntype = \"f32\"\nunit = \"bar\"\n",
    ))
    .unwrap();
    let points = &site.buses[0].devices[0].points;
    let pressure = points
        .iter()
        .find(|p| p.channel == Channel::Extra("pressure".into()))
        .unwrap();
    // 2.5 bar = 0x40200000: an extra is kept as read, not turned into metres of water.
    assert_eq!(pressure.decode(&[0x4020, 0x0000]), Ok(2.5));
    // A scaled extra keeps its scale: 1234 × 0.01 bar.
    let scaled = caudal_agent::register::Point {
        data_type: DataType::U16,
        scale: 0.01,
        ..pressure.clone()
    };
    assert_eq!(scaled.decode(&[1234]), Ok(12.34));
    // Only flow, total and level become canonical: a level in bar is a water column in m.
    let level = caudal_agent::register::Point {
        channel: Channel::Level,
        ..pressure.clone()
    };
    let column = level.decode(&[0x4020, 0x0000]).unwrap();
    assert!((column - 25.493).abs() < 1e-3, "{column}");
}

/// Promag 800 (battery): the profile note's settings are accepted and a register dump as the
/// meter answers two-register reads decodes to what its display shows.
#[test]
fn promag_800_reads_its_totalizer_in_halves() {
    let text = one_device("profile = \"endress-promag\"\nmax_regs_per_read = 2\n");
    let site = resolve_text(&text).unwrap_or_else(|e| panic!("{}", shown(&e)));
    let device = &site.buses[0].devices[0];
    assert_eq!(device.max_regs_per_read, 2);
    let total = device
        .points
        .iter()
        .position(|p| p.channel == Channel::Total)
        .unwrap();
    let flow = device
        .points
        .iter()
        .position(|p| p.channel == Channel::Flow)
        .unwrap();
    let blocks = caudal_agent::register::plan_reads(&device.points, 2);
    assert!(blocks.iter().all(|b| b.count <= 2), "{blocks:?}");
    // The meter's registers (word-swapped floats, CDAB): flow 2009 = 45.0 m3/h (0x42340000),
    // totalizer 1 SUM 2610 = 1234.5 m3 (0x449A5000), OVERFLOW 2612 = 2E7 (0x4B989680).
    let dump = |address: u16| -> Option<u16> {
        Some(match address {
            2008 => 0x0000,
            2009 => 0x4234,
            2609 => 0x5000,
            2610 => 0x449A,
            2611 => 0x9680,
            2612 => 0x4B98,
            2731 => 0,
            _ => return None,
        })
    };
    let replies: Vec<Option<Vec<u16>>> = blocks
        .iter()
        .map(|b| (0..b.count).map(|i| dump(b.address + i)).collect())
        .collect();
    let words = caudal_agent::register::assemble(device.points.len(), &blocks, &replies);
    let value = |i: usize| device.points[i].decode(words[i].as_ref().unwrap()).unwrap();
    // Display: totalizer 1 = 20 001 234.5 m3, volume flow 45 m3/h = 12.5 L/s.
    assert_eq!(value(total), 20_001_234.5);
    assert!((value(flow) - 12.5).abs() < 1e-9);
}

/// KELLER on an absolute (PAA) cell at 500 m, in brackish water: the air pressure of the
/// standard atmosphere at the site and the stated density make the water column.
#[test]
fn keller_level_subtracts_the_air_at_the_site_altitude_with_its_density() {
    let text = one_device(
        "profile = \"keller-level\"\n[bus.device.points.level]\naltitude_m = 500\nwater_density_kg_m3 = 1025\n",
    );
    let site = resolve_text(&text).unwrap_or_else(|e| panic!("{}", shown(&e)));
    assert!(site.warnings.is_empty(), "{:?}", site.warnings);
    let points = &site.buses[0].devices[0].points;
    let level = points.iter().find(|p| p.channel == Channel::Level).unwrap();
    let temperature = points
        .iter()
        .find(|p| p.channel == Channel::Extra("temperature".into()))
        .unwrap();
    // Register dump (big-endian floats): P1 at 0x0002 = 1.25 bar (0x3FA00000), TOB1 at 0x0008
    // = 16.5 degC (0x41840000).
    assert_eq!(level.decode_in_unit(&[0x3FA0, 0x0000]), Ok(1.25));
    let column = level.decode(&[0x3FA0, 0x0000]).unwrap();
    // Standard atmosphere at 500 m: 1.01325 × (1 − 2.25577e-5 × 500)^5.25588 = 0.95461 bar.
    let expected = (1.25 - 0.954_61) * 1e5 / (1025.0 * 9.806_65);
    assert!((column - expected).abs() < 1e-3, "{column} vs {expected}");
    assert_eq!(temperature.decode(&[0x4184, 0x0000]), Ok(16.5));

    // A measured barometric value instead; and the profile's default, a vented cell in fresh
    // water: P1 is the water alone.
    let text = one_device(
        "profile = \"keller-level\"\n[bus.device.points.level]\nbarometric_bar = 0.95\n",
    );
    let site = resolve_text(&text).unwrap_or_else(|e| panic!("{}", shown(&e)));
    let level = &site.buses[0].devices[0].points[0];
    let column = level.decode(&[0x3FA0, 0x0000]).unwrap();
    assert!((column - 0.30 * 1e5 / 9_806.65).abs() < 1e-4, "{column}");
    let site = resolve_text(&one_device("profile = \"keller-level\"\n")).unwrap();
    let level = &site.buses[0].devices[0].points[0];
    let column = level.decode(&[0x3FA0, 0x0000]).unwrap();
    assert!((column - 12.746_5).abs() < 1e-4, "{column}");
}

#[test]
fn keller_air_and_density_settings_are_checked_at_their_line() {
    let text = one_device(
        "profile = \"keller-level\"\n[bus.device.points.level]\naltitude_m = 9000\nbarometric_bar = 1.0\nwater_density_kg_m3 = 10\n[bus.device.points.temperature]\naltitude_m = 500\n",
    );
    let errors = resolve_text(&text).unwrap_err();
    let shown = shown(&errors);
    for want in [
        "agent.toml:14:1: bus[b].device[fm1].points.level.altitude_m: profile `keller-level`: point `level`: `altitude_m` = 9000 must be -500-6000 m",
        "agent.toml:15:1: bus[b].device[fm1].points.level.barometric_bar: profile `keller-level`: point `level`: `barometric_bar` and `altitude_m` exclude each other",
        "agent.toml:16:1: bus[b].device[fm1].points.level.water_density_kg_m3: profile `keller-level`: point `level`: `water_density_kg_m3` = 10 must be 900-1300 kg/m³",
        "agent.toml:18:1: bus[b].device[fm1].points.temperature.altitude_m: profile `keller-level`: point `temperature`: `altitude_m` only applies to a level read in a pressure unit",
    ] {
        assert!(
            shown.lines().any(|s| s.starts_with(want)),
            "missing {want:?} in\n{shown}"
        );
    }
    assert_eq!(errors.len(), 4, "{shown}");
}

/// AquaMaster 3: the u32 totaliser wraps at 2^32 counts, and the validator counts the one
/// count from 4294967295 to 0 as one count.
#[test]
fn aquamaster_total_wraps_at_two_to_the_32() {
    use caudal_agent::config::LimitsConfig;
    use caudal_agent::validation::{Sample, Validator};
    let site = resolve_text(&one_device(
        "profile = \"abb-aquamaster3\"\n[bus.device.points.total]\nunit = \"L\"\n",
    ))
    .unwrap();
    let device = &site.buses[0].devices[0];
    let total = device
        .points
        .iter()
        .find(|p| p.channel == Channel::Total)
        .unwrap();
    assert_eq!(total.rollover_at, Some(4_294_967_296.0));
    // Register dump (big-endian u32): the display's last litre before the wrap, then 1 L.
    assert_eq!(total.decode_in_unit(&[0xFFFF, 0xFFFF]), Ok(4_294_967_295.0));
    let top = total.decode(&[0xFFFF, 0xFFFF]).unwrap();
    let after = total.decode(&[0x0000, 0x0001]).unwrap();
    assert_eq!(after, 0.001);
    // The poller hands the validator the wrap in m³.
    let wrap = total.unit.to_canonical(total.rollover_at.unwrap());
    let mut val = Validator::new(device.id.clone(), LimitsConfig::default(), Some(wrap));
    let at = |secs: i64, v: f64| Sample {
        ts: chrono::DateTime::from_timestamp(1_790_000_000 + secs, 0).unwrap(),
        boottime_ms: Some(3_600_000 + u64::try_from(secs).unwrap() * 1000),
        values: vec![(Channel::Total, v)],
        missing: Vec::new(),
    };
    val.check(at(0, top));
    let v = val.check(at(60, after));
    let volume = v.volume_m3.unwrap();
    assert!(
        (volume - 0.002).abs() < 1e-9,
        "two litres, not one: {volume}"
    );
}

#[test]
fn guessed_units_are_warnings_naming_device_and_key() {
    let site = resolve_text(&one_device("profile = \"abb-aquamaster3\"\n")).unwrap();
    let warnings: Vec<String> = site.warnings.iter().map(|w| w.to_string()).collect();
    assert_eq!(warnings.len(), 3, "{warnings:#?}");
    assert!(
        warnings[1].starts_with(
            "agent.toml:12:1: bus[b].device[fm1].points.total.unit: warning: profile `abb-aquamaster3` assumes `m3` for point `total`"
        ),
        "{warnings:#?}"
    );
    // Stating the unit confirms it, even the same one; a disabled point needs none.
    let site = resolve_text(&one_device(
        "profile = \"abb-aquamaster3\"\n[bus.device.points.total]\nunit = \"m3\"\n[bus.device.points.total_reverse]\nenabled = false\n[bus.device.points.flow]\nunit = \"L/s\"\n",
    ))
    .unwrap();
    assert!(site.warnings.is_empty(), "{:?}", site.warnings);
    // Only a profile may mark a unit as assumed.
    let errors = resolve_text(&one_device(
        "profile = \"abb-aquamaster3\"\n[bus.device.points.total]\nunit_assumed = false\n",
    ))
    .unwrap_err();
    assert!(
        shown(&errors).contains("points.total.unit_assumed: profile `abb-aquamaster3`: point `total`: `unit_assumed` belongs in a profile"),
        "{}",
        shown(&errors)
    );
}
