//! Test support: databases (a SQLite file in a tempdir, and a private PostgreSQL schema when
//! `CAUDAL_TEST_DATABASE_URL` is set), an agent stand-in speaking MQTT v3.1.1 like the real one,
//! and a bare HTTP/1.1 GET.

#![allow(dead_code)]

use caudal_cloud::core::config::{CloudConfig, Secret};
use caudal_common::payload::{self, Payload};
use caudal_common::topic::{self, TopicKind};
use caudal_common::{Ack, SiteId, Status};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// A database for one test, removed when dropped.
pub struct TestDb {
    pub name: &'static str,
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    pg_schema: Option<(String, String)>,
}

impl TestDb {
    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("caudal.db").display()
        );
        TestDb {
            name: "sqlite",
            url,
            _dir: Some(dir),
            pg_schema: None,
        }
    }

    /// A fresh schema in the PostgreSQL database of `CAUDAL_TEST_DATABASE_URL`, if set.
    pub async fn postgres() -> Option<TestDb> {
        let base = std::env::var("CAUDAL_TEST_DATABASE_URL").ok()?;
        if base.is_empty() {
            return None;
        }
        let schema = format!(
            "caudal_test_{}_{:08x}",
            std::process::id(),
            fastrand::u32(..)
        );
        let pool = sqlx::PgPool::connect(&base)
            .await
            .expect("CAUDAL_TEST_DATABASE_URL is set but PostgreSQL does not answer");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&pool)
            .await
            .expect("create schema");
        pool.close().await;
        let sep = if base.contains('?') { '&' } else { '?' };
        Some(TestDb {
            name: "postgres",
            url: format!("{base}{sep}options[search_path]={schema}"),
            _dir: None,
            pg_schema: Some((base, schema)),
        })
    }

    /// SQLite, then PostgreSQL when configured.
    pub async fn all() -> Vec<TestDb> {
        let mut v = vec![TestDb::sqlite()];
        v.extend(TestDb::postgres().await);
        v
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((base, schema)) = self.pg_schema.take() else {
            return;
        };
        // Drop runs inside the test's runtime: clean up on a thread with a runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                if let Ok(pool) = sqlx::PgPool::connect(&base).await {
                    let _ =
                        sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
                            .execute(&pool)
                            .await;
                    pool.close().await;
                }
            });
        })
        .join();
    }
}

/// A configuration running every service on loopback port 0 with the embedded broker.
pub fn config(db: &TestDb) -> CloudConfig {
    let mut c = CloudConfig::default();
    c.http.listen = "127.0.0.1:0".parse().expect("addr");
    c.database.url = Some(Secret::new(&db.url));
    c.database.max_connections = 4;
    c.mqtt.embedded.listen = "127.0.0.1:0".parse().expect("addr");
    c.mqtt.embedded.listen_v5 = "127.0.0.1:0".parse().expect("addr");
    c.ingest.workers = 2;
    c
}

/// `GET path` over a fresh connection: (status code, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// Waits until `/metrics` of `addr` has a line starting with `line`.
pub async fn wait_metric(addr: SocketAddr, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, body) = http_get(addr, "/metrics").await;
        if body.lines().any(|l| l.starts_with(line)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "metric {line:?} never appeared:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of the metric line starting with `prefix ` (0 when absent).
pub async fn metric(addr: SocketAddr, prefix: &str) -> f64 {
    let (_, body) = http_get(addr, "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix(prefix)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// An agent stand-in: MQTT v3.1.1, subscribed to its ack topic, with an optional last will.
pub struct Agent {
    pub site: SiteId,
    client: AsyncClient,
    acks: mpsc::Receiver<Vec<u8>>,
    task: tokio::task::JoinHandle<()>,
}

impl Agent {
    /// Connects to the broker's v3.1.1 listener and subscribes to the site's acks.
    pub async fn connect(broker: SocketAddr, site: &str, will: bool) -> Agent {
        let site = SiteId::new(site).expect("site id");
        let mut o = MqttOptions::new(
            format!("agent-{site}-{:06x}", fastrand::u32(..1 << 24)),
            broker.ip().to_string(),
            broker.port(),
        );
        o.set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(1 << 20, 1 << 20);
        if will {
            o.set_last_will(LastWill::new(
                topic::topic(&site, TopicKind::Status),
                Status::offline(site.clone()).encode(),
                QoS::AtLeastOnce,
                true,
            ));
        }
        let (client, mut eventloop) = AsyncClient::new(o, 64);
        let (tx, acks) = mpsc::channel(64);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let ack_topic = topic::topic(&site, TopicKind::Ack);
        client
            .subscribe(ack_topic.clone(), QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        let task = tokio::spawn(async move {
            let mut ready = Some(ready_tx);
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(r) = ready.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic == ack_topic => {
                        let _ = tx.send(p.payload.to_vec()).await;
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("agent subscribed in time")
            .expect("agent event loop alive");
        Agent {
            site,
            client,
            acks,
            task,
        }
    }

    /// Publishes raw bytes on this site's telemetry topic (or `topic` when given).
    pub async fn publish(&self, topic: Option<&str>, payload: impl Into<Vec<u8>>) {
        let t = topic
            .map(str::to_string)
            .unwrap_or_else(|| topic::topic(&self.site, TopicKind::Telemetry));
        self.client
            .publish(t, QoS::AtLeastOnce, false, payload.into())
            .await
            .expect("publish");
    }

    /// Publishes a retained status.
    pub async fn status(&self, s: &Status) {
        self.client
            .publish(
                topic::topic(&self.site, TopicKind::Status),
                QoS::AtLeastOnce,
                true,
                s.encode(),
            )
            .await
            .expect("publish status");
    }

    /// The next ack, decoded.
    pub async fn ack(&mut self) -> Ack {
        let bytes = tokio::time::timeout(Duration::from_secs(20), self.acks.recv())
            .await
            .expect("an ack within 20 s")
            .expect("agent alive");
        payload::decode(&bytes).expect("a valid ack")
    }

    /// No ack arrives within `wait`.
    pub async fn no_ack(&mut self, wait: Duration) {
        if let Ok(Some(bytes)) = tokio::time::timeout(wait, self.acks.recv()).await {
            panic!("unexpected ack: {}", String::from_utf8_lossy(&bytes));
        }
    }

    /// Drops the connection without DISCONNECT, as a power cut does: the broker publishes the
    /// last will.
    pub fn kill(self) {
        self.task.abort();
    }
}

/// `method path` with an optional bearer token and JSON body, over a fresh connection:
/// (status code, body).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    // axum answers small bodies with Content-Length; decode chunked ones too.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (code, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n.min(rest.len())]);
        s = rest.get(n + 2..).unwrap_or("");
    }
    out
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
