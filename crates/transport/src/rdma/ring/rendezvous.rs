//! Zero-copy bulk data: a frame whose data is at least [`RENDEZVOUS_BYTES_MIN`] sends its header
//! and metadata through the ring as usual, then its data moves by *grants* the receiver sends
//! back with its credit (one at a time, each for the next bytes it wants):
//!
//! - `Direct { addr, rkey, len }` for a `recv_data` of at least [`DIRECT_BYTES_MIN`]: the receiver
//!   opens exactly its destination for remote write; the sender RDMA-WRITEs straight from its own
//!   buffers and ends with a zero-length WRITE_WITH_IMM ([`GRANT_DONE_IMM`]), which RC ordering
//!   places after the data. The receiver then closes the range again, so the key is dead before
//!   `recv_data` returns: a peer can write only inside its ring and the one range granted to it
//!   for the one transfer. How the range is opened:
//!   - inside a host region handed over at start-up (`Listener::register_host_memory`: e.g. a
//!     server's staging pool; registered in pieces of `verbs::HOST_PIECE_BYTES`, or unit by
//!     unit where it is handed out in units (`PinnedHost::unit_bytes`: the pool's chunks), each
//!     on its first use and kept, one grant per piece a destination spans), on a device that
//!     holds window writes to the window (`rdma::windows`), or where the registration under the
//!     window is itself the bound (exactly the destination, or one unit that contains it):
//!     this connection's type-2 memory window is bound over the range (a work
//!     request on its own QP, so only this connection can use the key) and invalidated after;
//!     nothing is registered;
//!   - otherwise the range itself is registered for the transfer ([`LentMr`], scoped to the
//!     borrow of the buffer).
//! - `Ring { len }` for a smaller read, a skip, or a destination that could not be registered: the
//!   rest of the frame streams through the ring as any small frame does.
//!
//! A client's [`crate::RegBuf`] registered with its connection (`regcache`) is used as it is: the
//! sender reads it under its cached local key, and a receive into it is granted under its cached
//! key (the client's protection domain serves this one connection), so neither registers anything.
//!
//! The sender reads a host region under its pieces' local keys (registering a piece on its first
//! use) and registers any other buffer for the transfer. No registration is cached by address: a
//! freed and reallocated buffer at the same address would still be pinned to its old pages (no
//! munmap hook here to invalidate it); start-up regions and cached `RegBuf`s are owned memory that
//! lives as long as its registration. A sender that cannot
//! register its buffer (RLIMIT_MEMLOCK) bounces the bytes through its staging buffer, which is
//! idle during a direct grant: the grant's credit covers every byte placed in the ring before it.

use super::{Grant, RdmaRx, RdmaTx, RingError, CREDIT_BYTES, DATA_RECV_WR, GRANT_DONE_IMM};
use crate::rdma::verbs::{HostRegion, LentMr};

/// Frames with at least this much bulk data move it by grants (both sides derive it from the
/// header: it is part of the wire protocol).
pub(crate) const RENDEZVOUS_BYTES_MIN: u64 = 1 << 20;
/// A receive of at least this many bytes is granted for a direct write; below it, copying out of
/// the ring costs less than registering.
const DIRECT_BYTES_MIN: u64 = 64 * 1024;
/// Where a dma-buf registration's addresses start (any page-aligned non-zero value works).
const DMABUF_IOVA_BASE: u64 = 1 << 40;
/// Looks at the CQ at most this often for a window's invalidation (a local operation: it
/// completes at once unless the QP broke) before stopping the QP instead.
const INVALIDATE_POLLS_MAX: u32 = 1_000_000;
/// Largest single RDMA WRITE of a direct transfer.
const DIRECT_WR_BYTES: usize = 16 << 20;

const _: () = assert!(CREDIT_BYTES >= 40, "grants travel in credit messages");

/// Walks a frame's data segments.
struct Cursor<'a> {
    segs: &'a [&'a [u8]],
    i: usize,
    off: usize,
}

impl<'a> Cursor<'a> {
    /// The next at most `max` bytes, from one segment.
    fn next(&mut self, max: u64) -> &'a [u8] {
        while self.i < self.segs.len() && self.off == self.segs[self.i].len() {
            self.i += 1;
            self.off = 0;
        }
        let Some(seg) = self.segs.get(self.i) else { return &[] };
        let n = (seg.len() - self.off).min(usize::try_from(max).unwrap_or(usize::MAX));
        let piece = &seg[self.off..self.off + n];
        self.off += n;
        piece
    }
}

impl RdmaTx {
    /// Sends `total` bytes of `data` as the receiver grants them.
    pub(crate) fn send_granted(&mut self, data: &[&[u8]], total: u64) -> Result<(), RingError> {
        let mut cur = Cursor { segs: data, i: 0, off: 0 };
        let mut left = total;
        while left > 0 {
            self.wait_for(|s| s.grant != Grant::None)?;
            match std::mem::take(&mut self.grant) {
                Grant::Ring { len } if len > 0 && len <= left => {
                    let mut n = len;
                    while n > 0 {
                        let piece = cur.next(n);
                        self.stream(piece)?;
                        n -= piece.len() as u64;
                    }
                    self.flush()?;
                    left -= len;
                }
                Grant::Direct { addr, rkey, len } if len > 0 && len <= left => {
                    self.stale = Some((addr, rkey));
                    self.write_direct(&mut cur, addr, rkey, len)?;
                    left -= len;
                }
                _ => return Err(RingError::Corrupt("a grant of no bytes or beyond the frame's data")),
            }
        }
        Ok(())
    }

    /// Writes the next `len` bytes of `cur` to the granted `addr..+len`, then says so.
    fn write_direct(&mut self, cur: &mut Cursor<'_>, mut addr: u64, rkey: u32, len: u64) -> Result<(), RingError> {
        let dev = self.link.dev.clone();
        // Registrations live until the done-write completes (then the NIC has read every byte).
        // Bounded by the frame's segment count.
        let mut lent = Vec::new();
        let mut cached = Vec::new();
        let mut left = len;
        while left > 0 {
            let seg = cur.next(left);
            left -= seg.len() as u64;
            let mut rest = seg;
            while !rest.is_empty() {
                // A host region needs no registration here (one lookup per registered piece of
                // it the segment spans).
                let (at, n) = (rest.as_ptr() as u64, rest.len() as u64);
                let found = self.link.reg_cache.as_ref().and_then(|c| c.find(at, n));
                let (piece, lkey) = match (found, dev.host_region(at, n)) {
                    // A client's cached `RegBuf` (held until the done-write completed).
                    (Some((mr, covers)), _) => {
                        let lkey = mr.lkey();
                        cached.push(mr);
                        (&rest[..covers as usize], lkey)
                    }
                    (None, Some(region)) => (&rest[..region.covers as usize], region.lkey),
                    (None, None) => match LentMr::for_reading(&dev, rest) {
                        Ok(mr) => {
                            let lkey = mr.lkey();
                            lent.push(mr);
                            self.link.counters.registrations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            (rest, lkey)
                        }
                        Err(_) => {
                            self.bounce(rest, &mut addr, rkey)?;
                            break;
                        }
                    },
                };
                rest = &rest[piece.len()..];
                for part in piece.chunks(DIRECT_WR_BYTES) {
                    self.wait_for(|s| !s.sq.full())?;
                    let (wr_id, signaled) = self.sq.next();
                    // SAFETY: `part` is registered under `lkey` (a start-up region, or a registration
                    // in `lent`, dropped only after the done-write below completed or the QP failed);
                    // the remote range lies inside the grant (the parts add up to at most its `len`).
                    unsafe {
                        self.qp
                            .post_write(
                                wr_id,
                                part.as_ptr() as u64,
                                part.len() as u32,
                                lkey,
                                addr,
                                rkey,
                                None,
                                signaled,
                            )
                            .map_err(super::verbs)?
                    };
                    addr += part.len() as u64;
                }
            }
        }
        self.wait_for(|s| !s.sq.full() && s.imms_sent - s.credit.imms < DATA_RECV_WR as u64)?;
        self.sq.posted += 1;
        let done = self.sq.posted;
        // SAFETY: zero-length write: no local or remote memory is touched.
        unsafe {
            self.qp
                .post_write(done, 0, 0, 0, self.remote.addr, self.remote.rkey, Some(GRANT_DONE_IMM), true)
                .map_err(super::verbs)?
        };
        self.imms_sent += 1;
        self.wait_for(move |s| s.sq.done >= done)?;
        drop((lent, cached));
        Ok(())
    }

    /// Writes `piece` to `*addr` through the staging buffer, one staging-full at a time.
    fn bounce(&mut self, piece: &[u8], addr: &mut u64, rkey: u32) -> Result<(), RingError> {
        if self.credit.head != self.tail || self.pending != 0 {
            return Err(RingError::Corrupt("a direct grant before the ring was consumed"));
        }
        for part in piece.chunks(self.staging.len()) {
            self.wait_for(|s| !s.sq.full())?;
            // SAFETY: part fits in staging, which no write is reading: every ring byte was
            // consumed (checked above) and the previous bounce completed before this copy.
            unsafe { std::ptr::copy_nonoverlapping(part.as_ptr(), self.staging.ptr(), part.len()) };
            self.sq.posted += 1;
            let id = self.sq.posted;
            // SAFETY: staging is registered for the connection's life; we wait for the write's
            // completion before staging is touched again. The remote range lies in the grant.
            unsafe {
                self.qp
                    .post_write(
                        id,
                        self.staging.addr(),
                        part.len() as u32,
                        self.staging.lkey(),
                        *addr,
                        rkey,
                        None,
                        true,
                    )
                    .map_err(super::verbs)?
            };
            self.wait_for(move |s| s.sq.done >= id)?;
            *addr += part.len() as u64;
        }
        Ok(())
    }
}

impl RdmaRx {
    /// Receives into `dst` by grant (see the module doc).
    pub(super) fn read_granted(&mut self, dst: &mut [u8]) -> Result<(), RingError> {
        let len = dst.len() as u64;
        if len == 0 {
            return Ok(());
        }
        if len >= DIRECT_BYTES_MIN {
            let dev = self.link.dev.clone();
            let addr = dst.as_ptr() as u64;
            // A client's cached `RegBuf`: its registration is this connection's alone (see
            // `regcache`), so it is granted as it is; held until the transfer is done.
            if let Some((mr, covers)) = self.link.reg_cache.as_ref().and_then(|c| c.find(addr, len)) {
                if covers == len {
                    return self.receive_direct(mr.rkey(), addr, len);
                }
            }
            // A window over registered memory: where the device holds window writes to the window
            // (the probe said so; never probed here), or where the registration itself keeps the
            // peer inside memory the receiver holds, so that even a device that checks only the
            // registration (soft-RoCE) does: one covering exactly this destination (a run-time
            // range: a server's tensor being put; a whole staging chunk), or one unit of a region
            // handed out in whole units that contains the destination (part of a staging chunk,
            // whose holder is this receive).
            if self.window.is_some() {
                if let Some(region) = dev.host_region(addr, len) {
                    let exact = region.range == (addr, addr + len);
                    let in_unit = region.unit && region.covers == len;
                    if exact || in_unit || dev.windows_bounded.get() == Some(&true) {
                        return self.receive_windowed_pieces(region, dst);
                    }
                }
            }
            match LentMr::for_remote_writing(&dev, dst) {
                Ok(mr) => {
                    self.link.counters.registrations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return self.receive_direct(mr.rkey(), addr, len);
                }
                Err(e) => tracing::debug!(error = %e, len, "rdma: cannot register a receive buffer; using the ring"),
            }
        }
        self.ring_rest()?;
        self.read(Some(dst), len)
    }

    /// Skips `len` bytes of a rendezvous frame (they come through the ring).
    pub(super) fn read_granted_skip(&mut self, len: u64) -> Result<(), RingError> {
        if len == 0 {
            return Ok(());
        }
        self.ring_rest()?;
        self.read(None, len)
    }

    /// Grants the rest of the frame to the ring: one grant, then this frame reads as a small one.
    fn ring_rest(&mut self) -> Result<(), RingError> {
        self.send_grant(Grant::Ring { len: self.pending_data })?;
        self.rendezvous = false;
        Ok(())
    }

    /// Receives into device memory exported as a dma-buf (GPUDirect RDMA); `Ok(false)` when it
    /// cannot be registered or the frame's data does not move by grants (nothing consumed).
    ///
    /// # Safety
    /// As [`crate::FrameRx::recv_data_dmabuf`].
    pub(super) unsafe fn read_granted_dmabuf(&mut self, dst: &crate::DmaBufDst<'_>) -> Result<bool, RingError> {
        let len = dst.len as u64;
        if !self.rendezvous || len < DIRECT_BYTES_MIN || len > self.pending_data {
            return Ok(false);
        }
        let dev = self.link.dev.clone();
        // Remote addresses in the grant are offsets into the export, from a fixed non-zero base.
        let iova = DMABUF_IOVA_BASE + dst.offset;
        // SAFETY (caller): the range is the NIC's alone for this call.
        let mr = match unsafe { LentMr::for_dmabuf(&dev, dst.fd, dst.offset, dst.len, iova) } {
            Ok(mr) => mr,
            Err(e) => {
                tracing::debug!(error = %e, "rdma: cannot register device memory (no GPUDirect); staging instead");
                return Ok(false);
            }
        };
        self.link.counters.registrations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.receive_direct(mr.rkey(), iova, len)?;
        Ok(true)
    }

    /// Receives into `dst`, which starts in `first`, a registered piece of a host region: one
    /// window grant per piece it spans (each piece is its own registration); a part no piece
    /// covers (its registration failed) is registered for the transfer.
    fn receive_windowed_pieces(&mut self, first: HostRegion, dst: &mut [u8]) -> Result<(), RingError> {
        let dev = self.link.dev.clone();
        let mut region = Some(first);
        let mut done = 0usize;
        while done < dst.len() {
            let rest = &mut dst[done..];
            let Some(r) = region.take().or_else(|| dev.host_region(rest.as_ptr() as u64, rest.len() as u64)) else {
                let (addr, len) = (rest.as_ptr() as u64, rest.len() as u64);
                let mr = LentMr::for_remote_writing(&dev, rest).map_err(super::verbs)?;
                self.link.counters.registrations.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return self.receive_direct(mr.rkey(), addr, len);
            };
            let n = r.covers as usize;
            self.receive_windowed(r, &mut rest[..n])?;
            done += n;
        }
        Ok(())
    }

    /// Receives into `dst`, which lies in one registered piece `region` of a host region: binds this connection's
    /// window over exactly `dst`, grants it, and invalidates it once the data is in, so no
    /// registration happens here and the key is dead before this returns, on error too.
    fn receive_windowed(&mut self, region: HostRegion, dst: &mut [u8]) -> Result<(), RingError> {
        let (addr, len) = (dst.as_mut_ptr() as u64, dst.len() as u64);
        self.wait_sq_room()?;
        let mw = self.window.as_mut().expect("checked by the caller");
        let rkey = mw.next_rkey();
        let (wr_id, signaled) = self.sq.next();
        // SAFETY: `dst` is borrowed mutably until this returns, and the window is invalidated
        // (or the QP is in error and takes no more writes) before then; it lies in `region`.
        unsafe { self.qp.post_bind_mw(wr_id, mw, rkey, region, addr, len, signaled).map_err(super::verbs)? };
        let got = self.receive_direct(rkey, addr, len);
        let dead = self.invalidate(rkey);
        got.and(dead)
    }

    /// Invalidates the window key `rkey` and waits until that completed; where it cannot, moves
    /// the QP to the error state, which refuses every later write.
    fn invalidate(&mut self, rkey: u32) -> Result<(), RingError> {
        let posted = self.wait_sq_room().and_then(|()| {
            self.sq.posted += 1;
            let id = self.sq.posted;
            self.qp.post_local_inv(id, rkey).map_err(super::verbs)?;
            Ok(id)
        });
        // Busy-poll: a local operation completes at once, and a closed link must not stop it.
        let done = posted.and_then(|id| {
            for _ in 0..INVALIDATE_POLLS_MAX {
                self.progress()?;
                if self.sq.done >= id {
                    return Ok(());
                }
                std::thread::yield_now();
            }
            Err(RingError::Verbs("the window's invalidation did not complete".into()))
        });
        if let Err(e) = &done {
            tracing::warn!(error = ?e, "rdma: window not invalidated; stopping the queue pair");
            self.qp.to_error();
        }
        done
    }

    /// Waits until the send queue has room for one more work request.
    fn wait_sq_room(&mut self) -> Result<(), RingError> {
        self.progress()?;
        if self.sq.full() {
            let (link, cq, waiter) = (self.link.clone(), self.qp.cq.clone(), self.waiter.clone());
            waiter.wait(&link, &cq, || {
                self.progress()?;
                Ok((!self.sq.full()).then_some(()))
            })?;
        }
        Ok(())
    }

    fn receive_direct(&mut self, rkey: u32, addr: u64, len: u64) -> Result<(), RingError> {
        self.grant_done = false;
        self.send_grant(Grant::Direct { addr, rkey, len })?;
        let (link, cq, waiter) = (self.link.clone(), self.qp.cq.clone(), self.waiter.clone());
        waiter.wait(&link, &cq, || {
            self.progress()?;
            if self.grant_done {
                Ok(Some(()))
            } else if self.peer_closed {
                Err(RingError::PeerGone)
            } else {
                Ok(None)
            }
        })?;
        self.grant_done = false;
        self.link.counters.received_direct.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
        // The done immediate used a receive: report it when a quarter is due.
        self.credit()
    }

    /// Sends `grant` with the current credit (so the grant also says every ring byte is consumed).
    fn send_grant(&mut self, grant: Grant) -> Result<(), RingError> {
        self.wait_sq_room()?;
        self.repost()?;
        let c = super::Credit { head: self.head, imms: self.reposted, closed: false, grant };
        let (wr_id, signaled) = self.sq.next();
        self.qp.post_send_inline(wr_id, &c.encode(), signaled).map_err(super::verbs)?;
        self.reported = super::Credit { grant: Grant::None, ..c };
        Ok(())
    }
}

/// Where a misbehaving peer aims a write (see `RawClient`).
#[derive(Clone, Copy, Debug)]
pub enum OutOfBounds {
    /// Just past the end of the peer's ring.
    PastRing,
    /// Just past the end of the next direct grant.
    PastGrant,
    /// Inside the next direct grant, but after the transfer it was for: the data is written and
    /// announced as usual, the receiver's reply awaited (`RawClient::stale_grant`), then the
    /// grant's key is used again.
    StaleGrant,
}

impl RdmaTx {
    /// Posts one 8-byte RDMA WRITE outside what the peer granted; returns whether the peer's NIC
    /// refused it (the completion failed). Plays a hostile peer in tests.
    pub(crate) fn write_out_of_bounds(&mut self, at: OutOfBounds) -> Result<bool, RingError> {
        let (addr, rkey) = match at {
            OutOfBounds::PastRing => (self.remote.addr + self.remote.bytes, self.remote.rkey),
            OutOfBounds::PastGrant => {
                self.wait_for(|s| s.grant != Grant::None)?;
                match std::mem::take(&mut self.grant) {
                    Grant::Direct { addr, rkey, len } => (addr + len, rkey),
                    _ => return Err(RingError::Corrupt("expected a direct grant")),
                }
            }
            OutOfBounds::StaleGrant => self.stale.ok_or(RingError::Corrupt("no earlier direct grant"))?,
        };
        let bytes = *b"outside!";
        self.wait_for(|s| !s.sq.full())?;
        self.sq.posted += 1;
        let id = self.sq.posted;
        // SAFETY: inline (8 bytes, copied during the call); the remote range is deliberately
        // outside the peer's grants: its NIC must refuse it.
        unsafe { self.qp.post_write(id, bytes.as_ptr() as u64, 8, 0, addr, rkey, None, true).map_err(super::verbs)? };
        match self.wait_for(move |s| s.sq.done >= id) {
            Ok(()) => Ok(false),
            Err(RingError::PeerGone) => Ok(true),
            Err(e) => Err(e),
        }
    }
}
