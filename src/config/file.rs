//! The JSON file as users write it (`FileConfig`), and its assembly into a [`Config`]: every default filled in,
//! every field checked (`check.rs`), every error naming the file, the field, what is wrong and the fix. Reading
//! the JSON (types, unknown fields) is `json.rs`'s; the environment and the flags are applied by `overlay.rs`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::check::Check;
use super::json::{self, Object};
use super::*;

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
    "upstream_idle_timeout_ms",
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
    "dns_refresh_ms",
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
    "auth",
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

pub(super) const INSTANCE_EXAMPLE: &str = r#"{"endpoint": "https://eastus-xyz.openai.azure.com", "api_key": "…"}"#;

/// The JSON file as written by users (`FILE_FIELDS`). Optional fields fall back to the defaults in `mod.rs`.
pub(super) struct FileConfig {
    pub(super) instances: Vec<FileInstance>,
    pub(super) header_name: Option<String>,
    pub(super) client_header_name: Option<String>,
    pub(super) client_keys: Option<Vec<client_keys::FileClientKey>>,
    pub(super) listen: Option<String>,
    pub(super) workers: Option<usize>,
    pub(super) idle_workers: Option<usize>,
    pub(super) worker_idle_ms: Option<u64>,
    pub(super) queue_size: Option<usize>,
    pub(super) queue_timeout_ms: Option<u64>,
    pub(super) listen_backlog: Option<u32>,
    pub(super) upstream_idle_per_instance: Option<usize>,
    pub(super) upstream_idle_timeout_ms: Option<u64>,
    pub(super) max_connections: Option<usize>,
    pub(super) max_head_bytes: Option<usize>,
    pub(super) max_headers: Option<usize>,
    pub(super) max_body_bytes: Option<u64>,
    pub(super) head_timeout_ms: Option<u64>,
    pub(super) idle_timeout_ms: Option<u64>,
    pub(super) body_read_timeout_ms: Option<u64>,
    pub(super) client_write_timeout_ms: Option<u64>,
    pub(super) keepalive_linger_ms: Option<u64>,
    pub(super) connect_timeout_ms: Option<u64>,
    pub(super) dns_refresh_ms: Option<u64>,
    pub(super) upstream_response_timeout_ms: Option<u64>,
    pub(super) upstream_read_timeout_ms: Option<u64>,
    pub(super) error_body_max_bytes: Option<usize>,
    pub(super) max_bad_keys: Option<u32>,
    pub(super) block_seconds: Option<u64>,
    pub(super) max_tracked_clients: Option<usize>,
    pub(super) trusted_proxies: Option<Vec<String>>,
    pub(super) drain_seconds: Option<u64>,
    pub(super) admin_endpoints: Option<Vec<String>>,
    pub(super) admin_listen: Option<String>,
    pub(super) ca_bundle: Option<PathBuf>,
    pub(super) egress_proxy: Option<String>,
    pub(super) tls_cert: Option<PathBuf>,
    pub(super) tls_key: Option<PathBuf>,
    pub(super) max_attempts: Option<usize>,
    pub(super) attempt_deadline_ms: Option<u64>,
    pub(super) cooldown_ms: Option<u64>,
    pub(super) max_cooldown_ms: Option<u64>,
    pub(super) circuit_failures: Option<u32>,
    pub(super) circuit_open_ms: Option<u64>,
    pub(super) circuit_max_open_ms: Option<u64>,
}

/// One entry of `instances` (`INSTANCE_FIELDS`).
pub(super) struct FileInstance {
    pub(super) endpoint: String,
    pub(super) api_key: Option<String>,
    pub(super) api_key_env: Option<String>,
    pub(super) auth: Option<entra::FileAuth>,
    pub(super) name: Option<String>,
    pub(super) priority: Option<u32>,
    pub(super) weight: Option<u32>,
    pub(super) deployments: Option<BTreeMap<String, String>>,
    pub(super) deployments_only: Option<bool>,
    pub(super) api_version: Option<String>,
    pub(super) connect_timeout_ms: Option<u64>,
    pub(super) upstream_response_timeout_ms: Option<u64>,
    pub(super) upstream_read_timeout_ms: Option<u64>,
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
            client_keys: client_keys::read(&mut o)?,
            listen: o.string("listen")?,
            workers: o.number("workers")?,
            idle_workers: o.number("idle_workers")?,
            worker_idle_ms: o.number("worker_idle_ms")?,
            queue_size: o.number("queue_size")?,
            queue_timeout_ms: o.number("queue_timeout_ms")?,
            listen_backlog: o.number("listen_backlog")?,
            upstream_idle_per_instance: o.number("upstream_idle_per_instance")?,
            upstream_idle_timeout_ms: o.number("upstream_idle_timeout_ms")?,
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
            dns_refresh_ms: o.number("dns_refresh_ms")?,
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
            auth: o.object("auth", entra::FIELDS, entra::EXAMPLE)?.map(entra::FileAuth::read).transpose()?,
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
        let check = Check::new(path);
        let instances = check.instances(&raw.instances, env)?;
        let routing = check.routing(&raw, instances.len())?;
        let set = overlay::apply(&raw, path, overrides, env)?;
        let (header_name, client_header_name, client_keys) = check.client_side(&raw, env)?;
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
            upstream_idle_timeout: ms(
                raw.upstream_idle_timeout_ms,
                DEFAULT_UPSTREAM_IDLE_TIMEOUT_MS,
                "upstream_idle_timeout_ms",
            )?,
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
            dns_refresh: set.dns_refresh,
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
        assert_eq!(c.dns_refresh, Duration::from_secs(30));
    }

    #[test]
    fn dns_refresh_from_the_file_then_the_environment() {
        let text = ORIGINAL.replacen('{', r#"{"dns_refresh_ms": 5000, "#, 1);
        assert_eq!(parse(&text, &[]).expect("valid").dns_refresh, Duration::from_secs(5));
        let c = parse(&text, &[("AZURE_PROXY_DNS_REFRESH_MS", "250")]).expect("valid");
        assert_eq!(c.dns_refresh, Duration::from_millis(250));
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
        assert_eq!(c.instances[0].credential, Credential::Key(Secret::new("sekrit")));
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
