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
//!   a wait. A connection's leases ([`Lease::sibling`]) share its bound.
//! - Data received for another thread (a hidden-state write, applied by the engine loop) travels
//!   as [`Staged`]: the chunks it was received into, given back when it is dropped, its lease then
//!   returned to the connection's [`HandOff`] slot for the next one — nothing is allocated per
//!   request, and over rdma the bytes land in the registered pool. A reply made on another
//!   thread (a hidden-state read's answer) goes the other way: the engine loop fills an empty
//!   [`Staged`] ([`Staged::fill`]) and the reply is sent from its chunks.
//! - The pool's chunks are its units for a transport ([`djinn_transport::PinnedHost::unit_bytes`]):
//!   rdma registers it chunk by chunk, each on first use, so a receive into one chunk needs no
//!   registration of its own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::auth::TenantId;

/// Bytes of one chunk: the piece bulk data moves in.
pub const CHUNK_BYTES: usize = 1 << 20;
/// Chunk slices a staged frame's send keeps on the stack (16 MiB of data; a larger frame's list
/// is allocated, beside moving that much).
pub const SEGS_INLINE: usize = 16;
/// One slice per staging chunk of a frame's data, for a vectored send.
pub type Segments<'a> = smallvec::SmallVec<[&'a [u8]; SEGS_INLINE]>;

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

/// Why [`Lease::fill`] stopped.
#[derive(Debug)]
pub enum FillError<E> {
    /// A chunk was refused (pool or budget) at byte offset `at`: the bytes from there were not
    /// taken.
    Refused { at: usize, error: StagingError },
    /// The write of a part failed.
    Write(E),
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
// while the pool lives; transports that register it keep an `Arc` of the pool. Its units are the
// chunks: each is held whole by one `Lease` (see the module invariants), and the pool's users
// receive only into chunks their lease holds, borrowed whole (`Lease::take`'s `&mut` chunk).
unsafe impl djinn_transport::PinnedHost for StagingPool {
    fn ptr(&self) -> *mut u8 {
        self.base
    }
    fn len_bytes(&self) -> usize {
        self._mem.len()
    }
    fn unit_bytes(&self) -> Option<usize> {
        Some(CHUNK_BYTES)
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
        Lease {
            pool: self.clone(),
            tenant: tenant.clone(),
            tenant_held: held,
            conn_held: Arc::new(AtomicU64::new(0)),
            chunks: Vec::with_capacity(most),
        }
    }
}

/// What one connection holds of the pool. Dropping it gives everything back.
pub struct Lease {
    pool: Arc<StagingPool>,
    tenant: TenantId,
    tenant_held: Arc<AtomicU64>,
    /// Bytes held by this lease and its siblings (one connection's).
    conn_held: Arc<AtomicU64>,
    chunks: Vec<u32>,
}

impl Lease {
    fn held_bytes(&self) -> u64 {
        (self.chunks.len() * CHUNK_BYTES) as u64
    }

    /// Another lease of the same connection: empty, sharing this one's connection budget.
    /// Allocates (its chunk list); made when the connection is set up, not per request.
    pub fn sibling(&self) -> Lease {
        Lease {
            pool: self.pool.clone(),
            tenant: self.tenant.clone(),
            tenant_held: self.tenant_held.clone(),
            conn_held: self.conn_held.clone(),
            chunks: Vec::with_capacity(self.chunks.capacity()),
        }
    }

    /// Takes one more chunk (within both budgets) and returns it for writing.
    pub fn take(&mut self) -> Result<&mut [u8], StagingError> {
        let pool = &*self.pool;
        let bytes = CHUNK_BYTES as u64;
        let add = |held: &AtomicU64, max: u64| {
            let max = max.max(bytes);
            held.fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| t.checked_add(bytes).filter(|&n| n <= max))
        };
        add(&self.conn_held, pool.conn_max).map_err(|_| StagingError::ConnBudget { max: pool.conn_max })?;
        if add(&self.tenant_held, pool.tenant_max).is_err() {
            self.conn_held.fetch_sub(bytes, Ordering::AcqRel);
            return Err(StagingError::TenantBudget { max: pool.tenant_max });
        }
        let Some(i) = pool.free.lock().unwrap_or_else(|p| p.into_inner()).pop() else {
            self.tenant_held.fetch_sub(bytes, Ordering::AcqRel);
            self.conn_held.fetch_sub(bytes, Ordering::AcqRel);
            return Err(StagingError::PoolEmpty);
        };
        self.chunks.push(i);
        let k = self.chunks.len() - 1;
        Ok(self.chunk_mut(k))
    }

    /// Takes chunks in order for `n` bytes and hands each to `write(at, part)` as it is taken
    /// (`at`: the part's offset, a multiple of [`CHUNK_BYTES`]; `part`: the chunk, or its head
    /// for the last one): how a receive streams into staging and a device read fills it. Stops
    /// at the first refused take or failed write; the chunks taken so far stay held.
    pub fn fill<E>(
        &mut self,
        n: usize,
        mut write: impl FnMut(usize, &mut [u8]) -> Result<(), E>,
    ) -> Result<(), FillError<E>> {
        let mut at = 0;
        while at < n {
            let len = (n - at).min(CHUNK_BYTES);
            let chunk = self.take().map_err(|error| FillError::Refused { at, error })?;
            write(at, &mut chunk[..len]).map_err(FillError::Write)?;
            at += len;
        }
        Ok(())
    }

    fn chunk_mut(&mut self, k: usize) -> &mut [u8] {
        let i = self.chunks[k] as usize;
        // SAFETY: chunk `i` is inside the allocation (indices come from the pool's own free list)
        // and held by this lease alone; the `&mut self` borrow makes the slice exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.pool.base.add(i * CHUNK_BYTES), CHUNK_BYTES) }
    }

    /// The first `n` bytes held, as one slice per chunk (for a vectored send; on the stack up to
    /// [`SEGS_INLINE`] chunks).
    pub fn slices(&self, n: usize) -> Segments<'_> {
        self.chunks(n).collect()
    }

    /// The first `n` bytes held, one slice per chunk, in order; allocates nothing.
    pub fn chunks(&self, n: usize) -> impl Iterator<Item = &[u8]> + '_ {
        let mut left = n;
        self.chunks.iter().map_while(move |&i| {
            if left == 0 {
                return None;
            }
            let len = left.min(CHUNK_BYTES);
            left -= len;
            // SAFETY: as in `chunk_mut`; shared borrows of `self` make the slices read-only.
            Some(unsafe { std::slice::from_raw_parts(self.pool.base.add(i as usize * CHUNK_BYTES), len) })
        })
    }

    /// Gives every chunk back to the pool.
    pub fn release(&mut self) {
        if self.chunks.is_empty() {
            return;
        }
        self.tenant_held.fetch_sub(self.held_bytes(), Ordering::AcqRel);
        self.conn_held.fetch_sub(self.held_bytes(), Ordering::AcqRel);
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

/// A connection's slot for the lease its hand-offs ([`Staged`]) receive into: empty while one
/// is away (at most one hidden-state write per connection is being applied at a time).
pub type HandOff = Arc<Mutex<Option<Lease>>>;

/// Bytes received into pool chunks and handed to another thread. Dropping it gives the chunks
/// back and returns the (empty) lease to its connection's slot.
pub struct Staged {
    lease: Option<Lease>,
    len: usize,
    home: HandOff,
}

impl Staged {
    /// `len` bytes received into `lease`'s chunks, going back to `home` when dropped.
    pub fn new(lease: Lease, len: usize, home: HandOff) -> Self {
        Staged { lease: Some(lease), len, home }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes, one slice per chunk ([`CHUNK_BYTES`] each but the last), in order.
    pub fn chunks(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.lease.iter().flat_map(|l| l.chunks(self.len))
    }

    /// Replaces the bytes with `n` new ones, taken chunk by chunk within the lease's budgets:
    /// `write(at, part)` fills `part`, the bytes from offset `at` (a multiple of
    /// [`CHUNK_BYTES`]), one chunk at a time in order. A refused take gives every chunk back and
    /// leaves it empty.
    pub fn fill(&mut self, n: usize, mut write: impl FnMut(usize, &mut [u8])) -> Result<(), StagingError> {
        self.len = 0;
        // `None` only inside `drop`.
        let Some(lease) = self.lease.as_mut() else { return Err(StagingError::PoolEmpty) };
        lease.release();
        match lease.fill(n, |at, part| {
            write(at, part);
            Ok::<(), std::convert::Infallible>(())
        }) {
            Ok(()) => {
                self.len = n;
                Ok(())
            }
            Err(FillError::Refused { error, .. }) => {
                lease.release();
                Err(error)
            }
            Err(FillError::Write(never)) => match never {},
        }
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(mut l) = self.lease.take() {
            l.release();
            *self.home.lock().unwrap_or_else(|p| p.into_inner()) = Some(l);
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

    #[test]
    fn siblings_share_the_connection_budget_and_staged_goes_home() {
        let pool = Arc::new(StagingPool::new(4 * CHUNK_BYTES as u64, 2 * CHUNK_BYTES as u64, 4 * CHUNK_BYTES as u64));
        let t = TenantId::Named("a".into());
        let mut a = pool.lease(&t);
        let home: HandOff = Arc::new(Mutex::new(Some(a.sibling())));
        let mut b = home.lock().unwrap().take().unwrap();
        a.take().unwrap();
        b.take().unwrap().fill(3);
        assert!(matches!(b.take().unwrap_err(), StagingError::ConnBudget { .. }));
        let s = Staged::new(b, CHUNK_BYTES - 1, home.clone());
        assert_eq!(s.chunks().map(|c| c.len()).collect::<Vec<_>>(), [CHUNK_BYTES - 1]);
        assert!(s.chunks().flatten().all(|&x| x == 3));
        assert!(home.lock().unwrap().is_none());
        drop(s);
        assert_eq!(pool.free_chunks(), 3);
        assert!(home.lock().unwrap().as_ref().is_some_and(|l| l.chunks.is_empty()));
        a.take().unwrap();
        drop((a, home));
        assert_eq!(pool.free_chunks(), 4);
        assert!(pool.tenants.lock().unwrap().is_empty());
    }

    #[test]
    fn fill_takes_chunks_in_order_and_gives_them_back_when_refused() {
        let pool = Arc::new(StagingPool::new(3 * CHUNK_BYTES as u64, 2 * CHUNK_BYTES as u64, 3 * CHUNK_BYTES as u64));
        let t = TenantId::Named("a".into());
        let a = pool.lease(&t);
        let home: HandOff = Arc::new(Mutex::new(None));
        let mut s = Staged::new(a.sibling(), 0, home.clone());
        let mut at_seen = Vec::new();
        s.fill(CHUNK_BYTES + 3, |at, part| {
            at_seen.push((at, part.len()));
            part.fill((at / CHUNK_BYTES) as u8 + 1);
        })
        .unwrap();
        assert_eq!(at_seen, [(0, CHUNK_BYTES), (CHUNK_BYTES, 3)]);
        assert_eq!(s.len(), CHUNK_BYTES + 3);
        let lens: Vec<(usize, u8)> = s.chunks().map(|c| (c.len(), c[c.len() - 1])).collect();
        assert_eq!(lens, [(CHUNK_BYTES, 1), (3, 2)]);
        assert_eq!(pool.free_chunks(), 1);
        // Past the connection's budget: refused, everything back, empty.
        assert!(matches!(s.fill(3 * CHUNK_BYTES, |_, _| {}), Err(StagingError::ConnBudget { .. })));
        assert!(s.is_empty());
        assert_eq!(pool.free_chunks(), 3);
        drop(s);
        assert!(home.lock().unwrap().is_some());
        drop((a, home));
        assert!(pool.tenants.lock().unwrap().is_empty());
    }
}
