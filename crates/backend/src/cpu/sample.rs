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
    let (mut best, mut at) = (f32::NEG_INFINITY, 0usize);
    for (i, &v) in row.iter().enumerate() {
        if v > best {
            best = v;
            at = i;
        }
    }
    at
}

pub(crate) fn argmax(be: &CpuBackend, logits: &Raw, out: &Raw, vocab: usize) {
    let rows = out.len;
    be.for_chunks(rows, 1, |r, _| {
        with_scratch(vocab, |buf| {
            // SAFETY: row `r` of the checked logits is read-only; `out[r]` belongs to this worker.
            unsafe {
                load(logits, r * vocab, buf);
                *(out.ptr as *mut i32).add(r) = argmax_row(buf) as i32;
            }
        })
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
