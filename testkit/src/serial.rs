//! A serial line for tests: a pseudo-terminal pair joined by `socat`, one end for the simulated
//! meters, the other opened by path as the agent would open `/dev/ttyUSB0`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `socat` process joining two ptys; killed when dropped.
pub struct PtyPair {
    child: Child,
    /// The meters' end.
    pub meter_end: PathBuf,
    /// The agent's end.
    pub agent_end: PathBuf,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for PtyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PtyPair")
            .field("meter_end", &self.meter_end)
            .field("agent_end", &self.agent_end)
            .finish()
    }
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PtyPair {
    /// Starts `socat`; `None` (with a note on stderr) where it is not installed, so a test can
    /// skip. `.ci/run` installs it, so CI never skips.
    pub fn start() -> Option<PtyPair> {
        let dir = tempfile::tempdir().expect("tempdir");
        let meter_end = dir.path().join("meter");
        let agent_end = dir.path().join("agent");
        let child = Command::new("socat")
            .arg(format!("pty,raw,echo=0,link={}", meter_end.display()))
            .arg(format!("pty,raw,echo=0,link={}", agent_end.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                eprintln!("socat not available ({e}): serial test skipped");
                return None;
            }
        };
        let pair = PtyPair {
            child,
            meter_end,
            agent_end,
            _dir: dir,
        };
        for _ in 0..100 {
            if exists(&pair.meter_end) && exists(&pair.agent_end) {
                return Some(pair);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("socat did not create its ptys");
    }
}

fn exists(p: &Path) -> bool {
    p.symlink_metadata().is_ok()
}
