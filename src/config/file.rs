//! The JSON file as users write it (`FileConfig`), and its validation into a [`Config`]: every field checked,
//! every default filled in, every error naming the file, the field, what is wrong and the fix. Reading the JSON
//! (types, unknown fields) is `json.rs`'s; the environment and the flags are applied by `overlay.rs`.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::json::{self, Object};
use super::*;
use crate::client_ip::Cidr;
use crate::http::client_stream::server_config;

const FILE_FIELDS: &[&str] = &[
    "instances",
    "header_name",
    "client_header_name",
    "client_keys",
    "listen",
    "workers",
    "idle_workers",
    "worker_idle_ms",
    "queue_size",
    "queue_timeout_ms",
    "listen_backlog",
    "upstream_idle_per_instance",
    "max_connections",
    "max_head_bytes",
    "max_headers",
    "max_body_bytes",
    "head_timeout_ms",
    "idle_timeout_ms",
    "body_read_timeout_ms",
    "client_write_timeout_ms",
    "keepalive_linger_ms",
    "connect_timeout_ms",
    "upstream_response_timeout_ms",
    "upstream_read_timeout_ms",
    "error_body_max_bytes",
    "max_bad_keys",
    "block_seconds",
    "max_tracked_clients",
    "trusted_proxies",
    "drain_seconds",
    "admin_endpoints",
    "admin_listen",
    "ca_bundle",
    "egress_proxy",
    "tls_cert",
    "tls_key",
    "max_attempts",
    "attempt_deadline_ms",
    "cooldown_ms",
    "max_cooldown_ms",
    "circuit_failures",
    "circuit_open_ms",
    "circuit_max_open_ms",
];

const INSTANCE_FIELDS: &[&str] = &[
    "endpoint",
    "api_key",
    "api_key_env",
    "name",
    "priority",
    "weight",
    "deployments",
    "deployments_only",
    "api_version",
    "connect_timeout_ms",
    "upstream_response_timeout_ms",
    "upstream_read_timeout_ms",
];

const INSTANCE_EXAMPLE: &str = r#"{"endpoint": "https://eastus-xyz.openai.azure.com", "api_key": "…"}"#;

/// The JSON file as written by users (`FILE_FIELDS`). Optional fields fall back to the defaults in `mod.rs`.
pub(super) struct FileConfig {
    instances: Vec<FileInstance>,
    header_name: Option<String>,
    client_header_name: Option<String>,
    client_keys: Option<Vec<String>>,
    pub listen: Option<String>,
    pub workers: Option<usize>,
    idle_workers: Option<usize>,
    worker_idle_ms: Option<u64>,
    queue_size: Option<usize>,
    queue_timeout_ms: Option<u64>,
    listen_backlog: Option<u32>,
    upstream_idle_per_instance: Option<usize>,
    max_connections: Option<usize>,
    max_head_bytes: Option<usize>,
    max_headers: Option<usize>,
    max_body_bytes: Option<u64>,
    head_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    body_read_timeout_ms: Option<u64>,
    client_write_timeout_ms: Option<u64>,
    keepalive_linger_ms: Option<u64>,
    connect_timeout_ms: Option<u64>,
    upstream_response_timeout_ms: Option<u64>,
    upstream_read_timeout_ms: Option<u64>,
    pub error_body_max_bytes: Option<usize>,
    pub max_bad_keys: Option<u32>,
    pub block_seconds: Option<u64>,
    max_tracked_clients: Option<usize>,
    trusted_proxies: Option<Vec<String>>,
    drain_seconds: Option<u64>,
    admin_endpoints: Option<Vec<String>>,
    admin_listen: Option<String>,
    ca_bundle: Option<PathBuf>,
    egress_proxy: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    max_attempts: Option<usize>,
    attempt_deadline_ms: Option<u64>,
    cooldown_ms: Option<u64>,
    max_cooldown_ms: Option<u64>,
    circuit_failures: Option<u32>,
    circuit_open_ms: Option<u64>,
    circuit_max_open_ms: Option<u64>,
}

/// One entry of `instances` (`INSTANCE_FIELDS`).
struct FileInstance {
    endpoint: String,
    api_key: Option<String>,
    api_key_env: Option<String>,
    name: Option<String>,
    priority: Option<u32>,
    weight: Option<u32>,
    deployments: Option<BTreeMap<String, String>>,
    deployments_only: Option<bool>,
    api_version: Option<String>,
    connect_timeout_ms: Option<u64>,
    upstream_response_timeout_ms: Option<u64>,
    upstream_read_timeout_ms: Option<u64>,
}

impl FileConfig {
    fn read(text: &str, file: &Path) -> Result<FileConfig, ConfigError> {
        let mut o = json::parse(text, file, FILE_FIELDS)?;
        let instances = o.objects("instances", INSTANCE_FIELDS)?.ok_or_else(|| {
            o.error(
                "instances",
                "missing: the proxy needs at least one instance",
                format!("add \"instances\": [{INSTANCE_EXAMPLE}]"),
            )
        })?;
        Ok(FileConfig {
            instances: instances.into_iter().map(FileInstance::read).collect::<Result<_, _>>()?,
            header_name: o.string("header_name")?,
            client_header_name: o.string("client_header_name")?,
            client_keys: o.secrets("client_keys")?,
            listen: o.string("listen")?,
            workers: o.number("workers")?,
            idle_workers: o.number("idle_workers")?,
            worker_idle_ms: o.number("worker_idle_ms")?,
            queue_size: o.number("queue_size")?,
            queue_timeout_ms: o.number("queue_timeout_ms")?,
            listen_backlog: o.number("listen_backlog")?,
            upstream_idle_per_instance: o.number("upstream_idle_per_instance")?,
            max_connections: o.number("max_connections")?,
            max_head_bytes: o.number("max_head_bytes")?,
            max_headers: o.number("max_headers")?,
            max_body_bytes: o.number("max_body_bytes")?,
            head_timeout_ms: o.number("head_timeout_ms")?,
            idle_timeout_ms: o.number("idle_timeout_ms")?,
            body_read_timeout_ms: o.number("body_read_timeout_ms")?,
            client_write_timeout_ms: o.number("client_write_timeout_ms")?,
            keepalive_linger_ms: o.number("keepalive_linger_ms")?,
            connect_timeout_ms: o.number("connect_timeout_ms")?,
            upstream_response_timeout_ms: o.number("upstream_response_timeout_ms")?,
            upstream_read_timeout_ms: o.number("upstream_read_timeout_ms")?,
            error_body_max_bytes: o.number("error_body_max_bytes")?,
            max_bad_keys: o.number("max_bad_keys")?,
            block_seconds: o.number("block_seconds")?,
            max_tracked_clients: o.number("max_tracked_clients")?,
            trusted_proxies: o.strings("trusted_proxies")?,
            drain_seconds: o.number("drain_seconds")?,
            admin_endpoints: o.strings("admin_endpoints")?,
            admin_listen: o.string("admin_listen")?,
            ca_bundle: o.string("ca_bundle")?.map(PathBuf::from),
            egress_proxy: o.secret("egress_proxy")?,
            tls_cert: o.string("tls_cert")?.map(PathBuf::from),
            tls_key: o.string("tls_key")?.map(PathBuf::from),
            max_attempts: o.number("max_attempts")?,
            attempt_deadline_ms: o.number("attempt_deadline_ms")?,
            cooldown_ms: o.number("cooldown_ms")?,
            max_cooldown_ms: o.number("max_cooldown_ms")?,
            circuit_failures: o.number("circuit_failures")?,
            circuit_open_ms: o.number("circuit_open_ms")?,
            circuit_max_open_ms: o.number("circuit_max_open_ms")?,
        })
    }
}

impl FileInstance {
    fn read(mut o: Object<'_>) -> Result<FileInstance, ConfigError> {
        let endpoint = o.string("endpoint")?;
        let endpoint = endpoint.ok_or_else(|| {
            o.error(
                "endpoint",
                "missing",
                "add the resource URL, e.g. \"endpoint\": \"https://eastus-xyz.openai.azure.com\"",
            )
        })?;
        Ok(FileInstance {
            endpoint,
            api_key: o.secret("api_key")?,
            api_key_env: o.string("api_key_env")?,
            name: o.string("name")?,
            priority: o.number("priority")?,
            weight: o.number("weight")?,
            deployments: o.string_map("deployments")?,
            deployments_only: o.boolean("deployments_only")?,
            api_version: o.string("api_version")?,
            connect_timeout_ms: o.number("connect_timeout_ms")?,
            upstream_response_timeout_ms: o.number("upstream_response_timeout_ms")?,
            upstream_read_timeout_ms: o.number("upstream_read_timeout_ms")?,
        })
    }
}

impl Config {
    /// Parses and validates `text` as if it were the file at `path` (used in messages only), then applies the
    /// environment and the flags.
    pub fn from_json(text: &str, path: &Path, overrides: &Overrides, env: &dyn Env) -> Result<Config, ConfigError> {
        let raw = FileConfig::read(text, path)?;
        let check = Check { file: path };
        let instances = check.instances(&raw.instances, env)?;
        let routing = check.routing(&raw, instances.len())?;
        let set = overlay::apply(&raw, path, overrides, env)?;
        let (header_name, client_header_name, client_keys) = check.client_side(&raw)?;
        let positive = |v: Option<usize>, default: usize, field: &str| check.positive(v.unwrap_or(default), field);
        let ms = |v: Option<u64>, default: u64, field: &str| check.ms(v.unwrap_or(default), field);
        Ok(Config {
            instances,
            header_name,
            client_header_name,
            client_keys,
            listen: set.listen,
            workers: set.workers,
            idle_workers: check.idle_workers(raw.idle_workers, set.workers)?,
            worker_idle: ms(raw.worker_idle_ms, DEFAULT_WORKER_IDLE_MS, "worker_idle_ms")?,
            queue_size: positive(raw.queue_size, DEFAULT_QUEUE_SIZE, "queue_size")?,
            queue_timeout: ms(raw.queue_timeout_ms, DEFAULT_QUEUE_TIMEOUT_MS, "queue_timeout_ms")?,
            listen_backlog: check.listen_backlog(raw.listen_backlog)?,
            upstream_idle_per_instance: raw.upstream_idle_per_instance.unwrap_or(DEFAULT_UPSTREAM_IDLE_PER_INSTANCE),
            max_connections: positive(raw.max_connections, DEFAULT_MAX_CONNECTIONS, "max_connections")?,
            max_head_bytes: positive(raw.max_head_bytes, DEFAULT_MAX_HEAD_BYTES, "max_head_bytes")?,
            max_headers: positive(raw.max_headers, DEFAULT_MAX_HEADERS, "max_headers")?,
            max_body_bytes: raw.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES),
            head_timeout: ms(raw.head_timeout_ms, DEFAULT_HEAD_TIMEOUT_MS, "head_timeout_ms")?,
            idle_timeout: ms(raw.idle_timeout_ms, DEFAULT_IDLE_TIMEOUT_MS, "idle_timeout_ms")?,
            body_read_timeout: ms(raw.body_read_timeout_ms, DEFAULT_BODY_READ_TIMEOUT_MS, "body_read_timeout_ms")?,
            client_write_timeout: ms(
                raw.client_write_timeout_ms,
                DEFAULT_CLIENT_WRITE_TIMEOUT_MS,
                "client_write_timeout_ms",
            )?,
            keepalive_linger: Duration::from_millis(raw.keepalive_linger_ms.unwrap_or(DEFAULT_KEEPALIVE_LINGER_MS)),
            connect_timeout: ms(raw.connect_timeout_ms, DEFAULT_CONNECT_TIMEOUT_MS, "connect_timeout_ms")?,
            upstream_response_timeout: ms(
                raw.upstream_response_timeout_ms,
                DEFAULT_UPSTREAM_RESPONSE_TIMEOUT_MS,
                "upstream_response_timeout_ms",
            )?,
            upstream_read_timeout: ms(
                raw.upstream_read_timeout_ms,
                DEFAULT_UPSTREAM_READ_TIMEOUT_MS,
                "upstream_read_timeout_ms",
            )?,
            error_body_max_bytes: set.error_body_max_bytes,
            max_bad_keys: set.max_bad_keys,
            block_duration: set.block_duration,
            max_tracked_clients: positive(raw.max_tracked_clients, DEFAULT_MAX_TRACKED_CLIENTS, "max_tracked_clients")?,
            trusted_proxies: check.trusted_proxies(&raw)?,
            drain: Duration::from_secs(raw.drain_seconds.unwrap_or(DEFAULT_DRAIN_SECONDS)),
            admin_endpoints: check.admin_endpoints(&raw)?,
            admin_listen: check.admin_listen(&raw)?,
            upstream_roots: check.ca_bundle(&raw, env)?,
            egress_proxy: check.egress_proxy(&raw)?,
            client_tls: check.client_tls(&raw)?,
            access_log_json: set.access_log_json,
            log_level: set.log_level,
            routing,
        })
    }
}

/// The checks of the file's fields, by concern; each error names the file and the field.
struct Check<'a> {
    file: &'a Path,
}

impl Check<'_> {
    fn error(&self, field: &str, problem: impl fmt::Display, fix: impl fmt::Display) -> ConfigError {
        ConfigError::in_file(self.file, field, problem, fix)
    }

    fn positive(&self, v: usize, field: &str) -> Result<usize, ConfigError> {
        match v {
            0 => Err(self.error(
                field,
                "must be greater than 0",
                "use a whole number of 1 or more, or remove it for the default",
            )),
            v => Ok(v),
        }
    }

    fn idle_workers(&self, v: Option<usize>, workers: usize) -> Result<usize, ConfigError> {
        match v {
            Some(n) if n > workers => Err(self.error(
                "idle_workers",
                format!("{n} is more than workers ({workers}), the most threads there can be"),
                format!("use at most {workers}, or raise workers"),
            )),
            Some(n) => Ok(n),
            None => Ok(DEFAULT_IDLE_WORKERS.min(workers)),
        }
    }

    fn listen_backlog(&self, v: Option<u32>) -> Result<u32, ConfigError> {
        match v {
            Some(n) if !(1..=MAX_LISTEN_BACKLOG).contains(&n) => Err(self.error(
                "listen_backlog",
                format!("{n} is out of range"),
                format!("use 1 to {MAX_LISTEN_BACKLOG} (the kernel also caps it at net.core.somaxconn)"),
            )),
            Some(n) => Ok(n),
            None => Ok(DEFAULT_LISTEN_BACKLOG),
        }
    }

    fn ms(&self, v: u64, field: &str) -> Result<Duration, ConfigError> {
        match v {
            0 => Err(self.error(
                field,
                "must be greater than 0",
                "use a number of milliseconds of 1 or more, or remove it for the default",
            )),
            n => Ok(Duration::from_millis(n)),
        }
    }

    fn instances(&self, raw: &[FileInstance], env: &dyn Env) -> Result<Vec<Instance>, ConfigError> {
        if raw.is_empty() {
            return Err(self.error(
                "instances",
                "the list is empty",
                format!("add at least one instance, e.g. {INSTANCE_EXAMPLE}"),
            ));
        }
        let mut instances = Vec::with_capacity(raw.len());
        let mut names = HashMap::new();
        for (i, inst) in raw.iter().enumerate() {
            let instance = self.instance(i, inst, env)?;
            if let Some(first) = names.insert(instance.name.clone(), i) {
                return Err(self.error(
                    &format!("instances[{i}].name"),
                    format!("{:?} is already the name of instances[{first}]", instance.name),
                    "give each instance a unique name (by default it is the endpoint's host)",
                ));
            }
            instances.push(instance);
        }
        let mut tier_weights: BTreeMap<u32, u32> = BTreeMap::new();
        for inst in &instances {
            *tier_weights.entry(inst.priority).or_default() += inst.weight;
        }
        if let Some((tier, sum)) = tier_weights.iter().find(|(_, w)| **w > MAX_TIER_WEIGHT) {
            return Err(self.error(
                "instances[].weight",
                format!("the weights in priority tier {tier} add up to {sum}, more than {MAX_TIER_WEIGHT}"),
                format!("lower the weights of that tier's instances to {MAX_TIER_WEIGHT} in all"),
            ));
        }
        Ok(instances)
    }

    fn instance(&self, i: usize, inst: &FileInstance, env: &dyn Env) -> Result<Instance, ConfigError> {
        let at = |f: &str| format!("instances[{i}].{f}");
        let (endpoint, host) =
            normalize_endpoint(&inst.endpoint).map_err(|(problem, fix)| self.error(&at("endpoint"), problem, fix))?;
        let api_key = self.api_key(i, inst, env)?;
        let name = inst.name.clone().unwrap_or(host);
        if name.is_empty() {
            return Err(self.error(
                &at("name"),
                "is empty",
                "give a name, or remove the field to use the endpoint's host",
            ));
        }
        let weight = inst.weight.unwrap_or(1);
        if weight == 0 || weight > 1000 {
            return Err(self.error(&at("weight"), format!("{weight} is out of range"), "use 1 to 1000"));
        }
        let deployments = inst.deployments.clone().unwrap_or_default();
        for (from, to) in &deployments {
            if !is_path_segment(from) || !is_path_segment(to) {
                return Err(self.error(
                    &at("deployments"),
                    format!("{from:?} -> {to:?} is not a pair of deployment names"),
                    "use non-empty names of letters, digits, '-', '_' and '.' only",
                ));
            }
        }
        if let Some(v) = &inst.api_version {
            if !is_path_segment(v) {
                return Err(self.error(
                    &at("api_version"),
                    format!("{v:?} is not an api-version"),
                    "use e.g. 2024-06-01",
                ));
            }
        }
        let opt_ms = |v: Option<u64>, f: &str| v.map(|v| self.ms(v, &at(f))).transpose();
        Ok(Instance {
            name,
            endpoint,
            api_key: Secret::new(api_key),
            priority: inst.priority.unwrap_or(0),
            weight,
            deployments,
            deployments_only: inst.deployments_only.unwrap_or(false),
            api_version: inst.api_version.clone(),
            connect_timeout: opt_ms(inst.connect_timeout_ms, "connect_timeout_ms")?,
            upstream_response_timeout: opt_ms(inst.upstream_response_timeout_ms, "upstream_response_timeout_ms")?,
            upstream_read_timeout: opt_ms(inst.upstream_read_timeout_ms, "upstream_read_timeout_ms")?,
        })
    }

    /// The instance key from `api_key` or from the variable `api_key_env` names. Neither error shows the key.
    fn api_key(&self, i: usize, inst: &FileInstance, env: &dyn Env) -> Result<String, ConfigError> {
        let at = |f: &str| format!("instances[{i}].{f}");
        let bad = "is empty or holds characters not allowed in an HTTP header (control characters, non-ASCII)";
        match (&inst.api_key, &inst.api_key_env) {
            (Some(key), None) if key.trim().is_empty() || !is_header_value(key) => {
                Err(self.error(&at("api_key"), bad, "paste the key exactly as the Azure portal shows it"))
            }
            (Some(key), None) => Ok(key.clone()),
            (None, Some(var)) if var.trim().is_empty() => Err(self.error(
                &at("api_key_env"),
                "is empty",
                "name the environment variable that holds the key, e.g. \"EASTUS_API_KEY\"",
            )),
            (None, Some(var)) => match env.var(var) {
                None => Err(self.error(
                    &at("api_key_env"),
                    format!("environment variable {var} is not set"),
                    format!("export {var} with the instance key, or give the key as api_key"),
                )),
                Some(key) if key.trim().is_empty() || !is_header_value(&key) => Err(ConfigError::in_env(
                    &format!("{var} (named by {} in config file {})", at("api_key_env"), self.file.display()),
                    bad,
                    format!("set {var} to the key exactly as the Azure portal shows it"),
                )),
                Some(key) => Ok(key),
            },
            (Some(_), Some(_)) => {
                Err(self.error(&at("api_key"), "both api_key and api_key_env are given", "keep only one of them"))
            }
            (None, None) => Err(self.error(
                &at("api_key"),
                "missing",
                "give the instance key as api_key, or name an environment variable holding it in api_key_env",
            )),
        }
    }

    fn routing(&self, raw: &FileConfig, instances: usize) -> Result<Routing, ConfigError> {
        Ok(Routing {
            max_attempts: match raw.max_attempts {
                Some(0) => {
                    return Err(self.error(
                        "max_attempts",
                        "must be greater than 0",
                        "use 1 or more, or remove it to try every instance",
                    ))
                }
                Some(n) => n.min(instances),
                None => instances,
            },
            attempt_deadline: raw.attempt_deadline_ms.filter(|ms| *ms > 0).map(Duration::from_millis),
            default_cooldown: Duration::from_millis(raw.cooldown_ms.unwrap_or(DEFAULT_COOLDOWN_MS)),
            max_cooldown: Duration::from_millis(raw.max_cooldown_ms.unwrap_or(DEFAULT_MAX_COOLDOWN_MS)),
            circuit_failures: raw.circuit_failures.unwrap_or(DEFAULT_CIRCUIT_FAILURES),
            circuit_open: Duration::from_millis(raw.circuit_open_ms.unwrap_or(DEFAULT_CIRCUIT_OPEN_MS).max(1)),
            circuit_max_open: Duration::from_millis(
                raw.circuit_max_open_ms.unwrap_or(DEFAULT_CIRCUIT_MAX_OPEN_MS).max(1),
            ),
        })
    }

    /// The header names and the client allowlist. An error about a client key never shows the key.
    fn client_side(&self, raw: &FileConfig) -> Result<(String, String, Vec<Secret>), ConfigError> {
        let header = |v: &Option<String>, field: &str| {
            header_name(v).map_err(|problem| self.error(field, problem, "use a header name such as \"api-key\""))
        };
        let key_header = header(&raw.header_name, "header_name")?;
        let client_header = header(&raw.client_header_name, "client_header_name")?;
        let mut client_keys = Vec::new();
        for (i, k) in raw.client_keys.iter().flatten().enumerate() {
            if k.is_empty() {
                return Err(self.error(&format!("client_keys[{i}]"), "is an empty key", "remove it"));
            }
            client_keys.push(Secret::new(k.clone()));
        }
        Ok((key_header, client_header, client_keys))
    }

    fn trusted_proxies(&self, raw: &FileConfig) -> Result<Vec<Cidr>, ConfigError> {
        let fix = "use an address such as 10.0.0.5 or a block such as 10.0.0.0/8";
        let texts = raw.trusted_proxies.iter().flatten().enumerate();
        texts
            .map(|(i, text)| Cidr::parse(text).map_err(|m| self.error(&format!("trusted_proxies[{i}]"), m, fix)))
            .collect()
    }

    fn admin_endpoints(&self, raw: &FileConfig) -> Result<Vec<String>, ConfigError> {
        let endpoints = raw.admin_endpoints.clone().unwrap_or_else(|| ADMIN_ENDPOINTS.map(String::from).to_vec());
        match endpoints.iter().position(|e| !ADMIN_ENDPOINTS.contains(&e.as_str())) {
            Some(i) => Err(self.error(
                &format!("admin_endpoints[{i}]"),
                format!("{:?} is not an admin endpoint", endpoints[i]),
                format!("use some of {}", ADMIN_ENDPOINTS.join(", ")),
            )),
            None => Ok(endpoints),
        }
    }

    fn admin_listen(&self, raw: &FileConfig) -> Result<Option<SocketAddr>, ConfigError> {
        raw.admin_listen
            .as_ref()
            .map(|a| {
                a.parse::<SocketAddr>().map_err(|_| {
                    self.error("admin_listen", format!("{a:?} is not an IP:PORT address"), "use e.g. 127.0.0.1:9090")
                })
            })
            .transpose()
    }

    fn ca_bundle(
        &self,
        raw: &FileConfig,
        env: &dyn Env,
    ) -> Result<Option<Vec<ureq::tls::Certificate<'static>>>, ConfigError> {
        let fix = "point ca_bundle at a readable PEM file of CA certificates";
        raw.ca_bundle
            .as_ref()
            .map(|path| load_roots(path, env).map_err(|m| self.error("ca_bundle", m, fix)))
            .transpose()
    }

    /// Never shows the URL: it may carry credentials.
    fn egress_proxy(&self, raw: &FileConfig) -> Result<EgressProxy, ConfigError> {
        Ok(match raw.egress_proxy.as_deref().map(str::trim) {
            None | Some("") | Some("none") => EgressProxy::Direct,
            Some("env") => EgressProxy::FromEnvironment,
            Some(url) => {
                ureq::Proxy::new(url).map_err(|e| {
                    self.error("egress_proxy", e, "use http://host:port (or \"env\" for HTTPS_PROXY/ALL_PROXY)")
                })?;
                EgressProxy::Url(Secret::new(url))
            }
        })
    }

    fn client_tls(&self, raw: &FileConfig) -> Result<Option<Arc<rustls::ServerConfig>>, ConfigError> {
        let fix = "give tls_cert a PEM certificate chain and tls_key its PEM private key";
        match (&raw.tls_cert, &raw.tls_key) {
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => match server_config(cert, key) {
                Ok(c) => Ok(Some(Arc::new(c))),
                Err((field, problem)) => Err(self.error(field, problem, fix)),
            },
            (Some(_), None) => Err(self.error(
                "tls_cert",
                "is given without tls_key",
                "give both tls_cert and tls_key (PEM files), or neither",
            )),
            (None, Some(_)) => Err(self.error(
                "tls_key",
                "is given without tls_cert",
                "give both tls_cert and tls_key (PEM files), or neither",
            )),
        }
    }
}

/// The certificates of `ca_bundle`, plus the system's bundle (`SSL_CERT_FILE`, else Debian's path) when there is
/// one: the built-in Mozilla roots cannot be combined with extra ones, and a private CA must not cut the proxy
/// off from public endpoints.
fn load_roots(path: &Path, env: &dyn Env) -> Result<Vec<ureq::tls::Certificate<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut certs = pem_certificates(&pem);
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    let system = env.var("SSL_CERT_FILE").unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".to_string());
    if let Ok(pem) = std::fs::read(&system) {
        certs.extend(pem_certificates(&pem));
    }
    Ok(certs)
}

fn pem_certificates(pem: &[u8]) -> Vec<ureq::tls::Certificate<'static>> {
    ureq::tls::parse_pem(pem)
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect()
}

/// `https://host[:port][/]` → (`https://host[:port]`, `host[:port]`), the second being the default instance name
/// (just the host for Azure endpoints, which have no port). A path, query or user-info would be silently
/// combined with the client's path, so they are refused rather than guessed at.
fn normalize_endpoint(raw: &str) -> Result<(String, String), (String, &'static str)> {
    let trimmed = raw.trim().trim_end_matches('/');
    let fix = "write only the resource URL, e.g. https://eastus-xyz.openai.azure.com";
    let rest = trimmed
        .strip_prefix("https://")
        .or_else(|| trimmed.strip_prefix("http://"))
        .ok_or_else(|| (format!("{raw:?} does not start with https:// (or http:// for local testing)"), fix))?;
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
        return Err((format!("{raw:?} is not a bare scheme://host[:port]"), fix));
    }
    let host = match rest.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default().to_string(),
        None => rest.split(':').next().unwrap_or_default().to_string(),
    };
    if host.is_empty() {
        return Err((format!("{raw:?} has no host"), fix));
    }
    let authority = rest.to_string();
    trimmed.parse::<ureq::http::Uri>().map_err(|e| (format!("{raw:?} is not a valid URL ({e})"), fix))?;
    Ok((trimmed.to_string(), authority))
}

fn header_name(value: &Option<String>) -> Result<String, String> {
    let name = value.as_deref().unwrap_or(DEFAULT_HEADER_NAME).to_ascii_lowercase();
    if name.is_empty() || !name.bytes().all(is_token_byte) {
        return Err(format!("{name:?} is not a valid HTTP header name"));
    }
    Ok(name)
}

/// A deployment name or api-version: safe to splice into a path or query as it is.
fn is_path_segment(v: &str) -> bool {
    !v.is_empty()
        && v != "."
        && v != ".."
        && v.len() <= 128
        && v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn is_header_value(v: &str) -> bool {
    v.bytes().all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct MapEnv(HashMap<&'static str, &'static str>);
    impl Env for MapEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|v| v.to_string())
        }
    }

    fn parse(text: &str, env: &[(&'static str, &'static str)]) -> Result<Config, ConfigError> {
        let env = MapEnv(env.iter().cloned().collect());
        Config::from_json(text, Path::new("test.json"), &Overrides::default(), &env)
    }

    const ORIGINAL: &str = r#"{ "instances": [ { "endpoint": "https://eastus-xyz.openai.azure.com/", "api_key": "XXXX" },
        { "endpoint": "https://westus-xyz.openai.azure.com", "api_key": "YYYY" } ],
        "header_name": "api-key", "client_header_name": "api-key", "client_keys": ["my-key-1", "my-key-2"] }"#;

    #[test]
    fn original_format_loads_with_defaults() {
        let c = parse(ORIGINAL, &[]).expect("valid");
        assert_eq!(c.instances.len(), 2);
        assert_eq!(c.instances[0].endpoint, "https://eastus-xyz.openai.azure.com");
        assert_eq!(c.instances[0].name, "eastus-xyz.openai.azure.com");
        assert_eq!(c.client_keys.len(), 2);
        assert_eq!(c.listen, "0.0.0.0:8000".parse().expect("addr"));
        assert_eq!(c.max_bad_keys, 5);
        assert_eq!(c.block_duration, Duration::from_secs(300));
        assert_eq!(c.error_body_max_bytes, 2048);
        assert_eq!(c.max_body_bytes, 32 * 1024 * 1024);
    }

    #[test]
    fn environment_overrides_file() {
        let c = parse(ORIGINAL, &[("MAX_BAD_KEYS", "2"), ("BLOCK_SECONDS", "7"), ("ERROR_BODY_MAX_BYTES", "10")])
            .expect("valid");
        assert_eq!((c.max_bad_keys, c.block_duration.as_secs(), c.error_body_max_bytes), (2, 7, 10));
        let e = parse(ORIGINAL, &[("MAX_BAD_KEYS", "lots")]).expect_err("not a number");
        assert!(e.message.contains("MAX_BAD_KEYS"), "{}", e.message);
    }

    #[test]
    fn flags_override_environment() {
        let env = MapEnv([("AZURE_PROXY_LISTEN", "127.0.0.1:1"), ("AZURE_PROXY_WORKERS", "3")].into());
        let o = Overrides { listen: Some("127.0.0.1:2".into()), ..Default::default() };
        let c = Config::from_json(ORIGINAL, Path::new("t.json"), &o, &env).expect("valid");
        assert_eq!(c.listen.port(), 2);
        assert_eq!(c.workers, 3);
    }

    #[test]
    fn typo_in_field_name_is_an_error_that_names_it() {
        let e =
            parse(r#"{"instances": [{"endpoint": "https://a.example", "api_key": "k"}], "client_key": ["x"]}"#, &[])
                .expect_err("unknown field");
        assert!(e.message.contains("test.json") && e.message.contains("client_key"), "{}", e.message);
    }

    #[test]
    fn api_key_env_reads_the_environment() {
        let text = r#"{"instances": [{"endpoint": "https://a.example", "api_key_env": "EAST_KEY"}]}"#;
        let c = parse(text, &[("EAST_KEY", "sekrit")]).expect("valid");
        assert_eq!(c.instances[0].api_key.expose(), "sekrit");
        let e = parse(text, &[]).expect_err("unset variable");
        assert!(e.message.contains("instances[0].api_key_env") && e.message.contains("EAST_KEY"), "{}", e.message);
    }

    #[test]
    fn bad_endpoints_are_refused_with_the_field() {
        for bad in ["eastus.openai.azure.com", "https://a.example/openai", "ftp://a.example", "https://", "https://u@h"]
        {
            let text = format!(r#"{{"instances": [{{"endpoint": "{bad}", "api_key": "k"}}]}}"#);
            let e = parse(&text, &[]).expect_err(bad);
            assert!(e.message.contains("instances[0].endpoint"), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn missing_key_empty_list_and_duplicate_names_are_refused() {
        assert!(parse(r#"{"instances": []}"#, &[]).is_err());
        assert!(parse(r#"{"instances": [{"endpoint": "https://a.example"}]}"#, &[]).is_err());
        let dup = r#"{"instances": [{"endpoint": "https://a.example", "api_key": "k"},
                                     {"endpoint": "https://a.example", "api_key": "j"}]}"#;
        assert!(parse(dup, &[]).expect_err("dup").message.contains("instances[1].name"));
        assert!(
            parse(r#"{"instances": [{"endpoint": "https://a.example", "api_key": "k"}], "workers": 0}"#, &[]).is_err()
        );
    }

    #[test]
    fn secrets_do_not_show_in_debug() {
        let c = parse(ORIGINAL, &[]).expect("valid");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("XXXX") && !dbg.contains("my-key-1"), "{dbg}");
    }
}
