//! The JSON file as users write it (`FileConfig`), and its validation into a [`Config`]: every field checked,
//! every default filled in, every error naming the file, the field and the fix.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::*;
use crate::client_ip::Cidr;
use crate::http::client_stream::server_config;

/// The JSON file as written by users. Optional fields fall back to the defaults above.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    instances: Vec<FileInstance>,
    header_name: Option<String>,
    client_header_name: Option<String>,
    client_keys: Option<Vec<String>>,
    listen: Option<String>,
    workers: Option<usize>,
    queue_size: Option<usize>,
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
    error_body_max_bytes: Option<usize>,
    max_bad_keys: Option<u32>,
    block_seconds: Option<u64>,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
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

impl Config {
    /// Parses and validates `text` as if it were the file at `path` (used in messages only).
    pub fn from_json(text: &str, path: &Path, overrides: &Overrides, env: &dyn Env) -> Result<Config, ConfigError> {
        let file = path.display();
        let raw: FileConfig =
            serde_json::from_str(text).map_err(|e| ConfigError { message: format!("config file {file}: {e}") })?;
        let err = |field: &str, msg: String| ConfigError { message: format!("config file {file}: {field}: {msg}") };

        if raw.instances.is_empty() {
            return Err(err(
                "instances",
                "the list is empty; add at least one {\"endpoint\": ..., \"api_key\": ...}".into(),
            ));
        }
        let mut instances = Vec::with_capacity(raw.instances.len());
        let mut names = HashSet::new();
        for (i, inst) in raw.instances.into_iter().enumerate() {
            let at = |f: &str| format!("instances[{i}].{f}");
            let (endpoint, host) = normalize_endpoint(&inst.endpoint).map_err(|m| err(&at("endpoint"), m))?;
            let api_key = match (inst.api_key, inst.api_key_env) {
                (Some(k), None) => k,
                (None, Some(var)) => env.var(&var).ok_or_else(|| {
                    err(&at("api_key_env"), format!("environment variable {var} is not set; export it or use api_key"))
                })?,
                (Some(_), Some(_)) => return Err(err(&at("api_key"), "give api_key or api_key_env, not both".into())),
                (None, None) => {
                    return Err(err(
                        &at("api_key"),
                        "missing; give the instance key as api_key or name a variable in api_key_env".into(),
                    ))
                }
            };
            if api_key.trim().is_empty() || !is_header_value(&api_key) {
                return Err(err(&at("api_key"), "empty or contains characters not allowed in an HTTP header".into()));
            }
            let name = inst.name.unwrap_or(host);
            if name.is_empty() || !names.insert(name.clone()) {
                return Err(err(
                    &at("name"),
                    format!("{name:?} is empty or used by another instance; give each instance a unique name"),
                ));
            }
            let weight = inst.weight.unwrap_or(1);
            if weight == 0 || weight > 1000 {
                return Err(err(&at("weight"), format!("{weight} is out of range; use 1 to 1000")));
            }
            let deployments = inst.deployments.unwrap_or_default();
            for (from, to) in &deployments {
                if !is_path_segment(from) || !is_path_segment(to) {
                    return Err(err(
                        &at("deployments"),
                        format!("{from:?} -> {to:?}: deployment names must be non-empty and contain only letters, digits, '-', '_' and '.'"),
                    ));
                }
            }
            if let Some(v) = &inst.api_version {
                if !is_path_segment(v) {
                    return Err(err(&at("api_version"), format!("{v:?} is not an api-version such as 2024-06-01")));
                }
            }
            let opt_ms = |v: Option<u64>, f: &str| match v {
                Some(0) => Err(err(&at(f), "must be greater than 0".into())),
                v => Ok(v.map(Duration::from_millis)),
            };
            instances.push(Instance {
                name,
                endpoint,
                api_key: Secret::new(api_key),
                priority: inst.priority.unwrap_or(0),
                weight,
                deployments,
                deployments_only: inst.deployments_only.unwrap_or(false),
                api_version: inst.api_version,
                connect_timeout: opt_ms(inst.connect_timeout_ms, "connect_timeout_ms")?,
                upstream_response_timeout: opt_ms(inst.upstream_response_timeout_ms, "upstream_response_timeout_ms")?,
                upstream_read_timeout: opt_ms(inst.upstream_read_timeout_ms, "upstream_read_timeout_ms")?,
            });
        }

        let mut tier_weights: BTreeMap<u32, u32> = BTreeMap::new();
        for inst in &instances {
            *tier_weights.entry(inst.priority).or_default() += inst.weight;
        }
        if let Some((tier, sum)) = tier_weights.iter().find(|(_, w)| **w > MAX_TIER_WEIGHT) {
            return Err(err(
                "instances[].weight",
                format!(
                    "weights in priority tier {tier} add up to {sum}; keep each tier at or under {MAX_TIER_WEIGHT}"
                ),
            ));
        }
        let routing = Routing {
            max_attempts: match raw.max_attempts {
                Some(0) => return Err(err("max_attempts", "must be greater than 0".into())),
                Some(n) => n.min(instances.len()),
                None => instances.len(),
            },
            attempt_deadline: raw.attempt_deadline_ms.filter(|ms| *ms > 0).map(Duration::from_millis),
            default_cooldown: Duration::from_millis(raw.cooldown_ms.unwrap_or(DEFAULT_COOLDOWN_MS)),
            max_cooldown: Duration::from_millis(raw.max_cooldown_ms.unwrap_or(DEFAULT_MAX_COOLDOWN_MS)),
            circuit_failures: raw.circuit_failures.unwrap_or(DEFAULT_CIRCUIT_FAILURES),
            circuit_open: Duration::from_millis(raw.circuit_open_ms.unwrap_or(DEFAULT_CIRCUIT_OPEN_MS).max(1)),
            circuit_max_open: Duration::from_millis(
                raw.circuit_max_open_ms.unwrap_or(DEFAULT_CIRCUIT_MAX_OPEN_MS).max(1),
            ),
        };

        let admin_endpoints =
            raw.admin_endpoints.unwrap_or_else(|| ADMIN_ENDPOINTS.iter().map(|e| e.to_string()).collect());
        if let Some(bad) = admin_endpoints.iter().find(|e| !ADMIN_ENDPOINTS.contains(&e.as_str())) {
            return Err(err("admin_endpoints", format!("{bad:?} is not one of {ADMIN_ENDPOINTS:?}")));
        }
        let admin_listen = match raw.admin_listen {
            None => None,
            Some(a) => Some(a.parse::<SocketAddr>().map_err(|_| err("admin_listen", format!("{a:?} is not IP:PORT")))?),
        };
        let upstream_roots = match &raw.ca_bundle {
            None => None,
            Some(path) => Some(load_roots(path, env).map_err(|m| err("ca_bundle", m))?),
        };
        let egress_proxy = match raw.egress_proxy.as_deref().map(str::trim) {
            None | Some("") | Some("none") => EgressProxy::Direct,
            Some("env") => EgressProxy::FromEnvironment,
            Some(url) => {
                ureq::Proxy::new(url).map_err(|e| {
                    err("egress_proxy", format!("{e}; use http://host:port (or \"env\" for HTTPS_PROXY/ALL_PROXY)"))
                })?;
                EgressProxy::Url(Secret::new(url))
            }
        };
        let client_tls = match (&raw.tls_cert, &raw.tls_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(Arc::new(server_config(cert, key).map_err(|m| err("tls_cert", m))?)),
            _ => return Err(err("tls_cert", "give both tls_cert and tls_key (PEM files), or neither".into())),
        };
        let mut trusted_proxies = Vec::new();
        for (i, text) in raw.trusted_proxies.unwrap_or_default().iter().enumerate() {
            trusted_proxies.push(Cidr::parse(text).map_err(|m| err(&format!("trusted_proxies[{i}]"), m))?);
        }

        let header_name = header_field(raw.header_name, "header_name").map_err(|m| err("header_name", m))?;
        let client_header_name =
            header_field(raw.client_header_name, "client_header_name").map_err(|m| err("client_header_name", m))?;
        let mut client_keys = Vec::new();
        for (i, k) in raw.client_keys.unwrap_or_default().into_iter().enumerate() {
            if k.is_empty() {
                return Err(err(&format!("client_keys[{i}]"), "empty key; remove it".into()));
            }
            client_keys.push(Secret::new(k));
        }

        let env_num = |name: &str| -> Result<Option<u64>, ConfigError> {
            match env.var(name) {
                None => Ok(None),
                Some(v) => v.trim().parse::<u64>().map(Some).map_err(|_| ConfigError {
                    message: format!("environment variable {name}={v:?} is not a whole number"),
                }),
            }
        };

        let listen_text = overrides
            .listen
            .clone()
            .or_else(|| env.var("AZURE_PROXY_LISTEN"))
            .or(raw.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen: SocketAddr = listen_text.parse().map_err(|_| ConfigError {
            message: format!("listen address {listen_text:?} is not IP:PORT (e.g. 0.0.0.0:8000 or [::1]:8000)"),
        })?;
        let workers = match overrides.workers {
            Some(w) => w,
            None => match env_num("AZURE_PROXY_WORKERS")? {
                Some(w) => w as usize,
                None => raw.workers.unwrap_or(DEFAULT_WORKERS),
            },
        };

        let ms = |v: Option<u64>, default: u64, field: &str| -> Result<Duration, ConfigError> {
            match v.unwrap_or(default) {
                0 => Err(err(field, "must be greater than 0".into())),
                n => Ok(Duration::from_millis(n)),
            }
        };
        let positive = |v: usize, field: &str| -> Result<usize, ConfigError> {
            if v == 0 {
                Err(err(field, "must be greater than 0".into()))
            } else {
                Ok(v)
            }
        };

        let config = Config {
            instances,
            header_name,
            client_header_name,
            client_keys,
            listen,
            workers: positive(workers, "workers")?,
            queue_size: positive(raw.queue_size.unwrap_or(DEFAULT_QUEUE_SIZE), "queue_size")?,
            max_connections: positive(raw.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS), "max_connections")?,
            max_head_bytes: positive(raw.max_head_bytes.unwrap_or(DEFAULT_MAX_HEAD_BYTES), "max_head_bytes")?,
            max_headers: positive(raw.max_headers.unwrap_or(DEFAULT_MAX_HEADERS), "max_headers")?,
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
            error_body_max_bytes: match env_num("ERROR_BODY_MAX_BYTES")? {
                Some(n) => n as usize,
                None => raw.error_body_max_bytes.unwrap_or(DEFAULT_ERROR_BODY_MAX_BYTES),
            },
            max_bad_keys: match env_num("MAX_BAD_KEYS")? {
                Some(n) => u32::try_from(n).unwrap_or(u32::MAX),
                None => raw.max_bad_keys.unwrap_or(DEFAULT_MAX_BAD_KEYS),
            },
            block_duration: Duration::from_secs(match env_num("BLOCK_SECONDS")? {
                Some(n) => n,
                None => raw.block_seconds.unwrap_or(DEFAULT_BLOCK_SECONDS),
            }),
            max_tracked_clients: positive(
                raw.max_tracked_clients.unwrap_or(DEFAULT_MAX_TRACKED_CLIENTS),
                "max_tracked_clients",
            )?,
            trusted_proxies,
            drain: Duration::from_secs(raw.drain_seconds.unwrap_or(DEFAULT_DRAIN_SECONDS)),
            admin_endpoints,
            admin_listen,
            upstream_roots,
            egress_proxy,
            client_tls,
            access_log_json: match env.var("LOG_FORMAT").as_deref().map(str::trim) {
                None | Some("") | Some("text") => false,
                Some("json") => true,
                Some(other) => {
                    return Err(ConfigError {
                        message: format!("environment variable LOG_FORMAT={other:?}: use text or json"),
                    })
                }
            },
            routing,
        };
        Ok(config)
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
fn normalize_endpoint(raw: &str) -> Result<(String, String), String> {
    let trimmed = raw.trim().trim_end_matches('/');
    let rest = trimmed
        .strip_prefix("https://")
        .or_else(|| trimmed.strip_prefix("http://"))
        .ok_or_else(|| format!("{raw:?} must start with https:// (or http:// for local testing)"))?;
    let fix = "write only the resource URL, e.g. https://eastus-xyz.openai.azure.com";
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
        return Err(format!("{raw:?} is not a bare scheme://host[:port]; {fix}"));
    }
    let host = match rest.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default().to_string(),
        None => rest.split(':').next().unwrap_or_default().to_string(),
    };
    if host.is_empty() {
        return Err(format!("{raw:?} has no host; {fix}"));
    }
    let authority = rest.to_string();
    trimmed.parse::<ureq::http::Uri>().map_err(|e| format!("{raw:?} is not a valid URL ({e}); {fix}"))?;
    Ok((trimmed.to_string(), authority))
}

fn header_field(value: Option<String>, field: &str) -> Result<String, String> {
    let name = value.unwrap_or_else(|| DEFAULT_HEADER_NAME.to_string()).to_ascii_lowercase();
    if name.is_empty() || !name.bytes().all(is_token_byte) {
        return Err(format!("{name:?} is not a valid HTTP header name (set {field} to e.g. \"api-key\")"));
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
