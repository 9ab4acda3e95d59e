//! The binaries under test as child processes: started again and again with the same command,
//! each run logging to files of its own, stopped by signals (a crash is SIGKILL, a stop is
//! SIGTERM) and reaped within a deadline, and killed when the test ends however it ends.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Sends `sig` to the child process `pid`; panics if kill(2) fails.
#[allow(unsafe_code)]
pub fn send_signal(pid: u32, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
    // SAFETY: kill(2) takes plain integers; `pid` is our child, not yet reaped, so it cannot
    // name another process.
    let r = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        r,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// `program` with `args` and an environment of the test's own: no colours, and none of the
/// test's `CAUDAL_*` variables or `RUST_LOG`, so only the configuration file the test wrote
/// configures the binary.
pub fn command(program: &Path, args: &[String]) -> Command {
    let mut c = Command::new(program);
    c.args(args).env("NO_COLOR", "1").env_remove("RUST_LOG");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CAUDAL_") {
            c.env_remove(k);
        }
    }
    c
}

/// A child process started again and again with the same [`command`]; run N writes its output
/// to `<name>-N.stdout` and `<name>-N.stderr` in `dir`. Dropping it kills a running child.
pub struct Proc {
    pub name: String,
    dir: PathBuf,
    program: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    runs: usize,
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proc")
            .field("name", &self.name)
            .field("runs", &self.runs)
            .field("pid", &self.pid())
            .finish()
    }
}

impl Proc {
    pub fn new(name: &str, dir: &Path, program: &Path, args: &[&str]) -> Proc {
        Proc {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            program: program.to_path_buf(),
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
            runs: 0,
        }
    }

    /// Starts the next run; panics if one is running or the program does not start.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        self.runs += 1;
        let file = |stream| {
            std::fs::File::create(self.log_path(self.runs, stream))
                .unwrap_or_else(|e| panic!("{} log file: {e}", self.name))
        };
        let child = command(&self.program, &self.args)
            .stdin(Stdio::null())
            .stdout(file("stdout"))
            .stderr(file("stderr"))
            .spawn()
            .unwrap_or_else(|e| panic!("{} starts: {e}", self.name));
        self.child = Some(child);
    }

    fn log_path(&self, run: usize, stream: &str) -> PathBuf {
        self.dir.join(format!("{}-{run}.{stream}", self.name))
    }

    /// How many runs were started.
    pub fn runs(&self) -> usize {
        self.runs
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The running child's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `Some(status)` when the process was started and has exited on its own.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().expect("try_wait")
    }

    /// Sends `sig` and waits up to `within` for the exit; `Err` names what went wrong (not
    /// running, exited before the signal, did not exit in time: then it is killed).
    pub fn signal_and_reap(
        &mut self,
        sig: libc::c_int,
        within: Duration,
    ) -> Result<ExitStatus, String> {
        let mut child = self
            .child
            .take()
            .ok_or(format!("{} is not running", self.name))?;
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Err(format!(
                "{} exited on its own before the signal: {status}",
                self.name
            ));
        }
        send_signal(child.id(), sig);
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} run {} did not exit within {within:?} of signal {sig}",
                    self.name, self.runs
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// What the latest run has written to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.log_path(self.runs, "stderr")).unwrap_or_default()
    }

    /// Every run's stdout and stderr, those that are not empty.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for run in 1..=self.runs {
            for stream in ["stdout", "stderr"] {
                let text = std::fs::read_to_string(self.log_path(run, stream)).unwrap_or_default();
                if !text.is_empty() {
                    let _ = writeln!(s, "---- {} run {run} {stream} ----\n{text}", self.name);
                }
            }
        }
        s
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A turn at the machine for a test that starts real processes. The rigs take one before they
/// start anything and hold it until they are dropped, so such tests run one after another even
/// when they share a test binary: on a 2-core machine, two scenes at once starve each other's
/// processes and their bounded waits run out. A test that panics gives its turn back as it
/// unwinds.
#[derive(Debug)]
pub struct Turn {
    _held: tokio::sync::OwnedMutexGuard<()>,
}

/// Waits for this process's next [`Turn`].
pub async fn take_turn() -> Turn {
    Turn {
        _held: turns().lock_owned().await,
    }
}

/// [`take_turn`] for a test without a runtime; panics inside one.
pub fn take_turn_blocking() -> Turn {
    Turn {
        _held: turns().blocking_lock_owned(),
    }
}

fn turns() -> std::sync::Arc<tokio::sync::Mutex<()>> {
    static TURNS: std::sync::OnceLock<std::sync::Arc<tokio::sync::Mutex<()>>> =
        std::sync::OnceLock::new();
    TURNS.get_or_init(Default::default).clone()
}
