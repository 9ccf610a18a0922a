//! Framing over a byte stream, shared by the io_uring and plain-socket engines.
//!
//! Sending gathers header + metadata + the caller's data slices into one iovec array handed to a
//! single vectored send (partial sends advance the array; data is never copied, except a small
//! frame held back by `try_send_more` for the next send's call, and the rest of a partial
//! `try_send`). Receiving reads into a private staging buffer of [`STAGE_BYTES`] until a whole
//! header is there, validates a private copy of it, copies the metadata out, and then moves bulk
//! data: whatever of it already arrived in the staging buffer is copied once (at most
//! `STAGE_BYTES` per frame), the rest is received straight into the caller's destination.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use djinn_proto::{FrameHeader, Limits, HEADER_LEN};
use zerocopy::IntoBytes;

use crate::{
    ByteCounters, ConnectionClose, FrameRx, FrameTx, OutFrame, RxHead, SpinGate, TransportError, TrySend, UnreadProbe,
};

/// Bytes of the receive staging buffer. Small frames (header + meta + small data) arrive in one
/// receive; larger data bypasses it.
pub(crate) const STAGE_BYTES: usize = 16 * 1024;
/// Most data slices in one frame (IOV_MAX = 1024 on Linux, minus header and metadata).
pub(crate) const DATA_SLICES_MAX: usize = 1022;
/// Largest frame [`FrameTx::try_send`] tries to send: the most it may have to keep when the
/// socket takes only part of it (token frames are tens of bytes; larger ones go to `send`).
pub(crate) const TRY_SEND_BYTES_MAX: usize = 16 * 1024;
/// Largest frame [`FrameTx::try_send_more`] holds back, copied, for the next send to take along
/// in the same `sendmsg` (a token frame is tens of bytes); a larger one is sent with `MSG_MORE`.
pub(crate) const HOLD_BYTES_MAX: usize = 1024;

/// One engine (io_uring or plain socket) moving bytes on one half of a connection. Both calls wait
/// according to the connection's `WaitMode`.
pub(crate) trait StreamIo: Send {
    /// Sends a prefix of the bytes described by `iov`; returns how many (> 0).
    ///
    /// # Safety
    /// Every iovec must describe memory that is valid for reads for the whole call.
    unsafe fn send_iov(&mut self, iov: &[libc::iovec], total_bytes: usize) -> io::Result<usize>;
    /// Receives at most `buf.len()` bytes; 0 means the peer closed its sending side.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// The socket both halves share.
    fn socket(&self) -> &Arc<OwnedFd>;
    /// See [`FrameRx::set_spin_gate`].
    fn set_spin_gate(&mut self, gate: SpinGate);
}

pub(crate) fn io_err(what: &'static str, e: io::Error) -> TransportError {
    match e.raw_os_error() {
        Some(libc::EPIPE) | Some(libc::ECONNRESET) | Some(libc::ENOTCONN) | Some(libc::ESHUTDOWN) => {
            TransportError::Closed
        }
        _ => TransportError::Io { what, source: e },
    }
}

pub(crate) struct StreamTx<I> {
    io: I,
    counters: Arc<ByteCounters>,
    /// Reused across sends so a send allocates nothing. Holds raw pointers only during `send`.
    iov: Vec<libc::iovec>,
    /// What a `try_send` could not send: the tail of one frame (at most [`TRY_SEND_BYTES_MAX`];
    /// allocated on the first partial send, then reused). Sent before anything else.
    tail: Vec<u8>,
    /// `tail` is a whole frame held back by `try_send_more` (not the rest of a partial send):
    /// the next `try_send` sends it in the same call as its own frame instead of refusing.
    held: bool,
}

// SAFETY: `iov` only holds pointers while `send` runs (it is cleared before returning); between
// calls it is an empty Vec, so moving the struct to another thread moves no borrowed memory.
unsafe impl<I: Send> Send for StreamTx<I> {}

impl<I: StreamIo> StreamTx<I> {
    pub(crate) fn new(io: I, counters: Arc<ByteCounters>) -> Self {
        StreamTx { io, counters, iov: Vec::with_capacity(DATA_SLICES_MAX + 3), tail: Vec::new(), held: false }
    }

    /// Checks `frame` and fills `self.iov` with its parts; returns its wire bytes.
    fn gather(&mut self, frame: &OutFrame<'_>, header: &FrameHeader) -> Result<usize, TransportError> {
        let data_len: u64 = frame.data.iter().map(|d| d.len() as u64).sum();
        if data_len != frame.header.data_len.get() || frame.meta.len() as u64 != frame.header.meta_len.get() as u64 {
            return Err(TransportError::DataMisuse("header lengths differ from the meta/data slices"));
        }
        if frame.data.len() > DATA_SLICES_MAX {
            return Err(TransportError::DataMisuse("more than 1022 data slices in one frame"));
        }
        let parts =
            std::iter::once(header.as_bytes()).chain(std::iter::once(frame.meta)).chain(frame.data.iter().copied());
        for p in parts.filter(|p| !p.is_empty()) {
            self.iov.push(libc::iovec { iov_base: p.as_ptr() as *mut libc::c_void, iov_len: p.len() });
        }
        Ok(HEADER_LEN + frame.meta.len() + data_len as usize)
    }

    /// Drops the first `sent` bytes from `self.iov[*first..]`: past fully sent slices, then into a
    /// partly sent one.
    fn advance(&mut self, first: &mut usize, sent: usize) {
        let mut left = sent;
        while left > 0 {
            let v = &mut self.iov[*first];
            if left >= v.iov_len {
                left -= v.iov_len;
                *first += 1;
            } else {
                // SAFETY: `left < iov_len`, so the advanced pointer stays inside the slice.
                v.iov_base = unsafe { (v.iov_base as *mut u8).add(left) } as *mut libc::c_void;
                v.iov_len -= left;
                left = 0;
            }
        }
    }

    /// Sends everything `self.iov[first..]` describes (`total` bytes), waiting as the engine waits.
    ///
    /// # Safety
    /// Every iovec must describe memory that is valid for reads for the whole call.
    unsafe fn send_all(&mut self, mut first: usize, mut total: usize) -> Result<(), TransportError> {
        while total > 0 {
            // SAFETY: the caller's contract.
            let sent = unsafe { self.io.send_iov(&self.iov[first..], total) }.map_err(|e| io_err("tcp send", e))?;
            self.counters.sent.fetch_add(sent as u64, Ordering::Relaxed);
            total -= sent;
            self.advance(&mut first, sent);
        }
        Ok(())
    }

    fn send_inner(&mut self, frame: &OutFrame<'_>) -> Result<(), TransportError> {
        self.flush_tail()?;
        let header = frame.header;
        let total = self.gather(frame, &header)?;
        // SAFETY: the iovecs point into `header` (a local), `frame.meta` and `frame.data`, all
        // borrowed for this whole call.
        unsafe { self.send_all(0, total) }
    }

    fn flush_tail(&mut self) -> Result<(), TransportError> {
        if self.tail.is_empty() {
            return Ok(());
        }
        self.iov.clear();
        self.iov.push(libc::iovec { iov_base: self.tail.as_ptr() as *mut libc::c_void, iov_len: self.tail.len() });
        // SAFETY: the one iovec points into `self.tail`, which nothing touches until the call ends.
        let r = unsafe { self.send_all(0, self.tail.len()) };
        self.iov.clear();
        // Sent, or the connection failed: either way the tail is not sent again.
        self.tail.clear();
        self.held = false;
        r
    }

    /// Holds `frame` back (copied into `tail`) for the next send to take along: one `sendmsg`
    /// for both frames instead of two. Returns false (nothing done) when something is pending
    /// already or the frame is larger than [`HOLD_BYTES_MAX`].
    fn hold(&mut self, frame: &OutFrame<'_>) -> Result<bool, TransportError> {
        if !self.tail.is_empty() {
            return Ok(false);
        }
        let header = frame.header;
        let total = self.gather(frame, &header)?;
        if total > HOLD_BYTES_MAX {
            return Ok(false);
        }
        for v in &self.iov {
            // SAFETY: each iovec describes readable memory of the frame (`header`, a local, and
            // the caller's slices), borrowed for this call.
            self.tail.extend_from_slice(unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) });
        }
        self.held = true;
        Ok(true)
    }

    /// `more`: another frame follows at once (`MSG_MORE`: the kernel holds a partial segment
    /// until the next send without it, which every other send of this half is).
    fn try_send_inner(&mut self, frame: &OutFrame<'_>, more: bool) -> Result<TrySend, TransportError> {
        if !self.tail.is_empty() && !self.held {
            return Ok(TrySend::WouldBlock);
        }
        // A held frame goes first, in this same call.
        let held = self.tail.len();
        if held > 0 {
            self.iov.push(libc::iovec { iov_base: self.tail.as_ptr() as *mut libc::c_void, iov_len: held });
        }
        let header = frame.header;
        let total = self.gather(frame, &header)?;
        if total > TRY_SEND_BYTES_MAX {
            return Ok(TrySend::WouldBlock);
        }
        let total = total + held;
        // Straight on the socket, whichever engine sends otherwise: the caller holds this half,
        // so no send of the engine is in flight, and the bytes go in order.
        // SAFETY: an all-zero msghdr is valid; it points at our iovecs, which point into
        // `self.tail` (a held frame, untouched until the call returns), `header` (a local),
        // `frame.meta` and `frame.data`, readable for this call.
        let sent = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = self.iov.as_ptr() as *mut libc::iovec;
            msg.msg_iovlen = self.iov.len() as _;
            let more = if more { libc::MSG_MORE } else { 0 };
            libc::sendmsg(self.io.socket().as_raw_fd(), &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL | more)
        };
        if sent < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(TrySend::WouldBlock),
                _ => Err(io_err("tcp send", e)),
            };
        }
        let sent = sent as usize;
        self.counters.sent.fetch_add(sent as u64, Ordering::Relaxed);
        self.held = false;
        if sent == total {
            self.tail.clear();
            return Ok(TrySend::Sent);
        }
        // The socket took a prefix: keep the rest, so no frame is ever left half-sent. The held
        // frame's rest stays at the front of `tail` (its iovec is dropped, not copied from).
        let mut first = usize::from(held > 0);
        if sent < held {
            self.tail.drain(..sent);
        } else {
            self.tail.clear();
            self.advance(&mut first, sent - held);
        }
        for v in &self.iov[first..] {
            // SAFETY: each iovec still describes readable memory of the frame (see above).
            self.tail.extend_from_slice(unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) });
        }
        Ok(TrySend::Partly(total - sent))
    }
}

impl<I: StreamIo> FrameTx for StreamTx<I> {
    fn send(&mut self, frame: &OutFrame<'_>) -> Result<(), TransportError> {
        let r = self.send_inner(frame);
        self.iov.clear();
        r
    }

    fn try_send(&mut self, frame: &OutFrame<'_>) -> Result<TrySend, TransportError> {
        let r = self.try_send_inner(frame, false);
        self.iov.clear();
        r
    }

    fn try_send_more(&mut self, frame: &OutFrame<'_>) -> Result<TrySend, TransportError> {
        // Small: held back and sent with the next frame (the caller sends one at once). Larger:
        // sent now with `MSG_MORE`, which still makes one segment but costs a second `sendmsg`.
        let r = match self.hold(frame) {
            Ok(true) => Ok(TrySend::Sent),
            Ok(false) => {
                self.iov.clear();
                self.try_send_inner(frame, true)
            }
            Err(e) => Err(e),
        };
        self.iov.clear();
        r
    }

    fn flush(&mut self) -> Result<(), TransportError> {
        self.flush_tail()
    }

    fn closer(&self) -> Option<ConnectionClose> {
        let fd = self.io.socket().clone();
        Some(Arc::new(move || {
            // SAFETY: `fd` keeps the socket open while this closure lives; shutdown(2) only changes
            // the connection's state, waking blocked receives (EOF) and failing later sends.
            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
        }))
    }

    fn unread_probe(&self) -> Option<UnreadProbe> {
        // Weak: a probe kept after both halves are gone must not keep the socket open.
        let fd = Arc::downgrade(self.io.socket());
        Some(Arc::new(move || {
            let Some(fd) = fd.upgrade() else { return 0 };
            let mut queued: libc::c_int = 0;
            // SAFETY: `fd` is an open socket while the upgraded Arc lives; TIOCOUTQ (= SIOCOUTQ)
            // writes one int: the bytes in the send queue not yet acknowledged by the peer. What
            // the peer's kernel holds unread is not visible from here.
            let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
            if r == 0 {
                queued.max(0) as u64
            } else {
                0
            }
        }))
    }
}

pub(crate) struct StreamRx<I> {
    io: I,
    counters: Arc<ByteCounters>,
    limits: Limits,
    stage: Box<[u8]>,
    /// Unconsumed bytes are `stage[start..end]`.
    start: usize,
    end: usize,
    /// Bulk data of the current frame not yet consumed.
    data_left: u64,
}

impl<I: StreamIo> StreamRx<I> {
    pub(crate) fn new(io: I, counters: Arc<ByteCounters>, limits: Limits) -> Self {
        StreamRx {
            io,
            counters,
            limits,
            stage: vec![0u8; STAGE_BYTES].into_boxed_slice(),
            start: 0,
            end: 0,
            data_left: 0,
        }
    }

    fn count(&self, r: std::io::Result<usize>) -> Result<usize, TransportError> {
        match r.map_err(|e| io_err("tcp recv", e))? {
            0 => Err(TransportError::Closed),
            n => {
                self.counters.received.fetch_add(n as u64, Ordering::Relaxed);
                Ok(n)
            }
        }
    }

    /// Receives whatever is available (at least one byte) into the free tail of the staging buffer.
    fn recv_into_stage(&mut self) -> Result<usize, TransportError> {
        let end = self.end;
        let r = self.io.recv(&mut self.stage[end..]);
        let n = self.count(r)?;
        self.end += n;
        Ok(n)
    }

    /// Makes at least `want` (≤ STAGE_BYTES) unconsumed bytes available in the staging buffer.
    fn fill_stage(&mut self, want: usize) -> Result<(), TransportError> {
        if self.end - self.start >= want {
            return Ok(());
        }
        if self.stage.len() - self.start < want {
            self.stage.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        while self.end - self.start < want {
            self.recv_into_stage()?;
        }
        Ok(())
    }

    /// Copies staged bytes into `dst`, then receives the rest straight into it.
    fn read_exact(&mut self, dst: &mut [u8]) -> Result<(), TransportError> {
        let staged = (self.end - self.start).min(dst.len());
        dst[..staged].copy_from_slice(&self.stage[self.start..self.start + staged]);
        self.start += staged;
        let mut got = staged;
        while got < dst.len() {
            let r = self.io.recv(&mut dst[got..]);
            got += self.count(r)?;
        }
        Ok(())
    }
}

impl<I: StreamIo> FrameRx for StreamRx<I> {
    fn recv_head(&mut self) -> Result<RxHead, TransportError> {
        if self.data_left != 0 {
            return Err(TransportError::DataMisuse("previous frame's data not consumed"));
        }
        self.fill_stage(HEADER_LEN)?;
        // The staging buffer is private memory: validating it in place is check-then-use safe.
        let header = FrameHeader::read_validated(&self.stage[self.start..self.end], &self.limits)?;
        self.start += HEADER_LEN;
        // Bounded by limits.meta_bytes_max, checked by read_validated.
        let mut meta = vec![0u8; header.meta_len.get() as usize];
        self.read_exact(&mut meta)?;
        self.data_left = header.data_len.get();
        Ok(RxHead { header, meta })
    }

    fn recv_data(&mut self, dst: &mut [u8]) -> Result<(), TransportError> {
        if dst.len() as u64 > self.data_left {
            return Err(TransportError::DataMisuse("recv_data past the frame's data"));
        }
        self.read_exact(dst)?;
        self.data_left -= dst.len() as u64;
        Ok(())
    }

    fn skip_data(&mut self, len: u64) -> Result<(), TransportError> {
        if len > self.data_left {
            return Err(TransportError::DataMisuse("skip_data past the frame's data"));
        }
        let mut left = len;
        while left > 0 {
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
                self.recv_into_stage()?;
            }
            let take = ((self.end - self.start) as u64).min(left) as usize;
            self.start += take;
            left -= take as u64;
            self.data_left -= take as u64;
        }
        Ok(())
    }

    fn set_spin_gate(&mut self, gate: SpinGate) {
        self.io.set_spin_gate(gate);
    }
}
