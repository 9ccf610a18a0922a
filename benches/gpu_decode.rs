//! Whole-model decode on the GPU (harness = false), each figure beside a bound or baseline
//! measured in the same run on the same device:
//!
//! * **bound**: a decode step reads every weight once, so it takes at least
//!   `weight bytes / copy bandwidth`, the copy bandwidth being a device-to-device `cuMemcpy`
//!   measured here (bytes read + written per second, the rate a streaming read can reach);
//!   reported as `step time / bound` (target ≤ 1.3 for the 7B shape at batch 1);
//! * **transformers**: with `--hf-dir DIR` (made on the same machine by `scripts/gpu_hf.py`, with
//!   torch + transformers), the same random SmolLM2-135M checkpoint is loaded from `DIR/smol`,
//!   its prompt logits compared with transformers' (`DIR/smol/reference.json`, float32 eager
//!   on the GPU over the same bf16 weights), and tokens/s set beside transformers' eager bf16
//!   decode (`DIR/hf.json`) of both shapes at the same batch sizes.
//!
//! Shapes: SmolLM2-135M (30 layers, hidden 576, 9 heads / 3 KV heads, head_dim 64, vocab 49152)
//! and Llama-2-7B (32 layers, hidden 4096, 32 heads, intermediate 11008, vocab 32000), bf16
//! weights and KV. Without `--hf-dir` the weights are random, made here in memory (no
//! checkpoint on disk: 7B in bf16 is 13.5 GB). Decode: `--steps` greedy steps per batch size
//! (1 and 16) after a 16-token prompt per sequence and two warm-up steps; each step samples on
//! the device and reads the ids back, as the server does.
//!
//! Flags: `--json PATH` writes every figure; `--hf-dir DIR`; `--steps N` (default 32);
//! `--shapes smol,7b`. Without a GPU it prints why and exits 0.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use djinn_backend::{Backend, DType, SampleParams};
use djinn_model::checkpoint::OwnedTensor;
use djinn_model::{Checkpoint, Engine, EngineOptions, ModelConfig};
use serde_json::{json, Value};

type Be = djinn_backend::cuda::CudaBackend;

const BATCHES: [usize; 2] = [1, 16];
const PROMPT_TOKENS: usize = 16;
const WARMUP_STEPS: usize = 2;
const GREEDY: SampleParams = SampleParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, step: 0 };

struct Shape {
    name: &'static str,
    layers: usize,
    hidden: usize,
    inter: usize,
    heads: usize,
    kv_heads: usize,
    vocab: usize,
    rope_theta: f64,
    tied: bool,
}

const SMOL: Shape = Shape {
    name: "smollm2_135m",
    layers: 30,
    hidden: 576,
    inter: 1536,
    heads: 9,
    kv_heads: 3,
    vocab: 49152,
    rope_theta: 100000.0,
    tied: true,
};
const LLAMA7B: Shape = Shape {
    name: "llama2_7b",
    layers: 32,
    hidden: 4096,
    inter: 11008,
    heads: 32,
    kv_heads: 32,
    vocab: 32000,
    rope_theta: 10000.0,
    tied: false,
};

impl Shape {
    fn config(&self) -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.hidden, "intermediate_size": self.inter,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "head_dim": self.hidden / self.heads,
            "vocab_size": self.vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "rope_theta": self.rope_theta, "tie_word_embeddings": self.tied, "hidden_act": "silu",
            "bos_token_id": 1, "eos_token_id": 2,
        })
    }

    /// Every tensor's name and shape, in checkpoint order.
    fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, hd) = (self.hidden, self.hidden / self.heads);
        let (qd, kvd) = (self.heads * hd, self.kv_heads * hd);
        let mut t = vec![("model.embed_tokens.weight".to_string(), vec![self.vocab, h])];
        for l in 0..self.layers {
            let p = |s: &str| format!("model.layers.{l}.{s}");
            t.push((p("input_layernorm.weight"), vec![h]));
            t.push((p("self_attn.q_proj.weight"), vec![qd, h]));
            t.push((p("self_attn.k_proj.weight"), vec![kvd, h]));
            t.push((p("self_attn.v_proj.weight"), vec![kvd, h]));
            t.push((p("self_attn.o_proj.weight"), vec![h, qd]));
            t.push((p("post_attention_layernorm.weight"), vec![h]));
            t.push((p("mlp.gate_proj.weight"), vec![self.inter, h]));
            t.push((p("mlp.up_proj.weight"), vec![self.inter, h]));
            t.push((p("mlp.down_proj.weight"), vec![h, self.inter]));
        }
        t.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tied {
            t.push(("lm_head.weight".to_string(), vec![self.vocab, h]));
        }
        t
    }
}

/// bf16 values uniform in about ±`scale`, filled by every core (7B is 6.7 G values).
fn random_bf16(n: usize, seed: u64, scale: f32) -> Vec<u8> {
    let mut out = vec![0u8; n * 2];
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get()).min(32);
    let chunk = n.div_ceil(threads).max(1) * 2;
    std::thread::scope(|s| {
        for (i, part) in out.chunks_mut(chunk).enumerate() {
            s.spawn(move || {
                let mut x = (seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1;
                for v in part.chunks_exact_mut(2) {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let u = (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                    v.copy_from_slice(&half::bf16::from_f32(u * scale).to_le_bytes());
                }
            });
        }
    });
    out
}

/// A random checkpoint of `shape` in memory: projections ±0.02·√3 (std 0.02, as
/// transformers initialises), norms 1.
fn random_checkpoint(shape: &Shape) -> Result<(Checkpoint, ModelConfig), String> {
    let dir = PathBuf::from(format!("<random {}>", shape.name));
    let mut tensors = Vec::new();
    for (i, (name, dims)) in shape.tensors().into_iter().enumerate() {
        let n: usize = dims.iter().product();
        let data = if dims.len() == 1 {
            half::bf16::ONE.to_le_bytes().repeat(n)
        } else {
            random_bf16(n, i as u64 + 1, 0.0346)
        };
        tensors.push(OwnedTensor { name, dtype: DType::BF16, quant: None, shape: dims, data });
    }
    let ck = Checkpoint::from_owned(&dir, tensors).map_err(|e| e.to_string())?;
    let cfg = ModelConfig::parse(&shape.config(), &dir.join("config.json")).map_err(|e| e.to_string())?;
    Ok((ck, cfg))
}

fn engine(be: &Arc<Be>, ck: &Checkpoint, cfg: ModelConfig, steps: usize) -> Result<Engine<Be>, String> {
    let opts = EngineOptions {
        dtype: Some(DType::BF16),
        kv_dtype: DType::BF16,
        max_sessions: BATCHES[BATCHES.len() - 1],
        max_step_tokens: 256,
        max_context_tokens: Some((PROMPT_TOKENS + WARMUP_STEPS + steps + 16).next_multiple_of(16).max(256)),
        all_logits: true,
        ..EngineOptions::default()
    };
    Engine::from_checkpoint(be.clone(), ck, cfg, &opts).map_err(|e| e.to_string())
}

/// Tokens/s at each batch size, with the bound.
fn decode(eng: &mut Engine<Be>, weight_bytes: usize, copy_bw: f64, steps: usize) -> Result<Value, String> {
    let vocab = eng.config().vocab_size as u32;
    let bound_s = weight_bytes as f64 / copy_bw;
    let mut rows = Vec::new();
    for batch in BATCHES {
        let ids: Vec<_> =
            (0..batch).map(|_| eng.open_session()).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let prompt: Vec<u32> = (0..PROMPT_TOKENS as u32).map(|t| (t * 131 + i as u32 * 7 + 5) % vocab).collect();
            eng.prefill(id, &prompt, false, &mut buf).map_err(|e| e.to_string())?;
        }
        let mut next: Vec<u32> = (0..batch as u32).map(|i| (i * 17 + 3) % vocab).collect();
        let params = vec![GREEDY; batch];
        let mut out = Vec::with_capacity(batch);
        let mut t0 = Instant::now();
        for step in 0..WARMUP_STEPS + steps {
            if step == WARMUP_STEPS {
                t0 = Instant::now();
            }
            let seqs: Vec<(_, &[u32])> = ids.iter().zip(&next).map(|(&id, t)| (id, std::slice::from_ref(t))).collect();
            eng.step_sample(&seqs, &params, &mut out).map_err(|e| e.to_string())?;
            next.clone_from(&out);
        }
        let step_s = t0.elapsed().as_secs_f64() / steps as f64;
        for id in ids {
            eng.close_session(id).map_err(|e| e.to_string())?;
        }
        let tok_s = batch as f64 / step_s;
        println!(
            "  batch {batch:>3}: {:>8.3} ms/step, {tok_s:>9.1} tok/s; bound {:.3} ms/step: {:.2}× the bound",
            step_s * 1e3,
            bound_s * 1e3,
            step_s / bound_s
        );
        rows.push(json!({"batch": batch, "step_ms": step_s * 1e3, "tok_s": tok_s, "bound_ms": bound_s * 1e3,
                         "vs_bound": step_s / bound_s}));
    }
    Ok(json!({"weight_bytes": weight_bytes, "cases": rows}))
}

/// Prompt logits against transformers' on the same checkpoint (`dir/reference.json`).
fn compare(eng: &mut Engine<Be>, dir: &Path) -> Result<Value, String> {
    let reference = djinn_model::testing::read_reference(dir).map_err(|e| e.to_string())?;
    let (mut max_rel, mut positions, mut argmax_same) = (0f32, 0usize, 0usize);
    let mut logits = Vec::new();
    for case in &reference.cases {
        let id = eng.open_session().map_err(|e| e.to_string())?;
        eng.prefill(id, &case.prompt, true, &mut logits).map_err(|e| e.to_string())?;
        eng.close_session(id).map_err(|e| e.to_string())?;
        let vocab = eng.config().vocab_size;
        for (row, want) in logits.chunks_exact(vocab).zip(&case.logits) {
            let max = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
            let err = row.iter().zip(want).fold(0f32, |m, (g, w)| m.max((g - w).abs())) / max;
            max_rel = max_rel.max(if err.is_nan() { f32::INFINITY } else { err });
            positions += 1;
            argmax_same += usize::from(djinn_model::testing::argmax(row) == djinn_model::testing::argmax(want));
        }
    }
    println!(
        "  vs transformers (float32 eager, same weights): max |Δlogit| {max_rel:.2e} of the largest, \
         argmax equal at {argmax_same}/{positions} positions"
    );
    Ok(json!({"max_rel_err": max_rel, "positions": positions, "argmax_equal": argmax_same}))
}

fn copy_bandwidth(be: &Be) -> f64 {
    let bytes = 1usize << 30;
    let src = be.reserve(bytes).expect("reserve");
    let dst = be.reserve(bytes).expect("reserve");
    let s = be.default_stream();
    be.copy(s, &src, 0, &dst, 0, bytes).expect("copy");
    be.sync_stream(s).expect("sync");
    let iters = 10;
    let t = Instant::now();
    for _ in 0..iters {
        be.copy(s, &src, 0, &dst, 0, bytes).expect("copy");
    }
    be.sync_stream(s).expect("sync");
    2.0 * bytes as f64 * iters as f64 / t.elapsed().as_secs_f64()
}

fn weight_bytes(shape: &Shape) -> usize {
    shape.tensors().iter().map(|(_, d)| d.iter().product::<usize>() * 2).sum()
}

/// transformers' eager tokens/s for `shape` at `batch`, from `hf.json`.
fn hf_tok_s(hf: &Value, shape: &Shape, batch: usize) -> Option<f64> {
    hf.get(shape.name)?.get("decode")?.as_array()?.iter().find(|c| c["batch"] == batch)?.get("tok_s")?.as_f64()
}

fn run(be: &Arc<Be>, args: &[String]) -> Result<Value, String> {
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let steps: usize = flag("--steps").map_or(Ok(32), |s| s.parse().map_err(|e| format!("--steps: {e}")))?;
    let shapes = flag("--shapes").unwrap_or_else(|| "smol,7b".into());
    let hf_dir = flag("--hf-dir").map(PathBuf::from);
    let hf: Value = match &hf_dir {
        Some(d) => {
            std::fs::read(d.join("hf.json")).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or(Value::Null)
        }
        None => Value::Null,
    };
    let copy_bw = copy_bandwidth(be);
    println!("device-to-device copy (read + write): {:.1} GB/s", copy_bw / 1e9);
    let mut all = json!({"gpu": be.info().name, "copy_gbps": copy_bw / 1e9, "steps": steps});
    for shape in [SMOL, LLAMA7B] {
        let key = if shape.name == SMOL.name { "smol" } else { "7b" };
        if !shapes.split(',').any(|s| s == key) {
            continue;
        }
        let t = Instant::now();
        let smol_dir = hf_dir.as_ref().map(|d| d.join("smol")).filter(|d| shape.name == SMOL.name && d.is_dir());
        let (ck, cfg, origin) = match &smol_dir {
            Some(d) => {
                let cfg = ModelConfig::load(d).map_err(|e| e.to_string())?;
                (Checkpoint::open(d).map_err(|e| e.to_string())?, cfg, "transformers from_config (scripts/gpu_hf.py)")
            }
            None => {
                let (ck, cfg) = random_checkpoint(&shape)?;
                (ck, cfg, "random, made in memory")
            }
        };
        let mut eng = engine(be, &ck, cfg, steps)?;
        drop(ck);
        let wb = weight_bytes(&shape);
        println!(
            "{} ({origin}; {:.2} GB of bf16 weights; loaded in {:.1} s):",
            shape.name,
            wb as f64 / 1e9,
            t.elapsed().as_secs_f64()
        );
        let mut fig = decode(&mut eng, wb, copy_bw, steps)?;
        fig["weights"] = json!(origin);
        if let Some(d) = &smol_dir {
            fig["vs_transformers_logits"] = compare(&mut eng, d)?;
        }
        if let Some(cases) = fig["cases"].as_array_mut() {
            for c in cases {
                let batch = c["batch"].as_u64().unwrap_or(0) as usize;
                if let Some(hf) = hf_tok_s(&hf, &shape, batch) {
                    let ours = c["tok_s"].as_f64().unwrap_or(0.0);
                    println!("  batch {batch:>3}: transformers eager {hf:.1} tok/s; ours {:.2}× that", ours / hf);
                    c["hf_tok_s"] = json!(hf);
                    c["vs_hf"] = json!(ours / hf);
                }
            }
        }
        all[shape.name] = fig;
    }
    Ok(all)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let be = match djinn_dataplane::kernels::cuda_backend(0) {
        Ok(be) => Arc::new(be),
        Err(e) => {
            println!("gpu_decode: skipped, no GPU: {e}");
            return;
        }
    };
    match run(&be, &args) {
        Ok(v) => {
            if let Some(p) = args.iter().position(|a| a == "--json").and_then(|i| args.get(i + 1)) {
                std::fs::write(p, serde_json::to_vec_pretty(&v).expect("json")).expect("write --json file");
            }
        }
        Err(e) => {
            eprintln!("gpu_decode: {e}");
            std::process::exit(1);
        }
    }
}
