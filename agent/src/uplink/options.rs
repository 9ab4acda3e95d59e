//! From `[uplink]` configuration to MQTT client options: the broker URL, the session, the last
//! will, credentials and TLS (rustls, with the configured CA bundle or the system's roots, and an
//! optional client certificate for mutual TLS).
//!
//! Everything that can be wrong in the configuration is found here, before the first connection
//! attempt, with an error naming the key and the file.

use super::UplinkError;
use crate::config::UplinkConfig;
use caudal_common::payload::Payload;
use caudal_common::topic::{self, TopicKind};
use caudal_common::{SiteId, Status};
use rumqttc::tokio_rustls::rustls::crypto::ring;
use rumqttc::tokio_rustls::rustls::pki_types::pem::PemObject;
use rumqttc::tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rumqttc::tokio_rustls::rustls::{ClientConfig, RootCertStore};
use rumqttc::{LastWill, MqttOptions, QoS, TlsConfiguration, Transport};
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Largest batch payload the uplink builds, in bytes. Brokers commonly cap packets at 128 KiB
/// (AWS IoT) to 256 MiB (Mosquitto); staying under the smallest keeps a batch deliverable
/// everywhere. A batch stops growing before it would pass this size.
pub const MAX_BATCH_BYTES: usize = 120 * 1024;
/// Largest packet accepted from the broker (acks, commands, desired configuration).
pub const MAX_INCOMING_BYTES: usize = 256 * 1024;
/// Room for status, command results and subscriptions in the client's request queue, on top of
/// one slot per in-flight batch.
pub const CONTROL_SLOTS: usize = 16;

/// A parsed `mqtt://host:port` or `mqtts://host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

impl BrokerUrl {
    /// Parses a broker URL. The port defaults to 1883 (`mqtt`) or 8883 (`mqtts`); IPv6 hosts
    /// are written in brackets. Credentials, paths and queries are refused: they belong in
    /// `username`/`password`, and MQTT has no path.
    pub fn parse(url: &str) -> Result<BrokerUrl, UplinkError> {
        let bad = |reason: &str| UplinkError::BrokerUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("missing scheme; write mqtt://host:port or mqtts://host:port"))?;
        let (tls, default_port) = match scheme {
            "mqtt" | "tcp" => (false, 1883),
            "mqtts" | "ssl" => (true, 8883),
            other => {
                return Err(bad(&format!(
                    "unknown scheme {other:?}; use mqtt (plain) or mqtts (TLS)"
                )));
            }
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('@') {
            return Err(bad(
                "credentials in the URL are not supported; set uplink.username and uplink.password",
            ));
        }
        if rest.contains(['/', '?', '#']) {
            return Err(bad(
                "a broker URL has no path or query; write scheme://host:port",
            ));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("IPv6 host is missing its closing ']'"))?;
            match after {
                "" => (host, None),
                p => (
                    host,
                    Some(
                        p.strip_prefix(':')
                            .ok_or_else(|| bad("expected ':' and a port after the IPv6 host"))?,
                    ),
                ),
            }
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(bad("host is empty"));
        }
        let port = match port {
            None => default_port,
            Some(p) => match p.parse::<u16>() {
                Ok(0) => return Err(bad("port 0 is not a valid broker port")),
                Ok(n) => n,
                Err(_) => return Err(bad(&format!("port {p:?} is not a number from 1 to 65535"))),
            },
        };
        Ok(BrokerUrl {
            tls,
            host: host.to_string(),
            port,
        })
    }
}

/// The client id used when the configuration sets none.
pub fn default_client_id(site: &SiteId) -> String {
    format!("caudal-agent-{site}")
}

/// Why a configured client id cannot be used, if it cannot: empty, or carrying a character that
/// MQTT brokers give a meaning in topics and session names (`/`, `+`, `#`, `$`), whitespace or a
/// control character. Such an id breaks brokers (an embedded rumqttd without its gate stops
/// listening when a second connection brings one), so it is refused before any connection.
pub fn client_id_problem(id: &str) -> Option<String> {
    if id.is_empty() {
        return Some("is empty".into());
    }
    if id.len() > 128 {
        return Some(format!("is {} bytes long; at most 128", id.len()));
    }
    id.chars()
        .find(|c| matches!(c, '/' | '+' | '#' | '$') || c.is_whitespace() || c.is_control())
        .map(|c| format!("contains {c:?}; use letters, digits, `-`, `_`, `.` or `:`"))
}

/// Builds the MQTT client options for `site`.
///
/// The session is clean (`clean_session = true`): acknowledgements are application messages and
/// every unacknowledged record is sent again from the outbox after a reconnect, so nothing is
/// gained by having the broker keep a session, and a persistent one would replay stale batches
/// and deliver commands that waited hours for an agent that was offline. The price is that an
/// ack published while the agent was away is lost and its records are sent once more; the cloud
/// stores them idempotently.
pub fn mqtt_options(cfg: &UplinkConfig, site: &SiteId) -> Result<MqttOptions, UplinkError> {
    let url = BrokerUrl::parse(&cfg.broker)?;
    let client_id = cfg
        .client_id
        .clone()
        .unwrap_or_else(|| default_client_id(site));
    if let Some(problem) = client_id_problem(&client_id) {
        return Err(UplinkError::Config(format!(
            "uplink.client_id `{client_id}` {problem}"
        )));
    }
    if cfg.keep_alive_s == 0 {
        return Err(UplinkError::Config(
            "uplink.keep_alive_s is 0; brokers drop clients without keep-alive, use 5 or more"
                .into(),
        ));
    }
    if cfg.max_inflight_batches == 0 {
        return Err(UplinkError::Config(
            "uplink.max_inflight_batches is 0; nothing could ever be sent".into(),
        ));
    }
    if cfg.batch_max_records == 0 {
        return Err(UplinkError::Config("uplink.batch_max_records is 0".into()));
    }
    if cfg.backlog_rate == 0 {
        return Err(UplinkError::Config(
            "uplink.backlog_rate is 0; the backlog would never drain".into(),
        ));
    }
    if cfg.ack_timeout_s == 0 || cfg.status_interval_s == 0 {
        return Err(UplinkError::Config(format!(
            "uplink.ack_timeout_s ({}) and uplink.status_interval_s ({}) must be at least 1",
            cfg.ack_timeout_s, cfg.status_interval_s
        )));
    }
    if cfg.reconnect_min_ms == 0 || cfg.reconnect_min_ms > cfg.reconnect_max_ms {
        return Err(UplinkError::Config(format!(
            "uplink.reconnect_min_ms ({}) must be at least 1 and at most reconnect_max_ms ({})",
            cfg.reconnect_min_ms, cfg.reconnect_max_ms
        )));
    }
    let mut o = MqttOptions::new(client_id, url.host.clone(), url.port);
    o.set_keep_alive(Duration::from_secs(cfg.keep_alive_s))
        .set_clean_session(true)
        .set_max_packet_size(MAX_INCOMING_BYTES, MAX_BATCH_BYTES + 1024)
        .set_request_channel_capacity(request_capacity(cfg))
        .set_inflight(u16::try_from(request_capacity(cfg)).unwrap_or(u16::MAX))
        .set_last_will(LastWill::new(
            topic::topic(site, TopicKind::Status),
            Status::offline(site.clone()).encode(),
            QoS::AtLeastOnce,
            true,
        ));
    match (&cfg.username, &cfg.password) {
        (Some(u), p) => {
            o.set_credentials(u.clone(), p.as_ref().map(|p| p.expose()).unwrap_or(""));
        }
        (None, Some(_)) => {
            return Err(UplinkError::Config(
                "uplink.password is set without uplink.username".into(),
            ));
        }
        (None, None) => {}
    }
    if url.tls {
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls_config(cfg)?),
        )));
    } else if let Some(key) = [
        ("ca_file", &cfg.ca_file),
        ("client_cert", &cfg.client_cert),
        ("client_key", &cfg.client_key),
    ]
    .iter()
    .find_map(|(k, v)| v.as_ref().map(|_| *k))
    {
        return Err(UplinkError::Config(format!(
            "uplink.{key} is set but the broker URL {} is plain MQTT; use mqtts://",
            cfg.broker
        )));
    }
    Ok(o)
}

/// The client's request queue: one slot per in-flight batch plus room for control messages.
pub fn request_capacity(cfg: &UplinkConfig) -> usize {
    cfg.max_inflight_batches + CONTROL_SLOTS
}

/// The rustls client configuration: the CA bundle (or the system's roots) and, for mutual TLS,
/// the client certificate and key.
pub fn tls_config(cfg: &UplinkConfig) -> Result<ClientConfig, UplinkError> {
    let mut roots = RootCertStore::empty();
    match &cfg.ca_file {
        Some(path) => {
            let pem = read("ca_file", path)?;
            let certs = certs("ca_file", path, &pem)?;
            let (added, _ignored) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(pem_error(
                    "ca_file",
                    path,
                    "no usable CA certificate in the file",
                ));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(UplinkError::Config(format!(
                    "uplink: mqtts without ca_file needs the system's CA certificates, and none \
                     could be loaded ({} errors); set uplink.ca_file",
                    found.errors.len()
                )));
            }
        }
    }
    // Name the provider rather than rely on the process default, which panics when more than
    // one rustls crypto backend is compiled in.
    let builder = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|source| UplinkError::Tls {
            what: "protocol versions".into(),
            source,
        })?
        .with_root_certificates(roots);
    match (&cfg.client_cert, &cfg.client_key) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert), Some(key)) => {
            let chain = certs("client_cert", cert, &read("client_cert", cert)?)?;
            let key_pem = read("client_key", key)?;
            let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|e| pem_error("client_key", key, &format!("no private key: {e}")))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| UplinkError::Tls {
                    what: format!(
                        "client_cert {} with client_key {}",
                        cert.display(),
                        key.display()
                    ),
                    source: e,
                })
        }
        (Some(_), None) => Err(UplinkError::Config(
            "uplink.client_cert is set without uplink.client_key".into(),
        )),
        (None, Some(_)) => Err(UplinkError::Config(
            "uplink.client_key is set without uplink.client_cert".into(),
        )),
    }
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, UplinkError> {
    std::fs::read(path).map_err(|source| UplinkError::File {
        key,
        path: path.to_path_buf(),
        source,
    })
}

fn certs(
    key: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, UplinkError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(key, path, &e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_error(key, path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

fn pem_error(key: &'static str, path: &Path, reason: &str) -> UplinkError {
    UplinkError::Pem {
        key,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tls")
            .join(name)
    }

    fn cfg(broker: &str) -> UplinkConfig {
        toml::from_str(&format!("broker = {broker:?}")).expect("minimal [uplink] parses")
    }

    fn site() -> SiteId {
        SiteId::new("pozo-1").expect("valid")
    }

    #[test]
    fn plain_options_carry_session_will_and_limits() {
        let mut c = cfg("mqtt://127.0.0.1:1884");
        c.username = Some("agent".into());
        c.password = Some(crate::config::Secret::new("pw"));
        let o = mqtt_options(&c, &site()).expect("valid");
        assert_eq!(o.broker_address(), ("127.0.0.1".to_string(), 1884));
        assert_eq!(o.client_id(), "caudal-agent-pozo-1");
        assert!(o.clean_session());
        assert_eq!(o.keep_alive(), Duration::from_secs(30));
        let will = o.last_will().expect("a last will");
        assert_eq!(will.topic, "caudal/v1/pozo-1/status");
        assert!(will.retain);
        assert_eq!(
            caudal_common::payload::decode::<Status>(&will.message).expect("status"),
            Status::offline(site())
        );
        let login = o.credentials().expect("credentials");
        assert_eq!(
            (login.username.as_str(), login.password.as_str()),
            ("agent", "pw")
        );
        assert_eq!(o.request_channel_capacity(), 8 + CONTROL_SLOTS);
    }

    #[test]
    fn tls_config_loads_the_ca_and_the_client_identity() {
        let mut c = cfg("mqtts://127.0.0.1:8883");
        c.ca_file = Some(fixture("ca.pem"));
        c.client_cert = Some(fixture("client.pem"));
        c.client_key = Some(fixture("client.key"));
        assert!(
            tls_config(&c)
                .expect("valid")
                .client_auth_cert_resolver
                .has_certs()
        );
        assert!(matches!(
            mqtt_options(&c, &site()).expect("valid").transport(),
            Transport::Tls(_)
        ));
        c.client_cert = None;
        c.client_key = None;
        assert!(
            !tls_config(&c)
                .expect("valid")
                .client_auth_cert_resolver
                .has_certs()
        );
    }

    #[test]
    fn tls_problems_name_the_key_and_the_file() {
        let err = |c: &UplinkConfig| tls_config(c).expect_err("invalid").to_string();
        let mut c = cfg("mqtts://b");
        c.ca_file = Some(fixture("missing.pem"));
        let e = err(&c);
        assert!(
            e.contains("uplink.ca_file") && e.contains("missing.pem"),
            "{e}"
        );

        c.ca_file = Some(fixture("server.key"));
        let e = err(&c);
        assert!(
            e.contains("uplink.ca_file") && e.contains("no PEM certificate"),
            "{e}"
        );

        c.ca_file = Some(fixture("ca.pem"));
        c.client_cert = Some(fixture("client.pem"));
        assert!(err(&c).contains("without uplink.client_key"));

        c.client_key = Some(fixture("ca.pem"));
        let e = err(&c);
        assert!(
            e.contains("uplink.client_key") && e.contains("no private key"),
            "{e}"
        );

        c.client_key = Some(fixture("server.key"));
        let e = err(&c);
        assert!(e.contains("client.pem") && e.contains("server.key"), "{e}");
    }

    #[test]
    fn tls_files_with_plain_mqtt_and_bad_limits_are_refused() {
        let mut c = cfg("mqtt://b");
        c.ca_file = Some(fixture("ca.pem"));
        let e = mqtt_options(&c, &site()).expect_err("plain").to_string();
        assert!(
            e.contains("uplink.ca_file") && e.contains("mqtts://"),
            "{e}"
        );

        for (field, edit) in [
            (
                "keep_alive_s",
                (|c: &mut UplinkConfig| c.keep_alive_s = 0) as fn(&mut UplinkConfig),
            ),
            ("max_inflight_batches", |c| c.max_inflight_batches = 0),
            ("backlog_rate", |c| c.backlog_rate = 0),
            ("reconnect_min_ms", |c| {
                c.reconnect_min_ms = c.reconnect_max_ms + 1
            }),
            ("status_interval_s", |c| c.status_interval_s = 0),
        ] {
            let mut c = cfg("mqtt://b");
            edit(&mut c);
            let e = mqtt_options(&c, &site()).expect_err(field).to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
    }

    #[test]
    fn client_ids_that_brokers_treat_specially_are_refused() {
        for bad in ["a/b", "site+1", "#", "$SYS", "two words", "", "tab\there"] {
            let mut c = cfg("mqtt://b");
            c.client_id = Some(bad.into());
            let e = mqtt_options(&c, &site()).expect_err(bad).to_string();
            assert!(e.contains("uplink.client_id"), "{bad:?}: {e}");
        }
        let mut c = cfg("mqtt://b");
        c.client_id = Some("caudal-agent-pozo-1.a_b:2".into());
        assert!(mqtt_options(&c, &site()).is_ok());
    }

    fn url(s: &str) -> Result<BrokerUrl, String> {
        BrokerUrl::parse(s).map_err(|e| e.to_string())
    }

    #[test]
    fn broker_urls() {
        assert_eq!(
            url("mqtt://broker.example:1884"),
            Ok(BrokerUrl {
                tls: false,
                host: "broker.example".into(),
                port: 1884
            })
        );
        assert_eq!(url("mqtts://b").map(|u| (u.tls, u.port)), Ok((true, 8883)));
        assert_eq!(url("mqtt://b/").map(|u| u.port), Ok(1883));
        assert_eq!(
            url("mqtts://[::1]:8884").map(|u| (u.host, u.port)),
            Ok(("::1".to_string(), 8884))
        );
        assert_eq!(
            url("mqtts://[::1]:8884").map(|u| u.to_string()),
            Ok("mqtts://[::1]:8884".to_string())
        );
    }

    #[test]
    fn broker_url_errors_say_what_is_wrong() {
        let cases = [
            ("broker:1883", "missing scheme"),
            ("http://b:80", "unknown scheme \"http\""),
            ("mqtt://:1883", "host is empty"),
            ("mqtt://b:99999", "port \"99999\""),
            ("mqtt://b:0", "port 0"),
            ("mqtt://u:p@b:1883", "credentials"),
            ("mqtt://b:1883/x", "no path"),
            ("mqtt://[::1:1883", "closing ']'"),
        ];
        for (input, want) in cases {
            let e = url(input).expect_err(input);
            assert!(e.contains(want), "{input}: {e:?} should mention {want:?}");
            assert!(e.contains(input), "{input}: {e:?} should name the URL");
        }
    }
}
