//! [`RegBuf`]: a buffer the client owns for bulk data it sends or receives again and again (a
//! tensor it puts and gets). A connection may register it once ([`crate::FrameTx::register_buffer`])
//! and keep the registration in a bounded cache; transfers from or into it then register nothing.
//!
//! Why a type and not any slice: a registration pins the pages under an address range. A cache
//! keyed by raw address goes stale when that memory is freed and the address reused (the NIC
//! would still read and write the old pages). A cache entry here holds its buffer's allocation
//! (an `Arc` of it), so the memory under a cached registration cannot be freed or remapped
//! while the entry lives; the entry is keyed by the buffer's id, unique per allocation.
//!
//! Invariants: one page-aligned, zero-filled allocation of a fixed length per buffer, never moved
//! or resized; freed only when the buffer and every cache entry holding it are gone (the
//! registration is dropped, deregistering it, before the allocation).

use std::alloc::Layout;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::{PinnedHost, TransportError};

/// Alignment of a buffer's allocation (a page: registration pins whole pages anyway).
const REGBUF_ALIGN: usize = 4096;

/// Ids for [`RegBuf`]s, unique for the process's life.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// One allocation shared by a [`RegBuf`] and the registrations of it a connection caches.
pub struct RegMem {
    ptr: NonNull<u8>,
    len: usize,
    id: u64,
}

// SAFETY: the allocation is owned; its bytes are reached only through the `RegBuf` (borrow rules)
// and by the NIC during transfers the `RegBuf`'s borrows cover.
unsafe impl Send for RegMem {}
// SAFETY: as above; `RegMem` itself exposes no access to the bytes.
unsafe impl Sync for RegMem {}

// SAFETY: one allocation at a fixed address, freed only when the last `Arc<RegMem>` drops (a
// registration keeps one beside it).
unsafe impl PinnedHost for RegMem {
    fn ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    fn len_bytes(&self) -> usize {
        self.len
    }
}

impl RegMem {
    /// The id a connection's registration cache keys this allocation by.
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for RegMem {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len, REGBUF_ALIGN).expect("checked at allocation");
        // SAFETY: allocated in `RegBuf::new` with this layout; nothing refers to it any more
        // (every registration holding it was dropped first).
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) };
    }
}

/// A client-owned buffer for bulk data (see the module doc). Derefs to its bytes.
pub struct RegBuf {
    mem: Arc<RegMem>,
}

impl RegBuf {
    /// Allocates `len` zeroed bytes (`len > 0`).
    pub fn new(len: usize) -> Result<RegBuf, TransportError> {
        let layout = Layout::from_size_align(len, REGBUF_ALIGN)
            .ok()
            .filter(|_| len > 0)
            .ok_or_else(|| TransportError::Other(format!("a registered buffer of {len} bytes cannot be allocated")))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })
            .ok_or_else(|| TransportError::Other(format!("out of memory allocating a {len}-byte buffer")))?;
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        Ok(RegBuf { mem: Arc::new(RegMem { ptr, len, id }) })
    }

    /// The allocation, for a transport's registration cache.
    pub fn mem(&self) -> &Arc<RegMem> {
        &self.mem
    }
}

impl std::ops::Deref for RegBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `len` initialised (zeroed) bytes owned by the allocation; shared borrow of self.
        unsafe { std::slice::from_raw_parts(self.mem.ptr.as_ptr(), self.mem.len) }
    }
}

impl std::ops::DerefMut for RegBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above; the `&mut self` borrow makes the slice exclusive on our side (a cache
        // entry holds the allocation, never its bytes).
        unsafe { std::slice::from_raw_parts_mut(self.mem.ptr.as_ptr(), self.mem.len) }
    }
}

impl std::fmt::Debug for RegBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegBuf").field("id", &self.mem.id).field("len", &self.mem.len).finish()
    }
}
