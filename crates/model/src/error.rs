//! The crate's error type. Every variant names the file and the tensor or value at fault, so a
//! broken checkpoint is diagnosed from the message alone; nothing read from disk ever panics.

use std::path::PathBuf;

use djinn_backend::BackendError;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: invalid JSON: {msg}")]
    Json { path: PathBuf, msg: String },
    #[error("{path}: invalid config value `{key}`: {why}")]
    Config { path: PathBuf, key: String, why: String },
    #[error(
        "{path}: unsupported architecture {arch:?} (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"
    )]
    Architecture { path: PathBuf, arch: String },
    #[error("{path}: bad safetensors header: {why}")]
    Header { path: PathBuf, why: String },
    #[error("{path}: tensor `{tensor}`: {why}")]
    Tensor { path: PathBuf, tensor: String, why: String },
    #[error("{dir}: missing tensor `{tensor}`")]
    MissingTensor { dir: PathBuf, tensor: String },
    #[error("{path}: tensor `{tensor}` has shape {got:?}, expected {expected:?}")]
    Shape { path: PathBuf, tensor: String, got: Vec<usize>, expected: Vec<usize> },
    #[error("{path}: tensor `{tensor}` has unsupported dtype {dtype}")]
    DType { path: PathBuf, tensor: String, dtype: String },
    #[error("{dir}: no weights found (expected model.safetensors or model.safetensors.index.json)")]
    NoWeights { dir: PathBuf },
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenId { id: u32, vocab: usize },
    #[error("sequence of {tokens} tokens exceeds the model's limit of {max} positions")]
    TooLong { tokens: usize, max: usize },
    #[error("batch: {0}")]
    Batch(String),
    #[error("{path}: tokenizer: {why}")]
    Tokenizer { path: PathBuf, why: String },
    #[error("no tokenizer.json in {dir}: text prompts need one (token ids work without)")]
    NoTokenizer { dir: PathBuf },
    #[error("chat template: {0}")]
    Template(String),
    #[error("{path}: GGUF: {why}")]
    Gguf { path: PathBuf, why: String },
    #[error("backend: {0}")]
    Backend(#[from] BackendError),
    #[error("vmu: {0}")]
    Vmu(#[from] djinn_vmu::VmuError),
    #[error("memory: {0}")]
    Memory(String),
    #[error("breakpoint: {0}")]
    Pass(#[from] PassError),
}

/// Why a pass with breakpoints (`Engine::pass_*`) was refused; the session is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PassError {
    #[error("layer {layer} is outside 1..={layers} or not after the layer {after} the pass stopped at")]
    Layer { layer: usize, layers: usize, after: usize },
    #[error("the session is not paused at a breakpoint")]
    NotPaused,
    #[error("the session is paused at a breakpoint: resume or cancel it first")]
    Paused,
    #[error(
        "hidden state of {values} values for {tokens} tokens × {hidden}; the paused pass has {pending_tokens} tokens"
    )]
    Shape { values: usize, tokens: usize, hidden: usize, pending_tokens: usize },
    #[error("input of {tokens} tokens with breakpoints must run in one pass of at most {max} (--max-step-tokens)")]
    TooManyTokens { tokens: usize, max: usize },
    #[error("{max} passes are already paused (one per session slot)")]
    Full { max: usize },
}

pub type Result<T> = std::result::Result<T, ModelError>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io { path: path.into(), source }
    }
    pub(crate) fn config(path: impl Into<PathBuf>, key: &str, why: impl Into<String>) -> Self {
        ModelError::Config { path: path.into(), key: key.to_string(), why: why.into() }
    }
    pub(crate) fn tensor(path: impl Into<PathBuf>, tensor: &str, why: impl Into<String>) -> Self {
        ModelError::Tensor { path: path.into(), tensor: tensor.to_string(), why: why.into() }
    }
}
