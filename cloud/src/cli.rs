//! The `caudal-cloud` command line: parses it, loads the configuration, starts logging and hands
//! over to the library. `main.rs` only calls [`main`]; a test harness can build a binary of its own
//! around the same entry point.

use crate::catchment::device::{self, DevicePatch, NewDevice, Quantity};
use crate::catchment::obra::ObraCode;
use crate::catchment::rut::Rut;
use crate::catchment::{credentials, point, site, site_key};
use crate::compliance;
use crate::core::auth::{self, Role};
use crate::core::config::{CloudConfig, Secret};
use crate::core::db::Db;
use crate::telemetry::provenance;
use crate::telemetry::query::DeviceLatest;
use crate::users::account;
use anyhow::Context;
use caudal_common::signed::PublicKey;
use caudal_common::{DeviceId, SiteId};
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
    /// Manage a site's devices (meters and sensors) and link them to catchment points.
    Device {
        #[command(subcommand)]
        command: DeviceCommand,
    },
    /// Manage API accounts (the first admin is created here).
    User {
        #[command(subcommand)]
        command: UserCommand,
    },
    /// Print the cloud's public key (give it to each agent as `uplink.cloud_public_key`),
    /// creating the key file `signing.key_file` names on first use.
    SigningKey,
    /// Check a provenance export (`site export`, or `GET /api/v1/sites/{site}/provenance`)
    /// against the site's public keys: every batch's signature and body. Needs no database.
    VerifyExport {
        /// The export (JSON).
        file: PathBuf,
        /// A public key of the site (repeat for the keys before a rotation).
        #[arg(long = "public-key", required = true)]
        public_keys: Vec<PublicKey>,
    },
    /// What is reported to the DGA: settings, passwords, slots and their review.
    Compliance {
        #[command(subcommand)]
        command: ComplianceCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ComplianceCommand {
    /// Show the Centro de Control's settings, or change them (both are stored together: an
    /// option left out takes its default, the manual's URL, or no RUT).
    Settings {
        /// Base URL of the MEE API (default: the manual's).
        #[arg(long)]
        dga_base_url: Option<String>,
        /// RUT of the Centro de Control (`rutEmpresa`), NNNNNNNN-D.
        #[arg(long)]
        rut_empresa: Option<Rut>,
        /// Change the settings (without it they are only shown).
        #[arg(long)]
        set: bool,
    },
    /// Set a point's reporting settings, whole.
    Point {
        /// The catchment point: its id or its DGA código de obra.
        #[arg(long)]
        point: String,
        /// subterranea, superficial_flujometro or superficial (default: from the point's kind).
        #[arg(long)]
        endpoint: Option<String>,
        /// The device giving caudal, as SITE/DEVICE.
        #[arg(long)]
        flow: Option<String>,
        /// The device giving totalizador, as SITE/DEVICE.
        #[arg(long)]
        total: Option<String>,
        /// The device giving the level (nivel freático or altura), as SITE/DEVICE.
        #[arg(long)]
        level: Option<String>,
        /// off, shadow (build and check, send nothing) or on.
        #[arg(long, default_value = "off")]
        mode: String,
        /// First day reported, YYYY-MM-DD (from 00:00 UTC-4).
        #[arg(long)]
        start_date: Option<chrono::NaiveDate>,
        /// hourly, daily, monthly or semiannual (default: by the point's DGA standard).
        #[arg(long)]
        period: Option<String>,
        /// sample or mean (default: sample for hourly slots, mean for longer ones).
        #[arg(long)]
        flow_method: Option<String>,
        /// Low-flow cut-off, L/s (default 0.2).
        #[arg(long)]
        low_flow_lps: Option<f64>,
    },
    /// Set a point's informante password, read from the first line of standard input or from
    /// the variable named by `--password-env`; stored encrypted with the compliance key.
    Password {
        #[arg(long)]
        point: String,
        #[arg(long)]
        password_env: Option<String>,
    },
    /// The month report as a table, one line per obra: expected slots, accepted (and late),
    /// held, failed, pending, not yet due, overdue, verified (a month in UTC-4).
    Status {
        /// YYYY-MM (default: the current month in UTC-4).
        #[arg(long)]
        month: Option<String>,
    },
    /// A point's slots: time (UTC), fecha and hora (UTC-4), state, values, reason, receipt.
    Slots {
        #[arg(long)]
        point: String,
        /// RFC 3339; default 7 days before now.
        #[arg(long)]
        from: Option<chrono::DateTime<chrono::Utc>>,
        /// RFC 3339; default now.
        #[arg(long)]
        to: Option<chrono::DateTime<chrono::Utc>>,
        #[arg(long)]
        state: Option<String>,
    },
    /// Release a held slot (it is sent as built); the note says why its values stand.
    Release {
        #[arg(long)]
        point: String,
        #[arg(long)]
        slot: chrono::DateTime<chrono::Utc>,
        #[arg(long)]
        note: String,
    },
    /// Discard a held slot: it is never sent.
    Discard {
        #[arg(long)]
        point: String,
        #[arg(long)]
        slot: chrono::DateTime<chrono::Utc>,
        #[arg(long, default_value = "")]
        note: String,
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
enum DeviceCommand {
    /// Register a device of a site, as its agent names it in readings (`[[bus.device]] id`).
    Add {
        /// The site the device belongs to.
        #[arg(long)]
        site: SiteId,
        /// Device id, as in the agent's configuration.
        #[arg(long)]
        id: DeviceId,
        /// A name for people.
        #[arg(long, default_value = "")]
        name: String,
        /// Meter profile (`config/profiles/<profile>.toml`).
        #[arg(long, default_value = "")]
        profile: String,
        /// What it measures: flow, totalizer, level (comma-separated).
        #[arg(long, value_delimiter = ',', value_parser = parse_quantity)]
        measures: Vec<Quantity>,
        /// Names of its extra channels (comma-separated).
        #[arg(long, value_delimiter = ',')]
        extras: Vec<String>,
        /// The catchment point its measurements belong to: its id, or its DGA código de obra.
        #[arg(long)]
        point: Option<String>,
    },
    /// List a site's devices: id, active/inactive, point, measures, profile, name.
    List {
        #[arg(long)]
        site: SiteId,
    },
    /// Link a device to a catchment point (its id or código de obra), or unlink it.
    Link {
        #[arg(long)]
        site: SiteId,
        #[arg(long)]
        id: DeviceId,
        #[arg(long, required_unless_present = "unlink", conflicts_with = "unlink")]
        point: Option<String>,
        /// Unlink the device from its point.
        #[arg(long)]
        unlink: bool,
    },
    /// Deactivate a device: its readings stay, it no longer counts for its point. A device is
    /// never deleted; `device add` of the same id is refused, `activate` brings it back.
    Remove {
        #[arg(long)]
        site: SiteId,
        #[arg(long)]
        id: DeviceId,
    },
    /// Activate a removed device again.
    Activate {
        #[arg(long)]
        site: SiteId,
        #[arg(long)]
        id: DeviceId,
    },
}

/// A quantity as the command line names it (the API's names).
fn parse_quantity(s: &str) -> Result<Quantity, String> {
    serde_json::from_value(serde_json::Value::String(s.trim().to_string()))
        .map_err(|_| format!("{s:?}: expected flow, totalizer or level"))
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
        /// The agent's Ed25519 public key (`caudal-agent identity` prints it): its batches are
        /// then accepted only signed with it.
        #[arg(long)]
        public_key: Option<PublicKey>,
    },
    /// Enroll a site's new public key (after its agent's key was replaced): batches signed
    /// with the previous key are refused from now on; those stored before still verify.
    PublicKey {
        #[arg(long)]
        id: SiteId,
        #[arg(long)]
        public_key: PublicKey,
    },
    /// Print the signed batches stored for a site (JSON), for an auditor to check with
    /// `verify-export` and the site's public key alone.
    Export {
        #[arg(long)]
        id: SiteId,
        /// Records from (RFC 3339).
        #[arg(long)]
        from: chrono::DateTime<chrono::Utc>,
        /// Records until (RFC 3339, exclusive).
        #[arg(long)]
        to: chrono::DateTime<chrono::Utc>,
    },
    /// Issue a new MQTT password for a site (the old one stops working); prints it, once.
    Credentials {
        #[arg(long)]
        id: SiteId,
    },
    /// Print a Mosquitto password file (`password_file`) with every active site's credential.
    MosquittoPasswd,
    /// Print a Mosquitto ACL file (`acl_file`) with the embedded broker's rules: each site
    /// publishes and reads only its own topics, only the cloud publishes acks, commands and
    /// desired configuration.
    MosquittoAcl {
        /// The cloud's username at Mosquitto; default `mqtt.username`.
        #[arg(long)]
        cloud_user: Option<String>,
    },
    /// List registered sites.
    List,
    /// Print what the cloud stored last for each of a site's devices: its latest flow,
    /// totalizer and level with their time, and the last reading's seq.
    Latest {
        #[arg(long)]
        id: SiteId,
    },
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
        Command::SigningKey => {
            let path = config
                .signing
                .key_file
                .as_deref()
                .context("signing.key_file is not set in the configuration")?;
            let (key, created) = crate::core::signing::load_or_create(path)?;
            if created {
                eprintln!("created {}", path.display());
            }
            println!("{}", key.public());
        }
        Command::VerifyExport { file, public_keys } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let export: provenance::ProvenanceExport = serde_json::from_str(&text)
                .with_context(|| format!("{} is not a provenance export", file.display()))?;
            let v = provenance::verify(&export, &public_keys)
                .with_context(|| format!("{} does not verify", file.display()))?;
            println!(
                "verified: site {}, {} batches, {} readings, {} events, {} gaps signed by the given keys",
                export.site, v.batches, v.readings, v.events, v.gaps
            );
        }
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
                    public_key,
                } => {
                    let issued = credentials::issue();
                    let s =
                        site::create(&db, &id, &name, offline_after_s, Some(&issued.hash)).await?;
                    println!("site {} registered", s.id);
                    if let Some(k) = public_key {
                        site_key::enroll(&db, &s.id, &k, chrono::Utc::now()).await?;
                        println!("public key {k} enrolled");
                    }
                    print_credentials(&s.id, &issued.password);
                }
                SiteCommand::PublicKey { id, public_key } => {
                    if site_key::enroll(&db, &id, &public_key, chrono::Utc::now()).await? {
                        println!("site {id}: public key {public_key} enrolled");
                    } else {
                        println!("site {id}: public key {public_key} is already the current key");
                    }
                }
                SiteCommand::Export { id, from, to } => {
                    let export = provenance::export(&db, &id, from, to).await?;
                    println!("{}", serde_json::to_string_pretty(&export)?);
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
                SiteCommand::MosquittoAcl { cloud_user } => {
                    let Some(user) = cloud_user.or(config.mqtt.username.clone()) else {
                        anyhow::bail!(
                            "site mosquitto-acl: the cloud's username is unknown: pass \
                             --cloud-user or set mqtt.username"
                        );
                    };
                    if user.is_empty() || user.contains(char::is_whitespace) {
                        anyhow::bail!(
                            "site mosquitto-acl: cloud user {user:?} cannot be written in an ACL file"
                        );
                    }
                    print!("{}", credentials::mosquitto_acl_file(&user));
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
                SiteCommand::Latest { id } => {
                    if site::get(&db, &id).await?.is_none() {
                        anyhow::bail!("no site {id}");
                    }
                    let devices = crate::telemetry::query::latest(&db, &id).await?;
                    if devices.is_empty() {
                        println!("site {id}: nothing stored yet");
                    }
                    let now = chrono::Utc::now();
                    for d in devices {
                        println!("{}", latest_line(&d, now));
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
        Command::Device { command } => {
            let db = crate::open_database(&config).await?;
            if config.database.migrate {
                db.migrate().await?;
            }
            device_command(&db, command).await?;
            db.close().await;
        }
        Command::Compliance { command } => {
            let db = crate::open_database(&config).await?;
            if config.database.migrate {
                db.migrate().await?;
            }
            compliance_command(&db, &config, command).await?;
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

async fn device_command(db: &Db, command: DeviceCommand) -> anyhow::Result<()> {
    match command {
        DeviceCommand::Add {
            site,
            id,
            name,
            profile,
            measures,
            extras,
            point,
        } => {
            let point_id = match point {
                Some(p) => Some(point_id(db, &p).await?),
                None => None,
            };
            let new = NewDevice {
                id,
                name,
                profile,
                quantities: measures,
                extras,
                point_id,
            };
            let d = device::create(db, &site, &new).await?;
            println!(
                "device {}/{} registered{}",
                d.site,
                d.id,
                linked(d.point_id)
            );
        }
        DeviceCommand::List { site } => {
            if site::get(db, &site).await?.is_none() {
                anyhow::bail!("no site {site}");
            }
            for d in device::list(db, &site).await? {
                let state = if d.active { "active" } else { "inactive" };
                let point = d.point_id.map(|p| p.to_string()).unwrap_or("-".into());
                let measures: Vec<String> = d
                    .quantities
                    .iter()
                    .filter_map(|q| serde_json::to_value(q).ok())
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect();
                println!(
                    "{}\t{state}\tpoint {point}\t{}\t{}\t{}",
                    d.id,
                    measures.join(","),
                    d.profile,
                    d.name
                );
            }
        }
        DeviceCommand::Link {
            site,
            id,
            point,
            unlink,
        } => {
            let point_id = match (point, unlink) {
                (Some(p), false) => Some(point_id(db, &p).await?),
                _ => None,
            };
            let patch = DevicePatch {
                point_id: Some(point_id),
                ..DevicePatch::default()
            };
            let d = device::update(db, &site, &id, &patch).await?;
            match d.point_id {
                Some(_) => println!("device {}/{}{}", d.site, d.id, linked(d.point_id)),
                None => println!("device {}/{} unlinked", d.site, d.id),
            }
        }
        DeviceCommand::Remove { site, id } => {
            set_device_active(db, &site, &id, false).await?;
            println!("device {site}/{id} deactivated");
        }
        DeviceCommand::Activate { site, id } => {
            set_device_active(db, &site, &id, true).await?;
            println!("device {site}/{id} activated");
        }
    }
    Ok(())
}

async fn set_device_active(
    db: &Db,
    site: &SiteId,
    id: &DeviceId,
    active: bool,
) -> anyhow::Result<()> {
    let patch = DevicePatch {
        active: Some(active),
        ..DevicePatch::default()
    };
    device::update(db, site, id, &patch).await?;
    Ok(())
}

fn linked(point_id: Option<i64>) -> String {
    point_id
        .map(|p| format!(", linked to catchment point {p}"))
        .unwrap_or_default()
}

/// A catchment point named on the command line by its id or by its código de obra.
async fn point_id(db: &Db, given: &str) -> anyhow::Result<i64> {
    if let Ok(id) = given.parse::<i64>() {
        return match point::get(db, id).await? {
            Some(p) => Ok(p.id),
            None => anyhow::bail!("--point {given}: no catchment point {id}"),
        };
    }
    let obra: ObraCode = given
        .parse()
        .with_context(|| format!("--point {given:?}: neither a point id nor a código de obra"))?;
    point::list(db)
        .await?
        .into_iter()
        .find(|p| p.obra_code.as_ref() == Some(&obra))
        .map(|p| p.id)
        .with_context(|| format!("--point {given}: no catchment point has obra {obra}"))
}

/// One device's latest stored values for a person: `fm1  flow 12.50 L/s (4s ago) …  seq N`.
fn latest_line(d: &DeviceLatest, now: chrono::DateTime<chrono::Utc>) -> String {
    let age = |ts: chrono::DateTime<chrono::Utc>| {
        let s = (now - ts).num_seconds();
        match s {
            s if s < 0 => "in the future".to_string(),
            s if s < 120 => format!("{s}s ago"),
            s if s < 7200 => format!("{}m ago", s / 60),
            s => format!("{}h ago", s / 3600),
        }
    };
    let mut parts = Vec::new();
    let quantities = [
        ("flow", &d.flow_lps, "L/s", 2),
        ("total", &d.total_m3, "m³", 3),
        ("level", &d.level_m, "m", 2),
    ];
    for (name, value, unit, decimals) in quantities {
        if let Some(l) = value {
            parts.push(format!(
                "{name} {:.decimals$} {unit} ({})",
                l.value,
                age(l.ts)
            ));
        }
    }
    if parts.is_empty() {
        parts.push("no flow, totalizer or level".to_string());
    }
    let r = &d.last_reading;
    let quality = if r.quality.is_empty() {
        String::new()
    } else {
        format!(" [{}]", r.quality.join(","))
    };
    format!(
        "{:<16} {}  last seq {}{quality}",
        d.device,
        parts.join(", "),
        r.seq
    )
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

/// `SITE/DEVICE` as a compliance source.
fn source(flag: &str, v: Option<String>) -> anyhow::Result<Option<compliance::store::Source>> {
    v.map(|v| {
        let (site, device) = v
            .split_once('/')
            .with_context(|| format!("--{flag} {v:?}: expected SITE/DEVICE"))?;
        Ok(compliance::store::Source {
            site: site.to_string(),
            device: device.to_string(),
        })
    })
    .transpose()
}

fn enum_arg<T: serde::de::DeserializeOwned>(
    flag: &str,
    v: Option<String>,
) -> anyhow::Result<Option<T>> {
    v.map(|v| {
        serde_json::from_value(serde_json::Value::String(v.clone()))
            .map_err(|_| anyhow::anyhow!("--{flag} {v:?} is not one of the accepted values"))
    })
    .transpose()
}

/// Who a change from the command line is recorded as.
fn cli_actor() -> String {
    format!(
        "cli:{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".to_string())
    )
}

async fn compliance_command(
    db: &Db,
    config: &CloudConfig,
    command: ComplianceCommand,
) -> anyhow::Result<()> {
    use compliance::settings::{self, PointBody, SettingsBody};
    use compliance::store;
    let now = chrono::Utc::now();
    match command {
        ComplianceCommand::Settings {
            dga_base_url,
            rut_empresa,
            set,
        } => {
            let s = if set {
                let body = SettingsBody {
                    dga_base_url,
                    rut_empresa,
                };
                settings::put_settings(db, &body, &cli_actor(), now).await?
            } else {
                store::settings(db).await?
            };
            println!("dga_base_url\t{}", s.dga_base_url);
            println!(
                "rut_empresa\t{}",
                s.rut_empresa
                    .map(|r| r.to_string())
                    .unwrap_or_else(|| "-".into())
            );
        }
        ComplianceCommand::Point {
            point,
            endpoint,
            flow,
            total,
            level,
            mode,
            start_date,
            period,
            flow_method,
            low_flow_lps,
        } => {
            let id = point_id(db, &point).await?;
            let body = PointBody {
                endpoint: enum_arg("endpoint", endpoint)?,
                flow: source("flow", flow)?,
                total: source("total", total)?,
                level: source("level", level)?,
                mode: enum_arg("mode", Some(mode))?,
                start_date,
                period: enum_arg("period", period)?,
                flow_method: enum_arg("flow-method", flow_method)?,
                low_flow_lps,
            };
            let v = settings::put_point(db, id, &body, &cli_actor(), now).await?;
            println!(
                "point {id}: {} to {}, password {}",
                v.mode.as_str(),
                v.endpoint.as_str(),
                if v.password_set { "set" } else { "not set" }
            );
        }
        ComplianceCommand::Password {
            point,
            password_env,
        } => {
            let id = point_id(db, &point).await?;
            let raw = match password_env.as_deref() {
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
            let keys = compliance::keyring(config);
            settings::put_password(
                db,
                keys.0.as_deref(),
                id,
                &compliance::secret::Password::new(raw),
                &cli_actor(),
                now,
            )
            .await?;
            println!("point {id}: informante password stored, encrypted");
        }
        ComplianceCommand::Status { month } => {
            use compliance::report::{self, Filter, Month};
            let month = match month.as_deref() {
                Some(m) => Month::parse(m).map_err(anyhow::Error::msg)?,
                None => Month::of(now),
            };
            let reports = report::month_report(db, month, &Filter::default(), now).await?;
            print!("{}", report::status_table(&reports, month));
            for c in store::point_configs(db).await? {
                if let Some(r) = c.stopped_reason {
                    println!("point {} STOPPED: {r}", c.point_id);
                }
            }
        }
        ComplianceCommand::Slots {
            point,
            from,
            to,
            state,
        } => {
            let id = point_id(db, &point).await?;
            let to = to.unwrap_or(now);
            let from = from.unwrap_or(to - chrono::Duration::days(7));
            let state = state
                .map(|s| s.parse::<store::SlotState>().map_err(anyhow::Error::msg))
                .transpose()?;
            for s in store::slots(db, id, from, to, state, 100_000).await? {
                let v = s.values.clone().unwrap_or_default();
                println!(
                    "{}\t{} {}\t{}\tcaudal={} totalizador={} nivel={} altura={}\t{}\t{}",
                    s.slot_at.to_rfc3339(),
                    s.fecha,
                    s.hora,
                    s.state.as_str(),
                    v.caudal,
                    v.totalizador.unwrap_or_default(),
                    v.nivel.unwrap_or_default(),
                    v.altura.unwrap_or_default(),
                    s.reason.unwrap_or_default(),
                    s.receipt.unwrap_or_default()
                );
            }
        }
        ComplianceCommand::Release { point, slot, note } => {
            let id = point_id(db, &point).await?;
            let s = settings::review(db, id, slot, true, &cli_actor(), &note, now).await?;
            println!(
                "slot {} {} of point {id}: {}",
                s.fecha,
                s.hora,
                s.state.as_str()
            );
        }
        ComplianceCommand::Discard { point, slot, note } => {
            let id = point_id(db, &point).await?;
            let s = settings::review(db, id, slot, false, &cli_actor(), &note, now).await?;
            println!(
                "slot {} {} of point {id}: {}",
                s.fecha,
                s.hora,
                s.state.as_str()
            );
        }
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::query::{Latest, ReadingView};
    use chrono::{DateTime, Utc};

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn a_latest_line_shows_each_stored_quantity_with_unit_and_age() {
        let now = at("2026-12-03T12:10:00Z");
        let latest = |value, ts: &str| {
            Some(Latest {
                value,
                ts: at(ts),
                seq: 7,
                quality: vec![],
            })
        };
        let d = DeviceLatest {
            device: "fm1".into(),
            last_reading: ReadingView {
                seq: 7,
                device: "fm1".into(),
                ts: at("2026-12-03T12:09:55Z"),
                quality: vec!["frozen".into()],
                flow_lps: Some(12.5),
                total_m3: None,
                level_m: None,
                extra: Default::default(),
            },
            flow_lps: latest(12.5, "2026-12-03T12:09:55Z"),
            total_m3: latest(1520.25, "2026-12-03T11:00:00Z"),
            level_m: None,
        };
        assert_eq!(
            latest_line(&d, now),
            "fm1              flow 12.50 L/s (5s ago), total 1520.250 m³ (70m ago)  last seq 7 [frozen]"
        );
    }
}
