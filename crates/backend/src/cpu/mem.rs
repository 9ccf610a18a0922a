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

/// Page-locked host memory, as much as `RLIMIT_MEMLOCK` allows: pages are locked as they are
/// first touched (`MLOCK_ONFAULT`), so a large buffer (the VMU's host swap pool) costs memory
/// only as it fills, and locking it commits nothing. Where the limit is below the buffer, a
/// prefix as long as the limit leaves is locked and the rest stays ordinary pageable memory; a
/// warning says so once per process (raise `LimitMEMLOCK` / `ulimit -l` to lock it all).
pub struct CpuHostBuf {
    map: Mapping,
    len: usize,
    locked_bytes: usize,
}

// SAFETY: the buffer exclusively owns its mapping; `&mut` access goes through `as_mut_slice`.
unsafe impl Send for CpuHostBuf {}
// SAFETY: shared access only hands out `&[u8]`; mutation needs `&mut self`.
unsafe impl Sync for CpuHostBuf {}

/// Locks the first `len` bytes of `map` (on fault where the kernel can); whether it did.
fn lock_prefix(map: &Mapping, len: usize) -> bool {
    let p = map.ptr.as_ptr() as *const libc::c_void;
    // SAFETY: locks pages of a mapping the caller owns (`len <= map_len`); no memory is accessed.
    let rc = unsafe { libc::mlock2(p, len, libc::MLOCK_ONFAULT) };
    if rc == 0 {
        return true;
    }
    let e = std::io::Error::last_os_error().raw_os_error();
    // Kernels before 4.4 have no mlock2: lock (and commit) the pages now.
    // SAFETY: as above.
    (e == Some(libc::ENOSYS) || e == Some(libc::EINVAL)) && unsafe { libc::mlock(p, len) } == 0
}

/// `RLIMIT_MEMLOCK`'s soft limit in bytes (`None` = unlimited or unreadable).
fn memlock_limit_bytes() -> Option<usize> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one `rlimit` into the struct it is given.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) };
    (rc == 0 && r.rlim_cur != libc::RLIM_INFINITY).then(|| usize::try_from(r.rlim_cur).unwrap_or(usize::MAX))
}

/// Bytes this process has locked already (`VmLck` of /proc/self/status; 0 if unreadable).
fn locked_now_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status.lines().find_map(|l| l.strip_prefix("VmLck:")).and_then(|v| v.trim().strip_suffix("kB"));
    kib.and_then(|v| v.trim().parse::<usize>().ok()).map_or(0, |k| k * 1024)
}

impl CpuHostBuf {
    pub(crate) fn new(bytes: usize) -> Result<CpuHostBuf> {
        let map = Mapping::new(bytes)?;
        let mut locked_bytes = 0;
        if map.map_len > 0 {
            if lock_prefix(&map, map.map_len) {
                locked_bytes = bytes;
            } else {
                let error = std::io::Error::last_os_error();
                // Size the lock to what the limit leaves (root with CAP_IPC_LOCK never gets here).
                let limit = memlock_limit_bytes();
                let room = limit.map_or(0, |l| l.saturating_sub(locked_now_bytes()));
                let part = (room - room % page_size()).min(map.map_len);
                if part > 0 && lock_prefix(&map, part) {
                    locked_bytes = part.min(bytes);
                }
                if !MLOCK_WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        bytes,
                        locked_bytes,
                        memlock_limit_bytes = limit,
                        %error,
                        "mlock of a {bytes}-byte host buffer refused by RLIMIT_MEMLOCK: {locked_bytes} bytes locked, \
                         the rest stays pageable (raise LimitMEMLOCK / ulimit -l to lock it all)"
                    );
                }
            }
        }
        Ok(CpuHostBuf { map, len: bytes, locked_bytes })
    }

    pub fn len_bytes(&self) -> usize {
        self.len
    }

    /// Whether all of the buffer is locked.
    pub fn is_locked(&self) -> bool {
        self.locked_bytes == self.len
    }

    /// Bytes locked (a prefix of the buffer; all of it unless `RLIMIT_MEMLOCK` is lower).
    pub fn locked_bytes(&self) -> usize {
        self.locked_bytes
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
        if self.locked_bytes > 0 {
            // SAFETY: unlocks the range locked in `new`; the mapping is still alive.
            unsafe { libc::munlock(self.map.ptr.as_ptr() as *const libc::c_void, self.map.map_len) };
        }
    }
}
