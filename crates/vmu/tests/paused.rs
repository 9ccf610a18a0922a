//! The paused-state charge (`Vmu::hold_paused`) on the CPU backend: paused state and KV
//! together never exceed the KV capacity; a charge falls back to the host pool, moves there when
//! its session is swapped out, is refused (typed, nothing changed) when neither has room, and is
//! released on close.

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
fn paused_state_is_charged_with_kv_within_capacity() {
    let mut v = vmu(4, 5);
    let bb = v.plan().block_bytes;
    let (a, b, c) = (v.open_session().unwrap(), v.open_session().unwrap(), v.open_session().unwrap());
    let mut slots = Vec::new();
    v.append(a, 32, &mut slots).unwrap(); // 2 blocks of KV
                                          // 1.5 blocks of state: 2 whole blocks on the device, counted as used KV.
    assert_eq!(v.hold_paused(a, bb + bb / 2, 0).unwrap(), Residency::Resident);
    assert_eq!(v.paused_blocks(), (2, 0));
    assert_eq!(v.stats().kv_used_bytes, 4 * bb);
    v.check_invariants();
    // Keeping blocks free for a step sends a state to the host pool, even with room on the device.
    assert_eq!(v.hold_paused(b, 1, 1).unwrap(), Residency::Swapped);
    // The device is full: b's state goes to the host pool.
    assert_eq!(v.hold_paused(b, 1, 0).unwrap(), Residency::Swapped);
    assert_eq!(v.paused_blocks(), (2, 1));
    // Swapping a out takes its state to the host pool too: 2 KV + 2 state + 1 = all 5 slots.
    v.end_step();
    v.swap_out(&[a]).unwrap();
    assert_eq!(v.paused_residency(a).unwrap(), Some(Residency::Swapped));
    assert_eq!(v.paused_blocks(), (0, 3));
    assert_eq!(v.stats().kv_used_bytes, 0);
    v.check_invariants();
    // Resident KV and a held state never exceed the capacity: b's KV grows into the 4 blocks.
    v.append(b, 64, &mut slots).unwrap();
    v.check_invariants();
    // Admission sees the held state: nothing is free for a new session.
    assert!(matches!(v.open_session(), Err(VmuError::AdmissionRefused { .. })));
    // Neither has room now: refused, typed, nothing changed.
    match v.hold_paused(c, 2 * bb, 0) {
        Err(VmuError::PausedNoRoom { needed_blocks: 2, free_device_blocks: 0, .. }) => {}
        other => panic!("expected PausedNoRoom, got {other:?}"),
    }
    assert_eq!(v.paused_blocks(), (0, 3));
    // Replacing a charge counts the old one as free; releasing and closing give it back.
    assert_eq!(v.hold_paused(a, 2 * bb, 0).unwrap(), Residency::Swapped);
    v.release_paused(b).unwrap();
    assert_eq!(v.paused_residency(b).unwrap(), None);
    v.close_session(a).unwrap();
    assert_eq!(v.paused_blocks(), (0, 0));
    v.check_invariants();
    assert!(v.stats().kv_used_bytes_peak <= v.stats().kv_blocks_total * bb);
}
