//! Accounts and access over real HTTP: login, tokens (expired, forged, from another process),
//! the role check of every route, account administration, and the `user add` command. Each test
//! runs on a SQLite file, and on PostgreSQL when `CAUDAL_TEST_DATABASE_URL` is set.

use crate::support;

use caudal_cloud::Cloud;
use caudal_cloud::core::auth::{Claims, Role, TokenKeys};
use serde_json::Value;
use std::process::Command;
use support::{JWT_SECRET, TestDb, account_token, api_config, http, login};

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// Every `/api/v1` route of the users and catchment modules, with a body that is valid when the
/// role allows the action, and the lowest role that does.
const ROUTES: &[(&str, &str, Option<&str>, Role)] = &[
    ("GET", "/api/v1/auth/me", None, Role::Viewer),
    ("GET", "/api/v1/sites", None, Role::Viewer),
    ("GET", "/api/v1/users", None, Role::Admin),
    (
        "POST",
        "/api/v1/users",
        Some(r#"{"email":"new@x.cl","role":"viewer","password":"0123456789ab"}"#),
        Role::Admin,
    ),
    ("GET", "/api/v1/users/1", None, Role::Admin),
    (
        "PATCH",
        "/api/v1/users/1",
        Some(r#"{"name":"Ana"}"#),
        Role::Admin,
    ),
];

fn rank(r: Role) -> u8 {
    match r {
        Role::Viewer => 0,
        Role::Operator | Role::Technician => 1,
        Role::Admin => 2,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_needs_a_token_and_the_right_role() {
    for db in TestDb::all().await {
        let cloud = Cloud::start(api_config(&db, "core")).await.expect("start");
        let addr = cloud.http_addr();
        let admin = account_token(&cloud, "admin@x.cl", Role::Admin).await;
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
            for (role, token) in &tokens {
                let (code, text) = http(addr, method, path, Some(token), *body).await;
                if rank(*role) >= rank(*needed) {
                    assert!(
                        (200..300).contains(&code) || (method == &"POST" && code == 409),
                        "{}: {method} {path} as {role}: {code} {text}",
                        db.name
                    );
                } else {
                    assert_eq!(code, 403, "{}: {method} {path} as {role}: {text}", db.name);
                    assert_eq!(json(&text)["error"], "forbidden");
                }
            }
        }
        cloud.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_logins_and_bad_tokens_are_refused() {
    for db in TestDb::all().await {
        let cloud = Cloud::start(api_config(&db, "core")).await.expect("start");
        let addr = cloud.http_addr();
        let token = account_token(&cloud, "Ana@X.cl", Role::Viewer).await;

        let e = login(addr, "ana@x.cl", "wrong password!")
            .await
            .expect_err("wrong password");
        assert_eq!(e.0, 401, "{}", e.1);
        assert_eq!(json(&e.1)["message"], "email or password is wrong");
        let e = login(addr, "nobody@x.cl", "a long enough password")
            .await
            .expect_err("unknown");
        assert_eq!(
            (e.0, json(&e.1)["message"].clone()),
            (401, "email or password is wrong".into())
        );
        login(addr, " ANA@x.cl", "a long enough password")
            .await
            .expect("email is case-insensitive");

        let (code, text) = http(
            addr,
            "POST",
            "/api/v1/auth/login",
            None,
            Some(r#"{"email":"a@x.cl"}"#),
        )
        .await;
        assert_eq!(
            (code, json(&text)["field"].clone()),
            (400, "password".into()),
            "{text}"
        );
        let (code, text) = http(addr, "POST", "/api/v1/auth/login", None, Some("{not json")).await;
        assert_eq!(code, 400, "{text}");

        let keys = TokenKeys::new(JWT_SECRET.as_bytes(), chrono::Duration::hours(1));
        let claims = keys.verify(&token).expect("our token verifies");
        let expired = keys
            .sign(&Claims {
                iat: claims.iat - 7200,
                exp: claims.iat - 3600,
                ..claims.clone()
            })
            .expect("sign");
        let forged = TokenKeys::new(
            b"not the deployment's key, no no!",
            chrono::Duration::hours(1),
        )
        .sign(&Claims {
            role: Role::Admin,
            ..claims.clone()
        })
        .expect("sign");
        for (what, t) in [
            ("expired", expired.as_str()),
            ("forged", forged.as_str()),
            ("garbage", "x.y.z"),
        ] {
            let (code, text) = http(addr, "GET", "/api/v1/sites", Some(t), None).await;
            assert_eq!(code, 401, "{}: {what} token: {text}", db.name);
        }
        let (code, _) = http(addr, "GET", "/api/v1/sites", Some(&token), None).await;
        assert_eq!(code, 200);
        cloud.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_manage_accounts_and_changes_end_sessions() {
    for db in TestDb::all().await {
        let cloud = Cloud::start(api_config(&db, "core")).await.expect("start");
        let addr = cloud.http_addr();
        let admin = account_token(&cloud, "admin@x.cl", Role::Admin).await;

        let (code, text) = http(addr, "POST", "/api/v1/users", Some(&admin),
            Some(r#"{"email":"tec@x.cl","name":"Tec","role":"technician","password":"0123456789ab"}"#)).await;
        assert_eq!(code, 201, "{text}");
        let id = json(&text)["id"].as_i64().expect("id");
        assert!(!text.contains("argon2"), "the hash never leaves: {text}");
        let (code, text) = http(
            addr,
            "POST",
            "/api/v1/users",
            Some(&admin),
            Some(r#"{"email":"tec@x.cl","role":"technician","password":"0123456789ab"}"#),
        )
        .await;
        assert_eq!(
            (code, json(&text)["field"].clone()),
            (409, "email".into()),
            "{text}"
        );
        for (body, field) in [
            (
                r#"{"email":"x@x.cl","role":"root","password":"0123456789ab"}"#,
                "role",
            ),
            (
                r#"{"email":"x@x.cl","role":"viewer","password":"short"}"#,
                "password",
            ),
            (
                r#"{"email":"not-an-email","role":"viewer","password":"0123456789ab"}"#,
                "email",
            ),
            (
                r#"{"email":"x@x.cl","role":"viewer","password":"0123456789ab","extra":1}"#,
                "extra",
            ),
        ] {
            let (code, text) = http(addr, "POST", "/api/v1/users", Some(&admin), Some(body)).await;
            assert_eq!(
                (code, json(&text)["field"].clone()),
                (400, field.into()),
                "{body}: {text}"
            );
        }
        let (code, text) = http(addr, "GET", "/api/v1/users/abc", Some(&admin), None).await;
        assert_eq!((code, json(&text)["field"].clone()), (400, "id".into()));
        let (code, _) = http(addr, "GET", "/api/v1/users/9999", Some(&admin), None).await;
        assert_eq!(code, 404);

        let tec = login(addr, "tec@x.cl", "0123456789ab")
            .await
            .expect("login");
        let (code, text) = http(
            addr,
            "PATCH",
            &format!("/api/v1/users/{id}"),
            Some(&admin),
            Some(r#"{"role":"viewer"}"#),
        )
        .await;
        assert_eq!(
            (code, json(&text)["role"].clone()),
            (200, "viewer".into()),
            "{text}"
        );
        let (code, _) = http(addr, "GET", "/api/v1/auth/me", Some(&tec), None).await;
        assert_eq!(
            code, 401,
            "a role change ends the sessions issued before it"
        );
        let tec = login(addr, "tec@x.cl", "0123456789ab")
            .await
            .expect("login again");
        let (code, _) = http(
            addr,
            "DELETE",
            &format!("/api/v1/users/{id}"),
            Some(&admin),
            None,
        )
        .await;
        assert_eq!(code, 204);
        let (code, _) = http(addr, "GET", "/api/v1/auth/me", Some(&tec), None).await;
        assert_eq!(code, 401, "a deactivated account's token stops working");
        let e = login(addr, "tec@x.cl", "0123456789ab")
            .await
            .expect_err("deactivated");
        assert_eq!(e.0, 401);

        let (code, text) = http(addr, "GET", "/api/v1/auth/me", Some(&admin), None).await;
        let me = json(&text)["id"].as_i64().expect("id");
        assert_eq!(code, 200);
        let (code, text) = http(
            addr,
            "PATCH",
            &format!("/api/v1/users/{me}"),
            Some(&admin),
            Some(r#"{"role":"operator"}"#),
        )
        .await;
        assert_eq!(
            (code, json(&text)["field"].clone()),
            (409, "role".into()),
            "the last admin stays: {text}"
        );
        cloud.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_one_process_is_accepted_by_another() {
    for db in TestDb::all().await {
        let users = Cloud::start(api_config(&db, "users"))
            .await
            .expect("users process");
        let catchment = Cloud::start(api_config(&db, "catchment"))
            .await
            .expect("catchment process");
        let token = account_token(&users, "op@x.cl", Role::Operator).await;
        let (code, text) = http(
            catchment.http_addr(),
            "GET",
            "/api/v1/sites",
            Some(&token),
            None,
        )
        .await;
        assert_eq!(code, 200, "{}: {text}", db.name);
        let (code, _) = http(
            catchment.http_addr(),
            "GET",
            "/api/v1/users",
            Some(&token),
            None,
        )
        .await;
        assert_eq!(
            code, 404,
            "the catchment process does not serve the users routes"
        );
        catchment.stop().await;
        users.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_admin_from_the_command_line() {
    let db = TestDb::sqlite();
    let dir = tempfile::tempdir().expect("tempdir");
    let run = |args: &[&str], stdin: &str, env: Option<(&str, &str)>| {
        use std::io::Write;
        let mut c = Command::new(env!("CARGO_BIN_EXE_caudal-cloud"));
        c.env("CAUDAL_DATABASE__URL", &db.url)
            .env("CAUDAL_DATA_DIR", dir.path())
            .env_remove("RUST_LOG")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some((k, v)) = env {
            c.env(k, v);
        }
        let mut child = c.spawn().expect("spawn");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write");
        child.wait_with_output().expect("wait")
    };
    let out = run(
        &[
            "user",
            "add",
            "--email",
            "root@x.cl",
            "--role",
            "admin",
            "--password-env",
            "PW",
        ],
        "",
        Some(("PW", "from the environment")),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(
        &["user", "add", "--email", "op@x.cl", "--role", "operator"],
        "from standard input\n",
        None,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(
        &["user", "add", "--email", "v@x.cl", "--role", "viewer"],
        "short\n",
        None,
    );
    assert!(!out.status.success(), "a short password is refused");
    let out = run(&["user", "list"], "", None);
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(
        list.contains("root@x.cl\tadmin\tactive") && list.contains("op@x.cl\toperator"),
        "{list}"
    );
    assert!(!list.contains("v@x.cl"));

    let cloud = Cloud::start(api_config(&db, "core")).await.expect("start");
    let t = login(cloud.http_addr(), "root@x.cl", "from the environment")
        .await
        .expect("admin logs in");
    let (code, _) = http(cloud.http_addr(), "GET", "/api/v1/users", Some(&t), None).await;
    assert_eq!(code, 200);
    login(cloud.http_addr(), "op@x.cl", "from standard input")
        .await
        .expect("operator logs in");
    cloud.stop().await;
}

/// Sends one HTTP/1.1 GET with extra header lines and returns the raw response head and body.
async fn raw_get(addr: std::net::SocketAddr, path: &str, headers: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    response.split("\r\n\r\n").next()?.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_carries_an_id_echoed_in_its_response() {
    let db = TestDb::sqlite();
    let cloud = Cloud::start(api_config(&db, "core")).await.expect("start");
    let addr = cloud.http_addr();
    // The caller's id (a proxy's) is kept, also on an error answer.
    let r = raw_get(addr, "/api/v1/users", "x-request-id: edge-42.a\r\n").await;
    assert!(r.starts_with("HTTP/1.1 401"), "{r}");
    assert_eq!(header(&r, "x-request-id"), Some("edge-42.a"));
    // None, or one not fit for a log line: a fresh id, different each time.
    let a = raw_get(addr, "/healthz", "").await;
    let b = raw_get(addr, "/healthz", "x-request-id: one two/three\r\n").await;
    let (ida, idb) = (header(&a, "x-request-id"), header(&b, "x-request-id"));
    for id in [ida, idb] {
        let id = id.expect("an id");
        assert_eq!(id.len(), 16, "{id}");
        assert!(id.bytes().all(|c| c.is_ascii_hexdigit()), "{id}");
    }
    assert_ne!(ida, idb);
    cloud.stop().await;
}

/// A login over `reqwest`, with optional extra headers: status, `Retry-After`, body.
async fn login_with(
    addr: std::net::SocketAddr,
    email: &str,
    password: &str,
    forwarded_for: Option<&str>,
) -> (u16, Option<String>, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("http://{addr}/api/v1/auth/login"))
        .header("content-type", "application/json")
        .body(serde_json::json!({ "email": email, "password": password }).to_string());
    if let Some(f) = forwarded_for {
        req = req.header("x-forwarded-for", f);
    }
    let resp = req.send().await.expect("login request");
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = resp.text().await.expect("body");
    (status, retry, json(&body))
}

/// The login limits: wrong passwords close an account (known or not) for its window, an
/// address over its attempts waits for its window, both answered `429` with `Retry-After` and
/// counted; other accounts and addresses go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_are_limited_per_account_and_per_address() {
    let db = TestDb::sqlite();
    let mut cfg = api_config(&db, "core");
    cfg.auth.account_failures = 3;
    cfg.auth.address_attempts = 8;
    let cloud = Cloud::start(cfg).await.expect("start");
    let addr = cloud.http_addr();
    account_token(&cloud, "ana@x.cl", Role::Viewer).await; // attempt 1
    account_token(&cloud, "ben@x.cl", Role::Viewer).await; // 2
    for _ in 0..3 {
        let (code, _, _) = login_with(addr, "ana@x.cl", "a wrong password", None).await;
        assert_eq!(code, 401); // 3, 4, 5
    }
    let (code, retry, body) = login_with(addr, "ANA@x.cl", "a long enough password", None).await; // 6
    assert_eq!(code, 429, "{body}");
    assert_eq!(body["error"], "too_many_requests");
    let retry: u64 = retry.expect("Retry-After").parse().expect("seconds");
    assert!((1..=900).contains(&retry), "{retry}");
    let (code, _, body) = login_with(addr, "ben@x.cl", "a long enough password", None).await; // 7
    assert_eq!(code, 200, "another account goes on: {body}");
    let (code, _, _) = login_with(addr, "nobody@x.cl", "x", None).await; // 8
    assert_eq!(code, 401);
    let (code, retry, body) = login_with(addr, "ben@x.cl", "a long enough password", None).await;
    assert_eq!(code, 429, "the address is over its 8 attempts: {body}");
    assert!(retry.is_some());
    // Without http.trust_forwarded_for a client cannot pick another address.
    let (code, _, _) =
        login_with(addr, "ben@x.cl", "a long enough password", Some("10.0.0.9")).await;
    assert_eq!(code, 429);
    let metrics = support::http_get(addr, "/metrics").await.1;
    for line in [
        r#"caudal_cloud_auth_logins_total{kind="throttled_account"} 1"#,
        r#"caudal_cloud_auth_logins_total{kind="throttled_address"} 2"#,
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
    cloud.stop().await;
}

/// Behind a proxy (`http.trust_forwarded_for`), each client's address is the last
/// `X-Forwarded-For` entry: one client over its attempts does not hold back the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_proxy_each_client_has_its_own_budget() {
    let db = TestDb::sqlite();
    let mut cfg = api_config(&db, "core");
    cfg.auth.address_attempts = 2;
    cfg.http.trust_forwarded_for = true;
    let cloud = Cloud::start(cfg).await.expect("start");
    let addr = cloud.http_addr();
    for _ in 0..2 {
        let (code, _, _) = login_with(addr, "x@x.cl", "x", Some("1.2.3.4, 10.0.0.1")).await;
        assert_eq!(code, 401);
    }
    let (code, _, _) = login_with(addr, "x@x.cl", "x", Some("9.9.9.9, 10.0.0.1")).await;
    assert_eq!(
        code, 429,
        "the proxy appended 10.0.0.1 both times: one client"
    );
    let (code, _, _) = login_with(addr, "x@x.cl", "x", Some("10.0.0.2")).await;
    assert_eq!(code, 401, "another client");
    cloud.stop().await;
}

/// A body over `http.body_limit_bytes` is answered `413`, not read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_is_refused() {
    let db = TestDb::sqlite();
    let mut cfg = api_config(&db, "core");
    cfg.http.body_limit_bytes = 4096;
    let cloud = Cloud::start(cfg).await.expect("start");
    let big = format!(r#"{{"email":"x@x.cl","password":"{}"}}"#, "p".repeat(8192));
    let (code, body) = http(
        cloud.http_addr(),
        "POST",
        "/api/v1/auth/login",
        None,
        Some(&big),
    )
    .await;
    assert_eq!(code, 413, "{body}");
    assert_eq!(json(&body)["error"], "payload_too_large");
    cloud.stop().await;
}
