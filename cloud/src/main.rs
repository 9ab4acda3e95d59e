//! The `caudal-cloud` binary: everything lives in the library's `cli` module.

fn main() -> anyhow::Result<()> {
    caudal_cloud::cli::main()
}
