//! The persistent region: model weights (one allocation per model, refcounted, shared by every
//! session) and other long-lived device buffers, carved with the TLSF [`OffsetAllocator`].
//!
//! Leases are RAII: the last [`WeightsLease`] of a model frees its range; a [`PersistentLease`]
//! frees on drop. Both hold the shared state through an `Arc`, so they may outlive a borrow of
//! the VMU (never the VMU's region itself: only offsets are handed out).

use std::sync::{Arc, Mutex, MutexGuard};

use crate::alloc::{Allocation, OffsetAllocator};
use crate::error::{AllocError, VmuError};
use crate::metrics::VmuMetrics;

struct ModelEntry {
    name: String,
    alloc: Allocation,
    leases: usize,
}

pub(crate) struct Persistent {
    base: usize,
    alloc: OffsetAllocator,
    models: Vec<ModelEntry>,
    metrics: VmuMetrics,
}

impl Persistent {
    fn publish(&self) {
        self.metrics.set_region("weights", self.alloc.used_bytes(), self.alloc.free_bytes());
        self.metrics.weights_fragmentation().set(self.alloc.fragmentation());
    }
}

pub(crate) type Shared = Arc<Mutex<Persistent>>;

pub(crate) fn new_shared(base: usize, bytes: usize, max_allocations: usize, metrics: VmuMetrics) -> Shared {
    let p = Persistent { base, alloc: OffsetAllocator::new(bytes, max_allocations), models: Vec::new(), metrics };
    p.publish();
    Arc::new(Mutex::new(p))
}

fn lock(s: &Shared) -> MutexGuard<'_, Persistent> {
    // A panic while holding the lock cannot leave the allocator half-updated in a way that
    // matters more than the panic itself; keep serving.
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// One holder's share of a model's weights. Clone to share; the last drop frees the range.
pub struct WeightsLease {
    shared: Shared,
    name: String,
    offset: usize,
    bytes: usize,
    fresh: bool,
}

impl std::fmt::Debug for WeightsLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightsLease")
            .field("model", &self.name)
            .field("offset", &self.offset)
            .field("bytes", &self.bytes)
            .field("fresh", &self.fresh)
            .finish()
    }
}

impl WeightsLease {
    /// Absolute offset (into the VMU region) of the model's first weight byte (256-aligned).
    pub fn offset(&self) -> usize {
        self.offset
    }
    /// Usable bytes (at least what was asked).
    pub fn len_bytes(&self) -> usize {
        self.bytes
    }
    pub fn model(&self) -> &str {
        &self.name
    }
    /// True for the lease that created the allocation: its holder uploads the weights. Leases
    /// obtained for an already-resident model (and clones) say false.
    pub fn is_fresh(&self) -> bool {
        self.fresh
    }
}

impl Clone for WeightsLease {
    fn clone(&self) -> Self {
        let mut p = lock(&self.shared);
        let e = p.models.iter_mut().find(|m| m.name == self.name).expect("lease outlived its model entry");
        e.leases += 1;
        WeightsLease {
            shared: self.shared.clone(),
            name: self.name.clone(),
            offset: self.offset,
            bytes: self.bytes,
            fresh: false,
        }
    }
}

impl Drop for WeightsLease {
    fn drop(&mut self) {
        let mut p = lock(&self.shared);
        let Some(i) = p.models.iter().position(|m| m.name == self.name) else { return };
        p.models[i].leases -= 1;
        if p.models[i].leases == 0 {
            let e = p.models.swap_remove(i);
            p.alloc.free(e.alloc);
            p.publish();
        }
    }
}

pub(crate) fn alloc_weights(s: &Shared, model: &str, bytes: usize) -> Result<WeightsLease, VmuError> {
    let mut p = lock(s);
    let base = p.base;
    if let Some(e) = p.models.iter_mut().find(|m| m.name == model) {
        if e.alloc.size_bytes() < bytes {
            return Err(VmuError::Weights { model: model.into(), bytes, source: AllocError::Invalid });
        }
        e.leases += 1;
        let (offset, size) = (base + e.alloc.offset(), e.alloc.size_bytes());
        return Ok(WeightsLease { shared: s.clone(), name: model.into(), offset, bytes: size, fresh: false });
    }
    let a = p.alloc.alloc(bytes, crate::alloc::GRANULE_BYTES).map_err(|source| VmuError::Weights {
        model: model.into(),
        bytes,
        source,
    })?;
    let (offset, size) = (base + a.offset(), a.size_bytes());
    p.models.push(ModelEntry { name: model.into(), alloc: a, leases: 1 });
    p.publish();
    Ok(WeightsLease { shared: s.clone(), name: model.into(), offset, bytes: size, fresh: true })
}

/// A long-lived device buffer in the persistent region (e.g. RoPE tables); freed on drop.
pub struct PersistentLease {
    shared: Shared,
    alloc: Option<Allocation>,
    offset: usize,
}

impl std::fmt::Debug for PersistentLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PersistentLease").field("offset", &self.offset).field("bytes", &self.len_bytes()).finish()
    }
}

impl PersistentLease {
    /// Absolute offset into the VMU region.
    pub fn offset(&self) -> usize {
        self.offset
    }
    pub fn len_bytes(&self) -> usize {
        self.alloc.as_ref().map_or(0, |a| a.size_bytes())
    }
}

impl Drop for PersistentLease {
    fn drop(&mut self) {
        if let Some(a) = self.alloc.take() {
            let mut p = lock(&self.shared);
            p.alloc.free(a);
            p.publish();
        }
    }
}

pub(crate) fn alloc_persistent(s: &Shared, bytes: usize, align: usize) -> Result<PersistentLease, VmuError> {
    let mut p = lock(s);
    let a = p.alloc.alloc(bytes, align).map_err(|source| VmuError::Persistent { bytes, source })?;
    p.publish();
    let offset = p.base + a.offset();
    Ok(PersistentLease { shared: s.clone(), alloc: Some(a), offset })
}
