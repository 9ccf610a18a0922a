//! Paused state: memory a paused forward pass holds (a breakpoint's hidden state), charged
//! against the KV capacity in whole blocks so that KV and paused state together never exceed it.
//!
//! A session holds at most one paused state ([`Vmu::hold_paused`] replaces it). It is charged
//! on the device (blocks taken off the free list: `kv_used_bytes` counts them, admission and
//! `batch_fits` see fewer free blocks) when that leaves the caller's `keep_free` blocks free
//! (what the step producing the state will append), else in the host swap pool (slots
//! taken off its free list), else refused ([`VmuError::PausedNoRoom`]: nothing changed, the
//! caller waits). It moves with the session: swapping the session out moves a device charge to
//! the host pool (when the pool has room for it too), closing the session releases it.
//!
//! Invariants (part of [`Vmu::check_invariants`]): a held device block has refcount 1 and is
//! named by no block table; a held host slot is neither free nor named by a swapped table.

use djinn_backend::Backend;

use crate::error::VmuError;
use crate::vmu::{Residency, SessionId, Vmu};

/// One session's paused-state charge: device blocks or host swap slots (never both).
#[derive(Clone, Debug, Default)]
pub(crate) struct PausedHold {
    pub(crate) device: Vec<u32>,
    pub(crate) host: Vec<u32>,
}

impl<B: Backend> Vmu<B> {
    /// Charges `bytes` of paused state to session `id` (rounded up to whole KV blocks),
    /// replacing what it held: on the device when `keep_free` blocks stay free after it, else in
    /// the host swap pool. Returns where it is charged. `PausedNoRoom` when neither has room:
    /// nothing changed.
    pub fn hold_paused(&mut self, id: SessionId, bytes: usize, keep_free: usize) -> Result<Residency, VmuError> {
        let idx = self.lookup_open(id)?;
        let n = bytes.div_ceil(self.plan().block_bytes);
        let held = self.paused[idx].device.len() + self.paused[idx].host.len();
        // What the session holds now counts as free for its replacement.
        let (dev_free, host_free) = (self.free_block_count(), self.host_free_count());
        let fits_dev = n + keep_free <= dev_free + self.paused[idx].device.len();
        let fits_host = n <= host_free + self.paused[idx].host.len();
        if !fits_dev && !fits_host {
            self.metrics().paused_refused_total.inc();
            return Err(VmuError::PausedNoRoom {
                session: id,
                needed_blocks: n,
                free_device_blocks: dev_free,
                free_host_blocks: host_free,
                held_blocks: held,
            });
        }
        self.release_paused_idx(idx);
        let r = if fits_dev {
            for _ in 0..n {
                let b = self.take_free_block();
                self.paused[idx].device.push(b);
            }
            Residency::Resident
        } else {
            for _ in 0..n {
                let h = self.take_host_slot();
                self.paused[idx].host.push(h);
            }
            Residency::Swapped
        };
        self.publish_paused();
        Ok(r)
    }

    /// Releases session `id`'s paused state (nothing when it holds none).
    pub fn release_paused(&mut self, id: SessionId) -> Result<(), VmuError> {
        let idx = self.lookup_open(id)?;
        self.release_paused_idx(idx);
        self.publish_paused();
        Ok(())
    }

    /// Blocks held by paused states: (on the device, in the host swap pool).
    pub fn paused_blocks(&self) -> (usize, usize) {
        self.paused.iter().fold((0, 0), |(d, h), p| (d + p.device.len(), h + p.host.len()))
    }

    /// Where session `id`'s paused state is charged (`None`: it holds none).
    pub fn paused_residency(&self, id: SessionId) -> Result<Option<Residency>, VmuError> {
        let p = &self.paused[self.lookup_open(id)?];
        Ok(match (p.device.is_empty(), p.host.is_empty()) {
            (false, _) => Some(Residency::Resident),
            (true, false) => Some(Residency::Swapped),
            (true, true) => None,
        })
    }

    pub(crate) fn release_paused_idx(&mut self, idx: usize) {
        let p = std::mem::take(&mut self.paused[idx]);
        for &b in p.device.iter().rev() {
            self.give_back_block(b);
        }
        for &h in p.host.iter().rev() {
            self.give_back_host_slot(h);
        }
        if !p.device.is_empty() || !p.host.is_empty() {
            self.publish_paused();
        }
    }

    /// Swap-out hook: a session swapped out takes its device-charged paused state to the host
    /// pool when the pool has room for it.
    pub(crate) fn swap_paused_out(&mut self, idx: usize) {
        let n = self.paused[idx].device.len();
        if n == 0 || n > self.host_free_count() {
            return;
        }
        let dev = std::mem::take(&mut self.paused[idx].device);
        for _ in 0..n {
            let h = self.take_host_slot();
            self.paused[idx].host.push(h);
        }
        for &b in dev.iter().rev() {
            self.give_back_block(b);
        }
        self.publish_paused();
    }
}
