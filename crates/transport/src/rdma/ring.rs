//! The two halves of an rdma connection. Each half owns one RC queue pair and its CQ; the peer's
//! opposite half owns the other end of that QP, so no CQ is ever shared between threads.
//!
//! Data (`RdmaTx` → peer's `RdmaRx`): the receiver registered a ring of `ring_bytes`; the sender
//! keeps a registered staging buffer of the same size and mirrors the ring's offsets in it. Frames
//! (header, metadata, bulk data, back to back) are copied into staging and placed in the ring by
//! RDMA WRITE_WITH_IMM in chunks of at most `CHUNK_BYTES` that never cross the ring's end; the
//! immediate is the chunk's length, so the receiver learns new bytes from its CQ and never has to
//! trust an index in memory the peer writes. Writes of up to the QP's `max_inline_data` go inline.
//! Every `SIGNAL_EVERY`-th work request is signalled (selective signalling). A receiver that
//! never parks (a busy-poll client) is written to by plain WRITE instead, each chunk framed so it
//! can find it by polling memory ([`polled`]): no receive or completion per chunk.
//!
//! Credits (`RdmaRx` → peer's `RdmaTx`): the receiver reposts a receive for every immediate it
//! took, in one chained post before it waits (not on the path of a frame that has arrived), and,
//! once a quarter of the ring (or of its receives) is free, SENDs its cumulative consumed bytes
//! and reposted receives (`Credit`, inline) into one of the sender's posted receive slots.
//! A sender with no ring space or no receive credit waits: never grows.
//!
//! Waiting (`WaitMode`): busy-poll polls the CQ and checks the rendezvous socket for hang-up every
//! millisecond; spin-then-park polls for `spin_us`, then arms the CQ, polls once more and sleeps
//! in `poll(2)` on the completion channel and the socket. A receiving half whose spin gate is
//! closed (`FrameRx::set_spin_gate`: the server's idle connections) waits as spin-then-park does,
//! so an idle busy-poll connection burns no CPU.
//!
//! Trust: a chunk length that would overfill the ring and a credit beyond what was sent are
//! protocol errors (`Other`); headers and metadata are copied out of the ring into private memory
//! before they are validated. The peer can write only this connection's ring (its own MR and rkey).

mod polled;
mod rendezvous;
pub(crate) use rendezvous::RENDEZVOUS_BYTES_MIN;

pub use self::rendezvous::OutOfBounds;

use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use djinn_proto::{FrameHeader, HeaderError, Limits, HEADER_LEN};

use super::verbs::{ibv_wc, ibv_wc_opcode, ibv_wc_status, Cq, Device, Mr, Mw, Qp};
use crate::conn::{spins_unbounded, PURE_SPIN};
use crate::shm::sys::peer_gone_now;
use crate::{ByteCounters, ConnectionClose, FrameRx, FrameTx, OutFrame, RxHead, SpinGate, TransportError, WaitMode};

/// Largest single write (and immediate): the receiver starts copying out while the rest flies.
pub(crate) const CHUNK_BYTES: usize = 256 * 1024;
/// Send queue depth of each QP.
pub(crate) const SEND_WR: u32 = 128;
/// Every this many work requests one is signalled, so the send queue's slots are reclaimed.
const SIGNAL_EVERY: u64 = 32;
/// Receives the data receiver keeps posted: the sender's bound on unconsumed immediates.
pub(crate) const DATA_RECV_WR: u32 = 128;
/// Credit receive slots the sender keeps posted. A credit reports at least one new immediate or a
/// quarter of the ring, so there are never more in flight than immediates plus a few.
pub(crate) const CREDIT_RECV_WR: u32 = 2 * DATA_RECV_WR + 16;
/// Bytes of one credit message (and of its receive slot): credit, then an optional grant.
pub(crate) const CREDIT_BYTES: usize = 40;
/// Inline bytes asked of each QP (frames this small skip the NIC's read of staging).
pub(crate) const INLINE_BYTES: u32 = 256;
/// Immediate that says "the sending half closed"; never a chunk length.
const CLOSE_IMM: u32 = u32::MAX;
/// Immediate that says "the granted direct write is complete" (see `rendezvous`).
pub(super) const GRANT_DONE_IMM: u32 = u32::MAX - 1;
/// While busy-polling, check the peer's socket (and yield) at most this often.
const LIVENESS_CHECK_INTERVAL: Duration = Duration::from_millis(1);
/// A closing sender waits at most this long for its last writes to be acknowledged.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// Polls of the CQ between two looks at the clock while spinning (see `Waiter::wait`).
const POLLS_PER_LOOK: u32 = 64;
/// Completions taken per poll.
const POLL_BATCH: usize = 16;

/// Why a ring operation stopped.
#[derive(Debug, Clone)]
pub(crate) enum RingError {
    PeerGone,
    LocalClosed,
    Corrupt(&'static str),
    Header(HeaderError),
    Verbs(String),
}

impl RingError {
    pub(crate) fn into_transport(self, peer: &str) -> TransportError {
        match self {
            RingError::PeerGone | RingError::LocalClosed => TransportError::Closed,
            RingError::Corrupt(what) => {
                TransportError::Other(format!("rdma peer {peer} broke the ring protocol: {what}"))
            }
            RingError::Header(e) => TransportError::BadHeader(e),
            RingError::Verbs(what) => TransportError::Other(format!("rdma {peer}: {what}")),
        }
    }
}

fn verbs(e: std::io::Error) -> RingError {
    RingError::Verbs(e.to_string())
}

/// What both halves share: the rendezvous socket (kept open so each side sees the other die).
pub(crate) struct Link {
    /// A client's cache of registered `RegBuf`s (`None` on a server's connections).
    pub(crate) reg_cache: Option<super::regcache::RegCache>,
    pub(crate) sock: OwnedFd,
    pub(crate) peer: String,
    pub(crate) counters: Arc<ByteCounters>,
    pub(crate) closed: AtomicBool,
    pub(crate) dev: Arc<Device>,
    /// The listener's count of live connections, given back when the connection goes.
    pub(crate) _slot: Option<super::listener::Slot>,
}

impl Link {
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        // SAFETY: shutdown on a socket this link owns; it stays open (closed on drop).
        unsafe { libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_RDWR) };
    }
    fn check_open(&self) -> Result<(), RingError> {
        if self.closed.load(Ordering::Acquire) {
            Err(RingError::LocalClosed)
        } else {
            Ok(())
        }
    }
}

/// The credit message, little-endian: consumed bytes, consumed immediates, closed flag, and the
/// grant it carries (kind byte 17, rkey 20..24, address 24..32, length 32..40).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct Credit {
    pub(super) head: u64,
    pub(super) imms: u64,
    pub(super) closed: bool,
    pub(super) grant: Grant,
}

/// What the receiver lets the sender do with the next `len` bytes of a rendezvous frame's data.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) enum Grant {
    #[default]
    None,
    /// Stream them through the ring as usual.
    Ring { len: u64 },
    /// RDMA-WRITE them to `addr..+len` under `rkey` (a registration of exactly that range).
    Direct { addr: u64, rkey: u32, len: u64 },
}

impl Credit {
    pub(super) fn encode(&self) -> [u8; CREDIT_BYTES] {
        let mut b = [0u8; CREDIT_BYTES];
        b[0..8].copy_from_slice(&self.head.to_le_bytes());
        b[8..16].copy_from_slice(&self.imms.to_le_bytes());
        b[16] = self.closed as u8;
        let (kind, rkey, addr, len) = match self.grant {
            Grant::None => (0u8, 0u32, 0u64, 0u64),
            Grant::Ring { len } => (1, 0, 0, len),
            Grant::Direct { addr, rkey, len } => (2, rkey, addr, len),
        };
        b[17] = kind;
        b[20..24].copy_from_slice(&rkey.to_le_bytes());
        b[24..32].copy_from_slice(&addr.to_le_bytes());
        b[32..40].copy_from_slice(&len.to_le_bytes());
        b
    }
    fn decode(b: &[u8; CREDIT_BYTES]) -> Option<Credit> {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let (rkey, addr, len) = (u32::from_le_bytes(b[20..24].try_into().expect("4 bytes")), u64_at(24), u64_at(32));
        let grant = match b[17] {
            0 => Grant::None,
            1 => Grant::Ring { len },
            2 => Grant::Direct { addr, rkey, len },
            _ => return None,
        };
        Some(Credit { head: u64_at(0), imms: u64_at(8), closed: b[16] != 0, grant })
    }
}

/// How a half waits for its CQ.
#[derive(Clone)]
struct Waiter {
    mode: WaitMode,
    spin: Duration,
    /// Busy-poll spins without bound only while this is open (the receiving half's, see
    /// `FrameRx::set_spin_gate`; `None`: always open).
    gate: Option<SpinGate>,
}

impl Waiter {
    /// Returns as soon as `ready` (which polls the CQ) yields a value.
    ///
    /// The clock is read once per [`POLLS_PER_LOOK`] polls, and not at all by a wait that ends
    /// within the first look: a clock read costs tens of nanoseconds on hardware but several
    /// microseconds where the clocksource is emulated (the VM's HPET), as much as a round trip.
    fn wait<T>(
        &self,
        link: &Link,
        cq: &Cq,
        mut ready: impl FnMut() -> Result<Option<T>, RingError>,
    ) -> Result<T, RingError> {
        link.check_open()?;
        if let Some(v) = ready()? {
            return Ok(v);
        }
        let mut first: Option<(Instant, Instant)> = None;
        loop {
            for _ in 0..POLLS_PER_LOOK {
                std::hint::spin_loop();
                if let Some(v) = ready()? {
                    return Ok(v);
                }
            }
            link.check_open()?;
            let now = Instant::now();
            let (start, last_check) = first.get_or_insert((now, now));
            // Checked at every look: a gate closed while spinning parks this wait too.
            let spin = if spins_unbounded(self.mode, &self.gate) { Duration::MAX } else { self.spin };
            if now - *start >= spin {
                break;
            }
            if now - *last_check >= LIVENESS_CHECK_INTERVAL {
                if peer_gone_now(&link.sock) {
                    return ready()?.ok_or(RingError::PeerGone);
                }
                std::thread::yield_now();
                *last_check = now;
            } else if spin != Duration::MAX && now - *start >= PURE_SPIN {
                std::thread::yield_now();
            }
        }
        loop {
            cq.arm().map_err(verbs)?;
            // A completion that came before the arm raised no event: look once more.
            if let Some(v) = ready()? {
                return Ok(v);
            }
            let mut fds = [
                libc::pollfd { fd: cq.fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: link.sock.as_raw_fd(), events: libc::POLLIN | libc::POLLRDHUP, revents: 0 },
            ];
            // SAFETY: two live pollfd entries.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return Err(RingError::Verbs(format!(
                    "poll on completion channel: {}",
                    std::io::Error::last_os_error()
                )));
            }
            if fds[0].revents != 0 {
                cq.take_event();
            }
            link.check_open()?;
            if let Some(v) = ready()? {
                return Ok(v);
            }
            if fds[1].revents != 0 {
                return Err(RingError::PeerGone);
            }
        }
    }
}

/// Says why a connection ends on a failed completion: a flush is the echo of an earlier failure
/// (or of our own close), anything else names the cause (a peer that died shows as a retry
/// exhausted, a refused write as a remote access error).
fn failed_completion(link: &Link, wc: &ibv_wc, half: &str) {
    let (status, opcode, vendor) = (wc.status, wc.opcode, wc.vendor_err);
    if wc.status == ibv_wc_status::IBV_WC_WR_FLUSH_ERR || link.closed.load(Ordering::Acquire) {
        tracing::debug!(peer = %link.peer, half, status, opcode, "rdma: work request flushed");
    } else {
        tracing::warn!(peer = %link.peer, half, status, opcode, vendor, "rdma: work completion failed; closing the connection");
    }
}

/// Send-queue accounting shared by both halves' QPs: posted and known-complete counts.
#[derive(Default)]
struct SendQueue {
    posted: u64,
    done: u64,
}

impl SendQueue {
    fn full(&self) -> bool {
        self.posted - self.done >= SEND_WR as u64 - 1
    }
    /// Id and signalled flag for the next work request.
    fn next(&mut self) -> (u64, bool) {
        self.posted += 1;
        (self.posted, self.posted.is_multiple_of(SIGNAL_EVERY))
    }
    fn completed(&mut self, wr_id: u64) {
        self.done = self.done.max(wr_id);
    }
}

/// Where the peer's ring is.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RemoteRing {
    pub(crate) addr: u64,
    pub(crate) rkey: u32,
    pub(crate) bytes: u64,
}

/// The sending half.
pub struct RdmaTx {
    // Field order is drop order: the QP goes before the memory it used.
    qp: Qp,
    staging: Mr,
    credit_slots: Mr,
    link: Arc<Link>,
    waiter: Waiter,
    limits: Limits,
    remote: RemoteRing,
    sq: SendQueue,
    /// Bytes written into staging (posted or pending), cumulative.
    tail: u64,
    /// Bytes at the end of `tail` not yet posted.
    pending: u64,
    /// Where the last posted write into the ring ends (cumulative): no credit may pass it.
    posted: u64,
    imms_sent: u64,
    credit: Credit,
    /// The receiver's latest unused grant (rendezvous frames only).
    grant: Grant,
    /// Address and key of the last direct grant used (for `OutOfBounds::StaleGrant`).
    stale: Option<(u64, u32)>,
    poisoned: Option<RingError>,
    /// The receiver polls its ring ([`polled`]): the next chunk's sequence number.
    polled: Option<u32>,
    /// Where the open chunk's prefix is (cumulative, as `tail`), while `pending > 0`.
    chunk_start: u64,
}

/// The receiving half.
pub struct RdmaRx {
    /// Bound over one granted range of a start-up host region per transfer (`rendezvous`);
    /// `None` where the device has no memory windows (then grants register their range).
    /// Declared before `qp`, so it is deallocated first: a window left bound (an invalidation
    /// that failed) holds a reference to its QP in soft-RoCE, and destroying the QP first blocks
    /// in the kernel (uninterruptibly, ~20 s) until that reference times out.
    window: Option<Mw>,
    qp: Qp,
    ring: Mr,
    link: Arc<Link>,
    waiter: Waiter,
    limits: Limits,
    sq: SendQueue,
    size: u64,
    head: u64,
    tail: u64,
    imms: u64,
    /// Immediates whose receive is posted again (≤ `imms`; see [`RdmaRx::repost`]).
    reposted: u64,
    reported: Credit,
    peer_closed: bool,
    pending_data: u64,
    /// The current frame's bulk data moves by grants (see `rendezvous`).
    rendezvous: bool,
    /// The sender said its direct write into the current grant is complete.
    grant_done: bool,
    poisoned: Option<RingError>,
    /// This half polls its ring ([`polled`]), no immediate announcing data.
    polled: Option<PolledRx>,
}

/// Where a polling receiver is in its ring's chunks.
struct PolledRx {
    /// The next chunk's sequence number.
    seq: u32,
    /// Payload bytes of the current chunk not yet read (they start at `head`).
    left: u64,
    /// Padding and trailer after them, skipped once they are read.
    skip: u64,
}

/// Which halves use the polled ring ([`polled`]), as the rendezvous agreed.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Polled {
    /// The peer polls its ring: our sending half writes chunks framed, without immediates.
    pub(crate) tx: bool,
    /// We poll ours.
    pub(crate) rx: bool,
}

/// Builds the halves of one side. `rx_qp` has its data receives posted already (see
/// [`post_data_recvs`]), `tx_qp` its credit receives ([`post_credit_recvs`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn halves(
    link: Arc<Link>,
    tx_qp: Qp,
    staging: Mr,
    credit_slots: Mr,
    remote: RemoteRing,
    rx_qp: Qp,
    ring: Mr,
    opts: &crate::TransportOptions,
    polled: Polled,
) -> (RdmaTx, RdmaRx) {
    let spin = Duration::from_micros(opts.spin_us);
    let size = ring.len() as u64;
    let tx = RdmaTx {
        qp: tx_qp,
        staging,
        credit_slots,
        link: link.clone(),
        waiter: Waiter { mode: opts.wait, spin, gate: None },
        limits: opts.limits,
        remote,
        sq: SendQueue::default(),
        tail: 0,
        pending: 0,
        posted: 0,
        imms_sent: 0,
        credit: Credit::default(),
        grant: Grant::None,
        stale: None,
        poisoned: None,
        polled: polled.tx.then_some(1),
        chunk_start: 0,
    };
    let window = match Mw::new(&link.dev) {
        Ok(mw) => Some(mw),
        Err(e) => {
            tracing::debug!(error = %e, "rdma: no memory window; grants register their range");
            None
        }
    };
    let rx = RdmaRx {
        qp: rx_qp,
        window,
        ring,
        link,
        waiter: Waiter { mode: opts.wait, spin, gate: None },
        limits: opts.limits,
        sq: SendQueue::default(),
        size,
        head: 0,
        tail: 0,
        imms: 0,
        reposted: 0,
        reported: Credit::default(),
        peer_closed: false,
        pending_data: 0,
        rendezvous: false,
        grant_done: false,
        poisoned: None,
        polled: polled.rx.then_some(PolledRx { seq: 1, left: 0, skip: 0 }),
    };
    (tx, rx)
}

/// Posts the data receiver's receives (zero-length: WRITE_WITH_IMM consumes no buffer).
pub(crate) fn post_data_recvs(qp: &Qp) -> std::io::Result<()> {
    for i in 0..DATA_RECV_WR {
        // SAFETY: zero-length receive: no buffer is handed to the NIC.
        unsafe { qp.post_recv(i as u64, 0, 0, 0)? };
    }
    Ok(())
}

/// Posts one receive per credit slot of `slots`.
pub(crate) fn post_credit_recvs(qp: &Qp, slots: &Mr) -> std::io::Result<()> {
    for i in 0..CREDIT_RECV_WR as u64 {
        // SAFETY: slot `i` lies inside `slots` (sized CREDIT_RECV_WR × CREDIT_BYTES), which the
        // sending half owns and drops after its QP.
        unsafe { qp.post_recv(i, slots.addr() + i * CREDIT_BYTES as u64, CREDIT_BYTES as u32, slots.lkey())? };
    }
    Ok(())
}

impl RdmaTx {
    /// Takes the completions there are: send completions free send-queue slots, received
    /// credits are validated and their slots reposted.
    fn progress(&mut self) -> Result<(), RingError> {
        let mut batch = [const { MaybeUninit::<ibv_wc>::uninit() }; POLL_BATCH];
        loop {
            let wcs = self.qp.cq.poll(&mut batch).map_err(verbs)?;
            let n = wcs.len();
            for wc in wcs {
                if wc.status != ibv_wc_status::IBV_WC_SUCCESS {
                    // A flushed or failed request: the QP is in error, the peer is gone.
                    failed_completion(&self.link, wc, "send");
                    return Err(RingError::PeerGone);
                }
                if wc.opcode == ibv_wc_opcode::IBV_WC_RECV {
                    let slot = wc.wr_id;
                    if slot >= CREDIT_RECV_WR as u64 || wc.byte_len as usize != CREDIT_BYTES {
                        return Err(RingError::Corrupt("credit message of the wrong size"));
                    }
                    let mut raw = [0u8; CREDIT_BYTES];
                    // SAFETY: the slot lies inside credit_slots; the completion says the NIC is done
                    // writing it, and it is reposted only after this copy.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            self.credit_slots.ptr().add(slot as usize * CREDIT_BYTES),
                            raw.as_mut_ptr(),
                            CREDIT_BYTES,
                        )
                    };
                    let c = Credit::decode(&raw).ok_or(RingError::Corrupt("credit message of an unknown kind"))?;
                    let posted = self.posted;
                    if c.head < self.credit.head
                        || c.head > posted
                        || c.imms < self.credit.imms
                        || c.imms > self.imms_sent
                    {
                        return Err(RingError::Corrupt("credit beyond what was sent"));
                    }
                    if c.grant != Grant::None {
                        if self.grant != Grant::None {
                            return Err(RingError::Corrupt("a second grant before the first was used"));
                        }
                        self.grant = c.grant;
                    }
                    self.credit = Credit { closed: self.credit.closed || c.closed, grant: Grant::None, ..c };
                    // SAFETY: as in post_credit_recvs.
                    unsafe {
                        self.qp
                            .post_recv(
                                slot,
                                self.credit_slots.addr() + slot * CREDIT_BYTES as u64,
                                CREDIT_BYTES as u32,
                                self.credit_slots.lkey(),
                            )
                            .map_err(verbs)?
                    };
                } else {
                    self.sq.completed(wc.wr_id);
                }
            }
            if n < POLL_BATCH {
                return Ok(());
            }
        }
    }

    fn free_bytes(&self) -> u64 {
        self.remote.bytes - (self.tail - self.credit.head)
    }

    /// Waits until `ok` holds (polling completions), failing once the receiver closed.
    ///
    /// Where `ok` holds already the CQ is looked at only once per [`SIGNAL_EVERY`] posts (it
    /// has room for every completion that can be outstanding: the send queue's and one per
    /// credit slot), so a small frame's send is one post; a failed work request is still seen
    /// within that many posts, and the receiving half sees a dead peer on its own.
    fn wait_for(&mut self, ok: impl Fn(&RdmaTx) -> bool) -> Result<(), RingError> {
        if ok(self) && !self.sq.posted.is_multiple_of(SIGNAL_EVERY) {
            return Ok(());
        }
        self.progress()?;
        if ok(self) {
            return Ok(());
        }
        let (link, cq, waiter) = (self.link.clone(), self.qp.cq.clone(), self.waiter.clone());
        waiter.wait(&link, &cq, || {
            self.progress()?;
            if ok(self) {
                Ok(Some(()))
            } else if self.credit.closed {
                Err(RingError::PeerGone)
            } else {
                Ok(None)
            }
        })
    }

    /// Posts the pending bytes as one WRITE_WITH_IMM (a sealed chunk by plain WRITE where the
    /// receiver polls).
    fn flush(&mut self) -> Result<(), RingError> {
        if self.pending == 0 {
            return Ok(());
        }
        if let Some(seq) = self.polled {
            let len = self.pending;
            self.pending = 0;
            return self.post_chunk(self.chunk_start, seq, len as u32);
        }
        self.wait_for(|s| !s.sq.full() && s.imms_sent - s.credit.imms < DATA_RECV_WR as u64)?;
        let len = self.pending;
        let start = (self.tail - len) % self.remote.bytes;
        // SAFETY: staging[start..start+len] holds the chunk; it ends at or before the ring's end.
        unsafe { self.post_staged(start, len, Some(len as u32))? };
        self.imms_sent += 1;
        self.pending = 0;
        self.posted = self.tail;
        Ok(())
    }

    /// Writes `staging[pos..pos + len]` to the same offsets of the peer's ring.
    ///
    /// # Safety
    /// The range lies in staging and before the ring's end. It is not rewritten until the
    /// receiver's credit covers it, which implies the write was placed (the NIC is done with it).
    unsafe fn post_staged(&mut self, pos: u64, len: u64, imm: Option<u32>) -> Result<(), RingError> {
        let (wr_id, signaled) = self.sq.next();
        // SAFETY (caller): the local range is registered staging and the remote one is in the ring.
        unsafe {
            self.qp
                .post_write(
                    wr_id,
                    self.staging.addr() + pos,
                    len as u32,
                    self.staging.lkey(),
                    self.remote.addr + pos,
                    self.remote.rkey,
                    imm,
                    signaled,
                )
                .map_err(verbs)
        }
    }

    /// Seals the chunk (or wrap marker) whose prefix is at cumulative offset `start` and posts it
    /// by plain WRITE; `tail` moves to its end.
    fn post_chunk(&mut self, start: u64, seq: u32, len: u32) -> Result<(), RingError> {
        self.wait_for(|s| !s.sq.full())?;
        let pos = start % self.remote.bytes;
        // SAFETY: the chunk's footprint lies in staging before the ring's end (`open_chunk` and
        // `stream_polled` keep it there) and in free space, which no write is reading; staging is
        // page-aligned and `pos` a multiple of 16.
        let bytes = unsafe { polled::seal(self.staging.ptr().add(pos as usize), seq, len) };
        self.tail = start + bytes;
        self.posted = self.tail;
        self.polled = Some(polled::next(seq));
        // SAFETY: the chunk was sealed in staging just now, before the ring's end.
        unsafe { self.post_staged(pos, bytes, None) }
    }

    /// Opens a chunk at the tail of a polled ring (its prefix reserved), first skipping the
    /// ring's rest with a wrap marker where no chunk fits before the end.
    fn open_chunk(&mut self) -> Result<(), RingError> {
        let size = self.remote.bytes;
        let to_end = size - self.tail % size;
        if to_end < polled::MIN_FOOTPRINT {
            self.wait_for(|s| s.free_bytes() >= to_end)?;
            let seq = self.polled.expect("polled ring");
            self.post_chunk(self.tail, seq, polled::WRAP)?;
        }
        self.wait_for(|s| s.free_bytes() >= polled::MIN_FOOTPRINT)?;
        self.chunk_start = self.tail;
        self.tail += polled::PREFIX;
        Ok(())
    }

    /// [`RdmaTx::stream`] into a polled ring: chunks grow while their footprint fits in the free
    /// space and before the ring's end.
    fn stream_polled(&mut self, src: &[u8]) -> Result<(), RingError> {
        let size = self.remote.bytes;
        let mut done = 0usize;
        while done < src.len() {
            if self.pending == 0 {
                self.open_chunk()?;
            }
            let pos = self.chunk_start % size;
            let room = (size - pos).min(size - (self.chunk_start - self.credit.head));
            let max = ((room - polled::PREFIX - polled::TRAILER) & !(polled::ALIGN - 1)).min(CHUNK_BYTES as u64);
            if self.pending >= max {
                self.flush()?;
                continue;
            }
            let n = ((max - self.pending) as usize).min(src.len() - done);
            let at = (self.tail % size) as usize;
            // SAFETY: at + n <= pos + PREFIX + max <= the ring's end, inside staging; the range is
            // free (covered by no unacknowledged write), so the NIC is not reading it.
            unsafe { std::ptr::copy_nonoverlapping(src[done..].as_ptr(), self.staging.ptr().add(at), n) };
            self.tail += n as u64;
            self.pending += n as u64;
            done += n;
            if self.pending as usize == CHUNK_BYTES {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Copies `src` into staging, posting chunks as they fill and waiting for ring space.
    fn stream(&mut self, src: &[u8]) -> Result<(), RingError> {
        if self.polled.is_some() {
            return self.stream_polled(src);
        }
        let mut done = 0usize;
        while done < src.len() {
            if self.free_bytes() == 0 {
                self.flush()?;
                self.wait_for(|s| s.free_bytes() > 0)?;
            }
            let size = self.remote.bytes;
            let pos = (self.tail % size) as usize;
            let n = (self.free_bytes() as usize)
                .min(src.len() - done)
                .min(size as usize - pos)
                .min(CHUNK_BYTES - self.pending as usize);
            // SAFETY: pos + n <= staging length (== ring size); the range is free (not covered by
            // any unacknowledged write), so the NIC is not reading it.
            unsafe { std::ptr::copy_nonoverlapping(src[done..].as_ptr(), self.staging.ptr().add(pos), n) };
            self.tail += n as u64;
            self.pending += n as u64;
            done += n;
            if self.pending as usize == CHUNK_BYTES || self.tail.is_multiple_of(size) {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Places `bytes` in the peer's ring with no framing (see `RawClient`).
    pub(crate) fn write_raw(&mut self, bytes: &[u8]) -> Result<(), TransportError> {
        self.stream(bytes).and_then(|()| self.flush()).map_err(|e| e.into_transport(&self.link.peer))
    }

    fn write_frame(&mut self, frame: &OutFrame<'_>) -> Result<(), RingError> {
        self.stream(zerocopy::IntoBytes::as_bytes(&frame.header))?;
        self.stream(frame.meta)?;
        if frame.header.data_len.get() >= rendezvous::RENDEZVOUS_BYTES_MIN {
            self.flush()?;
            return self.send_granted(frame.data, frame.header.data_len.get());
        }
        for seg in frame.data {
            self.stream(seg)?;
        }
        self.flush()
    }
}

impl FrameTx for RdmaTx {
    fn send(&mut self, frame: &OutFrame<'_>) -> Result<(), TransportError> {
        if let Some(p) = &self.poisoned {
            return Err(p.clone().into_transport(&self.link.peer));
        }
        self.link.check_open().map_err(|e| e.into_transport(&self.link.peer))?;
        let data_len: u64 = frame.data.iter().map(|d| d.len() as u64).sum();
        if frame.header.meta_len.get() as usize != frame.meta.len() || frame.header.data_len.get() != data_len {
            return Err(TransportError::DataMisuse("header lengths disagree with the frame's metadata/data"));
        }
        frame.header.validate(&self.limits)?;
        match self.write_frame(frame) {
            Ok(()) => {
                self.link.counters.sent.fetch_add(frame.header.frame_len(), Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.poisoned = Some(e.clone());
                Err(e.into_transport(&self.link.peer))
            }
        }
    }

    fn closer(&self) -> Option<ConnectionClose> {
        let link = Arc::downgrade(&self.link);
        Some(Arc::new(move || {
            if let Some(link) = link.upgrade() {
                link.close();
            }
        }))
    }

    fn register_buffer(&mut self, buf: &crate::RegBuf) -> Result<crate::Registration, TransportError> {
        match &self.link.reg_cache {
            Some(cache) => cache
                .register(&self.link.dev, buf.mem())
                .map_err(|source| TransportError::Io { what: "rdma: register a client buffer", source }),
            None => Ok(crate::Registration::Unsupported),
        }
    }

    fn registration_cache(&self) -> Option<crate::RegCacheStats> {
        self.link.reg_cache.as_ref().map(|c| c.stats())
    }
}

impl Drop for RdmaTx {
    fn drop(&mut self) {
        if self.poisoned.is_some() || self.link.closed.load(Ordering::Acquire) {
            return;
        }
        // Tell the receiver we are done, then wait (bounded) until every write is acknowledged:
        // destroying the QP earlier would drop writes still queued.
        let _ = self.flush();
        if self.progress().is_err() || self.sq.full() || self.imms_sent - self.credit.imms >= DATA_RECV_WR as u64 {
            return;
        }
        self.sq.posted += 1;
        let last = self.sq.posted;
        // SAFETY: zero-length write: no local or remote memory is touched.
        if unsafe { self.qp.post_write(last, 0, 0, 0, self.remote.addr, self.remote.rkey, Some(CLOSE_IMM), true) }
            .is_err()
        {
            return;
        }
        let start = Instant::now();
        while self.sq.done < last && start.elapsed() < DRAIN_TIMEOUT {
            if self.progress().is_err() {
                return;
            }
            std::thread::yield_now();
        }
    }
}

impl RdmaRx {
    /// Takes the completions there are: immediates advance the tail (checked against the
    /// ring). The receives they used are reposted later, in chains ([`RdmaRx::repost`]): before
    /// this half waits, and before a credit reports them.
    fn progress(&mut self) -> Result<(), RingError> {
        let mut batch = [const { MaybeUninit::<ibv_wc>::uninit() }; POLL_BATCH];
        loop {
            let wcs = self.qp.cq.poll(&mut batch).map_err(verbs)?;
            let n = wcs.len();
            for wc in wcs {
                if wc.status != ibv_wc_status::IBV_WC_SUCCESS {
                    failed_completion(&self.link, wc, "receive");
                    return Err(RingError::PeerGone);
                }
                if wc.opcode == ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM {
                    // SAFETY: reading the immediate of a RECV_RDMA_WITH_IMM completion.
                    let imm = u32::from_be(unsafe { wc.imm_data_invalidated_rkey_union.imm_data });
                    if imm == CLOSE_IMM {
                        self.peer_closed = true;
                    } else if imm == GRANT_DONE_IMM {
                        self.grant_done = true;
                    } else if self.polled.is_some() {
                        return Err(RingError::Corrupt("an immediate announcing data on a polled ring"));
                    } else {
                        let tail = self.tail + imm as u64;
                        if imm as usize > CHUNK_BYTES || tail - self.head > self.size {
                            return Err(RingError::Corrupt("write beyond the ring's free space"));
                        }
                        self.tail = tail;
                    }
                    self.imms += 1;
                } else if wc.opcode == ibv_wc_opcode::IBV_WC_RECV {
                    return Err(RingError::Corrupt("unexpected send on the data queue pair"));
                } else {
                    self.sq.completed(wc.wr_id);
                }
            }
            if n < POLL_BATCH {
                return Ok(());
            }
        }
    }

    /// Reposts the receives the immediates taken so far used. Only reposted receives are
    /// reported in a credit, so the sender never has more immediates in flight than receives
    /// are posted.
    fn repost(&mut self) -> Result<(), RingError> {
        let due = self.imms - self.reposted;
        if due > 0 {
            self.qp.post_empty_recvs(due).map_err(verbs)?;
            self.reposted = self.imms;
        }
        Ok(())
    }

    /// Sends a credit once a quarter of the ring or of the receives is unreported. Checked after
    /// every copy and before every wait, which is enough for liveness: a sender blocked on space
    /// has filled the ring (all of it unreported once consumed), one blocked on receives has
    /// used them all; either way a quarter is due. A ping-pong therefore pays one credit per
    /// `DATA_RECV_WR / 4` messages, not one per message.
    fn credit(&mut self) -> Result<(), RingError> {
        let bytes = self.head - self.reported.head;
        let imms = self.imms - self.reported.imms;
        if bytes < self.size / 4 && imms < DATA_RECV_WR as u64 / 4 {
            return Ok(());
        }
        if self.sq.full() {
            self.progress()?;
            if self.sq.full() {
                // Completions are pending; the next call sends it.
                return Ok(());
            }
        }
        self.repost()?;
        let c = Credit { head: self.head, imms: self.reposted, closed: false, grant: Grant::None };
        let (wr_id, signaled) = self.sq.next();
        self.qp.post_send_inline(wr_id, &c.encode(), signaled).map_err(verbs)?;
        self.reported = c;
        Ok(())
    }

    fn avail(&self) -> u64 {
        match &self.polled {
            Some(p) => p.left,
            None => self.tail - self.head,
        }
    }

    /// On a polled ring, takes the chunks (and wrap markers) whole at the head until one has
    /// bytes to read.
    fn poll_ring(&mut self) -> Result<(), RingError> {
        let Some(p) = &mut self.polled else { return Ok(()) };
        while p.left == 0 {
            let pos = self.head % self.size;
            // SAFETY: the ring is registered for the connection's life and page-aligned; `head`
            // moves in 16-byte steps between chunks (`read` skips each one's padding and trailer).
            match unsafe { polled::find(self.ring.ptr(), self.size, pos, p.seq)? } {
                None => return Ok(()),
                Some(polled::Found::Wrap) => self.head += self.size - pos,
                Some(polled::Found::Chunk(len)) => {
                    self.head += polled::PREFIX;
                    p.left = len;
                    p.skip = polled::footprint(len) - polled::PREFIX - len;
                }
            }
            p.seq = polled::next(p.seq);
        }
        Ok(())
    }

    /// Waits for bulk bytes in the ring; `PeerGone` once the sender closed and all is consumed.
    /// Bytes already announced are taken without looking at the CQ; receives are reposted only
    /// when there is nothing to take (off the path of a frame that has arrived).
    fn wait_avail(&mut self) -> Result<u64, RingError> {
        if self.avail() > 0 {
            return Ok(self.avail());
        }
        self.progress()?;
        self.poll_ring()?;
        if self.avail() > 0 {
            return Ok(self.avail());
        }
        self.repost()?;
        self.credit()?;
        let (link, cq, waiter) = (self.link.clone(), self.qp.cq.clone(), self.waiter.clone());
        waiter.wait(&link, &cq, || {
            // The CQ first: a close seen there follows every write before it, so the ring
            // looked at after it holds all there will be.
            self.progress()?;
            self.poll_ring()?;
            match self.avail() {
                0 if self.peer_closed => Err(RingError::PeerGone),
                0 => Ok(None),
                a => Ok(Some(a)),
            }
        })
    }

    /// Moves `len` bytes out of the ring into `dst` (or drops them).
    fn read(&mut self, mut dst: Option<&mut [u8]>, len: u64) -> Result<(), RingError> {
        let mut done = 0u64;
        while done < len {
            let avail = self.wait_avail()?;
            let pos = self.head % self.size;
            let n = avail.min(len - done).min(self.size - pos).min(CHUNK_BYTES as u64);
            if let Some(d) = dst.as_deref_mut() {
                // SAFETY: pos + n <= ring size; these bytes were announced by an immediate whose
                // completion we polled (the write is placed) and are not rewritten before our credit.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.ring.ptr().add(pos as usize),
                        d[done as usize..].as_mut_ptr(),
                        n as usize,
                    )
                };
            }
            self.head += n;
            done += n;
            if let Some(p) = &mut self.polled {
                p.left -= n;
                if p.left == 0 {
                    self.head += std::mem::take(&mut p.skip);
                }
            }
            self.credit()?;
        }
        Ok(())
    }

    fn next_head(&mut self) -> Result<RxHead, RingError> {
        // Private copy first: the peer can still write the ring.
        let mut raw = [0u8; HEADER_LEN];
        self.read(Some(&mut raw), HEADER_LEN as u64)?;
        let header = FrameHeader::read_validated(&raw, &self.limits).map_err(RingError::Header)?;
        let meta_len = header.meta_len.get() as usize;
        let mut meta = vec![0u8; meta_len];
        self.read(Some(&mut meta), meta_len as u64)?;
        self.pending_data = header.data_len.get();
        self.rendezvous = self.pending_data >= rendezvous::RENDEZVOUS_BYTES_MIN;
        self.link.counters.received.fetch_add((HEADER_LEN + meta_len) as u64, Ordering::Relaxed);
        Ok(RxHead { header, meta })
    }

    fn check(&self) -> Result<(), TransportError> {
        match &self.poisoned {
            Some(p) => Err(p.clone().into_transport(&self.link.peer)),
            None => self.link.check_open().map_err(|e| e.into_transport(&self.link.peer)),
        }
    }

    fn fail(&mut self, e: RingError) -> TransportError {
        self.poisoned = Some(e.clone());
        e.into_transport(&self.link.peer)
    }
}

impl FrameRx for RdmaRx {
    unsafe fn recv_data_dmabuf(&mut self, dst: &crate::DmaBufDst<'_>) -> Result<bool, TransportError> {
        self.check()?;
        // SAFETY: the caller's contract is this method's.
        let taken = unsafe { self.read_granted_dmabuf(dst) }.map_err(|e| self.fail(e))?;
        if taken {
            self.pending_data -= dst.len as u64;
            self.link.counters.received.fetch_add(dst.len as u64, Ordering::Relaxed);
        }
        Ok(taken)
    }

    fn recv_head(&mut self) -> Result<RxHead, TransportError> {
        crate::ring_rx::recv_head(self)
    }

    fn recv_data(&mut self, dst: &mut [u8]) -> Result<(), TransportError> {
        crate::ring_rx::recv_data(self, dst)
    }

    fn skip_data(&mut self, len: u64) -> Result<(), TransportError> {
        crate::ring_rx::skip_data(self, len)
    }

    fn set_spin_gate(&mut self, gate: SpinGate) {
        // A polled ring's receiver never parks (no completion would wake it): it asked for the
        // polled ring only because it busy-polls without a gate, as a client does.
        if self.polled.is_none() {
            self.waiter.gate = Some(gate);
        }
    }
}

impl crate::ring_rx::RingRx for RdmaRx {
    type Error = RingError;
    fn check(&self) -> Result<(), TransportError> {
        RdmaRx::check(self)
    }
    fn fail(&mut self, e: RingError) -> TransportError {
        RdmaRx::fail(self, e)
    }
    fn next_head(&mut self) -> Result<RxHead, RingError> {
        RdmaRx::next_head(self)
    }
    /// A rendezvous frame's data moves by grants; any other frame's through the ring.
    fn take_data(&mut self, dst: Option<&mut [u8]>, len: u64) -> Result<(), RingError> {
        match (self.rendezvous, dst) {
            (true, Some(dst)) => self.read_granted(dst),
            (true, None) => self.read_granted_skip(len),
            (false, dst) => self.read(dst, len),
        }
    }
    fn pending_data(&mut self) -> &mut u64 {
        &mut self.pending_data
    }
    fn counters(&self) -> &ByteCounters {
        &self.link.counters
    }
}

impl Drop for RdmaRx {
    fn drop(&mut self) {
        if self.poisoned.is_some() || self.link.closed.load(Ordering::Acquire) || self.progress().is_err() {
            return;
        }
        // Best effort: a sender waiting for space learns we are gone without the socket's help.
        if !self.sq.full() {
            let c = Credit { closed: true, grant: Grant::None, ..self.reported };
            let (wr_id, _) = self.sq.next();
            let _ = self.qp.post_send_inline(wr_id, &c.encode(), false);
        }
    }
}
