//! Quantized GGUFs end to end on the CPU backend: a small random Llama checkpoint is written as
//! a GGUF of every supported type (and a llama.cpp-style mix of types) with the project's own
//! quantizer, loaded with its tensors kept quantized, and its logits compared with the same file
//! dequantized to f32 (the scalar reference path): the only difference allowed is the 16-bit
//! rounding of the activations in the quantized kernels. Resident weight bytes must be within
//! 5 % of the file's tensor bytes; an unsupported type is refused naming tensor and type.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use djinn_backend::cpu::CpuBackend;
use djinn_backend::{DType, QuantType};
use djinn_model::gguf::writer::{encode, gguf_name, permute_rows, to_bytes, Meta, Tensor};
use djinn_model::gguf::{convert_file, GgmlType, Tensors};
use djinn_model::{open_model, Checkpoint, Engine, EngineOptions, LogitsMode};

const HIDDEN: usize = 256;
const INTER: usize = 512;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const VOCAB: usize = 320;
const LAYERS: usize = 2;

fn lcg(z: &mut u64) -> f32 {
    *z = z.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
    ((*z >> 40) as f32 / (1u64 << 24) as f32) - 0.5
}

/// HF name, shape and values of the random checkpoint.
fn checkpoint() -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut z = 42u64;
    let hd = HIDDEN / HEADS;
    let mut t = Vec::new();
    let mut mat = |name: String, rows: usize, cols: usize, scale: f32| {
        let v: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut z) * scale).collect();
        (name, vec![rows, cols], v)
    };
    t.push(mat("model.embed_tokens.weight".into(), VOCAB, HIDDEN, 2.0));
    for l in 0..LAYERS {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        t.push((p("input_layernorm.weight"), vec![HIDDEN], vec![1.0; HIDDEN]));
        t.push((p("post_attention_layernorm.weight"), vec![HIDDEN], vec![1.0; HIDDEN]));
        t.push(mat(p("self_attn.q_proj.weight"), HEADS * hd, HIDDEN, 0.2));
        t.push(mat(p("self_attn.k_proj.weight"), KV_HEADS * hd, HIDDEN, 0.2));
        t.push(mat(p("self_attn.v_proj.weight"), KV_HEADS * hd, HIDDEN, 0.2));
        t.push(mat(p("self_attn.o_proj.weight"), HIDDEN, HEADS * hd, 0.2));
        t.push(mat(p("mlp.gate_proj.weight"), INTER, HIDDEN, 0.2));
        t.push(mat(p("mlp.up_proj.weight"), INTER, HIDDEN, 0.2));
        t.push(mat(p("mlp.down_proj.weight"), HIDDEN, INTER, 0.2));
    }
    t.push(("model.norm.weight".into(), vec![HIDDEN], vec![1.0; HIDDEN]));
    t.push(mat("lm_head.weight".into(), VOCAB, HIDDEN, 0.5));
    t
}

fn meta() -> Vec<(String, Meta)> {
    let u = |k: &str, v: usize| (k.to_string(), Meta::U32(v as u32));
    vec![
        ("general.architecture".into(), Meta::Str("llama".into())),
        u("llama.block_count", LAYERS),
        u("llama.context_length", 128),
        u("llama.embedding_length", HIDDEN),
        u("llama.feed_forward_length", INTER),
        u("llama.attention.head_count", HEADS),
        u("llama.attention.head_count_kv", KV_HEADS),
        u("tokenizer.ggml.eos_token_id", 2),
        ("llama.attention.layer_norm_rms_epsilon".into(), Meta::F32(1e-5)),
        ("llama.rope.freq_base".into(), Meta::F32(10000.0)),
    ]
}

/// Writes the checkpoint as GGUF: matrices as `ty(i)` (tensor index `i`), vectors as F32.
fn write_gguf(path: &Path, ty: impl Fn(usize) -> GgmlType) {
    let mut tensors = Vec::new();
    for (i, (name, shape, mut v)) in checkpoint().into_iter().enumerate() {
        let t = if shape.len() == 2 { ty(i) } else { GgmlType::F32 };
        if name.ends_with("q_proj.weight") {
            v = permute_rows(&v, shape[0], shape[1], HEADS);
        } else if name.ends_with("k_proj.weight") {
            v = permute_rows(&v, shape[0], shape[1], KV_HEADS);
        }
        let cols = *shape.last().unwrap();
        let data = encode(t, &v, cols).unwrap();
        tensors.push(Tensor {
            name: gguf_name(&name).unwrap(),
            dims: shape.iter().rev().copied().collect(),
            ty: t,
            data,
        });
    }
    std::fs::write(path, to_bytes(&meta(), &tensors)).unwrap();
}

fn logits(ck: &Checkpoint, cfg: djinn_model::ModelConfig, prompt: &[u32]) -> (Vec<f32>, usize, usize) {
    let be = Arc::new(CpuBackend::with_threads(2).unwrap());
    let opts = EngineOptions { all_logits: true, max_step_tokens: 64, ..EngineOptions::default() };
    let mut eng = Engine::from_checkpoint(be, ck, cfg, &opts).unwrap();
    let w = &eng.model().weights;
    let (resident, source) = (w.total_bytes, w.source_bytes);
    let sid = eng.open_session().unwrap();
    let mut out = Vec::new();
    eng.prefill(sid, prompt, true, &mut out).unwrap();
    // Then batched decode steps of two sessions through the same weights (the GEMV shape).
    let sid2 = eng.open_session().unwrap();
    let mut step = Vec::new();
    eng.prefill(sid2, &prompt[..10], false, &mut step).unwrap();
    for tok in [5u32, 17, 250] {
        let (a, b) = ([tok], [tok + 1]);
        eng.step_logits(&[(sid, &a[..]), (sid2, &b[..])], LogitsMode::Last, &mut step).unwrap();
        out.extend_from_slice(&step);
    }
    eng.close_session(sid).unwrap();
    eng.close_session(sid2).unwrap();
    (out, resident, source)
}

/// A folder of this test's own: the tests of this file run in parallel and each removes its folder.
fn tmp(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("djinn-gguf-quant-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn check(label: &str, file: &Path) {
    check_within(label, file, 0.002)
}

/// [`check`] with the bound on the max logit error (of the largest logit).
fn check_within(label: &str, file: &Path, bound: f32) {
    let prompt: Vec<u32> = (0..24).map(|i| (i * 37 % VOCAB) as u32).collect();
    let q = open_model(file, None).unwrap();
    let (got, resident, source) = logits(&q.checkpoint, q.cfg, &prompt);
    let conv = convert_file(file, Tensors::Dequantize(DType::F32)).unwrap();
    let cfg = djinn_model::ModelConfig::parse(&conv.config, file).unwrap();
    let ck = Checkpoint::from_owned(file, conv.tensors).unwrap();
    let (want, _, _) = logits(&ck, cfg, &prompt);
    assert_eq!(got.len(), want.len());
    let (mut worst, mut top1, mut clear) = (0f32, 0, 0);
    for (g, w) in got.chunks(VOCAB).zip(want.chunks(VOCAB)) {
        let scale = w.iter().fold(0f32, |m, x| m.max(x.abs()));
        let err = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        worst = worst.max(err / scale);
        // Top-1 must agree wherever the reference's lead over the runner-up exceeds the error
        // bound (a random model has near-ties that activation rounding may flip).
        let best = argmax(w);
        let second = w.iter().enumerate().filter(|(i, _)| *i != best).fold(f32::MIN, |m, (_, v)| m.max(*v));
        if w[best] - second > 0.01 * scale {
            clear += 1;
            top1 += (argmax(g) == best) as usize;
        }
    }
    let rows = got.len() / VOCAB;
    // 16-bit activations: a few ten-thousandths of the largest logit (0.0001 measured).
    assert!(worst <= bound, "{label}: max logit error {worst} of the largest logit (bound {bound})");
    assert_eq!(top1, clear, "{label}: top-1 agrees on {top1} of {clear} clear rows ({rows} rows)");
    let ratio = resident as f64 / source as f64;
    assert!((0.95..=1.05).contains(&ratio), "{label}: resident {resident} vs file tensors {source}");
    eprintln!("{label}: max logit error {worst:.4} (of max |logit|), top-1 {top1}/{clear} clear rows of {rows}, resident/file {ratio:.3}");
}

fn argmax(x: &[f32]) -> usize {
    x.iter().enumerate().fold(0, |b, (i, v)| if *v > x[b] { i } else { b })
}

#[test]
fn every_type_loads_quantized_and_matches_its_dequantized_reference() {
    let dir = tmp("every_type_loads_quantized_and_matches_its_dequantized_reference");
    let mut types: Vec<GgmlType> = QuantType::ALL.iter().map(|q| GgmlType::Quant(*q)).collect();
    types.extend([GgmlType::F16, GgmlType::BF16, GgmlType::F32]);
    for t in types {
        let f = dir.join(format!("tiny-{}.gguf", t.name()));
        write_gguf(&f, |_| t);
        // BF16 weights on AVX512_BF16 CPUs multiply activations rounded to bf16 (`vdpbf16ps`, as
        // transformers multiplies a bf16 model's): 0.006 of the largest logit measured against the
        // f32 reference; that kernel itself is checked bit for bit against a scalar reference in
        // the backend's tests.
        let bound = if t == GgmlType::BF16 { 0.01 } else { 0.002 };
        check_within(t.name(), &f, bound);
    }
    // A llama.cpp-style mix (Q4_K_M keeps some tensors in Q6_K, Q5_0, Q8_0): q, k and v of
    // different types exercise the unfused paths.
    let mix = [QuantType::Q4_K, QuantType::Q6_K, QuantType::Q5_0, QuantType::Q8_0, QuantType::Q4_1];
    let f = dir.join("tiny-mix.gguf");
    write_gguf(&f, |i| GgmlType::Quant(mix[i % mix.len()]));
    check("mix", &f);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_unsupported_type_is_refused_naming_tensor_type_and_remedy() {
    let dir = tmp("an_unsupported_type_is_refused_naming_tensor_type_and_remedy");
    let f = dir.join("iq.gguf");
    let mut bytes = to_bytes(
        &meta(),
        &[Tensor { name: "blk.0.attn_q.weight".into(), dims: vec![256, 4], ty: GgmlType::F32, data: vec![0; 4096] }],
    );
    // Patch the type id (F32 = 0) of the only tensor to IQ2_XXS (16): it follows the dims.
    let at = bytes.windows(8).rposition(|w| w == 4u64.to_le_bytes()).unwrap() + 8;
    bytes[at..at + 4].copy_from_slice(&16u32.to_le_bytes());
    std::fs::write(&f, bytes).unwrap();
    let e = open_model(&f, None).err().unwrap().to_string();
    assert!(e.contains("blk.0.attn_q.weight") && e.contains("IQ2_XXS") && e.contains("requantize"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
