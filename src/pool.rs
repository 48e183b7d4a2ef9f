//! The worker pool: threads that take request heads from the front thread's channel and serve each request to the
//! end with blocking I/O. Elastic within a bound: a worker is started when a request is queued and no worker is
//! idle (up to `workers`); threads that were not needed during a whole `worker_idle` period exit, down to
//! `idle_workers` kept warm. Every open stream holds one worker, so the bound is the number of simultaneous
//! completions; a thread that only exists while it streams costs its stack's touched pages and nothing after.
//!
//! Why not "a worker that waited `worker_idle` for a job exits": waiting workers are woken in turn (`gate`), so a
//! trickle of requests (a health probe, 50 requests a second) would reach every one of thousands of threads
//! often enough to keep them all. Instead the pool tracks the fewest idle workers seen during each period: that
//! many were never needed, and that many (above the warm ones) exit.
//!
//! Invariants: `live` counts started threads that have not exited; `idle` counts those not serving a request
//! (waiting for a job, or just started); `idle <= live <= max`. Idle workers sleep in `gate`, beside the channel,
//! and take jobs with `try_recv`.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};

use crate::gate::{Gate, Woke};
use crate::http::parse::parse_head;
use crate::http::{Conn, Head};
use crate::metrics::WorkerGauges;
use crate::serve::{refuse_busy, serve, Busy};
use crate::state::{Shared, State};
use crate::sys::Woken;

/// A request ready for a worker: the connection (its buffer holds what followed the head) and the parsed head.
pub struct Job {
    pub conn: Conn,
    pub head: Head,
    /// When it entered the queue: a job that waited longer than `queue_timeout` is answered 503, not served.
    pub queued_at: Instant,
}

/// Hands served keep-alive connections back to the front thread and wakes its epoll wait.
#[derive(Clone)]
pub struct Returner {
    tx: Sender<Conn>,
    wake: Arc<UnixStream>,
}

impl Returner {
    pub fn new(tx: Sender<Conn>, wake: Arc<UnixStream>) -> Returner {
        Returner { tx, wake }
    }

    /// The write end of the wake-up socket (signal handlers write to it too).
    pub fn waker(&self) -> Arc<UnixStream> {
        Arc::clone(&self.wake)
    }

    pub fn give_back(&self, conn: Conn) {
        if self.tx.send(conn).is_ok() {
            // One byte is enough to wake the front thread; if the pipe is full a wake-up is already pending.
            let _ = (&*self.wake).write(&[1]);
        }
    }
}

/// Worker stack: a rustls handshake and ureq's call stack fit comfortably; only touched pages cost memory.
const WORKER_STACK_BYTES: usize = 256 * 1024;

pub struct Pool {
    jobs: Receiver<Job>,
    shared: Arc<Shared>,
    returner: Returner,
    max: usize,
    keep_warm: usize,
    idle_after: Duration,
    /// Live, idle and peak thread counts (the metrics read them).
    counts: Arc<WorkerGauges>,
    /// The fewest idle workers since the current period began.
    idle_low: AtomicUsize,
    /// When the current period began, in ms since `born`.
    period_start_ms: AtomicU64,
    born: Instant,
    /// Workers asked to exit (surplus found at the end of a period); each exiting worker takes one.
    to_retire: AtomicUsize,
    /// Workers that exited since the heap was last trimmed.
    retired: AtomicUsize,
    /// Jobs taken off the channel so far, by workers or by the front thread expiring them.
    taken: AtomicU64,
    next_id: AtomicU64,
    /// Workers waiting for their client's next request (`keepalive_linger`).
    lingering: AtomicUsize,
    /// (write end, read end): a byte written asks every lingering worker to give way to queued requests; the
    /// read end is drained once the queue is empty.
    call: (UnixStream, UnixStream),
    /// A byte may be in `call`: workers look at the socket only then (no system call per request otherwise).
    call_pending: AtomicBool,
    /// Where idle workers sleep (see `gate`).
    gate: Gate,
}

impl Pool {
    /// Starts the warm workers.
    pub fn start(
        shared: Arc<Shared>,
        jobs: Receiver<Job>,
        returner: Returner,
        counts: Arc<WorkerGauges>,
    ) -> io::Result<Arc<Pool>> {
        let cfg = &shared.state().config;
        let call = UnixStream::pair()?;
        call.0.set_nonblocking(true)?;
        call.1.set_nonblocking(true)?;
        let pool = Arc::new(Pool {
            max: cfg.workers,
            keep_warm: cfg.idle_workers.min(cfg.workers),
            idle_after: cfg.worker_idle,
            jobs,
            shared: Arc::clone(&shared),
            returner,
            counts,
            idle_low: AtomicUsize::new(0),
            period_start_ms: AtomicU64::new(0),
            born: Instant::now(),
            to_retire: AtomicUsize::new(0),
            retired: AtomicUsize::new(0),
            taken: AtomicU64::new(0),
            next_id: AtomicU64::new(0),
            lingering: AtomicUsize::new(0),
            call,
            call_pending: AtomicBool::new(false),
            gate: Gate::default(),
        });
        for _ in 0..pool.keep_warm {
            if !pool.grow() {
                return Err(io::Error::other("cannot start the worker threads"));
            }
        }
        Ok(pool)
    }

    /// Called by the front thread after queueing a job: when no worker is idle to take it, asks the lingering
    /// ones to give way (`linger`), and starts a worker for what they cannot take. Without the call, a worker
    /// waiting out its linger for a client that never sends again made the pool start another thread for every
    /// request that arrived meanwhile.
    ///
    /// A worker that has just taken a job still counts as idle for an instant, so the front can miss that the
    /// job it queued has nobody left to take it; the worker checks the same thing from its side right after it
    /// stops counting itself (`work`), and a worker that stops lingering does too (`linger`). Each side writes
    /// before it reads (SeqCst), so one of them sees the other.
    pub fn on_queued(self: &Arc<Self>) {
        self.gate.wake_one();
        let waiting = self.jobs.len();
        let idle = self.counts.idle.load(Ordering::SeqCst);
        if waiting <= idle {
            return;
        }
        let lingering = self.lingering.load(Ordering::SeqCst);
        if lingering > 0 {
            self.call_lingering();
        }
        if waiting > idle + lingering {
            self.grow();
        }
    }

    /// Asks every lingering worker to give way: one byte wakes them all (if the socket is full, bytes are already
    /// waiting there).
    fn call_lingering(&self) {
        self.call_pending.store(true, Ordering::SeqCst);
        let _ = (&self.call.0).write(&[1]);
    }

    /// Empties the call socket, so that the next lingers are not cut short, then calls again if a request was
    /// queued meanwhile: a call written just before the emptying is not lost (whoever empties sees the request
    /// in the queue), and one written after it stays in the socket.
    fn end_call(&self) {
        self.call_pending.store(false, Ordering::SeqCst);
        let mut sink = [0u8; 64];
        while matches!((&self.call.1).read(&mut sink), Ok(n) if n > 0) {}
        if !self.jobs.is_empty() && self.lingering.load(Ordering::SeqCst) > 0 {
            self.call_lingering();
        }
    }

    pub fn live(&self) -> usize {
        self.counts.live.load(Ordering::Relaxed)
    }

    /// Jobs taken off the channel so far (the front thread uses it to know which queued job is the oldest).
    pub fn taken(&self) -> u64 {
        self.taken.load(Ordering::Acquire)
    }

    /// Takes the oldest queued job away from the workers (the front thread, to refuse it after its queue wait).
    pub fn take_oldest(&self) -> Option<Job> {
        let job = self.jobs.try_recv().ok()?;
        self.taken.fetch_add(1, Ordering::AcqRel);
        Some(job)
    }

    /// Starts one worker unless the bound is reached; false when none was started.
    fn grow(self: &Arc<Self>) -> bool {
        let reserved =
            self.counts.live.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1));
        let Ok(before) = reserved else { return false };
        self.counts.peak.fetch_max(before + 1, Ordering::Relaxed);
        // Counted idle from now: it will take the job that made us start it.
        self.counts.idle.fetch_add(1, Ordering::AcqRel);
        let pool = Arc::clone(self);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let spawned = thread::Builder::new()
            .name(format!("worker-{id}"))
            .stack_size(WORKER_STACK_BYTES)
            .spawn(move || pool.work());
        match spawned {
            Ok(_) => true,
            Err(e) => {
                self.counts.idle.fetch_sub(1, Ordering::AcqRel);
                self.counts.live.fetch_sub(1, Ordering::AcqRel);
                log::warn!("cannot start a worker thread ({e}); {} running", self.live());
                false
            }
        }
    }

    /// One worker's life: take jobs until the pool finds it surplus (or the channel closes).
    fn work(self: Arc<Self>) {
        loop {
            self.end_period_if_due();
            if self.take_retirement() {
                return;
            }
            match self.next_job() {
                Ok(job) => {
                    self.taken.fetch_add(1, Ordering::AcqRel);
                    let now_idle = self.counts.idle.fetch_sub(1, Ordering::SeqCst) - 1;
                    self.idle_low.fetch_min(now_idle, Ordering::AcqRel);
                    if now_idle == 0 && !self.jobs.is_empty() {
                        self.grow();
                    }
                    // Only after a call (no system call per request otherwise), once the queue is empty.
                    if self.call_pending.load(Ordering::SeqCst) && self.jobs.is_empty() {
                        self.end_call();
                    }
                    self.serve_connection(job);
                    self.counts.idle.fetch_add(1, Ordering::AcqRel);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.counts.idle.fetch_sub(1, Ordering::AcqRel);
                    self.counts.live.fetch_sub(1, Ordering::AcqRel);
                    return;
                }
            }
        }
    }

    /// The next job, waiting for one at most `idle_after`; `Disconnected` once the front has gone (`close`).
    fn next_job(&self) -> Result<Job, RecvTimeoutError> {
        let deadline = Instant::now() + self.idle_after;
        loop {
            match self.jobs.try_recv() {
                Ok(job) => return Ok(job),
                Err(TryRecvError::Disconnected) => return Err(RecvTimeoutError::Disconnected),
                Err(TryRecvError::Empty) => {}
            }
            match self.gate.wait(|| !self.jobs.is_empty(), deadline) {
                Woke::Look => {}
                Woke::TimedOut => return Err(RecvTimeoutError::Timeout),
                Woke::Closed => return Err(RecvTimeoutError::Disconnected),
            }
        }
    }

    /// No more jobs will come (the front thread has stopped): idle workers exit once the queue is empty.
    pub fn close(&self) {
        self.gate.close();
    }

    /// At the end of each `idle_after` period (noticed by whichever worker wakes first), the workers that stayed
    /// idle through all of it, beyond the warm ones, are asked to exit.
    fn end_period_if_due(&self) {
        let now = self.born.elapsed().as_millis() as u64;
        let start = self.period_start_ms.load(Ordering::Acquire);
        if now.saturating_sub(start) < self.idle_after.as_millis() as u64 {
            return;
        }
        if self.period_start_ms.compare_exchange(start, now, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return; // another worker ended this period
        }
        // The workers that exited during the last period have freed their buffers by now: give the pages back
        // (see `sys::release_free_heap`), once per period at most.
        if self.retired.swap(0, Ordering::AcqRel) > 0 {
            crate::sys::release_free_heap();
        }
        let idle_now = self.counts.idle.load(Ordering::Acquire);
        let never_needed = self.idle_low.swap(idle_now, Ordering::AcqRel).min(idle_now);
        let live = self.counts.live.load(Ordering::Acquire);
        let pending = self.to_retire.load(Ordering::Acquire);
        let surplus = never_needed.min(live.saturating_sub(self.keep_warm)).saturating_sub(pending);
        if surplus > 0 {
            self.to_retire.fetch_add(surplus, Ordering::AcqRel);
        }
    }

    /// Exits this worker if one is asked to (never below the warm ones); true when it must return.
    fn take_retirement(&self) -> bool {
        let asked = self.to_retire.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        if asked.is_err() {
            return false;
        }
        let left =
            self.counts.live.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n > self.keep_warm).then(|| n - 1));
        if left.is_err() {
            return false;
        }
        self.counts.idle.fetch_sub(1, Ordering::AcqRel);
        self.retired.fetch_add(1, Ordering::AcqRel);
        // glibc keeps an exited thread's stack for reuse, resident pages and all: leave it with none.
        crate::sys::trim_stack();
        true
    }

    /// Serves the job's request, then the connection's next ones while they arrive back to back.
    fn serve_connection(&self, job: Job) {
        let Job { mut conn, mut head, queued_at } = job;
        let state = self.shared.state();
        if queued_at.elapsed() > state.config.queue_timeout {
            refuse_busy(&state, conn, &head, queued_at, Busy::QueueTimeout);
            return;
        }
        loop {
            // Each request takes the configuration current when it starts, and keeps it to its end.
            let state = self.shared.state();
            if !conn.worker_ready {
                if let Err(e) = conn.stream.tcp().set_read_timeout(Some(state.config.body_read_timeout)) {
                    log::warn!("cannot set a read timeout on a client socket: {e}");
                    return;
                }
                conn.worker_ready = true;
            }
            let draining = self.shared.is_draining();
            // A bug that panics on one request must cost that request only, not a worker: the connection is
            // dropped (closed) during unwinding and this thread goes on. (Release builds abort on panic instead.)
            let mut kept = match catch_unwind(AssertUnwindSafe(|| serve(&state, conn, head, draining))) {
                Ok(Some(kept)) => kept,
                Ok(None) => return,
                Err(_) => {
                    log::error!("a request handler panicked; its connection was closed");
                    return;
                }
            };
            match self.next_request_here(&state, &mut kept) {
                Next::Here(next) => (conn, head) = (kept, next),
                Next::ToFront => {
                    self.returner.give_back(kept);
                    return;
                }
                Next::Closed => return,
            }
        }
    }
}

impl Pool {
    /// The keep-alive fast path: a client that sends its next request at once (a pooled SDK, a batch job, a load
    /// generator) is served by the same worker, saving two thread hand-offs and a poll round. Anything slower than
    /// `keepalive_linger`, any incomplete or invalid head, and every connection while requests are queued goes
    /// back to the front thread, which owns waiting.
    fn next_request_here(&self, state: &State, conn: &mut Conn) -> Next {
        let cfg = &state.config;
        if conn.buf.is_empty() {
            if cfg.keepalive_linger.is_zero() || !self.jobs.is_empty() {
                return Next::ToFront;
            }
            if !conn.stream.has_buffered() && !self.linger(conn, cfg.keepalive_linger) {
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

    /// Waits up to `wait` for the client's next request. False when it did not come, when the front thread asked
    /// lingering workers to give way (`on_queued`), or when requests are queued: the connection then goes back
    /// to the front thread and this worker takes a queued request.
    fn linger(&self, conn: &Conn, wait: Duration) -> bool {
        self.lingering.fetch_add(1, Ordering::SeqCst);
        let woken = crate::sys::readable_within(conn.stream.tcp(), &self.call.1, wait);
        self.lingering.fetch_sub(1, Ordering::SeqCst);
        if !self.jobs.is_empty() {
            return false;
        }
        if woken == Woken::Called {
            // Whatever was queued has been taken already: empty the socket, or every later linger would end at
            // once.
            self.end_call();
        }
        woken == Woken::Readable
    }
}

enum Next {
    /// The next request's head, already taken from the connection's buffer.
    Here(Head),
    ToFront,
    Closed,
}
