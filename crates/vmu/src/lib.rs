//! The VMU (virtual memory unit): owns a device's memory outright and never loses a session.
//!
//! At start-up [`Vmu::new`] reserves one region per device through the [`djinn_backend::Backend`]
//! (the only driver allocation besides the pinned host swap pool) and carves it into:
//! - a **persistent region** for model weights ([`Vmu::alloc_weights`]: one allocation per model,
//!   refcounted, shared by every session) and long-lived buffers, managed by a TLSF allocator
//!   ([`OffsetAllocator`]: size classes, free lists, O(1) alloc/free, coalescing);
//! - a **KV region** of fixed-size blocks ([`djinn_backend::KvLayout::block_bytes`]) handed out to
//!   per-session block tables ([`Vmu::append`], [`Vmu::fork`] with copy-on-write, [`Vmu::close_session`]);
//! - a **scratch arena** for one step's activations ([`ScratchArena`], reset by [`Vmu::end_step`]);
//! - swap staging and a small index area for block-id lists.
//!
//! When KV blocks run out, least-recently-used sessions not pinned for the current step are
//! swapped to the pinned host pool on a dedicated stream and swapped back by
//! [`Vmu::ensure_resident`]; when the host pool is full too, new sessions are refused
//! ([`VmuError::AdmissionRefused`]) and existing ones keep their state. Everything is a typed
//! offset into the region, never a raw pointer, and the VMU is generic over the backend.
//!
//! A forward pass takes [`Vmu::step_parts`]: the region, the [`djinn_backend::KvCacheRef`], the
//! block tables and the scratch arena, borrowed side by side.

mod alloc;
mod config;
mod error;
mod metrics;
mod paused;
mod scratch;
mod victims;
mod vmu;
mod weights;

pub use alloc::{Allocation, OffsetAllocator, GRANULE_BYTES};
pub use config::{host_swap_default_bytes, RegionPlan, VmuConfig, MIB};
pub use error::{AllocError, ScratchFull, VmuError};
pub use metrics::VmuMetrics;
/// Re-exported so callers build the [`prometheus::Registry`] with the same version.
pub use prometheus;
pub use scratch::ScratchArena;
pub use vmu::{BlockTables, Residency, SessionId, StepParts, Vmu, VmuStats};
pub use weights::{PersistentLease, WeightsLease};
