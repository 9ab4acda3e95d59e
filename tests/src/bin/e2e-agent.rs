//! `caudal-agent` built inside the harness package, so its scenarios get the path from Cargo
//! (`CARGO_BIN_EXE_e2e-agent`): the same entry point as the real binary's `main.rs`.

fn main() -> std::process::ExitCode {
    caudal_agent::cli::main()
}
