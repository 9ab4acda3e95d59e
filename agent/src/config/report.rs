//! `caudal-agent check-config`: load, load the profiles, resolve, and report the site that
//! would run or every problem found.

use super::{AgentConfig, ConfigError, Site};
use std::fmt;
use std::path::{Path, PathBuf};

/// The outcome of `caudal-agent check-config`: the resolved site, or every problem found.
#[derive(Debug)]
pub struct CheckReport {
    pub path: PathBuf,
    pub outcome: Result<Site, Vec<ConfigError>>,
}

impl CheckReport {
    pub fn is_ok(&self) -> bool {
        self.outcome.is_ok()
    }
}

/// Loads, loads profiles for, and resolves the configuration at `path` with the process
/// environment, collecting every problem.
pub fn check(path: impl AsRef<Path>) -> CheckReport {
    let env = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
    check_with_env(path, env)
}

/// [`check`] with an explicit environment.
pub fn check_with_env(
    path: impl AsRef<Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> CheckReport {
    let path = path.as_ref().to_path_buf();
    let outcome = AgentConfig::load_with_env(&path, env)
        .map_err(|e| vec![e])
        .and_then(|config| {
            let profiles = config.load_profiles()?;
            config.resolve(&profiles)
        });
    CheckReport { path, outcome }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let site = match &self.outcome {
            Err(errors) => {
                for e in errors {
                    writeln!(f, "{e}")?;
                }
                return writeln!(
                    f,
                    "{}: {} problem{}",
                    self.path.display(),
                    errors.len(),
                    if errors.len() == 1 { "" } else { "s" }
                );
            }
            Ok(site) => site,
        };
        // Warnings first, like errors: each is a line naming the file, line and key to look at.
        for w in &site.warnings {
            writeln!(f, "{w}")?;
        }
        let devices: usize = site.buses.iter().map(|b| b.devices.len()).sum();
        let points: usize = site
            .buses
            .iter()
            .flat_map(|b| &b.devices)
            .map(|d| d.points.len())
            .sum();
        writeln!(
            f,
            "{}: OK: site {}, {} bus{}, {} device{}, {} point{}; outbox {}",
            self.path.display(),
            site.id,
            site.buses.len(),
            if site.buses.len() == 1 { "" } else { "es" },
            devices,
            if devices == 1 { "" } else { "s" },
            points,
            if points == 1 { "" } else { "s" },
            site.outbox_path.display()
        )?;
        for bus in &site.buses {
            let link = &bus.link;
            writeln!(
                f,
                "  bus {}: {link}, gap {} ms",
                bus.name,
                bus.inter_frame_gap.as_millis()
            )?;
            for d in &bus.devices {
                writeln!(
                    f,
                    "    device {} unit {} profile {}: every {} s, timeout {} ms, {} retr{}, ≤{} regs/read",
                    d.id,
                    d.unit,
                    d.profile,
                    d.period.as_secs(),
                    d.timeout.as_millis(),
                    d.retries,
                    if d.retries == 1 { "y" } else { "ies" },
                    d.max_regs_per_read
                )?;
                for pt in &d.points {
                    write!(
                        f,
                        "      {:<14} {} address {} {} {:?} {}",
                        pt.channel.name(),
                        pt.fc,
                        pt.address,
                        pt.data_type,
                        pt.order,
                        pt.unit
                    )?;
                    if pt.scale != 1.0 {
                        write!(f, " scale {}", pt.scale)?;
                    }
                    if pt.offset != 0.0 {
                        write!(f, " offset {}", pt.offset)?;
                    }
                    if let Some(w) = &pt.water_column {
                        write!(f, " water {} kg/m3", w.density_kg_m3)?;
                        let air = w.air.bar();
                        if air != 0.0 {
                            write!(f, " less air {air:.5} bar")?;
                        }
                    }
                    writeln!(f)?;
                }
            }
        }
        Ok(())
    }
}
