//! Request targets: every target `http::target::check` accepts is sent through `upstream::send` to a loopback
//! sink, which must receive it byte for byte in its request line. A target that the front end accepts but the
//! upstream client cannot send (the hole where such requests opened every circuit) fails here.
#![no_main]

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Mutex, OnceLock};
use std::thread;

use azure_proxy::config::{Config, Env, Overrides};
use azure_proxy::http::parse::Framing;
use azure_proxy::http::target;
use azure_proxy::state::State;
use azure_proxy::upstream;
use libfuzzer_sys::fuzz_target;
use ureq::http::header::HeaderMap;
use ureq::http::Method;

struct NoEnv;
impl Env for NoEnv {
    fn var(&self, _: &str) -> Option<String> {
        None
    }
}

/// The proxy state (one instance: the sink) and the request lines the sink has received.
struct Rig {
    state: State,
    lines: Mutex<Receiver<String>>,
}

fn rig() -> &'static Rig {
    static RIG: OnceLock<Rig> = OnceLock::new();
    RIG.get_or_init(|| {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = channel();
        thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let tx = tx.clone();
                thread::spawn(move || serve(conn, tx));
            }
        });
        let json = format!(r#"{{"instances": [{{"endpoint": "http://{addr}", "api_key": "k"}}], "client_keys": ["c"]}}"#);
        let config = Config::from_json(&json, Path::new("fuzz.json"), &Overrides::default(), &NoEnv).expect("config");
        Rig { state: State::new(config).expect("state"), lines: Mutex::new(rx) }
    })
}

/// Keep-alive: reads heads (no bodies are sent), records each request line, answers 204.
fn serve(conn: TcpStream, tx: std::sync::mpsc::Sender<String>) {
    let mut out = conn.try_clone().expect("clone");
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            if header == "\r\n" {
                break;
            }
        }
        let _ = tx.send(line.trim_end().to_string());
        if out.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").is_err() {
            return;
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if target::check(text).is_err() {
        return;
    }
    let rig = rig();
    let credential = rig.state.credential(0).expect("a key");
    let out = upstream::Outgoing {
        method: &Method::GET,
        headers: &HeaderMap::new(),
        target: text,
        body: b"",
        framing: Framing::None,
        credential: &credential,
    };
    let sent = upstream::send(&rig.state, 0, out);
    let resp = sent.unwrap_or_else(|e| panic!("accepted target {text:?} could not be sent: {e}"));
    assert_eq!(resp.status().as_u16(), 204);
    drop(resp);
    let line = rig.lines.lock().expect("lines").recv().expect("the sink saw the request");
    assert_eq!(line, format!("GET {text} HTTP/1.1"), "accepted target not forwarded byte for byte");
});
