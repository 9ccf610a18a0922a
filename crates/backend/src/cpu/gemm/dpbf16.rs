//! The bf16-weight GEMV kernel for CPUs with AVX512_BF16: `vdpbf16ps` multiplies 32 bf16 weights
//! by 32 bf16 activations per instruction, adding pairs of products into 16 f32 lanes.
//!
//! The activations are rounded to bf16 (round to nearest even) once per call, as a bf16 model in
//! transformers multiplies bf16 activations too; weights are used as stored. Each product of two
//! bf16 values is exact in f32, so every lane accumulates exactly the sum the scalar reference
//! in the tests computes: per 32-element step, lane `l` adds the product of elements `2l + 1`,
//! then that of `2l` (the order the instruction's definition gives, one f32 rounding each), then
//! the 16 lanes are reduced in a fixed tree ([`hsum`]). The instruction treats bf16 denormal
//! inputs as zero and flushes denormal results (activations and weights of a model are far from
//! that range).
//!
//! Batch invariance holds as for the other levels: one accumulator per (weight row, activation
//! row), the same k steps and reduction whatever `m` and whichever rows share a kernel call.

use std::arch::x86_64::*;

/// Elements of a row per kernel step.
pub(super) const STEP: usize = 32;
/// Weight rows at least this long take eight rows per step with one activation row (as in the
/// AVX-512F kernel: long rows' streams sit in the same cache sets, more in flight hide that).
const LONG_ROW_BYTES: usize = 4096;

/// Whether this CPU runs `vdpbf16ps` (AVX512_BF16 on top of AVX-512F).
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
}

/// Rounds `x` (a multiple of [`STEP`] long) to bf16, round to nearest even, in order, packed two
/// per `f32` slot of `xb` (which holds `x.len() / 2` slots): the layout `vdpbf16ps` reads.
///
/// # Safety
/// AVX-512F and AVX512_BF16 must be available.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn round_to_bf16(x: &[f32], xb: &mut [f32]) {
    for (src, dst) in x.chunks_exact(STEP).zip(xb.chunks_exact_mut(STEP / 2)) {
        // SAFETY: `src` holds 32 f32 values, `dst` 16 slots (32 bf16).
        unsafe {
            let (lo, hi) = (_mm512_loadu_ps(src.as_ptr()), _mm512_loadu_ps(src.as_ptr().add(16)));
            // The second operand fills the low half: elements 0..16 then 16..32.
            let v = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_storeu_si512(dst.as_mut_ptr() as *mut __m512i, v);
        }
    }
}

/// `out[a * out_stride + j] = Σ_{i < kb} w[j][i] · xb[a][i]` for `nrows` bf16 weight rows
/// `row_bytes` apart and `acts` (1..=4) activation rows of `kb` bf16 values (from
/// [`round_to_bf16`], `kb / 2` slots apart).
///
/// # Safety
/// AVX-512F and AVX512_BF16 must be available; the weight rows must hold `kb` readable values,
/// `xb` `acts * kb / 2` slots and `out` room for `acts` rows of `nrows` at `out_stride`; `kb`
/// must be a multiple of [`STEP`].
///
/// `JOINT` reduces a call's accumulators together (the transposed butterfly of [`hsums`]);
/// `false` reduces each on its own with [`hsum`] — the same bits, kept to time the two.
/// `pf`'s lines are prefetched into L2, spread evenly over the call's steps.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn run<const JOINT: bool>(
    w: *const u8,
    row_bytes: usize,
    nrows: usize,
    xb: *const f32,
    kb: usize,
    acts: usize,
    out: *mut f32,
    out_stride: usize,
    pf: Prefetch,
) {
    // Weight rows per step: one accumulator per (row, activation), enough of them in flight to
    // cover the instruction's latency, within 32 registers.
    match acts {
        1 if row_bytes >= LONG_ROW_BYTES => run_rm::<8, 1, JOINT>(w, row_bytes, nrows, xb, kb, out, out_stride, pf),
        1 => run_rm::<4, 1, JOINT>(w, row_bytes, nrows, xb, kb, out, out_stride, pf),
        2 => run_rm::<4, 2, JOINT>(w, row_bytes, nrows, xb, kb, out, out_stride, pf),
        3 => run_rm::<4, 3, JOINT>(w, row_bytes, nrows, xb, kb, out, out_stride, pf),
        _ => run_rm::<4, 4, JOINT>(w, row_bytes, nrows, xb, kb, out, out_stride, pf),
    }
}

/// Cache lines a kernel call prefetches while it computes: memory another call reads next.
/// Prefetching never faults, so any address will do; the caller passes its own weights.
#[derive(Clone, Copy)]
pub(super) struct Prefetch {
    pub first: *const u8,
    pub lines: usize,
}

impl Prefetch {
    pub(super) const NONE: Prefetch = Prefetch { first: std::ptr::null(), lines: 0 };
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn run_rm<const R: usize, const M: usize, const TREE: bool>(
    w: *const u8,
    row_bytes: usize,
    nrows: usize,
    xb: *const f32,
    kb: usize,
    out: *mut f32,
    out_stride: usize,
    pf: Prefetch,
) {
    // The prefetch spread over the R-row steps (then over each step's k steps).
    let per_call = pf.lines.div_ceil((nrows / R).max(1));
    let per_step = per_call.div_ceil((kb / STEP).max(1));
    let left = std::cell::Cell::new(pf);
    let next = |n: usize| {
        let p = left.get();
        let take = n.min(p.lines);
        // Past the last line the pointer is not advanced (it is never dereferenced anyway).
        left.set(Prefetch { first: p.first.wrapping_add(take * 64), lines: p.lines - take });
        Prefetch { first: p.first, lines: take }
    };
    // SAFETY: the caller's contract (rows inside `w`, activations `xb`, outputs inside `out`) is
    // the driver's and the kernel's; AVX-512F and AVX512_BF16 are enabled here.
    super::stream_rows::<R, M>(
        w,
        row_bytes,
        nrows,
        out,
        out_stride,
        |w, stride, o| unsafe { rows_rm::<R, M, TREE>(w, stride, xb, kb, o, next(per_call), per_step) },
        |w, stride, o| unsafe { rows_rm::<1, M, TREE>(w, stride, xb, kb, o, next(per_call), per_step) },
    )
}

#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn rows_rm<const R: usize, const M: usize, const TREE: bool>(
    w: *const u8,
    stride: usize,
    xb: *const f32,
    kb: usize,
    out: &mut [[f32; M]; R],
    mut pf: Prefetch,
    pf_per_step: usize,
) {
    let half = kb / 2;
    let mut acc = [[_mm512_setzero_ps(); M]; R];
    let mut i = 0;
    while i < kb {
        let mut x = [load_bh(xb as *const u8); M];
        for a in 0..M {
            x[a] = load_bh(xb.add(a * half + i / 2) as *const u8);
        }
        for _ in 0..pf_per_step.min(pf.lines) {
            // A hint (never faults): into L2, where the next call reads it from.
            _mm_prefetch::<_MM_HINT_T1>(pf.first as *const i8);
            pf = Prefetch { first: pf.first.wrapping_add(64), lines: pf.lines - 1 };
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let wv = load_bh(w.add(r * stride + i * 2));
            for a in 0..M {
                acc_r[a] = _mm512_dpbf16_ps(acc_r[a], wv, x[a]);
            }
        }
        i += STEP;
    }
    if TREE && R * M > 1 {
        // All accumulators reduced together (a fraction of the shuffles and adds of one
        // reduction each; at k = 576 those were a sixth of the kernel's time at m = 16).
        let mut v = [_mm512_setzero_ps(); 16];
        for r in 0..R {
            for a in 0..M {
                v[r * M + a] = acc[r][a];
            }
        }
        let s = hsums(&v, R * M);
        for r in 0..R {
            for a in 0..M {
                out[r][a] = s[r * M + a];
            }
        }
    } else {
        for r in 0..R {
            for a in 0..M {
                out[r][a] = hsum(acc[r][a]);
            }
        }
    }
}

/// 32 bf16 values from `p` (unaligned).
#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn load_bh(p: *const u8) -> __m512bh {
    // SAFETY: the caller's pointer holds 64 readable bytes; __m512i and __m512bh are both 64
    // plain bytes.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p as *const __m512i)) }
}

/// The 16 lanes' sum in a fixed tree (the scalar reference repeats it): `t[i] = v[i] + v[i+8]`,
/// `u[i] = t[i] + t[i+4]`, `s[i] = u[i] + u[i+2]`, then `s[0] + s[1]`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn hsum(v: __m512) -> f32 {
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
    let t = _mm256_add_ps(_mm512_castps512_ps256(v), hi);
    let u = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps::<1>(t));
    let s = _mm_add_ps(u, _mm_movehl_ps(u, u));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
    _mm_cvtss_f32(s)
}

/// `out[i] = hsum(v[i])` for `i < n` (`n` ≤ 16; the rest is padding), bit for bit: a transposed
/// butterfly in which every lane adds exactly the pair [`hsum`]'s tree adds for its accumulator
/// (IEEE addition is commutative, so only the pairing matters), four levels of two shuffles and
/// one add over several accumulators at once.
/// - Level 1, pairs (A, B): blocks (A0, A1, B0, B1) + (A2, A3, B2, B3) (128-bit blocks) give
///   `t` of A in blocks 0, 1 and of B in blocks 2, 3 (`t[i] = v[i] + v[i+8]`).
/// - Level 2, pairs of those (P, Q): blocks (P0, P2, Q0, Q2) + (P1, P3, Q1, Q3): block `b` holds
///   `u` of one accumulator (`u[i] = t[i] + t[i+4]`); vector `i` holds accumulators `4i..4i+4`.
/// - Level 3, pairs (R, S), per block: (R0, R1, S0, S1) + (R2, R3, S2, S3): `s` of two.
/// - Level 4: (T0, T2, U0, U2) + (T1, T3, U1, U3) per block: block `b`, lane `c` ends with
///   accumulator `4c + b`'s sum.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn hsums(v: &[__m512; 16], n: usize) -> [f32; 16] {
    let z = _mm512_setzero_ps();
    // Vectors past the last that holds an accumulator stay zero and cost nothing where `n` is
    // known (the callers inline this with constant `n`).
    let (n1, n2, n3) = (n.div_ceil(2), n.div_ceil(4), n.div_ceil(8));
    let mut p = [z; 8];
    for i in 0..n1 {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        p[i] = _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(a, b), _mm512_shuffle_f32x4::<0xEE>(a, b));
    }
    let mut q = [z; 4];
    for i in 0..n2 {
        let (a, b) = (p[2 * i], p[2 * i + 1]);
        q[i] = _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(a, b), _mm512_shuffle_f32x4::<0xDD>(a, b));
    }
    let mut t = [z; 2];
    for i in 0..n3 {
        let (a, b) = (q[2 * i], q[2 * i + 1]);
        t[i] = _mm512_add_ps(_mm512_shuffle_ps::<0x44>(a, b), _mm512_shuffle_ps::<0xEE>(a, b));
    }
    let f = _mm512_add_ps(_mm512_shuffle_ps::<0x88>(t[0], t[1]), _mm512_shuffle_ps::<0xDD>(t[0], t[1]));
    let mut lanes = [0f32; 16];
    _mm512_storeu_ps(lanes.as_mut_ptr(), f);
    let mut out = [0f32; 16];
    for (i, o) in out.iter_mut().enumerate().take(n) {
        *o = lanes[4 * (i % 4) + i / 4];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The joint reduction gives every accumulator's [`hsum`] bit for bit, for every count of
    /// accumulators the kernels use, over values whose sums round differently in any other
    /// order (mixed magnitudes and signs, and zeros of both signs).
    #[test]
    fn hsums_equals_hsum_per_accumulator() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512_BF16");
            return;
        }
        let mut z = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            z = z.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let e = ((z >> 40) % 40) as i32 - 20;
            let v = ((z >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32 * 2f32.powi(e);
            match z % 17 {
                0 => 0.0,
                1 => -0.0,
                _ => v,
            }
        };
        for n in [2, 3, 4, 8, 12, 16] {
            for _ in 0..200 {
                let mut vals = [[0f32; 16]; 16];
                vals.iter_mut().flatten().for_each(|x| *x = next());
                // SAFETY: AVX-512F is available (checked above); arrays of 16 f32 are 64 bytes.
                unsafe {
                    let mut v = [_mm512_setzero_ps(); 16];
                    for i in 0..n {
                        v[i] = _mm512_loadu_ps(vals[i].as_ptr());
                    }
                    let got = hsums(&v, n);
                    for i in 0..n {
                        assert_eq!(got[i].to_bits(), hsum(v[i]).to_bits(), "n={n} accumulator {i}");
                    }
                }
            }
        }
    }

    /// Timing, not a check: the kernel with the joint reduction against reducing each
    /// accumulator alone, one thread, interleaved, over one SmolLM2-135M layer's linear shapes
    /// (bf16 weights) at m = 1, 4, 16. Run with `cargo test --release -p djinn-backend --lib
    /// dpbf16_reduction_timing -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing; run by hand in release"]
    fn dpbf16_reduction_timing() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512_BF16");
            return;
        }
        let shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)];
        let ws: Vec<Vec<u16>> =
            shapes.iter().map(|&(n, k)| (0..n * k).map(|i| 0x3c00 + (i % 251) as u16).collect()).collect();
        for m in [1usize, 4, 16] {
            let x: Vec<f32> = (0..m * 1536).map(|i| (i % 13) as f32 * 0.01).collect();
            let mut xb = vec![0f32; m * 768];
            let mut c = vec![0f32; m * 1536];
            // Best round of each (the machine is shared: the minimum is the least disturbed).
            let mut t = [f64::MAX; 2];
            for _ in 0..30 {
                for (tree, slot) in [(false, 0), (true, 1)] {
                    let t0 = std::time::Instant::now();
                    for _ in 0..5 {
                        for (&(n, k), w) in shapes.iter().zip(&ws) {
                            // SAFETY: AVX512_BF16 is available; `w` holds n rows of k bf16, `xb`
                            // m rows of k / 2 slots, `c` m rows of n.
                            unsafe {
                                for r in 0..m {
                                    round_to_bf16(&x[r * k..(r + 1) * k], &mut xb[r * k / 2..(r + 1) * k / 2]);
                                }
                                let mut r0 = 0;
                                while r0 < m {
                                    let acts = (m - r0).min(4);
                                    let (wp, xp, cp) = (
                                        w.as_ptr() as *const u8,
                                        xb.as_ptr().add(r0 * k / 2),
                                        c.as_mut_ptr().add(r0 * n),
                                    );
                                    if tree {
                                        run::<true>(wp, k * 2, n, xp, k, acts, cp, n, Prefetch::NONE);
                                    } else {
                                        run::<false>(wp, k * 2, n, xp, k, acts, cp, n, Prefetch::NONE);
                                    }
                                    r0 += acts;
                                }
                            }
                        }
                    }
                    t[slot] = t[slot].min(t0.elapsed().as_secs_f64() / 5.0);
                }
            }
            println!(
                "m={m:2}: one layer's linears, one thread: per-accumulator hsum {:.1} us, joint reduction {:.1} us, speedup {:.3}x",
                t[0] * 1e6,
                t[1] * 1e6,
                t[0] / t[1]
            );
        }
    }
}
