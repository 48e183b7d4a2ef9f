//! The one step that applies the environment and the command line over the file: `--listen`/`AZURE_PROXY_LISTEN`,
//! `--workers`/`AZURE_PROXY_WORKERS`, `AZURE_PROXY_DNS_REFRESH_MS`, `ERROR_BODY_MAX_BYTES`, `MAX_BAD_KEYS`,
//! `BLOCK_SECONDS`, plus `LOG_FORMAT` and `RUST_LOG`, which exist only in the environment. Each value is checked
//! where it is picked, so an error names the flag or the variable it came from, not the file.

use std::net::SocketAddr;
use std::path::Path;

use super::file::FileConfig;
use super::*;

/// Where a setting's final value came from: the place the user has to go to change it.
#[derive(Clone, Copy, Debug)]
enum Origin {
    /// The file's field (or its default, when the file does not have it).
    File(&'static str),
    Env(&'static str),
    Flag(&'static str),
}

impl Origin {
    fn error(self, file: &Path, problem: impl fmt::Display, fix: impl fmt::Display) -> ConfigError {
        match self {
            Origin::File(field) => ConfigError::in_file(file, field, problem, fix),
            Origin::Env(var) => ConfigError::in_env(var, problem, fix),
            Origin::Flag(flag) => ConfigError::in_flag(flag, problem, fix),
        }
    }
}

/// The settings that the environment or the command line may set, checked.
pub(super) struct Overlaid {
    pub listen: SocketAddr,
    pub workers: usize,
    pub dns_refresh: Duration,
    pub error_body_max_bytes: usize,
    pub max_bad_keys: u32,
    pub block_duration: Duration,
    pub access_log_json: bool,
    pub log_level: log::LevelFilter,
}

pub(super) fn apply(raw: &FileConfig, file: &Path, o: &Overrides, env: &dyn Env) -> Result<Overlaid, ConfigError> {
    let (listen, origin) = given(Some(("--listen", &o.listen)), "AZURE_PROXY_LISTEN", env)
        .or_else(|| raw.listen.clone().map(|l| (l, Origin::File("listen"))))
        .unwrap_or_else(|| (DEFAULT_LISTEN.to_string(), Origin::File("listen")));
    let listen = listen.parse::<SocketAddr>().map_err(|_| {
        let fix = match listen.trim().parse::<u16>() {
            Ok(port) => format!("add the address: 0.0.0.0:{port} (all interfaces) or 127.0.0.1:{port} (this host)"),
            Err(_) => "use IP:PORT, e.g. 0.0.0.0:8000 or [::1]:8000 (no host names)".to_string(),
        };
        origin.error(file, format!("{listen:?} is not an IP:PORT address"), fix)
    })?;

    let workers = match given(Some(("--workers", &o.workers)), "AZURE_PROXY_WORKERS", env) {
        Some((text, origin)) => (number::<usize>(&text, origin, file)?, origin),
        None => (raw.workers.unwrap_or(DEFAULT_WORKERS), Origin::File("workers")),
    };
    if workers.0 == 0 {
        let fix = format!("use a whole number of 1 or more (the default is {DEFAULT_WORKERS})");
        return Err(workers.1.error(file, "must be at least 1, got 0", fix));
    }
    if workers.0 > MAX_WORKERS {
        let fix = format!("use at most {MAX_WORKERS}; the default {DEFAULT_WORKERS} serves that many streams at once");
        return Err(workers.1.error(file, format!("{} threads is more than any machine can run", workers.0), fix));
    }

    let from_env = |var: &'static str| -> Result<Option<u64>, ConfigError> {
        given(None, var, env).map(|(text, origin)| number::<u64>(&text, origin, file)).transpose()
    };
    let dns_refresh = match from_env("AZURE_PROXY_DNS_REFRESH_MS")? {
        Some(n) => (n, Origin::Env("AZURE_PROXY_DNS_REFRESH_MS")),
        None => (raw.dns_refresh_ms.unwrap_or(DEFAULT_DNS_REFRESH_MS), Origin::File("dns_refresh_ms")),
    };
    if dns_refresh.0 == 0 {
        let fix = format!(
            "use a number of milliseconds of 1 or more (the default is {DEFAULT_DNS_REFRESH_MS}); addresses are always \
             cached, and a short interval only refreshes them more often, in the background"
        );
        return Err(dns_refresh.1.error(file, "must be at least 1, got 0", fix));
    }
    Ok(Overlaid {
        listen,
        workers: workers.0,
        dns_refresh: Duration::from_millis(dns_refresh.0),
        error_body_max_bytes: match from_env("ERROR_BODY_MAX_BYTES")? {
            Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
            None => raw.error_body_max_bytes.unwrap_or(DEFAULT_ERROR_BODY_MAX_BYTES),
        },
        max_bad_keys: match from_env("MAX_BAD_KEYS")? {
            Some(n) => u32::try_from(n).unwrap_or(u32::MAX),
            None => raw.max_bad_keys.unwrap_or(DEFAULT_MAX_BAD_KEYS),
        },
        block_duration: Duration::from_secs(match from_env("BLOCK_SECONDS")? {
            Some(n) => n,
            None => raw.block_seconds.unwrap_or(DEFAULT_BLOCK_SECONDS),
        }),
        access_log_json: match env.var("LOG_FORMAT").as_deref().map(str::trim) {
            None | Some("") | Some("text") => false,
            Some("json") => true,
            Some(other) => {
                return Err(ConfigError::in_env(
                    "LOG_FORMAT",
                    format!("{other:?} is not a log format"),
                    "use text or json",
                ))
            }
        },
        log_level: log_level(env)?,
    })
}

/// `RUST_LOG`: a single level name, any case (what simple_logger's `env()` took; anything else it ignored).
fn log_level(env: &dyn Env) -> Result<log::LevelFilter, ConfigError> {
    match env.var("RUST_LOG").as_deref().map(str::trim) {
        None | Some("") => Ok(log::LevelFilter::Info),
        Some(text) => text.parse().map_err(|_| {
            ConfigError::in_env(
                "RUST_LOG",
                format!("{text:?} is not a log level"),
                "use one of error, warn, info (the default), debug, trace or off; per-module filters are not supported",
            )
        }),
    }
}

/// The text of the flag, if given, else of the environment variable.
fn given(flag: Option<(&'static str, &Option<String>)>, var: &'static str, env: &dyn Env) -> Option<(String, Origin)> {
    match flag {
        Some((name, Some(text))) => Some((text.clone(), Origin::Flag(name))),
        _ => env.var(var).map(|text| (text, Origin::Env(var))),
    }
}

/// A whole number typed into a flag or an environment variable.
fn number<T: TryFrom<u64>>(text: &str, origin: Origin, file: &Path) -> Result<T, ConfigError> {
    text.trim().parse::<u64>().ok().and_then(|n| T::try_from(n).ok()).ok_or_else(|| {
        let fix = match origin {
            Origin::Env(var) => format!("set {var} to a whole number such as 10, or unset it"),
            _ => "use a whole number such as 10".to_string(),
        };
        origin.error(file, format!("expected a whole number, got {text:?}"), fix)
    })
}
