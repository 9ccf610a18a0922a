//! Llama-family models over the compute seam: configuration, checkpoint loading (safetensors,
//! GGUF), tokenizer and chat template, and the forward pass over a ragged batch of sequences
//! reading a paged KV cache.
//!
//! The crate knows nothing of transports or sessions: callers hand it memory (the shared weights
//! lease, the KV pool, a step's scratch range) and token ids; it hands back logits or sampled ids.

pub mod checkpoint;
pub mod config;
pub mod detokenize;
pub mod engine;
pub mod error;
pub mod forward;
pub mod gguf;
mod index_upload;
pub mod source;
#[doc(hidden)]
pub mod testing;
pub mod tokenizer;
pub mod weights;

pub use checkpoint::Checkpoint;
pub use config::{Architecture, ModelConfig, RopeScaling};
pub use detokenize::{ByteTable, Detokenizer};
/// The VMU types the engine's API carries (a session's KV handle, memory errors), so callers above
/// the model need not depend on the VMU crate.
pub use djinn_vmu::{host_swap_default_bytes, Residency, SessionId, VmuError};
pub use engine::{Engine, EngineOptions, HeldRow, PassSeq};
pub use error::{ModelError, PassError, Result};
pub use forward::{LogitsMode, Model, ScratchPlan, SeqStep, StepLimits, StepMemory, StepState};
pub use source::{fast_dtype, open_model, ModelFiles};
pub use tokenizer::{StopStrings, TextTokenizer};
pub use weights::WeightLayout;
