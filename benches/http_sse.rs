//! What streaming over the OpenAI-compatible HTTP front adds, beside the Rust client over tcp on
//! the same server in the same run: SmolLM2 bf16 (`models/smollm2-bf16`), one `serve` process
//! with `--listen tcp://` and `--http-listen`, runs alternating between the two clients (which
//! goes first alternates too).
//!
//! Each run: the same prompt as raw text, greedy, `NEW_TOKENS` tokens (ignoring EOS is not an
//! HTTP parameter, so the prompt is one the model continues at length). Rust client: open a
//! session, `generate` with the text, close — the clock starts before the open, so both sides
//! carry the same per-request session work. HTTP: one stateless `POST /v1/completions` with
//! `"stream": true` on a keep-alive connection, events read as they arrive (a small Rust SSE
//! client, `tests/common/http.rs`). Time to first token = request start to the first token's
//! text on this side; time per token = (last − first) / (tokens − 1).
//!
//! Targets (issue 14): HTTP adds ≤ 0.5 ms to TTFT (median difference) and ≤ 5 % to time per
//! token (ratio of medians). `cargo bench --bench http_sse`; `DJINN_BENCH_QUICK=1` runs fewer.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/common/http.rs"]
mod http;

use std::path::Path;
use std::time::Instant;

use common::ServerProc;
use djinn_client::{Client, ClientOptions, DecodeOptions, Feed, OpenOptions};

const PROMPT: &str = "Count from one to one hundred: one, two, three, four,";
const NEW_TOKENS: u32 = 48;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// (ttft ms, tpot ms, tokens) of one Rust-client run.
fn rust_run(c: &mut Client) -> (f64, f64, usize) {
    let t0 = Instant::now();
    let sid = c.open_session(&OpenOptions::new("smollm2")).unwrap().session;
    let opts = DecodeOptions { max_new_tokens: NEW_TOKENS, temperature: 0.0, ..DecodeOptions::default() };
    let (mut first, mut last, mut n) = (t0, t0, 0usize);
    c.generate(sid, Feed::Text(PROMPT), &opts, |_| {
        let now = Instant::now();
        if n == 0 {
            first = now;
        }
        last = now;
        n += 1;
        true
    })
    .unwrap();
    c.close_session(sid).unwrap();
    let ttft = first.duration_since(t0).as_secs_f64() * 1e3;
    (ttft, last.duration_since(first).as_secs_f64() * 1e3 / (n.max(2) - 1) as f64, n)
}

/// (ttft ms, tpot ms, tokens) of one HTTP streaming run.
fn http_run(c: &mut http::Http) -> (f64, f64, usize) {
    let body = serde_json::json!({"model": "smollm2", "prompt": PROMPT, "max_tokens": NEW_TOKENS,
                                  "temperature": 0, "stream": true})
    .to_string();
    let t0 = Instant::now();
    let (mut first, mut last, mut n) = (t0, t0, 0usize);
    let r = c.call("POST", "/v1/completions", Some(&body), None, &mut |bytes| {
        // One token's event per chunk; the finish chunk and [DONE] follow the last token.
        let s = std::str::from_utf8(bytes).unwrap_or("");
        if s.contains("\"finish_reason\":null") {
            let now = Instant::now();
            if n == 0 {
                first = now;
            }
            last = now;
            n += 1;
        }
    });
    assert_eq!(r.code, 200);
    let ttft = first.duration_since(t0).as_secs_f64() * 1e3;
    (ttft, last.duration_since(first).as_secs_f64() * 1e3 / (n.max(2) - 1) as f64, n)
}

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/smollm2-bf16");
    if !dir.join("config.json").exists() {
        println!(
            "http_sse: skipped: models/smollm2-bf16 not fetched (scripts/fetch_smollm2.sh models/smollm2-bf16 bf16)"
        );
        return;
    }
    let quick = std::env::var_os("DJINN_BENCH_QUICK").is_some();
    let runs = if quick { 5 } else { 15 };
    let spec = format!("smollm2={}", dir.display());
    let srv = ServerProc::start(&[
        "--listen",
        "tcp://127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--gpus",
        "cpu",
        "--model",
        &spec,
    ]);
    let mut rc = Client::connect_with(srv.url(), &ClientOptions::default()).unwrap();
    let mut hc = http::Http::connect(srv.http_api.as_deref().unwrap());
    // Warm-up: both paths, once.
    let (_, _, n0) = rust_run(&mut rc);
    let (_, _, n1) = http_run(&mut hc);
    assert_eq!(n0, n1, "both clients must get the same number of tokens");
    let (mut rt, mut rp, mut ht, mut hp, mut dt) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let (r, h) = if i % 2 == 0 {
            let r = rust_run(&mut rc);
            (r, http_run(&mut hc))
        } else {
            let h = http_run(&mut hc);
            (rust_run(&mut rc), h)
        };
        rt.push(r.0);
        rp.push(r.1);
        ht.push(h.0);
        hp.push(h.1);
        dt.push(h.0 - r.0);
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let (rt, rp, ht, hp, dt) = (median(&mut rt), median(&mut rp), median(&mut ht), median(&mut hp), median(&mut dt));
    println!("http_sse: SmolLM2 bf16, {runs} interleaved runs each, {n0} tokens, load {}", load.trim());
    println!("  rust client tcp : ttft {rt:.3} ms  tpot {rp:.3} ms (medians)");
    println!("  http sse        : ttft {ht:.3} ms  tpot {hp:.3} ms (medians)");
    println!(
        "  http - rust     : ttft {:+.3} ms (median of paired differences; target <= +0.5 ms)  tpot ratio {:.3} (target <= 1.05)",
        dt,
        hp / rp
    );
}
