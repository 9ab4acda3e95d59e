//! The same batch delivered twice. A plain MQTT client listens on a site's telemetry and ack
//! topics, captures a batch the agent sent and, once the cloud has stored and acknowledged it,
//! publishes the very same bytes again: the cloud acknowledges it again with the same seqs and
//! stores nothing new. Then every `(site, seq)` committed is in the cloud exactly once.

use crate::support;

use caudal_common::payload::decode;
use caudal_common::signed::{self, Purpose};
use caudal_common::topic::{self, TopicKind};
use caudal_common::{Ack, AckStatus, Batch, SiteId};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::time::Duration;
use support::*;
use tokio::sync::mpsc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_delivered_twice_is_stored_once_and_acknowledged_again() {
    let mut scene = Scene::new("duplicate", BrokerChoice::Embedded, &[SiteSpec::new(3)]).await;
    scene.start_cloud().await;

    let site = SiteId::new(&scene.sites[0].id).expect("site id");
    let telemetry = topic::topic(&site, TopicKind::Telemetry);
    let acks = topic::topic(&site, TopicKind::Ack);
    let addr = scene.mqtt_addr();
    let mut o = MqttOptions::new(
        format!("e2e-duplicate-{:08x}", fastrand::u32(..)),
        addr.ip().to_string(),
        addr.port(),
    );
    o.set_keep_alive(Duration::from_secs(5));
    o.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut el) = AsyncClient::new(o, 16);
    let (tx, mut rx) = mpsc::channel::<(String, Vec<u8>)>(256);
    let (sub_tx, sub_rx) = tokio::sync::oneshot::channel();
    let c = client.clone();
    let filters = [telemetry.clone(), acks.clone()];
    let task = tokio::spawn(async move {
        let mut sub_tx = Some(sub_tx);
        let mut subacks = 0;
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    for f in &filters {
                        let _ = c.subscribe(f.clone(), QoS::AtLeastOnce).await;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    subacks += 1;
                    if subacks == filters.len()
                        && let Some(t) = sub_tx.take()
                    {
                        let _ = t.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if tx
                        .send((p.topic.to_string(), p.payload.to_vec()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), sub_rx)
        .await
        .expect("subscribed within 10 s")
        .expect("listener running");

    scene.start_agents();
    // The first batch with readings, and the cloud's ack of it.
    let (bytes, batch) = loop {
        let (t, p) = next(&mut rx).await;
        if t == telemetry {
            // The agent signs: the envelope verifies, and its body is the batch.
            let opened = signed::open(&p, Purpose::Batch).expect("the agent's batch is signed");
            let b: Batch = decode(opened.body).expect("the agent's batch decodes");
            if !b.readings.is_empty() {
                break (p, b);
            }
        }
    };
    let seqs: Vec<u64> = batch
        .readings
        .iter()
        .map(|r| r.seq.0)
        .chain(batch.events.iter().map(|e| e.seq.0))
        .chain(batch.gaps.iter().map(|g| g.seq.0))
        .collect();
    let first = next_ack(&mut rx, &acks, &batch.batch).await;
    let id = scene.sites[0].id.clone();
    let stored_once = scene.db.stored().await;
    let have = stored_once.seqs(&id);
    assert!(
        seqs.iter().all(|s| have.contains(s)),
        "the batch was stored before its ack"
    );

    // The same bytes again.
    client
        .publish(telemetry.clone(), QoS::AtLeastOnce, false, bytes)
        .await
        .expect("publish");
    let again = next_ack(&mut rx, &acks, &batch.batch).await;
    assert_eq!(
        again.seqs, first.seqs,
        "the repeat is acknowledged for the same seqs"
    );
    let stored_twice = scene.db.stored().await;
    for s in &seqs {
        let n = stored_twice
            .rows
            .iter()
            .filter(|r| r.0 == id && r.1 == *s)
            .count();
        assert_eq!(n, 1, "seq {s} stored once after the repeat");
    }

    scene.wait_readings(6, Duration::from_secs(30)).await;
    scene.wait_drained(Duration::from_secs(20)).await;
    scene.stop_agents();
    task.abort();
    let proof = scene.prove().await;
    assert_eq!(proof.evicted, 0, "{proof:?}");
    scene.stop_cloud();
    eprintln!(
        "duplicate: batch {} of {} records repeated, {proof:?}, {:.1} s",
        batch.batch,
        seqs.len(),
        scene.elapsed()
    );
}

async fn next(rx: &mut mpsc::Receiver<(String, Vec<u8>)>) -> (String, Vec<u8>) {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("a message within 20 s")
        .expect("listener running")
}

/// The next accepting ack of `batch` on `acks`, skipping other messages. Rejections are
/// skipped too: on a shared broker another cloud, where this site is unknown, may answer as well
/// (this scene's cloud has the site registered; if it refused, no accepting ack comes and the
/// wait fails).
async fn next_ack(rx: &mut mpsc::Receiver<(String, Vec<u8>)>, acks: &str, batch: &str) -> Ack {
    loop {
        let (t, p) = next(rx).await;
        if t == acks {
            let a: Ack = decode(&p).expect("the cloud's ack decodes");
            if a.batch == batch {
                if a.status == AckStatus::Accepted {
                    return a;
                }
                eprintln!("duplicate: skipping {a:?}");
            }
        }
    }
}
