//! The reference-test body shared by every backend (CPU in this crate's tests, CUDA from the
//! root package's `tests/model_reference.rs`): load a checkpoint from `tests/data/models/`, run
//! its recorded prompts, compare with what transformers computed (`reference.json`, made by
//! `scripts/make_reference.py`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use djinn_backend::{Backend, SampleParams};
use serde::Deserialize;

use crate::engine::{Engine, EngineOptions};
use crate::error::{ModelError, Result};

#[derive(Deserialize)]
pub struct Case {
    pub prompt: Vec<u32>,
    pub logits: Vec<Vec<f32>>,
    pub greedy: Vec<u32>,
}

#[derive(Deserialize)]
pub struct Reference {
    pub model: String,
    pub cases: Vec<Case>,
}

/// The committed reference models, by directory name.
pub const REFERENCE_MODELS: &[&str] =
    &["llama-gqa", "mistral", "qwen2-bias", "llama3-tied", "llama-headdim", "llama-deep"];

/// The reference model with recorded breakpoints (`breakpoints.json`, at least 4 layers).
pub const BREAKPOINT_MODEL: &str = "llama-deep";

/// `breakpoints.json`: the residual stream after every layer and patched runs.
#[derive(Deserialize)]
pub struct Breakpoints {
    pub layers: usize,
    pub prompt: Vec<u32>,
    /// The unpatched greedy continuation.
    pub greedy: Vec<u32>,
    pub hidden: Vec<LayerState>,
    pub patches: Vec<Patch>,
}

#[derive(Deserialize)]
pub struct LayerState {
    pub layer: usize,
    /// `[prompt tokens][hidden]`.
    pub hidden: Vec<Vec<f32>>,
}

/// A run whose state after `layer` layers was replaced by `hidden` (exact f32 values, written as
/// f64) during the input pass.
#[derive(Deserialize)]
pub struct Patch {
    pub layer: usize,
    pub hidden: Vec<Vec<f64>>,
    pub logits: Vec<Vec<f32>>,
    pub greedy: Vec<u32>,
}

/// What the breakpoint comparison found.
#[derive(Debug, Default)]
pub struct BreakReport {
    /// Largest |ours − reference| / max|reference| over the hidden state after every layer.
    pub hidden_max_rel_err: f32,
    /// Largest logit error of the patched runs, relative to each row's max|logit|.
    pub patched_max_rel_err: f32,
    pub argmax_mismatches: usize,
    pub greedy_mismatches: usize,
}

/// Runs the recorded breakpoints of [`BREAKPOINT_MODEL`] on `backend`: stops after every layer
/// (resuming with the state read), compares each state, then one run per recorded patch that
/// resumes with the patched state, and compares logits and greedy tokens.
pub fn check_breakpoints<B: Backend>(backend: Arc<B>, opts: &EngineOptions) -> Result<BreakReport> {
    let dir = reference_root().join(BREAKPOINT_MODEL);
    let path = dir.join("breakpoints.json");
    let bytes = std::fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
    let rec: Breakpoints = serde_json::from_slice(&bytes).map_err(|e| ModelError::Json { path, msg: e.to_string() })?;
    let mut opts = opts.clone();
    opts.all_logits = true;
    let mut eng = Engine::load_dir(backend, &dir, &opts)?;
    let vocab = eng.config().vocab_size;
    let mut rep = BreakReport::default();
    let greedy = SampleParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, step: 0 };
    let continue_greedy = |eng: &mut Engine<B>, sid, logits: &[f32], want: &[u32], rep: &mut BreakReport| {
        let mut next = argmax(&logits[logits.len() - vocab..]) as u32;
        let mut got = vec![next];
        let mut ids = Vec::new();
        while got.len() < want.len() {
            eng.step_sample(&[(sid, &[next])], &[greedy], &mut ids)?;
            next = ids[0];
            got.push(next);
        }
        rep.greedy_mismatches += usize::from(got != want);
        Ok::<_, ModelError>(())
    };

    let sid = eng.open_session()?;
    let (mut hidden, mut prev) = (Vec::new(), Vec::new());
    for n in 1..=rec.layers {
        let from = (n > 1).then_some((n - 1, prev.as_slice()));
        eng.pass_to_layer(sid, &rec.prompt, from, n, &mut hidden)?;
        let want =
            rec.hidden.iter().find(|s| s.layer == n).ok_or_else(|| ModelError::Batch(format!("no layer {n}")))?;
        let want: Vec<f32> = want.hidden.concat();
        rep.hidden_max_rel_err = rep.hidden_max_rel_err.max(rel_err(&hidden, &want));
        std::mem::swap(&mut prev, &mut hidden);
    }
    let mut logits = Vec::new();
    eng.pass_finish_logits(sid, &rec.prompt, (rec.layers, &prev), crate::forward::LogitsMode::All, &mut logits)?;
    continue_greedy(&mut eng, sid, &logits, &rec.greedy, &mut rep)?;
    eng.close_session(sid)?;

    for p in &rec.patches {
        let sid = eng.open_session()?;
        eng.pass_to_layer(sid, &rec.prompt, None, p.layer, &mut hidden)?;
        let patch: Vec<f32> = p.hidden.iter().flatten().map(|&x| x as f32).collect();
        eng.pass_finish_logits(sid, &rec.prompt, (p.layer, &patch), crate::forward::LogitsMode::All, &mut logits)?;
        for (row, want) in logits.chunks(vocab).zip(&p.logits) {
            rep.patched_max_rel_err = rep.patched_max_rel_err.max(rel_err(row, want));
            rep.argmax_mismatches += usize::from(argmax(row) != argmax(want));
        }
        continue_greedy(&mut eng, sid, &logits, &p.greedy, &mut rep)?;
        eng.close_session(sid)?;
    }
    Ok(rep)
}

/// max |a − b| / max |b| (or `INFINITY` when the lengths differ).
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs() / scale))
}

/// `tests/data/models/` of the workspace: `DJINN_TEST_DATA` if set, else the working directory's
/// copy (a test binary carried to the GPU machine runs from a checkout elsewhere), else the
/// workspace this crate was built in.
pub fn reference_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("DJINN_TEST_DATA") {
        return PathBuf::from(dir).join("models");
    }
    let here = Path::new("tests/data/models");
    if here.is_dir() {
        return here.to_path_buf();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/models")
}

pub fn read_reference(dir: &Path) -> Result<Reference> {
    let path = dir.join("reference.json");
    let bytes = std::fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| ModelError::Json { path, msg: e.to_string() })
}

/// What one comparison found.
#[derive(Debug, Default)]
pub struct Report {
    /// Largest |ours − reference| / max|reference logit| over every position of every prompt.
    pub max_rel_err: f32,
    pub argmax_mismatches: usize,
    pub greedy_mismatches: usize,
}

/// Runs every case of the reference model `name` on `backend` with `opts` and compares.
/// Prompts run both whole (one prefill step, all positions) and as a batch of two ragged
/// sequences stepped together, so paging and batching are covered by the same numbers.
pub fn check_model<B: Backend>(backend: Arc<B>, name: &str, opts: &EngineOptions) -> Result<Report> {
    let dir = reference_root().join(name);
    let reference = read_reference(&dir)?;
    let mut opts = opts.clone();
    opts.all_logits = true;
    let mut eng = Engine::load_dir(backend, &dir, &opts)?;
    let vocab = eng.config().vocab_size;
    let mut rep = Report::default();
    let mut logits = Vec::new();
    for case in &reference.cases {
        let sid = eng.open_session()?;
        eng.prefill(sid, &case.prompt, true, &mut logits)?;
        for (row, want) in logits.chunks(vocab).zip(&case.logits) {
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
            for (a, b) in row.iter().zip(want) {
                rep.max_rel_err = rep.max_rel_err.max((a - b).abs() / scale);
            }
            if argmax(row) != argmax(want) {
                rep.argmax_mismatches += 1;
            }
        }
        // Greedy continuation, one decode step at a time after the prompt.
        let mut next = argmax(&logits[logits.len() - vocab..]) as u32;
        let mut got = vec![next];
        let greedy = [SampleParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, step: 0 }];
        let mut ids = Vec::new();
        while got.len() < case.greedy.len() {
            eng.step_sample(&[(sid, &[next])], &greedy, &mut ids)?;
            next = ids[0];
            got.push(next);
        }
        if got != case.greedy {
            rep.greedy_mismatches += 1;
        }
        eng.close_session(sid)?;
    }
    // All cases at once as a ragged batch: prompts in one step, then decode steps together
    // (when the step limit lets the prompts share one step).
    if reference.cases.iter().map(|c| c.prompt.len()).sum::<usize>() > eng.max_step_tokens() {
        return Ok(rep);
    }
    let sids: Vec<_> = reference.cases.iter().map(|_| eng.open_session()).collect::<Result<_>>()?;
    let seqs: Vec<_> = sids.iter().zip(&reference.cases).map(|(&s, c)| (s, c.prompt.as_slice())).collect();
    let params: Vec<SampleParams> =
        seqs.iter().map(|_| SampleParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, step: 0 }).collect();
    let mut ids = Vec::new();
    eng.step_sample(&seqs, &params, &mut ids)?;
    let mut outs: Vec<Vec<u32>> = ids.iter().map(|&i| vec![i]).collect();
    let steps = reference.cases.iter().map(|c| c.greedy.len()).max().unwrap_or(0);
    for _ in 1..steps {
        let toks: Vec<[u32; 1]> = outs.iter().map(|o| [*o.last().unwrap_or(&0)]).collect();
        let seqs: Vec<_> = sids.iter().zip(&toks).map(|(&s, t)| (s, t.as_slice())).collect();
        eng.step_sample(&seqs, &params, &mut ids)?;
        for (o, &i) in outs.iter_mut().zip(&ids) {
            o.push(i);
        }
    }
    for (o, c) in outs.iter().zip(&reference.cases) {
        if o[..c.greedy.len()] != c.greedy[..] {
            rep.greedy_mismatches += 1;
        }
    }
    for s in sids {
        eng.close_session(s)?;
    }
    Ok(rep)
}

/// Index of the first maximum.
pub fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}
