//! A two-level segregated-fit (TLSF) allocator over offsets: the size classes and free lists
//! behind the weights/persistent region.
//!
//! It hands out byte offsets into a range it does not own (device memory it never touches), so
//! all bookkeeping lives in host-side arrays sized at start-up: `max_allocations` node slots,
//! never grown. Allocation and free are O(1): a size maps to a (first level = power of two,
//! second level = one of 16 linear steps) class, two bitmaps find the first non-empty class that
//! is large enough, and a free coalesces with its physical neighbours at once.
//!
//! Invariants: the nodes of the physical list tile `[0, capacity)` exactly in offset order; no
//! two free nodes are physically adjacent (free coalesces); every free node is in exactly the
//! free list of its class; every offset and size is a multiple of [`GRANULE_BYTES`].

use crate::error::AllocError;

/// Allocation granularity and minimum alignment (a GPU's widest vector access is 128 bytes; 256
/// keeps every tensor aligned for any kernel).
pub const GRANULE_BYTES: usize = 256;

const SL_BITS: u32 = 4;
const SL_COUNT: usize = 1 << SL_BITS;
/// First-level classes: sizes up to 2^(FL_COUNT + SL_BITS - 1) granules (2^59 bytes): any region.
const FL_COUNT: usize = 48;
const NIL: u32 = u32::MAX;

#[derive(Clone, Copy, Debug)]
struct Node {
    /// In granules.
    offset: u64,
    /// In granules.
    size: u64,
    prev_phys: u32,
    next_phys: u32,
    prev_free: u32,
    next_free: u32,
    free: bool,
    /// Slot holds a live node (free or allocated), as opposed to an unused bookkeeping slot.
    live: bool,
}

const EMPTY: Node = Node {
    offset: 0,
    size: 0,
    prev_phys: NIL,
    next_phys: NIL,
    prev_free: NIL,
    next_free: NIL,
    free: false,
    live: false,
};

/// One live allocation. Not `Clone`: freeing consumes it, so a double free does not compile.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "an Allocation leaks its range unless passed to free()"]
pub struct Allocation {
    offset: usize,
    size_bytes: usize,
    node: u32,
}

impl Allocation {
    /// Byte offset from the start of the managed range (add the region base yourself).
    pub fn offset(&self) -> usize {
        self.offset
    }
    /// Bytes usable (the request rounded up to [`GRANULE_BYTES`]).
    pub fn size_bytes(&self) -> usize {
        self.size_bytes
    }
}

/// TLSF allocator over `[0, capacity_bytes)`.
pub struct OffsetAllocator {
    nodes: Vec<Node>,
    /// Unused node slots (a stack).
    spare: Vec<u32>,
    heads: [[u32; SL_COUNT]; FL_COUNT],
    fl_bitmap: u64,
    sl_bitmap: [u32; FL_COUNT],
    capacity_bytes: usize,
    used_bytes: usize,
    live_allocations: usize,
    max_allocations: usize,
}

impl std::fmt::Debug for OffsetAllocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OffsetAllocator")
            .field("capacity_bytes", &self.capacity_bytes)
            .field("used_bytes", &self.used_bytes)
            .field("live_allocations", &self.live_allocations)
            .finish()
    }
}

/// Class of a free block of `size` granules (its size lies in the class's range).
fn mapping_insert(size: u64) -> (usize, usize) {
    debug_assert!(size > 0);
    if size < SL_COUNT as u64 {
        (0, size as usize)
    } else {
        let log2 = 63 - size.leading_zeros();
        let fl = (log2 - SL_BITS + 1) as usize;
        let sl = ((size >> (log2 - SL_BITS)) as usize) ^ SL_COUNT;
        (fl, sl)
    }
}

/// First class whose every block holds `size` granules (rounds `size` up to the class start).
fn mapping_search(size: u64) -> (usize, usize) {
    if size < SL_COUNT as u64 {
        (0, size as usize)
    } else {
        let log2 = 63 - size.leading_zeros();
        let rounded = size + (1u64 << (log2 - SL_BITS)) - 1;
        mapping_insert(rounded)
    }
}

impl OffsetAllocator {
    /// Manages `[0, capacity_bytes)` (rounded down to the granule) with room for
    /// `max_allocations` live allocations. The only allocation this allocator ever makes.
    pub fn new(capacity_bytes: usize, max_allocations: usize) -> Self {
        let granules = (capacity_bytes / GRANULE_BYTES) as u64;
        // Each live allocation can split off at most one free node on each side.
        let slots = (2 * max_allocations + 2).min(NIL as usize - 1);
        let mut a = OffsetAllocator {
            nodes: vec![EMPTY; slots],
            spare: (0..slots as u32).rev().collect(),
            heads: [[NIL; SL_COUNT]; FL_COUNT],
            fl_bitmap: 0,
            sl_bitmap: [0; FL_COUNT],
            capacity_bytes: granules as usize * GRANULE_BYTES,
            used_bytes: 0,
            live_allocations: 0,
            max_allocations,
        };
        if granules > 0 {
            let n = a.spare.pop().expect("at least two slots");
            a.nodes[n as usize] = Node { offset: 0, size: granules, free: true, live: true, ..EMPTY };
            a.insert_free(n);
        }
        a
    }

    pub fn capacity_bytes(&self) -> usize {
        self.capacity_bytes
    }
    pub fn used_bytes(&self) -> usize {
        self.used_bytes
    }
    pub fn free_bytes(&self) -> usize {
        self.capacity_bytes - self.used_bytes
    }
    pub fn live_allocations(&self) -> usize {
        self.live_allocations
    }

    /// Largest single allocation that would succeed now (O(length of one free list)).
    pub fn largest_free_bytes(&self) -> usize {
        if self.fl_bitmap == 0 {
            return 0;
        }
        let fl = 63 - self.fl_bitmap.leading_zeros() as usize;
        let sl = 31 - self.sl_bitmap[fl].leading_zeros() as usize;
        let mut best = 0;
        let mut n = self.heads[fl][sl];
        while n != NIL {
            best = best.max(self.nodes[n as usize].size);
            n = self.nodes[n as usize].next_free;
        }
        best as usize * GRANULE_BYTES
    }

    /// `1 - largest_free / free`: 0 when all free space is one range, near 1 when it is dust.
    pub fn fragmentation(&self) -> f64 {
        let free = self.free_bytes();
        if free == 0 {
            0.0
        } else {
            1.0 - self.largest_free_bytes() as f64 / free as f64
        }
    }

    /// Allocates `bytes` (rounded up to the granule) at an offset that is a multiple of `align`
    /// (a power of two; anything up to [`GRANULE_BYTES`] is free).
    pub fn alloc(&mut self, bytes: usize, align: usize) -> Result<Allocation, AllocError> {
        if bytes == 0 || !align.is_power_of_two() {
            return Err(AllocError::Invalid);
        }
        let size = bytes.div_ceil(GRANULE_BYTES) as u64;
        let align_g = (align / GRANULE_BYTES).max(1) as u64;
        // Need up to two spare slots (front gap, tail remainder); the pool is sized for that.
        if self.live_allocations >= self.max_allocations || self.spare.len() < 2 {
            return Err(AllocError::TooManyAllocations);
        }
        let search = size + align_g - 1;
        let (fl, sl) = mapping_search(search);
        let n = match self.find_suitable(fl, sl) {
            Some(n) => n,
            // Class rounding skips blocks of the request's own class that may still fit: look
            // there before failing (only on the near-full path).
            None => self.first_fit_in_class(search).ok_or(AllocError::OutOfMemory)?,
        };
        self.remove_free(n);
        let node = self.nodes[n as usize];
        let aligned = node.offset.next_multiple_of(align_g);
        let gap = aligned - node.offset;
        let mut n = n;
        if gap > 0 {
            // Split the front gap off as its own free node; `n` becomes the aligned remainder.
            let rest = self.split(n, gap);
            self.nodes[n as usize].free = true;
            self.insert_free(n);
            n = rest;
        }
        if self.nodes[n as usize].size > size {
            let tail = self.split(n, size);
            self.nodes[tail as usize].free = true;
            self.insert_free(tail);
        }
        let node = &mut self.nodes[n as usize];
        node.free = false;
        let a = Allocation {
            offset: node.offset as usize * GRANULE_BYTES,
            size_bytes: node.size as usize * GRANULE_BYTES,
            node: n,
        };
        self.used_bytes += a.size_bytes;
        self.live_allocations += 1;
        Ok(a)
    }

    /// Returns `a` to the free lists, coalescing with free neighbours.
    pub fn free(&mut self, a: Allocation) {
        let n = a.node;
        {
            let node = &self.nodes[n as usize];
            assert!(
                node.live && !node.free && node.offset as usize * GRANULE_BYTES == a.offset,
                "OffsetAllocator::free: allocation does not belong to this allocator"
            );
        }
        self.used_bytes -= a.size_bytes;
        self.live_allocations -= 1;
        let mut n = n;
        let prev = self.nodes[n as usize].prev_phys;
        if prev != NIL && self.nodes[prev as usize].free {
            self.remove_free(prev);
            self.merge_into_prev(prev, n);
            n = prev;
        }
        let next = self.nodes[n as usize].next_phys;
        if next != NIL && self.nodes[next as usize].free {
            self.remove_free(next);
            self.merge_into_prev(n, next);
        }
        self.nodes[n as usize].free = true;
        self.insert_free(n);
    }

    /// Splits node `n` after `first` granules; returns the new node holding the remainder.
    fn split(&mut self, n: u32, first: u64) -> u32 {
        let m = self.spare.pop().expect("spare slots checked before splitting");
        let node = self.nodes[n as usize];
        debug_assert!(first < node.size);
        self.nodes[m as usize] = Node {
            offset: node.offset + first,
            size: node.size - first,
            prev_phys: n,
            next_phys: node.next_phys,
            free: false,
            live: true,
            ..EMPTY
        };
        if node.next_phys != NIL {
            self.nodes[node.next_phys as usize].prev_phys = m;
        }
        let node = &mut self.nodes[n as usize];
        node.size = first;
        node.next_phys = m;
        m
    }

    /// Absorbs physical successor `next` into `prev` and recycles `next`'s slot.
    fn merge_into_prev(&mut self, prev: u32, next: u32) {
        let nx = self.nodes[next as usize];
        debug_assert_eq!(self.nodes[prev as usize].next_phys, next);
        self.nodes[prev as usize].size += nx.size;
        self.nodes[prev as usize].next_phys = nx.next_phys;
        if nx.next_phys != NIL {
            self.nodes[nx.next_phys as usize].prev_phys = prev;
        }
        self.nodes[next as usize] = EMPTY;
        self.spare.push(next);
    }

    fn find_suitable(&self, fl: usize, sl: usize) -> Option<u32> {
        if fl >= FL_COUNT {
            return None;
        }
        let sl_map = self.sl_bitmap[fl] & (!0u32).checked_shl(sl as u32).unwrap_or(0);
        let (fl, sl) = if sl_map != 0 {
            (fl, sl_map.trailing_zeros() as usize)
        } else {
            let fl_map = self.fl_bitmap & (!0u64).checked_shl(fl as u32 + 1).unwrap_or(0);
            if fl_map == 0 {
                return None;
            }
            let fl = fl_map.trailing_zeros() as usize;
            (fl, self.sl_bitmap[fl].trailing_zeros() as usize)
        };
        let head = self.heads[fl][sl];
        debug_assert_ne!(head, NIL);
        Some(head)
    }

    fn first_fit_in_class(&self, size: u64) -> Option<u32> {
        let (fl, sl) = mapping_insert(size);
        let mut n = self.heads[fl][sl];
        while n != NIL && self.nodes[n as usize].size < size {
            n = self.nodes[n as usize].next_free;
        }
        (n != NIL).then_some(n)
    }

    fn insert_free(&mut self, n: u32) {
        let (fl, sl) = mapping_insert(self.nodes[n as usize].size);
        let head = self.heads[fl][sl];
        self.nodes[n as usize].prev_free = NIL;
        self.nodes[n as usize].next_free = head;
        if head != NIL {
            self.nodes[head as usize].prev_free = n;
        }
        self.heads[fl][sl] = n;
        self.fl_bitmap |= 1 << fl;
        self.sl_bitmap[fl] |= 1 << sl;
    }

    fn remove_free(&mut self, n: u32) {
        let node = self.nodes[n as usize];
        if node.prev_free != NIL {
            self.nodes[node.prev_free as usize].next_free = node.next_free;
        } else {
            let (fl, sl) = mapping_insert(node.size);
            self.heads[fl][sl] = node.next_free;
            if node.next_free == NIL {
                self.sl_bitmap[fl] &= !(1 << sl);
                if self.sl_bitmap[fl] == 0 {
                    self.fl_bitmap &= !(1 << fl);
                }
            }
        }
        if node.next_free != NIL {
            self.nodes[node.next_free as usize].prev_free = node.prev_free;
        }
        self.nodes[n as usize].prev_free = NIL;
        self.nodes[n as usize].next_free = NIL;
    }

    /// Checks every invariant in the module doc (tests; O(nodes)).
    pub fn check_invariants(&self) {
        let mut free_in_lists = 0usize;
        for fl in 0..FL_COUNT {
            for sl in 0..SL_COUNT {
                let mut n = self.heads[fl][sl];
                assert_eq!(n != NIL, self.sl_bitmap[fl] & (1 << sl) != 0, "bitmap out of sync at ({fl},{sl})");
                while n != NIL {
                    let node = self.nodes[n as usize];
                    assert!(node.live && node.free);
                    assert_eq!(mapping_insert(node.size), (fl, sl));
                    free_in_lists += 1;
                    n = node.next_free;
                }
            }
            assert_eq!(self.sl_bitmap[fl] != 0, self.fl_bitmap & (1 << fl) != 0);
        }
        // Walk the physical list from the node at offset 0.
        let Some(first) = self.nodes.iter().position(|n| n.live && n.offset == 0) else {
            assert_eq!(self.capacity_bytes, 0);
            return;
        };
        let (mut n, mut end, mut free_nodes, mut used, mut allocs) = (first as u32, 0u64, 0usize, 0u64, 0usize);
        let mut prev = NIL;
        while n != NIL {
            let node = self.nodes[n as usize];
            assert!(node.live);
            assert_eq!(node.prev_phys, prev);
            assert_eq!(node.offset, end, "physical list has a gap or overlap");
            if node.free {
                free_nodes += 1;
                assert!(prev == NIL || !self.nodes[prev as usize].free, "adjacent free nodes not coalesced");
            } else {
                used += node.size;
                allocs += 1;
            }
            end += node.size;
            prev = n;
            n = node.next_phys;
        }
        assert_eq!(end as usize * GRANULE_BYTES, self.capacity_bytes);
        assert_eq!(free_nodes, free_in_lists);
        assert_eq!(used as usize * GRANULE_BYTES, self.used_bytes);
        assert_eq!(allocs, self.live_allocations);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_free_coalesces_back_to_one_range() {
        let mut a = OffsetAllocator::new(1 << 20, 64);
        let x = a.alloc(1000, 1).unwrap();
        let y = a.alloc(5000, 4096).unwrap();
        let z = a.alloc(256, 256).unwrap();
        assert_eq!(y.offset() % 4096, 0);
        a.check_invariants();
        a.free(y);
        a.free(x);
        a.check_invariants();
        a.free(z);
        a.check_invariants();
        assert_eq!(a.largest_free_bytes(), 1 << 20);
        assert_eq!(a.fragmentation(), 0.0);
    }

    #[test]
    fn exhaustion_is_an_error() {
        let mut a = OffsetAllocator::new(4096, 64);
        let x = a.alloc(4096, 1).unwrap();
        assert_eq!(a.alloc(1, 1), Err(AllocError::OutOfMemory));
        a.free(x);
        let mut b = OffsetAllocator::new(1 << 20, 1);
        let _y = b.alloc(256, 1).unwrap();
        let _z = b.alloc(256, 1).unwrap_err();
        assert_eq!(a.alloc(0, 1), Err(AllocError::Invalid));
        assert_eq!(a.alloc(1, 3), Err(AllocError::Invalid));
    }

    proptest::proptest! {
        #[test]
        fn random_alloc_free_never_overlaps(ops in proptest::collection::vec((0usize..70_000, 0u32..14, proptest::bool::ANY), 1..300)) {
            let mut a = OffsetAllocator::new(4 << 20, 256);
            let mut live: Vec<Allocation> = Vec::new();
            for (bytes, align_log2, free) in ops {
                if free && !live.is_empty() {
                    let i = bytes % live.len();
                    a.free(live.swap_remove(i));
                } else if let Ok(x) = a.alloc(bytes.max(1), 1 << align_log2) {
                    proptest::prop_assert_eq!(x.offset() % (1usize << align_log2), 0);
                    proptest::prop_assert!(x.size_bytes() >= bytes.max(1));
                    for y in &live {
                        proptest::prop_assert!(x.offset() + x.size_bytes() <= y.offset() || y.offset() + y.size_bytes() <= x.offset());
                    }
                    live.push(x);
                }
                a.check_invariants();
            }
            for x in live.drain(..) {
                a.free(x);
            }
            a.check_invariants();
            proptest::prop_assert_eq!(a.used_bytes(), 0);
            proptest::prop_assert_eq!(a.largest_free_bytes(), 4 << 20);
        }
    }
}
