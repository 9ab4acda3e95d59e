//! The agent under a service manager: the real binary, `NOTIFY_SOCKET` pointed at a datagram
//! socket this test owns, `WATCHDOG_USEC` set. It must say `READY=1`, keep petting the watchdog
//! while its only meter never answers and its broker refuses connections (both loops are alive,
//! only waiting), and say `STOPPING=1` on SIGTERM.

use caudal_testkit::process::{command, send_signal, take_turn_blocking};
use std::fmt::Write as _;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// The watchdog period the test asks for: pets every 0.5 s, loops stale after 1 s.
const WATCHDOG: Duration = Duration::from_secs(2);
/// How long the pets must keep coming after READY=1: many times the stale limit.
const OBSERVE: Duration = Duration::from_secs(6);
const DEADLINE: Duration = Duration::from_secs(60);

#[test]
fn ready_watchdog_and_stopping_reach_the_service_manager() {
    let _turn = take_turn_blocking();
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();

    // A meter that accepts the connection and never answers: every request times out.
    let silent_meter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    // A broker address where nothing listens: every connection attempt is refused.
    let no_broker = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();

    let mut toml = String::new();
    writeln!(
        toml,
        "[site]\nid = \"notify-site\"\ndata_dir = \"{}\"\n\n\
         [uplink]\nbroker = \"mqtt://{no_broker}\"\nreconnect_min_ms = 100\nreconnect_max_ms = 400\n\n\
         [metrics]\nlisten = \"\"\n\n[clock]\nrequire_ntp_sync = false\n\n\
         [[bus]]\nname = \"silent\"\nkind = \"tcp\"\naddress = \"{}\"\n\n\
         [[bus.device]]\nid = \"fm1\"\nunit = 1\nprofile = \"generic\"\nperiod_s = 1\n\
         timeout_ms = 300\nretries = 1",
        dir.path().join("data").display(),
        silent_meter.local_addr().unwrap(),
    )
    .unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, toml).unwrap();

    let args = [
        "--config".to_string(),
        config.display().to_string(),
        "run".into(),
    ];
    let mut cmd = command(Path::new(env!("CARGO_BIN_EXE_caudal-agent")), &args);
    cmd.env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", WATCHDOG.as_micros().to_string())
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("agent.stderr")).unwrap());
    let mut child = cmd.spawn().unwrap();

    let started = Instant::now();
    let mut ready_at: Option<Instant> = None;
    let mut pets_after_ready: Vec<Instant> = Vec::new();
    let mut buf = [0u8; 4096];
    while started.elapsed() < DEADLINE {
        if let Some(at) = ready_at {
            if at.elapsed() >= OBSERVE {
                break;
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("agent exited early: {status}");
        }
        let Ok(n) = sock.recv(&mut buf) else { continue };
        for line in String::from_utf8_lossy(&buf[..n]).lines() {
            match line {
                "READY=1" => {
                    assert!(ready_at.is_none(), "READY=1 sent twice");
                    ready_at = Some(Instant::now());
                }
                "WATCHDOG=1" if ready_at.is_some() => pets_after_ready.push(Instant::now()),
                "WATCHDOG=1" => {}
                other => panic!("unexpected notification before shutdown: {other:?}"),
            }
        }
    }
    let ready_at = ready_at.expect("READY=1 within the deadline");
    assert!(
        pets_after_ready.len() >= 4,
        "expected WATCHDOG=1 every {:?} for {OBSERVE:?} after READY=1, got {}",
        WATCHDOG / 4,
        pets_after_ready.len()
    );
    // The pets kept coming to the end: petting did not stop once a loop went quiet.
    let last = *pets_after_ready.last().unwrap();
    assert!(
        last.duration_since(ready_at) >= OBSERVE - WATCHDOG,
        "last pet {:?} after READY=1",
        last.duration_since(ready_at)
    );

    send_signal(child.id(), libc::SIGTERM);
    let mut stopping = false;
    let stop_deadline = Instant::now() + Duration::from_secs(20);
    while !stopping && Instant::now() < stop_deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            stopping = String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == "STOPPING=1");
        }
    }
    let status = child.wait().unwrap();
    let stderr = std::fs::read_to_string(dir.path().join("agent.stderr")).unwrap_or_default();
    assert!(stopping, "no STOPPING=1 after SIGTERM; log:\n{stderr}");
    assert!(status.success(), "agent exit {status}; log:\n{stderr}");
    drop(silent_meter);
}
