//! The command line: the daemon (`run`) and the technician's tools on site.

use crate::config::{self, AgentConfig, Link, LogFormat, Parity, Site};
use crate::profile::ProfileSet;
use crate::register::Fc;
use crate::simulator::{Model, SimulatedMeter, Simulator};
use crate::{daemon, identity, outbox, probe};
use anyhow::Context;
use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// Caudal edge agent: polls Modbus meters, stores readings durably, syncs them over MQTT.
#[derive(Debug, Parser)]
#[command(name = "caudal-agent", version, about)]
pub struct Cli {
    /// Configuration file.
    #[arg(
        short,
        long,
        global = true,
        env = "CAUDAL_CONFIG",
        default_value = "/etc/caudal/agent.toml"
    )]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: poll, store, sync.
    Run,
    /// Check the configuration and the profiles it uses; errors name file, line and key.
    CheckConfig(CheckConfigArgs),
    /// Read registers from one device now and print them decoded every way.
    Probe(ProbeArgs),
    /// Find which unit ids answer on a bus.
    Scan(ScanArgs),
    /// Show backlog, oldest unsent record and each device's last poll, from the local database
    /// (works while the daemon runs).
    Status,
    /// Print this agent's public key (creating the key pair in the state directory on first
    /// use), to enroll it with the cloud: `caudal-cloud site add --public-key KEY`.
    Identity,
    /// Serve simulated meters over Modbus TCP.
    Simulate(SimulateArgs),
}

#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// The file to check (default: the --config file). Given with a different --config, it is
    /// an error.
    pub file: Option<PathBuf>,
}

/// Which bus to talk to: a bus from the configuration, or one given on the command line.
#[derive(Debug, Args)]
pub struct LinkArgs {
    /// A bus name from the configuration.
    #[arg(long, conflicts_with_all = ["tcp", "rtu_over_tcp", "serial"])]
    pub bus: Option<String>,
    /// Modbus TCP endpoint, host:port.
    #[arg(long)]
    pub tcp: Option<String>,
    /// Modbus RTU through a TCP serial converter, host:port.
    #[arg(long)]
    pub rtu_over_tcp: Option<String>,
    /// Serial port for Modbus RTU, e.g. /dev/ttyUSB0.
    #[arg(long)]
    pub serial: Option<PathBuf>,
    #[arg(long, default_value_t = 9600)]
    pub baud: u32,
    /// none, even or odd.
    #[arg(long, default_value = "none")]
    pub parity: String,
    #[arg(long, default_value_t = 1)]
    pub stop_bits: u8,
    /// Per-request timeout, milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub timeout_ms: u64,
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    #[command(flatten)]
    pub link: LinkArgs,
    /// A device from the configuration: read every point of its profile.
    #[arg(long, conflicts_with_all = ["unit", "address"])]
    pub device: Option<String>,
    /// Unit (slave) id.
    #[arg(long)]
    pub unit: Option<u8>,
    /// Function code: 1, 2, 3 or 4.
    #[arg(long, default_value_t = 3)]
    pub fc: u8,
    /// 0-based wire address (a manual's 40001-style or 1-based number minus its base).
    #[arg(long)]
    pub address: Option<u16>,
    /// Registers to read.
    #[arg(long, default_value_t = 4)]
    pub count: u16,
}

#[derive(Debug, Args)]
pub struct ScanArgs {
    #[command(flatten)]
    pub link: LinkArgs,
    #[arg(long, default_value_t = 1)]
    pub from: u8,
    #[arg(long, default_value_t = 247)]
    pub to: u8,
    /// Function code of the test read.
    #[arg(long, default_value_t = 3)]
    pub fc: u8,
    /// Address of the test read.
    #[arg(long, default_value_t = 0)]
    pub address: u16,
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Simulate every device of the configuration's TCP buses, each bus on its own address,
    /// each device with its own profile (ignores the other options).
    #[arg(long)]
    pub configured: bool,
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:5020")]
    pub listen: String,
    /// Profile of the simulated meters.
    #[arg(long, default_value = "generic")]
    pub profile: String,
    /// First unit id.
    #[arg(long, default_value_t = 1)]
    pub unit: u8,
    /// How many meters (consecutive unit ids).
    #[arg(long, default_value_t = 1)]
    pub meters: u8,
    /// Mean flow, L/s.
    #[arg(long, default_value_t = 12.0)]
    pub flow_lps: f64,
    /// Starting totalizer, m³.
    #[arg(long, default_value_t = 1000.0)]
    pub total_m3: f64,
}

/// Runs the command line; `main.rs` is only this call.
pub fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // Only `check-config FILE` cares how the configuration was named: a file typed twice, as
    // --config and as FILE, must be the same file, while the default or CAUDAL_CONFIG gives
    // way to FILE.
    let config_typed = matches.value_source("config") == Some(ValueSource::CommandLine);
    match dispatch(cli, config_typed) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli, config_typed: bool) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::CheckConfig(args) => {
            let path = file_to_check(&cli.config, config_typed, args.file)?;
            let report = config::check(&path);
            println!("{report}");
            Ok(if report.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Run => {
            let (config, site) = load(&cli.config)?;
            init_tracing(&config.log.level, config.log.format);
            let version = config_version(&cli.config);
            runtime()?.block_on(async move {
                daemon::run(config, site, version, shutdown_signal())
                    .await
                    .context("agent stopped")
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status => {
            let (_, site) = load(&cli.config)?;
            let inspection = outbox::inspect(&site.outbox_path)
                .with_context(|| format!("reading {}", site.outbox_path.display()))?;
            println!("{inspection}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Identity => {
            let (_, site) = load(&cli.config)?;
            let dir = identity::state_dir(&site.outbox_path);
            let (id, created) = identity::Identity::load_or_create(dir)?;
            if created {
                eprintln!("created {}", id.path().display());
            }
            println!("{}", id.public());
            Ok(ExitCode::SUCCESS)
        }
        Command::Probe(args) => {
            init_tracing("warn", LogFormat::Plain);
            let timeout = Duration::from_millis(args.link.timeout_ms);
            if let Some(device) = &args.device {
                let (_, site) = load(&cli.config)?;
                let (bus, dev) = site
                    .buses
                    .iter()
                    .find_map(|b| {
                        b.devices
                            .iter()
                            .find(|d| d.id.as_str() == device)
                            .map(|d| (b, d))
                    })
                    .with_context(|| format!("no device {device:?} in {}", cli.config.display()))?;
                let report = runtime()?.block_on(probe::probe_device(
                    &bus.link,
                    dev,
                    timeout.max(dev.timeout),
                ))?;
                println!("{report}");
                return Ok(ExitCode::SUCCESS);
            }
            let link = link(&cli.config, &args.link)?;
            let unit = args.unit.context("--unit is required (or --device)")?;
            let address = args
                .address
                .context("--address is required (or --device)")?;
            let fc = Fc::from_code(args.fc)
                .with_context(|| format!("--fc {} is not 1, 2, 3 or 4", args.fc))?;
            let report =
                runtime()?.block_on(probe::probe(&link, unit, fc, address, args.count, timeout))?;
            println!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Scan(args) => {
            init_tracing("warn", LogFormat::Plain);
            let link = link(&cli.config, &args.link)?;
            let fc = Fc::from_code(args.fc)
                .with_context(|| format!("--fc {} is not 1, 2, 3 or 4", args.fc))?;
            let timeout = Duration::from_millis(args.link.timeout_ms);
            let report = runtime()?.block_on(probe::scan_with_progress(
                &link,
                args.from..=args.to,
                fc,
                args.address,
                timeout,
                |line| eprintln!("{line}"),
            ))?;
            println!("{report}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Simulate(args) if args.configured => {
            init_tracing("info", LogFormat::Plain);
            let (_, site) = load(&cli.config)?;
            runtime()?.block_on(simulate_configured(site))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Simulate(args) => {
            init_tracing("info", LogFormat::Plain);
            let profiles = ProfileSet::builtin().map_err(|e| {
                anyhow::anyhow!(
                    "built-in profiles: {}",
                    e.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            })?;
            let profile = profiles.get(&args.profile)?;
            let points = profile.resolve(&BTreeMap::new()).map_err(|e| {
                anyhow::anyhow!(
                    "profile {}: {}",
                    args.profile,
                    e.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            })?;
            let mut sim = Simulator::new();
            for i in 0..args.meters {
                let unit = args
                    .unit
                    .checked_add(i)
                    .context("unit ids run past 255; lower --unit or --meters")?;
                let model = Model {
                    flow_base_lps: args.flow_lps * (1.0 + 0.1 * f64::from(i)),
                    initial_total_m3: args.total_m3 + 1000.0 * f64::from(i),
                    seed: u64::from(unit),
                    ..Model::default()
                };
                sim = sim.with_unit(unit, SimulatedMeter::new(points.clone(), model));
            }
            runtime()?.block_on(async move {
                let listener = tokio::net::TcpListener::bind(&args.listen)
                    .await
                    .with_context(|| format!("cannot listen on {}", args.listen))?;
                let addr = listener.local_addr()?;
                // Printed on stdout so scripts can pick up the address of `--listen 127.0.0.1:0`.
                println!(
                    "simulating {} x {} on {addr} (unit {}..={})",
                    args.meters,
                    args.profile,
                    args.unit,
                    u16::from(args.unit) + u16::from(args.meters).saturating_sub(1)
                );
                sim.serve(listener, shutdown_signal())
                    .await
                    .context("simulator stopped")
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Serves every device of every TCP bus of `site` from its resolved points, one listener per bus.
async fn simulate_configured(site: Site) -> anyhow::Result<()> {
    let mut servers = tokio::task::JoinSet::new();
    for bus in &site.buses {
        let address = match &bus.link {
            Link::Tcp { address } => address.clone(),
            Link::RtuOverTcp { address } => {
                eprintln!("bus {}: RTU over TCP is not simulated; skipped", bus.name);
                let _ = address;
                continue;
            }
            Link::Rtu { .. } => {
                eprintln!("bus {}: serial buses are not simulated; skipped", bus.name);
                continue;
            }
        };
        let mut sim = Simulator::new();
        for (i, d) in bus.devices.iter().enumerate() {
            let model = Model {
                flow_base_lps: 8.0 + 4.0 * i as f64,
                initial_total_m3: 10_000.0 * (i as f64 + 1.0),
                seed: u64::from(d.unit),
                ..Model::default()
            };
            sim = sim.with_unit(d.unit, SimulatedMeter::new(d.points.clone(), model));
        }
        let listener = tokio::net::TcpListener::bind(&address)
            .await
            .with_context(|| format!("bus {}: cannot listen on {address}", bus.name))?;
        println!(
            "bus {}: simulating {} on {}",
            bus.name,
            bus.devices
                .iter()
                .map(|d| format!("{} (unit {}, {})", d.id, d.unit, d.profile))
                .collect::<Vec<_>>()
                .join(", "),
            listener.local_addr()?
        );
        servers.spawn(sim.serve(listener, shutdown_signal()));
    }
    if servers.is_empty() {
        anyhow::bail!("the configuration has no Modbus TCP bus to simulate");
    }
    while let Some(r) = servers.join_next().await {
        r.context("simulator task failed")?
            .context("simulator stopped")?;
    }
    Ok(())
}

/// The file `check-config` checks: the one given to it, else the `--config` one. Two different
/// files is an error rather than a guess at which one the technician meant.
fn file_to_check(
    config: &Path,
    config_typed: bool,
    file: Option<PathBuf>,
) -> anyhow::Result<PathBuf> {
    match file {
        None => Ok(config.to_path_buf()),
        Some(file) if !config_typed || same_file(config, &file) => Ok(file),
        Some(file) => anyhow::bail!(
            "check-config was given two files, --config {} and {}; give one",
            config.display(),
            file.display()
        ),
    }
}

/// The same path, or two spellings of one existing file (`agent.toml`, `/etc/caudal/agent.toml`).
fn same_file(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b)
}

/// Loads, checks and resolves the configuration; every error is printed with its location.
fn load(path: &Path) -> anyhow::Result<(AgentConfig, Site)> {
    let config = AgentConfig::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let profiles = config.load_profiles().map_err(joined)?;
    let site = config.resolve(&profiles).map_err(joined)?;
    Ok((config, site))
}

fn joined(errors: Vec<config::ConfigError>) -> anyhow::Error {
    anyhow::anyhow!(
        "{}",
        errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    )
}

/// The link named on the command line, or the configured bus `--bus`.
fn link(config_path: &Path, args: &LinkArgs) -> anyhow::Result<Link> {
    if let Some(bus) = &args.bus {
        let (_, site) = load(config_path)?;
        return site
            .buses
            .iter()
            .find(|b| &b.name == bus)
            .map(|b| b.link.clone())
            .with_context(|| format!("no bus {bus:?} in {}", config_path.display()));
    }
    if let Some(a) = &args.tcp {
        return Ok(Link::Tcp { address: a.clone() });
    }
    if let Some(a) = &args.rtu_over_tcp {
        return Ok(Link::RtuOverTcp { address: a.clone() });
    }
    if let Some(port) = &args.serial {
        let parity = match args.parity.as_str() {
            "none" | "n" | "N" => Parity::None,
            "even" | "e" | "E" => Parity::Even,
            "odd" | "o" | "O" => Parity::Odd,
            other => anyhow::bail!("--parity {other:?}: use none, even or odd"),
        };
        return Ok(Link::Rtu {
            port: port.clone(),
            baud: args.baud,
            parity,
            data_bits: 8,
            stop_bits: args.stop_bits,
        });
    }
    anyhow::bail!(
        "say which bus: --bus NAME, --tcp HOST:PORT, --rtu-over-tcp HOST:PORT or --serial PATH"
    )
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    // Two worker threads: a bus task, the uplink and the metrics endpoint rarely need more on a
    // small board, and each thread costs memory.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn init_tracing(level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAUDAL_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        // journald stamps lines itself.
        LogFormat::Plain => builder.without_time().try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// A short fingerprint of the configuration file, reported as the config version.
fn config_version(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    // FNV-1a: stable across builds, enough to tell two files apart in a status message.
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("fnv1a:{hash:016x}")
}

/// Resolves on SIGTERM (systemd stop) or SIGINT (Ctrl-C).
///
/// The handlers are installed when this is called (inside the runtime, before the agent starts
/// opening its outbox), not when the future is first polled: a signal that arrives while the
/// agent is still starting then stops it cleanly once it runs, instead of killing it with the
/// signal's default action. A handler that cannot be installed leaves its signal's default
/// action in place.
fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{Signal, SignalKind, signal};
    async fn received(s: Option<Signal>) {
        match s {
            Some(mut s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    let term = signal(SignalKind::terminate()).ok();
    let int = signal(SignalKind::interrupt()).ok();
    async move {
        tokio::select! {
            _ = received(term) => {}
            _ = received(int) => {}
        }
    }
}
