//! The client's side of the broker connection: options from `mqtt.url` and the `mqtt` keys,
//! and TLS with a named crypto provider and an optional client certificate.

use super::IngestError;
use crate::core::config::MqttConfig;
use rumqttc::Transport;
use rumqttc::tokio_rustls::rustls::crypto::aws_lc_rs;
use rumqttc::tokio_rustls::rustls::pki_types::pem::PemObject;
use rumqttc::tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rumqttc::tokio_rustls::rustls::{ClientConfig, RootCertStore};
use rumqttc::v5::MqttOptions;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Largest MQTT packet the ingest accepts; a v5 broker discards larger messages for this client
/// instead of sending them.
const MAX_INCOMING_PACKET: u32 = 16 << 20;

/// Client options for the broker at `url` (`mqtt://host:port`, `mqtts://host:port`).
pub fn mqtt_options(url: &str, cfg: &MqttConfig) -> Result<MqttOptions, IngestError> {
    let (tls, rest) = match url.strip_prefix("mqtts://") {
        Some(rest) => (true, rest),
        None => (
            false,
            url.strip_prefix("mqtt://")
                .ok_or_else(|| IngestError::Url(url.to_string()))?,
        ),
    };
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
            h,
            p.parse::<u16>()
                .map_err(|_| IngestError::Url(url.to_string()))?,
        ),
        _ => (rest, if tls { 8883 } else { 1883 }),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(IngestError::Url(url.to_string()));
    }
    let id = cfg
        .client_id
        .clone()
        .unwrap_or_else(|| format!("caudal-cloud-{:08x}", fastrand::u32(..)));
    let mut o = MqttOptions::new(id, host, port);
    o.set_keep_alive(Duration::from_secs(u64::from(cfg.keep_alive_s.max(5))))
        .set_clean_start(true)
        .set_max_packet_size(Some(MAX_INCOMING_PACKET));
    if let Some(user) = &cfg.username {
        let pass = cfg
            .password
            .as_ref()
            .map(|p| p.expose())
            .unwrap_or_default();
        o.set_credentials(user.clone(), pass.to_string());
    }
    if tls {
        let config = tls_config(cfg)?;
        o.set_transport(Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(Arc::new(config)),
        ));
    }
    Ok(o)
}

/// The TLS client configuration for an `mqtts://` broker: `mqtt.ca_file` as the only trusted
/// roots and, for mutual TLS, `mqtt.client_cert` with `mqtt.client_key`. The crypto provider is
/// named here: left to the process default, rustls panics when, as in this binary, more than
/// one is compiled in.
fn tls_config(cfg: &MqttConfig) -> Result<ClientConfig, IngestError> {
    let read = |key: &'static str, path: &Option<PathBuf>| -> Result<_, IngestError> {
        let path = path
            .clone()
            .ok_or_else(|| IngestError::Tls(format!("{key} is not set")))?;
        let bytes = std::fs::read(&path).map_err(|source| IngestError::File {
            key,
            path: path.clone(),
            source,
        })?;
        Ok((bytes, path))
    };
    let pem_certs = |key: &'static str, (pem, path): &(Vec<u8>, PathBuf)| {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .map_err(|e| IngestError::Pem {
                key,
                path: path.clone(),
                reason: e.to_string(),
            })?;
        match certs.is_empty() {
            true => Err(IngestError::Pem {
                key,
                path: path.clone(),
                reason: "no PEM certificate in the file".into(),
            }),
            false => Ok(certs),
        }
    };
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(pem_certs(
        "mqtt.ca_file",
        &read("mqtt.ca_file", &cfg.ca_file)?,
    )?);
    if added == 0 {
        return Err(IngestError::Tls(
            "mqtt.ca_file holds no usable CA certificate".into(),
        ));
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| IngestError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    if cfg.client_cert.is_none() && cfg.client_key.is_none() {
        return Ok(builder.with_no_client_auth());
    }
    let chain = pem_certs(
        "mqtt.client_cert",
        &read("mqtt.client_cert", &cfg.client_cert)?,
    )?;
    let (key_pem, key_path) = read("mqtt.client_key", &cfg.client_key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| IngestError::Pem {
        key: "mqtt.client_key",
        path: key_path,
        reason: format!("no private key: {e}"),
    })?;
    builder
        .with_client_auth_cert(chain, key)
        .map_err(|e| IngestError::Tls(format!("mqtt.client_cert with mqtt.client_key: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let cfg = MqttConfig::default();
        let o = mqtt_options("mqtt://broker.example:1999", &cfg).expect("valid");
        assert_eq!(o.broker_address(), ("broker.example".to_string(), 1999));
        let o = mqtt_options("mqtt://10.0.0.1", &cfg).expect("valid");
        assert_eq!(o.broker_address().1, 1883);
        let o = mqtt_options("mqtt://[::1]:1884", &cfg).expect("valid");
        assert_eq!(o.broker_address(), ("::1".to_string(), 1884));
        assert!(mqtt_options("tcp://x:1", &cfg).is_err());
        assert!(mqtt_options("mqtt://x:notaport", &cfg).is_err());
        assert!(mqtt_options("mqtt://", &cfg).is_err());
    }
}
