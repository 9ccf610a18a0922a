//! AVX-512F versions of elementwise kernels, lane for lane the scalar ones (the same
//! operations in the same order, so the same bits): `exp`, and silu·mul over 16 lanes.

use std::arch::x86_64::*;

/// The scalar [`super::exp`] on 16 lanes: the same operations in the same order (so each lane
/// equals it), −87.3 and below (−∞ included) exactly 0.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn exp16(x0: __m512) -> __m512 {
    let x = _mm512_min_ps(_mm512_max_ps(x0, _mm512_set1_ps(-87.3)), _mm512_set1_ps(88.7));
    let magic = _mm512_set1_ps(12_582_912.0);
    let n = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)), magic), magic);
    let r = _mm512_sub_ps(
        _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693_359_4))),
        _mm512_mul_ps(n, _mm512_set1_ps(-2.121_944_4e-4)),
    );
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
        p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(c));
    }
    let y = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r), _mm512_set1_ps(1.0));
    let pow2 = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)));
    let e = _mm512_mul_ps(y, _mm512_castsi512_ps(pow2));
    let tiny = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x0, _mm512_set1_ps(-87.3));
    _mm512_mask_mov_ps(e, tiny, _mm512_setzero_ps())
}

/// `out[i] = silu(g[i]) * u[i]` for whole vectors of 16, then the scalar code for the rest:
/// each value bit-equals [`super::silu`]`(g) * u` (division is exact-rounded on both sides).
///
/// # Safety
/// AVX-512F must be available; the three slices have one length.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
    let n = out.len() - out.len() % 16;
    let one = _mm512_set1_ps(1.0);
    for i in (0..n).step_by(16) {
        let x = _mm512_loadu_ps(g.as_ptr().add(i));
        // `x / (1.0 + exp(-x))`, negation exact as `0 - x` is not for x = 0: flip the sign bit.
        let neg = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x), _mm512_set1_epi32(i32::MIN)));
        let s = _mm512_div_ps(x, _mm512_add_ps(one, exp16(neg)));
        _mm512_storeu_ps(out.as_mut_ptr().add(i), _mm512_mul_ps(s, _mm512_loadu_ps(u.as_ptr().add(i))));
    }
    for i in n..out.len() {
        out[i] = super::silu(g[i]) * u[i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `exp16` is the scalar `exp` lane by lane, bit for bit, over its whole range and the
    /// clamps (−∞, below −87.3, above 88.7).
    #[test]
    fn exp16_equals_the_scalar_exp() {
        if !is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: no AVX-512F");
            return;
        }
        let mut xs: Vec<f32> = (-2000..2000).map(|i| i as f32 * 0.0467).collect();
        xs.extend([f32::NEG_INFINITY, -1e30, -87.31, -87.3, -87.29, 88.69, 88.7, 1e30, 0.0, -0.0, 1e-30]);
        while !xs.len().is_multiple_of(16) {
            xs.push(0.5);
        }
        for c in xs.chunks_exact(16) {
            let mut got = [0f32; 16];
            // SAFETY: AVX-512F was detected; both arrays hold 16 values.
            unsafe { _mm512_storeu_ps(got.as_mut_ptr(), exp16(_mm512_loadu_ps(c.as_ptr()))) };
            for (x, g) in c.iter().zip(got) {
                assert_eq!(g.to_bits(), super::super::exp(*x).to_bits(), "exp({x})");
            }
        }
    }

    /// The AVX-512 silu·mul bit-equals the scalar one, tail included.
    #[test]
    fn silu_mul_equals_the_scalar_silu_mul() {
        if !is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: no AVX-512F");
            return;
        }
        let g: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.037).chain([0.0, -0.0, -100.0, 100.0]).collect();
        let u: Vec<f32> = (0..g.len()).map(|i| ((i * 7919) % 113) as f32 * 0.1 - 5.0).collect();
        let mut out = vec![0f32; g.len()];
        // SAFETY: AVX-512F was detected; the slices have one length.
        unsafe { silu_mul(&g, &u, &mut out) };
        for i in 0..g.len() {
            assert_eq!(out[i].to_bits(), (super::super::silu(g[i]) * u[i]).to_bits(), "silu({}) * {}", g[i], u[i]);
        }
    }
}
