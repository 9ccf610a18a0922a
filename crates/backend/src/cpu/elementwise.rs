//! Elementwise and row-wise ops: binary (with cyclic broadcast of `b`), unary, cast, silu·mul,
//! softmax, RMSNorm (fused residual add), rotate-half RoPE, embedding gather, byte copies.
//!
//! Each worker converts a tile of its range to f32 on the stack, computes, and stores back, so
//! an output identical to an input (the in-place case the callers allow) is read before written.

// Numeric kernels index several parallel arrays with one counter; iterators would hide that.
#![allow(clippy::needless_range_loop)]

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;

use super::raw::{load, round_to, store, with_scratch, Raw};
use super::CpuBackend;
use crate::backend::{BinaryOp, UnaryOp};
use crate::DType;

/// Elements per stack tile.
const TILE: usize = 1024;
/// Minimum elements per parallel chunk of an elementwise op (smaller work stays on the caller).
const EW_CHUNK_MIN: usize = 32 * 1024;
/// The same for ops that cost several times a plain add per element (silu·mul's exp and divide,
/// a row's norm, RoPE's rotations): a batched decode step's (16 rows of 1536) ran on the caller
/// alone while the other worker waited.
const EW_HEAVY_CHUNK_MIN: usize = 4 * 1024;
/// Minimum bytes per parallel chunk of a copy.
const COPY_CHUNK_MIN: usize = 1 << 20;

/// Runs `f(first, tile_len)` over `start..start + len` in stack tiles.
fn tiles(start: usize, len: usize, mut f: impl FnMut(usize, usize)) {
    let mut i = start;
    while i < start + len {
        let n = TILE.min(start + len - i);
        f(i, n);
        i += n;
    }
}

pub(crate) fn copy_bytes(be: &CpuBackend, src: &Raw, dst: &Raw) {
    debug_assert_eq!(src.bytes(), dst.bytes());
    let (s, d) = (src.ptr as usize, dst.ptr as usize);
    let total = src.bytes();
    be.for_chunks(total, be.chunk_for(total, COPY_CHUNK_MIN), |first, len| {
        // SAFETY: both ranges were checked by the caller and do not overlap; each chunk is
        // disjoint from every other worker's.
        unsafe { std::ptr::copy_nonoverlapping((s + first) as *const u8, (d + first) as *mut u8, len) }
    });
}

/// Loads `b[(first + i) % b.len]` for `i in 0..dst.len()`.
///
/// # Safety
/// As for [`load`].
unsafe fn load_cyclic(b: &Raw, first: usize, dst: &mut [f32]) {
    let mut done = 0;
    while done < dst.len() {
        let at = (first + done) % b.len;
        let n = (b.len - at).min(dst.len() - done);
        load(b, at, &mut dst[done..done + n]);
        done += n;
    }
}

pub(crate) fn binary(be: &CpuBackend, op: BinaryOp, a: &Raw, b: &Raw, out: &Raw) {
    be.for_chunks(out.len, be.chunk_for(out.len, EW_CHUNK_MIN), |start, len| {
        let (mut xa, mut xb) = ([0f32; TILE], [0f32; TILE]);
        tiles(start, len, |i, n| {
            let (xa, xb) = (&mut xa[..n], &mut xb[..n]);
            // SAFETY: `i..i + n` lies in this worker's chunk of checked operands; the output is
            // either disjoint from the inputs or identical to one (read here before the store).
            unsafe {
                load(a, i, xa);
                if b.len == a.len {
                    load(b, i, xb)
                } else {
                    load_cyclic(b, i, xb)
                }
            }
            match op {
                BinaryOp::Add => xa.iter_mut().zip(xb.iter()).for_each(|(x, y)| *x += *y),
                BinaryOp::Sub => xa.iter_mut().zip(xb.iter()).for_each(|(x, y)| *x -= *y),
                BinaryOp::Mul => xa.iter_mut().zip(xb.iter()).for_each(|(x, y)| *x *= *y),
                BinaryOp::Div => xa.iter_mut().zip(xb.iter()).for_each(|(x, y)| *x /= *y),
            }
            // SAFETY: see above.
            unsafe { store(out, i, xa) }
        });
    });
}

/// `e^x` in f32 without a libm call, so loops over it vectorise (Cephes `expf`: range
/// reduction by ln 2 in two parts, degree-6 polynomial, 2^n by exponent bits; ≤ 2 ulp over the
/// normal range). Inputs below −87.3 (−∞ included) give exactly 0, as the true result would
/// round to 0 or a subnormal there (masked positions must weigh nothing); above 88.7 give
/// `f32::MAX`-scale; NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Round to nearest with the 1.5·2^23 trick (no SSE4.1 `round` needed).
    const MAGIC: f32 = 12_582_912.0;
    let x0 = x;
    let x = x.clamp(-87.3, 88.7);
    let n = (x * LOG2E + MAGIC) - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1)
        * r
        + 0.5;
    let y = p * r * r + r + 1.0;
    let e = y * f32::from_bits((((n as i32) + 127) as u32) << 23);
    // A select, not a branch: the loops over it still vectorise.
    if x0 < -87.3 {
        0.0
    } else {
        e
    }
}

#[inline(always)]
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// Defines `fn $name(args) -> ret` whose body is compiled twice: for AVX2+FMA (used when the CPU
/// has them: the same Rust, auto-vectorised 8 wide) and for the build's baseline target. The body
/// must not hide its hot loop in a large closure (closures are not always inlined into the
/// feature-enabled copy).
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    body($($arg),*)
                }
                if $crate::cpu::simd_level().has_avx2() {
                    // SAFETY: AVX2 and FMA were detected at run time.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

multiversion! {
    fn unary_tile(op: UnaryOp, t: &mut [f32]) {
        match op {
            UnaryOp::Silu => t.iter_mut().for_each(|v| *v = silu(*v)),
            UnaryOp::Exp => t.iter_mut().for_each(|v| *v = exp(*v)),
            UnaryOp::Neg => t.iter_mut().for_each(|v| *v = -*v),
            UnaryOp::Sqrt => t.iter_mut().for_each(|v| *v = v.sqrt()),
        }
    }
}

multiversion! {
    fn silu_mul_tile(g: &[f32], u: &[f32], out: &mut [f32]) {
        out.iter_mut().zip(g.iter().zip(u.iter())).for_each(|(o, (a, b))| *o = silu(*a) * *b)
    }
}

pub(crate) fn unary(be: &CpuBackend, op: UnaryOp, x: &Raw, out: &Raw) {
    be.for_chunks(out.len, be.chunk_for(out.len, EW_CHUNK_MIN), |start, len| {
        let mut t = [0f32; TILE];
        tiles(start, len, |i, n| {
            let t = &mut t[..n];
            // SAFETY: as in `binary`.
            unsafe { load(x, i, t) };
            unary_tile(op, t);
            // SAFETY: as in `binary`.
            unsafe { store(out, i, t) }
        });
    });
}

pub(crate) fn cast(be: &CpuBackend, x: &Raw, out: &Raw) {
    if x.dtype == out.dtype {
        return copy_bytes(be, x, out);
    }
    be.for_chunks(out.len, be.chunk_for(out.len, EW_CHUNK_MIN), |start, len| {
        let mut t = [0f32; TILE];
        tiles(start, len, |i, n| {
            // SAFETY: disjoint checked operands, this worker's chunk only.
            unsafe {
                load(x, i, &mut t[..n]);
                store(out, i, &t[..n]);
            }
        });
    });
}

/// silu·mul of one tile: 16 lanes at a time on AVX-512 (the same bits as the scalar code).
fn silu_mul_any(wide: bool, g: &[f32], u: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if wide {
        // SAFETY: `wide` is only set where AVX-512F was detected; the tiles have one length.
        return unsafe { avx512::silu_mul(g, u, out) };
    }
    let _ = wide;
    silu_mul_tile(g, u, out)
}

pub(crate) fn silu_mul(be: &CpuBackend, g: &Raw, u: &Raw, out: &Raw) {
    // f32 inputs (a model's activations) are read in place rather than copied to the stack first.
    let direct = g.dtype == DType::F32 && u.dtype == DType::F32;
    let wide = super::simd_level() == super::SimdLevel::Avx512;
    be.for_chunks(out.len, be.chunk_for(out.len, EW_HEAVY_CHUNK_MIN), |start, len| {
        let (mut xg, mut xu, mut xo) = ([0f32; TILE], [0f32; TILE], [0f32; TILE]);
        tiles(start, len, |i, n| {
            let xo = &mut xo[..n];
            if direct {
                // SAFETY: `i..i + n` lies in this worker's chunk of checked f32 operands; `out` is
                // written below, after these borrows end (it may be identical to `g` or `u`).
                let (sg, su) = unsafe { (g.sub(i, n).slice::<f32>(), u.sub(i, n).slice::<f32>()) };
                silu_mul_any(wide, sg, su, xo);
            } else {
                let (xg, xu) = (&mut xg[..n], &mut xu[..n]);
                // SAFETY: as in `binary`.
                unsafe {
                    load(g, i, xg);
                    load(u, i, xu);
                }
                silu_mul_any(wide, xg, xu, xo);
            }
            // SAFETY: as in `binary`.
            unsafe { store(out, i, xo) }
        });
    });
}

multiversion! {
/// Numerically stable softmax of one row in place.
pub(crate) fn softmax_row(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // f64 sum: a 128k-entry vocabulary row summed in f32 would lose ~1e-4 relative.
    row.iter_mut().for_each(|v| *v = exp(*v - max));
    // Eight f64 lanes: vectorises, and f32 would lose ~1e-4 relative over a 128k vocabulary.
    let mut lanes = [0f64; 8];
    let mut it = row.chunks_exact(8);
    for c in &mut it {
        for l in 0..8 {
            lanes[l] += c[l] as f64;
        }
    }
    let sum = lanes.iter().sum::<f64>() + it.remainder().iter().map(|v| *v as f64).sum::<f64>();
    let inv = (1.0 / sum) as f32;
    row.iter_mut().for_each(|v| *v *= inv);
}
}

/// Rows per parallel chunk so each chunk holds at least `min` elements.
fn rows_chunk(be: &CpuBackend, rows: usize, cols: usize, min: usize) -> usize {
    be.chunk_for(rows, min.div_ceil(cols.max(1)))
}

pub(crate) fn softmax(be: &CpuBackend, x: &Raw, out: &Raw, cols: usize) {
    let rows = x.len / cols;
    be.for_chunks(rows, rows_chunk(be, rows, cols, EW_CHUNK_MIN), |r0, nr| {
        with_scratch(cols, |buf| {
            for r in r0..r0 + nr {
                // SAFETY: row `r` lies in this worker's rows; in place reads before it writes.
                unsafe { load(x, r * cols, buf) };
                softmax_row(buf);
                // SAFETY: as above.
                unsafe { store(out, r * cols, buf) };
            }
        })
    });
}

/// `Σ x²` in 16 lanes (element `i` into lane `i % 16`, in order), the lanes then summed in
/// order: a fixed order that vectorises (a plain iterator sum is one serial chain of adds).
#[inline]
fn sum_squares(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let mut it = x.chunks_exact(16);
    for c in &mut it {
        for l in 0..16 {
            lanes[l] += c[l] * c[l];
        }
    }
    for (l, v) in it.remainder().iter().enumerate() {
        lanes[l] += v * v;
    }
    lanes.iter().sum()
}

pub(crate) fn rms_norm(be: &CpuBackend, x: &Raw, res: Option<&Raw>, w: &Raw, out: &Raw, hidden: usize, eps: f32) {
    let rows = x.len / hidden;
    be.for_chunks(rows, rows_chunk(be, rows, hidden, EW_HEAVY_CHUNK_MIN), |r0, nr| {
        with_scratch(2 * hidden, |buf| {
            let (h, wt) = buf.split_at_mut(hidden);
            // SAFETY: `weight` is read-only in this op and has `hidden` elements.
            unsafe { load(w, 0, wt) };
            for r in r0..r0 + nr {
                let at = r * hidden;
                // SAFETY: row `r` belongs to this worker; `residual` is disjoint from every other
                // operand; `out` is disjoint from or identical to `x`, which is read first.
                unsafe {
                    load(x, at, h);
                    if let Some(res) = res {
                        let mut t = [0f32; TILE];
                        tiles(0, hidden, |i, n| {
                            load(res, at + i, &mut t[..n]);
                            h[i..i + n].iter_mut().zip(&t[..n]).for_each(|(a, b)| *a += *b);
                        });
                        store(res, at, h);
                        // Normalise what the residual stream now holds, as the model would read it.
                        round_to(res.dtype, h);
                    }
                }
                let ss = sum_squares(h);
                let inv = 1.0 / (ss / hidden as f32 + eps).sqrt();
                h.iter_mut().zip(wt.iter()).for_each(|(v, g)| *v = *v * inv * *g);
                // SAFETY: as above.
                unsafe { store(out, at, h) };
            }
        })
    });
}

/// The rotation angles' cosines and sines of the last positions [`rope`] was called with, on the
/// calling thread: a step rotates q and k of every layer at the same positions (60 calls for
/// SmolLM2), and each call computed the same `sin_cos` again (half a millisecond of a 16-row
/// step). The values are those of the same expression, so the bits do not change.
#[derive(Default)]
struct RopeTable {
    positions: Vec<i32>,
    inv_freq_bits: Vec<u32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// Makes the table hold `positions` × `inv_freq`'s angles (`inv_freq.len()` per position).
    fn prepare(&mut self, positions: &[i32], inv_freq: &[f32]) {
        let same_freq = self.inv_freq_bits.len() == inv_freq.len()
            && self.inv_freq_bits.iter().zip(inv_freq).all(|(a, b)| *a == b.to_bits());
        if same_freq && self.positions == positions {
            return;
        }
        self.positions.clear();
        self.positions.extend_from_slice(positions);
        self.inv_freq_bits.clear();
        self.inv_freq_bits.extend(inv_freq.iter().map(|f| f.to_bits()));
        let half = inv_freq.len();
        self.cos.resize(positions.len() * half, 0.0);
        self.sin.resize(positions.len() * half, 0.0);
        for (t, &p) in positions.iter().enumerate() {
            let pf = p as f32;
            for (i, f) in inv_freq.iter().enumerate() {
                let (s, c) = (pf * f).sin_cos();
                self.cos[t * half + i] = c;
                self.sin[t * half + i] = s;
            }
        }
    }
}

thread_local! {
    static ROPE: std::cell::RefCell<RopeTable> = std::cell::RefCell::new(RopeTable::default());
}

pub(crate) fn rope(be: &CpuBackend, x: &Raw, pos: &Raw, inv_freq: &Raw, heads: usize, head_dim: usize) {
    let tokens = pos.len;
    let half = head_dim / 2;
    let row = heads * head_dim;
    // SAFETY: `positions` and `inv_freq` are checked (`half` frequencies), read-only, disjoint
    // from `x`.
    let (p, f) = unsafe { (pos.slice::<i32>(), &inv_freq.slice::<f32>()[..half]) };
    ROPE.with(|cell| {
        // A nested call on this thread (none today) would find the table borrowed: it computes
        // its own.
        let mut own;
        let mut guard = cell.try_borrow_mut();
        let tab: &mut RopeTable = match guard {
            Ok(ref mut t) => t,
            Err(_) => {
                own = RopeTable::default();
                &mut own
            }
        };
        tab.prepare(p, f);
        let (cos, sin) = (&tab.cos, &tab.sin);
        be.for_chunks(tokens, rows_chunk(be, tokens, row, EW_HEAVY_CHUNK_MIN), |t0, nt| {
            with_scratch(head_dim, |h| {
                for t in t0..t0 + nt {
                    let (cs, sn) = (&cos[t * half..(t + 1) * half], &sin[t * half..(t + 1) * half]);
                    for hd in 0..heads {
                        let at = t * row + hd * head_dim;
                        // SAFETY: token `t` belongs to this worker; the head is read, then written.
                        unsafe { load(x, at, h) };
                        let (x1, x2) = h.split_at_mut(half);
                        for i in 0..half {
                            let (a, b) = (x1[i], x2[i]);
                            x1[i] = a * cs[i] - b * sn[i];
                            x2[i] = b * cs[i] + a * sn[i];
                        }
                        // SAFETY: as above.
                        unsafe { store(x, at, h) };
                    }
                }
            })
        });
    });
}

pub(crate) fn embedding(be: &CpuBackend, table: &Raw, ids: &Raw, out: &Raw, hidden: usize) {
    let n = ids.len;
    be.for_chunks(n, rows_chunk(be, n, hidden, 16 * 1024), |r0, nr| {
        // SAFETY: ids were range-checked by the caller and are read-only here.
        let ids = unsafe { ids.slice::<i32>() };
        with_scratch(hidden, |buf| {
            for r in r0..r0 + nr {
                let src = table.sub(ids[r] as usize * hidden, hidden);
                let dst = out.sub(r * hidden, hidden);
                // SAFETY: `src` is a row of the read-only table, `dst` this worker's row of `out`
                // (disjoint from the table, checked).
                unsafe {
                    if table.dtype == out.dtype {
                        std::ptr::copy_nonoverlapping(src.ptr, dst.ptr, src.bytes());
                    } else {
                        load(&src, 0, buf);
                        store(&dst, 0, buf);
                    }
                }
            }
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw<T>(v: &mut [T], dtype: DType) -> Raw {
        Raw { ptr: v.as_mut_ptr() as *mut u8, dtype, len: v.len() }
    }

    /// [`rope`] on a thread whose angle table holds other positions (or other frequencies) gives
    /// the bits of a thread that never rotated anything: the table is rebuilt whenever
    /// positions or frequencies differ, and reused only when both are the same.
    #[test]
    fn rope_table_reuse_keeps_the_bits() {
        let be = CpuBackend::with_threads(2).unwrap();
        let (heads, hd) = (3usize, 64usize);
        let rotate = |be: &CpuBackend, pos: &[i32], freq: &[f32], seed: u32| {
            let mut z = seed;
            let mut x: Vec<f32> = (0..pos.len() * heads * hd)
                .map(|_| {
                    z = z.wrapping_mul(1664525).wrapping_add(1013904223);
                    (z >> 8) as f32 / (1u32 << 24) as f32 - 0.5
                })
                .collect();
            let (mut p, mut f) = (pos.to_vec(), freq.to_vec());
            rope(be, &raw(&mut x, DType::F32), &raw(&mut p, DType::I32), &raw(&mut f, DType::F32), heads, hd);
            x.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        };
        let f1: Vec<f32> = (0..hd / 2).map(|i| 10000f32.powf(-2.0 * i as f32 / hd as f32)).collect();
        let f2: Vec<f32> = (0..hd / 2).map(|i| 500000f32.powf(-2.0 * i as f32 / hd as f32)).collect();
        let a: Vec<i32> = (0..20).collect();
        let b: Vec<i32> = (0..20).map(|i| 1000 + 7 * i).collect();
        let cases = [(&a, &f1, 1), (&a, &f1, 2), (&b, &f1, 3), (&b, &f2, 4), (&a[..1].to_vec(), &f2, 5), (&a, &f1, 6)];
        for (pos, freq, seed) in cases {
            let got = rotate(&be, pos, freq, seed);
            // A fresh thread has an empty table.
            let want = std::thread::scope(|s| s.spawn(|| rotate(&be, pos, freq, seed)).join().unwrap());
            assert_eq!(got, want, "seed {seed}");
        }
    }
}
