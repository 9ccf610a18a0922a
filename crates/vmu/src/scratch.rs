//! The per-step scratch arena: a bump allocator over the scratch region, reset once per step.
//!
//! Activations of one forward pass live here and die with the step, so no free list is needed:
//! `alloc` moves a cursor, `reset` moves it back. Offsets returned are absolute offsets into the
//! VMU's region, ready for a [`djinn_backend::View`]. The arena is a plain value (no borrow of the
//! VMU), so a caller can hold it `&mut` next to `&Region` views (see [`crate::StepParts`]).

use crate::error::ScratchFull;

#[derive(Debug)]
pub struct ScratchArena {
    base: usize,
    capacity_bytes: usize,
    top: usize,
    peak_bytes: usize,
}

impl ScratchArena {
    pub(crate) fn new(base: usize, capacity_bytes: usize) -> Self {
        ScratchArena { base, capacity_bytes, top: 0, peak_bytes: 0 }
    }

    /// Reserves `bytes` at an offset (absolute, into the VMU region) that is a multiple of
    /// `align` (a power of two; the region base is 4096-aligned).
    pub fn alloc(&mut self, bytes: usize, align: usize) -> Result<usize, ScratchFull> {
        debug_assert!(align.is_power_of_two());
        let start = (self.base + self.top).next_multiple_of(align.max(1)) - self.base;
        let end = start.checked_add(bytes).filter(|&e| e <= self.capacity_bytes).ok_or(ScratchFull {
            requested_bytes: bytes,
            free_bytes: self.capacity_bytes.saturating_sub(start),
            capacity_bytes: self.capacity_bytes,
        })?;
        self.top = end;
        self.peak_bytes = self.peak_bytes.max(end);
        Ok(self.base + start)
    }

    /// Frees everything allocated since the last reset. The caller guarantees the device is done
    /// with the previous step's activations (work on the compute stream runs in order, so issuing
    /// the next step after this one is enough).
    pub fn reset(&mut self) {
        self.top = 0;
    }

    /// Absolute offset of the arena's first byte.
    pub fn base(&self) -> usize {
        self.base
    }
    pub fn capacity_bytes(&self) -> usize {
        self.capacity_bytes
    }
    pub fn used_bytes(&self) -> usize {
        self.top
    }
    /// High-water mark since creation: what `scratch_bytes` must be at least.
    pub fn peak_bytes(&self) -> usize {
        self.peak_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bump_align_full_reset() {
        let mut s = ScratchArena::new(4096, 1000);
        assert_eq!(s.alloc(10, 1).unwrap(), 4096);
        assert_eq!(s.alloc(10, 256).unwrap(), 4096 + 256);
        assert!(s.alloc(1000, 1).is_err());
        s.reset();
        assert_eq!(s.alloc(1000, 1).unwrap(), 4096);
        assert_eq!(s.peak_bytes(), 1000);
    }
}
