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
