//! Host memory for the CPU backend: regions (the "device" memory of this backend) and page-locked
//! host buffers. Both are anonymous private mappings owned by an RAII guard.
//!
//! Invariants: a [`CpuRegion`] is page-aligned and exactly as long as requested (the mapping is
//! rounded up to whole pages); its bytes start zeroed (fresh anonymous pages, committed lazily on
//! first touch, so reserving a large region costs address space, not memory). Mappings of 2 MiB
//! and more ask for transparent huge pages (`MADV_HUGEPAGE`): first touch then commits 2 MiB at a
//! time, which is what makes receiving a 64 MiB tensor straight into a fresh region as fast as
//! into warm memory (measured: put+get ≈ a ping of the same size, versus 1.3–1.5× without).

use std::cell::Cell;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::backend::{HostBuf, RegionInfo};
use crate::error::{BackendError, Result};

pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if ps > 0 {
        ps as usize
    } else {
        4096
    }
}

/// Mappings at least this long are advised to use transparent huge pages (x86-64 and arm64 PMD
/// size with 4 KiB pages).
const HUGE_PAGE_BYTES: usize = 2 << 20;

/// One anonymous mapping, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    /// Mapped bytes (a whole number of pages; 0 for an empty request).
    map_len: usize,
}

impl Mapping {
    fn new(bytes: usize) -> Result<Mapping> {
        if bytes == 0 {
            let align = page_size();
            // A dangling, page-aligned pointer: no byte of it is ever accessed (every access is
            // bounds-checked against a length of 0).
            let ptr = NonNull::new(align as *mut u8).expect("page size is non-zero");
            return Ok(Mapping { ptr, map_len: 0 });
        }
        let ps = page_size();
        let map_len = bytes.checked_next_multiple_of(ps).ok_or(BackendError::OutOfMemory { bytes })?;
        // SAFETY: an anonymous private mapping at an address the kernel chooses touches no
        // existing memory; the result is checked against MAP_FAILED before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(BackendError::OutOfMemory { bytes });
        }
        let ptr = NonNull::new(p as *mut u8).ok_or(BackendError::OutOfMemory { bytes })?;
        if map_len >= HUGE_PAGE_BYTES {
            // Large regions (tensors, the VMU's pools) take transparent huge pages where the
            // kernel offers them on request: 512× fewer first-touch faults when a 64 MiB tensor is
            // received or computed into. Still committed lazily. Advice only: failure is harmless.
            // SAFETY: advises on a mapping this function just created; no memory is accessed.
            unsafe { libc::madvise(p, map_len, libc::MADV_HUGEPAGE) };
        }
        Ok(Mapping { ptr, map_len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.map_len > 0 {
            // SAFETY: `ptr`/`map_len` are exactly what mmap returned and nothing borrows the
            // mapping any more (its owner is being dropped).
            unsafe { libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.map_len) };
        }
    }
}

/// A reserved region of host memory, the CPU backend's device memory.
///
/// Ops write into it through `&CpuRegion` (interior mutability through a raw pointer, like an
/// `UnsafeCell<[u8]>`). That is why it is `Send` but not `Sync`: only the thread that holds the
/// region issues work on it, and the backend's own worker threads only touch the disjoint ranges
/// an op hands them while the issuing thread waits for the op to return.
pub struct CpuRegion {
    map: Mapping,
    len: usize,
    /// `Cell` makes the type `!Sync` without affecting `Send`.
    _not_sync: PhantomData<Cell<u8>>,
}

// SAFETY: the region exclusively owns its mapping; moving it to another thread moves that
// ownership. It is `!Sync` (see the type's doc), so no two threads access it through `&` at once.
unsafe impl Send for CpuRegion {}

impl CpuRegion {
    pub(crate) fn new(bytes: usize) -> Result<CpuRegion> {
        Ok(CpuRegion { map: Mapping::new(bytes)?, len: bytes, _not_sync: PhantomData })
    }

    /// Address of the first byte, for reading the region directly (benchmarks, debugging).
    /// Reading through it races with any op writing the region at the same time.
    pub fn as_ptr(&self) -> *const u8 {
        self.map.ptr.as_ptr()
    }

    /// `self[offset..offset + len]`, or `None` out of bounds.
    pub fn bytes_mut(&mut self, offset: usize, len: usize) -> Option<&mut [u8]> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        // SAFETY: `offset..end` lies inside the mapping, whose bytes are initialised (zeroed
        // pages or earlier writes) and live as long as `self`. `&mut self` excludes every other
        // access: ops reach the region only through `&CpuRegion`, which cannot coexist with it.
        Some(unsafe { std::slice::from_raw_parts_mut(self.base().add(offset), len) })
    }

    /// `self[offset..offset + len]`, or `None` out of bounds.
    ///
    /// # Safety
    /// While the returned slice lives, no op, `write` or `copy` may write any byte of that range
    /// (they write through `&CpuRegion`, which this shared borrow does not exclude).
    pub unsafe fn bytes(&self, offset: usize, len: usize) -> Option<&[u8]> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        // SAFETY: in bounds of a live mapping of initialised bytes (as in `bytes_mut`); the
        // caller guarantees no write to the range while the slice lives.
        Some(unsafe { std::slice::from_raw_parts(self.base().add(offset), len) })
    }

    /// Base address. Writing through it requires the bounds/overlap checks in `raw.rs`.
    pub(crate) fn base(&self) -> *mut u8 {
        self.map.ptr.as_ptr()
    }
}

impl RegionInfo for CpuRegion {
    fn len_bytes(&self) -> usize {
        self.len
    }
}

impl std::fmt::Debug for CpuRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuRegion").field("base", &self.map.ptr).field("len", &self.len).finish()
    }
}

static MLOCK_WARNED: AtomicBool = AtomicBool::new(false);

/// Page-locked host memory (best effort: `mlock` may be refused by `RLIMIT_MEMLOCK`, in which
/// case the buffer is ordinary pageable memory and a warning is logged once per process).
pub struct CpuHostBuf {
    map: Mapping,
    len: usize,
    locked: bool,
}

// SAFETY: the buffer exclusively owns its mapping; `&mut` access goes through `as_mut_slice`.
unsafe impl Send for CpuHostBuf {}
// SAFETY: shared access only hands out `&[u8]`; mutation needs `&mut self`.
unsafe impl Sync for CpuHostBuf {}

impl CpuHostBuf {
    pub(crate) fn new(bytes: usize) -> Result<CpuHostBuf> {
        let map = Mapping::new(bytes)?;
        let mut locked = false;
        if map.map_len > 0 {
            // SAFETY: locks pages of a mapping this function owns; no memory is accessed.
            let rc = unsafe { libc::mlock(map.ptr.as_ptr() as *const libc::c_void, map.map_len) };
            if rc == 0 {
                locked = true;
            } else if !MLOCK_WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    bytes,
                    error = %std::io::Error::last_os_error(),
                    "mlock refused (RLIMIT_MEMLOCK?): host buffers stay pageable"
                );
            }
        }
        Ok(CpuHostBuf { map, len: bytes, locked })
    }

    pub fn len_bytes(&self) -> usize {
        self.len
    }

    /// Whether `mlock` succeeded.
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    pub(crate) fn base(&self) -> *mut u8 {
        self.map.ptr.as_ptr()
    }
}

impl HostBuf for CpuHostBuf {
    fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is valid for `len` bytes (zero-initialised pages) for as long as
        // `self` lives; shared borrow of self forbids concurrent mutation.
        unsafe { std::slice::from_raw_parts(self.map.ptr.as_ptr(), self.len) }
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes this the only borrow.
        unsafe { std::slice::from_raw_parts_mut(self.map.ptr.as_ptr(), self.len) }
    }
}

impl Drop for CpuHostBuf {
    fn drop(&mut self) {
        if self.locked {
            // SAFETY: unlocks the range locked in `new`; the mapping is still alive.
            unsafe { libc::munlock(self.map.ptr.as_ptr() as *const libc::c_void, self.map.map_len) };
        }
    }
}
