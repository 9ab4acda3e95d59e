//! The `caudal-agent` binary: parses the command line and hands over to the library.

fn main() {
    println!("caudal-agent {}", env!("CARGO_PKG_VERSION"));
}
