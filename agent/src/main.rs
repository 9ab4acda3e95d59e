//! The `caudal-agent` binary: everything lives in the library's `cli` module.

fn main() -> std::process::ExitCode {
    caudal_agent::cli::main()
}
