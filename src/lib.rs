//! azure-proxy: makes several Azure OpenAI instances look like one endpoint.
//!
//! How a request flows:
//! 1. `front` (one thread, epoll) accepts the connection and reads the request head (`http::parse`), within
//!    size and time limits; a complete head goes over a bounded channel to the worker `pool` (a thread is started
//!    when none is idle), or gets a 503 if the queue is full.
//! 2. `serve` (a worker) checks the target (`http::target`) and `Host`, answers local routes (`admin`) and 404s
//!    anything outside `/openai/`, then asks `guard` about the client's IP and key (401/403), then reads the body
//!    (`http::body`).
//! 3. `relay` takes instances in `balancer` order (tiers, weights, cooldowns, circuits), calls each with ureq
//!    (`upstream`) until one gives a final answer, and `stream` copies that answer to the client as it arrives,
//!    flushing each read and masking keys in error answers (`redact`); or `relay` answers with the fallback
//!    JSON listing every attempt.
//! 4. `serve` logs the access line and gives a keep-alive connection back to `front`.
#![deny(unsafe_code)]

// The library's surface is `start`, `start_from_file`, `Server`, `Error`, `config` and `cli` (the binary's); the modules
// marked doc(hidden) are public only for the fuzz targets, the tests and the examples.

pub(crate) mod access_log;
pub(crate) mod admin;
pub(crate) mod balancer;
pub(crate) mod bytes;
pub mod cli;
#[doc(hidden)] // public for the fuzz targets only
pub mod client_ip;
pub mod config;
pub(crate) mod entra;
pub mod error;
pub(crate) mod exchange;
pub(crate) mod front;
pub(crate) mod gate;
pub(crate) mod guard;
#[doc(hidden)] // public for the fuzz targets and the tests (target::check) only
pub mod http;
pub(crate) mod lifecycle;
pub(crate) mod metrics;
pub(crate) mod pool;
pub(crate) mod quota;
pub(crate) mod redact;
pub(crate) mod rejection;
pub(crate) mod relay;
pub(crate) mod request_id;
pub(crate) mod resolve;
pub(crate) mod serve;
pub(crate) mod server;
#[doc(hidden)] // public for the fuzz targets only
pub mod state;
pub(crate) mod stream;
#[doc(hidden)] // public for the test mock and the benchmark upstream only
pub mod sys;
pub(crate) mod transport;
#[doc(hidden)] // public for the fuzz targets only
pub mod upstream;

pub use config::Config;
pub use error::Error;
pub use server::{start, start_from_file, Server};
