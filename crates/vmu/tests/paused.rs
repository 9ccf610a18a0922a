//! The paused-state charge (`Vmu::hold_paused`) on the CPU backend: states share a byte-accounted
//! pool of whole blocks (small states share a block, the pool shrinks as charges leave); paused
//! state and KV together never exceed the KV capacity; a charge falls back to the host pool,
//! moves there when its session is swapped out, is refused (typed, nothing changed) when neither
//! has room, and is released on close.

use std::sync::Arc;

use djinn_backend::cpu::CpuBackend;
use djinn_backend::{DType, KvLayout};
use djinn_vmu::prometheus::Registry;
use djinn_vmu::{Residency, Vmu, VmuConfig, VmuError};

/// 4 KiB blocks: 2 layers × K/V × 2 heads × 16 tokens × 16 dims × f16.
fn vmu(kv_blocks: usize, host_blocks: usize) -> Vmu<CpuBackend> {
    let layout = KvLayout { layers: 2, kv_heads: 2, head_dim: 16, block_tokens: 16, dtype: DType::F16 };
    let bb = layout.block_bytes();
    let mut c = VmuConfig::new(layout);
    c.weights_bytes = 1 << 20;
    c.kv_capacity_bytes = Some(kv_blocks * bb);
    c.host_swap_bytes = Some(host_blocks * bb);
    c.scratch_bytes = 1 << 20;
    c.swap_staging_bytes = 4 * bb;
    c.max_sessions = 8;
    c.max_context_tokens = 256;
    let be = Arc::new(CpuBackend::with_threads(1).expect("cpu backend"));
    Vmu::new(be, c, &Registry::new()).expect("vmu")
}

#[test]
fn paused_states_share_blocks_within_capacity() {
    let mut v = vmu(6, 5);
    let bb = v.plan().block_bytes;
    let ids: Vec<_> = (0..4).map(|_| v.open_session().unwrap()).collect();
    let (a, b, c, d) = (ids[0], ids[1], ids[2], ids[3]);
    let mut slots = Vec::new();
    v.append(a, 32, &mut slots).unwrap(); // 2 blocks of KV
                                          // 1.5 blocks of state: the device pool takes 2 whole blocks, counted as used KV.
    assert_eq!(v.hold_paused(a, bb + bb / 2, 0).unwrap(), Residency::Resident);
    assert_eq!((v.paused_blocks(), v.paused_bytes()), ((2, 0), (bb + bb / 2, 0)));
    assert_eq!(v.stats().kv_used_bytes, 4 * bb);
    v.check_invariants();
    // A small state fits in the pool's slack: no block taken, so keep_free does not matter.
    assert_eq!(v.hold_paused(b, bb / 4, 3).unwrap(), Residency::Resident);
    assert_eq!(v.paused_blocks(), (2, 0));
    // Growing the device pool must leave keep_free blocks: else the host pool takes it.
    assert_eq!(v.hold_paused(c, bb / 2, 2).unwrap(), Residency::Swapped);
    assert_eq!((v.paused_blocks(), v.paused_bytes()), ((2, 1), (bb + 3 * bb / 4, bb / 2)));
    v.check_invariants();
    // A replacement counts the old charge as free; the host pool shrinks when it leaves.
    assert_eq!(v.hold_paused(c, bb / 2, 1).unwrap(), Residency::Resident);
    assert_eq!(v.paused_blocks(), (3, 0));
    v.release_paused(b).unwrap();
    assert_eq!((v.paused_blocks(), v.paused_bytes()), ((2, 0), (2 * bb, 0)));
    assert_eq!(v.paused_residency(b).unwrap(), None);
    v.check_invariants();
    // Swapping a out takes its state to the host pool; the device pool shrinks to c's.
    v.end_step();
    v.swap_out(&[a]).unwrap();
    assert_eq!(v.paused_residency(a).unwrap(), Some(Residency::Swapped));
    assert_eq!((v.paused_blocks(), v.paused_bytes()), ((1, 2), (bb / 2, bb + bb / 2)));
    assert_eq!(v.stats().kv_used_bytes, bb);
    v.check_invariants();
    // KV grows beside the pool, within capacity: 4 blocks of b's KV + 1 pool block, 1 free.
    v.append(b, 64, &mut slots).unwrap();
    assert_eq!(v.hold_paused(b, bb / 4, 0).unwrap(), Residency::Resident);
    assert_eq!(v.paused_blocks(), (1, 2));
    // Neither side has room for 2 more blocks' worth: refused, typed, nothing changed.
    match v.hold_paused(d, 2 * bb, 0) {
        Err(VmuError::PausedNoRoom { free_device_blocks: 1, free_host_blocks: 1, held_bytes: 0, .. }) => {}
        other => panic!("expected PausedNoRoom, got {other:?}"),
    }
    assert_eq!((v.paused_blocks(), v.paused_bytes()), ((1, 2), (3 * bb / 4, bb + bb / 2)));
    // The last free block goes to the pool: KV and paused state fill the capacity, no more.
    assert_eq!(v.hold_paused(d, bb / 2, 0).unwrap(), Residency::Resident);
    assert_eq!(v.stats().kv_used_bytes, 6 * bb);
    v.check_invariants();
    // Closing and releasing give every block back.
    v.close_session(a).unwrap();
    assert_eq!(v.paused_blocks(), (2, 0));
    for id in [b, c, d] {
        v.release_paused(id).unwrap();
    }
    assert_eq!((v.paused_blocks(), v.paused_bytes()), ((0, 0), (0, 0)));
    v.check_invariants();
    assert!(v.stats().kv_used_bytes_peak <= v.stats().kv_blocks_total * bb);
}

/// Many states much smaller than a block (a SmolLM2 state is 1/20 of its KV block) take the
/// blocks their bytes need together, not one each.
#[test]
fn many_small_states_take_their_bytes_not_a_block_each() {
    let mut v = vmu(4, 0);
    let bb = v.plan().block_bytes;
    let ids: Vec<_> = (0..8).map(|_| v.open_session().unwrap()).collect();
    for &id in &ids {
        assert_eq!(v.hold_paused(id, bb / 20, 0).unwrap(), Residency::Resident);
    }
    assert_eq!((v.paused_blocks(), v.paused_bytes()), ((1, 0), (8 * (bb / 20), 0)));
    assert_eq!(v.stats().kv_used_bytes, bb);
    v.check_invariants();
    for &id in &ids {
        v.close_session(id).unwrap();
    }
    assert_eq!(v.paused_blocks(), (0, 0));
    v.check_invariants();
}
