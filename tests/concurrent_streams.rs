//! Two users of one device at once (libtest-mimic, `harness = false`): an engine decoding on one
//! thread while a tenant's Exec graphs run on another, both through the same backend value —
//! the server's situation. Each must get exactly what it gets alone, on the CPU backend.
//!
//! Both sides use what a GPU keeps in a stream's workspace between launches: the engine serves
//! bf16 weights (every projection converts its f32 activations into the workspace before the
//! GEMM) and samples with temperature, top-k and top-p (each row sorts in a workspace slot);
//! the Exec graph multiplies f32 activations by a bf16 matrix (the same conversion). Were the
//! two to share a stream's workspace or error word, results would be corrupted or errors
//! reported to the wrong side; the engine's own handle and the Exec lanes keep them apart.
//!
//! Checks, per decode step: logits within `LOGITS_REL_TOL` of the CPU engine's (teacher-forced:
//! both are fed the CPU run's tokens), and the sampled ids exactly what the CPU backend's
//! `sample` picks from the *same* logits (the sampling contract is exact). Per Exec round: the
//! output within `EXEC_REL_TOL` of the CPU's. `cuda::` trials without a GPU are reported ignored
//! with the reason.

mod gpu;

use std::sync::Arc;

use djinn_backend::cpu::CpuBackend;
use djinn_backend::{Backend, DType, SampleParams, View};
use djinn_model::testing::reference_root;
use djinn_model::{Engine, EngineOptions};
use djinn_proto::{DType as WireDType, ExecInput, ExecNode, ExecOp, ExecReq, TensorDesc};
use djinn_server::auth::TenantId;
use djinn_server::lanes::ExecLanes;
use djinn_server::metrics::Metrics;
use djinn_server::quota::Quotas;
use djinn_server::tensors::Store;
use djinn_server::ServerConfig;
use libtest_mimic::{Arguments, Failed, Trial};

type R<T = ()> = Result<T, Failed>;

/// bf16 weights and KV (~4e-3 per value), and on a GPU bf16 activations at every GEMM, over two
/// layers of unit-scale weights; corruption by another user's work is of the order of the logits.
const LOGITS_REL_TOL: f32 = 5e-2;
/// One bf16 rounding of the activations before the GEMM, then softmax and RMSNorm.
const EXEC_REL_TOL: f32 = 2e-2;
const MODEL: &str = "llama-gqa";
const SESSIONS: usize = 4;
const DECODE_STEPS: usize = 40;
const EXEC_ROUNDS: usize = 200;
/// Exec graph shapes: x `[M, K]` f32 · w `[N, K]` bf16ᵀ → softmax → RMSNorm with `[N]` weight.
const M: usize = 24;
const K: usize = 160;
const N: usize = 96;

fn failed(what: &str, e: impl std::fmt::Display) -> Failed {
    Failed::from(format!("{what}: {e}"))
}

fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    let max = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
    got.iter().zip(want).fold(0f32, |m, (g, w)| if (g - w).is_nan() { f32::INFINITY } else { m.max((g - w).abs()) })
        / max
}

fn params(step: usize) -> Vec<SampleParams> {
    (0..SESSIONS)
        .map(|i| SampleParams { temperature: 0.9, top_k: 40, top_p: 0.9, seed: 7 + i as u64, step: step as u64 })
        .collect()
}

/// What one decode run saw: per step, the fed tokens, the logits `[SESSIONS × vocab]` and the
/// sampled ids.
struct DecodeRun {
    vocab: usize,
    fed: Vec<Vec<u32>>,
    logits: Vec<Vec<f32>>,
    sampled: Vec<Vec<u32>>,
}

/// Prefills `SESSIONS` prompts and decodes `DECODE_STEPS` steps on `be`. With `force`, each step
/// feeds that run's tokens (teacher forcing) instead of this run's samples.
fn decode<B: Backend>(be: Arc<B>, force: Option<&DecodeRun>) -> R<DecodeRun> {
    let dir = reference_root().join(MODEL);
    let opts = EngineOptions {
        dtype: Some(DType::BF16),
        kv_dtype: DType::BF16,
        max_sessions: SESSIONS,
        max_step_tokens: 64,
        ..EngineOptions::default()
    };
    let mut eng = Engine::load_dir(be, &dir, &opts).map_err(|e| failed("engine", e))?;
    let vocab = eng.config().vocab_size;
    let ids: Vec<_> =
        (0..SESSIONS).map(|_| eng.open_session()).collect::<Result<_, _>>().map_err(|e| failed("open", e))?;
    let mut buf = Vec::new();
    let mut next: Vec<u32> = Vec::with_capacity(SESSIONS);
    for (i, &id) in ids.iter().enumerate() {
        let prompt: Vec<u32> = (0..5 + i as u32).map(|t| (t * 17 + i as u32 * 5 + 3) % vocab as u32).collect();
        eng.prefill(id, &prompt, false, &mut buf).map_err(|e| failed("prefill", e))?;
        next.push(prompt[prompt.len() - 1] ^ 1);
    }
    let mut run = DecodeRun { vocab, fed: Vec::new(), logits: Vec::new(), sampled: Vec::new() };
    for step in 0..DECODE_STEPS {
        if let Some(f) = force {
            next.clone_from(&f.fed[step]);
        }
        let seqs: Vec<(_, &[u32])> = ids.iter().zip(&next).map(|(&id, t)| (id, std::slice::from_ref(t))).collect();
        let (mut out, mut logits) = (Vec::new(), Vec::new());
        eng.step_sample_logits(&seqs, &params(step), &mut out, &mut logits).map_err(|e| failed("step", e))?;
        run.fed.push(next.clone());
        run.logits.push(logits);
        run.sampled.push(out.clone());
        next = out;
    }
    Ok(run)
}

/// The CPU backend's `sample` over `logits` `[rows × vocab]`: the exact ids every backend must pick.
fn cpu_sample(cpu: &CpuBackend, logits: &[f32], vocab: usize, step: usize) -> R<Vec<u32>> {
    let rows = logits.len() / vocab;
    let r = cpu.reserve(logits.len() * 4 + rows * 4).map_err(|e| failed("reserve", e))?;
    let bytes: Vec<u8> = logits.iter().flat_map(|x| x.to_le_bytes()).collect();
    cpu.write(&r, 0, &bytes).map_err(|e| failed("write", e))?;
    let (l, o) = (View::new(&r, 0, DType::F32, logits.len()), View::new(&r, logits.len() * 4, DType::I32, rows));
    cpu.sample(cpu.default_stream(), l, o, vocab, &params(step)).map_err(|e| failed("sample", e))?;
    let mut ids = vec![0u8; rows * 4];
    cpu.read(&r, logits.len() * 4, &mut ids).map_err(|e| failed("read", e))?;
    Ok(ids.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect())
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn values(n: usize, seed: u32, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) as f32 / (1 << 24) as f32 - 0.5)
        .map(|x| x * scale)
        .collect()
}

/// `EXEC_ROUNDS` Exec graphs (mixed-dtype MatMul → Softmax → RmsNorm) for one tenant, through a
/// server `Store` on `be` with its Exec lanes; returns each round's output.
fn exec_rounds<B: Backend>(be: Arc<B>) -> R<Vec<Vec<f32>>> {
    let cfg = ServerConfig::default();
    let lanes = ExecLanes::new(&be, 2, std::time::Duration::from_millis(cfg.exec_lane_wait_ms))
        .map_err(|e| failed("lanes", e))?;
    let store = Store::new(be.clone(), lanes, Quotas::new(&cfg), 1 << 30, Metrics::new("test"));
    let tenant = TenantId::Named("t".into());
    let inputs = [
        (WireDType::F32, vec![M as u64, K as u64], f32_bytes(&values(M * K, 1, 4.0))),
        (WireDType::BF16, vec![N as u64, K as u64], bf16_bytes(&values(N * K, 2, 0.5))),
        (WireDType::F32, vec![N as u64], f32_bytes(&values(N, 3, 2.0))),
    ];
    let mut handles = Vec::new();
    for (dt, shape, bytes) in inputs {
        let desc = TensorDesc::new(dt, &shape).map_err(|e| failed("desc", e))?;
        let res = store.reserve(&tenant, 1, desc.byte_len()).map_err(|e| failed("quota", e))?;
        let tensor = store.new_tensor(&desc).map_err(|e| failed("alloc", e))?;
        be.write(&tensor.region, 0, &bytes).map_err(|e| failed("write", e))?;
        handles.extend(store.insert(res, vec![tensor]));
    }
    let mut matmul = ExecNode::new(ExecOp::MatMul, &[ExecInput::Handle(handles[0]), ExecInput::Handle(handles[1])]);
    matmul.attrs_i64 = vec![1];
    let mut norm = ExecNode::new(ExecOp::RmsNorm, &[ExecInput::Node(1), ExecInput::Handle(handles[2])]);
    norm.attrs_f32 = vec![1e-5];
    let req =
        ExecReq { nodes: vec![matmul, ExecNode::new(ExecOp::Softmax, &[ExecInput::Node(0)]), norm], outputs: vec![2] };
    let mut outs = Vec::with_capacity(EXEC_ROUNDS);
    for round in 0..EXEC_ROUNDS {
        let made = djinn_server::exec::exec(&store, &tenant, &req, 16)
            .map_err(|e| failed(&format!("exec round {round}"), e.message))?;
        let (h, _) = made[0];
        let mut raw = vec![0u8; M * N * 4];
        store
            .with_table(&tenant, |t| t.get(h).map(|t| be.read(&t.region, 0, &mut raw)))
            .map_err(|e| failed("get", e))?
            .map_err(|e| failed("read", e))?;
        store.free(&tenant, &[h]).map_err(|e| failed("free", e))?;
        outs.push(raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect());
    }
    Ok(outs)
}

/// The trial body: the CPU reference alone, then `be` with both users at once.
fn engine_and_exec_concurrently<B: Backend>(be: Arc<B>, cpu: Arc<CpuBackend>) -> R {
    let want_decode = decode(cpu.clone(), None)?;
    let want_exec = exec_rounds(cpu.clone())?;
    let (got_decode, got_exec) = std::thread::scope(|s| {
        let d = s.spawn(|| decode(be.clone(), Some(&want_decode)));
        let x = s.spawn(|| exec_rounds(be.clone()));
        (d.join().expect("decode thread"), x.join().expect("exec thread"))
    });
    let (got_decode, got_exec) = (got_decode?, got_exec?);
    let vocab = want_decode.vocab;
    for step in 0..DECODE_STEPS {
        let err = rel_err(&got_decode.logits[step], &want_decode.logits[step]);
        if err > LOGITS_REL_TOL {
            return Err(
                format!("decode step {step}: logits off by {err} of the largest (tolerance {LOGITS_REL_TOL})").into()
            );
        }
        let want = cpu_sample(&cpu, &got_decode.logits[step], vocab, step)?;
        if got_decode.sampled[step] != want {
            return Err(format!(
                "decode step {step}: sampled {:?}, the sampling contract on the same logits gives {want:?}",
                got_decode.sampled[step]
            )
            .into());
        }
    }
    for (round, (got, want)) in got_exec.iter().zip(&want_exec).enumerate() {
        let err = rel_err(got, want);
        if err > EXEC_REL_TOL {
            return Err(
                format!("exec round {round}: output off by {err} of the largest (tolerance {EXEC_REL_TOL})").into()
            );
        }
    }
    Ok(())
}

struct Concurrent {
    cpu: Arc<CpuBackend>,
}

impl gpu::Suite for Concurrent {
    fn trials<B: Backend>(&self, kind: &str, backend: Result<Arc<B>, String>) -> Vec<Trial> {
        let name = format!("{kind}::engine_and_exec_concurrently");
        match backend {
            Ok(be) => {
                let cpu = self.cpu.clone();
                vec![Trial::test(name, move || engine_and_exec_concurrently(be, cpu))]
            }
            Err(why) => vec![gpu::ignored(name, &why)],
        }
    }
}

fn main() {
    let args = Arguments::from_args();
    let cpu = Arc::new(CpuBackend::new().expect("cpu backend"));
    let suite = Concurrent { cpu: cpu.clone() };
    let mut all = gpu::Suite::trials(&suite, "cpu", Ok(cpu));
    all.extend(gpu::cuda_trials("concurrent_streams", &suite));
    libtest_mimic::run(&args, all).exit();
}
