//! The compute seam. Everything the server executes goes through [`Backend`].
//!
//! Memory: a backend reserves [`Backend::Region`]s (one driver allocation each; the VMU reserves
//! one per device at start-up and carves it). Operands are [`View`]s: a region, a byte offset, a
//! dtype and an element count. Every op checks that its operands lie inside their regions and
//! that its outputs do not overlap its inputs (unless the op says it works in place).
//! The elementwise and row-wise ops (`binary`, `unary`, `silu_mul`, `softmax`, `rms_norm`'s `x`)
//! work in place when `out` is exactly an input (same region, offset, dtype and length); any
//! partial overlap is [`crate::BackendError::Overlap`]. Operand offsets are multiples of the
//! element size. Float operands of one op may have different storage dtypes.
//!
//! Ordering: work is issued on a [`Backend::Stream`] and runs in issue order on that stream;
//! [`Backend::Event`]s mark completion. The CPU backend executes eagerly on the calling thread, so
//! its events are complete on return; the CUDA backend is asynchronous.
//!
//! Regions are `Send` but need not be `Sync`: whoever issues work on a region holds it, which is
//! what keeps the CPU backend (plain host memory written through `&Region`) free of data races.
//!
//! Handles: a backend value is a *handle* on a device. [`Backend::handle`] makes another handle
//! on the same device — same memory (a region of one handle is an operand of every other), same
//! kernels — with its own default stream and whatever per-stream state the backend keeps (the
//! CUDA backend: workspace, cuBLAS handle, device error word). Each independent user (the engine
//! of each model, each Exec in flight) works through a handle of its own, so their op sequences,
//! synchronous copies ([`Backend::write`]/[`Backend::read`] are ordered on the handle's default
//! stream) and error reports never meet.

use std::sync::Arc;

use crate::error::Result;
use crate::{DType, KvLayout, QuantType};

/// A typed window into a region: `len` elements of `dtype` starting `offset` bytes in.
pub struct View<'a, B: Backend + ?Sized> {
    pub region: &'a B::Region,
    pub offset: usize,
    pub dtype: DType,
    pub len: usize,
}

impl<'a, B: Backend + ?Sized> View<'a, B> {
    pub fn new(region: &'a B::Region, offset: usize, dtype: DType, len: usize) -> Self {
        View { region, offset, dtype, len }
    }
    pub fn bytes(&self) -> usize {
        self.len * self.dtype.size_bytes()
    }
    /// A sub-view of `len` elements starting `first` elements in (same dtype).
    pub fn slice(&self, first: usize, len: usize) -> Self {
        assert!(first + len <= self.len, "View::slice out of range");
        View { region: self.region, offset: self.offset + first * self.dtype.size_bytes(), dtype: self.dtype, len }
    }
}

impl<B: Backend + ?Sized> Clone for View<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend + ?Sized> Copy for View<'_, B> {}

/// Reserved device memory.
pub trait RegionInfo {
    fn len_bytes(&self) -> usize;
}

/// Page-locked host memory (swap pool, staging). Not write-combined: the host reads it back.
pub trait HostBuf: Send {
    fn as_slice(&self) -> &[u8];
    fn as_mut_slice(&mut self) -> &mut [u8];
}

#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// "cpu" or "cuda".
    pub kind: &'static str,
    /// e.g. "NVIDIA H100 80GB HBM3" or the CPU model.
    pub name: String,
    pub ordinal: usize,
    pub memory_total_bytes: u64,
    pub memory_free_bytes: u64,
}

/// `c[b] = alpha * a[b] · op(b[b]) + beta * c[b]` for `b` in `0..batch`, row-major.
/// `a` is `[m, k]`; `b` is `[n, k]` when `trans_b` (the Hugging Face `[out, in]` weight layout)
/// else `[k, n]`; `c` is `[m, n]`. Strides are in elements between consecutive batch entries.
#[derive(Clone, Copy, Debug)]
pub struct GemmArgs {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_b: bool,
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
    pub alpha: f32,
    pub beta: f32,
    /// With bf16 `b`, `a` may be rounded to bf16 before multiplying (a model's projections, as
    /// transformers multiplies a bf16 model's activations; the CPU backend then runs `vdpbf16ps`
    /// where the CPU has it). False for generic tensor ops: their f32 operands stay f32.
    pub bf16_activations: bool,
}

impl GemmArgs {
    /// One `[m,k] · [n,k]ᵀ` product, the shape of every projection; operands keep their precision.
    pub fn linear(m: usize, n: usize, k: usize) -> Self {
        GemmArgs {
            m,
            n,
            k,
            trans_b: true,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
            alpha: 1.0,
            beta: 0.0,
            bf16_activations: false,
        }
    }

    /// A model's projection: [`GemmArgs::linear`] whose activations may be rounded to bf16 when
    /// the weights are bf16 (see [`GemmArgs::bf16_activations`]).
    pub fn model_linear(m: usize, n: usize, k: usize) -> Self {
        GemmArgs { bf16_activations: true, ..GemmArgs::linear(m, n, k) }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnaryOp {
    Silu,
    Exp,
    Neg,
    Sqrt,
}

/// A batch of ragged sequences for attention. All index arrays are i32 views in device memory
/// (the caller writes them into scratch once per step).
pub struct AttnBatch<'a, B: Backend + ?Sized> {
    pub seqs: usize,
    /// `[seqs + 1]`: query rows of sequence `i` are `q_start[i]..q_start[i+1]`.
    pub q_start: View<'a, B>,
    /// `[seqs]`: tokens in the cache for sequence `i`, including this step's.
    /// Query row `j` of a sequence with `q_len` rows sits at position `ctx_len - q_len + j` and
    /// attends causally to positions `0..=that`.
    pub ctx_lens: View<'a, B>,
    /// `[seqs, max_blocks_per_seq]`: block ids in position order.
    pub block_tables: View<'a, B>,
    pub max_blocks_per_seq: usize,
    /// Host-known maxima, for launch geometry.
    pub max_q_len: usize,
    pub max_ctx_len: usize,
}

/// The paged KV cache: `num_blocks` blocks of `layout.block_bytes()` starting at `offset`.
pub struct KvCacheRef<'a, B: Backend + ?Sized> {
    pub region: &'a B::Region,
    pub offset: usize,
    pub num_blocks: usize,
    pub layout: KvLayout,
}

// By hand: a derive would ask `B: Copy`, but only the reference is copied.
impl<B: Backend + ?Sized> Clone for KvCacheRef<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend + ?Sized> Copy for KvCacheRef<'_, B> {}

/// Per-row sampling parameters. Temperature 0 means greedy.
///
/// The contract every backend follows (the CPU backend is its reference):
/// 1. `temperature <= 0` (or NaN), a temperature so small that `1 / temperature` is not finite
///    (below about 3e-39: tiny temperatures are greedy), or `top_k == 1`: argmax, first maximum
///    wins.
/// 2. Candidates: every id whose logit is not NaN; with `0 < top_k < vocab`, only the `top_k`
///    largest logits (ties: lower id first).
/// 3. Weights `w_i = exp((logit_i - max) / temperature)`, `max` over the candidates.
/// 4. With `top_p < 1`: order candidates by descending logit (ties: lower id first) and keep the
///    shortest prefix whose weight sum reaches `top_p * total` (at least one).
/// 5. Draw `u = sample_uniform(seed, step)` in `[0, 1)` and return the first kept candidate,
///    walking ids in ascending order, at which the running weight sum exceeds `u * kept_total`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleParams {
    pub temperature: f32,
    /// 0 = no top-k cut.
    pub top_k: u32,
    /// 1.0 = no nucleus cut.
    pub top_p: f32,
    pub seed: u64,
    /// Counter mixed with the seed so each step draws fresh randomness reproducibly.
    pub step: u64,
}

impl SampleParams {
    /// The parameters as every backend applies them to rows of `vocab` logits: `top_k` clamped
    /// to the vocabulary (a cut at or past the row's length cuts nothing), so a request's `top_k`
    /// — any `u32`, e.g. 2^31 or `u32::MAX` — never reaches a kernel as a count beyond the row.
    pub fn clamped(self, vocab: usize) -> SampleParams {
        SampleParams { top_k: self.top_k.min(u32::try_from(vocab).unwrap_or(u32::MAX)), ..self }
    }
}

/// The uniform draw in `[0, 1)` for one sampling step: a pure function of `(seed, step)`, so a
/// session replays identically on every backend. Two rounds of the SplitMix64 finaliser
/// (`mix(z) = z ^ z>>30 · 0xbf58476d1ce4e5b9 → ^ >>27 · 0x94d049bb133111eb → ^ >>31`, each round
/// adding the golden-ratio increment 0x9e3779b97f4a7c15 first):
/// `r = mix(seed + γ ^ mix(step + γ))`, and `u = (r >> 40) · 2⁻²⁴` (24 bits, exact in f32).
pub fn sample_uniform(seed: u64, step: u64) -> f32 {
    const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    let r = mix(seed.wrapping_add(GAMMA) ^ mix(step.wrapping_add(GAMMA)));
    (r >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

/// A range of device memory exported as a dma-buf (see [`Backend::dmabuf`]): the requested range
/// starts `offset` bytes into the export (exports cover whole pages) and is `len` bytes long.
#[derive(Debug)]
pub struct DmaBuf {
    pub fd: std::os::fd::OwnedFd,
    pub offset: u64,
    pub len: usize,
}

pub trait Backend: Send + Sync + 'static {
    type Region: RegionInfo + Send;
    type Stream: Send;
    type Event: Send;
    type Host: HostBuf;

    fn info(&self) -> DeviceInfo;

    /// A hint that no op follows soon (the caller ran its last step and has nothing queued): a
    /// backend whose workers spin for the next op has them yield their cores between looks at
    /// once (they still park only after their usual spin). The default does nothing.
    fn quiesce(&self) {}

    /// Bytes of the per-stream workspace some ops stage operands in (mixed-dtype GEMM operand A,
    /// sampling's sort slots), which bounds the rows one step may have; `None`: no such bound.
    /// Callers check their largest step against it at start-up, so no step fails midway on it.
    fn step_workspace_bytes(&self) -> Option<usize> {
        None
    }

    // ---- memory -------------------------------------------------------------------------------
    /// One driver allocation. Never called on the request path (the VMU reserves at start-up).
    fn reserve(&self, bytes: usize) -> Result<Self::Region>;
    /// Page-locked host memory.
    fn alloc_host(&self, bytes: usize) -> Result<Self::Host>;
    fn new_stream(&self) -> Result<Self::Stream>;
    /// A stream for copies, events and waits only (the VMU's swap stream): on CUDA it has no
    /// workspace or cuBLAS handle, so it costs no device memory beyond the stream; a compute op
    /// issued on it is refused (`Unsupported`). Backends whose streams keep no state return a
    /// plain stream.
    fn new_copy_stream(&self) -> Result<Self::Stream> {
        self.new_stream()
    }
    /// The handle's own stream: [`Backend::write`] and [`Backend::read`] are ordered on it.
    fn default_stream(&self) -> &Self::Stream;

    /// A new handle on the same device with its own default stream and per-stream state (see the
    /// module docs). Allocates (a stream, and on CUDA its workspace): call at start-up, never on
    /// the request path. The default returns the same handle, which is right exactly for
    /// backends whose default stream keeps no state (the CPU backend executes eagerly on the
    /// calling thread); a backend with per-stream state overrides it.
    fn handle(self: &Arc<Self>) -> Result<Arc<Self>> {
        Ok(Arc::clone(self))
    }
    fn record(&self, stream: &Self::Stream) -> Result<Self::Event>;
    /// Makes later work on `stream` wait for `event`.
    fn wait(&self, stream: &Self::Stream, event: &Self::Event) -> Result<()>;
    fn event_done(&self, event: &Self::Event) -> Result<bool>;
    fn sync_event(&self, event: &Self::Event) -> Result<()>;
    fn sync_stream(&self, stream: &Self::Stream) -> Result<()>;

    /// Synchronous host → device copy of `src` to `region[offset..]`.
    fn write(&self, region: &Self::Region, offset: usize, src: &[u8]) -> Result<()>;
    /// Synchronous device → host copy of `region[offset..offset + dst.len()]` into `dst`.
    fn read(&self, region: &Self::Region, offset: usize, dst: &mut [u8]) -> Result<()>;
    /// `region[offset..offset + len]` as host memory the caller fills directly — e.g. receives
    /// tensor bytes from the network straight into it, with no staging copy. `None` where the
    /// backend's memory is not host-addressable (a GPU without GPUDirect: the caller stages in
    /// pinned host memory and [`Backend::write`]s, the physical minimum there) and where the
    /// range is out of bounds. Sound because the region is borrowed exclusively: no op can reach
    /// it while the slice lives.
    fn host_bytes_mut<'r>(&self, region: &'r mut Self::Region, offset: usize, len: usize) -> Option<&'r mut [u8]> {
        let _ = (region, offset, len);
        None
    }

    /// `region[offset..offset + len]` exported as a dma-buf that an RDMA NIC can register
    /// (`ibv_reg_dmabuf_mr`) and write straight into: GPUDirect RDMA, no host staging. `None`
    /// where the memory is host-addressable ([`Backend::host_bytes_mut`] is the way there), the
    /// device or driver cannot export dma-bufs, or the range is out of bounds. The region is
    /// borrowed exclusively, so no op reaches it while the returned export is in use.
    fn dmabuf(&self, region: &mut Self::Region, offset: usize, len: usize) -> Option<DmaBuf> {
        let _ = (region, offset, len);
        None
    }

    /// `region[offset..offset + len]` as host memory to read directly — e.g. a vectored send of
    /// tensor bytes to the network, with no copy out first. `None` where the memory is not
    /// host-addressable (the caller [`Backend::read`]s into staging instead) or the range is out
    /// of bounds.
    ///
    /// # Safety
    /// While the returned slice lives, nothing may write any byte of that range: no op may take it
    /// as an output and no [`Backend::write`], [`Backend::copy`] or async copy may target it (ops
    /// write through `&Region`, which the borrow checker cannot see). Concurrent readers are fine.
    unsafe fn host_bytes<'r>(&self, region: &'r Self::Region, offset: usize, len: usize) -> Option<&'r [u8]> {
        let _ = (region, offset, len);
        None
    }

    /// Device → device copy, ordered on `stream`.
    fn copy(
        &self,
        stream: &Self::Stream,
        src: &Self::Region,
        src_offset: usize,
        dst: &Self::Region,
        dst_offset: usize,
        bytes: usize,
    ) -> Result<()>;

    /// Asynchronous host → device copy of `host[host_offset..+bytes]` to `region[offset..]`.
    ///
    /// # Safety
    /// `host` must not be written, moved or dropped until an event recorded on `stream` after this
    /// call has completed: the device reads it in the background.
    unsafe fn copy_h2d_async(
        &self,
        stream: &Self::Stream,
        host: &Self::Host,
        host_offset: usize,
        region: &Self::Region,
        offset: usize,
        bytes: usize,
    ) -> Result<()>;

    /// Asynchronous device → host copy of `region[offset..+bytes]` into `host[host_offset..]`.
    ///
    /// # Safety
    /// `host` must not be read, written, moved or dropped until an event recorded on `stream`
    /// after this call has completed: the device writes it in the background.
    unsafe fn copy_d2h_async(
        &self,
        stream: &Self::Stream,
        region: &Self::Region,
        offset: usize,
        host: &mut Self::Host,
        host_offset: usize,
        bytes: usize,
    ) -> Result<()>;

    // ---- linear algebra and elementwise ------------------------------------------------------
    fn gemm(&self, s: &Self::Stream, a: View<Self>, b: View<Self>, c: View<Self>, args: &GemmArgs) -> Result<()>;

    // ---- quantized weights (GGML blocks, crate::quant) ----------------------------------------
    /// Whether [`Backend::gemm_quant`] and [`Backend::embedding_quant`] run on this backend. Where
    /// they do not, the model dequantizes quantized weights to its compute dtype at load.
    fn quantized_weights(&self) -> bool {
        false
    }
    /// `c[m, n] = a[m, k] · wᵀ` with `w` `n` rows of `k` elements of GGML blocks of `wtype`,
    /// viewed as `U8` (`n * wtype.row_bytes(k)` bytes); `a` and `c` f32.
    #[allow(clippy::too_many_arguments)]
    fn gemm_quant(
        &self,
        s: &Self::Stream,
        a: View<Self>,
        w: View<Self>,
        wtype: QuantType,
        c: View<Self>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        let _ = (s, a, w, c, m, n, k);
        Err(crate::BackendError::Unsupported { op: "gemm_quant", why: format!("no {wtype} kernels on this backend") })
    }
    /// As [`Backend::embedding`] with a `U8` table of rows of `hidden` elements of `wtype`; `out` f32.
    fn embedding_quant(
        &self,
        s: &Self::Stream,
        table: View<Self>,
        wtype: QuantType,
        ids: View<Self>,
        out: View<Self>,
        hidden: usize,
    ) -> Result<()> {
        let _ = (s, table, ids, out, hidden);
        Err(crate::BackendError::Unsupported {
            op: "embedding_quant",
            why: format!("no {wtype} kernels on this backend"),
        })
    }

    /// `out[i] = a[i] op b[i % b.len]`: `b` may be shorter than `a` if its length divides `a`'s,
    /// and then repeats (a bias or scale row broadcast over `[rows, b.len]`). In place allowed.
    fn binary(&self, s: &Self::Stream, op: BinaryOp, a: View<Self>, b: View<Self>, out: View<Self>) -> Result<()>;
    /// Elementwise; in place allowed.
    fn unary(&self, s: &Self::Stream, op: UnaryOp, x: View<Self>, out: View<Self>) -> Result<()>;
    /// Converts between float dtypes and i32 (float → i32 truncates toward zero, saturating;
    /// float narrowing rounds to nearest even).
    fn cast(&self, s: &Self::Stream, x: View<Self>, out: View<Self>) -> Result<()>;
    /// `out = silu(gate) * up`, elementwise; in place allowed.
    fn silu_mul(&self, s: &Self::Stream, gate: View<Self>, up: View<Self>, out: View<Self>) -> Result<()>;
    /// Row-wise softmax over `[rows, cols]`; in place allowed.
    fn softmax(&self, s: &Self::Stream, x: View<Self>, out: View<Self>, cols: usize) -> Result<()>;

    // ---- transformer ops ----------------------------------------------------------------------
    /// `out[i] = table[ids[i]]`; `table` is `[vocab, hidden]`, `ids` i32. Out-of-range ids are an
    /// error (checked by the caller for device backends; the CPU backend checks too).
    fn embedding(
        &self,
        s: &Self::Stream,
        table: View<Self>,
        ids: View<Self>,
        out: View<Self>,
        hidden: usize,
    ) -> Result<()>;
    /// RMSNorm over rows of `hidden`. With `residual`: first `residual += x` (in place), then
    /// `out = rmsnorm(residual) * weight` — the fused pre-norm of a transformer block (the
    /// normalised value is the residual as stored, i.e. rounded to its dtype). `out` may be
    /// exactly `x` (in place); `residual` must not overlap anything else.
    #[allow(clippy::too_many_arguments)]
    fn rms_norm(
        &self,
        s: &Self::Stream,
        x: View<Self>,
        residual: Option<View<Self>>,
        weight: View<Self>,
        out: View<Self>,
        hidden: usize,
        eps: f32,
    ) -> Result<()>;
    /// Rotate-half RoPE in place on `x` = `[tokens, heads, head_dim]`; `positions` i32 `[tokens]`;
    /// `inv_freq` f32 `[head_dim / 2]` (rope_theta and any scaling already folded in).
    fn rope(
        &self,
        s: &Self::Stream,
        x: View<Self>,
        positions: View<Self>,
        inv_freq: View<Self>,
        heads: usize,
        head_dim: usize,
    ) -> Result<()>;
    /// Writes this step's K and V (`[tokens, kv_heads, head_dim]` each) into the cache at `slots`
    /// (i32 `[tokens]`, slot = block * block_tokens + offset) for `layer`.
    fn kv_append(
        &self,
        s: &Self::Stream,
        k: View<Self>,
        v: View<Self>,
        cache: &KvCacheRef<Self>,
        layer: usize,
        slots: View<Self>,
    ) -> Result<()>;
    /// Causal attention of a ragged batch of query rows (`q`, `out`: `[rows, heads, head_dim]`)
    /// over the paged cache (which already holds this step's K/V). GQA: `heads / kv_heads`
    /// query heads share each KV head. Covers prefill (many rows) and decode (one row each).
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        s: &Self::Stream,
        q: View<Self>,
        cache: &KvCacheRef<Self>,
        layer: usize,
        batch: &AttnBatch<Self>,
        out: View<Self>,
        heads: usize,
        scale: f32,
    ) -> Result<()>;
    /// Copies whole blocks inside the cache: `pairs` i32 `[n, 2]` of (src, dst). Copies may run
    /// concurrently: destinations must be distinct and never a source (pairs with src == dst
    /// are no-ops).
    fn copy_blocks(&self, s: &Self::Stream, cache: &KvCacheRef<Self>, pairs: View<Self>) -> Result<()>;
    /// Packs the listed blocks (i32 ids) back to back into `staging` (u8, at least
    /// `ids.len * block_bytes` bytes, disjoint from the cache).
    fn gather_blocks(
        &self,
        s: &Self::Stream,
        cache: &KvCacheRef<Self>,
        ids: View<Self>,
        staging: View<Self>,
    ) -> Result<()>;
    /// Unpacks `staging` into the listed blocks: the inverse of `gather_blocks` (ids distinct).
    fn scatter_blocks(
        &self,
        s: &Self::Stream,
        staging: View<Self>,
        cache: &KvCacheRef<Self>,
        ids: View<Self>,
    ) -> Result<()>;

    // ---- sampling -----------------------------------------------------------------------------
    /// Row-wise argmax of f32 `[rows, vocab]` into i32 `[rows]` (first maximum wins).
    fn argmax(&self, s: &Self::Stream, logits: View<Self>, out: View<Self>, vocab: usize) -> Result<()>;
    /// Row-wise sampling with per-row parameters (temperature 0 = argmax).
    fn sample(
        &self,
        s: &Self::Stream,
        logits: View<Self>,
        out: View<Self>,
        vocab: usize,
        params: &[SampleParams],
    ) -> Result<()>;
}
