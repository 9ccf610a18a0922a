//! Tensor handles: what the semantic-blind path (TensorPut/Get/Free/Exec) keeps on the server.
//!
//! Each tenant has its own handle table; a handle is only ever looked up in the table of the
//! tenant that presents it, so another tenant's handle is indistinguishable from one that never
//! existed (`BadHandle`). Every tensor owns one backend region sized to its bytes.
//!
//! Published tensors are immutable: a tensor's bytes are written only before it gets a handle
//! (TensorPut receives into it, Exec computes into fresh outputs); afterwards its region is only
//! ever read (op inputs, TensorGet). Tables hold them by [`Arc`], so a TensorGet can send straight
//! from the tensor's memory after releasing the tenant's lock while a concurrent free drops only
//! the handle: the memory goes when the send ends. At most one tensor per connection outlives its
//! handle that way (a connection sends one reply at a time).
//!
//! Bounds (fixed at start-up): handles per tenant, tensor bytes per tenant (each tenant's quota,
//! [`crate::quota`]), tensor bytes over all tenants. Quota is taken *before* a region is reserved
//! or bulk data is received, and given back when the tensor is freed (or the anonymous tenant's
//! connection closes).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use djinn_backend::Backend;
use djinn_proto::{DType as WireDType, Status, TensorDesc};

use crate::auth::TenantId;
use crate::lanes::{ExecLanes, Lane, LanesBusy};
use crate::metrics::Metrics;
use crate::quota::Quotas;

/// Wire dtype → backend dtype (the two enums name the same six types).
pub fn backend_dtype(d: WireDType) -> djinn_backend::DType {
    match d {
        WireDType::F32 => djinn_backend::DType::F32,
        WireDType::F16 => djinn_backend::DType::F16,
        WireDType::BF16 => djinn_backend::DType::BF16,
        WireDType::I32 => djinn_backend::DType::I32,
        WireDType::I64 => djinn_backend::DType::I64,
        WireDType::U8 => djinn_backend::DType::U8,
    }
}

/// One tensor held for a tenant.
pub struct Tensor<B: Backend> {
    /// Registrations of the region's host memory with the rdma listeners, made at creation
    /// ([`Store::new_tensor`]) so its put and gets register nothing; declared before `region`, so
    /// they are dropped (deregistered) before the memory goes.
    pub reg: Vec<djinn_transport::HostRegistration>,
    pub desc: TensorDesc,
    pub region: B::Region,
}

// SAFETY: `Sync` lets published tensors (behind `Arc` in the tables) be read from several threads
// at once: by Exec (as op inputs, under the tenant's lock) and by TensorGet (a send straight from
// the region, outside it). Regions are `!Sync` only because ops write through `&Region`; nothing
// writes a published tensor (this module's invariant: Exec writes only its fresh outputs, TensorPut
// only the region it has not published yet), so shared access is read-only. The region itself is
// `Send`, so whichever thread drops the last `Arc` may free it.
unsafe impl<B: Backend> Sync for Tensor<B> {}

/// Why a handle-table operation failed; maps onto a wire status.
#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    #[error("handle {0:#x} is not one of this tenant's tensors")]
    BadHandle(u64),
    #[error("tenant holds {held} handles, the limit is {max}")]
    TooManyHandles { held: usize, max: usize },
    #[error("tenant would hold {want} tensor bytes, the limit is {max}")]
    TenantBytes { want: u64, max: u64 },
    #[error("server would hold {want} tensor bytes, the limit is {max}")]
    ServerBytes { want: u64, max: u64 },
    #[error("backend: {0}")]
    Backend(#[from] djinn_backend::BackendError),
}

impl TensorError {
    pub fn status(&self) -> Status {
        match self {
            TensorError::BadHandle(_) => Status::BadHandle,
            TensorError::TooManyHandles { .. } | TensorError::TenantBytes { .. } => Status::LimitExceeded,
            TensorError::ServerBytes { .. } => Status::OutOfMemory,
            TensorError::Backend(e) => backend_status(e),
        }
    }
}

/// The wire status for a backend failure.
pub fn backend_status(e: &djinn_backend::BackendError) -> Status {
    use djinn_backend::BackendError as E;
    match e {
        E::OutOfMemory { .. } => Status::OutOfMemory,
        E::DType { .. } => Status::DTypeMismatch,
        E::Shape { .. } | E::OutOfBounds { .. } => Status::ShapeMismatch,
        E::Overlap { .. } => Status::BadArgument,
        E::Unsupported { .. } | E::NotCompiled(_) => Status::Unsupported,
        E::NoDevice(_) | E::Driver { .. } | E::Kernel { .. } | E::StreamShared { .. } => Status::Internal,
    }
}

/// A tenant's handle table.
pub struct TenantTensors<B: Backend> {
    map: HashMap<u64, Arc<Tensor<B>>>,
    bytes: u64,
}

impl<B: Backend> TenantTensors<B> {
    pub fn get(&self, handle: u64) -> Result<&Tensor<B>, TensorError> {
        self.map.get(&handle).map(|t| &**t).ok_or(TensorError::BadHandle(handle))
    }
    /// The tensor itself, kept alive past the table's lock (and past a free of its handle).
    pub fn get_shared(&self, handle: u64) -> Result<Arc<Tensor<B>>, TensorError> {
        self.map.get(&handle).cloned().ok_or(TensorError::BadHandle(handle))
    }
    pub fn len(&self) -> usize {
        self.map.len()
    }
    /// Bytes of the published tensors.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

pub struct TenantState<B: Backend> {
    tensors: Mutex<TenantTensors<B>>,
    /// Handles and bytes taken, published or not; kept apart from the table so quota can be
    /// taken before any region exists.
    quota: Mutex<(usize, u64)>,
}

/// Quota taken for tensors not yet in a table. Dropping it gives the quota back; [`Store::insert`]
/// consumes it.
pub struct Reservation<'a, B: Backend> {
    store: &'a Store<B>,
    tenant: Arc<TenantState<B>>,
    bytes: u64,
    handles: usize,
}

impl<B: Backend> Reservation<'_, B> {
    /// Gives back all but `bytes` of the reserved bytes (intermediates of a graph were freed).
    pub fn shrink_bytes(&mut self, bytes: u64) {
        let excess = self.bytes.saturating_sub(bytes);
        if excess > 0 {
            self.store.release(&self.tenant, excess, 0);
            self.bytes -= excess;
        }
    }
}

impl<B: Backend> Drop for Reservation<'_, B> {
    fn drop(&mut self) {
        if self.bytes > 0 || self.handles > 0 {
            self.store.release(&self.tenant, self.bytes, self.handles);
        }
    }
}

/// Every tenant's tensors.
pub struct Store<B: Backend> {
    backend: Arc<B>,
    /// The handles Exec requests run their ops on (never the engine's).
    lanes: ExecLanes<B>,
    tenants: Mutex<HashMap<TenantId, Arc<TenantState<B>>>>,
    bytes_total: AtomicU64,
    next_handle: AtomicU64,
    /// Each tenant's `handles_max` and `tensor_bytes_max`.
    quotas: Arc<Quotas>,
    pub bytes_max: u64,
    metrics: Metrics,
    /// The listeners' registrars (rdma), set once they are bound.
    registrars: std::sync::OnceLock<Vec<Arc<dyn djinn_transport::HostRegistrar>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a table lock would be a bug; the table itself stays consistent
    // (every mutation is a single insert/remove), so keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<B: Backend> Store<B> {
    pub fn new(backend: Arc<B>, lanes: ExecLanes<B>, quotas: Arc<Quotas>, bytes_max: u64, metrics: Metrics) -> Self {
        Store {
            backend,
            lanes,
            tenants: Mutex::new(HashMap::new()),
            bytes_total: AtomicU64::new(0),
            // Handles start far from zero so a zeroed field never names a tensor.
            next_handle: AtomicU64::new(0x1000),
            quotas,
            bytes_max,
            metrics,
            registrars: std::sync::OnceLock::new(),
        }
    }

    /// Tensors created from now on are registered with these (once; later calls are ignored).
    pub fn set_registrars(&self, registrars: Vec<Arc<dyn djinn_transport::HostRegistrar>>) {
        let _ = self.registrars.set(registrars);
    }

    /// A fresh (unpublished) tensor of `desc`: its region, and where the region is host memory,
    /// its registration with every registrar (rdma: so the put that fills it and every get
    /// register nothing on the request path).
    pub fn new_tensor(&self, desc: &TensorDesc) -> Result<Tensor<B>, TensorError> {
        let mut region = self.alloc(desc)?;
        let mut reg = Vec::new();
        if let Some(registrars) = self.registrars.get().filter(|r| !r.is_empty()) {
            let n = usize::try_from(desc.byte_len()).unwrap_or(usize::MAX);
            if let Some(bytes) = self.backend.host_bytes_mut(&mut region, 0, n) {
                let ptr = bytes.as_mut_ptr();
                for r in registrars {
                    // SAFETY: a region's host memory stays at its address while the region
                    // lives (it owns it; moving the region value does not move it), and `Tensor`
                    // drops `reg` before `region`.
                    reg.extend(unsafe { r.register(ptr, n) });
                }
            }
        }
        Ok(Tensor { reg, desc: *desc, region })
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// A backend handle of its own for one Exec request, held until dropped (see [`ExecLanes`]);
    /// refused when every lane stays taken for the pool's bounded wait.
    pub fn exec_lane(&self) -> Result<Lane<'_, B>, LanesBusy> {
        self.lanes.take()
    }

    pub fn tenant(&self, id: &TenantId) -> Arc<TenantState<B>> {
        lock(&self.tenants)
            .entry(id.clone())
            .or_insert_with(|| {
                Arc::new(TenantState {
                    tensors: Mutex::new(TenantTensors { map: HashMap::new(), bytes: 0 }),
                    quota: Mutex::new((0, 0)),
                })
            })
            .clone()
    }

    /// Takes quota for `handles` new tensors of `bytes` in total, or says which limit is hit.
    pub fn reserve<'a>(&'a self, id: &TenantId, handles: usize, bytes: u64) -> Result<Reservation<'a, B>, TensorError> {
        let tenant = self.tenant(id);
        {
            let quota = self.quotas.of(id);
            let mut q = lock(&tenant.quota);
            if q.0 + handles > quota.handles_max {
                return Err(TensorError::TooManyHandles { held: q.0, max: quota.handles_max });
            }
            let want = q.1.saturating_add(bytes);
            if want > quota.tensor_bytes_max {
                return Err(TensorError::TenantBytes { want, max: quota.tensor_bytes_max });
            }
            // Check-and-add in one step so concurrent tenants cannot overshoot the server bound.
            let max = self.bytes_max;
            self.bytes_total
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| t.checked_add(bytes).filter(|&n| n <= max))
                .map_err(|t| TensorError::ServerBytes { want: t.saturating_add(bytes), max })?;
            q.0 += handles;
            q.1 = want;
        }
        Ok(Reservation { store: self, tenant, bytes, handles })
    }

    fn release(&self, tenant: &TenantState<B>, bytes: u64, handles: usize) {
        let mut q = lock(&tenant.quota);
        debug_assert!(q.0 >= handles && q.1 >= bytes, "quota released twice");
        q.0 = q.0.saturating_sub(handles);
        q.1 = q.1.saturating_sub(bytes);
        self.bytes_total.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// A region for one tensor of `desc` (at least one byte: zero-sized reservations are not
    /// portable across backends).
    pub fn alloc(&self, desc: &TensorDesc) -> Result<B::Region, TensorError> {
        let bytes = usize::try_from(desc.byte_len())
            .map_err(|_| djinn_backend::BackendError::OutOfMemory { bytes: usize::MAX })?;
        Ok(self.backend.reserve(bytes.max(1))?)
    }

    /// Publishes tensors under the quota `res` took; returns their handles in order.
    pub fn insert(&self, res: Reservation<'_, B>, tensors: Vec<Tensor<B>>) -> Vec<u64> {
        let tenant = res.tenant.clone();
        let mut table = lock(&tenant.tensors);
        self.insert_locked(res, &mut table, tensors)
    }

    /// [`Store::insert`] into a table the caller already holds (it must be `res`'s tenant's).
    pub fn insert_locked(
        &self,
        mut res: Reservation<'_, B>,
        table: &mut TenantTensors<B>,
        tensors: Vec<Tensor<B>>,
    ) -> Vec<u64> {
        debug_assert_eq!(tensors.len(), res.handles);
        let mut handles = Vec::with_capacity(tensors.len());
        for t in tensors {
            let h = self.next_handle.fetch_add(1, Ordering::Relaxed);
            table.bytes += t.desc.byte_len();
            self.metrics.tensors_live.inc();
            self.metrics.tensor_bytes_live.add(t.desc.byte_len() as i64);
            table.map.insert(h, Arc::new(t));
            handles.push(h);
        }
        // The quota now belongs to the published tensors.
        res.bytes = 0;
        res.handles = 0;
        handles
    }

    /// Runs `f` with the tenant's table locked.
    pub fn with_table<R>(&self, id: &TenantId, f: impl FnOnce(&mut TenantTensors<B>) -> R) -> R {
        let tenant = self.tenant(id);
        let mut t = lock(&tenant.tensors);
        f(&mut t)
    }

    /// Frees handles; all must exist (checked first, so a bad list frees nothing).
    pub fn free(&self, id: &TenantId, handles: &[u64]) -> Result<(), TensorError> {
        let tenant = self.tenant(id);
        let mut table = lock(&tenant.tensors);
        if let Some(&bad) = handles.iter().find(|h| !table.map.contains_key(h)) {
            return Err(TensorError::BadHandle(bad));
        }
        let mut bytes = 0u64;
        let mut n = 0usize;
        for h in handles {
            if let Some(t) = table.map.remove(h) {
                bytes += t.desc.byte_len();
                n += 1;
            }
        }
        table.bytes -= bytes;
        drop(table);
        self.metrics.tensors_live.sub(n as i64);
        self.metrics.tensor_bytes_live.sub(bytes as i64);
        self.release(&tenant, bytes, n);
        Ok(())
    }

    /// Drops a tenant and everything it holds (an anonymous tenant's connection closed).
    pub fn drop_tenant(&self, id: &TenantId) {
        let Some(tenant) = lock(&self.tenants).get(id).cloned() else { return };
        let (n, bytes) = {
            let mut table = lock(&tenant.tensors);
            let n = table.map.len();
            let bytes = table.bytes;
            table.map.clear();
            table.bytes = 0;
            (n, bytes)
        };
        self.metrics.tensors_live.sub(n as i64);
        self.metrics.tensor_bytes_live.sub(bytes as i64);
        self.release(&tenant, bytes, n);
        lock(&self.tenants).remove(id);
    }

    pub fn bytes_total(&self) -> u64 {
        self.bytes_total.load(Ordering::Relaxed)
    }
}
