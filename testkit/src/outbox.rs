//! A rig's read-only view of an agent's outbox file while the agent runs, crashes and starts
//! again: what `caudal-agent status` sees, the seqs still waiting, and every epoch seen with
//! records, for the proof that the outbox's own list of its epochs misses none.

use caudal_agent::outbox::{Inspection, inspect};
use rusqlite::{Connection, OpenFlags};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The outbox at one path, and the epochs seen in it so far.
#[derive(Debug, Clone)]
pub struct OutboxWatch {
    path: PathBuf,
    epochs: BTreeSet<u32>,
}

impl OutboxWatch {
    pub fn new(path: &Path) -> OutboxWatch {
        OutboxWatch {
            path: path.to_path_buf(),
            epochs: BTreeSet::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the outbox read-only (as `caudal-agent status` does); `None` while the file does
    /// not exist or cannot be read yet. Remembers the epoch of the last committed record.
    pub fn inspect(&mut self) -> Option<Inspection> {
        let i = inspect(&self.path).ok()?;
        if let Some(last) = i.last_seq {
            self.epochs.insert(last.epoch());
        }
        Some(i)
    }

    /// Every epoch [`OutboxWatch::inspect`] has seen a record committed in.
    pub fn epochs(&self) -> &BTreeSet<u32> {
        &self.epochs
    }

    fn open(&self) -> Connection {
        Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .expect("outbox opens read-only")
    }

    /// The seqs still in the outbox (sendable or held).
    pub fn seqs(&self) -> BTreeSet<u64> {
        let conn = self.open();
        let mut st = conn
            .prepare("SELECT seq FROM records UNION ALL SELECT seq FROM held")
            .expect("outbox query");
        st.query_map([], |r| r.get::<_, i64>(0))
            .expect("outbox rows")
            .map(|s| s.expect("seq") as u64)
            .collect()
    }

    /// `PRAGMA integrity_check` of the file; the agent must be stopped.
    pub fn integrity_check(&self) -> String {
        self.open()
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .expect("integrity check")
    }
}
