//! Opening what `--model-dir` names: a Hugging Face layout directory, or a `.gguf` file that is
//! converted in memory (nothing is written to disk).

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

/// Opens `path`. A `.gguf` file is dequantized to `gguf_dtype` (f32 when `None`).
pub fn open_model(path: &Path, gguf_dtype: Option<DType>) -> Result<ModelFiles> {
    if path.is_file() && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        let conv = gguf::convert_file(path, gguf_dtype.unwrap_or(DType::F32))?;
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
