//! The VMU proper: owns the one reserved region, the KV block pool with per-session block tables
//! (append, fork with copy-on-write, close), and the swap engine to the pinned host pool.
//!
//! Invariants (checked by [`Vmu::check_invariants`]):
//! - a KV block is either on the free list (refcount 0) or referenced by `refcount` table entries
//!   of resident sessions; a block with refcount > 1 is shared read-only after a fork, and an
//!   append into a shared partial block copies it first;
//! - a host swap slot is either free or named by exactly one swapped-out session's table;
//! - used KV bytes never exceed the KV region: blocks are only taken from the free list;
//! - a session is never dropped: every failure leaves all sessions' contents and tables intact.
//!
//! Ordering: the VMU issues its own work on the backend's default stream (CoW block copies) and
//! on a private swap stream. Every swap first makes the swap stream wait for the default stream
//! (blocks freed by a close may still be read by a forward pass in flight). Neither direction
//! holds up compute when issued: a swapped-in session's next `ensure_resident`/`append`/`fork`
//! makes the default stream wait for its copies (so [`Vmu::prefetch`] overlaps them with the
//! current step), and the next `append` after a swap-out waits for it (the blocks it freed may
//! be written next). Block tables read without `ensure_resident` may name blocks still being
//! filled. Host swap slots are touched only by the swap stream, so stream order alone protects
//! their reuse. Forward passes must therefore be issued on `backend.default_stream()` (or on a
//! stream that waits on it).

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use djinn_backend::{Backend, DType, KvCacheRef, KvLayout, View};
use prometheus::Registry;

use crate::config::{RegionPlan, VmuConfig};
use crate::error::VmuError;
use crate::metrics::VmuMetrics;
use crate::paused::{PausedHold, PausedPool};
use crate::scratch::ScratchArena;
use crate::victims;
use crate::weights::{self, PersistentLease, Shared, WeightsLease};

mod swap;

/// A session handle: slot index plus generation, so a stale id never names a reused slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SessionId {
    index: u32,
    generation: u32,
}

impl SessionId {
    /// A dense index in `0..max_sessions` (e.g. for per-session arrays kept by the caller).
    pub fn index(self) -> usize {
        self.index as usize
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "s{}.{}", self.index, self.generation)
    }
}

/// Where a session's KV blocks are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Residency {
    /// In device KV blocks; its block table is usable.
    Resident,
    /// In the pinned host pool; `ensure_resident` brings it back.
    Swapped,
}

#[derive(Clone, Copy, Debug, Default)]
struct SessionMeta {
    generation: u32,
    open: bool,
    swapped: bool,
    tokens: usize,
    /// Table entries in use: device block ids when resident, host slot ids when swapped.
    blocks: usize,
    last_used: u64,
    pinned_epoch: u64,
    /// Swap-out order: lower goes first (a QoS class: batch before interactive before
    /// realtime); then least recently used. 0 for every session unless the caller sets it.
    evict_rank: u8,
}

/// Read access to every session's block table, borrowable next to `&mut ScratchArena`.
#[derive(Clone, Copy)]
pub struct BlockTables<'a> {
    sessions: &'a [SessionMeta],
    tables: &'a [i32],
    width: usize,
}

impl<'a> BlockTables<'a> {
    fn meta(&self, id: SessionId) -> Result<&'a SessionMeta, VmuError> {
        match self.sessions.get(id.index as usize) {
            Some(m) if m.open && m.generation == id.generation => Ok(m),
            _ => Err(VmuError::UnknownSession(id)),
        }
    }

    /// The session's device block ids in position order (token `p` lives in block
    /// `table[p / block_tokens]` at offset `p % block_tokens`), as i32 — what the kernels take.
    pub fn get(&self, id: SessionId) -> Result<&'a [i32], VmuError> {
        let m = self.meta(id)?;
        if m.swapped {
            return Err(VmuError::NotResident(id));
        }
        let row = id.index as usize * self.width;
        Ok(&self.tables[row..row + m.blocks])
    }

    /// Tokens held (the context length).
    pub fn tokens(&self, id: SessionId) -> Result<usize, VmuError> {
        Ok(self.meta(id)?.tokens)
    }

    /// The block-table width: the most blocks any session can hold.
    pub fn max_blocks_per_session(&self) -> usize {
        self.width
    }
}

/// Everything a forward pass needs at once, split so that views can borrow the region while
/// the scratch arena is mutated.
pub struct StepParts<'a, B: Backend> {
    pub backend: &'a B,
    pub region: &'a B::Region,
    pub kv: KvCacheRef<'a, B>,
    pub tables: BlockTables<'a>,
    pub scratch: &'a mut ScratchArena,
}

/// A snapshot of occupancy (tests, logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmuStats {
    pub kv_blocks_total: usize,
    pub kv_blocks_free: usize,
    pub host_blocks_total: usize,
    pub host_blocks_free: usize,
    pub sessions_open: usize,
    pub sessions_swapped: usize,
    pub kv_used_bytes: usize,
    pub kv_used_bytes_peak: usize,
}

/// Swap latencies still in flight; a bound so that a caller that never polls cannot grow it.
const TIMINGS_MAX: usize = 256;

struct Timing<E> {
    out: bool,
    start: Instant,
    done: E,
}

/// The virtual memory unit of one device. See the module docs for invariants and ordering.
pub struct Vmu<B: Backend> {
    backend: Arc<B>,
    plan: RegionPlan,
    layout: KvLayout,
    admission_min_free_blocks: usize,
    region: B::Region,
    persistent: Shared,
    scratch: ScratchArena,

    free_blocks: Vec<u32>,
    refcount: Vec<u32>,
    kv_peak_blocks: usize,

    sessions: Vec<SessionMeta>,
    free_sessions: Vec<u32>,
    tables: Vec<i32>,
    sessions_open: usize,
    sessions_swapped: usize,
    tick: u64,
    epoch: u64,

    swap_stream: B::Stream,
    /// Boxed so the pinned buffer handle never moves while copies are in flight.
    host: Box<B::Host>,
    host_free: Vec<u32>,
    /// Last swap that read the id list in the index area (it is rewritten by the next gather).
    index_busy: Option<B::Event>,
    /// Last CoW copy that read the pair in the index area.
    cow_busy: Option<B::Event>,
    /// Completion of the latest swap-out: blocks it freed may be handed to compute only after
    /// it, so `append` makes the default stream wait on it (once) before using new blocks.
    compute_fence: Option<B::Event>,
    /// Per session slot: completion of a swap-in the default stream has not waited for yet
    /// (a prefetch); the session's next use makes compute wait for it.
    ready: Vec<Option<B::Event>>,
    timings: VecDeque<Timing<B::Event>>,
    /// Reused buffers: block ids of one swap, and their i32 bytes for the index area.
    ids: Vec<u32>,
    dev_ids: Vec<i32>,
    index_bytes: Vec<u8>,
    metrics: VmuMetrics,
    /// Per session slot: its paused state's charge (see `paused.rs`).
    pub(crate) paused: Vec<PausedHold>,
    /// The blocks the paused states share (see `paused.rs`).
    pub(crate) paused_pool: PausedPool,
}

impl<B: Backend> std::fmt::Debug for Vmu<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmu").field("plan", &self.plan).field("stats", &self.stats()).finish()
    }
}

impl<B: Backend> Drop for Vmu<B> {
    fn drop(&mut self) {
        // The host pool and region must outlive every copy that touches them.
        let _ = self.backend.sync_stream(&self.swap_stream);
        let _ = self.backend.sync_stream(self.backend.default_stream());
    }
}

impl<B: Backend> Vmu<B> {
    /// Reserves the region and the pinned host pool (the only driver allocations the VMU makes)
    /// and registers the metrics on `registry`.
    pub fn new(backend: Arc<B>, cfg: VmuConfig, registry: &Registry) -> Result<Self, VmuError> {
        let plan = RegionPlan::new(&cfg, &backend.info())?;
        let metrics = VmuMetrics::new(registry)?;
        let region = backend.reserve(plan.total_bytes)?;
        let host = Box::new(backend.alloc_host((plan.host_swap_blocks * plan.block_bytes).max(1))?);
        let swap_stream = backend.new_copy_stream()?;
        let persistent = weights::new_shared(
            plan.weights_offset,
            plan.weights_bytes,
            cfg.max_persistent_allocations,
            metrics.clone(),
        );
        let width = plan.max_blocks_per_session;
        metrics.kv_capacity_bytes.set((plan.kv_blocks * plan.block_bytes) as i64);
        let mut vmu = Vmu {
            scratch: ScratchArena::new(plan.scratch_offset, plan.scratch_bytes),
            // Stacks popped from the end: hand out ascending ids so that a session appending
            // alone gets contiguous runs (one copy per run when swapping).
            free_blocks: (0..plan.kv_blocks as u32).rev().collect(),
            refcount: vec![0; plan.kv_blocks],
            kv_peak_blocks: 0,
            sessions: vec![SessionMeta::default(); cfg.max_sessions],
            free_sessions: (0..cfg.max_sessions as u32).rev().collect(),
            tables: vec![-1; cfg.max_sessions * width],
            sessions_open: 0,
            sessions_swapped: 0,
            tick: 0,
            epoch: 1,
            swap_stream,
            host,
            host_free: (0..plan.host_swap_blocks as u32).rev().collect(),
            index_busy: None,
            cow_busy: None,
            compute_fence: None,
            ready: (0..cfg.max_sessions).map(|_| None).collect(),
            timings: VecDeque::with_capacity(TIMINGS_MAX),
            ids: Vec::with_capacity(plan.kv_blocks.max(width)),
            dev_ids: Vec::with_capacity(plan.kv_blocks.max(width)),
            index_bytes: Vec::with_capacity(plan.kv_blocks * 4),
            layout: cfg.kv_layout,
            admission_min_free_blocks: cfg.admission_min_free_blocks,
            backend,
            region,
            persistent,
            metrics,
            plan,
            paused: vec![PausedHold::default(); cfg.max_sessions],
            paused_pool: PausedPool::default(),
        };
        vmu.publish();
        tracing::info!(
            total_bytes = vmu.plan.total_bytes,
            weights_bytes = vmu.plan.weights_bytes,
            kv_blocks = vmu.plan.kv_blocks,
            block_bytes = vmu.plan.block_bytes,
            host_swap_blocks = vmu.plan.host_swap_blocks,
            "VMU region reserved"
        );
        Ok(vmu)
    }

    // ---- accessors ---------------------------------------------------------------------------

    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }
    /// The one reserved region; every offset the VMU hands out points into it.
    pub fn region(&self) -> &B::Region {
        &self.region
    }
    pub fn plan(&self) -> &RegionPlan {
        &self.plan
    }
    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }
    /// The paged KV cache for kernels (`kv_append`, `attention`, ...).
    pub fn kv_cache(&self) -> KvCacheRef<'_, B> {
        KvCacheRef {
            region: &self.region,
            offset: self.plan.kv_offset,
            num_blocks: self.plan.kv_blocks,
            layout: self.layout,
        }
    }
    /// Absolute region offset of KV block `block`.
    pub fn block_offset(&self, block: i32) -> usize {
        assert!((block as usize) < self.plan.kv_blocks, "block id {block} out of range");
        self.plan.kv_offset + block as usize * self.plan.block_bytes
    }
    pub fn block_tables(&self) -> BlockTables<'_> {
        BlockTables { sessions: &self.sessions, tables: &self.tables, width: self.plan.max_blocks_per_session }
    }
    /// Block table of a resident session (see [`BlockTables::get`]).
    pub fn block_table(&self, id: SessionId) -> Result<&[i32], VmuError> {
        self.block_tables().get(id)
    }
    pub fn session_tokens(&self, id: SessionId) -> Result<usize, VmuError> {
        self.block_tables().tokens(id)
    }
    /// Sets the session's swap-out rank: sessions of a lower rank are swapped out first, then
    /// the least recently used (the one victim policy, [`Vmu::make_room_for_step`]).
    pub fn set_evict_rank(&mut self, id: SessionId, rank: u8) -> Result<(), VmuError> {
        let idx = self.lookup(id)?;
        self.sessions[idx].evict_rank = rank;
        Ok(())
    }
    pub fn residency(&self, id: SessionId) -> Result<Residency, VmuError> {
        let m = self.block_tables().meta(id)?;
        Ok(if m.swapped { Residency::Swapped } else { Residency::Resident })
    }
    /// When the session was last used (a step, a swap in), on the VMU's clock: the order of its
    /// one victim policy (least recently used first), for swapping and for preemption alike.
    pub fn last_used(&self, id: SessionId) -> Result<u64, VmuError> {
        Ok(self.block_tables().meta(id)?.last_used)
    }
    pub fn scratch_mut(&mut self) -> &mut ScratchArena {
        &mut self.scratch
    }
    pub fn step_parts(&mut self) -> StepParts<'_, B> {
        StepParts {
            backend: &self.backend,
            region: &self.region,
            kv: KvCacheRef {
                region: &self.region,
                offset: self.plan.kv_offset,
                num_blocks: self.plan.kv_blocks,
                layout: self.layout,
            },
            tables: BlockTables {
                sessions: &self.sessions,
                tables: &self.tables,
                width: self.plan.max_blocks_per_session,
            },
            scratch: &mut self.scratch,
        }
    }
    pub fn metrics(&self) -> &VmuMetrics {
        &self.metrics
    }
    pub fn stats(&self) -> VmuStats {
        let used = self.plan.kv_blocks - self.free_blocks.len();
        VmuStats {
            kv_blocks_total: self.plan.kv_blocks,
            kv_blocks_free: self.free_blocks.len(),
            host_blocks_total: self.plan.host_swap_blocks,
            host_blocks_free: self.host_free.len(),
            sessions_open: self.sessions_open,
            sessions_swapped: self.sessions_swapped,
            kv_used_bytes: used * self.plan.block_bytes,
            kv_used_bytes_peak: self.kv_peak_blocks * self.plan.block_bytes,
        }
    }

    // ---- persistent region -------------------------------------------------------------------

    /// The weights of `model`: allocated on first request (`is_fresh()`: upload them), shared
    /// afterwards; freed when the last lease drops.
    pub fn alloc_weights(&self, model: &str, bytes: usize) -> Result<WeightsLease, VmuError> {
        weights::alloc_weights(&self.persistent, model, bytes)
    }
    /// A long-lived buffer in the persistent region, freed on drop. Not for the per-step path.
    pub fn alloc_persistent(&self, bytes: usize, align: usize) -> Result<PersistentLease, VmuError> {
        weights::alloc_persistent(&self.persistent, bytes, align)
    }

    // ---- sessions ----------------------------------------------------------------------------

    fn lookup(&self, id: SessionId) -> Result<usize, VmuError> {
        self.block_tables().meta(id).map(|_| id.index as usize)
    }

    fn row(&self, idx: usize) -> usize {
        idx * self.plan.max_blocks_per_session
    }

    fn admit(&mut self) -> Result<usize, VmuError> {
        let free = self.free_blocks.len() + self.host_free.len();
        if free < self.admission_min_free_blocks {
            self.metrics.admission_refused_total.inc();
            return Err(VmuError::AdmissionRefused {
                free_device_blocks: self.free_blocks.len(),
                free_host_blocks: self.host_free.len(),
                required_blocks: self.admission_min_free_blocks,
            });
        }
        let idx = self.free_sessions.pop().ok_or(VmuError::TooManySessions { max_sessions: self.sessions.len() })?;
        let m = &mut self.sessions[idx as usize];
        m.open = true;
        m.swapped = false;
        m.tokens = 0;
        m.blocks = 0;
        self.tick += 1;
        m.last_used = self.tick;
        m.pinned_epoch = 0;
        m.evict_rank = 0;
        self.sessions_open += 1;
        Ok(idx as usize)
    }

    fn id_of(&self, idx: usize) -> SessionId {
        SessionId { index: idx as u32, generation: self.sessions[idx].generation }
    }

    /// Opens an empty session. Refused (admission control) when device KV and the host pool
    /// together have fewer than `admission_min_free_blocks` free blocks.
    pub fn open_session(&mut self) -> Result<SessionId, VmuError> {
        self.poll_timings();
        let idx = self.admit()?;
        self.publish();
        Ok(self.id_of(idx))
    }

    /// A new session sharing all of `id`'s blocks (copy-on-write). `id` is swapped in first if
    /// needed.
    pub fn fork(&mut self, id: SessionId) -> Result<SessionId, VmuError> {
        self.poll_timings();
        let src = self.lookup(id)?;
        self.make_resident(src)?;
        let dst = self.admit()?;
        let n = self.sessions[src].blocks;
        let (rs, rd) = (self.row(src), self.row(dst));
        self.tables.copy_within(rs..rs + n, rd);
        for &b in &self.tables[rd..rd + n] {
            self.refcount[b as usize] += 1;
        }
        self.sessions[dst].blocks = n;
        self.sessions[dst].tokens = self.sessions[src].tokens;
        self.publish();
        Ok(self.id_of(dst))
    }

    /// Frees the session's blocks (or host slots) and its id.
    pub fn close_session(&mut self, id: SessionId) -> Result<(), VmuError> {
        self.poll_timings();
        let idx = self.lookup(id)?;
        let m = self.sessions[idx];
        let row = self.row(idx);
        if self.ready[idx].take().is_some() {
            // A prefetch may still be writing the blocks freed below: the next append that
            // takes blocks waits for everything issued on the swap stream so far.
            self.compute_fence = Some(self.backend.record(&self.swap_stream)?);
        }
        if m.swapped {
            // Host slots are only touched by the swap stream: reuse is ordered after any
            // swap-out still writing them.
            for i in (0..m.blocks).rev() {
                self.host_free.push(self.tables[row + i] as u32);
            }
            self.sessions_swapped -= 1;
        } else {
            for i in (0..m.blocks).rev() {
                let b = self.tables[row + i] as usize;
                self.release_block(b);
            }
        }
        self.tables[row..row + m.blocks].fill(-1);
        self.release_paused_idx(idx);
        let meta = &mut self.sessions[idx];
        *meta = SessionMeta { generation: m.generation.wrapping_add(1), ..SessionMeta::default() };
        self.free_sessions.push(idx as u32);
        self.sessions_open -= 1;
        self.publish();
        Ok(())
    }

    fn release_block(&mut self, b: usize) {
        debug_assert!(self.refcount[b] > 0);
        self.refcount[b] -= 1;
        if self.refcount[b] == 0 {
            self.free_blocks.push(b as u32);
        }
    }

    fn take_block(&mut self) -> u32 {
        let b = self.free_blocks.pop().expect("make_room guaranteed a free block");
        debug_assert_eq!(self.refcount[b as usize], 0);
        self.refcount[b as usize] = 1;
        b
    }

    /// Extends the session by `n` tokens and pushes the slot of each new token (slot = block *
    /// block_tokens + offset, what `kv_append` takes) onto `slots`; returns their positions.
    /// Takes blocks as needed — swapping out least-recently-used unpinned sessions when none are
    /// free — and copies a shared partial last block first (copy-on-write). On error nothing
    /// changed.
    pub fn append(&mut self, id: SessionId, n: usize, slots: &mut Vec<i32>) -> Result<Range<usize>, VmuError> {
        self.poll_timings();
        let idx = self.lookup(id)?;
        let bt = self.layout.block_tokens;
        let t = self.sessions[idx].tokens;
        let max_tokens = self.plan.max_blocks_per_session * bt;
        if n > max_tokens - t {
            return Err(VmuError::ContextFull { session: id, tokens: t, append: n, max_tokens });
        }
        self.make_resident(idx)?;
        if n == 0 {
            return Ok(t..t);
        }
        let row = self.row(idx);
        let have = self.sessions[idx].blocks;
        let need_total = (t + n).div_ceil(bt);
        let new_blocks = need_total - have;
        let cow = !t.is_multiple_of(bt) && self.refcount[self.tables[row + have - 1] as usize] > 1;
        self.make_room(new_blocks + cow as usize, idx)?;
        self.fence_compute()?;
        if cow {
            let old = self.tables[row + have - 1];
            let new = self.take_block() as i32;
            self.copy_block(old, new)?;
            self.release_block(old as usize);
            self.tables[row + have - 1] = new;
        }
        for i in have..need_total {
            self.tables[row + i] = self.take_block() as i32;
        }
        let m = &mut self.sessions[idx];
        m.blocks = need_total;
        m.tokens = t + n;
        slots.extend((t..t + n).map(|p| self.tables[row + p / bt] * bt as i32 + (p % bt) as i32));
        self.publish();
        Ok(t..t + n)
    }

    /// Shrinks the session back to its first `tokens` tokens and frees the blocks past them:
    /// undoes the `append`s of a step that failed, so a failed step changes no session, and with
    /// `tokens = 0` drops all of a preempted session's KV. The kept positions are untouched; the
    /// tail of a shortened last block is never read. Resident or swapped alike; `tokens` past the
    /// session's length is an error.
    pub fn truncate(&mut self, id: SessionId, tokens: usize) -> Result<(), VmuError> {
        let idx = self.lookup(id)?;
        let m = self.sessions[idx];
        if tokens > m.tokens {
            return Err(VmuError::ContextFull {
                session: id,
                tokens: m.tokens,
                append: tokens - m.tokens,
                max_tokens: m.tokens,
            });
        }
        let keep = tokens.div_ceil(self.layout.block_tokens);
        let row = self.row(idx);
        if !m.swapped && keep < m.blocks && self.ready[idx].take().is_some() {
            // A prefetch may still be writing the blocks freed below (as in `close_session`).
            self.compute_fence = Some(self.backend.record(&self.swap_stream)?);
        }
        for i in (keep..m.blocks).rev() {
            let b = self.tables[row + i];
            if m.swapped {
                self.host_free.push(b as u32);
            } else {
                self.release_block(b as usize);
            }
            self.tables[row + i] = -1;
        }
        let meta = &mut self.sessions[idx];
        meta.blocks = keep.min(m.blocks);
        meta.tokens = tokens;
        if m.swapped && meta.blocks == 0 {
            // Nothing left in the host pool: an empty session is resident (it holds no block).
            meta.swapped = false;
            self.sessions_swapped -= 1;
        }
        self.publish();
        Ok(())
    }

    /// Orders later work on the default stream after the latest swap-out: the blocks it freed
    /// (or a shared block it still reads, now private to another session) may be written next.
    /// Swaps are ordered on one stream, so the latest fence covers every earlier one.
    fn fence_compute(&mut self) -> Result<(), VmuError> {
        if let Some(f) = self.compute_fence.take() {
            if !self.backend.event_done(&f)? {
                self.backend.wait(self.backend.default_stream(), &f)?;
            }
        }
        Ok(())
    }

    /// Copies block `src` to `dst` on the default stream (copy-on-write).
    fn copy_block(&mut self, src: i32, dst: i32) -> Result<(), VmuError> {
        let off = self.plan.index_offset + self.plan.kv_blocks * 4;
        if let Some(e) = self.cow_busy.take() {
            // The previous pair may still be read by its copy_blocks.
            self.backend.sync_event(&e)?;
        }
        let mut pair = [0u8; 8];
        pair[..4].copy_from_slice(&src.to_le_bytes());
        pair[4..].copy_from_slice(&dst.to_le_bytes());
        self.backend.write(&self.region, off, &pair)?;
        let s = self.backend.default_stream();
        self.backend.copy_blocks(s, &self.kv_cache(), View::new(&self.region, off, DType::I32, 2))?;
        self.cow_busy = Some(self.backend.record(s)?);
        Ok(())
    }

    // ---- steps and residency -----------------------------------------------------------------

    /// Pins `ids` for the current step (they will not be swapped out until [`Vmu::end_step`])
    /// and swaps in those that are out. On `KvExhausted` the sessions already brought in stay
    /// in; nothing is lost.
    pub fn ensure_resident(&mut self, ids: &[SessionId]) -> Result<(), VmuError> {
        self.poll_timings();
        self.tick += 1;
        for &id in ids {
            let idx = self.lookup(id)?;
            self.sessions[idx].pinned_epoch = self.epoch;
            self.sessions[idx].last_used = self.tick;
        }
        for &id in ids {
            let idx = id.index as usize;
            self.make_resident(idx)?;
        }
        Ok(())
    }

    /// Ends the step: unpins every session and resets the scratch arena.
    pub fn end_step(&mut self) {
        self.metrics.set_region(
            "scratch",
            self.scratch.used_bytes(),
            self.scratch.capacity_bytes() - self.scratch.used_bytes(),
        );
        self.scratch.reset();
        self.epoch += 1;
        self.poll_timings();
    }

    /// Swaps the given sessions out now (e.g. paused ones), if the host pool has room. Sessions
    /// already out are skipped; pinned ones are an error.
    pub fn swap_out(&mut self, ids: &[SessionId]) -> Result<(), VmuError> {
        self.poll_timings();
        for &id in ids {
            let idx = self.lookup(id)?;
            let m = self.sessions[idx];
            if m.swapped {
                continue;
            }
            if m.pinned_epoch == self.epoch || m.blocks > self.host_free.len() {
                return Err(VmuError::KvExhausted {
                    session: id,
                    needed_blocks: m.blocks,
                    free_device_blocks: self.free_blocks.len(),
                    free_host_blocks: self.host_free.len(),
                    pinned_sessions: self.pinned_count(),
                });
            }
            self.swap_out_one(idx)?;
        }
        Ok(())
    }

    /// Blocks until every swap issued so far has completed (and records their latencies).
    pub fn sync(&mut self) -> Result<(), VmuError> {
        self.backend.sync_stream(&self.swap_stream)?;
        self.backend.sync_stream(self.backend.default_stream())?;
        self.poll_timings();
        Ok(())
    }

    fn pinned_count(&self) -> usize {
        self.sessions.iter().filter(|m| m.open && m.pinned_epoch == self.epoch).count()
    }

    /// Swaps the session in if needed and orders later compute after its copies.
    fn make_resident(&mut self, idx: usize) -> Result<(), VmuError> {
        self.tick += 1;
        self.sessions[idx].last_used = self.tick;
        if self.sessions[idx].swapped {
            self.make_room(self.sessions[idx].blocks, idx)?;
            self.swap_in_one(idx)?;
        }
        if let Some(e) = self.ready[idx].take() {
            if !self.backend.event_done(&e)? {
                self.backend.wait(self.backend.default_stream(), &e)?;
            }
        }
        Ok(())
    }

    /// Starts swapping the given sessions in without pinning them or holding up compute: the
    /// copies overlap the current step, and the session's next `ensure_resident` (or `append`)
    /// orders compute after them. Stops at the first session that does not fit
    /// (`KvExhausted`); nothing is lost.
    pub fn prefetch(&mut self, ids: &[SessionId]) -> Result<(), VmuError> {
        self.poll_timings();
        for &id in ids {
            let idx = self.lookup(id)?;
            if self.sessions[idx].swapped {
                self.tick += 1;
                self.sessions[idx].last_used = self.tick;
                self.make_room(self.sessions[idx].blocks, idx)?;
                self.swap_in_one(idx)?;
            }
        }
        Ok(())
    }

    /// Frees `need` device blocks before a step grows its sessions (pinned by `ensure_resident`),
    /// by the one swap victim policy ([`Self::make_room`]: least recently used first). On
    /// `KvExhausted` some sessions may have been swapped out; nothing is lost. `for_session` names
    /// the step in the error.
    pub fn make_room_for_step(&mut self, need: usize, for_session: SessionId) -> Result<(), VmuError> {
        self.poll_timings();
        let idx = self.lookup(for_session)?;
        self.make_room(need, idx)
    }

    /// Whether [`Self::make_room`] could make `need` device blocks free without swapping out a
    /// session `keep` names: a dry run of the one victim policy (lowest `evict_rank`, then least
    /// recently used first, whole sessions, each only if it fits in what is left of the host
    /// pool). Changes nothing; O(sessions log sessions) plus the blocks of the sessions reached.
    pub fn room_possible(&self, need: usize, keep: impl Fn(SessionId) -> bool) -> bool {
        if self.free_blocks.len() >= need {
            return true;
        }
        let cands = (self.sessions.iter().enumerate())
            .filter(|&(i, m)| {
                m.open && !m.swapped && m.blocks > 0 && m.pinned_epoch != self.epoch && !keep(self.id_of(i))
            })
            .map(|(i, m)| victims::Candidate { key: ((m.evict_rank, m.last_used), i), blocks: m.blocks })
            .collect();
        victims::room_possible(self.free_blocks.len(), self.host_free.len(), need, cands, |i| {
            let row = self.row(i);
            self.tables[row..row + self.sessions[i].blocks].iter().filter(|&&b| self.refcount[b as usize] == 1).count()
        })
    }

    /// Frees device blocks until `need` are free, swapping out sessions that are resident,
    /// unpinned, not `requester`, own at least one unshared block, and fit in the host pool:
    /// the lowest `evict_rank` first, then the least recently used. The only swap victim
    /// policy: the engine's steps use it too.
    fn make_room(&mut self, need: usize, requester: usize) -> Result<(), VmuError> {
        while self.free_blocks.len() < need {
            let mut victim: Option<((u8, u64), usize)> = None;
            for (i, m) in self.sessions.iter().enumerate() {
                if !m.open || m.swapped || i == requester || m.pinned_epoch == self.epoch || m.blocks == 0 {
                    continue;
                }
                let key = (m.evict_rank, m.last_used);
                if m.blocks > self.host_free.len() || victim.is_some_and(|(k, _)| k <= key) {
                    continue;
                }
                let row = self.row(i);
                if self.tables[row..row + m.blocks].iter().any(|&b| self.refcount[b as usize] == 1) {
                    victim = Some((key, i));
                }
            }
            let Some((_, v)) = victim else {
                return Err(VmuError::KvExhausted {
                    session: self.id_of(requester),
                    needed_blocks: need,
                    free_device_blocks: self.free_blocks.len(),
                    free_host_blocks: self.host_free.len(),
                    pinned_sessions: self.pinned_count(),
                });
            };
            self.swap_out_one(v)?;
        }
        Ok(())
    }

    fn publish(&mut self) {
        let bb = self.plan.block_bytes;
        let used = self.plan.kv_blocks - self.free_blocks.len();
        self.kv_peak_blocks = self.kv_peak_blocks.max(used);
        self.metrics.kv_used_bytes.set((used * bb) as i64);
        self.metrics.kv_used_bytes_peak.set((self.kv_peak_blocks * bb) as i64);
        self.metrics.set_region("kv", used * bb, self.free_blocks.len() * bb);
        let host_used = self.plan.host_swap_blocks - self.host_free.len();
        self.metrics.set_region("host_swap", host_used * bb, self.host_free.len() * bb);
        self.metrics.sessions_open.set(self.sessions_open as i64);
        self.metrics.sessions_swapped.set(self.sessions_swapped as i64);
    }

    // ---- helpers for the paused-state charge (paused.rs) ------------------------------------

    pub(crate) fn lookup_open(&self, id: SessionId) -> Result<usize, VmuError> {
        self.lookup(id)
    }
    pub(crate) fn free_block_count(&self) -> usize {
        self.free_blocks.len()
    }
    pub(crate) fn host_free_count(&self) -> usize {
        self.host_free.len()
    }
    pub(crate) fn take_free_block(&mut self) -> u32 {
        self.take_block()
    }
    pub(crate) fn give_back_block(&mut self, b: u32) {
        self.release_block(b as usize);
    }
    pub(crate) fn take_host_slot(&mut self) -> u32 {
        self.host_free.pop().expect("checked by caller")
    }
    pub(crate) fn give_back_host_slot(&mut self, h: u32) {
        self.host_free.push(h);
    }
    pub(crate) fn publish_paused(&mut self) {
        self.publish();
        let ((dev, host), bb) = (self.paused_blocks(), self.plan.block_bytes);
        self.metrics.set_region("paused", dev * bb, self.free_blocks.len() * bb);
        self.metrics.set_region("paused_host", host * bb, self.host_free.len() * bb);
    }

    /// Asserts every invariant in the module docs (tests; O(sessions × blocks)).
    pub fn check_invariants(&self) {
        let mut refs = vec![0u32; self.plan.kv_blocks];
        let mut host_owner = vec![false; self.plan.host_swap_blocks];
        let (mut open, mut swapped) = (0, 0);
        for (i, m) in self.sessions.iter().enumerate() {
            let row = self.row(i);
            if !m.open {
                assert!(self.tables[row..row + self.plan.max_blocks_per_session].iter().all(|&b| b == -1));
                continue;
            }
            open += 1;
            assert_eq!(m.blocks, m.tokens.div_ceil(self.layout.block_tokens), "session {i}: blocks vs tokens");
            for &b in &self.tables[row..row + m.blocks] {
                if m.swapped {
                    assert!(!std::mem::replace(&mut host_owner[b as usize], true), "host slot {b} owned twice");
                } else {
                    refs[b as usize] += 1;
                }
            }
            swapped += m.swapped as usize;
        }
        self.check_paused(&mut refs, &mut host_owner);
        assert_eq!(refs, self.refcount, "refcounts disagree with block tables");
        let mut free = vec![false; self.plan.kv_blocks];
        for &b in &self.free_blocks {
            assert!(!std::mem::replace(&mut free[b as usize], true), "block {b} on the free list twice");
            assert_eq!(self.refcount[b as usize], 0, "free block {b} is referenced");
        }
        assert_eq!(refs.iter().filter(|&&r| r > 0).count() + self.free_blocks.len(), self.plan.kv_blocks, "leak");
        for &h in &self.host_free {
            assert!(!std::mem::replace(&mut host_owner[h as usize], true), "host slot {h} both free and owned");
        }
        assert!(host_owner.iter().all(|&o| o), "host slot leaked");
        assert_eq!((open, swapped), (self.sessions_open, self.sessions_swapped));
        assert_eq!(self.free_sessions.len() + open, self.sessions.len());
    }

    /// Reads the whole session's KV bytes (block by block, position order) into `out` — for
    /// tests and debugging; the session must be resident.
    pub fn read_session(&self, id: SessionId, out: &mut Vec<u8>) -> Result<(), VmuError> {
        let table = self.block_table(id)?;
        let bb = self.plan.block_bytes;
        out.clear();
        out.resize(table.len() * bb, 0);
        self.backend.sync_stream(&self.swap_stream)?;
        self.backend.sync_stream(self.backend.default_stream())?;
        for (i, &b) in table.iter().enumerate() {
            self.backend.read(&self.region, self.block_offset(b), &mut out[i * bb..(i + 1) * bb])?;
        }
        Ok(())
    }

    /// Writes `bytes` at `offset` inside block `index` (position order) of a resident session —
    /// for tests and tools; the model writes K/V through `kv_append`. The block must not be
    /// shared (that is what copy-on-write guarantees for the blocks an append touched).
    pub fn write_session_block(
        &mut self,
        id: SessionId,
        index: usize,
        offset: usize,
        bytes: &[u8],
    ) -> Result<(), VmuError> {
        assert!(offset + bytes.len() <= self.plan.block_bytes, "write past the end of a block");
        let b = self.block_table(id)?[index];
        assert_eq!(self.refcount[b as usize], 1, "writing a shared block");
        // Copies issued earlier may still read or write this block.
        self.sync()?;
        self.backend.write(&self.region, self.block_offset(b) + offset, bytes)?;
        Ok(())
    }

    /// Whether block `index` of a resident session is shared with another session (after fork).
    pub fn is_block_shared(&self, id: SessionId, index: usize) -> Result<bool, VmuError> {
        Ok(self.refcount[self.block_table(id)?[index] as usize] > 1)
    }
}
