//! An embedded rumqttd broker on loopback ports that a scenario can stop and start again, to play
//! a broker outage.
//!
//! rumqttd 0.20's `Broker::start` blocks its caller forever and spawns listener threads it never
//! stops, so this module drives rumqttd's public pieces itself: one `Router` and one `Server` per
//! listener (MQTT v4, MQTT v5 and, when asked for, MQTT v4 and v5 over TLS), each listener on a
//! thread of its own with its own current-thread runtime. The TLS listeners require a client
//! certificate (rumqttd's `verify-client-cert`), so they exercise mutual TLS. [`Broker::stop`] drops those runtimes, which
//! closes the listening sockets and every client connection at once: clients see the connection
//! go away without a DISCONNECT, as when a broker process dies. [`Broker::restart`] builds a fresh
//! router on the same ports, so the broker has forgotten every session, subscription and retained
//! message, as a restarted broker without persistence has.
//!
//! Known limitation: rumqttd's router thread holds a sender to its own queue and never exits, so
//! every stop leaves one idle thread blocked in the test process. Scenarios restart a broker a
//! handful of times, which is harmless.

use anyhow::{Context, bail};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::{
    ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings, TlsConfig,
};
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Largest payload the broker accepts; well above the agent's batch size limit.
const MAX_PAYLOAD: usize = 1 << 20;
/// How long [`Broker::start`] waits for a listener to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How the broker is set up.
#[derive(Debug, Clone, Default)]
pub struct BrokerOptions {
    /// Require this username and password on every listener; `None` accepts anyone.
    pub auth: Option<(String, String)>,
    /// Also listen for MQTT v4 over TLS with this server certificate and key (PEM files).
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

/// One listener thread and the switch that stops it.
struct Listener {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl Listener {
    fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A running (or stopped) embedded broker. Dropping it stops it.
pub struct Broker {
    opts: BrokerOptions,
    v4: SocketAddr,
    v5: SocketAddr,
    tls: Option<SocketAddr>,
    tls_v5: Option<SocketAddr>,
    listeners: Vec<Listener>,
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
    pub fn start() -> anyhow::Result<Broker> {
        Broker::start_with(BrokerOptions::default())
    }

    /// Starts a broker with `opts` on free loopback ports.
    pub fn start_with(opts: BrokerOptions) -> anyhow::Result<Broker> {
        // A port found free may be taken by someone else before rumqttd binds it: try again.
        let mut last_err = None;
        for _ in 0..5 {
            let mut b = Broker {
                v4: free_port()?,
                v5: free_port()?,
                tls: match opts.tls {
                    Some(_) => Some(free_port()?),
                    None => None,
                },
                tls_v5: match opts.tls {
                    Some(_) => Some(free_port()?),
                    None => None,
                },
                opts: opts.clone(),
                listeners: Vec::new(),
            };
            match b.restart() {
                Ok(()) => return Ok(b),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("broker did not start")))
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
        !self.listeners.is_empty()
    }

    /// Stops every listener and drops every client connection. Idempotent.
    pub fn stop(&mut self) {
        for l in self.listeners.drain(..) {
            l.stop();
        }
    }

    /// Starts the broker again on the same ports with a fresh router (no sessions, no retained
    /// messages). Stops it first if it is running.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        let router = Router::new(
            0,
            RouterConfig {
                max_connections: 64,
                max_outgoing_packet_count: 200,
                max_segment_size: 16 << 20,
                max_segment_count: 4,
                ..RouterConfig::default()
            },
        );
        let router_tx = router.spawn();
        let mut plan: Vec<(SocketAddr, Option<TlsConfig>, bool)> =
            vec![(self.v4, None, false), (self.v5, None, true)];
        if let Some(tls) = &self.opts.tls {
            let config = || TlsConfig::Rustls {
                capath: Some(tls.client_ca.display().to_string()),
                certpath: tls.cert.display().to_string(),
                keypath: tls.key.display().to_string(),
            };
            for (addr, v5) in [(self.tls, false), (self.tls_v5, true)] {
                if let Some(addr) = addr {
                    plan.push((addr, Some(config()), v5));
                }
            }
        }
        for (addr, tls, v5) in plan {
            let settings = self.settings(addr, tls);
            let router_tx = router_tx.clone();
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let thread = thread::Builder::new()
                .name(format!("broker-{}", addr.port()))
                .spawn(move || -> Result<(), String> {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| e.to_string())?;
                    let r = rt.block_on(async move {
                        if v5 {
                            let mut s = Server::new(settings, router_tx, V5);
                            tokio::select! {
                                r = s.start(LinkType::Remote) => r.map_err(|e| e.to_string()),
                                _ = stop_rx => Ok(()),
                            }
                        } else {
                            let mut s = Server::new(settings, router_tx, V4);
                            tokio::select! {
                                r = s.start(LinkType::Remote) => r.map_err(|e| e.to_string()),
                                _ = stop_rx => Ok(()),
                            }
                        }
                    });
                    // Dropping the runtime drops every connection task of this listener.
                    drop(rt);
                    r
                })
                .context("spawning a broker listener thread")?;
            self.listeners.push(Listener {
                stop: Some(stop_tx),
                thread: Some(thread),
            });
            if let Err(e) = self.wait_ready(addr) {
                self.stop();
                return Err(e);
            }
        }
        Ok(())
    }

    fn settings(&self, listen: SocketAddr, tls: Option<TlsConfig>) -> ServerSettings {
        ServerSettings {
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
        }
    }

    /// Waits until `addr` accepts TCP connections, or the listener thread has failed.
    fn wait_ready(&mut self, addr: SocketAddr) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            let finished = self
                .listeners
                .last()
                .and_then(|l| l.thread.as_ref())
                .is_some_and(JoinHandle::is_finished);
            if finished {
                let reason = self
                    .listeners
                    .pop()
                    .and_then(|mut l| l.thread.take())
                    .map(|t| match t.join() {
                        Ok(Ok(())) => "stopped".to_string(),
                        Ok(Err(e)) => e,
                        Err(_) => "panicked".to_string(),
                    })
                    .unwrap_or_default();
                bail!("broker listener on {addr} failed: {reason}");
            }
            if Instant::now() > deadline {
                bail!("broker listener on {addr} not ready within {READY_TIMEOUT:?}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A loopback address whose port was free a moment ago.
fn free_port() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(l.local_addr()?)
}
