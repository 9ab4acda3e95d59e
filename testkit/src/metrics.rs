//! A process's Prometheus `/metrics`, read over HTTP: wait for a line, read one sample.

use crate::http;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// How long [`wait_metric`] waits for its line.
const WAIT: Duration = Duration::from_secs(20);

/// Waits until `/metrics` of `addr` has a line starting with `line`; panics after 20 s.
pub async fn wait_metric(addr: SocketAddr, line: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, body) = http::get(addr, "/metrics").await;
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

/// The value of the metric line of `addr` starting with `prefix ` (0 when absent).
pub async fn metric(addr: SocketAddr, prefix: &str) -> f64 {
    sample(&http::get(addr, "/metrics").await.1, prefix)
}

/// The value of the line of `metrics` (Prometheus text) starting with `prefix ` (0 when
/// absent): a sample named exactly so, without labels, or with the labels in `prefix`.
pub fn sample(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}
