//! The embedded broker's authorization with `mqtt.embedded.authenticate`: a site's login
//! publishes only on its own `telemetry`, `status` and `command/result` topics and subscribes
//! only to its own `ack`, `command` and `config/desired`; a refusal is counted per site and
//! stores nothing. Also: an embedded broker on a non-loopback address without authentication
//! does not start. Real parts: the cloud with its embedded broker on loopback port 0, MQTT
//! v3.1.1 clients (rumqttc) and a SQLite file.

use crate::support;

use caudal_cloud::Cloud;
use caudal_cloud::catchment::{credentials, site};
use caudal_cloud::core::config::Secret;
use caudal_cloud::telemetry::store;
use caudal_common::payload::{self, Payload};
use caudal_common::{Ack, AckStatus, Batch, SiteId};
use caudal_testkit::metrics::sample;
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeReasonCode,
};
use std::net::SocketAddr;
use std::time::Duration;
use support::{TestDb, config, http_get, wait_metric};

const BATCH: &str = include_str!("../../../docs/examples/batch.json");
const CLOUD_USER: &str = "caudal-cloud";
const CLOUD_PASSWORD: &str = "the cloud's own broker password";
const BOUND: Duration = Duration::from_secs(10);

fn site_id(s: &str) -> SiteId {
    SiteId::new(s).expect("site id")
}

/// The example batch in `site`'s name, with its first reading's flow set to `flow`.
fn batch_of(site: &str, batch: &str, flow: f64) -> Batch {
    let mut b: Batch = payload::decode(BATCH.as_bytes()).expect("the example batch decodes");
    b.site = site_id(site);
    b.batch = batch.to_string();
    b.readings[0].flow_lps = Some(flow);
    b
}

/// Registers `id` with a fresh credential: its password.
async fn register(cloud: &Cloud, id: &str) -> String {
    let issued = credentials::issue();
    site::create(cloud.db(), &site_id(id), "", 900, Some(&issued.hash))
        .await
        .expect("create site");
    issued.password.expose().to_string()
}

/// Logs in over MQTT v3.1.1: the client and its event loop once the broker accepted.
async fn login(broker: SocketAddr, user: &str, password: &str) -> (AsyncClient, EventLoop) {
    let mut o = MqttOptions::new(
        format!("caudal-agent-{user}-{:04x}", fastrand::u16(..)),
        broker.ip().to_string(),
        broker.port(),
    );
    o.set_keep_alive(Duration::from_secs(5))
        .set_credentials(user, password)
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(o, 16);
    tokio::time::timeout(BOUND, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(a))) => {
                    assert_eq!(a.code, ConnectReturnCode::Success, "{user} logs in");
                    return;
                }
                Ok(_) => {}
                Err(e) => panic!("{user} cut off before CONNACK: {e}"),
            }
        }
    })
    .await
    .expect("a CONNACK");
    (client, eventloop)
}

/// Polls until the broker closes the connection; panics if it is still open after [`BOUND`].
async fn cut_off(eventloop: &mut EventLoop, why: &str) {
    let r = tokio::time::timeout(BOUND, async {
        loop {
            if eventloop.poll().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(r.is_ok(), "{why}: the connection is still open");
}

/// Polls until a SUBACK arrives: its return codes.
async fn suback(eventloop: &mut EventLoop) -> Vec<SubscribeReasonCode> {
    tokio::time::timeout(BOUND, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(s))) => return s.return_codes,
                Ok(_) => {}
                Err(e) => panic!("cut off before SUBACK: {e}"),
            }
        }
    })
    .await
    .expect("a SUBACK")
}

/// Polls until an ack arrives on a subscribed ack topic.
async fn ack(eventloop: &mut EventLoop) -> Ack {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    return payload::decode(&p.payload).expect("an ack");
                }
                Ok(_) => {}
                Err(e) => panic!("cut off before an ack: {e}"),
            }
        }
    })
    .await
    .expect("an ack within 20 s")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_publishes_and_reads_only_its_own_topics() {
    let db = TestDb::sqlite();
    let mut c = config(&db);
    c.mqtt.embedded.authenticate = true;
    c.mqtt.username = Some(CLOUD_USER.to_string());
    c.mqtt.password = Some(Secret::new(CLOUD_PASSWORD));
    let cloud = Cloud::start(c).await.expect("cloud starts");
    let http = cloud.http_addr();
    wait_metric(http, "caudal_cloud_ingest_subscribed 1").await;
    let broker = cloud.broker().expect("embedded broker").v4_addr();
    let a_password = register(&cloud, "pozo-a").await;
    let b_password = register(&cloud, "pozo-b").await;

    // B listens for its acks first: an ack of the forgery would reach it.
    let (b, mut b_loop) = login(broker, "pozo-b", &b_password).await;
    b.subscribe("caudal/v1/pozo-b/ack", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    assert_eq!(
        suback(&mut b_loop).await,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)],
        "B reads its own acks"
    );

    // A, logged in with its own credential, publishes a batch in B's name on B's topic.
    let (a, mut a_loop) = login(broker, "pozo-a", &a_password).await;
    let forged = batch_of("pozo-b", "forged-1", 999.0);
    a.publish(
        "caudal/v1/pozo-b/telemetry",
        QoS::AtLeastOnce,
        false,
        forged.encode(),
    )
    .await
    .expect("publish");
    cut_off(&mut a_loop, "a publish on another site's topic").await;

    // A may not read B's acks; the refusal is a SUBACK failure, A stays connected.
    let (a, mut a_loop) = login(broker, "pozo-a", &a_password).await;
    a.subscribe_many([
        rumqttc::SubscribeFilter::new("caudal/v1/pozo-a/ack".into(), QoS::AtLeastOnce),
        rumqttc::SubscribeFilter::new("caudal/v1/pozo-b/ack".into(), QoS::AtLeastOnce),
        rumqttc::SubscribeFilter::new("caudal/v1/#".into(), QoS::AtLeastOnce),
    ])
    .await
    .expect("subscribe");
    assert_eq!(
        suback(&mut a_loop).await,
        [
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Failure,
        ],
        "A reads its own acks, not B's, and no wildcard"
    );
    a.subscribe("caudal/v1/pozo-b/ack", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    assert_eq!(
        suback(&mut a_loop).await,
        [SubscribeReasonCode::Failure],
        "a SUBSCRIBE with only refused filters is answered too"
    );

    // Only the cloud publishes acks, even on A's own ack topic.
    a.publish(
        "caudal/v1/pozo-a/ack",
        QoS::AtLeastOnce,
        false,
        r#"{"v":1,"site":"pozo-a","batch":"forged-1","status":"accepted","seqs":[{"from":0,"to":9223372036854775807}]}"#,
    )
    .await
    .expect("publish");
    cut_off(&mut a_loop, "a publish on an ack topic").await;

    // B's genuine batch is stored and acknowledged: the first ack B sees is its own.
    let genuine = batch_of("pozo-b", "genuine-1", 12.5);
    b.publish(
        "caudal/v1/pozo-b/telemetry",
        QoS::AtLeastOnce,
        false,
        genuine.encode(),
    )
    .await
    .expect("publish");
    let got = ack(&mut b_loop).await;
    assert_eq!(got.batch, "genuine-1", "no ack of the forgery reached B");
    assert_eq!(got.status, AckStatus::Accepted);
    let stored = store::readings(cloud.db(), &site_id("pozo-b"), 10)
        .await
        .expect("read");
    assert_eq!(stored, genuine.readings, "B's readings are B's own");
    let counts = store::record_counts(cloud.db(), &site_id("pozo-a"))
        .await
        .expect("counts");
    assert_eq!(counts.readings, 0);

    let (_, body) = http_get(http, "/metrics").await;
    for (labels, n) in [
        (r#"action="publish",reason="other_site",site="pozo-a""#, 1.0),
        (r#"action="publish",reason="cloud_only",site="pozo-a""#, 1.0),
        (
            r#"action="subscribe",reason="other_site",site="pozo-a""#,
            2.0,
        ),
        (r#"action="subscribe",reason="wildcard",site="pozo-a""#, 1.0),
    ] {
        assert_eq!(
            sample(
                &body,
                &format!("caudal_cloud_mqtt_refused_total{{{labels}}}")
            ),
            n,
            "{labels}:\n{body}"
        );
    }
    assert!(
        !body
            .lines()
            .any(|l| l.starts_with("caudal_cloud_mqtt_refused_total") && l.contains("pozo-b")),
        "B was refused nothing:\n{body}"
    );
    drop((a, b));
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_broker_beyond_loopback_needs_authentication() {
    let db = TestDb::sqlite();
    for (key, addr) in [
        ("mqtt.embedded.listen", "0.0.0.0:0"),
        ("mqtt.embedded.listen_v5", "[::]:0"),
        ("mqtt.embedded.listen", "192.0.2.1:1883"),
    ] {
        let mut c = config(&db);
        let addr: SocketAddr = addr.parse().expect("addr");
        if key.ends_with("v5") {
            c.mqtt.embedded.listen_v5 = addr;
        } else {
            c.mqtt.embedded.listen = addr;
        }
        // Refused before anything is bound: this test listens on nothing but loopback.
        let err = Cloud::start(c).await.expect_err("refused").to_string();
        assert!(
            err.contains(&format!("{addr} ({key})"))
                && err.contains("mqtt.embedded.authenticate = true"),
            "{err}"
        );
    }
    // On loopback, no login is needed (the demo, tests).
    let cloud = Cloud::start(config(&db)).await.expect("loopback starts");
    cloud.stop().await;
}

/// Connects with `o` and returns the CONNACK's code (or why there was none).
async fn connack_of(o: MqttOptions) -> Result<ConnectReturnCode, String> {
    let (_client, mut eventloop) = AsyncClient::new(o, 4);
    tokio::time::timeout(BOUND, async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(a))) => return Ok(a.code),
                Ok(_) => {}
                Err(rumqttc::ConnectionError::ConnectionRefused(code)) => return Ok(code),
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .map_err(|_| "no answer".to_string())?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_will_and_a_client_id_are_checked_at_connect() {
    let db = TestDb::sqlite();
    let mut c = config(&db);
    c.mqtt.embedded.authenticate = true;
    c.mqtt.username = Some(CLOUD_USER.to_string());
    c.mqtt.password = Some(Secret::new(CLOUD_PASSWORD));
    let cloud = Cloud::start(c).await.expect("cloud starts");
    let http = cloud.http_addr();
    wait_metric(http, "caudal_cloud_ingest_subscribed 1").await;
    let broker = cloud.broker().expect("embedded broker").v4_addr();
    let password = register(&cloud, "pozo-a").await;
    let options = |id: &str, will: &str| {
        let mut o = MqttOptions::new(id, broker.ip().to_string(), broker.port());
        o.set_credentials("pozo-a", &password)
            .set_last_will(rumqttc::LastWill::new(
                will,
                r#"{"v":1,"online":false}"#,
                QoS::AtLeastOnce,
                true,
            ));
        o
    };
    assert_eq!(
        connack_of(options("a-1", "caudal/v1/pozo-b/status")).await,
        Ok(ConnectReturnCode::NotAuthorized),
        "a will on another site's status"
    );
    // rumqttd refuses such ids only after registering the connection, and panics at the next
    // one: twice, then the broker still answers.
    for _ in 0..2 {
        assert_eq!(
            connack_of(options("a/1", "caudal/v1/pozo-a/status")).await,
            Ok(ConnectReturnCode::BadClientId),
        );
    }
    assert_eq!(
        connack_of(options("a-1", "caudal/v1/pozo-a/status")).await,
        Ok(ConnectReturnCode::Success),
        "its own status as will"
    );
    let mut wrong = options("a-2", "caudal/v1/pozo-a/status");
    wrong.set_credentials("pozo-a", "wrong");
    assert_eq!(
        connack_of(wrong).await,
        Ok(ConnectReturnCode::BadUserNamePassword)
    );
    let (_, body) = http_get(http, "/metrics").await;
    assert_eq!(
        sample(
            &body,
            r#"caudal_cloud_mqtt_refused_total{action="will",reason="other_site",site="pozo-a"}"#
        ),
        1.0,
        "{body}"
    );
    cloud.stop().await;
}
