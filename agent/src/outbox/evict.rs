//! Eviction under the disk budget: which records go (the oldest, across sendable and held),
//! and the gap records that report them, one per device.
//!
//! `store` calls this inside its append transaction; this never calls back into `store` (what a
//! row costs, [`ROW_OVERHEAD_BYTES`], is the schema's).

use super::OutboxError;
use super::schema::{Meta, ROW_OVERHEAD_BYTES, from_ms};
use caudal_common::payload::RecordKind;
use caudal_common::{DeviceId, Gap, GapCause, Seq, SeqRange};
use rusqlite::{Transaction, params};
use std::collections::BTreeMap;
use tracing::error;

/// What eviction learnt about one device's evicted records.
struct GapAcc {
    from_ms: i64,
    to_ms: i64,
    first: Seq,
    last: Seq,
    count: u64,
}

impl GapAcc {
    fn new(seq: Seq, ts_ms: i64) -> GapAcc {
        GapAcc {
            from_ms: ts_ms,
            to_ms: ts_ms,
            first: seq,
            last: seq,
            count: 0,
        }
    }

    fn cover(&mut self, seqs: SeqRange, from_ms: i64, to_ms: i64) {
        self.first = self.first.min(seqs.from);
        self.last = self.last.max(seqs.to);
        self.from_ms = self.from_ms.min(from_ms);
        self.to_ms = self.to_ms.max(to_ms);
    }
}

/// The head of one table's scan in eviction order.
struct Victim {
    seq: Seq,
    kind: i64,
    device: Option<String>,
    ts_ms: i64,
    size: u64,
    gap_json: Option<String>,
    held: bool,
}

fn next_victim(rows: &mut rusqlite::Rows<'_>, held: bool) -> rusqlite::Result<Option<Victim>> {
    let Some(r) = rows.next()? else {
        return Ok(None);
    };
    Ok(Some(Victim {
        seq: Seq(r.get::<_, i64>(0)? as u64),
        kind: r.get(1)?,
        device: r.get(2)?,
        ts_ms: r.get(3)?,
        size: r.get::<_, i64>(4)?.max(0) as u64,
        gap_json: r.get(5)?,
        held,
    }))
}

/// Folds the gaps of a further eviction round into those of the earlier rounds of the same
/// append: still one gap per device, spanning both rounds' seqs and times, counting both.
pub(super) fn merge_gaps(mut into: Vec<Gap>, more: Vec<Gap>) -> Vec<Gap> {
    for g in more {
        match into.iter_mut().find(|e| e.device == g.device) {
            Some(e) => {
                e.from = e.from.min(g.from);
                e.to = e.to.max(g.to);
                e.seqs = match (e.seqs, g.seqs) {
                    (Some(a), Some(b)) => Some(SeqRange {
                        from: a.from.min(b.from),
                        to: a.to.max(b.to),
                    }),
                    (a, b) => a.or(b),
                };
                e.count += g.count;
            }
            None => into.push(g),
        }
    }
    into
}

/// Deletes the oldest records (lowest seqs across `records` and `held`) until at least `need`
/// budget bytes are freed, and returns one evicted-gap per device. An evicted gap record is
/// folded into the new gap of its device (its range, time span and count carry over), so no
/// earlier loss is forgotten. A gap's `count` is the readings and events it stands for. Held
/// records evicted before the clock was trusted give the gap their untrusted times.
pub(super) fn evict(
    tx: &Transaction<'_>,
    meta: &mut Meta,
    need: u64,
) -> Result<(Vec<Gap>, u64), OutboxError> {
    let mut per_device: BTreeMap<Option<String>, GapAcc> = BTreeMap::new();
    let (mut freed, mut rows, mut bytes, mut held) = (0u64, 0u64, 0u64, 0u64);
    let mut cut: Option<Seq> = None;
    {
        const SCAN: &str = "SELECT seq, kind, device, ts, size,
            CASE WHEN kind = 2 THEN json END FROM {} ORDER BY seq";
        let mut s_rec = tx.prepare(&SCAN.replace("{}", "records"))?;
        let mut s_held = tx.prepare(&SCAN.replace("{}", "held"))?;
        let mut q_rec = s_rec.query([])?;
        let mut q_held = s_held.query([])?;
        let mut h_rec = next_victim(&mut q_rec, false)?;
        let mut h_held = next_victim(&mut q_held, true)?;
        while freed < need {
            let take_rec = match (&h_rec, &h_held) {
                (Some(a), Some(b)) => a.seq < b.seq,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            let v = if take_rec {
                std::mem::replace(&mut h_rec, next_victim(&mut q_rec, false)?)
            } else {
                std::mem::replace(&mut h_held, next_victim(&mut q_held, true)?)
            };
            let Some(v) = v else { break };
            freed += v.size + ROW_OVERHEAD_BYTES;
            bytes += v.size;
            rows += 1;
            held += u64::from(v.held);
            cut = Some(v.seq);
            let acc = per_device
                .entry(v.device.clone())
                .or_insert_with(|| GapAcc::new(v.seq, v.ts_ms));
            acc.cover(
                SeqRange {
                    from: v.seq,
                    to: v.seq,
                },
                v.ts_ms,
                v.ts_ms,
            );
            let folded = v
                .gap_json
                .as_deref()
                .filter(|_| v.kind == RecordKind::Gap as i64)
                .and_then(|j| serde_json::from_str::<Gap>(j).ok());
            match folded {
                Some(g) => {
                    if let Some(s) = g.seqs {
                        acc.cover(s, g.from.timestamp_millis(), g.to.timestamp_millis());
                    } else {
                        let at = SeqRange {
                            from: v.seq,
                            to: v.seq,
                        };
                        acc.cover(at, g.from.timestamp_millis(), g.to.timestamp_millis());
                    }
                    acc.count += if g.cause == GapCause::Evicted {
                        g.count
                    } else {
                        1
                    };
                }
                None => acc.count += 1,
            }
        }
    }
    let Some(cut) = cut else {
        return Ok((Vec::new(), 0));
    };
    let cut_i = cut.0 as i64;
    tx.execute("DELETE FROM records WHERE seq <= ?1", params![cut_i])?;
    tx.execute("DELETE FROM held WHERE seq <= ?1", params![cut_i])?;
    meta.record_count = meta.record_count.saturating_sub(rows);
    meta.record_bytes = meta.record_bytes.saturating_sub(bytes);
    meta.held_count = meta.held_count.saturating_sub(held);
    meta.evicted_total += rows;
    let gaps: Vec<Gap> = per_device
        .into_iter()
        .map(|(device, acc)| Gap {
            seq: Seq::default(),
            device: device.and_then(|d| DeviceId::new(d).ok()),
            from: from_ms(acc.from_ms),
            to: from_ms(acc.to_ms),
            seqs: Some(SeqRange {
                from: acc.first,
                to: acc.last,
            }),
            count: acc.count,
            cause: GapCause::Evicted,
        })
        .collect();
    error!(
        evicted = rows,
        bytes,
        up_to_seq = %cut,
        devices = gaps.len(),
        "outbox disk budget reached: oldest records evicted and reported as gaps"
    );
    Ok((gaps, rows))
}
