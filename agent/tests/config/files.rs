//! Every file under `config/` parses and resolves: the profiles, the example and the demo.

use caudal_agent::config::AgentConfig;
use caudal_agent::config::SourceText;
use caudal_agent::profile::{BUILTIN, Profile, ProfileOrigin, ProfileSet};
use caudal_agent::register::Channel;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config")
}

fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_profile_file_parses_resolves_and_is_built_in() {
    let files = toml_files(&config_dir().join("profiles"));
    assert!(files.len() >= 12, "{files:?}");
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap();
        let profile = Profile::parse(&SourceText::new(path.clone(), text.clone()))
            .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
        let file_name = path.file_name().unwrap().to_str().unwrap();
        assert_eq!(format!("{}.toml", profile.id), file_name);
        assert!(
            BUILTIN.iter().any(|(f, t)| *f == file_name && *t == text),
            "{file_name} is not in profile::BUILTIN"
        );
        let points = profile
            .resolve(&BTreeMap::new())
            .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
        assert!(
            points
                .iter()
                .any(|p| matches!(p.channel, Channel::Flow | Channel::Level)),
            "{} has neither flow nor level",
            profile.id
        );
        assert!(
            !profile.sources.is_empty(),
            "{} names no source",
            profile.id
        );
    }
    assert_eq!(BUILTIN.len(), files.len(), "a built-in has no file");
}

/// Each vendor point carries the vendor's own register reference next to it.
#[test]
fn every_vendor_point_has_a_doc_reference_comment() {
    for path in toml_files(&config_dir().join("profiles")) {
        if path.ends_with("generic.toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if line.starts_with("[points.") {
                assert!(
                    lines.get(i + 1).is_some_and(|l| l.starts_with('#')),
                    "{}:{}: {line} has no doc-reference comment",
                    path.display(),
                    i + 1
                );
            }
        }
    }
}

#[test]
fn profile_directory_loads_as_files() {
    let dir = config_dir().join("profiles");
    let set = ProfileSet::load(&[dir]).unwrap();
    assert_eq!(set.len(), BUILTIN.len());
    assert!(matches!(
        set.origin("tuf2000"),
        Some(ProfileOrigin::File(p)) if p.ends_with("tuf2000.toml")
    ));
}

#[test]
fn every_agent_config_file_loads_and_resolves() {
    // `config/` also holds the cloud's example (`cloud*.toml`), parsed by the cloud's tests.
    let files: Vec<PathBuf> = toml_files(&config_dir())
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("agent"))
        })
        .collect();
    let others: Vec<_> = toml_files(&config_dir())
        .into_iter()
        .filter(|p| !files.contains(p))
        .filter(|p| {
            !p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("cloud"))
        })
        .collect();
    assert!(others.is_empty(), "config files nobody parses: {others:?}");
    let names: Vec<_> = files.iter().map(|p| p.file_name().unwrap()).collect();
    assert!(names.contains(&"agent.example.toml".as_ref()), "{names:?}");
    assert!(names.contains(&"agent.demo.toml".as_ref()), "{names:?}");
    for path in &files {
        let config = AgentConfig::load_with_env(path, []).unwrap_or_else(|e| panic!("{e}"));
        let profiles = config
            .load_profiles()
            .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
        let site = config.resolve(&profiles).unwrap_or_else(|errors| {
            panic!(
                "{}",
                errors
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
        assert!(!site.buses.is_empty(), "{}", path.display());
        for bus in &site.buses {
            assert!(
                !bus.devices.is_empty(),
                "{}: bus {}",
                path.display(),
                bus.name
            );
        }
    }
}

#[test]
fn check_report_summarises_the_example() {
    let report = caudal_agent::config::check_with_env(config_dir().join("agent.example.toml"), []);
    let text = report.to_string();
    assert!(report.is_ok(), "{text}");
    assert!(
        text.contains("OK: site pozo-norte-1, 2 buses, 3 devices"),
        "{text}"
    );
    assert!(text.contains("rtu /dev/ttyUSB0 19200 8E1"), "{text}");
    assert!(
        text.contains("device nivel1 unit 2 profile keller-level"),
        "{text}"
    );
}

/// Runs `caudal-agent` with `args` in `config/`, without the caller's CAUDAL_* variables.
fn agent(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_caudal-agent"));
    cmd.current_dir(config_dir()).args(args);
    for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("CAUDAL_")) {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("caudal-agent runs")
}

#[test]
fn check_config_takes_the_file_as_the_example_says() {
    // config/agent.example.toml: "Run `caudal-agent check-config <file>` after editing."
    let out = agent(&["check-config", "agent.example.toml"], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.starts_with("agent.example.toml: OK: site pozo-norte-1"),
        "{stdout}"
    );

    // The file given wins over CAUDAL_CONFIG (and over the default).
    let out = agent(
        &["check-config", "agent.demo.toml"],
        &[("CAUDAL_CONFIG", "agent.example.toml")],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.starts_with("agent.demo.toml: OK"), "{stdout}");

    // The same file twice, spelt two ways, is one file.
    let absolute = config_dir().join("agent.example.toml");
    let absolute = absolute.to_str().unwrap();
    let out = agent(
        &["--config", "agent.example.toml", "check-config", absolute],
        &[],
    );
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn check_config_refuses_two_different_files() {
    for args in [
        &[
            "--config",
            "agent.example.toml",
            "check-config",
            "agent.demo.toml",
        ][..],
        &[
            "check-config",
            "--config",
            "agent.example.toml",
            "agent.demo.toml",
        ][..],
    ] {
        let out = agent(args, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {out:?}");
        assert!(
            out.stdout.is_empty(),
            "{args:?}: nothing is checked: {out:?}"
        );
        assert!(
            stderr.contains(
                "check-config was given two files, --config agent.example.toml and agent.demo.toml"
            ),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn check_config_warns_of_guessed_units_and_still_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(
        &path,
        "[site]\nid = \"s\"\n[uplink]\nbroker = \"mqtt://h:1883\"\n[[bus]]\nname = \"b\"\nkind = \"tcp\"\naddress = \"h:502\"\n[[bus.device]]\nid = \"fm1\"\nunit = 1\nprofile = \"endress-promag\"\nmax_regs_per_read = 2\n[bus.device.points.flow]\nunit = \"L/s\"\n",
    )
    .unwrap();
    let out = agent(&["check-config", path.to_str().unwrap()], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "a warning is not an error: {out:?}");
    let warnings: Vec<&str> = stdout.lines().filter(|l| l.contains("warning:")).collect();
    assert_eq!(warnings.len(), 1, "{stdout}");
    assert!(
        warnings[0].contains(
            ":12:1: bus[b].device[fm1].points.total.unit: warning: profile `endress-promag` assumes `m3`"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("OK: site s"), "{stdout}");
}
