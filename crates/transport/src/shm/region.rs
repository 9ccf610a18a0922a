//! The shared region one client and the server map: its layout (offsets computed from two sizes)
//! and raw accessors for the atomics and byte areas inside it.
//!
//! ```text
//! offset 0            control header (CONTROL_BYTES): magic, version, slot count, slot size, data size, region size
//! CONTROL_BYTES       direction 0 = client → server (requests)
//! + dir_bytes         direction 1 = server → client (replies)
//!
//! one direction:
//!   +0    producer line  : tail_slots u64, tail_data u64          (written by the sender)
//!   +128  producer flags : tx_closed u32, space_waiting u32       (written by the sender, rarely)
//!   +256  consumer line  : head_slots u64, head_data u64          (written by the receiver)
//!   +384  consumer flags : rx_closed u32, data_waiting u32        (written by the receiver, rarely)
//!   +512  slots          : slot_count × SLOT_BYTES (FrameHeader + inline metadata)
//!   +page data area      : data_bytes, a byte ring for bulk data and large metadata
//! ```
//!
//! Indices are free-running u64 counters (frames or bytes ever published/consumed); a position is
//! the counter modulo the ring's size. The flags live on their own 128-byte lines so the hot
//! index lines are not invalidated by them (and vice versa).
//!
//! Invariant: a layout in use was computed (or re-derived and checked) in private memory; nothing
//! read from the region afterwards changes an offset.

use std::sync::atomic::{AtomicU32, AtomicU64};

use memmap2::MmapRaw;

/// "DJNSHM" + format version 1, as little-endian bytes.
pub const REGION_MAGIC: u64 = u64::from_le_bytes(*b"DJNSHM\x00\x01");
pub const REGION_VERSION: u32 = 1;
/// Bytes reserved for the control header at the start of the region.
pub const CONTROL_BYTES: usize = 4096;
/// Bytes of the control header that carry fields.
pub const CONTROL_USED_BYTES: usize = 40;
/// One frame slot: a 32-byte `FrameHeader` followed by inline metadata.
pub const SLOT_BYTES: usize = 512;
/// Metadata up to this size rides inside the slot; larger metadata goes through the data area.
pub const SLOT_META_INLINE_MAX: usize = SLOT_BYTES - djinn_proto::HEADER_LEN;
/// Alignment of the data areas and of each direction.
pub const PAGE_BYTES: usize = 4096;
/// Bounds accepted for the two configurable sizes (also when a client re-derives the layout).
pub const SLOTS_MAX: usize = 1 << 16;
pub const DATA_BYTES_MIN: usize = PAGE_BYTES;
pub const DATA_BYTES_MAX: usize = 1 << 30;

const LINE_BYTES: usize = 128;
const DIR_HEAD_BYTES: usize = 4 * LINE_BYTES;

/// Which way a ring carries frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client → server (requests).
    ToServer = 0,
    /// Server → client (replies).
    ToClient = 1,
}

/// Absolute byte offsets of one direction's fields inside the region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirOffsets {
    pub tail_slots: usize,
    pub tail_data: usize,
    pub tx_closed: usize,
    pub space_waiting: usize,
    pub head_slots: usize,
    pub head_data: usize,
    pub rx_closed: usize,
    pub data_waiting: usize,
    pub slots: usize,
    pub data: usize,
}

/// Sizes and offsets of a region, derived from the slot count and the data-area size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub slot_count: usize,
    pub data_bytes: usize,
    pub region_bytes: usize,
    dir_bytes: usize,
    data_off_in_dir: usize,
}

impl Layout {
    /// Computes a layout; `data_bytes` must be a multiple of `PAGE_BYTES`.
    pub fn new(slot_count: usize, data_bytes: usize) -> Result<Layout, &'static str> {
        if slot_count == 0 || slot_count > SLOTS_MAX {
            return Err("slot count out of range (1..=65536)");
        }
        if !(DATA_BYTES_MIN..=DATA_BYTES_MAX).contains(&data_bytes) || !data_bytes.is_multiple_of(PAGE_BYTES) {
            return Err("data area size out of range (4 KiB..=1 GiB, page multiple)");
        }
        // Bounded above, so none of these can overflow.
        let data_off_in_dir = (DIR_HEAD_BYTES + slot_count * SLOT_BYTES).next_multiple_of(PAGE_BYTES);
        let dir_bytes = data_off_in_dir + data_bytes;
        let region_bytes = CONTROL_BYTES + 2 * dir_bytes;
        Ok(Layout { slot_count, data_bytes, region_bytes, dir_bytes, data_off_in_dir })
    }

    pub fn dir(&self, d: Direction) -> DirOffsets {
        let base = CONTROL_BYTES + d as usize * self.dir_bytes;
        DirOffsets {
            tail_slots: base,
            tail_data: base + 8,
            tx_closed: base + LINE_BYTES,
            space_waiting: base + LINE_BYTES + 4,
            head_slots: base + 2 * LINE_BYTES,
            head_data: base + 2 * LINE_BYTES + 8,
            rx_closed: base + 3 * LINE_BYTES,
            data_waiting: base + 3 * LINE_BYTES + 4,
            slots: base + DIR_HEAD_BYTES,
            data: base + self.data_off_in_dir,
        }
    }

    /// The control header the server writes at offset 0.
    pub fn encode(&self) -> [u8; CONTROL_USED_BYTES] {
        let mut out = [0u8; CONTROL_USED_BYTES];
        out[0..8].copy_from_slice(&REGION_MAGIC.to_le_bytes());
        out[8..12].copy_from_slice(&REGION_VERSION.to_le_bytes());
        out[12..16].copy_from_slice(&(self.slot_count as u32).to_le_bytes());
        out[16..20].copy_from_slice(&(SLOT_BYTES as u32).to_le_bytes());
        out[24..32].copy_from_slice(&(self.data_bytes as u64).to_le_bytes());
        out[32..40].copy_from_slice(&(self.region_bytes as u64).to_le_bytes());
        out
    }

    /// Re-derives the layout from a private copy of a control header and checks it against the
    /// size of the file that backs it.
    pub fn decode(control: &[u8; CONTROL_USED_BYTES], file_bytes: u64) -> Result<Layout, &'static str> {
        let u32_at = |o: usize| u32::from_le_bytes(control[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(control[o..o + 8].try_into().expect("8 bytes"));
        if u64_at(0) != REGION_MAGIC {
            return Err("bad region magic");
        }
        if u32_at(8) != REGION_VERSION {
            return Err("unsupported region version");
        }
        if u32_at(16) as usize != SLOT_BYTES {
            return Err("unsupported slot size");
        }
        let data_bytes = usize::try_from(u64_at(24)).map_err(|_| "data area size out of range")?;
        let layout = Layout::new(u32_at(12) as usize, data_bytes)?;
        if u64_at(32) != layout.region_bytes as u64 || file_bytes != layout.region_bytes as u64 {
            return Err("region size disagrees with its layout");
        }
        Ok(layout)
    }
}

/// A mapped region plus its (private) layout. Shared by the two halves of a connection.
pub struct Region {
    map: MmapRaw,
    layout: Layout,
}

impl Region {
    /// Wraps a mapping; the mapping must be at least `layout.region_bytes` long.
    pub fn new(map: MmapRaw, layout: Layout) -> Region {
        assert!(map.len() >= layout.region_bytes, "mapping shorter than its layout");
        Region { map, layout }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The 64-bit atomic at `off`.
    pub fn u64_at(&self, off: usize) -> &AtomicU64 {
        assert!(off.is_multiple_of(8) && off + 8 <= self.layout.region_bytes);
        // SAFETY: in bounds and 8-aligned (the mapping is page-aligned); the mapping lives as long as
        // `self`. AtomicU64 has u64's layout, and both processes access this word only atomically,
        // which is sound for lock-free atomics in shared memory.
        unsafe { &*self.map.as_mut_ptr().add(off).cast::<AtomicU64>() }
    }

    /// The 32-bit atomic at `off`.
    pub fn u32_at(&self, off: usize) -> &AtomicU32 {
        assert!(off.is_multiple_of(4) && off + 4 <= self.layout.region_bytes);
        // SAFETY: as for `u64_at`, with 4-byte alignment.
        unsafe { &*self.map.as_mut_ptr().add(off).cast::<AtomicU32>() }
    }

    /// Copies `src` into the region at `off`.
    pub fn write(&self, off: usize, src: &[u8]) {
        assert!(off <= self.layout.region_bytes && src.len() <= self.layout.region_bytes - off);
        // SAFETY: the destination range is inside the mapping (checked above). No Rust reference to
        // region bytes ever exists, only raw copies; the ring protocol gives this side exclusive use
        // of the range until it publishes it, and a peer that writes it anyway only corrupts data the
        // receiver validates after copying it out.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.map.as_mut_ptr().add(off), src.len()) }
    }

    /// Copies region bytes at `off` into `dst` (private memory).
    pub fn read(&self, off: usize, dst: &mut [u8]) {
        assert!(off <= self.layout.region_bytes && dst.len() <= self.layout.region_bytes - off);
        // SAFETY: the source range is inside the mapping (checked above); see `write` for why raw
        // copies of bytes a misbehaving peer may be writing are acceptable: the copy is private and
        // is validated before use.
        unsafe { std::ptr::copy_nonoverlapping(self.map.as_mut_ptr().add(off), dst.as_mut_ptr(), dst.len()) }
    }
}
