//! The front thread: owns every connection that is not being served (new ones, ones whose request head is still
//! arriving, idle keep-alive ones), waits on all of them at once with epoll (`waiting`), and hands each complete
//! request head to the workers over the bounded channel. A slow or idle client therefore costs one fd and a small
//! buffer, never a worker. When the channel is full the client gets `503` + `Retry-After: 1` at once.
//!
//! This is a readiness loop, not an async runtime: it never runs request logic, only reads heads and writes the
//! few canned answers (400, 408, 414, 431, 503, 505) that need no worker.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};

use crate::config::{Config, Overrides, ProcessEnv};
use crate::error::Error;
use crate::exchange::respond_error;
use crate::http::parse::{parse_head, HeadError};
use crate::http::write::Persist;
use crate::http::{Conn, Head};
use crate::pool::{Job, Pool, Returner};
use crate::request_id;
use crate::serve::{refuse_busy, Busy};
use crate::state::Shared;
use crate::sys::Interest;

mod accept;
mod waiting;

use waiting::{Waiters, Waiting};

/// How long to stop accepting after `accept` fails for lack of file descriptors, so that the loop does not spin.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// Longest sleep, so that deadlines are checked even when nothing happens.
const MAX_POLL_WAIT: Duration = Duration::from_secs(1);
/// Sleep while draining (see `run`).
const DRAIN_POLL: Duration = Duration::from_millis(10);
/// Epoll tokens of the two descriptors that are not waiting connections (those use their slot number).
const WAKE: u64 = u64::MAX;
const LISTENER: u64 = u64::MAX - 1;
/// Ready descriptors taken per wait.
const EVENTS_PER_WAIT: usize = 256;

pub struct Front {
    shared: Arc<Shared>,
    /// None once draining: the listening socket is closed so that new clients go elsewhere at once.
    listener: Option<TcpListener>,
    /// Where a reload (SIGHUP) reads the configuration from; None: reload not available (embedded use).
    reload_from: Option<Overrides>,
    drain_deadline: Option<Instant>,
    jobs: Sender<Job>,
    /// Set before `run`: started on demand as jobs are queued.
    pool: Option<Arc<Pool>>,
    /// When each job still in the channel was queued, oldest first: `queued[0]` is job number `queue_base`
    /// (jobs are numbered in sending order, and the channel hands them out in that order).
    queued: VecDeque<Instant>,
    queue_base: u64,
    returned: Receiver<Conn>,
    wake_rx: UnixStream,
    open: Arc<AtomicUsize>,
    waiting: Waiters,
    /// Whether the listener is in the epoll set for reading (not while accepts are paused).
    listening: bool,
    accept_paused_until: Option<Instant>,
    /// A spare descriptor, released to answer one client when accept fails for lack of descriptors.
    reserve_fd: Option<std::fs::File>,
    last_fd_warning: Option<Instant>,
}

impl Drop for Front {
    /// The server has stopped. Idle workers sleep beside the channel, not in it (see `gate`), so they learn that
    /// no more jobs will come from the pool, not from the channel closing; the admin thread looks at `stopped`.
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::Release);
        if let Some(pool) = &self.pool {
            pool.close();
        }
    }
}

impl Front {
    /// Returns the front loop and the handle workers use to give connections back. `open` counts open client
    /// connections (the metrics read it).
    pub fn new(
        shared: Arc<Shared>,
        listener: TcpListener,
        jobs: Sender<Job>,
        reload_from: Option<Overrides>,
        open: Arc<AtomicUsize>,
    ) -> io::Result<(Front, Returner)> {
        listener.set_nonblocking(true)?;
        let (wake_tx, wake_rx) = UnixStream::pair()?;
        wake_tx.set_nonblocking(true)?;
        wake_rx.set_nonblocking(true)?;
        let (tx, returned) = crossbeam_channel::unbounded();
        let epoll = crate::sys::Epoll::new()?;
        epoll.add(wake_rx.as_raw_fd(), WAKE, Interest::Readable)?;
        epoll.add(listener.as_raw_fd(), LISTENER, Interest::Readable)?;
        let front = Front {
            shared,
            listener: Some(listener),
            reload_from,
            drain_deadline: None,
            jobs,
            pool: None,
            queued: VecDeque::new(),
            queue_base: 0,
            returned,
            wake_rx,
            open,
            waiting: Waiters::new(epoll),
            listening: true,
            accept_paused_until: None,
            reserve_fd: std::fs::File::open("/dev/null").ok(),
            last_fd_warning: None,
        };
        Ok((front, Returner::new(tx, Arc::new(wake_tx))))
    }

    /// The worker pool that takes this front's jobs (set once, before `run`).
    pub fn set_pool(&mut self, pool: Arc<Pool>) {
        self.pool = Some(pool);
    }

    pub fn run(mut self) {
        let mut events: Vec<libc::epoll_event> = Vec::with_capacity(EVENTS_PER_WAIT);
        loop {
            let now = Instant::now();
            if self.drain_deadline.is_some_and(|d| now >= d || self.open.load(Ordering::Relaxed) == 0) {
                let left = self.open.load(Ordering::Relaxed);
                log::info!("drained ({left} connection(s) still open); exiting");
                self.shared.release_signals();
                return;
            }
            self.listen_if_accepting(now);
            let queue_timeout = self.shared.state().config.queue_timeout;
            let next_deadline =
                self.waiting.next_scan().into_iter().chain(self.queued.front().map(|t| *t + queue_timeout)).min();
            let wait = next_deadline
                .map(|d| d.saturating_duration_since(now))
                .unwrap_or(MAX_POLL_WAIT)
                .min(MAX_POLL_WAIT)
                .min(self.accept_paused_until.map(|t| t.saturating_duration_since(now)).unwrap_or(MAX_POLL_WAIT));
            // While draining, the last connections close on worker threads, which do not wake this thread: look at
            // the count often, so that the stop ends as soon as they are gone.
            let wait = if self.drain_deadline.is_some() { wait.min(DRAIN_POLL) } else { wait };
            // Round up so that a deadline 0.4 ms away does not become a busy loop of zero-timeout waits.
            let wait_ms = wait.as_millis() as i32 + 1;
            if let Err(err) = self.waiting.epoll().wait(&mut events, wait_ms) {
                if err.kind() != io::ErrorKind::Interrupted {
                    log::error!("epoll_wait failed: {err}");
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            let (mut woken, mut acceptable) = (false, false);
            for event in &events {
                match event.u64 {
                    WAKE => woken = true,
                    LISTENER => acceptable = true,
                    slot => self.on_readable(slot as usize),
                }
            }
            self.expire(Instant::now());
            self.expire_queued();
            if woken {
                self.take_returned();
            }
            let (reload, stop) = self.shared.take_requests();
            if reload {
                self.reload();
            }
            if stop && self.drain_deadline.is_none() {
                self.begin_drain();
            }
            if acceptable {
                self.accept_all();
            }
        }
    }

    /// Keeps the listener in the epoll set while accepting, and out of it while accepts are paused (it stays
    /// readable, and a level-triggered set would report it on every wait).
    fn listen_if_accepting(&mut self, now: Instant) {
        let Some(listener) = &self.listener else { return };
        let accepting = self.accept_paused_until.is_none_or(|t| t <= now);
        if accepting != self.listening {
            let interest = if accepting { Interest::Readable } else { Interest::Nothing };
            match self.waiting.epoll().modify(listener.as_raw_fd(), LISTENER, interest) {
                Ok(()) => self.listening = accepting,
                Err(e) => log::error!("cannot {} accepting: {e}", if accepting { "resume" } else { "pause" }),
            }
        }
    }

    fn reload(&mut self) {
        let Some(from) = &self.reload_from else {
            log::warn!("SIGHUP ignored: this proxy was not started from a configuration file");
            return;
        };
        let result = Config::load(from, &ProcessEnv).map_err(Error::from).and_then(|c| self.shared.reload(c));
        match result {
            Ok(()) => {
                let n = self.shared.state().config.instances.len();
                log::info!("configuration reloaded: {n} instance(s)");
            }
            Err(e) => log::error!("configuration reload failed; the running configuration stays: {e}"),
        }
    }

    /// Stop accepting (the listening socket is closed), close idle connections, let requests in flight finish.
    fn begin_drain(&mut self) {
        let drain = self.shared.state().config.drain;
        if let Some(listener) = self.listener.take() {
            self.waiting.epoll().delete(listener.as_raw_fd());
        }
        self.shared.draining.store(true, Ordering::Relaxed);
        self.waiting.retain(|w| !w.conn.buf.is_empty());
        self.drain_deadline = Some(Instant::now() + drain);
        let open = self.open.load(Ordering::Relaxed);
        log::info!("stopping: no new connections; waiting up to {} s for {open} connection(s)", drain.as_secs());
    }

    fn on_readable(&mut self, slot: usize) {
        let state = self.shared.state();
        let Some(w) = self.waiting.fired(slot) else { return };
        let was_empty = w.conn.buf.is_empty();
        match w.conn.read_more() {
            Ok(0) => {
                self.waiting.remove(slot);
            }
            Ok(_) => {
                // TLS: rustls may hold more decrypted bytes than one read took; no readiness event would come
                // for them.
                while w.conn.buf.len() <= state.config.max_head_bytes && w.conn.stream.has_buffered() {
                    if !matches!(w.conn.read_more(), Ok(n) if n > 0) {
                        break;
                    }
                }
                if was_empty {
                    // The head deadline runs from its first byte; before that, the idle timeout applied.
                    self.waiting.set_deadline(slot, Instant::now() + state.config.head_timeout);
                }
                self.try_dispatch(slot);
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
            Err(_) => {
                self.waiting.remove(slot);
            }
        }
        // Still waiting for the rest of its head (or a spurious wake-up): watch it again.
        self.waiting.rearm(slot);
    }

    /// If the connection in `slot` holds a complete head, hand it to a worker (or refuse it); otherwise leave it
    /// waiting.
    fn try_dispatch(&mut self, slot: usize) {
        let state = self.shared.state();
        let cfg = &state.config;
        let Some(w) = self.waiting.get_mut(slot) else { return };
        match parse_head(&w.conn.buf, cfg.max_head_bytes, cfg.max_headers) {
            Ok(None) => {}
            Ok(Some(head)) => {
                let Some(Waiting { mut conn, .. }) = self.waiting.remove(slot) else { return };
                conn.consume(head.len);
                self.dispatch(conn, head);
            }
            Err(e) => {
                if let Some(Waiting { conn, .. }) = self.waiting.remove(slot) {
                    refuse(conn, e);
                }
            }
        }
    }

    fn dispatch(&mut self, conn: Conn, head: Head) {
        if let Err(e) = conn.stream.tcp().set_nonblocking(false) {
            log::warn!("cannot switch a client socket to blocking mode: {e}");
            return;
        }
        self.enqueue(Job { conn, head, queued_at: Instant::now() });
    }

    fn enqueue(&mut self, job: Job) {
        let queued_at = job.queued_at;
        match self.jobs.try_send(job) {
            Ok(()) => {
                self.queued.push_back(queued_at);
                if let Some(pool) = &self.pool {
                    pool.on_queued();
                }
            }
            Err(TrySendError::Full(job)) => {
                let state = self.shared.state();
                refuse_busy(&state, job.conn, &job.head, job.queued_at, Busy::QueueFull);
            }
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    /// Bounds the wait in the queue: when every worker is busy (a stream may hold one for a minute), the oldest
    /// queued request is taken back after `queue_timeout` and answered 503 + `Retry-After`, so that no client
    /// waits for a whole completion to end before it even starts.
    fn expire_queued(&mut self) {
        let Some(pool) = self.pool.clone() else { return };
        let timeout = self.shared.state().config.queue_timeout;
        loop {
            let taken = pool.taken();
            while self.queue_base < taken && self.queued.pop_front().is_some() {
                self.queue_base += 1;
            }
            match self.queued.front() {
                Some(t) if t.elapsed() >= timeout => {}
                _ => return,
            }
            // Taken by a worker that has not counted it yet: the next round looks again.
            let Some(job) = pool.take_oldest() else { return };
            if job.queued_at.elapsed() >= timeout {
                let state = self.shared.state();
                let _ = job.conn.stream.tcp().set_nonblocking(true);
                refuse_busy(&state, job.conn, &job.head, job.queued_at, Busy::QueueTimeout);
            } else {
                // A younger job than the one timed (a worker took that one in between): back in the queue.
                self.enqueue(job);
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        for w in self.waiting.take_expired(now) {
            if !w.conn.buf.is_empty() {
                log::info!("client {} did not finish its request head in time; closing", w.conn.peer.ip());
                canned(w.conn, 408, "request head not received in time", &[]);
            }
        }
    }

    fn take_returned(&mut self) {
        let mut sink = [0u8; 64];
        while matches!((&self.wake_rx).read(&mut sink), Ok(n) if n > 0) {}
        let state = self.shared.state();
        while let Ok(mut conn) = self.returned.try_recv() {
            if self.drain_deadline.is_some() || conn.stream.tcp().set_nonblocking(true).is_err() {
                continue;
            }
            // A large chunked body may have grown the buffer; an idle connection keeps only what it needs.
            conn.buf.shrink_to(1024);
            if conn.stream.has_buffered() {
                let _ = conn.read_more();
            }
            let has_bytes = !conn.buf.is_empty();
            let deadline = if has_bytes {
                Instant::now() + state.config.head_timeout
            } else {
                Instant::now() + state.config.idle_timeout
            };
            let Some(slot) = self.waiting.insert(conn, deadline) else { continue };
            if has_bytes {
                // A pipelined request may already be complete in the buffer: no readiness event will come for it.
                self.try_dispatch(slot);
            }
        }
    }
}

fn refuse(conn: Conn, e: HeadError) {
    log::info!("bad request head from {}: {} ({})", conn.peer.ip(), e.message(), e.status());
    canned(conn, e.status(), e.message(), &[]);
}

/// Writes a small error answer and closes. The socket may be non-blocking: the answer fits in any send buffer,
/// and a client that cannot take a few hundred bytes is not waited for.
fn canned(mut conn: Conn, status: u16, message: &str, extra: &[(&str, &str)]) {
    let rid = request_id::accept_or_generate(None);
    let kind = if status >= 500 { "server_error" } else { "invalid_request_error" };
    respond_error(&mut conn.stream, &rid, status, kind, message, extra, Persist::Close);
    let _ = conn.stream.tcp().shutdown(std::net::Shutdown::Write);
}
