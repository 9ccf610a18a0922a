//! The polled ring: chunks a busy-polling receiver finds in memory, without a completion.
//!
//! A WRITE_WITH_IMM costs the receiving side a posted receive and a completion (on soft-RoCE,
//! work in the sender's own `post_send`, the whole of which a round trip waits for). A receiver
//! that never parks (a busy-poll client, [`crate::WaitMode::BusyPoll`]) asks at the rendezvous
//! for this framing instead: the sender writes each chunk with a plain RDMA WRITE as
//!
//! ```text
//! [prefix: seq << 32 | len] [payload: len bytes, zero-padded to 16] [trailer: !prefix]
//! ```
//!
//! (little-endian u64s, every chunk 16-byte aligned in the ring), and the receiver polls the
//! prefix at its head for the next sequence number, then the trailer. A WRITE places its bytes in
//! order (soft-RoCE copies them packet by packet; RC delivers packets in order; the ring is
//! registered without `IBV_ACCESS_RELAXED_ORDERING`, so a NIC's PCIe writes into it stay in
//! order too), so a visible trailer means the chunk is whole. The sequence number (never 0, so a zeroed ring holds
//! nothing) makes stale bytes of an earlier lap unreadable as a new chunk: a lap holds far fewer
//! than 2^32 chunks. Where fewer than [`MIN_FOOTPRINT`] bytes are left before the ring's end the
//! sender writes a wrap marker (`len` = [`WRAP`], no payload): the rest of the ring is skipped.
//!
//! Immediates still carry what is not ring data (close, a granted write done); they are polled
//! as before. The prefix is untrusted: a length beyond [`super::CHUNK_BYTES`] or the ring's end
//! is a protocol error.

use std::sync::atomic::{AtomicU64, Ordering};

use super::RingError;

/// Bytes before a chunk's payload.
pub(super) const PREFIX: u64 = 8;
/// Bytes after its (padded) payload.
pub(super) const TRAILER: u64 = 8;
/// Every chunk starts and ends on this boundary.
pub(super) const ALIGN: u64 = 16;
/// The smallest chunk that carries a payload byte; less than this before the ring's end is
/// skipped with a wrap marker (which takes exactly `PREFIX + TRAILER` = 16 bytes).
pub(super) const MIN_FOOTPRINT: u64 = PREFIX + ALIGN + TRAILER;
/// The length of a wrap marker.
pub(super) const WRAP: u32 = u32::MAX;

/// The sequence number after `seq` (never 0).
pub(super) fn next(seq: u32) -> u32 {
    seq.wrapping_add(1).max(1)
}

/// Ring bytes a chunk of `len` payload bytes takes.
pub(super) fn footprint(len: u64) -> u64 {
    PREFIX + len.next_multiple_of(ALIGN) + TRAILER
}

pub(super) fn prefix(seq: u32, len: u32) -> u64 {
    (seq as u64) << 32 | len as u64
}

/// Writes the prefix and trailer of a chunk of `len` payload bytes whose prefix is at `at`
/// (the payload must already be at `at + PREFIX`), zeroing its padding; returns its footprint.
///
/// # Safety
/// `at .. at + footprint(len)` (or 16 bytes for a wrap marker) lies in memory this thread may
/// write and no work request is reading, and `at` is 8-byte aligned.
pub(super) unsafe fn seal(at: *mut u8, seq: u32, len: u32) -> u64 {
    let p = prefix(seq, len);
    let body = if len == WRAP { 0 } else { (len as u64).next_multiple_of(ALIGN) };
    // SAFETY (caller): the range is ours and aligned; the padding lies inside the body.
    unsafe {
        if len != WRAP {
            std::ptr::write_bytes(at.add((PREFIX + len as u64) as usize), 0, (body - len as u64) as usize);
        }
        (at as *mut u64).write(p.to_le());
        (at.add((PREFIX + body) as usize) as *mut u64).write((!p).to_le());
    }
    PREFIX + body + TRAILER
}

/// What the receiver found at its head.
#[derive(Debug, PartialEq)]
pub(super) enum Found {
    /// A whole chunk of this many payload bytes (they start `PREFIX` bytes after the head).
    Chunk(u64),
    /// A wrap marker: the ring's rest is skipped.
    Wrap,
}

/// Looks for chunk `seq` at offset `pos` of the ring `ring[..size]`: `None` until it is whole.
///
/// # Safety
/// `ring` points at `size` bytes that stay mapped (the registered ring), 8-byte aligned; `pos`
/// is a multiple of [`ALIGN`] below `size`. The peer may be writing any of it.
pub(super) unsafe fn find(ring: *const u8, size: u64, pos: u64, seq: u32) -> Result<Option<Found>, RingError> {
    // SAFETY (caller): in bounds and aligned; atomics because the NIC writes concurrently.
    let word = |at: u64| unsafe { AtomicU64::from_ptr(ring.add(at as usize) as *mut u64) };
    let p = u64::from_le(word(pos).load(Ordering::Acquire));
    if (p >> 32) as u32 != seq {
        return Ok(None);
    }
    let len = p as u32;
    let body = if len == WRAP {
        0
    } else {
        if len == 0 || len as usize > super::CHUNK_BYTES || footprint(len as u64) > size - pos {
            return Err(RingError::Corrupt("a polled chunk of no bytes or beyond the ring's end"));
        }
        (len as u64).next_multiple_of(ALIGN)
    };
    // Acquire: the payload, placed before the trailer, is read only after it.
    if u64::from_le(word(pos + PREFIX + body).load(Ordering::Acquire)) != !p {
        return Ok(None);
    }
    Ok(Some(if len == WRAP { Found::Wrap } else { Found::Chunk(len as u64) }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ring of u64s, so it is aligned as a registered one is.
    fn ring(words: usize) -> Vec<u64> {
        vec![0u64; words]
    }

    #[test]
    fn a_sealed_chunk_is_found_whole_and_only_with_its_sequence_number() {
        let mut r = ring(64);
        let base = r.as_mut_ptr() as *mut u8;
        let size = 512;
        // SAFETY: all offsets below lie in the 512-byte ring.
        unsafe {
            assert_eq!(find(base, size, 0, 1).unwrap(), None, "a zeroed ring holds nothing");
            std::ptr::copy_nonoverlapping(b"hello".as_ptr(), base.add(PREFIX as usize), 5);
            assert_eq!(seal(base, 1, 5), 32);
            assert_eq!(find(base, size, 0, 1).unwrap(), Some(Found::Chunk(5)));
            assert_eq!(find(base, size, 0, 2).unwrap(), None, "an earlier lap's chunk");
            assert_eq!(std::slice::from_raw_parts(base.add(8), 8), b"hello\0\0\0");
            // The trailer not yet placed: not whole.
            (base.add(24) as *mut u64).write(0);
            assert_eq!(find(base, size, 0, 1).unwrap(), None);
            // A wrap marker in the last 16 bytes.
            assert_eq!(seal(base.add(496), 7, WRAP), 16);
            assert_eq!(find(base, size, 496, 7).unwrap(), Some(Found::Wrap));
        }
    }

    #[test]
    fn a_length_beyond_the_ring_or_the_chunk_bound_is_refused() {
        let mut r = ring(64);
        let base = r.as_mut_ptr() as *mut u8;
        // SAFETY: offsets in the 512-byte ring.
        unsafe {
            (base.add(480) as *mut u64).write(prefix(3, 40).to_le());
            assert!(find(base, 512, 480, 3).is_err(), "48 bytes of payload do not fit in the last 32");
            (base as *mut u64).write(prefix(3, 0).to_le());
            assert!(find(base, 512, 0, 3).is_err());
            (base as *mut u64).write(prefix(3, super::super::CHUNK_BYTES as u32 + 1).to_le());
            assert!(find(base, 1 << 30, 0, 3).is_err());
        }
    }

    #[test]
    fn sequence_numbers_skip_zero() {
        assert_eq!(next(u32::MAX), 1);
        assert_eq!(next(1), 2);
        assert_eq!(footprint(1), 32);
        assert_eq!(footprint(16), 32);
        assert_eq!(footprint(17), 48);
    }
}
