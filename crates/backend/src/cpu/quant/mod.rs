//! Products with quantized weights on the CPU: the GEMM (decode GEMV, batched decode and
//! prefill alike) and the embedding lookup over GGML blocks ([`crate::quant`]).
//!
//! The weights are read in their blocks and never widened in memory: each call quantizes its
//! activation rows to 16 bits per 32 elements ([`ActBlock`], one f32 scale each), then every
//! weight row's groups are unpacked to integers in registers and multiplied against the
//! activations in integers (`vpmaddwd`, 256 bits on AVX2, 512 on AVX-512BW), with the block
//! scales applied once per half-group in f32. 16-bit activations (where llama.cpp uses 8) keep
//! the logits within a few thousandths of the dequantize-then-f32 product, so greedy answers
//! are those of the float path. Kernels: AVX-512, AVX2 and portable scalar Rust, chosen at run
//! time by [`simd_level`] like the float GEMV; all compute the same integer sums, so they agree
//! to f32 rounding. Against the exact product with the f32 activations the error is the
//! activation rounding: at most `Σ_blocks d_x / 2 · Σ|w_i|` per output (`d_x` = block max / 32767).
//!
//! Parallelism: weight rows are split into chunks over the pool; each worker streams its rows
//! once, sequentially, and computes all activation rows against each (four at a time, so the
//! unpacked group is shared).
//!
//! Batch invariance: row `r` of an `m`-row product bit-equals the product of row `r` alone.
//! Each activation row is quantized by itself, and a kernel performs the same operations, in the
//! same order, for one row whatever the number of rows beside it; chunking splits weight rows,
//! never a dot product. Preemption by recomputation relies on it.

// Numeric kernels index several parallel arrays with one counter; iterators would hide that.
#![allow(clippy::needless_range_loop)]

mod portable;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::cell::Cell;

use super::gemm::{simd_level, SimdLevel};
use super::raw::Raw;
use super::CpuBackend;
use crate::quant::{dequantize_row, QuantType, GROUP};

/// 32 activations quantized to `d · qs[i]`, with the sums of `qs` over each half (the kernels
/// apply the block minimums with them: exactly in the portable kernel, as `ds = d · s` in f32
/// in the vector ones).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub(crate) struct ActBlock {
    pub qs: [i16; 32],
    pub d: f32,
    pub s: [i32; 2],
    pub ds: [f32; 2],
}

/// The largest activation integer.
pub(crate) const ACT_MAX: f32 = 32767.0;

/// 1.5 · 2^23: see [`quantize_acts`].
const ROUND_MAGIC: f32 = 12_582_912.0;

/// Activation rows the kernels take per weight row.
pub(crate) const ROWS_MAX: usize = 4;
/// Minimum weight bytes per parallel chunk (smaller matrices run on the calling thread).
const CHUNK_BYTES_MIN: usize = 32 * 1024;

/// Quantizes one row of `x` (a multiple of 32 long) into `out` (`x.len() / 32` blocks).
pub(crate) fn quantize_acts(x: &[f32], out: &mut [ActBlock]) {
    for (xb, o) in x.chunks_exact(GROUP).zip(out.iter_mut()) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / ACT_MAX;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut s = [0i32; 2];
        for (i, &v) in xb.iter().enumerate() {
            // Round half to even without a libm call (`round_ties_even` is one on x86-64 without
            // SSE4.1): |v · id| ≤ 32767 < 2^22, so adding 1.5 · 2^23 leaves a float whose unit is
            // 1, and the addition rounds to nearest, ties to even, as `round_ties_even` would.
            let q = ((v * id + ROUND_MAGIC) - ROUND_MAGIC) as i32;
            o.qs[i] = q as i16;
            s[i / 16] += q;
        }
        o.d = d;
        o.s = s;
        o.ds = [d * s[0] as f32, d * s[1] as f32];
    }
}

/// One weight row (`blocks` blocks) against `m` (1..=4) activation rows `x_stride` blocks apart:
/// `out[r] = w · x_r`.
pub(crate) type RowDot =
    unsafe fn(w: *const u8, blocks: usize, x: *const ActBlock, x_stride: usize, m: usize, out: &mut [f32; ROWS_MAX]);

/// The kernel for `t` at `level`.
pub(crate) fn row_dot(level: SimdLevel, t: QuantType) -> RowDot {
    #[cfg(target_arch = "x86_64")]
    if let Some(f) = x86::row_dot(level, t) {
        return f;
    }
    let _ = level;
    portable::row_dot(t)
}

thread_local! {
    static ACTS: Cell<Vec<ActBlock>> = const { Cell::new(Vec::new()) };
}

/// `c[m, n] = a[m, k] · wᵀ` for `w` = `n` rows of `k` elements of `t` at `w` (checked by the
/// caller: `n * t.row_bytes(k)` bytes), `a` and `c` f32.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(be: &CpuBackend, a: &Raw, w: *const u8, t: QuantType, c: &Raw, m: usize, n: usize, k: usize) {
    gemm_at(simd_level(), be, a, w, t, c, m, n, k)
}

/// As [`gemm`] with the kernels of `level` (one of [`super::simd_levels_available`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_at(
    level: SimdLevel,
    be: &CpuBackend,
    a: &Raw,
    w: *const u8,
    t: QuantType,
    c: &Raw,
    m: usize,
    n: usize,
    k: usize,
) {
    let row_bytes = k / t.block_len() * t.block_bytes();
    let (blocks, groups) = (k / t.block_len(), k / GROUP);
    let dot = row_dot(level, t);
    let mut acts = ACTS.with(|v| v.take());
    acts.clear();
    acts.resize(m * groups, ActBlock::default());
    // SAFETY: `a` is a checked f32 operand of `m * k` elements, read only.
    let x = unsafe { a.slice::<f32>() };
    for r in 0..m {
        quantize_acts(&x[r * k..(r + 1) * k], &mut acts[r * groups..(r + 1) * groups]);
    }
    let acts_ref: &[ActBlock] = &acts;
    let cp = c.ptr as usize;
    let w_addr = w as usize;
    let min_rows = CHUNK_BYTES_MIN.div_ceil(row_bytes.max(1)).max(4);
    be.for_chunks(n, be.chunk_for(n, min_rows), |j0, nj| {
        let c = cp as *mut f32;
        for j in j0..j0 + nj {
            let wr = (w_addr + j * row_bytes) as *const u8;
            let mut r0 = 0;
            while r0 < m {
                let ma = (m - r0).min(ROWS_MAX);
                let mut out = [0f32; ROWS_MAX];
                // SAFETY: row `j < n` lies inside the checked weights; `acts_ref` holds `m`
                // rows of `groups` blocks; the kernel's features were detected (`level`).
                unsafe { dot(wr, blocks, acts_ref.as_ptr().add(r0 * groups), groups, ma, &mut out) };
                for r in 0..ma {
                    // SAFETY: `c[(r0 + r) * n + j]` is inside the checked `m * n` output, and
                    // column `j` belongs to this worker's chunk alone.
                    unsafe { *c.add((r0 + r) * n + j) = out[r] };
                }
                r0 += ma;
            }
        }
    });
    ACTS.with(|v| v.set(acts));
}

/// `out[i] = dequantize(table row ids[i])`, rows of `hidden` elements of `t`; `ids` checked by
/// the caller to lie in the table.
pub(crate) fn embedding(table: *const u8, t: QuantType, ids: &[i32], out: &mut [f32], hidden: usize) {
    let row_bytes = hidden / t.block_len() * t.block_bytes();
    for (i, &id) in ids.iter().enumerate() {
        // SAFETY: the caller checked that row `id` of `row_bytes` lies inside the table.
        let row = unsafe { std::slice::from_raw_parts(table.add(id as usize * row_bytes), row_bytes) };
        dequantize_row(t, row, &mut out[i * hidden..(i + 1) * hidden]);
    }
}

#[cfg(test)]
mod tests;
