//! The gate: an authorizing MQTT v3.1.1 layer in front of a rumqttd listener. rumqttd 0.20 can
//! only check a login at CONNECT (its auth handler sees client id, username and password, never
//! a topic), so every per-client topic rule is enforced here, on the one address clients reach;
//! the rumqttd listener behind it listens on loopback and accepts only the gate's own secret.
//!
//! Per connection, in order:
//! - **CONNECT** (within the connect timeout, else the socket is closed): the login is checked by
//!   the [`Authority`]; a refused or missing login is answered with CONNACK 4 (bad username or
//!   password), a last will on a topic the login may not publish on with CONNACK 5 (not
//!   authorized), and the connection closed. An accepted CONNECT is passed on with the gate's
//!   secret instead of the client's password and the client id prefixed with the username
//!   (`{username}:{client id}`; a site id has no `:`), so one login can never take over another login's session.
//! - **PUBLISH** on a topic the login may not publish on: MQTT 3.1.1 has no refusal for a
//!   PUBLISH (§3.3.5: acknowledge it or close the connection), so the gate closes the connection
//!   without passing the PUBLISH on: nothing of it reaches any subscriber, and the client sees
//!   that it was refused instead of a PUBACK that would look like success.
//! - **SUBSCRIBE**: each refused filter is answered with the SUBACK failure code 0x80 in its
//!   place; the allowed ones go to the broker (the SUBSCRIBE rewritten without the refused
//!   filters, their positions put back into the broker's SUBACK), a SUBSCRIBE with no allowed
//!   filter is answered by the gate itself. The connection stays open.
//! - Every other packet, and everything the broker sends, passes unchanged.
//!
//! Packets are framed and parsed with rumqttd's own codec (`rumqttd::protocol::v4`), so the gate
//! and the broker cannot disagree on where a packet ends or what topic it names. The gate holds
//! at most `max_connections` connections (more are closed at accept), each at most one packet
//! of `max_packet_size` from the client and what one read from the broker brings.

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::v4::{self, V4};
use rumqttd::protocol::{
    ConnAck, ConnectReturnCode, Packet, Protocol, SubAck, Subscribe, SubscribeReasonCode,
};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};

/// Most SUBSCRIBEs with refused filters a connection may have waiting for the broker's SUBACK.
const PENDING_SUBACKS: usize = 16;

/// What a client asks to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A PUBLISH.
    Publish,
    /// The last will of a CONNECT (a PUBLISH the broker makes for the client later).
    Will,
    /// A SUBSCRIBE filter.
    Subscribe,
}

impl Action {
    /// `publish`, `will` or `subscribe`, for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Publish => "publish",
            Action::Will => "will",
            Action::Subscribe => "subscribe",
        }
    }
}

/// Who may log in and what each login may do. A refusal is the authority's to count and log:
/// it knows who the login is and why.
pub trait Authority: Send + Sync + 'static {
    /// Whether `username` may log in with `password`.
    fn login(
        &self,
        username: String,
        password: String,
    ) -> Pin<Box<dyn Future<Output = bool> + Send>>;
    /// Whether the logged-in `username` may do `action` on `topic` (a topic, or for
    /// [`Action::Subscribe`] a filter).
    fn allows(&self, username: &str, action: Action, topic: &str) -> bool;
}

/// A gate to run: where clients connect, the broker listener behind it, and its limits.
pub struct GatePlan {
    /// The address clients connect to.
    pub listen: SocketAddr,
    /// The rumqttd v3.1.1 listener behind the gate (loopback).
    pub upstream: SocketAddr,
    /// The password every connection passed on carries; the listener behind accepts only it.
    pub upstream_password: String,
    /// Largest packet accepted from a client (its remaining length), as rumqttd's
    /// `max_payload_size`.
    pub max_packet_size: usize,
    /// How long a new connection may take to send its CONNECT.
    pub connect_timeout: Duration,
    /// Most client connections at once.
    pub max_connections: usize,
    pub authority: Arc<dyn Authority>,
}

impl std::fmt::Debug for GatePlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatePlan")
            .field("listen", &self.listen)
            .field("upstream", &self.upstream)
            .field("max_packet_size", &self.max_packet_size)
            .field("max_connections", &self.max_connections)
            .finish_non_exhaustive()
    }
}

/// Why one connection through the gate ended (logged at debug: a client that goes away is
/// ordinary, a refusal is logged by the [`Authority`]).
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("MQTT: {0}")]
    Mqtt(#[from] rumqttd::protocol::Error),
    #[error("no CONNECT within {0:?}")]
    ConnectTimeout(Duration),
    #[error("the first packet is not a CONNECT")]
    NotConnect,
    #[error("a packet parsed as another type than its header says")]
    Unexpected,
    #[error("login refused")]
    LoginRefused,
    #[error("client id refused")]
    ClientId,
    #[error("last will refused")]
    WillRefused,
    #[error("PUBLISH refused")]
    PublishRefused,
    #[error("more than {PENDING_SUBACKS} SUBSCRIBEs waiting for their SUBACK")]
    TooManySubscribes,
    #[error("the connection closed")]
    Closed,
}

/// Accepts clients on `listener` until the runtime is dropped.
pub(crate) async fn serve(listener: TcpListener, plan: GatePlan) -> Result<(), String> {
    let plan = Arc::new(plan);
    let permits = Arc::new(Semaphore::new(plan.max_connections));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!(error = %e, "MQTT gate: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max = plan.max_connections, "MQTT gate: connection refused, at the connection limit");
            continue;
        };
        let plan = plan.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = connection(stream, &plan).await {
                tracing::debug!(%peer, error = %e, "MQTT gate: connection ended");
            }
        });
    }
}

/// Reads from `stream` into `buf` until it holds a whole packet: that packet's bytes.
async fn frame(
    stream: &mut (impl AsyncReadExt + Unpin),
    buf: &mut BytesMut,
    max: usize,
) -> Result<(v4::FixedHeader, BytesMut), ConnectionError> {
    loop {
        match v4::check(buf.iter(), max) {
            Ok(h) => {
                let bytes = buf.split_to(h.frame_length());
                return Ok((h, bytes));
            }
            Err(rumqttd::protocol::Error::InsufficientBytes(_)) => {
                if stream.read_buf(buf).await? == 0 {
                    return Err(ConnectionError::Closed);
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Parses one framed packet (a copy: the frame itself is passed on unchanged).
fn parse(frame: &[u8], max: usize) -> Result<Packet, ConnectionError> {
    Ok(V4.read_mut(&mut BytesMut::from(frame), max)?)
}

fn encode(packet: Packet) -> Result<Bytes, ConnectionError> {
    let mut out = BytesMut::new();
    V4.write(packet, &mut out)?;
    Ok(out.freeze())
}

async fn connack(client: &mut TcpStream, code: ConnectReturnCode) -> Result<(), ConnectionError> {
    let ack = ConnAck {
        session_present: false,
        code,
    };
    client
        .write_all(&encode(Packet::ConnAck(ack, None))?)
        .await?;
    client.shutdown().await?;
    Ok(())
}

async fn connection(mut client: TcpStream, plan: &GatePlan) -> Result<(), ConnectionError> {
    let _ = client.set_nodelay(true);
    let max = plan.max_packet_size;
    let mut buf = BytesMut::with_capacity(4096);
    let (_, first) = tokio::time::timeout(plan.connect_timeout, frame(&mut client, &mut buf, max))
        .await
        .map_err(|_| ConnectionError::ConnectTimeout(plan.connect_timeout))??;
    let Packet::Connect(mut connect, None, will, None, login) = parse(&first, max)? else {
        return Err(ConnectionError::NotConnect);
    };
    let Some(mut login) = login else {
        connack(&mut client, ConnectReturnCode::BadUserNamePassword).await?;
        return Err(ConnectionError::LoginRefused);
    };
    let user = login.username.clone();
    let password = std::mem::replace(&mut login.password, plan.upstream_password.clone());
    if !plan.authority.login(user.clone(), password).await {
        connack(&mut client, ConnectReturnCode::BadUserNamePassword).await?;
        return Err(ConnectionError::LoginRefused);
    }
    if let Some(w) = &will {
        let topic = String::from_utf8_lossy(&w.topic);
        if !plan.authority.allows(&user, Action::Will, &topic) {
            connack(&mut client, ConnectReturnCode::NotAuthorized).await?;
            return Err(ConnectionError::WillRefused);
        }
    }
    // rumqttd refuses these in a client id after registering the connection's last will, and
    // the next CONNECT with the same id then panics its listener thread: refused here first.
    if connect.client_id.contains(['+', '$', '#', '/']) || user.contains(['+', '$', '#', '/']) {
        connack(&mut client, ConnectReturnCode::ClientIdentifierNotValid).await?;
        return Err(ConnectionError::ClientId);
    }
    if !connect.client_id.is_empty() {
        connect.client_id = format!("{user}:{}", connect.client_id);
    }
    let connect = encode(Packet::Connect(connect, None, will, None, Some(login)))?;
    let mut upstream = TcpStream::connect(plan.upstream).await?;
    let _ = upstream.set_nodelay(true);
    upstream.write_all(&connect).await?;

    let (client_read, client_write) = client.split();
    let (upstream_read, upstream_write) = upstream.split();
    // SUBSCRIBEs passed on without their refused filters: packet id → the refused positions.
    let pending = Mutex::new(HashMap::new());
    let (inject, injected) = mpsc::channel(4);
    let session = Session {
        user: &user,
        plan,
        pending: &pending,
    };
    // Both directions in one task: when either ends, the other is dropped with both sockets.
    tokio::select! {
        r = session.client_to_broker(client_read, upstream_write, buf, inject) => r,
        r = session.broker_to_client(upstream_read, client_write, injected) => r,
    }
}

/// What both directions of one connection share.
#[derive(Clone, Copy)]
struct Session<'a> {
    user: &'a str,
    plan: &'a GatePlan,
    pending: &'a Mutex<HashMap<u16, Vec<usize>>>,
}

impl Session<'_> {
    /// Client → broker: every PUBLISH and SUBSCRIBE checked, the rest passed on.
    async fn client_to_broker(
        self,
        mut client: impl AsyncReadExt + Unpin,
        mut upstream: impl AsyncWriteExt + Unpin,
        mut buf: BytesMut,
        inject: mpsc::Sender<Bytes>,
    ) -> Result<(), ConnectionError> {
        let max = self.plan.max_packet_size;
        loop {
            let (header, raw) = match frame(&mut client, &mut buf, max).await {
                Ok(f) => f,
                Err(ConnectionError::Closed) => return Ok(()),
                Err(e) => return Err(e),
            };
            match header.packet_type()? {
                v4::PacketType::Publish => {
                    let Packet::Publish(p, _) = parse(&raw, max)? else {
                        return Err(ConnectionError::Unexpected);
                    };
                    let topic = String::from_utf8_lossy(&p.topic);
                    if !self
                        .plan
                        .authority
                        .allows(self.user, Action::Publish, &topic)
                    {
                        return Err(ConnectionError::PublishRefused);
                    }
                    upstream.write_all(&raw).await?;
                }
                v4::PacketType::Subscribe => {
                    let Packet::Subscribe(s, _) = parse(&raw, max)? else {
                        return Err(ConnectionError::Unexpected);
                    };
                    self.subscribe(s, raw, &mut upstream, &inject).await?;
                }
                _ => upstream.write_all(&raw).await?,
            }
        }
    }

    async fn subscribe(
        self,
        s: Subscribe,
        raw: BytesMut,
        upstream: &mut (impl AsyncWriteExt + Unpin),
        inject: &mpsc::Sender<Bytes>,
    ) -> Result<(), ConnectionError> {
        let (allowed, refused): (Vec<_>, Vec<_>) =
            s.filters.into_iter().enumerate().partition(|(_, f)| {
                self.plan
                    .authority
                    .allows(self.user, Action::Subscribe, &f.path)
            });
        if refused.is_empty() {
            upstream.write_all(&raw).await?;
            return Ok(());
        }
        let refused: Vec<usize> = refused.into_iter().map(|(i, _)| i).collect();
        if allowed.is_empty() {
            let ack = SubAck {
                pkid: s.pkid,
                return_codes: vec![SubscribeReasonCode::Failure; refused.len()],
            };
            // The receiver is gone only when the other direction ended, and with it this one.
            let _ = inject.send(encode(Packet::SubAck(ack, None))?).await;
            return Ok(());
        }
        {
            let mut pending = self
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if pending.len() >= PENDING_SUBACKS {
                return Err(ConnectionError::TooManySubscribes);
            }
            // Inserted before the SUBSCRIBE leaves, so its SUBACK always finds it.
            pending.insert(s.pkid, refused);
        }
        let filters = allowed.into_iter().map(|(_, f)| f).collect();
        let rewritten = Subscribe {
            pkid: s.pkid,
            filters,
        };
        upstream
            .write_all(&encode(Packet::Subscribe(rewritten, None))?)
            .await?;
        Ok(())
    }

    /// Broker → client: passed on unchanged, except the SUBACKs of rewritten SUBSCRIBEs, and
    /// the SUBACKs the gate answers itself.
    async fn broker_to_client(
        self,
        mut upstream: impl AsyncReadExt + Unpin,
        mut client: impl AsyncWriteExt + Unpin,
        mut injected: mpsc::Receiver<Bytes>,
    ) -> Result<(), ConnectionError> {
        let mut buf = BytesMut::with_capacity(8192);
        let mut out = BytesMut::with_capacity(8192);
        loop {
            tokio::select! {
                Some(b) = injected.recv() => client.write_all(&b).await?,
                n = upstream.read_buf(&mut buf) => {
                    if n? == 0 {
                        return Ok(());
                    }
                    // What the broker sends is framed only to find SUBACKs; it is not limited.
                    while let Ok(h) = v4::check(buf.iter(), usize::MAX) {
                        let raw = buf.split_to(h.frame_length());
                        if matches!(h.packet_type(), Ok(v4::PacketType::SubAck)) {
                            out.extend_from_slice(&self.suback(raw)?);
                        } else {
                            out.extend_from_slice(&raw);
                        }
                    }
                    client.write_all(&out).await?;
                    out.clear();
                }
            }
        }
    }

    /// A SUBACK from the broker, with the failure codes of the filters the gate refused put
    /// back in their places.
    fn suback(self, raw: BytesMut) -> Result<Bytes, ConnectionError> {
        let Packet::SubAck(mut ack, _) = parse(&raw, usize::MAX)? else {
            return Ok(raw.freeze());
        };
        let refused = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&ack.pkid);
        let Some(refused) = refused else {
            return Ok(raw.freeze());
        };
        splice_failures(&mut ack.return_codes, &refused);
        encode(Packet::SubAck(ack, None))
    }
}

/// Puts a failure code at each of `refused` (ascending positions in the client's SUBSCRIBE) into
/// the codes the broker answered for the other filters, in their order.
fn splice_failures(codes: &mut Vec<SubscribeReasonCode>, refused: &[usize]) {
    for &i in refused {
        let i = i.min(codes.len());
        codes.insert(i, SubscribeReasonCode::Failure);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::QoS;

    #[test]
    fn refused_filters_get_their_places_back() {
        let ok = SubscribeReasonCode::Success(QoS::AtLeastOnce);
        let no = SubscribeReasonCode::Failure;
        // Filters 0..5, refused 0, 2 and 4: the broker answered for 1 and 3.
        let mut codes = vec![ok, SubscribeReasonCode::Success(QoS::AtMostOnce)];
        splice_failures(&mut codes, &[0, 2, 4]);
        assert_eq!(
            codes,
            [
                no,
                ok,
                no,
                SubscribeReasonCode::Success(QoS::AtMostOnce),
                no
            ]
        );
        let mut codes = vec![ok];
        splice_failures(&mut codes, &[1, 2]);
        assert_eq!(codes, [ok, no, no]);
    }
}
