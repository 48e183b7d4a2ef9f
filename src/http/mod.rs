//! The HTTP/1.1 front end, on `httparse`: reading request heads within limits, request bodies (length and
//! chunked), and writing responses (our own heads, chunked framing, a flush per upstream read).
//!
//! It deliberately does not do routing, auth or upstream work; those live in `serve`, `guard` and `relay`.

pub mod body;
pub mod client_stream;
pub mod conn;
pub mod parse;
pub mod target;
pub mod write;

pub use client_stream::ClientStream;
pub use conn::Conn;
pub use parse::{Head, HeadError};

/// Hop-by-hop headers (RFC 9110 §7.6.1) and the ones the proxy sets itself: never copied in either direction.
pub const HOP_BY_HOP: &[&str] =
    &["connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "host"];
