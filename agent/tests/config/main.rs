//! The agent's configuration: environment overrides, errors that name file, line and key, every
//! file under `config/`, and profiles as devices use them. One test binary for the area.

mod env;
mod errors;
mod files;
mod profiles;
