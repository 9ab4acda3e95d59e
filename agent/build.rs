//! Embeds the build's Unix time, the floor below which the agent takes its wall clock to be wrong
//! (a board without a real-time clock boots in 1970 or at its last fake-hwclock save).
//!
//! `SOURCE_DATE_EPOCH` (reproducible builds) takes precedence over the build machine's clock. The
//! script reruns only when it or that variable changes, so an incremental build may embed an older
//! time: harmless, the floor only gets lower.

use std::time::{SystemTime, UNIX_EPOCH};

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let secs: i64 = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(s) => s.trim().parse().unwrap_or_else(|e| {
            panic!("SOURCE_DATE_EPOCH={s:?} is not a Unix time in seconds: {e}")
        }),
        // A build machine whose clock is before 1970 gets floor 0; the agent raises the floor
        // to the start of the Caudal epoch anyway.
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64),
    };
    // chrono's range; 9999-12-31 is far enough for a build date.
    assert!(
        (0..=253_402_300_799).contains(&secs),
        "build time {secs} is not between 1970 and 9999"
    );
    let out = std::env::var("OUT_DIR").unwrap_or_else(|e| panic!("OUT_DIR is not set: {e}"));
    let path = std::path::Path::new(&out).join("build_time.rs");
    let code = format!(
        "/// Unix time of this build, seconds (`SOURCE_DATE_EPOCH` when set).\n\
         pub const BUILD_UNIX_TIME: i64 = {secs};\n"
    );
    std::fs::write(&path, code).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}
