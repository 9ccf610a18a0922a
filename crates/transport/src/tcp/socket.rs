//! Plain-socket engine: `sendmsg`/`recv` on a blocking TCP socket shared by both halves.
//!
//! Waiting: spinning uses `MSG_DONTWAIT` per call (a per-call flag, so the two halves can wait
//! differently on one socket; a bounded spin yields between calls past
//! [`crate::conn::PURE_SPIN`]), parking is a plain blocking call.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::frame::StreamIo;
use crate::conn::{spins_unbounded, PURE_SPIN};
use crate::{SpinGate, WaitMode};

pub(crate) struct SocketIo {
    fd: Arc<OwnedFd>,
    wait: WaitMode,
    spin: Duration,
    gate: Option<SpinGate>,
}

impl SocketIo {
    pub(crate) fn new(fd: Arc<OwnedFd>, wait: WaitMode, spin_us: u64) -> Self {
        SocketIo { fd, wait, spin: Duration::from_micros(spin_us), gate: None }
    }

    /// Runs `op(flags)` with MSG_DONTWAIT while spinning, then (SpinThenPark) blocking.
    fn wait_loop(&self, base_flags: i32, mut op: impl FnMut(i32) -> isize) -> io::Result<usize> {
        // When the bounded spin began (spin-then-park, or busy-poll whose gate closed).
        let mut bounded_since = None;
        loop {
            let r = op(base_flags | libc::MSG_DONTWAIT);
            if r >= 0 {
                return Ok(r as usize);
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => {}
                _ => return Err(e),
            }
            // Busy-poll spins while its gate is open; otherwise (or once it closes) spin-then-park,
            // yielding past the pure spin.
            let now = Instant::now();
            if bounded_since.is_none() && !spins_unbounded(self.wait, &self.gate) {
                bounded_since = Some(now);
            }
            let spun = bounded_since.map(|t| now - t);
            if spun.is_some_and(|s| s >= self.spin) {
                break;
            }
            if spun.is_some_and(|s| s >= PURE_SPIN) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        loop {
            let r = op(base_flags);
            if r >= 0 {
                return Ok(r as usize);
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        }
    }
}

impl StreamIo for SocketIo {
    unsafe fn send_iov(&mut self, iov: &[libc::iovec], _total_bytes: usize) -> io::Result<usize> {
        let fd = self.fd.as_raw_fd();
        self.wait_loop(libc::MSG_NOSIGNAL, |flags| {
            // SAFETY: an all-zero msghdr is valid; we then point it at the caller's iovecs, which
            // the caller guarantees readable for this call. No address, no control data.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
            msg.msg_iovlen = iov.len() as _;
            // SAFETY: `msg` and the memory it points to are valid for the call.
            unsafe { libc::sendmsg(fd, &msg, flags) }
        })
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let fd = self.fd.as_raw_fd();
        let (ptr, len) = (buf.as_mut_ptr(), buf.len());
        // SAFETY: `buf` is a live exclusive borrow of `len` writable bytes for the whole call.
        self.wait_loop(0, |flags| unsafe { libc::recv(fd, ptr as *mut libc::c_void, len, flags) })
    }

    fn socket(&self) -> &Arc<OwnedFd> {
        &self.fd
    }

    fn set_spin_gate(&mut self, gate: SpinGate) {
        self.gate = Some(gate);
    }
}
