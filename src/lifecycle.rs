//! Signals: `SIGHUP` asks for a configuration reload; `SIGTERM` and `SIGINT` ask for a graceful stop. The
//! handlers only set a flag and write one byte to the front thread's wake-up socket (both async-signal-safe);
//! the front thread does the work in its loop.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

static RELOAD: AtomicBool = AtomicBool::new(false);
static STOP: AtomicBool = AtomicBool::new(false);
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(signal: libc::c_int) {
    if signal == libc::SIGHUP {
        RELOAD.store(true, Ordering::SeqCst);
    } else {
        STOP.store(true, Ordering::SeqCst);
    }
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let byte = 1u8;
        // SAFETY: write(2) is async-signal-safe; the pointer is to a live byte; a failed write (full pipe)
        // is fine because a wake-up is then already pending.
        unsafe {
            libc::write(fd, &byte as *const u8 as *const libc::c_void, 1);
        }
    }
}

/// Routes SIGHUP, SIGTERM and SIGINT to the flags above, waking `wake_fd`'s reader.
pub fn install(wake_fd: RawFd) -> io::Result<()> {
    WAKE_FD.store(wake_fd, Ordering::SeqCst);
    for signal in [libc::SIGHUP, libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction is a valid starting value; the handler is an `extern "C" fn(c_int)` that only
        // touches atomics and calls write(2); SA_RESTART keeps blocking calls in other threads from failing.
        let ok = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as *const () as libc::sighandler_t;
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

/// Takes a pending reload request.
pub fn take_reload() -> bool {
    RELOAD.swap(false, Ordering::SeqCst)
}

/// Whether a stop was asked for (it stays asked for).
pub fn stop_requested() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Asks for a stop as SIGTERM would (for embedders and tests).
pub fn request_stop() {
    STOP.store(true, Ordering::SeqCst);
}
