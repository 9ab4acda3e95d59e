//! Alerts over real storage and HTTP: each rule opens, refreshes and clears its alerts from
//! telemetry stored by the real store, event alerts stay until a person closes them and never
//! reopen for the same event, concurrent evaluators never double an alert, and the API checks
//! tokens, roles and parameters. On a SQLite file, and on PostgreSQL when
//! `CAUDAL_TEST_DATABASE_URL` is set.

use crate::support;

use caudal_cloud::Cloud;
use caudal_cloud::catchment::site;
use caudal_cloud::core::auth::Role;
use caudal_cloud::core::config::AlertsConfig;
use caudal_cloud::core::db::Db;
use caudal_cloud::telemetry::alert::{
    self, Alert, AlertKind, AlertMetrics, AlertState, Evaluator, Filter,
};
use caudal_cloud::telemetry::store;
use caudal_common::payload::EventKind;
use caudal_common::{Batch, DeviceId, Event, Reading, Seq, SiteId, Status};
use chrono::{DateTime, Duration, Utc};
use serde_json::Value;
use support::{TestDb, account_token, api_config, http};

fn site_id(s: &str) -> SiteId {
    SiteId::new(s).expect("site id")
}

fn device(s: &str) -> DeviceId {
    DeviceId::new(s).expect("device id")
}

fn reading(seq: u32, dev: &str, ts: DateTime<Utc>, total: f64) -> Reading {
    Reading {
        seq: Seq::new(1, seq),
        device: device(dev),
        ts,
        q: Default::default(),
        flow_lps: Some(4.0),
        total_m3: Some(total),
        level_m: None,
        extra: Default::default(),
    }
}

fn event(seq: u32, dev: &str, ts: DateTime<Utc>, kind: EventKind, prev: f64, cur: f64) -> Event {
    Event {
        seq: Seq::new(1, seq),
        ts,
        device: Some(device(dev)),
        kind,
        message: String::new(),
        previous: Some(prev),
        current: Some(cur),
        wrap: None,
    }
}

async fn store(db: &Db, site: &str, readings: Vec<Reading>, events: Vec<Event>, at: DateTime<Utc>) {
    let batch = Batch {
        v: 1,
        site: site_id(site),
        batch: format!("b-{}", fastrand::u64(..)),
        sent_at: at,
        readings,
        events,
        gaps: vec![],
    };
    store::store_batch(db, &batch, at).await.expect("store");
}

async fn open_alerts(db: &Db, kind: AlertKind) -> Vec<Alert> {
    alert::list(
        db,
        &Filter {
            state: Some(AlertState::Open),
            kind: Some(kind),
            limit: 100,
            ..Filter::default()
        },
    )
    .await
    .expect("list")
}

async fn all_alerts(db: &Db, kind: AlertKind) -> Vec<Alert> {
    alert::list(
        db,
        &Filter {
            kind: Some(kind),
            limit: 100,
            ..Filter::default()
        },
    )
    .await
    .expect("list")
}

async fn database(t: &TestDb) -> Db {
    let db = Db::connect(&t.url, 4).await.expect("connect");
    db.migrate().await.expect("migrate");
    db
}

fn evaluator(db: &Db) -> Evaluator {
    let cfg = AlertsConfig {
        no_data_after_s: 3600,
        volume_interval_s: 0,
        ..AlertsConfig::default()
    };
    Evaluator::new(cfg, db.clone(), AlertMetrics::default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_and_no_data_open_while_true_and_clear_themselves() {
    for t in TestDb::all().await {
        let db = database(&t).await;
        let ev = evaluator(&db);
        site::add(&db, &site_id("pozo-1"), "Pozo 1")
            .await
            .expect("add");
        let t0 = Utc::now();
        store(
            &db,
            "pozo-1",
            vec![reading(1, "fm1", t0, 100.0)],
            vec![],
            t0,
        )
        .await;

        ev.evaluate(t0 + Duration::minutes(10)).await;
        assert!(
            open_alerts(&db, AlertKind::SiteOffline).await.is_empty(),
            "{}",
            t.name
        );
        assert!(
            open_alerts(&db, AlertKind::NoData).await.is_empty(),
            "{}",
            t.name
        );

        // 20 min without a word: offline (threshold 15 min); no data only after an hour.
        ev.evaluate(t0 + Duration::minutes(20)).await;
        let off = open_alerts(&db, AlertKind::SiteOffline).await;
        assert_eq!(off.len(), 1, "{}: {off:?}", t.name);
        assert_eq!(off[0].subject, "site/pozo-1");
        assert_eq!(off[0].threshold, Some(900.0));
        assert!(
            open_alerts(&db, AlertKind::NoData).await.is_empty(),
            "{}",
            t.name
        );

        ev.evaluate(t0 + Duration::minutes(90)).await;
        let off2 = open_alerts(&db, AlertKind::SiteOffline).await;
        assert_eq!(off2.len(), 1, "{}: still one alert, refreshed", t.name);
        assert_eq!(off2[0].id, off[0].id);
        assert_eq!(off2[0].value, Some(90.0 * 60.0), "{}", t.name);
        let nd = open_alerts(&db, AlertKind::NoData).await;
        assert_eq!(nd.len(), 1, "{}: {nd:?}", t.name);
        assert_eq!(nd[0].subject, "device/pozo-1/fm1");
        assert_eq!(nd[0].device.as_deref(), Some("fm1"));

        // The agent comes back: both clear.
        let t1 = t0 + Duration::minutes(91);
        store::store_status(
            &db,
            &Status {
                v: 1,
                site: site_id("pozo-1"),
                online: true,
                ts: Some(t1),
                agent_version: None,
                config_version: None,
                backlog: Some(0),
                oldest_unsent_age_s: None,
                clock_synced: Some(true),
                evicted: None,
                devices: Default::default(),
            },
            t1,
        )
        .await
        .expect("status");
        store(
            &db,
            "pozo-1",
            vec![reading(2, "fm1", t1, 101.0)],
            vec![],
            t1,
        )
        .await;
        ev.evaluate(t1 + Duration::minutes(1)).await;
        assert!(
            open_alerts(&db, AlertKind::SiteOffline).await.is_empty(),
            "{}",
            t.name
        );
        assert!(
            open_alerts(&db, AlertKind::NoData).await.is_empty(),
            "{}",
            t.name
        );
        let closed = all_alerts(&db, AlertKind::SiteOffline).await;
        assert_eq!(closed.len(), 1, "{}", t.name);
        assert_eq!(closed[0].state, AlertState::Closed);
        assert_eq!(closed[0].closed_by.as_deref(), Some("cleared"));

        // An inactive site raises nothing.
        site::set_active(&db, &site_id("pozo-1"), false)
            .await
            .expect("deactivate");
        ev.evaluate(t1 + Duration::hours(5)).await;
        assert!(
            open_alerts(&db, AlertKind::SiteOffline).await.is_empty(),
            "{}",
            t.name
        );
        assert!(
            open_alerts(&db, AlertKind::NoData).await.is_empty(),
            "{}",
            t.name
        );
        db.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_totalizer_going_backwards_stays_open_until_closed_and_reopens_only_for_a_new_event() {
    for t in TestDb::all().await {
        let db = database(&t).await;
        let ev = evaluator(&db);
        site::add(&db, &site_id("pozo-2"), "").await.expect("add");
        let t0 = Utc::now();
        store(
            &db,
            "pozo-2",
            vec![reading(1, "fm1", t0, 5000.0)],
            vec![
                // A rollover is normal: no alert.
                event(2, "fm1", t0, EventKind::TotalizerRollover, 99_999.0, 3.0),
                event(
                    3,
                    "fm1",
                    t0 + Duration::seconds(60),
                    EventKind::TotalizerReset,
                    5000.0,
                    0.0,
                ),
            ],
            t0,
        )
        .await;
        ev.evaluate(t0 + Duration::minutes(2)).await;
        ev.evaluate(t0 + Duration::minutes(3)).await;
        let open = open_alerts(&db, AlertKind::TotalizerBackwards).await;
        assert_eq!(open.len(), 1, "{}: {open:?}", t.name);
        assert_eq!(open[0].subject, "device/pozo-2/fm1");
        assert_eq!(
            (open[0].threshold, open[0].value),
            (Some(5000.0), Some(0.0))
        );
        assert!(
            open[0].message.contains("totalizer reset"),
            "{}",
            open[0].message
        );

        // Still open while nothing clears it; a person closes it; the same event never reopens.
        ev.evaluate(t0 + Duration::hours(3)).await;
        assert_eq!(
            open_alerts(&db, AlertKind::TotalizerBackwards).await.len(),
            1
        );
        let closed = alert::close(
            &db,
            open[0].id,
            "tec@x.cl",
            "meter reset by the vendor",
            Utc::now(),
        )
        .await
        .expect("close");
        assert_eq!(closed.closed_by.as_deref(), Some("tec@x.cl"));
        assert!(matches!(
            alert::close(&db, open[0].id, "tec@x.cl", "", Utc::now()).await,
            Err(alert::AlertError::Closed(_))
        ));
        ev.evaluate(t0 + Duration::hours(4)).await;
        assert!(
            open_alerts(&db, AlertKind::TotalizerBackwards)
                .await
                .is_empty(),
            "{}",
            t.name
        );

        // A new event opens a new alert.
        let t1 = t0 + Duration::hours(5);
        store(
            &db,
            "pozo-2",
            vec![],
            vec![event(4, "fm1", t1, EventKind::MeterReplaced, 10.0, 0.5)],
            t1,
        )
        .await;
        ev.evaluate(t1 + Duration::minutes(1)).await;
        let open = open_alerts(&db, AlertKind::TotalizerBackwards).await;
        assert_eq!(open.len(), 1, "{}", t.name);
        assert!(
            open[0].message.contains("meter replaced"),
            "{}",
            open[0].message
        );
        assert_eq!(
            all_alerts(&db, AlertKind::TotalizerBackwards).await.len(),
            2
        );
        db.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_evaluators_never_double_an_alert() {
    for t in TestDb::all().await {
        let db = database(&t).await;
        for i in 0..20 {
            site::add(&db, &site_id(&format!("s{i}")), "")
                .await
                .expect("add");
        }
        let later = Utc::now() + Duration::hours(2);
        let (a, b) = (evaluator(&db), evaluator(&db));
        let ((), ()) = tokio::join!(a.evaluate(later), b.evaluate(later));
        let ((), ()) = tokio::join!(a.evaluate(later), b.evaluate(later));
        assert_eq!(
            open_alerts(&db, AlertKind::SiteOffline).await.len(),
            20,
            "{}",
            t.name
        );
        assert_eq!(all_alerts(&db, AlertKind::SiteOffline).await.len(), 20);
        db.close().await;
    }
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alerts_api_checks_roles_and_parameters() {
    for t in TestDb::all().await {
        let mut cfg = api_config(&t, "all");
        cfg.alerts.enabled = false;
        let cloud = Cloud::start(cfg).await.expect("start");
        let addr = cloud.http_addr();
        let db = cloud.db().clone();
        site::add(&db, &site_id("pozo-3"), "").await.expect("add");
        let t0 = Utc::now();
        store(
            &db,
            "pozo-3",
            vec![],
            vec![event(
                1,
                "fm1",
                t0,
                EventKind::TotalizerBackwards,
                10.0,
                9.0,
            )],
            t0,
        )
        .await;
        evaluator(&db).evaluate(t0).await;
        let id = open_alerts(&db, AlertKind::TotalizerBackwards).await[0].id;

        let viewer = account_token(&cloud, "view@x.cl", Role::Viewer).await;
        let operator = account_token(&cloud, "op@x.cl", Role::Operator).await;
        let close = format!("/api/v1/alerts/{id}/close");
        let note = Some(r#"{"note":"checked on site"}"#);

        let (code, _) = http(addr, "GET", "/api/v1/alerts", None, None).await;
        assert_eq!(code, 401, "{}", t.name);
        let (code, body) = http(
            addr,
            "GET",
            "/api/v1/alerts?site=pozo-3",
            Some(&viewer),
            None,
        )
        .await;
        assert_eq!(code, 200, "{}: {body}", t.name);
        let list = json(&body);
        assert_eq!(list.as_array().map(Vec::len), Some(1), "{body}");
        assert_eq!(list[0]["kind"], "totalizer_backwards");
        assert_eq!(list[0]["state"], "open");
        let (code, _) = http(
            addr,
            "GET",
            &format!("/api/v1/alerts/{id}"),
            Some(&viewer),
            None,
        )
        .await;
        assert_eq!(code, 200);

        for (path, field) in [
            ("/api/v1/alerts?state=shut", "state"),
            ("/api/v1/alerts?kind=flood", "kind"),
            ("/api/v1/alerts?limit=0", "limit"),
            ("/api/v1/alerts?limit=ten", "limit"),
            ("/api/v1/alerts?colour=red", "colour"),
            ("/api/v1/alerts/abc", "id"),
        ] {
            let (code, body) = http(addr, "GET", path, Some(&viewer), None).await;
            assert_eq!(code, 400, "{}: {path}: {body}", t.name);
            assert_eq!(json(&body)["field"], field, "{path}: {body}");
        }
        let (code, _) = http(addr, "GET", "/api/v1/alerts/999999", Some(&viewer), None).await;
        assert_eq!(code, 404);

        let (code, _) = http(addr, "POST", &close, None, note).await;
        assert_eq!(code, 401);
        let (code, _) = http(addr, "POST", &close, Some(&viewer), note).await;
        assert_eq!(code, 403);
        let (code, body) = http(
            addr,
            "POST",
            &close,
            Some(&operator),
            Some(r#"{"nota":"x"}"#),
        )
        .await;
        assert_eq!(code, 400, "{body}");
        assert_eq!(json(&body)["field"], "nota");
        let (code, body) = http(addr, "POST", &close, Some(&operator), note).await;
        assert_eq!(code, 200, "{}: {body}", t.name);
        let closed = json(&body);
        assert_eq!(closed["state"], "closed");
        assert_eq!(closed["closed_by"], "op@x.cl");
        assert_eq!(closed["close_note"], "checked on site");
        let (code, body) = http(addr, "POST", &close, Some(&operator), note).await;
        assert_eq!(code, 409, "{body}");
        let (code, body) = http(
            addr,
            "GET",
            "/api/v1/alerts?state=closed",
            Some(&viewer),
            None,
        )
        .await;
        assert_eq!(code, 200);
        assert_eq!(json(&body).as_array().map(Vec::len), Some(1));
        cloud.stop().await;
    }
}

async fn point(db: &Db, json: &str) -> i64 {
    let new: caudal_cloud::catchment::point::NewPoint =
        serde_json::from_str(json).expect("point json");
    caudal_cloud::catchment::point::create(db, &new)
        .await
        .expect("create point")
        .id
}

async fn meter(db: &Db, site: &str, id: &str, point: i64) {
    let new: caudal_cloud::catchment::device::NewDevice = serde_json::from_value(
        serde_json::json!({"id": id, "quantities": ["flow", "totalizer"], "point_id": point}),
    )
    .expect("device json");
    caudal_cloud::catchment::device::create(db, &site_id(site), &new)
        .await
        .expect("create device");
}

fn flow_reading(seq: u32, dev: &str, ts: DateTime<Utc>, flow: f64) -> Reading {
    Reading {
        flow_lps: Some(flow),
        total_m3: None,
        ..reading(seq, dev, ts, 0.0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_above_the_authorized_flow_sums_the_points_meters() {
    for t in TestDb::all().await {
        let db = database(&t).await;
        let ev = evaluator(&db);
        site::add(&db, &site_id("pozo-4"), "").await.expect("add");
        let p = point(
            &db,
            r#"{"name":"Pozo 4","kind":"groundwater","authorized_flow_lps":10.0}"#,
        )
        .await;
        meter(&db, "pozo-4", "fm1", p).await;
        meter(&db, "pozo-4", "fm2", p).await;
        let t0 = Utc::now();
        // 6 + 3 = 9 L/s: within the right.
        store(
            &db,
            "pozo-4",
            vec![
                flow_reading(1, "fm1", t0, 6.0),
                flow_reading(2, "fm2", t0, 3.0),
            ],
            vec![],
            t0,
        )
        .await;
        ev.evaluate(t0).await;
        assert!(
            open_alerts(&db, AlertKind::FlowAboveAuthorized)
                .await
                .is_empty()
        );

        // fm2 rises to 5: 11 L/s over 10.
        let t1 = t0 + Duration::seconds(60);
        store(
            &db,
            "pozo-4",
            vec![flow_reading(3, "fm2", t1, 5.0)],
            vec![],
            t1,
        )
        .await;
        ev.evaluate(t1).await;
        let open = open_alerts(&db, AlertKind::FlowAboveAuthorized).await;
        assert_eq!(open.len(), 1, "{}: {open:?}", t.name);
        assert_eq!(open[0].subject, format!("point/{p}"));
        assert_eq!(open[0].point_id, Some(p));
        assert_eq!((open[0].value, open[0].threshold), (Some(11.0), Some(10.0)));
        assert!(open[0].message.contains("11.00 L/s"), "{}", open[0].message);

        // Still above a minute later: the same alert, its start kept.
        let t2 = t1 + Duration::seconds(60);
        store(
            &db,
            "pozo-4",
            vec![flow_reading(4, "fm1", t2, 7.0)],
            vec![],
            t2,
        )
        .await;
        ev.evaluate(t2).await;
        let again = open_alerts(&db, AlertKind::FlowAboveAuthorized).await;
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].id, open[0].id);
        assert_eq!(again[0].since, open[0].since, "{}: since stays", t.name);
        assert_eq!(again[0].value, Some(12.0));

        // Back under: cleared.
        let t3 = t2 + Duration::seconds(60);
        store(
            &db,
            "pozo-4",
            vec![flow_reading(5, "fm1", t3, 4.0)],
            vec![],
            t3,
        )
        .await;
        ev.evaluate(t3).await;
        assert!(
            open_alerts(&db, AlertKind::FlowAboveAuthorized)
                .await
                .is_empty()
        );
        let all = all_alerts(&db, AlertKind::FlowAboveAuthorized).await;
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].closed_by.as_deref(), Some("cleared"));
        db.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annual_volume_heading_past_the_allowance() {
    for t in TestDb::all().await {
        let db = database(&t).await;
        let ev = evaluator(&db);
        site::add(&db, &site_id("pozo-5"), "").await.expect("add");
        let p = point(
            &db,
            r#"{"name":"Pozo 5","kind":"groundwater","annual_volume_m3":1000.0}"#,
        )
        .await;
        meter(&db, "pozo-5", "fm1", p).await;
        // A fixed "now", so the year's arithmetic does not depend on the day the test runs.
        let now = DateTime::parse_from_rfc3339("2026-11-28T12:00:00Z")
            .expect("time")
            .with_timezone(&Utc);
        let totals = [
            (now - Duration::days(40), 0.0),
            (now - Duration::days(30) + Duration::hours(1), 100.0),
            (now - Duration::hours(1), 700.0),
        ];
        let readings = totals
            .iter()
            .enumerate()
            .map(|(i, (ts, v))| reading(i as u32 + 1, "fm1", *ts, *v))
            .collect();
        store(&db, "pozo-5", readings, vec![], now).await;

        ev.evaluate(now).await;
        let open = open_alerts(&db, AlertKind::AnnualVolume).await;
        assert_eq!(open.len(), 1, "{}: {open:?}", t.name);
        // 700 m³ so far; 600 m³ in the last 30 days; ~33.7 days left in the DGA year.
        let year_end = open[0].value.expect("value");
        assert!(
            (1350.0..1380.0).contains(&year_end),
            "{}: forecast {year_end}",
            t.name
        );
        assert_eq!(open[0].threshold, Some(1000.0));
        assert!(open[0].message.contains("700 m³"), "{}", open[0].message);

        // A larger allowance clears it at the next evaluation.
        let patch: caudal_cloud::catchment::point::PointPatch =
            serde_json::from_str(r#"{"annual_volume_m3": 5000.0}"#).expect("patch");
        caudal_cloud::catchment::point::update(&db, p, patch)
            .await
            .expect("update");
        ev.evaluate(now + Duration::minutes(1)).await;
        assert!(
            open_alerts(&db, AlertKind::AnnualVolume).await.is_empty(),
            "{}",
            t.name
        );
        db.close().await;
    }
}
