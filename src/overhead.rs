//! What serving a session remotely costs per call, beside in-process calls of the same model on
//! the same CPU backend, measured in the same run: the one implementation behind `djinn-dataplane
//! bench overhead` and `cargo bench --bench session_overhead`.
//!
//! A *call* is one `generate` request carrying a prompt of P token ids (the payload, 4·P bytes up)
//! and returning one sampled token: remote, submit → final frame over a real `serve` process's
//! transport; in process, `Engine::step_sample` over the same prompt. Their difference is the
//! fixed per-call cost of the remote path (request, round trip, reply, the client's wake-up). A
//! *decode step* is one token of a longer generate (submit → final frame, over the tokens), so the
//! stream's per-token cost shows beside the per-call one, with the bytes each moves either way.
//! Each remote call is paired with an in-process call of the same shape right before it, so load
//! drift falls on both alike; the overhead is the median of the paired differences, the times are
//! medians.
//!
//! Per-call rows run in blocks ([`Options::block_calls`]): that many in-process calls, then as
//! many remote ones, the k-th of each paired. Strict alternation (`block_calls` 1) measures the
//! baseline's leftovers as the remote path's cost: after an in-process call the client's own pool
//! worker spins on for up to 300 µs (its next op usually follows closely), so every remote call
//! shared the two cores with it. In blocks, each side runs back to back as it would alone; the
//! first call of each side's block warms it up and is not recorded.
//!
//! Targets (issue 12): ≤ 20 µs per call on tcp loopback, ≤ 5 µs on shm.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use djinn_backend::cpu::CpuBackend;
use djinn_backend::SampleParams;
use djinn_client::{Client, ClientOptions, DecodeOptions, Feed, OpenOptions, TokenEvent};
use djinn_model::{Engine, EngineOptions};
use serde::Serialize;

use crate::serve_child::ServeChild;

/// Target fixed per-call overhead on tcp loopback, µs.
pub const TCP_TARGET_US: f64 = 20.0;
/// Target fixed per-call overhead on shm, µs.
pub const SHM_TARGET_US: f64 = 5.0;
/// The name the benchmark's server gives its model.
const MODEL_NAME: &str = "bench";

/// A transport the remote side runs over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Shm,
    Rdma,
}

impl Transport {
    pub const ALL: [Transport; 3] = [Transport::Tcp, Transport::Shm, Transport::Rdma];

    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Shm => "shm",
            Transport::Rdma => "rdma",
        }
    }

    /// The per-call overhead target, where the issue sets one.
    pub fn target_us(self) -> Option<f64> {
        match self {
            Transport::Tcp => Some(TCP_TARGET_US),
            Transport::Shm => Some(SHM_TARGET_US),
            Transport::Rdma => None,
        }
    }

    fn listen_url(self) -> String {
        match self {
            Transport::Tcp => "tcp://127.0.0.1:0".into(),
            Transport::Shm => format!("shm://djinn-bench-{}-{}", std::process::id(), crate::serve_child::unique()),
            Transport::Rdma => "rdma://127.0.0.1:0".into(),
        }
    }

    /// Why this transport cannot run here, if it cannot (probed, not guessed).
    pub fn unavailable(self) -> Option<String> {
        match self {
            Transport::Tcp => None,
            Transport::Shm => {
                let url = self.listen_url();
                djinn_transport::listen(&url, &Default::default())
                    .err()
                    .map(|e| format!("shm transport unavailable here: {e}"))
            }
            #[cfg(not(feature = "rdma"))]
            Transport::Rdma => Some("built without the `rdma` feature".into()),
            #[cfg(feature = "rdma")]
            Transport::Rdma => djinn_transport::rdma::device_names()
                .is_empty()
                .then(|| "no RDMA device here (scripts/rdma-vm runs on soft-RoCE)".into()),
        }
    }
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Transport::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| format!("unknown transport {s:?}: expected tcp, shm or rdma"))
    }
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct Options {
    /// The `djinn-dataplane` binary whose `serve` runs the remote side.
    pub exe: PathBuf,
    /// A model directory (Hugging Face layout) both sides load; a tiny one keeps compute from
    /// hiding the data plane.
    pub model_dir: PathBuf,
    pub transports: Vec<Transport>,
    /// Prompt lengths of the per-call rows, in tokens.
    pub payload_tokens: Vec<usize>,
    /// Tokens of the decode-step row's generate (0 = no such row).
    pub decode_tokens: usize,
    /// Paired calls per row; medians are reported.
    pub calls: usize,
    /// Per-call rows: in-process calls per block before as many remote ones (1: strictly
    /// alternated; more: each side's first call per block is a warm-up, not recorded).
    pub block_calls: usize,
    /// CPU threads of each side.
    pub threads: usize,
    /// Both sides busy-poll (`serve --wait busy-poll`, a busy-poll client): what a
    /// latency-critical service chooses, one core per waiting side. Default: spin-then-park.
    pub busy_poll: bool,
}

/// One measured row.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub transport: &'static str,
    /// "call" (one request, one token) or "decode_step" (per token of a longer generate).
    pub kind: &'static str,
    pub payload_tokens: usize,
    /// Bytes of token ids the request carries up.
    pub payload_bytes: usize,
    pub in_process_us: f64,
    pub remote_us: f64,
    /// Median of the paired (remote − in-process) differences.
    pub overhead_us: f64,
    /// remote / in-process.
    pub ratio: f64,
    pub target_us: Option<f64>,
    /// Bytes on the wire per call (per token for "decode_step"), client → server and back.
    pub bytes_up: f64,
    pub bytes_down: f64,
}

impl Row {
    pub fn within_target(&self) -> Option<bool> {
        self.target_us.map(|t| self.overhead_us <= t)
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub calls: usize,
    pub block_calls: usize,
    pub threads: usize,
    /// "spin-then-park" or "busy-poll" (both sides).
    pub wait: &'static str,
    pub rows: Vec<Row>,
    /// Transports that could not run here, and why.
    pub skipped: Vec<(&'static str, String)>,
}

/// What one run (one or more sequences of one shape) measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunStats {
    /// Prompt submitted → last token, over the tokens generated (so fixed per-request costs are
    /// charged to the steps).
    pub step_us: f64,
    /// First token → last, over the decode steps between them.
    pub decode_us: f64,
    /// Prompt submitted → first token here.
    pub ttft_us: f64,
    /// Bytes received per generated token (token frames + final frame).
    pub bytes_down_per_step: f64,
    /// Bytes sent per generated token (the request with its prompt, amortised).
    pub bytes_up_per_step: f64,
}

pub fn median(mut xs: Vec<f64>) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

/// In process: `n_seqs` sequences of `new_tokens` greedy tokens after `prompt`, each in a fresh
/// session.
pub fn in_process(
    eng: &mut Engine<CpuBackend>,
    prompt: &[u32],
    new_tokens: usize,
    n_seqs: usize,
) -> anyhow::Result<RunStats> {
    let greedy = [SampleParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, step: 0 }];
    let (mut step_us, mut decode_us, mut ttft_us) = (Vec::new(), Vec::new(), Vec::new());
    let mut ids = Vec::new();
    for _ in 0..n_seqs {
        let sid = eng.open_session()?;
        let t0 = Instant::now();
        eng.step_sample(&[(sid, prompt)], &greedy, &mut ids)?;
        let t_first = Instant::now();
        let mut next = ids[0];
        for _ in 1..new_tokens {
            eng.step_sample(&[(sid, &[next])], &greedy, &mut ids)?;
            next = ids[0];
        }
        let t_last = Instant::now();
        eng.close_session(sid)?;
        ttft_us.push((t_first - t0).as_secs_f64() * 1e6);
        step_us.push((t_last - t0).as_secs_f64() * 1e6 / new_tokens as f64);
        decode_us.push((t_last - t_first).as_secs_f64() * 1e6 / (new_tokens.max(2) - 1) as f64);
    }
    Ok(RunStats {
        step_us: mean(&step_us),
        decode_us: mean(&decode_us),
        ttft_us: mean(&ttft_us),
        ..RunStats::default()
    })
}

/// Remote: the same sequences as sessions on the server's `model`, one `generate` each (the
/// prompt travels with the decode; EOS ignored, so every sequence has `new_tokens`).
pub fn remote(
    client: &mut Client,
    model: &str,
    prompt: &[u32],
    new_tokens: usize,
    n_seqs: usize,
) -> anyhow::Result<RunStats> {
    let counters = client.counters();
    let opts = DecodeOptions { max_new_tokens: new_tokens as u32, ignore_eos: true, ..DecodeOptions::default() };
    let (mut step_us, mut decode_us, mut ttft_us, mut up, mut down) = (Vec::new(), Vec::new(), Vec::new(), 0u64, 0u64);
    for _ in 0..n_seqs {
        let info = client
            .open_session(&OpenOptions { max_tokens: (prompt.len() + new_tokens) as u32, ..OpenOptions::new(model) })?;
        let mut stamps = Vec::with_capacity(new_tokens);
        let (s0, r0) = (counters.sent(), counters.received());
        let t0 = Instant::now();
        client.generate(info.session, Feed::Ids(prompt), &opts, |_ev: &TokenEvent<'_>| {
            stamps.push(Instant::now());
            true
        })?;
        // The final frame has arrived: a call ends here, not at its token.
        let t_end = Instant::now();
        up += counters.sent() - s0;
        down += counters.received() - r0;
        client.close_session(info.session)?;
        anyhow::ensure!(stamps.len() == new_tokens, "the server stopped after {} of {new_tokens} tokens", stamps.len());
        ttft_us.push((stamps[0] - t0).as_secs_f64() * 1e6);
        step_us.push((t_end - t0).as_secs_f64() * 1e6 / new_tokens as f64);
        decode_us.push((stamps[new_tokens - 1] - stamps[0]).as_secs_f64() * 1e6 / (new_tokens.max(2) - 1) as f64);
    }
    let tokens = (n_seqs * new_tokens) as f64;
    Ok(RunStats {
        step_us: mean(&step_us),
        decode_us: mean(&decode_us),
        ttft_us: mean(&ttft_us),
        bytes_down_per_step: down as f64 / tokens,
        bytes_up_per_step: up as f64 / tokens,
    })
}

/// A prompt of `n` ids, away from the low special ids, within `vocab`.
fn prompt_of(n: usize, vocab: usize) -> Vec<u32> {
    let span = vocab.saturating_sub(3).max(1);
    (0..n).map(|i| 3 + ((i * 37) % span) as u32).collect()
}

/// Loads the in-process engine with the same step bound the server gets (and, when given, a
/// shorter context than the model's, so a large model's KV cache stays small).
pub fn load_engine(
    dir: &Path,
    threads: usize,
    max_step_tokens: usize,
    max_context_tokens: Option<usize>,
) -> anyhow::Result<Engine<CpuBackend>> {
    let be = Arc::new(CpuBackend::with_threads(threads)?);
    let opts = EngineOptions { max_sessions: 1, max_step_tokens, max_context_tokens, ..EngineOptions::default() };
    Engine::load_dir(be, dir, &opts).with_context(|| format!("loading {} in process", dir.display()))
}

/// Starts `serve` over `t` with `dir` as [`MODEL_NAME`].
pub fn start_server(
    exe: &Path,
    t: Transport,
    dir: &Path,
    threads: usize,
    max_step_tokens: usize,
    busy_poll: bool,
) -> anyhow::Result<ServeChild> {
    let mut args: Vec<String> = [
        "--gpus",
        "cpu",
        "--listen",
        &t.listen_url(),
        "--model",
        &format!("{MODEL_NAME}={}", dir.display()),
        "--threads",
        &threads.to_string(),
        "--max-step-tokens",
        &max_step_tokens.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if busy_poll {
        args.extend(["--wait".to_owned(), "busy-poll".to_owned()]);
    }
    ServeChild::start(exe, &args)
}

/// Measures every row; `progress` hears one line per step.
pub fn measure(opts: &Options, mut progress: impl FnMut(&str)) -> anyhow::Result<Report> {
    anyhow::ensure!(opts.calls > 0, "calls must be at least 1");
    anyhow::ensure!(opts.block_calls > 0, "block_calls must be at least 1");
    anyhow::ensure!(!opts.payload_tokens.contains(&0), "a payload is at least one token");
    let ctx = djinn_model::ModelConfig::load(&opts.model_dir)?;
    let (vocab, context) = (ctx.vocab_size, ctx.max_position_embeddings);
    let longest = opts.payload_tokens.iter().copied().max().unwrap_or(1);
    anyhow::ensure!(
        longest < context && opts.decode_tokens + 4 <= context,
        "payloads up to {longest} tokens and {} decode tokens do not fit the model's {context}-token context",
        opts.decode_tokens
    );
    let max_step_tokens = longest.max(4);
    let mut eng = load_engine(&opts.model_dir, opts.threads, max_step_tokens, None)?;
    let wait = if opts.busy_poll { "busy-poll" } else { "spin-then-park" };
    let mut report = Report {
        calls: opts.calls,
        block_calls: opts.block_calls,
        threads: opts.threads,
        wait,
        rows: Vec::new(),
        skipped: Vec::new(),
    };
    for &t in &opts.transports {
        if let Some(why) = t.unavailable() {
            progress(&format!("{}: skipped: {why}", t.name()));
            report.skipped.push((t.name(), why));
            continue;
        }
        progress(&format!("{}: starting the server", t.name()));
        let srv = start_server(&opts.exe, t, &opts.model_dir, opts.threads, max_step_tokens, opts.busy_poll)?;
        let mut copts = ClientOptions { token: djinn_client::load_token(None)?, ..Default::default() };
        if opts.busy_poll {
            copts.transport.wait = djinn_transport::WaitMode::BusyPoll;
        }
        let mut client = Client::connect_with(srv.url(), &copts)?;
        for &p in &opts.payload_tokens {
            progress(&format!("{}: calls with a {p}-token payload", t.name()));
            let prompt = prompt_of(p, vocab);
            in_process(&mut eng, &prompt, 1, 1)?; // warm-up
            remote(&mut client, MODEL_NAME, &prompt, 1, 1)?;
            let (mut local, mut far) = (Vec::with_capacity(opts.calls), Vec::with_capacity(opts.calls));
            // A block's first call of each side warms it up (unless strictly alternated).
            let warm = usize::from(opts.block_calls > 1);
            while local.len() < opts.calls {
                let k = opts.block_calls.min(opts.calls - local.len());
                for i in 0..k + warm {
                    let r = in_process(&mut eng, &prompt, 1, 1)?;
                    if i >= warm {
                        local.push(r);
                    }
                }
                for i in 0..k + warm {
                    let r = remote(&mut client, MODEL_NAME, &prompt, 1, 1)?;
                    if i >= warm {
                        far.push(r);
                    }
                }
            }
            report.rows.push(row(t, "call", p, &local, &far));
        }
        if opts.decode_tokens > 1 {
            let n = opts.decode_tokens;
            progress(&format!("{}: {n}-token decodes", t.name()));
            let prompt = prompt_of(4, vocab);
            in_process(&mut eng, &prompt, n, 1)?;
            remote(&mut client, MODEL_NAME, &prompt, n, 1)?;
            let (mut local, mut far) = (Vec::new(), Vec::new());
            // Each decode is n steps: fewer of them give as many samples.
            for _ in 0..opts.calls.div_ceil(n).max(3) {
                local.push(in_process(&mut eng, &prompt, n, 1)?);
                far.push(remote(&mut client, MODEL_NAME, &prompt, n, 1)?);
            }
            report.rows.push(row(t, "decode_step", 1, &local, &far));
        }
        drop(client);
        drop(srv);
    }
    Ok(report)
}

fn row(t: Transport, kind: &'static str, payload_tokens: usize, local: &[RunStats], far: &[RunStats]) -> Row {
    let in_process_us = median(local.iter().map(|r| r.step_us).collect());
    let remote_us = median(far.iter().map(|r| r.step_us).collect());
    Row {
        transport: t.name(),
        kind,
        payload_tokens,
        payload_bytes: payload_tokens * 4,
        in_process_us,
        remote_us,
        overhead_us: median(far.iter().zip(local).map(|(r, l)| r.step_us - l.step_us).collect()),
        ratio: remote_us / in_process_us,
        target_us: t.target_us(),
        bytes_up: median(far.iter().map(|r| r.bytes_up_per_step).collect()),
        bytes_down: median(far.iter().map(|r| r.bytes_down_per_step).collect()),
    }
}

impl Report {
    /// The table `bench overhead` prints.
    pub fn table(&self) -> String {
        let mut s = format!(
            "waiting: {} (client and server); per-call rows in blocks of {} calls a side\n",
            self.wait, self.block_calls
        );
        s += &format!(
            "{:<5} {:<12} {:>8} {:>14} {:>11} {:>12} {:>8} {:>8} {:>8}  target\n",
            "trans", "kind", "payload", "in-process us", "remote us", "overhead us", "ratio", "B up", "B down"
        );
        for r in &self.rows {
            let target = match (r.target_us, r.within_target()) {
                (Some(t), Some(true)) => format!("<= {t} us: within"),
                (Some(t), _) => format!("<= {t} us: OUTSIDE"),
                (None, _) => "none".into(),
            };
            s.push_str(&format!(
                "{:<5} {:<12} {:>7}B {:>14.2} {:>11.2} {:>+12.2} {:>7.3}x {:>8.1} {:>8.1}  {target}\n",
                r.transport,
                r.kind,
                r.payload_bytes,
                r.in_process_us,
                r.remote_us,
                r.overhead_us,
                r.ratio,
                r.bytes_up,
                r.bytes_down
            ));
        }
        for (t, why) in &self.skipped {
            s.push_str(&format!("{t:<5} SKIPPED: {why}\n"));
        }
        s
    }
}
