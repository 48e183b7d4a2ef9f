//! Shared test support: `mock` (scriptable Azure instances), `proxy` (an in-process proxy on port 0 and a
//! raw HTTP/1.1 client that shows exactly what went over the wire).
#![allow(dead_code)]

pub mod client;
pub mod mock;
pub mod process;
pub mod proxy;
