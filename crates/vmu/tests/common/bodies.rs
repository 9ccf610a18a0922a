//! VMU conformance bodies, generic over the backend: each takes an `Arc<B>` and returns
//! `Err(message)` on failure. Included by `crates/vmu/tests/conformance.rs` (CPU) and by the root
//! `tests/vmu_conformance.rs` (CPU and CUDA), so every backend runs the same bodies.
//!
//! Contents are checked bit-exactly against a host-side shadow: every block a session writes
//! is filled with fresh random bytes, and a session's bytes are read back through the backend
//! after any interleaving of append, fork, swap-out, swap-in and close.

#![allow(dead_code)]

use std::sync::Arc;

use djinn_backend::{Backend, DType, KvLayout};
use djinn_vmu::prometheus::Registry;
use djinn_vmu::{Residency, SessionId, Vmu, VmuConfig, VmuError};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

pub type Body<B> = fn(Arc<B>) -> Result<(), String>;

/// Every body, by name.
pub fn bodies<B: Backend>() -> Vec<(&'static str, Body<B>)> {
    vec![
        ("acceptance_eight_sessions_capacity_for_two", acceptance_eight_sessions::<B>),
        ("random_interleavings_preserve_contents", random_interleavings::<B>),
        ("admission_control_refuses_new_keeps_old", admission_control::<B>),
        ("fork_copy_on_write", fork_copy_on_write::<B>),
        ("weights_shared_and_refcounted", weights_shared::<B>),
        ("gather_path_swaps_bit_exact", gather_path::<B>),
    ]
}

/// 2 layers × K/V × 2 heads × 16 tokens × 16 dims × f16 = 4 KiB blocks.
fn layout() -> KvLayout {
    KvLayout { layers: 2, kv_heads: 2, head_dim: 16, block_tokens: 16, dtype: DType::F16 }
}

fn config(kv_blocks: usize, host_blocks: usize) -> VmuConfig {
    let bb = layout().block_bytes();
    let mut c = VmuConfig::new(layout());
    c.weights_bytes = 1 << 20;
    c.kv_capacity_bytes = Some(kv_blocks * bb);
    c.host_swap_bytes = Some(host_blocks * bb);
    c.scratch_bytes = 1 << 20;
    c.swap_staging_bytes = 4 * bb;
    c.max_sessions = 32;
    c.max_context_tokens = 1024;
    c
}

/// SplitMix64: deterministic random bytes without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn fill(&mut self, out: &mut [u8]) {
        for c in out.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// The host-side truth: one byte vector per block, per session.
struct Shadow {
    id: SessionId,
    blocks: Vec<Vec<u8>>,
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Appends `n` tokens and fills every block the append touched with fresh random bytes.
fn append_and_fill<B: Backend>(vmu: &mut Vmu<B>, s: &mut Shadow, n: usize, rng: &mut Rng) -> Result<(), VmuError> {
    let bt = vmu.layout().block_tokens;
    let bb = vmu.plan().block_bytes;
    let mut slots = Vec::new();
    let pos = vmu.append(s.id, n, &mut slots)?;
    assert_eq!(slots.len(), n);
    if n == 0 {
        return Ok(());
    }
    let table = vmu.block_table(s.id)?.to_vec();
    for (p, &slot) in pos.clone().zip(&slots) {
        assert_eq!(slot, table[p / bt] * bt as i32 + (p % bt) as i32, "slot of position {p}");
    }
    let l = *vmu.layout();
    let ds = l.dtype.size_bytes();
    for blk in pos.start / bt..=(pos.end - 1) / bt {
        assert!(!vmu.is_block_shared(s.id, blk)?, "append left block {blk} shared");
        if blk >= s.blocks.len() {
            // A fresh block: define all of it (its unwritten tail is whatever a copy carries).
            assert_eq!(blk, s.blocks.len());
            let mut bytes = vec![0u8; bb];
            rng.fill(&mut bytes);
            vmu.write_session_block(s.id, blk, 0, &bytes)?;
            s.blocks.push(bytes);
            continue;
        }
        // An existing partial block: write only the new tokens, as kv_append would, so the
        // earlier tokens must have survived (copy-on-write, swaps) on their own.
        let (t0, t1) = (pos.start.max(blk * bt) - blk * bt, pos.end.min((blk + 1) * bt) - blk * bt);
        for layer in 0..l.layers {
            for kv in 0..2 {
                for head in 0..l.kv_heads {
                    let off = l.elem_in_block(layer, kv, head, t0) * ds;
                    let len = (t1 - t0) * l.head_dim * ds;
                    let mut bytes = vec![0u8; len];
                    rng.fill(&mut bytes);
                    vmu.write_session_block(s.id, blk, off, &bytes)?;
                    s.blocks[blk][off..off + len].copy_from_slice(&bytes);
                }
            }
        }
    }
    Ok(())
}

/// Brings the session in and compares every block with the shadow.
fn verify<B: Backend>(vmu: &mut Vmu<B>, s: &Shadow) -> Result<(), String> {
    vmu.ensure_resident(&[s.id]).map_err(err)?;
    let mut got = Vec::new();
    vmu.read_session(s.id, &mut got).map_err(err)?;
    let want: Vec<u8> = s.blocks.concat();
    if got != want {
        let bb = vmu.plan().block_bytes;
        let first = (0..want.len().min(got.len())).find(|&i| got[i] != want[i]);
        return Err(format!(
            "session {}: contents differ ({} vs {} bytes; first difference at byte {first:?}, block {:?})",
            s.id,
            got.len(),
            want.len(),
            first.map(|i| i / bb)
        ));
    }
    Ok(())
}

fn check_capacity<B: Backend>(vmu: &Vmu<B>) -> Result<(), String> {
    let st = vmu.stats();
    let cap = st.kv_blocks_total * vmu.plan().block_bytes;
    if st.kv_used_bytes > cap || st.kv_used_bytes_peak > cap {
        return Err(format!("KV used {} (peak {}) exceeds capacity {cap}", st.kv_used_bytes, st.kv_used_bytes_peak));
    }
    Ok(())
}

/// A metric's value read back from the registry (counters and gauges; summed over labels).
pub fn metric(reg: &Registry, name: &str) -> Option<f64> {
    let fams = reg.gather();
    let f = fams.iter().find(|f| f.name() == name)?;
    use djinn_vmu::prometheus::proto::MetricType;
    let kind = f.get_field_type();
    Some(
        f.get_metric()
            .iter()
            .map(|m| match kind {
                MetricType::COUNTER => m.get_counter().get_value(),
                MetricType::GAUGE => m.get_gauge().get_value(),
                _ => m.get_histogram().get_sample_count() as f64,
            })
            .sum(),
    )
}

/// The acceptance scenario: eight sessions, KV capacity for about two, each appending
/// random K/V blocks step by step in turn; all contents bit-identical at the end, used bytes
/// never above capacity, swaps counted in the metrics.
pub fn acceptance_eight_sessions<B: Backend>(be: Arc<B>) -> Result<(), String> {
    const SESSIONS: usize = 8;
    const STEPS: usize = 10;
    // Sessions end at ≤ 10 steps × 24 tokens = 240 tokens = 15 blocks; capacity ≈ two of them.
    let reg = Registry::new();
    let mut vmu = Vmu::new(be, config(30, SESSIONS * 16 + 8), &reg).map_err(err)?;
    let mut rng = Rng(0xD11A);
    let mut shadows = Vec::new();
    for _ in 0..SESSIONS {
        shadows.push(Shadow { id: vmu.open_session().map_err(err)?, blocks: Vec::new() });
    }
    for _step in 0..STEPS {
        for s in shadows.iter_mut() {
            vmu.ensure_resident(&[s.id]).map_err(err)?;
            let n = 8 + (rng.next() % 17) as usize;
            append_and_fill(&mut vmu, s, n, &mut rng).map_err(err)?;
            check_capacity(&vmu)?;
            vmu.end_step();
        }
        vmu.check_invariants();
    }
    for s in &shadows {
        verify(&mut vmu, s)?;
        check_capacity(&vmu)?;
        vmu.end_step();
    }
    vmu.sync().map_err(err)?;
    let outs = metric(&reg, "djinn_swap_out_total").ok_or("djinn_swap_out_total not registered")?;
    let ins = metric(&reg, "djinn_swap_in_total").ok_or("djinn_swap_in_total not registered")?;
    let out_bytes = metric(&reg, "djinn_swap_out_bytes_total").unwrap_or(0.0);
    let cap = metric(&reg, "djinn_kv_capacity_bytes").unwrap_or(0.0);
    let peak = metric(&reg, "djinn_kv_used_bytes_peak").unwrap_or(f64::MAX);
    let hist = metric(&reg, "djinn_swap_seconds").unwrap_or(0.0);
    if outs < SESSIONS as f64 || ins < SESSIONS as f64 || out_bytes <= 0.0 {
        return Err(format!("expected swaps in the metrics: out {outs}, in {ins}, out bytes {out_bytes}"));
    }
    if peak > cap || cap != (30 * layout().block_bytes()) as f64 {
        return Err(format!("metrics: peak {peak} vs capacity {cap}"));
    }
    if hist < outs + ins {
        return Err(format!("swap latency histogram has {hist} samples for {} swaps", outs + ins));
    }
    for s in &shadows {
        vmu.close_session(s.id).map_err(err)?;
    }
    vmu.check_invariants();
    let st = vmu.stats();
    if st.kv_blocks_free != st.kv_blocks_total || st.host_blocks_free != st.host_blocks_total {
        return Err(format!("leak after closing everything: {st:?}"));
    }
    Ok(())
}

#[derive(Clone, Debug)]
enum Op {
    Open,
    Close(usize),
    Append(usize, usize),
    Fork(usize),
    SwapOut(usize),
    EnsureResident(usize, usize),
    Prefetch(usize),
    Verify(usize),
    EndStep,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::Open),
        1 => any::<usize>().prop_map(Op::Close),
        6 => (any::<usize>(), 1usize..40).prop_map(|(s, n)| Op::Append(s, n)),
        1 => any::<usize>().prop_map(Op::Fork),
        2 => any::<usize>().prop_map(Op::SwapOut),
        2 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Op::EnsureResident(a, b)),
        1 => any::<usize>().prop_map(Op::Prefetch),
        1 => any::<usize>().prop_map(Op::Verify),
        2 => Just(Op::EndStep),
    ]
}

/// Errors the VMU may legitimately return under pressure; anything else fails the test.
fn expected_pressure(e: &VmuError) -> bool {
    matches!(
        e,
        VmuError::KvExhausted { .. }
            | VmuError::AdmissionRefused { .. }
            | VmuError::TooManySessions { .. }
            | VmuError::ContextFull { .. }
    )
}

fn run_ops<B: Backend>(be: Arc<B>, ops: &[Op], seed: u64, gather: bool, swaps: &mut f64) -> Result<(), TestCaseError> {
    let fail = |e: String| TestCaseError::fail(e);
    let reg = Registry::new();
    let mut cfg = config(24, 48);
    // Both swap paths: straight copies per run, or gather/scatter through staging.
    cfg.direct_swap_min_run_bytes = Some(if gather { usize::MAX } else { 0 });
    let mut vmu = Vmu::new(be, cfg, &reg).map_err(|e| fail(err(e)))?;
    let mut rng = Rng(seed);
    let mut live: Vec<Shadow> = Vec::new();
    for op in ops {
        let res: Result<(), VmuError> = match *op {
            Op::Open => vmu.open_session().map(|id| live.push(Shadow { id, blocks: Vec::new() })),
            Op::Close(i) if !live.is_empty() => {
                let s = live.swap_remove(i % live.len());
                vmu.close_session(s.id)
            }
            Op::Append(i, n) if !live.is_empty() => {
                let i = i % live.len();
                append_and_fill(&mut vmu, &mut live[i], n, &mut rng)
            }
            Op::Fork(i) if !live.is_empty() => {
                let i = i % live.len();
                vmu.fork(live[i].id).map(|id| {
                    let blocks = live[i].blocks.clone();
                    live.push(Shadow { id, blocks });
                })
            }
            Op::SwapOut(i) if !live.is_empty() => vmu.swap_out(&[live[i % live.len()].id]),
            Op::EnsureResident(a, b) if !live.is_empty() => {
                let ids = [live[a % live.len()].id, live[b % live.len()].id];
                vmu.ensure_resident(&ids).map(|()| {
                    for id in ids {
                        assert_eq!(vmu.residency(id).unwrap(), Residency::Resident);
                    }
                })
            }
            Op::Prefetch(i) if !live.is_empty() => {
                let id = live[i % live.len()].id;
                vmu.prefetch(&[id]).map(|()| assert_eq!(vmu.residency(id).unwrap(), Residency::Resident))
            }
            Op::Verify(i) if !live.is_empty() => {
                let i = i % live.len();
                match verify(&mut vmu, &live[i]) {
                    Err(e) if !e.contains("out of KV memory") => return Err(fail(e)),
                    _ => Ok(()),
                }
            }
            Op::EndStep => {
                vmu.end_step();
                Ok(())
            }
            _ => Ok(()),
        };
        if let Err(e) = res {
            if !expected_pressure(&e) {
                return Err(fail(format!("{op:?}: unexpected error {e}")));
            }
        }
        vmu.check_invariants();
        check_capacity(&vmu).map_err(fail)?;
    }
    // Everything written is still there, whatever happened. Resident sessions first (no swap
    // needed), closing each; then the swapped ones fit back in one by one.
    vmu.end_step();
    live.sort_by_key(|s| vmu.residency(s.id).unwrap() == Residency::Swapped);
    for s in live.drain(..) {
        verify(&mut vmu, &s).map_err(fail)?;
        vmu.end_step();
        vmu.close_session(s.id).map_err(|e| fail(err(e)))?;
    }
    vmu.check_invariants();
    *swaps += metric(&reg, "djinn_swap_out_total").unwrap_or(0.0) + metric(&reg, "djinn_swap_in_total").unwrap_or(0.0);
    let st = vmu.stats();
    prop_assert_eq!(st.kv_blocks_free, st.kv_blocks_total, "device blocks leaked");
    prop_assert_eq!(st.host_blocks_free, st.host_blocks_total, "host slots leaked");
    Ok(())
}

/// Property test: random interleavings of open/append/fork/swap-out/swap-in/close over many
/// sessions keep the invariants (no overlap, no leak, capacity) and every byte.
pub fn random_interleavings<B: Backend>(be: Arc<B>) -> Result<(), String> {
    let cases = std::env::var("DJINN_VMU_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48);
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let strategy = (proptest::collection::vec(op_strategy(), 1..120), any::<u64>(), any::<bool>());
    let swaps = std::cell::Cell::new(0.0);
    runner
        .run(&strategy, |(ops, seed, gather)| {
            let mut n = swaps.get();
            let r = run_ops(be.clone(), &ops, seed, gather, &mut n);
            swaps.set(n);
            r
        })
        .map_err(|e| e.to_string())?;
    // The generated interleavings must actually exercise the swap engine.
    if swaps.get() < cases as f64 {
        return Err(format!("only {} swaps over {cases} cases: the test does not stress swapping", swaps.get()));
    }
    Ok(())
}

/// Device and host both full: a new session is refused with a clear error; the old ones keep
/// their contents.
pub fn admission_control<B: Backend>(be: Arc<B>) -> Result<(), String> {
    let reg = Registry::new();
    let mut vmu = Vmu::new(be, config(4, 4), &reg).map_err(err)?;
    let mut rng = Rng(7);
    let mut a = Shadow { id: vmu.open_session().map_err(err)?, blocks: Vec::new() };
    append_and_fill(&mut vmu, &mut a, 64, &mut rng).map_err(err)?; // 4 blocks: device full
    vmu.end_step();
    let mut b = Shadow { id: vmu.open_session().map_err(err)?, blocks: Vec::new() };
    append_and_fill(&mut vmu, &mut b, 64, &mut rng).map_err(err)?; // swaps `a` out: host full
    vmu.end_step();
    if vmu.residency(a.id).map_err(err)? != Residency::Swapped {
        return Err("session a should have been swapped out".into());
    }
    match vmu.open_session() {
        Err(VmuError::AdmissionRefused { free_device_blocks: 0, free_host_blocks: 0, .. }) => {}
        other => return Err(format!("expected AdmissionRefused, got {other:?}")),
    }
    // Growing b needs a block nobody can give: an error, and nothing lost.
    let mut slots = Vec::new();
    match vmu.append(b.id, 1, &mut slots) {
        Err(VmuError::KvExhausted { .. }) => {}
        other => return Err(format!("expected KvExhausted, got {other:?}")),
    }
    if metric(&reg, "djinn_vmu_admission_refused_total") != Some(1.0) {
        return Err("admission refusal not counted".into());
    }
    verify(&mut vmu, &b)?;
    vmu.end_step();
    // Bringing `a` back needs b's blocks, and the host pool is full: refused, both intact.
    match vmu.ensure_resident(&[a.id]) {
        Err(VmuError::KvExhausted { .. }) => {}
        other => return Err(format!("expected KvExhausted swapping a in, got {other:?}")),
    }
    vmu.end_step();
    vmu.close_session(b.id).map_err(err)?;
    verify(&mut vmu, &a)?;
    vmu.end_step();
    // `a` fills the whole device: a fifth block cannot come from anywhere.
    match append_and_fill(&mut vmu, &mut a, 1, &mut rng) {
        Err(VmuError::KvExhausted { .. }) => {}
        other => return Err(format!("expected KvExhausted growing a, got {other:?}")),
    }
    verify(&mut vmu, &a)?;
    vmu.check_invariants();
    Ok(())
}

/// Fork shares every block; an append into the shared partial block copies it first; the
/// parent's bytes are untouched by the child's writes.
pub fn fork_copy_on_write<B: Backend>(be: Arc<B>) -> Result<(), String> {
    let reg = Registry::new();
    let mut vmu = Vmu::new(be, config(16, 16), &reg).map_err(err)?;
    let mut rng = Rng(11);
    let mut p = Shadow { id: vmu.open_session().map_err(err)?, blocks: Vec::new() };
    append_and_fill(&mut vmu, &mut p, 40, &mut rng).map_err(err)?; // 2 full blocks + 8 tokens
    let c_id = vmu.fork(p.id).map_err(err)?;
    let mut c = Shadow { id: c_id, blocks: p.blocks.clone() };
    let used_before = vmu.stats().kv_blocks_free;
    if vmu.block_table(p.id).map_err(err)? != vmu.block_table(c.id).map_err(err)? {
        return Err("fork did not share the block table".into());
    }
    for i in 0..3 {
        if !vmu.is_block_shared(c.id, i).map_err(err)? {
            return Err(format!("block {i} not shared after fork"));
        }
    }
    append_and_fill(&mut vmu, &mut c, 4, &mut rng).map_err(err)?; // CoW of the partial block
    if vmu.stats().kv_blocks_free != used_before - 1 {
        return Err("CoW should take exactly one block".into());
    }
    let (tp, tc) = (vmu.block_table(p.id).map_err(err)?.to_vec(), vmu.block_table(c.id).map_err(err)?.to_vec());
    if tp[..2] != tc[..2] || tp[2] == tc[2] {
        return Err(format!("after CoW: parent {tp:?}, child {tc:?}"));
    }
    verify(&mut vmu, &p)?;
    verify(&mut vmu, &c)?;
    vmu.end_step();
    // Swapping a sharer out and back keeps both intact (it comes back with private copies).
    vmu.swap_out(&[p.id]).map_err(err)?;
    verify(&mut vmu, &c)?;
    verify(&mut vmu, &p)?;
    vmu.close_session(p.id).map_err(err)?;
    verify(&mut vmu, &c)?;
    vmu.close_session(c.id).map_err(err)?;
    vmu.check_invariants();
    let st = vmu.stats();
    if st.kv_blocks_free != st.kv_blocks_total {
        return Err(format!("leak: {st:?}"));
    }
    Ok(())
}

/// Weights are allocated once per model and shared; the last lease frees them; bytes written
/// into the weights region stay put across KV traffic.
pub fn weights_shared<B: Backend>(be: Arc<B>) -> Result<(), String> {
    let reg = Registry::new();
    let mut vmu = Vmu::new(be.clone(), config(8, 8), &reg).map_err(err)?;
    let a = vmu.alloc_weights("llama", 300_000).map_err(err)?;
    let b = vmu.alloc_weights("llama", 300_000).map_err(err)?;
    if !a.is_fresh() || b.is_fresh() || a.offset() != b.offset() {
        return Err(format!("sharing: {a:?} {b:?}"));
    }
    let other = vmu.alloc_weights("qwen", 500_000).map_err(err)?;
    if other.offset() < a.offset() + a.len_bytes() && a.offset() < other.offset() + other.len_bytes() {
        return Err("two models overlap".into());
    }
    if vmu.alloc_weights("too-big", 1 << 20).is_ok() {
        return Err("over-allocation of the weights region succeeded".into());
    }
    let mut w = vec![0u8; 300_000];
    Rng(3).fill(&mut w);
    be.write(vmu.region(), a.offset(), &w).map_err(err)?;
    let mut rng = Rng(5);
    let mut s = Shadow { id: vmu.open_session().map_err(err)?, blocks: Vec::new() };
    append_and_fill(&mut vmu, &mut s, 100, &mut rng).map_err(err)?;
    vmu.end_step();
    let mut back = vec![0u8; w.len()];
    be.read(vmu.region(), a.offset(), &mut back).map_err(err)?;
    if back != w {
        return Err("weights bytes changed".into());
    }
    let off = a.offset();
    drop(a);
    drop(b);
    let c = vmu.alloc_weights("llama", 300_000).map_err(err)?;
    if !c.is_fresh() || c.offset() != off {
        return Err(format!("freed range not reused: {c:?}, was at {off}"));
    }
    let p = vmu.alloc_persistent(1000, 4096).map_err(err)?;
    if p.offset() % 4096 != 0 {
        return Err("persistent alignment".into());
    }
    let parts = vmu.step_parts();
    let x = parts.scratch.alloc(1000, 256).map_err(err)?;
    if x < vmu.plan().scratch_offset || x % 256 != 0 {
        return Err("scratch offset outside the scratch region".into());
    }
    Ok(())
}

/// Forces the staging path (gather_blocks → d2h, h2d → scatter_blocks) with fragmented block
/// runs and several staging chunks, and checks the bytes.
pub fn gather_path<B: Backend>(be: Arc<B>) -> Result<(), String> {
    let reg = Registry::new();
    let mut cfg = config(24, 48);
    cfg.direct_swap_min_run_bytes = Some(usize::MAX);
    let mut vmu = Vmu::new(be, cfg, &reg).map_err(err)?;
    let mut rng = Rng(99);
    let mut ss: Vec<Shadow> = (0..3).map(|_| Shadow { id: vmu.open_session().unwrap(), blocks: Vec::new() }).collect();
    // Interleaved appends give each session every third block: runs of one.
    for _ in 0..7 {
        for s in ss.iter_mut() {
            append_and_fill(&mut vmu, s, 16, &mut rng).map_err(err)?;
        }
    }
    let ids: Vec<SessionId> = ss.iter().map(|s| s.id).collect();
    vmu.swap_out(&ids).map_err(err)?;
    for s in &ss {
        verify(&mut vmu, s)?;
        vmu.end_step();
    }
    if metric(&reg, "djinn_swap_in_total") != Some(3.0) {
        return Err("expected three swap-ins".into());
    }
    vmu.check_invariants();
    Ok(())
}
