//! The two halves of an shm connection: [`ShmTx`] produces into one direction's rings, [`ShmRx`]
//! consumes from the other's.
//!
//! Sending a frame: wait for a free slot, copy header (+ inline metadata) into it, then stream
//! large metadata and the bulk data straight from the caller's buffers into the data ring, in
//! chunks of at most `PUBLISH_CHUNK_BYTES`. After each chunk (and at the end) the sender publishes
//! with Release stores of `tail_data` then `tail_slots`, so a frame larger than the data area
//! flows through it while the receiver drains it.
//!
//! Receiving: copy the slot's header into private memory, validate it (`read_validated`), copy the
//! metadata, release the slot; `recv_data` then copies bulk bytes from the data ring straight into
//! the caller's buffer, releasing space (Release store of `head_data`) chunk by chunk.
//!
//! Doorbells, Dekker style. A waiter stores its `*_waiting` flag, issues a SeqCst fence, re-checks
//! the index it waits on, and only then parks on its eventfd. The other side stores the index,
//! issues a SeqCst fence and loads the flag; it rings only if the flag is set. Between the two
//! fences one side must see the other's store, so a wake-up is never lost and an active peer
//! never pays a syscall.
//!
//! Waiting (`WaitMode`): spin-then-park spins `spin_us` (yielding the core between looks after the
//! first few microseconds, in case the peer was woken onto this core), then parks in `poll` on its
//! eventfd and the peer's socket: no CPU while idle, and a dead peer wakes it. Busy-poll never
//! parks while its spin gate is open (`FrameRx::set_spin_gate`; no gate = always open); every
//! millisecond of waiting it checks the peer's socket and yields once. With the gate closed it
//! waits as spin-then-park does.
//!
//! Bounds: at most `slot_count` frames and `data_bytes` bytes are unconsumed per direction; a full
//! ring makes the sender wait, never buffer.
//!
//! Trust: every index read from the region is checked against the private counter and the ring's
//! size before use (`used <= size`), and positions come from private counters modulo the size,
//! so a hostile peer cannot steer a copy out of bounds; it can only produce a typed error.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use djinn_proto::{FrameHeader, HeaderError, Limits, HEADER_LEN};

use super::region::{DirOffsets, Region, SLOT_BYTES, SLOT_META_INLINE_MAX};
use super::sys::{self, EventFd};
use crate::conn::{spins_unbounded, PURE_SPIN};
use crate::{
    ByteCounters, ConnectionClose, FrameRx, FrameTx, OutFrame, RxHead, SpinGate, TransportError, TrySend, UnreadProbe,
    WaitMode,
};

/// The sender publishes (and may ring) at least this often while streaming a large frame, so the
/// receiver copies out one chunk while the next is being copied in. A streaming frame may fill the
/// whole data area: capping the sender's lead (1–4 MiB, to keep the bytes in cache) measured no
/// better, and worse for busy-poll on a loaded machine, where the lead absorbs the peer's preemption.
const PUBLISH_CHUNK_BYTES: usize = 256 * 1024;
/// Looks at the ring between two yields of a bounded spin.
const LOOKS_PER_YIELD: usize = 8;
/// While busy-polling, check the peer's socket for hang-up (and yield) at most this often.
const LIVENESS_CHECK_INTERVAL: Duration = Duration::from_millis(1);

/// Why a ring operation stopped.
#[derive(Debug, Clone)]
pub(crate) enum RingError {
    /// The peer closed its half or its process is gone.
    PeerGone,
    /// This side closed the connection (`FrameTx::closer`).
    LocalClosed,
    /// The peer broke the ring protocol (index out of range …).
    Corrupt(&'static str),
    /// A header failed validation: framing is lost.
    Header(HeaderError),
    /// A system call failed.
    Io(&'static str, std::io::ErrorKind),
}

impl RingError {
    fn into_transport(self, peer: &str) -> TransportError {
        match self {
            RingError::PeerGone | RingError::LocalClosed => TransportError::Closed,
            RingError::Corrupt(what) => {
                TransportError::Other(format!("shm peer {peer} broke the ring protocol: {what}"))
            }
            RingError::Header(e) => TransportError::BadHeader(e),
            RingError::Io(what, kind) => TransportError::Io { what, source: kind.into() },
        }
    }
}

/// What both halves of one connection share: the mapping and the rendezvous socket (kept open
/// only so each side sees the other hang up).
pub(crate) struct Link {
    pub(crate) region: Region,
    pub(crate) sock: OwnedFd,
    pub(crate) peer: String,
    pub(crate) counters: Arc<ByteCounters>,
    /// Set by the closer; both halves check it on entry and while they wait.
    pub(crate) closed: AtomicBool,
}

impl Link {
    /// Closes the connection from any thread: marks it closed and shuts the socket down, which
    /// wakes our own parked halves (their poll sees the hang-up) and tells the peer it ended.
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        // SAFETY: shutdown on a socket this link owns; no pointers. The descriptor stays open
        // (closed on drop), so it cannot be reused under a concurrent poll.
        unsafe { libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_RDWR) };
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn check_open(&self) -> Result<(), RingError> {
        if self.is_closed() {
            Err(RingError::LocalClosed)
        } else {
            Ok(())
        }
    }
}

/// How a half waits: spin, then park on its doorbell (or spin forever in busy-poll mode).
struct Waiter {
    mode: WaitMode,
    spin: Duration,
    park: EventFd,
    /// Busy-poll spins only while this is open (see `FrameRx::set_spin_gate`).
    gate: Option<SpinGate>,
}

impl Waiter {
    /// Returns as soon as `ready` yields a value. `flag` is this side's `*_waiting` word in the
    /// region. When the peer's socket hangs up, `ready` gets one last look before `PeerGone`.
    fn wait<T>(
        &self,
        link: &Link,
        flag: &AtomicU32,
        mut ready: impl FnMut() -> Result<Option<T>, RingError>,
    ) -> Result<T, RingError> {
        link.check_open()?;
        if let Some(v) = ready()? {
            return Ok(v);
        }
        if spins_unbounded(self.mode, &self.gate) {
            // Never parks while the gate is open, and yields only once per liveness check: a
            // busy-polling side owns its core (an early yield on a loaded machine hands the core
            // to other processes for a whole time slice), but a peer that shares this core still
            // runs within 1 ms. The clock is first read after a round of looks: most waits end
            // within it, and a clock read was a tenth of a busy-poll ping's client time.
            let mut last_check: Option<Instant> = None;
            while spins_unbounded(self.mode, &self.gate) {
                for _ in 0..256 {
                    std::hint::spin_loop();
                    if let Some(v) = ready()? {
                        return Ok(v);
                    }
                }
                link.check_open()?;
                let now = Instant::now();
                let last_check = last_check.get_or_insert(now);
                if now - *last_check >= LIVENESS_CHECK_INTERVAL {
                    if sys::peer_gone_now(&link.sock) {
                        return ready()?.ok_or(RingError::PeerGone);
                    }
                    std::thread::yield_now();
                    *last_check = Instant::now();
                }
            }
        }
        // Spin-then-park (or busy-poll whose gate closed).
        let start = Instant::now();
        while start.elapsed() < self.spin {
            // A few looks between yields (~0.3 µs; 64 were ~2 µs): a thread this one keeps
            // off its core waits at most that long for it.
            for _ in 0..LOOKS_PER_YIELD {
                std::hint::spin_loop();
                if let Some(v) = ready()? {
                    return Ok(v);
                }
            }
            link.check_open()?;
            // Past a short pure spin, give the core away between looks: when the peer
            // was woken onto this very core (the scheduler likes to), spinning would only
            // delay it until our spin budget runs out.
            if start.elapsed() >= PURE_SPIN {
                std::thread::yield_now();
            }
        }
        loop {
            flag.store(1, Ordering::Relaxed);
            // SAFETY (ordering): Dekker with the peer's publish — our flag store, SeqCst fence,
            // then the re-check in `ready`; the peer stores its index, fences, loads the flag.
            fence(Ordering::SeqCst);
            let outcome = ready();
            if !matches!(outcome, Ok(None)) {
                flag.store(0, Ordering::Relaxed);
                return outcome.map(|v| v.expect("checked Some"));
            }
            let gone = sys::poll_doorbell(&self.park, &link.sock, -1);
            self.park.drain();
            flag.store(0, Ordering::Relaxed);
            let gone = gone.map_err(|e| RingError::Io("shm doorbell poll", e.kind()))?;
            link.check_open()?;
            if let Some(v) = ready()? {
                return Ok(v);
            }
            if gone {
                return Err(RingError::PeerGone);
            }
        }
    }
}

/// Rings the peer's doorbell if it is parked on it.
fn ring_if_waiting(flag: &AtomicU32, bell: &EventFd) {
    // SAFETY (ordering): the other half of the Dekker pair in `Waiter::wait`: the caller has just
    // stored an index with Release; this SeqCst fence orders that store before the flag load.
    fence(Ordering::SeqCst);
    if flag.load(Ordering::Relaxed) != 0 {
        bell.ring();
    }
}

/// Number of entries in use between a peer-written counter and our private one, checked against
/// the ring size (`peer_behind`: the peer's counter trails ours, as a consumer head does).
fn checked_used(ours: u64, theirs: u64, size: u64, peer_behind: bool) -> Option<u64> {
    let used = if peer_behind { ours.wrapping_sub(theirs) } else { theirs.wrapping_sub(ours) };
    (used <= size).then_some(used)
}

/// The sending half.
pub struct ShmTx {
    waiter: Waiter,
    st: TxState,
    limits: Limits,
    poisoned: Option<RingError>,
}

struct TxState {
    link: Arc<Link>,
    off: DirOffsets,
    /// The peer parks on this one.
    bell: EventFd,
    slot_count: u64,
    data_bytes: u64,
    /// Private counters: what we have written (published or not).
    tail_slots: u64,
    tail_data: u64,
    /// What we last published.
    published_slots: u64,
    published_data: u64,
    /// The consumer's counters as last read (validated).
    head_slots: u64,
    head_data: u64,
}

/// The receiving half.
pub struct ShmRx {
    waiter: Waiter,
    st: RxState,
    limits: Limits,
    /// Bulk bytes of the current frame not yet consumed.
    pending_data: u64,
    poisoned: Option<RingError>,
}

struct RxState {
    link: Arc<Link>,
    off: DirOffsets,
    /// The peer parks on this one.
    bell: EventFd,
    slot_count: u64,
    data_bytes: u64,
    head_slots: u64,
    head_data: u64,
    /// The producer's counters as last read (validated).
    tail_slots: u64,
    tail_data: u64,
}

/// The doorbells of one side of a connection. The sender parks on its direction's space
/// doorbell and rings its data doorbell; the receiver the reverse.
pub(crate) struct Bells {
    pub(crate) tx_park: EventFd,
    pub(crate) tx_ring: EventFd,
    pub(crate) rx_park: EventFd,
    pub(crate) rx_ring: EventFd,
}

/// Builds both halves of one side, each over its own direction.
pub(crate) fn halves(
    link: Arc<Link>,
    tx_dir: DirOffsets,
    rx_dir: DirOffsets,
    bells: Bells,
    opts: &crate::TransportOptions,
) -> (ShmTx, ShmRx) {
    let layout = *link.region.layout();
    let spin = Duration::from_micros(opts.spin_us);
    let tx = ShmTx {
        waiter: Waiter { mode: opts.wait, spin, park: bells.tx_park, gate: None },
        st: TxState {
            link: link.clone(),
            off: tx_dir,
            bell: bells.tx_ring,
            slot_count: layout.slot_count as u64,
            data_bytes: layout.data_bytes as u64,
            tail_slots: 0,
            tail_data: 0,
            published_slots: 0,
            published_data: 0,
            head_slots: 0,
            head_data: 0,
        },
        limits: opts.limits,
        poisoned: None,
    };
    let rx = ShmRx {
        waiter: Waiter { mode: opts.wait, spin, park: bells.rx_park, gate: None },
        st: RxState {
            link,
            off: rx_dir,
            bell: bells.rx_ring,
            slot_count: layout.slot_count as u64,
            data_bytes: layout.data_bytes as u64,
            head_slots: 0,
            head_data: 0,
            tail_slots: 0,
            tail_data: 0,
        },
        limits: opts.limits,
        pending_data: 0,
        poisoned: None,
    };
    (tx, rx)
}

impl TxState {
    fn free_slots(&self) -> u64 {
        self.slot_count - self.tail_slots.wrapping_sub(self.head_slots)
    }

    fn free_data(&self) -> u64 {
        self.data_bytes - self.tail_data.wrapping_sub(self.head_data)
    }

    /// Makes everything written so far visible to the receiver and rings it if it is parked.
    fn publish(&mut self) {
        if self.tail_data == self.published_data && self.tail_slots == self.published_slots {
            return;
        }
        let region = &self.link.region;
        // SAFETY (ordering): Release on both stores: the slot and data bytes copied in before are
        // visible to a receiver that loads either index with Acquire. Data is stored first, so a
        // receiver that sees a new slot also sees at least the data published with it.
        region.u64_at(self.off.tail_data).store(self.tail_data, Ordering::Release);
        region.u64_at(self.off.tail_slots).store(self.tail_slots, Ordering::Release);
        self.published_data = self.tail_data;
        self.published_slots = self.tail_slots;
        ring_if_waiting(region.u32_at(self.off.data_waiting), &self.bell);
    }

    /// Reads and validates the consumer's counters.
    fn refresh_heads(&mut self) -> Result<(), RingError> {
        let region = &self.link.region;
        // SAFETY (ordering): Acquire pairs with the receiver's Release store of its heads: its copies
        // out of those slots/data happen before we overwrite them.
        let head_slots = region.u64_at(self.off.head_slots).load(Ordering::Acquire);
        let head_data = region.u64_at(self.off.head_data).load(Ordering::Acquire);
        checked_used(self.tail_slots, head_slots, self.slot_count, true)
            .ok_or(RingError::Corrupt("slot head out of range"))?;
        checked_used(self.tail_data, head_data, self.data_bytes, true)
            .ok_or(RingError::Corrupt("data head out of range"))?;
        self.head_slots = head_slots;
        self.head_data = head_data;
        Ok(())
    }

    /// One look for space: `Some(free)`, `None` (wait on), or `PeerGone` once the receiver closed.
    fn poll_space(&mut self, free: fn(&TxState) -> u64) -> Result<Option<u64>, RingError> {
        // Closed first: if it was set, the heads read next are final.
        let closed = self.link.region.u32_at(self.off.rx_closed).load(Ordering::Acquire) != 0;
        self.refresh_heads()?;
        match free(self) {
            0 if closed => Err(RingError::PeerGone),
            0 => Ok(None),
            f => Ok(Some(f)),
        }
    }
}

impl ShmTx {
    /// Returns the free space `free` reports, waiting for the receiver when there is none.
    /// Publishes first so the receiver can drain what we wrote.
    fn space(&mut self, free: fn(&TxState) -> u64) -> Result<u64, RingError> {
        let f = free(&self.st);
        if f > 0 {
            return Ok(f);
        }
        self.st.publish();
        let link = self.st.link.clone();
        let st = &mut self.st;
        self.waiter.wait(&link, link.region.u32_at(st.off.space_waiting), || st.poll_space(free))
    }

    fn write_frame(&mut self, frame: &OutFrame<'_>) -> Result<(), RingError> {
        self.space(TxState::free_slots)?;
        let st = &mut self.st;
        let slot = st.off.slots + (st.tail_slots % st.slot_count) as usize * SLOT_BYTES;
        st.link.region.write(slot, zerocopy::IntoBytes::as_bytes(&frame.header));
        let inline = frame.meta.len() <= SLOT_META_INLINE_MAX;
        if inline {
            st.link.region.write(slot + HEADER_LEN, frame.meta);
        }
        st.tail_slots += 1;
        if !inline {
            self.stream(frame.meta)?;
        }
        for seg in frame.data {
            self.stream(seg)?;
        }
        self.st.publish();
        Ok(())
    }

    /// Copies `src` into the data ring, waiting for the receiver to free space as needed.
    fn stream(&mut self, src: &[u8]) -> Result<(), RingError> {
        let mut done = 0usize;
        while done < src.len() {
            let free = self.space(TxState::free_data)?;
            let st = &mut self.st;
            let pos = (st.tail_data % st.data_bytes) as usize;
            // Stop at the wrap point and at the next chunk boundary, so the receiver starts
            // copying out while we copy in the rest.
            let to_boundary = PUBLISH_CHUNK_BYTES - (st.tail_data % PUBLISH_CHUNK_BYTES as u64) as usize;
            let n = (free as usize).min(src.len() - done).min(st.data_bytes as usize - pos).min(to_boundary);
            st.link.region.write(st.off.data + pos, &src[done..done + n]);
            st.tail_data += n as u64;
            done += n;
            if n == to_boundary {
                st.publish();
            }
        }
        Ok(())
    }
}

impl ShmTx {
    /// What `send` and `try_send` refuse before touching the ring: a poisoned or closed ring, and
    /// a frame whose header disagrees with its parts. Returns the bytes the frame takes in the
    /// data ring (its bulk data, and its metadata when that does not fit in the slot).
    fn check(&self, frame: &OutFrame<'_>) -> Result<u64, TransportError> {
        if let Some(p) = &self.poisoned {
            return Err(p.clone().into_transport(&self.st.link.peer));
        }
        if self.st.link.is_closed() {
            return Err(TransportError::Closed);
        }
        let data_len: u64 = frame.data.iter().map(|d| d.len() as u64).sum();
        if frame.header.meta_len.get() as usize != frame.meta.len() || frame.header.data_len.get() != data_len {
            return Err(TransportError::DataMisuse("header lengths disagree with the frame's metadata/data"));
        }
        // Our own mistake, caught before the peer would lose framing over it.
        frame.header.validate(&self.limits)?;
        let streamed_meta = if frame.meta.len() <= SLOT_META_INLINE_MAX { 0 } else { frame.meta.len() as u64 };
        Ok(data_len + streamed_meta)
    }

    /// Writes a frame `check` accepted, waiting for room as the `WaitMode` says.
    fn send_checked(&mut self, frame: &OutFrame<'_>) -> Result<(), TransportError> {
        match self.write_frame(frame) {
            Ok(()) => {
                self.st.link.counters.sent.fetch_add(frame.header.frame_len(), Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                // A frame may be half-written: the ring is no longer usable.
                self.poisoned = Some(e.clone());
                Err(e.into_transport(&self.st.link.peer))
            }
        }
    }
}

impl FrameTx for ShmTx {
    fn send(&mut self, frame: &OutFrame<'_>) -> Result<(), TransportError> {
        self.check(frame)?;
        self.send_checked(frame)
    }

    /// Sends the whole frame when one look at the receiver's counters shows a free slot and
    /// room for its bytes (then `write_frame` never waits); otherwise nothing. A frame never goes
    /// half-way: the ring has no tail to keep.
    fn try_send(&mut self, frame: &OutFrame<'_>) -> Result<TrySend, TransportError> {
        let bytes = self.check(frame)?;
        let fits = |st: &TxState| st.free_slots() >= 1 && st.free_data() >= bytes;
        if !fits(&self.st) {
            if let Err(e) = self.st.refresh_heads() {
                self.poisoned = Some(e.clone());
                return Err(e.into_transport(&self.st.link.peer));
            }
            if !fits(&self.st) {
                return Ok(TrySend::WouldBlock);
            }
        }
        self.send_checked(frame).map(|()| TrySend::Sent)
    }

    fn closer(&self) -> Option<ConnectionClose> {
        // Weak: a closer kept after both halves are gone must not keep the region mapped.
        let link = Arc::downgrade(&self.st.link);
        Some(Arc::new(move || {
            if let Some(link) = link.upgrade() {
                link.close();
            }
        }))
    }

    fn unread_probe(&self) -> Option<UnreadProbe> {
        let link = Arc::downgrade(&self.st.link);
        let (off, size) = (self.st.off, self.st.data_bytes);
        Some(Arc::new(move || {
            let Some(link) = link.upgrade() else { return 0 };
            // Our published tail and the peer's head (untrusted: a hostile value is clamped to
            // the ring's size, which only makes its own connection pause sooner).
            let tail = link.region.u64_at(off.tail_data).load(Ordering::Acquire);
            let head = link.region.u64_at(off.head_data).load(Ordering::Acquire);
            tail.wrapping_sub(head).min(size)
        }))
    }
}

impl Drop for ShmTx {
    fn drop(&mut self) {
        self.st.publish();
        self.st.link.region.u32_at(self.st.off.tx_closed).store(1, Ordering::Release);
        fence(Ordering::SeqCst);
        self.st.bell.ring();
    }
}

impl RxState {
    fn avail_slots(&self) -> u64 {
        self.tail_slots.wrapping_sub(self.head_slots)
    }

    fn avail_data(&self) -> u64 {
        self.tail_data.wrapping_sub(self.head_data)
    }

    /// One look for frames/bytes: `Some(avail)`, `None` (wait on), or `PeerGone` once the sender
    /// closed and everything it published is consumed.
    fn poll_avail(&mut self, avail: fn(&RxState) -> u64) -> Result<Option<u64>, RingError> {
        let region = &self.link.region;
        // SAFETY (ordering): `tx_closed` first, then the tails, all Acquire: if the producer had
        // closed, the tails read next are its final ones. Acquire on the tails pairs with the
        // producer's Release in `publish`, making the bytes before them visible.
        let closed = region.u32_at(self.off.tx_closed).load(Ordering::Acquire) != 0;
        let tail_slots = region.u64_at(self.off.tail_slots).load(Ordering::Acquire);
        let tail_data = region.u64_at(self.off.tail_data).load(Ordering::Acquire);
        checked_used(self.head_slots, tail_slots, self.slot_count, false)
            .ok_or(RingError::Corrupt("slot tail out of range"))?;
        checked_used(self.head_data, tail_data, self.data_bytes, false)
            .ok_or(RingError::Corrupt("data tail out of range"))?;
        self.tail_slots = tail_slots;
        self.tail_data = tail_data;
        match avail(self) {
            0 if closed => Err(RingError::PeerGone),
            0 => Ok(None),
            a => Ok(Some(a)),
        }
    }

    /// Releases consumed space to the producer and rings it if it waits for space.
    fn release(&self, off: usize, value: u64) {
        let region = &self.link.region;
        // SAFETY (ordering): Release: our copies out of the released bytes happen before the
        // producer (Acquire on the head) may overwrite them.
        region.u64_at(off).store(value, Ordering::Release);
        ring_if_waiting(region.u32_at(self.off.space_waiting), &self.bell);
    }
}

impl ShmRx {
    /// Returns what `avail` reports, waiting for the sender when there is nothing.
    fn avail(&mut self, avail: fn(&RxState) -> u64) -> Result<u64, RingError> {
        let a = avail(&self.st);
        if a > 0 {
            return Ok(a);
        }
        let link = self.st.link.clone();
        let st = &mut self.st;
        self.waiter.wait(&link, link.region.u32_at(st.off.data_waiting), || st.poll_avail(avail))
    }

    /// Moves `len` bytes from the data ring into `dst` (or drops them when `dst` is None).
    fn read_data(&mut self, mut dst: Option<&mut [u8]>, len: u64) -> Result<(), RingError> {
        let mut done = 0u64;
        while done < len {
            let avail = self.avail(RxState::avail_data)?;
            let st = &mut self.st;
            let pos = st.head_data % st.data_bytes;
            let n = avail.min(len - done).min(st.data_bytes - pos).min(PUBLISH_CHUNK_BYTES as u64);
            if let Some(d) = dst.as_deref_mut() {
                st.link.region.read(st.off.data + pos as usize, &mut d[done as usize..(done + n) as usize]);
            }
            st.head_data += n;
            done += n;
            st.release(st.off.head_data, st.head_data);
        }
        Ok(())
    }

    fn next_head(&mut self) -> Result<RxHead, RingError> {
        self.avail(RxState::avail_slots)?;
        let st = &mut self.st;
        let slot = st.off.slots + (st.head_slots % st.slot_count) as usize * SLOT_BYTES;
        // Private copy first: the peer can still write the slot.
        let mut raw = [0u8; HEADER_LEN];
        st.link.region.read(slot, &mut raw);
        let header = FrameHeader::read_validated(&raw, &self.limits).map_err(RingError::Header)?;
        let meta_len = header.meta_len.get() as usize;
        let mut meta = vec![0u8; meta_len];
        let inline = meta_len <= SLOT_META_INLINE_MAX;
        if inline {
            st.link.region.read(slot + HEADER_LEN, &mut meta);
        }
        st.head_slots += 1;
        st.release(st.off.head_slots, st.head_slots);
        if !inline {
            self.read_data(Some(&mut meta), meta_len as u64)?;
        }
        self.pending_data = header.data_len.get();
        self.st.link.counters.received.fetch_add((HEADER_LEN + meta_len) as u64, Ordering::Relaxed);
        Ok(RxHead { header, meta })
    }

    fn check_poison(&self) -> Result<(), TransportError> {
        match &self.poisoned {
            Some(p) => Err(p.clone().into_transport(&self.st.link.peer)),
            None if self.st.link.is_closed() => Err(TransportError::Closed),
            None => Ok(()),
        }
    }

    fn fail(&mut self, e: RingError) -> TransportError {
        self.poisoned = Some(e.clone());
        e.into_transport(&self.st.link.peer)
    }
}

impl crate::ring_rx::RingRx for ShmRx {
    type Error = RingError;
    fn check(&self) -> Result<(), TransportError> {
        self.check_poison()
    }
    fn fail(&mut self, e: RingError) -> TransportError {
        ShmRx::fail(self, e)
    }
    fn next_head(&mut self) -> Result<RxHead, RingError> {
        ShmRx::next_head(self)
    }
    fn take_data(&mut self, dst: Option<&mut [u8]>, len: u64) -> Result<(), RingError> {
        self.read_data(dst, len)
    }
    fn pending_data(&mut self) -> &mut u64 {
        &mut self.pending_data
    }
    fn counters(&self) -> &ByteCounters {
        &self.st.link.counters
    }
}

impl FrameRx for ShmRx {
    fn recv_head(&mut self) -> Result<RxHead, TransportError> {
        crate::ring_rx::recv_head(self)
    }

    fn recv_data(&mut self, dst: &mut [u8]) -> Result<(), TransportError> {
        crate::ring_rx::recv_data(self, dst)
    }

    fn set_spin_gate(&mut self, gate: SpinGate) {
        self.waiter.gate = Some(gate);
    }

    fn skip_data(&mut self, len: u64) -> Result<(), TransportError> {
        crate::ring_rx::skip_data(self, len)
    }
}

impl Drop for ShmRx {
    fn drop(&mut self) {
        self.st.link.region.u32_at(self.st.off.rx_closed).store(1, Ordering::Release);
        fence(Ordering::SeqCst);
        self.st.bell.ring();
    }
}
