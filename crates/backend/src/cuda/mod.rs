//! CUDA backend: cudarc with dynamic loading (`libcuda.so.1`, `libcublas.so.13` or `.12`,
//! `libnvrtc` only for the source fallback), so building needs no CUDA install and a machine
//! without a GPU gets [`BackendError::NoDevice`] from [`CudaBackend::new`], never a panic.
//!
//! Owns: device memory ([`Region`]: one `cuMemAlloc` per [`Backend::reserve`], freed on drop),
//! pinned host memory ([`PinnedHost`]: `cuMemHostAlloc`, not write-combined), streams (each
//! with its own cuBLAS handle, a fixed workspace and a device error word), events, kernel
//! loading ([`KernelSet`] handed in by the binary) and the op launches (`ops.rs`). GEMM goes
//! through cuBLAS; every other op is a hand-written kernel in `kernels/`.
//!
//! Handles and streams: a [`CudaBackend`] is one *handle* — the device it shares with every
//! other handle of the GPU (`Device`: context, kernels, properties, attention counters; one
//! `Arc`) plus its own default [`Stream`]. [`Backend::handle`] makes another. Regions belong to
//! the context, so any handle's ops take any handle's regions. What an op keeps between its
//! launches (mixed-dtype GEMM: the converted operand; split-K decode: the partials; sampling:
//! the sort slots) lives in the workspace of the stream it runs on ([`Scratch`]), borrowed
//! mutably by the op from its first launch to its last, so launches of two ops can never
//! interleave on one workspace. Sharing is refused, not waited out: a stream is used by one
//! thread at a time, and an op that finds its stream's scratch already borrowed by another
//! thread fails with [`BackendError::StreamShared`] before launching anything. The engine of
//! each model and each Exec in flight therefore work through handles of their own (the engine
//! makes its handle itself; the server hands Execs handles from a bounded pool), which also
//! keeps each stream's error word (below) reported to the one user whose kernels set it.
//!
//! Invariants: every driver call happens with this backend's (primary) context current on the
//! calling thread (`bind`); every operand is bounds-checked against its region on the host
//! before a launch, so kernels never see an out-of-region pointer. Index *values* (token ids,
//! KV slots, block ids) live in device memory: checking them is the caller's job (the trait's
//! contract for device backends); kernels still skip bad ones and set a bit in their stream's
//! error word, which the next `sync_stream` / `sync_event` on that stream reports as an error.

mod dispatch;
mod gemm;
mod kernels;
mod ops;

use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublas::sys as blas_sys;
use cudarc::driver::{result as drv, sys, CudaContext, CudaEvent, CudaStream, DriverError};

pub use dispatch::{AttnDispatch, AttnKernelCounts, AttnShape, DecodePlan, PrefillRows};
pub use kernels::{KernelModule, KernelOrigin, KernelSet};

use crate::backend::{
    AttnBatch, Backend, BinaryOp, DeviceInfo, GemmArgs, HostBuf, KvCacheRef, RegionInfo, SampleParams, UnaryOp, View,
};
use crate::error::{BackendError, Result};

/// Workspace per stream (split-K partials of paged decode, converted GEMM operands, sampling
/// sort slots). 32 MiB holds, e.g., 64 sequences × 32 heads × 30 partitions × head_dim 128;
/// larger batches use fewer partitions.
pub const ATTN_WORKSPACE_BYTES: usize = 32 << 20;

pub(crate) fn driver_err(op: &'static str) -> impl Fn(DriverError) -> BackendError {
    move |e| BackendError::Driver { op, msg: e.to_string() }
}

/// Reserved device memory: one `cuMemAlloc`, freed when dropped.
pub struct Region {
    ptr: sys::CUdeviceptr,
    len: usize,
    ctx: Arc<CudaContext>,
}

impl Region {
    /// Device address of byte `offset` (for kernels and copies; bounds are the caller's job).
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }
}

impl RegionInfo for Region {
    fn len_bytes(&self) -> usize {
        self.len
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from cuMemAlloc in this context and is freed exactly once here.
            // Work still queued on it must have been synchronised by the owner (the VMU drops
            // regions only at shutdown, after a device synchronise).
            let _ = unsafe { drv::free_sync(self.ptr) };
        }
    }
}

/// Page-locked host memory (`cuMemHostAlloc`, flags 0: cached, not write-combined — the host
/// reads swap pages back).
pub struct PinnedHost {
    ptr: *mut u8,
    len: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: the buffer is plain host memory owned exclusively by this value; moving it to another
// thread moves that ownership. Pinned allocations are valid in every thread of the process.
unsafe impl Send for PinnedHost {}

impl HostBuf for PinnedHost {
    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` bytes owned by self (zero-initialised at allocation).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the borrow exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from cuMemHostAlloc and is freed exactly once; the `# Safety`
            // contracts of the async copies guarantee no transfer still uses it.
            let _ = unsafe { drv::free_host(self.ptr.cast()) };
        }
    }
}

/// A stream's device-side input-check word (kernels/common.cuh ERR_*), in mapped pinned host
/// memory: kernels on the stream OR bits in; synchronising the stream (or an event recorded on
/// it) reports and clears them.
pub(crate) struct ErrWord {
    host: PinnedHost,
    /// The device address of `host`.
    dev: u64,
}

// SAFETY: after initialisation the word is only accessed through an AtomicU32 (host) and
// device atomics (kernels); no `&mut` to it is ever formed again.
unsafe impl Sync for ErrWord {}

impl ErrWord {
    fn new(ctx: &Arc<CudaContext>) -> Result<ErrWord> {
        ctx.bind_to_thread().map_err(driver_err("bind context"))?;
        // SAFETY: a 4-byte mapped (DEVICEMAP) pinned allocation, owned by the PinnedHost below.
        let ptr = unsafe { drv::malloc_host(4, sys::CU_MEMHOSTALLOC_DEVICEMAP) }
            .map_err(driver_err("cuMemHostAlloc (error word)"))? as *mut u8;
        let mut host = PinnedHost { ptr, len: 4, ctx: ctx.clone() };
        host.as_mut_slice().fill(0);
        let mut dev: sys::CUdeviceptr = 0;
        // SAFETY: `ptr` is a live mapped pinned allocation of this context.
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dev, ptr.cast(), 0) }
            .result()
            .map_err(driver_err("cuMemHostGetDevicePointer"))?;
        Ok(ErrWord { host, dev })
    }

    /// Reports (and clears) what kernels flagged. Call after a synchronisation: only then have
    /// the kernels in question finished.
    fn take(&self) -> Result<()> {
        // SAFETY: the allocation holds 4 bytes, page-aligned, alive as long as self. Kernels
        // write it with device atomics through the mapping; the synchronisation that precedes
        // this call orders those writes before this read.
        let word = unsafe { &*(self.host.ptr as *const std::sync::atomic::AtomicU32) };
        let bits = word.swap(0, std::sync::atomic::Ordering::AcqRel);
        if bits == 0 {
            return Ok(());
        }
        let (op, why) = if bits & 1 != 0 {
            ("embedding", "a token id lies outside the vocabulary")
        } else if bits & 2 != 0 {
            ("kv_append", "a slot lies outside the KV cache")
        } else {
            ("attention/blocks", "a block id lies outside the KV cache")
        };
        Err(BackendError::Shape { op, why: format!("{why} (detected on the device)") })
    }
}

/// A cuBLAS handle bound to one stream.
struct Blas(blas_sys::cublasHandle_t);

// SAFETY: a cuBLAS handle may be used from any thread, one at a time; `Stream` keeps it behind
// a Mutex (inside [`Scratch`]) that ops only ever `try_lock`, which provides that exclusion.
unsafe impl Send for Blas {}

/// What an op keeps on one stream between its launches: the workspace (converted GEMM operands,
/// split-K decode partials, sampling sort slots) and the cuBLAS handle bound to the stream.
/// Reachable only through [`Stream::scratch`]'s guard — the op's mutable borrow — which an op
/// holds from its first launch to its last: launches on a stream run in issue order, so two
/// ops' uses of the workspace can never interleave.
pub(crate) struct Scratch {
    // Field order is drop order: the cuBLAS handle goes before its stream (a later field of
    // `Stream`); the workspace is independent.
    blas: Blas,
    workspace: Region,
}

impl Scratch {
    /// Device address of the workspace ([`ATTN_WORKSPACE_BYTES`]).
    pub(crate) fn ptr(&self) -> u64 {
        self.workspace.ptr
    }
    pub(crate) fn blas(&self) -> blas_sys::cublasHandle_t {
        self.blas.0
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: the handle was created by cublasCreate and is destroyed exactly once.
        let _ = unsafe { cudarc::cublas::result::destroy_handle(self.0) };
    }
}

/// A CUDA stream with its cuBLAS handle, workspace ([`Scratch`]) and error word. A copy-only
/// stream ([`Backend::new_copy_stream`]) has no scratch: copies, events and waits only.
pub struct Stream {
    // Field order is drop order: the cuBLAS handle (in `scratch`) goes before the stream.
    scratch: Mutex<Option<Scratch>>,
    err: Arc<ErrWord>,
    stream: Arc<CudaStream>,
}

impl Stream {
    pub(crate) fn raw(&self) -> sys::CUstream {
        self.stream.cu_stream()
    }

    /// The stream's scratch, held exclusively until the guard drops (see [`Scratch`]). A stream
    /// belongs to one thread at a time: finding it borrowed means two threads share a handle,
    /// which is refused (the module docs say why) instead of serialised.
    pub(crate) fn scratch(&self, op: &'static str) -> Result<ScratchGuard<'_>> {
        let g = match self.scratch.try_lock() {
            Ok(g) => g,
            // A panic inside an op left no launch half-issued that matters: the next op on the
            // stream runs after whatever was issued, in stream order.
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Err(BackendError::StreamShared { op }),
        };
        if g.is_none() {
            return Err(BackendError::Unsupported {
                op,
                why: "a copy-only stream (new_copy_stream) has no workspace or cuBLAS handle; launch compute on a \
                      stream from new_stream or a handle's default stream"
                    .into(),
            });
        }
        Ok(ScratchGuard(g))
    }
}

/// A stream's [`Scratch`], borrowed exclusively (see [`Stream::scratch`]); never empty.
pub(crate) struct ScratchGuard<'a>(std::sync::MutexGuard<'a, Option<Scratch>>);

impl std::ops::Deref for ScratchGuard<'_> {
    type Target = Scratch;
    fn deref(&self) -> &Scratch {
        self.0.as_ref().expect("Stream::scratch checked the stream has scratch")
    }
}

/// A recorded point on a stream (and that stream's error word, reported on synchronisation).
pub struct Event(CudaEvent, Arc<ErrWord>);

/// What every handle on one GPU shares.
pub(crate) struct Device {
    ctx: Arc<CudaContext>,
    kernels: kernels::Kernels,
    name: String,
    /// Compute capability as `major * 10 + minor` (90 for H100).
    arch: u32,
    sm_count: u32,
    attn_counters: dispatch::AttnCounters,
}

/// One handle on a GPU: the shared [`Device`] and this handle's own default stream (see the
/// module docs). `Send + Sync` as the trait requires; its stream still serves one thread at a
/// time ([`Stream::scratch`]).
pub struct CudaBackend {
    // Field order is drop order: the stream (and its cuBLAS handle and workspace) before the
    // last reference to the device's modules and context.
    default: Stream,
    dev: Arc<Device>,
}

impl CudaBackend {
    /// Opens GPU `ordinal`, loads every kernel module of `kernels` and creates the default
    /// stream. No driver, no device, or no cuBLAS: [`BackendError::NoDevice`].
    pub fn new(ordinal: usize, kernels: &KernelSet) -> Result<CudaBackend> {
        // SAFETY: probing only dlopens the libraries; no CUDA function runs when one is absent
        // (cudarc would panic on first use of a missing library).
        if !unsafe { sys::is_culib_present() } {
            return Err(BackendError::NoDevice("CUDA driver library (libcuda.so.1) not found".into()));
        }
        // SAFETY: as above.
        if !unsafe { blas_sys::is_culib_present() } {
            return Err(BackendError::NoDevice("cuBLAS (libcublas.so.13 or .12) not found".into()));
        }
        let count = CudaContext::device_count().map_err(|e| BackendError::NoDevice(format!("cuInit: {e}")))?;
        if ordinal >= count.max(0) as usize {
            return Err(BackendError::NoDevice(format!("GPU {ordinal} requested, {count} present")));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| BackendError::NoDevice(format!("GPU {ordinal}: {e}")))?;
        let (major, minor) = ctx.compute_capability().map_err(driver_err("compute capability"))?;
        let arch = (major * 10 + minor) as u32;
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(driver_err("multiprocessor count"))? as u32;
        let name = ctx.name().map_err(driver_err("device name"))?;
        let kernels = kernels::Kernels::load(&ctx, kernels, arch)?;
        let default = Self::make_stream(&ctx, true)?;
        tracing::info!(ordinal, %name, arch, sm_count, "cuda backend ready");
        let dev = Arc::new(Device { ctx, kernels, name, arch, sm_count, attn_counters: Default::default() });
        Ok(CudaBackend { default, dev })
    }

    /// Compute capability as `major * 10 + minor`.
    pub fn arch(&self) -> u32 {
        self.dev.arch
    }

    /// Whether `other` is a handle on the same device (its regions are this handle's operands).
    pub fn same_device(&self, other: &CudaBackend) -> bool {
        Arc::ptr_eq(&self.dev, &other.dev)
    }

    /// How many times each attention kernel was launched, over every handle of the device
    /// (which one a step used is observable: see `dispatch.rs`).
    pub fn attention_kernels(&self) -> AttnKernelCounts {
        self.dev.attn_counters.snapshot()
    }

    /// The kernels the calling thread's most recent `attention` call launched (tests check a
    /// mixed step's decode rows took the decode kernel).
    pub fn last_attention(&self) -> Option<AttnDispatch> {
        dispatch::last()
    }

    /// Which image each kernel module was loaded from.
    pub fn kernel_origins(&self) -> Vec<(&'static str, KernelOrigin)> {
        self.dev.kernels.origins()
    }

    fn bind(&self) -> Result<()> {
        self.dev.ctx.bind_to_thread().map_err(driver_err("bind context"))
    }

    fn alloc(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Region> {
        ctx.bind_to_thread().map_err(driver_err("bind context"))?;
        // SAFETY: plain allocation; the pointer is owned by the returned Region.
        let ptr = unsafe { drv::malloc_sync(bytes.max(1)) }.map_err(|e| match e.0 {
            sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => BackendError::OutOfMemory { bytes },
            _ => BackendError::Driver { op: "cuMemAlloc", msg: e.to_string() },
        })?;
        Ok(Region { ptr, len: bytes, ctx: ctx.clone() })
    }

    /// A stream with its scratch (`compute`: cuBLAS handle and workspace) or without (copies).
    fn make_stream(ctx: &Arc<CudaContext>, compute: bool) -> Result<Stream> {
        let stream = ctx.new_stream().map_err(driver_err("cuStreamCreate"))?;
        let err = Arc::new(ErrWord::new(ctx)?);
        if !compute {
            return Ok(Stream { scratch: Mutex::new(None), err, stream });
        }
        let handle = cudarc::cublas::result::create_handle()
            .map_err(|e| BackendError::Driver { op: "cublasCreate", msg: e.to_string() })?;
        let blas = Blas(handle);
        // SAFETY: both handles are live, and `Stream` drops the cuBLAS handle before the stream.
        unsafe { cudarc::cublas::result::set_stream(blas.0, stream.cu_stream() as _) }
            .map_err(|e| BackendError::Driver { op: "cublasSetStream", msg: e.to_string() })?;
        let workspace = Self::alloc(ctx, ATTN_WORKSPACE_BYTES)?;
        Ok(Stream { scratch: Mutex::new(Some(Scratch { blas, workspace })), err, stream })
    }

    fn check_range(op: &'static str, region: &Region, offset: usize, bytes: usize) -> Result<()> {
        match offset.checked_add(bytes) {
            Some(end) if end <= region.len => Ok(()),
            _ => Err(BackendError::OutOfBounds { op, operand: "range", offset, bytes, region_bytes: region.len }),
        }
    }
}

impl Backend for CudaBackend {
    type Region = Region;
    type Stream = Stream;
    type Event = Event;
    type Host = PinnedHost;

    fn step_workspace_bytes(&self) -> Option<usize> {
        Some(ATTN_WORKSPACE_BYTES)
    }

    fn handle(self: &Arc<Self>) -> Result<Arc<Self>> {
        Ok(Arc::new(CudaBackend { default: Self::make_stream(&self.dev.ctx, true)?, dev: self.dev.clone() }))
    }

    fn info(&self) -> DeviceInfo {
        let (free, total) =
            self.bind().and_then(|_| drv::mem_get_info().map_err(driver_err("mem info"))).unwrap_or((0, 0));
        DeviceInfo {
            kind: "cuda",
            name: self.dev.name.clone(),
            ordinal: self.dev.ctx.ordinal(),
            memory_total_bytes: total as u64,
            memory_free_bytes: free as u64,
        }
    }

    fn reserve(&self, bytes: usize) -> Result<Region> {
        Self::alloc(&self.dev.ctx, bytes)
    }

    fn alloc_host(&self, bytes: usize) -> Result<PinnedHost> {
        self.bind()?;
        // SAFETY: flags 0 = cached page-locked memory; the pointer is owned by PinnedHost.
        let ptr = unsafe { drv::malloc_host(bytes.max(1), 0) }.map_err(|e| match e.0 {
            sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => BackendError::OutOfMemory { bytes },
            _ => BackendError::Driver { op: "cuMemHostAlloc", msg: e.to_string() },
        })? as *mut u8;
        // SAFETY: `ptr` points to at least `bytes` writable bytes just allocated.
        unsafe { std::ptr::write_bytes(ptr, 0, bytes) };
        Ok(PinnedHost { ptr, len: bytes, ctx: self.dev.ctx.clone() })
    }

    fn new_stream(&self) -> Result<Stream> {
        Self::make_stream(&self.dev.ctx, true)
    }

    fn new_copy_stream(&self) -> Result<Stream> {
        Self::make_stream(&self.dev.ctx, false)
    }

    fn default_stream(&self) -> &Stream {
        &self.default
    }

    fn record(&self, stream: &Stream) -> Result<Event> {
        self.bind()?;
        let event = stream.stream.record_event(None).map_err(driver_err("cuEventRecord"))?;
        Ok(Event(event, stream.err.clone()))
    }

    fn wait(&self, stream: &Stream, event: &Event) -> Result<()> {
        self.bind()?;
        stream.stream.wait(&event.0).map_err(driver_err("cuStreamWaitEvent"))
    }

    fn event_done(&self, event: &Event) -> Result<bool> {
        self.bind()?;
        event.0.try_is_complete().map_err(driver_err("cuEventQuery"))
    }

    fn sync_event(&self, event: &Event) -> Result<()> {
        event.0.synchronize().map_err(driver_err("cuEventSynchronize"))?;
        event.1.take()
    }

    fn sync_stream(&self, stream: &Stream) -> Result<()> {
        self.bind()?;
        stream.stream.synchronize().map_err(driver_err("cuStreamSynchronize"))?;
        stream.err.take()
    }

    fn write(&self, region: &Region, offset: usize, src: &[u8]) -> Result<()> {
        Self::check_range("write", region, offset, src.len())?;
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: destination range checked above; `src` is borrowed until the stream
        // synchronise below returns, after which the device no longer reads it.
        unsafe { drv::memcpy_htod_async(region.ptr + offset as u64, src, self.default.raw()) }
            .map_err(driver_err("cuMemcpyHtoDAsync"))?;
        // A plain copy: kernel input errors stay pending for the next sync_stream/sync_event.
        self.default.stream.synchronize().map_err(driver_err("cuStreamSynchronize"))
    }

    fn dmabuf(&self, region: &mut Region, offset: usize, len: usize) -> Option<crate::backend::DmaBuf> {
        Self::check_range("dmabuf", region, offset, len).ok()?;
        self.bind().ok()?;
        // Exports cover whole host pages: export the pages around the range, say where it starts.
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            p if p > 0 => p as u64,
            _ => 4096,
        };
        let start = region.ptr + offset as u64;
        let base = start & !(page - 1);
        let end = (start + len as u64).next_multiple_of(page);
        let mut fd: std::ffi::c_int = -1;
        // SAFETY: the range lies in a live allocation of this context (checked, rounded to pages;
        // a rounding past the allocation's end is refused by the driver and we return None); the
        // driver writes one int.
        let r = unsafe {
            sys::cuMemGetHandleForAddressRange(
                (&mut fd as *mut std::ffi::c_int).cast::<c_void>(),
                base,
                (end - base) as usize,
                sys::CUmemRangeHandleType::CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD,
                0,
            )
        };
        if r != sys::CUresult::CUDA_SUCCESS || fd < 0 {
            tracing::debug!(?r, "cuMemGetHandleForAddressRange: no dma-buf export (GPUDirect RDMA off)");
            return None;
        }
        // SAFETY: the driver gave us this descriptor; we own it from here.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Some(crate::backend::DmaBuf { fd, offset: start - base, len })
    }

    fn read(&self, region: &Region, offset: usize, dst: &mut [u8]) -> Result<()> {
        Self::check_range("read", region, offset, dst.len())?;
        if dst.is_empty() {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: source range checked above; `dst` is exclusively borrowed until the stream
        // synchronise below returns, after which the device no longer writes it.
        unsafe { drv::memcpy_dtoh_async(dst, region.ptr + offset as u64, self.default.raw()) }
            .map_err(driver_err("cuMemcpyDtoHAsync"))?;
        self.default.stream.synchronize().map_err(driver_err("cuStreamSynchronize"))
    }

    fn copy(
        &self,
        stream: &Stream,
        src: &Region,
        src_offset: usize,
        dst: &Region,
        dst_offset: usize,
        bytes: usize,
    ) -> Result<()> {
        Self::check_range("copy src", src, src_offset, bytes)?;
        Self::check_range("copy dst", dst, dst_offset, bytes)?;
        if src.ptr == dst.ptr && src_offset < dst_offset + bytes && dst_offset < src_offset + bytes {
            return Err(BackendError::Overlap { op: "copy", operand: "src" });
        }
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: both ranges checked against their live regions.
        unsafe { drv::memcpy_dtod_async(dst.ptr + dst_offset as u64, src.ptr + src_offset as u64, bytes, stream.raw()) }
            .map_err(driver_err("cuMemcpyDtoDAsync"))
    }

    unsafe fn copy_h2d_async(
        &self,
        stream: &Stream,
        host: &PinnedHost,
        host_offset: usize,
        region: &Region,
        offset: usize,
        bytes: usize,
    ) -> Result<()> {
        Self::check_range("copy_h2d_async", region, offset, bytes)?;
        let src =
            host.as_slice().get(host_offset..host_offset.saturating_add(bytes)).ok_or(BackendError::OutOfBounds {
                op: "copy_h2d_async",
                operand: "host",
                offset: host_offset,
                bytes,
                region_bytes: host.len,
            })?;
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: ranges checked; the caller keeps `host` alive and unwritten until an event
        // recorded after this call completes (this function's contract).
        unsafe { drv::memcpy_htod_async(region.ptr + offset as u64, src, stream.raw()) }
            .map_err(driver_err("cuMemcpyHtoDAsync"))
    }

    unsafe fn copy_d2h_async(
        &self,
        stream: &Stream,
        region: &Region,
        offset: usize,
        host: &mut PinnedHost,
        host_offset: usize,
        bytes: usize,
    ) -> Result<()> {
        Self::check_range("copy_d2h_async", region, offset, bytes)?;
        let len = host.len;
        let dst = host.as_mut_slice().get_mut(host_offset..host_offset.saturating_add(bytes)).ok_or(
            BackendError::OutOfBounds {
                op: "copy_d2h_async",
                operand: "host",
                offset: host_offset,
                bytes,
                region_bytes: len,
            },
        )?;
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        // SAFETY: ranges checked; the caller keeps `host` alive and untouched until an event
        // recorded after this call completes (this function's contract).
        unsafe { drv::memcpy_dtoh_async(dst, region.ptr + offset as u64, stream.raw()) }
            .map_err(driver_err("cuMemcpyDtoHAsync"))
    }

    fn gemm(&self, s: &Stream, a: View<Self>, b: View<Self>, c: View<Self>, args: &GemmArgs) -> Result<()> {
        self.gemm_impl(s, a, b, c, args)
    }

    fn binary(&self, s: &Stream, op: BinaryOp, a: View<Self>, b: View<Self>, out: View<Self>) -> Result<()> {
        self.binary_impl(s, op, a, b, out)
    }

    fn unary(&self, s: &Stream, op: UnaryOp, x: View<Self>, out: View<Self>) -> Result<()> {
        self.unary_impl(s, op, x, out)
    }

    fn cast(&self, s: &Stream, x: View<Self>, out: View<Self>) -> Result<()> {
        self.cast_impl(s, x, out)
    }

    fn silu_mul(&self, s: &Stream, gate: View<Self>, up: View<Self>, out: View<Self>) -> Result<()> {
        self.silu_mul_impl(s, gate, up, out)
    }

    fn softmax(&self, s: &Stream, x: View<Self>, out: View<Self>, cols: usize) -> Result<()> {
        self.softmax_impl(s, x, out, cols)
    }

    fn embedding(&self, s: &Stream, table: View<Self>, ids: View<Self>, out: View<Self>, hidden: usize) -> Result<()> {
        self.embedding_impl(s, table, ids, out, hidden)
    }

    fn rms_norm(
        &self,
        s: &Stream,
        x: View<Self>,
        residual: Option<View<Self>>,
        weight: View<Self>,
        out: View<Self>,
        hidden: usize,
        eps: f32,
    ) -> Result<()> {
        self.rms_norm_impl(s, x, residual, weight, out, hidden, eps)
    }

    fn rope(
        &self,
        s: &Stream,
        x: View<Self>,
        positions: View<Self>,
        inv_freq: View<Self>,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        self.rope_impl(s, x, positions, inv_freq, heads, head_dim)
    }

    fn kv_append(
        &self,
        s: &Stream,
        k: View<Self>,
        v: View<Self>,
        cache: &KvCacheRef<Self>,
        layer: usize,
        slots: View<Self>,
    ) -> Result<()> {
        self.kv_append_impl(s, k, v, cache, layer, slots)
    }

    fn attention(
        &self,
        s: &Stream,
        q: View<Self>,
        cache: &KvCacheRef<Self>,
        layer: usize,
        batch: &AttnBatch<Self>,
        out: View<Self>,
        heads: usize,
        scale: f32,
    ) -> Result<()> {
        self.attention_impl(s, q, cache, layer, batch, out, heads, scale)
    }

    fn copy_blocks(&self, s: &Stream, cache: &KvCacheRef<Self>, pairs: View<Self>) -> Result<()> {
        self.copy_blocks_impl(s, cache, pairs)
    }

    fn gather_blocks(&self, s: &Stream, cache: &KvCacheRef<Self>, ids: View<Self>, staging: View<Self>) -> Result<()> {
        self.gather_blocks_impl(s, cache, ids, staging)
    }

    fn scatter_blocks(&self, s: &Stream, staging: View<Self>, cache: &KvCacheRef<Self>, ids: View<Self>) -> Result<()> {
        self.scatter_blocks_impl(s, staging, cache, ids)
    }

    fn argmax(&self, s: &Stream, logits: View<Self>, out: View<Self>, vocab: usize) -> Result<()> {
        self.argmax_impl(s, logits, out, vocab)
    }

    fn sample(
        &self,
        s: &Stream,
        logits: View<Self>,
        out: View<Self>,
        vocab: usize,
        params: &[SampleParams],
    ) -> Result<()> {
        self.sample_impl(s, logits, out, vocab, params)
    }
}

/// Kernel parameter list: each argument is a reference to a local of the kernel's C type.
macro_rules! kargs {
    ($($a:expr),* $(,)?) => {
        [$( ($a) as *const _ as *mut ::std::ffi::c_void ),*]
    };
}
pub(crate) use kargs;

impl CudaBackend {
    /// Launches `name` on `s` with a 1-D block.
    ///
    /// # Safety
    /// `params` must match the kernel's C signature exactly (count, order, types) and every
    /// pointer among them must address memory the kernel may access for the launch's extent.
    pub(crate) unsafe fn launch(
        &self,
        s: &Stream,
        name: &'static str,
        grid: (u32, u32, u32),
        block: u32,
        smem_bytes: u32,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        let f = self.dev.kernels.get(name)?;
        if smem_bytes > 48 * 1024 {
            // Opt in to more than the default 48 KiB of dynamic shared memory (sm_80+: up to
            // 163 KiB / 227 KiB); a request beyond the device limit fails the launch below.
            // SAFETY: `f` is a live function handle of this context.
            unsafe {
                drv::function::set_function_attribute(
                    f.0,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    smem_bytes as i32,
                )
            }
            .map_err(driver_err(name))?;
        }
        // SAFETY: the caller guarantees the parameter list (this function's contract); the
        // function handle belongs to this context, which `bind` made current.
        unsafe { drv::launch_kernel(f.0, grid, (block, 1, 1), smem_bytes, s.raw(), params) }.map_err(driver_err(name))
    }
}
