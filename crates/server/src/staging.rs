//! The staging pool: host memory for bulk data that cannot land in its destination as it arrives
//! (a ping's echo; gets and puts of device memory without GPUDirect).
//!
//! Invariants:
//! - One allocation of `staging_pool_bytes`, made at start-up and cut into [`CHUNK_BYTES`]
//!   chunks; nothing grows at run time. The allocation is zero-filled lazily by the kernel, so
//!   its pages are committed only as data is written into them.
//! - A chunk is taken only when the data that fills it is about to be received (or read from the
//!   device): a header that announces data and sends none holds at most one chunk, and only until
//!   `frame_data_timeout_ms` closes its connection.
//! - Every chunk is held by exactly one [`Lease`] (its index is in no free list meanwhile), which
//!   is what makes handing out `&mut [u8]` into the shared allocation sound.
//! - What one connection and one tenant hold is bounded (`staging_bytes_max_per_conn`,
//!   `staging_bytes_max_per_tenant`); a take past a bound or from an empty pool is an error, never
//!   a wait.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::auth::TenantId;

/// Bytes of one chunk: the piece bulk data moves in.
pub const CHUNK_BYTES: usize = 1 << 20;

/// Why a take failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StagingError {
    #[error("the server's staging pool is in use by other requests; retry shortly")]
    PoolEmpty,
    #[error("this connection may hold {max} staging bytes at once (staging_bytes_max_per_conn)")]
    ConnBudget { max: u64 },
    #[error("this tenant's connections may hold {max} staging bytes at once (staging_bytes_max_per_tenant)")]
    TenantBudget { max: u64 },
}

impl StagingError {
    pub fn status(self) -> djinn_proto::Status {
        match self {
            StagingError::PoolEmpty => djinn_proto::Status::Busy,
            StagingError::ConnBudget { .. } | StagingError::TenantBudget { .. } => djinn_proto::Status::LimitExceeded,
        }
    }
}

/// The pool shared by every connection.
pub struct StagingPool {
    /// Base of the allocation (`chunks × CHUNK_BYTES` bytes), owned by `_mem`.
    base: *mut u8,
    _mem: Box<[u8]>,
    free: Mutex<Vec<u32>>,
    conn_max: u64,
    tenant_max: u64,
    /// Bytes each tenant's connections hold (an entry lives while any of its connections does).
    tenants: Mutex<HashMap<TenantId, Arc<AtomicU64>>>,
}

// SAFETY: `base` points into `_mem`, which lives as long as the pool; the bytes behind it are only
// reached through chunks, each held by one `Lease` at a time (the free list hands an index out
// once), so threads never share a chunk's bytes.
unsafe impl Send for StagingPool {}
// SAFETY: as above; the free list and tenant table are behind mutexes.
unsafe impl Sync for StagingPool {}

// SAFETY: `base..+_mem.len()` is one boxed allocation owned by the pool, never moved or freed
// while the pool lives; transports that register it keep an `Arc` of the pool.
unsafe impl djinn_transport::PinnedHost for StagingPool {
    fn ptr(&self) -> *mut u8 {
        self.base
    }
    fn len_bytes(&self) -> usize {
        self._mem.len()
    }
}

impl StagingPool {
    /// Allocates the pool: `pool_bytes` rounded down to whole chunks (at least one).
    pub fn new(pool_bytes: u64, conn_max: u64, tenant_max: u64) -> Self {
        let chunks = usize::try_from(pool_bytes / CHUNK_BYTES as u64).unwrap_or(usize::MAX).clamp(1, u32::MAX as usize);
        // vec![0; n] is calloc: the kernel's zero pages, committed only when written.
        let mut mem = vec![0u8; chunks * CHUNK_BYTES].into_boxed_slice();
        let base = mem.as_mut_ptr();
        StagingPool {
            base,
            _mem: mem,
            free: Mutex::new((0..chunks as u32).rev().collect()),
            conn_max,
            tenant_max,
            tenants: Mutex::new(HashMap::new()),
        }
    }

    /// Chunks not held by anyone.
    pub fn free_chunks(&self) -> usize {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// A lease for one connection of `tenant`, holding nothing yet.
    pub fn lease(self: &Arc<Self>, tenant: &TenantId) -> Lease {
        let held = self
            .tenants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(tenant.clone())
            .or_insert_with(|| Arc::new(AtomicU64::new(0)))
            .clone();
        let most = (self.conn_max / CHUNK_BYTES as u64 + 1) as usize;
        Lease { pool: self.clone(), tenant: tenant.clone(), tenant_held: held, chunks: Vec::with_capacity(most) }
    }
}

/// What one connection holds of the pool. Dropping it gives everything back.
pub struct Lease {
    pool: Arc<StagingPool>,
    tenant: TenantId,
    tenant_held: Arc<AtomicU64>,
    chunks: Vec<u32>,
}

impl Lease {
    fn held_bytes(&self) -> u64 {
        (self.chunks.len() * CHUNK_BYTES) as u64
    }

    /// Takes one more chunk (within both budgets) and returns it for writing.
    pub fn take(&mut self) -> Result<&mut [u8], StagingError> {
        let pool = &*self.pool;
        let bytes = CHUNK_BYTES as u64;
        if self.held_bytes() + bytes > pool.conn_max.max(bytes) {
            return Err(StagingError::ConnBudget { max: pool.conn_max });
        }
        let max = pool.tenant_max.max(bytes);
        self.tenant_held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| t.checked_add(bytes).filter(|&n| n <= max))
            .map_err(|_| StagingError::TenantBudget { max: pool.tenant_max })?;
        let Some(i) = pool.free.lock().unwrap_or_else(|p| p.into_inner()).pop() else {
            self.tenant_held.fetch_sub(bytes, Ordering::AcqRel);
            return Err(StagingError::PoolEmpty);
        };
        self.chunks.push(i);
        let k = self.chunks.len() - 1;
        Ok(self.chunk_mut(k))
    }

    fn chunk_mut(&mut self, k: usize) -> &mut [u8] {
        let i = self.chunks[k] as usize;
        // SAFETY: chunk `i` is inside the allocation (indices come from the pool's own free list)
        // and held by this lease alone; the `&mut self` borrow makes the slice exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.pool.base.add(i * CHUNK_BYTES), CHUNK_BYTES) }
    }

    /// The first `n` bytes held, as one slice per chunk (for a vectored send).
    pub fn slices(&self, n: usize) -> Vec<&[u8]> {
        let mut out = Vec::with_capacity(n.div_ceil(CHUNK_BYTES));
        let mut left = n;
        for &i in &self.chunks {
            if left == 0 {
                break;
            }
            let len = left.min(CHUNK_BYTES);
            // SAFETY: as in `chunk_mut`; shared borrows of `self` make the slices read-only.
            out.push(unsafe { std::slice::from_raw_parts(self.pool.base.add(i as usize * CHUNK_BYTES), len) });
            left -= len;
        }
        out
    }

    /// Gives every chunk back to the pool.
    pub fn release(&mut self) {
        if self.chunks.is_empty() {
            return;
        }
        self.tenant_held.fetch_sub(self.held_bytes(), Ordering::AcqRel);
        self.pool.free.lock().unwrap_or_else(|p| p.into_inner()).extend(self.chunks.drain(..));
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.release();
        // Forget the tenant's counter when this was its last connection.
        let mut tenants = self.pool.tenants.lock().unwrap_or_else(|p| p.into_inner());
        if Arc::strong_count(&self.tenant_held) == 2 {
            tenants.remove(&self.tenant);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_and_pool_bound_what_is_held() {
        let pool = Arc::new(StagingPool::new(4 * CHUNK_BYTES as u64, 2 * CHUNK_BYTES as u64, 3 * CHUNK_BYTES as u64));
        let t = TenantId::Named("a".into());
        let mut a = pool.lease(&t);
        let mut b = pool.lease(&t);
        a.take().unwrap()[0] = 7;
        a.take().unwrap();
        assert_eq!(a.take().unwrap_err(), StagingError::ConnBudget { max: 2 * CHUNK_BYTES as u64 });
        b.take().unwrap();
        assert!(matches!(b.take().unwrap_err(), StagingError::TenantBudget { .. }));
        let mut c = pool.lease(&TenantId::Connection(9));
        c.take().unwrap();
        assert_eq!(c.take().unwrap_err(), StagingError::PoolEmpty);
        assert_eq!(a.slices(CHUNK_BYTES + 5).iter().map(|s| s.len()).collect::<Vec<_>>(), [CHUNK_BYTES, 5]);
        assert_eq!(a.slices(1)[0][0], 7);
        drop(a);
        assert_eq!(pool.free_chunks(), 2);
        b.take().unwrap();
        drop((b, c));
        assert_eq!(pool.free_chunks(), 4);
        assert!(pool.tenants.lock().unwrap().is_empty());
    }
}
