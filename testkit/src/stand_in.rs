//! An agent stand-in for testing the cloud: an MQTT v3.1.1 client like the real agent's,
//! subscribed to its site's ack topic, publishing whatever bytes a test or bench hands it, with
//! an optional last will. It has no outbox: what it publishes is the caller's to track.

use caudal_common::payload::{self, Payload};
use caudal_common::signed::{self, Purpose};
use caudal_common::topic::{self, TopicKind};
use caudal_common::{Ack, SiteId, Status};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::sync::mpsc;

/// How long [`Agent::ack`] waits.
const ACK_WAIT: Duration = Duration::from_secs(20);

/// How the stand-in connects.
#[derive(Debug, Clone)]
pub struct StandIn {
    /// A retained `offline` status as the last will, as the real agent has.
    pub will: bool,
    pub keep_alive: Duration,
    /// Largest packet sent or received.
    pub max_packet_bytes: usize,
    /// Unacknowledged publishes at once (rumqttc's own default when `None`); the client's
    /// request and ack queues grow with it.
    pub inflight: Option<u16>,
    /// Username and password, for a broker that requires a login.
    pub login: Option<(String, String)>,
}

impl Default for StandIn {
    fn default() -> StandIn {
        StandIn {
            will: false,
            keep_alive: Duration::from_secs(5),
            max_packet_bytes: 1 << 20,
            inflight: None,
            login: None,
        }
    }
}

/// A connected stand-in. Dropping it leaves its connection running until the runtime ends;
/// [`Agent::kill`] drops it at once.
pub struct Agent {
    pub site: SiteId,
    client: AsyncClient,
    acks: mpsc::Receiver<Vec<u8>>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("site", &self.site).finish()
    }
}

impl Agent {
    /// Connects to the broker's v3.1.1 listener and subscribes to the site's acks, with the
    /// default settings and a last will if `will`.
    pub async fn connect(broker: SocketAddr, site: &str, will: bool) -> Agent {
        let site = SiteId::new(site).expect("site id");
        Agent::connect_with(
            broker,
            &site,
            &StandIn {
                will,
                ..StandIn::default()
            },
        )
        .await
    }

    /// Connects to the broker's v3.1.1 listener as `how` says and subscribes to the site's
    /// acks; returns once subscribed.
    pub async fn connect_with(broker: SocketAddr, site: &SiteId, how: &StandIn) -> Agent {
        let mut o = MqttOptions::new(
            format!("agent-{site}-{:06x}", fastrand::u32(..1 << 24)),
            broker.ip().to_string(),
            broker.port(),
        );
        o.set_keep_alive(how.keep_alive)
            .set_max_packet_size(how.max_packet_bytes, how.max_packet_bytes);
        if let Some(n) = how.inflight {
            o.set_inflight(n.max(1));
        }
        if let Some((user, password)) = &how.login {
            o.set_credentials(user, password);
        }
        if how.will {
            o.set_last_will(LastWill::new(
                topic::topic(site, TopicKind::Status),
                Status::offline(site.clone()).encode(),
                QoS::AtLeastOnce,
                true,
            ));
        }
        let (requests, acks) = match how.inflight {
            Some(n) => (2 * usize::from(n) + 8, 4 * usize::from(n) + 8),
            None => (64, 64),
        };
        let (client, mut eventloop) = AsyncClient::new(o, requests);
        let (tx, acks) = mpsc::channel(acks);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let ack_topic = topic::topic(site, TopicKind::Ack);
        client
            .subscribe(ack_topic.clone(), QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        let name = site.to_string();
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic == ack_topic => {
                        // Once the stand-in is dropped its acks go nowhere, but the connection
                        // stays: only `kill` fires the last will.
                        let _ = tx.send(p.payload.to_vec()).await;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        // rumqttc reconnects on the next poll.
                        tracing::debug!(site = %name, error = %e, "stand-in agent: connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("agent subscribed in time")
            .expect("agent event loop alive");
        Agent {
            site: site.clone(),
            client,
            acks,
            task,
        }
    }

    /// Publishes raw bytes on this site's telemetry topic (or `topic` when given).
    pub async fn publish(&self, topic: Option<&str>, payload: impl Into<Vec<u8>>) {
        let t = topic
            .map(str::to_string)
            .unwrap_or_else(|| topic::topic(&self.site, TopicKind::Telemetry));
        self.client
            .publish(t, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("publish");
    }

    /// Publishes a retained status.
    pub async fn status(&self, s: &Status) {
        self.client
            .publish(
                topic::topic(&self.site, TopicKind::Status),
                QoS::AtLeastOnce,
                true,
                s.encode(),
            )
            .await
            .expect("publish status");
    }

    /// The next ack, decoded; panics if none comes within 20 s.
    pub async fn ack(&mut self) -> Ack {
        self.ack_within(ACK_WAIT)
            .await
            .unwrap_or_else(|| panic!("an ack within {ACK_WAIT:?}"))
    }

    /// The next ack, decoded (a signed one after verifying its signature, whoever's key it
    /// names); `None` if none comes within `wait`.
    pub async fn ack_within(&mut self, wait: Duration) -> Option<Ack> {
        let bytes = self.raw_ack_within(wait).await?;
        let body = if signed::version_of(&bytes) == Some(signed::SIGNED_VERSION) {
            signed::open(&bytes, Purpose::Ack)
                .expect("a signed ack verifies")
                .body
        } else {
            &bytes[..]
        };
        Some(payload::decode(body).expect("a valid ack"))
    }

    /// The next ack's bytes as they arrived; `None` if none comes within `wait`.
    pub async fn raw_ack_within(&mut self, wait: Duration) -> Option<Vec<u8>> {
        Some(
            tokio::time::timeout(wait, self.acks.recv())
                .await
                .ok()?
                .expect("agent alive"),
        )
    }

    /// No ack arrives within `wait`.
    pub async fn no_ack(&mut self, wait: Duration) {
        if let Ok(Some(bytes)) = tokio::time::timeout(wait, self.acks.recv()).await {
            panic!("unexpected ack: {}", String::from_utf8_lossy(&bytes));
        }
    }

    /// Drops the connection without DISCONNECT, as a power cut does: the broker publishes the
    /// last will.
    pub fn kill(self) {
        self.task.abort();
    }
}
