//! Every call into the C library that needs `unsafe`, in one place: `poll`, `epoll`, signal handlers, `SO_LINGER`,
//! the upstream liveness peek, the listener's backlog, the open-files limit, and memory housekeeping (giving back
//! the stack pages a worker touched deep in a call that is over, and the heap pages freed after a burst). The rest
//! of the crate has `#![deny(unsafe_code)]`.
//!
//! Why the memory part: a stream holds its worker thread for a minute, and its resident memory is what it touched at its deepest,
//! not what it uses while it waits. Connecting to an upstream goes about 42 KiB down the stack (ureq's connector
//! chain); the copy loop that follows needs about 12 KiB. Without a trim every open stream keeps the other 30 KiB.

#![allow(unsafe_code)]

use std::cell::Cell;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// Bytes kept below the caller's frame: the copy loop's own calls (ureq's read path, the client write) stay within
/// this, so the trimmed pages are not faulted straight back in.
const KEEP_BELOW: usize = 4 * 1024;

thread_local! {
    /// The lowest address of this thread's stack mapping (0: not known yet, or unknowable).
    static STACK_LOW: Cell<usize> = const { Cell::new(0) };
}

/// Returns to the kernel the pages of this thread's stack more than `KEEP_BELOW` bytes below the caller. Nothing
/// lives there (the stack grows down and the caller's frame is above), so they fault back in as zeroes if a later
/// call goes that deep. One `madvise`; a no-op where the stack bounds cannot be read.
pub fn trim_stack() {
    let marker = 0u8;
    let here = std::ptr::addr_of!(marker) as usize;
    let page = page_size();
    let low = stack_low();
    if low == 0 || page == 0 {
        return;
    }
    // Round down: never touch the page that holds anything at or above `here - KEEP_BELOW`.
    let end = here.saturating_sub(KEEP_BELOW) & !(page - 1);
    // The lowest page of the mapping may be glibc's guard area; start one page above it.
    let start = (low + page).next_multiple_of(page);
    if end <= start {
        return;
    }
    // SAFETY: [start, end) lies inside this thread's own stack mapping (from pthread_getattr_np), strictly below
    // the live frames (`here` is a local of this call, and `end` is KEEP_BELOW further down). MADV_DONTNEED on
    // private anonymous memory only drops pages: later accesses see zero-filled pages, which is what unused stack
    // may hold. No Rust reference points there.
    unsafe {
        libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED);
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).unwrap_or(0)
}

/// This thread's stack mapping's lowest address, read once per thread.
fn stack_low() -> usize {
    STACK_LOW.with(|cell| {
        if cell.get() == 0 {
            cell.set(read_stack_low().unwrap_or(usize::MAX));
        }
        match cell.get() {
            usize::MAX => 0,
            low => low,
        }
    })
}

fn read_stack_low() -> Option<usize> {
    // SAFETY: `attr` is initialised by pthread_getattr_np before it is read and destroyed once after; the out
    // pointers are valid locals. pthread_self is always valid for the calling thread.
    unsafe {
        let mut attr: libc::pthread_attr_t = std::mem::zeroed();
        if libc::pthread_getattr_np(libc::pthread_self(), &mut attr) != 0 {
            return None;
        }
        let mut addr: *mut libc::c_void = std::ptr::null_mut();
        let mut size: libc::size_t = 0;
        let ok = libc::pthread_attr_getstack(&attr, &mut addr, &mut size) == 0;
        libc::pthread_attr_destroy(&mut attr);
        (ok && !addr.is_null() && size > 0).then_some(addr as usize)
    }
}

/// Gives the heap pages that are free after a burst back to the kernel. glibc keeps freed memory in its per-thread
/// arenas (it trims only the top of each), so after a thousand streams end the process would keep their buffers'
/// pages; `malloc_trim` releases every whole free page in every arena. musl's allocator returns memory by itself.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions; it takes the allocator's own locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Sets the listener's backlog: Rust's `bind` uses 128, which a burst of clients overflows (the kernel then
/// drops their SYNs and they retry after a second). Calling `listen` again on a listening socket only changes
/// the backlog; the kernel caps it at `net.core.somaxconn`.
pub fn set_backlog(listener: &TcpListener, backlog: u32) -> io::Result<()> {
    let backlog = i32::try_from(backlog).unwrap_or(i32::MAX);
    // SAFETY: a valid listening socket's fd, for the duration of the call.
    if unsafe { libc::listen(listener.as_raw_fd(), backlog) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Raises the soft open-files limit to the hard limit: every client and upstream connection is an fd, and the
/// usual soft limit of 1024 would cap the proxy well below what the machine can serve.
pub fn raise_fd_limit() {
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

/// `poll(2)` on `fds` for at most `timeout_ms` (-1: no limit); the number of ready entries.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    // SAFETY: `fds` is a live, initialised slice of pollfd for the whole call, and its length is passed.
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    usize::try_from(ready).map_err(|_| io::Error::last_os_error())
}

/// An epoll set: the front thread waits on thousands of connections with it, and each wake-up costs what is ready,
/// not what is open (`poll` looks at every descriptor every time).
pub struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 has no preconditions; a non-negative result is a new descriptor that we own.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by epoll_create1 and is owned by nobody else.
        Ok(Epoll { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// Watches `fd` as `interest` says; `token` comes back with its events.
    pub fn add(&self, fd: RawFd, token: u64, interest: Interest) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, token, interest)
    }

    /// Changes what a watched `fd` is watched for, and its token.
    pub fn modify(&self, fd: RawFd, token: u64, interest: Interest) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, token, interest)
    }

    /// Stops watching `fd`; needed before a descriptor that stays open (handed to a worker) leaves the front.
    pub fn delete(&self, fd: RawFd) {
        // SAFETY: both descriptors are open for the call; EPOLL_CTL_DEL ignores the event pointer (null is fine
        // since Linux 2.6.9). An fd that is not in the set is an error we have nothing to do about.
        unsafe {
            libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut());
        }
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, token: u64, interest: Interest) -> io::Result<()> {
        let events = match interest {
            Interest::Nothing => 0,
            Interest::Readable => libc::EPOLLIN as u32,
            Interest::ReadableOnce => (libc::EPOLLIN | libc::EPOLLONESHOT) as u32,
        };
        let mut event = libc::epoll_event { events, u64: token };
        // SAFETY: both descriptors are open for the call; `event` is a live, initialised epoll_event that the
        // kernel only reads.
        if unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut event) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits at most `timeout_ms` (-1: no limit) and fills `events` (cleared first) with the ready tokens.
    pub fn wait(&self, events: &mut Vec<libc::epoll_event>, timeout_ms: i32) -> io::Result<()> {
        events.clear();
        let room = i32::try_from(events.capacity()).unwrap_or(i32::MAX).max(1);
        events.reserve(room as usize);
        // SAFETY: the buffer has room for `room` events (reserved above); the kernel writes at most that many, and
        // `set_len` covers exactly the ones it reports.
        let n = unsafe { libc::epoll_wait(self.fd.as_raw_fd(), events.as_mut_ptr(), room, timeout_ms) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel initialised the first `n` (<= room <= capacity) entries.
        unsafe { events.set_len(n as usize) };
        Ok(())
    }
}

/// What an `Epoll` watches a descriptor for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interest {
    Nothing,
    /// Readable, reported on every wait while it stays so (level-triggered).
    Readable,
    /// Readable, reported once: the descriptor then stays in the set, silent, until `modify` arms it again.
    ReadableOnce,
}

/// How a wait for a client's next request ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Woken {
    /// The client's socket is readable (data, EOF or error).
    Readable,
    /// The other socket is readable: someone asked the waiter to stop.
    Called,
    TimedOut,
}

/// Waits up to `wait` for `stream` to become readable, or for `call` to.
pub fn readable_within(stream: &TcpStream, call: &UnixStream, wait: Duration) -> Woken {
    let mut fds = [
        libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: call.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    let ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
    match poll(&mut fds, ms) {
        Ok(n) if n > 0 && fds[0].revents != 0 => Woken::Readable,
        Ok(n) if n > 0 => Woken::Called,
        _ => Woken::TimedOut,
    }
}

/// What a non-blocking peek at a socket found: nothing waiting (the peer is quiet and the connection open),
/// end of stream, or bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Peeked {
    Nothing,
    Closed,
    Bytes,
}

/// Looks at `stream` without blocking and without taking anything from it: one `recv(MSG_PEEK | MSG_DONTWAIT)`,
/// where the usual probe (set non-blocking, read, set blocking again) costs three calls and would consume a byte.
pub fn peek(stream: &TcpStream) -> io::Result<Peeked> {
    let mut byte = 0u8;
    // SAFETY: the fd is owned by `stream` and open for this call; the buffer is one live, writable byte and its
    // length is passed. MSG_PEEK leaves the byte in the socket; MSG_DONTWAIT makes this call alone non-blocking
    // (the socket's own mode is untouched, so no other thread's blocking read changes behaviour).
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            &mut byte as *mut u8 as *mut libc::c_void,
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => Ok(Peeked::Closed),
        n if n > 0 => Ok(Peeked::Bytes),
        _ => match io::Error::last_os_error() {
            e if e.kind() == io::ErrorKind::WouldBlock => Ok(Peeked::Nothing),
            e => Err(e),
        },
    }
}

/// Makes the coming close of `stream` a reset (RST) instead of a clean FIN (`SO_LINGER` with a zero timeout).
pub fn reset_on_close(stream: &TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: the fd is owned by `stream` and open for this call; the pointer and length describe a valid
    // `linger` that lives across the call. The kernel copies it; nothing is retained.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Routes `signals` to `handler`, with `SA_RESTART` so that blocking calls in other threads do not fail. The
/// handler must be async-signal-safe (atomics and [`write_byte`] only).
pub fn on_signals(signals: &[libc::c_int], handler: extern "C" fn(libc::c_int)) -> io::Result<()> {
    for &signal in signals {
        // SAFETY: a zeroed sigaction is a valid starting value; the handler is an `extern "C" fn(c_int)`;
        // the pointers passed are to live locals.
        let ok = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler as *const () as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut()) == 0
        };
        if !ok {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Writes one byte to `fd`, ignoring the outcome; async-signal-safe (a signal handler's wake-up).
pub fn write_byte(fd: RawFd) {
    let byte = 1u8;
    // SAFETY: write(2) is async-signal-safe; the pointer is to a live byte; a failed write (full pipe) is fine
    // for a wake-up, which is then already pending.
    unsafe {
        libc::write(fd, &byte as *const u8 as *const libc::c_void, 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    fn deep(n: usize) -> u8 {
        let buf = [n as u8; 4096];
        if n == 0 {
            buf[100]
        } else {
            std::hint::black_box(deep(n - 1)).wrapping_add(buf[7])
        }
    }

    #[test]
    fn a_trimmed_stack_still_works_deep_and_the_bounds_are_known() {
        std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(|| {
                assert!(stack_low() > 0, "pthread_getattr_np gives the stack bounds");
                let before = deep(20);
                trim_stack();
                // The trimmed pages come back zeroed on demand: going deep again works and computes the same.
                assert_eq!(deep(20), before);
                trim_stack();
            })
            .expect("spawn")
            .join()
            .expect("no crash");
        release_free_heap();
    }
}
