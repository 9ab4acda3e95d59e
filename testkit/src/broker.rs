//! An embedded rumqttd broker on loopback ports that a test can stop and start again, to play a
//! broker outage.
//!
//! It listens for MQTT v4 and MQTT v5 and, when asked for, MQTT v4 and v5 over TLS; the TLS
//! listeners require a client certificate (rumqttd's `verify-client-cert`), so they exercise
//! mutual TLS. The router and listener threads are `caudal-broker`'s, the same as the cloud's
//! embedded broker: [`Broker::stop`] closes the listening sockets and every client connection at
//! once, so clients see the connection go away without a DISCONNECT, as when a broker process
//! dies. [`Broker::restart`] builds a fresh router on the same ports, so the broker has forgotten
//! every session, subscription and retained message, as a restarted broker without persistence
//! has. Every stop leaves one idle rumqttd router thread behind (`caudal-broker`'s known
//! limitation): tests restart a broker a handful of times, which is harmless.

use caudal_broker::{ListenerError, ListenerPlan, Protocol, Ready};
use rumqttd::{ConnectionSettings, RouterConfig, ServerSettings, TlsConfig};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Largest payload the broker accepts; well above the agent's batch size limit.
const MAX_PAYLOAD: usize = 1 << 20;

/// Why the test broker did not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("test broker: no free loopback port: {0}")]
    Port(std::io::Error),
    #[error("test broker: {0}")]
    Listener(#[from] ListenerError),
}

/// How the broker is set up.
#[derive(Debug, Clone, Default)]
pub struct BrokerOptions {
    /// Require this username and password on every listener; `None` accepts anyone.
    pub auth: Option<(String, String)>,
    /// Also listen for MQTT v4 and v5 over TLS with this server certificate and key (PEM files).
    pub tls: Option<BrokerTls>,
}

/// The TLS listener's identity, and the CA its clients' certificates must chain to (the
/// listener requires mutual TLS).
#[derive(Debug, Clone)]
pub struct BrokerTls {
    /// PEM certificate chain presented to clients.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// PEM CA that issued the clients' certificates.
    pub client_ca: PathBuf,
}

/// A running (or stopped) embedded broker. Dropping it stops it.
pub struct Broker {
    opts: BrokerOptions,
    v4: SocketAddr,
    v5: SocketAddr,
    tls: Option<SocketAddr>,
    tls_v5: Option<SocketAddr>,
    running: Option<caudal_broker::Broker>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("v4", &self.v4)
            .field("v5", &self.v5)
            .field("tls", &self.tls)
            .field("tls_v5", &self.tls_v5)
            .field("running", &self.is_running())
            .finish()
    }
}

impl Broker {
    /// Starts a broker without authentication on free loopback ports.
    pub fn start() -> Result<Broker, BrokerError> {
        Broker::start_with(BrokerOptions::default())
    }

    /// Starts a broker with `opts` on free loopback ports.
    pub fn start_with(opts: BrokerOptions) -> Result<Broker, BrokerError> {
        // A port found free may be taken by someone else before rumqttd binds it: try again.
        let mut last_err = None;
        for _ in 0..5 {
            let tls = opts.tls.is_some();
            let mut b = Broker {
                v4: free_port()?,
                v5: free_port()?,
                tls: if tls { Some(free_port()?) } else { None },
                tls_v5: if tls { Some(free_port()?) } else { None },
                opts: opts.clone(),
                running: None,
            };
            match b.restart() {
                Ok(()) => return Ok(b),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| {
            BrokerError::Port(std::io::Error::other("no attempt to start the broker"))
        }))
    }

    /// The MQTT v4 listener.
    pub fn v4_addr(&self) -> SocketAddr {
        self.v4
    }

    /// The MQTT v5 listener.
    pub fn v5_addr(&self) -> SocketAddr {
        self.v5
    }

    /// The MQTT v4 over TLS listener, when the broker was started with [`BrokerOptions::tls`].
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls
    }

    /// `mqtt://127.0.0.1:<v4 port>`.
    pub fn url(&self) -> String {
        format!("mqtt://{}", self.v4)
    }

    /// `mqtts://127.0.0.1:<tls port>`, when there is a TLS listener.
    pub fn tls_url(&self) -> Option<String> {
        self.tls.map(|a| format!("mqtts://{a}"))
    }

    /// `mqtts://127.0.0.1:<port>` of the MQTT v5 over TLS listener, when there is one.
    pub fn tls_v5_url(&self) -> Option<String> {
        self.tls_v5.map(|a| format!("mqtts://{a}"))
    }

    pub fn is_running(&self) -> bool {
        self.running.as_ref().is_some_and(|b| b.is_running())
    }

    /// Stops every listener and drops every client connection. Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut b) = self.running.take() {
            b.stop();
        }
    }

    /// Starts the broker again on the same ports with a fresh router (no sessions, no retained
    /// messages). Stops it first if it is running.
    pub fn restart(&mut self) -> Result<(), BrokerError> {
        self.stop();
        let router = RouterConfig {
            max_connections: 64,
            max_outgoing_packet_count: 200,
            max_segment_size: 16 << 20,
            max_segment_count: 4,
            ..RouterConfig::default()
        };
        // Plain listeners are ready once they accept connections, as are the TLS ones, which
        // the readiness probe cannot speak to.
        let mut plans = vec![
            self.plan(self.v4, None, Protocol::V4),
            self.plan(self.v5, None, Protocol::V5),
        ];
        if let Some(tls) = &self.opts.tls {
            let config = || TlsConfig::Rustls {
                capath: Some(tls.client_ca.display().to_string()),
                certpath: tls.cert.display().to_string(),
                keypath: tls.key.display().to_string(),
            };
            for (addr, protocol) in [(self.tls, Protocol::V4), (self.tls_v5, Protocol::V5)] {
                if let Some(addr) = addr {
                    plans.push(self.plan(addr, Some(config()), protocol));
                }
            }
        }
        self.running = Some(caudal_broker::Broker::start(router, plans)?);
        Ok(())
    }

    fn plan(
        &self,
        listen: SocketAddr,
        tls: Option<TlsConfig>,
        protocol: Protocol,
    ) -> ListenerPlan<'static> {
        ListenerPlan {
            settings: ServerSettings {
                name: format!("listener-{}", listen.port()),
                listen,
                tls,
                next_connection_delay_ms: 0,
                connections: ConnectionSettings {
                    connection_timeout_ms: 5_000,
                    max_payload_size: MAX_PAYLOAD,
                    max_inflight_count: 100,
                    auth: self.opts.auth.clone().map(|(u, p)| HashMap::from([(u, p)])),
                    external_auth: None,
                    dynamic_filters: true,
                },
            },
            protocol,
            ready: Ready::Accepts,
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A loopback address whose port was free a moment ago.
fn free_port() -> Result<SocketAddr, BrokerError> {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    caudal_broker::bindable(any).map_err(BrokerError::Port)
}
