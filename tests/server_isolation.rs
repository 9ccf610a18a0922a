//! No client can hurt another, against real server processes over TCP and shared memory (one
//! body per transport): a client that stops reading pauses only its own sessions and is closed
//! after `--conn-stall-timeout-ms` with its sessions kept; SIGTERM ends within
//! `--drain-timeout-ms` plus 1 s whatever clients do, letting running generations finish first; a
//! session's lease follows every connection attached to it.
//!
//! A client "stops reading" here by asking for a 32 MiB tensor it never reads: its connection's
//! sending half blocks in that reply (the transport buffers are full), which is where a
//! non-reading client leaves any sender.

mod common;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{http_get, metric, run_trials, server, unique_name, Transport};
use djinn_backend::cpu::CpuBackend;
use djinn_backend::SampleParams;
use djinn_client::{Client, ClientOptions, DecodeOptions, FinishReason, Input, OpenOptions};
use djinn_model::{Engine, EngineOptions};
use djinn_proto::{DecodeFeed, LogitsWire, Meta, Opcode, SessionDecodeReq, TensorGetReq};

const MODEL: &str = "tiny";
const SRC_MODEL: &str = "tests/data/models/llama-gqa";
const VOCAB: u32 = 128;

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(SRC_MODEL)
}

fn model_flag() -> String {
    format!("{MODEL}={}", model_dir().display())
}

fn prompt(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| 8 + (seed * 31 + i * 7) % (VOCAB - 8)).collect()
}

/// Greedy tokens of a solo in-process run, driven as the server drives a session.
fn reference_greedy(prompt: &[u32], n: usize) -> Vec<u32> {
    let be = Arc::new(CpuBackend::with_threads(1).unwrap());
    let opts = EngineOptions { max_sessions: 2, max_step_tokens: 64, ..EngineOptions::default() };
    let mut eng = Engine::load_dir(be, &model_dir(), &opts).unwrap();
    let sid = eng.open_session().unwrap();
    let mut logits = Vec::new();
    if prompt.len() > 1 {
        eng.prefill(sid, &prompt[..prompt.len() - 1], false, &mut logits).unwrap();
    }
    let (mut next, mut out, mut ids) = (*prompt.last().unwrap(), Vec::new(), Vec::new());
    let greedy = SampleParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, step: 0 };
    for _ in 0..n {
        eng.step_sample(&[(sid, &[next])], &[greedy], &mut ids).unwrap();
        next = ids[0];
        out.push(next);
    }
    out
}

fn greedy(n: u32) -> DecodeOptions {
    DecodeOptions { max_new_tokens: n, ignore_eos: true, ..DecodeOptions::default() }
}

fn connect(url: &str, token: &str) -> Client {
    let opts = ClientOptions { token: Some(token.as_bytes().to_vec()), ..Default::default() };
    Client::connect_with(url, &opts).unwrap_or_else(|e| panic!("connect {url}: {e}"))
}

fn tenants_file() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique_name("tokens"));
    std::fs::write(&p, "alice tok-alice\nbob tok-bob\n").unwrap();
    p
}

fn decode_req(session: u64, n: u32, logits: LogitsWire) -> SessionDecodeReq {
    SessionDecodeReq {
        session,
        feed: DecodeFeed::None,
        max_new_tokens: n,
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
        ignore_eos: true,
        logits,
        stop: vec![],
    }
}

/// Sessions of the stalled client: their token frames alone (6 × 50) overflow a shm ring's 256
/// slots, whichever reply the connection's sender blocks in first.
const STALLED_SESSIONS: usize = 6;

/// A client that opens sessions, starts decodes with full logits and then a 32 MiB get, and
/// never reads a byte of the replies. Returns the client (kept open) and its sessions.
fn stalled_client(url: &str, token: &str) -> (Client, Vec<u64>) {
    let mut c = connect(url, token);
    let big = c.put_f32(&[8 << 20], &vec![1.0f32; 8 << 20]).unwrap();
    let mut sessions = Vec::new();
    for i in 0..STALLED_SESSIONS {
        let s = c.open_session(&OpenOptions::new(MODEL)).unwrap().session;
        c.prefill(s, Input::Ids(&prompt(9 + i as u32, 5))).unwrap();
        sessions.push(s);
    }
    for &s in &sessions {
        c.submit(Opcode::SessionDecode, &decode_req(s, 50, LogitsWire::Full).to_meta(), &[]).unwrap();
    }
    c.submit(Opcode::TensorGet, &TensorGetReq { handle: big }.to_meta(), &[]).unwrap();
    (c, sessions)
}

/// Runs `f` on a thread; panics naming `what` if it takes longer than `limit`.
fn within<T: Send + 'static>(limit: Duration, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).unwrap_or_else(|_| panic!("{what} did not finish within {limit:?}"))
}

fn metric_of(addr: &str, name: &str) -> f64 {
    metric(&http_get(addr, "/metrics").1, name).unwrap_or(0.0)
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- bodies ------------------------------------------------------------------------------------

/// A client that stops reading: its session pauses (counted), every other session runs at once
/// with the tokens of a solo run; after the stall timeout its connection is closed and its
/// session, kept for its lease, continues from a new connection.
fn stalled_reader_pauses_only_itself(t: Transport) {
    let tokens = tenants_file();
    let srv = server(
        t,
        &[
            "--model",
            &model_flag(),
            "--auth-token-file",
            tokens.to_str().unwrap(),
            "--conn-outbound-frames-max",
            "4",
            "--conn-stall-timeout-ms",
            "3000",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let metrics = srv.metrics.clone().unwrap();
    let (stalled, stalled_sessions) = stalled_client(srv.url(), "tok-alice");
    let stalled_session = stalled_sessions[0];
    wait_for("the stalled client's session pauses", Duration::from_secs(10), || {
        metric_of(&metrics, "djinn_sessions_paused_backpressure") >= 1.0
    });
    assert!(metric_of(&metrics, "djinn_conn_outbound_frames") >= 4.0, "the backlog is counted");
    // Victims of both tenants, beside it, get every token at once.
    for (i, tok) in ["tok-alice", "tok-bob"].into_iter().enumerate() {
        let url = srv.url().to_owned();
        let p = prompt(i as u32, 6);
        let want = reference_greedy(&p, 40);
        let got = within(Duration::from_secs(20), "a victim's decode beside a stalled client", move || {
            let mut v = connect(&url, tok);
            let s = v.open_session(&OpenOptions::new(MODEL)).unwrap().session;
            v.prefill(s, Input::Ids(&p)).unwrap();
            v.decode_collect(s, &greedy(40)).unwrap().0
        });
        assert_eq!(got, want, "victim {tok}");
    }
    // Past the stall timeout the stalled connection is closed; its session stays.
    wait_for("the stalled connection is closed", Duration::from_secs(15), || {
        metric_of(&metrics, "djinn_errors_total{kind=\"stalled\"") >= 1.0
            && metric_of(&metrics, "djinn_sessions_paused_backpressure") == 0.0
    });
    let mut again = connect(srv.url(), "tok-alice");
    let info = again.attach_session(stalled_session).unwrap();
    assert!(info.context_tokens >= 5, "the stalled session kept its tokens");
    let (ids, _, _) = again.decode_collect(stalled_session, &greedy(3)).unwrap();
    assert_eq!(ids.len(), 3);
    drop(stalled);
    let _ = std::fs::remove_file(tokens);
}

/// SIGTERM with a stalled client and a running generation: the generation finishes (within the
/// drain timeout), the stalled one ends, and the process exits within the deadline + 1 s.
fn sigterm_ends_within_the_drain_deadline(t: Transport) {
    let tokens = tenants_file();
    let drain_ms = 3000u64;
    let drain = drain_ms.to_string();
    let srv = server(
        t,
        &[
            "--model",
            &model_flag(),
            "--auth-token-file",
            tokens.to_str().unwrap(),
            "--drain-timeout-ms",
            &drain,
            "--conn-outbound-frames-max",
            "4",
            "--conn-stall-timeout-ms",
            "60000",
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    );
    let metrics = srv.metrics.clone().unwrap();
    let (_stalled, _) = stalled_client(srv.url(), "tok-alice");
    wait_for("the stalled client's session pauses", Duration::from_secs(10), || {
        metric_of(&metrics, "djinn_sessions_paused_backpressure") >= 1.0
    });
    // A slow but reading client: 40 tokens at 25 ms each, about 1 s, well within the deadline.
    let url = srv.url().to_owned();
    let (started_tx, started) = mpsc::channel();
    let slow = std::thread::spawn(move || {
        let mut v = connect(&url, "tok-bob");
        let s = v.open_session(&OpenOptions::new(MODEL)).unwrap().session;
        v.prefill(s, Input::Ids(&prompt(3, 4))).unwrap();
        let mut n = 0;
        let r = v.decode(s, &greedy(40), |_| {
            if n == 0 {
                let _ = started_tx.send(());
            }
            n += 1;
            std::thread::sleep(Duration::from_millis(25));
            true
        });
        (r.map(|sum| (sum.tokens, sum.finish)), n)
    });
    started.recv_timeout(Duration::from_secs(10)).expect("the slow client's first token");
    let t0 = Instant::now();
    let status = srv.terminate();
    let took = t0.elapsed();
    assert!(status.success(), "exit status {status:?}");
    assert!(took <= Duration::from_millis(drain_ms + 1000), "SIGTERM took {took:?}, deadline {drain_ms} ms + 1 s");
    let (r, n) = slow.join().unwrap();
    assert_eq!(r.unwrap(), (40, FinishReason::Length), "a running generation finishes within the drain");
    assert_eq!(n, 40);
    let _ = std::fs::remove_file(tokens);
}

/// Another connection of the same tenant uses the owner's session and leaves: the session lives
/// on past the lease that exit starts, because the owner is still attached.
fn lease_follows_every_attachment(t: Transport) {
    let tokens = tenants_file();
    let srv =
        server(t, &["--model", &model_flag(), "--auth-token-file", tokens.to_str().unwrap(), "--session-lease-s", "1"]);
    let mut owner = connect(srv.url(), "tok-alice");
    let s = owner.open_session(&OpenOptions::new(MODEL)).unwrap().session;
    let p = prompt(5, 4);
    owner.prefill(s, Input::Ids(&p)).unwrap();
    let want = reference_greedy(&p, 20);
    {
        let mut other = connect(srv.url(), "tok-alice");
        let (ids, _, _) = other.decode_collect(s, &greedy(5)).unwrap();
        assert_eq!(ids, want[..5]);
    }
    // Twice the lease after the other connection left.
    std::thread::sleep(Duration::from_millis(2500));
    let (ids, _, _) = owner.decode_collect(s, &greedy(15)).expect("the owner's session outlives the other's exit");
    assert_eq!(ids, want[5..]);
    let _ = std::fs::remove_file(tokens);
}

/// Temperature 1e-40 (its inverse overflows f32) decodes greedily, not a repeated last id.
fn tiny_temperature_is_greedy(t: Transport) {
    let srv = server(t, &["--model", &model_flag()]);
    let mut c = common::connect(srv.url());
    let s = c.open_session(&OpenOptions::new(MODEL)).unwrap().session;
    let p = prompt(7, 5);
    c.prefill(s, Input::Ids(&p)).unwrap();
    let opts = DecodeOptions { temperature: 1e-40, seed: 3, ..greedy(12) };
    let (ids, _, _) = c.decode_collect(s, &opts).unwrap();
    assert_eq!(ids, reference_greedy(&p, 12));
}

fn main() {
    run_trials(vec![
        ("stalled_reader_pauses_only_itself", None, stalled_reader_pauses_only_itself),
        ("sigterm_ends_within_the_drain_deadline", None, sigterm_ends_within_the_drain_deadline),
        ("lease_follows_every_attachment", None, lease_follows_every_attachment),
        ("tiny_temperature_is_greedy", None, tiny_temperature_is_greedy),
    ])
}
