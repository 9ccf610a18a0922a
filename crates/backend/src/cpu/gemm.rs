//! GEMM on the CPU.
//!
//! Two paths:
//! - **GEMV** (`trans_b`, every linear layer, any `m`): our own kernel reads each weight row in
//!   its stored dtype (bf16/f16/f32), widens it to f32 in registers and multiplies it against
//!   the activation rows. Decode is bound by reading the weights, so this never makes f32 copies
//!   of them. The weights are walked in tiles of [`GEMV_J_TILE`] rows, and every activation row
//!   (in groups of four) is multiplied against a tile while it is in cache: a batch of `m`
//!   decodes reads the weights from memory once, not `m` times. x86-64 with AVX-512F gets a
//!   512-bit kernel, with AVX2+FMA+F16C a 256-bit one (detected at run time, never
//!   `target-cpu=native`); everything else a portable one the compiler auto-vectorises. Widening
//!   is exact (bf16 is a shift or a mask, f16 `vcvtph2ps`) and every product is an f32 FMA, so
//!   all levels agree with the f32 reference to rounding. Each worker's rows are read as a few
//!   long sequential streams (see the note below [`GEMV_CHUNK_MIN`]).
//!   On CPUs with AVX512_BF16, bf16 weights instead go through `vdpbf16ps` (module `dpbf16`):
//!   the activations are rounded to bf16 once per call (as a bf16 model multiplies them in
//!   transformers), products of two bf16 values are exact, accumulation stays f32; twice the
//!   multiply rate of widening to f32, which is what bounds a batched decode step. On by default;
//!   `DJINN_CPU_BF16_DOT=0` widens to f32 instead (f32 activations: a bf16 GGUF's logits move
//!   0.0001 of the largest from its f32-dequantized reference instead of 0.006).
//!
//!   **Batch invariance** (a contract: preemption by recomputation rebuilds a session's KV by a
//!   batched prefill and must get the bits its decode steps made): each output element is one
//!   dot product accumulated in a fixed order — the same lanes, the same k steps, the same tail
//!   and reduction — whatever `m`, whatever the other rows and whichever group a row falls in. So
//!   row `r` of an `m`-row product bit-equals the 1-row product of that row, at a given
//!   [`SimdLevel`] (levels differ from each other in rounding). Tested below.
//! - **GEMM** (everything else): the `gemm` crate in f32. All-f32 operands go straight through
//!   (batched entries one after another, each parallel); other dtypes are converted panel by
//!   panel of `b` into per-thread scratch, panels spread over the pool.
//!
//! Accumulation is f32 in both; `c = alpha * a·op(b) + beta * c`, and `c` is not read when
//! `beta == 0` (so NaNs in a fresh output do not leak in).

// Numeric kernels index several parallel arrays with one counter; iterators would hide that.
#![allow(clippy::needless_range_loop)]

use std::sync::OnceLock;

use gemm::Parallelism;
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::raw::{load, store, with_f32, with_scratch, Raw};

#[cfg(target_arch = "x86_64")]
mod dpbf16;
use super::CpuBackend;
use crate::backend::GemmArgs;
use crate::error::{BackendError, Result};
use crate::DType;

/// Activation rows one portable kernel call multiplies against a weight row.
pub const GEMV_M_MAX: usize = 8;
/// Activation rows one SIMD kernel call multiplies against a tile of weight rows.
const ACT_GROUP: usize = 4;
/// Weight rows of one GEMV tile: a worker stores a tile's outputs together, and a kernel step's
/// rows are a fraction of a tile apart (so each stream is 32 to 64 rows long, see below).
const GEMV_J_TILE: usize = 256;
/// Tiles a batched bf16 GEMV chunk is cut into (each at least [`ACT_GROUP`] rows): the next
/// tile's weights are prefetched while the activation groups after the first run over this one
/// (see `dpbf16::Prefetch`).
const GEMV_PF_TILES: usize = 8;
/// Minimum weight rows per GEMV parallel chunk.
const GEMV_CHUNK_MIN: usize = 16;
/// Activation rows from which the GEMV is cut into finer chunks (see `gemv_chunk`).
const GEMV_FINE_M: usize = 4;
/// Minimum work per GEMV parallel chunk, in weight bytes times activation rows: handing a worker
/// less costs more than it saves (the small projections of a tiny model run on the calling
/// thread alone at m = 1; a batch's rows are as much work again each).
const GEMV_CHUNK_BYTES_MIN: usize = 64 * 1024;
// How the GEMV kernels stream the weights: a kernel step multiplies R rows at once (sharing each
// activation load, which is what bounds it in cache). Neighbouring rows read in lockstep are, for
// short rows (k = 576 is 1152 bytes), many short interleaved streams that the hardware
// prefetchers do not pick up, which held the GEMV to half the read bandwidth from DRAM (software
// prefetch did not help). So the R rows of a step are a fraction of a row tile apart instead:
// each is one long sequential stream through its part of the tile.

/// Columns of `op(b)` per panel on the converting GEMM path: at least, and at most.
const PANEL_N: usize = 128;
const PANEL_N_MAX: usize = 512;

/// The vector instruction set the kernels run with, detected once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimdLevel {
    /// x86-64 AVX-512F on top of AVX2 + FMA + F16C: the GEMV runs 512 bits wide, the other
    /// kernels as for [`SimdLevel::Avx2Fma`].
    Avx512,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2Fma,
    /// Portable Rust (auto-vectorised for the build's baseline target).
    Portable,
}

impl SimdLevel {
    /// Whether AVX2 + FMA + F16C code may run (true for both x86 vector levels).
    pub fn has_avx2(self) -> bool {
        matches!(self, SimdLevel::Avx512 | SimdLevel::Avx2Fma)
    }
}

/// Every level this machine can run, best first (the detected level and everything below it).
pub fn simd_levels_available() -> Vec<SimdLevel> {
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
            if is_x86_feature_detected!("avx512f") {
                v.push(SimdLevel::Avx512);
            }
            v.push(SimdLevel::Avx2Fma);
        }
    }
    v.push(SimdLevel::Portable);
    v
}

/// The level the kernels use on this machine (cached): the best available, capped by
/// `DJINN_CPU_SIMD` = `portable` | `avx2` (to test or compare the lower levels).
pub fn simd_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        let avail = simd_levels_available();
        let cap = match std::env::var("DJINN_CPU_SIMD").as_deref() {
            Ok("portable") => SimdLevel::Portable,
            Ok("avx2") => SimdLevel::Avx2Fma,
            _ => avail[0],
        };
        // `avail` is ordered best first; take the first at or below the cap.
        let rank = |l: SimdLevel| match l {
            SimdLevel::Avx512 => 2,
            SimdLevel::Avx2Fma => 1,
            SimdLevel::Portable => 0,
        };
        avail.into_iter().find(|l| rank(*l) <= rank(cap)).unwrap_or(SimdLevel::Portable)
    })
}

/// Whether the bf16-weight GEMV at `level` runs `vdpbf16ps` (activations rounded to bf16, see
/// `dpbf16`): on AVX-512 CPUs with AVX512_BF16 unless `DJINN_CPU_BF16_DOT=0` (cached; see the
/// module docs).
fn bf16_dot(level: SimdLevel) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static ON: OnceLock<bool> = OnceLock::new();
        level == SimdLevel::Avx512
            && *ON.get_or_init(|| dpbf16::available() && std::env::var("DJINN_CPU_BF16_DOT").as_deref() != Ok("0"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = level;
        false
    }
}

fn need(op_len: usize, name: &'static str, batch: usize, stride: usize, per: usize) -> Result<()> {
    let want = (batch - 1).checked_mul(stride).and_then(|v| v.checked_add(per));
    match want {
        Some(w) if w <= op_len => Ok(()),
        _ => Err(BackendError::Shape {
            op: "gemm",
            why: format!("{name} has {op_len} elements, needs ({batch} - 1) * {stride} + {per}"),
        }),
    }
}

pub(crate) fn gemm(be: &CpuBackend, a: &Raw, b: &Raw, c: &Raw, g: &GemmArgs) -> Result<()> {
    let (m, n, k) = (g.m, g.n, g.k);
    if g.batch == 0 || m == 0 || n == 0 {
        return Ok(());
    }
    let mk = m.checked_mul(k);
    let nk = n.checked_mul(k);
    let mn = m.checked_mul(n);
    let (Some(mk), Some(nk), Some(mn)) = (mk, nk, mn) else {
        return Err(BackendError::Shape { op: "gemm", why: format!("m={m} n={n} k={k} overflow") });
    };
    need(a.len, "a", g.batch, g.stride_a, mk)?;
    need(b.len, "b", g.batch, g.stride_b, nk)?;
    need(c.len, "c", g.batch, g.stride_c, mn)?;
    // Several weight matrices by one activation matrix (a model's k/v or gate/up projections):
    // one parallel region over all their rows, the activations prepared once.
    if g.trans_b && k > 0 && (2..=PARTS_MAX).contains(&g.batch) && g.stride_a == 0 && g.stride_c >= mn {
        let mut parts = [Part { w: *b, c: *c, n }; PARTS_MAX];
        for (bi, p) in parts.iter_mut().enumerate().take(g.batch) {
            *p = Part { w: b.sub(bi * g.stride_b, nk), c: c.sub(bi * g.stride_c, mn), n };
        }
        gemv(be, &a.sub(0, mk), &parts[..g.batch], m, k, g.alpha, g.beta, g.bf16_activations);
        return Ok(());
    }
    for bi in 0..g.batch {
        let (ab, bb, cb) = (a.sub(bi * g.stride_a, mk), b.sub(bi * g.stride_b, nk), c.sub(bi * g.stride_c, mn));
        if k == 0 {
            scale_c(&cb, g.beta);
        } else if g.trans_b {
            // Every linear layer, whatever `m`: one kernel whose rows do not depend on each
            // other (batch invariance, see the module docs).
            gemv(be, &ab, &[Part { w: bb, c: cb, n }], m, k, g.alpha, g.beta, g.bf16_activations);
        } else {
            general(be, &ab, &bb, &cb, m, n, k, g.trans_b, g.alpha, g.beta);
        }
    }
    Ok(())
}

/// `c = beta * c` (the `k == 0` product).
fn scale_c(c: &Raw, beta: f32) {
    let mut t = [0f32; 256];
    let mut i = 0;
    while i < c.len {
        let n = 256.min(c.len - i);
        // SAFETY: `i..i + n` is inside the checked output.
        unsafe {
            if beta != 0.0 {
                load(c, i, &mut t[..n]);
            }
            t[..n].iter_mut().for_each(|v| *v = if beta == 0.0 { 0.0 } else { *v * beta });
            store(c, i, &t[..n]);
        }
        i += n;
    }
}

/// Stores `alpha * acc + beta * c` into `c[first..first + acc.len()]`.
///
/// # Safety
/// The range must be inside `c` and owned by the calling worker.
unsafe fn finish(c: &Raw, first: usize, acc: &mut [f32], alpha: f32, beta: f32) {
    if beta != 0.0 {
        let mut old = [0f32; GEMV_J_TILE];
        let old = &mut old[..acc.len()];
        load(c, first, old);
        acc.iter_mut().zip(old.iter()).for_each(|(v, o)| *v = alpha * *v + beta * *o);
    } else if alpha != 1.0 {
        acc.iter_mut().for_each(|v| *v *= alpha);
    }
    store(c, first, acc);
}

/// Weight rows per parallel GEMV chunk for `m` activation rows: a few chunks per worker (so a
/// preempted worker's share is picked up by the others), as many chunks as a multiple of the
/// threads, of equal size, so the threads finish together (a 192-row projection was cut
/// 60/60/60/12 rows: one of two threads did 120, the other waited), a multiple of 4 rows.
/// A batch (`m` ≥ [`GEMV_FINE_M`]) is compute bound and gets twice as many chunks: the thread
/// that finishes first then waits for half as long a last chunk; one row is bound by reading
/// the weights and keeps its longer streams.
fn gemv_chunk(be: &CpuBackend, n: usize, row_bytes: usize, m: usize) -> usize {
    gemv_chunk_for(be.threads, n, row_bytes, m)
}

fn gemv_chunk_for(threads: usize, n: usize, row_bytes: usize, m: usize) -> usize {
    let min = GEMV_CHUNK_MIN.max(GEMV_CHUNK_BYTES_MIN.div_ceil(row_bytes.max(1) * m.max(1)));
    let threads = threads.max(1);
    let per_thread = if m >= GEMV_FINE_M { 8 } else { 4 };
    let target = n.div_ceil(threads * per_thread).max(min);
    let chunks = n.div_ceil(target).next_multiple_of(threads);
    n.div_ceil(chunks).next_multiple_of(4)
}

/// One weight row's dot products with `m` activation rows: `out[r] = w · x[r*k..(r+1)*k]`.
type DotFn = unsafe fn(w: *const u8, x: &[f32], k: usize, m: usize, out: &mut [f32; GEMV_M_MAX]);

fn dot_fn(dtype: DType) -> DotFn {
    match dtype {
        DType::BF16 => portable::dot::<bf16>,
        DType::F16 => portable::dot::<f16>,
        _ => portable::dot::<f32>,
    }
}

/// One weight matrix of a (grouped) GEMV and its output: `c[m, n] = a · wᵀ` (`w` is `[n, k]`).
#[derive(Clone, Copy, Debug)]
struct Part {
    w: Raw,
    c: Raw,
    n: usize,
}

/// Most weight matrices one grouped GEMV multiplies by the same activations.
const PARTS_MAX: usize = 4;

#[allow(clippy::too_many_arguments)]
fn gemv(be: &CpuBackend, a: &Raw, parts: &[Part], m: usize, k: usize, alpha: f32, beta: f32, bf16_activations: bool) {
    let level = simd_level();
    gemv_parts_at(level, bf16_activations && bf16_dot(level), be, a, parts, m, k, alpha, beta)
}

/// The GEMV of one weight matrix with the kernels of `level` (see [`gemv_parts_at`]).
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
fn gemv_at(
    level: SimdLevel,
    dot: bool,
    be: &CpuBackend,
    a: &Raw,
    w: &Raw,
    c: &Raw,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    beta: f32,
) {
    gemv_parts_at(level, dot, be, a, &[Part { w: *w, c: *c, n }], m, k, alpha, beta)
}

/// The GEMV of every part (weights of one dtype, at most [`PARTS_MAX`]) by the same `m × k`
/// activations, with the kernels of `level`, which must be one of [`simd_levels_available`];
/// `dot` picks the `vdpbf16ps` kernel for bf16 weights at AVX-512 (only where
/// `dpbf16::available`). Each output element is computed exactly as in a GEMV of its part alone.
#[allow(clippy::too_many_arguments)]
fn gemv_parts_at(
    level: SimdLevel,
    dot: bool,
    be: &CpuBackend,
    a: &Raw,
    parts: &[Part],
    m: usize,
    k: usize,
    alpha: f32,
    beta: f32,
) {
    debug_assert!(parts.len() <= PARTS_MAX && parts.iter().all(|p| p.w.dtype == parts[0].w.dtype));
    #[cfg(target_arch = "x86_64")]
    if level.has_avx2() {
        return gemv_simd(level, dot, be, a, parts, m, k, alpha, beta);
    }
    let _ = (level, dot);
    for p in parts {
        gemv_portable(be, a, &p.w, &p.c, m, p.n, k, alpha, beta);
    }
}

#[allow(clippy::too_many_arguments)]
fn gemv_portable(be: &CpuBackend, a: &Raw, w: &Raw, c: &Raw, m: usize, n: usize, k: usize, alpha: f32, beta: f32) {
    let dot = dot_fn(w.dtype);
    let row_bytes = k * w.dtype.size_bytes();
    let run = |x: &[f32]| {
        be.for_chunks(n, gemv_chunk(be, n, row_bytes, m), |j0, nj| {
            let mut acc = [[0f32; GEMV_J_TILE]; GEMV_M_MAX];
            let mut jt = j0;
            while jt < j0 + nj {
                let nt = GEMV_J_TILE.min(j0 + nj - jt);
                // Every activation row against this tile while it is in cache.
                let mut r0 = 0;
                while r0 < m {
                    let ma = (m - r0).min(GEMV_M_MAX);
                    for j in 0..nt {
                        let mut out = [0f32; GEMV_M_MAX];
                        // SAFETY: row `jt + j < n` of the weights (n*k elements, checked) is read
                        // only; `x[r0*k..]` holds `ma*k` f32 values; the kernel matches this
                        // machine's features.
                        unsafe { dot(w.ptr.add((jt + j) * row_bytes), &x[r0 * k..], k, ma, &mut out) };
                        for r in 0..ma {
                            acc[r][j] = out[r];
                        }
                    }
                    for (r, acc_r) in acc.iter_mut().enumerate().take(ma) {
                        // SAFETY: `c[(r0+r)*n + jt..+nt]` belongs to this worker's column chunk.
                        unsafe { finish(c, (r0 + r) * n + jt, &mut acc_r[..nt], alpha, beta) };
                    }
                    r0 += ma;
                }
                jt += nt;
            }
        });
    };
    // SAFETY: `a` is a checked operand of at least `m*k` elements (checked by the caller),
    // disjoint from `c` and read-only here.
    unsafe { with_f32(a, m * k, run) }
}

/// How the rows of a grouped GEMV's parts are cut into parallel pieces: each part into pieces
/// of equal size (a multiple of 4 rows, the last one shorter) about `chunk` rows long.
#[derive(Clone, Copy, Debug)]
struct Pieces {
    /// Piece size of each part.
    size: [usize; PARTS_MAX],
    /// Index of each part's first piece; `first[parts]` is the number of pieces.
    first: [usize; PARTS_MAX + 1],
    parts: usize,
}

impl Pieces {
    fn new(parts: &[Part], chunk: usize) -> Pieces {
        let mut p = Pieces { size: [0; PARTS_MAX], first: [0; PARTS_MAX + 1], parts: parts.len() };
        for (i, part) in parts.iter().enumerate() {
            let count = part.n.div_ceil(chunk.max(1));
            let size = part.n.div_ceil(count.max(1)).next_multiple_of(4);
            p.size[i] = size;
            p.first[i + 1] = p.first[i] + part.n.div_ceil(size.max(1));
        }
        p
    }

    fn count(&self) -> usize {
        self.first[self.parts]
    }

    /// Piece `i` as (part, first row, rows).
    fn get(&self, i: usize, parts: &[Part]) -> (usize, usize, usize) {
        let p = (0..self.parts).find(|&p| i < self.first[p + 1]).unwrap_or(self.parts - 1);
        let j0 = (i - self.first[p]) * self.size[p];
        (p, j0, self.size[p].min(parts[p].n - j0))
    }
}

/// The GEMV on AVX2 or AVX-512. Several weight rows share each activation load (load ports, not
/// FMAs, are the limit in cache). For bf16 the activations are reordered once per call to match
/// the lanes in which the kernel widens the weights (see `avx2::permute_for_bf16` and
/// `avx512::split_even_odd`), so widening costs one or two cheap ops per vector. The parts'
/// rows are cut into pieces spread over the workers in one parallel region.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn gemv_simd(
    level: SimdLevel,
    dot: bool,
    be: &CpuBackend,
    a: &Raw,
    parts: &[Part],
    m: usize,
    k: usize,
    alpha: f32,
    beta: f32,
) {
    let wdt = parts[0].w.dtype;
    let wide = level == SimdLevel::Avx512;
    // bf16 weights by bf16-rounded activations, `vdpbf16ps` (same step as AVX-512F).
    let dot = dot && wide && wdt == DType::BF16;
    // Elements per kernel step: the kernels cover `kb` (a multiple of the step), the rest is a
    // scalar tail.
    let step = if wide { avx512::STEP } else { avx2::STEP };
    let kb = k - k % step;
    let row_bytes = k * wdt.size_bytes();
    type RunFn = unsafe fn(*const u8, usize, usize, *const f32, usize, usize, *mut f32, usize);
    // (`dot` calls `dpbf16::run` instead.)
    let run_fn: RunFn = match (wide, wdt) {
        (true, DType::BF16) => avx512::run::<{ avx512::BF16 }>,
        (true, DType::F16) => avx512::run::<{ avx512::F16 }>,
        (true, _) => avx512::run::<{ avx512::F32 }>,
        (false, DType::BF16) => avx2::run::<{ avx2::BF16 }>,
        (false, DType::F16) => avx2::run::<{ avx2::F16 }>,
        (false, _) => avx2::run::<{ avx2::F32 }>,
    };
    // The kernels read activation rows `kb` apart, reordered for bf16; f16/f32 weights with no
    // tail use the rows as they are.
    // With `dot` they are bf16, two per f32 slot: a row is `kb / 2` slots.
    let direct = wdt != DType::BF16 && kb == k;
    let x_row = if dot { kb / 2 } else { kb };
    // Pieces sized as for the largest part alone: as many of them per part as its own GEMV
    // would have chunks, so the workers finish the region as evenly as they would finish it.
    let n_max = parts.iter().map(|p| p.n).max().unwrap_or(0);
    let pieces = Pieces::new(parts, gemv_chunk(be, n_max, row_bytes, m));
    let region_bytes = parts.iter().map(|p| p.n).sum::<usize>() * row_bytes * m.max(1);
    let run = |x: &[f32]| {
        with_scratch(if direct { 0 } else { m * x_row }, |xbuf| {
            for r in (0..m).filter(|_| !direct) {
                let (src, dst) = (&x[r * k..r * k + kb], &mut xbuf[r * x_row..(r + 1) * x_row]);
                match (wide, wdt) {
                    // SAFETY: AVX512_BF16 was detected (`dot` is only set where it was).
                    (true, DType::BF16) if dot => unsafe { dpbf16::round_to_bf16(src, dst) },
                    // SAFETY: AVX-512F was detected (`wide`).
                    (true, DType::BF16) => unsafe { avx512::split_even_odd(src, dst) },
                    (false, DType::BF16) => avx2::permute_for_bf16(src, dst),
                    _ => dst.copy_from_slice(src),
                }
            }
            let xp: &[f32] = if direct { x } else { xbuf };
            let piece = |i: usize| {
                let (p, j0, nj) = pieces.get(i, parts);
                let (w, c, n) = (&parts[p].w, &parts[p].c, parts[p].n);
                // The kernel writes straight into an f32 output when nothing is left to apply
                // to its sums (no tail, alpha 1, beta 0): no pass through the stack.
                let straight = k == kb && alpha == 1.0 && beta == 0.0 && c.dtype == DType::F32;
                let mut acc = [[0f32; GEMV_J_TILE]; ACT_GROUP];
                // A batch's first activation group reads a tile from memory at the rate the
                // kernel consumes it, which memory does not reach with two cores streaming (a
                // third of a 16-row GEMV's time); the other groups read it from cache and leave
                // memory idle. So a batched chunk is cut into small tiles and the groups after
                // the first prefetch the next tile, spread over their steps (the last tile
                // prefetches the next piece's first): 30 layers' linears from memory at m = 16,
                // two threads, 1.15× and then 1.07× faster (`gemv_from_memory_timing`).
                let groups = m.div_ceil(ACT_GROUP);
                let prefetch = dot && groups > 1;
                let tile_of = |nj: usize| {
                    if prefetch {
                        nj.div_ceil(GEMV_PF_TILES).next_multiple_of(ACT_GROUP).min(GEMV_J_TILE)
                    } else {
                        GEMV_J_TILE
                    }
                };
                let tile = tile_of(nj);
                let mut jt = j0;
                while jt < j0 + nj {
                    let nt = tile.min(j0 + nj - jt);
                    // The next tile: this chunk's, else the first of the next piece (the next
                    // one claimed, by this thread or the other, which then reads it from this
                    // core's cache instead of memory). As (first byte, cache lines).
                    let (next_w, next_lines): (*const u8, usize) = if !prefetch {
                        (std::ptr::null(), 0)
                    } else if jt + nt < j0 + nj {
                        // SAFETY: row `jt + nt` < n is inside this part's weights.
                        (
                            unsafe { w.ptr.add((jt + nt) * row_bytes) as *const u8 },
                            tile.min(j0 + nj - jt - nt) * row_bytes / 64,
                        )
                    } else if i + 1 < pieces.count() {
                        let (p2, j2, n2) = pieces.get(i + 1, parts);
                        // SAFETY: row `j2` < its part's n is inside that part's weights.
                        (
                            unsafe { parts[p2].w.ptr.add(j2 * row_bytes) as *const u8 },
                            tile_of(n2).min(n2) * row_bytes / 64,
                        )
                    } else {
                        (std::ptr::null(), 0)
                    };
                    // Every activation row against this weight tile while it is in cache (read
                    // from memory once per call, whatever `m`), in groups of up to four: all
                    // `nt` weight rows per kernel call.
                    let mut r0 = 0;
                    while r0 < m {
                        let ma = (m - r0).min(ACT_GROUP);
                        // Group g ≥ 1 of the tile prefetches its share of the next tile.
                        let g = r0 / ACT_GROUP;
                        let share = next_lines.div_ceil(groups.saturating_sub(1).max(1));
                        let (l0, l1) = (((g.max(1) - 1) * share).min(next_lines), (g * share).min(next_lines));
                        let pf = if l1 > l0 {
                            // SAFETY: lines `l0..l1` of the next tile lie inside its weights;
                            // nothing is read through the pointer.
                            dpbf16::Prefetch { first: unsafe { next_w.add(l0 * 64) }, lines: l1 - l0 }
                        } else {
                            dpbf16::Prefetch::NONE
                        };
                        let (out, out_stride) = if straight {
                            // SAFETY: rows `r0..r0+ma`, columns `jt..jt+nt` of the f32 output
                            // (`m * n` elements) belong to this piece alone.
                            (unsafe { (c.ptr as *mut f32).add(r0 * n + jt) }, n)
                        } else {
                            (acc[0].as_mut_ptr(), GEMV_J_TILE)
                        };
                        // SAFETY: rows `jt..jt+nt` < n lie inside the weights; `xp` holds `m * kb`
                        // (reordered for bf16) values; `out` has room for `ma` rows of `nt`
                        // results, `out_stride` apart; `level` (AVX2/FMA/F16C, and AVX-512F when
                        // wide) was detected on this machine.
                        unsafe {
                            let (wt, xt) = (w.ptr.add(jt * row_bytes), xp.as_ptr().add(r0 * x_row));
                            if dot {
                                dpbf16::run::<true>(wt, row_bytes, nt, xt, kb, ma, out, out_stride, pf)
                            } else {
                                run_fn(wt, row_bytes, nt, xt, kb, ma, out, out_stride)
                            }
                        };
                        if !straight {
                            if k > kb {
                                for j in 0..nt {
                                    let mut tail = [0f32; 32];
                                    // SAFETY: elements `kb..k` of row `jt + j` < n.
                                    unsafe { load(w, (jt + j) * k + kb, &mut tail[..k - kb]) };
                                    for r in 0..ma {
                                        let xr = &x[(r0 + r) * k + kb..(r0 + r + 1) * k];
                                        // The `vdpbf16ps` path rounds the tail's activations too.
                                        let xv = |v: f32| if dot { bf16::from_f32(v).to_f32() } else { v };
                                        acc[r][j] += tail.iter().zip(xr).map(|(a, b)| a * xv(*b)).sum::<f32>();
                                    }
                                }
                            }
                            for (r, acc_r) in acc.iter_mut().enumerate().take(ma) {
                                // SAFETY: `c[(r0+r)*n + jt..+nt]` belongs to this piece.
                                unsafe { finish(c, (r0 + r) * n + jt, &mut acc_r[..nt], alpha, beta) };
                            }
                        }
                        r0 += ma;
                    }
                    jt += nt;
                }
            };
            // A region with less than two chunks' minimum of weights (a tiny model's grouped
            // projections) runs on the calling thread, as a lone GEMV that small does: split,
            // it costs more in hand-offs than it saves.
            if region_bytes < 2 * GEMV_CHUNK_BYTES_MIN {
                (0..pieces.count()).for_each(piece);
            } else {
                be.parallel_for(pieces.count(), piece);
            }
        })
    };
    // SAFETY: `a` is a checked operand of at least `m*k` elements (checked by the caller),
    // disjoint from every output and read-only here.
    unsafe { with_f32(a, m * k, run) }
}

/// Converts a panel of `op(b)` (columns `j0..j0+nb`) to f32, laid out `[nb, k]` (trans_b) or
/// `[k, nb]`.
///
/// # Safety
/// The panel must be inside `b`, which nothing writes meanwhile.
unsafe fn b_panel(b: &Raw, trans_b: bool, n: usize, k: usize, j0: usize, nb: usize, dst: &mut [f32]) {
    if trans_b {
        load(b, j0 * k, &mut dst[..nb * k]);
    } else {
        for kk in 0..k {
            load(b, kk * n + j0, &mut dst[kk * nb..(kk + 1) * nb]);
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn general(
    be: &CpuBackend,
    a: &Raw,
    b: &Raw,
    c: &Raw,
    m: usize,
    n: usize,
    k: usize,
    trans_b: bool,
    alpha: f32,
    beta: f32,
) {
    let (b_cs, b_rs) = if trans_b { (k as isize, 1) } else { (1, n as isize) };
    let all_f32 = a.dtype == DType::F32 && b.dtype == DType::F32 && c.dtype == DType::F32;
    // Panels of at most PANEL_N_MAX columns keep the per-thread scratch bounded (k · 512 f32).
    let chunk = be.chunk_for(n, PANEL_N).min(PANEL_N_MAX);
    if all_f32 {
        // Column panels straight from `b` into `c` on the backend's own workers (one set of
        // threads for every op: a second pool would contend with the first's spinning workers).
        be.for_chunks(n, chunk, |j0, nb| {
            let b_panel = if trans_b { j0 * k } else { j0 };
            // SAFETY: every operand is checked for the extents this call touches (`need`); `c` is
            // disjoint from `a` and `b`, and columns `j0..j0+nb` of `c` belong to this chunk
            // alone. gemm's dst = alpha_g*dst + beta_g*lhs*rhs, read_dst only when beta != 0.
            unsafe {
                gemm::gemm(
                    m,
                    nb,
                    k,
                    (c.ptr as *mut f32).add(j0),
                    1,
                    n as isize,
                    beta != 0.0,
                    a.ptr as *const f32,
                    1,
                    k as isize,
                    (b.ptr as *const f32).add(b_panel),
                    b_cs,
                    b_rs,
                    beta,
                    alpha,
                    false,
                    false,
                    false,
                    Parallelism::None,
                )
            }
        });
        return;
    }
    let run = |x: &[f32]| {
        be.for_chunks(n, chunk, |j0, nb| {
            with_scratch(nb * k + m * nb, |buf| {
                let (bp, cp) = buf.split_at_mut(nb * k);
                // SAFETY: columns `j0..j0+nb` are inside `op(b)`; `c`'s panel (rows of `nb`
                // columns starting at `j0`) belongs to this worker; `cp` is `[m, nb]` scratch.
                unsafe {
                    b_panel(b, trans_b, n, k, j0, nb, bp);
                    let (rhs_cs, rhs_rs) = if trans_b { (k as isize, 1) } else { (1, nb as isize) };
                    let direct = c.dtype == DType::F32;
                    let (dst, dst_rs) = if direct {
                        ((c.ptr as *mut f32).add(j0), n as isize)
                    } else {
                        if beta != 0.0 {
                            for r in 0..m {
                                load(c, r * n + j0, &mut cp[r * nb..(r + 1) * nb]);
                            }
                        }
                        (cp.as_mut_ptr(), nb as isize)
                    };
                    gemm::gemm(
                        m,
                        nb,
                        k,
                        dst,
                        1,
                        dst_rs,
                        beta != 0.0,
                        x.as_ptr(),
                        1,
                        k as isize,
                        bp.as_ptr(),
                        rhs_cs,
                        rhs_rs,
                        beta,
                        alpha,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                    if !direct {
                        for r in 0..m {
                            store(c, r * n + j0, &cp[r * nb..(r + 1) * nb]);
                        }
                    }
                }
            })
        });
    };
    // SAFETY: `a` is a checked operand of at least `m*k` elements (checked by the caller),
    // disjoint from `c` and read-only here.
    unsafe { with_f32(a, m * k, run) }
}

mod portable {
    use super::*;

    /// A storage type the portable kernel widens in chunks.
    pub trait Widen: Copy + 'static {
        fn widen(src: &[Self], dst: &mut [f32]);
    }
    impl Widen for f32 {
        fn widen(src: &[f32], dst: &mut [f32]) {
            dst.copy_from_slice(src)
        }
    }
    impl Widen for f16 {
        fn widen(src: &[f16], dst: &mut [f32]) {
            src.convert_to_f32_slice(dst)
        }
    }
    impl Widen for bf16 {
        fn widen(src: &[bf16], dst: &mut [f32]) {
            src.convert_to_f32_slice(dst)
        }
    }

    const CHUNK: usize = 256;

    /// # Safety
    /// `w` must point at `k` readable elements of `T`; `x` must hold `m * k` values.
    pub unsafe fn dot<T: Widen>(w: *const u8, x: &[f32], k: usize, m: usize, out: &mut [f32; GEMV_M_MAX]) {
        let w = std::slice::from_raw_parts(w as *const T, k);
        let mut wf = [0f32; CHUNK];
        let mut acc = [[0f32; 8]; GEMV_M_MAX];
        let mut i = 0;
        while i < k {
            let n = CHUNK.min(k - i);
            T::widen(&w[i..i + n], &mut wf[..n]);
            for r in 0..m {
                let xr = &x[r * k + i..r * k + i + n];
                let (wc, wt) = wf[..n].split_at(n - n % 8);
                let (xc, xt) = xr.split_at(n - n % 8);
                for (w8, x8) in wc.chunks_exact(8).zip(xc.chunks_exact(8)) {
                    for l in 0..8 {
                        acc[r][l] += w8[l] * x8[l];
                    }
                }
                for (a, b) in wt.iter().zip(xt) {
                    acc[r][0] += a * b;
                }
            }
            i += n;
        }
        for r in 0..m {
            out[r] = acc[r].iter().sum();
        }
    }
}

/// The stream layout both SIMD GEMV kernels share (see the note on streams above): `nrows` rows
/// as R streams — rows j, j + q, j + 2q, ... of one step share each activation load, and each
/// stream walks its q consecutive rows straight through memory — then the rows left over one at
/// a time. `rows(w, stride, out)` is the kernel over R rows `stride` bytes apart from `w`, `row`
/// the same over one; outputs land at `out[a * out_stride + row index]` for activation `a < M`.
///
/// # Safety
/// `w` holds `nrows` rows of `row_bytes` each, `out` has room for M rows of `out_stride ≥ nrows`
/// floats, and the kernels' own contracts hold for the rows handed to them.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn stream_rows<const R: usize, const M: usize>(
    w: *const u8,
    row_bytes: usize,
    nrows: usize,
    out: *mut f32,
    out_stride: usize,
    rows: impl Fn(*const u8, usize, &mut [[f32; M]; R]),
    row: impl Fn(*const u8, usize, &mut [[f32; M]; 1]),
) {
    let q = nrows / R;
    for j in 0..q {
        let mut o = [[0f32; M]; R];
        rows(w.add(j * row_bytes), q * row_bytes, &mut o);
        for (r, or) in o.iter().enumerate() {
            for (a, v) in or.iter().enumerate() {
                *out.add(a * out_stride + j + r * q) = *v;
            }
        }
    }
    for j in q * R..nrows {
        let mut o = [[0f32; M]; 1];
        row(w.add(j * row_bytes), row_bytes, &mut o);
        for (a, v) in o[0].iter().enumerate() {
            *out.add(a * out_stride + j) = *v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    pub const BF16: u8 = 0;
    pub const F16: u8 = 1;
    pub const F32: u8 = 2;
    /// Elements of a row per kernel step.
    pub const STEP: usize = 16;

    /// Eight weights at element `i`, widened to f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8<const DT: u8>(w: *const u8, i: usize) -> __m256 {
        match DT {
            BF16 => {
                // bf16 is the top half of an f32: zero-extend to 32 bits and shift up.
                let h = _mm_loadu_si128(w.add(i * 2) as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
            F16 => _mm256_cvtph_ps(_mm_loadu_si128(w.add(i * 2) as *const __m128i)),
            _ => _mm256_loadu_ps(w.add(i * 4) as *const f32),
        }
    }

    /// Reorders each 16-element block of `x` as `[0..4, 8..12, 4..8, 12..16]`: the element order
    /// in which `unpacklo_epi16`/`unpackhi_epi16` widen 16 bf16 values (per 128-bit lane).
    pub fn permute_for_bf16(x: &[f32], xp: &mut [f32]) {
        for (src, dst) in x.chunks_exact(16).zip(xp.chunks_exact_mut(16)) {
            dst[0..4].copy_from_slice(&src[0..4]);
            dst[4..8].copy_from_slice(&src[8..12]);
            dst[8..12].copy_from_slice(&src[4..8]);
            dst[12..16].copy_from_slice(&src[12..16]);
        }
    }

    /// `out[a * out_stride + j] = Σ_{i < k16} w[j][i] · x[a][i]` for `nrows` weight rows of
    /// storage type `DT`, `row_bytes` apart, and `acts` (1..=4) activation rows `k16` apart
    /// (permuted with [`permute_for_bf16`] when `DT` is bf16).
    ///
    /// # Safety
    /// AVX2/FMA/F16C must be available; the weight rows must hold `k16` readable values, `xp`
    /// `acts * k16` f32 values and `out` room for `acts` rows of `nrows` at `out_stride`; `k16`
    /// must be a multiple of 16.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run<const DT: u8>(
        w: *const u8,
        row_bytes: usize,
        nrows: usize,
        xp: *const f32,
        k16: usize,
        acts: usize,
        out: *mut f32,
        out_stride: usize,
    ) {
        // Weight rows per step so the accumulators (2 per row and activation) fit the registers.
        match acts {
            1 => run_rm::<DT, 4, 1>(w, row_bytes, nrows, xp, k16, out, out_stride),
            2 => run_rm::<DT, 2, 2>(w, row_bytes, nrows, xp, k16, out, out_stride),
            3 => run_rm::<DT, 1, 3>(w, row_bytes, nrows, xp, k16, out, out_stride),
            _ => run_rm::<DT, 1, 4>(w, row_bytes, nrows, xp, k16, out, out_stride),
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn run_rm<const DT: u8, const R: usize, const M: usize>(
        w: *const u8,
        row_bytes: usize,
        nrows: usize,
        xp: *const f32,
        k16: usize,
        out: *mut f32,
        out_stride: usize,
    ) {
        // SAFETY: the caller's contract (rows inside `w`, activations `xp`, outputs inside `out`)
        // is the driver's and the kernel's; AVX2 + FMA + F16C are enabled here.
        super::stream_rows::<R, M>(
            w,
            row_bytes,
            nrows,
            out,
            out_stride,
            |w, stride, o| unsafe { rows_rm::<DT, R, M>(w, stride, xp, k16, o) },
            |w, stride, o| unsafe { rows_rm::<DT, 1, M>(w, stride, xp, k16, o) },
        )
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows_rm<const DT: u8, const R: usize, const M: usize>(
        w: *const u8,
        stride: usize,
        xp: *const f32,
        k16: usize,
        out: &mut [[f32; M]; R],
    ) {
        let zero = _mm256_setzero_si256();
        let mut acc = [[[_mm256_setzero_ps(); 2]; M]; R];
        let mut i = 0;
        while i < k16 {
            let mut xl = [_mm256_setzero_ps(); M];
            let mut xh = [_mm256_setzero_ps(); M];
            for a in 0..M {
                xl[a] = _mm256_loadu_ps(xp.add(a * k16 + i));
                xh[a] = _mm256_loadu_ps(xp.add(a * k16 + i + 8));
            }
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let wr = w.add(r * stride);
                let (lo, hi) = match DT {
                    BF16 => {
                        let wv = _mm256_loadu_si256(wr.add(i * 2) as *const __m256i);
                        // (0, w) word pairs are w << 16 as 32-bit lanes: exactly bf16 → f32.
                        (
                            _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, wv)),
                            _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, wv)),
                        )
                    }
                    F16 => (load8::<F16>(wr, i), load8::<F16>(wr, i + 8)),
                    _ => (load8::<F32>(wr, i), load8::<F32>(wr, i + 8)),
                };
                for a in 0..M {
                    acc_r[a][0] = _mm256_fmadd_ps(lo, xl[a], acc_r[a][0]);
                    acc_r[a][1] = _mm256_fmadd_ps(hi, xh[a], acc_r[a][1]);
                }
            }
            i += 16;
        }
        for r in 0..R {
            for a in 0..M {
                out[r][a] = hsum(_mm256_add_ps(acc[r][a][0], acc[r][a][1]));
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }
}

// The AVX-512 intrinsics are stable since Rust 1.89 (the workspace's `rust-version`).
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    pub use super::avx2::{BF16, F16, F32};
    /// Elements of a row per kernel step.
    pub const STEP: usize = 32;
    /// Weight rows at least this long take eight rows per step (one activation row).
    const LONG_ROW_BYTES: usize = 4096;

    /// Reorders each 32-element block of `x` as its 16 even-indexed then its 16 odd-indexed
    /// elements: a 512-bit load of 32 bf16 weights holds the even ones in the low and the odd
    /// ones in the high half of its 32-bit lanes.
    ///
    /// # Safety
    /// AVX-512F must be available.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn split_even_odd(x: &[f32], xp: &mut [f32]) {
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        for (src, dst) in x.chunks_exact(STEP).zip(xp.chunks_exact_mut(STEP)) {
            // SAFETY: both chunks hold 32 f32 values.
            unsafe {
                let (a, b) = (_mm512_loadu_ps(src.as_ptr()), _mm512_loadu_ps(src.as_ptr().add(16)));
                _mm512_storeu_ps(dst.as_mut_ptr(), _mm512_permutex2var_ps(a, even, b));
                _mm512_storeu_ps(dst.as_mut_ptr().add(16), _mm512_permutex2var_ps(a, odd, b));
            }
        }
    }

    /// As `avx2::run`, 32 elements per step; for bf16 `xp` is reordered with
    /// [`split_even_odd`].
    ///
    /// # Safety
    /// AVX-512F (and AVX2/FMA/F16C) must be available; the weight rows must hold `kb` readable
    /// values, `xp` `acts * kb` f32 values and `out` room for `acts` rows of `nrows` at
    /// `out_stride`; `kb` must be a multiple of 32.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run<const DT: u8>(
        w: *const u8,
        row_bytes: usize,
        nrows: usize,
        xp: *const f32,
        kb: usize,
        acts: usize,
        out: *mut f32,
        out_stride: usize,
    ) {
        // Weight rows per step: 2 accumulators per (row, activation) within 32 registers.
        match acts {
            // Rows of 4 KiB or more: the streams of a step then sit a multiple of 4 KiB apart
            // (same cache sets); eight of them in flight measured faster than four (4096²:
            // 0.8 of the read bandwidth instead of 0.7), shorter rows did better with four.
            1 if row_bytes >= LONG_ROW_BYTES => run_rm::<DT, 8, 1>(w, row_bytes, nrows, xp, kb, out, out_stride),
            1 => run_rm::<DT, 4, 1>(w, row_bytes, nrows, xp, kb, out, out_stride),
            2 => run_rm::<DT, 4, 2>(w, row_bytes, nrows, xp, kb, out, out_stride),
            3 => run_rm::<DT, 2, 3>(w, row_bytes, nrows, xp, kb, out, out_stride),
            _ => run_rm::<DT, 2, 4>(w, row_bytes, nrows, xp, kb, out, out_stride),
        }
    }

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn run_rm<const DT: u8, const R: usize, const M: usize>(
        w: *const u8,
        row_bytes: usize,
        nrows: usize,
        xp: *const f32,
        kb: usize,
        out: *mut f32,
        out_stride: usize,
    ) {
        // SAFETY: the caller's contract (rows inside `w`, activations `xp`, outputs inside `out`)
        // is the driver's and the kernel's; AVX-512F, AVX2, FMA and F16C are enabled here.
        super::stream_rows::<R, M>(
            w,
            row_bytes,
            nrows,
            out,
            out_stride,
            |w, stride, o| unsafe { rows_rm::<DT, R, M>(w, stride, xp, kb, o) },
            |w, stride, o| unsafe { rows_rm::<DT, 1, M>(w, stride, xp, kb, o) },
        )
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn rows_rm<const DT: u8, const R: usize, const M: usize>(
        w: *const u8,
        stride: usize,
        xp: *const f32,
        kb: usize,
        out: &mut [[f32; M]; R],
    ) {
        let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
        let mut acc = [[[_mm512_setzero_ps(); 2]; M]; R];
        let mut i = 0;
        while i < kb {
            let mut xl = [_mm512_setzero_ps(); M];
            let mut xh = [_mm512_setzero_ps(); M];
            for a in 0..M {
                xl[a] = _mm512_loadu_ps(xp.add(a * kb + i));
                xh[a] = _mm512_loadu_ps(xp.add(a * kb + i + 16));
            }
            for (r, acc_r) in acc.iter_mut().enumerate() {
                let wr = w.add(r * stride);
                let (lo, hi) = match DT {
                    BF16 => {
                        let wv = _mm512_loadu_si512(wr.add(i * 2) as *const __m512i);
                        // A bf16 is the top half of an f32: the even element shifted up, the odd
                        // one with the even masked off are both exact widenings.
                        (
                            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(wv)),
                            _mm512_castsi512_ps(_mm512_and_si512(wv, high)),
                        )
                    }
                    F16 => (
                        _mm512_cvtph_ps(_mm256_loadu_si256(wr.add(i * 2) as *const __m256i)),
                        _mm512_cvtph_ps(_mm256_loadu_si256(wr.add(i * 2 + 32) as *const __m256i)),
                    ),
                    _ => (
                        _mm512_loadu_ps(wr.add(i * 4) as *const f32),
                        _mm512_loadu_ps(wr.add(i * 4 + 64) as *const f32),
                    ),
                };
                for a in 0..M {
                    acc_r[a][0] = _mm512_fmadd_ps(lo, xl[a], acc_r[a][0]);
                    acc_r[a][1] = _mm512_fmadd_ps(hi, xh[a], acc_r[a][1]);
                }
            }
            i += STEP;
        }
        for r in 0..R {
            for a in 0..M {
                out[r][a] = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][a][0], acc[r][a][1]));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(z: &mut u64) -> f32 {
        *z = z.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        ((*z >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    /// Weights `n × k` stored as `dtype` (little-endian bytes) and their exact f32 values.
    fn weights(dtype: DType, n: usize, k: usize, z: &mut u64) -> (Vec<u8>, Vec<f32>) {
        let (mut bytes, mut vals) = (Vec::new(), Vec::new());
        for _ in 0..n * k {
            let v = lcg(z);
            let v = match dtype {
                DType::BF16 => {
                    let h = bf16::from_f32(v);
                    bytes.extend_from_slice(&h.to_le_bytes());
                    h.to_f32()
                }
                DType::F16 => {
                    let h = f16::from_f32(v);
                    bytes.extend_from_slice(&h.to_le_bytes());
                    h.to_f32()
                }
                _ => {
                    bytes.extend_from_slice(&v.to_le_bytes());
                    v
                }
            };
            vals.push(v);
        }
        (bytes, vals)
    }

    /// Batch invariance of the linear layers (`trans_b`, any `m`): row `r` of an `m`-row product
    /// bit-equals the same row multiplied alone, so KV rebuilt by a batched prefill equals the
    /// KV decode steps made (preemption by recomputation).
    #[test]
    fn linear_rows_are_batch_invariant() {
        let be = CpuBackend::with_threads(2).unwrap();
        let mut z = 11u64;
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            for (m, n, k) in [(37, 70, 577), (9, 130, 64), (20, 33, 1536)] {
                let (mut wb, _) = weights(dtype, n, k, &mut z);
                let mut x: Vec<f32> = (0..m * k).map(|_| lcg(&mut z) * 4.0).collect();
                let mut all = vec![0f32; m * n];
                let raw_w = Raw { ptr: wb.as_mut_ptr(), dtype, len: n * k };
                let raw_x = Raw { ptr: x.as_mut_ptr() as *mut u8, dtype: DType::F32, len: m * k };
                let raw_c = Raw { ptr: all.as_mut_ptr() as *mut u8, dtype: DType::F32, len: m * n };
                gemm(&be, &raw_x, &raw_w, &raw_c, &GemmArgs::model_linear(m, n, k)).unwrap();
                for r in 0..m {
                    let mut one = vec![0f32; n];
                    let raw_one = Raw { ptr: one.as_mut_ptr() as *mut u8, dtype: DType::F32, len: n };
                    gemm(&be, &raw_x.sub(r * k, k), &raw_w, &raw_one, &GemmArgs::model_linear(1, n, k)).unwrap();
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&all[r * n..(r + 1) * n]), bits(&one), "{dtype} m={m} n={n} k={k}: row {r}");
                }
            }
        }
    }

    /// Every GEMV kernel this machine runs: each SIMD level, and AVX-512 with `vdpbf16ps` for
    /// bf16 weights (`true`) where the CPU has AVX512_BF16.
    fn gemv_kernels() -> Vec<(SimdLevel, bool)> {
        let mut v: Vec<(SimdLevel, bool)> = simd_levels_available().into_iter().map(|l| (l, false)).collect();
        #[cfg(target_arch = "x86_64")]
        if v[0].0 == SimdLevel::Avx512 && dpbf16::available() {
            v.insert(0, (SimdLevel::Avx512, true));
        }
        v
    }

    /// Every GEMV kernel this machine can run (portable, AVX2, AVX-512, `vdpbf16ps`) against an
    /// f64 product, over odd shapes, every weight dtype, 1..=8 activation rows and alpha/beta.
    /// The `vdpbf16ps` kernel multiplies bf16-rounded activations, so its product is taken with
    /// those.
    #[test]
    fn every_gemv_kernel_matches_the_f64_product() {
        let be = CpuBackend::with_threads(2).unwrap();
        let mut z = 7u64;
        for (level, dot) in gemv_kernels() {
            for dtype in [DType::BF16, DType::F16, DType::F32] {
                for (n, k) in [(1, 1), (5, 31), (7, 33), (13, 64), (70, 100), (130, 577), (9, 1536), (37, 2081)] {
                    for (m, alpha, beta) in [(1, 1.0, 0.0), (2, 0.5, 0.0), (3, 1.0, 1.0), (4, 2.0, 0.5), (8, 1.0, 0.0)]
                    {
                        let (wb, wf) = weights(dtype, n, k, &mut z);
                        let mut wb = wb;
                        let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut z) * 4.0).collect();
                        let c0: Vec<f32> = (0..m * n).map(|_| lcg(&mut z)).collect();
                        let mut xs = x.clone();
                        let mut c = c0.clone();
                        let raw_w = Raw { ptr: wb.as_mut_ptr(), dtype, len: n * k };
                        let raw_x = Raw { ptr: xs.as_mut_ptr() as *mut u8, dtype: DType::F32, len: m * k };
                        let raw_c = Raw { ptr: c.as_mut_ptr() as *mut u8, dtype: DType::F32, len: m * n };
                        gemv_at(level, dot, &be, &raw_x, &raw_w, &raw_c, m, n, k, alpha, beta);
                        let xv = |v: f32| if dot && dtype == DType::BF16 { bf16::from_f32(v).to_f32() } else { v };
                        for r in 0..m {
                            for j in 0..n {
                                let (mut sum, mut mag) = (0f64, 0f64);
                                for i in 0..k {
                                    let p = wf[j * k + i] as f64 * xv(x[r * k + i]) as f64;
                                    sum += p;
                                    mag += p.abs();
                                }
                                let want = alpha as f64 * sum + beta as f64 * c0[r * n + j] as f64;
                                let tol =
                                    1e-5 * (alpha as f64 * mag + (beta as f64 * c0[r * n + j] as f64).abs() + 1e-6);
                                let got = c[r * n + j] as f64;
                                assert!(
                                    (got - want).abs() <= tol,
                                    "{level:?} dot={dot} {dtype} n={n} k={k} m={m}: c[{r}][{j}] = {got}, want {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    fn raw_f32(v: &mut [f32]) -> Raw {
        Raw { ptr: v.as_mut_ptr() as *mut u8, dtype: DType::F32, len: v.len() }
    }

    /// Batch invariance (the contract in the module docs): row `r` of an m = 37 product
    /// bit-equals the m = 1 product of that row alone, for every weight dtype, every GEMV kernel
    /// this machine runs (`vdpbf16ps` included), with and without a k tail and with `beta`.
    #[test]
    fn trans_b_rows_are_batch_invariant() {
        let be = CpuBackend::with_threads(2).unwrap();
        let mut z = 11u64;
        let m = 37;
        for (level, dot) in gemv_kernels() {
            for dtype in [DType::BF16, DType::F16, DType::F32] {
                for (n, k, beta) in [(70, 576, 0.0), (300, 100, 0.0), (33, 1536, 0.5), (5, 31, 1.0)] {
                    let (mut wb, _) = weights(dtype, n, k, &mut z);
                    let raw_w = Raw { ptr: wb.as_mut_ptr(), dtype, len: n * k };
                    let mut x: Vec<f32> = (0..m * k).map(|_| lcg(&mut z) * 4.0).collect();
                    let c0: Vec<f32> = (0..m * n).map(|_| lcg(&mut z)).collect();
                    let mut c = c0.clone();
                    gemv_at(level, dot, &be, &raw_f32(&mut x), &raw_w, &raw_f32(&mut c), m, n, k, 1.0, beta);
                    for r in 0..m {
                        let mut xr = x[r * k..(r + 1) * k].to_vec();
                        let mut cr = c0[r * n..(r + 1) * n].to_vec();
                        gemv_at(level, dot, &be, &raw_f32(&mut xr), &raw_w, &raw_f32(&mut cr), 1, n, k, 1.0, beta);
                        for j in 0..n {
                            assert_eq!(
                                c[r * n + j].to_bits(),
                                cr[j].to_bits(),
                                "{level:?} dot={dot} {dtype} n={n} k={k}: row {r} col {j} differs from its m=1 product"
                            );
                        }
                    }
                }
            }
        }
    }

    /// A grouped GEMV (several weight matrices by the same activations, one parallel region)
    /// bit-equals a GEMV of each matrix alone: every kernel this machine runs, every weight
    /// dtype, parts of different heights, with and without a k tail, with alpha and beta, regions
    /// small enough to run on the calling thread and larger ones spread over the workers.
    #[test]
    fn grouped_gemv_equals_separate_gemvs() {
        let be = CpuBackend::with_threads(2).unwrap();
        let mut z = 13u64;
        let shapes: [(usize, usize, &[usize], f32, f32); 4] = [
            (32, 576, &[576, 192, 192], 1.0, 0.0),
            (5, 100, &[70, 33], 1.0, 0.0),
            (17, 64, &[300, 300, 8, 12], 0.5, 0.0),
            (3, 577, &[40, 41], 1.0, 0.5),
        ];
        for (level, dot) in gemv_kernels() {
            for dtype in [DType::BF16, DType::F16, DType::F32] {
                for &(m, k, ns, alpha, beta) in &shapes {
                    let mut ws: Vec<Vec<u8>> = ns.iter().map(|&n| weights(dtype, n, k, &mut z).0).collect();
                    let mut x: Vec<f32> = (0..m * k).map(|_| lcg(&mut z) * 4.0).collect();
                    let c0: Vec<Vec<f32>> = ns.iter().map(|&n| (0..m * n).map(|_| lcg(&mut z)).collect()).collect();
                    let mut grouped = c0.clone();
                    let parts: Vec<Part> = ns
                        .iter()
                        .zip(ws.iter_mut())
                        .zip(grouped.iter_mut())
                        .map(|((&n, w), c)| Part {
                            w: Raw { ptr: w.as_mut_ptr(), dtype, len: n * k },
                            c: raw_f32(c),
                            n,
                        })
                        .collect();
                    gemv_parts_at(level, dot, &be, &raw_f32(&mut x), &parts, m, k, alpha, beta);
                    for (p, part) in parts.iter().enumerate() {
                        let mut alone = c0[p].clone();
                        gemv_at(
                            level,
                            dot,
                            &be,
                            &raw_f32(&mut x),
                            &part.w,
                            &raw_f32(&mut alone),
                            m,
                            part.n,
                            k,
                            alpha,
                            beta,
                        );
                        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                        assert_eq!(
                            bits(&grouped[p]),
                            bits(&alone),
                            "{level:?} dot={dot} {dtype} m={m} k={k}: part {p}"
                        );
                    }
                }
            }
        }
    }

    /// `gemm` with several batch entries over one activation matrix (`stride_a` 0: how a model
    /// multiplies its k/v and gate/up projections) takes the grouped GEMV and bit-equals one
    /// call per entry.
    #[test]
    fn batched_linear_over_shared_activations_equals_one_call_each() {
        let be = CpuBackend::with_threads(2).unwrap();
        let mut z = 17u64;
        let (m, n, k) = (16, 192, 576);
        let (mut wb, _) = weights(DType::BF16, 2 * n, k, &mut z);
        let raw_w = Raw { ptr: wb.as_mut_ptr(), dtype: DType::BF16, len: 2 * n * k };
        let mut x: Vec<f32> = (0..m * k).map(|_| lcg(&mut z)).collect();
        let mut both = vec![0f32; 2 * m * n];
        let args =
            GemmArgs { batch: 2, stride_a: 0, stride_b: n * k, stride_c: m * n, ..GemmArgs::model_linear(m, n, k) };
        gemm(&be, &raw_f32(&mut x), &raw_w, &raw_f32(&mut both), &args).unwrap();
        for e in 0..2 {
            let mut one = vec![0f32; m * n];
            let w = raw_w.sub(e * n * k, n * k);
            gemm(&be, &raw_f32(&mut x), &w, &raw_f32(&mut one), &GemmArgs::model_linear(m, n, k)).unwrap();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&both[e * m * n..(e + 1) * m * n]), bits(&one), "entry {e}");
        }
    }

    /// The `vdpbf16ps` GEMV bit-equals a scalar reference that computes the same sums in f32 in
    /// the same order: activations rounded to bf16 (nearest even); per 32-element step, lane `l`
    /// adds the exact product of elements `2l + 1` then `2l`; the 16 lanes reduced in
    /// `dpbf16::hsum`'s tree; the k tail summed on its own and added; then alpha/beta. Every m
    /// from 1 to 6 and 16 (so every activation group size), with and without a tail, long rows.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn dpbf16_gemv_equals_the_scalar_reference() {
        if !dpbf16::available() {
            eprintln!("skipped: this CPU has no AVX512_BF16");
            return;
        }
        let be = CpuBackend::with_threads(2).unwrap();
        let mut z = 5u64;
        for (n, k) in [(70, 576), (37, 1536), (300, 100), (9, 31), (21, 2048 + 64 + 7)] {
            for (m, alpha, beta) in [
                (1, 1.0, 0.0),
                (2, 0.5, 0.0),
                (3, 1.0, 1.0),
                (4, 1.0, 0.0),
                (5, 2.0, 0.5),
                (6, 1.0, 0.0),
                (16, 1.0, 0.0),
                (17, 1.0, 0.0),
            ] {
                let (mut wb, wf) = weights(DType::BF16, n, k, &mut z);
                let raw_w = Raw { ptr: wb.as_mut_ptr(), dtype: DType::BF16, len: n * k };
                let mut x: Vec<f32> = (0..m * k).map(|_| lcg(&mut z) * 4.0).collect();
                let c0: Vec<f32> = (0..m * n).map(|_| lcg(&mut z)).collect();
                let mut c = c0.clone();
                gemv_at(SimdLevel::Avx512, true, &be, &raw_f32(&mut x), &raw_w, &raw_f32(&mut c), m, n, k, alpha, beta);
                let kb = k - k % dpbf16::STEP;
                for r in 0..m {
                    let xr: Vec<f32> = x[r * k..(r + 1) * k].iter().map(|v| bf16::from_f32(*v).to_f32()).collect();
                    for j in 0..n {
                        let wr = &wf[j * k..(j + 1) * k];
                        let mut lane = [0f32; 16];
                        for s in (0..kb).step_by(dpbf16::STEP) {
                            for l in 0..16 {
                                lane[l] += wr[s + 2 * l + 1] * xr[s + 2 * l + 1];
                                lane[l] += wr[s + 2 * l] * xr[s + 2 * l];
                            }
                        }
                        let t: Vec<f32> = (0..8).map(|i| lane[i] + lane[i + 8]).collect();
                        let u: Vec<f32> = (0..4).map(|i| t[i] + t[i + 4]).collect();
                        let mut want = (u[0] + u[2]) + (u[1] + u[3]);
                        if k > kb {
                            want += (kb..k).map(|i| wr[i] * xr[i]).sum::<f32>();
                        }
                        let old = c0[r * n + j];
                        let want = if beta != 0.0 { alpha * want + beta * old } else { want * alpha };
                        assert_eq!(
                            c[r * n + j].to_bits(),
                            want.to_bits(),
                            "n={n} k={k} m={m}: c[{r}][{j}] = {}, reference {want}",
                            c[r * n + j]
                        );
                    }
                }
            }
        }
    }

    /// At SmolLM2-135M's shapes the GEMV's chunks are equal and come in a multiple of the
    /// threads, so two threads finish an op together (claimed one at a time, in turn).
    #[test]
    fn gemv_chunks_are_even_across_threads() {
        for m in [1, 4, 16, 64] {
            for (n, k) in [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)] {
                let c = gemv_chunk_for(2, n, k * 2, m);
                let count = n.div_ceil(c);
                assert!(n % c == 0 && count % 2 == 0, "m={m} n={n} k={k}: chunk {c} rows, {count} chunks");
            }
        }
    }

    /// Timing, not a check: the bf16 GEMV with `vdpbf16ps` against widening to f32 (AVX-512F),
    /// interleaved, over one SmolLM2-135M layer's linear shapes, at m = 1, 4, 16. Run with
    /// `cargo test --release -p djinn-backend --lib bf16_gemv_timing -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing; run by hand in release"]
    #[cfg(target_arch = "x86_64")]
    fn bf16_gemv_timing() {
        if !(simd_level() == SimdLevel::Avx512 && dpbf16::available()) {
            eprintln!("skipped: this CPU has no AVX512_BF16");
            return;
        }
        let be = CpuBackend::new().unwrap();
        let mut z = 3u64;
        let shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)];
        let mut ws: Vec<Vec<u8>> = shapes.iter().map(|&(n, k)| weights(DType::BF16, n, k, &mut z).0).collect();
        for m in [1usize, 4, 16] {
            let mut x: Vec<f32> = (0..m * 1536).map(|_| lcg(&mut z)).collect();
            let mut c = vec![0f32; m * 1536];
            let mut t = [0f64; 2];
            let reps = 200;
            // Interleaved in rounds so drift in the machine's load hits both alike.
            for round in 0..11 {
                for (dot, t_dot) in [(false, 0), (true, 1)] {
                    let t0 = std::time::Instant::now();
                    for _ in 0..reps / 10 {
                        for (&(n, k), wb) in shapes.iter().zip(ws.iter_mut()) {
                            let raw_w = Raw { ptr: wb.as_mut_ptr(), dtype: DType::BF16, len: n * k };
                            let (rx, rc) = (raw_f32(&mut x[..m * k]), raw_f32(&mut c[..m * n]));
                            gemv_at(SimdLevel::Avx512, dot, &be, &rx, &raw_w, &rc, m, n, k, 1.0, 0.0);
                        }
                    }
                    if round > 0 {
                        t[t_dot] += t0.elapsed().as_secs_f64();
                    }
                }
            }
            let (f32w, dp) = (t[0] / reps as f64, t[1] / reps as f64);
            println!(
                "m={m:2}: one layer's linears: widen+f32 FMA {:.1} us, vdpbf16ps {:.1} us, speedup {:.2}x",
                f32w * 1e6,
                dp * 1e6,
                f32w / dp
            );
        }
    }

    /// Timing, not a check: the GEMV path against the `gemm` crate path for SmolLM2-135M's
    /// shapes with bf16 weights, from decode batches to prefill chunks. Run with
    /// `cargo test --release -p djinn-backend --lib gemm_paths_timing -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing; run by hand in release"]
    fn gemm_paths_timing() {
        let be = CpuBackend::new().unwrap();
        let mut z = 3u64;
        let shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)];
        for m in [1usize, 4, 16, 64, 256, 512] {
            let (mut t_gemv, mut t_gemm) = (0f64, 0f64);
            for &(n, k) in &shapes {
                let (mut wb, _) = weights(DType::BF16, n, k, &mut z);
                let raw_w = Raw { ptr: wb.as_mut_ptr(), dtype: DType::BF16, len: n * k };
                let mut x: Vec<f32> = (0..m * k).map(|_| lcg(&mut z)).collect();
                let mut c = vec![0f32; m * n];
                let reps = (2_000_000_000 / (m * n * k)).clamp(2, 200);
                for path in 0..2 {
                    // Interleaved: warm up, then time each path over the same reps.
                    for timed in [false, true] {
                        let t0 = std::time::Instant::now();
                        for _ in 0..if timed { reps } else { 1 } {
                            let (rx, rc) = (raw_f32(&mut x), raw_f32(&mut c));
                            if path == 0 {
                                gemv(&be, &rx, &[Part { w: raw_w, c: rc, n }], m, k, 1.0, 0.0, true);
                            } else {
                                general(&be, &rx, &raw_w, &rc, m, n, k, true, 1.0, 0.0);
                            }
                        }
                        if timed {
                            let dt = t0.elapsed().as_secs_f64() / reps as f64;
                            if path == 0 {
                                t_gemv += dt;
                            } else {
                                t_gemm += dt;
                            }
                        }
                    }
                }
            }
            println!(
                "m={m:4}: one layer's linear shapes + lm_head: gemv {:.3} ms, gemm crate {:.3} ms, ratio {:.2}",
                t_gemv * 1e3,
                t_gemm * 1e3,
                t_gemm / t_gemv
            );
        }
    }

    /// Timing, not a check: one thread's bf16 GEMV over 30 layers of SmolLM2-135M's linear shapes
    /// with distinct weights (212 MB, streamed from memory as a served step does) against the
    /// same calls over one layer's weights (in cache), at m = 1 and 16: how much of a batched
    /// step's GEMV time is waiting on memory. Run with `cargo test --release -p djinn-backend
    /// --lib gemv_from_memory_timing -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing; run by hand in release"]
    fn gemv_from_memory_timing() {
        let be = CpuBackend::with_threads(1).unwrap();
        let shapes = [(576usize, 576usize), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)];
        let layers = 30;
        // In one region of the backend's memory, as a served model's weights are: on huge pages
        // (with 4 KiB pages the TLB misses add a fifth at m = 1).
        let layer_bytes: usize = shapes.iter().map(|&(n, k)| n * k * 2).sum();
        let mut region = crate::cpu::mem::CpuRegion::new(layers * layer_bytes).unwrap();
        let mut offs = Vec::new();
        let mut off = 0;
        for l in 0..layers {
            for &(n, k) in &shapes {
                let w = region.bytes_mut(off, n * k * 2).unwrap();
                // bf16 values near 1 (high bytes 0x3c), varied low bytes.
                for (i, b) in w.iter_mut().enumerate() {
                    *b = if i % 2 == 1 { 0x3c } else { ((i + l) % 251) as u8 };
                }
                offs.push(off);
                off += n * k * 2;
            }
        }
        let base = region.as_ptr() as *mut u8;
        for m in [1usize, 16] {
            let mut x: Vec<f32> = (0..m * 1536).map(|i| (i % 13) as f32 * 0.01).collect();
            let mut c = vec![0f32; m * 1536];
            // Best of several rounds, the two cases interleaved (the machine is shared).
            let mut t = [f64::MAX; 2];
            for _ in 0..8 {
                for (slot, distinct) in [(0, true), (1, false)] {
                    let t0 = std::time::Instant::now();
                    for l in 0..layers {
                        for (i, &(n, k)) in shapes.iter().enumerate() {
                            let o = offs[if distinct { l * shapes.len() + i } else { i }];
                            // SAFETY: `o..o + 2nk` lies inside `region`, which outlives the call.
                            let raw_w = Raw { ptr: unsafe { base.add(o) }, dtype: DType::BF16, len: n * k };
                            let (rx, rc) = (raw_f32(&mut x[..m * k]), raw_f32(&mut c[..m * n]));
                            gemv(&be, &rx, &[Part { w: raw_w, c: rc, n }], m, k, 1.0, 0.0, true);
                        }
                    }
                    t[slot] = t[slot].min(t0.elapsed().as_secs_f64());
                }
            }
            println!(
                "m={m:2}: 30 layers' linears, one thread: weights from memory {:.2} ms, one layer's (cached) {:.2} ms, ratio {:.2}",
                t[0] * 1e3,
                t[1] * 1e3,
                t[0] / t[1]
            );
        }
    }
}
