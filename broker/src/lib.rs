//! An embedded rumqttd that can be stopped: one router, each listener on a thread of its own,
//! started only once it is ready. The cloud's embedded broker (`caudal-cloud`, with its login
//! check) and the test broker (`caudal-testkit`, stopped and started again to play an outage)
//! are both this, with their own settings.
//!
//! rumqttd 0.20's `Broker::start` blocks its caller forever and spawns listener threads it never
//! stops, so this crate drives rumqttd's public pieces itself: one `Router` and one `Server` per
//! listener, each on a thread with its own current-thread runtime. [`Broker::stop`] drops those
//! runtimes, which closes the listening sockets and every client connection at once: clients
//! see the connection go away without a DISCONNECT, as when a broker process dies.
//!
//! Known limitation: rumqttd's router thread holds a sender to its own queue and never exits, so
//! every [`Broker::start`] leaves one thread that idles until the process ends once the broker
//! is stopped. A process starts a broker once (the cloud) or a handful of times (a test), which
//! is harmless.
//!
//! Nothing is kept on disk: sessions, subscriptions and retained messages live in the router and
//! are gone with it. Whether that is acceptable is the caller's to say (the cloud says why it is
//! for telemetry).

pub mod gate;

pub use gate::{Action, Authority, GatePlan};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::V5;
use rumqttd::{LinkType, Router, RouterConfig, Server, ServerSettings};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long [`Broker::start`] waits for each listener to be ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a broker did not start.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// The listener's thread ended (rumqttd could not bind, it panicked) or it was not ready
    /// within [`READY_TIMEOUT`].
    #[error("listener on {addr} failed: {reason}")]
    Failed { addr: SocketAddr, reason: String },
    #[error("cannot spawn a thread: {0}")]
    Thread(std::io::Error),
}

/// The MQTT version a listener speaks (rumqttd serves one per listener).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// MQTT 3.1.1.
    V4,
    /// MQTT 5.
    V5,
}

/// When [`Broker::start`] takes a listener for ready.
#[derive(Clone, Copy)]
pub enum Ready<'a> {
    /// Its port accepts TCP connections. For TLS listeners, which the probe cannot speak to.
    Accepts,
    /// It answers an MQTT CONNECT with a CONNACK (of any return code), logging in with `login`
    /// when given. The probe ends with a DISCONNECT, so rumqttd does not log a client that
    /// vanished before CONNECT.
    AnswersConnect { login: Option<(&'a str, &'a str)> },
}

impl std::fmt::Debug for Ready<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ready::Accepts => f.write_str("Accepts"),
            // The password is a secret: only whether there is a login.
            Ready::AnswersConnect { login } => f
                .debug_struct("AnswersConnect")
                .field("username", &login.map(|(u, _)| u))
                .finish_non_exhaustive(),
        }
    }
}

/// One listener to start: rumqttd's settings (address, TLS, connection limits, login), its
/// protocol and how to know it is ready.
#[derive(Debug)]
pub struct ListenerPlan<'a> {
    pub settings: ServerSettings,
    pub protocol: Protocol,
    pub ready: Ready<'a>,
}

/// One listener thread and the switch that stops it.
struct Listener {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl Listener {
    /// Why the thread ended, once it has; `None` while it runs.
    fn ended(&mut self) -> Option<String> {
        if !self.thread.as_ref().is_some_and(JoinHandle::is_finished) {
            return None;
        }
        Some(match self.thread.take().map(JoinHandle::join) {
            Some(Ok(Err(e))) => e,
            Some(Err(_)) => "panicked".to_string(),
            Some(Ok(Ok(()))) | None => "stopped".to_string(),
        })
    }

    fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A running broker: its router and listeners. Dropping it stops it.
pub struct Broker {
    listeners: Vec<Listener>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("listeners", &self.listeners.len())
            .finish()
    }
}

impl Broker {
    /// Starts a router with `router` and the listeners of `plans`, one after the other, each
    /// only once the one before is ready. A listener that fails or is not ready within
    /// [`READY_TIMEOUT`] stops the ones already started.
    pub fn start(
        router: RouterConfig,
        plans: Vec<ListenerPlan<'_>>,
    ) -> Result<Broker, ListenerError> {
        // The sender's type is not public in rumqttd: it is only ever inferred here.
        let router_tx = Router::new(0, router).spawn();
        let mut broker = Broker {
            listeners: Vec::new(),
        };
        for plan in plans {
            let ListenerPlan {
                settings,
                protocol,
                ready,
            } = plan;
            let addr = settings.listen;
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
                        // Two arms because `Server` is generic over the protocol.
                        match protocol {
                            Protocol::V4 => {
                                let mut s = Server::new(settings, router_tx, V4);
                                tokio::select! {
                                    r = s.start(LinkType::Remote) => r.map_err(|e| e.to_string()),
                                    _ = stop_rx => Ok(()),
                                }
                            }
                            Protocol::V5 => {
                                let mut s = Server::new(settings, router_tx, V5);
                                tokio::select! {
                                    r = s.start(LinkType::Remote) => r.map_err(|e| e.to_string()),
                                    _ = stop_rx => Ok(()),
                                }
                            }
                        }
                    });
                    // Dropping the runtime drops every connection task of this listener.
                    drop(rt);
                    r
                });
            let thread = match thread {
                Ok(t) => t,
                Err(e) => {
                    broker.stop();
                    return Err(ListenerError::Thread(e));
                }
            };
            broker.listeners.push(Listener {
                stop: Some(stop_tx),
                thread: Some(thread),
            });
            if let Err(e) = broker.wait_ready(addr, protocol, ready) {
                broker.stop();
                return Err(e);
            }
        }
        Ok(broker)
    }

    /// Starts `plan`'s gate (an authorizing layer in front of one of this broker's v3.1.1
    /// listeners, [`gate`]) on a thread of its own, and waits until it answers a CONNECT with
    /// `probe` (a login its authority accepts). A gate that fails stops the whole broker.
    pub fn start_gate(&mut self, plan: GatePlan, probe: (&str, &str)) -> Result<(), ListenerError> {
        let addr = plan.listen;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = thread::Builder::new()
            .name(format!("mqtt-gate-{}", addr.port()))
            .spawn(move || -> Result<(), String> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                let r = rt.block_on(async move {
                    let listener = tokio::net::TcpListener::bind(addr)
                        .await
                        .map_err(|e| e.to_string())?;
                    tokio::select! {
                        r = gate::serve(listener, plan) => r,
                        _ = stop_rx => Ok(()),
                    }
                });
                // Dropping the runtime drops every connection through the gate.
                drop(rt);
                r
            });
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                self.stop();
                return Err(ListenerError::Thread(e));
            }
        };
        self.listeners.push(Listener {
            stop: Some(stop_tx),
            thread: Some(thread),
        });
        let ready = Ready::AnswersConnect { login: Some(probe) };
        if let Err(e) = self.wait_ready(addr, Protocol::V4, ready) {
            self.stop();
            return Err(e);
        }
        Ok(())
    }

    /// Whether the listeners run (not yet stopped).
    pub fn is_running(&self) -> bool {
        !self.listeners.is_empty()
    }

    /// Closes the listeners and every client connection. Idempotent.
    pub fn stop(&mut self) {
        for l in self.listeners.drain(..) {
            l.stop();
        }
    }

    /// Waits until the listener started last on `addr` is ready, or its thread has ended.
    fn wait_ready(
        &mut self,
        addr: SocketAddr,
        protocol: Protocol,
        ready: Ready<'_>,
    ) -> Result<(), ListenerError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let answered = match ready {
                Ready::Accepts => {
                    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).map(drop)
                }
                Ready::AnswersConnect { login } => {
                    answers_connect(addr, protocol == Protocol::V5, login)
                }
            };
            if answered.is_ok() {
                return Ok(());
            }
            if let Some(reason) = self.listeners.last_mut().and_then(Listener::ended) {
                self.listeners.pop();
                return Err(ListenerError::Failed { addr, reason });
            }
            if Instant::now() > deadline {
                return Err(ListenerError::Failed {
                    addr,
                    reason: format!("not accepting connections after {READY_TIMEOUT:?}"),
                });
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Checks that `addr` can be bound now and returns it, with a port of 0 replaced by a port that
/// was free a moment ago. Binding first gives a clear error when a port is taken (another broker
/// on 1883) instead of a listener thread that dies while the other broker answers the probe.
pub fn bindable(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    TcpListener::bind(addr)?.local_addr()
}

/// Connects to `addr` as an MQTT client (CONNECT, CONNACK, DISCONNECT), so readiness is "the
/// listener answers MQTT".
fn answers_connect(addr: SocketAddr, v5: bool, login: Option<(&str, &str)>) -> std::io::Result<()> {
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
