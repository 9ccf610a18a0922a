//! Sessions against real server processes, over TCP and shared memory (one body per transport):
//! greedy tokens equal to the in-process engine's, streaming with cancel, multi-turn chat equal to
//! one prefill of the whole conversation, attach from another connection and tenant isolation,
//! faults (unknown model/session, prompt too long, out-of-vocabulary ids, `--max-sessions`,
//! disconnect then lease), all-position logits, and memory pressure (KV for about two sessions,
//! eight concurrent sessions, identical tokens, the peak within capacity, swaps counted).
//!
//! The committed test model has no tokenizer; a temporary copy gets a word-level `tokenizer.json`
//! (every id a word, so generated text re-tokenizes to the same ids) and a ChatML template.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::{http_get, metric, model_server, run_trials, tenants_model_server, unique_name, Transport};
use djinn_backend::cpu::CpuBackend;
use djinn_backend::SampleParams;
use djinn_client::{Client, ClientOptions, DecodeOptions, Feed, FinishReason, Input, LogitsRequest, OpenOptions};
use djinn_model::{Engine, EngineOptions, TextTokenizer};
use djinn_proto::Status;

const MODEL: &str = "tiny";
const SRC_MODEL: &str = "tests/data/models/llama-gqa";
const VOCAB: u32 = 128;
const TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}\
                        {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Word of each id: the four markers, three role names, then `w8`..`w127`.
fn word(i: u32) -> String {
    match i {
        0 => "<unk>".into(),
        1 => "<s>".into(),
        2 => "</s>".into(),
        3 => "<|im_start|>".into(),
        4 => "<|im_end|>".into(),
        5 => "user".into(),
        6 => "assistant".into(),
        7 => "system".into(),
        i => format!("w{i}"),
    }
}

/// The model copy with a tokenizer (written once per test process).
fn model_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique_name("sessions-model"));
        std::fs::create_dir_all(&dir).unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join(SRC_MODEL);
        for f in ["config.json", "generation_config.json", "model.safetensors"] {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
        let vocab: serde_json::Map<String, serde_json::Value> = (0..VOCAB).map(|i| (word(i), i.into())).collect();
        // The markers are added tokens (matched before word splitting), not special, so decoding
        // keeps them and generated text re-tokenizes to the same ids.
        let added: Vec<serde_json::Value> = (0..5)
            .map(|i| {
                serde_json::json!({"id": i, "content": word(i), "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": false})
            })
            .collect();
        let tok = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
            "decoder": null, "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
        });
        std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
        let cfg = serde_json::json!({"eos_token": "<|im_end|>", "bos_token": "<s>", "chat_template": TEMPLATE});
        std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
        dir
    })
}

/// The in-process engine on the same model, driven like the server drives a session: the
/// prompt but its last token fed in one step, then one decode step per token.
fn engine() -> Engine<CpuBackend> {
    let be = Arc::new(CpuBackend::new().unwrap());
    let opts = EngineOptions { max_sessions: 2, all_logits: true, max_step_tokens: 64, ..EngineOptions::default() };
    Engine::load_dir(be, model_dir(), &opts).unwrap()
}

fn reference_greedy(prompt: &[u32], n: usize) -> Vec<u32> {
    reference(prompt, n, SampleParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, step: 0 })
}

/// `params.step` counts the decode's tokens from 0, as the server's does.
fn reference(prompt: &[u32], n: usize, params: SampleParams) -> Vec<u32> {
    let mut eng = engine();
    let sid = eng.open_session().unwrap();
    let mut logits = Vec::new();
    if prompt.len() > 1 {
        eng.prefill(sid, &prompt[..prompt.len() - 1], false, &mut logits).unwrap();
    }
    let (mut next, mut out, mut ids) = (*prompt.last().unwrap(), Vec::new(), Vec::new());
    for i in 0..n {
        eng.step_sample(&[(sid, &[next])], &[SampleParams { step: i as u64, ..params }], &mut ids).unwrap();
        next = ids[0];
        out.push(next);
    }
    out
}

fn greedy(n: u32) -> DecodeOptions {
    DecodeOptions { max_new_tokens: n, ignore_eos: true, ..DecodeOptions::default() }
}

fn connect(url: &str, token: Option<&str>) -> Client {
    let opts = ClientOptions { token: token.map(|t| t.as_bytes().to_vec()), ..Default::default() };
    Client::connect_with(url, &opts).unwrap()
}

fn status<T: std::fmt::Debug>(r: djinn_client::Result<T>) -> Status {
    r.expect_err("expected a refusal").status().expect("a server status")
}

fn prompt(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| 8 + (seed * 31 + i * 7) % (VOCAB - 8)).collect()
}

// ---- bodies ------------------------------------------------------------------------------------

fn decode_matches_engine(t: Transport) {
    let srv = model_server(t, MODEL, model_dir(), &[]);
    let mut c = connect(srv.url(), None);
    assert_eq!(c.capabilities().models, vec![MODEL.to_owned()]);
    let info = c.open_session(&OpenOptions::new(MODEL)).unwrap();
    assert_eq!((info.vocab, info.context_tokens, info.max_tokens), (VOCAB, 0, 64));
    assert!(info.has_tokenizer && info.has_chat_template);
    assert!(info.eos_ids.contains(&2) && info.eos_ids.contains(&4), "{:?}", info.eos_ids);
    let p = prompt(1, 9);
    let r = c.prefill(info.session, Input::Ids(&p)).unwrap();
    assert_eq!((r.prompt_tokens, r.context_tokens), (9, 9));
    let (sent, recv) = (c.bytes_sent(), c.bytes_received());
    let (ids, text, s) = c.decode_collect(info.session, &greedy(20)).unwrap();
    assert_eq!(ids, reference_greedy(&p, 20), "greedy tokens differ from the in-process engine");
    assert_eq!((s.tokens, s.finish, s.context_tokens), (20, FinishReason::Length, 29));
    let words: Vec<String> = ids.iter().map(|&i| word(i)).collect();
    assert_eq!(text, words.join(" "));
    // Token mode: per step at most 64 bytes back (plus the request and the final frame once).
    let per_step = (c.bytes_received() - recv - 64) as f64 / 20.0;
    assert!(per_step <= 64.0, "{per_step} bytes per step");
    assert!(c.bytes_sent() - sent < 128, "decode request of {} bytes", c.bytes_sent() - sent);

    // A second decode continues the same KV.
    let (more, _, s2) = c.decode_collect(info.session, &greedy(5)).unwrap();
    assert_eq!(s2.context_tokens, 34);
    let mut all = p.clone();
    all.extend(&ids);
    assert_eq!(more, reference_greedy(&all, 5));

    // Top-k and full logits ride along on request.
    let opts = DecodeOptions { logits: LogitsRequest::TopK(3), ..greedy(2) };
    c.decode(info.session, &opts, |ev| {
        assert_eq!(ev.top_k.len(), 3);
        assert_eq!(ev.top_k[0].0, ev.token, "greedy picks the top logit");
        true
    })
    .unwrap();
    let opts = DecodeOptions { logits: LogitsRequest::Full, ..greedy(1) };
    c.decode(info.session, &opts, |ev| {
        assert_eq!(ev.logits.map(<[f32]>::len), Some(VOCAB as usize));
        true
    })
    .unwrap();

    // Sampling on the server draws what the in-process engine draws with the same seed.
    let s5 = c.open_session(&OpenOptions::new(MODEL)).unwrap().session;
    c.prefill(s5, Input::Ids(&p)).unwrap();
    let opts = DecodeOptions { temperature: 0.9, top_k: 20, top_p: 0.95, seed: 42, ..greedy(12) };
    let (ids5, _, _) = c.decode_collect(s5, &opts).unwrap();
    let params = SampleParams { temperature: 0.9, top_k: 20, top_p: 0.95, seed: 42, step: 0 };
    assert_eq!(ids5, reference(&p, 12, params));
    c.close_session(s5).unwrap();

    // Raw text prefill through the server's tokenizer.
    let s3 = c.open_session(&OpenOptions::new(MODEL)).unwrap().session;
    let r = c.prefill(s3, Input::Text("w10 w11 w12")).unwrap();
    assert_eq!(r.prompt_tokens, 3);
    let (ids3, _, _) = c.decode_collect(s3, &greedy(4)).unwrap();
    assert_eq!(ids3, reference_greedy(&[10, 11, 12], 4));
    c.close_session(s3).unwrap();

    // All-position logits equal the in-process engine's.
    let (rows, vocab, logits) = c.logits(MODEL, &p).unwrap();
    assert_eq!((rows, vocab), (9, VOCAB));
    let mut eng = engine();
    let sid = eng.open_session().unwrap();
    let mut want = Vec::new();
    eng.prefill(sid, &p, true, &mut want).unwrap();
    common::assert_close(&logits, &want, 1e-5, "logits");
    c.close_session(info.session).unwrap();
    assert_eq!(status(c.close_session(info.session)), Status::UnknownSession);
}

fn streaming_cancel(t: Transport) {
    let srv = model_server(t, MODEL, model_dir(), &[]);
    let mut c = connect(srv.url(), None);
    let s = c.open_session(&OpenOptions::new(MODEL)).unwrap().session;
    c.prefill(s, Input::Ids(&prompt(2, 5))).unwrap();
    let mut seen = Vec::new();
    let sum = c
        .decode(s, &greedy(50), |ev| {
            assert_eq!(ev.index as usize, seen.len());
            seen.push(ev.token);
            seen.len() < 3
        })
        .unwrap();
    // The server may have finished all 50 before the cancel arrived (a tiny model is fast).
    assert!(sum.finish == FinishReason::Cancelled || sum.tokens == 50, "{sum:?}");
    assert_eq!(seen.len(), 3, "no token after the callback said stop");
    assert!(sum.tokens >= 3, "{sum:?}");
    // The session stays usable and consistent: what it holds is what it reports.
    let (ids, _, s2) = c.decode_collect(s, &greedy(2)).unwrap();
    assert_eq!(ids.len(), 2);
    assert_eq!(s2.context_tokens, 5 + sum.tokens + 2);
    // Cancel with no decode running is a no-op; a stop string ends a decode with Stop, cut.
    c.cancel(s).unwrap();
    let p = prompt(2, 5);
    let want = reference_greedy(&p, 6);
    let full = want.iter().map(|&i| word(i)).collect::<Vec<_>>().join(" ");
    let stop = word(want[2]);
    let cut = full.find(&stop).unwrap();
    let s3 = c.open_session(&OpenOptions::new(MODEL)).unwrap().session;
    c.prefill(s3, Input::Ids(&p)).unwrap();
    let opts = DecodeOptions { stop: vec![stop.clone()], ..greedy(6) };
    let (_, text, s4) = c.decode_collect(s3, &opts).unwrap();
    assert_eq!(s4.finish, FinishReason::Stop);
    assert_eq!(text, full[..cut], "stop {stop:?}");
}

fn multi_turn(t: Transport) {
    let srv = model_server(t, MODEL, model_dir(), &[]);
    let mut c = connect(srv.url(), None);
    let s = c.open_session(&OpenOptions::new(MODEL)).unwrap().session;
    let r1 = c.append_turn(s, "user", "w10 w11 w12").unwrap();
    let (ids1, text1, _) = c.decode_collect(s, &greedy(6)).unwrap();
    assert_eq!(ids1.len(), 6);
    let r2 = c.append_turn(s, "user", "w20 w21").unwrap();
    let (ids2, _, sum) = c.decode_collect(s, &greedy(8)).unwrap();
    // Exactly the tokens of one prefill of the whole rendered conversation.
    let tok = TextTokenizer::load(model_dir()).unwrap().unwrap();
    let conv =
        tok.apply_chat_messages(&[("user", "w10 w11 w12"), ("assistant", &text1), ("user", "w20 w21")], true).unwrap();
    let full = tok.encode(&conv, false).unwrap();
    assert_eq!(r1.context_tokens + 6 + r2.prompt_tokens, full.len() as u32, "{conv:?}");
    assert_eq!(sum.context_tokens as usize, full.len() + 8);
    assert_eq!(ids2, reference_greedy(&full, 8));
    // Roles other than user/system are refused; the session is unaffected.
    assert_eq!(status(c.append_turn(s, "assistant", "w9")), Status::BadArgument);
    assert_eq!(c.decode_collect(s, &greedy(1)).unwrap().0.len(), 1);
}

/// `generate`: the input travels with the decode and one forward pass over it samples the first
/// token — the same tokens as prefill + decode, a prompt longer than the step budget fed in
/// chunks, chat turns, and refusals that leave the session as it was.
fn generate_in_one_request(t: Transport) {
    // A step budget of 4 tokens makes a 9-token prompt take three steps.
    let srv = model_server(t, MODEL, model_dir(), &["--max-step-tokens", "4", "--metrics-listen", "127.0.0.1:0"]);
    let steps_total = || {
        let (_, body) = http_get(srv.metrics.as_deref().unwrap(), "/metrics");
        metric(&body, "djinn_engine_steps_total").expect("djinn_engine_steps_total in /metrics")
    };
    let mut c = connect(srv.url(), None);
    let s = c.open_session(&OpenOptions::new(MODEL)).unwrap().session;
    let p = prompt(3, 9);
    let steps_before = steps_total();
    let mut ids = Vec::new();
    let sum = c.generate(s, Feed::Ids(&p), &greedy(6), |ev| {
        ids.push(ev.token);
        true
    });
    let sum = sum.unwrap();
    assert_eq!(ids, reference_greedy(&p, 6), "generate differs from the in-process engine");
    assert_eq!((sum.prompt_tokens, sum.tokens, sum.context_tokens), (9, 6, 15));
    // ceil(9 / 4) = 3 steps feed the prompt, the last of them samples the first token; 5 more.
    let steps = steps_total() - steps_before;
    assert_eq!(steps, 3.0 + 5.0, "engine steps for a 9-token prompt and 6 tokens");
    // It continues the same KV like a decode.
    let mut all = p.clone();
    all.extend(&ids);
    let (more, _, _) = c.decode_collect(s, &greedy(3)).unwrap();
    assert_eq!(more, reference_greedy(&all, 3));
    // Refusals change nothing: no room to generate, an id outside the vocabulary.
    let zero = DecodeOptions { max_new_tokens: 0, ..greedy(0) };
    assert_eq!(status(c.generate(s, Feed::Ids(&[5]), &zero, |_| true)), Status::BadArgument);
    assert_eq!(status(c.generate(s, Feed::Ids(&[VOCAB]), &greedy(2), |_| true)), Status::BadArgument);
    all.extend(&more);
    let (again, _, sum) = c.decode_collect(s, &greedy(2)).unwrap();
    assert_eq!(again, reference_greedy(&all, 2));
    assert_eq!(sum.context_tokens as usize, all.len() + 2);
    c.close_session(s).unwrap();

    // Chat turns: the same tokens as append_turn + decode.
    let (a, b) = (
        c.open_session(&OpenOptions::new(MODEL)).unwrap().session,
        c.open_session(&OpenOptions::new(MODEL)).unwrap().session,
    );
    c.append_turn(a, "user", "w10 w11").unwrap();
    let (want1, _, _) = c.decode_collect(a, &greedy(4)).unwrap();
    c.append_turn(a, "user", "w30").unwrap();
    let (want2, _, _) = c.decode_collect(a, &greedy(4)).unwrap();
    let mut got = Vec::new();
    for (turn, want) in [("w10 w11", &want1), ("w30", &want2)] {
        got.clear();
        c.generate(b, Feed::Turn { role: "user", text: turn }, &greedy(4), |ev| {
            got.push(ev.token);
            true
        })
        .unwrap();
        assert_eq!(&got, want, "turn {turn:?}");
    }
    assert_eq!(
        status(c.generate(b, Feed::Turn { role: "tool", text: "x" }, &greedy(1), |_| true)),
        Status::BadArgument
    );
}

fn attach_and_tenants(t: Transport) {
    let srv = tenants_model_server(t, MODEL, model_dir(), &[]);
    let mut a = connect(srv.url(), Some("tok-alice"));
    let s = a.open_session(&OpenOptions::new(MODEL)).unwrap().session;
    let p = prompt(3, 6);
    a.prefill(s, Input::Ids(&p)).unwrap();
    // Same tenant, second connection: attach and decode there.
    let mut a2 = connect(srv.url(), Some("tok-alice"));
    let info = a2.attach_session(s).unwrap();
    assert_eq!(info.context_tokens, 6);
    let (ids, _, _) = a2.decode_collect(s, &greedy(4)).unwrap();
    assert_eq!(ids, reference_greedy(&p, 4));
    // Another tenant sees nothing, whatever it tries.
    let mut b = connect(srv.url(), Some("tok-bob"));
    assert_eq!(status(b.attach_session(s)), Status::UnknownSession);
    assert_eq!(status(b.decode_collect(s, &greedy(1))), Status::UnknownSession);
    assert_eq!(status(b.prefill(s, Input::Ids(&[9]))), Status::UnknownSession);
    assert_eq!(status(b.close_session(s)), Status::UnknownSession);
    assert_eq!(a.attach_session(s).unwrap().context_tokens, 10);
}

fn faults(t: Transport) {
    let srv = tenants_model_server(
        t,
        MODEL,
        model_dir(),
        &["--max-sessions", "3", "--session-lease-s", "1", "--metrics-listen", "127.0.0.1:0"],
    );
    let mut c = connect(srv.url(), Some("tok-alice"));
    assert_eq!(status(c.open_session(&OpenOptions::new("nope"))), Status::UnknownModel);
    assert_eq!(status(c.attach_session(12345)), Status::UnknownSession);
    assert_eq!(status(c.decode_collect(777, &greedy(1))), Status::UnknownSession);
    assert_eq!(status(c.logits("nope", &[1])), Status::UnknownModel);
    let good = c.open_session(&OpenOptions::new(MODEL)).unwrap().session;
    let p = prompt(4, 7);
    c.prefill(good, Input::Ids(&p)).unwrap();
    let s = c.open_session(&OpenOptions::new(MODEL)).unwrap().session;
    assert_eq!(status(c.prefill(s, Input::Ids(&prompt(5, 65)))), Status::BadArgument);
    assert_eq!(status(c.prefill(s, Input::Ids(&[5, VOCAB]))), Status::BadArgument);
    assert_eq!(status(c.logits(MODEL, &[VOCAB + 1])), Status::BadArgument);
    assert_eq!(status(c.decode_collect(s, &greedy(1))), Status::BadArgument, "nothing fed yet");
    assert_eq!(c.attach_session(s).unwrap().context_tokens, 0, "refused input left no trace");
    // More sessions than --max-sessions.
    let third = c.open_session(&OpenOptions::new(MODEL)).unwrap().session;
    assert_eq!(status(c.open_session(&OpenOptions::new(MODEL))), Status::LimitExceeded);
    c.close_session(third).unwrap();
    // Disconnect mid-generation: the decode stops, the session lives for its lease, then goes.
    let mut d = connect(srv.url(), Some("tok-alice"));
    let victim = d.open_session(&OpenOptions::new(MODEL)).unwrap().session;
    d.prefill(victim, Input::Ids(&prompt(6, 4))).unwrap();
    drop(d);
    let mut d2 = connect(srv.url(), Some("tok-alice"));
    let mut d3 = connect(srv.url(), Some("tok-alice"));
    let v = d2.open_session(&OpenOptions::new(MODEL));
    assert_eq!(status(v), Status::LimitExceeded, "the victim still counts within its lease");
    let info = d3.attach_session(victim).unwrap();
    drop(d3);
    assert!(info.context_tokens >= 4);
    // Start a decode and vanish without reading it.
    let mut d4 = connect(srv.url(), Some("tok-alice"));
    d4.attach_session(victim).unwrap();
    let req = djinn_proto::SessionDecodeReq {
        session: victim,
        feed: djinn_proto::DecodeFeed::None,
        max_new_tokens: 10_000,
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
        ignore_eos: true,
        logits: djinn_proto::LogitsWire::None,
        stop: vec![],
        breakpoints: vec![],
    };
    use djinn_proto::Meta;
    d4.submit(djinn_proto::Opcode::SessionDecode, &req.to_meta(), &[]).unwrap();
    drop(d4);
    // Probing with attach would renew the lease: probe the session count instead.
    let t0 = Instant::now();
    loop {
        match d2.open_session(&OpenOptions::new(MODEL)) {
            Ok(_) => break,
            Err(e) if e.status() == Some(Status::LimitExceeded) => {}
            Err(e) => panic!("{e}"),
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "the lease never ended");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(t0.elapsed() >= Duration::from_millis(500), "freed before its lease");
    assert_eq!(status(d2.attach_session(victim)), Status::UnknownSession);
    // Other sessions were unaffected by all of the above.
    let (ids, _, _) = c.decode_collect(good, &greedy(5)).unwrap();
    assert_eq!(ids, reference_greedy(&p, 5));
    let (code, body) = http_get(srv.metrics.as_deref().unwrap(), "/metrics");
    assert_eq!(code, 200);
    for m in
        ["djinn_sessions_open", "djinn_tokens_generated_total", "djinn_ttft_seconds_count", "djinn_step_bytes_count"]
    {
        assert!(metric(&body, m).is_some(), "{m} missing from /metrics");
    }
    assert!(metric(&body, "djinn_tokens_generated_total").unwrap() >= 5.0);
    // SIGTERM with sessions open drains and exits cleanly.
    assert!(srv.terminate().success());
}

fn memory_pressure(t: Transport) {
    const SESSIONS: u32 = 8;
    const NEW: u32 = 48;
    // llama-gqa: 2 layers × 2 KV heads × 16 dims × K,V × f32 = 512 B per token, 8 KiB per
    // 16-token block; a 56-token session takes 4 blocks: 64 KiB hold two sessions.
    let srv = model_server(
        t,
        MODEL,
        model_dir(),
        &[
            "--kv-capacity-mb",
            "0.0625",
            "--host-swap-mb",
            "1",
            "--max-sessions",
            "16",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let url = srv.url().to_owned();
    let threads: Vec<_> = (0..SESSIONS)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                let mut c = connect(&url, None);
                let s = c.open_session(&OpenOptions::new(MODEL)).unwrap().session;
                c.prefill(s, Input::Ids(&prompt(10 + i, 8))).unwrap();
                let (ids, _, sum) = c.decode_collect(s, &greedy(NEW)).unwrap();
                assert_eq!(sum.finish, FinishReason::Length);
                (i, ids)
            })
        })
        .collect();
    let results: Vec<(u32, Vec<u32>)> = threads.into_iter().map(|h| h.join().unwrap()).collect();
    for (i, ids) in results {
        assert_eq!(ids, reference_greedy(&prompt(10 + i, 8), NEW as usize), "session {i} under pressure");
    }
    let (_, body) = http_get(srv.metrics.as_deref().unwrap(), "/metrics");
    let peak = metric(&body, "djinn_kv_peak_used_bytes").expect("peak metric");
    let cap = metric(&body, "djinn_kv_capacity_bytes").expect("capacity metric");
    let swaps = metric(&body, "djinn_swap_out_total").expect("swap metric");
    assert!(peak <= cap && cap == 65536.0, "peak {peak} capacity {cap}");
    assert!(swaps > 0.0, "no swaps under pressure");
    // Sessions shared steps: one batched forward served more than one of them at a time.
    let steps = metric(&body, "djinn_engine_batch_sessions_count").unwrap();
    let seated = metric(&body, "djinn_engine_batch_sessions_sum").unwrap();
    assert!(seated > steps, "{seated} sessions over {steps} steps: never batched");
}

/// A request queued while the engine loop is parked is turned by its own connection thread
/// (`engine_inline_turns`, the default): lone generates, one token or several (the engine
/// thread takes over after the first step), and connections whose requests meet a running loop
/// get the engine's tokens exactly as with the engine thread alone
/// (`--engine-inline-turns=false`), which turns nothing inline.
fn lone_requests_turn_inline(t: Transport) {
    // One generate in a fresh session: its tokens.
    fn generate(c: &mut Client, p: &[u32], n: u32) -> Vec<u32> {
        let s = c.open_session(&OpenOptions::new(MODEL)).unwrap().session;
        let mut ids = Vec::new();
        c.generate(s, Feed::Ids(p), &greedy(n), |ev| {
            ids.push(ev.token);
            true
        })
        .unwrap();
        c.close_session(s).unwrap();
        ids
    }
    for inline in [true, false] {
        let flag = if inline { "true" } else { "false" };
        let srv = model_server(
            t,
            MODEL,
            model_dir(),
            &[&format!("--engine-inline-turns={flag}"), "--metrics-listen", "127.0.0.1:0"],
        );
        let mut c = connect(srv.url(), None);
        for (i, n) in [1u32, 1, 8, 1, 3].into_iter().enumerate() {
            // Past the workers' spin: the loop is parked when the request comes.
            std::thread::sleep(Duration::from_millis(5));
            let p = prompt(20 + i as u32, 5);
            assert_eq!(generate(&mut c, &p, n), reference_greedy(&p, n as usize), "inline {inline}, generate {i}");
        }
        let (_, body) = http_get(srv.metrics.as_deref().unwrap(), "/metrics");
        let turned = metric(&body, "djinn_engine_inline_turns_total").expect("djinn_engine_inline_turns_total");
        if inline {
            assert!(turned >= 5.0, "lone requests on a parked loop turn inline: {turned}");
        } else {
            assert_eq!(turned, 0.0, "--engine-inline-turns=false turns nothing inline");
        }
        // Four connections at once: inline turns, hand-overs and engine turns mixed.
        let workers: Vec<_> = (0..4u32)
            .map(|w| {
                let url = srv.url().to_owned();
                std::thread::spawn(move || {
                    let mut c = connect(&url, None);
                    for k in 0..4u32 {
                        let p = prompt(100 + 10 * w + k, 4 + k as usize);
                        assert_eq!(
                            generate(&mut c, &p, 1 + k),
                            reference_greedy(&p, 1 + k as usize),
                            "worker {w}, {k}"
                        );
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
    }
}

fn main() {
    run_trials(vec![
        ("lone_requests_turn_inline", None, lone_requests_turn_inline),
        ("decode_matches_engine", None, decode_matches_engine),
        ("streaming_cancel", None, streaming_cancel),
        ("multi_turn", None, multi_turn),
        ("generate_in_one_request", None, generate_in_one_request),
        ("attach_and_tenants", None, attach_and_tenants),
        ("faults", None, faults),
        ("memory_pressure", None, memory_pressure),
    ]);
}
