//! Sessions are never lost to KV memory pressure (issue 11, defect 2), against real server
//! processes over TCP and shared memory (one body per transport):
//! - with device KV and the host swap pool both full, the least recently used idle session is
//!   preempted by recomputation and continues with exactly the tokens and the logits (bit for
//!   bit) of a server that never ran short;
//! - sessions decoding at once, needing three times the KV there is with a one-block host pool,
//!   all finish with the tokens of a solo run (preempting sessions that have work);
//! - a one-shot `Logits` request goes through the same admission and preemption, and is refused
//!   only when it cannot fit in the whole capacity;
//! - the default host swap pool is sized from host memory, and a server under a low
//!   `RLIMIT_MEMLOCK` (no `CAP_IPC_LOCK`) starts anyway, locking what the limit allows.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;

use common::{http_get, metric, run_trials, server, test_gpus, ServerProc, Transport};
use djinn_client::{Client, ClientOptions, DecodeOptions, FinishReason, Input, LogitsRequest, OpenOptions};

const MODEL: &str = "tiny";
const SRC_MODEL: &str = "tests/data/models/llama-gqa";
const VOCAB: u32 = 128;
/// llama-gqa: 16-token blocks ([`common::tiny_kv_block_bytes`]); sessions hold at most 64 tokens
/// (4 blocks).
fn block_bytes() -> f64 {
    common::tiny_kv_block_bytes() as f64
}
/// linux/capability.h (the libc crate does not name capabilities).
const CAP_IPC_LOCK: libc::c_ulong = 14;

fn model_flag() -> String {
    format!("{MODEL}={}", Path::new(env!("CARGO_MANIFEST_DIR")).join(SRC_MODEL).display())
}

fn prompt(seed: u32, n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| 8 + (seed * 31 + i * 7) % (VOCAB - 8)).collect()
}

/// A server whose KV holds `blocks` blocks and whose host swap pool holds one.
fn tight_server(t: Transport, blocks: usize) -> ServerProc {
    let block_mib = block_bytes() / 1048576.0;
    let kv = format!("{}", blocks as f64 * block_mib);
    let host = format!("{block_mib}");
    let args =
        ["--model", &model_flag(), "--kv-capacity-mb", &kv, "--host-swap-mb", &host, "--metrics-listen", "127.0.0.1:0"];
    server(t, &args)
}

fn connect(url: &str) -> Client {
    Client::connect_with(url, &ClientOptions::default()).unwrap()
}

/// One decode's tokens and the bits of each token's logits.
type Decoded = (Vec<u32>, Vec<Vec<u32>>);

fn decode_full(c: &mut Client, s: djinn_client::SessionId, n: u32) -> Decoded {
    let opts = DecodeOptions { max_new_tokens: n, ignore_eos: true, logits: LogitsRequest::Full, ..Default::default() };
    let (mut ids, mut bits) = (Vec::new(), Vec::new());
    let sum = c
        .decode(s, &opts, |ev| {
            ids.push(ev.token);
            bits.push(ev.logits.expect("full logits").iter().map(|f| f.to_bits()).collect());
            true
        })
        .unwrap();
    assert_eq!((sum.finish, sum.tokens), (FinishReason::Length, n));
    (ids, bits)
}

/// Two sessions taking turns so that each turn needs the other's blocks: with six blocks and a
/// one-block host pool every turn after the first preempts the other (idle) session.
fn turns(url: &str) -> Vec<Decoded> {
    let mut c = connect(url);
    let a = c.open_session(&OpenOptions::new(MODEL)).unwrap().session;
    let b = c.open_session(&OpenOptions::new(MODEL)).unwrap().session;
    let mut out = Vec::new();
    c.prefill(a, Input::Ids(&prompt(1, 20))).unwrap();
    out.push(decode_full(&mut c, a, 20)); // a: 40 tokens, 3 blocks
    c.prefill(b, Input::Ids(&prompt(2, 20))).unwrap();
    out.push(decode_full(&mut c, b, 30)); // b: 50 tokens, 4 blocks: a goes
    out.push(decode_full(&mut c, a, 20)); // a rebuilt, 60 tokens: b goes
    out.push(decode_full(&mut c, b, 10)); // b rebuilt, 60 tokens: a goes
    out
}

fn preempted_session_continues_exactly(t: Transport) {
    let reference = server(t, &["--model", &model_flag()]);
    let want = turns(reference.url());
    let tight = tight_server(t, 6);
    let got = turns(tight.url());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.0, w.0, "decode {i}: tokens differ from an unpreempted run");
        assert!(g.1 == w.1, "decode {i}: logits differ in their bits from an unpreempted run");
    }
    let (_, body) = http_get(tight.metrics.as_deref().unwrap(), "/metrics");
    let preempted = metric(&body, "djinn_sessions_preempted_total").unwrap();
    assert!(preempted >= 3.0, "{preempted} preemptions; expected one per turn after the first");
    assert!(metric(&body, "djinn_preempted_tokens_total").unwrap() >= 3.0 * 39.0);
    let peak = metric(&body, "djinn_kv_peak_used_bytes").unwrap();
    assert!(peak <= 6.0 * block_bytes(), "peak {peak} past the capacity");
}

/// Six sessions decoding at once need 18 blocks of 6, and the host pool holds one: sessions with
/// work are preempted (the latest arrival first), and every one finishes with its solo tokens.
fn concurrent_decodes_all_finish_exactly(t: Transport) {
    const SESSIONS: u32 = 6;
    const NEW: u32 = 40;
    let run = |url: &str, together: bool| -> Vec<Vec<u32>> {
        // Together, every session holds its prompt's KV before any decodes, so the memory is
        // short whatever the threads' timing (the tiny model decodes in microseconds).
        let ready = std::sync::Arc::new(std::sync::Barrier::new(SESSIONS as usize));
        let one = move |url: String, i: u32, ready: Option<std::sync::Arc<std::sync::Barrier>>| {
            let mut c = connect(&url);
            let s = c.open_session(&OpenOptions::new(MODEL)).unwrap().session;
            c.prefill(s, Input::Ids(&prompt(10 + i, 8))).unwrap();
            if let Some(b) = ready {
                b.wait();
            }
            let opts = DecodeOptions { max_new_tokens: NEW, ignore_eos: true, ..Default::default() };
            let (ids, _, sum) = c.decode_collect(s, &opts).unwrap();
            assert_eq!(sum.finish, FinishReason::Length, "session {i}");
            ids
        };
        if !together {
            return (0..SESSIONS).map(|i| one(url.to_owned(), i, None)).collect();
        }
        let hs: Vec<_> = (0..SESSIONS)
            .map(|i| {
                let url = url.to_owned();
                let ready = Some(ready.clone());
                std::thread::spawn(move || one(url, i, ready))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    };
    let reference = server(t, &["--model", &model_flag()]);
    let want = run(reference.url(), false);
    let tight = tight_server(t, 6);
    let got = run(tight.url(), true);
    assert_eq!(got, want, "tokens under preemption");
    let (_, body) = http_get(tight.metrics.as_deref().unwrap(), "/metrics");
    assert!(metric(&body, "djinn_sessions_preempted_total").unwrap() >= 1.0, "no preemption");
}

/// A one-shot `Logits` request when every block is held by an idle session the one-block host
/// pool cannot take: it preempts that session (as a session's step would) instead of failing,
/// with the logits of a server that never ran short; the preempted session continues exactly. A
/// request larger than the whole capacity is refused `OutOfMemory`, naming both numbers.
fn logits_request_preempts_instead_of_failing(t: Transport) {
    let run = |url: &str| -> (Vec<u32>, Decoded, Decoded) {
        let mut c = connect(url);
        let a = c.open_session(&OpenOptions::new(MODEL)).unwrap().session;
        c.prefill(a, Input::Ids(&prompt(1, 20))).unwrap();
        let first = decode_full(&mut c, a, 20); // a: 40 tokens, 3 blocks: all of the KV
        let (rows, vocab, logits) = c.logits(MODEL, &prompt(5, 30)).expect("a Logits request that fits the capacity");
        assert_eq!((rows, vocab), (30, VOCAB));
        let after = decode_full(&mut c, a, 8); // a rebuilt from its tokens
        (logits.iter().map(|f| f.to_bits()).collect(), first, after)
    };
    let reference = server(t, &["--model", &model_flag()]);
    let want = run(reference.url());
    let tight = tight_server(t, 3);
    let got = run(tight.url());
    assert!(got.0 == want.0, "Logits bits differ from a server that never ran short");
    assert_eq!((got.1 .0, got.2 .0), (want.1 .0, want.2 .0), "the preempted session's tokens");
    assert!(got.2 .1 == want.2 .1, "the preempted session's logits bits");
    let (_, body) = http_get(tight.metrics.as_deref().unwrap(), "/metrics");
    assert!(metric(&body, "djinn_sessions_preempted_total").unwrap() >= 1.0, "no preemption");
    // 50 ids fit the model's 64 positions but not the 48 tokens of KV there are.
    let mut c = connect(tight.url());
    let e = c.logits(MODEL, &prompt(6, 50)).expect_err("50 tokens cannot fit in 48 tokens of KV");
    assert_eq!(e.status(), Some(djinn_proto::Status::OutOfMemory), "{e}");
    assert!(e.to_string().contains("50") && e.to_string().contains("48"), "{e}");
}

/// Without `--host-swap-mb` the pool is a share of the host's memory (not of the KV capacity),
/// and a low `RLIMIT_MEMLOCK` without `CAP_IPC_LOCK` neither stops the server nor fails it later:
/// it locks what the limit allows, says so, and serves.
fn host_swap_default_under_a_low_memlock_limit(t: Transport) {
    const LIMIT: u64 = 64 << 10;
    let url = t.listen_url();
    let gpus = test_gpus();
    let args = ["--listen", url.as_str(), "--gpus", gpus.as_str(), "--model", &model_flag()];
    let srv = ServerProc::try_start_with(&args, |cmd| {
        // SAFETY: the closure runs in the child between fork and exec and only makes two
        // async-signal-safe system calls on values it owns.
        unsafe {
            cmd.pre_exec(|| {
                // Root keeps mlock past the limit through CAP_IPC_LOCK: drop it from the
                // bounding set so the exec'd server has it not (fails harmlessly when not root).
                libc::prctl(libc::PR_CAPBSET_DROP, CAP_IPC_LOCK, 0, 0, 0);
                let r = libc::rlimit { rlim_cur: LIMIT, rlim_max: LIMIT };
                if libc::setrlimit(libc::RLIMIT_MEMLOCK, &r) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
    })
    .unwrap_or_else(|e| panic!("the server did not start under a {LIMIT}-byte memlock limit: {e}"));
    let log = srv.stderr();
    let host_bytes = log
        .lines()
        .find(|l| l.contains("model loaded"))
        .and_then(|l| l.split("host_bytes=").nth(1))
        .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no host_bytes in the model's load line:\n{log}"));
    let kv_bytes = log
        .lines()
        .find(|l| l.contains("model loaded"))
        .and_then(|l| l.split(" kv_bytes=").nth(1))
        .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap();
    // MemAvailable moves between the server's start and this line: within a factor of two.
    let want = djinn_model::host_swap_default_bytes() as u64;
    assert!(host_bytes >= want / 2 && host_bytes <= want * 2, "host pool {host_bytes}, expected about {want}");
    assert!(host_bytes > kv_bytes, "host pool {host_bytes} not above the KV capacity {kv_bytes}");
    if test_gpus() == "cpu" {
        assert!(log.contains("refused by RLIMIT_MEMLOCK"), "no line about the memlock limit:\n{log}");
    }
    // It serves.
    let mut c = connect(srv.url());
    let s = c.open_session(&OpenOptions::new(MODEL)).unwrap().session;
    c.prefill(s, Input::Ids(&prompt(3, 8))).unwrap();
    let opts = DecodeOptions { max_new_tokens: 4, ignore_eos: true, ..Default::default() };
    assert_eq!(c.decode_collect(s, &opts).unwrap().0.len(), 4);
    assert!(srv.terminate().success());
}

fn main() {
    run_trials(vec![
        ("preempted_session_continues_exactly", None, preempted_session_continues_exactly),
        ("concurrent_decodes_all_finish_exactly", None, concurrent_decodes_all_finish_exactly),
        ("host_swap_default_under_a_low_memlock_limit", None, host_swap_default_under_a_low_memlock_limit),
        ("logits_request_preempts_instead_of_failing", None, logits_request_preempts_instead_of_failing),
    ]);
}
