//! The service manager's view of a cloud process: `READY=1` once the configured services have
//! started, `WATCHDOG=1` while the runtime keeps scheduling tasks, `STOPPING=1` at shutdown.
//!
//! The watchdog here proves the runtime is not wedged (every worker blocked, a deadlock around
//! the runtime); it does not judge each module's progress: the ingest's health is in its
//! metrics and `/healthz`. Without `NOTIFY_SOCKET` every call is a no-op; without
//! `WATCHDOG_USEC` no watchdog task runs.

use std::time::Duration;

/// Pets the watchdog until dropped.
#[derive(Debug)]
pub struct Notifier {
    watchdog: Option<tokio::task::JoinHandle<()>>,
}

/// Sends `READY=1` and, when the service manager asked for a watchdog, starts petting it every
/// quarter period from a task of this runtime.
pub fn started() -> Notifier {
    notify(sd_notify::NotifyState::Ready);
    let watchdog = sd_notify::watchdog_enabled()
        .filter(|d| !d.is_zero())
        .map(|period| {
            let every = (period / 4).max(Duration::from_millis(100));
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    notify(sd_notify::NotifyState::Watchdog);
                }
            })
        });
    Notifier { watchdog }
}

impl Notifier {
    /// Sends `STOPPING=1` (the drain that follows is not a hang) and stops petting.
    pub fn stopping(self) {
        notify(sd_notify::NotifyState::Stopping);
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        if let Some(task) = self.watchdog.take() {
            task.abort();
        }
    }
}

fn notify(state: sd_notify::NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}
