//! `djinn-dataplane chat --server URL --model NAME`: an interactive conversation in one session
//! on the server. Each line read from stdin is a user turn; the server applies the chat template
//! over the conversation it keeps, so only the new turn's text goes up and the reply streams back.
//! Ends at end of input or a line `/exit`; the session is closed then.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use djinn_client::{Client, ClientOptions, DecodeOptions, Feed, OpenOptions, TokenEvent};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The server: tcp://HOST:PORT or shm://NAME.
    #[arg(long, value_name = "URL")]
    pub server: String,
    /// The server's model name (`djinn-dataplane models --server URL` lists them).
    #[arg(long, value_name = "NAME")]
    pub model: String,
    /// File holding the tenant token (else DJINN_TOKEN).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// A system message sent before the first turn.
    #[arg(long)]
    pub system: Option<String>,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: u32,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    /// Sample among the k most likely tokens only; 0 = no top-k cut.
    #[arg(long, default_value_t = 0)]
    pub top_k: u32,
    /// Nucleus sampling: the most likely tokens whose probabilities add up to p; 1 = no cut.
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f32,
    /// Sampling seed. Default: a random seed per run.
    #[arg(long)]
    pub seed: Option<u64>,
    /// The session's scheduling class (realtime, interactive, batch, background).
    #[arg(long, default_value = "interactive")]
    pub qos: djinn_client::Qos,
    /// Time per output token the session needs, ms (0 = none); a tight one raises the class on
    /// the server (<= 25 ms realtime, <= 250 ms interactive).
    #[arg(long, default_value_t = 0)]
    pub deadline_ms: u32,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let opts = ClientOptions { token: djinn_client::load_token(args.token_file.as_deref())?, ..Default::default() };
    let mut client = Client::connect_with(&args.server, &opts)?;
    let info = client
        .open_session(&OpenOptions {
            qos: args.qos,
            deadline_ms: args.deadline_ms,
            ..OpenOptions::new(args.model.clone())
        })
        .with_context(|| format!("opening a session on {:?} at {}", args.model, args.server))?;
    if !info.has_chat_template {
        let _ = client.close_session(info.session);
        bail!("model {:?} has no chat template; use `generate --prompt` or `--prompt-ids` instead", args.model);
    }
    let sid = info.session;
    if let Some(system) = &args.system {
        client.append_turn(sid, "system", system)?;
    }
    let interactive = std::io::stdin().is_terminal();
    let mut decode = DecodeOptions {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature.max(0.0),
        top_k: args.top_k,
        top_p: args.top_p,
        seed: super::generate::seed_or_random(args.seed),
        ..DecodeOptions::default()
    };
    let mut out = std::io::stdout().lock();
    let mut lines = std::io::stdin().lock().lines();
    loop {
        if interactive {
            write!(out, "> ")?;
            out.flush()?;
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading stdin")?;
        let text = line.trim();
        if text == "/exit" {
            break;
        }
        if text.is_empty() {
            continue;
        }
        let mut write_err = None;
        client.generate(sid, Feed::Turn { role: "user", text }, &decode, |ev: &TokenEvent<'_>| {
            match out.write_all(ev.text.as_bytes()).and_then(|()| out.flush()) {
                Ok(()) => true,
                Err(e) => {
                    write_err = Some(e);
                    false
                }
            }
        })?;
        if let Some(e) = write_err {
            return Err(e).context("writing to stdout");
        }
        writeln!(out)?;
        // A new seed per turn, so the same question twice need not get the same answer.
        decode.seed = decode.seed.wrapping_add(1);
    }
    client.close_session(sid)?;
    Ok(())
}
