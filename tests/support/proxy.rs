//! Starting a real proxy (the library's `start`, listening on 127.0.0.1:0) in front of mock instances.

use std::net::SocketAddr;
use std::path::Path;

use azure_proxy::config::{Config, Env, Overrides};

use super::mock::MockAzure;

/// An environment with nothing set, so that tests do not depend on the developer's shell.
pub struct NoEnv;
impl Env for NoEnv {
    fn var(&self, _: &str) -> Option<String> {
        None
    }
}

/// An in-process proxy; dropping it stops it (`Server`'s drop: graceful stop, then the front thread is joined).
pub struct Proxy {
    pub addr: SocketAddr,
    pub server: azure_proxy::Server,
}

/// Instance list entries: (endpoint URL, key, name).
pub fn instance(url: &str, key: &str, name: &str) -> serde_json::Value {
    serde_json::json!({ "endpoint": url, "api_key": key, "name": name })
}

/// Mocks named m0, m1, … with keys key0, key1, …
pub fn instances_for(mocks: &[&MockAzure]) -> Vec<serde_json::Value> {
    mocks.iter().enumerate().map(|(i, m)| instance(&m.url(), &format!("key{i}"), &format!("m{i}"))).collect()
}

/// Starts a proxy with the given instances, client key `client-key`, 4 workers, a 1 s drain (so that a test
/// that leaves a request hanging does not wait 30 s when its proxy is dropped), and `extra` fields merged into
/// the config object (they override the defaults here).
pub fn start_with(instances: Vec<serde_json::Value>, extra: serde_json::Value) -> Proxy {
    start_with_env(instances, extra, &NoEnv)
}

/// An environment of the given variables only.
pub struct MapEnv(pub Vec<(String, String)>);
impl Env for MapEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }
}

/// `start_with`, the configuration read with `env` as its environment.
pub fn start_with_env(instances: Vec<serde_json::Value>, extra: serde_json::Value, env: &dyn Env) -> Proxy {
    let server = azure_proxy::start(config_with_env(instances, extra, env)).expect("proxy starts");
    Proxy { addr: server.local_addr(), server }
}

/// The configuration `start_with_env` starts from (also what a test hands to `Server::reload`).
pub fn config_with_env(instances: Vec<serde_json::Value>, extra: serde_json::Value, env: &dyn Env) -> Config {
    let mut cfg = serde_json::json!({
        "instances": instances,
        "client_keys": ["client-key"],
        "workers": 4,
        "drain_seconds": 1,
    });
    if let (Some(obj), Some(more)) = (cfg.as_object_mut(), extra.as_object()) {
        for (k, v) in more {
            obj.insert(k.clone(), v.clone());
        }
    }
    let overrides = Overrides { listen: Some("127.0.0.1:0".into()), ..Default::default() };
    Config::from_json(&cfg.to_string(), Path::new("test-config.json"), &overrides, env).expect("test config is valid")
}

pub fn start(mocks: &[&MockAzure]) -> Proxy {
    start_with(instances_for(mocks), serde_json::json!({}))
}

/// A chat-completions path as the SDKs send it.
pub const CHAT: &str = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-06-01";
