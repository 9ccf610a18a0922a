//! Elementwise and row-wise ops: binary (with cyclic broadcast of `b`), unary, cast, silu·mul,
//! softmax, RMSNorm (fused residual add), rotate-half RoPE, embedding gather, byte copies.
//!
//! Each worker converts a tile of its range to f32 on the stack, computes, and stores back, so
//! an output identical to an input (the in-place case the callers allow) is read before written.

// Numeric kernels index several parallel arrays with one counter; iterators would hide that.
#![allow(clippy::needless_range_loop)]

use super::raw::{load, round_to, store, with_scratch, Raw};
use super::CpuBackend;
use crate::backend::{BinaryOp, UnaryOp};

/// Elements per stack tile.
const TILE: usize = 1024;
/// Minimum elements per parallel chunk of an elementwise op (smaller work stays on the caller).
const EW_CHUNK_MIN: usize = 32 * 1024;
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

#[inline]
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

pub(crate) fn unary(be: &CpuBackend, op: UnaryOp, x: &Raw, out: &Raw) {
    be.for_chunks(out.len, be.chunk_for(out.len, EW_CHUNK_MIN), |start, len| {
        let mut t = [0f32; TILE];
        tiles(start, len, |i, n| {
            let t = &mut t[..n];
            // SAFETY: as in `binary`.
            unsafe { load(x, i, t) };
            match op {
                UnaryOp::Silu => t.iter_mut().for_each(|v| *v = silu(*v)),
                UnaryOp::Exp => t.iter_mut().for_each(|v| *v = v.exp()),
                UnaryOp::Neg => t.iter_mut().for_each(|v| *v = -*v),
                UnaryOp::Sqrt => t.iter_mut().for_each(|v| *v = v.sqrt()),
            }
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

pub(crate) fn silu_mul(be: &CpuBackend, g: &Raw, u: &Raw, out: &Raw) {
    be.for_chunks(out.len, be.chunk_for(out.len, EW_CHUNK_MIN), |start, len| {
        let (mut xg, mut xu) = ([0f32; TILE], [0f32; TILE]);
        tiles(start, len, |i, n| {
            let (xg, xu) = (&mut xg[..n], &mut xu[..n]);
            // SAFETY: as in `binary`.
            unsafe {
                load(g, i, xg);
                load(u, i, xu);
            }
            xg.iter_mut().zip(xu.iter()).for_each(|(a, b)| *a = silu(*a) * *b);
            // SAFETY: as in `binary`.
            unsafe { store(out, i, xg) }
        });
    });
}

/// Numerically stable softmax of one row in place.
pub(crate) fn softmax_row(row: &mut [f32]) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // f64 sum: a 128k-entry vocabulary row summed in f32 would lose ~1e-4 relative.
    let mut sum = 0.0f64;
    for v in row.iter_mut() {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    row.iter_mut().for_each(|v| *v *= inv);
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

pub(crate) fn rms_norm(be: &CpuBackend, x: &Raw, res: Option<&Raw>, w: &Raw, out: &Raw, hidden: usize, eps: f32) {
    let rows = x.len / hidden;
    be.for_chunks(rows, rows_chunk(be, rows, hidden, 16 * 1024), |r0, nr| {
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
                let ss: f32 = h.iter().map(|v| v * v).sum();
                let inv = 1.0 / (ss / hidden as f32 + eps).sqrt();
                h.iter_mut().zip(wt.iter()).for_each(|(v, g)| *v = *v * inv * *g);
                // SAFETY: as above.
                unsafe { store(out, at, h) };
            }
        })
    });
}

pub(crate) fn rope(be: &CpuBackend, x: &Raw, pos: &Raw, inv_freq: &Raw, heads: usize, head_dim: usize) {
    let tokens = pos.len;
    let half = head_dim / 2;
    let row = heads * head_dim;
    be.for_chunks(tokens, rows_chunk(be, tokens, row, 16 * 1024), |t0, nt| {
        with_scratch(2 * half + head_dim, |buf| {
            let (cs, rest) = buf.split_at_mut(half);
            let (sn, h) = rest.split_at_mut(half);
            // SAFETY: `positions` and `inv_freq` are checked, read-only, disjoint from `x`.
            let (p, f) = unsafe { (pos.slice::<i32>(), inv_freq.slice::<f32>()) };
            for t in t0..t0 + nt {
                let pf = p[t] as f32;
                for i in 0..half {
                    let (s, c) = (pf * f[i]).sin_cos();
                    cs[i] = c;
                    sn[i] = s;
                }
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
