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
        crate::sys::write_byte(fd);
    }
}

/// Routes SIGHUP, SIGTERM and SIGINT to the flags above, waking `wake_fd`'s reader.
pub fn install(wake_fd: RawFd) -> io::Result<()> {
    WAKE_FD.store(wake_fd, Ordering::SeqCst);
    crate::sys::on_signals(&[libc::SIGHUP, libc::SIGTERM, libc::SIGINT], on_signal)
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
