//! Which attention kernels one `attention` call launches, decided on the host from shapes alone
//! (pure functions, unit-tested without a GPU), and the counters that make the choice observable.
//!
//! Kernels (kernels/attention.cu): `paged_decode` serves the sequences with exactly one query row
//! (GQA groups share each KV load, 16-byte loads, split-K over long contexts, `decode_reduce`
//! combining the partitions); `prefill` serves the sequences with at least `min_rows` rows. A
//! step that mixes decode rows with multi-row sequences (chunked prefill makes nearly every step
//! such a step) runs both: decode rows never fall back to the prefill kernel while the shape is
//! one the decode kernel covers. The host knows only the row and sequence counts and the
//! longest query, not each sequence's length, so both kernels skip the sequences that are not
//! theirs on the device (one early-exiting thread block each).

use std::sync::atomic::{AtomicU64, Ordering};

/// Decode partitions are at most this long unless the workspace forces fewer, longer ones.
pub(crate) const DECODE_PART_TOKENS_MAX: usize = 4096;
/// Block-table entries of one partition staged in shared memory (16 KiB of ints).
pub(crate) const DECODE_TABLE_SLICE_MAX: usize = 4096;
/// Decode partitions are at least this long, so the reduction pass stays cheap.
pub(crate) const DECODE_PART_TOKENS_MIN: usize = 128;
/// Partition counts tried by the decode planner.
pub(crate) const DECODE_PARTS_SEARCH_MAX: usize = 64;
/// Grid y (and z) limit of a launch.
pub(crate) const GRID_Y_MAX: usize = 65535;
/// Largest query-head group the decode kernel serves from one KV load (its register arrays).
pub(crate) const DECODE_GROUP_MAX: usize = 8;

/// The shapes of one attention call, as the host knows them.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    /// Bytes per element of the KV cache.
    pub kv_elem_bytes: usize,
    pub head_dim: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub block_tokens: usize,
    pub block_bytes: usize,
    /// Device address of the cache (the decode kernel's 16-byte loads need it aligned).
    pub cache_addr: u64,
    pub seqs: usize,
    /// Query rows over all sequences.
    pub rows: usize,
    pub max_q_len: usize,
    pub max_ctx_len: usize,
}

/// How the decode kernel splits the context (split-K).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodePlan {
    pub parts: usize,
    pub part_tokens: usize,
}

/// Which sequences the general (prefill) kernel covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefillRows {
    /// Every sequence (`min_rows` 1).
    All,
    /// Only sequences with several query rows (`min_rows` 2): the decode kernel took the rest.
    MultiRow,
}

impl PrefillRows {
    pub(crate) fn min_rows(self) -> i32 {
        match self {
            PrefillRows::All => 1,
            PrefillRows::MultiRow => 2,
        }
    }
}

/// The kernels one attention call launches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnDispatch {
    /// The decode kernel over the single-row sequences, with its split.
    pub decode: Option<DecodePlan>,
    /// The general kernel, and which sequences it covers.
    pub prefill: Option<PrefillRows>,
}

/// Whether the decode kernel supports this shape at all (group size, vector width, alignment).
pub fn decode_shape_ok(s: &AttnShape) -> bool {
    if s.kv_heads == 0 || s.kv_elem_bytes == 0 || s.kv_elem_bytes > 16 {
        return false;
    }
    let g = s.heads / s.kv_heads;
    let vec = 16 / s.kv_elem_bytes;
    g <= DECODE_GROUP_MAX
        && s.head_dim.is_multiple_of(vec)
        && s.head_dim / vec <= 32
        && s.cache_addr.is_multiple_of(16)
        && s.block_bytes.is_multiple_of(16)
}

/// Whether the step may hold single-row sequences next to multi-row ones. From counts alone:
/// `rows == seqs × max_q_len` means every sequence has `max_q_len` rows.
fn may_mix(s: &AttnShape) -> bool {
    s.max_q_len > 1 && s.seqs > 1 && s.rows != s.seqs * s.max_q_len
}

/// The kernels for `s`. `plan` computes the decode split (it needs the kernel's occupancy, so
/// it is called only when the decode kernel runs); `None` from it means no split fits the
/// workspace and the general kernel covers every sequence.
pub fn dispatch<E>(s: &AttnShape, plan: impl FnOnce() -> Result<Option<DecodePlan>, E>) -> Result<AttnDispatch, E> {
    let all_single = s.max_q_len == 1 && s.rows == s.seqs;
    if !decode_shape_ok(s) || !(all_single || may_mix(s)) {
        return Ok(AttnDispatch { decode: None, prefill: Some(PrefillRows::All) });
    }
    match plan()? {
        None => Ok(AttnDispatch { decode: None, prefill: Some(PrefillRows::All) }),
        Some(p) => {
            Ok(AttnDispatch { decode: Some(p), prefill: if all_single { None } else { Some(PrefillRows::MultiRow) } })
        }
    }
}

/// Split-K plan for paged decode: the partition count that fills the GPU's resident thread
/// blocks (`sm_count × per_sm`, from the kernel's occupancy) in the fullest whole waves, each
/// partition a whole number of cache blocks and at least DECODE_PART_TOKENS_MIN long, the
/// partials (`seqs × heads × parts × (head_dim + 2)` f32) fitting `workspace_bytes`. Whole
/// waves, because equal-sized blocks in 1.1 waves cost two. `None` when no plan fits.
#[allow(clippy::too_many_arguments)]
pub fn decode_plan(
    per_sm: usize,
    sm_count: usize,
    seqs: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_tokens: usize,
    max_ctx: usize,
    workspace_bytes: usize,
) -> Option<DecodePlan> {
    if block_tokens == 0 || max_ctx == 0 {
        return None;
    }
    let base_blocks = (seqs * kv_heads).max(1);
    let resident = (sm_count * per_sm.max(1)).max(1);
    // Pick the partition count whose last wave is fullest (ties: fewer partitions), e.g. 64
    // base blocks on 132 SMs × 3 -> 6 partitions.
    let p_max = max_ctx.div_ceil(DECODE_PART_TOKENS_MIN).clamp(1, DECODE_PARTS_SEARCH_MAX);
    let fill = |p: usize| {
        let blocks = base_blocks * p;
        blocks as f64 / (blocks.div_ceil(resident) * resident) as f64
    };
    let mut parts = 1;
    for p in 2..=p_max {
        if fill(p) > fill(parts) + 1e-9 {
            parts = p;
        }
    }
    parts = parts.max(max_ctx.div_ceil(DECODE_PART_TOKENS_MAX));
    let per_part_bytes = seqs * heads * (head_dim + 2) * 4;
    let fit = workspace_bytes / per_part_bytes.max(1);
    if parts > 1 && parts > fit {
        parts = fit;
    }
    if parts == 0 || parts > GRID_Y_MAX {
        return None;
    }
    let part_tokens = max_ctx.div_ceil(parts).next_multiple_of(block_tokens);
    if part_tokens / block_tokens > DECODE_TABLE_SLICE_MAX {
        return None;
    }
    Some(DecodePlan { parts: max_ctx.div_ceil(part_tokens), part_tokens })
}

/// Launch counts per attention kernel since the backend opened (see
/// [`crate::cuda::CudaBackend::attention_kernels`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttnKernelCounts {
    /// `paged_decode` launches.
    pub decode: u64,
    /// Of those, split into several partitions (followed by `decode_reduce`).
    pub decode_split: u64,
    /// `prefill` launches covering every sequence.
    pub prefill_all: u64,
    /// `prefill` launches covering only the multi-row sequences of a mixed step.
    pub prefill_multi_row: u64,
}

thread_local! {
    /// The calling thread's last attention dispatch (what [`last`] reports).
    static LAST: std::cell::Cell<Option<AttnDispatch>> = const { std::cell::Cell::new(None) };
}

/// The kernels of this thread's most recent attention call on a CUDA backend.
pub(crate) fn last() -> Option<AttnDispatch> {
    LAST.with(|c| c.get())
}

#[derive(Default)]
pub(crate) struct AttnCounters {
    decode: AtomicU64,
    decode_split: AtomicU64,
    prefill_all: AtomicU64,
    prefill_multi_row: AtomicU64,
}

impl AttnCounters {
    pub(crate) fn record(&self, d: &AttnDispatch) {
        LAST.with(|c| c.set(Some(*d)));
        if let Some(p) = d.decode {
            self.decode.fetch_add(1, Ordering::Relaxed);
            if p.parts > 1 {
                self.decode_split.fetch_add(1, Ordering::Relaxed);
            }
        }
        match d.prefill {
            Some(PrefillRows::All) => self.prefill_all.fetch_add(1, Ordering::Relaxed),
            Some(PrefillRows::MultiRow) => self.prefill_multi_row.fetch_add(1, Ordering::Relaxed),
            None => 0,
        };
    }

    pub(crate) fn snapshot(&self) -> AttnKernelCounts {
        AttnKernelCounts {
            decode: self.decode.load(Ordering::Relaxed),
            decode_split: self.decode_split.load(Ordering::Relaxed),
            prefill_all: self.prefill_all.load(Ordering::Relaxed),
            prefill_multi_row: self.prefill_multi_row.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WS: usize = 32 << 20;

    fn shape(seqs: usize, rows: usize, max_q: usize, max_ctx: usize) -> AttnShape {
        AttnShape {
            kv_elem_bytes: 2,
            head_dim: 128,
            heads: 32,
            kv_heads: 8,
            block_tokens: 16,
            block_bytes: 16 * 128 * 2 * 2 * 8 * 32,
            cache_addr: 1 << 20,
            seqs,
            rows,
            max_q_len: max_q,
            max_ctx_len: max_ctx,
        }
    }

    fn run(s: &AttnShape) -> AttnDispatch {
        let r: Result<_, ()> =
            dispatch(s, || Ok(decode_plan(3, 132, s.seqs, s.heads, s.kv_heads, s.head_dim, 16, s.max_ctx_len, WS)));
        r.unwrap()
    }

    #[test]
    fn pure_decode_uses_only_the_decode_kernel() {
        let d = run(&shape(64, 64, 1, 4096));
        assert!(d.decode.is_some());
        assert_eq!(d.prefill, None);
    }

    #[test]
    fn mixed_step_splits_decode_rows_from_prefill_rows() {
        // 63 decode rows and one 512-row chunk: 575 rows over 64 sequences.
        let d = run(&shape(64, 63 + 512, 512, 8192));
        assert!(d.decode.is_some(), "decode rows of a mixed step must use the decode kernel");
        assert_eq!(d.prefill, Some(PrefillRows::MultiRow));
        // A chunk and one decode row.
        let d = run(&shape(2, 17, 16, 100));
        assert!(d.decode.is_some());
        assert_eq!(d.prefill, Some(PrefillRows::MultiRow));
    }

    #[test]
    fn uniform_multi_row_steps_are_prefill_only() {
        // One sequence, or every sequence with max_q_len rows: no decode row can exist.
        assert_eq!(run(&shape(1, 300, 300, 300)), AttnDispatch { decode: None, prefill: Some(PrefillRows::All) });
        assert_eq!(run(&shape(4, 64, 16, 64)), AttnDispatch { decode: None, prefill: Some(PrefillRows::All) });
    }

    #[test]
    fn unsupported_decode_shapes_fall_back_to_prefill_for_everything() {
        // GQA group 16 exceeds the decode kernel's registers.
        let mut s = shape(8, 8, 1, 1024);
        s.heads = 128;
        assert_eq!(run(&s).prefill, Some(PrefillRows::All));
        assert_eq!(run(&s).decode, None);
        // head_dim not a multiple of the 8-element vector.
        let mut s = shape(8, 8, 1, 1024);
        s.head_dim = 68;
        assert_eq!(run(&s).decode, None);
        // Misaligned cache.
        let mut s = shape(8, 8, 1, 1024);
        s.cache_addr = 1 << 20 | 8;
        assert_eq!(run(&s).decode, None);
    }

    #[test]
    fn every_gqa_group_and_head_dim_of_the_coverage_list_decodes() {
        for g in 1..=8 {
            for hd in [64, 80, 96, 128, 256] {
                for elem in [2, 4] {
                    let mut s = shape(3, 3, 1, 5000);
                    (s.heads, s.kv_heads, s.head_dim, s.kv_elem_bytes) = (4 * g, 4, hd, elem);
                    s.block_bytes = 16 * hd * elem * 2 * 4;
                    // f32 with head_dim 256: 64 lanes of 4 floats, more than a warp.
                    let want = !(elem == 4 && hd == 256);
                    assert_eq!(run(&s).decode.is_some(), want, "group {g} head_dim {hd} elem {elem}");
                }
            }
        }
    }

    #[test]
    fn long_contexts_force_partitions_and_the_workspace_limits_them() {
        // One sequence at 32k: at least 32k / 4096 partitions, each a whole number of blocks.
        let p = decode_plan(3, 132, 1, 32, 8, 128, 16, 32768, WS).unwrap();
        assert!(p.parts >= 8, "{p:?}");
        assert_eq!(p.part_tokens % 16, 0);
        assert!(p.parts * p.part_tokens >= 32768);
        // 256 sequences × 64 heads × 130 floats: 8.5 MB per partition, so 3 fit in 32 MiB and
        // the 4096-token cap gives way to longer partitions.
        let p = decode_plan(3, 132, 256, 64, 8, 128, 16, 32768, WS).unwrap();
        assert!(p.parts <= 3, "{p:?}");
        assert!(p.part_tokens > DECODE_PART_TOKENS_MAX, "{p:?}");
        // No room for even one partition's table slice: no plan (prefill covers it).
        assert_eq!(decode_plan(3, 132, 4096, 64, 8, 128, 16, 1 << 20, WS), None);
    }

    #[test]
    fn counters_follow_the_dispatch() {
        let c = AttnCounters::default();
        c.record(&run(&shape(64, 64, 1, 16384)));
        c.record(&run(&shape(64, 575, 512, 8192)));
        c.record(&run(&shape(1, 300, 300, 300)));
        let n = c.snapshot();
        assert_eq!((n.decode, n.prefill_all, n.prefill_multi_row), (2, 1, 1));
        assert_eq!(last(), Some(run(&shape(1, 300, 300, 300))));
        assert!(n.decode_split >= 1);
    }
}
