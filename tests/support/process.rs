//! Running the real `azure-proxy` binary: a config file in a temp dir, the process, and its log lines.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_azure-proxy");

pub fn write_config(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("azure-proxy-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

/// A running proxy process whose stderr lines are collected.
pub struct Running {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Running {
    pub fn start(config: &std::path::Path, env: &[(&str, &str)]) -> Running {
        Running::start_via(&[], config, env)
    }

    /// Like `start`, with the binary run by `launcher` (a program and its arguments, the binary's path and
    /// arguments appended), e.g. `unshare` and a shell that sets up a mount namespace, then `exec "$@"`.
    pub fn start_via(launcher: &[&str], config: &std::path::Path, env: &[(&str, &str)]) -> Running {
        let mut cmd = match launcher.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.args(["--config", config.to_str().expect("utf-8 path"), "--listen", "127.0.0.1:0", "--workers", "4"])
            .env_remove("AZURE_PROXY_CONFIG")
            .env_remove("RUST_LOG")
            .env_remove("ERROR_BODY_MAX_BYTES")
            .env_remove("MAX_BAD_KEYS")
            .env_remove("BLOCK_SECONDS")
            .env_remove("LOG_FORMAT")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn azure-proxy");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on ").nth(1) {
                    let _ = tx.send(addr.split(' ').next().unwrap_or_default().to_string());
                }
                sink.lock().expect("log").push(line);
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(20)).expect("proxy printed its listen address");
        Running { child, addr: addr.parse().expect("address"), log }
    }

    /// Every line logged so far, after waiting until `pred` holds for some line (the access line is written after
    /// the response, so it may trail the client by a moment).
    pub fn log_when(&self, pred: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let lines = self.log.lock().expect("log").clone();
            if lines.iter().any(|l| pred(l)) || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Running {
    /// The access line of the request with ID `rid`.
    pub fn access_line(&self, rid: &str) -> String {
        let is_it = |l: &str| l.contains("[access]") && l.contains(&format!(" {rid} "));
        let log = self.log_when(is_it);
        log.into_iter().find(|l| is_it(l)).unwrap_or_else(|| panic!("no access line for {rid}"))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
