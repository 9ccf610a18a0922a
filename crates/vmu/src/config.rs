//! VMU configuration and the carving of the one reserved region.
//!
//! Layout of the region (every part starts 4096-aligned):
//! `[ persistent (weights) | KV blocks | scratch | swap staging | index area ]`.
//! The index area holds the i32 block-id lists that `gather_blocks`/`scatter_blocks`/`copy_blocks`
//! read from device memory.

use djinn_backend::{DeviceInfo, KvLayout};

use crate::error::VmuError;

pub const MIB: usize = 1 << 20;
const REGION_ALIGN: usize = 4096;

#[derive(Clone, Debug)]
pub struct VmuConfig {
    /// The paged-KV layout of the model served (one layout per VMU).
    pub kv_layout: KvLayout,
    /// Total bytes to reserve (`--vmu-mb`). `None`: CPU = the sum of the parts below; GPU =
    /// `gpu_memory_fraction` of free memory minus `gpu_reserve_bytes`.
    pub vmu_bytes: Option<usize>,
    /// Persistent region (model weights and other long-lived buffers): declare the models to load
    /// up front. Allocated from with size classes; never grows.
    pub weights_bytes: usize,
    /// KV region cap (`--kv-capacity-mb`). `None`: CPU = 512 MiB; GPU / explicit `vmu_bytes` =
    /// whatever remains after the other parts. Rounded down to whole blocks.
    pub kv_capacity_bytes: Option<usize>,
    /// Per-step activations (bump arena, reset each step).
    pub scratch_bytes: usize,
    /// Device staging for gathered swaps; a swap larger than this runs in chunks.
    pub swap_staging_bytes: usize,
    /// Pinned host swap pool (`--host-swap-mb`). `None`: min(4096 MiB, half the available RAM);
    /// on the CPU backend also at most the KV region.
    pub host_swap_bytes: Option<usize>,
    pub gpu_memory_fraction: f64,
    pub gpu_reserve_bytes: usize,
    /// Bound on open sessions (block tables are preallocated for all of them).
    pub max_sessions: usize,
    /// Bound on one session's length; sets the block-table width.
    pub max_context_tokens: usize,
    /// Bound on live allocations in the persistent region.
    pub max_persistent_allocations: usize,
    /// A swap copies contiguous runs straight between KV blocks and host memory when its runs
    /// average at least this many bytes, and gathers through staging otherwise. `None`: 0 when
    /// device memory is host memory (a staging hop would double the copies), 256 KiB otherwise
    /// (below that one DMA per run costs more than a gather kernel).
    pub direct_swap_min_run_bytes: Option<usize>,
    /// Admission control: a new session needs this many free blocks, on device or in the swap pool.
    pub admission_min_free_blocks: usize,
}

impl VmuConfig {
    /// Defaults for a layout; set `weights_bytes` to the models you will load.
    pub fn new(kv_layout: KvLayout) -> Self {
        VmuConfig {
            kv_layout,
            vmu_bytes: None,
            weights_bytes: 0,
            kv_capacity_bytes: None,
            scratch_bytes: 64 * MIB,
            swap_staging_bytes: 16 * MIB,
            host_swap_bytes: None,
            gpu_memory_fraction: 0.9,
            gpu_reserve_bytes: 1024 * MIB,
            max_sessions: 256,
            max_context_tokens: 16384,
            max_persistent_allocations: 4096,
            direct_swap_min_run_bytes: None,
            admission_min_free_blocks: 1,
        }
    }
}

/// Where each part of the region lies (byte offsets into the region) and the derived bounds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionPlan {
    pub total_bytes: usize,
    pub weights_offset: usize,
    pub weights_bytes: usize,
    pub kv_offset: usize,
    pub kv_blocks: usize,
    pub block_bytes: usize,
    pub scratch_offset: usize,
    pub scratch_bytes: usize,
    pub staging_offset: usize,
    pub staging_bytes: usize,
    pub index_offset: usize,
    pub index_bytes: usize,
    pub host_swap_blocks: usize,
    pub max_blocks_per_session: usize,
    pub direct_swap_min_run_bytes: usize,
}

fn align_up(x: usize) -> usize {
    x.next_multiple_of(REGION_ALIGN)
}

/// Available RAM from /proc/meminfo (Linux), for the host swap default.
/// Share of the host's available memory a server's host swap pools take by default, and the most.
const HOST_SWAP_DEFAULT_DIVISOR: usize = 4;
const HOST_SWAP_DEFAULT_MAX_BYTES: usize = 4096 * MIB;

/// The default host swap pool of a server, over all its models: a quarter of the host's
/// available memory at start-up (`MemAvailable`; 1 GiB assumed where unreadable), at most 4 GiB.
/// Sized from the host, not from the KV capacity: the pool is where sessions go when the device
/// is full, so it should be as large as the host can spare. On the CPU backend it is locked as
/// it fills, not at start-up (see `CpuHostBuf`), so a large pool costs only what it holds.
pub fn host_swap_default_bytes() -> usize {
    host_swap_default_from(mem_available_bytes())
}

fn host_swap_default_from(mem_available: Option<usize>) -> usize {
    (mem_available.unwrap_or(1024 * MIB) / HOST_SWAP_DEFAULT_DIVISOR).min(HOST_SWAP_DEFAULT_MAX_BYTES)
}

fn mem_available_bytes() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

impl RegionPlan {
    pub fn new(cfg: &VmuConfig, dev: &DeviceInfo) -> Result<RegionPlan, VmuError> {
        let block_bytes = cfg.kv_layout.block_bytes();
        if block_bytes == 0 {
            return Err(VmuError::Config(format!("KV layout {:?} has zero-sized blocks", cfg.kv_layout)));
        }
        if cfg.max_sessions == 0 || cfg.max_context_tokens == 0 {
            return Err(VmuError::Config("max_sessions and max_context_tokens must be positive".into()));
        }
        let is_host_memory = dev.kind == "cpu";
        let weights_bytes = align_up(cfg.weights_bytes);
        let scratch_bytes = align_up(cfg.scratch_bytes);
        // Staging holds at least one block so any swap can make progress.
        let staging_bytes = align_up(cfg.swap_staging_bytes.max(block_bytes));
        let fixed = |kv_blocks: usize| {
            // Index area: one i32 id per KV block (a whole swap batch) plus a CoW pair.
            let index_bytes = align_up((kv_blocks + 2) * 4);
            weights_bytes + scratch_bytes + staging_bytes + index_bytes
        };
        let budget = match cfg.vmu_bytes {
            Some(b) => Some(b),
            None if is_host_memory => None,
            None => {
                let usable = (dev.memory_free_bytes as f64 * cfg.gpu_memory_fraction) as usize;
                Some(usable.saturating_sub(cfg.gpu_reserve_bytes))
            }
        };
        let kv_blocks = match (budget, cfg.kv_capacity_bytes) {
            (None, cap) => cap.unwrap_or(512 * MIB) / block_bytes,
            (Some(total), cap) => {
                let rest = total.saturating_sub(fixed(total / block_bytes) + REGION_ALIGN);
                let rest_blocks = rest / block_bytes;
                cap.map_or(rest_blocks, |c| (c / block_bytes).min(rest_blocks))
            }
        };
        if kv_blocks == 0 {
            return Err(VmuError::Config(format!(
                "no room for a single KV block of {block_bytes} bytes (budget {budget:?}, weights {weights_bytes}, \
                 scratch {scratch_bytes}, staging {staging_bytes})"
            )));
        }
        if kv_blocks > i32::MAX as usize {
            return Err(VmuError::Config(format!("{kv_blocks} KV blocks exceed the i32 block-id range")));
        }
        let weights_offset = 0;
        let kv_offset = align_up(weights_offset + weights_bytes);
        let scratch_offset = align_up(kv_offset + kv_blocks * block_bytes);
        let staging_offset = scratch_offset + scratch_bytes;
        let index_offset = staging_offset + staging_bytes;
        let index_bytes = align_up((kv_blocks + 2) * 4);
        let total_bytes = index_offset + index_bytes;
        if let Some(b) = budget {
            if total_bytes > b {
                return Err(VmuError::Config(format!(
                    "region parts need {total_bytes} bytes, more than the budget of {b}"
                )));
            }
        }
        let host_bytes = cfg.host_swap_bytes.unwrap_or_else(|| {
            let default = (4096 * MIB).min(mem_available_bytes().unwrap_or(8192 * MIB) / 2);
            // On the CPU backend "device" memory is host memory already and the pool is mlocked:
            // cap it at the KV region so several test servers fit on one machine.
            if is_host_memory {
                default.min(kv_blocks * block_bytes)
            } else {
                default
            }
        });
        Ok(RegionPlan {
            total_bytes,
            weights_offset,
            weights_bytes,
            kv_offset,
            kv_blocks,
            block_bytes,
            scratch_offset,
            scratch_bytes,
            staging_offset,
            staging_bytes,
            index_offset,
            index_bytes,
            host_swap_blocks: host_bytes / block_bytes,
            max_blocks_per_session: cfg.max_context_tokens.div_ceil(cfg.kv_layout.block_tokens),
            direct_swap_min_run_bytes: cfg.direct_swap_min_run_bytes.unwrap_or(if is_host_memory {
                0
            } else {
                256 * 1024
            }),
        })
    }
}

#[cfg(test)]
mod tests {

    use djinn_backend::DType;

    use super::*;

    fn dev(kind: &'static str, free_bytes: u64) -> DeviceInfo {
        DeviceInfo {
            kind,
            name: "test".into(),
            ordinal: 0,
            memory_total_bytes: free_bytes,
            memory_free_bytes: free_bytes,
        }
    }

    fn layout() -> KvLayout {
        // 32 layers × K/V × 8 heads × 16 tokens × 128 dims × f16 = 2 MiB blocks.
        KvLayout { layers: 32, kv_heads: 8, head_dim: 128, block_tokens: 16, dtype: DType::F16 }
    }

    fn assert_disjoint_and_inside(p: &RegionPlan) {
        let parts = [
            (p.weights_offset, p.weights_bytes),
            (p.kv_offset, p.kv_blocks * p.block_bytes),
            (p.scratch_offset, p.scratch_bytes),
            (p.staging_offset, p.staging_bytes),
            (p.index_offset, p.index_bytes),
        ];
        for (i, a) in parts.iter().enumerate() {
            assert_eq!(a.0 % REGION_ALIGN, 0, "part {i} misaligned");
            assert!(a.0 + a.1 <= p.total_bytes, "part {i} outside the region");
            for b in &parts[i + 1..] {
                assert!(a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0, "parts overlap: {a:?} {b:?}");
            }
        }
        assert!(p.index_bytes >= (p.kv_blocks + 2) * 4);
    }

    #[test]
    fn cpu_default_is_weights_plus_512_mib_kv() {
        let mut c = VmuConfig::new(layout());
        c.weights_bytes = 100 * MIB + 1;
        let p = RegionPlan::new(&c, &dev("cpu", 64 << 30)).unwrap();
        assert_eq!(p.kv_blocks, 256);
        assert!(p.weights_bytes > 100 * MIB);
        assert!(p.host_swap_blocks <= 256);
        assert_eq!(p.direct_swap_min_run_bytes, 0);
        assert_disjoint_and_inside(&p);
    }

    #[test]
    fn gpu_default_fills_a_fraction_of_free_memory() {
        let mut c = VmuConfig::new(layout());
        c.weights_bytes = 16 << 30;
        let free = 80u64 << 30;
        let p = RegionPlan::new(&c, &dev("cuda", free)).unwrap();
        let budget = (free as f64 * 0.9) as usize - 1024 * MIB;
        assert!(p.total_bytes <= budget);
        assert!(p.total_bytes + p.block_bytes + REGION_ALIGN * 2 > budget, "KV should take the rest");
        assert_disjoint_and_inside(&p);
        c.kv_capacity_bytes = Some(1 << 30);
        let p = RegionPlan::new(&c, &dev("cuda", free)).unwrap();
        assert_eq!(p.kv_blocks, 512);
        assert_disjoint_and_inside(&p);
    }

    #[test]
    fn explicit_budget_too_small_is_a_config_error() {
        let mut c = VmuConfig::new(layout());
        c.vmu_bytes = Some(64 * MIB);
        c.weights_bytes = 64 * MIB;
        assert!(matches!(RegionPlan::new(&c, &dev("cpu", 1 << 30)), Err(VmuError::Config(_))));
    }

    #[test]
    fn host_swap_default_is_a_bounded_share_of_host_memory() {
        assert_eq!(host_swap_default_from(Some(24 << 30)), 4 << 30, "capped");
        assert_eq!(host_swap_default_from(Some(8 << 30)), 2 << 30, "a quarter");
        assert_eq!(host_swap_default_from(None), 256 << 20, "1 GiB assumed");
        let now = host_swap_default_bytes();
        assert!(now > 0 && now <= 4 << 30);
    }
}
