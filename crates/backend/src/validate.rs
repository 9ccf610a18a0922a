//! Operand validation every backend calls first, so the rules of `backend.rs` are written once:
//! each operand lies inside its region and is aligned to its element size, and no output
//! overlaps an input except where the op works in place (then only exactly: same region,
//! offset, dtype and length). Shapes and dtypes an op supports stay with the op (they differ by
//! backend capability); what is *memory-safe to hand a kernel* is decided here.
//!
//! Regions are compared by identity (`&B::Region` address): every region is its own driver
//! allocation, so two distinct regions never share bytes.

use crate::backend::{AttnBatch, Backend, KvCacheRef, RegionInfo, View};
use crate::error::{BackendError, Result};

/// A checked operand: its region and byte range.
struct Span<'a, B: Backend + ?Sized> {
    region: &'a B::Region,
    start: usize,
    end: usize,
    view: Option<View<'a, B>>,
}

fn span<'a, B: Backend + ?Sized>(op: &'static str, operand: &'static str, v: &View<'a, B>) -> Result<Span<'a, B>> {
    let size = v.dtype.size_bytes();
    let region_bytes = v.region.len_bytes();
    let oob = |bytes| BackendError::OutOfBounds { op, operand, offset: v.offset, bytes, region_bytes };
    let bytes = v.len.checked_mul(size).ok_or(oob(usize::MAX))?;
    let end = v.offset.checked_add(bytes).filter(|&e| e <= region_bytes).ok_or(oob(bytes))?;
    if !v.offset.is_multiple_of(size) {
        return Err(BackendError::Shape {
            op,
            why: format!("operand {operand} offset {} is not aligned to its {} elements", v.offset, v.dtype),
        });
    }
    Ok(Span { region: v.region, start: v.offset, end, view: Some(*v) })
}

fn cache_span<'a, B: Backend + ?Sized>(op: &'static str, c: &KvCacheRef<'a, B>) -> Result<Span<'a, B>> {
    let l = &c.layout;
    if l.block_tokens == 0 || l.head_dim == 0 || l.kv_heads == 0 || l.layers == 0 {
        return Err(BackendError::Shape { op, why: format!("degenerate KV layout {l:?}") });
    }
    let region_bytes = c.region.len_bytes();
    let oob = |bytes| BackendError::OutOfBounds { op, operand: "cache", offset: c.offset, bytes, region_bytes };
    let bytes = l.block_bytes().checked_mul(c.num_blocks).ok_or(oob(usize::MAX))?;
    let end = c.offset.checked_add(bytes).filter(|&e| e <= region_bytes).ok_or(oob(bytes))?;
    if !c.offset.is_multiple_of(l.dtype.size_bytes()) {
        return Err(BackendError::Shape {
            op,
            why: format!("cache offset {} is not aligned to {}", c.offset, l.dtype),
        });
    }
    Ok(Span { region: c.region, start: c.offset, end, view: None })
}

fn overlaps<B: Backend + ?Sized>(a: &Span<'_, B>, b: &Span<'_, B>) -> bool {
    std::ptr::eq(a.region, b.region) && a.start < a.end && b.start < b.end && a.start < b.end && b.start < a.end
}

/// `out` must not share a byte with `input`.
fn disjoint<B: Backend + ?Sized>(
    op: &'static str,
    operand: &'static str,
    out: &Span<B>,
    input: &Span<B>,
) -> Result<()> {
    if overlaps(out, input) {
        return Err(BackendError::Overlap { op, operand });
    }
    Ok(())
}

/// `out` may be exactly `input` (in place) but must not partially overlap it.
fn in_place_or_disjoint<B: Backend + ?Sized>(
    op: &'static str,
    operand: &'static str,
    out: &Span<B>,
    input: &Span<B>,
) -> Result<()> {
    let exact = match (&out.view, &input.view) {
        (Some(a), Some(b)) => {
            std::ptr::eq(a.region, b.region) && a.offset == b.offset && a.dtype == b.dtype && a.len == b.len
        }
        _ => false,
    };
    if exact {
        Ok(())
    } else {
        disjoint(op, operand, out, input)
    }
}

pub fn gemm<B: Backend + ?Sized>(a: &View<B>, b: &View<B>, c: &View<B>) -> Result<()> {
    const OP: &str = "gemm";
    let (a, b, c) = (span(OP, "a", a)?, span(OP, "b", b)?, span(OP, "c", c)?);
    disjoint(OP, "a", &c, &a)?;
    disjoint(OP, "b", &c, &b)
}

/// `binary` and `silu_mul`: two inputs, elementwise, in place allowed.
pub fn binary<B: Backend + ?Sized>(
    op: &'static str,
    names: [&'static str; 2],
    a: &View<B>,
    b: &View<B>,
    out: &View<B>,
) -> Result<()> {
    let (a, b, o) = (span(op, names[0], a)?, span(op, names[1], b)?, span(op, "out", out)?);
    in_place_or_disjoint(op, names[0], &o, &a)?;
    in_place_or_disjoint(op, names[1], &o, &b)
}

/// `unary`, `softmax` and `cast`: one input, in place allowed.
pub fn unary<B: Backend + ?Sized>(op: &'static str, x: &View<B>, out: &View<B>) -> Result<()> {
    let (x, o) = (span(op, "x", x)?, span(op, "out", out)?);
    in_place_or_disjoint(op, "x", &o, &x)
}

pub fn embedding<B: Backend + ?Sized>(table: &View<B>, ids: &View<B>, out: &View<B>) -> Result<()> {
    const OP: &str = "embedding";
    let (t, i, o) = (span(OP, "table", table)?, span(OP, "ids", ids)?, span(OP, "out", out)?);
    disjoint(OP, "table", &o, &t)?;
    disjoint(OP, "ids", &o, &i)
}

pub fn rms_norm<B: Backend + ?Sized>(
    x: &View<B>,
    residual: Option<&View<B>>,
    weight: &View<B>,
    out: &View<B>,
) -> Result<()> {
    const OP: &str = "rms_norm";
    let (x, w, o) = (span(OP, "x", x)?, span(OP, "weight", weight)?, span(OP, "out", out)?);
    in_place_or_disjoint(OP, "x", &o, &x)?;
    disjoint(OP, "weight", &o, &w)?;
    if let Some(r) = residual {
        let r = span(OP, "residual", r)?;
        disjoint(OP, "residual", &r, &x)?;
        disjoint(OP, "residual", &r, &w)?;
        disjoint(OP, "residual", &r, &o)?;
    }
    Ok(())
}

pub fn rope<B: Backend + ?Sized>(x: &View<B>, positions: &View<B>, inv_freq: &View<B>) -> Result<()> {
    const OP: &str = "rope";
    let (x, p, f) = (span(OP, "x", x)?, span(OP, "positions", positions)?, span(OP, "inv_freq", inv_freq)?);
    disjoint(OP, "positions", &x, &p)?;
    disjoint(OP, "inv_freq", &x, &f)
}

pub fn kv_append<B: Backend + ?Sized>(k: &View<B>, v: &View<B>, cache: &KvCacheRef<B>, slots: &View<B>) -> Result<()> {
    const OP: &str = "kv_append";
    let c = cache_span(OP, cache)?;
    for (name, x) in [("k", k), ("v", v), ("slots", slots)] {
        disjoint(OP, name, &c, &span(OP, name, x)?)?;
    }
    Ok(())
}

pub fn attention<B: Backend + ?Sized>(
    q: &View<B>,
    cache: &KvCacheRef<B>,
    batch: &AttnBatch<B>,
    out: &View<B>,
) -> Result<()> {
    const OP: &str = "attention";
    let o = span(OP, "out", out)?;
    disjoint(OP, "cache", &o, &cache_span(OP, cache)?)?;
    for (name, x) in
        [("q", q), ("q_start", &batch.q_start), ("ctx_lens", &batch.ctx_lens), ("block_tables", &batch.block_tables)]
    {
        disjoint(OP, name, &o, &span(OP, name, x)?)?;
    }
    Ok(())
}

pub fn copy_blocks<B: Backend + ?Sized>(cache: &KvCacheRef<B>, pairs: &View<B>) -> Result<()> {
    const OP: &str = "copy_blocks";
    disjoint(OP, "pairs", &cache_span(OP, cache)?, &span(OP, "pairs", pairs)?)
}

/// `gather_blocks` (`gather`: the cache is read, staging written) and `scatter_blocks`.
pub fn move_blocks<B: Backend + ?Sized>(
    op: &'static str,
    gather: bool,
    cache: &KvCacheRef<B>,
    ids: &View<B>,
    staging: &View<B>,
) -> Result<()> {
    let (c, i, s) = (cache_span(op, cache)?, span(op, "ids", ids)?, span(op, "staging", staging)?);
    let (out, input) = if gather { (&s, &c) } else { (&c, &s) };
    disjoint(op, if gather { "cache" } else { "staging" }, out, input)?;
    disjoint(op, "ids", out, &i)
}

/// `argmax` and `sample`.
pub fn select<B: Backend + ?Sized>(op: &'static str, logits: &View<B>, out: &View<B>) -> Result<()> {
    let (l, o) = (span(op, "logits", logits)?, span(op, "out", out)?);
    disjoint(op, "logits", &o, &l)
}
