//! The receive-side frame bookkeeping the ring transports (`shm`, `rdma`) share: a frame's bulk
//! data is consumed before the next header, never read past its end, counted as received once
//! moved, and any ring failure poisons the half. Each transport implements [`RingRx`] (how to
//! parse the next header and move bulk bytes out of its ring) and forwards its `FrameRx` methods
//! to [`recv_head`], [`recv_data`] and [`skip_data`].

use std::sync::atomic::Ordering;

use crate::{ByteCounters, RxHead, TransportError};

/// What a ring transport's receiving half provides.
pub(crate) trait RingRx {
    /// Why a ring operation stopped (the transport's own error).
    type Error;
    /// `Err` once the half is poisoned or the connection closed.
    fn check(&self) -> Result<(), TransportError>;
    /// Poisons the half with `e` and says what the caller sees.
    fn fail(&mut self, e: Self::Error) -> TransportError;
    /// Waits for, copies out and validates the next header and its metadata; sets the frame's
    /// bulk data as pending.
    fn next_head(&mut self) -> Result<RxHead, Self::Error>;
    /// Moves the current frame's next `len` bulk bytes into `dst`, or drops them.
    fn take_data(&mut self, dst: Option<&mut [u8]>, len: u64) -> Result<(), Self::Error>;
    /// Bulk bytes of the current frame not yet consumed.
    fn pending_data(&mut self) -> &mut u64;
    fn counters(&self) -> &ByteCounters;
}

pub(crate) fn recv_head<R: RingRx>(r: &mut R) -> Result<RxHead, TransportError> {
    r.check()?;
    if *r.pending_data() != 0 {
        return Err(TransportError::DataMisuse("previous frame's bulk data not consumed"));
    }
    r.next_head().map_err(|e| r.fail(e))
}

pub(crate) fn recv_data<R: RingRx>(r: &mut R, dst: &mut [u8]) -> Result<(), TransportError> {
    let len = dst.len() as u64;
    take(r, Some(dst), len, "recv_data past the end of the frame's bulk data")
}

pub(crate) fn skip_data<R: RingRx>(r: &mut R, len: u64) -> Result<(), TransportError> {
    take(r, None, len, "skip_data past the end of the frame's bulk data")
}

fn take<R: RingRx>(r: &mut R, dst: Option<&mut [u8]>, len: u64, misuse: &'static str) -> Result<(), TransportError> {
    r.check()?;
    if len > *r.pending_data() {
        return Err(TransportError::DataMisuse(misuse));
    }
    r.take_data(dst, len).map_err(|e| r.fail(e))?;
    *r.pending_data() -= len;
    r.counters().received.fetch_add(len, Ordering::Relaxed);
    Ok(())
}
