//! Start-up: bind the listener, build the shared state, start the worker pool and the front thread.
//!
//! Shape: front thread (accept + read heads) → bounded channel of `queue_size` → the worker pool (`pool`), whose
//! threads serve one request at a time with blocking I/O, then give a keep-alive connection back to the front
//! thread.

use std::io;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use crate::admin;
use crate::config::{Config, Overrides};
use crate::error::Error;
use crate::front::Front;
use crate::lifecycle;
use crate::metrics::{Metrics, Probes};
use crate::pool::{Job, Pool};
use crate::state::{Shared, State};
use crate::sys;

/// A running proxy. Dropping it stops it (as `stop`) and waits for the drain.
pub struct Server {
    addr: SocketAddr,
    /// None once joined (`wait`, or the drop).
    front: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
    /// The write end of the front thread's wake-up socket (kept open by this handle while the server lives).
    waker: Arc<UnixStream>,
}

impl Server {
    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Routes SIGHUP (reload) and SIGTERM/SIGINT (graceful stop) to this server. For the binary; a library user
    /// may prefer its own signal handling and call `reload`/`stop`.
    pub fn handle_signals(&self) -> io::Result<()> {
        let slot = lifecycle::install(self.waker.as_raw_fd())?;
        *self.shared.signals.lock().unwrap_or_else(|p| p.into_inner()) = Some(slot);
        Ok(())
    }

    /// Asks for a graceful stop, as SIGTERM does: no new connections, requests in flight finish (for at most
    /// `drain_seconds`). Returns at once; `wait` (or dropping the server) waits for the end.
    pub fn stop(&self) {
        self.shared.stop_requested.store(true, std::sync::atomic::Ordering::SeqCst);
        // One byte wakes the front thread's epoll wait; a full socket means a wake-up is already pending.
        let _ = (&*self.waker).write(&[1]);
    }

    /// Swaps in a new configuration (validated first; on error the running one stays).
    pub fn reload(&self, config: Config) -> Result<(), Error> {
        self.shared.reload(config)
    }

    /// Blocks until the proxy has stopped (after a stop request and the drain).
    pub fn wait(mut self) {
        if let Some(front) = self.front.take() {
            let _ = front.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(front) = self.front.take() {
            self.stop();
            let _ = front.join();
        }
    }
}

/// Binds `config.listen` and starts serving in background threads. SIGHUP reloads are not available (there is
/// no file to reload from); see `start_from_file`.
pub fn start(config: Config) -> Result<Server, Error> {
    launch(config, None)
}

/// As `start`, remembering where the configuration came from so that SIGHUP can read it again.
pub fn start_from_file(config: Config, source: Overrides) -> Result<Server, Error> {
    launch(config, Some(source))
}

fn launch(config: Config, source: Option<Overrides>) -> Result<Server, Error> {
    sys::raise_fd_limit();
    let listener = TcpListener::bind(config.listen)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {}: {e}", config.listen)))?;
    let addr = listener.local_addr()?;
    sys::set_backlog(&listener, config.listen_backlog)?;
    let (jobs_tx, jobs_rx) = crossbeam_channel::bounded::<Job>(config.queue_size);
    let queue = jobs_rx.clone();
    let probes = Probes { queue_depth: Some(Box::new(move || queue.len())), ..Probes::default() };
    let (open, workers) = (Arc::clone(&probes.open_connections), Arc::clone(&probes.workers));
    let metrics = Arc::new(Metrics::with_probes(probes));
    let shared = Arc::new(Shared::new(State::with_metrics(config, metrics)?));
    let (mut front, returner) = Front::new(Arc::clone(&shared), listener, jobs_tx, source, open)?;
    let waker = returner.waker();
    let pool = Pool::start(Arc::clone(&shared), jobs_rx, returner, workers)?;
    front.set_pool(pool);
    if let Some(admin_addr) = shared.state().config.admin_listen {
        let admin = TcpListener::bind(admin_addr)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on admin_listen {admin_addr}: {e}")))?;
        let shared = Arc::clone(&shared);
        thread::Builder::new().name("admin".into()).spawn(move || admin::serve_admin(admin, shared))?;
    }
    let front = thread::Builder::new().name("front".into()).spawn(move || front.run())?;
    Ok(Server { addr, front: Some(front), shared, waker })
}
