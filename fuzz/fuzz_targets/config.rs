//! Configuration parsing and validation on arbitrary text: an error is fine, a panic is not.
#![no_main]

use std::path::Path;

use azure_proxy::config::{Config, Env, Overrides};
use libfuzzer_sys::fuzz_target;

/// No environment variables at all.
struct NoEnv;

impl Env for NoEnv {
    fn var(&self, _name: &str) -> Option<String> {
        None
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(config) = Config::from_json(&text, Path::new("fuzz.json"), &Overrides::default(), &NoEnv) {
        assert!(!config.instances.is_empty());
        assert!(config.routing.max_attempts >= 1 && config.routing.max_attempts <= config.instances.len());
        let _ = config.secrets();
        let _ = format!("{config:?}");
    }
});
