//! The outbox's worker thread and the async handle the rest of the agent holds: one thread
//! owns the [`Outbox`] and turns concurrent appends into group commits.

use super::store::Group;
use super::{
    DeviceStatusRow, Outbox, OutboxError, Pending, Restamped, Spool, SpoolState, Stamped, Stats,
};
use caudal_common::{Seq, SeqRange};
use std::time::Instant;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, warn};

/// Commands waiting for the worker, at most. A full queue makes callers wait (back-pressure on
/// the pollers and the uplink); nothing is dropped.
const QUEUE: usize = 256;

type Reply<T> = oneshot::Sender<Result<T, OutboxError>>;

enum Command {
    Append {
        records: Vec<Stamped>,
        devices: Vec<DeviceStatusRow>,
        reply: Reply<Vec<Seq>>,
    },
    Pending {
        after: Seq,
        upto: Option<Seq>,
        limit: usize,
        reply: Reply<Vec<Pending>>,
    },
    Ack {
        ranges: Vec<SeqRange>,
        reply: Reply<u64>,
    },
    Stats {
        reply: Reply<Stats>,
    },
    Restamp {
        boot_id: String,
        wall_minus_boottime_ms: i64,
        reply: Reply<Restamped>,
    },
    DeviceStatus {
        reply: Reply<Vec<DeviceStatusRow>>,
    },
    Shutdown {
        reply: Reply<()>,
    },
}

/// The outbox as the agent's tasks use it: cheap to clone, every call answered by the worker
/// thread that owns the database.
///
/// **Group commit.** Appends that arrive while a commit is running are committed together in
/// the next transaction, one fsync for all of them. Commits are also paced: an append that
/// arrives less than `commit_interval_ms` after the previous commit waits for the rest of that
/// interval, gathering whatever else arrives (a burst of polls becomes one commit; an isolated
/// append commits at once). `append` returns after its commit, so a reading is durable when it
/// returns; its latency is at most `commit_interval_ms` plus one commit. Set
/// `commit_interval_ms = 0` to commit as soon as the previous commit ends.
#[derive(Debug, Clone)]
pub struct OutboxHandle {
    tx: mpsc::Sender<Command>,
    state: watch::Receiver<SpoolState>,
}

impl OutboxHandle {
    /// Starts the worker thread that owns `outbox`. It runs until [`OutboxHandle::shutdown`]
    /// or until every handle is dropped, and closes the database when it stops.
    pub fn spawn(outbox: Outbox) -> Result<OutboxHandle, OutboxError> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let state = outbox.watch();
        std::thread::Builder::new()
            .name("caudal-outbox".into())
            .spawn(move || run(outbox, rx))
            .map_err(OutboxError::Spawn)?;
        Ok(OutboxHandle { tx, state })
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, OutboxError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| OutboxError::Stopped)?;
        answer.await.map_err(|_| OutboxError::Stopped)?
    }

    /// Commits `records` and upserts `devices`; returns the seqs, in order, once they are
    /// durable. See [`Outbox::append`].
    pub async fn append(
        &self,
        records: Vec<Stamped>,
        devices: Vec<DeviceStatusRow>,
    ) -> Result<Vec<Seq>, OutboxError> {
        self.call(|reply| Command::Append {
            records,
            devices,
            reply,
        })
        .await
    }

    /// Sendable records with `after < seq <= upto`, ascending, at most `limit`.
    pub async fn pending(
        &self,
        after: Seq,
        upto: Option<Seq>,
        limit: usize,
    ) -> Result<Vec<Pending>, OutboxError> {
        self.call(|reply| Command::Pending {
            after,
            upto,
            limit,
            reply,
        })
        .await
    }

    /// Deletes the acknowledged seqs; returns how many existed.
    pub async fn ack(&self, ranges: Vec<SeqRange>) -> Result<u64, OutboxError> {
        self.call(|reply| Command::Ack { ranges, reply }).await
    }

    pub async fn stats(&self) -> Result<Stats, OutboxError> {
        self.call(|reply| Command::Stats { reply }).await
    }

    /// Releases the held records once the clock is trusted. See [`Outbox::restamp`].
    pub async fn restamp(
        &self,
        boot_id: &str,
        wall_minus_boottime_ms: i64,
    ) -> Result<Restamped, OutboxError> {
        let boot_id = boot_id.to_string();
        self.call(|reply| Command::Restamp {
            boot_id,
            wall_minus_boottime_ms,
            reply,
        })
        .await
    }

    /// Every device's last poll.
    pub async fn device_status(&self) -> Result<Vec<DeviceStatusRow>, OutboxError> {
        self.call(|reply| Command::DeviceStatus { reply }).await
    }

    /// The highest committed seq and the rescan generation.
    pub fn watch(&self) -> watch::Receiver<SpoolState> {
        self.state.clone()
    }

    /// Commits what is queued, closes the database and stops the worker. Later calls on any
    /// clone fail with [`OutboxError::Stopped`].
    pub async fn shutdown(&self) -> Result<(), OutboxError> {
        self.call(|reply| Command::Shutdown { reply }).await
    }
}

impl Spool for OutboxHandle {
    async fn pending(
        &self,
        after: Seq,
        upto: Option<Seq>,
        limit: usize,
    ) -> Result<Vec<Pending>, OutboxError> {
        OutboxHandle::pending(self, after, upto, limit).await
    }

    async fn ack(&self, ranges: Vec<SeqRange>) -> Result<u64, OutboxError> {
        OutboxHandle::ack(self, ranges).await
    }

    async fn stats(&self) -> Result<Stats, OutboxError> {
        OutboxHandle::stats(self).await
    }

    fn watch(&self) -> watch::Receiver<SpoolState> {
        OutboxHandle::watch(self)
    }
}

/// The worker: waits for a command, gathers everything queued behind it, commits the appends
/// as one group, then serves the rest in arrival order.
fn run(mut outbox: Outbox, mut rx: mpsc::Receiver<Command>) {
    let pace = outbox.commit_interval();
    let mut last_commit: Option<Instant> = None;
    while let Some(first) = rx.blocking_recv() {
        if matches!(first, Command::Append { .. })
            && let Some(at) = last_commit
            && let Some(rest) = pace.checked_sub(at.elapsed())
        {
            std::thread::sleep(rest);
        }
        let mut queued = vec![first];
        while queued.len() < QUEUE {
            match rx.try_recv() {
                Ok(c) => queued.push(c),
                Err(_) => break,
            }
        }
        let mut groups: Vec<Group> = Vec::new();
        let mut replies: Vec<Reply<Vec<Seq>>> = Vec::new();
        let mut others = Vec::new();
        for c in queued {
            match c {
                Command::Append {
                    records,
                    devices,
                    reply,
                } => {
                    groups.push((records, devices));
                    replies.push(reply);
                }
                c => others.push(c),
            }
        }
        if !groups.is_empty() {
            commit(&mut outbox, &groups, replies);
            last_commit = Some(Instant::now());
        }
        for c in others {
            if let Some(reply) = serve(&mut outbox, c) {
                let _ = reply.send(outbox.close());
                return;
            }
        }
    }
    if let Err(e) = outbox.close() {
        warn!(error = %e, "outbox close failed");
    }
}

/// Commits the groups in one transaction. If that fails, each group is retried alone so one
/// append that cannot be stored (larger than the budget, say) does not fail the others.
fn commit(outbox: &mut Outbox, groups: &[Group], replies: Vec<Reply<Vec<Seq>>>) {
    debug!(
        appends = groups.len(),
        records = groups.iter().map(|g| g.0.len()).sum::<usize>(),
        "group commit"
    );
    match outbox.append_groups(groups) {
        Ok(seqs) => {
            for (reply, seqs) in replies.into_iter().zip(seqs) {
                let _ = reply.send(Ok(seqs));
            }
        }
        Err(e) if groups.len() == 1 => {
            if let Some(reply) = replies.into_iter().next() {
                let _ = reply.send(Err(e));
            }
        }
        Err(e) => {
            warn!(error = %e, appends = groups.len(), "group commit failed; committing each append alone");
            for (group, reply) in groups.iter().zip(replies) {
                let r = outbox
                    .append_groups(std::slice::from_ref(group))
                    .map(|mut v| v.pop().unwrap_or_default());
                let _ = reply.send(r);
            }
        }
    }
}

/// Serves one command other than an append; returns the reply of a shutdown.
fn serve(outbox: &mut Outbox, c: Command) -> Option<Reply<()>> {
    match c {
        Command::Append { .. } => {}
        Command::Pending {
            after,
            upto,
            limit,
            reply,
        } => {
            let _ = reply.send(outbox.pending(after, upto, limit));
        }
        Command::Ack { ranges, reply } => {
            let _ = reply.send(outbox.ack(&ranges));
        }
        Command::Stats { reply } => {
            let _ = reply.send(outbox.stats());
        }
        Command::Restamp {
            boot_id,
            wall_minus_boottime_ms,
            reply,
        } => {
            let _ = reply.send(outbox.restamp(&boot_id, wall_minus_boottime_ms));
        }
        Command::DeviceStatus { reply } => {
            let _ = reply.send(outbox.device_status());
        }
        Command::Shutdown { reply } => return Some(reply),
    }
    None
}
