//! The embedded MQTT broker (rumqttd), started when no external broker is configured, so a
//! single machine needs nothing but `caudal-cloud`.
//!
//! rumqttd serves one protocol per listener: agents (MQTT v3.1.1) connect to `listen`, the
//! ingest (MQTT v5, for shared subscriptions) to `listen_v5`. rumqttd's `Broker::start` blocks
//! forever and cannot be stopped, so this module drives rumqttd's public pieces itself: one
//! `Router` thread and one `Server` per listener, each on a thread with its own current-thread
//! runtime, which [`EmbeddedBroker::stop`] drops (closing the sockets and every connection).
//! rumqttd's router thread never exits; it idles until the process ends.
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
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::{ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings};
use std::future::Future;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::pin::Pin;
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long [`EmbeddedBroker::start`] waits for a listener to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

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

/// A running embedded broker. Dropping it stops it.
pub struct EmbeddedBroker {
    v4: SocketAddr,
    v5: SocketAddr,
    listeners: Vec<Listener>,
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
        // Binding first gives a clear error when the port is taken (a Mosquitto on 1883) instead
        // of a listener thread that dies while another broker answers our readiness probe.
        let v4 = probe(cfg.listen, "listen")?;
        let v5 = probe(cfg.listen_v5, "listen_v5")?;
        let router = Router::new(
            0,
            RouterConfig {
                max_connections: cfg.max_connections,
                max_outgoing_packet_count: 200,
                max_segment_size: (16 << 20).max(4 * cfg.max_payload_bytes),
                max_segment_count: 4,
                ..RouterConfig::default()
            },
        );
        let router_tx = router.spawn();
        let mut broker = EmbeddedBroker {
            v4,
            v5,
            listeners: Vec::new(),
        };
        for (addr, is_v5) in [(v4, false), (v5, true)] {
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
            let router_tx = router_tx.clone();
            let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
            let thread = thread::Builder::new()
                .name(format!("mqtt-{}", addr.port()))
                .spawn(move || -> Result<(), String> {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| e.to_string())?;
                    let r = rt.block_on(async move {
                        if is_v5 {
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
                .map_err(BrokerError::Thread)?;
            broker.listeners.push(Listener {
                stop: Some(stop_tx),
                thread: Some(thread),
            });
            let probe_login = login
                .as_ref()
                .map(|l| (l.cloud_username.as_str(), l.cloud_password.expose()));
            broker.wait_ready(addr, is_v5, probe_login)?;
        }
        tracing::info!(v4 = %v4, v5 = %v5, "embedded MQTT broker listening");
        Ok(broker)
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
        for l in self.listeners.drain(..) {
            l.stop();
        }
    }

    fn wait_ready(
        &mut self,
        addr: SocketAddr,
        is_v5: bool,
        login: Option<(&str, &str)>,
    ) -> Result<(), BrokerError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if speaks_mqtt(addr, is_v5, login).is_ok() {
                return Ok(());
            }
            let finished = self
                .listeners
                .last()
                .and_then(|l| l.thread.as_ref())
                .is_some_and(JoinHandle::is_finished);
            if finished {
                let reason = match self.listeners.pop().and_then(|mut l| l.thread.take()) {
                    Some(t) => match t.join() {
                        Ok(Ok(())) => "stopped".to_string(),
                        Ok(Err(e)) => e,
                        Err(_) => "panicked".to_string(),
                    },
                    None => "stopped".to_string(),
                };
                self.stop();
                return Err(BrokerError::Listener { addr, reason });
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(BrokerError::Listener {
                    addr,
                    reason: format!("not accepting connections after {READY_TIMEOUT:?}"),
                });
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Connects to `addr` as an MQTT client (CONNECT, CONNACK, DISCONNECT), so readiness is "the
/// listener answers MQTT", and rumqttd does not log a client that vanished before CONNECT.
fn speaks_mqtt(addr: SocketAddr, v5: bool, login: Option<(&str, &str)>) -> std::io::Result<()> {
    const DISCONNECT: &[u8] = &[0xe0, 0];
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    s.write_all(&connect_packet(v5, login))?;
    let mut head = [0u8; 2];
    s.read_exact(&mut head)?;
    if head[0] != 0x20 || head[1] > 127 {
        return Err(std::io::Error::other(format!(
            "expected CONNACK, got {:#x} {:#x}",
            head[0], head[1]
        )));
    }
    // Read the whole CONNACK and let the broker close first: unread bytes or an early close
    // would reset the connection, which rumqttd logs as an error.
    let mut rest = vec![0u8; usize::from(head[1])];
    s.read_exact(&mut rest)?;
    s.write_all(DISCONNECT)?;
    let _ = s.read(&mut [0u8; 16]);
    Ok(())
}

/// A CONNECT packet: client id `p`, clean session, keep-alive 10 s, with the login when given
/// (MQTT 3.1.1 §3.1, MQTT 5 §3.1; v5 adds an empty property length after the keep-alive).
fn connect_packet(v5: bool, login: Option<(&str, &str)>) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &[u8]) {
        let len = u16::try_from(s.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&s[..usize::from(len)]);
    }
    let mut body = Vec::new();
    string(&mut body, b"MQTT");
    body.push(if v5 { 5 } else { 4 });
    body.push(if login.is_some() {
        0x02 | 0x80 | 0x40
    } else {
        0x02
    });
    body.extend_from_slice(&10u16.to_be_bytes());
    if v5 {
        body.push(0);
    }
    string(&mut body, b"p");
    if let Some((user, password)) = login {
        string(&mut body, user.as_bytes());
        string(&mut body, password.as_bytes());
    }
    let mut packet = vec![0x10];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if len == 0 {
            break;
        }
    }
    packet.extend_from_slice(&body);
    packet
}

/// Checks that `addr` can be bound and returns it, with a port of 0 replaced by a free port.
fn probe(addr: SocketAddr, key: &'static str) -> Result<SocketAddr, BrokerError> {
    let l = TcpListener::bind(addr).map_err(|source| BrokerError::Bind { addr, key, source })?;
    l.local_addr()
        .map_err(|source| BrokerError::Bind { addr, key, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_packets_match_the_specification() {
        assert_eq!(
            connect_packet(false, None),
            [
                0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 10, 0, 1, b'p'
            ]
        );
        assert_eq!(
            connect_packet(true, None),
            [
                0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 10, 0, 0, 1, b'p'
            ]
        );
        let p = connect_packet(false, Some(("u", &"x".repeat(200))));
        // 13 + (2 + 1) + (2 + 200) = 218 bytes: a two-byte remaining length.
        assert_eq!(&p[..4], &[0x10, 0xda, 0x01, 0]);
        assert_eq!(p[10], 0xc2);
        assert_eq!(p.len(), 3 + 218);
    }
}
