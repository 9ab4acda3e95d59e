//! Loading: the file, then `CAUDAL_*` environment overrides on top, with errors that name the
//! line of the file or the variable at fault.

use super::{AgentConfig, ConfigError, Location, SourceText};
use crate::profile::ProfileSet;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Environment variables that override file values start with this.
pub const ENV_PREFIX: &str = "CAUDAL_";
/// Separates levels in an environment variable name (`CAUDAL_UPLINK__PASSWORD`).
pub const ENV_SEPARATOR: &str = "__";

impl AgentConfig {
    /// Reads the file at `path` and applies `CAUDAL_*` overrides from the process environment.
    pub fn load(path: impl AsRef<Path>) -> Result<AgentConfig, ConfigError> {
        let env = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)));
        AgentConfig::load_with_env(path, env)
    }

    /// [`AgentConfig::load`] with an explicit environment (tests, or a caller that filters).
    pub fn load_with_env(
        path: impl AsRef<Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<AgentConfig, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        AgentConfig::from_source(SourceText::new(path, text), env)
    }

    /// Parses configuration text (named by `source` in errors) with environment overrides.
    ///
    /// Only variables `CAUDAL_<SECTION>__<KEY>` (at least one `__`) are overrides; single-level
    /// ones such as `CAUDAL_CONFIG` are left to the command line. Empty values count as unset.
    pub fn from_source(
        source: SourceText,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<AgentConfig, ConfigError> {
        let overrides = env_overrides(env);
        let strict = toml::from_str::<AgentConfig>(source.text());
        match merge(source.text(), &overrides) {
            Ok(mut config) => {
                if let Err(e) = &strict {
                    // The merge coerces ("5.5" to 6, "yes" to true); the file on its own must
                    // still be well typed. A key missing from the file may come from the
                    // environment, so that alone is not an error.
                    if !e.message().starts_with("missing field") {
                        let (at, message) = source.toml_error(e);
                        return Err(ConfigError::File { at, message });
                    }
                }
                config.source = Some(source);
                Ok(config)
            }
            Err(merged) => {
                if let Err(e) = &strict {
                    let (at, message) = source.toml_error(e);
                    return Err(ConfigError::File { at, message });
                }
                if overrides.is_empty() {
                    // The `toml` parser accepted what the `config` crate's did not.
                    return Err(ConfigError::File {
                        at: Location {
                            file: source.path().to_path_buf(),
                            line: None,
                            column: None,
                            key: String::new(),
                        },
                        message: merged.to_string(),
                    });
                }
                // The file alone is fine: find the variable that breaks it.
                for (var, value) in &overrides {
                    let one = BTreeMap::from([(var.clone(), value.clone())]);
                    if let Err(e) = merge(source.text(), &one) {
                        return Err(ConfigError::Env {
                            var: var.clone(),
                            message: e.to_string(),
                        });
                    }
                }
                Err(ConfigError::Env {
                    var: overrides.keys().cloned().collect::<Vec<_>>().join(", "),
                    message: merged.to_string(),
                })
            }
        }
    }

    /// The file this configuration was read from, if it was read from one.
    pub fn source(&self) -> Option<&SourceText> {
        self.source.as_ref()
    }

    /// `[profiles] dirs`, relative ones taken from the configuration file's directory.
    pub fn profile_dirs(&self) -> Vec<PathBuf> {
        let base = self
            .source
            .as_ref()
            .and_then(|s| s.path().parent())
            .map(Path::to_path_buf)
            .unwrap_or_default();
        self.profiles
            .dirs
            .iter()
            .map(|d| {
                if d.is_relative() {
                    base.join(d)
                } else {
                    d.clone()
                }
            })
            .collect()
    }

    /// Loads the profiles this configuration can use: `[profiles] dirs`, then the built-ins.
    pub fn load_profiles(&self) -> Result<ProfileSet, Vec<ConfigError>> {
        ProfileSet::load(&self.profile_dirs())
            .map_err(|errors| errors.into_iter().map(ConfigError::from).collect())
    }
}

fn env_overrides(env: impl IntoIterator<Item = (String, String)>) -> BTreeMap<String, String> {
    env.into_iter()
        .filter(|(k, v)| {
            !v.is_empty()
                && k.strip_prefix(ENV_PREFIX)
                    .is_some_and(|rest| rest.contains(ENV_SEPARATOR))
        })
        .collect()
}

fn merge(
    text: &str,
    overrides: &BTreeMap<String, String>,
) -> Result<AgentConfig, config::ConfigError> {
    let env = config::Environment::with_prefix(ENV_PREFIX.trim_end_matches('_'))
        .prefix_separator("_")
        .separator(ENV_SEPARATOR)
        .source(Some(overrides.clone().into_iter().collect()));
    config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .add_source(env)
        .build()?
        .try_deserialize()
}
