//! The command line: `azure-proxy [--config PATH] [--listen ADDR] [--workers N] [--check-config] [--help]
//! [--version]`. Flags override the environment, which overrides the file (see `config`).

use crate::error::Error;
use std::path::PathBuf;

use crate::config::Overrides;

pub const USAGE: &str = "\
azure-proxy: one endpoint in front of several Azure OpenAI instances

USAGE:
    azure-proxy [--config PATH] [--listen ADDR] [--workers N] [--check-config]

OPTIONS:
    --config PATH     JSON config file (env AZURE_PROXY_CONFIG, default azure_instances.json)
    --listen ADDR     address to listen on (env AZURE_PROXY_LISTEN, default 0.0.0.0:8000)
    --workers N       most worker threads, i.e. requests served at once; started on demand
                      (env AZURE_PROXY_WORKERS, default 4096)
    --check-config    validate the configuration, print a summary and exit (0 valid, 2 invalid)
    -h, --help        print this help
    -V, --version     print the version

ENVIRONMENT:
    ERROR_BODY_MAX_BYTES (2048), MAX_BAD_KEYS (5), BLOCK_SECONDS (300), LOG_FORMAT (text),
    RUST_LOG (info; one of error, warn, info, debug, trace, off)
";

#[derive(Debug, Clone)]
pub enum Command {
    Run(Overrides),
    CheckConfig(Overrides),
    Help,
    Version,
}

/// Parses the arguments after the program name. Accepts `--flag value` and `--flag=value`.
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Command, Error> {
    let mut overrides = Overrides::default();
    let mut check = false;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| Error::Usage(format!("{name} needs a value (see --help)")))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--check-config" => check = true,
            "--config" => overrides.config_path = Some(PathBuf::from(value("--config")?)),
            "--listen" => overrides.listen = Some(value("--listen")?),
            // Checked with the rest of the configuration (config::overlay), so that the error names the flag.
            "--workers" => overrides.workers = Some(value("--workers")?),
            other => return Err(Error::Usage(format!("unknown argument {other:?} (see --help)"))),
        }
    }
    Ok(if check { Command::CheckConfig(overrides) } else { Command::Run(overrides) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, Error> {
        parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn flags() {
        match p(&["--config", "a.json", "--listen=127.0.0.1:9", "--workers", "4"]).expect("valid") {
            Command::Run(o) => {
                assert_eq!(o.config_path.as_deref(), Some(std::path::Path::new("a.json")));
                assert_eq!(o.listen.as_deref(), Some("127.0.0.1:9"));
                assert_eq!(o.workers.as_deref(), Some("4"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(p(&["--check-config"]), Ok(Command::CheckConfig(_))));
        assert!(matches!(p(&["--help"]), Ok(Command::Help)));
        assert!(p(&["--config"]).is_err());
        assert!(p(&["--bogus"]).is_err());
    }
}
