//! The semantic-blind baseline (`djinn_dataplane::blind`) against a real server process, once
//! per transport: greedy tokens identical to the in-process engine's on every committed reference
//! model (every recorded prompt), every remote tensor freed afterwards, and the K/V cache
//! visibly travelling both ways each step. SmolLM2 (`models/smollm2-135m-instruct`) runs the
//! same check when present; without it the trial is reported as ignored, with the reason.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::{server, Transport};
use djinn_backend::cpu::CpuBackend;
use djinn_backend::SampleParams;
use djinn_client::{Client, ClientOptions};
use djinn_model::testing::{argmax, read_reference, reference_root, REFERENCE_MODELS};
use djinn_model::{Engine, EngineOptions, ModelConfig};
use libtest_mimic::{Arguments, Failed, Trial};

const NEW_TOKENS: usize = 8;
/// SmolLM2 as fetched (f32), and its bf16 conversion (bf16 weights, f32 activations).
const SMOLLM2_DIRS: [(&str, &str); 2] =
    [("smollm2", "models/smollm2-135m-instruct"), ("smollm2_bf16", "models/smollm2-bf16")];

/// The in-process engine's greedy continuation of `prompt` (CPU backend, default options) and
/// its mean decode-step time in ms.
fn engine_greedy(dir: &Path, prompt: &[u32], n: usize) -> (Vec<u32>, f64) {
    let be = Arc::new(CpuBackend::with_threads(2).expect("cpu backend"));
    let mut eng = Engine::load_dir(be, dir, &EngineOptions::default()).expect("load engine");
    let sid = eng.open_session().unwrap();
    let mut logits = Vec::new();
    eng.prefill(sid, prompt, false, &mut logits).unwrap();
    let mut out = vec![argmax(&logits) as u32];
    let greedy = [SampleParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, step: 0 }];
    let mut ids = Vec::new();
    let t0 = std::time::Instant::now();
    while out.len() < n {
        eng.step_sample(&[(sid, &[*out.last().unwrap()])], &greedy, &mut ids).unwrap();
        out.push(ids[0]);
    }
    (out, t0.elapsed().as_secs_f64() * 1e3 / (n - 1).max(1) as f64)
}

fn stat(c: &mut Client, key: &str) -> u64 {
    c.stats().unwrap().iter().find(|(k, _)| k == key).map(|(_, v)| *v).unwrap_or_else(|| panic!("no stat {key}"))
}

/// Runs the baseline for each prompt on a fresh server over `t`; checks tokens, cleanup and
/// traffic; prints the bytes and time per step.
fn check(dir: &Path, prompts: &[Vec<u32>], n: usize, t: Transport) -> Result<(), Failed> {
    let cfg = ModelConfig::load(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let srv = server(t, &[]);
    let mut c = Client::connect_with(srv.url(), &ClientOptions::default()).map_err(|e| e.to_string())?;
    for prompt in prompts {
        let (want, local_ms) = engine_greedy(dir, prompt, n);
        let run = djinn_dataplane::blind::run(&mut c, dir, prompt, n).map_err(|e| format!("{e:#}"))?;
        if run.tokens != want {
            return Err(
                format!("{}: prompt {prompt:?}: blind {:?} vs engine {want:?}", dir.display(), run.tokens).into()
            );
        }
        assert_eq!(run.step_ms.len(), n);
        assert_eq!(stat(&mut c, "tensors_live"), 0, "every remote tensor is freed");
        // The cache goes up and comes back every step: at least the whole final cache each way.
        let ctx = prompt.len() + n - 1;
        let cache_bytes = (2 * cfg.layers * cfg.kv_heads * cfg.head_dim * 4) as u64;
        let (up_min, down_min) = (cache_bytes * (ctx - prompt.len()) as u64, cache_bytes * ctx as u64);
        assert!(run.bytes_sent >= up_min, "sent {} < the caches' {up_min}", run.bytes_sent);
        assert!(run.bytes_received >= down_min, "received {} < the caches' {down_min}", run.bytes_received);
        let steps = (n - 1).max(1) as f64;
        let mean_ms = run.step_ms[1..].iter().sum::<f64>() / steps;
        eprintln!(
            "blind {} over {}: prompt {} + {n} tokens; upload {} B; per decode step (mean of {}) {:.0} B sent, \
             {:.0} B received, {mean_ms:.2} ms ({:.1}x in-process {local_ms:.2} ms); first step {:.2} ms",
            dir.file_name().unwrap().to_string_lossy(),
            t.name(),
            prompt.len(),
            run.upload_bytes,
            n - 1,
            decode_bytes(&cfg, prompt.len(), n, true, &run),
            decode_bytes(&cfg, prompt.len(), n, false, &run),
            mean_ms / local_ms,
            run.step_ms[0],
        );
    }
    Ok(())
}

/// Mean bytes of the decode steps (the prompt step's share estimated from the cache sizes and
/// subtracted: the cache it sends is empty and it gets `prompt` positions back).
fn decode_bytes(cfg: &ModelConfig, prompt: usize, n: usize, sent: bool, run: &djinn_dataplane::blind::BlindRun) -> f64 {
    let total = if sent { run.bytes_sent } else { run.bytes_received } as f64;
    if n < 2 {
        return total;
    }
    // Each step moves (cache in) up and (cache out) down; decode step i (1-based) has prompt+i-1
    // cached positions going up and prompt+i coming back; the prompt step sends none, gets prompt.
    let per_pos = (2 * cfg.layers * cfg.kv_heads * cfg.head_dim * 4) as f64;
    let cache_total: f64 = (1..n).map(|i| (prompt + i - if sent { 1 } else { 0 }) as f64 * per_pos).sum();
    let first_cache = if sent { 0.0 } else { prompt as f64 * per_pos };
    // What is not cache (headers, graphs, ids, frees) is spread evenly over the steps.
    let overhead = (total - cache_total - first_cache) / n as f64;
    cache_total / (n - 1) as f64 + overhead
}

/// `rel` under the working directory or the workspace, if it holds a checkpoint.
fn model_dir(rel: &str) -> Option<PathBuf> {
    [PathBuf::from(rel), Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)]
        .into_iter()
        .find(|p| p.join("config.json").is_file() && p.join("model.safetensors").is_file())
}

fn main() {
    let args = Arguments::from_args();
    let missing: Vec<Option<String>> = Transport::ALL.iter().map(|t| t.unavailable()).collect();
    for (t, why) in Transport::ALL.iter().zip(&missing) {
        if let Some(why) = why {
            eprintln!("NOTE: {} trials ignored: {why}", t.name());
        }
    }
    let smol: Vec<(&str, Option<PathBuf>)> = SMOLLM2_DIRS.iter().map(|&(n, rel)| (n, model_dir(rel))).collect();
    for ((name, dir), (_, rel)) in smol.iter().zip(SMOLLM2_DIRS) {
        if dir.is_none() {
            eprintln!("NOTE: {name} trials ignored: {rel} is missing (the models issue's script fetches it)");
        }
    }
    let mut trials = Vec::new();
    for (t, why) in Transport::ALL.into_iter().zip(missing.clone()) {
        let t_ignored = why.is_some();
        for &name in REFERENCE_MODELS {
            trials.push(
                Trial::test(format!("{name}_{}", t.name()), move || {
                    let dir = reference_root().join(name);
                    let reference = read_reference(&dir).map_err(|e| e.to_string())?;
                    let prompts: Vec<Vec<u32>> = reference.cases.iter().map(|c| c.prompt.clone()).collect();
                    check(&dir, &prompts, NEW_TOKENS, t)
                })
                .with_ignored_flag(t_ignored),
            );
        }
        for (name, dir) in smol.iter().cloned() {
            let missing = dir.is_none();
            trials.push(
                Trial::test(format!("{name}_{}", t.name()), move || {
                    let dir = dir.ok_or("SmolLM2 missing")?;
                    // A 16-token chat prompt, as in the session targets.
                    let prompt: Vec<u32> =
                        vec![1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 30, 2, 198, 1, 4093];
                    check(&dir, &[prompt], NEW_TOKENS, t)
                })
                .with_ignored_flag(t_ignored || missing),
            );
        }
    }
    libtest_mimic::run(&args, trials).exit();
}
