//! The DGA's MEE REST API (Res. DGA Ex. 2.170/2025, Manual Técnico N° 1/2025) at the I/O seam:
//! the request exactly as the manual writes it ([`Measurement::body`]), what an answer means
//! ([`classify`]), and the [`DgaClient`] trait with its HTTPS implementation ([`HttpDga`]), so
//! tests drive the regulator's faults and the submitter's time.
//!
//! What an answer means (research notes §4.3, §4.6):
//!
//! | answer | outcome |
//! |---|---|
//! | 2xx, `status` `00`, `data.numeroComprobante` | accepted with its receipt |
//! | 2xx, `status` `00`, no receipt | accepted without a receipt: never sent again, followed up |
//! | 400 "Ya existe un registro … Comprobante: X" | accepted earlier (a timeout that stored it): receipt X |
//! | "Ya existe un registro …" without a receipt | accepted without a receipt |
//! | "Usuario no es el informante registrado en la Obra", a wrong password, 401/403 | refused for configuration: the obra stops |
//! | anything else: other status, 5xx, HTML, an empty body, reset, timeout | failed: sent again the next day |
//!
//! The GET (`<endpoint>?codigoObra=…&numeroComprobante=…`, research notes §4.1, §4.4) answers
//! what the DGA stored under a receipt; [`stored`] reads it, normalising the `DD-MM-YYYY` the
//! GET writes `fechaMedicion` in to the POST's `YYYY-MM-DD`. It is sent without credentials, as
//! operators do.

use super::secret::{Password, REDACTED};
use super::value::Values;
use crate::catchment::obra::ObraCode;
use crate::catchment::point::PointKind;
use crate::catchment::rut::Rut;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::str::FromStr;
use std::time::Duration;
use utoipa::ToSchema;

/// The manual's base URL.
pub const DEFAULT_BASE_URL: &str = "https://apimee.mop.gob.cl/api/v1";
/// Most characters of an answer's body kept with a slot.
pub const MAX_KEPT_BODY: usize = 4000;

/// Which MEE endpoint a point reports to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// `mediciones/subterraneas`: caudal, totalizador, nivel freático.
    Subterranea,
    /// `mediciones/superficiales/flujometro`: caudal, totalizador.
    SuperficialFlujometro,
    /// `mediciones/superficiales`: altura limnimétrica, caudal.
    Superficial,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Subterranea => "subterranea",
            Endpoint::SuperficialFlujometro => "superficial_flujometro",
            Endpoint::Superficial => "superficial",
        }
    }

    /// The path under the base URL.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Subterranea => "/mediciones/subterraneas",
            Endpoint::SuperficialFlujometro => "/mediciones/superficiales/flujometro",
            Endpoint::Superficial => "/mediciones/superficiales",
        }
    }

    /// The endpoint a point of this kind reports to unless told otherwise.
    pub fn of_kind(k: PointKind) -> Endpoint {
        match k {
            PointKind::Groundwater => Endpoint::Subterranea,
            PointKind::SurfaceFlow => Endpoint::SuperficialFlujometro,
            PointKind::SurfaceLevel => Endpoint::Superficial,
        }
    }
}

impl FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Endpoint, String> {
        [
            Endpoint::Subterranea,
            Endpoint::SuperficialFlujometro,
            Endpoint::Superficial,
        ]
        .into_iter()
        .find(|e| e.as_str() == s)
        .ok_or_else(|| format!("unknown endpoint {s:?}"))
    }
}

/// One measurement to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    pub endpoint: Endpoint,
    pub obra: ObraCode,
    /// The Centro de Control.
    pub rut_empresa: Rut,
    /// The informante.
    pub rut_usuario: Rut,
    /// `fechaMedicion`, `horaMedicion` in UTC-4.
    pub fecha: String,
    pub hora: String,
    pub values: Values,
}

impl Measurement {
    /// The POST body, exactly as the manual's examples: `autenticacion` and one measurement
    /// object, every value a string.
    pub fn body(&self, password: &Password) -> serde_json::Value {
        self.json(password.expose())
    }

    /// The body with the password replaced by `****`: what is kept with the slot.
    pub fn redacted(&self) -> serde_json::Value {
        self.json(REDACTED)
    }

    fn json(&self, password: &str) -> serde_json::Value {
        use serde_json::json;
        let v = &self.values;
        let opt = |s: &Option<String>| s.clone().unwrap_or_default();
        let (key, m) = match self.endpoint {
            Endpoint::Subterranea => (
                "medicionSubterranea",
                json!({
                    "caudal": v.caudal,
                    "fechaMedicion": self.fecha,
                    "horaMedicion": self.hora,
                    "nivelFreaticoDelPozo": opt(&v.nivel),
                    "totalizador": opt(&v.totalizador),
                }),
            ),
            Endpoint::SuperficialFlujometro => (
                "medicionSuperficialFlujometro",
                json!({
                    "caudal": v.caudal,
                    "fechaMedicion": self.fecha,
                    "horaMedicion": self.hora,
                    "totalizador": opt(&v.totalizador),
                }),
            ),
            Endpoint::Superficial => (
                "medicionSuperficial",
                json!({
                    "alturaLimnimetrica": opt(&v.altura),
                    "caudal": v.caudal,
                    "fechaMedicion": self.fecha,
                    "horaMedicion": self.hora,
                }),
            ),
        };
        json!({
            "autenticacion": {
                "password": password,
                "rutEmpresa": self.rut_empresa.as_str(),
                "rutUsuario": self.rut_usuario.as_str(),
            },
            key: m,
        })
    }
}

/// A POST as it goes on the wire.
#[derive(Debug, Clone)]
pub struct PostRequest {
    pub base_url: String,
    pub endpoint: Endpoint,
    /// Header `codigoObra`.
    pub codigo_obra: String,
    /// Header `timeStampOrigen`.
    pub timestamp_origen: String,
    pub body: Vec<u8>,
}

/// What came back over HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawResponse {
    pub status: u16,
    pub body: String,
}

/// No answer came back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    #[error("no answer within {0} s")]
    Timeout(u64),
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("the exchange broke off: {0}")]
    Broken(String),
}

/// A receipt check as it goes on the wire.
#[derive(Debug, Clone)]
pub struct GetRequest {
    pub base_url: String,
    pub endpoint: Endpoint,
    pub codigo_obra: String,
    pub receipt: String,
}

/// The regulator, as the submitter and the receipt check see it.
pub trait DgaClient: Send + Sync + 'static {
    fn post(
        &self,
        req: &PostRequest,
    ) -> impl Future<Output = Result<RawResponse, TransportError>> + Send;

    /// What the DGA stored under a receipt.
    fn get(
        &self,
        req: &GetRequest,
    ) -> impl Future<Output = Result<RawResponse, TransportError>> + Send;
}

/// The MEE API over HTTPS (rustls), with its timeouts.
#[derive(Debug, Clone)]
pub struct HttpDga {
    client: reqwest::Client,
    post_timeout: Duration,
    get_timeout: Duration,
}

impl HttpDga {
    pub fn new(post_timeout: Duration, get_timeout: Duration) -> Result<HttpDga, String> {
        let client = reqwest::Client::builder()
            .connect_timeout(get_timeout.min(post_timeout))
            // A redirect is an answer to record, not to follow: a POST turned into a GET
            // elsewhere would be a measurement sent nowhere.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("caudal-cloud/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("building the HTTPS client: {e}"))?;
        Ok(HttpDga {
            client,
            post_timeout,
            get_timeout,
        })
    }
}

fn classify_err(secs: u64) -> impl Fn(reqwest::Error) -> TransportError {
    move |e: reqwest::Error| {
        if e.is_timeout() {
            TransportError::Timeout(secs)
        } else if e.is_connect() {
            TransportError::Connect(e.to_string())
        } else {
            TransportError::Broken(e.to_string())
        }
    }
}

impl DgaClient for HttpDga {
    async fn post(&self, req: &PostRequest) -> Result<RawResponse, TransportError> {
        let url = format!(
            "{}{}",
            req.base_url.trim_end_matches('/'),
            req.endpoint.path()
        );
        let classify_err = classify_err(self.post_timeout.as_secs());
        let sent = self
            .client
            .post(url)
            .timeout(self.post_timeout)
            .header("Content-Type", "application/json")
            .header("codigoObra", &req.codigo_obra)
            .header("timeStampOrigen", &req.timestamp_origen)
            .body(req.body.clone())
            .send()
            .await;
        let resp = sent.map_err(&classify_err)?;
        let status = resp.status().as_u16();
        let body = resp.text().await.map_err(&classify_err)?;
        Ok(RawResponse { status, body })
    }

    async fn get(&self, req: &GetRequest) -> Result<RawResponse, TransportError> {
        let url = format!(
            "{}{}",
            req.base_url.trim_end_matches('/'),
            req.endpoint.path()
        );
        let classify = classify_err(self.get_timeout.as_secs());
        let url = reqwest::Url::parse_with_params(
            &url,
            &[
                ("codigoObra", req.codigo_obra.as_str()),
                ("numeroComprobante", req.receipt.as_str()),
            ],
        )
        .map_err(|e| TransportError::Connect(format!("the URL {url:?}: {e}")))?;
        let resp = self
            .client
            .get(url)
            .timeout(self.get_timeout)
            .send()
            .await
            .map_err(&classify)?;
        let status = resp.status().as_u16();
        let body = resp.text().await.map_err(&classify)?;
        Ok(RawResponse { status, body })
    }
}

/// What the GET says the DGA stored: every value as the answer wrote it (a JSON string, or a
/// number written out), `fecha` as `YYYY-MM-DD`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    pub fecha: Option<String>,
    pub hora: Option<String>,
    pub caudal: Option<String>,
    pub totalizador: Option<String>,
    pub nivel: Option<String>,
    pub altura: Option<String>,
}

/// `DD-MM-YYYY` (the GET's) or `YYYY-MM-DD` (the POST's) as `YYYY-MM-DD`; `None` for anything
/// else.
pub fn normal_fecha(raw: &str) -> Option<String> {
    let raw = raw.trim();
    chrono::NaiveDate::parse_from_str(raw, "%d-%m-%Y")
        .or_else(|_| chrono::NaiveDate::parse_from_str(raw, "%Y-%m-%d"))
        .ok()
        .map(|d| d.format("%Y-%m-%d").to_string())
}

/// What a GET answer holds, or why it holds nothing usable (not JSON, not `00`, no `data`).
pub fn stored(r: &RawResponse) -> Result<Stored, String> {
    if !(200..300).contains(&r.status) {
        return Err(format!("HTTP {}: {}", r.status, excerpt(&r.body)));
    }
    let v: serde_json::Value = serde_json::from_str(&r.body).map_err(|_| {
        format!(
            "HTTP {} with a body that is not the API's JSON: {}",
            r.status,
            excerpt(&r.body)
        )
    })?;
    let status = match &v["status"] {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if status != "00" {
        return Err(format!(
            "status {status:?}: {}",
            excerpt(v["message"].as_str().unwrap_or_default())
        ));
    }
    let data = &v["data"];
    if !data.is_object() {
        return Err("status 00 without data".to_string());
    }
    let text = |k: &str| match &data[k] {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    };
    let fecha = match text("fechaMedicion") {
        None => None,
        Some(f) => {
            Some(normal_fecha(&f).ok_or_else(|| format!("fechaMedicion {f:?} is not a date"))?)
        }
    };
    Ok(Stored {
        fecha,
        hora: text("horaMedicion"),
        caudal: text("caudal"),
        totalizador: text("totalizador"),
        nivel: text("nivelFreaticoDelPozo"),
        altura: text("alturaLimnimetrica"),
    })
}

/// What an answer means for the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Accepted {
        receipt: String,
    },
    /// "Ya existe un registro …": stored by an earlier send.
    Duplicate {
        receipt: String,
    },
    /// Stored, but no receipt came with it (`00` without one, a duplicate without one).
    AcceptedNoReceipt {
        detail: String,
    },
    /// The DGA refuses who is sending (informante, password): the obra stops.
    RejectedConfig {
        message: String,
    },
    /// Not stored, as far as is known: sent again the next day.
    Failed {
        reason: String,
    },
}

impl Outcome {
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Accepted { .. } => "accepted",
            Outcome::Duplicate { .. } => "duplicate",
            Outcome::AcceptedNoReceipt { .. } => "accepted_no_receipt",
            Outcome::RejectedConfig { .. } => "rejected_config",
            Outcome::Failed { .. } => "failed",
        }
    }
}

#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    status: Option<serde_json::Value>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    data: Option<AnswerData>,
}

#[derive(Deserialize)]
struct AnswerData {
    #[serde(default, rename = "numeroComprobante")]
    numero_comprobante: Option<String>,
}

fn excerpt(s: &str) -> String {
    let s = s.trim();
    let cut: String = s.chars().take(200).collect();
    if cut.len() < s.len() {
        format!("{cut}…")
    } else {
        cut
    }
}

/// The receipt in a duplicate's message: "… Comprobante: <token>".
pub fn receipt_in(message: &str) -> Option<String> {
    let lower = message.to_lowercase();
    let at = lower.find("comprobante")?;
    let rest = &message[at + "comprobante".len()..];
    let rest = rest.trim_start_matches(|c: char| c == ':' || c.is_whitespace());
    let token: String = rest
        .chars()
        .take_while(char::is_ascii_alphanumeric)
        .collect();
    (!token.is_empty()).then_some(token)
}

fn is_config_refusal(message: &str) -> bool {
    let m = message.to_lowercase();
    m.contains("no es el informante")
        || ((m.contains("contraseña") || m.contains("password") || m.contains("clave"))
            && (m.contains("incorrect") || m.contains("inválid") || m.contains("invalid")))
}

/// What an answer (or its absence) means.
pub fn classify(answer: &Result<RawResponse, TransportError>) -> Outcome {
    let r = match answer {
        Err(e) => {
            return Outcome::Failed {
                reason: e.to_string(),
            };
        }
        Ok(r) => r,
    };
    if r.body.trim().is_empty() {
        return Outcome::Failed {
            reason: format!("HTTP {} with an empty body", r.status),
        };
    }
    let Ok(a) = serde_json::from_str::<Answer>(&r.body) else {
        return Outcome::Failed {
            reason: format!(
                "HTTP {} with a body that is not the API's JSON: {}",
                r.status,
                excerpt(&r.body)
            ),
        };
    };
    let message = a.message.unwrap_or_default();
    let status = match &a.status {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => String::new(),
    };
    if message.contains("Ya existe un registro") {
        return match receipt_in(&message) {
            Some(receipt) => Outcome::Duplicate { receipt },
            None => Outcome::AcceptedNoReceipt {
                detail: format!("duplicate without a receipt: {}", excerpt(&message)),
            },
        };
    }
    if is_config_refusal(&message) || matches!(r.status, 401 | 403) {
        return Outcome::RejectedConfig {
            message: format!("HTTP {}: {}", r.status, excerpt(&message)),
        };
    }
    if (200..300).contains(&r.status) && status == "00" {
        return match a
            .data
            .and_then(|d| d.numero_comprobante)
            .filter(|c| !c.trim().is_empty())
        {
            Some(receipt) => Outcome::Accepted { receipt },
            None => Outcome::AcceptedNoReceipt {
                detail: format!("status 00 without numeroComprobante: {}", excerpt(&message)),
            },
        };
    }
    Outcome::Failed {
        reason: format!(
            "HTTP {}, status {:?}: {}",
            r.status,
            status,
            excerpt(&message)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The manual's groundwater example. Its RUTs (`77555666-7`, `20999888-7`) are made up and
    /// fail the check digit, so the same numbers with their real check digits stand in.
    fn manual_example() -> Measurement {
        Measurement {
            endpoint: Endpoint::Subterranea,
            obra: "OB-0101-114".parse().expect("obra"),
            rut_empresa: "77555666-8".parse().expect("rut"),
            rut_usuario: "20999888-2".parse().expect("rut"),
            fecha: "2023-09-07".into(),
            hora: "10:00:00".into(),
            values: Values {
                caudal: "1.00".into(),
                totalizador: Some("1010".into()),
                nivel: Some("9.85".into()),
                altura: None,
            },
        }
    }

    #[test]
    fn the_body_is_the_manuals_example() {
        let body = manual_example().body(&Password::new("secreto"));
        assert_eq!(
            body.to_string(),
            r#"{"autenticacion":{"password":"secreto","rutEmpresa":"77555666-8","rutUsuario":"20999888-2"},"medicionSubterranea":{"caudal":"1.00","fechaMedicion":"2023-09-07","horaMedicion":"10:00:00","nivelFreaticoDelPozo":"9.85","totalizador":"1010"}}"#
        );
        let red = manual_example().redacted().to_string();
        assert!(red.contains(r#""password":"****""#) && !red.contains("secreto"));
        let surface = Measurement {
            endpoint: Endpoint::Superficial,
            values: Values {
                caudal: "15.31".into(),
                altura: Some("5".into()),
                ..Values::default()
            },
            ..manual_example()
        };
        assert_eq!(
            surface.redacted()["medicionSuperficial"].to_string(),
            r#"{"alturaLimnimetrica":"5","caudal":"15.31","fechaMedicion":"2023-09-07","horaMedicion":"10:00:00"}"#
        );
    }

    #[test]
    fn a_get_answer_is_read_with_its_date_normalised() {
        let r = RawResponse {
            status: 200,
            body: r#"{"status":"00","message":"ok","data":{"fechaMedicion":"07-09-2023","horaMedicion":"10:00:00","caudal":"1.00","totalizador":1010,"nivelFreaticoDelPozo":"9.85"}}"#.into(),
        };
        let s = stored(&r).expect("stored");
        assert_eq!(s.fecha.as_deref(), Some("2023-09-07"));
        assert_eq!(s.totalizador.as_deref(), Some("1010"));
        assert_eq!(s.altura, None);
        for (status, body) in [
            (502, "<html>Bad Gateway</html>"),
            (200, "<html>ok</html>"),
            (200, r#"{"status":"01","message":"no existe"}"#),
            (200, r#"{"status":"00","message":"ok"}"#),
            (200, r#"{"status":"00","data":{"fechaMedicion":"mañana"}}"#),
        ] {
            assert!(
                stored(&RawResponse {
                    status,
                    body: body.into()
                })
                .is_err(),
                "{status} {body}"
            );
        }
        assert_eq!(normal_fecha("2023-09-07").as_deref(), Some("2023-09-07"));
        assert_eq!(normal_fecha("31-02-2023"), None);
    }

    fn answer(status: u16, body: &str) -> Outcome {
        classify(&Ok(RawResponse {
            status,
            body: body.into(),
        }))
    }

    #[test]
    fn answers_are_classified_as_operators_saw_them() {
        assert_eq!(
            answer(
                200,
                r#"{"status":"00","message":"Medición subterránea ingresada correctamente","data":{"numeroComprobante":"zk7DOAl3uIlGTjvwNtwBF0sBLAR16cI5"}}"#
            ),
            Outcome::Accepted {
                receipt: "zk7DOAl3uIlGTjvwNtwBF0sBLAR16cI5".into()
            }
        );
        assert_eq!(
            answer(
                400,
                r#"{"status":"400","message":"Ya existe un registro en esa fecha, hora para la obra. Comprobante: abc123XYZ"}"#
            ),
            Outcome::Duplicate {
                receipt: "abc123XYZ".into()
            }
        );
        assert_eq!(
            answer(
                400,
                r#"{"message":"Ya existe un registro en esa fecha, hora para la obra."}"#
            )
            .name(),
            "accepted_no_receipt"
        );
        assert_eq!(
            answer(200, r#"{"status":"00","message":"ok","data":{}}"#).name(),
            "accepted_no_receipt"
        );
        assert_eq!(
            answer(200, r#"{"status":"00","message":"ok"}"#).name(),
            "accepted_no_receipt"
        );
        assert_eq!(
            answer(
                400,
                r#"{"status":"400","message":"Usuario no es el informante registrado en la Obra"}"#
            )
            .name(),
            "rejected_config"
        );
        assert_eq!(
            answer(401, r#"{"message":"no autorizado"}"#).name(),
            "rejected_config"
        );
        for (s, b) in [
            (500, r#"{"status":"500","message":"error interno"}"#),
            (502, "<html><body>Bad Gateway</body></html>"),
            (200, ""),
            (200, r#"{"status":"07","message":"formato"}"#),
            (418, r#"{"message":"?"}"#),
        ] {
            assert_eq!(answer(s, b).name(), "failed", "{s} {b}");
        }
        assert!(matches!(
            classify(&Err(TransportError::Timeout(15))),
            Outcome::Failed { reason } if reason.contains("15 s")
        ));
    }
}
