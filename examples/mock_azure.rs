//! A standalone mock Azure OpenAI instance (the same mock the tests use).
//!
//! `mock_azure --listen 127.0.0.1:PORT --key KEY [--name NAME] [--event-delay-ms N] [--events N]`
//!
//! `--events N` (N >= 4): a streamed reply has exactly N `data:` events (role, N-3 content events, stop,
//! `[DONE]`); without it the reply is "Hello from NAME", one content event per word.
//!
//! Prints `mock_azure NAME listening on http://ADDR` once bound, then serves forever.
#![allow(dead_code)]

#[path = "../tests/support/mock.rs"]
mod mock;

use std::io::Write;
use std::process::exit;
use std::time::Duration;

const USAGE: &str =
    "usage: mock_azure --listen 127.0.0.1:PORT --key KEY [--name NAME] [--event-delay-ms N (default 100)] \
     [--events N (>= 4: data events per streamed reply)]";

struct Args {
    listen: String,
    key: String,
    name: String,
    event_delay_ms: u64,
    events: Option<usize>,
}

fn parse_args() -> Result<Args, String> {
    let mut listen = None;
    let mut key = None;
    let mut name = None;
    let mut event_delay_ms = 100u64;
    let mut events = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        // Accept both `--flag value` and `--flag=value`.
        let (flag, inline) = match flag.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (flag, None),
        };
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            exit(0);
        }
        let mut value = || inline.clone().or_else(|| it.next()).ok_or_else(|| format!("missing value for {flag}"));
        match flag.as_str() {
            "--listen" => listen = Some(value()?),
            "--key" => key = Some(value()?),
            "--name" => name = Some(value()?),
            "--event-delay-ms" => {
                let v = value()?;
                event_delay_ms = v.parse().map_err(|_| format!("--event-delay-ms: not a number: {v:?}"))?;
            }
            "--events" => {
                let v = value()?;
                let n: usize = v.parse().map_err(|_| format!("--events: not a number: {v:?}"))?;
                if n < 4 {
                    return Err(format!("--events: must be at least 4 (role, content, stop, [DONE]), got {n}"));
                }
                events = Some(n);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Args {
        listen: listen.ok_or("--listen is required")?,
        key: key.ok_or("--key is required")?,
        name: name.unwrap_or_else(|| "mock".to_string()),
        event_delay_ms,
        events,
    })
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mock_azure: {e}\n{USAGE}");
            exit(2);
        }
    };
    let pause = Duration::from_millis(args.event_delay_ms);
    let started = match args.events {
        None => mock::MockAzure::start_on(&args.listen, mock::azure_like(&args.name, &args.key, pause)),
        Some(n) => mock::MockAzure::start_on(&args.listen, mock::azure_like_with(&args.name, &args.key, pause, n - 3)),
    };
    let server = match started {
        Ok(s) => s,
        Err(e) => {
            eprintln!("mock_azure: cannot listen on {}: {e}", args.listen);
            exit(2);
        }
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "mock_azure {} listening on {}", args.name, server.url());
    let _ = out.flush();
    drop(out);
    loop {
        std::thread::park();
    }
}
