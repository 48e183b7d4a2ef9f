//! Start-up: bind the listener, build the shared state, start the worker pool and the front thread.
//!
//! Shape: front thread (accept + read heads) → bounded channel of `queue_size` → `workers` threads, each serving
//! one request at a time with blocking I/O, then giving a keep-alive connection back to the front thread.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use crate::config::Config;
use crate::front::{Front, Job, Returner};
use crate::serve::serve;
use crate::state::State;

/// Worker stack: a rustls handshake and ureq's call stack fit comfortably; only touched pages cost memory.
const WORKER_STACK_BYTES: usize = 512 * 1024;

/// A running proxy.
pub struct Server {
    addr: SocketAddr,
    front: JoinHandle<()>,
}

impl Server {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Blocks for as long as the proxy runs.
    pub fn wait(self) {
        let _ = self.front.join();
    }
}

/// Binds `config.listen` and starts serving in background threads.
pub fn start(config: Config) -> io::Result<Server> {
    raise_fd_limit();
    let listener = TcpListener::bind(config.listen)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {}: {e}", config.listen)))?;
    let addr = listener.local_addr()?;
    let state = Arc::new(State::new(config).map_err(io::Error::other)?);
    let (jobs_tx, jobs_rx) = crossbeam_channel::bounded::<Job>(state.config.queue_size);
    let (front, returner) = Front::new(Arc::clone(&state), listener, jobs_tx)?;
    for i in 0..state.config.workers {
        let rx = jobs_rx.clone();
        let state = Arc::clone(&state);
        let returner = returner.clone();
        thread::Builder::new()
            .name(format!("worker-{i}"))
            .stack_size(WORKER_STACK_BYTES)
            .spawn(move || work(&state, rx, &returner))?;
    }
    let front = thread::Builder::new().name("front".into()).spawn(move || front.run())?;
    Ok(Server { addr, front })
}

fn work(state: &State, jobs: crossbeam_channel::Receiver<Job>, returner: &Returner) {
    for Job { conn, head } in jobs.iter() {
        if let Err(e) = conn.stream.set_read_timeout(Some(state.config.body_read_timeout)) {
            log::warn!("cannot set a read timeout on a client socket: {e}");
            continue;
        }
        // A bug that panics on one request must cost that request only, not a worker: the connection is
        // dropped (closed) during unwinding and this thread goes on. (Release builds abort on panic instead.)
        match catch_unwind(AssertUnwindSafe(|| serve(state, conn, head))) {
            Ok(Some(conn)) => returner.give_back(conn),
            Ok(None) => {}
            Err(_) => log::error!("a request handler panicked; its connection was closed"),
        }
    }
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
