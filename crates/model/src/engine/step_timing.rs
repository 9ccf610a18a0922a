//! Timing, not a check: batched decode steps of SmolLM2-135M (bf16 weights, f32 KV) on the CPU
//! backend with every core (or one thread, timed by its CPU time), in process, so a shared machine's load disturbs it less than a served
//! benchmark: the best and the median of many steps. Run with `cargo test --release -p
//! djinn-model --lib decode_step_timing -- --ignored --nocapture` (needs `models/smollm2-bf16`).

use std::path::Path;
use std::sync::Arc;

use djinn_backend::cpu::CpuBackend;
use djinn_backend::{DType, SampleParams};

use super::{Engine, EngineOptions, SessionId};

const GREEDY: SampleParams = SampleParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, step: 0 };

#[test]
#[ignore = "timing; run by hand in release with the SmolLM2 checkpoint"]
fn decode_step_timing() {
    step_times(CpuBackend::new().unwrap(), "wall", |t0| t0.elapsed().as_secs_f64());
}

/// The same steps on one thread, timed by the thread's own CPU time (`/proc/thread-self/schedstat`):
/// what a step costs whatever else the machine runs (time sliced away is not counted), so two
/// builds compare on a loaded host. Prints the 16-row steps' cost per row against one row's.
/// Run with `cargo test --release -p djinn-model --lib decode_step_cpu_time -- --ignored
/// --nocapture`.
#[test]
#[ignore = "timing; run by hand in release with the SmolLM2 checkpoint"]
fn decode_step_cpu_time() {
    fn cpu_ns() -> u64 {
        let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
        s.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0)
    }
    let start = std::cell::Cell::new(0u64);
    step_times(CpuBackend::with_threads(1).unwrap(), "one thread's CPU", |_| {
        let now = cpu_ns();
        (now - start.replace(now)) as f64 * 1e-9
    });
}

/// Runs the batches and prints the best and median of `elapsed(t0)` per step (`elapsed` is
/// called once right before a step, whose value it may ignore, and once after).
fn step_times(be: CpuBackend, what: &str, elapsed: impl Fn(std::time::Instant) -> f64) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/smollm2-bf16");
    if !dir.join("config.json").exists() {
        eprintln!("skipped: no {}", dir.display());
        return;
    }
    let be = Arc::new(be);
    let opts = EngineOptions {
        dtype: Some(DType::BF16),
        max_sessions: 40,
        max_step_tokens: 512,
        max_context_tokens: Some(512),
        ..EngineOptions::default()
    };
    let mut eng = Engine::load_dir(be, &dir, &opts).unwrap();
    let prompt: Vec<u32> = (0..32u32).map(|i| (i * 7919 + 11) % 40000 + 100).collect();
    // Batches as the load benchmark's steps hold them: one decode; 16 decodes; 16 decodes beside
    // a 16-token prompt chunk (each output token there costs a prompt row too).
    for (decodes, chunk) in [(1usize, 0usize), (16, 0), (16, 16)] {
        let ids: Vec<SessionId> = (0..decodes).map(|_| eng.open_session().unwrap()).collect();
        let mut out = Vec::new();
        for &id in &ids {
            eng.prefill(id, &prompt, false, &mut out).unwrap();
        }
        let mut next: Vec<u32> = vec![prompt[0]; decodes];
        let mut times = Vec::new();
        let params = vec![GREEDY; decodes + 1];
        for step in 0..48 {
            let extra = if chunk > 0 { Some(eng.open_session().unwrap()) } else { None };
            let one: Vec<[u32; 1]> = next.iter().map(|&t| [t]).collect();
            let mut seqs: Vec<(SessionId, &[u32])> = ids.iter().zip(&one).map(|(&id, t)| (id, &t[..])).collect();
            if let Some(e) = extra {
                seqs.push((e, &prompt[..chunk]));
            }
            let mut toks = Vec::new();
            let t0 = std::time::Instant::now();
            elapsed(t0);
            eng.step_sample(&seqs, &params[..seqs.len()], &mut toks).unwrap();
            let dt = elapsed(t0);
            if step >= 8 {
                times.push(dt);
            }
            next.copy_from_slice(&toks[..decodes]);
            if let Some(e) = extra {
                eng.close_session(e).unwrap();
            }
        }
        for id in ids {
            eng.close_session(id).unwrap();
        }
        // The mean too: a thread's CPU time is read as the kernel last accounted it (up to a tick
        // stale), so single steps are coarse but their sum is exact.
        let mean = times.iter().sum::<f64>() / times.len() as f64;
        times.sort_by(f64::total_cmp);
        println!(
            "{what}: {decodes:2} decode rows + {chunk:2} prompt rows: step best {:.2} ms, median {:.2} ms, mean {:.2} ms",
            times[0] * 1e3,
            times[times.len() / 2] * 1e3,
            mean * 1e3
        );
    }
}
