//! The cloud's ingest through a broker that speaks only MQTT v5 over mutual TLS: the cloud
//! verifies the broker against `mqtt.ca_file`, presents `mqtt.client_cert`/`client_key`, stores a
//! batch an agent publishes and acknowledges it. A CA that did not issue the broker's
//! certificate keeps the ingest from connecting (counted, and the process goes on).
//!
//! Before the cloud named its TLS crypto provider, its ingest task panicked on the first
//! `mqtts://` connection: two providers are compiled into the binary and rustls refused to guess.

use crate::support;

use caudal_cloud::Cloud;
use caudal_cloud::catchment::{site, site_key};
use caudal_cloud::core::config::{CloudConfig, Secret};
use caudal_common::payload::{self, Payload};
use caudal_common::signed::{self, Purpose, SecretKey};
use caudal_common::topic::{self, TopicKind};
use caudal_common::{Ack, AckStatus, Batch, DeviceId, Quality, Reading, Seq, SiteId};
use caudal_testkit::broker::{Broker, BrokerOptions, BrokerTls};
use caudal_testkit::process::take_turn;
use chrono::Utc;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../agent/tests/fixtures/tls")
        .join(name)
}

fn tls_broker() -> Broker {
    Broker::start_with(BrokerOptions {
        tls: Some(BrokerTls {
            cert: fixture("server.pem"),
            key: fixture("server.key"),
            client_ca: fixture("ca.pem"),
        }),
        ..Default::default()
    })
    .expect("TLS broker starts")
}

fn cloud_config(dir: &tempfile::TempDir, broker: &Broker, ca: &str) -> CloudConfig {
    let mut c = CloudConfig {
        services: vec!["telemetry".to_string()],
        ..Default::default()
    };
    c.http.listen = "127.0.0.1:0".parse().expect("addr");
    let db = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("cloud.db").display()
    );
    c.database.url = Some(Secret::new(&db));
    c.mqtt.url = broker.tls_v5_url();
    c.mqtt.ca_file = Some(fixture(ca));
    c.mqtt.client_cert = Some(fixture("client.pem"));
    c.mqtt.client_key = Some(fixture("client.key"));
    c
}

/// The cloud's metrics page (empty when it does not answer).
async fn metrics(addr: SocketAddr) -> String {
    tokio::task::spawn_blocking(move || support::http_get(addr, "/metrics").unwrap_or_default())
        .await
        .unwrap_or_default()
}

/// Waits until a metrics line starts with `line`; the metrics when it does not in 20 s.
async fn wait_metric(addr: SocketAddr, line: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let body = metrics(addr).await;
        if body.lines().any(|l| l.starts_with(line)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(body);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingest_stores_and_acks_through_a_mutual_tls_broker() {
    // A turn like every scene: the cloud runs in this process, yet it competes for the CPU.
    let _turn = take_turn().await;
    let broker = tls_broker();
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(cloud_config(&dir, &broker, "ca.pem"))
        .await
        .expect("cloud starts");
    if let Err(m) = wait_metric(cloud.http_addr(), "caudal_cloud_ingest_subscribed 1").await {
        panic!("the ingest never subscribed over TLS:\n{m}");
    }
    let site = SiteId::new("pozo-tls").expect("site");
    site::add(cloud.db(), &site, "").await.expect("add site");
    let key = SecretKey::from_seed(&[7; 32]);
    site_key::enroll(cloud.db(), &site, &key.public(), Utc::now())
        .await
        .expect("enroll key");

    // An agent on the broker's plain listener (the same router).
    let addr = broker.v4_addr();
    let mut o = MqttOptions::new("agent-pozo-tls", addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(5));
    let (client, mut el) = AsyncClient::new(o, 16);
    let acks = topic::topic(&site, TopicKind::Ack);
    client
        .subscribe(acks.clone(), QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let (tx, mut rx) = tokio::sync::mpsc::channel(8);
    let task = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = tx.send(None).await;
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == acks => {
                    let _ = tx.send(Some(p.payload.to_vec())).await;
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    let subscribed = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await;
    assert!(matches!(subscribed, Ok(Some(None))), "agent subscribed");

    let device = DeviceId::new("fm1").expect("device");
    let batch = Batch {
        v: 1,
        site: site.clone(),
        batch: "tls-1".into(),
        sent_at: Utc::now(),
        readings: (1..=3)
            .map(|k| Reading {
                seq: Seq::new(1, k),
                device: device.clone(),
                ts: Utc::now(),
                q: Quality::GOOD,
                flow_lps: Some(10.0),
                total_m3: Some(100.0 + f64::from(k)),
                level_m: None,
                extra: Default::default(),
            })
            .collect(),
        events: Vec::new(),
        gaps: Vec::new(),
    };
    client
        .publish(
            topic::topic(&site, TopicKind::Telemetry),
            QoS::AtLeastOnce,
            false,
            signed::seal(&key, Purpose::Batch, &batch.encode()),
        )
        .await
        .expect("publish");
    let ack = tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("an ack in time")
        .flatten()
        .expect("an ack payload");
    let ack: Ack = payload::decode(&ack).expect("ack decodes");
    assert_eq!(ack.status, AckStatus::Accepted, "{:?}", ack.reason);
    assert_eq!(ack.batch, "tls-1");
    let counts = caudal_cloud::telemetry::store::record_counts(cloud.db(), &site)
        .await
        .expect("counts");
    assert_eq!(counts.readings, 3);

    task.abort();
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_certificate_from_another_ca_keeps_the_ingest_out() {
    // A turn like every scene: the cloud runs in this process, yet it competes for the CPU.
    let _turn = take_turn().await;
    let broker = tls_broker();
    let dir = tempfile::tempdir().expect("tempdir");
    let cloud = Cloud::start(cloud_config(&dir, &broker, "other-ca.pem"))
        .await
        .expect("cloud starts");
    let http = cloud.http_addr();
    if let Err(m) = wait_metric(
        http,
        "caudal_cloud_mqtt_connections_total{kind=\"error\"} 2",
    )
    .await
    {
        panic!("the refused handshake is not counted:\n{m}");
    }
    let m = metrics(http).await;
    assert!(m.contains("caudal_cloud_ingest_subscribed 0"), "{m}");
    assert!(
        !m.contains("caudal_cloud_mqtt_connections_total{kind=\"ok\"}"),
        "{m}"
    );
    // The process serves on.
    assert!(
        metrics(http)
            .await
            .contains("caudal_cloud_mqtt_connected 0")
    );
    cloud.stop().await;
}
