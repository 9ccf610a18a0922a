//! The CPU backend: the reference every other backend is tested against, and the default on
//! machines without a GPU.
//!
//! Memory: a region is an anonymous page-aligned host mapping ([`CpuRegion`]); host buffers are
//! the same, page-locked best-effort ([`CpuHostBuf`]).
//!
//! Execution is eager: every op runs to completion before it returns, on the calling thread plus
//! the backend's own workers (module `pool`: `threads - 1` of them, spinning briefly between ops so a
//! decode step's stream of small ops pays no thread wake-ups); the `gemm` crate's GEMM (prefill)
//! runs single-threaded on column panels spread over the same workers, so no second pool competes
//! with them for the cores. Streams therefore only name an ordering that already holds, events are complete when recorded, `wait`/`sync_*` return
//! at once, and the "async" copies are synchronous copies (their `# Safety` contract still holds
//! trivially).
//!
//! Every op validates its operands before touching memory: bounds and alignment inside their
//! regions, dtypes, shapes, index ranges (token ids, slots, block ids), and that outputs do not
//! overlap inputs except where the op is documented to work in place. Compute is f32 whatever the
//! storage dtype (f32/f16/bf16); results round to nearest-even on store.
//!
//! Vector code: x86-64 AVX-512F and AVX2+FMA+F16C are detected at run time (never
//! `target-cpu=native`); the GEMV has hand-written kernels for both, the other hot loops are
//! compiled twice (`multiversion!`, AVX2). `DJINN_CPU_SIMD=avx2|portable` caps the level; the
//! GEMV's unit test runs every level the machine has against an f64 product.
//! Scratch: per-thread f32 buffers that only grow (`raw::with_scratch`), so after warm-up an op
//! allocates nothing except `copy_blocks`/`scatter_blocks`' duplicate checks.

mod attention;
mod elementwise;
mod gemm;
mod mem;
mod pool;
mod quant;
mod raw;
mod sample;

pub use self::gemm::{simd_level, simd_levels_available, SimdLevel};
pub use self::mem::{CpuHostBuf, CpuRegion};
use self::raw::{float, operand, range, typed, Raw};
use crate::backend::{
    AttnBatch, Backend, BinaryOp, DeviceInfo, GemmArgs, KvCacheRef, RegionInfo, SampleParams, UnaryOp, View,
};
use crate::error::{BackendError, Result};
use crate::validate;
use crate::{DType, QuantType};

/// The CPU backend's stream: a name for an ordering that eager execution already provides.
#[derive(Debug, Default)]
pub struct CpuStream(());

/// A CPU event: complete from the moment it is recorded (execution is eager).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuEvent(());

pub struct CpuBackend {
    workers: pool::Pool,
    threads: usize,
    stream: CpuStream,
}

impl std::fmt::Debug for CpuBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuBackend").field("threads", &self.threads).finish()
    }
}

impl CpuBackend {
    /// A backend with one worker per available core.
    pub fn new() -> Result<CpuBackend> {
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        CpuBackend::with_threads(threads)
    }

    /// A backend with a pool of exactly `threads` workers (at least 1).
    pub fn with_threads(threads: usize) -> Result<CpuBackend> {
        let threads = threads.max(1);
        let workers = pool::Pool::new(threads).map_err(|e| BackendError::NoDevice(format!("cpu workers: {e}")))?;
        Ok(CpuBackend { workers, threads, stream: CpuStream(()) })
    }

    /// Worker threads in the pool.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(i)` for every `i in 0..n` on the backend's workers and the calling thread, the way
    /// every op of this backend spreads its chunks (for benchmarks that want the same threads).
    pub fn parallel_for(&self, n: usize, f: impl Fn(usize) + Sync) {
        self.workers.run(n, &f);
    }

    /// Calls `f(start, len)` for consecutive chunks of `0..total`: on the calling thread when there
    /// is one chunk, else spread over the workers.
    pub(crate) fn for_chunks(&self, total: usize, chunk: usize, f: impl Fn(usize, usize) + Sync) {
        if total == 0 {
            return;
        }
        // Never more chunks than one job holds.
        let chunk = chunk.max(1).max(total.div_ceil(pool::CHUNKS_MAX));
        let n = total.div_ceil(chunk);
        self.workers.run(n, &|i: usize| {
            let start = i * chunk;
            f(start, chunk.min(total - start))
        });
    }

    /// A chunk size that gives each worker a few chunks of at least `min` items.
    pub(crate) fn chunk_for(&self, total: usize, min: usize) -> usize {
        total.div_ceil(self.threads * 4).max(min)
    }
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned())
}

fn memory_bytes() -> (u64, u64) {
    // SAFETY: sysinfo fills the zeroed struct it is given and reads nothing else.
    unsafe {
        let mut si: libc::sysinfo = std::mem::zeroed();
        if libc::sysinfo(&mut si) == 0 {
            let unit = si.mem_unit.max(1) as u64;
            return (si.totalram as u64 * unit, (si.freeram as u64 + si.bufferram as u64) * unit);
        }
    }
    (0, 0)
}

/// The cache's byte range, checked, as a `U8` raw range.
fn cache_raw(op: &'static str, cache: &KvCacheRef<'_, CpuBackend>) -> Result<Raw> {
    let l = &cache.layout;
    if !l.dtype.is_float() {
        return Err(BackendError::DType { op, operand: "cache", got: l.dtype, expected: "f32, f16 or bf16" });
    }
    if l.block_tokens == 0 || l.head_dim == 0 || l.kv_heads == 0 || l.layers == 0 {
        return Err(raw::shape(op, format!("degenerate KV layout {l:?}")));
    }
    if !cache.offset.is_multiple_of(l.dtype.size_bytes()) {
        return Err(raw::shape(op, format!("cache offset {} is not aligned to {}", cache.offset, l.dtype)));
    }
    let bytes = l.block_bytes().checked_mul(cache.num_blocks).ok_or(BackendError::OutOfBounds {
        op,
        operand: "cache",
        offset: cache.offset,
        bytes: usize::MAX,
        region_bytes: cache.region.len_bytes(),
    })?;
    let ptr = range(op, "cache", cache.region, cache.offset, bytes)?;
    Ok(Raw { ptr, dtype: DType::U8, len: bytes })
}

impl Backend for CpuBackend {
    type Region = CpuRegion;
    type Stream = CpuStream;
    type Event = CpuEvent;
    type Host = CpuHostBuf;

    fn quiesce(&self) {
        self.workers.quiesce();
    }

    fn info(&self) -> DeviceInfo {
        let (total, free) = memory_bytes();
        DeviceInfo { kind: "cpu", name: cpu_name(), ordinal: 0, memory_total_bytes: total, memory_free_bytes: free }
    }

    fn reserve(&self, bytes: usize) -> Result<CpuRegion> {
        CpuRegion::new(bytes)
    }
    fn alloc_host(&self, bytes: usize) -> Result<CpuHostBuf> {
        CpuHostBuf::new(bytes)
    }
    fn new_stream(&self) -> Result<CpuStream> {
        Ok(CpuStream(()))
    }
    fn default_stream(&self) -> &CpuStream {
        &self.stream
    }
    fn record(&self, _stream: &CpuStream) -> Result<CpuEvent> {
        Ok(CpuEvent(()))
    }
    fn wait(&self, _stream: &CpuStream, _event: &CpuEvent) -> Result<()> {
        Ok(())
    }
    fn event_done(&self, _event: &CpuEvent) -> Result<bool> {
        Ok(true)
    }
    fn sync_event(&self, _event: &CpuEvent) -> Result<()> {
        Ok(())
    }
    fn sync_stream(&self, _stream: &CpuStream) -> Result<()> {
        Ok(())
    }

    fn write(&self, region: &CpuRegion, offset: usize, src: &[u8]) -> Result<()> {
        let dst = range("write", "dst", region, offset, src.len())?;
        // SAFETY: `dst..+len` is inside the region (checked); `src` is a Rust slice, which cannot
        // alias the region's memory (the region is only reachable through raw pointers).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
        Ok(())
    }

    fn host_bytes_mut<'r>(&self, region: &'r mut CpuRegion, offset: usize, len: usize) -> Option<&'r mut [u8]> {
        region.bytes_mut(offset, len)
    }

    unsafe fn host_bytes<'r>(&self, region: &'r CpuRegion, offset: usize, len: usize) -> Option<&'r [u8]> {
        // SAFETY: the caller takes over this method's contract, which is `bytes`'s.
        unsafe { region.bytes(offset, len) }
    }

    fn read(&self, region: &CpuRegion, offset: usize, dst: &mut [u8]) -> Result<()> {
        let src = range("read", "src", region, offset, dst.len())?;
        // SAFETY: as in `write`, with the roles swapped.
        unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn copy(
        &self,
        _stream: &CpuStream,
        src: &CpuRegion,
        src_offset: usize,
        dst: &CpuRegion,
        dst_offset: usize,
        bytes: usize,
    ) -> Result<()> {
        let s = Raw { ptr: range("copy", "src", src, src_offset, bytes)?, dtype: DType::U8, len: bytes };
        let d = Raw { ptr: range("copy", "dst", dst, dst_offset, bytes)?, dtype: DType::U8, len: bytes };
        raw::disjoint("copy", "src", &d, &s)?;
        elementwise::copy_bytes(self, &s, &d);
        Ok(())
    }

    unsafe fn copy_h2d_async(
        &self,
        _stream: &CpuStream,
        host: &CpuHostBuf,
        host_offset: usize,
        region: &CpuRegion,
        offset: usize,
        bytes: usize,
    ) -> Result<()> {
        let end = host_offset.checked_add(bytes).filter(|&e| e <= host.len_bytes());
        if end.is_none() {
            return Err(BackendError::OutOfBounds {
                op: "copy_h2d_async",
                operand: "host",
                offset: host_offset,
                bytes,
                region_bytes: host.len_bytes(),
            });
        }
        let d = range("copy_h2d_async", "region", region, offset, bytes)?;
        // SAFETY: both ranges are checked; host buffers and regions are distinct mappings.
        let s = Raw { ptr: unsafe { host.base().add(host_offset) }, dtype: DType::U8, len: bytes };
        elementwise::copy_bytes(self, &s, &Raw { ptr: d, dtype: DType::U8, len: bytes });
        Ok(())
    }

    unsafe fn copy_d2h_async(
        &self,
        _stream: &CpuStream,
        region: &CpuRegion,
        offset: usize,
        host: &mut CpuHostBuf,
        host_offset: usize,
        bytes: usize,
    ) -> Result<()> {
        let end = host_offset.checked_add(bytes).filter(|&e| e <= host.len_bytes());
        if end.is_none() {
            return Err(BackendError::OutOfBounds {
                op: "copy_d2h_async",
                operand: "host",
                offset: host_offset,
                bytes,
                region_bytes: host.len_bytes(),
            });
        }
        let s = range("copy_d2h_async", "region", region, offset, bytes)?;
        // SAFETY: both ranges are checked; host buffers and regions are distinct mappings.
        let d = Raw { ptr: unsafe { host.base().add(host_offset) }, dtype: DType::U8, len: bytes };
        elementwise::copy_bytes(self, &Raw { ptr: s, dtype: DType::U8, len: bytes }, &d);
        Ok(())
    }

    fn gemm(&self, _s: &CpuStream, a: View<Self>, b: View<Self>, c: View<Self>, args: &GemmArgs) -> Result<()> {
        let op = "gemm";
        validate::gemm(&a, &b, &c)?;
        let (a, b, c) = (float(op, "a", &a)?, float(op, "b", &b)?, float(op, "c", &c)?);
        gemm::gemm(self, &a, &b, &c, args)
    }

    fn quantized_weights(&self) -> bool {
        true
    }

    fn gemm_quant(
        &self,
        _s: &CpuStream,
        a: View<Self>,
        w: View<Self>,
        wtype: QuantType,
        c: View<Self>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        let op = "gemm_quant";
        let (a, w, c) =
            (typed(op, "a", &a, DType::F32)?, typed(op, "w", &w, DType::U8)?, typed(op, "c", &c, DType::F32)?);
        let row_bytes = wtype
            .row_bytes(k)
            .ok_or_else(|| raw::shape(op, format!("k = {k} is not a whole number of {wtype} blocks")))?;
        let need = |r: &Raw, name: &str, want: Option<usize>| match want {
            Some(w) if r.len >= w => Ok(()),
            _ => Err(raw::shape(op, format!("{name} has {} elements, needs {want:?} for m={m} n={n} k={k}", r.len))),
        };
        need(&a, "a", m.checked_mul(k))?;
        need(&w, "w", n.checked_mul(row_bytes))?;
        need(&c, "c", m.checked_mul(n))?;
        raw::disjoint(op, "a", &c, &a)?;
        raw::disjoint(op, "w", &c, &w)?;
        if m > 0 && n > 0 && k > 0 {
            quant::gemm(self, &a, w.ptr, wtype, &c, m, n, k);
        }
        Ok(())
    }

    fn embedding_quant(
        &self,
        _s: &CpuStream,
        table: View<Self>,
        wtype: QuantType,
        ids: View<Self>,
        out: View<Self>,
        hidden: usize,
    ) -> Result<()> {
        let op = "embedding_quant";
        let (t, ids, out) = (
            typed(op, "table", &table, DType::U8)?,
            typed(op, "ids", &ids, DType::I32)?,
            typed(op, "out", &out, DType::F32)?,
        );
        let row_bytes = wtype.row_bytes(hidden).filter(|&r| r > 0 && t.len % r == 0).ok_or_else(|| {
            raw::shape(op, format!("table of {} bytes is not rows of {hidden} {wtype} values", t.len))
        })?;
        raw::len_eq(op, "out", &out, ids.len * hidden)?;
        raw::disjoint(op, "table", &out, &t)?;
        raw::disjoint(op, "ids", &out, &ids)?;
        let vocab = t.len / row_bytes;
        // SAFETY: `ids` is a checked i32 operand, not written by this op (disjoint from `out`).
        let idv = unsafe { raw::ints(&ids) };
        if let Some((i, id)) = idv.iter().enumerate().find(|(_, &id)| id < 0 || id as usize >= vocab) {
            return Err(raw::shape(op, format!("ids[{i}] = {id} is outside the vocabulary of {vocab}")));
        }
        // SAFETY: `out` is a checked f32 operand disjoint from both inputs.
        quant::embedding(t.ptr, wtype, idv, unsafe { out.slice_mut::<f32>() }, hidden);
        Ok(())
    }

    fn binary(&self, _s: &CpuStream, op: BinaryOp, a: View<Self>, b: View<Self>, out: View<Self>) -> Result<()> {
        let name = "binary";
        validate::binary(name, ["a", "b"], &a, &b, &out)?;
        let (a, b, out) = (float(name, "a", &a)?, float(name, "b", &b)?, float(name, "out", &out)?);
        raw::len_eq(name, "out", &out, a.len)?;
        if b.len == 0 || a.len % b.len != 0 {
            return Err(raw::shape(name, format!("b has {} elements, which does not divide a's {}", b.len, a.len)));
        }
        elementwise::binary(self, op, &a, &b, &out);
        Ok(())
    }

    fn unary(&self, _s: &CpuStream, op: UnaryOp, x: View<Self>, out: View<Self>) -> Result<()> {
        let name = "unary";
        validate::unary(name, &x, &out)?;
        let (x, out) = (float(name, "x", &x)?, float(name, "out", &out)?);
        raw::len_eq(name, "out", &out, x.len)?;
        elementwise::unary(self, op, &x, &out);
        Ok(())
    }

    fn cast(&self, _s: &CpuStream, x: View<Self>, out: View<Self>) -> Result<()> {
        let name = "cast";
        validate::unary(name, &x, &out)?;
        let (x, out) = (operand(name, "x", &x)?, operand(name, "out", &out)?);
        for (r, n) in [(&x, "x"), (&out, "out")] {
            if !(r.dtype.is_float() || r.dtype == DType::I32) {
                return Err(BackendError::DType {
                    op: name,
                    operand: n,
                    got: r.dtype,
                    expected: "f32, f16, bf16 or i32",
                });
            }
        }
        raw::len_eq(name, "out", &out, x.len)?;
        if out.same(&x) {
            return Ok(());
        }
        elementwise::cast(self, &x, &out);
        Ok(())
    }

    fn silu_mul(&self, _s: &CpuStream, gate: View<Self>, up: View<Self>, out: View<Self>) -> Result<()> {
        let name = "silu_mul";
        validate::binary(name, ["gate", "up"], &gate, &up, &out)?;
        let (g, u, out) = (float(name, "gate", &gate)?, float(name, "up", &up)?, float(name, "out", &out)?);
        raw::len_eq(name, "up", &u, g.len)?;
        raw::len_eq(name, "out", &out, g.len)?;
        elementwise::silu_mul(self, &g, &u, &out);
        Ok(())
    }

    fn softmax(&self, _s: &CpuStream, x: View<Self>, out: View<Self>, cols: usize) -> Result<()> {
        let name = "softmax";
        validate::unary(name, &x, &out)?;
        let (x, out) = (float(name, "x", &x)?, float(name, "out", &out)?);
        raw::len_eq(name, "out", &out, x.len)?;
        if cols == 0 || x.len % cols != 0 {
            return Err(raw::shape(name, format!("{} elements are not whole rows of {cols}", x.len)));
        }
        elementwise::softmax(self, &x, &out, cols);
        Ok(())
    }

    fn embedding(
        &self,
        _s: &CpuStream,
        table: View<Self>,
        ids: View<Self>,
        out: View<Self>,
        hidden: usize,
    ) -> Result<()> {
        let op = "embedding";
        validate::embedding(&table, &ids, &out)?;
        let (t, ids, out) = (float(op, "table", &table)?, typed(op, "ids", &ids, DType::I32)?, float(op, "out", &out)?);
        if hidden == 0 || t.len % hidden != 0 {
            return Err(raw::shape(op, format!("table of {} elements is not rows of {hidden}", t.len)));
        }
        raw::len_eq(op, "out", &out, ids.len * hidden)?;
        let vocab = t.len / hidden;
        // SAFETY: `ids` is a checked i32 operand, not written by this op (disjoint from `out`).
        if let Some((i, id)) =
            unsafe { raw::ints(&ids) }.iter().enumerate().find(|(_, &id)| id < 0 || id as usize >= vocab)
        {
            return Err(raw::shape(op, format!("ids[{i}] = {id} is outside the vocabulary of {vocab}")));
        }
        elementwise::embedding(self, &t, &ids, &out, hidden);
        Ok(())
    }

    fn rms_norm(
        &self,
        _s: &CpuStream,
        x: View<Self>,
        residual: Option<View<Self>>,
        weight: View<Self>,
        out: View<Self>,
        hidden: usize,
        eps: f32,
    ) -> Result<()> {
        let op = "rms_norm";
        validate::rms_norm(&x, residual.as_ref(), &weight, &out)?;
        let (x, w, out) = (float(op, "x", &x)?, float(op, "weight", &weight)?, float(op, "out", &out)?);
        if hidden == 0 || x.len % hidden != 0 {
            return Err(raw::shape(op, format!("x of {} elements is not rows of {hidden}", x.len)));
        }
        raw::len_eq(op, "weight", &w, hidden)?;
        raw::len_eq(op, "out", &out, x.len)?;
        let res = match residual {
            Some(r) => {
                let r = float(op, "residual", &r)?;
                raw::len_eq(op, "residual", &r, x.len)?;
                Some(r)
            }
            None => None,
        };
        elementwise::rms_norm(self, &x, res.as_ref(), &w, &out, hidden, eps);
        Ok(())
    }

    fn rope(
        &self,
        _s: &CpuStream,
        x: View<Self>,
        positions: View<Self>,
        inv_freq: View<Self>,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        let op = "rope";
        validate::rope(&x, &positions, &inv_freq)?;
        let x = float(op, "x", &x)?;
        let pos = typed(op, "positions", &positions, DType::I32)?;
        let f = typed(op, "inv_freq", &inv_freq, DType::F32)?;
        if head_dim == 0 || !head_dim.is_multiple_of(2) || heads == 0 || x.len % (heads * head_dim) != 0 {
            return Err(raw::shape(op, format!("x of {} elements is not [tokens, {heads}, {head_dim}] (even)", x.len)));
        }
        raw::len_eq(op, "positions", &pos, x.len / (heads * head_dim))?;
        raw::len_eq(op, "inv_freq", &f, head_dim / 2)?;
        elementwise::rope(self, &x, &pos, &f, heads, head_dim);
        Ok(())
    }

    fn kv_append(
        &self,
        _s: &CpuStream,
        k: View<Self>,
        v: View<Self>,
        cache: &KvCacheRef<Self>,
        layer: usize,
        slots: View<Self>,
    ) -> Result<()> {
        let op = "kv_append";
        validate::kv_append(&k, &v, cache, &slots)?;
        let c = cache_raw(op, cache)?;
        let (k, v) = (float(op, "k", &k)?, float(op, "v", &v)?);
        let slots = typed(op, "slots", &slots, DType::I32)?;
        attention::kv_append(self, &k, &v, &c, &cache.layout, cache.num_blocks, layer, &slots)
    }

    fn attention(
        &self,
        _s: &CpuStream,
        q: View<Self>,
        cache: &KvCacheRef<Self>,
        layer: usize,
        batch: &AttnBatch<Self>,
        out: View<Self>,
        heads: usize,
        scale: f32,
    ) -> Result<()> {
        let op = "attention";
        validate::attention(&q, cache, batch, &out)?;
        let c = cache_raw(op, cache)?;
        let (q, out) = (float(op, "q", &q)?, float(op, "out", &out)?);
        let q_start = typed(op, "q_start", &batch.q_start, DType::I32)?;
        let ctx = typed(op, "ctx_lens", &batch.ctx_lens, DType::I32)?;
        let tables = typed(op, "block_tables", &batch.block_tables, DType::I32)?;
        let idx = attention::BatchIdx { seqs: batch.seqs, q_start, ctx, tables, max_blocks: batch.max_blocks_per_seq };
        attention::attention(self, &q, &c, &cache.layout, cache.num_blocks, layer, &idx, &out, heads, scale)
    }

    fn copy_blocks(&self, _s: &CpuStream, cache: &KvCacheRef<Self>, pairs: View<Self>) -> Result<()> {
        let op = "copy_blocks";
        validate::copy_blocks(cache, &pairs)?;
        let c = cache_raw(op, cache)?;
        let pairs = typed(op, "pairs", &pairs, DType::I32)?;
        attention::copy_blocks(self, &c, cache.layout.block_bytes(), cache.num_blocks, &pairs)
    }

    fn gather_blocks(
        &self,
        _s: &CpuStream,
        cache: &KvCacheRef<Self>,
        ids: View<Self>,
        staging: View<Self>,
    ) -> Result<()> {
        let op = "gather_blocks";
        validate::move_blocks(op, true, cache, &ids, &staging)?;
        let c = cache_raw(op, cache)?;
        let ids = typed(op, "ids", &ids, DType::I32)?;
        let st = operand(op, "staging", &staging)?;
        attention::move_blocks(self, op, &c, cache.layout.block_bytes(), cache.num_blocks, &ids, &st, true)
    }

    fn scatter_blocks(
        &self,
        _s: &CpuStream,
        staging: View<Self>,
        cache: &KvCacheRef<Self>,
        ids: View<Self>,
    ) -> Result<()> {
        let op = "scatter_blocks";
        validate::move_blocks(op, false, cache, &ids, &staging)?;
        let c = cache_raw(op, cache)?;
        let ids = typed(op, "ids", &ids, DType::I32)?;
        let st = operand(op, "staging", &staging)?;
        attention::move_blocks(self, op, &c, cache.layout.block_bytes(), cache.num_blocks, &ids, &st, false)
    }

    fn argmax(&self, _s: &CpuStream, logits: View<Self>, out: View<Self>, vocab: usize) -> Result<()> {
        let op = "argmax";
        validate::select(op, &logits, &out)?;
        let (l, out) = (float(op, "logits", &logits)?, typed(op, "out", &out, DType::I32)?);
        if vocab == 0 || l.len % vocab != 0 {
            return Err(raw::shape(op, format!("{} logits are not rows of {vocab}", l.len)));
        }
        raw::len_eq(op, "out", &out, l.len / vocab)?;
        sample::argmax(self, &l, &out, vocab);
        Ok(())
    }

    fn sample(
        &self,
        _s: &CpuStream,
        logits: View<Self>,
        out: View<Self>,
        vocab: usize,
        params: &[SampleParams],
    ) -> Result<()> {
        let op = "sample";
        validate::select(op, &logits, &out)?;
        let (l, out) = (float(op, "logits", &logits)?, typed(op, "out", &out, DType::I32)?);
        if vocab == 0 || l.len % vocab != 0 {
            return Err(raw::shape(op, format!("{} logits are not rows of {vocab}", l.len)));
        }
        let rows = l.len / vocab;
        raw::len_eq(op, "out", &out, rows)?;
        if params.len() != rows {
            return Err(raw::shape(op, format!("{} sampling parameters for {rows} rows", params.len())));
        }
        sample::sample(self, &l, &out, vocab, params);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{sample_uniform, HostBuf};

    #[test]
    fn regions_are_page_aligned_zeroed_and_exact() {
        let be = CpuBackend::with_threads(2).unwrap();
        let r = be.reserve(10_000).unwrap();
        assert_eq!(r.len_bytes(), 10_000);
        assert_eq!(r.as_ptr() as usize % mem::page_size(), 0);
        let mut back = vec![1u8; 10_000];
        be.read(&r, 0, &mut back).unwrap();
        assert!(back.iter().all(|b| *b == 0));
        let empty = be.reserve(0).unwrap();
        assert!(be.write(&empty, 0, &[]).is_ok());
        assert!(matches!(be.write(&empty, 0, &[1]), Err(BackendError::OutOfBounds { .. })));
    }

    #[test]
    fn host_buffers_round_trip() {
        let be = CpuBackend::new().unwrap();
        let mut h = be.alloc_host(5000).unwrap();
        assert_eq!(h.as_slice().len(), 5000);
        h.as_mut_slice()[4999] = 7;
        assert_eq!(h.as_slice()[4999], 7);
    }

    #[test]
    fn host_bytes_are_the_region_and_bounds_checked() {
        let be = CpuBackend::new().unwrap();
        let mut r = be.reserve(8192).unwrap();
        be.host_bytes_mut(&mut r, 4096, 4).unwrap().copy_from_slice(&[1, 2, 3, 4]);
        let mut back = [0u8; 4];
        be.read(&r, 4096, &mut back).unwrap();
        assert_eq!(back, [1, 2, 3, 4]);
        be.write(&r, 10, &[9]).unwrap();
        // SAFETY: nothing writes `r` while the slice lives.
        assert_eq!(unsafe { be.host_bytes(&r, 8, 4) }.unwrap(), [0, 0, 9, 0]);
        assert!(be.host_bytes_mut(&mut r, 8190, 3).is_none());
        assert!(be.host_bytes_mut(&mut r, usize::MAX, 2).is_none());
        // SAFETY: as above.
        assert!(unsafe { be.host_bytes(&r, 8192, 1) }.is_none());
        assert_eq!(be.host_bytes_mut(&mut r, 8192, 0).map(|s| s.len()), Some(0));
        let mut empty = be.reserve(0).unwrap();
        assert_eq!(be.host_bytes_mut(&mut empty, 0, 0).map(|s| s.len()), Some(0));
    }

    #[test]
    fn misaligned_operands_are_rejected() {
        let be = CpuBackend::new().unwrap();
        let r = be.reserve(4096).unwrap();
        let s = be.default_stream();
        let e = be.unary(s, UnaryOp::Neg, View::new(&r, 2, DType::F32, 4), View::new(&r, 1024, DType::F32, 4));
        assert!(matches!(e, Err(BackendError::Shape { .. })), "{e:?}");
    }

    #[test]
    fn uniform_draws_are_reproducible_and_in_range() {
        let mut sum = 0.0f64;
        for step in 0..10_000u64 {
            let u = sample_uniform(42, step);
            assert!((0.0..1.0).contains(&u));
            assert_eq!(u, sample_uniform(42, step));
            sum += u as f64;
        }
        assert!((sum / 10_000.0 - 0.5).abs() < 0.02, "mean {}", sum / 10_000.0);
        assert_ne!(sample_uniform(1, 0), sample_uniform(2, 0));
    }
}
