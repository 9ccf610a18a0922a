//! Host staging of a step's index arrays and their upload, writing only the block-table entries
//! that changed since the previous step.
//!
//! A decode step's block tables are `max_seqs × max_blocks_per_seq` i32 (about 2 MB at 65
//! sessions × 128k context) but change by at most one entry per sequence every `block_tokens`
//! steps while the batch keeps its order. The staging keeps a mirror of the table section as the
//! device holds it, keyed by where it was written (scratch region and offset): a step writes the
//! small head (ids, positions, slots, q_start, ctx_lens) whole and the tables as the runs that
//! differ from the mirror. Only the entries kernels read count (row `i < seqs`, entries below
//! that sequence's block count); stale entries elsewhere are never read.
//!
//! Invariant: `at == Some(key)` only while the device bytes at `key` equal `mirror`. Every
//! upload clears it first and sets it after its last write succeeded, so a failed write forces a
//! full upload next time. The scratch range is private to the step's owner (the engine that owns
//! the model and the VMU), so nothing else writes it between steps.

use std::ops::Range;

use djinn_backend::Backend;

use crate::error::Result;

/// Changed entries closer than this are written as one run (each run is one synchronous write).
const TABLE_RUN_GAP_MAX: usize = 64;
/// More runs than this become one write from the first change to the last.
const TABLE_RUNS_MAX: usize = 16;

#[derive(Debug)]
pub(crate) struct IndexStaging {
    /// This step's index arrays, `[head | tables]` (capacity fixed at construction).
    pub(crate) next: Vec<i32>,
    /// Block count of each sequence of this step (the table entries kernels read).
    pub(crate) row_blocks: Vec<usize>,
    /// The table section as the device holds it at `at` (scratch region address, byte offset).
    mirror: Vec<i32>,
    at: Option<(usize, usize)>,
    runs: Vec<Range<usize>>,
    /// Table bytes written by the last upload (for tests and metrics).
    pub(crate) last_table_bytes: usize,
}

impl IndexStaging {
    pub(crate) fn new(elems: usize, table_elems: usize, max_seqs: usize) -> IndexStaging {
        IndexStaging {
            next: Vec::with_capacity(elems),
            row_blocks: Vec::with_capacity(max_seqs),
            mirror: vec![0; table_elems],
            at: None,
            runs: Vec::with_capacity(TABLE_RUNS_MAX + 1),
            last_table_bytes: 0,
        }
    }

    /// Writes `next` to `region[offset..]`: the first `head` elements whole, the table section
    /// (rows of `row_stride` entries) as the runs that changed since the last upload there.
    pub(crate) fn upload<B: Backend>(
        &mut self,
        be: &B,
        region: &B::Region,
        offset: usize,
        head: usize,
        row_stride: usize,
    ) -> Result<()> {
        let key = (region as *const B::Region as usize, offset);
        let known = self.at.take() == Some(key);
        be.write(region, offset, i32_bytes(&self.next[..head]))?;
        let tables = &self.next[head..];
        if known {
            changed_runs(&self.mirror, tables, row_stride, &self.row_blocks, &mut self.runs);
        } else {
            self.runs.clear();
            self.runs.push(0..tables.len());
        }
        self.last_table_bytes = 0;
        for r in &self.runs {
            be.write(region, offset + (head + r.start) * 4, i32_bytes(&tables[r.clone()]))?;
            self.mirror[r.clone()].copy_from_slice(&tables[r.clone()]);
            self.last_table_bytes += r.len() * 4;
        }
        self.at = Some(key);
        Ok(())
    }
}

/// The runs of `next` that differ from `mirror` among the entries kernels read: row `i` (of
/// `stride` entries) up to `row_blocks[i]`. Changes closer than TABLE_RUN_GAP_MAX merge; past
/// TABLE_RUNS_MAX runs, one run covers them all.
pub(crate) fn changed_runs(
    mirror: &[i32],
    next: &[i32],
    stride: usize,
    row_blocks: &[usize],
    runs: &mut Vec<Range<usize>>,
) {
    runs.clear();
    // Once collapsed into one run, every later change extends it.
    let mut collapsed = false;
    for (i, &n) in row_blocks.iter().enumerate() {
        let row = i * stride;
        for j in row..row + n.min(stride) {
            if mirror[j] == next[j] {
                continue;
            }
            match runs.last_mut() {
                Some(last) if collapsed || j - last.end <= TABLE_RUN_GAP_MAX => last.end = j + 1,
                _ => runs.push(j..j + 1),
            }
            if runs.len() > TABLE_RUNS_MAX {
                let start = runs[0].start;
                runs.clear();
                runs.push(start..j + 1);
                collapsed = true;
            }
        }
    }
}

pub(crate) fn i32_bytes(xs: &[i32]) -> &[u8] {
    // SAFETY: i32 has no padding and any byte pattern is a valid u8; the length is exact.
    unsafe { std::slice::from_raw_parts(xs.as_ptr().cast(), std::mem::size_of_val(xs)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use djinn_backend::cpu::CpuBackend;
    use djinn_backend::RegionInfo;

    fn runs(mirror: &[i32], next: &[i32], stride: usize, rows: &[usize]) -> Vec<Range<usize>> {
        let mut r = Vec::new();
        changed_runs(mirror, next, stride, rows, &mut r);
        r
    }

    #[test]
    fn only_read_entries_that_changed_are_written() {
        let mirror = vec![1; 40];
        let mut next = mirror.clone();
        assert!(runs(&mirror, &next, 10, &[3, 10, 0, 5]).is_empty());
        // A new block at the end of row 1, and a change past row 0's block count (never read).
        next[10 + 9] = 7;
        next[5] = 9;
        assert_eq!(runs(&mirror, &next, 10, &[3, 10, 0, 5]), vec![19..20]);
        // Rows beyond this step's sequences are ignored.
        next[35] = 4;
        assert_eq!(runs(&mirror, &next, 10, &[3, 10]), vec![19..20]);
    }

    #[test]
    fn near_changes_merge_and_too_many_runs_collapse() {
        let stride = 1000;
        let mirror = vec![0; 40 * stride];
        let mut next = mirror.clone();
        next[10] = 1;
        next[10 + TABLE_RUN_GAP_MAX] = 1;
        next[500] = 1;
        assert_eq!(runs(&mirror, &next, stride, &[1000]), vec![10..11 + TABLE_RUN_GAP_MAX, 500..501]);
        // A reordered batch: every row changes; past TABLE_RUNS_MAX runs one write covers them.
        for i in 0..40 {
            next[i * stride] = 5;
        }
        let r = runs(&mirror, &next, stride, &[1000; 40]);
        assert_eq!(r, vec![0..39 * stride + 1]);
    }

    #[test]
    fn upload_writes_changes_only_and_keeps_the_device_equal_to_next() {
        let be = CpuBackend::with_threads(1).unwrap();
        let region = be.reserve(4096).unwrap();
        let (head, stride, rows) = (4, 8, 3);
        let mut st = IndexStaging::new(head + rows * stride, rows * stride, rows);
        let read = |be: &CpuBackend| {
            let mut b = vec![0u8; (head + rows * stride) * 4];
            be.read(&region, 256, &mut b).unwrap();
            b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect::<Vec<i32>>()
        };
        let step = |st: &mut IndexStaging, tables: &[i32], blocks: &[usize]| {
            st.next.clear();
            st.next.extend([9, 9, 9, 9]);
            st.next.extend_from_slice(tables);
            st.row_blocks.clear();
            st.row_blocks.extend_from_slice(blocks);
            st.upload(&be, &region, 256, head, stride).unwrap();
        };
        let mut t: Vec<i32> = (0..24).collect();
        step(&mut st, &t, &[8, 8, 8]);
        assert_eq!(st.last_table_bytes, 24 * 4, "first upload is whole");
        assert_eq!(read(&be)[head..], t[..]);
        step(&mut st, &t, &[8, 8, 8]);
        assert_eq!(st.last_table_bytes, 0, "nothing changed");
        t[17] = 100;
        step(&mut st, &t, &[8, 8, 8]);
        assert_eq!(st.last_table_bytes, 4);
        assert_eq!(read(&be)[head..], t[..]);
        // Elsewhere (another offset): whole again.
        st.upload(&be, &region, 1024, head, stride).unwrap();
        assert_eq!(st.last_table_bytes, 24 * 4);
        assert!(region.len_bytes() >= 1024 + 28 * 4);
    }
}
