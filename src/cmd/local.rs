//! In-process runs shared by `generate` and `debug`: opens `--model-dir`, turns the prompt flags
//! into token ids, sizes a one-session [`Engine`] for the prompt and the tokens to generate, and
//! hands it to the command on the backend `--gpus` names.

use std::sync::Arc;

use anyhow::{bail, Context};
use djinn_backend::{Backend, DType};
use djinn_model::{Checkpoint, Engine, EngineOptions, ModelConfig, ModelFiles, TextTokenizer};

use super::generate::{open, with_backend, BackendFn, ModelArgs};

/// A model opened and a prompt tokenized for it.
pub struct Loaded {
    pub cfg: ModelConfig,
    pub checkpoint: Checkpoint,
    pub tokenizer: Option<TextTokenizer>,
    pub prompt: Vec<u32>,
    /// The config's end-of-sequence ids and the tokenizer's, once each.
    pub eos: Vec<u32>,
}

/// Opens `--model-dir` and tokenizes the prompt: `ids` as given, else `text` (through the chat
/// template when `chat`); refuses an empty prompt or ids outside the vocabulary.
pub fn load(m: &ModelArgs, ids: &Option<Vec<u32>>, text: &Option<String>, chat: bool) -> anyhow::Result<Loaded> {
    let ModelFiles { cfg, checkpoint, tokenizer } = open(m)?;
    let prompt: Vec<u32> = match (ids, text) {
        (Some(ids), _) => ids.clone(),
        (None, Some(text)) => {
            let tok = tokenizer.as_ref().with_context(|| {
                format!("{}: no tokenizer.json, so --prompt needs --prompt-ids instead", checkpoint.dir().display())
            })?;
            if chat {
                tok.encode(&tok.apply_chat(text)?, false)?
            } else {
                tok.encode(text, true)?
            }
        }
        (None, None) => bail!("give --prompt TEXT or --prompt-ids 1,2,3"),
    };
    if prompt.is_empty() {
        bail!("the prompt is empty");
    }
    cfg.check_tokens(&prompt, 0)?;
    let mut eos: Vec<u32> = cfg.eos_token_ids.clone();
    if let Some(e) = tokenizer.as_ref().and_then(|t| t.eos_id()) {
        if !eos.contains(&e) {
            eos.push(e);
        }
    }
    Ok(Loaded { cfg, checkpoint, tokenizer, prompt, eos })
}

/// How the engine is built.
pub struct EngineShape {
    /// Compute dtype; `None` = as stored.
    pub dtype: Option<DType>,
    /// The context holds the prompt and this many more tokens (up to the model's limit).
    pub max_new_tokens: usize,
    /// Most tokens one step feeds.
    pub max_step_tokens: usize,
}

/// What the command gets: the engine with one free session slot and the loaded prompt.
pub struct EngineRun<'a, B: Backend> {
    pub eng: &'a mut Engine<B>,
    pub tok: Option<&'a TextTokenizer>,
    pub prompt: &'a [u32],
    pub eos: &'a [u32],
}

/// The command's work on the engine (generic over the backend, so not a closure).
pub trait EngineFn<R> {
    fn call<B: Backend>(self, run: EngineRun<'_, B>) -> anyhow::Result<R>;
}

/// Builds the engine for `loaded` on the backend `m` names and runs `f` on it.
pub fn run_engine<R>(m: &ModelArgs, loaded: Loaded, shape: EngineShape, f: impl EngineFn<R>) -> anyhow::Result<R> {
    struct WithEngine<F> {
        loaded: Loaded,
        shape: EngineShape,
        f: F,
    }
    impl<R, F: EngineFn<R>> BackendFn<R> for WithEngine<F> {
        fn call<B: Backend>(self, be: Arc<B>, kv_dtype: DType) -> anyhow::Result<R> {
            let Loaded { cfg, checkpoint, tokenizer, prompt, eos } = self.loaded;
            let ctx = (prompt.len() + self.shape.max_new_tokens).min(cfg.max_position_embeddings);
            let opts = EngineOptions {
                dtype: self.shape.dtype,
                kv_dtype,
                max_context_tokens: Some(ctx),
                max_sessions: 1,
                max_step_tokens: self.shape.max_step_tokens,
                ..EngineOptions::default()
            };
            let mut eng = Engine::from_checkpoint(be, &checkpoint, cfg, &opts)?;
            drop(checkpoint);
            self.f.call(EngineRun { eng: &mut eng, tok: tokenizer.as_ref(), prompt: &prompt, eos: &eos })
        }
    }
    with_backend(m, WithEngine { loaded, shape, f })
}
