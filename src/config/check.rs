//! The checks of the configuration file's fields, by concern (instances and their keys, routing, the client
//! side, admin, TLS files, egress): each turns a raw field into its validated value, or an error that names the
//! file, the field, what is wrong and the fix.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use super::file::{FileConfig, FileInstance, INSTANCE_EXAMPLE};
use super::*;
use crate::client_ip::Cidr;
use crate::http::client_stream::server_config;

/// The checks of the file's fields, by concern; each error names the file and the field.
pub(super) struct Check<'a> {
    file: &'a Path,
}

impl Check<'_> {
    pub(super) fn new(file: &Path) -> Check<'_> {
        Check { file }
    }

    pub(super) fn error(&self, field: &str, problem: impl fmt::Display, fix: impl fmt::Display) -> ConfigError {
        ConfigError::in_file(self.file, field, problem, fix)
    }

    pub(super) fn positive(&self, v: usize, field: &str) -> Result<usize, ConfigError> {
        match v {
            0 => Err(self.error(
                field,
                "must be greater than 0",
                "use a whole number of 1 or more, or remove it for the default",
            )),
            v => Ok(v),
        }
    }

    pub(super) fn idle_workers(&self, v: Option<usize>, workers: usize) -> Result<usize, ConfigError> {
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

    pub(super) fn listen_backlog(&self, v: Option<u32>) -> Result<u32, ConfigError> {
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

    pub(super) fn ms(&self, v: u64, field: &str) -> Result<Duration, ConfigError> {
        match v {
            0 => Err(self.error(
                field,
                "must be greater than 0",
                "use a number of milliseconds of 1 or more, or remove it for the default",
            )),
            n => Ok(Duration::from_millis(n)),
        }
    }

    pub(super) fn instances(&self, raw: &[FileInstance], env: &dyn Env) -> Result<Vec<Instance>, ConfigError> {
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

    pub(super) fn instance(&self, i: usize, inst: &FileInstance, env: &dyn Env) -> Result<Instance, ConfigError> {
        let at = |f: &str| format!("instances[{i}].{f}");
        let (endpoint, host) =
            normalize_endpoint(&inst.endpoint).map_err(|(problem, fix)| self.error(&at("endpoint"), problem, fix))?;
        let credential = self.credential(i, inst, env)?;
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
            credential,
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

    /// The instance's credential: its `auth` (Entra ID), or its key. No error shows a secret.
    fn credential(&self, i: usize, inst: &FileInstance, env: &dyn Env) -> Result<Credential, ConfigError> {
        let Some(auth) = &inst.auth else { return self.api_key(i, inst, env).map(|k| Credential::Key(Secret::new(k))) };
        if inst.api_key.is_some() || inst.api_key_env.is_some() {
            return Err(self.error(
                &format!("instances[{i}].auth"),
                "is given together with an instance key (api_key or api_key_env)",
                "keep one way to authenticate: auth for Entra ID tokens, or the key",
            ));
        }
        let error =
            |field: &str, problem: &str, fix: &str| self.error(&format!("instances[{i}].auth.{field}"), problem, fix);
        super::entra::check(auth, env, &error).map(Credential::Entra)
    }

    /// The instance key from `api_key` or from the variable `api_key_env` names. Neither error shows the key.
    pub(super) fn api_key(&self, i: usize, inst: &FileInstance, env: &dyn Env) -> Result<String, ConfigError> {
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
                "give the instance key as api_key, name an environment variable holding it in api_key_env, or use \
                 Entra ID tokens with \"auth\": {\"type\": \"managed_identity\"} (or workload_identity, client_secret)",
            )),
        }
    }

    pub(super) fn routing(&self, raw: &FileConfig, instances: usize) -> Result<Routing, ConfigError> {
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
    pub(super) fn client_side(
        &self,
        raw: &FileConfig,
        env: &dyn Env,
    ) -> Result<(String, String, Vec<ClientKey>), ConfigError> {
        let header = |v: &Option<String>, field: &str| {
            header_name(v).map_err(|problem| self.error(field, problem, "use a header name such as \"api-key\""))
        };
        let key_header = header(&raw.header_name, "header_name")?;
        let client_header = header(&raw.client_header_name, "client_header_name")?;
        let error = |field: &str, problem: &str, fix: &str| self.error(field, problem, fix);
        let client_keys = super::client_keys::check(raw.client_keys.as_deref().unwrap_or_default(), env, &error)?;
        Ok((key_header, client_header, client_keys))
    }

    pub(super) fn trusted_proxies(&self, raw: &FileConfig) -> Result<Vec<Cidr>, ConfigError> {
        let fix = "use an address such as 10.0.0.5 or a block such as 10.0.0.0/8";
        let texts = raw.trusted_proxies.iter().flatten().enumerate();
        texts
            .map(|(i, text)| Cidr::parse(text).map_err(|m| self.error(&format!("trusted_proxies[{i}]"), m, fix)))
            .collect()
    }

    pub(super) fn admin_endpoints(&self, raw: &FileConfig) -> Result<Vec<String>, ConfigError> {
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

    pub(super) fn admin_listen(&self, raw: &FileConfig) -> Result<Option<SocketAddr>, ConfigError> {
        raw.admin_listen
            .as_ref()
            .map(|a| {
                a.parse::<SocketAddr>().map_err(|_| {
                    self.error("admin_listen", format!("{a:?} is not an IP:PORT address"), "use e.g. 127.0.0.1:9090")
                })
            })
            .transpose()
    }

    pub(super) fn ca_bundle(
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
    pub(super) fn egress_proxy(&self, raw: &FileConfig) -> Result<EgressProxy, ConfigError> {
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

    pub(super) fn client_tls(&self, raw: &FileConfig) -> Result<Option<Arc<rustls::ServerConfig>>, ConfigError> {
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
