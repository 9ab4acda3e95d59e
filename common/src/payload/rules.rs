//! The rules a [`Batch`] must satisfy beyond its JSON shape, in one place: [`Batch::check`].
//!
//! [`decode`](super::decode) applies the rules about each record on its own
//! ([`Batch::check_records`]), so every reader of a batch refuses such a record for the same
//! reason; the cloud's ingest applies them all once the batch's site is known, and its store
//! again before it writes, whoever calls it. Each [`BatchError`] names the record (its kind and
//! seq) and the field at fault; its text is what a `rejected` ack and a dead letter carry.

use super::{Batch, Reading, RecordKind};
use crate::id::DeviceId;
use crate::seq::Seq;

/// Why a batch breaks the contract.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BatchError {
    /// A channel holds NaN or an infinity (the agent sends such a channel as absent, flagged
    /// `not_finite`).
    #[error("reading seq {seq} device {device}: {field} is not finite")]
    NotFinite {
        seq: Seq,
        device: DeviceId,
        /// `flow_lps`, `total_m3`, `level_m` or `extra.<name>`.
        field: String,
    },
    /// A record's seq does not fit the layout (bit 63 set), so no signed 64-bit column holds it.
    #[error("{record} seq {} has bit 63 set", .seq.0)]
    SeqLayout { record: RecordKind, seq: Seq },
    /// An end of a gap's `seqs` range has bit 63 set.
    #[error("gap seq {gap}: seqs.{end} {} has bit 63 set", .seq.0)]
    GapRangeLayout {
        gap: Seq,
        /// `from` or `to`.
        end: &'static str,
        seq: Seq,
    },
    #[error("event seq {seq}: wrap is not a finite positive number")]
    Wrap { seq: Seq },
    #[error("gap seq {seq}: seqs.from is after seqs.to")]
    GapSeqsReversed { seq: Seq },
    #[error("gap seq {seq}: from is after to")]
    GapTimesReversed { seq: Seq },
    /// Two records of one batch share a seq: a record's identity never repeats.
    #[error("seq {seq} appears more than once in the batch")]
    Repeated { seq: Seq },
    /// PostgreSQL's `text` takes no NUL character: refused here with a reason, such a batch
    /// would instead fail its transaction on every re-send.
    #[error("event seq {seq}: message contains a NUL character")]
    NulInMessage { seq: Seq },
    /// PostgreSQL's `jsonb` (the stored `extra`) takes no NUL character either.
    #[error("reading seq {seq}: an extra channel name contains a NUL character")]
    NulInExtraName { seq: Seq },
}

impl Batch {
    /// Checks every rule; the error names the first record and field that breaks one.
    pub fn check(&self) -> Result<(), BatchError> {
        self.check_records()?;
        if let Some(w) = self.seqs().windows(2).find(|w| w[0] == w[1]) {
            return Err(BatchError::Repeated { seq: w[0] });
        }
        if let Some(e) = self.events.iter().find(|e| e.message.contains('\0')) {
            return Err(BatchError::NulInMessage { seq: e.seq });
        }
        if let Some(r) = self
            .readings
            .iter()
            .find(|r| r.extra.keys().any(|k| k.contains('\0')))
        {
            return Err(BatchError::NulInExtraName { seq: r.seq });
        }
        Ok(())
    }

    /// The rules each record satisfies on its own: finite channel values, seqs that fit the
    /// layout, an event's wrap, a gap's ordered ranges. The decoder applies these and no more:
    /// a record is judged before its seq is allocated (the agent's drafts all carry seq 0, so
    /// a batch of drafts repeats seqs), and text the cloud's databases cannot store is the
    /// cloud's to refuse, with [`Batch::check`].
    pub fn check_records(&self) -> Result<(), BatchError> {
        for r in &self.readings {
            r.check()?;
        }
        for e in &self.events {
            layout(RecordKind::Event, e.seq)?;
            if let Some(w) = e.wrap
                && !(w.is_finite() && w > 0.0)
            {
                return Err(BatchError::Wrap { seq: e.seq });
            }
        }
        for g in &self.gaps {
            layout(RecordKind::Gap, g.seq)?;
            if let Some(s) = g.seqs
                && s.from > s.to
            {
                return Err(BatchError::GapSeqsReversed { seq: g.seq });
            }
            if g.from > g.to {
                return Err(BatchError::GapTimesReversed { seq: g.seq });
            }
            let Some(range) = g.seqs else { continue };
            for (end, seq) in [("from", range.from), ("to", range.to)] {
                if !seq.is_valid() {
                    return Err(BatchError::GapRangeLayout {
                        gap: g.seq,
                        end,
                        seq,
                    });
                }
            }
        }
        Ok(())
    }
}

/// A record's seq fits the layout (bit 63 clear).
fn layout(record: RecordKind, seq: Seq) -> Result<(), BatchError> {
    match seq.is_valid() {
        true => Ok(()),
        false => Err(BatchError::SeqLayout { record, seq }),
    }
}

impl Reading {
    fn check(&self) -> Result<(), BatchError> {
        let finite = |field: &str, v: Option<f64>| match v {
            Some(x) if !x.is_finite() => Err(BatchError::NotFinite {
                seq: self.seq,
                device: self.device.clone(),
                field: field.to_string(),
            }),
            _ => Ok(()),
        };
        finite("flow_lps", self.flow_lps)?;
        finite("total_m3", self.total_m3)?;
        finite("level_m", self.level_m)?;
        for (k, v) in &self.extra {
            finite(&format!("extra.{k}"), Some(*v))?;
        }
        layout(RecordKind::Reading, self.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(json: &str) -> Batch {
        serde_json::from_str(json).expect("a batch's shape")
    }

    #[test]
    fn duplicate_seqs_are_refused() {
        let b = batch(
            r#"{"v":1,"site":"s","batch":"b","sent_at":"2026-01-01T00:00:00Z",
                "readings":[{"seq":5,"device":"d","ts":"2026-01-01T00:00:00Z"}],
                "events":[{"seq":5,"ts":"2026-01-01T00:00:00Z","kind":"agent_started"}]}"#,
        );
        assert!(b.check().is_err());
    }

    #[test]
    fn a_batch_of_drafts_decodes_but_is_not_stored() {
        // The agent decodes its own drafts, whose seqs are not allocated yet (all 0).
        let json = r#"{"v":1,"site":"s","batch":"b","sent_at":"2026-01-01T00:00:00Z",
            "readings":[{"seq":0,"device":"d","ts":"2026-01-01T00:00:00Z"}],
            "events":[{"seq":0,"ts":"2026-01-01T00:00:00Z","kind":"frozen"}]}"#;
        let b: Batch = crate::payload::decode(json.as_bytes()).expect("drafts decode");
        assert_eq!(b.check(), Err(BatchError::Repeated { seq: Seq(0) }));
    }

    #[test]
    fn each_rule_names_its_record_and_field() {
        let head = r#""v":1,"site":"s","batch":"b","sent_at":"2026-01-01T00:00:00Z""#;
        let bit63 = 1u64 << 63;
        let cases = [
            (
                format!(
                    r#"{{{head},"events":[{{"seq":{bit63},"ts":"2026-01-01T00:00:00Z","kind":"frozen"}}]}}"#
                ),
                BatchError::SeqLayout {
                    record: RecordKind::Event,
                    seq: Seq(bit63),
                },
                format!("event seq {bit63} has bit 63 set"),
            ),
            (
                format!(
                    r#"{{{head},"gaps":[{{"seq":3,"from":"2026-01-01T00:00:00Z","to":"2026-01-01T00:00:00Z","seqs":{{"from":1,"to":{bit63}}},"count":0,"cause":"evicted"}}]}}"#
                ),
                BatchError::GapRangeLayout {
                    gap: Seq(3),
                    end: "to",
                    seq: Seq(bit63),
                },
                format!("gap seq 0:3: seqs.to {bit63} has bit 63 set"),
            ),
            (
                format!(
                    r#"{{{head},"events":[{{"seq":7,"ts":"2026-01-01T00:00:00Z","kind":"frozen","message":"a\u0000b"}}]}}"#
                ),
                BatchError::NulInMessage { seq: Seq(7) },
                "event seq 0:7: message contains a NUL character".to_string(),
            ),
            (
                format!(
                    r#"{{{head},"readings":[{{"seq":2,"device":"d","ts":"2026-01-01T00:00:00Z","extra":{{"t\u0000":1.0}}}}]}}"#
                ),
                BatchError::NulInExtraName { seq: Seq(2) },
                "reading seq 0:2: an extra channel name contains a NUL character".to_string(),
            ),
        ];
        for (json, error, text) in cases {
            let got = batch(&json).check();
            assert_eq!(got, Err(error), "{json}");
            assert_eq!(got.map_err(|e| e.to_string()), Err(text));
        }
    }
}
