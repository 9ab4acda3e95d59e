//! The compliance API over real HTTP: settings and per-point reporting settings with roles
//! (admin and operator change, every role reads), the informante password stored encrypted and
//! never answered (audit rows show `****`), slots and their review. On a SQLite file, and on
//! PostgreSQL when `CAUDAL_TEST_DATABASE_URL` is set.

use crate::support;

use caudal_cloud::Cloud;
use caudal_cloud::core::auth::Role;
use caudal_cloud::core::config::Secret;
use serde_json::Value;
use support::{TestDb, account_token, api_config, http};

const PASSWORD: &str = "clave-del-informante-42";

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_and_passwords_by_role_and_never_read_back() {
    for t in TestDb::all().await {
        let mut c = api_config(&t, "core,compliance");
        // 32 bytes of 0x07, base64.
        c.compliance.key = Some(Secret::new("BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc="));
        let cloud = Cloud::start(c).await.expect("start");
        let addr = cloud.http_addr();
        let admin = account_token(&cloud, "admin@x.cl", Role::Admin).await;
        let operator = account_token(&cloud, "op@x.cl", Role::Operator).await;
        let technician = account_token(&cloud, "tec@x.cl", Role::Technician).await;
        let viewer = account_token(&cloud, "view@x.cl", Role::Viewer).await;

        let point = r#"{"name":"Pozo 1","kind":"groundwater","obra_code":"OB-0101-114","dga_standard":"mayor","informant_rut":"20999888-2"}"#;
        let (code, text) = http(addr, "POST", "/api/v1/points", Some(&admin), Some(point)).await;
        assert_eq!(code, 201, "{}: {text}", t.name);
        let id = json(&text)["id"].as_i64().expect("id");

        // Defaults before anything is set: the manual's URL.
        let (code, text) = http(
            addr,
            "GET",
            "/api/v1/compliance/settings",
            Some(&viewer),
            None,
        )
        .await;
        assert_eq!(code, 200, "{text}");
        assert_eq!(
            json(&text)["dga_base_url"],
            "https://apimee.mop.gob.cl/api/v1"
        );

        // Viewers and technicians change nothing, whatever they send.
        let settings = r#"{"rut_empresa":"77555666-8"}"#;
        for token in [&viewer, &technician] {
            for body in [settings, "not json"] {
                let (code, _) = http(
                    addr,
                    "PUT",
                    "/api/v1/compliance/settings",
                    Some(token),
                    Some(body),
                )
                .await;
                assert_eq!(code, 403, "{}", t.name);
            }
            let (code, _) = http(
                addr,
                "PUT",
                &format!("/api/v1/compliance/points/{id}/password"),
                Some(token),
                Some(r#"{"password":"x"}"#),
            )
            .await;
            assert_eq!(code, 403);
        }
        let (code, text) = http(
            addr,
            "PUT",
            "/api/v1/compliance/settings",
            Some(&operator),
            Some(r#"{"rut_empresa":"77555666-7"}"#),
        )
        .await;
        assert_eq!(
            (code, json(&text)["field"].as_str()),
            (400, Some("rut_empresa")),
            "{text}"
        );
        let (code, text) = http(
            addr,
            "PUT",
            "/api/v1/compliance/settings",
            Some(&operator),
            Some(settings),
        )
        .await;
        assert_eq!(code, 200, "{text}");
        assert_eq!(json(&text)["rut_empresa"], "77555666-8");
        assert_eq!(json(&text)["updated_by"], "op@x.cl");

        // A point's reporting settings: checked whole, fields named.
        let path = format!("/api/v1/compliance/points/{id}");
        let (code, text) = http(
            addr,
            "PUT",
            &path,
            Some(&operator),
            Some(r#"{"mode":"on"}"#),
        )
        .await;
        assert_eq!(
            (code, json(&text)["field"].as_str()),
            (400, Some("start_date")),
            "{text}"
        );
        let (code, text) = http(addr, "PUT", &path, Some(&operator), Some(r#"{"mode":"on","start_date":"2026-11-01","flow":{"site":"bad site","device":"fm1"}}"#)).await;
        assert_eq!(
            (code, json(&text)["field"].as_str()),
            (400, Some("flow")),
            "{text}"
        );
        let (code, _) = http(
            addr,
            "PUT",
            "/api/v1/compliance/points/999",
            Some(&operator),
            Some(r#"{}"#),
        )
        .await;
        assert_eq!(code, 404);
        let body = r#"{"mode":"shadow","start_date":"2026-11-01","flow":{"site":"pozo-1","device":"fm1"},"total":{"site":"pozo-1","device":"fm1"},"level":{"site":"pozo-1","device":"lv1"}}"#;
        let (code, text) = http(addr, "PUT", &path, Some(&operator), Some(body)).await;
        assert_eq!(code, 200, "{text}");
        let v = json(&text);
        assert_eq!(
            (
                v["endpoint"].as_str(),
                v["mode"].as_str(),
                v["password_set"].as_bool()
            ),
            (Some("subterranea"), Some("shadow"), Some(false))
        );
        assert_eq!(v["start_date"], "2026-11-01");

        // The password: stored, never answered, `****` in the audit, not in the database as text.
        let pw_path = format!("{path}/password");
        let (code, _) = http(
            addr,
            "PUT",
            &pw_path,
            Some(&admin),
            Some(&format!(r#"{{"password":"{PASSWORD}"}}"#)),
        )
        .await;
        assert_eq!(code, 204, "{}", t.name);
        let (code, _) = http(
            addr,
            "PUT",
            &pw_path,
            Some(&admin),
            Some(r#"{"password":""}"#),
        )
        .await;
        assert_eq!(code, 400);
        for p in [
            path.clone(),
            "/api/v1/compliance/points".to_string(),
            format!("{path}/audit"),
        ] {
            let (code, text) = http(addr, "GET", &p, Some(&viewer), None).await;
            assert_eq!(code, 200, "{p}: {text}");
            assert!(!text.contains(PASSWORD), "{p} answers the password: {text}");
        }
        let (_, text) = http(addr, "GET", &path, Some(&viewer), None).await;
        assert_eq!(json(&text)["password_set"], true);
        let (_, text) = http(addr, "GET", &format!("{path}/audit"), Some(&viewer), None).await;
        let audit = json(&text);
        assert_eq!(audit[0]["change"]["password"], "****", "{text}");
        assert_eq!(audit[0]["actor"], "admin@x.cl");
        assert_eq!(audit[1]["change"]["settings"]["mode"], "shadow");
        let stored: Vec<u8> = match cloud.db() {
            caudal_cloud::core::db::Db::Sqlite(p) => {
                sqlx::query_scalar("SELECT password_enc FROM compliance_points")
                    .fetch_one(p)
                    .await
                    .expect("row")
            }
            caudal_cloud::core::db::Db::Postgres(p) => {
                sqlx::query_scalar("SELECT password_enc FROM compliance_points")
                    .fetch_one(p)
                    .await
                    .expect("row")
            }
        };
        assert!(
            !stored
                .windows(PASSWORD.len())
                .any(|w| w == PASSWORD.as_bytes()),
            "stored in clear"
        );

        // Slots: readable by every role; a review needs a held slot and the right role.
        let (code, text) = http(
            addr,
            "GET",
            &format!("{path}/slots?state=held"),
            Some(&viewer),
            None,
        )
        .await;
        assert_eq!(code, 200, "{text}");
        let (code, text) = http(
            addr,
            "GET",
            &format!("{path}/slots?state=sent"),
            Some(&viewer),
            None,
        )
        .await;
        assert_eq!(
            (code, json(&text)["field"].as_str()),
            (400, Some("state")),
            "{text}"
        );
        let slot = format!("{path}/slots/2026-11-01T04:00:00Z");
        let (code, _) = http(
            addr,
            "POST",
            &format!("{slot}/release"),
            Some(&viewer),
            Some(r#"{"note":"x"}"#),
        )
        .await;
        assert_eq!(code, 403);
        let (code, _) = http(
            addr,
            "POST",
            &format!("{slot}/discard"),
            Some(&operator),
            Some(r#"{"note":"x"}"#),
        )
        .await;
        assert!(code == 404 || code == 200, "{code}");
        let (code, text) = http(
            addr,
            "GET",
            &format!("{path}/slots/yesterday"),
            Some(&viewer),
            None,
        )
        .await;
        assert_eq!(
            (code, json(&text)["field"].as_str()),
            (400, Some("slot")),
            "{text}"
        );

        let (code, text) = http(addr, "GET", "/api/v1/openapi.json", None, None).await;
        assert_eq!(code, 200);
        for p in [
            "/api/v1/compliance/settings",
            "/api/v1/compliance/points/{id}/password",
            "/api/v1/compliance/points/{id}/slots/{slot}/release",
        ] {
            assert!(json(&text)["paths"][p].is_object(), "{p} is documented");
        }
        // Operation ids are unique across the modules a process serves.
        let mut ids: Vec<String> = json(&text)["paths"]
            .as_object()
            .into_iter()
            .flat_map(|paths| paths.values())
            .filter_map(Value::as_object)
            .flat_map(|ops| ops.values())
            .filter_map(|op| op["operationId"].as_str().map(String::from))
            .collect();
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n, "operation ids repeat: {ids:?}");
        cloud.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_key_a_password_is_refused_and_nothing_else_breaks() {
    let t = TestDb::sqlite();
    let cloud = Cloud::start(api_config(&t, "core,compliance"))
        .await
        .expect("start");
    let addr = cloud.http_addr();
    let admin = account_token(&cloud, "admin@x.cl", Role::Admin).await;
    let (_, text) = http(
        addr,
        "POST",
        "/api/v1/points",
        Some(&admin),
        Some(r#"{"name":"P","kind":"surface_level","dga_standard":"medio"}"#),
    )
    .await;
    let id = json(&text)["id"].as_i64().expect("id");
    let path = format!("/api/v1/compliance/points/{id}");
    let (code, text) = http(addr, "PUT", &path, Some(&admin), Some("{}")).await;
    assert_eq!(code, 200, "{text}");
    assert_eq!(json(&text)["endpoint"], "superficial");
    let (code, text) = http(
        addr,
        "PUT",
        &format!("{path}/password"),
        Some(&admin),
        Some(r#"{"password":"x"}"#),
    )
    .await;
    assert_eq!(
        (code, json(&text)["field"].as_str()),
        (409, Some("password")),
        "{text}"
    );
    assert!(
        json(&text)["message"]
            .as_str()
            .is_some_and(|m| m.contains("compliance.key")),
        "{text}"
    );
    cloud.stop().await;
}

/// Reads with a header, over a real connection: (status, content type, body).
async fn get_with(
    addr: std::net::SocketAddr,
    path: &str,
    token: &str,
    accept: Option<&str>,
) -> (u16, String, String) {
    let mut req = reqwest::Client::new()
        .get(format!("http://{addr}{path}"))
        .bearer_auth(token);
    if let Some(a) = accept {
        req = req.header("Accept", a);
    }
    let resp = req.send().await.expect("send");
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    (status, ct, resp.text().await.expect("body"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_log_dossier_and_verify_by_role_with_csv_and_named_400s() {
    use caudal_cloud::compliance::report;
    use caudal_cloud::compliance::store::{self, Answered, NewSlot, SlotState};
    use caudal_cloud::compliance::value::Values;
    use chrono::{DateTime, Utc};
    for t in TestDb::all().await {
        let mut config = api_config(&t, "core,compliance");
        // The queue gauges refresh every interval.
        config.compliance.interval_s = 1;
        let cloud = Cloud::start(config).await.expect("start");
        let addr = cloud.http_addr();
        let admin = account_token(&cloud, "admin@x.cl", Role::Admin).await;
        let operator = account_token(&cloud, "op@x.cl", Role::Operator).await;
        let viewer = account_token(&cloud, "view@x.cl", Role::Viewer).await;
        let point = r#"{"name":"Pozo, Norte","kind":"groundwater","obra_code":"OB-0101-114","dga_standard":"mayor","informant_rut":"20999888-2"}"#;
        let (code, text) = http(addr, "POST", "/api/v1/points", Some(&admin), Some(point)).await;
        assert_eq!(code, 201, "{text}");
        let id = json(&text)["id"].as_i64().expect("id");
        // Mode off: the submitter builds nothing; the slots below are the only ones.
        let body =
            r#"{"mode":"off","start_date":"2026-10-01","flow":{"site":"pozo-1","device":"fm1"}}"#;
        let (code, text) = http(
            addr,
            "PUT",
            &format!("/api/v1/compliance/points/{id}"),
            Some(&operator),
            Some(body),
        )
        .await;
        assert_eq!(code, 200, "{text}");

        // Three slots on 1 October (UTC-4): one accepted (on 2026-10-20, past Mayor's 7
        // days: late), one held, one pending.
        let db = cloud.db();
        let at = |s: &str| -> DateTime<Utc> {
            DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&Utc))
                .expect("time")
        };
        let values = Values {
            caudal: "10.50".into(),
            totalizador: Some("1010".into()),
            nivel: Some("9.85".into()),
            altura: None,
        };
        let slots: Vec<NewSlot> = [
            ("2026-10-01T04:00:00Z", SlotState::Pending),
            ("2026-10-01T05:00:00Z", SlotState::Held),
            ("2026-10-01T06:00:00Z", SlotState::Pending),
        ]
        .into_iter()
        .map(|(s, state)| NewSlot {
            point_id: id,
            slot_at: at(s),
            state,
            values: Some(values.clone()),
            reason: None,
            detail: String::new(),
        })
        .collect();
        let built = at("2026-10-01T04:10:00Z");
        store::insert_slots(db, &slots, built)
            .await
            .expect("insert");
        let sent = at("2026-10-20T12:00:00Z");
        let request = serde_json::json!({"body": {"autenticacion": {"password": "****"}, "medicionSubterranea": {"caudal": "10.50", "fechaMedicion": "2026-10-01", "horaMedicion": "00:00:00", "nivelFreaticoDelPozo": "9.85", "totalizador": "1010"}}});
        let pacing = store::Pacing {
            owner: "test".into(),
            lease: chrono::Duration::seconds(120),
            obra_spacing: chrono::Duration::seconds(300),
            tokens_per_s: 1.0,
            burst: 10.0,
        };
        let claimed = store::claim(
            db,
            id,
            at("2026-10-01T04:00:00Z"),
            "OB-0101-114",
            &request,
            &pacing,
            sent,
        )
        .await
        .expect("claim");
        let store::Claim::Claimed { exchange, attempt } = claimed else {
            panic!("not claimed: {claimed:?}")
        };
        let answered = Answered {
            exchange,
            http_status: Some(200),
            response: r#"{"status":"00"}"#.into(),
            outcome: "accepted".into(),
            state: SlotState::Accepted,
            receipt: Some("zk7DOAl3uIlGTjvwNtwBF0sBLAR16cI5".into()),
            reason: None,
            next_attempt_at: None,
        };
        assert!(
            store::record(db, id, at("2026-10-01T04:00:00Z"), attempt, &answered, sent)
                .await
                .expect("record")
        );

        // The queue's gauges: one pending (the oldest unsent, 06:00Z), one held.
        support::wait_metric(addr, "caudal_cloud_compliance_held_slots 1").await;
        support::wait_metric(addr, "caudal_cloud_compliance_queue_depth 1").await;
        let age = support::metric(addr, "caudal_cloud_compliance_oldest_unsent_age_seconds").await;
        let since = (Utc::now() - at("2026-10-01T06:00:00Z")).num_seconds() as f64;
        assert!((age - since).abs() < 120.0, "{age} vs {since}");

        // The month report: every role reads; 31 days of hourly slots.
        let (code, text) = http(
            addr,
            "GET",
            "/api/v1/compliance/report?month=2026-10",
            Some(&viewer),
            None,
        )
        .await;
        assert_eq!(code, 200, "{}: {text}", t.name);
        let r = json(&text);
        assert_eq!(r.as_array().map(Vec::len), Some(1), "{text}");
        let c = &r[0]["counts"];
        assert_eq!(
            [
                "expected",
                "accepted",
                "accepted_late",
                "held",
                "pending",
                "not_built",
                "failed",
                "not_yet_due",
                "overdue"
            ]
            .map(|k| c[k].as_u64().unwrap_or(u64::MAX)),
            [744, 1, 1, 1, 742, 741, 0, 0, 743],
            "{}: {c}",
            t.name
        );
        assert_eq!(r[0]["obra_code"], "OB-0101-114");
        assert_eq!(r[0]["month"], "2026-10");
        // Filters: by point, by a site of its sources.
        for (q, n) in [
            (format!("point={id}"), 1),
            (format!("point={}", id + 1), 0),
            ("site=pozo-1".to_string(), 1),
            ("site=otro".to_string(), 0),
        ] {
            let (code, text) = http(
                addr,
                "GET",
                &format!("/api/v1/compliance/report?month=2026-10&{q}"),
                Some(&viewer),
                None,
            )
            .await;
            assert_eq!(code, 200, "{q}: {text}");
            assert_eq!(json(&text).as_array().map(Vec::len), Some(n), "{q}");
        }
        // CSV by parameter or by Accept, with the documented header; a name with a comma is
        // quoted.
        for (path, accept) in [
            ("/api/v1/compliance/report?month=2026-10&format=csv", None),
            ("/api/v1/compliance/report?month=2026-10", Some("text/csv")),
        ] {
            let (code, ct, text) = get_with(addr, path, &viewer, accept).await;
            assert_eq!(code, 200, "{text}");
            assert!(ct.starts_with("text/csv"), "{ct}");
            let lines: Vec<&str> = text.lines().collect();
            assert_eq!(lines[0], report::MONTH_CSV_HEADER);
            assert_eq!(
                lines[1],
                format!(
                    "2026-10,{id},OB-0101-114,\"Pozo, Norte\",mayor,hourly,off,744,1,1,1,0,0,742,741,0,0,743,0,0"
                )
            );
        }

        // One obra's month: every slot with state, values, receipt, late flag.
        let path = format!("/api/v1/compliance/points/{id}/report?month=2026-10");
        let (code, text) = http(addr, "GET", &path, Some(&viewer), None).await;
        assert_eq!(code, 200, "{text}");
        let m = json(&text);
        assert_eq!(m["slots"].as_array().map(Vec::len), Some(744));
        let s0 = &m["slots"][0];
        assert_eq!(
            (
                s0["fecha"].as_str(),
                s0["hora"].as_str(),
                s0["standing"].as_str(),
                s0["state"].as_str(),
                s0["values"]["caudal"].as_str(),
                s0["receipt"].as_str(),
                s0["late"].as_bool()
            ),
            (
                Some("2026-10-01"),
                Some("00:00:00"),
                Some("accepted"),
                Some("accepted"),
                Some("10.50"),
                Some("zk7DOAl3uIlGTjvwNtwBF0sBLAR16cI5"),
                Some(true)
            ),
            "{s0}"
        );
        assert_eq!(m["slots"][1]["standing"], "held");
        assert_eq!(m["slots"][3]["state"], serde_json::Value::Null);
        let (code, ct, text) = get_with(addr, &format!("{path}&format=csv"), &viewer, None).await;
        assert_eq!((code, ct.starts_with("text/csv")), (200, true), "{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], report::SLOTS_CSV_HEADER);
        assert_eq!(lines.len(), 745);
        assert!(
            lines[1].starts_with(&format!("{id},OB-0101-114,2026-10-01T04:00:00Z,2026-10-01,00:00:00,accepted,accepted,10.50,1010,9.85,,zk7DOAl3uIlGTjvwNtwBF0sBLAR16cI5,2026-10-20T12:00:00Z,2026-10-08T04:00:00Z,true,")),
            "{}",
            lines[1]
        );

        // The log and the dossier.
        let (code, text) = http(
            addr,
            "GET",
            &format!("/api/v1/compliance/points/{id}/log?from=2026-10-01T00:00:00Z&to=2026-11-01T00:00:00Z"),
            Some(&viewer),
            None,
        )
        .await;
        assert_eq!(code, 200, "{text}");
        let log = json(&text);
        assert_eq!(log["exchanges"].as_array().map(Vec::len), Some(1));
        assert_eq!(
            log["exchanges"][0]["receipt"],
            "zk7DOAl3uIlGTjvwNtwBF0sBLAR16cI5"
        );
        assert_eq!(log["exchanges"][0]["outcome"], "accepted");
        let dossier = format!(
            "/api/v1/compliance/points/{id}/dossier?from=2026-10-01T00:00:00Z&to=2026-10-02T00:00:00Z"
        );
        let (code, text) = http(addr, "GET", &dossier, Some(&viewer), None).await;
        assert_eq!(code, 200, "{text}");
        let d = json(&text);
        assert_eq!(d["slots"].as_array().map(Vec::len), Some(3));
        assert_eq!(d["slots"][0]["declared"]["caudal"], "10.50");
        assert_eq!(d["slots"][0]["accepted_as"], "accepted");
        // The settings were stored (now) after this back-dated send: none is claimed to have
        // been in force then.
        assert_eq!(d["slots"][0]["settings"], serde_json::Value::Null);
        assert_eq!(d["slots"][0]["telemetry"][0]["site"], "pozo-1");
        let (code, ct, text) = get_with(addr, &dossier, &viewer, Some("text/csv")).await;
        assert_eq!((code, ct.starts_with("text/csv")), (200, true), "{text}");
        assert_eq!(text.lines().next(), Some(report::DOSSIER_CSV_HEADER));
        assert_eq!(text.lines().count(), 4);

        // Bad parameters answer 400 naming the field.
        let report_path = format!("/api/v1/compliance/points/{id}/report");
        for (p, field) in [
            (
                "/api/v1/compliance/report?month=2026-13".to_string(),
                "month",
            ),
            (
                "/api/v1/compliance/report?month=octubre".to_string(),
                "month",
            ),
            ("/api/v1/compliance/report?point=uno".to_string(), "point"),
            ("/api/v1/compliance/report?format=xml".to_string(), "format"),
            (format!("{report_path}?month=2026-1"), "month"),
            ("/api/v1/compliance/points/x/report".to_string(), "id"),
            (
                format!("/api/v1/compliance/points/{id}/log?from=ayer"),
                "from",
            ),
            (
                format!(
                    "/api/v1/compliance/points/{id}/log?from=2026-10-02T00:00:00Z&to=2026-10-01T00:00:00Z"
                ),
                "from",
            ),
            (
                format!("/api/v1/compliance/points/{id}/dossier?to=mañana"),
                "to",
            ),
            (
                format!("/api/v1/compliance/points/{id}/dossier?format=pdf"),
                "format",
            ),
        ] {
            let (code, text) = http(addr, "GET", &p, Some(&viewer), None).await;
            assert_eq!(
                (code, json(&text)["field"].as_str()),
                (400, Some(field)),
                "{p}: {text}"
            );
        }
        let (code, _) = http(
            addr,
            "GET",
            "/api/v1/compliance/points/999/report",
            Some(&viewer),
            None,
        )
        .await;
        assert_eq!(code, 404);
        let (code, _) = http(addr, "GET", "/api/v1/compliance/report", None, None).await;
        assert_eq!(code, 401);

        // Verify: admin and operator only; a slot not accepted is a conflict, no slot a 404.
        let slot = format!("/api/v1/compliance/points/{id}/slots");
        let (code, _) = http(
            addr,
            "POST",
            &format!("{slot}/2026-10-01T04:00:00Z/verify"),
            Some(&viewer),
            None,
        )
        .await;
        assert_eq!(code, 403);
        let (code, text) = http(
            addr,
            "POST",
            &format!("{slot}/2026-10-01T05:00:00Z/verify"),
            Some(&operator),
            None,
        )
        .await;
        assert_eq!(
            (code, json(&text)["field"].as_str()),
            (409, Some("state")),
            "{text}"
        );
        let (code, _) = http(
            addr,
            "POST",
            &format!("{slot}/2026-10-09T05:00:00Z/verify"),
            Some(&operator),
            None,
        )
        .await;
        assert_eq!(code, 404);
        let (code, text) = http(
            addr,
            "POST",
            &format!("{slot}/ayer/verify"),
            Some(&operator),
            None,
        )
        .await;
        assert_eq!(
            (code, json(&text)["field"].as_str()),
            (400, Some("slot")),
            "{text}"
        );
        // The accepted slot, against a DGA that is not there: unverified, with the reason.
        let (code, _) = http(
            addr,
            "PUT",
            "/api/v1/compliance/settings",
            Some(&admin),
            Some(r#"{"dga_base_url":"http://127.0.0.1:9/api/v1","rut_empresa":"77555666-8"}"#),
        )
        .await;
        assert_eq!(code, 200);
        let (code, text) = http(
            addr,
            "POST",
            &format!("{slot}/2026-10-01T04:00:00Z/verify"),
            Some(&admin),
            None,
        )
        .await;
        assert_eq!(code, 200, "{text}");
        let v = json(&text);
        assert_eq!(v["outcome"], "unverified", "{text}");
        assert!(
            v["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{text}"
        );
        assert_eq!(v["requested_by"], "admin@x.cl");

        let (_, text) = http(addr, "GET", "/api/v1/openapi.json", None, None).await;
        for p in [
            "/api/v1/compliance/report",
            "/api/v1/compliance/points/{id}/report",
            "/api/v1/compliance/points/{id}/log",
            "/api/v1/compliance/points/{id}/dossier",
            "/api/v1/compliance/points/{id}/slots/{slot}/verify",
        ] {
            assert!(json(&text)["paths"][p].is_object(), "{p} is documented");
        }
        assert!(
            json(&text)["paths"]["/api/v1/compliance/report"]["get"]["responses"]["200"]["content"]
                ["text/csv"]
                .is_object(),
            "CSV is documented"
        );
        cloud.stop().await;
    }
}
