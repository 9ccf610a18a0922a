//! A client connection's bounded cache of registered [`crate::RegBuf`]s: a put or get from the
//! same buffer registers it once, not per transfer.
//!
//! Invariants:
//! - Keyed by the buffer's allocation (its id), never by a bare address: an entry holds an `Arc`
//!   of the allocation, so the pages under a cached registration cannot be freed or remapped while
//!   it lives. Address lookups ([`RegCache::find`]) only search the live entries' ranges.
//! - At most `rdma_reg_cache_entries_max` entries and `rdma_reg_cache_bytes_max` bytes; making
//!   room evicts the least recently used entry. Eviction drops the cache's handle; the
//!   registration is deregistered (RAII, [`CachedMr`]) when the last transfer using it is done,
//!   and only then is the allocation released.
//! - Client side only (a connection whose device context is its own): a cached registration
//!   allows remote write, and its key is valid on every QP of its protection domain. A client's
//!   PD serves its one connection, so only that connection's server can use the key; a server's
//!   PD is shared by all its clients, so servers never cache (they grant per transfer).

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::verbs::{ibv_access_flags, Device};
use crate::regbuf::RegMem;
use crate::{PinnedHost, RegCacheStats, Registration, TransportOptions};

/// One cached registration. Dropping it deregisters, then releases its hold on the allocation.
pub(crate) struct CachedMr {
    mr: NonNull<rdma_sys::ibv_mr>,
    deregistered: Arc<AtomicU64>,
    _mem: Arc<RegMem>,
    _dev: Arc<Device>,
}

// SAFETY: an owned registration of an allocation it holds; verbs objects are thread-safe.
unsafe impl Send for CachedMr {}
// SAFETY: as above; only the keys are read through `&self`.
unsafe impl Sync for CachedMr {}

impl CachedMr {
    pub(crate) fn lkey(&self) -> u32 {
        // SAFETY: registered for self's life.
        unsafe { self.mr.as_ref().lkey }
    }
    pub(crate) fn rkey(&self) -> u32 {
        // SAFETY: as above.
        unsafe { self.mr.as_ref().rkey }
    }
}

impl Drop for CachedMr {
    fn drop(&mut self) {
        // SAFETY: nobody holds the keys any more (transfers hold this value while they use them);
        // the allocation (`_mem`) and the PD (`_dev`) are dropped only after this.
        if unsafe { rdma_sys::ibv_dereg_mr(self.mr.as_ptr()) } == 0 {
            self.deregistered.fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct Entry {
    id: u64,
    start: u64,
    end: u64,
    /// Tick of the last use (registration, hit or transfer).
    used: u64,
    mr: Arc<CachedMr>,
}

#[derive(Default)]
struct Inner {
    tick: u64,
    bytes: u64,
    /// At most `entries_max` (a handful): scanned linearly.
    entries: Vec<Entry>,
}

pub(crate) struct RegCache {
    entries_max: usize,
    bytes_max: u64,
    inner: Mutex<Inner>,
    registered_total: AtomicU64,
    deregistered_total: Arc<AtomicU64>,
}

impl RegCache {
    pub(crate) fn new(opts: &TransportOptions) -> RegCache {
        RegCache {
            entries_max: opts.rdma_reg_cache_entries_max,
            bytes_max: opts.rdma_reg_cache_bytes_max,
            inner: Mutex::new(Inner {
                entries: Vec::with_capacity(opts.rdma_reg_cache_entries_max),
                ..Inner::default()
            }),
            registered_total: AtomicU64::new(0),
            deregistered_total: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Registers `mem` unless it is cached, evicting least recently used entries to make room.
    pub(crate) fn register(&self, dev: &Arc<Device>, mem: &Arc<RegMem>) -> io::Result<Registration> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.tick += 1;
        let tick = g.tick;
        if let Some(e) = g.entries.iter_mut().find(|e| e.id == mem.id()) {
            e.used = tick;
            return Ok(Registration::Cached);
        }
        let len = mem.len_bytes() as u64;
        if self.entries_max == 0 || len > self.bytes_max {
            return Ok(Registration::TooLarge);
        }
        while g.entries.len() >= self.entries_max || g.bytes + len > self.bytes_max {
            let lru = (0..g.entries.len()).min_by_key(|&i| g.entries[i].used).expect("over a bound, so not empty");
            let e = g.entries.swap_remove(lru);
            g.bytes -= e.end - e.start;
            tracing::debug!(id = e.id, bytes = e.end - e.start, "rdma: registration cache evicts a buffer");
        }
        let access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE;
        // SAFETY: `mem` is one allocation at a fixed address that lives as long as the entry
        // (`CachedMr` holds it and deregisters before releasing it).
        let mr = unsafe { rdma_sys::ibv_reg_mr(dev.pd_raw(), mem.ptr().cast(), mem.len_bytes(), access.0 as i32) };
        let mr = NonNull::new(mr).ok_or_else(|| {
            let e = io::Error::last_os_error();
            io::Error::new(e.kind(), format!("ibv_reg_mr (registered buffer of {len} bytes): {e}"))
        })?;
        let start = mem.ptr() as u64;
        let mr = Arc::new(CachedMr {
            mr,
            deregistered: self.deregistered_total.clone(),
            _mem: mem.clone(),
            _dev: dev.clone(),
        });
        g.entries.push(Entry { id: mem.id(), start, end: start + len, used: tick, mr });
        g.bytes += len;
        self.registered_total.fetch_add(1, Ordering::Relaxed);
        Ok(Registration::Registered)
    }

    /// The cached registration covering `addr` and how many bytes of `addr..+len` it covers.
    /// The caller holds the returned `Arc` until the NIC is done with the range.
    pub(crate) fn find(&self, addr: u64, len: u64) -> Option<(Arc<CachedMr>, u64)> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.tick += 1;
        let tick = g.tick;
        let e = g.entries.iter_mut().find(|e| e.start <= addr && addr < e.end)?;
        e.used = tick;
        Some((e.mr.clone(), len.min(e.end - addr)))
    }

    pub(crate) fn stats(&self) -> RegCacheStats {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        RegCacheStats {
            entries: g.entries.len(),
            bytes: g.bytes,
            registered_total: self.registered_total.load(Ordering::Relaxed),
            deregistered_total: self.deregistered_total.load(Ordering::Relaxed),
        }
    }
}
