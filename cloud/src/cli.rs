//! The `caudal-cloud` command line: parses it, loads the configuration, starts logging and hands
//! over to the library. `main.rs` only calls [`main`]; a test harness can build a binary of its own
//! around the same entry point.

use crate::catchment::{credentials, site};
use crate::core::auth::{self, Role};
use crate::core::config::{CloudConfig, Secret};
use crate::users::account;
use anyhow::Context;
use caudal_common::SiteId;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "caudal-cloud", version, about = "Caudal cloud service")]
struct Cli {
    /// Configuration file (TOML); `CAUDAL_*` environment variables override it.
    #[arg(long, short, env = "CAUDAL_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the configured services until SIGINT or SIGTERM.
    Run,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Manage sites.
    Site {
        #[command(subcommand)]
        command: SiteCommand,
    },
    /// Manage API accounts (the first admin is created here).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
}

#[derive(Subcommand, Debug)]
enum UserCommand {
    /// Create an account. The password is read from the first line of standard input, or from
    /// the environment variable named by `--password-env`; never from the command line, where
    /// other users of the machine could read it.
    Add {
        #[arg(long)]
        email: String,
        /// admin, operator, technician or viewer.
        #[arg(long)]
        role: Role,
        /// A name for people.
        #[arg(long, default_value = "")]
        name: String,
        /// Name of an environment variable holding the password.
        #[arg(long)]
        password_env: Option<String>,
    },
    /// List accounts: id, email, role, active/inactive, name.
    List,
}

#[derive(Subcommand, Debug)]
enum SiteCommand {
    /// Register a site so its agent's batches are accepted; prints its MQTT password, once.
    Add {
        /// Site id, as in the agent's `[site] id` and its topics; also its MQTT username.
        #[arg(long)]
        id: SiteId,
        /// A name for people.
        #[arg(long, default_value = "")]
        name: String,
        /// Seconds without news from the agent after which the site counts as offline.
        #[arg(long, default_value_t = site::DEFAULT_OFFLINE_AFTER_S)]
        offline_after_s: u32,
    },
    /// Issue a new MQTT password for a site (the old one stops working); prints it, once.
    Credentials {
        #[arg(long)]
        id: SiteId,
    },
    /// Print a Mosquitto password file (`password_file`) with every active site's credential.
    MosquittoPasswd,
    /// List registered sites.
    List,
    /// Stop accepting a site's batches (its history stays).
    Deactivate {
        #[arg(long)]
        id: SiteId,
    },
    /// Accept a deactivated site's batches again.
    Activate {
        #[arg(long)]
        id: SiteId,
    },
}

/// Runs the command line; `main.rs` is only this call.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = CloudConfig::load(cli.config.as_deref(), std::env::vars())
        .context("loading the configuration")?;
    crate::core::log::init(&config.log)
        .map_err(anyhow::Error::msg)
        .context("starting logs")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    rt.block_on(command(cli.command, config))
}

async fn command(command: Command, config: CloudConfig) -> anyhow::Result<()> {
    match command {
        Command::Run => crate::run(config, signal()).await?,
        Command::Migrate => {
            let db = crate::open_database(&config).await?;
            db.migrate().await?;
            db.close().await;
            println!("migrations applied");
        }
        Command::Site { command } => {
            let db = crate::open_database(&config).await?;
            if config.database.migrate {
                db.migrate().await?;
            }
            match command {
                SiteCommand::Add {
                    id,
                    name,
                    offline_after_s,
                } => {
                    let issued = credentials::issue();
                    let s =
                        site::create(&db, &id, &name, offline_after_s, Some(&issued.hash)).await?;
                    println!("site {} registered", s.id);
                    print_credentials(&s.id, &issued.password);
                }
                SiteCommand::Credentials { id } => {
                    let issued = credentials::issue();
                    site::set_password_hash(&db, &id, &issued.hash).await?;
                    print_credentials(&id, &issued.password);
                }
                SiteCommand::MosquittoPasswd => {
                    let hashes = site::login_hashes(&db).await?;
                    print!(
                        "{}",
                        credentials::mosquitto_password_file(
                            hashes.iter().map(|(s, h)| (s.as_str(), h.as_str()))
                        )
                    );
                }
                SiteCommand::List => {
                    for s in site::list(&db).await? {
                        let state = if s.active { "active" } else { "inactive" };
                        println!(
                            "{}\t{}\t{}\t{}",
                            s.id,
                            state,
                            s.created_at.to_rfc3339(),
                            s.name
                        );
                    }
                }
                SiteCommand::Deactivate { id } => {
                    site::set_active(&db, &id, false).await?;
                    println!("site {id} deactivated");
                }
                SiteCommand::Activate { id } => {
                    site::set_active(&db, &id, true).await?;
                    println!("site {id} activated");
                }
            }
            db.close().await;
        }
        Command::User { command } => {
            let db = crate::open_database(&config).await?;
            if config.database.migrate {
                db.migrate().await?;
            }
            match command {
                UserCommand::Add {
                    email,
                    role,
                    name,
                    password_env,
                } => {
                    let password = read_password(password_env.as_deref())?;
                    let hash = tokio::task::spawn_blocking(move || auth::hash_password(&password))
                        .await
                        .context("hashing the password")??;
                    let u = account::create(&db, &email, &name, role, &hash).await?;
                    println!(
                        "account {} ({}) created with role {}",
                        u.id, u.email, u.role
                    );
                }
                UserCommand::List => {
                    for u in account::list(&db).await? {
                        let state = if u.active { "active" } else { "inactive" };
                        println!("{}\t{}\t{}\t{}\t{}", u.id, u.email, u.role, state, u.name);
                    }
                }
            }
            db.close().await;
        }
    }
    Ok(())
}

/// Shows a site's new MQTT login: the only time the password is ever shown.
fn print_credentials(site: &SiteId, password: &Secret) {
    println!("mqtt username: {site}");
    println!("mqtt password: {}", password.expose());
    println!("(shown once: set it as the agent's uplink.password; only its hash is stored)");
}

/// The new account's password: from the variable `env` when given, else the first line of
/// standard input (a terminal echoes it: pipe it in, `read -rs P; echo "$P" | caudal-cloud …`).
fn read_password(env: Option<&str>) -> anyhow::Result<Secret> {
    let raw = match env {
        Some(var) => std::env::var(var)
            .with_context(|| format!("--password-env {var}: the variable is not set"))?,
        None => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("reading the password from standard input")?;
            line.trim_end_matches(['\r', '\n']).to_string()
        }
    };
    let pw = Secret::new(raw);
    auth::check_password(pw.expose())?;
    Ok(pw)
}

/// Resolves on SIGINT or SIGTERM.
async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
