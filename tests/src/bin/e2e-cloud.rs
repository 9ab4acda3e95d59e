//! `caudal-cloud` built inside the harness package, so its scenarios get the path from Cargo
//! (`CARGO_BIN_EXE_e2e-cloud`): the same entry point as the real binary's `main.rs`.

fn main() -> anyhow::Result<()> {
    caudal_cloud::cli::main()
}
