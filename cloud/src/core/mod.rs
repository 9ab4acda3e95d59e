//! Core: what every process has whatever services it runs: configuration, logs, metrics, the
//! database connection, the HTTP server with `/healthz` and `/metrics`, the embedded broker, and
//! what every API route shares (errors, auth primitives), the cloud's signing key (`signing`), and readiness and watchdog towards the
//! service manager.

pub mod api;
pub mod auth;
pub mod broker;
pub mod config;
pub mod db;
pub mod http;
pub mod log;
pub mod metrics;
pub mod openapi;
pub mod service_manager;
pub mod signing;

use tokio::sync::watch;

/// Tells long-running tasks to stop: cloned into each, triggered once by [`ShutdownTrigger`].
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

/// Stops every task holding a [`Shutdown`] made with it.
#[derive(Debug)]
pub struct ShutdownTrigger(watch::Sender<bool>);

impl Shutdown {
    pub fn new() -> (ShutdownTrigger, Shutdown) {
        let (tx, rx) = watch::channel(false);
        (ShutdownTrigger(tx), Shutdown(rx))
    }

    /// Resolves once shutdown is triggered (or the trigger is dropped).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        let _ = self.0.send(true);
    }
}
