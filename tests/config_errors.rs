//! The real binary with `--check-config`: every configuration error exits 2 and names where the value came from
//! (the file and the field, the environment variable or the flag), what is wrong and the fix; a configuration
//! without `client_keys` passes with the running proxy's warning.

use std::process::Command;

use crate::support::process::{write_config, BIN};

const GOOD: &str = r#"{"instances": [{"endpoint": "https://a.example", "api_key": "key-AAA"}], "client_keys": ["ck"]}"#;

/// Runs `--check-config` with a clean environment plus `env`; returns (exit code, stdout, stderr).
fn check(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).arg("--check-config");
    for var in ["AZURE_PROXY_CONFIG", "AZURE_PROXY_LISTEN", "AZURE_PROXY_WORKERS", "RUST_LOG", "LOG_FORMAT"] {
        cmd.env_remove(var);
    }
    for var in ["ERROR_BODY_MAX_BYTES", "MAX_BAD_KEYS", "BLOCK_SECONDS"] {
        cmd.env_remove(var);
    }
    let out = cmd.envs(env.iter().copied()).output().expect("run azure-proxy");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// Asserts exit 2 and that stderr contains each of `wanted`, a fix, and no key.
fn fails_with(args: &[&str], env: &[(&str, &str)], wanted: &[&str]) {
    let (code, out, err) = check(args, env);
    assert_eq!(code, 2, "{args:?} {env:?}: {out}{err}");
    for w in wanted.iter().chain(&["; fix: "]) {
        assert!(err.contains(w), "{args:?} {env:?}: {w:?} missing from {err}");
    }
    assert!(!err.contains("key-AAA") && !err.contains("s3cret"), "a key in the error: {err}");
}

fn file(name: &str, text: &str) -> String {
    write_config(name, text).to_str().expect("utf-8 path").to_string()
}

#[test]
fn wrong_json_type_names_the_field_and_the_value() {
    let path = file("ce-workers-type.json", &GOOD.replace("]}", r#"], "workers": "64"}"#));
    let field = format!("config file {path}, field workers");
    fails_with(&["--config", &path], &[], &[&field, r#"expected a whole number, got the string "64""#]);
    let path = file(
        "ce-weight-type.json",
        r#"{"instances": [{"endpoint": "https://a.example", "api_key": "k"},
                          {"endpoint": "https://b.example", "api_key": "k", "weight": "2"}]}"#,
    );
    fails_with(&["--config", &path], &[], &["field instances[1].weight", "remove the quotes: 2"]);
}

#[test]
fn listen_without_an_address_names_the_file_and_field() {
    let path = file("ce-listen.json", &GOOD.replace("]}", r#"], "listen": "8000"}"#));
    let field = format!("config file {path}, field listen");
    fails_with(&["--config", &path], &[], &[&field, "\"8000\" is not an IP:PORT address", "0.0.0.0:8000"]);
}

#[test]
fn environment_overrides_are_blamed_on_the_variable() {
    let path = file("ce-env.json", GOOD);
    for (var, value) in [
        ("AZURE_PROXY_WORKERS", "0"),
        ("AZURE_PROXY_WORKERS", "lots"),
        ("AZURE_PROXY_LISTEN", "8000"),
        ("ERROR_BODY_MAX_BYTES", "2k"),
        ("MAX_BAD_KEYS", "-1"),
        ("BLOCK_SECONDS", "1.5"),
    ] {
        let (code, _, err) = check(&["--config", &path], &[(var, value)]);
        assert_eq!(code, 2, "{var}={value}: {err}");
        assert!(err.starts_with(&format!("azure-proxy: environment variable {var}: ")), "{var}={value}: {err}");
        assert!(err.contains("; fix: ") && !err.contains(&path), "{var}={value}: {err}");
    }
}

#[test]
fn api_key_env_variable_with_a_bad_value_is_blamed_on_the_variable() {
    let path =
        file("ce-key-env.json", r#"{"instances": [{"endpoint": "https://a.example", "api_key_env": "CE_KEY"}]}"#);
    let wanted = ["environment variable CE_KEY (named by instances[0].api_key_env in config file", &path];
    fails_with(&["--config", &path], &[("CE_KEY", "s3cret\n")], &wanted);
}

#[test]
fn flags_are_blamed_on_the_flag() {
    let path = file("ce-flags.json", GOOD);
    fails_with(
        &["--config", &path, "--listen", "8000"],
        &[("AZURE_PROXY_LISTEN", "127.0.0.1:1")],
        &["flag --listen: "],
    );
    fails_with(&["--config", &path, "--workers", "0"], &[], &["flag --workers: must be at least 1"]);
    fails_with(&["--config", &path, "--workers=many"], &[], &["flag --workers: expected a whole number, got \"many\""]);
}

#[test]
fn broken_files_name_the_file_the_problem_and_the_fix() {
    for (name, text, says) in [
        ("ce-empty.json", "", "the file is empty"),
        ("ce-braces.json", "{}", "field instances: missing"),
        ("ce-list.json", "[]", "expected a JSON object {…} at the top level, got a list"),
        ("ce-truncated.json", r#"{"instances": ["#, "the JSON ends too early"),
        ("ce-syntax.json", r#"{"instances": [],}"#, "invalid JSON at line 1 column 18"),
    ] {
        let path = file(name, text);
        fails_with(&["--config", &path], &[], &[&format!("config file {path}"), says]);
    }
}

#[test]
fn unreadable_files_say_why_and_where_the_path_came_from() {
    let dir = std::env::temp_dir();
    let dir = dir.to_str().expect("utf-8 path");
    fails_with(
        &["--config", "/nonexistent/azure.json"],
        &[],
        &["/nonexistent/azure.json: does not exist (from --config)"],
    );
    fails_with(&["--config", dir], &[], &["is a directory, not a file (from --config)"]);
    let from_env = [("AZURE_PROXY_CONFIG", "/nonexistent/env.json")];
    fails_with(&[], &from_env, &["/nonexistent/env.json: does not exist (from AZURE_PROXY_CONFIG)"]);
}

#[test]
fn unknown_fields_still_name_the_field() {
    let path = file("ce-typo.json", &GOOD.replace("\"client_keys\"", "\"client_key\""));
    fails_with(&["--config", &path], &[], &["field client_key: unknown field", "did you mean \"client_keys\""]);
}

#[test]
fn invalid_rust_log_exits_2_like_an_invalid_log_format() {
    let path = file("ce-log.json", GOOD);
    fails_with(&["--config", &path], &[("RUST_LOG", "verbose")], &["environment variable RUST_LOG", "\"verbose\""]);
    fails_with(&["--config", &path], &[("LOG_FORMAT", "xml")], &["environment variable LOG_FORMAT", "text or json"]);
    let (code, _, err) = check(&["--config", &path], &[("RUST_LOG", "DEBUG")]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn check_config_without_client_keys_warns_like_the_running_proxy() {
    let path = file("ce-open.json", r#"{"instances": [{"endpoint": "https://a.example", "api_key": "k"}]}"#);
    let (code, out, err) = check(&["--config", &path], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("config OK"), "{out}");
    assert!(err.contains("WARN") && err.contains("NO CLIENT KEY ALLOWLIST"), "warning not on stderr: {err}");
    let (code, _, err) = check(&["--config", &file("ce-closed.json", GOOD)], &[]);
    assert_eq!(code, 0);
    assert!(!err.contains("NO CLIENT KEY ALLOWLIST"), "{err}");
}

#[test]
fn client_keys_are_listed_by_name_with_their_limits_and_never_shown() {
    let text = r#"{"instances": [{"endpoint": "https://a.example", "api_key": "key-AAA"}], "client_keys": ["s3cret",
        {"name": "team-b", "key_env": "TEAM_B_KEY", "deployments": ["gpt-4o"], "requests_per_minute": 5},
        {"name": "ci", "key_sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
         "tokens_per_minute": 1000}]}"#;
    let path = file("ce-named-keys.json", text);
    let (code, out, err) = check(&["--config", &path], &[("TEAM_B_KEY", "team-b-s3cret")]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("client keys: 3\n  key-1\n  team-b, deployments: gpt-4o, 5 requests/min\n"), "{out}");
    assert!(out.contains("  ci (as SHA-256), 1000 tokens/min\n"), "{out}");
    assert!(!out.contains("s3cret") && !err.contains("s3cret") && !out.contains("ba7816"), "{out}{err}");
    // The variable a key_env names must be set; the error names it, not a value.
    fails_with(&["--config", &path], &[], &["field client_keys[1].key_env", "TEAM_B_KEY is not set"]);
}

#[test]
fn check_config_says_which_variables_an_identity_reads_without_calling_anything() {
    let text = r#"{"instances": [{"endpoint": "https://a.example", "name": "keyless",
        "auth": {"type": "workload_identity", "authority_host": "http://127.0.0.1:9"}}]}"#;
    let path = file("ce-entra.json", text);
    let env = [
        ("AZURE_TENANT_ID", "tenant-x"),
        ("AZURE_CLIENT_ID", "client-x"),
        ("AZURE_FEDERATED_TOKEN_FILE", "/var/run/secrets/azure/tokens/azure-identity-token"),
    ];
    let (code, out, err) = check(&["--config", &path], &env);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("    auth: workload_identity:client-x, scope https://cognitiveservices.azure.com/.default\n"),
        "{out}"
    );
    for read in [
        "tenant_id from AZURE_TENANT_ID",
        "client_id from AZURE_CLIENT_ID",
        "federated_token_file from AZURE_FEDERATED_TOKEN_FILE",
    ] {
        assert!(out.contains(&format!("    reads {read}\n")), "{read}: {out}");
    }
    // No token request is made (a failed one against port 9 would be logged).
    assert!(!err.contains("Entra ID token"), "{err}");
}
