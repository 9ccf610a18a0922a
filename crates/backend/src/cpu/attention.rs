//! The paged KV cache on the CPU: append, causal GQA attention with online softmax, and whole-block
//! copies (within the cache, and gather/scatter through a staging buffer for the VMU's swap).
//!
//! Layout: see [`KvLayout`] (`[block][layer][k|v][kv_head][token][head_dim]`). Attention works on
//! (sequence, KV head, tile of query rows) items: each K/V slab of a block is read and widened
//! once and serves every query head of the group and every row of the tile.

// Numeric kernels index several parallel arrays with one counter; iterators would hide that.
#![allow(clippy::needless_range_loop)]

#[cfg(target_arch = "x86_64")]
mod avx512;

use super::elementwise::{exp, multiversion};
use super::raw::{self, ints, load, store, with_scratch, Raw};
use super::CpuBackend;
use crate::error::Result;
use crate::KvLayout;

/// Query rows per attention work item (prefill); decode items have one row.
const ROW_TILE: usize = 16;
/// K and V bytes of attention work below which it stays on the calling thread (see `attention`).
const ATTEND_BYTES_MIN: usize = 64 * 1024;

/// The batch's index arrays, checked as i32 operands.
pub(crate) struct BatchIdx {
    pub seqs: usize,
    pub q_start: Raw,
    pub ctx: Raw,
    pub tables: Raw,
    pub max_blocks: usize,
}

/// The cache range viewed as elements of the layout's dtype.
fn cache_elems(c: &Raw, l: &KvLayout) -> Raw {
    Raw { ptr: c.ptr, dtype: l.dtype, len: c.bytes() / l.dtype.size_bytes() }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn kv_append(
    be: &CpuBackend,
    k: &Raw,
    v: &Raw,
    c: &Raw,
    l: &KvLayout,
    num_blocks: usize,
    layer: usize,
    slots: &Raw,
) -> Result<()> {
    let op = "kv_append";
    if layer >= l.layers {
        return Err(raw::shape(op, format!("layer {layer} of {}", l.layers)));
    }
    let row = l.kv_heads * l.head_dim;
    if !k.len.is_multiple_of(row) {
        return Err(raw::shape(op, format!("k of {} elements is not [tokens, {}, {}]", k.len, l.kv_heads, l.head_dim)));
    }
    let tokens = k.len / row;
    raw::len_eq(op, "v", v, k.len)?;
    raw::len_eq(op, "slots", slots, tokens)?;
    let slots_max = num_blocks * l.block_tokens;
    // SAFETY: checked i32 operand, disjoint from the cache (the only output).
    let sl = unsafe { ints(slots) };
    if let Some((i, s)) = sl.iter().enumerate().find(|(_, &s)| s < 0 || s as usize >= slots_max) {
        return Err(raw::shape(op, format!("slots[{i}] = {s} outside the cache's {slots_max} slots")));
    }
    let cache = cache_elems(c, l);
    let hd = l.head_dim;
    // One worker per KV head: a head's slabs are disjoint from every other head's, so repeated
    // slots cannot race (the later token wins, as it would on a serial device).
    be.for_chunks(l.kv_heads, if tokens * row < 64 * 1024 { l.kv_heads } else { 1 }, |h0, nh| {
        with_scratch(hd, |buf| {
            for h in h0..h0 + nh {
                for (t, &s) in sl.iter().enumerate() {
                    let (block, off) = (s as usize / l.block_tokens, s as usize % l.block_tokens);
                    for (kv, src) in [(0, k), (1, v)] {
                        let at = l.elem_offset(block, layer, kv, h, off);
                        // SAFETY: the slot is inside the cache (checked); the head's slab belongs
                        // to this worker; sources are disjoint from the cache (checked).
                        unsafe {
                            let from = (t * l.kv_heads + h) * hd;
                            if src.dtype == cache.dtype {
                                // The same dtype: the bytes as they are (no f32 round trip).
                                let (s, d) = (src.sub(from, hd), cache.sub(at, hd));
                                std::ptr::copy_nonoverlapping(s.ptr, d.ptr, s.bytes());
                            } else {
                                load(src, from, buf);
                                store(&cache, at, buf);
                            }
                        }
                    }
                }
            }
        })
    });
    Ok(())
}

/// Dot product over 16 lanes (two independent vector chains, so the add latency is hidden;
/// vectorises without reassociation flags).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let n = a.len() - a.len() % 16;
    for (x, y) in a[..n].chunks_exact(16).zip(b[..n].chunks_exact(16)) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in n..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// `sc[t] = dot(q, k[t])` for the rows of `k` (each `q.len()` long): four rows at a time, each
/// value computed exactly as [`dot`] does (same lanes, the 16-element steps in the same order,
/// lanes summed in order), the four rows' steps interleaved so their chains run side by side.
#[inline(always)]
fn scores(q: &[f32], k: &[f32], sc: &mut [f32]) {
    const X: usize = 4;
    let hd = q.len();
    let n = sc.len();
    let body = hd - hd % 16;
    let mut t = 0;
    while t + X <= n {
        let kt = &k[t * hd..(t + X) * hd];
        let mut a = [[0f32; 16]; X];
        for c in (0..body).step_by(16) {
            let qc = &q[c..c + 16];
            for (x, ax) in a.iter_mut().enumerate() {
                let kc = &kt[x * hd + c..x * hd + c + 16];
                for l in 0..16 {
                    ax[l] += qc[l] * kc[l];
                }
            }
        }
        for x in 0..X {
            // `dot`'s `iter().sum()`: the lanes in order (from -0.0, which leaves lane 0 as is).
            let mut s: f32 = a[x].iter().sum();
            for i in body..hd {
                s += q[i] * kt[x * hd + i];
            }
            sc[t + x] = s;
        }
        t += X;
    }
    for t in t..n {
        sc[t] = dot(q, &k[t * hd..(t + 1) * hd]);
    }
}

/// `acc[d] += p[t] * v[t][d]` over the tokens `t` in order, for every element `d` (rows of `v`
/// are `acc.len()` long): 64 elements at a time (eight independent vector chains across the
/// tokens, held in registers), then 16, then one.
#[inline(always)]
fn accumulate(p: &[f32], v: &[f32], acc: &mut [f32]) {
    let c0 = accumulate_cols::<64>(p, v, acc, 0);
    let c0 = accumulate_cols::<16>(p, v, acc, c0);
    accumulate_cols::<1>(p, v, acc, c0);
}

/// [`accumulate`] over columns `c0..` in tiles of `W` while a whole tile fits; returns the
/// first column left.
#[inline(always)]
fn accumulate_cols<const W: usize>(p: &[f32], v: &[f32], acc: &mut [f32], mut c0: usize) -> usize {
    let hd = acc.len();
    while c0 + W <= hd {
        let mut a = [0f32; W];
        a.copy_from_slice(&acc[c0..c0 + W]);
        for (t, &pt) in p.iter().enumerate() {
            let vt = &v[t * hd + c0..t * hd + c0 + W];
            for l in 0..W {
                a[l] += pt * vt[l];
            }
        }
        acc[c0..c0 + W].copy_from_slice(&a);
        c0 += W;
    }
    c0
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    be: &CpuBackend,
    q: &Raw,
    c: &Raw,
    l: &KvLayout,
    num_blocks: usize,
    layer: usize,
    b: &BatchIdx,
    out: &Raw,
    heads: usize,
    scale: f32,
) -> Result<()> {
    let op = "attention";
    let (kvh, hd, bt) = (l.kv_heads, l.head_dim, l.block_tokens);
    if layer >= l.layers {
        return Err(raw::shape(op, format!("layer {layer} of {}", l.layers)));
    }
    if heads == 0 || !heads.is_multiple_of(kvh) {
        return Err(raw::shape(op, format!("{heads} query heads are not a multiple of {kvh} KV heads")));
    }
    let row = heads * hd;
    if !q.len.is_multiple_of(row) {
        return Err(raw::shape(op, format!("q of {} elements is not [rows, {heads}, {hd}]", q.len)));
    }
    let rows = q.len / row;
    raw::len_eq(op, "out", out, q.len)?;
    raw::len_eq(op, "q_start", &b.q_start, b.seqs + 1)?;
    raw::len_eq(op, "ctx_lens", &b.ctx, b.seqs)?;
    raw::len_eq(op, "block_tables", &b.tables, b.seqs * b.max_blocks)?;
    // SAFETY: checked i32 operands, disjoint from `out` (the only output).
    let (qs, ctx, tables) = unsafe { (ints(&b.q_start), ints(&b.ctx), ints(&b.tables)) };
    if qs[0] != 0 || qs[b.seqs] as i64 != rows as i64 {
        return Err(raw::shape(op, format!("q_start runs {}..{}, expected 0..{rows}", qs[0], qs[b.seqs])));
    }
    let mut max_q = 0usize;
    for s in 0..b.seqs {
        let q_len = qs[s + 1] as i64 - qs[s] as i64;
        let n_ctx = ctx[s] as i64;
        if q_len < 0 || n_ctx < q_len {
            return Err(raw::shape(op, format!("sequence {s}: {q_len} query rows over a context of {n_ctx}")));
        }
        let blocks = (n_ctx as usize).div_ceil(bt);
        if blocks > b.max_blocks {
            return Err(raw::shape(
                op,
                format!("sequence {s}: context {n_ctx} needs {blocks} blocks > {}", b.max_blocks),
            ));
        }
        let t = &tables[s * b.max_blocks..s * b.max_blocks + blocks];
        if let Some((i, id)) = t.iter().enumerate().find(|(_, &id)| id < 0 || id as usize >= num_blocks) {
            return Err(raw::shape(op, format!("sequence {s}: block_tables[{i}] = {id} outside {num_blocks} blocks")));
        }
        max_q = max_q.max(q_len as usize);
    }
    if rows == 0 {
        return Ok(());
    }
    let cache = cache_elems(c, l);
    let group = heads / kvh;
    let tiles = max_q.div_ceil(ROW_TILE);
    let items = b.seqs * kvh * tiles;
    let slab = bt * hd;
    // State per (row, head of group): running max, running sum, accumulator; plus q, K, V, scores.
    let scratch = ROW_TILE * group * (hd + 2) + ROW_TILE * group * hd + 2 * slab + bt;
    #[cfg(target_arch = "x86_64")]
    let wide = avx512::handles(hd);
    #[cfg(not(target_arch = "x86_64"))]
    let wide = false;
    let job = Job {
        q,
        cache: &cache,
        l,
        out,
        qs,
        ctx,
        tables,
        max_blocks: b.max_blocks,
        layer,
        heads,
        group,
        tiles,
        scale,
        wide,
    };
    // Items of a short context (a tiny model's) go to a worker only in chunks of ATTEND_BYTES_MIN
    // of K and V: a cross-core hand-off costs more than attending over a few KiB.
    let ctx_max = ctx[..b.seqs].iter().map(|&c| c as usize).max().unwrap_or(0);
    let item_bytes = (2 * ctx_max * hd * l.dtype.size_bytes()).max(1);
    be.for_chunks(items, ATTEND_BYTES_MIN.div_ceil(item_bytes), |i0, ni| {
        for item in i0..i0 + ni {
            // The cache is read once per step from memory (a batch's KV is tens of MiB beside
            // the weights streaming through): this item's V is fetched while its scores are
            // computed, the next item's K and V while this one runs (it was a third of a 16-row
            // decode step's attention time waiting on V loads).
            prefetch_kv(&job, item, 1, Hint::L1);
            if item + 1 < items {
                prefetch_kv(&job, item + 1, 0, Hint::L2);
                prefetch_kv(&job, item + 1, 1, Hint::L2);
            }
            with_scratch(scratch, |buf| attend(&job, item, buf));
        }
    });
    Ok(())
}

/// `buf.len()` elements of `cache` from `first` as f32: borrowed in place from an f32 cache (a
/// decode step attends over every sequence's whole context, and copying each slab first was a
/// tenth of a 16-sequence step), else widened into `buf`.
///
/// # Safety
/// The range must lie inside `cache` and no thread may write it while the result lives.
#[inline(always)]
unsafe fn slab_f32<'a>(cache: &Raw, first: usize, buf: &'a mut [f32]) -> &'a [f32] {
    if cache.dtype == crate::DType::F32 {
        // SAFETY: the caller's range, f32 elements, read-only meanwhile.
        unsafe { cache.sub(first, buf.len()).slice::<f32>() }
    } else {
        // SAFETY: as above.
        unsafe { load(cache, first, buf) };
        buf
    }
}

/// Everything one attention work item needs (shared, read-only).
struct Job<'a> {
    q: &'a Raw,
    cache: &'a Raw,
    l: &'a KvLayout,
    out: &'a Raw,
    qs: &'a [i32],
    ctx: &'a [i32],
    tables: &'a [i32],
    max_blocks: usize,
    layer: usize,
    heads: usize,
    group: usize,
    tiles: usize,
    scale: f32,
    /// Fold blocks with the AVX-512 kernel (`avx512::handles(head_dim)`).
    wide: bool,
}

/// The rows and positions of one work item.
struct Span {
    /// Sequence and KV head.
    s: usize,
    h: usize,
    /// The sequence's first query row, and the item's first row within it and row count.
    q0: usize,
    j0: usize,
    nr: usize,
    /// Positions of the item's first and last rows.
    first_pos: usize,
    last_pos: usize,
}

impl Job<'_> {
    /// Item `item`'s span; `None` for a tile past its sequence's rows.
    fn span(&self, item: usize) -> Option<Span> {
        let (kvh, tiles) = (self.l.kv_heads, self.tiles);
        let (s, rest) = (item / (kvh * tiles), item % (kvh * tiles));
        let (h, tile) = (rest / tiles, rest % tiles);
        let (q0, q_len) = (self.qs[s] as usize, (self.qs[s + 1] - self.qs[s]) as usize);
        let j0 = tile * ROW_TILE;
        if j0 >= q_len {
            return None;
        }
        let nr = ROW_TILE.min(q_len - j0);
        let first_pos = self.ctx[s] as usize - q_len + j0;
        Some(Span { s, h, q0, j0, nr, first_pos, last_pos: first_pos + nr - 1 })
    }
}

/// Which cache a prefetch fills.
#[derive(Clone, Copy)]
enum Hint {
    L1,
    L2,
}

/// Prefetches the K (`kv` 0) or V (1) slabs item `item` reads: its KV head's tokens up to the
/// item's last position, block by block. A hint only (the addresses are inside the cache, and a
/// prefetch never faults anyway).
fn prefetch_kv(job: &Job<'_>, item: usize, kv: usize, hint: Hint) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};
        let l = job.l;
        let Some(Span { s, h, last_pos: last, .. }) = job.span(item) else { return };
        let (bt, esize) = (l.block_tokens, l.dtype.size_bytes());
        let table = &job.tables[s * job.max_blocks..];
        for blk in 0..=last / bt {
            let valid = bt.min(last + 1 - blk * bt);
            let first = l.elem_offset(table[blk] as usize, job.layer, kv, h, 0);
            let base = job.cache.ptr.wrapping_add(first * esize) as *const i8;
            let lines = (valid * l.head_dim * esize).div_ceil(64);
            // SAFETY: prefetching has no memory-safety preconditions (it never faults).
            unsafe {
                match hint {
                    Hint::L1 => (0..lines).for_each(|i| _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(i * 64))),
                    Hint::L2 => (0..lines).for_each(|i| _mm_prefetch::<_MM_HINT_T1>(base.wrapping_add(i * 64))),
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (job, item, kv, hint);
}

multiversion! {
/// One (sequence, KV head, tile of query rows) item: online softmax over the sequence's blocks.
fn attend(job: &Job<'_>, item: usize, buf: &mut [f32]) {
    let (l, group, heads, scale) = (job.l, job.group, job.heads, job.scale);
    let (q, cache, out) = (job.q, job.cache, job.out);
    let (hd, bt) = (l.head_dim, l.block_tokens);
    let layer = job.layer;
    let slab = bt * hd;
    let Some(Span { s, h, q0, j0, nr, first_pos, last_pos }) = job.span(item) else { return };
    let table = &job.tables[s * job.max_blocks..];
    let n = nr * group;
    let (m, buf) = buf.split_at_mut(n);
    let (lsum, buf) = buf.split_at_mut(n);
    let (acc, buf) = buf.split_at_mut(n * hd);
    let (qv, buf) = buf.split_at_mut(n * hd);
    let (kb, buf) = buf.split_at_mut(slab);
    let (vb, sc) = buf.split_at_mut(slab);
    m.fill(f32::NEG_INFINITY);
    lsum.fill(0.0);
    acc.fill(0.0);
    for j in 0..nr {
        for g in 0..group {
            let qh = h * group + g;
            let dst = &mut qv[(j * group + g) * hd..][..hd];
            // SAFETY: row `q0 + j0 + j` < rows, head `qh` < heads: inside `q`, read-only.
            unsafe { load(q, ((q0 + j0 + j) * heads + qh) * hd, dst) };
            dst.iter_mut().for_each(|v| *v *= scale);
        }
    }
    // An f32 cache in blocks of whole 16-token groups is folded in parts of up to 64 positions
    // (several blocks, read in place): one softmax update per part, not per block. Parts start
    // at multiples of 64 positions whatever the rows, so a row folds the same parts in a
    // prefill tile as decoded alone.
    #[cfg(target_arch = "x86_64")]
    let merged = job.wide
        && cache.dtype == crate::DType::F32
        && bt.is_multiple_of(avx512::GROUP_TOKENS)
        && avx512::PART_TOKENS.is_multiple_of(bt);
    #[cfg(not(target_arch = "x86_64"))]
    let merged = false;
    #[cfg(target_arch = "x86_64")]
    if merged {
        let gt = avx512::GROUP_TOKENS;
        let mut p0 = 0;
        while p0 <= last_pos {
            let plen = avx512::PART_TOKENS.min(last_pos + 1 - p0);
            let (mut kp, mut vp) = ([std::ptr::null(); avx512::PART_GROUPS], [std::ptr::null(); avx512::PART_GROUPS]);
            for i in 0..plen.div_ceil(gt) {
                let a = p0 + i * gt;
                let (id, off, n) = (table[a / bt] as usize, (a % bt) * hd, gt.min(plen - i * gt) * hd);
                // SAFETY: `id` < num_blocks (checked); the group's `n` elements lie inside its
                // block's slab (a group never crosses a block: `bt` is a multiple of it), which
                // this op only reads.
                unsafe {
                    kp[i] = cache.sub(l.elem_offset(id, layer, 0, h, 0) + off, n).slice::<f32>().as_ptr();
                    vp[i] = cache.sub(l.elem_offset(id, layer, 1, h, 0) + off, n).slice::<f32>().as_ptr();
                }
            }
            for j in 0..nr {
                let pos = first_pos + j;
                if pos < p0 {
                    continue;
                }
                let upto = plen.min(pos + 1 - p0);
                let (i0, i1) = (j * group, (j + 1) * group);
                let st = avx512::RowState { m: &mut m[i0..i1], lsum: &mut lsum[i0..i1], acc: &mut acc[i0 * hd..i1 * hd] };
                // SAFETY: `wide` means AVX-512F and a head dim the kernel takes; the row's
                // `group` queries and states are `group × hd` long; every group `upto` reaches
                // holds its tokens (set above).
                unsafe { avx512::fold_groups(&qv[i0 * hd..i1 * hd], hd, &kp, &vp, upto, st) };
            }
            p0 += avx512::PART_TOKENS;
        }
    }
    for blk in (0..=last_pos / bt).filter(|_| !merged) {
        let id = table[blk] as usize;
        let valid = bt.min(last_pos + 1 - blk * bt);
        // SAFETY: `id` < num_blocks (checked); the slabs are inside the cache, which this
        // op only reads.
        let (kb, vb) = unsafe {
            (
                slab_f32(cache, l.elem_offset(id, layer, 0, h, 0), &mut kb[..valid * hd]),
                slab_f32(cache, l.elem_offset(id, layer, 1, h, 0), &mut vb[..valid * hd]),
            )
        };
        for j in 0..nr {
            let pos = first_pos + j;
            if pos < blk * bt {
                continue;
            }
            let upto = valid.min(pos + 1 - blk * bt);
            #[cfg(target_arch = "x86_64")]
            if job.wide {
                let (i0, i1) = (j * group, (j + 1) * group);
                let st = avx512::RowState {
                    m: &mut m[i0..i1],
                    lsum: &mut lsum[i0..i1],
                    acc: &mut acc[i0 * hd..i1 * hd],
                };
                // SAFETY: `wide` means AVX-512F and a head dim the kernel takes; the row's
                // `group` queries and states are `group × hd` long; `kb`/`vb` hold
                // `valid >= upto` rows of `hd`.
                unsafe { avx512::fold_block(&qv[i0 * hd..i1 * hd], hd, kb, vb, upto, st) };
                continue;
            }
            for g in 0..group {
                let i = j * group + g;
                let qi = &qv[i * hd..(i + 1) * hd];
                let sc = &mut sc[..upto];
                scores(qi, kb, sc);
                let bmax = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let new_m = m[i].max(bmax);
                let corr = exp(m[i] - new_m);
                let ai = &mut acc[i * hd..(i + 1) * hd];
                if corr != 1.0 {
                    ai.iter_mut().for_each(|v| *v *= corr);
                }
                // The weights, then their sum in token order, then each output element's sum over
                // the tokens in token order: the same operations, in the same order per value, as
                // one token at a time, but the exps vectorise and the accumulators stay in
                // registers.
                sc.iter_mut().for_each(|v| *v = exp(*v - new_m));
                let mut add = 0.0f32;
                for p in sc.iter() {
                    add += p;
                }
                accumulate(sc, vb, ai);
                lsum[i] = lsum[i] * corr + add;
                m[i] = new_m;
            }
        }
    }
    for j in 0..nr {
        for g in 0..group {
            let i = j * group + g;
            let inv = 1.0 / lsum[i];
            let ai = &mut acc[i * hd..(i + 1) * hd];
            ai.iter_mut().for_each(|v| *v *= inv);
            // SAFETY: (row, head) is owned by this item alone; `out` is disjoint from
            // every input (checked).
            unsafe { store(out, ((q0 + j0 + j) * heads + h * group + g) * hd, ai) };
        }
    }
}
}

/// Block ids from an i32 operand, each checked against `num_blocks`.
fn block_ids<'a>(op: &'static str, ids: &Raw, num_blocks: usize) -> Result<&'a [i32]> {
    // SAFETY: checked i32 operand that this op does not write.
    let v = unsafe { ints(ids) };
    if let Some((i, id)) = v.iter().enumerate().find(|(_, &id)| id < 0 || id as usize >= num_blocks) {
        return Err(raw::shape(op, format!("block id [{i}] = {id} outside {num_blocks} blocks")));
    }
    Ok(v)
}

pub(crate) fn copy_blocks(be: &CpuBackend, c: &Raw, block_bytes: usize, num_blocks: usize, pairs: &Raw) -> Result<()> {
    let op = "copy_blocks";
    if !pairs.len.is_multiple_of(2) {
        return Err(raw::shape(op, format!("pairs has {} elements, not [n, 2]", pairs.len)));
    }
    let p = block_ids(op, pairs, num_blocks)?;
    // Copies run in parallel (as on a GPU): destinations must be distinct and never a source.
    let mut dsts: Vec<i32> = p.chunks_exact(2).filter(|x| x[0] != x[1]).map(|x| x[1]).collect();
    dsts.sort_unstable();
    if let Some(w) = dsts.windows(2).find(|w| w[0] == w[1]) {
        return Err(raw::shape(op, format!("block {} is the destination of two copies", w[0])));
    }
    if let Some(x) = p.chunks_exact(2).find(|x| x[0] != x[1] && dsts.binary_search(&x[0]).is_ok()) {
        return Err(raw::shape(op, format!("block {} is both a source and a destination", x[0])));
    }
    let n = pairs.len / 2;
    be.for_chunks(n, be.chunk_for(n, (1 << 20) / block_bytes.max(1) + 1), |i0, ni| {
        for x in p[2 * i0..2 * (i0 + ni)].chunks_exact(2) {
            if x[0] != x[1] {
                // SAFETY: both blocks lie in the checked cache; the destination is written by
                // this pair only and is nobody's source (checked above).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        c.ptr.add(x[0] as usize * block_bytes),
                        c.ptr.add(x[1] as usize * block_bytes),
                        block_bytes,
                    )
                };
            }
        }
    });
    Ok(())
}

/// Gather (`cache[ids[i]] → staging[i]`) or scatter (the inverse) of whole blocks.
#[allow(clippy::too_many_arguments)]
pub(crate) fn move_blocks(
    be: &CpuBackend,
    op: &'static str,
    c: &Raw,
    block_bytes: usize,
    num_blocks: usize,
    ids: &Raw,
    staging: &Raw,
    gather: bool,
) -> Result<()> {
    let v = block_ids(op, ids, num_blocks)?;
    let need = v.len() * block_bytes;
    if staging.bytes() < need {
        return Err(raw::shape(op, format!("staging has {} bytes, {} blocks need {need}", staging.bytes(), v.len())));
    }
    if !gather {
        let mut sorted = v.to_vec();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(raw::shape(op, format!("block {} listed twice", w[0])));
        }
    }
    be.for_chunks(v.len(), be.chunk_for(v.len(), (1 << 20) / block_bytes.max(1) + 1), |i0, ni| {
        for (i, &id) in v.iter().enumerate().skip(i0).take(ni) {
            // SAFETY: block `id` is in the cache, slot `i` in staging (both checked); cache and
            // staging are disjoint; scatter destinations are distinct (checked), gather ones are
            // distinct staging slots.
            unsafe {
                let blk = c.ptr.add(id as usize * block_bytes);
                let st = staging.ptr.add(i * block_bytes);
                if gather {
                    std::ptr::copy_nonoverlapping(blk, st, block_bytes)
                } else {
                    std::ptr::copy_nonoverlapping(st, blk, block_bytes)
                }
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;

    fn raw<T>(v: &mut [T], dtype: DType) -> Raw {
        Raw { ptr: v.as_mut_ptr() as *mut u8, dtype, len: v.len() }
    }

    /// A query row's attention is the same bits whether it is attended as one row of a prefill
    /// tile (rows of several sequences, tiles of 16) or alone as a decode step over the context
    /// up to its position: preemption by recomputation rebuilds a session's hidden states with
    /// batched prefills and must get what its decode steps made. Contexts cover partial blocks
    /// and the tile boundary; head dims with and without a tail of 16.
    #[test]
    fn rows_attend_alike_in_prefill_tiles_and_decode() {
        let be = CpuBackend::with_threads(2).unwrap();
        for (heads, kvh, hd) in [(9usize, 3usize, 64usize), (4, 2, 40), (2, 1, 7)] {
            let bt = 16;
            let l = KvLayout { layers: 2, kv_heads: kvh, head_dim: hd, block_tokens: bt, dtype: DType::F32 };
            let ctxs = [37usize, 5, 20];
            let per_seq = 3;
            let blocks = ctxs.len() * per_seq;
            let mut z = 1u32;
            let mut rnd = || {
                z = z.wrapping_mul(1664525).wrapping_add(1013904223);
                (z >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            };
            let mut cache: Vec<f32> = (0..blocks * l.block_bytes() / 4).map(|_| rnd()).collect();
            // Every sequence's whole context is its prompt here (rows = positions).
            let rows: usize = ctxs.iter().sum();
            let mut q: Vec<f32> = (0..rows * heads * hd).map(|_| rnd() * 3.0).collect();
            let mut out = vec![0f32; q.len()];
            let mut qs = vec![0i32];
            for c in ctxs {
                qs.push(qs.last().unwrap() + c as i32);
            }
            let mut ctx_l: Vec<i32> = ctxs.iter().map(|&c| c as i32).collect();
            // Blocks of each sequence in a scattered order.
            let mut tables: Vec<i32> = (0..blocks as i32).map(|i| (i * 5) % blocks as i32).collect();
            let b = BatchIdx {
                seqs: ctxs.len(),
                q_start: raw(&mut qs, DType::I32),
                ctx: raw(&mut ctx_l, DType::I32),
                tables: raw(&mut tables, DType::I32),
                max_blocks: per_seq,
            };
            let (rc, row) = (raw(&mut cache, DType::F32), heads * hd);
            attention(&be, &raw(&mut q, DType::F32), &rc, &l, blocks, 1, &b, &raw(&mut out, DType::F32), heads, 0.3)
                .unwrap();
            for (s, &c) in ctxs.iter().enumerate() {
                for pos in 0..c {
                    let at = (qs[s] as usize + pos) * row;
                    let mut q1 = q[at..at + row].to_vec();
                    let mut o1 = vec![0f32; row];
                    let (mut qs1, mut ctx1) = (vec![0i32, 1], vec![pos as i32 + 1]);
                    let mut t1 = tables[s * per_seq..(s + 1) * per_seq].to_vec();
                    let b1 = BatchIdx {
                        seqs: 1,
                        q_start: raw(&mut qs1, DType::I32),
                        ctx: raw(&mut ctx1, DType::I32),
                        tables: raw(&mut t1, DType::I32),
                        max_blocks: per_seq,
                    };
                    let (rq1, ro1) = (raw(&mut q1, DType::F32), raw(&mut o1, DType::F32));
                    attention(&be, &rq1, &rc, &l, blocks, 1, &b1, &ro1, heads, 0.3).unwrap();
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&out[at..at + row]), bits(&o1), "hd={hd} sequence {s} position {pos}");
                }
            }
        }
    }

    /// Timing, not a check: decode attention of a 16-sequence SmolLM2-135M step (9 query heads
    /// over 3 KV heads of 64, contexts of 64 tokens in 16-token blocks, f32 cache), one thread,
    /// best of many rounds. Run with `cargo test --release -p djinn-backend --lib
    /// attention_decode_timing -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing; run by hand in release"]
    fn attention_decode_timing() {
        let be = CpuBackend::with_threads(1).unwrap();
        let (heads, kvh, hd, bt, seqs, ctx) = (9usize, 3usize, 64usize, 16usize, 16usize, 64usize);
        let l = KvLayout { layers: 1, kv_heads: kvh, head_dim: hd, block_tokens: bt, dtype: DType::F32 };
        let per_seq = ctx / bt;
        let blocks = seqs * per_seq;
        let mut cache: Vec<f32> =
            (0..blocks * l.block_bytes() / 4).map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5).collect();
        let mut q: Vec<f32> = (0..seqs * heads * hd).map(|i| ((i * 104729) % 997) as f32 * 1e-3 - 0.5).collect();
        let mut out = vec![0f32; q.len()];
        let mut qs: Vec<i32> = (0..=seqs as i32).collect();
        let mut ctxs = vec![ctx as i32; seqs];
        let mut tables: Vec<i32> = (0..blocks as i32).collect();
        let b = BatchIdx {
            seqs,
            q_start: raw(&mut qs, DType::I32),
            ctx: raw(&mut ctxs, DType::I32),
            tables: raw(&mut tables, DType::I32),
            max_blocks: per_seq,
        };
        let (rq, rc, ro) = (raw(&mut q, DType::F32), raw(&mut cache, DType::F32), raw(&mut out, DType::F32));
        let mut best = f64::MAX;
        for _ in 0..200 {
            let t0 = std::time::Instant::now();
            for _ in 0..10 {
                attention(&be, &rq, &rc, &l, blocks, 0, &b, &ro, heads, 0.125).unwrap();
            }
            best = best.min(t0.elapsed().as_secs_f64() / 10.0);
        }
        // The outputs' bits, hashed: kernels that claim the same arithmetic print the same.
        let hash =
            out.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, v| (h ^ v.to_bits() as u64).wrapping_mul(0x100_0000_01b3));
        println!(
            "decode attention, 16 sequences x 64 tokens, one layer, one thread: {:.1} us (bits {hash:016x})",
            best * 1e6
        );
    }
}
