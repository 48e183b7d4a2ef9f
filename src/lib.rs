//! azure-proxy: makes several Azure OpenAI instances look like one endpoint.
//!
//! How a request flows:
//! 1. `front` (one thread, `poll`) accepts the connection and reads the request head (`http::parse`), within
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

pub mod access_log;
pub mod admin;
pub mod balancer;
pub mod cli;
pub mod client_ip;
pub mod config;
pub mod exchange;
pub mod front;
pub mod guard;
pub mod http;
pub mod lifecycle;
pub mod metrics;
pub mod pool;
pub mod redact;
pub mod rejection;
pub mod relay;
pub mod request_id;
pub mod serve;
pub mod server;
pub mod state;
pub mod stream;
pub mod sys;
pub mod upstream;

pub use config::Config;
pub use server::{start, start_from_file, Server};
