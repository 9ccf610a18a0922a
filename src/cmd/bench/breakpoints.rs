//! `bench breakpoints`: the predecessor's white-box debugging experiment at this machine's scale.
//! Every session runs a random prompt (fixed seed) twice: uninterrupted (the baseline, which also
//! times one decode step), then as a decode paused at each `--break-at` layer, where the client
//! reads the hidden state, holds the pause `--hold-ms`, and resumes. All sessions run at once, one
//! connection each, so paused sessions pile up and — with the server's `--kv-capacity-mb` sized
//! for a fraction of them — are swapped out and back. Writes `DIR/results.json` and prints the
//! verdict: pass when every session finished with the baseline's tokens and KV never exceeded
//! its capacity.
//!
//! Per session, `results.json` lists its pauses, `swaps` (pauses during which its KV was swapped
//! out, from the server's resume replies) and its finish time.
//!
//! Timings on this host: `pause_ms` from the request (or resume) to the pause notice;
//! `resume_ms` from sending Resume to the next pause notice or the first token (the compute of
//! the layers in between included), beside one decode step and the whole input pass run
//! uninterrupted (`input_pass_ms`, the baseline's time to first token). Swap latencies and memory come from the server's
//! `/metrics` (`--metrics HOST:PORT`): swap p50/p99 are the upper bounds of the histogram's
//! buckets holding those quantiles; `paused_bytes_peak` is the largest
//! `djinn_breakpoint_held_bytes` sampled every 20 ms. Paused states are charged to the VMU in
//! whole KV blocks (else in the host swap pool): `kv_used_bytes_peak` includes the blocks they
//! were charged, so `kv_used_bytes_peak <= kv_capacity_bytes` is KV and paused state together
//! within capacity; `paused_kv_charged_bytes_peak` / `paused_host_charged_bytes_peak` are the
//! peaks of that charge (`djinn_vmu_region_used_bytes{region="paused"|"paused_host"}`);
//! `breakpoint_parts` / `breakpoint_part_passes`
//! count the batched parts the server ran and the passes they carried (their ratio,
//! `mean_part_passes`, is how many sessions resumed together shared a part).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use djinn_client::{Client, DecodeOptions, Feed, OpenOptions};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// tcp://HOST:PORT or shm://NAME.
    #[arg(long)]
    pub server: String,
    #[arg(long)]
    pub model: String,
    /// The server's metrics endpoint (`serve --metrics-listen`): memory and swap figures.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics: String,
    #[arg(long, default_value_t = 50)]
    pub sessions: usize,
    #[arg(long, value_delimiter = ',', default_value = "10,20,30")]
    pub break_at: Vec<u32>,
    #[arg(long, default_value_t = 16)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 8)]
    pub max_new_tokens: u32,
    /// How long each pause is held before resuming (lets pauses pile up).
    #[arg(long, default_value_t = 50)]
    pub hold_ms: u64,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    #[arg(long)]
    pub out: PathBuf,
}

/// (layer, pause_ms, resume_ms) of one pause.
type PauseTimes = (u32, f64, f64);

/// One session of the breakpoint run.
#[derive(Default, Clone)]
struct SessionResult {
    pauses: Vec<PauseTimes>,
    /// Pauses during which the session's KV was swapped out (the server's resume replies).
    swaps: u32,
    tokens: Vec<u32>,
    finish_ms: f64,
    error: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.sessions == 0 || args.break_at.is_empty() {
        bail!("--sessions and --break-at must not be empty");
    }
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let mut probe = Client::connect(&args.server)?;
    let info = probe.open_session(&OpenOptions::new(args.model.clone()))?;
    probe.close_session(info.session)?;
    let prompts: Vec<Vec<u32>> = (0..args.sessions)
        .map(|i| {
            let mut x = args.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(i as u64 + 1);
            (0..args.prompt_tokens)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % u64::from(info.vocab)) as u32
                })
                .collect()
        })
        .collect();
    let opts = DecodeOptions { max_new_tokens: args.max_new_tokens, ignore_eos: true, ..DecodeOptions::default() };

    // Baseline: uninterrupted, one session at a time (its decode step time is the yardstick).
    eprintln!("baseline: {} uninterrupted runs", args.sessions);
    let mut baseline = Vec::with_capacity(args.sessions);
    let (mut step_ms, mut first_ms) = (Vec::new(), Vec::new());
    for p in &prompts {
        let s = probe.open_session(&OpenOptions::new(args.model.clone()))?.session;
        let (mut toks, mut last) = (Vec::new(), None::<Instant>);
        let start = Instant::now();
        probe.generate(s, Feed::Ids(p), &opts, |ev| {
            let now = Instant::now();
            match last {
                Some(t) => step_ms.push(now.duration_since(t).as_secs_f64() * 1e3),
                None => first_ms.push(now.duration_since(start).as_secs_f64() * 1e3),
            }
            last = Some(now);
            toks.push(ev.token);
            true
        })?;
        probe.close_session(s)?;
        baseline.push(toks);
    }

    let before = scrape(&args.metrics)?;
    let stop = Arc::new(AtomicBool::new(false));
    let held_peak = Arc::new(AtomicU64::new(0));
    // Peaks of the paused states' VMU charge: in KV blocks (inside kv_used) and in the host pool.
    let charged_peak = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let sampler = {
        let (stop, peak, addr) = (stop.clone(), held_peak.clone(), args.metrics.clone());
        let charged = charged_peak.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Ok(m) = scrape(&addr) {
                    let v = sample(&m, "djinn_breakpoint_held_bytes").unwrap_or(0.0) as u64;
                    peak.fetch_max(v, Ordering::Relaxed);
                    charged.0.fetch_max(region_used(&m, "paused") as u64, Ordering::Relaxed);
                    charged.1.fetch_max(region_used(&m, "paused_host") as u64, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    eprintln!("breakpoint run: {} sessions at once, pausing at {:?}", args.sessions, args.break_at);
    let results = Arc::new(Mutex::new(vec![SessionResult::default(); args.sessions]));
    let t0 = Instant::now();
    let workers: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (p, results, opts) = (p.clone(), results.clone(), opts.clone());
            let (url, model, layers, hold) =
                (args.server.clone(), args.model.clone(), args.break_at.clone(), args.hold_ms);
            std::thread::spawn(move || {
                let r = one_session(&url, &model, &p, &layers, &opts, hold, t0);
                results.lock().unwrap_or_else(|e| e.into_inner())[i] = r;
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.join();
    let after = scrape(&args.metrics)?;
    let results = std::mem::take(&mut *results.lock().unwrap_or_else(|e| e.into_inner()));

    let completed = results.iter().filter(|r| r.error.is_none()).count();
    let tokens_match = results.iter().zip(&baseline).all(|(r, b)| r.error.is_none() && &r.tokens == b);
    let kv_capacity = sample(&after, "djinn_kv_capacity_bytes").unwrap_or(0.0);
    let kv_peak = sample(&after, "djinn_kv_used_bytes_peak").unwrap_or(0.0);
    let swaps_out =
        sample(&after, "djinn_swap_out_total").unwrap_or(0.0) - sample(&before, "djinn_swap_out_total").unwrap_or(0.0);
    let delta = |name: &str| sample(&after, name).unwrap_or(0.0) - sample(&before, name).unwrap_or(0.0);
    let (parts, part_passes) = (delta("djinn_breakpoint_parts_total"), delta("djinn_breakpoint_part_passes_total"));
    let resume: Vec<f64> = results.iter().flat_map(|r| r.pauses.iter().map(|p| p.2)).collect();
    let pause: Vec<f64> = results.iter().flat_map(|r| r.pauses.iter().map(|p| p.1)).collect();
    let decode_step_ms = percentile(&step_ms, 0.5);
    // The whole input pass uninterrupted (the request to its first token): what the parts of a
    // paused pass add up to, plus the pauses' own cost.
    let input_pass_ms = percentile(&first_ms, 0.5);
    let capacity_ok = kv_capacity > 0.0 && kv_peak <= kv_capacity;
    let pass = completed == args.sessions && tokens_match && capacity_ok;
    let verdict = format!(
        "{}: {completed}/{} sessions completed, tokens {}, KV peak {:.1} of {:.1} MiB, {} swap-outs; resume p50 {:.1} ms \
         (p99 {:.1}) vs one decode step {:.1} ms and the uninterrupted input pass {:.1} ms; {} passes in {} batched \
         parts",
        if pass { "PASS" } else { "FAIL" },
        args.sessions,
        if tokens_match { "match the uninterrupted runs" } else { "DIFFER from the uninterrupted runs" },
        kv_peak / 1048576.0,
        kv_capacity / 1048576.0,
        swaps_out,
        percentile(&resume, 0.5),
        percentile(&resume, 0.99),
        decode_step_ms,
        input_pass_ms,
        part_passes,
        parts
    );
    let q = |xs: &[f64]| serde_json::json!({"p50": percentile(xs, 0.5), "p99": percentile(xs, 0.99)});
    let json = serde_json::json!({
        "server": args.server,
        "model": args.model,
        "break_at": args.break_at,
        "prompt_tokens": args.prompt_tokens,
        "max_new_tokens": args.max_new_tokens,
        "hold_ms": args.hold_ms,
        "sessions_requested": args.sessions,
        "sessions_completed": completed,
        "tokens_match": tokens_match,
        "kv_capacity_bytes": kv_capacity,
        "kv_used_bytes_peak": kv_peak,
        "paused_bytes_peak": held_peak.load(Ordering::Relaxed),
        "paused_kv_charged_bytes_peak": charged_peak.0.load(Ordering::Relaxed),
        "paused_host_charged_bytes_peak": charged_peak.1.load(Ordering::Relaxed),
        "swap_out_total": swaps_out,
        "paused_swaps_total": results.iter().map(|r| r.swaps).sum::<u32>(),
        "swap_out_ms": hist_quantiles(&before, &after, "out"),
        "swap_in_ms": hist_quantiles(&before, &after, "in"),
        "pause_ms": q(&pause),
        "resume_ms": q(&resume),
        "decode_step_ms": decode_step_ms,
        "input_pass_ms": input_pass_ms,
        "resume_p50_over_decode_step": percentile(&resume, 0.5) / decode_step_ms.max(f64::MIN_POSITIVE),
        "breakpoint_parts": parts,
        "breakpoint_part_passes": part_passes,
        "mean_part_passes": if parts > 0.0 { part_passes / parts } else { 0.0 },
        "sessions": results.iter().map(|r| serde_json::json!({
            "pauses": r.pauses.iter().map(|p| serde_json::json!({"layer": p.0, "pause_ms": p.1, "resume_ms": p.2})).collect::<Vec<_>>(),
            "swaps": r.swaps,
            "finish_ms": r.finish_ms,
            "error": r.error,
        })).collect::<Vec<_>>(),
        "verdict": verdict,
    });
    let path = args.out.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("{verdict}");
    if !pass {
        bail!("bench breakpoints failed (details in {})", path.display());
    }
    Ok(())
}

fn one_session(
    url: &str,
    model: &str,
    prompt: &[u32],
    layers: &[u32],
    opts: &DecodeOptions,
    hold_ms: u64,
    t0: Instant,
) -> SessionResult {
    let mut r = SessionResult::default();
    let swaps = std::cell::Cell::new(0u32);
    let run = || -> anyhow::Result<(Vec<PauseTimes>, Vec<u32>)> {
        let mut c = Client::connect(url)?;
        let s = c.open_session(&OpenOptions::new(model.to_owned()))?.session;
        let pauses = std::cell::RefCell::new(Vec::new());
        let t = std::cell::Cell::new(Instant::now());
        let mut toks = Vec::new();
        c.generate_with_breakpoints(
            s,
            Feed::Ids(prompt),
            opts,
            layers,
            |ev| {
                if toks.is_empty() {
                    if let Some(p) = pauses.borrow_mut().last_mut() {
                        let p: &mut PauseTimes = p;
                        p.2 = t.get().elapsed().as_secs_f64() * 1e3;
                    }
                }
                toks.push(ev.token);
                true
            },
            |c, note| {
                let ms = t.get().elapsed().as_secs_f64() * 1e3;
                let mut ps = pauses.borrow_mut();
                if let Some(p) = ps.last_mut() {
                    p.2 = ms;
                }
                ps.push((note.layer, ms, 0.0));
                c.read_hidden_f32(s)?;
                std::thread::sleep(Duration::from_millis(hold_ms));
                t.set(Instant::now());
                swaps.set(c.resume_reply(s)?.swaps);
                Ok(())
            },
        )?;
        c.close_session(s)?;
        Ok((pauses.into_inner(), toks))
    };
    match run() {
        Ok((p, toks)) => (r.pauses, r.tokens) = (p, toks),
        Err(e) => r.error = Some(super::super::error_text(&e)),
    }
    r.swaps = swaps.get();
    r.finish_ms = t0.elapsed().as_secs_f64() * 1e3;
    r
}

/// The `q` quantile of `xs` (nearest rank); 0 when empty.
fn percentile(xs: &[f64], q: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

/// GET /metrics from `addr`.
fn scrape(addr: &str) -> anyhow::Result<String> {
    let mut s = std::net::TcpStream::connect(addr).with_context(|| format!("metrics endpoint {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

/// Sum of the samples of metric `name` (any labels).
/// `djinn_vmu_region_used_bytes` of `region`, summed over models.
fn region_used(body: &str, region: &str) -> f64 {
    let label = format!("region=\"{region}\"");
    body.lines()
        .filter(|l| l.starts_with("djinn_vmu_region_used_bytes{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn sample(body: &str, name: &str) -> Option<f64> {
    let vals: Vec<f64> = body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with(' ') || r.starts_with('{')))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!vals.is_empty()).then(|| vals.iter().sum())
}

/// p50/p99 (ms, bucket upper bounds) of `djinn_swap_seconds{direction}` over the run.
fn hist_quantiles(before: &str, after: &str, direction: &str) -> serde_json::Value {
    let buckets = |body: &str| -> Vec<(f64, f64)> {
        body.lines()
            .filter(|l| l.starts_with("djinn_swap_seconds_bucket") && l.contains(&format!("direction=\"{direction}\"")))
            .filter_map(|l| {
                let le = l.split("le=\"").nth(1)?.split('"').next()?;
                let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
                Some((le, l.rsplit(' ').next()?.parse().ok()?))
            })
            .collect()
    };
    let (b, a) = (buckets(before), buckets(after));
    let mut agg: std::collections::BTreeMap<u64, f64> = Default::default();
    for (le, n) in a {
        *agg.entry(le.to_bits()).or_default() += n;
    }
    for (le, n) in b {
        *agg.entry(le.to_bits()).or_default() -= n;
    }
    let mut cum: Vec<(f64, f64)> = agg.into_iter().map(|(k, n)| (f64::from_bits(k), n)).collect();
    cum.sort_by(|x, y| x.0.total_cmp(&y.0));
    let total = cum.last().map_or(0.0, |c| c.1);
    let at = |q: f64| -> serde_json::Value {
        if total <= 0.0 {
            return serde_json::Value::Null;
        }
        cum.iter().find(|c| c.1 >= q * total).map_or(serde_json::Value::Null, |c| (c.0 * 1e3).into())
    };
    serde_json::json!({"p50": at(0.5), "p99": at(0.99), "count": total})
}
