//! The integration tests, one crate (one binary to build and link): each module is a behaviour area, all over
//! real loopback sockets against scriptable mock Azure instances (`support`), an in-process proxy or the real
//! binary.

mod support;

mod admin;
mod auth;
mod basics;
mod binary;
mod clients;
mod config_errors;
mod dns;
mod entra;
mod faults;
mod front_end;
mod lifecycle;
mod mock_selftest;
mod pool;
mod retry;
mod routing;
mod security;
mod streaming;
mod tls;
mod transport;
