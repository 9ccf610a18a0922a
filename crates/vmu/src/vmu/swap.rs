//! The swap engine: moves one session's KV blocks between the device pool and the pinned host
//! pool on the VMU's private swap stream, straight block to slot where runs are long, else
//! gathered through staging; and the swap latency histograms (recorded when a swap's event is
//! seen done). Ordering rules are the VMU's (module docs of `vmu.rs`): every swap first waits for
//! the default stream, and nothing here waits for a swap to finish.

use std::time::Instant;

use djinn_backend::{Backend, DType, KvCacheRef, View};

use super::{Timing, Vmu, TIMINGS_MAX};
use crate::error::VmuError;

impl<B: Backend> Vmu<B> {
    /// Makes the swap stream wait for everything issued so far on the default stream.
    pub(super) fn swap_after_compute(&self) -> Result<(), VmuError> {
        let e = self.backend.record(self.backend.default_stream())?;
        self.backend.wait(&self.swap_stream, &e)?;
        Ok(())
    }

    /// Number of maximal runs where both the device blocks and the host slots are consecutive.
    pub(super) fn runs(dev: &[i32], host: &[u32]) -> usize {
        1 + (1..dev.len()).filter(|&i| dev[i] != dev[i - 1] + 1 || host[i] != host[i - 1] + 1).count()
    }

    pub(super) fn direct(&self, dev: &[i32], host: &[u32]) -> bool {
        let bytes = dev.len() * self.plan.block_bytes;
        bytes / Self::runs(dev, host) >= self.plan.direct_swap_min_run_bytes
    }

    /// Writes `dev` as i32 into the index area once the previous swap that read it is done.
    pub(super) fn write_index(&mut self, dev: &[i32]) -> Result<(), VmuError> {
        if let Some(e) = self.index_busy.take() {
            self.backend.sync_event(&e)?;
        }
        self.index_bytes.clear();
        self.index_bytes.extend(dev.iter().flat_map(|b| b.to_le_bytes()));
        self.backend.write(&self.region, self.plan.index_offset, &self.index_bytes)?;
        Ok(())
    }

    pub(super) fn swap_out_one(&mut self, idx: usize) -> Result<(), VmuError> {
        let start = Instant::now();
        let n = self.sessions[idx].blocks;
        let row = self.row(idx);
        let bb = self.plan.block_bytes;
        debug_assert!(n <= self.host_free.len());
        let mut host_ids = std::mem::take(&mut self.ids);
        host_ids.clear();
        host_ids.extend((0..n).map(|_| self.host_free.pop().expect("checked by caller")));
        let mut dev = std::mem::take(&mut self.dev_ids);
        dev.clear();
        dev.extend_from_slice(&self.tables[row..row + n]);
        let issued = self.issue_swap(true, &dev, &host_ids);
        let issued = issued.and_then(|()| {
            // Compute is not held up now (the copies overlap it); only an append that takes
            // blocks waits for this fence (see `fence_compute`).
            self.compute_fence = Some(self.backend.record(&self.swap_stream)?);
            Ok(self.backend.record(&self.swap_stream)?)
        });
        let done = match issued {
            Ok(d) => d,
            Err(e) => {
                // Nothing was handed over: give the slots back, the session stays resident.
                for &h in host_ids.iter().rev() {
                    self.host_free.push(h);
                }
                self.ids = host_ids;
                self.dev_ids = dev;
                return Err(e);
            }
        };
        for (i, &b) in dev.iter().enumerate().rev() {
            self.release_block(b as usize);
            self.tables[row + i] = host_ids[i] as i32;
        }
        self.ids = host_ids;
        self.dev_ids = dev;
        // A prefetch never awaited is superseded: the copies are ordered on the swap stream.
        self.ready[idx] = None;
        self.sessions[idx].swapped = true;
        self.sessions_swapped += 1;
        self.metrics.swap_out_total.inc();
        self.metrics.swap_out_bytes_total.inc_by((n * bb) as u64);
        self.track(true, start, done);
        self.swap_paused_out(idx);
        self.publish();
        tracing::debug!(session = %self.id_of(idx), blocks = n, "swapped out");
        Ok(())
    }

    pub(super) fn swap_in_one(&mut self, idx: usize) -> Result<(), VmuError> {
        let start = Instant::now();
        let n = self.sessions[idx].blocks;
        let row = self.row(idx);
        let bb = self.plan.block_bytes;
        debug_assert!(n <= self.free_blocks.len());
        let mut host_ids = std::mem::take(&mut self.ids);
        host_ids.clear();
        host_ids.extend(self.tables[row..row + n].iter().map(|&h| h as u32));
        let mut dev = std::mem::take(&mut self.dev_ids);
        dev.clear();
        for _ in 0..n {
            dev.push(self.take_block() as i32);
        }
        let issued = self.issue_swap(false, &dev, &host_ids).and_then(|()| {
            // The session's next use makes compute wait for this (`make_resident`).
            self.ready[idx] = Some(self.backend.record(&self.swap_stream)?);
            Ok(self.backend.record(&self.swap_stream)?)
        });
        let done = match issued {
            Ok(d) => d,
            Err(e) => {
                for &b in dev.iter().rev() {
                    self.release_block(b as usize);
                }
                self.ids = host_ids;
                self.dev_ids = dev;
                return Err(e);
            }
        };
        for (i, &b) in dev.iter().enumerate() {
            self.tables[row + i] = b;
        }
        // Slot reuse is ordered by the swap stream.
        for &h in host_ids.iter().rev() {
            self.host_free.push(h);
        }
        self.ids = host_ids;
        self.dev_ids = dev;
        self.sessions[idx].swapped = false;
        self.sessions_swapped -= 1;
        self.metrics.swap_in_total.inc();
        self.metrics.swap_in_bytes_total.inc_by((n * bb) as u64);
        self.track(false, start, done);
        self.publish();
        tracing::debug!(session = %self.id_of(idx), blocks = n, "swapped in");
        Ok(())
    }

    /// Issues the copies of one swap on the swap stream: straight between KV blocks and host
    /// slots run by run, or through staging with `gather_blocks`/`scatter_blocks` in chunks.
    pub(super) fn issue_swap(&mut self, out: bool, dev: &[i32], host: &[u32]) -> Result<(), VmuError> {
        if dev.is_empty() {
            return Ok(());
        }
        self.swap_after_compute()?;
        let bb = self.plan.block_bytes;
        let direct = self.direct(dev, host);
        if !direct {
            self.write_index(dev)?;
        }
        let be = &*self.backend;
        let region = &self.region;
        let host_buf = &mut *self.host;
        let s = &self.swap_stream;
        let kv = KvCacheRef::<B> {
            region,
            offset: self.plan.kv_offset,
            num_blocks: self.plan.kv_blocks,
            layout: self.layout,
        };
        // Split [lo, hi) into maximal runs; `contig(i)` says whether entry i continues entry i-1.
        let for_runs = |lo: usize,
                        hi: usize,
                        contig: &dyn Fn(usize) -> bool,
                        f: &mut dyn FnMut(usize, usize) -> Result<(), VmuError>| {
            let mut a = lo;
            for i in lo + 1..=hi {
                if i == hi || !contig(i) {
                    f(a, i - a)?;
                    a = i;
                }
            }
            Ok::<(), VmuError>(())
        };
        if direct {
            let contig = |i: usize| dev[i] == dev[i - 1] + 1 && host[i] == host[i - 1] + 1;
            for_runs(0, dev.len(), &contig, &mut |a, len| {
                let dev_off = self.plan.kv_offset + dev[a] as usize * bb;
                let host_off = host[a] as usize * bb;
                // SAFETY: `host_buf` is the VMU's boxed pool; it is neither read by the CPU nor
                // dropped before the swap stream is synchronised (Drop syncs it), and a host
                // slot is reused only by later work on this same stream, which runs in order.
                unsafe {
                    if out {
                        be.copy_d2h_async(s, region, dev_off, host_buf, host_off, len * bb)?;
                    } else {
                        be.copy_h2d_async(s, host_buf, host_off, region, dev_off, len * bb)?;
                    }
                }
                Ok(())
            })?;
        } else {
            let chunk = (self.plan.staging_bytes / bb).max(1);
            let contig = |i: usize| host[i] == host[i - 1] + 1;
            for c in (0..dev.len()).step_by(chunk) {
                let m = chunk.min(dev.len() - c);
                let ids = View::new(region, self.plan.index_offset + c * 4, DType::I32, m);
                let staging = View::new(region, self.plan.staging_offset, DType::U8, m * bb);
                if out {
                    be.gather_blocks(s, &kv, ids, staging)?;
                }
                for_runs(c, c + m, &contig, &mut |a, len| {
                    let st_off = self.plan.staging_offset + (a - c) * bb;
                    let host_off = host[a] as usize * bb;
                    // SAFETY: as for the direct copies above; staging is reused by the next
                    // chunk only through work on this same stream.
                    unsafe {
                        if out {
                            be.copy_d2h_async(s, region, st_off, host_buf, host_off, len * bb)?;
                        } else {
                            be.copy_h2d_async(s, host_buf, host_off, region, st_off, len * bb)?;
                        }
                    }
                    Ok(())
                })?;
                if !out {
                    be.scatter_blocks(s, staging, &kv, ids)?;
                }
            }
            self.index_busy = Some(be.record(s)?);
        }
        Ok(())
    }

    pub(super) fn track(&mut self, out: bool, start: Instant, done: B::Event) {
        if self.timings.len() == TIMINGS_MAX {
            if let Some(t) = self.timings.pop_front() {
                let _ = self.backend.sync_event(&t.done);
                self.metrics.swap_hist(t.out).observe(t.start.elapsed().as_secs_f64());
            }
        }
        self.timings.push_back(Timing { out, start, done });
        self.poll_timings();
    }

    /// Records the latency of every swap that has completed (an upper bound: completion is
    /// noticed at the next VMU call).
    pub(super) fn poll_timings(&mut self) {
        while let Some(t) = self.timings.front() {
            if !matches!(self.backend.event_done(&t.done), Ok(true)) {
                break;
            }
            let t = self.timings.pop_front().expect("front exists");
            self.metrics.swap_hist(t.out).observe(t.start.elapsed().as_secs_f64());
        }
    }
}
