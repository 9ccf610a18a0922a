//! `djinn-dataplane convert-gguf IN.gguf OUT_DIR`: writes a Hugging Face layout directory
//! (model.safetensors, config.json, generation_config.json, tokenizer.json,
//! tokenizer_config.json) from a GGUF file, dequantizing its tensors (every type the loader reads:
//! F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K).

use std::path::PathBuf;

use super::generate::parse_dtype;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The GGUF file.
    pub input: PathBuf,
    /// Output directory (created).
    pub out_dir: PathBuf,
    /// Dtype of the written tensors: f32 (exact dequantization, default), f16 or bf16.
    #[arg(long)]
    pub dtype: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dtype = parse_dtype(&args.dtype)?.unwrap_or(djinn_backend::DType::F32);
    let conv = djinn_model::gguf::convert_file(&args.input, djinn_model::gguf::Tensors::Dequantize(dtype))?;
    conv.write_dir(&args.out_dir)?;
    eprintln!(
        "wrote {} ({} tensors, {}, tokenizer: {})",
        args.out_dir.display(),
        conv.tensors.len(),
        dtype,
        if conv.tokenizer.is_some() { "yes" } else { "no (token ids only)" }
    );
    Ok(())
}
