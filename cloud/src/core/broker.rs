//! The embedded MQTT broker (rumqttd), started when no external broker is configured, so a
//! single machine needs nothing but `caudal-cloud`.
//!
//! rumqttd serves one protocol per listener: agents (MQTT v3.1.1) connect to `listen`, the
//! ingest (MQTT v5, for shared subscriptions) to `listen_v5`. The router and the listener threads
//! are `caudal-broker`'s (shared with the test broker, since rumqttd's own `Broker::start` blocks
//! forever and cannot be stopped): [`EmbeddedBroker::stop`] closes the sockets and every
//! connection; rumqttd's router thread never exits and idles until the process ends. A listener
//! is ready once it answers an MQTT CONNECT (with a login: as the cloud on v5 and through the
//! gate, with the gate's secret on the v3.1.1 listener behind it).
//!
//! The broker keeps nothing on disk: sessions and retained messages are lost when the process
//! stops. That is safe for telemetry (agents re-send whatever the cloud did not acknowledge and
//! re-publish their retained status on connect) and is why production fleets should use an
//! external broker with persistence.
//!
//! With a [`BrokerLogin`] (`mqtt.embedded.authenticate`), every CONNECT must carry a username and
//! password: the v5 listener accepts only the cloud's own login (the ingest's); agents connect
//! to the v3.1.1 address through `caudal-broker`'s gate, which checks the cloud's login or an
//! agent's (the given function: the catchment module's site credentials) and authorizes every
//! topic. rumqttd 0.20 cannot: its auth handler sees only a CONNECT's credentials
//! (`docs/adr/007-broker-authorization.md`). The rules, enforced in [`SiteAuthority`]:
//! - a site's login (username = site id) publishes only on its own `telemetry`, `status` and
//!   `command/result` topics (its last will included) and subscribes only to its own `ack`,
//!   `command` and `config/desired`, each by name (`caudal_common::topic::site_may_publish`,
//!   `site_may_subscribe`);
//! - only the cloud's login publishes acks, commands and desired configuration;
//! - a refusal is logged with site, topic and reason and counted in
//!   `caudal_cloud_mqtt_refused_total{site, action, reason}`: a refused PUBLISH closes the
//!   connection, a refused filter gets the SUBACK failure code, a refused will a CONNACK 5.
//!
//! The rumqttd listener behind the gate listens on a free loopback port and accepts only a
//! random secret the gate puts into each CONNECT it passes on, so it cannot be used to go round
//! the gate. Without authentication there is nothing to authorize on: the broker then refuses
//! to listen on anything but loopback ([`BrokerError::Unauthenticated`]).

use crate::core::config::{EmbeddedBrokerConfig, Secret};
use caudal_broker::{
    Action, Authority, Broker, GatePlan, ListenerError, ListenerPlan, Protocol, Ready,
};
use caudal_common::topic;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
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
    /// Anyone who can reach a non-loopback address could publish in any site's name.
    #[error(
        "embedded broker: refusing to listen on {addr} (mqtt.embedded.{key}) without \
         authentication: set mqtt.embedded.authenticate = true (with mqtt.username and \
         mqtt.password), or listen on a loopback address"
    )]
    Unauthenticated { addr: SocketAddr, key: &'static str },
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
    /// Where refused publishes and subscriptions are counted.
    pub refusals: RefusalMetrics,
}

impl std::fmt::Debug for BrokerLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerLogin")
            .field("cloud_username", &self.cloud_username)
            .finish_non_exhaustive()
    }
}

impl BrokerLogin {
    /// Whether `username` may log in with `password`: the cloud's own login, or with
    /// `agents_too` a site's.
    async fn check(&self, username: String, password: String, agents_too: bool) -> bool {
        use subtle::ConstantTimeEq;
        if username == self.cloud_username {
            return bool::from(
                password
                    .as_bytes()
                    .ct_eq(self.cloud_password.expose().as_bytes()),
            );
        }
        agents_too && (self.agents)(username, password).await
    }
}

/// Labels of `caudal_cloud_mqtt_refused_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `publish`, `will` or `subscribe`.
    pub action: String,
    /// [`topic::Denied::label`].
    pub reason: String,
    pub site: String,
}

/// Publishes and subscriptions the embedded broker refused, per site.
#[derive(Clone, Debug, Default)]
pub struct RefusalMetrics {
    pub refused: Family<RefusalLabels, Counter>,
}

impl RefusalMetrics {
    pub fn register(registry: &mut Registry) -> RefusalMetrics {
        let m = RefusalMetrics::default();
        registry.register(
            "mqtt_refused",
            "Publishes (and last wills) and subscriptions the embedded broker refused a site's login, by site, action (publish, will, subscribe) and reason (other_site, cloud_only, agent_only, wildcard, foreign)",
            m.refused.clone(),
        );
        m
    }
}

/// The embedded broker's rules (module doc): who logs in at the agents' address and what each
/// login may publish and subscribe to.
pub struct SiteAuthority {
    login: BrokerLogin,
}

impl Authority for SiteAuthority {
    fn login(
        &self,
        username: String,
        password: String,
    ) -> Pin<Box<dyn Future<Output = bool> + Send>> {
        let login = self.login.clone();
        Box::pin(async move { login.check(username, password, true).await })
    }

    fn allows(&self, username: &str, action: Action, topic: &str) -> bool {
        // The gate asks only about logins it accepted: a username is the cloud or a site.
        if username == self.login.cloud_username {
            return true;
        }
        let verdict = match action {
            Action::Publish | Action::Will => topic::site_may_publish(username, topic),
            Action::Subscribe => topic::site_may_subscribe(username, topic),
        };
        let Err(denied) = verdict else {
            return true;
        };
        tracing::warn!(
            site = username,
            topic,
            action = action.as_str(),
            reason = %denied,
            "MQTT {} refused",
            action.as_str()
        );
        self.login
            .refusals
            .refused
            .get_or_create(&RefusalLabels {
                action: action.as_str().to_string(),
                reason: denied.label().to_string(),
                site: username.to_string(),
            })
            .inc();
        false
    }
}

impl BrokerLogin {
    /// Installs the v5 listener's check: the cloud's own login only.
    fn install_cloud_only(&self, settings: &mut ConnectionSettings) {
        let login = self.clone();
        settings.set_auth_handler(move |_client_id, username: String, password: String| {
            let login = login.clone();
            async move { login.check(username, password, false).await }
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
    /// replaced by a port that was free a moment before. Any client may connect, so both
    /// addresses must be loopback ones.
    pub fn start(cfg: &EmbeddedBrokerConfig) -> Result<EmbeddedBroker, BrokerError> {
        EmbeddedBroker::start_with_login(cfg, None)
    }

    /// [`EmbeddedBroker::start`], and with `login` every client must log in and agents go
    /// through the gate that authorizes their topics. Without `login`, only loopback addresses
    /// are accepted.
    pub fn start_with_login(
        cfg: &EmbeddedBrokerConfig,
        login: Option<BrokerLogin>,
    ) -> Result<EmbeddedBroker, BrokerError> {
        // Without a login there is no site to authorize: anyone who reached the broker could
        // publish in any site's name. So only loopback, where only this machine reaches it.
        if login.is_none() {
            for (addr, key) in [(cfg.listen, "listen"), (cfg.listen_v5, "listen_v5")] {
                if !addr.ip().is_loopback() {
                    return Err(BrokerError::Unauthenticated { addr, key });
                }
            }
        }
        let public_v4 = bindable(cfg.listen, "listen")?;
        let v5 = bindable(cfg.listen_v5, "listen_v5")?;
        // With a login, rumqttd's v3.1.1 listener sits behind the gate, on loopback, and
        // accepts only the gate's secret.
        let gate_secret = login.as_ref().map(|_| gate_secret());
        let v4 = match &gate_secret {
            Some(_) => bindable(SocketAddr::from(([127, 0, 0, 1], 0)), "listen")?,
            None => public_v4,
        };
        let router = RouterConfig {
            max_connections: cfg.max_connections,
            max_outgoing_packet_count: 200,
            max_segment_size: (16 << 20).max(4 * cfg.max_payload_bytes),
            max_segment_count: 4,
            ..RouterConfig::default()
        };
        const GATE_USER: &str = "caudal-gate";
        let connection_timeout_ms = 10_000;
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
                        connection_timeout_ms,
                        max_payload_size: cfg.max_payload_bytes,
                        max_inflight_count: 100,
                        auth: None,
                        external_auth: None,
                        dynamic_filters: true,
                    },
                };
                // The readiness probe logs in as the cloud on v5, as the gate behind it on v4.
                let mut probe = None;
                if let (Some(l), Some(secret)) = (&login, &gate_secret) {
                    if is_v5 {
                        l.install_cloud_only(&mut settings.connections);
                        probe = Some((l.cloud_username.as_str(), l.cloud_password.expose()));
                    } else {
                        install_gate_only(&mut settings.connections, secret.clone());
                        probe = Some((GATE_USER, secret.expose()));
                    }
                }
                ListenerPlan {
                    settings,
                    protocol,
                    ready: Ready::AnswersConnect { login: probe },
                }
            })
            .collect();
        let mut broker = Broker::start(router, plans)?;
        if let (Some(l), Some(secret)) = (login, gate_secret) {
            let probe_user = l.cloud_username.clone();
            let probe_password = l.cloud_password.clone();
            let plan = GatePlan {
                listen: public_v4,
                upstream: v4,
                upstream_password: secret.expose().to_string(),
                max_packet_size: cfg.max_payload_bytes,
                connect_timeout: std::time::Duration::from_millis(u64::from(connection_timeout_ms)),
                max_connections: cfg.max_connections,
                authority: Arc::new(SiteAuthority { login: l }),
            };
            broker.start_gate(plan, (&probe_user, probe_password.expose()))?;
        }
        tracing::info!(v4 = %public_v4, v5 = %v5, "embedded MQTT broker listening");
        Ok(EmbeddedBroker {
            v4: public_v4,
            v5,
            broker,
        })
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

/// A fresh random secret: the password of every connection the gate passes on.
fn gate_secret() -> Secret {
    let mut raw = [0u8; 24];
    argon2::password_hash::rand_core::RngCore::fill_bytes(
        &mut argon2::password_hash::rand_core::OsRng,
        &mut raw,
    );
    Secret::new(raw.iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// rumqttd's check behind the gate: only the gate's secret.
fn install_gate_only(settings: &mut ConnectionSettings, secret: Secret) {
    settings.set_auth_handler(move |_client_id, _username: String, password: String| {
        use subtle::ConstantTimeEq;
        let ok = bool::from(password.as_bytes().ct_eq(secret.expose().as_bytes()));
        async move { ok }
    });
}

/// `addr` with a port of 0 replaced by a free port, or why it cannot be bound (naming its key).
fn bindable(addr: SocketAddr, key: &'static str) -> Result<SocketAddr, BrokerError> {
    caudal_broker::bindable(addr).map_err(|source| BrokerError::Bind { addr, key, source })
}
