//! One query row against one block of K/V with AVX-512F: the online-softmax update of
//! [`super::attend`] for head dims that are a multiple of 16 (up to [`HD_MAX`]).
//!
//! Per 16 tokens of the block, each token's score is one 16-lane FMA chain over the head dim
//! (chunks in order), and the 16 chains are reduced together in a fixed butterfly ([`sum16`]),
//! so a score costs a few vector ops instead of a scalar sum of 16 lanes. The weights are
//! computed 16 at a time with `exp16` (the scalar `exp`'s formula, lane by lane), summed in a
//! fixed tree, and V is accumulated token by token in registers.
//!
//! Batch invariance: a row's result depends only on its query, the tokens it may see (`upto`
//! per block) and the cache, never on the other rows of the step or on how rows are tiled, so a
//! prefill row and the same row decoded alone give the same bits.

use std::arch::x86_64::*;

use super::super::elementwise::avx512::exp16;

/// Largest head dim this kernel takes (16-lane chunks held in registers).
pub(super) const HD_MAX: usize = 128;

/// Whether this kernel handles head dim `hd` on this machine.
pub(super) fn handles(hd: usize) -> bool {
    hd > 0 && hd.is_multiple_of(16) && hd <= HD_MAX && super::super::simd_level() == super::super::SimdLevel::Avx512
}

/// Running state of the query heads of one row (`heads` of them): max score and sum of weights
/// per head, weighted sums of V (`heads × hd`).
pub(super) struct RowState<'a> {
    pub m: &'a mut [f32],
    pub lsum: &'a mut [f32],
    pub acc: &'a mut [f32],
}

/// Folds tokens `0..upto` of a block (`k` and `v`: `upto` rows of `hd`, back to back) into `st`
/// for the query heads `q`: [`fold_groups`] over its parts of up to [`PART_TOKENS`].
///
/// # Safety
/// AVX-512F must be available; `handles(hd)`; `q` and `st.acc` hold `heads * hd` values,
/// `st.lsum` `heads`, `k` and `v` at least `upto * hd`.
pub(super) unsafe fn fold_block(q: &[f32], hd: usize, k: &[f32], v: &[f32], upto: usize, st: RowState<'_>) {
    debug_assert!(k.len() >= upto * hd && v.len() >= upto * hd);
    // Parts of up to PART_TOKENS, each a run of 16-token groups laid out back to back.
    let mut t0 = 0;
    while t0 < upto {
        let nt = PART_TOKENS.min(upto - t0);
        let (mut kp, mut vp) = ([k.as_ptr(); PART_GROUPS], [v.as_ptr(); PART_GROUPS]);
        for i in 0..nt.div_ceil(T) {
            // Inside `k` and `v`: token `t0 + i * T` < `upto`.
            (kp[i], vp[i]) = (k[(t0 + i * T) * hd..].as_ptr(), v[(t0 + i * T) * hd..].as_ptr());
        }
        let part = RowState { m: &mut *st.m, lsum: &mut *st.lsum, acc: &mut *st.acc };
        // SAFETY: the caller's contract; group `i` of the part holds its tokens (`t0 + i * T..`
        // of `k` and `v`, within `upto`).
        unsafe { fold_groups(q, hd, &kp, &vp, nt, part) };
        t0 += nt;
    }
}

/// Groups of [`GROUP_TOKENS`] tokens one part folds at most.
pub(super) const PART_GROUPS: usize = PART_TOKENS / T;

/// Folds tokens `0..upto` of one part of up to [`PART_TOKENS`] tokens into `st` for the query
/// heads `q` (`st.m.len()` heads of `hd`, already scaled), several heads at once so their
/// independent chains overlap and they share each V load (a head's arithmetic does not depend on
/// which heads share its pass). The part's K and V need not be contiguous: group `i` of
/// [`GROUP_TOKENS`] tokens lies at `k[i]` and `v[i]` (`hd` apart per token). The softmax state is
/// updated once per part instead of once per cache block (a 16-token block's update was a fixed
/// cost as large as its tokens' work).
///
/// # Safety
/// AVX-512F must be available; `handles(hd)`; `q` and `st.acc` hold `heads * hd` values,
/// `st.lsum` `heads`; `upto <= PART_TOKENS`, and `k[i]`, `v[i]` hold the group's tokens (up to
/// `upto - i * GROUP_TOKENS` rows of `hd`) for every group `i` that `upto` reaches.
pub(super) unsafe fn fold_groups(
    q: &[f32],
    hd: usize,
    k: &[*const f32; PART_GROUPS],
    v: &[*const f32; PART_GROUPS],
    upto: usize,
    st: RowState<'_>,
) {
    let heads = st.m.len();
    debug_assert!(q.len() >= heads * hd && st.acc.len() >= heads * hd && st.lsum.len() >= heads);
    debug_assert!(upto <= PART_TOKENS);
    let hc = hd / 16;
    let per = (16 / hc).clamp(1, 4);
    let mut h0 = 0;
    while h0 < heads {
        let g = per.min(heads - h0);
        let (qh, mh, lh, ah) = (&q[h0 * hd..], &mut st.m[h0..], &mut st.lsum[h0..], &mut st.acc[h0 * hd..]);
        macro_rules! go {
            ($($hc:literal),*) => {
                match (hc, g) {
                    $(($hc, 1) => fold_part::<$hc, 1>(&load_q::<$hc, 1>(qh), k, v, upto, mh, lh, ah),
                      ($hc, 2) => fold_part::<$hc, 2>(&load_q::<$hc, 2>(qh), k, v, upto, mh, lh, ah),
                      ($hc, 3) => fold_part::<$hc, 3>(&load_q::<$hc, 3>(qh), k, v, upto, mh, lh, ah),
                      ($hc, _) => fold_part::<$hc, 4>(&load_q::<$hc, 4>(qh), k, v, upto, mh, lh, ah),)*
                    _ => unreachable!("head dim {hd} is not one `handles` takes"),
                }
            };
        }
        go!(1, 2, 3, 4, 5, 6, 7, 8);
        h0 += g;
    }
}

/// The query vectors of `G` heads of `HC * 16`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load_q<const HC: usize, const G: usize>(q: &[f32]) -> [[__m512; HC]; G] {
    let hd = HC * 16;
    let mut qv = [[_mm512_setzero_ps(); HC]; G];
    for (g, qg) in qv.iter_mut().enumerate() {
        for (c, v) in qg.iter_mut().enumerate() {
            *v = _mm512_loadu_ps(q.as_ptr().add(g * hd + c * 16));
        }
    }
    qv
}

/// Tokens per score vector.
const T: usize = 16;
/// Tokens of one group of [`fold_groups`] (one score vector).
pub(super) const GROUP_TOKENS: usize = T;
/// Blocks longer than this are folded in parts (bounds the score buffers on the stack).
pub(super) const PART_TOKENS: usize = 64;

/// One part of at most [`PART_TOKENS`] tokens for `G` heads: scores, the new maxima, weights,
/// then V. Group `i` of 16 tokens lies at `k[i]` / `v[i]`.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn fold_part<const HC: usize, const G: usize>(
    qv: &[[__m512; HC]; G],
    k: &[*const f32; PART_GROUPS],
    v: &[*const f32; PART_GROUPS],
    nt: usize,
    m: &mut [f32],
    lsum: &mut [f32],
    acc: &mut [f32],
) {
    let hd = HC * 16;
    let groups = nt.div_ceil(T);
    let mut s = [[_mm512_set1_ps(f32::NEG_INFINITY); PART_TOKENS / T]; G];
    for (qg, sg) in qv.iter().zip(s.iter_mut()) {
        for (grp, sv) in sg.iter_mut().enumerate().take(groups) {
            let n = T.min(nt - grp * T);
            let dot = |t: usize| {
                let kt = k[grp].add(t * hd);
                let mut a = _mm512_mul_ps(qg[0], _mm512_loadu_ps(kt));
                for c in 1..HC {
                    a = _mm512_fmadd_ps(qg[c], _mm512_loadu_ps(kt.add(c * 16)), a);
                }
                a
            };
            let mut dots = [_mm512_setzero_ps(); T];
            if n == T {
                // A whole group: a loop of constant length, kept in registers.
                for (t, d) in dots.iter_mut().enumerate() {
                    *d = dot(t);
                }
            } else {
                for (t, d) in dots.iter_mut().enumerate().take(n) {
                    *d = dot(t);
                }
            }
            // Lanes past the tokens stay −∞: they weigh nothing.
            let valid: __mmask16 = if n == T { 0xffff } else { (1u16 << n) - 1 };
            *sv = _mm512_mask_mov_ps(*sv, valid, sum16(&dots));
        }
    }
    let mut p = [[0f32; PART_TOKENS]; G];
    let mut corr = [0f32; G];
    for g in 0..G {
        let mut mx = s[g][0];
        for grp in 1..groups {
            mx = _mm512_max_ps(mx, s[g][grp]);
        }
        let new_m = m[g].max(_mm512_reduce_max_ps(mx));
        corr[g] = super::exp(m[g] - new_m);
        let nm = _mm512_set1_ps(new_m);
        let mut total = _mm512_setzero_ps();
        for grp in 0..groups {
            let e = exp16(_mm512_sub_ps(s[g][grp], nm));
            total = _mm512_add_ps(total, e);
            _mm512_storeu_ps(p[g].as_mut_ptr().add(grp * T), e);
        }
        lsum[g] = lsum[g] * corr[g] + _mm512_reduce_add_ps(total);
        m[g] = new_m;
    }
    let mut av = [[_mm512_setzero_ps(); HC]; G];
    for g in 0..G {
        let cv = _mm512_set1_ps(corr[g]);
        for c in 0..HC {
            av[g][c] = _mm512_mul_ps(_mm512_loadu_ps(acc.as_ptr().add(g * hd + c * 16)), cv);
        }
    }
    for t in 0..nt {
        let vt = v[t / T].add((t % T) * hd);
        let mut vc = [_mm512_setzero_ps(); HC];
        for c in 0..HC {
            vc[c] = _mm512_loadu_ps(vt.add(c * 16));
        }
        for g in 0..G {
            let pt = _mm512_set1_ps(p[g][t]);
            for c in 0..HC {
                av[g][c] = _mm512_fmadd_ps(pt, vc[c], av[g][c]);
            }
        }
    }
    for g in 0..G {
        for c in 0..HC {
            _mm512_storeu_ps(acc.as_mut_ptr().add(g * hd + c * 16), av[g][c]);
        }
    }
}

/// Lane `t` of the result is the sum of the 16 lanes of `d[t]`, all 16 reduced together in a
/// transposed butterfly (four levels of two shuffles and one add over several vectors): the
/// same pairs are added for every `t`, whichever lanes are in use.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn sum16(d: &[__m512; T]) -> __m512 {
    let mut p = [_mm512_setzero_ps(); 8];
    for i in 0..8 {
        let (a, b) = (d[2 * i], d[2 * i + 1]);
        p[i] = _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(a, b), _mm512_shuffle_f32x4::<0xEE>(a, b));
    }
    let mut r = [_mm512_setzero_ps(); 4];
    for i in 0..4 {
        let (a, b) = (p[2 * i], p[2 * i + 1]);
        r[i] = _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(a, b), _mm512_shuffle_f32x4::<0xDD>(a, b));
    }
    let mut u = [_mm512_setzero_ps(); 2];
    for i in 0..2 {
        let (a, b) = (r[2 * i], r[2 * i + 1]);
        u[i] = _mm512_add_ps(_mm512_shuffle_ps::<0x44>(a, b), _mm512_shuffle_ps::<0xEE>(a, b));
    }
    let f = _mm512_add_ps(_mm512_shuffle_ps::<0x88>(u[0], u[1]), _mm512_shuffle_ps::<0xDD>(u[0], u[1]));
    // Block `b`, lane `c` holds vector `4c + b`'s sum: back to token order.
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_permutexvar_ps(order, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sum16` puts each vector's lane sum in its lane, with one fixed pairing per lane.
    #[test]
    fn sum16_sums_each_vector() {
        if !is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: no AVX-512F");
            return;
        }
        let vals: Vec<f32> = (0..256).map(|i| ((i * 37) % 101) as f32 - 50.0).collect();
        let mut got = [0f32; 16];
        // SAFETY: AVX-512F was detected; `vals` holds 16 vectors of 16.
        unsafe {
            let mut d = [_mm512_setzero_ps(); 16];
            for (t, dt) in d.iter_mut().enumerate() {
                *dt = _mm512_loadu_ps(vals.as_ptr().add(t * 16));
            }
            _mm512_storeu_ps(got.as_mut_ptr(), sum16(&d));
        }
        for t in 0..16 {
            // Small integers: every order of addition is exact.
            assert_eq!(got[t], vals[t * 16..(t + 1) * 16].iter().sum::<f32>(), "vector {t}");
        }
    }
}
