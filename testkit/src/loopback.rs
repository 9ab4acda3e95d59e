//! Loopback ports for the things a test starts: tests bind port 0 or take a port that was free a
//! moment ago, never a well-known one (1883, 5432 and 8080 may be in use on the machine).

use std::net::{SocketAddr, TcpListener};

/// A loopback address whose port was free a moment ago.
pub fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local address")
}
