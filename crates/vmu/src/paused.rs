//! Paused state: memory a paused forward pass holds (a breakpoint's hidden state), charged
//! against the KV capacity so that KV and paused state together never exceed it.
//!
//! The charge is byte-accounted in a pool the paused states share, per side: the device pool
//! is whole KV blocks taken off the free list (`kv_used_bytes` counts them, admission and
//! `batch_fits` see fewer free blocks), the host pool whole swap slots; each state is charged
//! its bytes into one of them, so many small states (a 36 KB SmolLM2 state beside a 737 KB
//! block) share a block instead of taking one each. A session holds at most one paused state
//! ([`Vmu::hold_paused`] replaces it). It is charged on the device when the blocks the device
//! pool must grow by leave the caller's `keep_free` blocks free (what the step producing the
//! state will append), else in the host pool, else refused ([`VmuError::PausedNoRoom`]:
//! nothing changed, the caller waits). It moves with the session: swapping the session out
//! moves a device charge to the host pool (when the pool has room for it too), closing the
//! session releases it.
//!
//! Invariants (part of [`Vmu::check_invariants`]): each pool holds exactly the blocks its bytes
//! need (`ceil(bytes / block_bytes)`: it shrinks as soon as a charge leaves), and its bytes are
//! the sum of its sessions' charges; a pool's device block has refcount 1 and is named by no
//! block table; a pool's host slot is neither free nor named by a swapped table.

use djinn_backend::Backend;

use crate::error::VmuError;
use crate::vmu::{Residency, SessionId, Vmu};

/// One session's paused-state charge: its bytes, in the device pool or the host pool.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PausedHold {
    pub(crate) bytes: usize,
    pub(crate) on_host: bool,
}

impl PausedHold {
    /// The charge's bytes on (the device, the host).
    fn sides(self) -> (usize, usize) {
        if self.on_host {
            (0, self.bytes)
        } else {
            (self.bytes, 0)
        }
    }
}

/// The blocks the paused states share: device KV blocks and host swap slots, and the bytes
/// charged into each.
#[derive(Debug, Default)]
pub(crate) struct PausedPool {
    pub(crate) device: Vec<u32>,
    pub(crate) device_bytes: usize,
    pub(crate) host: Vec<u32>,
    pub(crate) host_bytes: usize,
}

impl<B: Backend> Vmu<B> {
    /// Charges `bytes` of paused state to session `id`, replacing what it held: in the device
    /// pool when the blocks it must grow by leave `keep_free` blocks free, else in the host
    /// pool. Returns where it is charged. `PausedNoRoom` when neither has room: nothing changed.
    pub fn hold_paused(&mut self, id: SessionId, bytes: usize, keep_free: usize) -> Result<Residency, VmuError> {
        let idx = self.lookup_open(id)?;
        let bb = self.plan().block_bytes;
        let old = self.paused[idx];
        let (old_dev, old_host) = old.sides();
        let pool = &self.paused_pool;
        // What the session holds now counts as free for its replacement.
        let dev_grow = (pool.device_bytes - old_dev + bytes).div_ceil(bb).saturating_sub(pool.device.len());
        let host_grow = (pool.host_bytes - old_host + bytes).div_ceil(bb).saturating_sub(pool.host.len());
        let (dev_free, host_free) = (self.free_block_count(), self.host_free_count());
        let fits_dev = dev_grow == 0 || dev_grow + keep_free <= dev_free;
        let fits_host = host_grow <= host_free;
        if !fits_dev && !fits_host {
            self.metrics().paused_refused_total.inc();
            return Err(VmuError::PausedNoRoom {
                session: id,
                needed_bytes: bytes,
                free_device_blocks: dev_free,
                free_host_blocks: host_free,
                held_bytes: old.bytes,
            });
        }
        self.uncharge(idx);
        self.paused[idx] = PausedHold { bytes, on_host: !fits_dev };
        if fits_dev {
            self.paused_pool.device_bytes += bytes;
        } else {
            self.paused_pool.host_bytes += bytes;
        }
        self.fit_pools();
        self.publish_paused();
        Ok(if fits_dev { Residency::Resident } else { Residency::Swapped })
    }

    /// Releases session `id`'s paused state (nothing when it holds none).
    pub fn release_paused(&mut self, id: SessionId) -> Result<(), VmuError> {
        let idx = self.lookup_open(id)?;
        self.release_paused_idx(idx);
        Ok(())
    }

    /// Blocks the paused states' pools hold: (on the device, in the host swap pool).
    pub fn paused_blocks(&self) -> (usize, usize) {
        (self.paused_pool.device.len(), self.paused_pool.host.len())
    }

    /// Bytes charged to the paused states' pools: (on the device, in the host swap pool).
    pub fn paused_bytes(&self) -> (usize, usize) {
        (self.paused_pool.device_bytes, self.paused_pool.host_bytes)
    }

    /// Where session `id`'s paused state is charged (`None`: it holds none).
    pub fn paused_residency(&self, id: SessionId) -> Result<Option<Residency>, VmuError> {
        let p = self.paused[self.lookup_open(id)?];
        Ok(match (p.bytes, p.on_host) {
            (0, _) => None,
            (_, false) => Some(Residency::Resident),
            (_, true) => Some(Residency::Swapped),
        })
    }

    pub(crate) fn release_paused_idx(&mut self, idx: usize) {
        if self.paused[idx].bytes == 0 {
            return;
        }
        self.uncharge(idx);
        self.fit_pools();
        self.publish_paused();
    }

    /// Swap-out hook: a session swapped out takes its device-charged paused state to the host
    /// pool when the pool has room for it.
    pub(crate) fn swap_paused_out(&mut self, idx: usize) {
        let p = self.paused[idx];
        if p.bytes == 0 || p.on_host {
            return;
        }
        let bb = self.plan().block_bytes;
        let pool = &self.paused_pool;
        let host_grow = (pool.host_bytes + p.bytes).div_ceil(bb).saturating_sub(pool.host.len());
        if host_grow > self.host_free_count() {
            return;
        }
        self.paused_pool.device_bytes -= p.bytes;
        self.paused_pool.host_bytes += p.bytes;
        self.paused[idx].on_host = true;
        self.fit_pools();
        self.publish_paused();
    }

    /// Takes session slot `idx`'s charge out of its pool's bytes (the pools are refitted by the
    /// caller).
    fn uncharge(&mut self, idx: usize) {
        let (dev, host) = std::mem::take(&mut self.paused[idx]).sides();
        self.paused_pool.device_bytes -= dev;
        self.paused_pool.host_bytes -= host;
    }

    /// Grows or shrinks each pool to the blocks its bytes need (growth was checked by the
    /// caller).
    fn fit_pools(&mut self) {
        let bb = self.plan().block_bytes;
        let (dev, host) = (self.paused_pool.device_bytes.div_ceil(bb), self.paused_pool.host_bytes.div_ceil(bb));
        while self.paused_pool.device.len() < dev {
            let b = self.take_free_block();
            self.paused_pool.device.push(b);
        }
        while self.paused_pool.device.len() > dev {
            let b = self.paused_pool.device.pop().expect("longer than dev");
            self.give_back_block(b);
        }
        while self.paused_pool.host.len() < host {
            let h = self.take_host_slot();
            self.paused_pool.host.push(h);
        }
        while self.paused_pool.host.len() > host {
            let h = self.paused_pool.host.pop().expect("longer than host");
            self.give_back_host_slot(h);
        }
    }

    /// The pools' share of [`Vmu::check_invariants`]: their blocks fit their bytes, which are
    /// their sessions' charges. Counts their device blocks in `refs` and host slots in `owner`.
    pub(crate) fn check_paused(&self, refs: &mut [u32], owner: &mut [bool]) {
        let bb = self.plan().block_bytes;
        let (dev, host) = self.paused.iter().fold((0, 0), |(d, h), p| {
            let (pd, ph) = p.sides();
            (d + pd, h + ph)
        });
        let pool = &self.paused_pool;
        assert_eq!((dev, host), (pool.device_bytes, pool.host_bytes), "paused charges vs the pools' bytes");
        assert_eq!(pool.device.len(), dev.div_ceil(bb), "device pool blocks vs its bytes");
        assert_eq!(pool.host.len(), host.div_ceil(bb), "host pool slots vs its bytes");
        for &b in &pool.device {
            refs[b as usize] += 1;
        }
        for &h in &pool.host {
            assert!(!std::mem::replace(&mut owner[h as usize], true), "paused host slot {h} owned twice");
        }
    }
}
