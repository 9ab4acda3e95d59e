//! Ingest over real parts: the cloud with its embedded rumqttd on free loopback ports, an agent
//! stand-in publishing over MQTT v3.1.1, and the database (a SQLite file, and PostgreSQL when
//! `CAUDAL_TEST_DATABASE_URL` is set).

use crate::support;

use caudal_cloud::Cloud;
use caudal_cloud::catchment::site;
use caudal_cloud::telemetry::store;
use caudal_common::payload::{self, Payload};
use caudal_common::{AckStatus, Batch, SeqRange, SiteId, Status};
use std::time::Duration;
use support::{Agent, TestDb, config, http_get, metric, wait_metric};

const BATCH: &str = include_str!("../../../docs/examples/batch.json");
const STATUS: &str = include_str!("../../../docs/examples/status.json");

fn example_batch() -> Batch {
    payload::decode(BATCH.as_bytes()).expect("the example batch decodes")
}

async fn start(db: &TestDb) -> Cloud {
    let cloud = Cloud::start(config(db)).await.expect("cloud starts");
    wait_metric(cloud.http_addr(), "caudal_cloud_ingest_subscribed 1").await;
    cloud
}

fn site_id(s: &str) -> SiteId {
    SiteId::new(s).expect("site id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_is_stored_and_acked_after_commit() {
    for db in TestDb::all().await {
        let cloud = start(&db).await;
        let site = site_id("pozo-norte");
        site::add(cloud.db(), &site, "Pozo Norte")
            .await
            .expect("add");
        let broker = cloud.broker().expect("embedded broker").v4_addr();
        let mut agent = Agent::connect(broker, "pozo-norte", false).await;

        let batch = example_batch();
        agent.publish(None, BATCH).await;
        let ack = agent.ack().await;
        assert_eq!(ack.status, AckStatus::Accepted, "{}", db.name);
        assert_eq!(ack.batch, batch.batch);
        assert_eq!(ack.seqs, SeqRange::compact(batch.seqs()));
        assert_eq!(ack.reason, None);

        // The ack came after the commit: everything it names is already readable.
        let counts = store::record_counts(cloud.db(), &site)
            .await
            .expect("counts");
        assert_eq!(
            (counts.readings, counts.events, counts.gaps),
            (2, 1, 1),
            "{}",
            db.name
        );
        let stored = store::readings(cloud.db(), &site, 10).await.expect("read");
        assert_eq!(stored, batch.readings, "{}: readings round-trip", db.name);
        assert_eq!(
            stored[0].total_m3.map(f64::to_bits),
            Some(123456.789012f64.to_bits()),
            "the totalizer survives bit for bit"
        );
        let status = store::site_status(cloud.db(), &site)
            .await
            .expect("status")
            .expect("a batch marks the site as seen");
        assert!(status.last_seen.is_some());

        agent.kill();
        cloud.stop().await;
    }
}

/// No ack leaves before the commit: while another connection holds the write lock the batch
/// cannot commit, and no ack may arrive; once it is released the batch commits and only then is
/// acknowledged, with its records readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ack_leaves_before_the_commit() {
    for db in TestDb::all().await {
        let cloud = start(&db).await;
        let site = site_id("pozo-norte");
        site::add(cloud.db(), &site, "").await.expect("add");
        let broker = cloud.broker().expect("embedded broker").v4_addr();
        let mut agent = Agent::connect(broker, "pozo-norte", false).await;

        let lock = WriteLock::take(cloud.db()).await;
        agent.publish(None, BATCH).await;
        // Long enough for the ingest to have received, decoded and tried to store the batch.
        agent.no_ack(Duration::from_millis(1500)).await;
        let counts = store::record_counts(cloud.db(), &site)
            .await
            .expect("counts");
        assert_eq!(counts.readings, 0, "{}: nothing committed yet", db.name);
        lock.release().await;

        let ack = agent.ack().await;
        assert_eq!(ack.status, AckStatus::Accepted, "{}", db.name);
        let counts = store::record_counts(cloud.db(), &site)
            .await
            .expect("counts");
        assert_eq!(
            (counts.readings, counts.events, counts.gaps),
            (2, 1, 1),
            "{}: the ack came after the commit",
            db.name
        );

        agent.kill();
        cloud.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_batch_is_stored_once_and_acked_each_time() {
    for db in TestDb::all().await {
        let cloud = start(&db).await;
        let site = site_id("pozo-norte");
        site::add(cloud.db(), &site, "").await.expect("add");
        let broker = cloud.broker().expect("embedded broker").v4_addr();
        let mut agent = Agent::connect(broker, "pozo-norte", false).await;

        agent.publish(None, BATCH).await;
        let first = agent.ack().await;
        agent.publish(None, BATCH).await;
        let second = agent.ack().await;
        assert_eq!(
            first, second,
            "{}: a re-sent batch gets the same ack",
            db.name
        );
        assert_eq!(second.status, AckStatus::Accepted);

        let counts = store::record_counts(cloud.db(), &site)
            .await
            .expect("counts");
        assert_eq!((counts.readings, counts.events, counts.gaps), (2, 1, 1));
        let http = cloud.http_addr();
        assert_eq!(
            metric(
                http,
                "caudal_cloud_ingest_records_total{kind=\"reading\",outcome=\"stored\"}"
            )
            .await,
            2.0
        );
        assert_eq!(
            metric(
                http,
                "caudal_cloud_ingest_records_total{kind=\"reading\",outcome=\"duplicate\"}"
            )
            .await,
            2.0
        );

        agent.kill();
        cloud.stop().await;
    }
}

/// The example batch with one field changed through JSON, so the payload stays realistic.
fn edited(f: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_str(BATCH).expect("json");
    f(&mut v);
    serde_json::to_vec(&v).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_payloads_are_dead_lettered_and_acked_rejected() {
    for db in TestDb::all().await {
        let cloud = start(&db).await;
        site::add(cloud.db(), &site_id("pozo-norte"), "")
            .await
            .expect("add");
        site::add(cloud.db(), &site_id("pozo-viejo"), "")
            .await
            .expect("add");
        site::set_active(cloud.db(), &site_id("pozo-viejo"), false)
            .await
            .expect("deactivate");
        let broker = cloud.broker().expect("embedded broker").v4_addr();
        let mut agent = Agent::connect(broker, "pozo-norte", false).await;

        // (payload, topic site, expected reason fragment, acked?)
        let cases: Vec<(Vec<u8>, &str, &str, bool)> = vec![
            (
                b"\xff\x00 not json".to_vec(),
                "pozo-norte",
                "not a JSON object",
                false,
            ),
            (
                edited(|v| v["v"] = 2.into()),
                "pozo-norte",
                "unsupported schema version 2",
                true,
            ),
            (
                edited(|v| v["readings"][0]["flow_lps"] = "fast".into()),
                "pozo-norte",
                "invalid v1 payload",
                true,
            ),
            (
                edited(|v| v["site"] = "pozo-sur".into()),
                "pozo-norte",
                "payload names site pozo-sur but came on the topic of site pozo-norte",
                true,
            ),
            (
                edited(|v| v["events"][0]["seq"] = v["readings"][0]["seq"].clone()),
                "pozo-norte",
                "appears more than once",
                true,
            ),
            (
                edited(|v| v["gaps"][0]["from"] = "2027-01-01T00:00:00Z".into()),
                "pozo-norte",
                "from is after to",
                true,
            ),
            (
                edited(|v| v["site"] = "pozo-nuevo".into()),
                "pozo-nuevo",
                "site pozo-nuevo is not registered",
                true,
            ),
            (
                edited(|v| v["site"] = "pozo-viejo".into()),
                "pozo-viejo",
                "site pozo-viejo is not active",
                true,
            ),
        ];
        for (payload, site, reason, acked) in &cases {
            let mut other;
            let listener = if *site == "pozo-norte" {
                &mut agent
            } else {
                other = Agent::connect(broker, site, false).await;
                &mut other
            };
            listener.publish(None, payload.clone()).await;
            if *acked {
                let ack = listener.ack().await;
                assert_eq!(ack.status, AckStatus::Rejected, "{}: {reason}", db.name);
                assert_eq!(ack.batch, "7f3a9c-42");
                assert!(ack.seqs.is_empty());
                let got = ack.reason.unwrap_or_default();
                assert!(
                    got.contains(reason),
                    "{}: {got:?} lacks {reason:?}",
                    db.name
                );
            } else {
                listener.no_ack(Duration::from_millis(500)).await;
            }
        }

        // The loop survived all of that: a good batch is still stored.
        agent.publish(None, BATCH).await;
        assert_eq!(agent.ack().await.status, AckStatus::Accepted);

        let letters = store::dead_letters(cloud.db(), 100).await.expect("letters");
        assert_eq!(
            letters.len(),
            cases.len(),
            "{}: one dead letter each",
            db.name
        );
        for ((payload, site, reason, _), letter) in cases.iter().zip(letters.iter().rev()) {
            assert_eq!(&letter.payload, payload, "kept as received");
            assert_eq!(letter.site.as_deref(), Some(*site));
            assert_eq!(letter.topic, format!("caudal/v1/{site}/telemetry"));
            assert!(letter.reason.contains(reason), "{:?}", letter.reason);
        }
        let http = cloud.http_addr();
        for (reason, n) in [
            ("not_json", 1.0),
            ("unsupported_version", 1.0),
            ("invalid", 1.0),
            ("site_mismatch", 1.0),
            ("rule", 2.0),
            ("unknown_site", 1.0),
            ("inactive_site", 1.0),
        ] {
            let line = format!("caudal_cloud_ingest_rejected_total{{reason=\"{reason}\"}}");
            assert_eq!(metric(http, &line).await, n, "{}: {line}", db.name);
        }

        agent.kill();
        cloud.stop().await;
    }
}

/// Dead letters stay bounded: the same refused payload again and again is one row with its
/// count; a site the cloud does not know sending batch after batch is refused every time but
/// written once per `ingest.refused_site_interval_s`; a payload is kept up to
/// `ingest.dead_letter_max_payload_bytes`; the sweeper expires old rows and caps the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_deduplicated_summarised_cut_and_swept() {
    use caudal_cloud::telemetry::dead_letter;
    for db in TestDb::all().await {
        let mut cfg = config(&db);
        cfg.ingest.dead_letter_max_payload_bytes = 64;
        let cloud = Cloud::start(cfg).await.expect("start");
        wait_metric(cloud.http_addr(), "caudal_cloud_ingest_subscribed 1").await;
        site::add(cloud.db(), &site_id("pozo-norte"), "")
            .await
            .expect("add");
        let broker = cloud.broker().expect("embedded broker").v4_addr();
        let mut agent = Agent::connect(broker, "pozo-norte", false).await;
        let bad = edited(|v| v["readings"][0]["flow_lps"] = "fast".into());
        for _ in 0..20 {
            agent.publish(None, bad.clone()).await;
            assert_eq!(agent.ack().await.status, AckStatus::Rejected);
        }
        let mut stranger = Agent::connect(broker, "pozo-nuevo", false).await;
        let unknown = edited(|v| v["site"] = "pozo-nuevo".into());
        for i in 0..30 {
            let mut b: serde_json::Value = serde_json::from_slice(&unknown).expect("json");
            b["batch"] = format!("nuevo-{i}").into();
            stranger.publish(None, b.to_string()).await;
            let ack = stranger.ack().await;
            assert_eq!(ack.status, AckStatus::Rejected, "refused every time");
        }
        let letters = store::dead_letters(cloud.db(), 100).await.expect("letters");
        assert_eq!(letters.len(), 2, "{}: {letters:?}", db.name);
        let same = letters
            .iter()
            .find(|l| l.site.as_deref() == Some("pozo-norte"))
            .expect("the repeated payload");
        assert_eq!(same.count, 20, "{}", db.name);
        assert_eq!(same.payload, bad[..64], "cut at the limit");
        assert_eq!(same.payload_bytes, Some(bad.len() as i64));
        let summary = letters
            .iter()
            .find(|l| l.site.as_deref() == Some("pozo-nuevo"))
            .expect("the unknown site");
        assert_eq!(
            summary.count, 1,
            "{}: written once in the interval, the rest held back",
            db.name
        );
        let line = r#"caudal_cloud_ingest_rejected_total{reason="unknown_site"}"#;
        assert_eq!(
            metric(cloud.http_addr(), line).await,
            30.0,
            "every refusal counted"
        );

        // The sweeper: nothing is old yet; a cap of one keeps the latest; a retention of
        // zero seen from tomorrow expires the rest.
        let now = chrono::Utc::now();
        let swept = dead_letter::sweep(cloud.db(), chrono::Duration::days(30), 100, now)
            .await
            .expect("sweep");
        assert_eq!(swept, dead_letter::Swept::default());
        let swept = dead_letter::sweep(cloud.db(), chrono::Duration::days(30), 1, now)
            .await
            .expect("sweep");
        assert_eq!(swept.over_cap, 1, "{}", db.name);
        let left = store::dead_letters(cloud.db(), 100).await.expect("letters");
        assert_eq!(left.len(), 1);
        assert_eq!(
            left[0].site.as_deref(),
            Some("pozo-nuevo"),
            "the latest kept"
        );
        let swept = dead_letter::sweep(
            cloud.db(),
            chrono::Duration::zero(),
            100,
            now + chrono::Duration::days(1),
        )
        .await
        .expect("sweep");
        assert_eq!(swept.expired, 1, "{}", db.name);
        assert!(
            store::dead_letters(cloud.db(), 100)
                .await
                .expect("letters")
                .is_empty()
        );
        agent.kill();
        stranger.kill();
        cloud.stop().await;
    }
}

/// A different record under a stored `(site, seq)`: what an agent whose outbox was rolled back
/// (and that did not open a new epoch) or a forger sends. Refused, dead-lettered, counted and
/// alerted; never acknowledged as a duplicate; the stored record stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_record_under_a_stored_seq_is_refused_dead_lettered_and_alerted() {
    use caudal_cloud::core::config::AlertsConfig;
    use caudal_cloud::telemetry::alert::{self, AlertKind, AlertMetrics, AlertState, Evaluator};
    for db in TestDb::all().await {
        let cloud = start(&db).await;
        let site = site_id("pozo-norte");
        site::add(cloud.db(), &site, "").await.expect("add");
        let broker = cloud.broker().expect("embedded broker").v4_addr();
        let mut agent = Agent::connect(broker, "pozo-norte", false).await;
        agent.publish(None, BATCH).await;
        assert_eq!(agent.ack().await.status, AckStatus::Accepted, "{}", db.name);

        // The same seqs, one reading's totalizer different.
        let other_total = edited(|v| {
            v["batch"] = "9b1c07-1".into();
            v["readings"][0]["total_m3"] = 123999.5.into();
        });
        // A stored reading's seq arriving as an event.
        let other_kind = edited(|v| {
            v["batch"] = "9b1c07-2".into();
            v["events"][0]["seq"] = v["readings"][1]["seq"].clone();
            v["readings"] = serde_json::json!([]);
            v["gaps"] = serde_json::json!([]);
        });
        // A gap with another count.
        let other_gap = edited(|v| {
            v["batch"] = "9b1c07-3".into();
            v["gaps"][0]["count"] = 99.into();
        });
        let cases = [
            (&other_total, "reading", "reading"),
            (&other_kind, "event", "reading"),
            (&other_gap, "gap", "gap"),
        ];
        for (payload, arrived, stored) in cases {
            agent.publish(None, payload.clone()).await;
            let ack = agent.ack().await;
            assert_eq!(ack.status, AckStatus::Rejected, "{}: {arrived}", db.name);
            assert!(ack.seqs.is_empty(), "nothing acknowledged");
            let reason = ack.reason.unwrap_or_default();
            assert!(
                reason.contains(&format!(
                    "the arriving {arrived} differs from the {stored} stored"
                )),
                "{}: {reason:?}",
                db.name
            );
            assert!(reason.contains("site pozo-norte seq "), "{reason:?}");
        }

        // The stored records are the first ones; the identical batch is still a duplicate.
        let stored = store::readings(cloud.db(), &site, 10).await.expect("read");
        assert_eq!(stored, example_batch().readings, "{}", db.name);
        let counts = store::record_counts(cloud.db(), &site)
            .await
            .expect("counts");
        assert_eq!((counts.readings, counts.events, counts.gaps), (2, 1, 1));
        agent.publish(None, BATCH).await;
        assert_eq!(agent.ack().await.status, AckStatus::Accepted);

        let letters = store::dead_letters(cloud.db(), 100).await.expect("letters");
        assert_eq!(letters.len(), 3, "{}: one dead letter each", db.name);
        for ((payload, ..), letter) in cases.iter().zip(letters.iter().rev()) {
            assert_eq!(&&letter.payload, payload, "kept as received");
            assert!(
                letter.reason.contains("differs from the"),
                "{:?}",
                letter.reason
            );
        }
        let http = cloud.http_addr();
        assert_eq!(
            metric(
                http,
                "caudal_cloud_ingest_rejected_total{reason=\"seq_conflict\"}"
            )
            .await,
            3.0,
            "{}",
            db.name
        );

        // The alert rule sees it: one open alert for the site, naming the seq and the batch.
        let ev = Evaluator::new(
            AlertsConfig::default(),
            cloud.db().clone(),
            AlertMetrics::default(),
        );
        ev.evaluate(chrono::Utc::now()).await;
        let open = alert::list(
            cloud.db(),
            &alert::Filter {
                state: Some(AlertState::Open),
                kind: Some(AlertKind::SeqConflict),
                limit: 10,
                ..alert::Filter::default()
            },
        )
        .await
        .expect("alerts");
        assert_eq!(open.len(), 1, "{}: {open:?}", db.name);
        assert_eq!(open[0].subject, "site/pozo-norte");
        assert_eq!(open[0].value, Some(3.0), "three conflicts");
        assert!(
            open[0].message.contains("batch 9b1c07-3"),
            "{}",
            open[0].message
        );

        agent.kill();
        cloud.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_last_will_update_site_status() {
    for db in TestDb::all().await {
        let cloud = start(&db).await;
        let site = site_id("pozo-norte");
        site::add(cloud.db(), &site, "").await.expect("add");
        let broker = cloud.broker().expect("embedded broker").v4_addr();
        let agent = Agent::connect(broker, "pozo-norte", true).await;

        let status: Status = payload::decode(STATUS.as_bytes()).expect("example status");
        agent.status(&status).await;
        let online = wait_status(&cloud, &site, true).await;
        assert_eq!(
            online.agent_version.as_deref(),
            Some("0.1.0"),
            "{}",
            db.name
        );
        assert_eq!(online.config_version.as_deref(), Some("sha256:1c9e0f"));
        assert_eq!(online.backlog, Some(12));
        assert_eq!(online.oldest_unsent_age_s, Some(60));
        let devices = online.devices.clone().expect("devices");
        assert_eq!(devices["level-1"]["result"], "timeout");
        let seen = online.last_seen.expect("last seen");

        // Power cut: the broker publishes the agent's last will.
        agent.kill();
        let offline = wait_status(&cloud, &site, false).await;
        assert_eq!(
            offline.last_seen,
            Some(seen),
            "the will is not the agent speaking"
        );
        assert_eq!(
            offline.agent_version.as_deref(),
            Some("0.1.0"),
            "last known kept"
        );
        assert_eq!(offline.devices, online.devices);

        // A status from an unregistered site is refused like a batch.
        let stranger = Agent::connect(broker, "pozo-nuevo", false).await;
        let mut s = status.clone();
        s.site = site_id("pozo-nuevo");
        stranger.status(&s).await;
        wait_metric(
            cloud.http_addr(),
            "caudal_cloud_ingest_rejected_total{reason=\"unknown_site\"} 1",
        )
        .await;
        stranger.kill();
        cloud.stop().await;
    }
}

async fn wait_status(cloud: &Cloud, site: &SiteId, online: bool) -> store::SiteStatus {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = store::site_status(cloud.db(), site).await.expect("status")
            && s.online == online
            && s.agent_version.is_some()
        {
            return s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "site status never became online={online}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_metrics_and_sites_answer() {
    let db = TestDb::sqlite();
    let cloud = start(&db).await;
    site::add(cloud.db(), &site_id("pozo-norte"), "Pozo Norte")
        .await
        .expect("add");
    let http = cloud.http_addr();
    assert_ne!(http.port(), 0);
    assert_eq!(http_get(http, "/healthz").await, (200, "ok\n".to_string()));
    let (code, body) = http_get(http, "/metrics").await;
    assert_eq!(code, 200);
    assert!(body.contains("caudal_cloud_info{"), "{body}");
    assert!(body.contains("caudal_cloud_mqtt_connected 1"), "{body}");
    assert_eq!(
        http_get(http, "/api/v1/sites").await.0,
        401,
        "the API needs a token"
    );
    let token = support::account_token(
        &cloud,
        "viewer@x.cl",
        caudal_cloud::core::auth::Role::Viewer,
    )
    .await;
    let (code, body) = support::http(http, "GET", "/api/v1/sites", Some(&token), None).await;
    assert_eq!(code, 200);
    let sites: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(sites[0]["id"], "pozo-norte");
    assert_eq!(sites[0]["name"], "Pozo Norte");
    assert_eq!(sites[0]["active"], true);
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_broker_port_is_a_clear_error() {
    let db = TestDb::sqlite();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut c = config(&db);
    c.mqtt.embedded.listen = taken.local_addr().expect("addr");
    let err = Cloud::start(c).await.expect_err("port is taken");
    let text = err.to_string();
    assert!(text.contains("mqtt.embedded.listen"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_batch_is_acked_with_no_seqs() {
    let db = TestDb::sqlite();
    let cloud = start(&db).await;
    site::add(cloud.db(), &site_id("pozo-norte"), "")
        .await
        .expect("add");
    let broker = cloud.broker().expect("embedded broker").v4_addr();
    let mut agent = Agent::connect(broker, "pozo-norte", false).await;
    let mut b = example_batch();
    b.readings.clear();
    b.events.clear();
    b.gaps.clear();
    agent.publish(None, b.encode()).await;
    let ack = agent.ack().await;
    assert_eq!(ack.status, AckStatus::Accepted);
    assert!(ack.seqs.is_empty());
    agent.kill();
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_ingests_in_one_group_split_the_batches() {
    let db = TestDb::sqlite();
    let first = start(&db).await;
    let mut c = config(&db);
    c.services = vec!["telemetry".to_string()];
    c.mqtt.url = Some(format!(
        "mqtt://{}",
        first.broker().expect("embedded broker").v5_addr()
    ));
    let second = Cloud::start(c).await.expect("second ingest starts");
    wait_metric(second.http_addr(), "caudal_cloud_ingest_subscribed 1").await;

    const SITES: usize = 6;
    let broker = first.broker().expect("embedded broker").v4_addr();
    let mut agents = Vec::new();
    for i in 0..SITES {
        let name = format!("pozo-{i}");
        site::add(first.db(), &site_id(&name), "")
            .await
            .expect("add");
        agents.push(Agent::connect(broker, &name, false).await);
    }
    for round in 0..2 {
        for (i, agent) in agents.iter_mut().enumerate() {
            let payload = edited(|v| {
                v["site"] = format!("pozo-{i}").into();
                v["batch"] = format!("b-{round}").into();
            });
            agent.publish(None, payload).await;
            let ack = agent.ack().await;
            assert_eq!(ack.status, AckStatus::Accepted);
            assert_eq!(ack.batch, format!("b-{round}"));
        }
    }
    // Each batch went to exactly one member of the group: no second ack.
    for agent in &mut agents {
        agent.no_ack(Duration::from_millis(300)).await;
    }
    let line = "caudal_cloud_ingest_batches_total{kind=\"accepted\"}";
    let (a, b) = (
        metric(first.http_addr(), line).await,
        metric(second.http_addr(), line).await,
    );
    assert_eq!(a + b, (2 * SITES) as f64);
    assert!(a > 0.0 && b > 0.0, "both ingests took batches: {a} + {b}");

    for agent in agents {
        agent.kill();
    }
    second.stop().await;
    first.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_error_sends_no_ack_and_the_ingest_goes_on() {
    for db in TestDb::all().await {
        let cloud = start(&db).await;
        site::add(cloud.db(), &site_id("pozo-norte"), "")
            .await
            .expect("add");
        let broker = cloud.broker().expect("embedded broker").v4_addr();
        let mut agent = Agent::connect(broker, "pozo-norte", false).await;

        // The readings table disappears: the batch's transaction fails and rolls back.
        match cloud.db() {
            caudal_cloud::core::db::Db::Sqlite(p) => sqlx::query("DROP TABLE readings")
                .execute(p)
                .await
                .map(drop),
            caudal_cloud::core::db::Db::Postgres(p) => sqlx::query("DROP TABLE readings")
                .execute(p)
                .await
                .map(drop),
        }
        .expect("drop table");
        agent.publish(None, BATCH).await;
        agent.no_ack(Duration::from_millis(1500)).await;
        let http = cloud.http_addr();
        assert_eq!(
            metric(http, "caudal_cloud_ingest_store_errors_total").await,
            1.0,
            "{}",
            db.name
        );
        let counts = store::record_counts(cloud.db(), &site_id("pozo-norte")).await;
        assert!(counts.is_err(), "nothing to count without the table");
        let events: i64 = match cloud.db() {
            caudal_cloud::core::db::Db::Sqlite(p) => {
                sqlx::query_scalar("SELECT count(*) FROM events")
                    .fetch_one(p)
                    .await
            }
            caudal_cloud::core::db::Db::Postgres(p) => {
                sqlx::query_scalar("SELECT count(*) FROM events")
                    .fetch_one(p)
                    .await
            }
        }
        .expect("count events");
        assert_eq!(events, 0, "{}: the whole batch rolled back", db.name);

        // The ingest goes on: a refused batch is still answered.
        let wrong_version = edited(|v| v["v"] = 2.into());
        agent.publish(None, wrong_version).await;
        assert_eq!(agent.ack().await.status, AckStatus::Rejected);

        agent.kill();
        cloud.stop().await;
    }
}

/// Holds the database's write lock for readings until dropped or released, so the ingest's
/// worker blocks mid-batch and the next messages pile up in its queue as one group.
enum WriteLock {
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>),
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
}

impl WriteLock {
    async fn take(db: &caudal_cloud::core::db::Db) -> WriteLock {
        match db {
            caudal_cloud::core::db::Db::Sqlite(p) => {
                WriteLock::Sqlite(p.begin_with("BEGIN IMMEDIATE").await.expect("lock"))
            }
            caudal_cloud::core::db::Db::Postgres(p) => {
                let mut tx = p.begin().await.expect("begin");
                sqlx::query("LOCK TABLE readings IN EXCLUSIVE MODE")
                    .execute(&mut *tx)
                    .await
                    .expect("lock");
                WriteLock::Postgres(tx)
            }
        }
    }

    async fn release(self) {
        match self {
            WriteLock::Sqlite(tx) => tx.rollback().await.expect("unlock"),
            WriteLock::Postgres(tx) => tx.rollback().await.expect("unlock"),
        }
    }
}

/// A trigger that makes the database refuse any reading of device `poison`: a batch the checks
/// pass but the database cannot take.
async fn poison_device(db: &caudal_cloud::core::db::Db) {
    match db {
        caudal_cloud::core::db::Db::Sqlite(p) => {
            sqlx::query(
                "CREATE TRIGGER poison BEFORE INSERT ON readings WHEN NEW.device = 'poison' \
                 BEGIN SELECT RAISE(ABORT, 'poisoned reading'); END",
            )
            .execute(p)
            .await
            .expect("trigger");
        }
        caudal_cloud::core::db::Db::Postgres(p) => {
            sqlx::query(
                "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ \
                 BEGIN IF NEW.device = 'poison' THEN RAISE EXCEPTION 'poisoned reading'; END IF; \
                 RETURN NEW; END $$",
            )
            .execute(p)
            .await
            .expect("function");
            sqlx::query(
                "CREATE TRIGGER poison BEFORE INSERT ON readings FOR EACH ROW \
                 EXECUTE FUNCTION poison()",
            )
            .execute(p)
            .await
            .expect("trigger");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_batch_the_database_refuses_does_not_hold_back_its_group() {
    for db in TestDb::all().await {
        let mut c = config(&db);
        // One worker: every site's batches queue behind each other and are grouped.
        c.ingest.workers = 1;
        let cloud = Cloud::start(c).await.expect("cloud starts");
        wait_metric(cloud.http_addr(), "caudal_cloud_ingest_subscribed 1").await;
        let broker = cloud.broker().expect("embedded broker").v4_addr();
        let mut agents = Vec::new();
        for i in 0..4 {
            let name = format!("pozo-{i}");
            site::add(cloud.db(), &site_id(&name), "")
                .await
                .expect("add");
            agents.push(Agent::connect(broker, &name, false).await);
        }
        poison_device(cloud.db()).await;
        let payload = |i: usize, device: &str| {
            edited(|v| {
                v["site"] = format!("pozo-{i}").into();
                v["batch"] = format!("b-{i}").into();
                v["readings"][0]["device"] = device.into();
            })
        };

        // The worker takes pozo-0's batch and blocks on the lock; the other three wait in its
        // queue and are taken together once the lock goes.
        let lock = WriteLock::take(cloud.db()).await;
        agents[0].publish(None, payload(0, "fm1")).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        agents[1].publish(None, payload(1, "poison")).await;
        agents[2].publish(None, payload(2, "fm1")).await;
        agents[3].publish(None, payload(3, "fm1")).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        lock.release().await;

        for i in [0, 2, 3] {
            let ack = agents[i].ack().await;
            assert_eq!(ack.status, AckStatus::Accepted, "{}: pozo-{i}", db.name);
            assert_eq!(ack.batch, format!("b-{i}"));
            let counts = store::record_counts(cloud.db(), &site_id(&format!("pozo-{i}")))
                .await
                .expect("counts");
            assert_eq!((counts.readings, counts.events, counts.gaps), (2, 1, 1));
        }
        agents[1].no_ack(Duration::from_millis(500)).await;
        let counts = store::record_counts(cloud.db(), &site_id("pozo-1"))
            .await
            .expect("counts");
        assert_eq!(
            (counts.readings, counts.events, counts.gaps),
            (0, 0, 0),
            "{}: the refused batch left nothing behind",
            db.name
        );
        let http = cloud.http_addr();
        assert_eq!(
            metric(http, "caudal_cloud_ingest_group_splits_total").await,
            1.0,
            "{}: the group of three failed once and was split",
            db.name
        );
        assert_eq!(
            metric(http, "caudal_cloud_ingest_store_errors_total").await,
            1.0,
            "{}: only the poisoned batch failed",
            db.name
        );
        assert_eq!(
            metric(http, "caudal_cloud_ingest_group_batches_count").await,
            3.0,
            "{}: pozo-0 alone, then pozo-2 and pozo-3 each alone after the split",
            db.name
        );

        for a in agents {
            a.kill();
        }
        cloud.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_stores_each_record_once_and_refuses_batches_one_by_one() {
    for db in TestDb::all().await {
        let pool = caudal_cloud::core::db::Db::connect(&db.url, 2)
            .await
            .expect("connect");
        pool.migrate().await.expect("migrate");
        site::add(&pool, &site_id("pozo-norte"), "")
            .await
            .expect("add");
        let good = example_batch();
        let mut stranger = example_batch();
        stranger.site = site_id("pozo-nuevo");
        let at = chrono::Utc::now();

        // The same batch twice in one group (a re-send that arrived before the first was
        // stored), between them a batch of an unregistered site.
        let group = [(&good, at), (&stranger, at), (&good, at)];
        let stored = store::store_batches(&pool, &group).await.expect("stored");
        assert_eq!(
            (
                stored.stored.readings,
                stored.stored.events,
                stored.stored.gaps
            ),
            (2, 1, 1),
            "{}: each record once",
            db.name
        );
        assert!(stored.outcomes[0].is_ok());
        assert!(
            matches!(&stored.outcomes[1], Err(store::StoreError::UnknownSite(s)) if s.as_str() == "pozo-nuevo"),
            "{}: {:?}",
            db.name,
            stored.outcomes[1]
        );
        assert!(stored.outcomes[2].is_ok());
        let counts = store::record_counts(&pool, &site_id("pozo-norte"))
            .await
            .expect("counts");
        assert_eq!((counts.readings, counts.events, counts.gaps), (2, 1, 1));
        let counts = store::record_counts(&pool, &site_id("pozo-nuevo"))
            .await
            .expect("counts");
        assert_eq!((counts.readings, counts.events, counts.gaps), (0, 0, 0));

        // Sent again as a group of its own: nothing new, still accepted.
        let again = store::store_batches(&pool, &[(&good, at)])
            .await
            .expect("stored");
        assert_eq!(again.stored, store::Stored::default());
        assert!(again.outcomes[0].is_ok());
        pool.close().await;
    }
}

/// Two batches of one group carrying the same seqs with different content: the first is
/// stored, the second refused as a conflict, on both backends (PostgreSQL writes the group in
/// one insert, so the comparison cannot rely on what is already in the table).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_within_one_group_is_refused() {
    for db in TestDb::all().await {
        let pool = caudal_cloud::core::db::Db::connect(&db.url, 2)
            .await
            .expect("connect");
        pool.migrate().await.expect("migrate");
        site::add(&pool, &site_id("pozo-norte"), "")
            .await
            .expect("add");
        let good = example_batch();
        let mut other = example_batch();
        other.batch = "9b1c07-9".into();
        other.readings[0].total_m3 = Some(123999.5);
        let at = chrono::Utc::now();
        let stored = store::store_batches(&pool, &[(&good, at), (&other, at)])
            .await
            .expect("stored");
        assert!(stored.outcomes[0].is_ok(), "{}", db.name);
        assert!(
            matches!(&stored.outcomes[1], Err(store::StoreError::SeqConflict(c)) if c.seq == good.readings[0].seq),
            "{}: {:?}",
            db.name,
            stored.outcomes[1]
        );
        let readings = store::readings(&pool, &site_id("pozo-norte"), 10)
            .await
            .expect("read");
        assert_eq!(readings, good.readings, "{}: the first is kept", db.name);

        // A stored reading's seq arriving as an event, and within one group a reading's seq
        // taken by an event of the next batch: the tables are keyed apart, so only the
        // comparison of kinds can refuse them.
        let mut as_event = example_batch();
        as_event.batch = "9b1c07-10".into();
        as_event.readings.clear();
        as_event.gaps.clear();
        as_event.events.truncate(1);
        as_event.events[0].seq = good.readings[1].seq;
        let mut fresh = example_batch();
        fresh.batch = "9b1c07-11".into();
        for (i, r) in fresh.readings.iter_mut().enumerate() {
            r.seq = caudal_common::Seq(1_000_000 + i as u64);
        }
        fresh.events.clear();
        fresh.gaps.clear();
        let mut takes_fresh = as_event.clone();
        takes_fresh.batch = "9b1c07-12".into();
        takes_fresh.events[0].seq = fresh.readings[0].seq;
        let stored =
            store::store_batches(&pool, &[(&as_event, at), (&fresh, at), (&takes_fresh, at)])
                .await
                .expect("stored");
        assert!(
            matches!(&stored.outcomes[0], Err(store::StoreError::SeqConflict(c)) if c.seq == good.readings[1].seq),
            "{}: {:?}",
            db.name,
            stored.outcomes[0]
        );
        assert!(stored.outcomes[1].is_ok(), "{}", db.name);
        assert!(
            matches!(&stored.outcomes[2], Err(store::StoreError::SeqConflict(c)) if c.seq == fresh.readings[0].seq),
            "{}: {:?}",
            db.name,
            stored.outcomes[2]
        );
        assert_eq!(
            stored.stored.readings,
            fresh.readings.len() as u64,
            "{}: only the fresh batch is stored",
            db.name
        );
        assert_eq!(stored.stored.events, 0, "{}", db.name);
        pool.close().await;
    }
}

/// Many sites sending many small batches at once to one worker with a queue of one: the worker
/// is always behind, so the broker's window, not a stopped event loop, must hold the rest back,
/// and every batch's ack must still get out (an ack given up or stuck fails `Agent::ack`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_ingest_keeps_acking_every_batch() {
    for db in TestDb::all().await {
        saturate(&db, None).await;
    }
}

/// The same through the external broker of `CAUDAL_TEST_MQTT_URL` (Mosquitto in CI). Mosquitto
/// 2.0 sends beyond the receive maximum under this load; the ingest holds those messages too
/// (within `ingest.inbound_bytes`), so none is dropped and no agent has to re-send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_ingest_through_an_external_broker_drops_nothing() {
    let Some(url) = caudal_testkit::services::mqtt_url() else {
        eprintln!("CAUDAL_TEST_MQTT_URL is not set: skipped");
        return;
    };
    for db in TestDb::all().await {
        saturate(&db, Some(&url)).await;
    }
}

async fn saturate(db: &TestDb, external: Option<&str>) {
    const SITES: usize = 12;
    const BATCHES: usize = 40;
    let mut c = config(db);
    c.ingest.workers = 1;
    c.ingest.queue = 1;
    // On a shared broker, names of this run's own.
    let run = format!("{:x}-{:04x}", std::process::id(), fastrand::u16(..));
    if let Some(url) = external {
        c.mqtt.url = Some(url.to_string());
        c.ingest.group = format!("saturate-{run}");
    }
    let cloud = Cloud::start(c).await.expect("cloud starts");
    wait_metric(cloud.http_addr(), "caudal_cloud_ingest_subscribed 1").await;
    let broker: std::net::SocketAddr = match external {
        Some(url) => url
            .trim_start_matches("mqtt://")
            .parse()
            .expect("CAUDAL_TEST_MQTT_URL is mqtt://ip:port"),
        None => cloud.broker().expect("embedded broker").v4_addr(),
    };
    let name = |i: usize| match external {
        Some(_) => format!("sat-{run}-{i}"),
        None => format!("pozo-{i}"),
    };
    let mut agents = Vec::new();
    for i in 0..SITES {
        site::add(cloud.db(), &site_id(&name(i)), "")
            .await
            .expect("add");
        agents.push(Agent::connect(broker, &name(i), false).await);
    }

    let mut sends = tokio::task::JoinSet::new();
    for mut agent in agents {
        sends.spawn(async move {
            let site = agent.site.to_string();
            for b in 0..BATCHES {
                let payload = edited(|v| {
                    v["site"] = site.clone().into();
                    v["batch"] = format!("{site}-{b}").into();
                    let mut reading = v["readings"][0].clone();
                    reading["seq"] = (b as u64 + 1).into();
                    v["readings"] = serde_json::json!([reading]);
                    v["events"] = serde_json::json!([]);
                    v["gaps"] = serde_json::json!([]);
                });
                agent.publish(None, payload).await;
            }
            let mut acked = Vec::new();
            for _ in 0..BATCHES {
                let ack = agent.ack().await;
                assert_eq!(ack.status, AckStatus::Accepted, "{}", ack.batch);
                acked.push(ack.batch);
            }
            acked.sort();
            acked.dedup();
            assert_eq!(acked.len(), BATCHES, "{site}: every batch acked once");
            agent.kill();
        });
    }
    while let Some(r) = sends.join_next().await {
        r.expect("an agent got all its acks");
    }

    for i in 0..SITES {
        let counts = store::record_counts(cloud.db(), &site_id(&name(i)))
            .await
            .expect("counts");
        assert_eq!(counts.readings, BATCHES as i64, "{}: {}", db.name, name(i));
    }
    let http = cloud.http_addr();
    assert_eq!(
        metric(http, "caudal_cloud_ingest_ack_errors_total").await,
        0.0,
        "{}: no ack given up",
        db.name
    );
    assert_eq!(
        metric(http, "caudal_cloud_ingest_overflow_dropped_total").await,
        0.0,
        "{}: nothing the broker sent was dropped",
        db.name
    );
    // Every message PUBACKed once the ingest is done with it.
    wait_metric(http, "caudal_cloud_ingest_unacked 0").await;
    cloud.stop().await;
}
