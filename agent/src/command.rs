//! Commands from the cloud: who executes each kind, the one timeout, and the one result.
//!
//! ```text
//! cloud ──command──▶ [uplink] ── Executor::of ─┬─ Uplink: ping, publish_status, answered at once
//!                      ▲                       └─ Dispatched ── CommandRequest, mpsc ──▶ [commands]
//!                      │                                     poll_now ── PollNow ──▶ [bus poller]
//!                      └──── CommandResult (oneshot), within COMMAND_TIMEOUT ◀───────────┘
//! ```
//!
//! - **Who executes a command** is decided in one place, [`Executor::of`], the only match on
//!   [`CommandKind`]: the uplink for what it holds itself, or the [`Commands`] task, which hands
//!   the command to the component that executes it (the device's bus poller for `poll_now`).
//! - **One timeout.** A dispatched command is executed within [`COMMAND_TIMEOUT`], counted from
//!   when the commands task takes it, and including any wait for a busy bus. The uplink adds
//!   none of its own: the commands task answers every request it takes, and a request it drops
//!   unanswered (it stopped) is reported by the uplink as such.
//! - **One result.** Every [`CommandResult`] is built by [`result`], which sets its site and id
//!   from the command once; the uplink publishes it as it comes.
//! - **Bounds.** The uplink keeps at most [`MAX_COMMANDS_IN_PROGRESS`] commands waiting for a
//!   result and answers "busy" beyond; the commands task executes at most as many at once and
//!   leaves the rest in its queue ([`QUEUE`]) meanwhile.
//!
//! Adding a command kind (configuration push, an update, ...): its variant in
//! `caudal_common::CommandKind` (a protocol change: `docs/protocol.md`), its arm in
//! [`Executor::of`], and its execution: in the uplink for what the uplink holds, or a
//! [`Dispatched`] variant that [`Commands`] executes through a channel to the component that
//! does it (wired in `daemon.rs`). The compiler then points at every match to extend.

use crate::poller::{PollNow, PollNowError};
use caudal_common::{
    Command, CommandKind, CommandResult, DecodeError, DeviceId, SCHEMA_VERSION, SiteId,
};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

/// How long a dispatched command may take before its result is an error.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Commands waiting for their result, at most; the uplink answers more with "busy".
pub const MAX_COMMANDS_IN_PROGRESS: usize = 8;
/// The commands task's queue: the uplink never has more than this many waiting.
pub const QUEUE: usize = MAX_COMMANDS_IN_PROGRESS;

/// Who executes a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Executor<'a> {
    /// The uplink, from what it holds; answered at once.
    Uplink(UplinkCommand),
    /// A component behind the [`Commands`] task, within [`COMMAND_TIMEOUT`].
    Dispatched(Dispatched<'a>),
}

/// What the uplink executes itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UplinkCommand {
    /// Answer at once: the command path works end to end.
    Ping,
    /// Publish the retained status now, then answer.
    PublishStatus,
}

/// What the [`Commands`] task executes, and with whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dispatched<'a> {
    /// The device's bus poller reads it now; the output is the reading.
    PollNow { device: &'a DeviceId },
}

impl Executor<'_> {
    /// Who executes `kind`: the one place a command kind is routed.
    pub fn of(kind: &CommandKind) -> Executor<'_> {
        match kind {
            CommandKind::Ping => Executor::Uplink(UplinkCommand::Ping),
            CommandKind::PublishStatus => Executor::Uplink(UplinkCommand::PublishStatus),
            CommandKind::PollNow { device } => Executor::Dispatched(Dispatched::PollNow { device }),
        }
    }
}

/// A command the uplink does not execute itself, handed to the [`Commands`] task. `reply` gets
/// its result, built by [`result`], within [`COMMAND_TIMEOUT`].
#[derive(Debug)]
pub struct CommandRequest {
    pub command: Command,
    pub reply: oneshot::Sender<CommandResult>,
}

/// Why a command failed; the text goes into the result's `error`, after the command's id.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The payload is not a command this agent knows.
    #[error("not understood: {0}")]
    NotUnderstood(DecodeError),
    #[error("{MAX_COMMANDS_IN_PROGRESS} commands already in progress; try again later")]
    Busy,
    #[error("agent busy, command queue full")]
    QueueFull,
    /// The commands task is not running.
    #[error("no component handles it")]
    NoExecutor,
    /// The commands task stopped before answering.
    #[error("dropped without an answer")]
    Dropped,
    #[error("no answer within {} s", COMMAND_TIMEOUT.as_secs())]
    Timeout,
    /// Handed to the commands task although the uplink executes it (a routing mistake).
    #[error("{0:?} is not handled here")]
    NotHere(UplinkCommand),
    #[error("no device {0} on this site")]
    NoDevice(DeviceId),
    #[error("the bus of device {0} is not running")]
    BusStopped(DeviceId),
    #[error("the bus poller dropped the request")]
    PollerDropped,
    #[error(transparent)]
    Poll(#[from] PollNowError),
}

/// The result of command `id` on `site`: the output, or the error naming the command. Every
/// result the agent publishes is built here.
pub fn result(
    site: &SiteId,
    id: &str,
    outcome: Result<serde_json::Value, CommandError>,
) -> CommandResult {
    let (ok, output, error) = match outcome {
        Ok(output) => (true, output, None),
        Err(e) => (
            false,
            serde_json::Value::Null,
            Some(format!("command {id}: {e}")),
        ),
    };
    CommandResult {
        v: SCHEMA_VERSION,
        site: site.clone(),
        id: id.to_string(),
        ok,
        output,
        error,
    }
}

/// The components that execute dispatched commands.
#[derive(Debug, Default)]
struct Executors {
    /// The request channel of each device's bus poller.
    pollers: BTreeMap<DeviceId, mpsc::Sender<PollNow>>,
}

impl Executors {
    async fn execute(&self, kind: &CommandKind) -> Result<serde_json::Value, CommandError> {
        match Executor::of(kind) {
            Executor::Dispatched(Dispatched::PollNow { device }) => self.poll_now(device).await,
            Executor::Uplink(c) => Err(CommandError::NotHere(c)),
        }
    }

    async fn poll_now(&self, device: &DeviceId) -> Result<serde_json::Value, CommandError> {
        let bus = self
            .pollers
            .get(device)
            .ok_or_else(|| CommandError::NoDevice(device.clone()))?;
        let (reply, answer) = oneshot::channel();
        bus.send(PollNow {
            device: device.clone(),
            reply,
        })
        .await
        .map_err(|_| CommandError::BusStopped(device.clone()))?;
        Ok(answer.await.map_err(|_| CommandError::PollerDropped)??)
    }
}

/// The commands task: executes what the uplink dispatches, each command within
/// [`COMMAND_TIMEOUT`], several at once (commands for different buses do not wait for each
/// other; those for one bus are served in turn by its poller).
#[derive(Debug)]
pub struct Commands {
    site: SiteId,
    requests: mpsc::Receiver<CommandRequest>,
    executors: Executors,
}

impl Commands {
    /// `requests` comes from the uplink; `pollers` is the request channel of each device's bus
    /// poller.
    pub fn new(
        site: SiteId,
        requests: mpsc::Receiver<CommandRequest>,
        pollers: BTreeMap<DeviceId, mpsc::Sender<PollNow>>,
    ) -> Commands {
        Commands {
            site,
            requests,
            executors: Executors { pollers },
        }
    }

    /// Executes commands until `shutdown` resolves or the uplink is gone. Commands still running
    /// then are dropped: nobody would publish their results.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let executors = Arc::new(self.executors);
        let mut running = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                req = self.requests.recv(), if running.len() < MAX_COMMANDS_IN_PROGRESS => {
                    let Some(CommandRequest { command, reply }) = req else { return };
                    let (site, executors) = (self.site.clone(), executors.clone());
                    running.spawn(async move {
                        let outcome = tokio::time::timeout(
                            COMMAND_TIMEOUT,
                            executors.execute(&command.kind),
                        )
                        .await
                        .unwrap_or(Err(CommandError::Timeout));
                        // A closed reply means the uplink stopped: nothing left to publish to.
                        let _ = reply.send(result(&site, &command.id, outcome));
                    });
                }
                Some(_) = running.join_next(), if !running.is_empty() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site() -> SiteId {
        SiteId::new("pozo-test").expect("valid site id")
    }

    fn fm(n: u8) -> DeviceId {
        DeviceId::new(format!("fm{n}")).expect("valid device id")
    }

    /// Starts a commands task with one bus holding `fm1`; returns its queue and the bus's
    /// request channel.
    fn start() -> (mpsc::Sender<CommandRequest>, mpsc::Receiver<PollNow>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let (bus_tx, bus_rx) = mpsc::channel(4);
        let commands = Commands::new(site(), rx, BTreeMap::from([(fm(1), bus_tx)]));
        tokio::spawn(commands.run(std::future::pending()));
        (tx, bus_rx)
    }

    async fn ask(tx: &mpsc::Sender<CommandRequest>, id: &str, kind: CommandKind) -> CommandResult {
        let (reply, answer) = oneshot::channel();
        let command = Command {
            v: SCHEMA_VERSION,
            id: id.into(),
            kind,
        };
        tx.send(CommandRequest { command, reply })
            .await
            .expect("commands task running");
        answer.await.expect("every request is answered")
    }

    #[test]
    fn every_kind_has_one_executor() {
        assert_eq!(
            Executor::of(&CommandKind::Ping),
            Executor::Uplink(UplinkCommand::Ping)
        );
        assert_eq!(
            Executor::of(&CommandKind::PublishStatus),
            Executor::Uplink(UplinkCommand::PublishStatus)
        );
        let device = fm(1);
        assert_eq!(
            Executor::of(&CommandKind::PollNow {
                device: device.clone()
            }),
            Executor::Dispatched(Dispatched::PollNow { device: &device })
        );
    }

    #[tokio::test]
    async fn poll_now_returns_what_the_bus_poller_read() {
        let (tx, mut bus) = start();
        tokio::spawn(async move {
            while let Some(req) = bus.recv().await {
                let _ = req.reply.send(Ok(serde_json::json!({"flow_lps": 12.5})));
            }
        });
        let r = ask(&tx, "cmd-1", CommandKind::PollNow { device: fm(1) }).await;
        assert_eq!((r.id.as_str(), r.ok, &r.site), ("cmd-1", true, &site()));
        assert_eq!(r.output["flow_lps"], 12.5);
    }

    #[tokio::test]
    async fn a_device_not_on_this_site_is_named_in_the_error() {
        let (tx, _bus) = start();
        let r = ask(&tx, "cmd-2", CommandKind::PollNow { device: fm(9) }).await;
        assert!(!r.ok);
        assert_eq!(
            r.error.as_deref(),
            Some("command cmd-2: no device fm9 on this site")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_poller_that_never_answers_times_out_once() {
        let (tx, mut bus) = start();
        // Takes the request and sits on it.
        let held = tokio::spawn(async move { bus.recv().await });
        let started = tokio::time::Instant::now();
        let r = ask(&tx, "cmd-3", CommandKind::PollNow { device: fm(1) }).await;
        let waited = started.elapsed();
        assert!(
            waited >= COMMAND_TIMEOUT && waited < COMMAND_TIMEOUT + Duration::from_secs(1),
            "{waited:?}"
        );
        assert_eq!(
            (r.id.as_str(), r.ok, r.error.as_deref()),
            ("cmd-3", false, Some("command cmd-3: no answer within 30 s"))
        );
        drop(held);
    }

    #[tokio::test]
    async fn a_stopped_bus_and_a_misrouted_command_are_errors() {
        let (tx, bus) = start();
        drop(bus);
        let r = ask(&tx, "cmd-4", CommandKind::PollNow { device: fm(1) }).await;
        assert_eq!(
            r.error.as_deref(),
            Some("command cmd-4: the bus of device fm1 is not running")
        );
        let r = ask(&tx, "cmd-5", CommandKind::Ping).await;
        assert!(!r.ok && r.error.is_some_and(|e| e.contains("Ping")));
    }
}
