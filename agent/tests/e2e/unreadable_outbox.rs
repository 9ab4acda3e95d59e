//! An outbox file that is not a database (an SD card that returned garbage, a file written over)
//! found at start: the real `caudal-agent` moves it aside, starts a new outbox in a new epoch,
//! tells the cloud with an `outbox_lost` gap record that an unknown range was lost, and polls
//! and delivers as before. The moved file is kept as it was, for a person to look at.

use crate::support as e2e_support;

use caudal_common::GapCause;
use e2e_support::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_outbox_is_set_aside_and_the_loss_is_reported() {
    let mut rig = Rig::start(three_meters()).await;
    let garbage = b"this is not an SQLite database, whatever its name says".repeat(100);
    if let Some(dir) = rig.outbox_path().parent() {
        std::fs::create_dir_all(dir).expect("state directory");
    }
    std::fs::write(rig.outbox_path(), &garbage).expect("garbage written");
    let modified = std::fs::metadata(rig.outbox_path())
        .and_then(|m| m.modified())
        .map(chrono::DateTime::<chrono::Utc>::from)
        .expect("mtime");

    rig.spawn_agent();
    rig.wait_readings(3, Duration::from_secs(30)).await;
    let drained = rig.wait_drained(Duration::from_secs(30)).await;

    let gaps = rig.receiver.gaps(SITE).expect("gaps");
    let lost: Vec<_> = gaps
        .iter()
        .filter(|g| g.cause == GapCause::OutboxLost)
        .collect();
    assert_eq!(lost.len(), 1, "one outbox_lost gap: {gaps:?}");
    let gap = lost[0];
    assert_eq!((gap.count, gap.seqs, gap.device.clone()), (0, None, None));
    assert!(
        (gap.from - modified).num_milliseconds().abs() < 1000 && gap.from <= gap.to,
        "from the file's last write to the start: {gap:?}"
    );
    let aside: Vec<_> = std::fs::read_dir(rig.outbox_path().parent().expect("a directory"))
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".unreadable-"))
        .collect();
    assert_eq!(aside.len(), 1, "the file is kept aside");
    assert_eq!(
        std::fs::read(aside[0].path()).expect("read"),
        garbage,
        "as it was"
    );
    assert!(
        rig.agent_stderr().contains("outbox file unreadable"),
        "the log says why: {}",
        rig.agent_stderr()
    );
    let exit = rig.stop_agent().await;
    assert_eq!(exit.code(), Some(0), "{exit}");
    let proof = rig.prove(drained);
    assert_eq!(proof.duplicates, 0, "{proof:?}");
    assert_eq!(
        proof.committed,
        proof.stored + proof.left_in_outbox,
        "{proof:?}"
    );
}
