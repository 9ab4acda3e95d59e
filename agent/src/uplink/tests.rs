//! The uplink's driver against the in-memory spool: what it does when the outbox fails a read,
//! cannot apply an acknowledgement or stops, and how it answers commands nobody executes. No
//! broker (the MQTT client's requests queue up unsent) and no SQLite; time is paused.

use super::*;
use crate::outbox::memory::{MemorySpool, Op};

/// A driver that is not connected anywhere, and the ends of its channels.
struct Rig {
    d: Driver<MemorySpool>,
    spool: MemorySpool,
    metrics: Arc<Metrics>,
    commands: mpsc::Receiver<CommandRequest>,
    /// Holds the MQTT client's request queue open; never polled.
    _eventloop: EventLoop,
    _events: mpsc::Sender<Result<Event, ConnectionError>>,
    _resume: mpsc::Receiver<()>,
    _devices: watch::Sender<BTreeMap<String, DeviceState>>,
    _clock: watch::Sender<bool>,
}

fn site() -> SiteId {
    SiteId::new("pozo-test").expect("valid site id")
}

fn rig() -> Rig {
    let cfg: UplinkConfig = toml::from_str(
        r#"
        broker = "mqtt://127.0.0.1:1"
        batch_max_records = 100
        backlog_rate = 100000
        max_inflight_batches = 4
        "#,
    )
    .expect("valid [uplink]");
    let spool = MemorySpool::new();
    let metrics = Metrics::new();
    let (devices_tx, devices_rx) = watch::channel(BTreeMap::new());
    let (clock_tx, clock_rx) = watch::channel(true);
    let (cmd_tx, cmd_rx) = mpsc::channel(command::QUEUE);
    let up = Uplink::new(
        cfg,
        site(),
        spool.clone(),
        devices_rx,
        clock_rx,
        cmd_tx,
        metrics.clone(),
        ("0.1.0-test".into(), "cfg-7".into()),
    )
    .expect("valid uplink config");
    let (client, eventloop) =
        AsyncClient::new(up.options.clone(), options::request_capacity(&up.cfg));
    let (event_tx, events) = mpsc::channel(EVENT_QUEUE);
    let (resume, resume_rx) = mpsc::channel(1);
    Rig {
        d: Driver::new(up, client, events, resume),
        spool,
        metrics,
        commands: cmd_rx,
        _eventloop: eventloop,
        _events: event_tx,
        _resume: resume_rx,
        _devices: devices_tx,
        _clock: clock_tx,
    }
}

impl Rig {
    fn flow(&self) -> Flow {
        Flow::new(
            self.d.flow_config(),
            self.d.spool_rx.borrow().committed,
            Instant::now(),
        )
    }

    /// The id the driver gave its `n`th batch.
    fn batch(&self, n: u64) -> String {
        format!("{}-{n}", self.d.ids.prefix)
    }

    /// The cloud's `accepted` ack of `batch` for seqs `from..=to`.
    fn accepted(&self, batch: &str, from: u64, to: u64) -> Vec<u8> {
        Ack {
            v: SCHEMA_VERSION,
            site: site(),
            batch: batch.into(),
            status: AckStatus::Accepted,
            seqs: vec![SeqRange {
                from: Seq(from),
                to: Seq(to),
            }],
            reason: None,
        }
        .encode()
    }

    /// The command results waiting to be published (the driver is offline, so all of them).
    fn results(&self) -> Vec<CommandResult> {
        let t = topic::topic(&site(), TopicKind::CommandResult);
        self.d
            .deferred
            .iter()
            .filter(|c| c.topic == t)
            .map(|c| decode(&c.payload).expect("a command result"))
            .collect()
    }

    fn remaining(&self) -> Vec<u64> {
        self.spool.remaining().iter().map(|s| s.0).collect()
    }
}

#[tokio::test(start_paused = true)]
async fn an_acknowledgement_the_outbox_cannot_apply_sends_the_batch_again() {
    let mut r = rig();
    r.spool.commit(3);
    let mut flow = r.flow();
    r.d.pump(&mut flow).await.expect("pumped");
    assert_eq!(r.metrics.sent.get(), 3);

    r.spool.fail_next(Op::Ack, OutboxError::Full);
    let ack = r.accepted(&r.batch(1), 1, 3);
    r.d.on_ack(&ack, &mut flow)
        .await
        .expect("a failed delete is not fatal");
    assert_eq!(r.remaining(), [1, 2, 3], "nothing deleted");
    assert_eq!(r.metrics.acked.get(), 0);

    tokio::time::advance(Duration::from_millis(10)).await;
    r.d.pump(&mut flow).await.expect("pumped");
    assert_eq!(r.metrics.sent.get(), 6, "the same records went out again");
    let ack = r.accepted(&r.batch(2), 1, 3);
    r.d.on_ack(&ack, &mut flow).await.expect("acked");
    assert_eq!(r.remaining(), [0u64; 0]);
    assert_eq!((r.metrics.acked.get(), r.spool.acked()), (3, 3));
}

#[tokio::test(start_paused = true)]
async fn a_failed_outbox_read_is_retried_after_a_pause() {
    let mut r = rig();
    r.spool.commit(2);
    let mut flow = r.flow();
    r.spool.fail_next(Op::Pending, OutboxError::Full);
    r.d.pump(&mut flow)
        .await
        .expect("a failed read is not fatal");
    r.d.pump(&mut flow).await.expect("pumped");
    assert_eq!(r.metrics.sent.get(), 0, "no retry before the pause");
    tokio::time::advance(OUTBOX_RETRY).await;
    r.d.pump(&mut flow).await.expect("pumped");
    assert_eq!(r.metrics.sent.get(), 2);
}

#[tokio::test(start_paused = true)]
async fn the_outbox_stopping_stops_the_uplink() {
    let mut r = rig();
    r.spool.commit(2);
    let mut flow = r.flow();
    r.d.pump(&mut flow).await.expect("pumped");
    r.spool.stop();
    let ack = r.accepted(&r.batch(1), 1, 2);
    assert!(matches!(
        r.d.on_ack(&ack, &mut flow).await,
        Err(UplinkError::OutboxStopped)
    ));
    // Once the backlog's tokens are back, the next read finds the outbox gone.
    tokio::time::advance(Duration::from_millis(10)).await;
    assert!(matches!(
        r.d.pump(&mut flow).await,
        Err(UplinkError::OutboxStopped)
    ));
    assert!(matches!(
        r.d.publish_status().await,
        Err(UplinkError::OutboxStopped)
    ));
}

#[tokio::test(start_paused = true)]
async fn a_command_nobody_answers_gets_a_result_naming_why() {
    let mut r = rig();
    let poll_now = |id: &str| {
        Command {
            v: SCHEMA_VERSION,
            id: id.into(),
            kind: caudal_common::CommandKind::PollNow {
                device: caudal_common::DeviceId::new("fm1").expect("valid device id"),
            },
        }
        .encode()
    };

    // Taken by the commands task, which stops before answering.
    r.d.on_command(&poll_now("cmd-1")).await.expect("handled");
    let req = r.commands.recv().await.expect("dispatched");
    assert_eq!(req.command.id, "cmd-1");
    drop(req);
    let finished = r.d.in_progress.join_next().await.expect("waiting for it");
    r.d.command_finished(finished);

    // No commands task at all.
    r.commands.close();
    r.d.on_command(&poll_now("cmd-2")).await.expect("handled");

    let results: Vec<(String, bool, Option<String>)> = r
        .results()
        .into_iter()
        .map(|c| (c.id, c.ok, c.error))
        .collect();
    assert_eq!(
        results,
        [
            (
                "cmd-1".to_string(),
                false,
                Some("command cmd-1: dropped without an answer".to_string())
            ),
            (
                "cmd-2".to_string(),
                false,
                Some("command cmd-2: no component handles it".to_string())
            ),
        ]
    );
}

#[test]
fn rejections_in_a_row_double_the_hold_up_to_its_cap() {
    use super::{REJECT_HOLD, REJECT_HOLD_MAX, reject_hold};
    assert_eq!(reject_hold(1), REJECT_HOLD);
    assert_eq!(reject_hold(2), REJECT_HOLD * 2);
    assert_eq!(reject_hold(3), REJECT_HOLD * 4);
    assert_eq!(reject_hold(7), REJECT_HOLD_MAX);
    assert_eq!(reject_hold(u32::MAX), REJECT_HOLD_MAX);
    assert_eq!(reject_hold(0), REJECT_HOLD);
}
