//! Logs of the code under test that runs in the test process (uplink, broker, receiver),
//! written through the test harness so they show only with a failing test or `--nocapture`.

/// Installs a subscriber once per test process: `RUST_LOG` when set, else `default_filter`.
/// Later calls (every test calls it) do nothing.
pub fn init(default_filter: &str) {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .try_init();
}
