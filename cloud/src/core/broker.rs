//! The embedded MQTT broker (rumqttd), started when no external broker is configured, so a
//! single machine needs nothing but `caudal-cloud`.
//!
//! rumqttd serves one protocol per listener: agents (MQTT v3.1.1) connect to `listen`, the
//! ingest (MQTT v5, for shared subscriptions) to `listen_v5`. The router and the listener threads
//! are `caudal-broker`'s (shared with the test broker, since rumqttd's own `Broker::start` blocks
//! forever and cannot be stopped): [`EmbeddedBroker::stop`] closes the sockets and every
//! connection; rumqttd's router thread never exits and idles until the process ends. A listener
//! is ready once it answers an MQTT CONNECT (logged in as the cloud when there is a login).
//!
//! The broker keeps nothing on disk: sessions and retained messages are lost when the process
//! stops. That is safe for telemetry (agents re-send whatever the cloud did not acknowledge and
//! re-publish their retained status on connect) and is why production fleets should use an
//! external broker with persistence.
//!
//! With a [`BrokerLogin`] (`mqtt.embedded.authenticate`), every CONNECT must carry a username and
//! password: the v5 listener accepts only the cloud's own login (the ingest's), the v3.1.1
//! listener the cloud's login or an agent's, checked by the given function (the catchment
//! module's site credentials). A refused client is disconnected before CONNACK. rumqttd 0.20 has
//! no topic ACLs: a logged-in client may publish to any topic.

use crate::core::config::{EmbeddedBrokerConfig, Secret};
use caudal_broker::{Broker, ListenerError, ListenerPlan, Protocol, Ready};
use rumqttd::{ConnectionSettings, RouterConfig, ServerSettings};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

/// Why the embedded broker did not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("embedded broker: cannot listen on {addr} (mqtt.embedded.{key}): {source}")]
    Bind {
        addr: SocketAddr,
        key: &'static str,
        source: std::io::Error,
    },
    #[error("embedded broker: listener on {addr} failed: {reason}")]
    Listener { addr: SocketAddr, reason: String },
    #[error("embedded broker: cannot spawn a thread: {0}")]
    Thread(std::io::Error),
}

impl From<ListenerError> for BrokerError {
    fn from(e: ListenerError) -> BrokerError {
        match e {
            ListenerError::Failed { addr, reason } => BrokerError::Listener { addr, reason },
            ListenerError::Thread(e) => BrokerError::Thread(e),
        }
    }
}

/// Checks an agent's MQTT username and password; resolves to whether it may connect.
pub type AgentCheck =
    Arc<dyn Fn(String, String) -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// How the embedded broker checks logins.
#[derive(Clone)]
pub struct BrokerLogin {
    /// The cloud's own login (`mqtt.username`, `mqtt.password`): the ingest's, and the readiness
    /// probe's. The only one the v5 listener accepts.
    pub cloud_username: String,
    pub cloud_password: Secret,
    /// Every other login on the v3.1.1 listener.
    pub agents: AgentCheck,
}

impl std::fmt::Debug for BrokerLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerLogin")
            .field("cloud_username", &self.cloud_username)
            .finish_non_exhaustive()
    }
}

impl BrokerLogin {
    /// Installs the check for one listener: agents are accepted only on the v3.1.1 one.
    fn install(&self, settings: &mut ConnectionSettings, agents_too: bool) {
        let login = self.clone();
        settings.set_auth_handler(move |_client_id, username: String, password: String| {
            let login = login.clone();
            async move {
                use subtle::ConstantTimeEq;
                if username == login.cloud_username {
                    return bool::from(
                        password
                            .as_bytes()
                            .ct_eq(login.cloud_password.expose().as_bytes()),
                    );
                }
                agents_too && (login.agents)(username, password).await
            }
        });
    }
}

/// A running embedded broker. Dropping it stops it.
pub struct EmbeddedBroker {
    v4: SocketAddr,
    v5: SocketAddr,
    broker: Broker,
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("v4", &self.v4)
            .field("v5", &self.v5)
            .finish()
    }
}

impl EmbeddedBroker {
    /// Starts the broker and waits until both listeners accept connections. A port of 0 is
    /// replaced by a port that was free a moment before. Any client may connect.
    pub fn start(cfg: &EmbeddedBrokerConfig) -> Result<EmbeddedBroker, BrokerError> {
        EmbeddedBroker::start_with_login(cfg, None)
    }

    /// [`EmbeddedBroker::start`], and with `login` every client must log in.
    pub fn start_with_login(
        cfg: &EmbeddedBrokerConfig,
        login: Option<BrokerLogin>,
    ) -> Result<EmbeddedBroker, BrokerError> {
        let v4 = bindable(cfg.listen, "listen")?;
        let v5 = bindable(cfg.listen_v5, "listen_v5")?;
        let router = RouterConfig {
            max_connections: cfg.max_connections,
            max_outgoing_packet_count: 200,
            max_segment_size: (16 << 20).max(4 * cfg.max_payload_bytes),
            max_segment_count: 4,
            ..RouterConfig::default()
        };
        // The readiness probe logs in as the cloud, the one login both listeners accept.
        let probe_login = login
            .as_ref()
            .map(|l| (l.cloud_username.as_str(), l.cloud_password.expose()));
        let plans = [(v4, Protocol::V4), (v5, Protocol::V5)]
            .into_iter()
            .map(|(addr, protocol)| {
                let is_v5 = protocol == Protocol::V5;
                let mut settings = ServerSettings {
                    name: format!("caudal-{}", if is_v5 { "v5" } else { "v4" }),
                    listen: addr,
                    tls: None,
                    next_connection_delay_ms: 0,
                    connections: ConnectionSettings {
                        connection_timeout_ms: 10_000,
                        max_payload_size: cfg.max_payload_bytes,
                        max_inflight_count: 100,
                        auth: None,
                        external_auth: None,
                        dynamic_filters: true,
                    },
                };
                if let Some(l) = &login {
                    l.install(&mut settings.connections, !is_v5);
                }
                ListenerPlan {
                    settings,
                    protocol,
                    ready: Ready::AnswersConnect { login: probe_login },
                }
            })
            .collect();
        let broker = Broker::start(router, plans)?;
        tracing::info!(v4 = %v4, v5 = %v5, "embedded MQTT broker listening");
        Ok(EmbeddedBroker { v4, v5, broker })
    }

    /// The MQTT v3.1.1 listener (agents).
    pub fn v4_addr(&self) -> SocketAddr {
        self.v4
    }

    /// The MQTT v5 listener (the ingest).
    pub fn v5_addr(&self) -> SocketAddr {
        self.v5
    }

    /// Closes the listeners and every client connection. Idempotent.
    pub fn stop(&mut self) {
        self.broker.stop();
    }
}

/// `addr` with a port of 0 replaced by a free port, or why it cannot be bound (naming its key).
fn bindable(addr: SocketAddr, key: &'static str) -> Result<SocketAddr, BrokerError> {
    caudal_broker::bindable(addr).map_err(|source| BrokerError::Bind { addr, key, source })
}
