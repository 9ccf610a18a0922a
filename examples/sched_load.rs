//! A small load driver for the scheduling targets of issue 12, until `djinn-dataplane bench load`
//! exists: it runs against servers already listening and prints ratios to baselines measured in
//! the same run.
//!
//! `cargo run --release --example sched_load -- QOS_URL FCFS_URL MODEL`
//! - throughput: aggregate tokens/s of 16 closed-loop users against 1 (qos server), 1 → 16 → 1.
//! - realtime: p99 time per output token of one realtime stream alone, then beside 15 batch
//!   streams, on the qos server and on the fcfs server.
//! - ttft: time to first token of a 16-token prompt alone, and sent 200 ms after a 4000-token
//!   prompt, on each server.
//!
//! Prompts are random ids with a fixed seed and EOS is ignored, so every request makes exactly
//! the tokens it asks for.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use djinn_client::{Client, ClientOptions, DecodeOptions, Feed, OpenOptions, Qos};

fn prompt(seed: u64, n: usize) -> Vec<u32> {
    let mut z = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            z ^= z << 13;
            z ^= z >> 7;
            z ^= z << 17;
            1000 + (z % 20000) as u32
        })
        .collect()
}

fn connect(url: &str) -> Client {
    Client::connect_with(url, &ClientOptions::default()).expect("connect")
}

fn opts(n: u32) -> DecodeOptions {
    DecodeOptions { max_new_tokens: n, ignore_eos: true, ..DecodeOptions::default() }
}

/// One request on a fresh session: token arrival times (the first relative to the send).
fn request(c: &mut Client, model: &str, qos: Qos, p: &[u32], n: u32) -> (Duration, Vec<Duration>) {
    let s = c.open_session(&OpenOptions { qos, ..OpenOptions::new(model) }).expect("open").session;
    let t0 = Instant::now();
    let mut last = t0;
    let (mut ttft, mut gaps) = (Duration::ZERO, Vec::new());
    let mut first = true;
    c.generate(s, Feed::Ids(p), &opts(n), |_| {
        let now = Instant::now();
        if first {
            ttft = now - t0;
            first = false;
        } else {
            gaps.push(now - last);
        }
        last = now;
        true
    })
    .expect("generate");
    let _ = c.close_session(s);
    (ttft, gaps)
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3
}

/// Aggregate tokens/s of `users` closed-loop users for `secs`.
fn throughput(url: &str, model: &str, users: usize, secs: f64) -> f64 {
    let tokens = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let hs: Vec<_> = (0..users)
        .map(|u| {
            let (url, model, tokens, stop) = (url.to_owned(), model.to_owned(), tokens.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut c = connect(&url);
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let s = c.open_session(&OpenOptions::new(&model)).expect("open").session;
                    let _ = c.generate(s, Feed::Ids(&prompt(u as u64 * 1000 + i, 16)), &opts(32), |_| {
                        tokens.fetch_add(1, Ordering::Relaxed);
                        !stop.load(Ordering::Relaxed)
                    });
                    let _ = c.close_session(s);
                    i += 1;
                }
            })
        })
        .collect();
    // Warm-up: every user has started generating.
    std::thread::sleep(Duration::from_millis(1500));
    let (t0, n0) = (Instant::now(), tokens.load(Ordering::Relaxed));
    std::thread::sleep(Duration::from_secs_f64(secs));
    let rate = (tokens.load(Ordering::Relaxed) - n0) as f64 / t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        let _ = h.join();
    }
    rate
}

/// p50/p99 TPOT (ms) of a realtime stream of 64 tokens, repeated `reps` times, beside
/// `batch` batch streams.
fn realtime_tpot(url: &str, model: &str, batch: usize, reps: usize) -> (f64, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicU64::new(0));
    let hs: Vec<_> = (0..batch)
        .map(|u| {
            let (url, model, stop, started) = (url.to_owned(), model.to_owned(), stop.clone(), started.clone());
            std::thread::spawn(move || {
                let mut c = connect(&url);
                let mut once = true;
                while !stop.load(Ordering::Relaxed) {
                    let s =
                        c.open_session(&OpenOptions { qos: Qos::Batch, ..OpenOptions::new(&model) }).unwrap().session;
                    let _ = c.generate(s, Feed::Ids(&prompt(500 + u as u64, 16)), &opts(256), |_| {
                        if once {
                            started.fetch_add(1, Ordering::Relaxed);
                            once = false;
                        }
                        !stop.load(Ordering::Relaxed)
                    });
                    let _ = c.close_session(s);
                }
            })
        })
        .collect();
    while started.load(Ordering::Relaxed) < batch as u64 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut c = connect(url);
    let mut gaps = Vec::new();
    for r in 0..reps {
        let (_, g) = request(&mut c, model, Qos::Realtime, &prompt(77 + r as u64, 16), 64);
        gaps.extend(g);
    }
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        let _ = h.join();
    }
    (pct(&mut gaps.clone(), 0.5), pct(&mut gaps, 0.99))
}

/// TTFT (ms) of a 16-token prompt: median of 5 alone, and once sent 200 ms after a 4000-token
/// prompt (median of 3).
fn ttft(url: &str, model: &str) -> (f64, f64) {
    let mut c = connect(url);
    let mut solo: Vec<Duration> =
        (0..5).map(|i| request(&mut c, model, Qos::Interactive, &prompt(900 + i, 16), 2).0).collect();
    let mut loaded = Vec::new();
    for i in 0..3 {
        let (url2, model2) = (url.to_owned(), model.to_owned());
        let long = std::thread::spawn(move || {
            let mut c = connect(&url2);
            request(&mut c, &model2, Qos::Interactive, &prompt(4000 + i, 4000), 2)
        });
        std::thread::sleep(Duration::from_millis(200));
        loaded.push(request(&mut c, model, Qos::Interactive, &prompt(950 + i, 16), 2).0);
        long.join().unwrap();
    }
    (pct(&mut solo, 0.5), pct(&mut loaded, 0.5))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, qos_url, fcfs_url, model] = &args[..] else {
        eprintln!("usage: sched_load QOS_URL FCFS_URL MODEL");
        std::process::exit(2);
    };
    let what = std::env::var("SCHED_LOAD").unwrap_or_else(|_| "throughput,realtime,ttft".into());
    if what.contains("throughput") {
        let a = throughput(qos_url, model, 1, 8.0);
        let b = throughput(qos_url, model, 16, 8.0);
        let c = throughput(qos_url, model, 1, 8.0);
        let one = (a + c) / 2.0;
        println!("throughput (qos): 1 user {a:.1} / {c:.1} tok/s, 16 users {b:.1} tok/s: ratio {:.2}", b / one);
    }
    if what.contains("realtime") {
        for (name, url) in [("qos", qos_url), ("fcfs", fcfs_url)] {
            let (u50, u99) = realtime_tpot(url, model, 0, 3);
            let (l50, l99) = realtime_tpot(url, model, 15, 3);
            println!(
                "realtime TPOT ({name}): unloaded p50 {u50:.1} p99 {u99:.1} ms; beside 15 batch p50 {l50:.1} p99 \
                 {l99:.1} ms: p99 ratio {:.2}",
                l99 / u99
            );
        }
    }
    if what.contains("ttft") {
        for (name, url) in [("qos", qos_url), ("fcfs", fcfs_url)] {
            let (solo, loaded) = ttft(url, model);
            println!(
                "ttft ({name}): 16-token prompt alone {solo:.1} ms, during a 4000-token prompt {loaded:.1} ms: +{:.1} ms",
                loaded - solo
            );
        }
    }
}
