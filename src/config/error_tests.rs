//! The loader's error texts, end to end through `Config::from_json` and `Config::load`: each must say where the
//! value came from (the file and the field path, the environment variable or the flag), what is wrong and the
//! fix, and none may show a key.

use std::collections::HashMap;
use std::path::Path;

use super::*;

struct MapEnv(HashMap<&'static str, &'static str>);

impl Env for MapEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).map(|v| v.to_string())
    }
}

const TWO: &str = r#"{"instances": [{"endpoint": "https://a.example", "api_key": "key-AAA"},
    {"endpoint": "https://b.example", "api_key": "key-BBB"}], "client_keys": ["client-CCC"]"#;

/// The error for `TWO` plus `extra` top-level fields, with `env` and `flags`.
fn error(extra: &str, env: &[(&'static str, &'static str)], flags: Overrides) -> String {
    let text = format!("{TWO}{extra}}}");
    let env = MapEnv(env.iter().cloned().collect());
    match Config::from_json(&text, Path::new("conf/azure.json"), &flags, &env) {
        Ok(_) => panic!("{extra} {:?} was accepted", env.0),
        Err(e) => {
            let m = e.message;
            assert!(m.contains("; fix: "), "no fix: {m}");
            for secret in ["key-AAA", "key-BBB", "client-CCC", "s3cret"] {
                assert!(!m.contains(secret), "{secret} shown: {m}");
            }
            m
        }
    }
}

fn file_error(extra: &str) -> String {
    error(extra, &[], Overrides::default())
}

#[test]
fn wrong_json_types_name_the_field_path() {
    let m = file_error(r#", "workers": "64""#);
    assert!(m.starts_with("config file conf/azure.json, field workers: "), "{m}");
    assert!(m.contains(r#"expected a whole number, got the string "64"; fix: remove the quotes: 64"#), "{m}");
    let m = file_error(r#", "listen": 8000"#);
    assert!(m.contains("field listen: expected a string, got the number 8000"), "{m}");
    let m = file_error(r#", "trusted_proxies": "10.0.0.0/8""#);
    assert!(m.contains("field trusted_proxies: expected a list") && m.contains("square brackets"), "{m}");
}

#[test]
fn wrong_types_inside_instances_name_the_index() {
    let text = r#"{"instances": [{"endpoint": "https://a.example", "api_key": "k"},
        {"endpoint": "https://b.example", "api_key": "k", "weight": "2"}]}"#;
    let e =
        Config::from_json(text, Path::new("w.json"), &Overrides::default(), &MapEnv(HashMap::new())).expect_err("type");
    assert!(e.message.contains("config file w.json, field instances[1].weight: expected a whole number"), "{e}");
    let text = r#"{"instances": [{"endpoint": "https://a.example", "api_key": 12345678, "deployments_only": 1}]}"#;
    let e =
        Config::from_json(text, Path::new("w.json"), &Overrides::default(), &MapEnv(HashMap::new())).expect_err("type");
    assert!(e.message.contains("field instances[0].api_key: expected a string, got a number"), "{e}");
    assert!(!e.message.contains("12345678"), "a key-like value shown: {e}");
    let text = r#"{"instances": ["https://a.example"]}"#;
    let e =
        Config::from_json(text, Path::new("w.json"), &Overrides::default(), &MapEnv(HashMap::new())).expect_err("type");
    assert!(e.message.contains("field instances[0]: expected an object"), "{e}");
}

#[test]
fn bad_values_in_the_file_name_the_field_and_the_fix() {
    let m = file_error(r#", "listen": "8000""#);
    assert!(m.contains("config file conf/azure.json, field listen: \"8000\" is not an IP:PORT address"), "{m}");
    assert!(m.contains("0.0.0.0:8000"), "{m}");
    let m = file_error(r#", "workers": 0"#);
    assert!(m.contains("field workers: must be at least 1"), "{m}");
    let m = file_error(r#", "dns_refresh_ms": 0"#);
    assert!(m.contains("field dns_refresh_ms: must be at least 1, got 0") && m.contains("always cached"), "{m}");
    let m = file_error(r#", "admin_endpoints": ["healthz", "status"]"#);
    assert!(m.contains("field admin_endpoints[1]: \"status\"") && m.contains("healthz, readyz, metrics"), "{m}");
    let m = file_error(r#", "egress_proxy": "ftp://user:s3cret@proxy""#);
    assert!(m.contains("field egress_proxy") && m.contains("http://host:port"), "{m}");
}

#[test]
fn environment_overrides_are_blamed_on_the_variable() {
    for (var, value) in [
        ("AZURE_PROXY_WORKERS", "0"),
        ("AZURE_PROXY_WORKERS", "many"),
        ("AZURE_PROXY_LISTEN", "8000"),
        ("ERROR_BODY_MAX_BYTES", "2k"),
        ("MAX_BAD_KEYS", "-1"),
        ("BLOCK_SECONDS", "1.5"),
        ("AZURE_PROXY_DNS_REFRESH_MS", "0"),
        ("AZURE_PROXY_DNS_REFRESH_MS", "soon"),
        ("LOG_FORMAT", "xml"),
        ("RUST_LOG", "verbose"),
    ] {
        let m = error("", &[(var, value)], Overrides::default());
        assert!(m.starts_with(&format!("environment variable {var}: ")), "{var}={value}: {m}");
        assert!(m.contains(&format!("{value:?}")) || m.contains("got 0"), "{var}={value}: {m}");
        assert!(!m.contains("azure.json"), "{var}={value} blamed on the file: {m}");
    }
}

#[test]
fn flags_are_blamed_on_the_flag() {
    let cases = [
        Overrides { listen: Some("8000".into()), ..Default::default() },
        Overrides { workers: Some("0".into()), ..Default::default() },
        Overrides { workers: Some("four".into()), ..Default::default() },
    ];
    for (flags, name) in cases.into_iter().zip(["--listen", "--workers", "--workers"]) {
        // The flag wins over the environment, and so does the blame.
        let m = error("", &[("AZURE_PROXY_LISTEN", "127.0.0.1:1"), ("AZURE_PROXY_WORKERS", "2")], flags);
        assert!(m.starts_with(&format!("flag {name}: ")), "{m}");
    }
}

#[test]
fn the_value_of_an_api_key_env_variable_is_blamed_on_the_variable() {
    let text = r#"{"instances": [{"endpoint": "https://a.example", "api_key_env": "EAST_KEY"}]}"#;
    let env = MapEnv([("EAST_KEY", "s3cret\u{7}")].into());
    let e = Config::from_json(text, Path::new("k.json"), &Overrides::default(), &env).expect_err("bad key");
    assert!(e.message.starts_with("environment variable EAST_KEY (named by instances[0].api_key_env"), "{e}");
    assert!(e.message.contains("k.json") && e.message.contains("fix: set EAST_KEY"), "{e}");
    assert!(!e.message.contains("s3cret"), "{e}");
}

#[test]
fn the_file_as_a_whole() {
    let none = Overrides::default();
    for (text, says) in [
        ("", "the file is empty"),
        ("{}", "field instances: missing"),
        ("[]", "expected a JSON object {…} at the top level, got a list"),
        ("{\"instances\": [", "the JSON ends too early"),
        ("{\"instances\": [] \"workers\": 1}", "invalid JSON at line 1 column 18"),
        ("{\"instances\": []}", "field instances: the list is empty"),
    ] {
        let e = Config::from_json(text, Path::new("f.json"), &none, &MapEnv(HashMap::new())).expect_err(text);
        assert!(e.message.starts_with("config file f.json") && e.message.contains(says), "{text:?}: {e}");
        assert!(e.message.contains("; fix: "), "{text:?}: {e}");
    }
}

#[test]
fn a_file_that_cannot_be_read_says_why_and_where_its_path_came_from() {
    let dir = std::env::temp_dir();
    let missing = dir.join(format!("azure-proxy-no-such-{}.json", std::process::id()));
    for (flags, env, says) in [
        (Some(missing.clone()), vec![], "does not exist (from --config)"),
        (Some(dir.clone()), vec![], "is a directory, not a file (from --config)"),
        (None, vec![("AZURE_PROXY_CONFIG", "/no/such/azure.json")], "does not exist (from AZURE_PROXY_CONFIG)"),
    ] {
        let flags = Overrides { config_path: flags, ..Default::default() };
        let e = Config::load(&flags, &MapEnv(env.into_iter().collect())).expect_err(says);
        assert!(e.message.starts_with("config file ") && e.message.contains(says), "{e}");
        assert!(e.message.contains("fix: point --config or AZURE_PROXY_CONFIG"), "{e}");
    }
}

#[test]
fn rust_log_accepts_the_level_names_in_any_case() {
    for (value, level) in
        [("warn", log::LevelFilter::Warn), ("DEBUG", log::LevelFilter::Debug), ("off", log::LevelFilter::Off)]
    {
        let env = MapEnv([("RUST_LOG", value)].into());
        let c = Config::from_json(&format!("{TWO}}}"), Path::new("l.json"), &Overrides::default(), &env).expect(value);
        assert_eq!(c.log_level, level);
    }
}

#[test]
fn open_access_warning_only_without_client_keys() {
    let open = r#"{"instances": [{"endpoint": "https://a.example", "api_key": "k"}], "client_header_name": "X-Key"}"#;
    let c =
        Config::from_json(open, Path::new("o.json"), &Overrides::default(), &MapEnv(HashMap::new())).expect("valid");
    let w = c.open_access_warning().expect("warning");
    assert!(w.contains("NO CLIENT KEY ALLOWLIST") && w.contains("x-key"), "{w}");
    let c = Config::from_json(&format!("{TWO}}}"), Path::new("o.json"), &Overrides::default(), &MapEnv(HashMap::new()));
    assert_eq!(c.expect("valid").open_access_warning(), None);
}

#[test]
fn pool_settings_that_make_no_sense_are_refused() {
    let m = file_error(r#", "workers": 10, "idle_workers": 11"#);
    assert!(m.contains("field idle_workers: 11 is more than workers (10)"), "{m}");
    let m = file_error(r#", "workers": 1000000"#);
    assert!(m.contains("field workers: 1000000 threads") && m.contains("at most 100000"), "{m}");
    let m = error("", &[("AZURE_PROXY_WORKERS", "200000")], Overrides::default());
    assert!(m.contains("environment variable AZURE_PROXY_WORKERS"), "{m}");
    let m = file_error(r#", "listen_backlog": 0"#);
    assert!(m.contains("field listen_backlog: 0 is out of range"), "{m}");
    for field in ["queue_timeout_ms", "worker_idle_ms"] {
        let m = file_error(&format!(r#", "{field}": 0"#));
        assert!(m.contains(&format!("field {field}: must be greater than 0")), "{m}");
    }
}

#[test]
fn pool_defaults_serve_thousands_of_streams_and_keep_a_few_threads_warm() {
    let c = Config::from_json(&format!("{TWO}}}"), Path::new("c.json"), &Overrides::default(), &MapEnv(HashMap::new()))
        .expect("valid");
    assert_eq!((c.workers, c.idle_workers, c.listen_backlog), (4096, 8, 4096));
    let c = Config::from_json(
        &format!("{TWO}, \"workers\": 4}}"),
        Path::new("c.json"),
        &Overrides::default(),
        &MapEnv(HashMap::new()),
    )
    .expect("valid");
    assert_eq!(c.idle_workers, 4, "never more warm threads than the bound");
}

#[test]
fn client_key_entries_say_what_is_wrong_without_showing_a_key() {
    let keys = |entries: &str| {
        let text = format!(
            r#"{{"instances": [{{"endpoint": "https://a.example", "api_key": "key-AAA"}}], "client_keys": [{entries}]}}"#
        );
        let e = Config::from_json(&text, Path::new("conf/azure.json"), &Overrides::default(), &MapEnv(HashMap::new()))
            .expect_err(entries);
        let m = e.message;
        assert!(m.contains("; fix: "), "no fix: {m}");
        for secret in ["key-AAA", "client-CCC", "s3cret", "other"] {
            assert!(!m.contains(secret), "{secret} shown: {m}");
        }
        m
    };
    let m = keys(r#""client-CCC", {"name": "team-a", "key": "s3cret", "key_env": "X"}"#);
    assert!(m.contains("field client_keys[1]: gives more than one of key, key_env and key_sha256"), "{m}");
    let m = keys(r#"{"name": "team-a"}"#);
    assert!(m.contains("field client_keys[0]: has no key; fix: give one of key, key_env or key_sha256"), "{m}");
    let m = keys(r#"{"name": "a", "key": "s3cret"}, {"name": "a", "key": "other"}"#);
    assert!(m.contains("field client_keys[1].name: \"a\" is also the name of client_keys[0]"), "{m}");
    // Plain keys are named by position: a named entry may not take one of those names.
    let m = keys(r#""client-CCC", {"name": "key-1", "key": "s3cret"}"#);
    assert!(m.contains("client_keys[1].name: \"key-1\" is also the name of client_keys[0]"), "{m}");
    let m = keys(r#""s3cret", {"name": "b", "key": "s3cret"}"#);
    assert!(m.contains("field client_keys[1]: is the same key as client_keys[0]"), "{m}");
    // printf %s s3cret | sha256sum: the same key given as a digest is the same key.
    let m = keys(
        r#""s3cret", {"name": "ci", "key_sha256": "1ec1c26b50d5d3c58d9583181af8076655fe00756bf7285940ba3670f99fcba0"}"#,
    );
    assert!(m.contains("field client_keys[1]: is the same key as client_keys[0]"), "{m}");
    let m = keys(r#"{"name": "ci", "key_sha256": "abc"}"#);
    assert!(m.contains("client_keys[0].key_sha256: is not a SHA-256 digest") && m.contains("sha256sum"), "{m}");
    let m = keys(r#"{"name": "bad name", "key": "s3cret"}"#);
    assert!(m.contains("client_keys[0].name: \"bad name\" holds ' '"), "{m}");
    let m = keys(r#"{"name": "b", "key_env": "TEAM_B_KEY"}"#);
    assert!(m.contains("client_keys[0].key_env: environment variable TEAM_B_KEY is not set"), "{m}");
    let m = keys(r#"{"name": "b", "key": "s3cret", "deployments": []}"#);
    assert!(m.contains("client_keys[0].deployments: is empty"), "{m}");
    let m = keys(r#"{"name": "b", "key": "s3cret", "requests_per_minute": 0}"#);
    assert!(m.contains("client_keys[0].requests_per_minute: must be greater than 0"), "{m}");
    let m = keys(r#"{"name": "b", "key": "s3cret", "tokens_per_minute": "100"}"#);
    assert!(m.contains("client_keys[0].tokens_per_minute: expected a whole number"), "{m}");
    let m = keys(r#"{"name": "b", "keys": "s3cret"}"#);
    assert!(m.contains("client_keys[0].keys: unknown field \"keys\"") && m.contains("did you mean \"key\""), "{m}");
    let m = keys(r#"12345"#);
    assert!(m.contains("client_keys[0]: expected a string or an object") && !m.contains("12345"), "{m}");
    let m = keys(r#"{"name": "b", "key": 918273}"#);
    assert!(m.contains("client_keys[0].key: expected a string, got a number") && !m.contains("918273"), "{m}");
}

#[test]
fn client_keys_of_every_form_load_with_their_names() {
    let text = r#"{"instances": [{"endpoint": "https://a.example", "api_key": "k"}], "client_keys": [
        "plain-one",
        {"name": "team-a", "key": "team-a-key", "deployments": ["gpt-4o-mini"], "requests_per_minute": 60},
        {"name": "team-b", "key_env": "TEAM_B_KEY", "tokens_per_minute": 1000},
        {"key_sha256": "BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD"},
        "plain-two"]}"#;
    let env = MapEnv([("TEAM_B_KEY", "team-b-key")].into_iter().collect());
    let c = Config::from_json(text, Path::new("c.json"), &Overrides::default(), &env).expect("valid");
    let names: Vec<&str> = c.client_keys.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["key-1", "team-a", "team-b", "key-4", "key-5"]);
    assert_eq!(c.client_keys[3].digest, KeyDigest::of(b"abc"));
    assert_eq!(c.client_keys[2].digest, KeyDigest::of(b"team-b-key"));
    assert_eq!(c.client_keys[1].requests_per_minute, Some(60));
    assert!(c.client_keys[1].deployments.as_ref().is_some_and(|d| d.contains("gpt-4o-mini")));
    // Log scrubbing knows every key it was given in plain, and nothing for a digest.
    let secrets = c.secrets();
    for k in ["plain-one", "team-a-key", "team-b-key", "plain-two"] {
        assert!(secrets.iter().any(|s| s == k), "{k}");
    }
    assert!(!format!("{c:?}").contains("team-a-key"), "Debug shows no key");
}

#[test]
fn entra_auth_settings_say_what_is_wrong_and_which_variable_is_missing() {
    let auth = |a: &str, env: &[(&'static str, &'static str)]| {
        let text = format!(r#"{{"instances": [{{"endpoint": "https://a.example", {a}}}]}}"#);
        let env = MapEnv(env.iter().cloned().collect());
        match Config::from_json(&text, Path::new("conf/azure.json"), &Overrides::default(), &env) {
            Ok(c) => Ok(c),
            Err(e) => {
                assert!(e.message.contains("; fix: "), "no fix: {}", e.message);
                assert!(!e.message.contains("s3cret"), "a secret shown: {}", e.message);
                Err(e.message)
            }
        }
    };
    let m = auth(r#""api_key": "s3cret", "auth": {"type": "managed_identity"}"#, &[]).unwrap_err();
    assert!(m.contains("field instances[0].auth: is given together with an instance key"), "{m}");
    let m = auth(r#""auth": {"type": "certificate"}"#, &[]).unwrap_err();
    assert!(m.contains("instances[0].auth.type: \"certificate\" is not an auth type"), "{m}");
    let m = auth(r#""auth": {}"#, &[]).unwrap_err();
    assert!(m.contains("instances[0].auth.type: is missing"), "{m}");
    let m = auth(r#""auth": {"type": "workload_identity"}"#, &[]).unwrap_err();
    assert!(m.contains("auth.tenant_id: is missing, and environment variable AZURE_TENANT_ID is not set"), "{m}");
    let wi = [("AZURE_TENANT_ID", "t"), ("AZURE_CLIENT_ID", "c")];
    let m = auth(r#""auth": {"type": "workload_identity"}"#, &wi).unwrap_err();
    assert!(
        m.contains("auth.federated_token_file: is missing, and environment variable AZURE_FEDERATED_TOKEN_FILE"),
        "{m}"
    );
    let m = auth(r#""auth": {"type": "client_secret", "tenant_id": "t", "client_id": "c"}"#, &[]).unwrap_err();
    assert!(m.contains("auth.client_secret_env: environment variable AZURE_CLIENT_SECRET is not set"), "{m}");
    let m = auth(
        r#""auth": {"type": "client_secret", "tenant_id": "t", "client_id": "c", "authority_host": "http://login.example"}"#,
        &[("AZURE_CLIENT_SECRET", "s3cret")],
    )
    .unwrap_err();
    assert!(m.contains("auth.authority_host: \"http://login.example\" is not an https:// URL"), "{m}");
    let m = auth(r#""auth": {"type": "managed_identity", "tenant_id": "t"}"#, &[]).unwrap_err();
    assert!(m.contains("auth.tenant_id: is not used by managed_identity"), "{m}");
    let m = auth(r#""auth": {"type": "managed_identity", "client_id": "a/b"}"#, &[]).unwrap_err();
    assert!(m.contains("auth.client_id: is not an ID"), "{m}");
    let m = auth(r#""auth": {"type": "managed_identity", "scopes": "x"}"#, &[]).unwrap_err();
    assert!(m.contains("auth.scopes: unknown field") && m.contains("did you mean \"scope\""), "{m}");

    // Valid: the environment fills in what the file leaves out, the authority loses its trailing slash, and the
    // client secret joins the secrets scrubbed from logs.
    let env = [
        ("AZURE_TENANT_ID", "tenant"),
        ("AZURE_CLIENT_ID", "client"),
        ("AZURE_CLIENT_SECRET", "s3cret-value"),
        ("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.us/"),
    ];
    let c = auth(r#""auth": {"type": "client_secret"}"#, &env).expect("valid");
    let Credential::Entra(a) = &c.instances[0].credential else { panic!("not entra") };
    match &a.flow {
        EntraFlow::ClientSecret { authority, tenant_id, client_id, .. } => {
            assert_eq!(
                (authority.as_str(), tenant_id.as_str(), client_id.as_str()),
                ("https://login.microsoftonline.us", "tenant", "client")
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(a.scope, "https://cognitiveservices.azure.com/.default");
    assert!(c.secrets().iter().any(|s| s == "s3cret-value"));
    assert!(!format!("{c:?}").contains("s3cret-value"), "Debug hides the client secret");
    assert!(a.sources.iter().any(|s| s == "tenant_id from AZURE_TENANT_ID"), "{:?}", a.sources);
    // Plain HTTP only on loopback (a local token server, tests).
    let local = r#""auth": {"type": "client_secret", "tenant_id": "t", "client_id": "c", "authority_host": "http://127.0.0.1:9/"}"#;
    assert!(auth(local, &[("AZURE_CLIENT_SECRET", "s3cret")]).is_ok());
    let c = auth(r#""auth": {"type": "managed_identity"}"#, &[]).expect("valid");
    let Credential::Entra(a) = &c.instances[0].credential else { panic!("not entra") };
    assert_eq!(
        a.flow,
        EntraFlow::ManagedIdentity {
            client_id: None,
            endpoint: ManagedIdentityEndpoint::Imds { base: "http://169.254.169.254".into() }
        }
    );
    assert_eq!(a.resource(), "https://cognitiveservices.azure.com");
}
