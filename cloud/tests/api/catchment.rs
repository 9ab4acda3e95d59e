//! Catchment over real HTTP and MQTT: the role check of every sites, devices and points route,
//! validation errors that name the field, duplicates, the round trip of each resource, site MQTT
//! credentials at the embedded broker (wrong password refused, right one accepted, a batch stored
//! and acknowledged), and the Mosquitto password and ACL files the CLI writes checked by a real
//! Mosquitto with the cloud's ingest behind it: a site cannot publish in another's name, forge its
//! own acks or read another's (skipped, with a note, where `/usr/sbin/mosquitto` is not installed). Each API test
//! runs on a SQLite file, and on PostgreSQL when `CAUDAL_TEST_DATABASE_URL` is set.

use crate::support;

use caudal_cloud::Cloud;
use caudal_cloud::core::auth::Role;
use caudal_cloud::core::config::Secret;
use caudal_common::payload;
use caudal_common::{Ack, AckStatus};
use rumqttc::{AsyncClient, ConnectReturnCode, Event, EventLoop, MqttOptions, Packet, QoS};
use serde_json::Value;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;
use support::{TestDb, account_token, api_config, http, wait_metric};

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

const POINT: &str = r#"{"name":"Pozo 1","obra_code":"OB-0602-7","kind":"groundwater",
    "latitude":-34.64,"longitude":-71.35,"authorized_flow_lps":25.5,"annual_volume_m3":400000.0,
    "dga_standard":"mayor","informant_rut":"76086428-5","level_sensor_depth_m":60.5}"#;

/// Every catchment route with a body that is valid when the role allows the action, and the
/// lowest role that does. Deactivations come last: they leave the resources in place.
const ROUTES: &[(&str, &str, Option<&str>, Role)] = &[
    ("GET", "/api/v1/sites", None, Role::Viewer),
    ("GET", "/api/v1/sites/pozo-1", None, Role::Viewer),
    (
        "POST",
        "/api/v1/sites",
        Some(r#"{"id":"pozo-2","name":"Pozo 2"}"#),
        Role::Operator,
    ),
    (
        "PATCH",
        "/api/v1/sites/pozo-1",
        Some(r#"{"name":"Pozo Uno","offline_after_s":600}"#),
        Role::Operator,
    ),
    (
        "POST",
        "/api/v1/sites/pozo-1/credentials",
        None,
        Role::Operator,
    ),
    ("GET", "/api/v1/points", None, Role::Viewer),
    ("GET", "/api/v1/points/1", None, Role::Viewer),
    (
        "POST",
        "/api/v1/points",
        Some(r#"{"name":"Bocatoma","obra_code":"OB-0602-8","kind":"surface_flow"}"#),
        Role::Operator,
    ),
    (
        "PATCH",
        "/api/v1/points/1",
        Some(r#"{"dga_standard":"medio"}"#),
        Role::Operator,
    ),
    ("GET", "/api/v1/sites/pozo-1/devices", None, Role::Viewer),
    (
        "GET",
        "/api/v1/sites/pozo-1/devices/fm1",
        None,
        Role::Viewer,
    ),
    (
        "POST",
        "/api/v1/sites/pozo-1/devices",
        Some(r#"{"id":"lvl1","quantities":["level"],"point_id":1}"#),
        Role::Operator,
    ),
    (
        "PATCH",
        "/api/v1/sites/pozo-1/devices/fm1",
        Some(r#"{"profile":"siemens-mag8000"}"#),
        Role::Operator,
    ),
    (
        "DELETE",
        "/api/v1/sites/pozo-1/devices/fm1",
        None,
        Role::Operator,
    ),
    (
        "PUT",
        "/api/v1/sites/pozo-1/public-key",
        Some(r#"{"public_key":"6GcFtv5uKd5ixy6QkLgdWhp+C/a1KtVL8ftifYB53ac="}"#),
        Role::Admin,
    ),
    ("GET", "/api/v1/sites/pozo-1/public-key", None, Role::Viewer),
    ("DELETE", "/api/v1/points/1", None, Role::Operator),
    ("DELETE", "/api/v1/sites/pozo-1", None, Role::Operator),
];

fn rank(r: Role) -> u8 {
    match r {
        Role::Viewer => 0,
        Role::Operator | Role::Technician => 1,
        Role::Admin => 2,
    }
}

/// A cloud serving the API, with an admin token.
async fn api(db: &TestDb) -> (Cloud, String) {
    let cloud = Cloud::start(api_config(db, "core")).await.expect("start");
    let admin = account_token(&cloud, "admin@x.cl", Role::Admin).await;
    (cloud, admin)
}

/// `method path body` as `token`, expecting `code`: the body as JSON.
async fn expect(
    addr: SocketAddr,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    code: u16,
) -> Value {
    let (got, text) = http(addr, method, path, Some(token), body).await;
    assert_eq!(got, code, "{method} {path} {body:?}: {text}");
    if text.is_empty() {
        Value::Null
    } else {
        json(&text)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_catchment_route_needs_a_token_and_the_right_role() {
    for db in TestDb::all().await {
        let (cloud, admin) = api(&db).await;
        let addr = cloud.http_addr();
        expect(
            addr,
            &admin,
            "POST",
            "/api/v1/sites",
            Some(r#"{"id":"pozo-1"}"#),
            201,
        )
        .await;
        expect(addr, &admin, "POST", "/api/v1/points", Some(POINT), 201).await;
        let fm1 = r#"{"id":"fm1","quantities":["flow","totalizer"],"point_id":1}"#;
        expect(
            addr,
            &admin,
            "POST",
            "/api/v1/sites/pozo-1/devices",
            Some(fm1),
            201,
        )
        .await;

        let mut tokens = vec![(Role::Admin, admin)];
        for (r, email) in [
            (Role::Operator, "op@x.cl"),
            (Role::Technician, "tec@x.cl"),
            (Role::Viewer, "view@x.cl"),
        ] {
            tokens.push((r, account_token(&cloud, email, r).await));
        }
        for (method, path, body, needed) in ROUTES {
            let (code, text) = http(addr, method, path, None, *body).await;
            assert_eq!(
                code, 401,
                "{}: {method} {path} without a token: {text}",
                db.name
            );
            assert_eq!(json(&text)["error"], "unauthorized");
            // The lowest roles first, so the first allowed one creates and the rest find it.
            for (role, token) in tokens.iter().rev() {
                let (code, text) = http(addr, method, path, Some(token), *body).await;
                if rank(*role) >= rank(*needed) {
                    assert!(
                        (200..300).contains(&code) || (*method == "POST" && code == 409),
                        "{}: {method} {path} as {role}: {code} {text}",
                        db.name
                    );
                } else {
                    assert_eq!(code, 403, "{}: {method} {path} as {role}: {text}", db.name);
                    assert_eq!(json(&text)["error"], "forbidden");
                    if body.is_some() {
                        let (code, text) = http(addr, method, path, Some(token), Some("{}")).await;
                        assert_eq!(code, 403, "the role is checked before the body: {text}");
                    }
                }
            }
        }
        cloud.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_400_naming_the_field() {
    for db in TestDb::all().await {
        let (cloud, admin) = api(&db).await;
        let addr = cloud.http_addr();
        expect(
            addr,
            &admin,
            "POST",
            "/api/v1/sites",
            Some(r#"{"id":"pozo-1"}"#),
            201,
        )
        .await;
        expect(addr, &admin, "POST", "/api/v1/points", Some(POINT), 201).await;
        let cases: &[(&str, &str, &str, &str)] = &[
            ("POST", "/api/v1/sites", r#"{"id":"pozo 1"}"#, "id"),
            ("POST", "/api/v1/sites", r#"{"name":"x"}"#, "id"),
            (
                "POST",
                "/api/v1/sites",
                r#"{"id":"a","offline_after_s":0}"#,
                "offline_after_s",
            ),
            (
                "POST",
                "/api/v1/sites",
                r#"{"id":"a","offline_after_s":-5}"#,
                "offline_after_s",
            ),
            (
                "POST",
                "/api/v1/sites",
                r#"{"id":"a","mqtt_password":"x"}"#,
                "mqtt_password",
            ),
            (
                "PATCH",
                "/api/v1/sites/pozo-1",
                r#"{"active":"yes"}"#,
                "active",
            ),
            ("PATCH", "/api/v1/sites/pozo-1", r#"{"id":"other"}"#, "id"),
            ("PATCH", "/api/v1/sites/pozo%201", r#"{"name":"x"}"#, "site"),
            (
                "POST",
                "/api/v1/points",
                r#"{"kind":"groundwater"}"#,
                "name",
            ),
            (
                "POST",
                "/api/v1/points",
                r#"{"name":" ","kind":"groundwater"}"#,
                "name",
            ),
            ("POST", "/api/v1/points", r#"{"name":"p"}"#, "kind"),
            (
                "POST",
                "/api/v1/points",
                r#"{"name":"p","kind":"lake"}"#,
                "kind",
            ),
            (
                "POST",
                "/api/v1/points",
                r#"{"name":"p","kind":"groundwater","obra_code":"OB-0602-07"}"#,
                "obra_code",
            ),
            (
                "POST",
                "/api/v1/points",
                r#"{"name":"p","kind":"groundwater","latitude":-95,"longitude":-70}"#,
                "latitude",
            ),
            (
                "POST",
                "/api/v1/points",
                r#"{"name":"p","kind":"groundwater","latitude":-33,"longitude":-181}"#,
                "longitude",
            ),
            (
                "POST",
                "/api/v1/points",
                r#"{"name":"p","kind":"groundwater","latitude":-33}"#,
                "longitude",
            ),
            (
                "POST",
                "/api/v1/points",
                r#"{"name":"p","kind":"groundwater","authorized_flow_lps":0}"#,
                "authorized_flow_lps",
            ),
            (
                "POST",
                "/api/v1/points",
                r#"{"name":"p","kind":"groundwater","annual_volume_m3":-1}"#,
                "annual_volume_m3",
            ),
            (
                "POST",
                "/api/v1/points",
                r#"{"name":"p","kind":"groundwater","dga_standard":"grande"}"#,
                "dga_standard",
            ),
            (
                "POST",
                "/api/v1/points",
                r#"{"name":"p","kind":"groundwater","informant_rut":"76086428-4"}"#,
                "informant_rut",
            ),
            (
                "POST",
                "/api/v1/points",
                r#"{"name":"p","kind":"groundwater","informant_rut":"76.086.428-5"}"#,
                "informant_rut",
            ),
            (
                "POST",
                "/api/v1/points",
                r#"{"name":"p","kind":"groundwater","level_sensor_depth_m":0}"#,
                "level_sensor_depth_m",
            ),
            (
                "POST",
                "/api/v1/points",
                r#"{"name":"p","kind":"groundwater","flow":1}"#,
                "flow",
            ),
            (
                "PATCH",
                "/api/v1/points/1",
                r#"{"latitude":null}"#,
                "latitude",
            ),
            ("PATCH", "/api/v1/points/x", r#"{"name":"p"}"#, "id"),
            ("GET", "/api/v1/points/x", "", "id"),
            (
                "POST",
                "/api/v1/sites/pozo-1/devices",
                r#"{"name":"x"}"#,
                "id",
            ),
            (
                "POST",
                "/api/v1/sites/pozo-1/devices",
                r#"{"id":"a/b"}"#,
                "id",
            ),
            (
                "POST",
                "/api/v1/sites/pozo-1/devices",
                r#"{"id":"d","quantities":["pressure"]}"#,
                "quantities[0]",
            ),
            (
                "POST",
                "/api/v1/sites/pozo-1/devices",
                r#"{"id":"d","quantities":["flow","flow"]}"#,
                "quantities",
            ),
            (
                "POST",
                "/api/v1/sites/pozo-1/devices",
                r#"{"id":"d","extras":["temp c"]}"#,
                "extras",
            ),
            (
                "POST",
                "/api/v1/sites/pozo-1/devices",
                r#"{"id":"d","profile":"no/such"}"#,
                "profile",
            ),
            (
                "POST",
                "/api/v1/sites/pozo-1/devices",
                r#"{"id":"d","point_id":99}"#,
                "point_id",
            ),
            (
                "POST",
                "/api/v1/sites/pozo-1/devices",
                r#"{"id":"d","point_id":"one"}"#,
                "point_id",
            ),
            ("GET", "/api/v1/sites/pozo-1/devices/a%2Fb", "", "device"),
        ];
        for (method, path, body, field) in cases {
            let body = (!body.is_empty()).then_some(*body);
            let v = expect(addr, &admin, method, path, body, 400).await;
            assert_eq!(
                (&v["error"], &v["field"]),
                (&Value::from("bad_request"), &Value::from(*field)),
                "{}: {method} {path} {body:?}: {v}",
                db.name
            );
        }
        let v = expect(
            addr,
            &admin,
            "POST",
            "/api/v1/points",
            Some("{not json"),
            400,
        )
        .await;
        assert_eq!(v["field"], "body");
        cloud.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_conflict_and_missing_things_are_404() {
    for db in TestDb::all().await {
        let (cloud, admin) = api(&db).await;
        let addr = cloud.http_addr();
        expect(
            addr,
            &admin,
            "POST",
            "/api/v1/sites",
            Some(r#"{"id":"pozo-1"}"#),
            201,
        )
        .await;
        let v = expect(
            addr,
            &admin,
            "POST",
            "/api/v1/sites",
            Some(r#"{"id":"pozo-1"}"#),
            409,
        )
        .await;
        assert_eq!(v["field"], "id", "{v}");
        expect(addr, &admin, "POST", "/api/v1/points", Some(POINT), 201).await;
        let v = expect(addr, &admin, "POST", "/api/v1/points", Some(POINT), 409).await;
        assert_eq!(v["field"], "obra_code", "{v}");
        let other = r#"{"name":"Pozo 2","obra_code":"OB-0602-9","kind":"groundwater"}"#;
        let p2 = expect(addr, &admin, "POST", "/api/v1/points", Some(other), 201).await;
        let path = format!("/api/v1/points/{}", p2["id"]);
        let v = expect(
            addr,
            &admin,
            "PATCH",
            &path,
            Some(r#"{"obra_code":"OB-0602-7"}"#),
            409,
        )
        .await;
        assert_eq!(v["field"], "obra_code", "a change into a taken code: {v}");
        // Codes are unique only when set: several points may wait for theirs.
        for _ in 0..2 {
            expect(
                addr,
                &admin,
                "PATCH",
                &path,
                Some(r#"{"obra_code":null}"#),
                200,
            )
            .await;
            expect(
                addr,
                &admin,
                "POST",
                "/api/v1/points",
                Some(r#"{"name":"s/n","kind":"groundwater"}"#),
                201,
            )
            .await;
        }
        let dev = r#"{"id":"fm1"}"#;
        expect(
            addr,
            &admin,
            "POST",
            "/api/v1/sites/pozo-1/devices",
            Some(dev),
            201,
        )
        .await;
        let v = expect(
            addr,
            &admin,
            "POST",
            "/api/v1/sites/pozo-1/devices",
            Some(dev),
            409,
        )
        .await;
        assert_eq!(v["field"], "id", "{v}");
        expect(addr, &admin, "DELETE", &path, None, 204).await;
        let v = expect(
            addr,
            &admin,
            "PATCH",
            "/api/v1/sites/pozo-1/devices/fm1",
            Some(&format!(r#"{{"point_id":{}}}"#, p2["id"])),
            409,
        )
        .await;
        assert_eq!(
            v["field"], "point_id",
            "a deactivated point takes no devices: {v}"
        );

        for (method, path, body) in [
            ("GET", "/api/v1/sites/nope", None),
            ("PATCH", "/api/v1/sites/nope", Some(r#"{"name":"x"}"#)),
            ("DELETE", "/api/v1/sites/nope", None),
            ("POST", "/api/v1/sites/nope/credentials", None),
            ("GET", "/api/v1/sites/nope/devices", None),
            ("POST", "/api/v1/sites/nope/devices", Some(dev)),
            ("GET", "/api/v1/sites/pozo-1/devices/nope", None),
            (
                "PATCH",
                "/api/v1/sites/pozo-1/devices/nope",
                Some(r#"{"name":"x"}"#),
            ),
            ("DELETE", "/api/v1/sites/pozo-1/devices/nope", None),
            ("GET", "/api/v1/points/999", None),
            ("PATCH", "/api/v1/points/999", Some(r#"{"name":"x"}"#)),
            ("DELETE", "/api/v1/points/999", None),
        ] {
            let v = expect(addr, &admin, method, path, body, 404).await;
            assert_eq!(v["error"], "not_found", "{}: {method} {path}: {v}", db.name);
        }
        cloud.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_sites_and_devices_round_trip() {
    for db in TestDb::all().await {
        let (cloud, admin) = api(&db).await;
        let addr = cloud.http_addr();
        let p = expect(addr, &admin, "POST", "/api/v1/points", Some(POINT), 201).await;
        let want = json(POINT);
        for (k, v) in want.as_object().expect("object") {
            assert_eq!(&p[k], v, "{}: {k} round-trips", db.name);
        }
        assert_eq!(p["active"], true);
        let path = format!("/api/v1/points/{}", p["id"]);
        let q = expect(
            addr,
            &admin,
            "PATCH",
            &path,
            Some(r#"{"informant_rut":"60803000-k","latitude":null,"longitude":null,"annual_volume_m3":null}"#),
            200,
        )
        .await;
        assert_eq!(
            q["informant_rut"], "60803000-K",
            "stored as the DGA writes it"
        );
        assert_eq!(
            (&q["latitude"], &q["longitude"]),
            (&Value::Null, &Value::Null)
        );
        assert_eq!(q["annual_volume_m3"], Value::Null);
        assert_eq!(q["obra_code"], "OB-0602-7", "absent fields stay");
        assert_eq!(q["authorized_flow_lps"], 25.5);

        let s = expect(
            addr,
            &admin,
            "POST",
            "/api/v1/sites",
            Some(r#"{"id":"pozo-1","name":"Pozo 1"}"#),
            201,
        )
        .await;
        assert_eq!(s["offline_after_s"], 900, "default threshold");
        assert_eq!(s["mqtt_username"], "pozo-1");
        assert_eq!(s["has_credential"], true);
        assert_eq!(s["mqtt_password"].as_str().map(str::len), Some(32));
        let got = expect(addr, &admin, "GET", "/api/v1/sites/pozo-1", None, 200).await;
        assert!(
            got.get("mqtt_password").is_none(),
            "the password is shown once: {got}"
        );
        let rotated = expect(
            addr,
            &admin,
            "POST",
            "/api/v1/sites/pozo-1/credentials",
            None,
            200,
        )
        .await;
        assert_ne!(rotated["mqtt_password"], s["mqtt_password"]);
        let s = expect(
            addr,
            &admin,
            "PATCH",
            "/api/v1/sites/pozo-1",
            Some(r#"{"name":"Pozo Uno","offline_after_s":300,"active":false}"#),
            200,
        )
        .await;
        assert_eq!(
            (&s["name"], &s["offline_after_s"], &s["active"]),
            (&"Pozo Uno".into(), &300.into(), &false.into())
        );

        let d = expect(
            addr,
            &admin,
            "POST",
            "/api/v1/sites/pozo-1/devices",
            Some(&format!(
                r#"{{"id":"fm1","name":"Caudalímetro","profile":"siemens-mag8000","quantities":["flow","totalizer"],"extras":["velocity_mps"],"point_id":{}}}"#,
                p["id"]
            )),
            201,
        )
        .await;
        assert_eq!(d["site"], "pozo-1");
        assert_eq!(d["quantities"], serde_json::json!(["flow", "totalizer"]));
        assert_eq!(d["extras"], serde_json::json!(["velocity_mps"]));
        assert_eq!(d["point_id"], p["id"]);
        let d = expect(
            addr,
            &admin,
            "PATCH",
            "/api/v1/sites/pozo-1/devices/fm1",
            Some(r#"{"point_id":null,"quantities":["flow"]}"#),
            200,
        )
        .await;
        assert_eq!(
            (&d["point_id"], &d["quantities"]),
            (&Value::Null, &serde_json::json!(["flow"]))
        );
        assert_eq!(d["profile"], "siemens-mag8000");
        expect(
            addr,
            &admin,
            "DELETE",
            "/api/v1/sites/pozo-1/devices/fm1",
            None,
            204,
        )
        .await;
        let list = expect(
            addr,
            &admin,
            "GET",
            "/api/v1/sites/pozo-1/devices",
            None,
            200,
        )
        .await;
        assert_eq!(list[0]["active"], false, "deactivated, not removed: {list}");
        expect(addr, &admin, "DELETE", &path, None, 204).await;
        let list = expect(addr, &admin, "GET", "/api/v1/points", None, 200).await;
        assert_eq!(
            (list.as_array().map(Vec::len), &list[0]["active"]),
            (Some(1), &false.into())
        );
        cloud.stop().await;
    }
}

const CLOUD_USER: &str = "caudal-cloud";
const CLOUD_PASSWORD: &str = "the cloud's own broker password";

/// Connects an MQTT v3.1.1 client and waits for the broker's answer: the client and its event
/// loop when accepted, the reason when refused or cut off.
async fn mqtt_login(
    broker: SocketAddr,
    user: &str,
    password: &str,
) -> Result<(AsyncClient, EventLoop), String> {
    let mut o = MqttOptions::new(
        format!("caudal-agent-{user}-{:04x}", fastrand::u16(..)),
        broker.ip().to_string(),
        broker.port(),
    );
    o.set_keep_alive(Duration::from_secs(5))
        .set_credentials(user, password)
        .set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(o, 16);
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(a))) => {
                    return if a.code == ConnectReturnCode::Success {
                        Ok(())
                    } else {
                        Err(format!("refused: {:?}", a.code))
                    };
                }
                Ok(_) => {}
                Err(e) => return Err(format!("cut off: {e}")),
            }
        }
    })
    .await
    .map_err(|_| "no answer within 10 s".to_string())?;
    answer.map(|()| (client, eventloop))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_logs_agents_in_with_their_site_credential() {
    let db = TestDb::sqlite();
    let mut c = api_config(&db, "all");
    c.mqtt.embedded.authenticate = true;
    c.mqtt.username = Some(CLOUD_USER.to_string());
    c.mqtt.password = Some(Secret::new(CLOUD_PASSWORD));
    let cloud = Cloud::start(c).await.expect("start");
    let addr = cloud.http_addr();
    // The ingest logged in with the cloud's own credential.
    wait_metric(addr, "caudal_cloud_ingest_subscribed 1").await;
    let admin = account_token(&cloud, "admin@x.cl", Role::Admin).await;
    let broker = cloud.broker().expect("embedded broker").v4_addr();
    let created = expect(
        addr,
        &admin,
        "POST",
        "/api/v1/sites",
        Some(r#"{"id":"pozo-norte"}"#),
        201,
    )
    .await;
    let password = created["mqtt_password"]
        .as_str()
        .expect("password")
        .to_string();
    expect(
        addr,
        &admin,
        "POST",
        "/api/v1/sites",
        Some(r#"{"id":"pozo-sur"}"#),
        201,
    )
    .await;

    for (user, pw, why) in [
        ("pozo-norte", "wrong password", "a wrong password"),
        ("pozo-sur", password.as_str(), "another site's password"),
        ("pozo-oeste", password.as_str(), "an unknown site"),
    ] {
        let r = mqtt_login(broker, user, pw).await;
        assert!(r.is_err(), "{why} is refused");
    }
    let (client, mut eventloop) = mqtt_login(broker, "pozo-norte", &password)
        .await
        .expect("the right password is accepted");

    // The accepted agent's batch is stored and acknowledged.
    client
        .subscribe("caudal/v1/pozo-norte/ack", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    client
        .publish(
            "caudal/v1/pozo-norte/telemetry",
            QoS::AtLeastOnce,
            false,
            include_str!("../../../docs/examples/batch.json")
                .as_bytes()
                .to_vec(),
        )
        .await
        .expect("publish");
    let ack: Ack = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(p))) = eventloop.poll().await {
                return payload::decode(&p.payload).expect("an ack");
            }
        }
    })
    .await
    .expect("an ack within 20 s");
    assert_eq!(ack.status, AckStatus::Accepted);
    drop(client);

    // A rotated credential replaces the old one; a deactivated site cannot log in.
    let rotated = expect(
        addr,
        &admin,
        "POST",
        "/api/v1/sites/pozo-norte/credentials",
        None,
        200,
    )
    .await;
    let new = rotated["mqtt_password"].as_str().expect("password");
    assert!(mqtt_login(broker, "pozo-norte", &password).await.is_err());
    mqtt_login(broker, "pozo-norte", new)
        .await
        .expect("the new password works");
    assert!(
        mqtt_login(broker, CLOUD_USER, "guess").await.is_err(),
        "the cloud's login needs its password too"
    );
    expect(
        addr,
        &admin,
        "DELETE",
        "/api/v1/sites/pozo-norte",
        None,
        204,
    )
    .await;
    assert!(mqtt_login(broker, "pozo-norte", new).await.is_err());
    let (_, body) = support::http_get(addr, "/metrics").await;
    assert!(
        body.lines()
            .any(|l| l.starts_with("caudal_cloud_mqtt_logins_total{kind=\"refused\"}")),
        "refused logins are counted:\n{body}"
    );
    cloud.stop().await;
}

/// Runs `caudal-cloud` with `args` against `db`: stdout, or the failure.
fn cli(db: &TestDb, dir: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_caudal-cloud"))
        .env("CAUDAL_DATABASE__URL", &db.url)
        .env("CAUDAL_DATA_DIR", dir)
        .env_remove("RUST_LOG")
        .args(args)
        .output()
        .expect("run caudal-cloud");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn password_of(out: &str) -> String {
    out.lines()
        .find_map(|l| l.strip_prefix("mqtt password: "))
        .unwrap_or_else(|| panic!("no password in {out:?}"))
        .to_string()
}

/// Polls until a SUBACK arrives: its return codes.
async fn suback(eventloop: &mut EventLoop) -> Vec<rumqttc::SubscribeReasonCode> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(Event::Incoming(Packet::SubAck(s))) = eventloop.poll().await {
                return s.return_codes;
            }
        }
    })
    .await
    .expect("a SUBACK")
}

/// Polls until a message arrives: its topic and the ack it carries.
async fn first_ack(eventloop: &mut EventLoop) -> (String, Ack) {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(p))) = eventloop.poll().await {
                let ack: Ack = payload::decode(&p.payload).unwrap_or_else(|e| {
                    let body = String::from_utf8_lossy(&p.payload);
                    panic!("{}: expected the cloud's ack ({e}), got {body}", p.topic)
                });
                return (p.topic, ack);
            }
        }
    })
    .await
    .expect("an ack")
}

/// Kills the Mosquitto this test started when the test ends, however it ends.
struct Mosquitto(std::process::Child);

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_checks_the_exported_password_and_acl_files() {
    const MOSQUITTO: &str = "/usr/sbin/mosquitto";
    if !std::path::Path::new(MOSQUITTO).exists() {
        eprintln!("{MOSQUITTO} is not installed: the password file is checked by unit tests only");
        return;
    }
    let db = TestDb::sqlite();
    let dir = tempfile::tempdir().expect("tempdir");
    let first = password_of(&cli(
        &db,
        dir.path(),
        &["site", "add", "--id", "pozo-norte"],
    ));
    cli(&db, dir.path(), &["site", "add", "--id", "pozo-sur"]);
    let old = password_of(&cli(&db, dir.path(), &["site", "add", "--id", "pozo-este"]));
    let rotated = password_of(&cli(
        &db,
        dir.path(),
        &["site", "credentials", "--id", "pozo-este"],
    ));
    assert_ne!(old, rotated);
    cli(&db, dir.path(), &["site", "deactivate", "--id", "pozo-sur"]);
    let file = cli(&db, dir.path(), &["site", "mosquitto-passwd"]);
    assert_eq!(file.lines().count(), 2, "active sites only: {file}");
    assert!(
        file.starts_with("pozo-este:$7$") && file.contains("\npozo-norte:$7$"),
        "{file}"
    );

    // The cloud's own user joins the sites' password file; the ACL is the generated one.
    let cloud_line = format!(
        "{CLOUD_USER}:{}\n",
        caudal_cloud::catchment::credentials::hash(&Secret::new(CLOUD_PASSWORD))
    );
    let passwd = dir.path().join("passwd");
    std::fs::write(&passwd, format!("{file}{cloud_line}")).expect("write passwd");
    let acl_file = cli(
        &db,
        dir.path(),
        &["site", "mosquitto-acl", "--cloud-user", CLOUD_USER],
    );
    let acl = dir.path().join("acl");
    std::fs::write(&acl, &acl_file).expect("write acl");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "per_listener_settings false\nallow_anonymous false\npassword_file {}\n\
             acl_file {}\nlistener {port} 127.0.0.1\nuser root\npersistence false\n\
             log_dest stderr\n",
            passwd.display(),
            acl.display()
        ),
    )
    .expect("write conf");
    let _broker = Mosquitto(
        Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start mosquitto"),
    );
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "mosquitto did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The cloud's ingest through this Mosquitto, as its own user: the ACL lets it subscribe and
    // acknowledge.
    let mut c = support::config(&db);
    c.mqtt.url = Some(format!("mqtt://{addr}"));
    c.mqtt.username = Some(CLOUD_USER.to_string());
    c.mqtt.password = Some(Secret::new(CLOUD_PASSWORD));
    let cloud = Cloud::start(c).await.expect("cloud starts");
    wait_metric(cloud.http_addr(), "caudal_cloud_ingest_subscribed 1").await;

    // pozo-norte plays the attacker, pozo-este the site attacked.
    let (north, mut north_loop) = mqtt_login(addr, "pozo-norte", &first)
        .await
        .expect("Mosquitto accepts the site's password");
    let (east, mut east_loop) = mqtt_login(addr, "pozo-este", &rotated)
        .await
        .expect("and the rotated one");
    east.subscribe("caudal/v1/pozo-este/ack", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    assert_eq!(
        suback(&mut east_loop).await,
        [rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    north
        .subscribe_many([
            rumqttc::SubscribeFilter::new("caudal/v1/pozo-norte/ack".into(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new("caudal/v1/pozo-este/ack".into(), QoS::AtLeastOnce),
            rumqttc::SubscribeFilter::new("caudal/v1/#".into(), QoS::AtLeastOnce),
        ])
        .await
        .expect("subscribe");
    // Mosquitto 2.0 grants every filter and checks each message against the ACL when it
    // would deliver it: what pozo-norte receives below is what counts.
    assert_eq!(
        suback(&mut north_loop).await[0],
        rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce),
        "its own acks"
    );

    // pozo-norte publishes a batch in pozo-este's name, and an ack on its own ack topic; then
    // its own batch, whose ack comes back. Mosquitto handles one client's packets in order.
    let batch = |site: &str, id: &str, flow: f64| {
        let mut v = json(include_str!("../../../docs/examples/batch.json"));
        v["site"] = site.into();
        v["batch"] = id.into();
        v["readings"][0]["flow_lps"] = flow.into();
        v.to_string()
    };
    for (topic, body) in [
        (
            "caudal/v1/pozo-este/telemetry",
            batch("pozo-este", "forged-1", 999.0),
        ),
        (
            "caudal/v1/pozo-norte/ack",
            r#"{"v":1,"site":"pozo-norte","batch":"north-1","status":"accepted","seqs":[{"from":0,"to":9223372036854775807}]}"#
                .to_string(),
        ),
        (
            "caudal/v1/pozo-norte/telemetry",
            batch("pozo-norte", "north-1", 1.0),
        ),
    ] {
        north
            .publish(topic, QoS::AtLeastOnce, false, body)
            .await
            .expect("publish");
    }
    let (topic, ack) = first_ack(&mut north_loop).await;
    assert_eq!(topic, "caudal/v1/pozo-norte/ack");
    assert_eq!(
        (ack.batch.as_str(), ack.reason),
        ("north-1", None),
        "the first ack pozo-norte sees is the cloud's, of its own batch"
    );

    // pozo-este's genuine batch (the same seqs as the forgery) is stored as sent.
    east.publish(
        "caudal/v1/pozo-este/telemetry",
        QoS::AtLeastOnce,
        false,
        batch("pozo-este", "east-1", 12.5),
    )
    .await
    .expect("publish");
    let (_, ack) = first_ack(&mut east_loop).await;
    assert_eq!(
        ack.batch, "east-1",
        "no ack of the forgery reached pozo-este"
    );
    assert_eq!(ack.status, AckStatus::Accepted);
    let east_id = caudal_common::SiteId::new("pozo-este").expect("id");
    let stored = caudal_cloud::telemetry::store::readings(cloud.db(), &east_id, 10)
        .await
        .expect("read");
    assert_eq!(
        stored.iter().map(|r| r.flow_lps).collect::<Vec<_>>(),
        [Some(12.5), None],
        "pozo-este's readings are its own"
    );

    // pozo-norte did not read pozo-este's ack: its next own ack is the next thing it gets.
    north
        .publish(
            "caudal/v1/pozo-norte/telemetry",
            QoS::AtLeastOnce,
            false,
            batch("pozo-norte", "north-2", 1.0),
        )
        .await
        .expect("publish");
    let (topic, ack) = first_ack(&mut north_loop).await;
    assert_eq!(
        (topic.as_str(), ack.batch.as_str()),
        ("caudal/v1/pozo-norte/ack", "north-2"),
        "the ACL keeps sites apart"
    );

    for (user, pw) in [
        ("pozo-norte", "wrong password"),
        ("pozo-este", old.as_str()),
        ("pozo-norte", rotated.as_str()),
    ] {
        let Err(e) = mqtt_login(addr, user, pw).await else {
            panic!("{user} with a wrong password was accepted");
        };
        assert!(e.contains("refused"), "{user}: {e}");
    }
    cloud.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_key_is_enrolled_rotated_and_never_reused_over_the_api() {
    for db in TestDb::all().await {
        let (cloud, admin) = api(&db).await;
        let addr = cloud.http_addr();
        let path = "/api/v1/sites/pozo-k/public-key";
        expect(
            addr,
            &admin,
            "POST",
            "/api/v1/sites",
            Some(r#"{"id":"pozo-k"}"#),
            201,
        )
        .await;
        let k1 = caudal_common::signed::SecretKey::from_seed(&[1; 32]).public();
        let k2 = caudal_common::signed::SecretKey::from_seed(&[2; 32]).public();
        let body = |k: &str| format!(r#"{{"public_key":"{k}"}}"#);

        let bad = expect(addr, &admin, "PUT", path, Some(&body("not-a-key")), 400).await;
        assert_eq!(bad["field"], "public_key", "{}: {bad}", db.name);
        let missing = "/api/v1/sites/pozo-none/public-key";
        expect(
            addr,
            &admin,
            "PUT",
            missing,
            Some(&body(&k1.to_string())),
            404,
        )
        .await;

        let one = expect(addr, &admin, "PUT", path, Some(&body(&k1.to_string())), 200).await;
        assert_eq!(one["keys"].as_array().map(Vec::len), Some(1));
        let two = expect(addr, &admin, "PUT", path, Some(&body(&k2.to_string())), 200).await;
        let keys = two["keys"].as_array().expect("keys");
        assert_eq!(keys.len(), 2, "{}: {two}", db.name);
        assert_eq!(keys[0]["public_key"], k1.to_string());
        assert!(
            keys[0]["valid_to"].is_string(),
            "the old key is closed: {two}"
        );
        assert!(
            keys[1]["valid_to"].is_null(),
            "the new key is current: {two}"
        );
        let again = expect(addr, &admin, "PUT", path, Some(&body(&k1.to_string())), 409).await;
        assert_eq!(again["field"], "public_key");
        let listed = expect(addr, &admin, "GET", path, None, 200).await;
        assert_eq!(listed, two);
        cloud.stop().await;
    }
}
