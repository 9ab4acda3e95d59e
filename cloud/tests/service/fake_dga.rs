//! A fake of the DGA's MEE API over real HTTP/1.1 on loopback, built from the manual and from
//! what operators saw the real one do (research notes §4): it stores one measurement per
//! (obra, fecha, hora) with a 32-character receipt, answers a repeat with the duplicate-400
//! carrying the receipt in its message, and plays scripted faults: a timeout after storing,
//! 5xx, HTML, a connection reset, `00` without a receipt, a wrong informante. Every request is
//! logged and checked against the manual's format; a request that breaks it is recorded as a
//! violation and refused. The GET (`<endpoint>?codigoObra=…&numeroComprobante=…`) answers what
//! is stored under a receipt as the manual shows it, `fechaMedicion` as `DD-MM-YYYY`; a test
//! can alter a stored value (a mismatch) or script a GET's fault (500, HTML).

use serde_json::{Value, json};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the next POST gets instead of the normal answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Stores the measurement, then answers only after `Duration` (past the client's timeout).
    TimeoutThatStores(Duration),
    /// 500 with a JSON body; nothing stored.
    ServerError,
    /// 502 with an HTML page; nothing stored.
    Html,
    /// The connection is reset before any answer; nothing stored.
    Reset,
    /// Stored; `00` without `numeroComprobante`.
    OkWithoutReceipt,
    /// 400 "Usuario no es el informante registrado en la Obra"; nothing stored.
    WrongInformant,
}

/// What the next GET gets instead of the normal answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GetFault {
    /// 500 with a JSON body.
    ServerError,
    /// 502 with an HTML page.
    Html,
}

/// One POST as received.
#[derive(Debug, Clone)]
pub struct Post {
    pub path: String,
    pub obra: String,
    pub timestamp_origen: String,
    pub body: Value,
}

impl Post {
    pub fn slot(&self) -> (String, String) {
        let m = self
            .body
            .as_object()
            .and_then(|o| o.iter().find(|(k, _)| k.starts_with("medicion")))
            .map(|(_, v)| v.clone())
            .unwrap_or(Value::Null);
        (
            m["fechaMedicion"].as_str().unwrap_or_default().to_string(),
            m["horaMedicion"].as_str().unwrap_or_default().to_string(),
        )
    }
}

#[derive(Debug, Default)]
struct State {
    script: VecDeque<Fault>,
    /// (obra, fecha, hora) → receipt.
    stored: HashMap<(String, String, String), String>,
    posts: Vec<Post>,
    violations: Vec<String>,
    /// receipt → (obra, path, the measurement object as received).
    by_receipt: HashMap<String, (String, String, Value)>,
    get_script: VecDeque<GetFault>,
    gets: Vec<String>,
}

/// The running fake.
#[derive(Debug, Clone)]
pub struct FakeDga {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

fn receipt() -> String {
    (0..32).map(|_| fastrand::alphanumeric()).collect()
}

impl FakeDga {
    pub async fn start() -> FakeDga {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State::default()));
        let s = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move { serve(stream, s).await });
            }
        });
        FakeDga { addr, state }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/api/v1", self.addr)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn script(&self, faults: &[Fault]) {
        self.lock().script.extend(faults.iter().copied());
    }

    pub fn posts(&self) -> Vec<Post> {
        self.lock().posts.clone()
    }

    pub fn violations(&self) -> Vec<String> {
        self.lock().violations.clone()
    }

    /// The receipt stored for (obra, fecha, hora).
    pub fn stored(&self, obra: &str, fecha: &str, hora: &str) -> Option<String> {
        self.lock()
            .stored
            .get(&(obra.to_string(), fecha.to_string(), hora.to_string()))
            .cloned()
    }

    pub fn stored_count(&self) -> usize {
        self.lock().stored.len()
    }

    /// Changes a value the DGA holds under a receipt (what a mismatch looks like).
    pub fn tamper(&self, receipt: &str, field: &str, value: &str) {
        if let Some((_, _, m)) = self.lock().by_receipt.get_mut(receipt) {
            m[field] = Value::String(value.to_string());
        }
    }

    pub fn script_get(&self, faults: &[GetFault]) {
        self.lock().get_script.extend(faults.iter().copied());
    }

    /// The request targets of every GET received.
    pub fn gets(&self) -> Vec<String> {
        self.lock().gets.clone()
    }
}

fn query_param(target: &str, name: &str) -> Option<String> {
    let (_, q) = target.split_once('?')?;
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.replace("%2D", "-").replace("%2d", "-"))
    })
}

/// The GET: what is stored under the receipt, `fechaMedicion` as `DD-MM-YYYY` (manual §4.4).
async fn answer_get(stream: &mut TcpStream, target: &str, state: &Arc<Mutex<State>>) {
    let path = target.split('?').next().unwrap_or_default().to_string();
    let obra = query_param(target, "codigoObra").unwrap_or_default();
    let receipt = query_param(target, "numeroComprobante").unwrap_or_default();
    let (fault, found) = {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        s.gets.push(target.to_string());
        let found = s
            .by_receipt
            .get(&receipt)
            .filter(|(o, p, _)| *o == obra && *p == path)
            .map(|(_, _, m)| m.clone());
        (s.get_script.pop_front(), found)
    };
    match fault {
        Some(GetFault::ServerError) => {
            let b = json!({"status": "500", "message": "Error interno"});
            return respond(stream, 500, "application/json", &b.to_string()).await;
        }
        Some(GetFault::Html) => {
            return respond(
                stream,
                502,
                "text/html",
                "<html><body><h1>502 Bad Gateway</h1></body></html>",
            )
            .await;
        }
        None => {}
    }
    let Some(mut m) = found else {
        let b = json!({"status": "404", "message": "No existe la medición"});
        return respond(stream, 404, "application/json", &b.to_string()).await;
    };
    if let Some(f) = m["fechaMedicion"].as_str() {
        let parts: Vec<&str> = f.split('-').collect();
        if let [y, mo, d] = parts.as_slice() {
            m["fechaMedicion"] = Value::String(format!("{d}-{mo}-{y}"));
        }
    }
    let b = json!({"status": "00", "message": "Medición encontrada", "data": m});
    respond(stream, 200, "application/json", &b.to_string()).await;
}

fn check(path: &str, headers: &HashMap<String, String>, body: &Value) -> Vec<String> {
    let mut v = Vec::new();
    let obra = headers.get("codigoobra").cloned().unwrap_or_default();
    let re_obra = obra.starts_with("OB-") || obra.starts_with("OR-");
    if !re_obra {
        v.push(format!("codigoObra {obra:?}"));
    }
    let ts = headers.get("timestamporigen").cloned().unwrap_or_default();
    if ts.len() != 24 || !ts.ends_with("-0000") || ts.as_bytes().get(10) != Some(&b'T') {
        v.push(format!("timeStampOrigen {ts:?}"));
    }
    if headers.get("content-type").map(String::as_str) != Some("application/json") {
        v.push("Content-Type".to_string());
    }
    let auth = &body["autenticacion"];
    for k in ["password", "rutEmpresa", "rutUsuario"] {
        if !auth[k].is_string() {
            v.push(format!("autenticacion.{k}"));
        }
    }
    let (key, fields): (&str, &[&str]) = match path {
        "/api/v1/mediciones/subterraneas" => (
            "medicionSubterranea",
            &[
                "caudal",
                "fechaMedicion",
                "horaMedicion",
                "nivelFreaticoDelPozo",
                "totalizador",
            ],
        ),
        "/api/v1/mediciones/superficiales/flujometro" => (
            "medicionSuperficialFlujometro",
            &["caudal", "fechaMedicion", "horaMedicion", "totalizador"],
        ),
        "/api/v1/mediciones/superficiales" => (
            "medicionSuperficial",
            &[
                "alturaLimnimetrica",
                "caudal",
                "fechaMedicion",
                "horaMedicion",
            ],
        ),
        other => {
            v.push(format!("path {other}"));
            return v;
        }
    };
    let m = &body[key];
    for f in fields {
        if !m[*f].is_string() {
            v.push(format!("{key}.{f} is not a string"));
        }
    }
    let caudal = m["caudal"].as_str().unwrap_or_default();
    if caudal.split_once('.').is_none_or(|(_, d)| d.len() != 2) {
        v.push(format!("caudal {caudal:?} without 2 decimals"));
    }
    let fecha = m["fechaMedicion"].as_str().unwrap_or_default();
    if fecha.len() != 10 || fecha.as_bytes().get(4) != Some(&b'-') {
        v.push(format!("fechaMedicion {fecha:?}"));
    }
    if let Some(t) = m["totalizador"].as_str()
        && (t.len() > 15 || !t.bytes().all(|b| b.is_ascii_digit()))
    {
        v.push(format!("totalizador {t:?}"));
    }
    v
}

async fn respond(stream: &mut TcpStream, code: u16, content_type: &str, body: &str) {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        _ => "X",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

async fn serve(mut stream: TcpStream, state: Arc<Mutex<State>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_string();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body: Value = serde_json::from_slice(&buf[head_end..head_end + len]).unwrap_or(Value::Null);
    let path = request_line
        .split(' ')
        .nth(1)
        .unwrap_or_default()
        .to_string();
    if request_line.starts_with("GET ") {
        return answer_get(&mut stream, &path, &state).await;
    }
    let post = Post {
        path: path.clone(),
        obra: headers.get("codigoobra").cloned().unwrap_or_default(),
        timestamp_origen: headers.get("timestamporigen").cloned().unwrap_or_default(),
        body: body.clone(),
    };
    let (fecha, hora) = post.slot();
    let key = (post.obra.clone(), fecha, hora);
    let violations = check(&path, &headers, &body);
    let (fault, answer) = {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        s.posts.push(post);
        if s.posts
            .last()
            .is_some_and(|p| p.path.is_empty() || p.timestamp_origen.is_empty())
        {
            s.violations.push("no path or timeStampOrigen".to_string());
        }
        if !violations.is_empty() {
            s.violations.extend(violations.iter().cloned());
            (
                None,
                Some((
                    400,
                    json!({"status": "400", "message": violations.join("; ")}),
                )),
            )
        } else {
            let fault = s.script.pop_front();
            let stores = matches!(
                fault,
                None | Some(Fault::TimeoutThatStores(_)) | Some(Fault::OkWithoutReceipt)
            );
            let answer = if let Some(r) = s.stored.get(&key) {
                // The real service refuses a repeat whatever else happens.
                Some((
                    400,
                    json!({"status": "400", "message": format!("Ya existe un registro en esa fecha, hora para la obra. Comprobante: {r}")}),
                ))
            } else {
                if stores {
                    let r = receipt();
                    s.stored.insert(key.clone(), r.clone());
                    let m = body
                        .as_object()
                        .and_then(|o| o.iter().find(|(k, _)| k.starts_with("medicion")))
                        .map(|(_, v)| v.clone())
                        .unwrap_or(Value::Null);
                    s.by_receipt.insert(r, (key.0.clone(), path.clone(), m));
                }
                None
            };
            (fault, answer)
        }
    };
    if let Some((code, body)) = answer {
        respond(&mut stream, code, "application/json", &body.to_string()).await;
        return;
    }
    let receipt = state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .stored
        .get(&key)
        .cloned()
        .unwrap_or_default();
    let ok = json!({"status": "00", "message": "Medición subterránea ingresada correctamente", "data": {"numeroComprobante": receipt}});
    match fault {
        None => respond(&mut stream, 200, "application/json", &ok.to_string()).await,
        Some(Fault::TimeoutThatStores(d)) => {
            tokio::time::sleep(d).await;
            respond(&mut stream, 200, "application/json", &ok.to_string()).await;
        }
        Some(Fault::ServerError) => {
            let b = json!({"status": "500", "message": "Error interno"});
            respond(&mut stream, 500, "application/json", &b.to_string()).await;
        }
        Some(Fault::Html) => {
            respond(
                &mut stream,
                502,
                "text/html",
                "<html><body><h1>502 Bad Gateway</h1></body></html>",
            )
            .await;
        }
        Some(Fault::Reset) => {
            #[allow(deprecated)]
            let _ = stream.set_linger(Some(Duration::ZERO));
            drop(stream);
        }
        Some(Fault::OkWithoutReceipt) => {
            let b =
                json!({"status": "00", "message": "Medición subterránea ingresada correctamente"});
            respond(&mut stream, 200, "application/json", &b.to_string()).await;
        }
        Some(Fault::WrongInformant) => {
            let b = json!({"status": "400", "message": "Usuario no es el informante registrado en la Obra"});
            respond(&mut stream, 400, "application/json", &b.to_string()).await;
        }
    }
}
