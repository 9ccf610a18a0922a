//! `djinn-dataplane logits`: the model's logits at every prompt position, computed in process
//! (`--model-dir`) or by a server (`--server URL --model NAME`, see `remote.rs`).
//! `--json` prints {"logits": [[one float per vocabulary entry] for each prompt position]}.

use std::io::Write;
use std::sync::Arc;

use anyhow::bail;
use djinn_backend::{Backend, DType};
use djinn_model::{Engine, EngineOptions, ModelFiles};

use super::generate::{open, parse_dtype, with_backend, BackendFn, ModelArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt token ids, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub prompt_ids: Vec<u32>,
    /// Text output: the k highest logits at each position.
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub top_k: usize,
    /// Print every logit instead: {"logits": [[one float per vocabulary entry] per position]}.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.prompt_ids.is_empty() {
        bail!("--prompt-ids is empty");
    }
    if args.model.server.is_some() {
        return super::remote::logits(&args);
    }
    let ModelFiles { cfg, checkpoint, .. } = open(&args.model)?;
    cfg.check_tokens(&args.prompt_ids, 0)?;
    struct Run<'a> {
        ids: &'a [u32],
        cfg: djinn_model::ModelConfig,
        ck: djinn_model::Checkpoint,
        dtype: Option<DType>,
    }
    impl BackendFn<Vec<f32>> for Run<'_> {
        fn call<B: Backend>(self, be: Arc<B>, kv_dtype: DType) -> anyhow::Result<Vec<f32>> {
            let opts = EngineOptions {
                dtype: self.dtype,
                kv_dtype,
                max_context_tokens: Some(self.ids.len()),
                max_sessions: 1,
                max_step_tokens: self.ids.len().clamp(1, 256),
                all_logits: true,
                ..EngineOptions::default()
            };
            let mut eng = Engine::from_checkpoint(be, &self.ck, self.cfg, &opts)?;
            let sid = eng.open_session()?;
            let mut logits = Vec::new();
            eng.prefill(sid, self.ids, true, &mut logits)?;
            eng.close_session(sid)?;
            Ok(logits)
        }
    }
    let vocab = cfg.vocab_size;
    let dtype = parse_dtype(&args.model.dtype)?;
    let logits = with_backend(&args.model, Run { ids: &args.prompt_ids, cfg, ck: checkpoint, dtype })?;
    print_logits(&args, &logits, vocab)
}

/// The same output in process and over `--server`: with `--json`,
/// `{"logits": [[one float per vocabulary entry] for each position]}`; else one line per
/// position with its input id and the `--top-k` highest logits as `id:logit`.
pub fn print_logits(args: &Args, logits: &[f32], vocab: usize) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if args.json {
        let rows: Vec<&[f32]> = logits.chunks(vocab).collect();
        serde_json::to_writer(&mut out, &serde_json::json!({ "logits": rows }))?;
        writeln!(out)?;
    } else {
        for (pos, (row, id)) in logits.chunks(vocab).zip(&args.prompt_ids).enumerate() {
            let mut order: Vec<usize> = (0..row.len()).collect();
            let k = args.top_k.min(row.len());
            if k > 0 {
                order.select_nth_unstable_by(k - 1, |&a, &b| row[b].total_cmp(&row[a]));
            }
            order.truncate(k);
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            let top: Vec<String> = order.iter().map(|&t| format!("{t}:{:.4}", row[t])).collect();
            writeln!(out, "position {pos} (input id {id}): top {k} {}", top.join(" "))?;
        }
    }
    out.flush()?;
    Ok(())
}
