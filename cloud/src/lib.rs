//! The Caudal cloud: one binary that runs all modules or a chosen subset, all sharing one
//! database.
//!
//! Modules, by what they own: [`core`] (configuration, logs, metrics, database, HTTP server,
//! embedded broker, API errors and auth primitives), [`users`] (accounts, roles, sessions, the
//! access check), [`catchment`] (catchment points, sites and their MQTT credentials, devices),
//! [`telemetry`] (MQTT ingest, storage, the telemetry API and alerts), [`compliance`]
//! (what is declared to the regulator: settings, slots, the DGA submitter), [`cli`] (the command line
//! `main.rs` calls). The whole process is wired in [`Cloud::start`], so the flow reads in one
//! place:
//!
//! ```text
//!  config ─▶ Db::connect ─▶ migrate ─▶ [embedded broker]? ─▶ [ingest: dispatcher + workers]?
//!                                                           ├▶ [compliance submitter → DGA]?
//!                                                           └▶ [HTTP: /healthz /metrics + module routes]
//! ```
//!
//! Every process serves `/healthz`, `/metrics` and its OpenAPI document
//! (`/api/v1/openapi.json`); the `/api/v1` routes of each module are served
//! where that module runs, every one behind a bearer token checked the same way in every process; the ingest runs where telemetry runs, against the configured broker or,
//! when none is configured, the embedded one this process starts.

pub mod catchment;
pub mod cli;
pub mod compliance;
pub mod console;
pub mod core;
pub mod telemetry;
pub mod users;

use crate::core::api::ApiState;
use crate::core::auth::{AuthMetrics, TokenKeys};
use crate::core::broker::{BrokerError, BrokerLogin, EmbeddedBroker};
use crate::core::config::{CloudConfig, ConfigError, Service};
use crate::core::db::{Db, DbError};
use crate::core::metrics::Metrics;
use crate::core::{Shutdown, ShutdownTrigger};
use crate::telemetry::ingest::IngestError;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::task::JoinSet;

/// Why the cloud did not start (or stopped on its own).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("data_dir {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Database(#[from] DbError),
    #[error("http.listen {addr}: {source}")]
    Http {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error("compliance: {0}")]
    Compliance(String),
    #[error("a task stopped unexpectedly: {0}")]
    Task(String),
}

/// Opens the configured database, creating `data_dir` for the default SQLite file.
pub async fn open_database(config: &CloudConfig) -> Result<Db, StartError> {
    if config.database.url.is_none() {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| StartError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
    }
    let timeout = std::time::Duration::from_secs(config.database.statement_timeout_s);
    Ok(Db::connect_bounded(
        &config.database_url(),
        config.database.max_connections,
        Some(timeout),
    )
    .await?)
}

/// A running cloud process.
#[derive(Debug)]
pub struct Cloud {
    http_addr: SocketAddr,
    broker: Option<EmbeddedBroker>,
    db: Db,
    trigger: ShutdownTrigger,
    tasks: JoinSet<Result<(), String>>,
}

impl Cloud {
    /// Opens the database, applies migrations, starts the embedded broker when needed, the
    /// ingest when telemetry runs, and the HTTP server. Returns once everything listens.
    pub async fn start(config: CloudConfig) -> Result<Cloud, StartError> {
        config.validate()?;
        let services = config.services()?;
        // Two rustls crypto providers are compiled into this binary (sqlx's and the MQTT
        // client's dependencies each pull one), and rustls then refuses to guess: a library
        // that builds a TLS client without naming one (sqlx, for PostgreSQL over TLS) would
        // panic. Name the process default once; an error only means one is installed already.
        let _ =
            rumqttc::tokio_rustls::rustls::crypto::aws_lc_rs::default_provider().install_default();
        let db = open_database(&config).await?;
        if config.database.migrate {
            db.migrate().await?;
        }
        let (trigger, shutdown) = Shutdown::new();
        let mut registry = core::metrics::registry(&services.to_string());
        let mut tasks = JoinSet::new();

        let mut broker = None;
        if services.contains(Service::Telemetry) {
            let url = match &config.mqtt.url {
                Some(url) => url.clone(),
                None => {
                    let login = broker_login(&config, &db, &mut registry, &shutdown, &mut tasks);
                    let b = EmbeddedBroker::start_with_login(&config.mqtt.embedded, login)?;
                    let url = format!("mqtt://{}", b.v5_addr());
                    broker = Some(b);
                    url
                }
            };
            telemetry::start(&config, &url, &db, &mut registry, &shutdown, &mut tasks)?;
        }

        let keys = compliance::keyring(&config);
        if services.contains(Service::Compliance) {
            compliance::start(&config, &keys, &db, &mut registry, &shutdown, &mut tasks)
                .map_err(StartError::Compliance)?;
        }

        let api_state = ApiState {
            db: db.clone(),
            keys: Arc::new(TokenKeys::from_config(&config.auth)),
            auth_metrics: AuthMetrics::register(&mut registry),
            logins: Arc::new(users::throttle::LoginGuard::new(
                &config.auth,
                config.http.trust_forwarded_for,
            )),
        };
        let metrics = Arc::new(Metrics::new(registry));
        // Each module's routes come with their OpenAPI paths; the document describes exactly
        // the routes this process serves.
        let mut api = utoipa_axum::router::OpenApiRouter::new();
        if services.contains(Service::Users) {
            api = api.merge(users::routes());
        }
        if services.contains(Service::Catchment) {
            api = api.merge(catchment::routes());
        }
        if services.contains(Service::Telemetry) {
            api = api.merge(telemetry::routes());
        }
        if services.contains(Service::Compliance) {
            api = api.merge(compliance::routes(keys, compliance::dga_handle(&config)));
        }
        let (router, paths) = core::http::core_routes(db.clone(), metrics)
            .merge(api.with_state(api_state.clone()))
            .split_for_parts();
        let mut app = router.merge(core::openapi::routes(&core::openapi::document(paths)));
        if services.contains(Service::Users) {
            app = app.merge(console::routes(console::Console {
                api: api_state,
                secure_cookies: config.http.secure_cookies,
                dga: Default::default(),
            }));
        }
        let listener = tokio::net::TcpListener::bind(config.http.listen)
            .await
            .map_err(|source| StartError::Http {
                addr: config.http.listen,
                source,
            })?;
        let http_addr = listener.local_addr().map_err(|source| StartError::Http {
            addr: config.http.listen,
            source,
        })?;
        let sd = shutdown.clone();
        let config_http = config.http.clone();
        tasks.spawn(async move {
            core::http::serve(listener, app, &config_http, sd)
                .await
                .map_err(|e| format!("HTTP server on {http_addr}: {e}"))
        });
        tracing::info!(
            services = %services,
            http = %http_addr,
            database = ?db.backend(),
            "caudal-cloud started"
        );
        Ok(Cloud {
            http_addr,
            broker,
            db,
            trigger,
            tasks,
        })
    }

    /// Where `/healthz`, `/metrics` and the API are served.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The embedded broker, when this process runs one.
    pub fn broker(&self) -> Option<&EmbeddedBroker> {
        self.broker.as_ref()
    }

    /// The shared database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Resolves when a task ends before shutdown was asked for (its error, if any).
    pub async fn failed(&mut self) -> StartError {
        match self.tasks.join_next().await {
            Some(Ok(Err(e))) => StartError::Task(e),
            Some(Err(e)) => StartError::Task(e.to_string()),
            Some(Ok(Ok(()))) | None => StartError::Task("a task ended".to_string()),
        }
    }

    /// Stops every task (the ingest finishes what it holds and sends those acks), the embedded
    /// broker, and closes the database.
    pub async fn stop(mut self) {
        self.trigger.trigger();
        while let Some(r) = self.tasks.join_next().await {
            match r {
                Ok(Err(e)) => tracing::warn!(error = %e, "task failed while stopping"),
                Err(e) => tracing::warn!(error = %e, "task panicked while stopping"),
                Ok(Ok(())) => {}
            }
        }
        if let Some(mut b) = self.broker.take() {
            b.stop();
        }
        self.db.close().await;
        tracing::info!("caudal-cloud stopped");
    }
}

/// The embedded broker's login check when `mqtt.embedded.authenticate` is on: agents against
/// their sites' credentials (a task answering from the database), the ingest with its own login.
fn broker_login(
    config: &CloudConfig,
    db: &Db,
    registry: &mut prometheus_client::registry::Registry,
    shutdown: &Shutdown,
    tasks: &mut JoinSet<Result<(), String>>,
) -> Option<BrokerLogin> {
    if !config.mqtt.embedded.authenticate {
        return None;
    }
    // `CloudConfig::validate` requires both when authentication is on.
    let (Some(user), Some(password)) = (&config.mqtt.username, &config.mqtt.password) else {
        return None;
    };
    let metrics = catchment::credentials::LoginMetrics::register(registry);
    let (check, logins) = catchment::credentials::LoginCheck::new(db.clone(), metrics);
    let sd = shutdown.clone();
    tasks.spawn(async move {
        check.run(sd).await;
        Ok(())
    });
    Some(BrokerLogin {
        cloud_username: user.clone(),
        cloud_password: password.clone(),
        agents: Arc::new(move |site, password| {
            let logins = logins.clone();
            Box::pin(async move { logins.check(site, password).await })
        }),
        refusals: core::broker::RefusalMetrics::register(registry),
    })
}

/// Runs the cloud until `shutdown` resolves or a task fails.
pub async fn run(
    config: CloudConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), StartError> {
    let mut cloud = Cloud::start(config).await?;
    let notifier = crate::core::service_manager::started();
    let failed = tokio::select! {
        _ = shutdown => None,
        e = cloud.failed() => Some(e),
    };
    notifier.stopping();
    cloud.stop().await;
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
