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
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn run(
    w: *const u8,
    row_bytes: usize,
    nrows: usize,
    xb: *const f32,
    kb: usize,
    acts: usize,
    out: *mut f32,
    out_stride: usize,
) {
    // Weight rows per step: one accumulator per (row, activation), enough of them in flight to
    // cover the instruction's latency, within 32 registers.
    match acts {
        1 if row_bytes >= LONG_ROW_BYTES => run_rm::<8, 1>(w, row_bytes, nrows, xb, kb, out, out_stride),
        1 => run_rm::<4, 1>(w, row_bytes, nrows, xb, kb, out, out_stride),
        2 => run_rm::<4, 2>(w, row_bytes, nrows, xb, kb, out, out_stride),
        3 => run_rm::<4, 3>(w, row_bytes, nrows, xb, kb, out, out_stride),
        _ => run_rm::<4, 4>(w, row_bytes, nrows, xb, kb, out, out_stride),
    }
}

#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn run_rm<const R: usize, const M: usize>(
    w: *const u8,
    row_bytes: usize,
    nrows: usize,
    xb: *const f32,
    kb: usize,
    out: *mut f32,
    out_stride: usize,
) {
    // SAFETY: the caller's contract (rows inside `w`, activations `xb`, outputs inside `out`) is
    // the driver's and the kernel's; AVX-512F and AVX512_BF16 are enabled here.
    super::stream_rows::<R, M>(
        w,
        row_bytes,
        nrows,
        out,
        out_stride,
        |w, stride, o| unsafe { rows_rm::<R, M>(w, stride, xb, kb, o) },
        |w, stride, o| unsafe { rows_rm::<1, M>(w, stride, xb, kb, o) },
    )
}

#[inline]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn rows_rm<const R: usize, const M: usize>(
    w: *const u8,
    stride: usize,
    xb: *const f32,
    kb: usize,
    out: &mut [[f32; M]; R],
) {
    let half = kb / 2;
    let mut acc = [[_mm512_setzero_ps(); M]; R];
    let mut i = 0;
    while i < kb {
        let mut x = [load_bh(xb as *const u8); M];
        for a in 0..M {
            x[a] = load_bh(xb.add(a * half + i / 2) as *const u8);
        }
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let wv = load_bh(w.add(r * stride + i * 2));
            for a in 0..M {
                acc_r[a] = _mm512_dpbf16_ps(acc_r[a], wv, x[a]);
            }
        }
        i += STEP;
    }
    for r in 0..R {
        for a in 0..M {
            out[r][a] = hsum(acc[r][a]);
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
