//! The telemetry API over real HTTP, on data stored by the real store: raw readings and their
//! pages, aggregates with hand-computed volumes across a reset, a rollover and a meter
//! replacement, the latest values, completeness with deliberate sequence holes and gap records,
//! events, bad parameters, role checks, and the OpenAPI document against the routes served.
//! Each test runs on a SQLite file, and on PostgreSQL when `CAUDAL_TEST_DATABASE_URL` is set.

use crate::support;

use caudal_cloud::Cloud;
use caudal_cloud::catchment::site;
use caudal_cloud::core::auth::Role;
use caudal_cloud::telemetry::store;
use caudal_common::{
    Batch, DeviceId, Event, EventKind, Flag, Gap, GapCause, Quality, Reading, Seq, SeqRange,
    SiteId, Status,
};
use chrono::{DateTime, Duration, Utc};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use support::{TestDb, account_token, api_config, http};

const SITE: &str = "pozo-norte";
const EPOCH_A: u32 = 1_000;
const EPOCH_B: u32 = 2_000;
const FROM: &str = "2026-11-28T00:00:00Z";
const TO: &str = "2026-11-28T03:00:00Z";

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

fn t0() -> DateTime<Utc> {
    FROM.parse().expect("time")
}

fn at(min: i64) -> DateTime<Utc> {
    t0() + Duration::minutes(min)
}

fn dev(d: &str) -> DeviceId {
    d.parse().expect("device id")
}

fn seq(epoch: u32, counter: u32) -> Seq {
    Seq::new(epoch, counter)
}

fn reading(s: Seq, device: &str, min: i64, total: f64, flow: Option<f64>, q: &[Flag]) -> Reading {
    Reading {
        seq: s,
        device: dev(device),
        ts: at(min),
        q: q.iter().fold(Quality::GOOD, |q, f| q.with(*f)),
        flow_lps: flow,
        total_m3: Some(total),
        level_m: None,
        extra: BTreeMap::new(),
    }
}

fn event(
    s: Seq,
    device: Option<&str>,
    min: i64,
    kind: EventKind,
    msg: &str,
    p: f64,
    c: f64,
) -> Event {
    Event {
        seq: s,
        ts: at(min),
        device: device.map(dev),
        kind,
        message: msg.to_string(),
        previous: Some(p),
        current: Some(c),
        wrap: None,
    }
}

/// The data every test reads. Epoch A has counters 1..=26 with 5..=6 missing (lost) and
/// 10..=12 missing (evicted, covered by the gap record at counter 20); epoch B has 1 and 3.
///
/// fm1 totals (every 15 min from 00:00; 95 at 23:50 the day before):
///   hour 0: 100 110 125 130           → 5 + 10 + 15 + 5 = 35
///   hour 1: 140, reset to 2, 7, 9     → 10 + 0 + 5 + 2  = 17 (1 break)
///   hour 2: 20, replaced 5e6, 5e6+4   → 11 + 0 + 4      = 15 (1 break)
/// fm2 totals (wrap 100000): 99980 (00:00, first) 99990 (00:30) | 5 (01:00, rollover)
///   12 (01:30) | 20 (02:45, epoch B): hour 0 = 10, hour 1 = 15 + 7 = 22, hour 2 = 8.
fn batches() -> Vec<Batch> {
    let a = |c| seq(EPOCH_A, c);
    let mut r = vec![
        reading(a(1), "fm1", -10, 95.0, Some(5.0), &[]),
        reading(a(2), "fm1", 0, 100.0, Some(10.0), &[]),
        reading(a(3), "fm2", 0, 99_980.0, Some(1.0), &[]),
        reading(a(4), "fm1", 15, 110.0, Some(20.0), &[]),
        reading(a(7), "fm1", 30, 125.0, Some(30.0), &[]),
        reading(a(8), "fm2", 30, 99_990.0, Some(1.0), &[]),
        reading(a(9), "fm1", 45, 130.0, Some(40.0), &[]),
        reading(a(13), "fm1", 60, 140.0, Some(8.0), &[]),
        reading(a(14), "fm2", 60, 5.0, Some(1.0), &[Flag::TotalizerRollover]),
        reading(a(16), "fm1", 75, 2.0, Some(8.0), &[Flag::TotalizerReset]),
        reading(a(18), "fm1", 90, 7.0, Some(8.0), &[]),
        reading(a(19), "fm2", 90, 12.0, Some(1.0), &[]),
        reading(a(21), "fm1", 105, 9.0, Some(8.0), &[]),
        reading(a(22), "fm1", 120, 20.0, Some(8.0), &[]),
        reading(
            a(23),
            "fm1",
            135,
            5_000_000.0,
            Some(8.0),
            &[Flag::MeterReplaced],
        ),
        reading(a(25), "fm1", 150, 5_000_004.0, None, &[Flag::Partial]),
    ];
    r[1].level_m = Some(12.5);
    let mut events = vec![
        event(
            a(15),
            Some("fm2"),
            60,
            EventKind::TotalizerRollover,
            // The wrap travels in its own field; the message does not repeat it.
            "total wrapped: 99990 → 5 m³, 15.000 m³ counted across the wrap in 1800 s",
            99_990.0,
            5.0,
        ),
        event(
            a(17),
            Some("fm1"),
            75,
            EventKind::TotalizerReset,
            "total went back to near zero: 140 → 2 m³ in 900 s; counter reset",
            140.0,
            2.0,
        ),
        event(
            a(24),
            Some("fm1"),
            135,
            EventKind::MeterReplaced,
            "total jumped 20 → 5000000 m³ in 900 s",
            20.0,
            5_000_000.0,
        ),
    ];
    events[0].wrap = Some(100_000.0);
    let gaps = vec![
        Gap {
            seq: a(20),
            device: Some(dev("fm1")),
            from: at(46),
            to: at(59),
            seqs: Some(SeqRange {
                from: a(10),
                to: a(12),
            }),
            count: 3,
            cause: GapCause::Evicted,
        },
        Gap {
            seq: a(26),
            device: Some(dev("fm2")),
            from: at(91),
            to: at(179),
            seqs: None,
            count: 0,
            cause: GapCause::DeviceUnreachable,
        },
    ];
    let site = SiteId::new(SITE).expect("site");
    let first = Batch {
        v: 1,
        site: site.clone(),
        batch: "a".into(),
        sent_at: at(180),
        readings: r,
        events,
        gaps,
    };
    let mut agent_started = event(
        seq(EPOCH_B, 3),
        None,
        160,
        EventKind::AgentStarted,
        "caudal-agent 0.1.0",
        0.0,
        0.0,
    );
    agent_started.previous = None;
    agent_started.current = None;
    let second = Batch {
        v: 1,
        site,
        batch: "b".into(),
        sent_at: at(180),
        readings: vec![reading(seq(EPOCH_B, 1), "fm2", 165, 20.0, Some(1.0), &[])],
        events: vec![agent_started],
        gaps: vec![],
    };
    vec![first, second]
}

/// A cloud with the telemetry API, the site registered and the data stored: (cloud, viewer's
/// token).
async fn start(db: &TestDb) -> (Cloud, String) {
    let cloud = Cloud::start(api_config(db, "core,telemetry"))
        .await
        .expect("start");
    let id = SiteId::new(SITE).expect("site");
    site::add(cloud.db(), &id, "Pozo Norte")
        .await
        .expect("site");
    site::add(cloud.db(), &SiteId::new("vacio").expect("site"), "")
        .await
        .expect("site");
    for b in batches() {
        store::store_batch(cloud.db(), &b, Utc::now())
            .await
            .expect("stored");
    }
    let mut status = Status::offline(id);
    status.online = true;
    status.backlog = Some(7);
    status.agent_version = Some("0.1.0".into());
    store::store_status(cloud.db(), &status, Utc::now())
        .await
        .expect("status");
    let token = account_token(&cloud, "viewer@x.cl", Role::Viewer).await;
    (cloud, token)
}

async fn get(cloud: &Cloud, token: &str, path: &str) -> (u16, Value) {
    let (code, body) = http(cloud.http_addr(), "GET", path, Some(token), None).await;
    (code, json(&body))
}

async fn ok(cloud: &Cloud, token: &str, path: &str) -> Value {
    let (code, v) = get(cloud, token, path).await;
    assert_eq!(code, 200, "GET {path}: {v}");
    v
}

fn readings_path(q: &str) -> String {
    format!("/api/v1/sites/{SITE}/readings?from={FROM}&to={TO}{q}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_readings_page_in_time_order_without_loss_or_repeat() {
    for db in TestDb::all().await {
        let (cloud, token) = start(&db).await;
        let mut seen = Vec::new();
        let mut cursor = String::new();
        let mut pages = 0;
        loop {
            let v = ok(&cloud, &token, &readings_path(&format!("&limit=5{cursor}"))).await;
            assert_eq!(v["bucket"], "raw");
            let page = v["readings"].as_array().expect("readings").clone();
            assert!(page.len() <= 5);
            pages += 1;
            for r in &page {
                let ts: DateTime<Utc> = r["ts"].as_str().expect("ts").parse().expect("ts");
                seen.push((ts, r["seq"].as_i64().expect("seq")));
            }
            match v["next_cursor"].as_str() {
                Some(c) => cursor = format!("&cursor={c}"),
                None => break,
            }
            assert!(pages < 10, "{}: pages never end", db.name);
        }
        assert_eq!(
            seen.len(),
            16,
            "{}: 11 fm1 + 5 fm2 readings in range",
            db.name
        );
        assert_eq!(pages, 4, "{}", db.name);
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(seen, sorted, "{}: ordered by (ts, seq)", db.name);
        assert_eq!(
            seen.iter().collect::<BTreeSet<_>>().len(),
            16,
            "{}: no repeats",
            db.name
        );

        let v = ok(&cloud, &token, &readings_path("&device=fm2")).await;
        let fm2 = v["readings"].as_array().expect("readings");
        assert_eq!(fm2.len(), 5);
        assert_eq!(fm2[2]["quality"], serde_json::json!(["totalizer_rollover"]));
        assert!(v.get("next_cursor").is_none_or(Value::is_null));

        let v = ok(&cloud, &token, &readings_path("&quality=totalizer_reset")).await;
        let only = v["readings"].as_array().expect("readings");
        assert_eq!(only.len(), 1);
        assert_eq!(only[0]["total_m3"], 2.0);
        let v = ok(&cloud, &token, &readings_path("&quality=flagged")).await;
        assert_eq!(v["readings"].as_array().expect("readings").len(), 4);
        cloud.stop().await;
    }
}

fn bucket<'a>(v: &'a Value, device: &str, start: &str) -> &'a Value {
    v["buckets"]
        .as_array()
        .expect("buckets")
        .iter()
        .find(|b| b["device"] == device && b["start"].as_str() == Some(start))
        .unwrap_or_else(|| panic!("no bucket {device} {start} in {v}"))
}

fn close(v: &Value, expected: f64) -> bool {
    v.as_f64().is_some_and(|x| (x - expected).abs() < 1e-9)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregates_count_volume_across_reset_rollover_and_replacement() {
    for db in TestDb::all().await {
        let (cloud, token) = start(&db).await;
        let v = ok(&cloud, &token, &readings_path("&bucket=hour")).await;
        assert_eq!(v["buckets"].as_array().expect("buckets").len(), 6, "{v}");
        for (device, hour, volume, breaks, rollovers) in [
            ("fm1", "00", 35.0, 0, 0),
            ("fm1", "01", 17.0, 1, 0),
            ("fm1", "02", 15.0, 1, 0),
            ("fm2", "00", 10.0, 0, 0),
            ("fm2", "01", 22.0, 0, 1),
            ("fm2", "02", 8.0, 0, 0),
        ] {
            let b = bucket(&v, device, &format!("2026-11-28T{hour}:00:00Z"));
            assert!(
                close(&b["volume_m3"], volume),
                "{}: {device} hour {hour}: {b}",
                db.name
            );
            assert_eq!(b["totalizer_breaks"], breaks, "{device} {hour}: {b}");
            assert_eq!(b["rollovers"], rollovers, "{device} {hour}: {b}");
        }
        let h0 = bucket(&v, "fm1", "2026-11-28T00:00:00Z");
        assert_eq!(h0["readings"], 4);
        assert_eq!(h0["flow_lps"]["count"], 4);
        assert!(close(&h0["flow_lps"]["avg"], 25.0), "{h0}");
        assert!(close(&h0["flow_lps"]["min"], 10.0), "{h0}");
        assert!(close(&h0["flow_lps"]["max"], 40.0), "{h0}");
        assert!(close(&h0["level_m"]["avg"], 12.5), "{h0}");
        assert!(bucket(&v, "fm1", "2026-11-28T01:00:00Z")["level_m"].is_null());

        let v = ok(&cloud, &token, &readings_path("&bucket=day")).await;
        assert!(close(&bucket(&v, "fm1", FROM)["volume_m3"], 67.0), "{v}");
        assert!(close(&bucket(&v, "fm2", FROM)["volume_m3"], 40.0), "{v}");

        // Days on a fixed offset's wall clock: at UTC-1 the first hour is the 27th's last.
        let v = ok(&cloud, &token, &readings_path("&bucket=day&offset=-01:00")).await;
        assert_eq!(v["buckets"].as_array().expect("buckets").len(), 4, "{v}");
        for (device, start, volume) in [
            ("fm1", "2026-11-27T01:00:00Z", 35.0),
            ("fm1", "2026-11-28T01:00:00Z", 32.0),
            ("fm2", "2026-11-27T01:00:00Z", 10.0),
            ("fm2", "2026-11-28T01:00:00Z", 30.0),
        ] {
            let b = bucket(&v, device, start);
            assert!(
                close(&b["volume_m3"], volume),
                "{}: {device} {start}: {b}",
                db.name
            );
        }
        // DGA days (UTC-4): all three hours are the 27th's evening.
        let v = ok(&cloud, &token, &readings_path("&bucket=day&offset=-04:00")).await;
        assert!(
            close(
                &bucket(&v, "fm1", "2026-11-27T04:00:00Z")["volume_m3"],
                67.0
            ),
            "{v}"
        );

        let v = ok(&cloud, &token, &readings_path("&bucket=minute&device=fm2")).await;
        assert_eq!(v["buckets"].as_array().expect("buckets").len(), 5);
        assert!(close(
            &bucket(&v, "fm2", "2026-11-28T01:00:00Z")["volume_m3"],
            15.0
        ));
        cloud.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_values_and_status() {
    for db in TestDb::all().await {
        let (cloud, token) = start(&db).await;
        let v = ok(&cloud, &token, &format!("/api/v1/sites/{SITE}/latest")).await;
        assert_eq!(v["status"]["online"], true, "{v}");
        assert_eq!(v["status"]["backlog"], 7);
        let devices = v["devices"].as_array().expect("devices");
        assert_eq!(devices.len(), 2);
        let fm1 = &devices[0];
        assert_eq!(fm1["device"], "fm1");
        assert_eq!(fm1["total_m3"]["value"], 5_000_004.0);
        assert_eq!(fm1["total_m3"]["quality"], serde_json::json!(["partial"]));
        assert_eq!(fm1["flow_lps"]["ts"], "2026-11-28T02:15:00Z", "{fm1}");
        assert_eq!(
            fm1["flow_lps"]["quality"],
            serde_json::json!(["meter_replaced"])
        );
        assert_eq!(fm1["level_m"]["value"], 12.5);
        assert_eq!(fm1["level_m"]["ts"], "2026-11-28T00:00:00Z");
        let fm2 = &devices[1];
        assert_eq!(fm2["total_m3"]["value"], 20.0);
        assert!(fm2["level_m"].is_null());

        let v = ok(&cloud, &token, "/api/v1/sites/vacio/latest").await;
        assert!(v["status"].is_null());
        assert_eq!(v["devices"], serde_json::json!([]));
        cloud.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completeness_finds_holes_time_gaps_and_gap_records() {
    for db in TestDb::all().await {
        let (cloud, token) = start(&db).await;
        let base = format!("/api/v1/sites/{SITE}/completeness?from={FROM}&to={TO}");
        let v = ok(&cloud, &token, &base).await;
        let s = &v["summary"];
        assert_eq!(
            (
                &s["expected"],
                &s["stored"],
                &s["missing"],
                &s["covered_by_gaps"],
                &s["unexplained"]
            ),
            (
                &Value::from(28),
                &Value::from(22),
                &Value::from(6),
                &Value::from(3),
                &Value::from(3)
            ),
            "{}: {v}",
            db.name
        );
        let epochs = v["epochs"].as_array().expect("epochs");
        assert_eq!(epochs.len(), 2);
        let a = |c: u32| seq(EPOCH_A, c).0 as i64;
        assert_eq!(epochs[0]["epoch"], EPOCH_A);
        assert_eq!(epochs[0]["first_seq"], a(2), "c1 is before the range");
        assert_eq!(epochs[0]["last_seq"], a(26));
        assert_eq!(
            epochs[0]["holes"],
            serde_json::json!([
                {"from": a(5), "to": a(6), "count": 2, "covered_by_gaps": 0},
                {"from": a(10), "to": a(12), "count": 3, "covered_by_gaps": 3},
            ])
        );
        let b2 = seq(EPOCH_B, 2).0 as i64;
        assert_eq!(
            epochs[1]["holes"],
            serde_json::json!([{"from": b2, "to": b2, "count": 1, "covered_by_gaps": 0}])
        );
        assert_eq!(
            v["time_gaps"],
            serde_json::json!([]),
            "median × 3 finds none"
        );
        let cadence = &v["devices"].as_array().expect("devices")[1];
        assert_eq!(cadence["device"], "fm2");
        assert_eq!(cadence["median_interval_s"], 1800.0);
        let records = v["gap_records"].as_array().expect("gap records");
        assert_eq!(records.len(), 2);
        assert_eq!(records[0]["cause"], "evicted");
        assert_eq!(records[0]["seq_from"], a(10));
        assert_eq!(records[1]["cause"], "device_unreachable");

        let v = ok(&cloud, &token, &format!("{base}&gap_after=3600")).await;
        assert_eq!(
            v["time_gaps"],
            serde_json::json!([{"device": "fm2", "from": "2026-11-28T01:30:00Z",
                                "to": "2026-11-28T02:45:00Z", "seconds": 4500.0}])
        );
        cloud.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_by_kind_and_page() {
    for db in TestDb::all().await {
        let (cloud, token) = start(&db).await;
        let base = format!("/api/v1/sites/{SITE}/events?from={FROM}&to={TO}");
        let v = ok(&cloud, &token, &base).await;
        let kinds: Vec<&str> = v["events"]
            .as_array()
            .expect("events")
            .iter()
            .map(|e| e["kind"].as_str().expect("kind"))
            .collect();
        assert_eq!(
            kinds,
            [
                "totalizer_rollover",
                "totalizer_reset",
                "meter_replaced",
                "agent_started"
            ]
        );
        let v = ok(
            &cloud,
            &token,
            &format!("{base}&kind=totalizer_reset,meter_replaced&device=fm1"),
        )
        .await;
        let e = v["events"].as_array().expect("events");
        assert_eq!(e.len(), 2);
        assert_eq!(
            (&e[0]["previous"], &e[0]["current"]),
            (&140.0.into(), &2.0.into())
        );

        let mut n = 0;
        let mut path = format!("{base}&limit=1");
        loop {
            let v = ok(&cloud, &token, &path).await;
            n += v["events"].as_array().expect("events").len();
            match v["next_cursor"].as_str() {
                Some(c) => path = format!("{base}&limit=1&cursor={c}"),
                None => break,
            }
            assert!(n <= 4);
        }
        assert_eq!(n, 4);
        cloud.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_are_400s_naming_the_parameter() {
    for db in TestDb::all().await {
        let (cloud, token) = start(&db).await;
        let r = format!("/api/v1/sites/{SITE}/readings");
        for (path, field) in [
            (format!("{r}?from={TO}&to={FROM}"), "from"),
            (format!("{r}?from=yesterday"), "from"),
            (format!("{r}?to=2026-13-01T00:00:00Z"), "to"),
            (format!("{r}?bucket=week"), "bucket"),
            (
                format!("{r}?bucket=minute&from=2026-10-01T00:00:00Z&to={TO}"),
                "bucket",
            ),
            (format!("{r}?bucket=hour&limit=5"), "limit"),
            (format!("{r}?offset=-04:00"), "offset"),
            (format!("{r}?bucket=day&offset=-4"), "offset"),
            (format!("{r}?bucket=day&offset=%2B15:00"), "offset"),
            (format!("{r}?bucket=day&offset=-04:60"), "offset"),
            (format!("{r}?limit=0"), "limit"),
            (format!("{r}?limit=abc"), "limit"),
            (format!("{r}?cursor=xyz"), "cursor"),
            (format!("{r}?quality=shiny"), "quality"),
            (format!("{r}?colour=blue"), "colour"),
            (format!("{r}?device=fm%201"), "device"),
            (format!("/api/v1/sites/{SITE}/events?device=a/b"), "device"),
            (
                format!("/api/v1/sites/{SITE}/completeness?gap_after=-5"),
                "gap_after",
            ),
            (
                format!("/api/v1/sites/{SITE}/completeness?from=2020-01-01T00:00:00Z"),
                "from",
            ),
            (format!("/api/v1/sites/{SITE}/events?kind=flood"), "kind"),
            ("/api/v1/sites/bad%20site/latest".to_string(), "site"),
        ] {
            let (code, v) = get(&cloud, &token, &path).await;
            assert_eq!(
                (code, v["field"].as_str()),
                (400, Some(field)),
                "{}: {path}: {v}",
                db.name
            );
        }
        for route in ["readings", "latest", "completeness", "events"] {
            let (code, v) = get(&cloud, &token, &format!("/api/v1/sites/nadie/{route}")).await;
            assert_eq!(code, 404, "{route}: {v}");
        }
        cloud.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_routes_need_a_token_and_any_role_reads() {
    for db in TestDb::all().await {
        let (cloud, viewer) = start(&db).await;
        let operator = account_token(&cloud, "op@x.cl", Role::Operator).await;
        for route in ["readings", "latest", "completeness", "events"] {
            let path = format!("/api/v1/sites/{SITE}/{route}?from={FROM}&to={TO}");
            let path = if route == "latest" {
                format!("/api/v1/sites/{SITE}/latest")
            } else {
                path
            };
            let (code, body) = http(cloud.http_addr(), "GET", &path, None, None).await;
            assert_eq!(code, 401, "{path}: {body}");
            let (code, body) = http(cloud.http_addr(), "GET", &path, Some("x.y.z"), None).await;
            assert_eq!(code, 401, "{path}: {body}");
            for t in [&viewer, &operator] {
                let (code, body) = http(cloud.http_addr(), "GET", &path, Some(t), None).await;
                assert_eq!(code, 200, "{}: {path}: {body}", db.name);
            }
        }
        cloud.stop().await;
    }
}

/// Every route this build serves under `/api/v1` (and the core routes), by method.
const ROUTES: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("get", "/metrics"),
    ("get", "/api/v1/openapi.json"),
    ("post", "/api/v1/auth/login"),
    ("get", "/api/v1/auth/me"),
    ("get", "/api/v1/users"),
    ("post", "/api/v1/users"),
    ("get", "/api/v1/users/{id}"),
    ("patch", "/api/v1/users/{id}"),
    ("delete", "/api/v1/users/{id}"),
    ("get", "/api/v1/sites"),
    ("post", "/api/v1/sites"),
    ("get", "/api/v1/sites/{site}"),
    ("patch", "/api/v1/sites/{site}"),
    ("delete", "/api/v1/sites/{site}"),
    ("post", "/api/v1/sites/{site}/credentials"),
    ("get", "/api/v1/sites/{site}/devices"),
    ("post", "/api/v1/sites/{site}/devices"),
    ("get", "/api/v1/sites/{site}/devices/{device}"),
    ("patch", "/api/v1/sites/{site}/devices/{device}"),
    ("delete", "/api/v1/sites/{site}/devices/{device}"),
    ("get", "/api/v1/points"),
    ("post", "/api/v1/points"),
    ("get", "/api/v1/points/{id}"),
    ("patch", "/api/v1/points/{id}"),
    ("delete", "/api/v1/points/{id}"),
    ("get", "/api/v1/sites/{site}/readings"),
    ("get", "/api/v1/sites/{site}/latest"),
    ("get", "/api/v1/sites/{site}/completeness"),
    ("get", "/api/v1/sites/{site}/events"),
    ("get", "/api/v1/alerts"),
    ("get", "/api/v1/alerts/{id}"),
    ("post", "/api/v1/alerts/{id}/close"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_describes_every_route_served() {
    let db = TestDb::sqlite();
    let (cloud, _) = start(&db).await;
    let addr = cloud.http_addr();
    let (code, body) = http(addr, "GET", "/api/v1/openapi.json", None, None).await;
    assert_eq!(code, 200, "the document needs no token: {body}");
    let doc = json(&body);
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with('3')));
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            if ["get", "post", "put", "patch", "delete"].contains(&method.as_str()) {
                documented.insert((method.clone(), path.clone()));
                // OpenAPI requires a description on every response; strict validators (and
                // API fuzzers that validate the document first) reject one without.
                for (status, response) in op["responses"].as_object().expect("responses") {
                    assert!(
                        response["description"]
                            .as_str()
                            .is_some_and(|d| !d.trim().is_empty()),
                        "{method} {path}: response {status} has no description"
                    );
                }
            }
        }
    }
    for (method, path) in ROUTES {
        assert!(
            documented.contains(&(method.to_string(), path.to_string())),
            "{method} {path} is served but not documented"
        );
    }
    // Everything documented is served: no 404 (unknown path) or 405 (unknown method).
    for (method, path) in &documented {
        let concrete = path
            .replace("{site}", SITE)
            .replace("{device}", "flow-1")
            .replace("{id}", "1");
        let body = matches!(method.as_str(), "post" | "patch").then_some("{}");
        let (code, text) = http(addr, &method.to_uppercase(), &concrete, None, body).await;
        assert!(
            code != 404 && code != 405,
            "{method} {path} is documented but answers {code}: {text}"
        );
        if path.starts_with("/api/v1/") && !path.ends_with("/login") && !path.ends_with(".json") {
            assert_eq!(code, 401, "{method} {path} without a token: {text}");
            let security = &doc["paths"][path][method]["security"];
            assert_eq!(
                security,
                &serde_json::json!([{"bearer": []}]),
                "{method} {path} documents its token"
            );
        }
    }
    // Every schema a route refers to is in the document.
    for name in body.split("\"#/components/schemas/").skip(1) {
        let name = name.split('"').next().unwrap_or_default();
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "{name} is referred to but not described"
        );
    }
    // A PATCH field where `null` clears (differs from absent) is documented as nullable.
    let schemas = &doc["components"]["schemas"];
    assert_eq!(
        schemas["DevicePatch"]["properties"]["point_id"]["type"],
        serde_json::json!(["integer", "null"])
    );
    assert_eq!(
        schemas["PointPatch"]["properties"]["obra_code"]["oneOf"],
        serde_json::json!([{"$ref": "#/components/schemas/ObraCode"}, {"type": "null"}])
    );
    assert_eq!(schemas["ObraCode"]["example"], "OB-0602-7");
    let readings = &doc["paths"]["/api/v1/sites/{site}/readings"]["get"];
    let params: Vec<&str> = readings["parameters"]
        .as_array()
        .expect("parameters")
        .iter()
        .map(|p| p["name"].as_str().expect("name"))
        .collect();
    for p in [
        "site", "device", "from", "to", "bucket", "limit", "cursor", "quality",
    ] {
        assert!(params.contains(&p), "readings documents {p}: {params:?}");
    }
    cloud.stop().await;
}

/// Input that fuzzing the API from its OpenAPI document (`scripts/check-api`) found answered
/// with something other than a 400 naming the field: each is a 400 with the JSON error body now,
/// on every backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzed_input_is_a_400_naming_the_field() {
    for db in TestDb::all().await {
        let (cloud, _) = start(&db).await;
        let addr = cloud.http_addr();
        let admin = account_token(&cloud, "admin@x.cl", Role::Admin).await;
        let cases: &[(&str, String, Option<&str>, &str)] = &[
            // A path segment that is not UTF-8 once decoded was axum's plain-text 400.
            ("GET", "/api/v1/sites/%FF".into(), None, "site"),
            (
                "GET",
                format!("/api/v1/sites/{SITE}/devices/%FF"),
                None,
                "device",
            ),
            ("GET", "/api/v1/sites/%FF/readings".into(), None, "site"),
            ("GET", "/api/v1/points/%FF".into(), None, "id"),
            ("GET", "/api/v1/users/%C0".into(), None, "id"),
            ("GET", "/api/v1/alerts/%FF".into(), None, "id"),
            // A repeated query parameter was blamed on `body`.
            (
                "GET",
                "/api/v1/alerts?limit=1&limit=2".into(),
                None,
                "limit",
            ),
            // The alerts' site filter took anything (and found nothing).
            ("GET", "/api/v1/alerts?site=bad%20site".into(), None, "site"),
            // An empty kind filter matched every kind.
            (
                "GET",
                format!("/api/v1/sites/{SITE}/events?kind="),
                None,
                "kind",
            ),
            (
                "GET",
                format!("/api/v1/sites/{SITE}/events?kind=%20,"),
                None,
                "kind",
            ),
            // A NUL character was a 503 on PostgreSQL, which cannot store one.
            (
                "POST",
                "/api/v1/sites".into(),
                Some(r#"{"id":"nul","name":"a\u0000b"}"#),
                "name",
            ),
            (
                "PATCH",
                format!("/api/v1/sites/{SITE}"),
                Some(r#"{"name":"\u0000"}"#),
                "name",
            ),
            (
                "POST",
                format!("/api/v1/sites/{SITE}/devices"),
                Some(r#"{"id":"fm9","extras":["ok","a\u0000"]}"#),
                "extras[1]",
            ),
            (
                "POST",
                "/api/v1/users".into(),
                Some(
                    r#"{"email":"a@x.cl","name":"\u0000","role":"viewer","password":"0123456789"}"#,
                ),
                "name",
            ),
            // A site's offline threshold is a u32: past it is a 400, not a silent wrap.
            (
                "PATCH",
                format!("/api/v1/sites/{SITE}"),
                Some(r#"{"offline_after_s":4294967296}"#),
                "offline_after_s",
            ),
        ];
        for (method, path, body, field) in cases {
            let (code, text) = http(addr, method, path, Some(&admin), *body).await;
            let v = json(&text);
            assert_eq!(
                (code, v["error"].as_str(), v["field"].as_str()),
                (400, Some("bad_request"), Some(*field)),
                "{}: {method} {path} {body:?}: {text}",
                db.name
            );
        }
        // Logging in with a NUL in the email is refused before the database is asked.
        let (code, text) = http(
            addr,
            "POST",
            "/api/v1/auth/login",
            None,
            Some(r#"{"email":"admin\u0000@x.cl","password":"a long enough password"}"#),
        )
        .await;
        assert_eq!(
            (code, json(&text)["field"].as_str()),
            (400, Some("email")),
            "{text}"
        );
        // An escaped backslash followed by "u0000" is plain text, stored as sent.
        let (code, text) = http(
            addr,
            "POST",
            "/api/v1/sites",
            Some(&admin),
            Some(r#"{"id":"literal","name":"a\\u0000b"}"#),
        )
        .await;
        assert_eq!(
            (code, json(&text)["name"].as_str()),
            (201, Some(r"a\u0000b")),
            "{text}"
        );
        // The whole u32 range is accepted and read back, as the document says (it said int32).
        let (code, text) = http(
            addr,
            "PATCH",
            &format!("/api/v1/sites/{SITE}"),
            Some(&admin),
            Some(r#"{"offline_after_s":4294967295}"#),
        )
        .await;
        assert_eq!(
            (code, json(&text)["offline_after_s"].as_u64()),
            (200, Some(4_294_967_295)),
            "{}: {text}",
            db.name
        );
        let (_, text) = http(addr, "GET", "/api/v1/openapi.json", None, None).await;
        let schemas = &json(&text)["components"]["schemas"];
        for schema in ["Site", "NewSite", "SitePatch"] {
            let s = &schemas[schema]["properties"]["offline_after_s"];
            assert_eq!(
                (s["format"].as_str(), s["maximum"].as_u64()),
                (Some("int64"), Some(4_294_967_295)),
                "{schema}.offline_after_s: {s}"
            );
        }
        cloud.stop().await;
    }
}
