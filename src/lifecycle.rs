//! Signals: `SIGHUP` asks for a configuration reload; `SIGTERM` and `SIGINT` ask for a graceful stop. Signal
//! handlers are process-wide by nature, so this is the one place with process-wide state: a small table of the
//! servers that asked for signals (`install`), each with its own flags and its front thread's wake-up socket.
//! The handler only sets flags and writes one byte to each wake-up socket (both async-signal-safe); each front
//! thread moves its slot's flags into its own server's state (`Shared`) in its loop.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

/// Servers in one process that can take signals at once (the binary has one).
const SLOTS: usize = 8;

struct Slot {
    /// The front thread's wake-up socket; -1: the slot is free.
    wake_fd: AtomicI32,
    reload: AtomicBool,
    stop: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)] // only used to initialise the array below
const FREE: Slot = Slot { wake_fd: AtomicI32::new(-1), reload: AtomicBool::new(false), stop: AtomicBool::new(false) };
static TABLE: [Slot; SLOTS] = [FREE; SLOTS];

extern "C" fn on_signal(signal: libc::c_int) {
    for slot in &TABLE {
        let fd = slot.wake_fd.load(Ordering::SeqCst);
        if fd < 0 {
            continue;
        }
        if signal == libc::SIGHUP {
            slot.reload.store(true, Ordering::SeqCst);
        } else {
            slot.stop.store(true, Ordering::SeqCst);
        }
        crate::sys::write_byte(fd);
    }
}

/// A server's place in the signal table, from `install`; given back with `release`.
#[derive(Debug, Clone, Copy)]
pub struct SignalSlot(usize);

/// Routes SIGHUP, SIGTERM and SIGINT to the server whose front thread reads `wake_fd`.
pub fn install(wake_fd: RawFd) -> io::Result<SignalSlot> {
    let index = TABLE
        .iter()
        .position(|s| s.wake_fd.compare_exchange(-1, wake_fd, Ordering::SeqCst, Ordering::SeqCst).is_ok())
        .ok_or_else(|| io::Error::other(format!("at most {SLOTS} servers in one process can take signals")))?;
    crate::sys::on_signals(&[libc::SIGHUP, libc::SIGTERM, libc::SIGINT], on_signal)?;
    Ok(SignalSlot(index))
}

impl SignalSlot {
    /// Takes what the signals asked of this server since the last call: (reload, stop).
    pub fn take(self) -> (bool, bool) {
        let slot = &TABLE[self.0];
        (slot.reload.swap(false, Ordering::SeqCst), slot.stop.swap(false, Ordering::SeqCst))
    }

    /// Frees the slot (the server stopped).
    pub fn release(self) {
        let slot = &TABLE[self.0];
        slot.wake_fd.store(-1, Ordering::SeqCst);
        slot.reload.store(false, Ordering::SeqCst);
        slot.stop.store(false, Ordering::SeqCst);
    }
}
