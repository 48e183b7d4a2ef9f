//! `client_keys`: who may use the proxy, under which name, for which deployments and how fast.
//!
//! An entry is a plain string (the original format; named `key-1`, `key-2`… by position, never by its value) or
//! an object with a `name` and exactly one of `key`, `key_env` (the variable holding the key) or `key_sha256`
//! (the key's SHA-256 in hex, so that the file holds no usable secret). Every key is kept as its SHA-256 only:
//! the guard hashes what a client presents and compares digests, so plain and hashed entries are checked the
//! same way, in constant time.

use std::collections::BTreeSet;
use std::fmt;

use ring::digest;

use super::json::{Item, Object};
use super::{ConfigError, Env, Secret};

/// The fields of a `client_keys` object entry.
const FIELDS: &[&str] =
    &["name", "key", "key_env", "key_sha256", "deployments", "requests_per_minute", "tokens_per_minute"];
const EXAMPLE: &str = r#"{"name": "team-a", "key_env": "TEAM_A_KEY"}"#;
/// Names appear in log lines and as a metrics label: short, and no character that would need escaping.
const MAX_NAME_CHARS: usize = 64;

/// One accepted client key, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientKey {
    /// Unique; shown in the access log and as the `client` metrics label, never the key.
    pub name: String,
    pub digest: KeyDigest,
    /// The key itself when the file or the environment gave it (for scrubbing logs); `None` for `key_sha256`.
    pub plain: Option<Secret>,
    /// Deployments this key may use; `None`: all.
    pub deployments: Option<BTreeSet<String>>,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
}

/// The SHA-256 of a key. `Debug` shows nothing: a digest of a short key can be brute-forced.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyDigest(pub [u8; 32]);

impl KeyDigest {
    pub fn of(key: &[u8]) -> KeyDigest {
        let mut out = [0u8; 32];
        out.copy_from_slice(digest::digest(&digest::SHA256, key).as_ref());
        KeyDigest(out)
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyDigest(***)")
    }
}

/// An entry as written in the file.
pub(super) enum FileClientKey {
    Plain(String),
    Named(NamedEntry),
}

/// An object entry as written in the file.
pub(super) struct NamedEntry {
    name: Option<String>,
    key: Option<String>,
    key_env: Option<String>,
    key_sha256: Option<String>,
    deployments: Option<Vec<String>>,
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u64>,
}

/// Reads the `client_keys` field of the top-level object.
pub(super) fn read(o: &mut Object<'_>) -> Result<Option<Vec<FileClientKey>>, ConfigError> {
    let Some(items) = o.texts_or_objects("client_keys", FIELDS, EXAMPLE)? else { return Ok(None) };
    let entries = items.into_iter().map(|item| {
        Ok(match item {
            Item::Text(key) => FileClientKey::Plain(key),
            Item::Object(mut e) => FileClientKey::Named(NamedEntry {
                name: e.string("name")?,
                key: e.secret("key")?,
                key_env: e.string("key_env")?,
                key_sha256: e.secret("key_sha256")?,
                deployments: e.strings("deployments")?,
                requests_per_minute: e.number("requests_per_minute")?,
                tokens_per_minute: e.number("tokens_per_minute")?,
            }),
        })
    });
    entries.collect::<Result<_, _>>().map(Some)
}

/// Validates the entries: a key from exactly one source, names unique and printable, no key listed twice, limits
/// above zero. `error(field, problem, fix)` names the file. No error ever shows a key or a digest.
pub(super) fn check(
    entries: &[FileClientKey],
    env: &dyn Env,
    error: &dyn Fn(&str, &str, &str) -> ConfigError,
) -> Result<Vec<ClientKey>, ConfigError> {
    let mut keys: Vec<ClientKey> = Vec::with_capacity(entries.len());
    for (i, entry) in entries.iter().enumerate() {
        let at = |f: &str| if f.is_empty() { format!("client_keys[{i}]") } else { format!("client_keys[{i}].{f}") };
        let field_error = |f: &str, problem: &str, fix: &str| error(&at(f), problem, fix);
        let key = check_entry(i, entry, env, &field_error)?;
        if let Some(j) = keys.iter().position(|k| k.name == key.name) {
            return Err(error(
                &at("name"),
                &format!("{:?} is also the name of client_keys[{j}]", key.name),
                "give every key its own name (plain-string keys are named key-1, key-2… by position)",
            ));
        }
        if let Some(j) = keys.iter().position(|k| k.digest == key.digest) {
            return Err(error(&at(""), &format!("is the same key as client_keys[{j}]"), "list each key once"));
        }
        keys.push(key);
    }
    Ok(keys)
}

/// Entry `i`; `error`'s field is relative to the entry (`""` for the entry itself).
fn check_entry(
    i: usize,
    entry: &FileClientKey,
    env: &dyn Env,
    error: &dyn Fn(&str, &str, &str) -> ConfigError,
) -> Result<ClientKey, ConfigError> {
    let default_name = format!("key-{}", i + 1);
    let e = match entry {
        FileClientKey::Plain(key) if key.is_empty() => return Err(error("", "is an empty key", "remove it")),
        FileClientKey::Plain(key) => {
            return Ok(ClientKey {
                name: default_name,
                digest: KeyDigest::of(key.as_bytes()),
                plain: Some(Secret::new(key.clone())),
                deployments: None,
                requests_per_minute: None,
                tokens_per_minute: None,
            })
        }
        FileClientKey::Named(e) => e,
    };
    let name = match &e.name {
        Some(n) => check_name(n).map_err(|problem| {
            error("name", &problem, "use 1 to 64 letters, digits, '.', '_' or '-', e.g. \"team-a\"")
        })?,
        None => default_name,
    };
    let (digest, plain) = key_of(e, env, error)?;
    let positive = "use 1 or more, or remove the field for no limit";
    if e.requests_per_minute == Some(0) {
        return Err(error("requests_per_minute", "must be greater than 0", positive));
    }
    if e.tokens_per_minute == Some(0) {
        return Err(error("tokens_per_minute", "must be greater than 0", positive));
    }
    Ok(ClientKey {
        name,
        digest,
        plain,
        deployments: allowed_deployments(e.deployments.as_deref(), error)?,
        requests_per_minute: e.requests_per_minute,
        tokens_per_minute: e.tokens_per_minute,
    })
}

/// The key's digest, and the key itself unless only its digest was given.
fn key_of(
    e: &NamedEntry,
    env: &dyn Env,
    error: &dyn Fn(&str, &str, &str) -> ConfigError,
) -> Result<(KeyDigest, Option<Secret>), ConfigError> {
    match (&e.key, &e.key_env, &e.key_sha256) {
        (Some(k), None, None) if k.is_empty() => {
            Err(error("key", "is an empty key", "give the key, or remove the entry"))
        }
        (Some(k), None, None) => Ok((KeyDigest::of(k.as_bytes()), Some(Secret::new(k.clone())))),
        (None, Some(var), None) => {
            let k = env_key(var, env)
                .map_err(|problem| error("key_env", &problem, &format!("export {var} with the client's key")))?;
            Ok((KeyDigest::of(k.as_bytes()), Some(Secret::new(k))))
        }
        (None, None, Some(hex)) => {
            let digest = parse_digest(hex).ok_or_else(|| {
                error(
                    "key_sha256",
                    "is not a SHA-256 digest (64 hexadecimal characters)",
                    "compute it with: printf %s \"$KEY\" | sha256sum",
                )
            })?;
            Ok((digest, None))
        }
        (None, None, None) => Err(error("", "has no key", "give one of key, key_env or key_sha256")),
        _ => Err(error("", "gives more than one of key, key_env and key_sha256", "keep only one of them")),
    }
}

fn allowed_deployments(
    list: Option<&[String]>,
    error: &dyn Fn(&str, &str, &str) -> ConfigError,
) -> Result<Option<BTreeSet<String>>, ConfigError> {
    let Some(list) = list else { return Ok(None) };
    if list.is_empty() {
        return Err(error(
            "deployments",
            "is empty: the key could use no deployment",
            "list the deployments the key may use, or remove the field to allow all",
        ));
    }
    match list.iter().position(|d| d.is_empty() || d.contains('/')) {
        Some(j) => Err(error(
            &format!("deployments[{j}]"),
            "is not a deployment name",
            "write the deployment name as the client sends it, e.g. \"gpt-4o-mini\"",
        )),
        None => Ok(Some(list.iter().cloned().collect())),
    }
}

fn check_name(name: &str) -> Result<String, String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.chars().count() > MAX_NAME_CHARS {
        return Err(format!("must be 1 to {MAX_NAME_CHARS} characters long"));
    }
    match name.chars().find(|c| !ok(*c)) {
        Some(c) => Err(format!("{name:?} holds {c:?}, which is not allowed in a name")),
        None => Ok(name.to_string()),
    }
}

fn env_key(var: &str, env: &dyn Env) -> Result<String, String> {
    if var.trim().is_empty() {
        return Err("is empty: name the environment variable that holds the key".to_string());
    }
    match env.var(var) {
        None => Err(format!("environment variable {var} is not set")),
        Some(k) if k.is_empty() => Err(format!("environment variable {var} is empty")),
        Some(k) => Ok(k),
    }
}

fn parse_digest(hex: &str) -> Option<KeyDigest> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let nibble = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(KeyDigest(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_from_hex_match_hashing() {
        // printf %s abc | sha256sum
        let hex = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(parse_digest(hex), Some(KeyDigest::of(b"abc")));
        assert_eq!(parse_digest(&hex.to_uppercase()), Some(KeyDigest::of(b"abc")));
        assert_eq!(parse_digest(&hex[1..]), None);
        assert_eq!(parse_digest(&format!("{}g", &hex[1..])), None);
        assert_eq!(format!("{:?}", KeyDigest::of(b"abc")), "KeyDigest(***)");
    }

    #[test]
    fn names() {
        assert!(check_name("team-a.prod_2").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a b").is_err());
        assert!(check_name("x\"y").is_err());
        assert!(check_name(&"a".repeat(65)).is_err());
    }
}
