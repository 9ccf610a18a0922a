//! `djinn-dataplane generate`: load a model in process (`--model-dir`: a Hugging Face directory or
//! a `.gguf` file), or open a session on a server's model (`--server URL --model NAME`), and
//! generate from a text prompt (optionally through the chat template) or raw token ids. Text
//! streams to stdout as it is decoded; `--json` prints one object instead:
//! {"tokens", "text", "ttft_ms", "tpot_ms", "prompt_tokens", "finish_reason"}, plus
//! "bytes_sent" and "bytes_received" (the whole connection, handshake included) when remote.
//!
//! Timing: `ttft_ms` runs from submitting the prompt (after the model is loaded, or after the
//! session is open) to the first sampled token on this host; `tpot_ms` = (time of last token −
//! time of first) / (tokens − 1).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use djinn_backend::{Backend, DType, SampleParams};
use djinn_model::{open_model, Detokenizer, Engine, ModelFiles, StopStrings};

use super::device;
use super::local::{self, EngineFn, EngineRun, EngineShape};

/// Where and how the model is loaded (shared by `generate` and `logits`).
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// Hugging Face layout directory (config.json + safetensors), or a .gguf file. A GGUF's
    /// quantized tensors (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K) stay quantized on the CPU
    /// backend; on CUDA they are dequantized to --dtype at load (no quantized CUDA kernels yet).
    #[arg(long, conflicts_with = "server")]
    pub model_dir: Option<PathBuf>,
    /// Run on a server instead: tcp://HOST:PORT, shm://NAME or rdma://HOST:PORT (needs --model).
    #[arg(long, value_name = "URL", requires = "model_name")]
    pub server: Option<String>,
    /// The server's model name (its `serve --model NAME=DIR`).
    #[arg(long = "model", id = "model_name", value_name = "NAME", requires = "server")]
    pub model_name: Option<String>,
    /// With --server: file holding the tenant token (else DJINN_TOKEN).
    #[arg(long, requires = "server")]
    pub token_file: Option<PathBuf>,
    /// With an rdma:// server: the local RDMA device (default: the one on the route to HOST).
    #[arg(long, env = "DJINN_NIC")]
    pub nic: Option<String>,
    /// `cpu`, or a CUDA device ordinal (`0`). Default, as for `serve`: GPU 0 when this build has
    /// CUDA and a GPU answers, else the CPU. In process only (a server picks its own device).
    #[arg(long, value_name = "cpu|0", conflicts_with = "server")]
    pub gpus: Option<String>,
    /// Weight dtype after loading: f32, f16, bf16, or `stored` (as in the checkpoint). Default:
    /// `generate` computes in bf16 when the checkpoint is f32 safetensors (about 1.6x the f32
    /// decode speed on CPU, measured) and as stored otherwise (f32 for the float tensors of a
    /// quantized GGUF, whose quantized tensors keep their blocks on the CPU); `logits` keeps the
    /// stored dtype. In process only.
    #[arg(long, value_name = "DTYPE", conflicts_with = "server")]
    pub dtype: Option<String>,
    /// CPU worker threads (default: all cores). In process only.
    #[arg(long, conflicts_with = "server")]
    pub threads: Option<usize>,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text prompt (needs the model's tokenizer.json).
    #[arg(long, conflicts_with = "prompt_ids")]
    pub prompt: Option<String>,
    /// Raw prompt token ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    /// Wrap the text prompt in the model's chat template (one user message).
    #[arg(long)]
    pub chat: bool,
    /// Most tokens to generate (fewer when EOS, a stop string or the context's end comes first).
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 = greedy (always the most likely token).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sample among the k most likely tokens only; 0 = no top-k cut.
    #[arg(long, default_value_t = 0)]
    pub top_k: u32,
    /// Nucleus sampling: sample among the most likely tokens whose probabilities add up to p; 1 = no cut.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Sampling seed: the same seed, prompt and settings give the same text. Default: a random
    /// seed per run (greedy decoding, the default, uses none).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop when the generated text contains this string (repeatable; not included in the text).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Keep generating past the EOS token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// With --server: the session's scheduling class (realtime, interactive, batch, background).
    #[arg(long, default_value = "interactive", requires = "server")]
    pub qos: djinn_client::Qos,
    /// With --server: the time per output token the session needs, ms (0 = none); a tight one
    /// raises the class on the server (<= 25 ms realtime, <= 250 ms interactive).
    #[arg(long, default_value_t = 0, requires = "server")]
    pub deadline_ms: u32,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

/// `--dtype`; `None` = as stored (also for an explicit `stored`).
pub fn parse_dtype(s: &Option<String>) -> anyhow::Result<Option<DType>> {
    Ok(match s.as_deref() {
        None | Some("stored") => None,
        Some("f32" | "float32") => Some(DType::F32),
        Some("f16" | "float16") => Some(DType::F16),
        Some("bf16" | "bfloat16") => Some(DType::BF16),
        Some(other) => bail!("--dtype {other:?}: write f32, f16, bf16 or stored"),
    })
}

/// `generate`'s compute dtype: the flag's, else [`djinn_model::fast_dtype`].
pub fn generate_dtype(
    flag: &Option<String>,
    path: &std::path::Path,
    ck: &djinn_model::Checkpoint,
) -> anyhow::Result<Option<DType>> {
    if flag.is_some() {
        return parse_dtype(flag);
    }
    Ok(djinn_model::fast_dtype(path, ck))
}

/// The sampling seed: `--seed`, else a random one.
pub fn seed_or_random(seed: Option<u64>) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    // RandomState is seeded from the OS per process: random enough for sampling.
    seed.unwrap_or_else(|| std::collections::hash_map::RandomState::new().build_hasher().finish())
}

/// Opens the model files named by `--model-dir`.
pub fn open(m: &ModelArgs) -> anyhow::Result<ModelFiles> {
    let dir = m.model_dir.as_ref().context("give --model-dir DIR (in process) or --server URL --model NAME")?;
    Ok(open_model(dir, parse_dtype(&m.dtype)?)?)
}

/// Runs `f` with the backend `--gpus` names (chosen as `serve` chooses, see [`super::device`]).
pub fn with_backend<R>(m: &ModelArgs, f: impl BackendFn<R>) -> anyhow::Result<R> {
    let ordinal = match device::parse(m.gpus.as_deref())? {
        device::Device::Cpu => return with_cpu(m, f),
        device::Device::Cuda(ords) => Some(device::one_device(&ords)?),
        device::Device::Auto => None,
    };
    #[cfg(feature = "cuda")]
    {
        match djinn_dataplane::cuda_backend(ordinal.unwrap_or(0)) {
            Ok(be) => f.call(Arc::new(be), DType::F16),
            Err(e) if ordinal.is_none() => {
                device::log_cpu_fallback(&e);
                with_cpu(m, f)
            }
            Err(e) => Err(e).with_context(|| format!("opening GPU {}", ordinal.unwrap_or(0))),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        match ordinal {
            None => with_cpu(m, f),
            Some(o) => {
                bail!("--gpus {o}: this build has no CUDA backend (built without the `cuda` feature); use --gpus cpu")
            }
        }
    }
}

fn with_cpu<R>(m: &ModelArgs, f: impl BackendFn<R>) -> anyhow::Result<R> {
    let threads = m.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let be = djinn_backend::cpu::CpuBackend::with_threads(threads)?;
    f.call(Arc::new(be), DType::F32)
}

/// A computation generic over the backend (closures cannot be generic).
pub trait BackendFn<R> {
    fn call<B: Backend>(self, be: Arc<B>, kv_dtype: DType) -> anyhow::Result<R>;
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.model.server.is_some() {
        return super::remote::generate(&args);
    }
    let loaded = local::load(&args.model, &args.prompt_ids, &args.prompt, args.chat)?;
    let dtype = generate_dtype(&args.model.dtype, loaded.checkpoint.dir(), &loaded.checkpoint)?;
    let shape =
        EngineShape { dtype, max_new_tokens: args.max_new_tokens, max_step_tokens: loaded.prompt.len().clamp(1, 512) };
    local::run_engine(&args.model, loaded, shape, &args)
}

impl EngineFn<()> for &Args {
    fn call<B: Backend>(self, r: EngineRun<'_, B>) -> anyhow::Result<()> {
        generate(r.eng, self, r.tok, r.prompt, r.eos)
    }
}

fn generate<B: Backend>(
    eng: &mut Engine<B>,
    args: &Args,
    tok: Option<&djinn_model::TextTokenizer>,
    prompt: &[u32],
    eos: &[u32],
) -> anyhow::Result<()> {
    let sid = eng.open_session()?;
    let max_new = args.max_new_tokens.min(eng.max_context_tokens().saturating_sub(prompt.len()));
    let mut params = [SampleParams {
        temperature: args.temperature.max(0.0),
        top_k: args.top_k,
        top_p: args.top_p,
        seed: seed_or_random(args.seed),
        step: 0,
    }];
    let mut detok = Detokenizer::new();
    let mut stops = StopStrings::new(args.stop.clone());
    let mut tokens: Vec<u32> = Vec::with_capacity(max_new);
    let mut out = std::io::stdout().lock();
    let mut finish = "length";
    let mut ids = Vec::with_capacity(1);
    let t0 = Instant::now();
    let (mut t_first, mut t_last) = (t0, t0);
    if max_new > 0 {
        // Prefill in chunks of the step limit; the last chunk samples the first token.
        let chunk = eng.max_step_tokens();
        let mut logits = Vec::new();
        let n_chunks = prompt.len().div_ceil(chunk);
        for part in prompt.chunks(chunk).take(n_chunks - 1) {
            eng.step_logits(&[(sid, part)], djinn_model::LogitsMode::Last, &mut logits)?;
        }
        let last = &prompt[(n_chunks - 1) * chunk..];
        eng.step_sample(&[(sid, last)], &params, &mut ids)?;
    }
    while tokens.len() < max_new {
        let next = ids[0];
        let now = Instant::now();
        if !args.ignore_eos && eos.contains(&next) {
            finish = "eos";
            break;
        }
        if tokens.is_empty() {
            t_first = now;
        }
        t_last = now;
        tokens.push(next);
        if let Some(tok) = tok {
            let delta = detok.push(tok, next)?;
            let (emit, hit) = stops.push(delta);
            if !args.json && !emit.is_empty() {
                out.write_all(emit.as_bytes())?;
                out.flush()?;
            }
            if hit {
                finish = "stop";
                break;
            }
        } else if !args.json {
            write!(out, "{next} ")?;
            out.flush()?;
        }
        if tokens.len() == max_new {
            break;
        }
        params[0].step += 1;
        eng.step_sample(&[(sid, &[next])], &params, &mut ids)?;
    }
    eng.close_session(sid)?;
    let summary = Summary {
        tokens: &tokens,
        text: stops.text(),
        times: (t0, t_first, t_last),
        prompt_tokens: prompt.len(),
        finish,
        wire: None,
    };
    summary.print(args.json, &mut out)
}

/// What `generate` prints at the end, the same in process and over `--server`.
pub struct Summary<'a> {
    pub tokens: &'a [u32],
    pub text: &'a str,
    /// Prompt submitted, first token, last token.
    pub times: (Instant, Instant, Instant),
    pub prompt_tokens: usize,
    pub finish: &'static str,
    /// Over `--server`: bytes sent and received by this client, and the transport.
    pub wire: Option<(u64, u64, &'static str)>,
}

impl Summary<'_> {
    /// `--json`: one object ("tokens", "text", "ttft_ms", "tpot_ms", "prompt_tokens",
    /// "finish_reason", and remotely "bytes_sent", "bytes_received"); else a newline after the
    /// streamed text and a one-line report on stderr.
    pub fn print(&self, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
        let (t0, t_first, t_last) = self.times;
        let n = self.tokens.len();
        let ttft_ms = (t_first - t0).as_secs_f64() * 1e3;
        let tpot_ms = if n > 1 { (t_last - t_first).as_secs_f64() * 1e3 / (n - 1) as f64 } else { 0.0 };
        let finish = self.finish;
        if json {
            let mut v = serde_json::json!({
                "tokens": self.tokens,
                "text": self.text,
                "ttft_ms": ttft_ms,
                "tpot_ms": tpot_ms,
                "prompt_tokens": self.prompt_tokens,
                "finish_reason": finish,
            });
            if let Some((sent, received, _)) = self.wire {
                v["bytes_sent"] = sent.into();
                v["bytes_received"] = received.into();
            }
            writeln!(out, "{v}")?;
        } else {
            writeln!(out)?;
            let wire = match self.wire {
                Some((sent, received, transport)) => format!("; {sent} B sent, {received} B received over {transport}"),
                None => String::new(),
            };
            eprintln!(
                "[{n} tokens, finish: {finish}, ttft {ttft_ms:.1} ms, tpot {tpot_ms:.2} ms ({:.1} tokens/s){wire}]",
                if tpot_ms > 0.0 { 1e3 / tpot_ms } else { 0.0 }
            );
        }
        Ok(())
    }
}
