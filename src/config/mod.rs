//! Configuration: the JSON file (`azure_instances.json`), then environment variables, then command-line flags,
//! each overriding the one before, validated once into a [`Config`] that the rest of the proxy shares read-only.
//!
//! The file format is the original proxy's (`instances`, `header_name`, `client_header_name`, `client_keys`) plus
//! optional fields for every limit. Unknown fields are an error: a typo such as `client_key` must not silently turn
//! the allowlist off. Every default is a named constant below, next to the field it fills.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::client_ip::Cidr;

pub use client_keys::{ClientKey, KeyDigest};
pub use entra::{EntraAuth, EntraFlow, ManagedIdentityEndpoint};

mod check;
mod client_keys;
mod entra;
#[cfg(test)]
mod error_tests;
mod file;
mod json;
mod overlay;

pub const DEFAULT_CONFIG_PATH: &str = "azure_instances.json";
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8000";
pub const DEFAULT_HEADER_NAME: &str = "api-key";
/// The most worker threads, i.e. requests (streams included) served at once. Threads are started on demand, so
/// the bound costs nothing until it is used: a stream holds one thread (about 40 KiB resident) for its life.
pub const DEFAULT_WORKERS: usize = 4096;
/// `workers` above this is refused: past it a machine runs out of threads or memory before the proxy is useful.
pub const MAX_WORKERS: usize = 100_000;
/// Threads kept alive while idle, so that a lull does not cost a thread start per request.
pub const DEFAULT_IDLE_WORKERS: usize = 8;
/// A thread idle this long exits (down to `idle_workers`).
pub const DEFAULT_WORKER_IDLE_MS: u64 = 10_000;
/// Requests waiting for a worker when all `workers` are busy; beyond it the proxy answers 503 at once.
pub const DEFAULT_QUEUE_SIZE: usize = 256;
/// The longest a request waits in that queue before it is answered 503 (a stream may hold a worker a minute).
pub const DEFAULT_QUEUE_TIMEOUT_MS: u64 = 2_000;
/// The kernel's queue of connections not yet accepted: a burst of clients connecting in the same second must not
/// overflow it (Rust's default is 128; nginx uses 511).
pub const DEFAULT_LISTEN_BACKLOG: u32 = 4096;
pub const MAX_LISTEN_BACKLOG: u32 = 65_535;
/// Idle upstream connections kept per instance for reuse (each holds ureq's buffers); the rest are closed.
pub const DEFAULT_UPSTREAM_IDLE_PER_INSTANCE: usize = 64;
/// How long an idle upstream connection stays pooled. ureq's own default (15 s) made every lull of a quarter
/// minute cost a full reconnect of the pool; Azure's load balancers keep idle TCP connections for 4 minutes, so
/// 90 s keeps the pool warm through ordinary lulls and still stays well inside the server's limit.
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT_MS: u64 = 90_000;
/// Open client connections: room for `DEFAULT_WORKERS` streams and as many idle or waiting clients.
pub const DEFAULT_MAX_CONNECTIONS: usize = 8192;
pub const DEFAULT_MAX_HEAD_BYTES: usize = 32 * 1024;
pub const DEFAULT_MAX_HEADERS: usize = 100;
pub const DEFAULT_MAX_BODY_BYTES: u64 = 32 * 1024 * 1024;
pub const DEFAULT_HEAD_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 60_000;
pub const DEFAULT_BODY_READ_TIMEOUT_MS: u64 = 30_000;
pub const DEFAULT_CLIENT_WRITE_TIMEOUT_MS: u64 = 30_000;
/// How long a worker waits for the next request on a keep-alive connection before handing it to the front
/// thread. It catches clients that send back-to-back (load generators, batch jobs, pooled SDKs), and gives way
/// at once when requests queue with no worker idle (`pool`), so waiting costs no thread.
///
/// 10 ms, not the 2 ms it was: with 2 ms, 64 busy connections on 2 cores fell into a slow state in about a third
/// of the measured rounds (29k instead of 38k req/s, 45 instead of 33 µs of CPU per request). Once responses
/// are late enough that lingers expire, connections go round through the front thread, which costs more CPU and
/// makes them later still. An open-loop 5k req/s run also spent half the CPU per request with 10 ms, because a
/// connection's next request came about 6 ms later. Before lingering gave way, 10 ms made 2,000 one-request
/// clients start 102 threads (`make stress`, slowloris).
pub const DEFAULT_KEEPALIVE_LINGER_MS: u64 = 10;
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 10_000;
/// How old an upstream host's addresses may get before they are looked up again, in the background (`getaddrinfo`
/// gives no TTL; Azure's records have TTLs of minutes). A request never waits for a refresh.
pub const DEFAULT_DNS_REFRESH_MS: u64 = 30_000;
/// A non-streamed completion sends its head only when the whole answer is generated: minutes, not seconds.
pub const DEFAULT_UPSTREAM_RESPONSE_TIMEOUT_MS: u64 = 300_000;
/// The longest silence allowed between two reads from an upstream (an SSE stream's gap between events). ureq
/// applies it to the wait for the response head too, so it must not be shorter than the response timeout.
pub const DEFAULT_UPSTREAM_READ_TIMEOUT_MS: u64 = 300_000;
pub const DEFAULT_ERROR_BODY_MAX_BYTES: usize = 2048;
pub const DEFAULT_MAX_BAD_KEYS: u32 = 5;
pub const DEFAULT_BLOCK_SECONDS: u64 = 300;
pub const DEFAULT_MAX_TRACKED_CLIENTS: usize = 100_000;
/// The admin endpoints, all on by default.
pub const ADMIN_ENDPOINTS: [&str; 3] = ["healthz", "readyz", "metrics"];
/// How long a stop waits for requests in flight (streams included) before exiting anyway.
pub const DEFAULT_DRAIN_SECONDS: u64 = 30;
/// Cooldown after a 429/503 that names no retry time.
pub const DEFAULT_COOLDOWN_MS: u64 = 1_000;
/// Cap on any honoured retry time (a misbehaving `Retry-After: 86400` must not take an instance out for a day);
/// 0 turns cooldowns off (plain round-robin).
pub const DEFAULT_MAX_COOLDOWN_MS: u64 = 60_000;
/// Consecutive connection failures or timeouts that open an instance's circuit; 0 turns the breaker off.
pub const DEFAULT_CIRCUIT_FAILURES: u32 = 3;
/// First open interval; it doubles on every failed probe, up to the maximum.
pub const DEFAULT_CIRCUIT_OPEN_MS: u64 = 1_000;
pub const DEFAULT_CIRCUIT_MAX_OPEN_MS: u64 = 60_000;
/// Sum of the weights in one priority tier (the weighted order is precomputed with one slot per unit of weight).
pub const MAX_TIER_WEIGHT: u32 = 10_000;

/// A secret string (an instance key or a client key). Its `Debug` never shows the value, so a stray `{:?}` of a
/// config in a log line or a panic cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// One upstream Azure OpenAI resource.
#[derive(Clone, Debug)]
pub struct Instance {
    /// Used in logs and in the fallback error body; defaults to the endpoint's host (with its port, if any).
    pub name: String,
    /// `scheme://host[:port]` with no trailing slash; the client's path is appended unchanged.
    pub endpoint: String,
    /// How the proxy authenticates to the instance: its key, or an Entra ID token.
    pub credential: Credential,
    /// Lower is tried first; a tier is left only when all its instances are cooling down or failed.
    pub priority: u32,
    /// Share of requests inside its tier (smooth weighted round-robin).
    pub weight: u32,
    /// Client deployment name → this instance's deployment name.
    pub deployments: BTreeMap<String, String>,
    /// Skip this instance for deployment names that `deployments` does not list.
    pub deployments_only: bool,
    /// Replaces the client's `api-version` query parameter.
    pub api_version: Option<String>,
    /// Per-instance upstream timeouts; `None` means the global one.
    pub connect_timeout: Option<Duration>,
    pub upstream_response_timeout: Option<Duration>,
    pub upstream_read_timeout: Option<Duration>,
}

impl Instance {
    pub fn has_timeout_overrides(&self) -> bool {
        self.connect_timeout.is_some()
            || self.upstream_response_timeout.is_some()
            || self.upstream_read_timeout.is_some()
    }
}

/// How the proxy authenticates to an instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// `api_key` / `api_key_env`, sent in `header_name`.
    Key(Secret),
    /// `auth`: an Entra ID token, sent as `Authorization: Bearer`.
    Entra(EntraAuth),
}

/// How requests are spread and retried across instances.
#[derive(Clone, Debug)]
pub struct Routing {
    /// Attempts per request, at most one per instance.
    pub max_attempts: usize,
    /// No new attempt starts after this much time since the request arrived (`None`: no deadline).
    pub attempt_deadline: Option<Duration>,
    pub default_cooldown: Duration,
    /// Zero disables cooldowns entirely.
    pub max_cooldown: Duration,
    /// Zero disables the circuit breaker.
    pub circuit_failures: u32,
    pub circuit_open: Duration,
    pub circuit_max_open: Duration,
}

/// The validated configuration. Invariants: `instances` is non-empty, names are unique, header names are valid
/// lowercase tokens, every count and timeout is non-zero where zero would make no sense.
#[derive(Clone, Debug)]
pub struct Config {
    pub instances: Vec<Instance>,
    /// Header that carries the instance key to Azure (lowercase).
    pub header_name: String,
    /// Header that carries the client's key to the proxy (lowercase).
    pub client_header_name: String,
    /// Allowlist of client keys, with their names and limits; empty means any non-empty key is accepted (the
    /// original's behaviour).
    pub client_keys: Vec<ClientKey>,
    pub listen: SocketAddr,
    /// The most worker threads (requests served at once); started on demand.
    pub workers: usize,
    /// Worker threads kept while idle.
    pub idle_workers: usize,
    /// How long a worker beyond `idle_workers` waits for work before it exits.
    pub worker_idle: Duration,
    /// Requests waiting for a worker when all are busy; beyond it the proxy answers 503 at once.
    pub queue_size: usize,
    /// The longest a request waits in the queue; then 503 + `Retry-After`.
    pub queue_timeout: Duration,
    /// `listen(2)` backlog of the proxy's listener.
    pub listen_backlog: u32,
    /// Idle upstream connections kept per instance.
    pub upstream_idle_per_instance: usize,
    /// How long an idle upstream connection is kept for reuse.
    pub upstream_idle_timeout: Duration,
    /// Open client connections (idle, reading, or being served); beyond it new ones get 503 and are closed.
    pub max_connections: usize,
    pub max_head_bytes: usize,
    pub max_headers: usize,
    pub max_body_bytes: u64,
    /// Time allowed from a connection's first byte (or its accept) to a complete request head.
    pub head_timeout: Duration,
    /// How long an idle keep-alive connection is kept.
    pub idle_timeout: Duration,
    /// Longest wait for one read of a request body.
    pub body_read_timeout: Duration,
    /// Longest wait for one write to a client (a client that stops reading frees its worker after this).
    pub client_write_timeout: Duration,
    /// How long a worker waits for a next request on the connection it just served (0: never; see
    /// `DEFAULT_KEEPALIVE_LINGER_MS`). It never waits while other requests are queued.
    pub keepalive_linger: Duration,
    pub connect_timeout: Duration,
    /// Age after which an upstream host's cached addresses are refreshed in the background (see `resolve`).
    pub dns_refresh: Duration,
    pub upstream_response_timeout: Duration,
    pub upstream_read_timeout: Duration,
    pub error_body_max_bytes: usize,
    /// Consecutive bad keys from one IP before it is blocked; 0 disables blocking.
    pub max_bad_keys: u32,
    pub block_duration: Duration,
    pub max_tracked_clients: usize,
    /// Peers whose `X-Forwarded-For` is believed (load balancers in front of the proxy); empty: none.
    pub trusted_proxies: Vec<Cidr>,
    /// Admin endpoints served (`healthz`, `readyz`, `metrics`); the others answer 404.
    pub admin_endpoints: Vec<String>,
    /// Serve the admin endpoints here instead of on `listen`.
    pub admin_listen: Option<SocketAddr>,
    /// Extra root CAs for upstream TLS (from `ca_bundle`), with the system's bundle; None: the built-in roots.
    pub upstream_roots: Option<Vec<ureq::tls::Certificate<'static>>>,
    /// How upstream connections leave the host.
    pub egress_proxy: EgressProxy,
    /// HTTPS for clients (`tls_cert` + `tls_key`); None: plain HTTP.
    pub client_tls: Option<Arc<rustls::ServerConfig>>,
    /// `LOG_FORMAT=json`: access lines as JSON objects.
    pub access_log_json: bool,
    /// `RUST_LOG`: one level name for the whole proxy (ureq and rustls stay at warn at most).
    pub log_level: log::LevelFilter,
    /// On SIGTERM/SIGINT: stop accepting, finish requests in flight for at most this long, exit 0.
    pub drain: Duration,
    pub routing: Routing,
}

/// Settings from the command line as typed; `None` means "not given". They are checked with the rest of the
/// configuration, so that an error names the flag.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config_path: Option<PathBuf>,
    pub listen: Option<String>,
    pub workers: Option<String>,
}

/// A configuration problem, phrased so that the user can fix it: where the value came from (the file and the
/// field, the environment variable or the flag), what is wrong, and the fix:
/// `config file a.json, field instances[1].weight: 0 is out of range; fix: use 1 to 1000`.
/// Never carries a key: the constructors' callers never format one.
#[derive(Debug)]
pub struct ConfigError {
    pub message: String,
}

impl ConfigError {
    /// A problem with `field` of the config file at `file` (`""`: the file as a whole).
    pub fn in_file(file: &Path, field: &str, problem: impl fmt::Display, fix: impl fmt::Display) -> ConfigError {
        match field {
            "" => ConfigError::new(format_args!("config file {}", file.display()), problem, fix),
            f => ConfigError::new(format_args!("config file {}, field {f}", file.display()), problem, fix),
        }
    }

    /// A problem with the value of an environment variable.
    pub fn in_env(var: &str, problem: impl fmt::Display, fix: impl fmt::Display) -> ConfigError {
        ConfigError::new(format_args!("environment variable {var}"), problem, fix)
    }

    /// A problem with the value of a command-line flag.
    pub fn in_flag(flag: &str, problem: impl fmt::Display, fix: impl fmt::Display) -> ConfigError {
        ConfigError::new(format_args!("flag {flag}"), problem, fix)
    }

    fn new(origin: impl fmt::Display, problem: impl fmt::Display, fix: impl fmt::Display) -> ConfigError {
        ConfigError { message: format!("{origin}: {problem}; fix: {fix}") }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Where each setting can come from, so that the loader can be tested without touching the real environment.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Config {
    /// Loads the file named by `--config`, else `AZURE_PROXY_CONFIG`, else `azure_instances.json`, then applies the
    /// environment and the flags.
    pub fn load(overrides: &Overrides, env: &dyn Env) -> Result<Config, ConfigError> {
        let (path, from) = match (&overrides.config_path, env.var("AZURE_PROXY_CONFIG")) {
            (Some(p), _) => (p.clone(), "from --config"),
            (None, Some(p)) => (PathBuf::from(p), "from AZURE_PROXY_CONFIG"),
            (None, None) => (PathBuf::from(DEFAULT_CONFIG_PATH), "the default path"),
        };
        let text = read_file(&path).map_err(|problem| {
            let fix = "point --config or AZURE_PROXY_CONFIG at the JSON config file \
                       (azure_instances.example.json shows the format)";
            ConfigError::in_file(&path, "", format_args!("{problem} ({from})"), fix)
        })?;
        Config::from_json(&text, &path, overrides, env)
    }

    /// The warning that a configuration without `client_keys` deserves, logged at start and by `--check-config`.
    pub fn open_access_warning(&self) -> Option<String> {
        self.client_keys.is_empty().then(|| {
            format!(
                "NO CLIENT KEY ALLOWLIST: any non-empty key in header {} is accepted. \
                 Set client_keys in the config file to restrict access.",
                self.client_header_name
            )
        })
    }

    /// Every secret the proxy holds, for scrubbing text that came from outside before it is logged.
    pub fn secrets(&self) -> Vec<String> {
        let upstream = self.instances.iter().filter_map(|i| match &i.credential {
            Credential::Key(k) => Some(k.expose().to_string()),
            Credential::Entra(auth) => match &auth.flow {
                EntraFlow::ClientSecret { secret, .. } => Some(secret.expose().to_string()),
                EntraFlow::ManagedIdentity { endpoint: ManagedIdentityEndpoint::AppService { header, .. }, .. } => {
                    Some(header.expose().to_string())
                }
                _ => None,
            },
        });
        let clients = self.client_keys.iter().filter_map(|k| k.plain.as_ref()).map(|k| k.expose().to_string());
        upstream.chain(clients).collect()
    }
}

/// The config file's text, or what keeps it from being read, in words.
fn read_file(path: &Path) -> Result<String, String> {
    if path.is_dir() {
        return Err("is a directory, not a file".to_string());
    }
    std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "does not exist".to_string(),
        std::io::ErrorKind::InvalidData => "is not UTF-8 text".to_string(),
        _ => format!("cannot be read: {e}"),
    })
}

/// How upstream connections leave the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EgressProxy {
    /// Straight to the instance (the default: `HTTPS_PROXY` and friends are ignored unless asked for).
    Direct,
    /// Through the proxy named by `ALL_PROXY`/`HTTPS_PROXY`/`HTTP_PROXY` (and `NO_PROXY`), read at start.
    FromEnvironment,
    /// Through this HTTP CONNECT proxy (it may carry credentials, hence `Secret`).
    Url(Secret),
}

/// RFC 9110 `tchar`.
pub fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}
