//! The step scheduler against real server processes, over TCP and shared memory (one body per
//! transport): decode first (a short prompt's first token arrives while a long prompt is still
//! being fed, with the tokens of the in-process engine), QoS (a realtime stream is not starved by
//! a batch flood, and batch still progresses beside it), `Logits` as chunked work (streams go on
//! while a long prompt is scored, and the rows are the bits of one in-process prefill), and the
//! `fcfs` baseline still serving correct tokens.
//!
//! The model is a copy of the committed test model with a long context (4096 positions; its
//! weights do not depend on it), so prompts of thousands of tokens fit.

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::{connect, http_get, metric, model_with_context, run_trials_with, server, Transport};
use djinn_backend::cpu::CpuBackend;
use djinn_backend::SampleParams;
use djinn_client::{DecodeOptions, Feed, OpenOptions, Qos};
use djinn_model::{Engine, EngineOptions};

const MODEL: &str = "tiny";
const SRC_MODEL: &str = "tests/data/models/llama-gqa";
const VOCAB: u32 = 128;
const LONG: usize = 4000;
/// Tokens of the realtime stream in [`qos_realtime_over_batch`]: long enough (tens of ms) that
/// the client threads' scheduling on two cores (a client thread off its core for 3–4 ms gets its
/// frames in a burst after) cannot hide a batch session's tokens from the stream's window.
const RT_TOKENS: usize = 200;

fn model_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        model_with_context(&Path::new(env!("CARGO_MANIFEST_DIR")).join(SRC_MODEL), 4096, "scheduling-model")
    })
}

fn model_flag() -> String {
    format!("{MODEL}={}", model_dir().display())
}

fn prompt(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| 8 + (seed * 31 + i * 7) % (VOCAB - 8)).collect()
}

fn greedy(n: u32) -> DecodeOptions {
    DecodeOptions { max_new_tokens: n, ignore_eos: true, ..DecodeOptions::default() }
}

fn engine() -> Engine<CpuBackend> {
    let be = Arc::new(CpuBackend::new().unwrap());
    let opts = EngineOptions { max_sessions: 2, all_logits: true, max_step_tokens: 64, ..EngineOptions::default() };
    Engine::load_dir(be, model_dir(), &opts).unwrap()
}

/// Greedy tokens of the in-process engine: the prompt but its last token fed, then one decode
/// step per token (what the server does, bit for bit: the CPU GEMM is batch invariant).
fn reference_greedy(p: &[u32], n: usize) -> Vec<u32> {
    let mut eng = engine();
    let sid = eng.open_session().unwrap();
    let mut lg = Vec::new();
    if p.len() > 1 {
        eng.prefill(sid, &p[..p.len() - 1], false, &mut lg).unwrap();
    }
    let greedy = SampleParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, step: 0 };
    let (mut next, mut out, mut ids) = (*p.last().unwrap(), Vec::new(), Vec::new());
    for _ in 0..n {
        eng.step_sample(&[(sid, &[next])], &[greedy], &mut ids).unwrap();
        next = ids[0];
        out.push(next);
    }
    out
}

/// Runs `generate` of `p` on a new session of class `qos` on its own connection; returns the
/// tokens and the instant of each.
fn generate(url: &str, qos: Qos, p: &[u32], n: u32) -> (Vec<u32>, Vec<Instant>) {
    let mut c = connect(url);
    let s = c.open_session(&OpenOptions { qos, ..OpenOptions::new(MODEL) }).unwrap().session;
    let (mut ids, mut at) = (Vec::new(), Vec::new());
    c.generate(s, Feed::Ids(p), &greedy(n), |ev| {
        ids.push(ev.token);
        at.push(Instant::now());
        true
    })
    .unwrap();
    (ids, at)
}

// ---- bodies ------------------------------------------------------------------------------------

/// While a 4000-token prompt is fed (in chunks of `--prefill-chunk-tokens`), a 16-token prompt
/// sent after it starts gets its first token — and all its tokens — before the long prompt's
/// first token; both get the engine's tokens.
fn decode_first(t: Transport) {
    let srv = server(
        t,
        &[
            "--model",
            &model_flag(),
            "--dtype",
            "f32",
            "--max-step-tokens",
            "256",
            "--prefill-chunk-tokens",
            "8",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let url = srv.url().to_owned();
    let long = prompt(1, LONG);
    let short = prompt(2, 16);
    let l = {
        let (url, long) = (url.clone(), long.clone());
        std::thread::spawn(move || generate(&url, Qos::Interactive, &long, 4))
    };
    // Let the long prompt start feeding (it takes 500 steps of 8 tokens).
    wait_feeding(srv.metrics.as_deref().unwrap());
    let (short_ids, short_at) = generate(&url, Qos::Interactive, &short, 3);
    let (long_ids, long_at) = l.join().unwrap();
    assert!(
        short_at[0] < long_at[0],
        "the short prompt's first token came {:?} after the long prompt's",
        short_at[0] - long_at[0]
    );
    assert_eq!(short_ids, reference_greedy(&short, 3), "short prompt tokens");
    assert_eq!(long_ids, reference_greedy(&long, 4), "long prompt tokens");
}

/// Waits until the server has prompt tokens of some session queued (a long prompt being fed).
fn wait_feeding(metrics: &str) {
    let t0 = Instant::now();
    loop {
        let (_, body) = http_get(metrics, "/metrics");
        let queued =
            metric(&body, &format!("djinn_scheduler_queued_tokens{{class=\"interactive\",model=\"{MODEL}\"}}"));
        if queued.is_some_and(|q| q > 100.0) {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "the long prompt never started feeding");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Six batch sessions generate long runs; a realtime session started among them finishes its
/// [`RT_TOKENS`] tokens while every batch session still has tokens to go, and every batch session
/// made progress meanwhile (no class starves). Tokens equal the engine's.
fn qos_realtime_over_batch(t: Transport) {
    let srv = server(t, &["--model", &model_flag(), "--dtype", "f32", "--qos-realtime-step-tokens", "4"]);
    let url = srv.url().to_owned();
    let batch_counts: Arc<Mutex<Vec<Vec<Instant>>>> = Arc::new(Mutex::new(vec![Vec::new(); 6]));
    let mut hs = Vec::new();
    for i in 0..6 {
        let (url, counts) = (url.clone(), batch_counts.clone());
        hs.push(std::thread::spawn(move || {
            let p = prompt(10 + i as u32, 8);
            let mut c = connect(&url);
            let s = c.open_session(&OpenOptions { qos: Qos::Batch, ..OpenOptions::new(MODEL) }).unwrap().session;
            // Ends with an error when the server goes away at the end of the test.
            let _ = c.generate(s, Feed::Ids(&p), &greedy(2000), |_| {
                counts.lock().unwrap()[i].push(Instant::now());
                true
            });
        }));
    }
    // The flood is running when every batch session has tokens.
    let t0 = Instant::now();
    while batch_counts.lock().unwrap().iter().any(|c| c.len() < 5) {
        assert!(t0.elapsed() < Duration::from_secs(60), "the batch flood never started");
        std::thread::sleep(Duration::from_millis(2));
    }
    let p = prompt(3, 8);
    let (ids, at) = generate(&url, Qos::Realtime, &p, RT_TOKENS as u32);
    // From the realtime stream's first token to its last (connecting and opening are not its
    // steps).
    let (start, end) = (at[0], *at.last().unwrap());
    let want = reference_greedy(&p, RT_TOKENS);
    if common::test_backend_kind() == "cpu" {
        assert_eq!(ids, want, "realtime tokens");
    } else {
        // CUDA's kernels are not batch invariant: the stream's logits move by rounding with
        // the batch it shares steps with, and a long greedy run may part from the CPU's where
        // two logits nearly tie. The start must agree.
        assert_eq!((ids.len(), &ids[..32]), (want.len(), &want[..32]), "realtime tokens");
    }
    let counts = batch_counts.lock().unwrap().clone();
    for (i, c) in counts.iter().enumerate() {
        let during = c.iter().filter(|&&x| x >= start && x <= end).count();
        assert!(during > 0, "batch session {i} starved while realtime ran");
        assert!(c.len() < 2000, "batch session {i} finished before the realtime stream did");
    }
    // With 4 tokens per realtime step (one realtime, three batch), realtime gets every step:
    // batch sessions together make 3 tokens per realtime token, where seating everyone would
    // make 6. The clock is the client's, and frames arrive in bursts over tcp (a CI run counted
    // 5.4 per realtime token), so only "no more than seating everyone" is asserted here; the
    // ratio itself is measured by `bench load` and the scheduling example.
    let batch_during: usize = counts.iter().map(|c| c.iter().filter(|&&x| x > start && x < end).count()).sum();
    let rt_more = RT_TOKENS - 1;
    assert!(batch_during <= 6 * rt_more, "{batch_during} batch tokens while realtime made {rt_more} more");
    drop(counts);
    drop(srv);
    for h in hs {
        h.join().unwrap();
    }
}

/// A stream keeps producing tokens while a 2000-token Logits request is scored (in chunks
/// between its steps), and the logits are the bits of one in-process prefill of every position.
fn logits_batched_with_streams(t: Transport) {
    let srv = server(t, &["--model", &model_flag(), "--dtype", "f32", "--prefill-chunk-tokens", "8"]);
    let url = srv.url().to_owned();
    let times = Arc::new(Mutex::new(Vec::new()));
    let stream = {
        let (url, times) = (url.clone(), times.clone());
        std::thread::spawn(move || {
            let p = prompt(4, 4);
            let mut c = connect(&url);
            let s = c.open_session(&OpenOptions::new(MODEL)).unwrap().session;
            c.generate(s, Feed::Ids(&p), &greedy(3000), |_| {
                times.lock().unwrap().push(Instant::now());
                true
            })
            .unwrap()
        })
    };
    while times.lock().unwrap().len() < 5 {
        std::thread::sleep(Duration::from_millis(2));
    }
    let ids = prompt(5, 2000);
    let mut c = connect(&url);
    let t0 = Instant::now();
    let (rows, vocab, got) = c.logits(MODEL, &ids).unwrap();
    let t1 = Instant::now();
    let during = times.lock().unwrap().iter().filter(|&&x| x > t0 && x < t1).count();
    assert!(during >= 10, "only {during} stream tokens while the Logits request ran ({:?})", t1 - t0);
    assert_eq!((rows as usize, vocab), (ids.len(), VOCAB));
    let mut eng = engine();
    let sid = eng.open_session().unwrap();
    let mut want = Vec::new();
    eng.prefill(sid, &ids, true, &mut want).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    if common::test_backend_kind() == "cpu" {
        assert!(bits(&got) == bits(&want), "server logits differ from one in-process prefill");
    } else {
        // Another backend than the in-process CPU engine: equal to rounding.
        let scale = want.iter().fold(1.0f32, |m, x| m.max(x.abs()));
        let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
        assert!(worst <= 1e-4 * scale, "server logits {worst} from one in-process prefill (scale {scale})");
    }
    stream.join().unwrap();
}

/// `--scheduler fcfs` still serves: the long and short prompts of `decode_first` get the
/// engine's tokens (the short one after the long one is fed: FCFS).
fn fcfs_still_works(t: Transport) {
    let srv = server(
        t,
        &[
            "--model",
            &model_flag(),
            "--dtype",
            "f32",
            "--scheduler",
            "fcfs",
            "--max-step-tokens",
            "64",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let url = srv.url().to_owned();
    let long = prompt(1, 1000);
    let short = prompt(2, 16);
    let l = {
        let (url, long) = (url.clone(), long.clone());
        std::thread::spawn(move || generate(&url, Qos::Batch, &long, 4))
    };
    let (short_ids, _) = generate(&url, Qos::Realtime, &short, 3);
    let (long_ids, _) = l.join().unwrap();
    assert_eq!(short_ids, reference_greedy(&short, 3));
    assert_eq!(long_ids, reference_greedy(&long, 4));
    let (_, body) = http_get(srv.metrics.as_deref().unwrap(), "/metrics");
    assert!(body.contains("djinn_scheduler_ttft_seconds"), "per-class TTFT histogram exported");
}

fn main() {
    // Token counts within a realtime stream's span depend on no other trial taking the cores.
    run_trials_with(
        vec![
            ("decode_first", None, decode_first),
            ("qos_realtime_over_batch", None, qos_realtime_over_batch),
            ("logits_batched_with_streams", None, logits_batched_with_streams),
            ("fcfs_still_works", None, fcfs_still_works),
        ],
        &["qos_realtime_over_batch"],
        Vec::new(),
    );
}
