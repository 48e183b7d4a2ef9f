//! Start-up: bind the listener, build the shared state, start the worker pool and the front thread.
//!
//! Shape: front thread (accept + read heads) → bounded channel of `queue_size` → `workers` threads, each serving
//! one request at a time with blocking I/O, then giving a keep-alive connection back to the front thread.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use crate::admin;
use crate::config::{Config, Overrides};
use crate::front::{Front, Job, Returner};
use crate::http::parse::parse_head;
use crate::http::{Conn, Head};
use crate::lifecycle;
use crate::serve::serve;
use crate::state::{Shared, State};

/// Worker stack: a rustls handshake and ureq's call stack fit comfortably; only touched pages cost memory.
const WORKER_STACK_BYTES: usize = 512 * 1024;

/// A running proxy.
pub struct Server {
    addr: SocketAddr,
    front: JoinHandle<()>,
    shared: Arc<Shared>,
    wake_fd: RawFd,
}

impl Server {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Routes SIGHUP (reload) and SIGTERM/SIGINT (graceful stop) to this server. For the binary; a library user
    /// may prefer its own signal handling and call `reload`/`lifecycle::request_stop`.
    pub fn handle_signals(&self) -> io::Result<()> {
        lifecycle::install(self.wake_fd)
    }

    /// Swaps in a new configuration (validated first; on error the running one stays).
    pub fn reload(&self, config: Config) -> Result<(), String> {
        self.shared.reload(config)
    }

    /// Blocks until the proxy has stopped (after a stop request and the drain).
    pub fn wait(self) {
        let _ = self.front.join();
    }
}

/// Binds `config.listen` and starts serving in background threads. SIGHUP reloads are not available (there is
/// no file to reload from); see `start_from_file`.
pub fn start(config: Config) -> io::Result<Server> {
    launch(config, None)
}

/// As `start`, remembering where the configuration came from so that SIGHUP can read it again.
pub fn start_from_file(config: Config, source: Overrides) -> io::Result<Server> {
    launch(config, Some(source))
}

fn launch(config: Config, source: Option<Overrides>) -> io::Result<Server> {
    raise_fd_limit();
    let listener = TcpListener::bind(config.listen)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {}: {e}", config.listen)))?;
    let addr = listener.local_addr()?;
    let (workers, queue_size) = (config.workers, config.queue_size);
    let shared = Arc::new(Shared::new(State::new(config).map_err(io::Error::other)?));
    let (jobs_tx, jobs_rx) = crossbeam_channel::bounded::<Job>(queue_size);
    let (front, returner) = Front::new(Arc::clone(&shared), listener, jobs_tx, source)?;
    let metrics = Arc::clone(&shared.state().metrics);
    let _ = metrics.open_connections.set(front.open_connections());
    let queue = jobs_rx.clone();
    let _ = metrics.queue_depth.set(Box::new(move || queue.len()));
    let wake_fd = returner.wake_fd();
    for i in 0..workers {
        let rx = jobs_rx.clone();
        let shared = Arc::clone(&shared);
        let returner = returner.clone();
        thread::Builder::new()
            .name(format!("worker-{i}"))
            .stack_size(WORKER_STACK_BYTES)
            .spawn(move || work(&shared, rx, &returner))?;
    }
    if let Some(admin_addr) = shared.state().config.admin_listen {
        let admin = TcpListener::bind(admin_addr)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on admin_listen {admin_addr}: {e}")))?;
        let shared = Arc::clone(&shared);
        thread::Builder::new().name("admin".into()).spawn(move || admin::serve_admin(admin, shared))?;
    }
    let front = thread::Builder::new().name("front".into()).spawn(move || front.run())?;
    Ok(Server { addr, front, shared, wake_fd })
}

fn work(shared: &Shared, jobs: crossbeam_channel::Receiver<Job>, returner: &Returner) {
    for Job { mut conn, mut head } in jobs.iter() {
        loop {
            // Each request takes the configuration current when it starts, and keeps it to its end.
            let state = shared.state();
            if !conn.worker_ready {
                if let Err(e) = conn.stream.tcp().set_read_timeout(Some(state.config.body_read_timeout)) {
                    log::warn!("cannot set a read timeout on a client socket: {e}");
                    break;
                }
                conn.worker_ready = true;
            }
            let draining = shared.is_draining();
            // A bug that panics on one request must cost that request only, not a worker: the connection is
            // dropped (closed) during unwinding and this thread goes on. (Release builds abort on panic instead.)
            let mut kept = match catch_unwind(AssertUnwindSafe(|| serve(&state, conn, head, draining))) {
                Ok(Some(kept)) => kept,
                Ok(None) => break,
                Err(_) => {
                    log::error!("a request handler panicked; its connection was closed");
                    break;
                }
            };
            match next_request_here(&state, &mut kept, &jobs) {
                Next::Here(next) => (conn, head) = (kept, next),
                Next::ToFront => {
                    returner.give_back(kept);
                    break;
                }
                Next::Closed => break,
            }
        }
    }
}

enum Next {
    /// The next request's head, already taken from the connection's buffer.
    Here(Head),
    ToFront,
    Closed,
}

/// The keep-alive fast path: a client that sends its next request at once (a pooled SDK, a batch job, a load
/// generator) is served by the same worker, saving two thread hand-offs and a poll round. Anything slower than
/// `keepalive_linger`, any incomplete or invalid head, and every connection while requests are queued goes back
/// to the front thread, which owns waiting.
fn next_request_here(state: &State, conn: &mut Conn, jobs: &crossbeam_channel::Receiver<Job>) -> Next {
    let cfg = &state.config;
    if conn.buf.is_empty() {
        let ready = conn.stream.has_buffered() || readable_within(conn.stream.tcp(), cfg.keepalive_linger);
        if !jobs.is_empty() || cfg.keepalive_linger.is_zero() || !ready {
            return Next::ToFront;
        }
        match conn.read_more() {
            Ok(0) => return Next::Closed,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {
                return Next::ToFront
            }
            Err(_) => return Next::Closed,
        }
    }
    match parse_head(&conn.buf, cfg.max_head_bytes, cfg.max_headers) {
        Ok(Some(head)) => {
            conn.consume(head.len);
            Next::Here(head)
        }
        Ok(None) | Err(_) => Next::ToFront,
    }
}

/// Waits up to `wait` for `stream` to become readable (data, EOF or error).
fn readable_within(stream: &std::net::TcpStream, wait: std::time::Duration) -> bool {
    let mut fd = libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd, alive for the call, count 1.
    let ready = unsafe { libc::poll(&mut fd, 1, ms) };
    ready > 0
}

/// Raises the soft open-files limit to the hard limit: every client and upstream connection is an fd, and the
/// usual soft limit of 1024 would cap the proxy well below what the machine can serve.
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of each call.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let wanted = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) != 0 {
                log::warn!("could not raise the open-files limit from {}", lim.rlim_cur);
            }
        }
    }
}
