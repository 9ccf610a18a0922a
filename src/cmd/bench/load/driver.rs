//! Drives one users level against the server for a fixed window and records every request.
//!
//! Closed loop (default): each user is a thread with its own connection and class; it opens a
//! session, sends a random prompt and decodes exactly `max_new_tokens` (EOS ignored), closes the
//! session, thinks `think_ms`, and repeats until the window ends. Open loop (`--rate R`): one
//! thread draws Poisson arrivals at R requests/s in total (and a class per arrival from the mix)
//! into a bounded queue that `users` worker connections serve; a request's clock starts at its
//! arrival, so time spent queued here counts in its time to first token, and an arrival that
//! finds the queue full is an error rather than growth.
//!
//! The window is exact: a request still decoding when it ends is cancelled at its next token,
//! and tokens after the end are not counted. A request's clock starts before its session opens
//! (a server that makes sessions wait for admission charges the wait to time to first token).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use djinn_client::{Client, ClientOptions, DecodeOptions, Feed, FinishReason, OpenOptions, TokenEvent};

use super::mix::{Class, Mix};

/// Open loop: arrivals waiting for a free worker, per worker (beyond it an arrival is an error).
const QUEUE_PER_WORKER_MAX: usize = 64;
/// How long a worker waits after a failed connect before trying again.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(100);

/// What one level runs.
#[derive(Clone, Debug)]
pub struct Plan {
    pub server: String,
    pub model: String,
    pub token: Option<Vec<u8>>,
    pub users: usize,
    pub duration: Duration,
    pub prompt_tokens: usize,
    pub max_new_tokens: u32,
    pub think: Duration,
    /// Open loop at this many requests/s in total; `None` = closed loop.
    pub rate: Option<f64>,
    pub mix: Mix,
    pub seed: u64,
}

/// One request as the client saw it.
#[derive(Clone, Debug)]
pub struct Sample {
    pub class: Class,
    /// Arrival (or start) → first token, ms; `None` if none came within the window.
    pub ttft_ms: Option<f64>,
    /// Gaps between consecutive tokens, ms (within the window).
    pub gaps_ms: Vec<f64>,
    /// Tokens received within the window.
    pub tokens: u64,
    /// All `max_new_tokens` arrived within the window.
    pub completed: bool,
    /// The request failed (its error is in `error`).
    pub error: Option<String>,
}

/// Counters the progress bar reads while the level runs.
#[derive(Default)]
pub struct Live {
    pub tokens: AtomicU64,
    pub requests: AtomicU64,
    pub errors: AtomicU64,
}

/// splitmix64: deterministic prompts and arrivals from `--seed` (no dependency needed).
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn ids(&mut self, n: usize, vocab: u32) -> Vec<u32> {
        (0..n).map(|_| (self.next_u64() % u64::from(vocab.max(1))) as u32).collect()
    }
}

/// Runs one level; returns every request it made and the window's length.
pub fn run_level(plan: &Plan, live: &Arc<Live>) -> (Vec<Sample>, Duration) {
    let samples = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let end = start + plan.duration;
    let mut threads = Vec::with_capacity(plan.users + 1);
    match plan.rate {
        None => {
            for (user, class) in plan.mix.assign(plan.users).into_iter().enumerate() {
                let (plan, live, samples) = (plan.clone(), live.clone(), samples.clone());
                threads.push(std::thread::spawn(move || {
                    let mut rng = Rng(plan.seed ^ (user as u64).wrapping_mul(0x1000_0000_01b3));
                    let mut worker = Worker::new(&plan);
                    while Instant::now() < end {
                        let s = worker.request(&plan, class, Instant::now(), end, &mut rng);
                        let failed = s.error.is_some();
                        record(&live, &samples, s);
                        if failed {
                            // A failing server: don't spin on it.
                            sleep_until(Instant::now() + RECONNECT_BACKOFF, end);
                        }
                        sleep_until(Instant::now() + plan.think, end);
                    }
                }));
            }
        }
        Some(rate) => {
            let (tx, rx) = mpsc::sync_channel::<(Instant, Class, u64)>(QUEUE_PER_WORKER_MAX * plan.users);
            let rx = Arc::new(Mutex::new(rx));
            for user in 0..plan.users {
                let (plan, live, samples, rx) = (plan.clone(), live.clone(), samples.clone(), rx.clone());
                threads.push(std::thread::spawn(move || {
                    let mut worker = Worker::new(&plan);
                    loop {
                        let left = end.saturating_duration_since(Instant::now());
                        let next = rx.lock().expect("queue lock").recv_timeout(left);
                        let (arrival, class, seed) = match next {
                            Ok(a) => a,
                            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                        };
                        if Instant::now() >= end {
                            break;
                        }
                        let mut rng = Rng(seed ^ user as u64);
                        let s = worker.request(&plan, class, arrival, end, &mut rng);
                        record(&live, &samples, s);
                    }
                }));
            }
            let (plan, live, samples) = (plan.clone(), live.clone(), samples.clone());
            threads.push(std::thread::spawn(move || arrivals(&plan, rate, end, tx, &live, &samples)));
        }
    }
    for t in threads {
        let _ = t.join();
    }
    let window = end.saturating_duration_since(start);
    let samples = std::mem::take(&mut *samples.lock().expect("samples lock"));
    (samples, window)
}

/// Open loop: Poisson arrivals (exponential gaps) at `rate`/s until `end`.
fn arrivals(
    plan: &Plan,
    rate: f64,
    end: Instant,
    tx: SyncSender<(Instant, Class, u64)>,
    live: &Live,
    samples: &Mutex<Vec<Sample>>,
) {
    let mut rng = Rng(plan.seed);
    let mut next = Instant::now();
    loop {
        let gap_s = -(1.0 - rng.unit()).ln() / rate;
        next += Duration::from_secs_f64(gap_s);
        if next >= end {
            break;
        }
        sleep_until(next, end);
        let class = plan.mix.draw(rng.unit());
        match tx.try_send((next, class, rng.next_u64())) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => record(
                live,
                samples,
                Sample::failed(
                    class,
                    format!(
                        "arrival queue full ({} waiting): the server is too slow for --rate",
                        QUEUE_PER_WORKER_MAX * plan.users
                    ),
                ),
            ),
            Err(TrySendError::Disconnected(_)) => break,
        }
    }
}

fn record(live: &Live, samples: &Mutex<Vec<Sample>>, s: Sample) {
    live.tokens.fetch_add(s.tokens, Ordering::Relaxed);
    if s.error.is_some() {
        live.errors.fetch_add(1, Ordering::Relaxed);
    } else if s.completed {
        live.requests.fetch_add(1, Ordering::Relaxed);
    }
    samples.lock().expect("samples lock").push(s);
}

fn sleep_until(t: Instant, end: Instant) {
    let until = t.min(end);
    let now = Instant::now();
    if until > now {
        std::thread::sleep(until - now);
    }
}

impl Sample {
    fn failed(class: Class, error: String) -> Sample {
        Sample { class, ttft_ms: None, gaps_ms: Vec::new(), tokens: 0, completed: false, error: Some(error) }
    }
}

/// One user's connection, reconnected after a failure.
struct Worker {
    client: Option<Client>,
    opts: ClientOptions,
    /// The model's vocabulary (from the first session), for random prompt ids.
    vocab: u32,
}

impl Worker {
    fn new(plan: &Plan) -> Worker {
        Worker { client: None, opts: ClientOptions { token: plan.token.clone(), ..Default::default() }, vocab: 0 }
    }

    /// One request of `class` whose clock started at `t0`.
    fn request(&mut self, plan: &Plan, class: Class, t0: Instant, end: Instant, rng: &mut Rng) -> Sample {
        match self.try_request(plan, class, t0, end, rng) {
            Ok(s) => s,
            Err(e) => {
                // The connection may be broken: start afresh next time.
                self.client = None;
                Sample::failed(class, e.to_string())
            }
        }
    }

    fn try_request(
        &mut self,
        plan: &Plan,
        class: Class,
        t0: Instant,
        end: Instant,
        rng: &mut Rng,
    ) -> djinn_client::Result<Sample> {
        if self.client.is_none() {
            self.client = Some(Client::connect_with(&plan.server, &self.opts)?);
        }
        let client = self.client.as_mut().expect("connected above");
        let max_tokens = u32::try_from(plan.prompt_tokens).unwrap_or(u32::MAX).saturating_add(plan.max_new_tokens);
        let open = OpenOptions { qos: class.qos(), max_tokens, ..OpenOptions::new(plan.model.clone()) };
        let info = client.open_session(&open)?;
        self.vocab = info.vocab;
        let prompt = rng.ids(plan.prompt_tokens, self.vocab);
        let opts = DecodeOptions {
            max_new_tokens: plan.max_new_tokens,
            ignore_eos: true,
            seed: rng.next_u64(),
            ..DecodeOptions::default()
        };
        let mut stamps: Vec<Instant> = Vec::with_capacity(plan.max_new_tokens as usize);
        let mut late = false;
        let summary = client.generate(info.session, Feed::Ids(&prompt), &opts, |_ev: &TokenEvent<'_>| {
            let now = Instant::now();
            if now >= end {
                late = true;
                return false;
            }
            stamps.push(now);
            true
        });
        let closed = client.close_session(info.session);
        let summary = summary?;
        closed?;
        let ttft_ms = stamps.first().map(|t| ms(*t - t0));
        let gaps_ms = stamps.windows(2).map(|w| ms(w[1] - w[0])).collect();
        let completed = summary.finish == FinishReason::Length && stamps.len() == plan.max_new_tokens as usize;
        if !completed && !late && Instant::now() < end {
            return Err(djinn_client::ClientError::Protocol {
                opcode: "SessionDecode",
                why: format!(
                    "the decode ended after {} of {} tokens ({:?}) although EOS is ignored",
                    stamps.len(),
                    plan.max_new_tokens,
                    summary.finish
                ),
            });
        }
        Ok(Sample { class, ttft_ms, gaps_ms, tokens: stamps.len() as u64, completed, error: None })
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
