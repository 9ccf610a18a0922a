//! Op launches for [`CudaBackend`]: host-side validation (dtypes, shapes, every operand inside
//! its region, no output overlapping an input) and launch geometry. The cuBLAS GEMM is gemm.rs.
//!
//! Kernel names are static strings indexed by storage dtype (f32, f16, bf16), so a launch does
//! no allocation and the function cache is keyed by the literal.

use super::dispatch::{decode_plan, dispatch, AttnShape, DecodePlan, GRID_Y_MAX};
use super::{kargs, CudaBackend, Region, Stream};
use crate::backend::{AttnBatch, BinaryOp, KvCacheRef, SampleParams, UnaryOp, View};
use crate::error::{BackendError, Result};
use crate::validate;
use crate::DType;

type V<'a> = View<'a, CudaBackend>;

/// Threads per block of the elementwise and row kernels.
pub(super) const THREADS: u32 = 256;
/// Rows per `sample_<dt>` launch at most: the per-row parameters travel in the kernel parameter
/// buffer (64 × 32 bytes, inside the 4 KiB limit). Must equal SAMPLE_ROWS_MAX in kernels/sampling.cu.
const SAMPLE_ROWS_MAX: usize = 64;

/// Index into the per-dtype kernel name tables (f32, f16, bf16).
fn dt_index(op: &'static str, operand: &'static str, v: &V) -> Result<usize> {
    match v.dtype {
        DType::F32 => Ok(0),
        DType::F16 => Ok(1),
        DType::BF16 => Ok(2),
        got => Err(BackendError::DType { op, operand, got, expected: "f32|f16|bf16" }),
    }
}

/// The kernels' runtime storage-dtype code (common.cuh: 0 f32, 1 f16, 2 bf16, 3 i32).
pub(super) fn code(op: &'static str, operand: &'static str, v: &V, int_ok: bool) -> Result<i32> {
    match v.dtype {
        DType::F32 => Ok(0),
        DType::F16 => Ok(1),
        DType::BF16 => Ok(2),
        DType::I32 if int_ok => Ok(3),
        got => Err(BackendError::DType {
            op,
            operand,
            got,
            expected: if int_ok { "f32|f16|bf16|i32" } else { "f32|f16|bf16" },
        }),
    }
}

fn want(op: &'static str, operand: &'static str, v: &V, dt: DType) -> Result<()> {
    if v.dtype == dt {
        Ok(())
    } else {
        Err(BackendError::DType { op, operand, got: v.dtype, expected: dt.name() })
    }
}

pub(super) fn shape(op: &'static str, ok: bool, why: impl FnOnce() -> String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(BackendError::Shape { op, why: why() })
    }
}

/// Device address of a view, after checking it lies inside its region.
pub(super) fn dptr(op: &'static str, operand: &'static str, v: &V) -> Result<u64> {
    range_ptr(op, operand, v.region, v.offset, v.bytes())
}

fn range_ptr(op: &'static str, operand: &'static str, region: &Region, offset: usize, bytes: usize) -> Result<u64> {
    match offset.checked_add(bytes) {
        Some(end) if end <= region.len => Ok(region.ptr + offset as u64),
        _ => Err(BackendError::OutOfBounds { op, operand, offset, bytes, region_bytes: region.len }),
    }
}

pub(super) fn i32_arg(op: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| BackendError::Shape { op, why: format!("{what} = {v} exceeds i32") })
}

/// Bytes of the cache, checked against its region; returns the cache's device address.
fn cache_ptr(op: &'static str, cache: &KvCacheRef<CudaBackend>) -> Result<u64> {
    let bytes = cache
        .num_blocks
        .checked_mul(cache.layout.block_bytes())
        .ok_or(BackendError::Shape { op, why: "cache size overflows".into() })?;
    range_ptr(op, "cache", cache.region, cache.offset, bytes)
}

const KV_APPEND: [&str; 3] = ["kv_append_f32", "kv_append_f16", "kv_append_bf16"];
const DECODE: [[&str; 4]; 3] = [
    ["paged_decode_f32_g1", "paged_decode_f32_g2", "paged_decode_f32_g4", "paged_decode_f32_g8"],
    ["paged_decode_f16_g1", "paged_decode_f16_g2", "paged_decode_f16_g4", "paged_decode_f16_g8"],
    ["paged_decode_bf16_g1", "paged_decode_bf16_g2", "paged_decode_bf16_g4", "paged_decode_bf16_g8"],
];
const PREFILL: [&str; 3] = ["prefill_f32", "prefill_f16", "prefill_bf16"];
const ARGMAX: [&str; 3] = ["argmax_f32", "argmax_f16", "argmax_bf16"];
const SAMPLE: [&str; 3] = ["sample_f32", "sample_f16", "sample_bf16"];

/// Mirror of `SampleRow` in kernels/sampling.cu.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SampleRow {
    temperature: f32,
    top_k: u32,
    top_p: f32,
    pad: u32,
    seed: u64,
    step: u64,
}

/// Mirror of `SampleBatch` in kernels/sampling.cu, passed by value.
#[repr(C)]
struct SampleBatch {
    rows: [SampleRow; SAMPLE_ROWS_MAX],
}

impl CudaBackend {
    pub(super) fn grid_1d(&self, n: usize) -> u32 {
        let blocks = n.div_ceil(THREADS as usize).max(1);
        blocks.min(self.dev.sm_count as usize * 32) as u32
    }

    pub(super) fn binary_impl(&self, s: &Stream, op: BinaryOp, a: V, b: V, out: V) -> Result<()> {
        const OP: &str = "binary";
        let (ca, cb, co) = (code(OP, "a", &a, false)?, code(OP, "b", &b, false)?, code(OP, "out", &out, false)?);
        shape(OP, out.len == a.len, || format!("out has {} elements, a has {}", out.len, a.len))?;
        shape(OP, b.len == a.len || (b.len > 0 && a.len.is_multiple_of(b.len)), || {
            format!("b ({}) neither matches nor divides a ({})", b.len, a.len)
        })?;
        let (pa, pb, po) = (dptr(OP, "a", &a)?, dptr(OP, "b", &b)?, dptr(OP, "out", &out)?);
        validate::binary(OP, ["a", "b"], &a, &b, &out)?;
        if a.len == 0 {
            return Ok(());
        }
        let opc: i32 = match op {
            BinaryOp::Add => 0,
            BinaryOp::Sub => 1,
            BinaryOp::Mul => 2,
            BinaryOp::Div => 3,
        };
        let (n, bl) = (a.len as i64, b.len as i64);
        self.bind()?;
        let mut p = kargs![&opc, &pa, &ca, &pb, &cb, &bl, &po, &co, &n];
        // SAFETY: parameters match `binary(int, const void*, int, const void*, int, i64, void*,
        // int, i64)`; every view was bounds-checked for its element count and dtype code.
        unsafe { self.launch(s, "binary", (self.grid_1d(a.len), 1, 1), THREADS, 0, &mut p) }
    }

    pub(super) fn unary_impl(&self, s: &Stream, op: UnaryOp, x: V, out: V) -> Result<()> {
        const OP: &str = "unary";
        let (cx, co) = (code(OP, "x", &x, false)?, code(OP, "out", &out, false)?);
        shape(OP, out.len == x.len, || format!("out has {} elements, x has {}", out.len, x.len))?;
        let (px, po) = (dptr(OP, "x", &x)?, dptr(OP, "out", &out)?);
        validate::unary(OP, &x, &out)?;
        if x.len == 0 {
            return Ok(());
        }
        let opc: i32 = match op {
            UnaryOp::Silu => 0,
            UnaryOp::Exp => 1,
            UnaryOp::Neg => 2,
            UnaryOp::Sqrt => 3,
        };
        let n = x.len as i64;
        self.bind()?;
        let mut p = kargs![&opc, &px, &cx, &po, &co, &n];
        // SAFETY: matches `unary(int, const void*, int, void*, int, i64)`; both views checked.
        unsafe { self.launch(s, "unary", (self.grid_1d(x.len), 1, 1), THREADS, 0, &mut p) }
    }

    pub(super) fn cast_impl(&self, s: &Stream, x: V, out: V) -> Result<()> {
        const OP: &str = "cast";
        let (cx, co) = (code(OP, "x", &x, true)?, code(OP, "out", &out, true)?);
        shape(OP, out.len == x.len, || format!("out has {} elements, x has {}", out.len, x.len))?;
        let (px, po) = (dptr(OP, "x", &x)?, dptr(OP, "out", &out)?);
        validate::unary(OP, &x, &out)?;
        // Exactly in place (the only overlap `validate` lets through): nothing to convert.
        if x.len == 0 || (std::ptr::eq(x.region, out.region) && x.offset == out.offset) {
            return Ok(());
        }
        self.bind()?;
        if x.dtype == out.dtype {
            // SAFETY: both ranges checked; they do not overlap.
            return unsafe { cudarc::driver::result::memcpy_dtod_async(po, px, x.bytes(), s.raw()) }
                .map_err(super::driver_err("cast copy"));
        }
        let n = x.len as i64;
        let mut p = kargs![&px, &cx, &po, &co, &n];
        // SAFETY: matches `cast(const void*, int, void*, int, i64)`; both views checked.
        unsafe { self.launch(s, "cast", (self.grid_1d(x.len), 1, 1), THREADS, 0, &mut p) }
    }

    pub(super) fn silu_mul_impl(&self, s: &Stream, gate: V, up: V, out: V) -> Result<()> {
        const OP: &str = "silu_mul";
        let cg = code(OP, "gate", &gate, false)?;
        let (cu, co) = (code(OP, "up", &up, false)?, code(OP, "out", &out, false)?);
        shape(OP, up.len == gate.len && out.len == gate.len, || {
            format!("gate {}, up {}, out {} elements", gate.len, up.len, out.len)
        })?;
        let (pg, pu, po) = (dptr(OP, "gate", &gate)?, dptr(OP, "up", &up)?, dptr(OP, "out", &out)?);
        validate::binary(OP, ["gate", "up"], &gate, &up, &out)?;
        if gate.len == 0 {
            return Ok(());
        }
        let n = gate.len as i64;
        self.bind()?;
        let mut p = kargs![&pg, &cg, &pu, &cu, &po, &co, &n];
        // SAFETY: matches `silu_mul(const void*, int, const void*, int, void*, int, i64)`.
        unsafe { self.launch(s, "silu_mul", (self.grid_1d(gate.len), 1, 1), THREADS, 0, &mut p) }
    }

    pub(super) fn softmax_impl(&self, s: &Stream, x: V, out: V, cols: usize) -> Result<()> {
        const OP: &str = "softmax";
        let (cx, co) = (code(OP, "x", &x, false)?, code(OP, "out", &out, false)?);
        shape(OP, cols > 0 && x.len.is_multiple_of(cols) && out.len == x.len, || {
            format!("x {} / out {} elements with {cols} columns", x.len, out.len)
        })?;
        let (px, po) = (dptr(OP, "x", &x)?, dptr(OP, "out", &out)?);
        validate::unary(OP, &x, &out)?;
        let rows = x.len / cols;
        if rows == 0 {
            return Ok(());
        }
        shape(OP, rows <= i32::MAX as usize, || format!("{rows} rows"))?;
        let c = i32_arg(OP, "cols", cols)?;
        self.bind()?;
        let mut p = kargs![&px, &cx, &po, &co, &c];
        // SAFETY: matches `softmax(const void*, int, void*, int, int)`; one block per row.
        unsafe { self.launch(s, "softmax", (rows as u32, 1, 1), THREADS, 0, &mut p) }
    }

    pub(super) fn embedding_impl(&self, s: &Stream, table: V, ids: V, out: V, hidden: usize) -> Result<()> {
        const OP: &str = "embedding";
        let (ct, co) = (code(OP, "table", &table, false)?, code(OP, "out", &out, false)?);
        want(OP, "ids", &ids, DType::I32)?;
        shape(OP, hidden > 0 && table.len.is_multiple_of(hidden), || {
            format!("table {} not a multiple of {hidden}", table.len)
        })?;
        shape(OP, out.len == ids.len * hidden, || format!("out {} != ids {} × {hidden}", out.len, ids.len))?;
        let (pt, pi, po) = (dptr(OP, "table", &table)?, dptr(OP, "ids", &ids)?, dptr(OP, "out", &out)?);
        validate::embedding(&table, &ids, &out)?;
        if ids.len == 0 {
            return Ok(());
        }
        shape(OP, ids.len <= i32::MAX as usize, || format!("{} ids", ids.len))?;
        let (h, vocab) = (hidden as i64, (table.len / hidden) as i64);
        let err = s.err.dev;
        self.bind()?;
        let mut p = kargs![&pt, &ct, &pi, &po, &co, &h, &vocab, &err];
        // SAFETY: matches `embedding(const void*, int, const int*, void*, int, i64, i64,
        // unsigned*)`; the kernel reads only rows < vocab (others: zero row + error bit).
        unsafe { self.launch(s, "embedding", (ids.len as u32, 1, 1), THREADS, 0, &mut p) }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn rms_norm_impl(
        &self,
        s: &Stream,
        x: V,
        residual: Option<V>,
        weight: V,
        out: V,
        hidden: usize,
        eps: f32,
    ) -> Result<()> {
        const OP: &str = "rms_norm";
        let (cx, cw, co) =
            (code(OP, "x", &x, false)?, code(OP, "weight", &weight, false)?, code(OP, "out", &out, false)?);
        shape(OP, hidden > 0 && x.len.is_multiple_of(hidden) && out.len == x.len && weight.len == hidden, || {
            format!("x {}, out {}, weight {} with hidden {hidden}", x.len, out.len, weight.len)
        })?;
        let (px, pw, po) = (dptr(OP, "x", &x)?, dptr(OP, "weight", &weight)?, dptr(OP, "out", &out)?);
        // In place (out == x) is allowed: each row is read before it is written.
        validate::rms_norm(&x, residual.as_ref(), &weight, &out)?;
        let (pr, cr) = match &residual {
            Some(r) => {
                let cr = code(OP, "residual", r, false)?;
                shape(OP, r.len == x.len, || format!("residual {} != x {}", r.len, x.len))?;
                (dptr(OP, "residual", r)?, cr)
            }
            None => (0u64, 0),
        };
        let rows = x.len / hidden;
        if rows == 0 {
            return Ok(());
        }
        let h = i32_arg(OP, "hidden", hidden)?;
        self.bind()?;
        let mut p = kargs![&px, &cx, &pr, &cr, &pw, &cw, &po, &co, &h, &eps];
        // SAFETY: matches `rms_norm(const void*, int, void*, int, const void*, int, void*, int,
        // int, float)`; residual is null or a checked view of x's size; one block per row.
        unsafe { self.launch(s, "rms_norm", (rows as u32, 1, 1), THREADS, 0, &mut p) }
    }

    pub(super) fn rope_impl(
        &self,
        s: &Stream,
        x: V,
        positions: V,
        inv_freq: V,
        heads: usize,
        head_dim: usize,
    ) -> Result<()> {
        const OP: &str = "rope";
        let cx = code(OP, "x", &x, false)?;
        want(OP, "positions", &positions, DType::I32)?;
        want(OP, "inv_freq", &inv_freq, DType::F32)?;
        shape(OP, head_dim > 0 && head_dim.is_multiple_of(2), || format!("head_dim {head_dim} must be even"))?;
        shape(OP, x.len == positions.len * heads * head_dim, || {
            format!("x {} != positions {} × {heads} × {head_dim}", x.len, positions.len)
        })?;
        shape(OP, inv_freq.len >= head_dim / 2, || format!("inv_freq {} < {}", inv_freq.len, head_dim / 2))?;
        let (px, pp, pf) = (dptr(OP, "x", &x)?, dptr(OP, "positions", &positions)?, dptr(OP, "inv_freq", &inv_freq)?);
        validate::rope(&x, &positions, &inv_freq)?;
        if positions.len == 0 {
            return Ok(());
        }
        let (h, d) = (i32_arg(OP, "heads", heads)?, i32_arg(OP, "head_dim", head_dim)?);
        self.bind()?;
        let mut p = kargs![&px, &cx, &pp, &pf, &h, &d];
        // SAFETY: matches `rope(void*, int, const int*, const float*, int, int)`; one block per
        // token over checked views.
        unsafe { self.launch(s, "rope", (positions.len as u32, 1, 1), THREADS, 0, &mut p) }
    }

    pub(super) fn kv_append_impl(
        &self,
        s: &Stream,
        k: V,
        v: V,
        cache: &KvCacheRef<Self>,
        layer: usize,
        slots: V,
    ) -> Result<()> {
        const OP: &str = "kv_append";
        validate::kv_append(&k, &v, cache, &slots)?;
        let l = cache.layout;
        let di = match l.dtype {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::BF16 => 2,
            got => return Err(BackendError::DType { op: OP, operand: "cache", got, expected: "f32|f16|bf16" }),
        };
        let ck = code(OP, "k", &k, false)?;
        want(OP, "v", &v, k.dtype)?;
        want(OP, "slots", &slots, DType::I32)?;
        shape(OP, layer < l.layers, || format!("layer {layer} of {}", l.layers))?;
        let per_tok = l.kv_heads * l.head_dim;
        shape(OP, k.len == slots.len * per_tok && v.len == k.len, || {
            format!("k {} / v {} != slots {} × {per_tok}", k.len, v.len, slots.len)
        })?;
        let pc = cache_ptr(OP, cache)?;
        let (pk, pv, ps) = (dptr(OP, "k", &k)?, dptr(OP, "v", &v)?, dptr(OP, "slots", &slots)?);
        if slots.len == 0 {
            return Ok(());
        }
        shape(OP, slots.len <= i32::MAX as usize, || format!("{} slots", slots.len))?;
        let layer_i = i32_arg(OP, "layer", layer)?;
        let kvh = i32_arg(OP, "kv_heads", l.kv_heads)?;
        let hd = i32_arg(OP, "head_dim", l.head_dim)?;
        let bt = i32_arg(OP, "block_tokens", l.block_tokens)?;
        let block_elems = (l.block_bytes() / l.dtype.size_bytes()) as i64;
        let nb = cache.num_blocks as i64;
        let err = s.err.dev;
        self.bind()?;
        let mut p = kargs![&pk, &pv, &ck, &pc, &ps, &layer_i, &kvh, &hd, &bt, &block_elems, &nb, &err];
        // SAFETY: matches `kv_append_<dt>(const void*, const void*, int, T*, const int*, int,
        // int, int, int, i64, i64, unsigned*)`; slots past the cache are skipped and reported.
        unsafe { self.launch(s, KV_APPEND[di], (slots.len as u32, 2, 1), THREADS, 0, &mut p) }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_impl(
        &self,
        s: &Stream,
        q: V,
        cache: &KvCacheRef<Self>,
        layer: usize,
        batch: &AttnBatch<Self>,
        out: V,
        heads: usize,
        scale: f32,
    ) -> Result<()> {
        const OP: &str = "attention";
        let l = cache.layout;
        let di = match l.dtype {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::BF16 => 2,
            got => return Err(BackendError::DType { op: OP, operand: "cache", got, expected: "f32|f16|bf16" }),
        };
        let (cq, co) = (code(OP, "q", &q, false)?, code(OP, "out", &out, false)?);
        for (name, v) in
            [("q_start", &batch.q_start), ("ctx_lens", &batch.ctx_lens), ("block_tables", &batch.block_tables)]
        {
            want(OP, name, v, DType::I32)?;
        }
        let (hd, kvh, bt) = (l.head_dim, l.kv_heads, l.block_tokens);
        shape(OP, layer < l.layers, || format!("layer {layer} of {}", l.layers))?;
        shape(OP, kvh > 0 && heads.is_multiple_of(kvh) && heads >= kvh, || {
            format!("{heads} heads over {kvh} KV heads")
        })?;
        shape(OP, hd > 0 && hd <= 256, || format!("head_dim {hd} (1..=256 supported)"))?;
        shape(OP, q.len.is_multiple_of(heads * hd) && out.len == q.len, || {
            format!("q {} / out {} not rows × {heads} × {hd}", q.len, out.len)
        })?;
        let rows = q.len / (heads * hd);
        let seqs = batch.seqs;
        shape(OP, batch.q_start.len > seqs && batch.ctx_lens.len >= seqs, || {
            format!("q_start {} / ctx_lens {} for {seqs} sequences", batch.q_start.len, batch.ctx_lens.len)
        })?;
        shape(OP, batch.block_tables.len >= seqs * batch.max_blocks_per_seq, || {
            format!("block_tables {} < {seqs} × {}", batch.block_tables.len, batch.max_blocks_per_seq)
        })?;
        shape(OP, batch.max_ctx_len <= batch.max_blocks_per_seq * bt, || {
            format!("max_ctx_len {} > {} blocks × {bt}", batch.max_ctx_len, batch.max_blocks_per_seq)
        })?;
        let pc = cache_ptr(OP, cache)?;
        let (pq, po) = (dptr(OP, "q", &q)?, dptr(OP, "out", &out)?);
        let pqs = dptr(OP, "q_start", &batch.q_start)?;
        let pcl = dptr(OP, "ctx_lens", &batch.ctx_lens)?;
        let pbt = dptr(OP, "block_tables", &batch.block_tables)?;
        validate::attention(&q, cache, batch, &out)?;
        if seqs == 0 || rows == 0 || batch.max_ctx_len == 0 {
            return Ok(());
        }
        shape(OP, seqs <= GRID_Y_MAX, || format!("{seqs} sequences > {GRID_Y_MAX}"))?;
        let shape_of = AttnShape {
            kv_elem_bytes: l.dtype.size_bytes(),
            head_dim: hd,
            heads,
            kv_heads: kvh,
            block_tokens: bt,
            block_bytes: l.block_bytes(),
            cache_addr: pc,
            seqs,
            rows,
            max_q_len: batch.max_q_len,
            max_ctx_len: batch.max_ctx_len,
        };
        let g = heads / kvh;
        let vec = 16 / l.dtype.size_bytes();
        let lpt = (hd / vec).max(1).next_power_of_two() as i32;
        let gp_idx = g.next_power_of_two().trailing_zeros().min(3) as usize; // 1,2,4,8 -> 0..3
        let ng = 4 * (32 / lpt.clamp(1, 32) as usize);
        let smem_fixed = ng * (1 << gp_idx) * (2 + hd) * 4;
        let decode_name = DECODE[di][gp_idx];
        let plan = dispatch(&shape_of, || -> Result<Option<DecodePlan>> {
            let f = self.dev.kernels.get(decode_name)?;
            // Occupancy at a typical block-table slice (256 ints); the exact slice is smaller or
            // equal for the partition sizes chosen.
            // SAFETY: `f` is a live function of this context; 128 threads is the launch block.
            let per_sm = unsafe {
                cudarc::driver::result::occupancy::max_active_block_per_multiprocessor(f.0, 128, smem_fixed + 1024)
            }
            .map_err(super::driver_err("occupancy"))?
            .max(1) as usize;
            Ok(decode_plan(
                per_sm,
                self.dev.sm_count as usize,
                seqs,
                heads,
                kvh,
                hd,
                bt,
                batch.max_ctx_len,
                super::ATTN_WORKSPACE_BYTES,
            ))
        })?;
        self.dev.attn_counters.record(&plan);
        let scale_log2 = scale * std::f32::consts::LOG2_E;
        let heads_i = i32_arg(OP, "heads", heads)?;
        let kvh_i = i32_arg(OP, "kv_heads", kvh)?;
        let hd_i = i32_arg(OP, "head_dim", hd)?;
        let bt_i = i32_arg(OP, "block_tokens", bt)?;
        let layer_i = i32_arg(OP, "layer", layer)?;
        let maxb_i = i32_arg(OP, "max_blocks_per_seq", batch.max_blocks_per_seq)?;
        let block_elems = (l.block_bytes() / l.dtype.size_bytes()) as i64;
        let nb = cache.num_blocks as i64;
        let err = s.err.dev;
        self.bind()?;
        if let Some(plan) = plan.decode {
            // The partials live in the stream's workspace from this launch until decode_reduce
            // has read them: hold it across both launches, so no other op (from any thread)
            // can issue work that uses it in between.
            let scratch = s.scratch(OP)?;
            let ntab = plan.part_tokens / bt;
            let smem = ntab.next_multiple_of(4) * 4 + smem_fixed;
            let ws = scratch.ptr();
            let ws_ml = ws + (seqs * heads * plan.parts * hd * 4) as u64;
            let part_i = plan.part_tokens as i32;
            let mut p = kargs![
                &pq,
                &cq,
                &pc,
                &nb,
                &pqs,
                &pcl,
                &pbt,
                &maxb_i,
                &po,
                &co,
                &ws,
                &ws_ml,
                &heads_i,
                &kvh_i,
                &hd_i,
                &bt_i,
                &block_elems,
                &layer_i,
                &part_i,
                &lpt,
                &scale_log2,
                &err
            ];
            let grid = (kvh as u32, seqs as u32, plan.parts as u32);
            // SAFETY: matches `paged_decode_<dt>_g<GP>` (see kernels/attention.cu); q/out
            // cover every row, the cache and index arrays were checked above, and the
            // workspace holds seqs × heads × parts × (head_dim + 2) floats (decode_plan).
            unsafe { self.launch(s, decode_name, grid, 128, smem as u32, &mut p)? };
            if plan.parts > 1 {
                let parts_i = plan.parts as i32;
                let mut p = kargs![&ws, &ws_ml, &pqs, &po, &co, &heads_i, &hd_i, &parts_i];
                // SAFETY: matches `decode_reduce(const float*, const float*, const int*, void*,
                // int, int, int, int)`; reads the partials the launch above wrote on `s`.
                unsafe { self.launch(s, "decode_reduce", (heads as u32, seqs as u32, 1), 128, 0, &mut p)? };
            }
        }
        let Some(rows_of) = plan.prefill else {
            return Ok(());
        };
        // General kernel: every sequence, or the multi-row ones of a mixed step.
        let kt: i32 = 32;
        let min_rows = rows_of.min_rows();
        let smem = (16 * hd + kt as usize * (2 * hd + 1)) * 4;
        let tiles = batch.max_q_len.div_ceil(16).max(1);
        shape(OP, heads <= GRID_Y_MAX && tiles <= i32::MAX as usize, || format!("{heads} heads, {tiles} tiles"))?;
        let mut p = kargs![
            &pq,
            &cq,
            &pc,
            &nb,
            &pqs,
            &pcl,
            &pbt,
            &maxb_i,
            &po,
            &co,
            &heads_i,
            &kvh_i,
            &hd_i,
            &bt_i,
            &block_elems,
            &layer_i,
            &kt,
            &min_rows,
            &scale_log2,
            &err
        ];
        // SAFETY: matches `prefill_<dt>` (see kernels/attention.cu); all operands checked above.
        unsafe { self.launch(s, PREFILL[di], (tiles as u32, heads as u32, seqs as u32), 128, smem as u32, &mut p) }
    }

    /// One launch per ≤ 65535 moves (the grid-y limit), each move one whole block.
    #[allow(clippy::too_many_arguments)]
    fn block_moves(
        &self,
        s: &Stream,
        src_base: u64,
        src_ids: u64,
        src_stride: i32,
        src_limit: i64,
        dst_base: u64,
        dst_ids: u64,
        dst_stride: i32,
        dst_limit: i64,
        block_bytes: usize,
        moves: usize,
    ) -> Result<()> {
        let v16 = src_base.is_multiple_of(16) && dst_base.is_multiple_of(16) && block_bytes.is_multiple_of(16);
        let (name, word) = if v16 { ("block_move_v16", 16) } else { ("block_move_u8", 1) };
        let words = block_bytes / word;
        let gx = words.div_ceil(THREADS as usize * 4).clamp(1, 1024) as u32;
        let bb = block_bytes as i64;
        let err = s.err.dev;
        self.bind()?;
        let mut first = 0usize;
        while first < moves {
            let n = (moves - first).min(GRID_Y_MAX);
            // Staging sides (no id array) advance by whole blocks; id arrays advance by ids.
            let (sb, si) = if src_ids == 0 {
                (src_base + (first * block_bytes) as u64, 0)
            } else {
                (src_base, src_ids + (first * src_stride as usize * 4) as u64)
            };
            let (db, dj) = if dst_ids == 0 {
                (dst_base + (first * block_bytes) as u64, 0)
            } else {
                (dst_base, dst_ids + (first * dst_stride as usize * 4) as u64)
            };
            let mut p = kargs![&sb, &si, &src_stride, &src_limit, &db, &dj, &dst_stride, &dst_limit, &bb, &err];
            // SAFETY: matches `block_move_*`; ids outside [0, limit) are skipped by the kernel and
            // the staging sides were checked to hold `moves` blocks.
            unsafe { self.launch(s, name, (gx, n as u32, 1), THREADS, 0, &mut p)? };
            first += n;
        }
        Ok(())
    }

    pub(super) fn copy_blocks_impl(&self, s: &Stream, cache: &KvCacheRef<Self>, pairs: V) -> Result<()> {
        const OP: &str = "copy_blocks";
        validate::copy_blocks(cache, &pairs)?;
        want(OP, "pairs", &pairs, DType::I32)?;
        shape(OP, pairs.len.is_multiple_of(2), || format!("pairs has {} elements (odd)", pairs.len))?;
        let pc = cache_ptr(OP, cache)?;
        let pp = dptr(OP, "pairs", &pairs)?;
        let n = pairs.len / 2;
        if n == 0 {
            return Ok(());
        }
        let nb = cache.num_blocks as i64;
        self.block_moves(s, pc, pp, 2, nb, pc, pp + 4, 2, nb, cache.layout.block_bytes(), n)
    }

    pub(super) fn gather_blocks_impl(&self, s: &Stream, cache: &KvCacheRef<Self>, ids: V, staging: V) -> Result<()> {
        const OP: &str = "gather_blocks";
        validate::move_blocks(OP, true, cache, &ids, &staging)?;
        want(OP, "ids", &ids, DType::I32)?;
        let bb = cache.layout.block_bytes();
        shape(OP, staging.bytes() >= ids.len * bb, || format!("staging {} B < {} blocks", staging.bytes(), ids.len))?;
        let pc = cache_ptr(OP, cache)?;
        let (pi, ps) = (dptr(OP, "ids", &ids)?, dptr(OP, "staging", &staging)?);
        if ids.len == 0 {
            return Ok(());
        }
        self.block_moves(s, pc, pi, 1, cache.num_blocks as i64, ps, 0, 0, ids.len as i64, bb, ids.len)
    }

    pub(super) fn scatter_blocks_impl(&self, s: &Stream, staging: V, cache: &KvCacheRef<Self>, ids: V) -> Result<()> {
        const OP: &str = "scatter_blocks";
        validate::move_blocks(OP, false, cache, &ids, &staging)?;
        want(OP, "ids", &ids, DType::I32)?;
        let bb = cache.layout.block_bytes();
        shape(OP, staging.bytes() >= ids.len * bb, || format!("staging {} B < {} blocks", staging.bytes(), ids.len))?;
        let pc = cache_ptr(OP, cache)?;
        let (pi, ps) = (dptr(OP, "ids", &ids)?, dptr(OP, "staging", &staging)?);
        if ids.len == 0 {
            return Ok(());
        }
        self.block_moves(s, ps, 0, 0, ids.len as i64, pc, pi, 1, cache.num_blocks as i64, bb, ids.len)
    }

    pub(super) fn argmax_impl(&self, s: &Stream, logits: V, out: V, vocab: usize) -> Result<()> {
        const OP: &str = "argmax";
        let di = dt_index(OP, "logits", &logits)?;
        want(OP, "out", &out, DType::I32)?;
        shape(OP, vocab > 0 && logits.len.is_multiple_of(vocab) && out.len == logits.len / vocab, || {
            format!("logits {} / out {} with vocab {vocab}", logits.len, out.len)
        })?;
        let (pl, po) = (dptr(OP, "logits", &logits)?, dptr(OP, "out", &out)?);
        validate::select(OP, &logits, &out)?;
        let rows = out.len;
        if rows == 0 {
            return Ok(());
        }
        let v = i32_arg(OP, "vocab", vocab)?;
        self.bind()?;
        let mut p = kargs![&pl, &po, &v];
        // SAFETY: matches `argmax_<dt>(const T*, int*, int)`; one block per checked row.
        unsafe { self.launch(s, ARGMAX[di], (rows as u32, 1, 1), 1024, 0, &mut p) }
    }

    pub(super) fn sample_impl(
        &self,
        s: &Stream,
        logits: V,
        out: V,
        vocab: usize,
        params: &[SampleParams],
    ) -> Result<()> {
        const OP: &str = "sample";
        let di = dt_index(OP, "logits", &logits)?;
        want(OP, "out", &out, DType::I32)?;
        shape(OP, vocab > 0 && logits.len.is_multiple_of(vocab) && out.len == logits.len / vocab, || {
            format!("logits {} / out {} with vocab {vocab}", logits.len, out.len)
        })?;
        shape(OP, params.len() == out.len, || format!("{} parameter rows for {} rows", params.len(), out.len))?;
        let (pl, po) = (dptr(OP, "logits", &logits)?, dptr(OP, "out", &out)?);
        validate::select(OP, &logits, &out)?;
        let v = i32_arg(OP, "vocab", vocab)?;
        i32_arg(OP, "rows", out.len)?;
        // Each row sorts its candidates in a slot of the stream's workspace.
        let vpow2 = vocab.next_power_of_two();
        let rows_per_launch = (super::ATTN_WORKSPACE_BYTES / (vpow2 * 8)).min(SAMPLE_ROWS_MAX);
        if rows_per_launch == 0 {
            return Err(BackendError::Unsupported {
                op: OP,
                why: format!("vocab {vocab} exceeds the sampling workspace"),
            });
        }
        let vpow2_i = vpow2 as i32;
        // Held across every chunk's launch: each sorts in the workspace.
        let scratch = s.scratch(OP)?;
        let ws = scratch.ptr();
        self.bind()?;
        for (chunk_idx, chunk) in params.chunks(rows_per_launch).enumerate() {
            let mut batch = SampleBatch { rows: [SampleRow::default(); SAMPLE_ROWS_MAX] };
            for (dst, p) in batch.rows.iter_mut().zip(chunk) {
                // Clamped on the host (the kernel also compares top_k unsigned): see `clamped`.
                let p = p.clamped(vocab);
                *dst = SampleRow {
                    temperature: p.temperature,
                    top_k: p.top_k,
                    top_p: p.top_p,
                    pad: 0,
                    seed: p.seed,
                    step: p.step,
                };
            }
            let row0 = (chunk_idx * rows_per_launch) as i32;
            let mut p = kargs![&pl, &po, &v, &row0, &batch, &ws, &vpow2_i];
            // SAFETY: matches `sample_<dt>(const T*, int*, int, int, SampleBatch, u64*, int)`
            // (SampleBatch by value, same #[repr(C)] layout); rows row0..row0 + chunk.len() lie
            // inside checked views; the workspace holds rows_per_launch × vpow2 u64 and is only
            // used by work on this stream. The driver copies parameters at launch.
            unsafe { self.launch(s, SAMPLE[di], (chunk.len() as u32, 1, 1), 1024, 0, &mut p)? };
        }
        Ok(())
    }
}
