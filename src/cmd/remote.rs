//! `generate` and `logits` against a server (`--server URL --model NAME`): the same flags and the
//! same output as in process, computed in a session on the server. Only token ids and their text
//! deltas cross the wire; `generate --json` adds the bytes this connection moved.

use std::io::Write;
use std::time::Instant;

use anyhow::{bail, Context};
use djinn_client::{Client, ClientOptions, DecodeOptions, Feed, FinishReason, Input, OpenOptions, TokenEvent};

use super::generate::{Args as GenerateArgs, ModelArgs, Summary};
use super::logits::{print_logits, Args as LogitsArgs};

/// Connects as `--server`/`--token-file` say; returns the client and the `--model` name.
pub fn connect(m: &ModelArgs) -> anyhow::Result<(Client, String)> {
    let url = m.server.as_deref().context("--server URL is required")?;
    let model = m.model_name.clone().context("--server needs --model NAME (a model the server serves)")?;
    let mut opts = ClientOptions { token: djinn_client::load_token(m.token_file.as_deref())?, ..Default::default() };
    opts.transport.rdma_device = m.nic.clone();
    // The client's error already names the URL.
    let client = Client::connect_with(url, &opts)?;
    Ok((client, model))
}

pub fn finish_name(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Eos => "eos",
        FinishReason::Length => "length",
        FinishReason::Stop => "stop",
        FinishReason::Cancelled => "cancelled",
    }
}

pub fn generate(args: &GenerateArgs) -> anyhow::Result<()> {
    let (mut client, model) = connect(&args.model)?;
    let max_new = u32::try_from(args.max_new_tokens).unwrap_or(u32::MAX);
    // A context just large enough when the prompt length is known here; else the model's maximum.
    let max_tokens = match &args.prompt_ids {
        Some(ids) => u32::try_from(ids.len()).unwrap_or(u32::MAX).saturating_add(max_new),
        None => 0,
    };
    let info = client
        .open_session(&OpenOptions {
            max_tokens,
            qos: args.qos,
            deadline_ms: args.deadline_ms,
            ..OpenOptions::new(model.clone())
        })
        .with_context(|| format!("opening a session on {model:?} at {}", client.url()))?;
    let sid = info.session;
    let t0 = Instant::now();
    let feed = match (&args.prompt_ids, &args.prompt) {
        (Some(ids), _) if ids.is_empty() => bail!("the prompt is empty"),
        (Some(ids), _) => Feed::Ids(ids),
        (None, Some(_)) if !info.has_tokenizer => {
            bail!("model {model:?} on the server has no tokenizer.json, so --prompt needs --prompt-ids instead")
        }
        (None, Some(_)) if args.chat && !info.has_chat_template => bail!("model {model:?} has no chat template"),
        (None, Some(text)) if args.chat => Feed::Turn { role: "user", text },
        (None, Some(text)) => Feed::Text(text),
        (None, None) => bail!("give --prompt TEXT or --prompt-ids 1,2,3"),
    };
    let opts = DecodeOptions {
        max_new_tokens: max_new,
        temperature: args.temperature.max(0.0),
        top_k: args.top_k,
        top_p: args.top_p,
        seed: super::generate::seed_or_random(args.seed),
        stop: args.stop.clone(),
        ignore_eos: args.ignore_eos,
        ..DecodeOptions::default()
    };
    let mut tokens: Vec<u32> = Vec::with_capacity(args.max_new_tokens.min(1 << 16));
    let mut text = String::new();
    let (mut t_first, mut t_last) = (t0, t0);
    let mut out = std::io::stdout().lock();
    let mut write_err: Option<std::io::Error> = None;
    let mut finish = "length";
    let prompt_tokens;
    if max_new == 0 {
        let r = match feed {
            Feed::Ids(ids) => client.prefill(sid, Input::Ids(ids))?,
            Feed::Text(text) => client.prefill(sid, Input::Text(text))?,
            Feed::Turn { role, text } => client.append_turn(sid, role, text)?,
        };
        prompt_tokens = r.prompt_tokens;
    } else {
        // One request: the prompt's forward pass also samples the first token.
        let summary = client.generate(sid, feed, &opts, |ev: &TokenEvent<'_>| {
            let now = Instant::now();
            if tokens.is_empty() {
                t_first = now;
            }
            t_last = now;
            tokens.push(ev.token);
            text.push_str(ev.text);
            if !args.json {
                let r =
                    if info.has_tokenizer { out.write_all(ev.text.as_bytes()) } else { write!(out, "{} ", ev.token) };
                if let Err(e) = r.and_then(|()| out.flush()) {
                    // stdout is gone (a closed pipe): stop generating rather than compute for nobody.
                    write_err = Some(e);
                    return false;
                }
            }
            true
        })?;
        finish = finish_name(summary.finish);
        prompt_tokens = summary.prompt_tokens;
    }
    if let Some(e) = write_err {
        return Err(e).context("writing to stdout");
    }
    client.close_session(sid)?;
    let summary = Summary {
        tokens: &tokens,
        text: &text,
        times: (t0, t_first, t_last),
        prompt_tokens: prompt_tokens as usize,
        finish,
        wire: Some((client.bytes_sent(), client.bytes_received(), client.transport())),
    };
    summary.print(args.json, &mut out)
}

/// Logits of every prompt position, computed by the server: the same JSON as in process.
pub fn logits(args: &LogitsArgs) -> anyhow::Result<()> {
    let (mut client, model) = connect(&args.model)?;
    let (rows, vocab, logits) =
        client.logits(&model, &args.prompt_ids).with_context(|| format!("logits of {model:?} at {}", client.url()))?;
    let (rows, vocab) = (rows as usize, vocab as usize);
    if rows != args.prompt_ids.len() || logits.len() != rows * vocab || vocab == 0 {
        bail!("server returned {} logits as {rows} x {vocab} for {} positions", logits.len(), args.prompt_ids.len());
    }
    print_logits(args, &logits, vocab)
}
