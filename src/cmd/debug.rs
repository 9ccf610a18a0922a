//! `djinn-dataplane debug`: runs a prompt's input pass with breakpoints — stopping after layer N
//! for each `--break-at N`, writing the hidden state (`[input tokens, hidden]` f32, before the
//! final norm when N = L) to `DUMP_DIR/layer-N.npy`, replacing it with `PATCH_DIR/layer-N.npy`
//! when that file exists — then resumes and decodes greedily. In process (`--model-dir`);
//! `--json` prints one object: `tokens`, `text`, `pauses: [{"layer", "pause_ms", "resume_ms"}]`.
//! With `--server URL --model NAME` the same runs in a session on the server (a decode with
//! breakpoints; the states travel as f32), timed on this host.
//!
//! With `--prefill` the breakpoints are on a prefill of the prompt (its pass feeds every token,
//! the last included, and commits after the last layer); the decode that follows feeds nothing
//! and samples its first token from the state the prefill kept. The tokens are the same.
//!
//! `pause_ms` is the compute from the start of the pass (or the previous resume) to the pause,
//! reading the state included; `resume_ms` runs from resuming to the next pause or the first
//! sampled token. `--prompt` is tokenized as `generate --prompt` does (no chat template).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, ensure, Context};
use djinn_backend::{Backend, SampleParams};
use djinn_dataplane::npy;
use djinn_model::{Detokenizer, Engine};

use super::generate::ModelArgs;
use super::local::{self, EngineFn, EngineRun, EngineShape};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text prompt, tokenized without a chat template (needs the model's tokenizer.json).
    #[arg(long, conflicts_with = "prompt_ids")]
    pub prompt: Option<String>,
    /// Prompt as token ids: 1,2,3.
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    /// Layers to stop after, 1..=L, increasing (L = the residual stream before the final norm).
    #[arg(long, value_delimiter = ',', required = true)]
    pub break_at: Vec<usize>,
    /// Where `layer-N.npy` is written at each breakpoint.
    #[arg(long)]
    pub dump_dir: PathBuf,
    /// Where `layer-N.npy` replacements are read from (a missing file = resume unmodified).
    #[arg(long)]
    pub patch_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 16)]
    pub max_new_tokens: usize,
    /// Decode through EOS.
    #[arg(long)]
    pub ignore_eos: bool,
    /// One JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Pause in a prefill of the prompt, then decode from the state it kept (else the pauses
    /// are in the decode's input pass).
    #[arg(long)]
    pub prefill: bool,
}

/// One breakpoint's timings.
struct Pause {
    layer: usize,
    pause_ms: f64,
    resume_ms: f64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.model.server.is_some() {
        return run_remote(&args);
    }
    let loaded = local::load(&args.model, &args.prompt_ids, &args.prompt, false)?;
    let layers = loaded.cfg.layers;
    for (i, &n) in args.break_at.iter().enumerate() {
        ensure!(
            (1..=layers).contains(&n) && (i == 0 || n > args.break_at[i - 1]),
            "--break-at {n}: layers must be increasing within 1..={layers}"
        );
    }
    std::fs::create_dir_all(&args.dump_dir).with_context(|| format!("creating {}", args.dump_dir.display()))?;
    let shape = EngineShape {
        dtype: super::generate::parse_dtype(&args.model.dtype)?,
        max_new_tokens: args.max_new_tokens,
        // A pass with breakpoints feeds its input in one step.
        max_step_tokens: loaded.prompt.len(),
    };
    local::run_engine(&args.model, loaded, shape, &args)
}

impl EngineFn<()> for &Args {
    fn call<B: Backend>(self, r: EngineRun<'_, B>) -> anyhow::Result<()> {
        debug(r.eng, self, r.tok, r.prompt, r.eos)
    }
}

/// Writes the state to `DUMP_DIR/layer-N.npy` and returns the replacement from `PATCH_DIR`, if
/// any (checked against the state's shape).
fn dump_and_patch(args: &Args, layer: usize, shape: [usize; 2], hidden: &[f32]) -> anyhow::Result<Option<Vec<f32>>> {
    let name = format!("layer-{layer}.npy");
    npy::write_f32(&args.dump_dir.join(&name), &shape, hidden)?;
    let Some(dir) = &args.patch_dir else { return Ok(None) };
    let path = dir.join(&name);
    if !path.exists() {
        return Ok(None);
    }
    let (got, values) = npy::read_f32(&path)?;
    ensure!(got == shape, "{}: shape {got:?}, the hidden state is {shape:?}", path.display());
    Ok(Some(values))
}

fn run_remote(args: &Args) -> anyhow::Result<()> {
    let (mut client, model) = super::remote::connect(&args.model)?;
    let max_new = u32::try_from(args.max_new_tokens).unwrap_or(u32::MAX);
    let info = client
        .open_session(&djinn_client::OpenOptions::new(model.clone()))
        .with_context(|| format!("opening a session on {model:?} at {}", client.url()))?;
    let sid = info.session;
    let feed = match (&args.prompt_ids, &args.prompt) {
        (Some(ids), _) if ids.is_empty() => bail!("the prompt is empty"),
        (Some(ids), _) => djinn_client::Feed::Ids(ids),
        (None, Some(_)) if !info.has_tokenizer => {
            bail!("model {model:?} on the server has no tokenizer.json, so --prompt needs --prompt-ids instead")
        }
        (None, Some(text)) => djinn_client::Feed::Text(text),
        (None, None) => bail!("give --prompt TEXT or --prompt-ids 1,2,3"),
    };
    for (i, &n) in args.break_at.iter().enumerate() {
        ensure!(n >= 1 && (i == 0 || n > args.break_at[i - 1]), "--break-at {n}: layers must be increasing from 1");
    }
    std::fs::create_dir_all(&args.dump_dir).with_context(|| format!("creating {}", args.dump_dir.display()))?;
    let opts = djinn_client::DecodeOptions {
        max_new_tokens: max_new,
        ignore_eos: args.ignore_eos,
        ..djinn_client::DecodeOptions::default()
    };
    let layers: Vec<u32> = args.break_at.iter().map(|&n| n as u32).collect();
    let (mut tokens, mut text) = (Vec::new(), String::new());
    // Both callbacks time the pauses.
    let pauses: std::cell::RefCell<Vec<Pause>> = Default::default();
    let t = std::cell::Cell::new(Instant::now());
    let mut failed: Option<anyhow::Error> = None;
    let on_token = |ev: &djinn_client::TokenEvent<'_>| {
        if tokens.is_empty() {
            if let Some(p) = pauses.borrow_mut().last_mut() {
                p.resume_ms = t.get().elapsed().as_secs_f64() * 1e3;
            }
        }
        tokens.push(ev.token);
        text.push_str(ev.text);
        true
    };
    let on_pause = |c: &mut djinn_client::Client, note: &djinn_proto::PausedNote| {
        let ms = t.get().elapsed().as_secs_f64() * 1e3;
        let mut pauses = pauses.borrow_mut();
        if let Some(p) = pauses.last_mut() {
            p.resume_ms = ms;
        }
        pauses.push(Pause { layer: note.layer as usize, pause_ms: ms, resume_ms: 0.0 });
        let (desc, hidden) = c.read_hidden_f32(sid)?;
        let shape = [desc.tokens as usize, desc.hidden as usize];
        match dump_and_patch(args, note.layer as usize, shape, &hidden) {
            Ok(Some(patch)) => c.write_hidden_f32(sid, desc.layer, desc.tokens, desc.hidden, &patch)?,
            Ok(None) => {}
            Err(e) => {
                failed = Some(e);
                return c.cancel(sid);
            }
        }
        t.set(Instant::now());
        c.resume(sid)
    };
    let r = if args.prefill {
        let input = match feed {
            djinn_client::Feed::Ids(ids) => djinn_client::Input::Ids(ids),
            djinn_client::Feed::Text(text) => djinn_client::Input::Text(text),
            djinn_client::Feed::Turn { .. } => unreachable!("the prompt is ids or text"),
        };
        client.prefill_with_breakpoints(sid, input, &layers, on_pause).and_then(|_| client.decode(sid, &opts, on_token))
    } else {
        client.generate_with_breakpoints(sid, feed, &opts, &layers, on_token, on_pause)
    };
    let closed = client.close_session(sid);
    if let Some(e) = failed {
        return Err(e);
    }
    r.with_context(|| format!("decoding with breakpoints on {model:?}"))?;
    closed?;
    print(args, &tokens, &text, &pauses.into_inner(), true)
}

fn debug<B: Backend>(
    eng: &mut Engine<B>,
    args: &Args,
    tok: Option<&djinn_model::TextTokenizer>,
    prompt: &[u32],
    eos: &[u32],
) -> anyhow::Result<()> {
    let sid = eng.open_session()?;
    let hidden_size = eng.config().hidden_size;
    let greedy = SampleParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, step: 0 };
    let mut pauses: Vec<Pause> = Vec::with_capacity(args.break_at.len());
    let (mut state, mut hidden) = (Vec::new(), Vec::new());
    let mut from: Option<usize> = None;
    let mut t = Instant::now();
    for &n in &args.break_at {
        eng.pass_to_layer(sid, prompt, from.map(|l| (l, state.as_slice())), n, &mut hidden)?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if let Some(p) = pauses.last_mut() {
            p.resume_ms = ms;
        }
        pauses.push(Pause { layer: n, pause_ms: ms, resume_ms: 0.0 });
        if let Some(patch) = dump_and_patch(args, n, [prompt.len(), hidden_size], &hidden)? {
            hidden = patch;
        }
        std::mem::swap(&mut state, &mut hidden);
        from = Some(n);
        t = Instant::now();
    }
    let max_new = args.max_new_tokens.min(eng.max_context_tokens().saturating_sub(prompt.len()));
    let mut tokens: Vec<u32> = Vec::with_capacity(max_new);
    if args.prefill {
        // The prefill's pass runs to the last layer and commits, keeping the last row.
        let layers = eng.config().layers;
        if from != Some(layers) {
            eng.pass_to_layer(sid, prompt, from.map(|l| (l, state.as_slice())), layers, &mut hidden)?;
            std::mem::swap(&mut state, &mut hidden);
        }
        eng.commit_pass(sid)?;
    }
    if max_new > 0 {
        let first = if args.prefill {
            let row = djinn_model::HeldRow {
                id: sid,
                token: prompt[prompt.len() - 1],
                hidden: &state[state.len() - hidden_size..],
            };
            let mut out = Vec::with_capacity(1);
            eng.sample_held(&[row], &[greedy], None, &mut out)?;
            out[0]
        } else {
            eng.pass_finish_sample(sid, prompt, (from.unwrap_or(0), &state), greedy, None)?
        };
        if let Some(p) = pauses.last_mut() {
            p.resume_ms = t.elapsed().as_secs_f64() * 1e3;
        }
        let mut next = first;
        let mut ids = Vec::with_capacity(1);
        loop {
            if !args.ignore_eos && eos.contains(&next) {
                break;
            }
            tokens.push(next);
            if tokens.len() == max_new {
                break;
            }
            eng.step_sample(&[(sid, &[next])], &[greedy], &mut ids)?;
            next = ids[0];
        }
    } else if !args.prefill {
        eng.cancel_pass(sid)?;
    }
    eng.close_session(sid)?;
    let text = match tok {
        Some(tok) => {
            let mut detok = Detokenizer::new();
            let mut s = String::new();
            for &id in &tokens {
                s.push_str(detok.push(tok, id)?);
            }
            s
        }
        None => String::new(),
    };
    print(args, &tokens, &text, &pauses, tok.is_some())
}

/// `--json`: one object; else the text (or the ids without a tokenizer) and a line per pause.
fn print(args: &Args, tokens: &[u32], text: &str, pauses: &[Pause], has_text: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if args.json {
        let pauses: Vec<_> = pauses
            .iter()
            .map(|p| serde_json::json!({"layer": p.layer, "pause_ms": p.pause_ms, "resume_ms": p.resume_ms}))
            .collect();
        writeln!(out, "{}", serde_json::json!({"tokens": tokens, "text": text, "pauses": pauses}))?;
    } else {
        for p in pauses {
            eprintln!(
                "[layer {}: {} written; paused after {:.2} ms, resumed in {:.2} ms]",
                p.layer,
                args.dump_dir.join(format!("layer-{}.npy", p.layer)).display(),
                p.pause_ms,
                p.resume_ms
            );
        }
        if has_text {
            writeln!(out, "{text}")?;
        } else {
            let ids: Vec<String> = tokens.iter().map(u32::to_string).collect();
            writeln!(out, "{}", ids.join(" "))?;
        }
    }
    Ok(())
}
