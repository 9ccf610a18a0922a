//! `djinn-dataplane bench load`: sweeps concurrent users against a running server over the
//! client protocol only (so it measures any server: today's, `--scheduler qos` or `fcfs`) and
//! writes DIR/results.json, DIR/results.csv and SVG plots (see `results` and `plot`). Each
//! level runs for `--duration-s`; progress goes to stderr.

mod driver;
pub mod mix;
mod plot;
mod results;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use djinn_client::{Client, ClientOptions};

use driver::{Live, Plan};
use mix::Mix;
use results::Results;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The server: tcp://HOST:PORT, shm://NAME or rdma://HOST:PORT.
    #[arg(long, value_name = "URL")]
    pub server: String,
    /// The server's model name (`djinn-dataplane models --server URL` lists them).
    #[arg(long, value_name = "NAME")]
    pub model: String,
    /// Concurrent users per level (in open loop: connections serving the arrivals).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64")]
    pub users: Vec<usize>,
    /// Seconds each level runs.
    #[arg(long, default_value_t = 30.0)]
    pub duration_s: f64,
    /// Share of users (closed loop) or arrivals (open loop) per class; adds up to 1.
    #[arg(long, default_value = "realtime=0.1,interactive=0.7,batch=0.2")]
    pub mix: String,
    /// Prompt length of every request (random ids from --seed).
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    /// Tokens every request makes (EOS is ignored, so exactly this many).
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: u32,
    /// Folder for results.json, results.csv and the plots (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Open loop: Poisson arrivals at R requests/s in total (default: closed loop per user).
    #[arg(long, value_name = "R")]
    pub rate: Option<f64>,
    /// Closed loop: pause after each reply before a user's next request, ms.
    #[arg(long, default_value_t = 0)]
    pub think_ms: u64,
    /// An earlier run's folder (e.g. against `serve --scheduler fcfs`): adds qos_vs_fcfs.svg.
    #[arg(long, value_name = "DIR")]
    pub compare: Option<PathBuf>,
    /// Seed of the prompts, the arrivals and the sampling.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// The server's scheduler as results.json records it, when the server does not say (its
    /// Stats counters name it as `scheduler_NAME`); else "unknown".
    #[arg(long, value_name = "NAME")]
    pub scheduler: Option<String>,
    /// File holding the tenant token (else DJINN_TOKEN).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

/// Everything the flags say, checked.
struct Checked {
    users: Vec<usize>,
    mix: Mix,
    duration: Duration,
}

fn check(a: &Args) -> anyhow::Result<Checked> {
    let users = mix::parse_users(&a.users)?;
    let mix = Mix::parse(&a.mix)?;
    if !(a.duration_s.is_finite() && a.duration_s > 0.0) {
        bail!("--duration-s {} must be a positive number of seconds", a.duration_s);
    }
    if a.prompt_tokens == 0 {
        bail!("--prompt-tokens must be at least 1");
    }
    if a.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1 (2 or more to measure time per output token)");
    }
    if let Some(r) = a.rate {
        if !(r.is_finite() && r > 0.0) {
            bail!("--rate {r} must be a positive number of requests per second");
        }
    }
    Ok(Checked { users, mix, duration: Duration::from_secs_f64(a.duration_s) })
}

/// The scheduler the server names in its Stats counters (`scheduler_NAME` = 1), if it does.
fn server_scheduler(client: &mut Client) -> Option<String> {
    let counters = client.stats().ok()?;
    counters.into_iter().find_map(|(k, v)| (v == 1).then(|| k.strip_prefix("scheduler_").map(str::to_owned)).flatten())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let c = check(&args)?;
    // Read the compared run first: a wrong --compare fails before minutes of load.
    let compare = args.compare.as_deref().map(Results::read).transpose()?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating --out {}", args.out.display()))?;
    let token = djinn_client::load_token(args.token_file.as_deref())?;
    let mut probe = Client::connect_with(&args.server, &ClientOptions { token: token.clone(), ..Default::default() })?;
    if !probe.capabilities().models.contains(&args.model) {
        bail!(
            "the server at {} does not serve {:?}; it serves: {}",
            args.server,
            args.model,
            probe.capabilities().models.join(", ")
        );
    }
    let scheduler = args.scheduler.clone().or_else(|| server_scheduler(&mut probe)).unwrap_or_else(|| "unknown".into());
    drop(probe);
    let mut results = Results {
        server: args.server.clone(),
        model: args.model.clone(),
        scheduler,
        mode: if args.rate.is_some() { "open" } else { "closed" }.into(),
        duration_s: args.duration_s,
        prompt_tokens: args.prompt_tokens,
        max_new_tokens: args.max_new_tokens,
        mix: c.mix.to_json(),
        runs: Vec::new(),
    };
    let classes: Vec<mix::Class> = c.mix.classes().map(|(k, _)| k).collect();
    for (i, &users) in c.users.iter().enumerate() {
        let plan = Plan {
            server: args.server.clone(),
            model: args.model.clone(),
            token: token.clone(),
            users,
            duration: c.duration,
            prompt_tokens: args.prompt_tokens,
            max_new_tokens: args.max_new_tokens,
            think: Duration::from_millis(args.think_ms),
            rate: args.rate,
            mix: c.mix.clone(),
            seed: args.seed.wrapping_add(i as u64),
        };
        let (samples, window) = run_with_progress(&plan, i, c.users.len());
        // Closed loop runs only the classes that got users; open loop any drawn.
        let ran: Vec<mix::Class> = match args.rate {
            None => {
                let assigned = c.mix.assign(users);
                classes.iter().copied().filter(|k| assigned.contains(k)).collect()
            }
            Some(_) => classes.clone(),
        };
        let rows = results::level_rows(users, &ran, &samples, window.as_secs_f64());
        let all = &rows[0];
        eprintln!(
            "users {users:>3}: {:>9.1} tokens/s, {} requests, {} errors, ttft p50 {} ms, tpot p50 {} / p99 {} ms, {} SLA violations",
            all.tokens_per_s,
            all.requests,
            all.errors,
            fmt_ms(all.ttft_ms.p50),
            fmt_ms(all.tpot_ms.p50),
            fmt_ms(all.tpot_ms.p99),
            all.sla_violations
        );
        if let Some(e) = samples.iter().find_map(|s| s.error.as_deref()) {
            eprintln!("  first error: {e}");
        }
        results.runs.extend(rows);
        // Written after every level, so an interrupted sweep keeps what it measured.
        results.write(&args.out)?;
    }
    plot::draw(&args.out, &results)?;
    if let Some(other) = &compare {
        plot::draw_compare(&args.out, &results, other)?;
    }
    println!("wrote {}/results.json, results.csv and plots", args.out.display());
    Ok(())
}

fn fmt_ms(x: Option<f64>) -> String {
    x.map_or_else(|| "-".into(), |v| format!("{v:.1}"))
}

/// Runs one level while a progress bar on stderr shows the window and the counters.
fn run_with_progress(plan: &Plan, level: usize, levels: usize) -> (Vec<driver::Sample>, Duration) {
    let live = Arc::new(Live::default());
    let bar = indicatif::ProgressBar::new(plan.duration.as_millis() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {elapsed:>4} {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("level {}/{levels}: {} users", level + 1, plan.users));
    let t0 = Instant::now();
    let out = std::thread::scope(|s| {
        let worker = s.spawn(|| driver::run_level(plan, &live));
        while !worker.is_finished() {
            use std::sync::atomic::Ordering::Relaxed;
            bar.set_position(t0.elapsed().as_millis() as u64);
            let secs = t0.elapsed().as_secs_f64().max(1e-3);
            bar.set_message(format!(
                "{:.0} tokens/s, {} requests, {} errors",
                live.tokens.load(Relaxed) as f64 / secs,
                live.requests.load(Relaxed),
                live.errors.load(Relaxed)
            ));
            std::thread::sleep(Duration::from_millis(100));
        }
        worker.join().expect("the load driver panicked")
    });
    bar.finish_and_clear();
    out
}
