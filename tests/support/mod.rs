//! Shared test support: `mock` (scriptable Azure instances), `proxy` (an in-process proxy on port 0 and a
//! raw HTTP/1.1 client that shows exactly what went over the wire), `dns` (a DNS server for name lookups).
#![allow(dead_code)]

use std::time::{Duration, Instant};

pub mod client;
pub mod dns;
pub mod mock;
pub mod process;
pub mod proxy;
pub mod tls;

/// A loopback address nobody listens on: bound to port 0, then released (for a listener the proxy opens, or a
/// port that refuses connections).
pub fn free_addr() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("its address")
}

/// How long `eventually` waits: generous, since it is reached only when something is wrong.
pub const EVENTUALLY: Duration = Duration::from_secs(20);

/// Polls `cond` every 10 ms until it holds; fails the test, naming `what`, after `EVENTUALLY`. For states that
/// are reached asynchronously (a connection closed, a thread retired), never for timing assertions.
pub fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + EVENTUALLY;
    while !cond() {
        assert!(Instant::now() < deadline, "not within {EVENTUALLY:?}: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
