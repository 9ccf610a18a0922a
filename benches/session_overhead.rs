//! What serving a session remotely costs, beside in-process decoding of the same model measured
//! in the same run.
//!
//! Part 1 (always): `djinn_dataplane::overhead`, the same code as `djinn-dataplane bench
//! overhead` — fixed per-call overhead by payload size and per decode step, per transport (tcp,
//! shm; rdma when built with the feature and a device is present), on a generated tiny model so
//! compute does not hide the data plane. Targets (issue 12): <= 20 us per call on tcp loopback,
//! <= 5 us on shm.
//!
//! Part 2 (when `models/smollm2-135m-instruct` exists, else skipped with a message): SmolLM2 over
//! tcp vs in process, runs alternating: decode tokens/s ratio and time to first token for a
//! 16-token prompt (targets of issue 6: >= 0.97x tokens/s, TTFT within 1 ms).
//!
//! `cargo bench --bench session_overhead`; `DJINN_BENCH_QUICK=1` shortens every run.

#[path = "../src/cmd/tiny_model.rs"]
mod tiny_model;

use std::path::PathBuf;

use djinn_client::Client;
use djinn_dataplane::overhead::{self, in_process, median, remote, RunStats, Transport};

/// Paired calls per row of part 1.
const CALLS: usize = 200;
/// Runs of each side on SmolLM2 (its times swing more: the client, the server's connection thread
/// and its compute threads share two cores).
const SMOL_RUNS: usize = 15;
const SMOL_DIR: &str = "models/smollm2-135m-instruct";
/// Prompt length for SmolLM2's time to first token (the 16 tokens).
const SMOL_PROMPT_TOKENS: usize = 16;
/// The server's default `--max-step-tokens` (ServerConfig): the in-process engine gets the same
/// step bound, since it sizes per-step buffers and so the step's own cost.
const MAX_STEP_TOKENS: usize = 256;
const EXE: &str = env!("CARGO_BIN_EXE_djinn-dataplane");

fn quick() -> bool {
    std::env::var_os("DJINN_BENCH_QUICK").is_some_and(|v| v != "0")
}

/// CPU threads of both sides (`DJINN_BENCH_THREADS`; default: every core).
fn threads() -> usize {
    std::env::var("DJINN_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn part1() {
    let dir = std::env::temp_dir().join(format!("djinn-bench-tiny-{}", std::process::id()));
    tiny_model::write(&dir, 42).unwrap();
    let opts = overhead::Options {
        exe: PathBuf::from(EXE),
        model_dir: dir.clone(),
        transports: Transport::ALL.to_vec(),
        payload_tokens: vec![1, 16, 256],
        decode_tokens: 32,
        calls: if quick() { 20 } else { CALLS },
        block_calls: 16,
        threads: threads(),
        busy_poll: false,
    };
    println!(
        "part 1: fixed overhead per call and per decode step, generated tiny model, {} paired calls per row",
        opts.calls
    );
    let report = overhead::measure(&opts, |line| eprintln!("  .. {line}")).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    print!("{}", report.table());
}

fn smollm2() {
    let dir = PathBuf::from(SMOL_DIR);
    if !dir.join("config.json").is_file() {
        println!("\npart 2: SKIPPED: {SMOL_DIR} is absent (scripts/fetch_smollm2.sh makes it)");
        return;
    }
    let new_tokens = if quick() { 8 } else { 32 };
    println!("\npart 2: SmolLM2-135M-Instruct, {SMOL_PROMPT_TOKENS}-token prompt + {new_tokens} greedy tokens, median of {SMOL_RUNS} interleaved runs");
    let prompt: Vec<u32> = (0..SMOL_PROMPT_TOKENS as u32).map(|i| 1000 + 37 * i).collect();
    // In process and remote alternate run by run (the server idles, parked, during in-process
    // runs), so drift in the machine's load falls on both alike.
    let mut eng = overhead::load_engine(&dir, threads(), MAX_STEP_TOKENS, Some(1024)).unwrap();
    let srv =
        overhead::start_server(std::path::Path::new(EXE), Transport::Tcp, &dir, threads(), MAX_STEP_TOKENS, false)
            .unwrap();
    let mut client = Client::connect(srv.url()).unwrap();
    in_process(&mut eng, &prompt, 4, 1).unwrap(); // warm-up
    remote(&mut client, "bench", &prompt, 4, 1).unwrap();
    let (mut local, mut tcp) = (Vec::new(), Vec::new());
    for _ in 0..SMOL_RUNS {
        local.push(in_process(&mut eng, &prompt, new_tokens, 1).unwrap());
        tcp.push(remote(&mut client, "bench", &prompt, new_tokens, 1).unwrap());
    }
    let tps = |rs: &[RunStats]| median(rs.iter().map(|r| 1e6 / r.decode_us).collect());
    let ttft = |rs: &[RunStats]| median(rs.iter().map(|r| r.ttft_us / 1e3).collect());
    let (l_tps, r_tps) = (tps(&local), tps(&tcp));
    let (l_ttft, r_ttft) = (ttft(&local), ttft(&tcp));
    // The spread shows how much of a difference is the machine's noise.
    let spread = |rs: &[RunStats]| {
        let v: Vec<f64> = rs.iter().map(|r| r.ttft_us / 1e3).collect();
        (v.iter().copied().fold(f64::INFINITY, f64::min), v.iter().copied().fold(0.0, f64::max))
    };
    let ((l_lo, l_hi), (r_lo, r_hi)) = (spread(&local), spread(&tcp));
    println!("  in-process: {l_tps:>7.2} tokens/s, ttft {l_ttft:>8.2} ms (runs {l_lo:.2}..{l_hi:.2})");
    println!("  tcp:        {r_tps:>7.2} tokens/s, ttft {r_ttft:>8.2} ms (runs {r_lo:.2}..{r_hi:.2})");
    // Runs alternate, so run i of each side shares the machine's state: the median of the paired
    // differences is the least noisy estimate of what the data plane adds.
    let paired = median(local.iter().zip(&tcp).map(|(l, r)| (r.ttft_us - l.ttft_us) / 1e3).collect());
    println!(
        "  remote/in-process tokens/s {:.3}x (target >= 0.97x); ttft tcp - in-process: {:+.2} ms median of paired runs \
         ({:+.2} ms between medians, {:+.2} ms between best runs) (target within 1 ms)",
        r_tps / l_tps,
        paired,
        r_ttft - l_ttft,
        r_lo - l_lo
    );
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` runs this binary too: keep that quick.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if std::env::var("DJINN_TEST_GPUS").is_ok_and(|g| !g.is_empty() && g != "cpu") {
        println!("note: DJINN_TEST_GPUS is set; the servers use it while in-process runs stay on the CPU");
    }
    part1();
    smollm2();
}
