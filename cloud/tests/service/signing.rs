//! Signed batches over real parts: the cloud with its embedded broker, an agent stand-in
//! publishing v2 envelopes, the database (SQLite, and PostgreSQL when configured). A batch is
//! stored only when signed with its site's enrolled key; forged, altered and unsigned batches
//! are refused, dead-lettered, counted per site and never acked as stored; the provenance
//! export verifies with the public key alone and a tampered export does not.

use crate::support;

use caudal_cloud::Cloud;
use caudal_cloud::catchment::{site, site_key};
use caudal_cloud::telemetry::{provenance, store};
use caudal_common::signed::{self, Purpose, SecretKey};
use caudal_common::{AckStatus, SiteId};
use chrono::{DateTime, Utc};
use support::{Agent, TestDb, config, metric, wait_metric};

const BATCH: &str = include_str!("../../../docs/examples/batch.json");

fn site_id(s: &str) -> SiteId {
    SiteId::new(s).expect("site id")
}

fn key(n: u8) -> SecretKey {
    SecretKey::from_seed(&[n; 32])
}

/// The example batch with its batch id and seqs shifted by `n`, so each is new.
fn batch(n: u64) -> String {
    let mut v: serde_json::Value = serde_json::from_str(BATCH).expect("json");
    v["batch"] = format!("b-{n}").into();
    for list in ["readings", "events", "gaps"] {
        if let Some(items) = v[list].as_array_mut() {
            for r in items {
                let seq = r["seq"].as_u64().expect("seq") + n * 100;
                r["seq"] = seq.into();
            }
        }
    }
    // Gaps' `seqs` point at other records; keep them inside the shifted batch's range.
    if let Some(gaps) = v["gaps"].as_array_mut() {
        for g in gaps {
            g.as_object_mut().expect("gap").remove("seqs");
        }
    }
    serde_json::to_string_pretty(&v).expect("json")
}

async fn start(db: &TestDb, accept_unsigned: bool) -> Cloud {
    let mut c = config(db);
    c.ingest.accept_unsigned = accept_unsigned;
    let cloud = Cloud::start(c).await.expect("cloud starts");
    wait_metric(cloud.http_addr(), "caudal_cloud_ingest_subscribed 1").await;
    cloud
}

async fn readings(cloud: &Cloud, site: &SiteId) -> i64 {
    store::record_counts(cloud.db(), site)
        .await
        .expect("counts")
        .readings
}

fn all_time() -> (DateTime<Utc>, DateTime<Utc>) {
    (
        "2000-01-01T00:00:00Z".parse().expect("t"),
        "2100-01-01T00:00:00Z".parse().expect("t"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_batch_is_stored_and_its_export_verifies_with_the_public_key_alone() {
    for db in TestDb::all().await {
        let cloud = start(&db, false).await;
        let site = site_id("pozo-norte");
        site::add(cloud.db(), &site, "").await.expect("add");
        site_key::enroll(cloud.db(), &site, &key(1).public(), Utc::now())
            .await
            .expect("enroll");
        let broker = cloud.broker().expect("embedded broker").v4_addr();
        let mut agent = Agent::connect(broker, "pozo-norte", false).await;

        let body = batch(1);
        agent
            .publish(None, signed::seal(&key(1), Purpose::Batch, body.as_bytes()))
            .await;
        let ack = agent.ack().await;
        assert_eq!(
            ack.status,
            AckStatus::Accepted,
            "{}: {:?}",
            db.name,
            ack.reason
        );
        assert_eq!(readings(&cloud, &site).await, 2, "{}", db.name);

        let (from, to) = all_time();
        let export = provenance::export(cloud.db(), &site, from, to)
            .await
            .expect("export");
        assert_eq!(export.batches.len(), 1, "{}", db.name);
        assert_eq!(
            export.batches[0].body, body,
            "{}: the exact signed bytes are kept",
            db.name
        );
        let v = provenance::verify(&export, &[key(1).public()]).expect("verifies");
        assert_eq!((v.batches, v.readings, v.events, v.gaps), (1, 2, 1, 1));

        // Through JSON, as an auditor gets it, and tampered with: a reading's value changed.
        let text = serde_json::to_string(&export).expect("json");
        let back: provenance::ProvenanceExport = serde_json::from_str(&text).expect("parse");
        assert!(provenance::verify(&back, &[key(1).public()]).is_ok());
        let mut tampered = back.clone();
        tampered.batches[0].body = tampered.batches[0].body.replacen("12.5", "2.5", 1);
        assert_ne!(tampered.batches[0].body, back.batches[0].body);
        assert!(matches!(
            provenance::verify(&tampered, &[key(1).public()]),
            Err(provenance::VerifyError::Signature { .. })
        ));
        // Another key (the auditor's copy of the site's key differs): refused.
        assert!(matches!(
            provenance::verify(&back, &[key(2).public()]),
            Err(provenance::VerifyError::UnknownKey { .. })
        ));
        // A key swapped in the export with a signature of the forger's own: still refused,
        // the auditor's key is what counts.
        let mut forged = back.clone();
        forged.batches[0].public_key = key(2).public().to_string();
        forged.batches[0].signature = signed::encode_signature(
            &key(2).sign(Purpose::Batch, forged.batches[0].body.as_bytes()),
        );
        assert!(provenance::verify(&forged, &[key(1).public()]).is_err());

        agent.kill();
        cloud.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_altered_and_unsigned_batches_are_refused_and_nothing_is_stored() {
    for db in TestDb::all().await {
        // Even with unsigned batches accepted from sites without a key, a site with a key
        // must sign.
        let cloud = start(&db, true).await;
        let site = site_id("pozo-norte");
        site::add(cloud.db(), &site, "").await.expect("add");
        site_key::enroll(cloud.db(), &site, &key(1).public(), Utc::now())
            .await
            .expect("enroll");
        let broker = cloud.broker().expect("embedded broker").v4_addr();
        let mut agent = Agent::connect(broker, "pozo-norte", false).await;

        let body = batch(1);
        let altered = String::from_utf8(signed::seal(&key(1), Purpose::Batch, body.as_bytes()))
            .expect("utf8")
            .replacen("12.5", "99.5", 1);
        let cases: Vec<(Vec<u8>, &str, &str)> = vec![
            (
                signed::seal(&key(2), Purpose::Batch, body.as_bytes()),
                "unknown_key",
                "not the site's current key",
            ),
            (altered.into_bytes(), "bad_signature", "does not verify"),
            (
                signed::seal(&key(1), Purpose::Ack, body.as_bytes()),
                "bad_signature",
                "does not verify",
            ),
            (body.clone().into_bytes(), "unsigned", "must be signed"),
        ];
        for (i, (payload, reason, text)) in cases.into_iter().enumerate() {
            agent.publish(None, payload).await;
            let ack = agent.ack().await;
            assert_eq!(ack.status, AckStatus::Rejected, "{}: case {i}", db.name);
            assert!(ack.seqs.is_empty());
            let why = ack.reason.unwrap_or_default();
            assert!(why.contains(text), "{}: case {i}: {why}", db.name);
            let n = metric(
                cloud.http_addr(),
                &format!(
                    "caudal_cloud_ingest_signature_refused_total{{site=\"pozo-norte\",reason=\"{reason}\"}}"
                ),
            )
            .await;
            assert!(n >= 1.0, "{}: case {i}: {reason} counted", db.name);
        }
        assert_eq!(
            readings(&cloud, &site).await,
            0,
            "{}: nothing stored",
            db.name
        );
        let letters = store::dead_letters(cloud.db(), 10).await.expect("letters");
        assert_eq!(letters.len(), 4, "{}: every refusal dead-lettered", db.name);
        let (from, to) = all_time();
        let export = provenance::export(cloud.db(), &site, from, to)
            .await
            .expect("export");
        assert!(export.batches.is_empty());

        agent.kill();
        cloud.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsigned_batches_of_a_site_without_key_follow_the_switch() {
    for db in TestDb::all().await {
        for accept in [false, true] {
            let cloud = start(&db, accept).await;
            let site = site_id(if accept {
                "pozo-abierto"
            } else {
                "pozo-cerrado"
            });
            site::add(cloud.db(), &site, "").await.expect("add");
            let broker = cloud.broker().expect("embedded broker").v4_addr();
            let mut agent = Agent::connect(broker, site.as_str(), false).await;
            let body = batch(2).replace("pozo-norte", site.as_str());
            agent.publish(None, body).await;
            let ack = agent.ack().await;
            if accept {
                assert_eq!(ack.status, AckStatus::Accepted, "{}", db.name);
                assert_eq!(readings(&cloud, &site).await, 2);
                let name =
                    format!("caudal_cloud_ingest_unsigned_accepted_total{{site=\"{site}\"}}");
                let n = metric(cloud.http_addr(), &name).await;
                assert_eq!(n, 1.0, "{}: accepted unsigned batch counted", db.name);
            } else {
                assert_eq!(ack.status, AckStatus::Rejected, "{}", db.name);
                assert!(
                    ack.reason
                        .unwrap_or_default()
                        .contains("no enrolled public key")
                );
                assert_eq!(readings(&cloud, &site).await, 0);
            }
            agent.kill();
            cloud.stop().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_rotation_the_old_key_is_refused_and_old_batches_still_verify() {
    for db in TestDb::all().await {
        let cloud = start(&db, false).await;
        let site = site_id("pozo-norte");
        site::add(cloud.db(), &site, "").await.expect("add");
        site_key::enroll(cloud.db(), &site, &key(1).public(), Utc::now())
            .await
            .expect("enroll");
        let broker = cloud.broker().expect("embedded broker").v4_addr();
        let mut agent = Agent::connect(broker, "pozo-norte", false).await;

        let seal = |k: u8, n: u64| signed::seal(&key(k), Purpose::Batch, batch(n).as_bytes());
        agent.publish(None, seal(1, 1)).await;
        assert_eq!(agent.ack().await.status, AckStatus::Accepted);

        assert!(
            site_key::enroll(cloud.db(), &site, &key(2).public(), Utc::now())
                .await
                .expect("rotate")
        );
        // Enrolling the current key again changes nothing; an old key is not enrolled again.
        assert!(
            !site_key::enroll(cloud.db(), &site, &key(2).public(), Utc::now())
                .await
                .expect("again")
        );
        assert!(matches!(
            site_key::enroll(cloud.db(), &site, &key(1).public(), Utc::now()).await,
            Err(site_key::SiteKeyError::Reused { .. })
        ));
        let keys = site_key::keys(cloud.db(), &site).await.expect("keys");
        assert_eq!(keys.len(), 2);
        assert!(keys[0].valid_to.is_some() && keys[1].valid_to.is_none());

        agent.publish(None, seal(1, 2)).await;
        let ack = agent.ack().await;
        assert_eq!(
            ack.status,
            AckStatus::Rejected,
            "{}: old key refused",
            db.name
        );
        agent.publish(None, seal(2, 3)).await;
        assert_eq!(agent.ack().await.status, AckStatus::Accepted);
        assert_eq!(readings(&cloud, &site).await, 4, "{}", db.name);

        let (from, to) = all_time();
        let export = provenance::export(cloud.db(), &site, from, to)
            .await
            .expect("export");
        assert_eq!(export.batches.len(), 2);
        assert_eq!(export.keys.len(), 2);
        let v = provenance::verify(&export, &[key(1).public(), key(2).public()])
            .expect("both eras verify");
        assert_eq!(v.readings, 4);
        assert!(provenance::verify(&export, &[key(2).public()]).is_err());

        agent.kill();
        cloud.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_signing_key_every_ack_is_signed_by_the_cloud() {
    for db in TestDb::all().await {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cloud.key");
        let (cloud_key, _) = caudal_cloud::core::signing::load_or_create(&path).expect("key");
        let mut c = config(&db);
        c.ingest.accept_unsigned = false;
        c.signing.key_file = Some(path);
        let cloud = Cloud::start(c).await.expect("cloud starts");
        wait_metric(cloud.http_addr(), "caudal_cloud_ingest_subscribed 1").await;
        let site = site_id("pozo-norte");
        site::add(cloud.db(), &site, "").await.expect("add");
        site_key::enroll(cloud.db(), &site, &key(1).public(), Utc::now())
            .await
            .expect("enroll");
        let broker = cloud.broker().expect("embedded broker").v4_addr();
        let mut agent = Agent::connect(broker, "pozo-norte", false).await;

        // Accepted and rejected acks alike.
        for (payload, status) in [
            (
                signed::seal(&key(1), Purpose::Batch, batch(1).as_bytes()),
                AckStatus::Accepted,
            ),
            (batch(2).into_bytes(), AckStatus::Rejected),
        ] {
            agent.publish(None, payload).await;
            let raw = agent
                .raw_ack_within(std::time::Duration::from_secs(20))
                .await
                .expect("an ack");
            let opened = signed::open(&raw, Purpose::Ack).expect("the ack is signed");
            assert_eq!(opened.key, cloud_key.public(), "{}", db.name);
            let ack: caudal_common::Ack =
                caudal_common::payload::decode(opened.body).expect("ack decodes");
            assert_eq!(ack.status, status, "{}", db.name);
        }
        agent.kill();
        cloud.stop().await;
    }
}
