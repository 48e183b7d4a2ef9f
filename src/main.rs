//! `azure-proxy`: command line → configuration → serve. Exit codes: 0 after `--help`/`--version`/a valid
//! `--check-config`, 2 for a usage or configuration error, 1 when the listener cannot be started.

use std::process::ExitCode;

use azure_proxy::cli::{self, Command, USAGE};
use azure_proxy::config::{Config, Overrides, ProcessEnv};

fn main() -> ExitCode {
    let command = match cli::parse(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("azure-proxy: {e}");
            return ExitCode::from(2);
        }
    };
    match command {
        Command::Help => {
            print!("{USAGE}");
            ExitCode::SUCCESS
        }
        Command::Version => {
            println!("azure-proxy {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::CheckConfig(o) => match load(&o) {
            Ok(config) => {
                // The running proxy's start-up warnings, on stderr like its log; the summary goes to stdout.
                init_logging(config.log_level);
                if let Some(warning) = config.open_access_warning() {
                    log::warn!("{warning}");
                }
                println!("config OK: {} instance(s), listen {}", config.instances.len(), config.listen);
                for i in &config.instances {
                    println!("  {} -> {}", i.name, i.endpoint);
                    if let azure_proxy::config::Credential::Entra(auth) = &i.credential {
                        // What a token request will use and read, without making one.
                        println!("    auth: {}, scope {}", auth.label(), auth.scope);
                        for source in &auth.sources {
                            println!("    reads {source}");
                        }
                    }
                }
                if !config.client_keys.is_empty() {
                    println!("client keys: {}", config.client_keys.len());
                }
                for k in &config.client_keys {
                    println!("  {}", describe_key(k));
                }
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Run(o) => {
            let config = match load(&o) {
                Ok(c) => c,
                Err(code) => return code,
            };
            init_logging(config.log_level);
            if let Some(warning) = config.open_access_warning() {
                log::warn!("{warning}");
            }
            let (n, workers) = (config.instances.len(), config.workers);
            match azure_proxy::start_from_file(config, o) {
                Ok(server) => {
                    if let Err(e) = server.handle_signals() {
                        log::warn!("cannot install signal handlers ({e}); SIGHUP reload and graceful stop are off");
                    }
                    log::info!("listening on {} ({n} instance(s), {workers} workers)", server.local_addr());
                    server.wait();
                    log::info!("stopped");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    log::error!("{e}");
                    // A configuration that cannot be used is the user's to fix, like an invalid one; the rest
                    // (a port in use, no threads) is the host's.
                    match e {
                        azure_proxy::Error::Io(_) => ExitCode::from(1),
                        _ => ExitCode::from(2),
                    }
                }
            }
        }
    }
}

fn load(o: &Overrides) -> Result<Config, ExitCode> {
    Config::load(o, &ProcessEnv).map_err(|e| {
        eprintln!("azure-proxy: {e}");
        ExitCode::from(2)
    })
}

/// stderr, UTC timestamps, `level` from `RUST_LOG` (checked with the configuration, so that a typo is an error
/// rather than a silent `info`). ureq and rustls are kept at warn: their debug lines would print request
/// headers, keys included.
fn init_logging(level: log::LevelFilter) {
    let _ = simple_logger::SimpleLogger::new()
        .with_level(level)
        .with_utc_timestamps()
        .with_module_level("ureq", level.min(log::LevelFilter::Warn))
        .with_module_level("ureq_proto", level.min(log::LevelFilter::Warn))
        .with_module_level("rustls", level.min(log::LevelFilter::Warn))
        .init();
}

/// A client key as `--check-config` lists it: its name and what restricts it, never the key.
fn describe_key(k: &azure_proxy::config::ClientKey) -> String {
    let mut out = k.name.clone();
    if k.plain.is_none() {
        out.push_str(" (as SHA-256)");
    }
    if let Some(d) = &k.deployments {
        out.push_str(&format!(", deployments: {}", d.iter().cloned().collect::<Vec<_>>().join(", ")));
    }
    if let Some(n) = k.requests_per_minute {
        out.push_str(&format!(", {n} requests/min"));
    }
    if let Some(n) = k.tokens_per_minute {
        out.push_str(&format!(", {n} tokens/min"));
    }
    out
}
