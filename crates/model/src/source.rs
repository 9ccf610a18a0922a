//! Opening what `--model-dir` names: a Hugging Face layout directory, or a `.gguf` file that is
//! converted in memory (nothing is written to disk). A GGUF's quantized tensors stay in their
//! GGML blocks (the loader dequantizes them at upload only for backends without quantized
//! kernels); its float tensors keep their file dtype unless `--dtype` asks for another.

use std::path::Path;

use djinn_backend::DType;

use crate::checkpoint::Checkpoint;
use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::gguf;
use crate::tokenizer::TextTokenizer;

pub struct ModelFiles {
    pub cfg: ModelConfig,
    pub checkpoint: Checkpoint,
    /// `None` when the model has no tokenizer.json: it still serves token ids.
    pub tokenizer: Option<TextTokenizer>,
}

/// The compute dtype that decodes fastest while answering as the checkpoint does, for
/// `generate` and `serve` when no dtype is asked for: bf16 for an f32 safetensors directory
/// (decode streams every weight once per token, so half the bytes is nearly twice the speed;
/// greedy text matched f32 on SmolLM2), else `None` = as stored (a GGUF keeps its quantized
/// blocks, which are smaller still). `logits` does not use it: parity checks want the stored
/// dtype.
pub fn fast_dtype(path: &Path, ck: &Checkpoint) -> Option<DType> {
    let all_f32 = ck.names().filter_map(|n| ck.get(n)).all(|t| t.dtype == DType::F32);
    (path.is_dir() && all_f32).then_some(DType::BF16)
}

/// Opens `path`. A `.gguf` file keeps its quantized tensors; `gguf_dtype` is not needed to
/// read one (the float dtype is chosen at load, [`crate::WeightLayout::choose_dtype`]).
pub fn open_model(path: &Path, gguf_dtype: Option<DType>) -> Result<ModelFiles> {
    let _ = gguf_dtype;
    if path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        let conv = gguf::convert_file(path, gguf::Tensors::Keep)?;
        let mut cfg = ModelConfig::parse(&conv.config, path)?;
        for id in crate::config::token_ids(&conv.generation_config, "eos_token_id", path)? {
            if !cfg.eos_token_ids.contains(&id) {
                cfg.eos_token_ids.push(id);
            }
        }
        let tokenizer = match &conv.tokenizer {
            Some(t) => {
                let bytes =
                    serde_json::to_vec(t).map_err(|e| ModelError::Json { path: path.into(), msg: e.to_string() })?;
                Some(TextTokenizer::from_parts(path, &bytes, Some(&conv.tokenizer_config), None)?)
            }
            None => None,
        };
        let checkpoint = Checkpoint::from_owned(path, conv.tensors)?;
        return Ok(ModelFiles { cfg, checkpoint, tokenizer });
    }
    if !path.is_dir() {
        let why = "no such directory or file; give a Hugging Face model directory (config.json + \
                   model.safetensors) or a .gguf file";
        return Err(ModelError::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, why)));
    }
    let cfg = ModelConfig::load(path)?;
    let checkpoint = Checkpoint::open(path)?;
    let tokenizer = TextTokenizer::load(path)?;
    Ok(ModelFiles { cfg, checkpoint, tokenizer })
}
