//! Argmax and sampling over rows of logits, following the contract documented on
//! [`crate::backend::SampleParams`] exactly (the CPU backend is the reference for it).

use std::cell::Cell;

use super::raw::{load, with_scratch, Raw};
use super::CpuBackend;
use crate::backend::{sample_uniform, SampleParams};

thread_local! {
    static IDX: Cell<Vec<u32>> = const { Cell::new(Vec::new()) };
}

/// First index of the maximum (NaNs never win; an all-NaN row gives 0).
pub(crate) fn argmax_row(row: &[f32]) -> usize {
    #[cfg(target_arch = "x86_64")]
    if super::simd_level() == super::SimdLevel::Avx512 {
        // SAFETY: AVX-512F was detected (the kernels' level, capped by `DJINN_CPU_SIMD`).
        return unsafe { argmax_avx512(row) };
    }
    argmax_scalar(row, f32::NEG_INFINITY, 0, 0)
}

/// The scalar scan from element `from`, carrying the best value and its index so far.
fn argmax_scalar(row: &[f32], mut best: f32, mut at: usize, from: usize) -> usize {
    for (i, &v) in row.iter().enumerate().skip(from) {
        if v > best {
            best = v;
            at = i;
        }
    }
    at
}

/// [`argmax_row`] 16 lanes at a time, the same index: lane `l` keeps the first index of its own
/// maximum (a strict `>`, false for NaN, as in the scalar scan); the row's first maximum is the
/// smallest index among the lanes that hold the largest value; the tail continues the scalar
/// scan from there. A row of 49 152 logits per sampled token was a scalar copy and scan.
///
/// # Safety
/// AVX-512F must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn argmax_avx512(row: &[f32]) -> usize {
    use std::arch::x86_64::*;
    let body = row.len() - row.len() % 16;
    let (mut best, mut at) = (_mm512_set1_ps(f32::NEG_INFINITY), _mm512_setzero_si512());
    let mut idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let mut i = 0;
    while i < body {
        // SAFETY: elements `i..i + 16` < `body` lie inside `row`.
        let v = unsafe { _mm512_loadu_ps(row.as_ptr().add(i)) };
        let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, best);
        best = _mm512_mask_mov_ps(best, gt, v);
        at = _mm512_mask_mov_epi32(at, gt, idx);
        idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16));
        i += 16;
    }
    let (mut bv, mut ba) = ([0f32; 16], [0i32; 16]);
    // SAFETY: both arrays hold 16 elements of 4 bytes.
    unsafe {
        _mm512_storeu_ps(bv.as_mut_ptr(), best);
        _mm512_storeu_si512(ba.as_mut_ptr() as *mut __m512i, at);
    }
    let top = bv.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // No lane above −∞: nothing in the body won, as in the scalar scan (index 0).
    let first = if top > f32::NEG_INFINITY {
        (0..16).filter(|&l| bv[l] == top).map(|l| ba[l] as usize).min().unwrap_or(0)
    } else {
        0
    };
    argmax_scalar(row, top, first, body)
}

pub(crate) fn argmax(be: &CpuBackend, logits: &Raw, out: &Raw, vocab: usize) {
    let rows = out.len;
    be.for_chunks(rows, 1, |r, _| {
        let at = if logits.dtype == crate::DType::F32 {
            // SAFETY: row `r` of the checked f32 logits, read-only here.
            argmax_row(unsafe { logits.sub(r * vocab, vocab).slice::<f32>() })
        } else {
            with_scratch(vocab, |buf| {
                // SAFETY: row `r` of the checked logits is read-only.
                unsafe { load(logits, r * vocab, buf) };
                argmax_row(buf)
            })
        };
        // SAFETY: `out[r]` belongs to this worker; `out` is disjoint from the logits.
        unsafe { *(out.ptr as *mut i32).add(r) = at as i32 };
    });
}

/// Orders candidates by descending logit, lower id first on ties.
fn by_logit(row: &[f32]) -> impl Fn(&u32, &u32) -> std::cmp::Ordering + '_ {
    move |a, b| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b))
}

/// Samples one row (see `SampleParams` for the contract). `idx` is scratch.
pub(crate) fn sample_row(row: &[f32], p: &SampleParams, idx: &mut Vec<u32>) -> usize {
    // A temperature whose inverse overflows is greedy (the weights would be inf × 0 = NaN).
    if p.temperature.is_nan() || p.temperature <= 0.0 || !(1.0 / p.temperature).is_finite() || p.top_k == 1 {
        return argmax_row(row);
    }
    idx.clear();
    idx.extend((0..row.len() as u32).filter(|&i| !row[i as usize].is_nan()));
    if idx.is_empty() {
        return 0;
    }
    let mut sorted = false;
    let k = p.top_k as usize;
    if k > 0 && k < idx.len() {
        idx.select_nth_unstable_by(k - 1, by_logit(row));
        idx.truncate(k);
    }
    let max = idx.iter().map(|&i| row[i as usize]).fold(f32::NEG_INFINITY, f32::max);
    let inv_t = 1.0 / p.temperature;
    let weight = |i: u32| ((row[i as usize] - max) * inv_t).exp();
    if p.top_p < 1.0 {
        idx.sort_unstable_by(by_logit(row));
        sorted = true;
        let total: f32 = idx.iter().map(|&i| weight(i)).sum();
        let want = p.top_p.max(0.0) * total;
        let mut cum = 0.0f32;
        let mut keep = idx.len();
        for (n, &i) in idx.iter().enumerate() {
            cum += weight(i);
            if cum >= want {
                keep = n + 1;
                break;
            }
        }
        idx.truncate(keep);
    }
    if sorted || k > 0 {
        // The draw walks the kept candidates in ascending id order.
        idx.sort_unstable();
    }
    let total: f32 = idx.iter().map(|&i| weight(i)).sum();
    let target = sample_uniform(p.seed, p.step) * total;
    let mut cum = 0.0f32;
    for &i in idx.iter() {
        cum += weight(i);
        if cum > target {
            return i as usize;
        }
    }
    *idx.last().expect("non-empty") as usize
}

pub(crate) fn sample(be: &CpuBackend, logits: &Raw, out: &Raw, vocab: usize, params: &[SampleParams]) {
    be.for_chunks(out.len, 1, |r, _| {
        let mut idx = IDX.with(|c| c.take());
        let tok = with_scratch(vocab, |buf| {
            // SAFETY: row `r` of the checked logits is read-only.
            unsafe { load(logits, r * vocab, buf) };
            sample_row(buf, &params[r].clamped(vocab), &mut idx)
        });
        IDX.with(|c| c.set(idx));
        // SAFETY: `out[r]` belongs to this worker; `out` is disjoint from the logits.
        unsafe { *(out.ptr as *mut i32).add(r) = tok as i32 };
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorised argmax gives the scalar scan's index on rows built to tell them apart:
    /// ties (the first wins), zeros of both signs, NaNs, −∞ and all-NaN rows, lengths with and
    /// without a tail of fewer than 16.
    #[test]
    fn argmax_equals_the_scalar_scan() {
        let mut z = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            z ^= z << 13;
            z ^= z >> 7;
            z ^= z << 17;
            z
        };
        for len in [1usize, 5, 16, 17, 31, 48, 100, 1000, 49152] {
            for case in 0..60 {
                let row: Vec<f32> = (0..len)
                    .map(|_| {
                        let r = next();
                        match (case % 6, r % 23) {
                            (0, _) => f32::NAN,
                            (1, _) => f32::NEG_INFINITY,
                            (2, k) if k < 12 => f32::NAN,
                            (3, k) if k < 3 => 0.0,
                            (3, k) if k < 6 => -0.0,
                            (_, 0) => f32::NAN,
                            (_, 1) => f32::NEG_INFINITY,
                            // Few distinct values: many ties.
                            (4, _) => (r % 7) as f32 - 8.0,
                            _ => ((r >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32 * 100.0,
                        }
                    })
                    .collect();
                let want = argmax_scalar(&row, f32::NEG_INFINITY, 0, 0);
                assert_eq!(argmax_row(&row), want, "len {len} case {case}");
            }
        }
    }
}
