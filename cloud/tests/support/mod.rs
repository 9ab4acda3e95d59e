//! Test support of the cloud's tests: configurations on loopback ports, accounts and their
//! tokens. Databases (a SQLite file in a tempdir, and a private PostgreSQL schema when
//! `CAUDAL_TEST_DATABASE_URL` is set), the agent stand-in speaking MQTT v3.1.1 like the real one
//! and bare HTTP/1.1 are `caudal-testkit`'s, re-exported under the names the tests use.

// Each test binary uses a part of what is here.
#![allow(dead_code, unused_imports)]

use caudal_cloud::core::config::{CloudConfig, Secret};
use std::net::SocketAddr;

pub use caudal_testkit::database::TestDb;
pub use caudal_testkit::http::{get as http_get, request as http};
pub use caudal_testkit::metrics::{metric, wait_metric};
pub use caudal_testkit::stand_in::Agent;

/// A configuration running every service on loopback port 0 with the embedded broker.
pub fn config(db: &TestDb) -> CloudConfig {
    let mut c = CloudConfig::default();
    c.http.listen = "127.0.0.1:0".parse().expect("addr");
    c.database.url = Some(Secret::new(&db.url));
    c.database.max_connections = 4;
    c.mqtt.embedded.listen = "127.0.0.1:0".parse().expect("addr");
    c.mqtt.embedded.listen_v5 = "127.0.0.1:0".parse().expect("addr");
    c.ingest.workers = 2;
    // Most tests speak plain v1 for sites without keys; `signing` tests the default.
    c.ingest.accept_unsigned = true;
    c
}

/// A JWT secret for tests (32 bytes).
pub const JWT_SECRET: &str = "test-secret-test-secret-test-sec";

/// [`config`] with a shared JWT secret and no MQTT ingest (API tests).
pub fn api_config(db: &TestDb, services: &str) -> CloudConfig {
    let mut c = config(db);
    c.services = services.split(',').map(str::to_string).collect();
    c.auth.jwt_secret = Some(Secret::new(JWT_SECRET));
    c
}

/// Creates an account directly in the database and logs it in over HTTP: its token.
pub async fn account_token(
    cloud: &caudal_cloud::Cloud,
    email: &str,
    role: caudal_cloud::core::auth::Role,
) -> String {
    let pw = Secret::new("a long enough password");
    let hash = caudal_cloud::core::auth::hash_password(&pw).expect("hash");
    caudal_cloud::users::account::create(cloud.db(), email, "", role, &hash)
        .await
        .expect("create account");
    login(cloud.http_addr(), email, "a long enough password")
        .await
        .expect("login")
}

/// Logs in: the token, or the status and body of the refusal.
pub async fn login(addr: SocketAddr, email: &str, password: &str) -> Result<String, (u16, String)> {
    let body = serde_json::json!({ "email": email, "password": password }).to_string();
    let (code, text) = http(addr, "POST", "/api/v1/auth/login", None, Some(&body)).await;
    if code != 200 {
        return Err((code, text));
    }
    let v: serde_json::Value = serde_json::from_str(&text).expect("login answers JSON");
    Ok(v["token"].as_str().expect("token").to_string())
}
