//! `djinn-dataplane bench overhead`: the remote path's fixed per-call overhead against in-process
//! calls of the same model, per transport and payload size (`djinn_dataplane::overhead`, the same
//! code as `cargo bench --bench session_overhead`). Serves a generated tiny model (or
//! `--model-dir`) from a `serve` child process per transport; prints a table, or JSON.

use std::path::PathBuf;

use anyhow::Context;
use djinn_dataplane::overhead::{self, Transport};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Transports to measure (rdma needs a build with the `rdma` feature and a device).
    #[arg(long, value_delimiter = ',', default_value = "tcp,shm,rdma")]
    pub transports: Vec<Transport>,
    /// Prompt lengths of the per-call rows, in tokens (4 bytes each on the wire).
    #[arg(long, value_delimiter = ',', default_value = "1,16,256")]
    pub payload_tokens: Vec<usize>,
    /// Tokens of the decode-step row's generate (0 = no such row).
    #[arg(long, default_value_t = 32)]
    pub decode_tokens: usize,
    /// Paired (in-process, remote) calls per row; medians are reported.
    #[arg(long, default_value_t = 200)]
    pub calls: usize,
    /// Per-call rows: in-process calls per block, then as many remote ones, paired in order
    /// (1: strictly alternated, so each remote call shares the cores with the in-process
    /// baseline's still-spinning pool worker; more: each side's first call per block is a
    /// warm-up, not recorded).
    #[arg(long, default_value_t = 16)]
    pub block_calls: usize,
    /// CPU threads of each side (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// A Hugging Face model directory to use instead of the generated tiny model.
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// Both sides busy-poll (`serve --wait busy-poll` and a busy-poll client) instead of
    /// spin-then-park: the latency-critical setting, a core per waiting side.
    #[arg(long)]
    pub busy_poll: bool,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The generated tiny model's folder, removed when dropped.
struct TempModel(PathBuf);

impl Drop for TempModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let (model_dir, _tmp) = match &args.model_dir {
        Some(d) => (d.clone(), None),
        None => {
            let dir = std::env::temp_dir().join(format!("djinn-overhead-tiny-{}", std::process::id()));
            crate::cmd::tiny_model::write(&dir, 42)?;
            (dir.clone(), Some(TempModel(dir)))
        }
    };
    let opts = overhead::Options {
        exe,
        model_dir,
        transports: args.transports.clone(),
        payload_tokens: args.payload_tokens.clone(),
        decode_tokens: args.decode_tokens,
        calls: args.calls,
        block_calls: args.block_calls,
        threads: args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        busy_poll: args.busy_poll,
    };
    let report = overhead::measure(&opts, |line| eprintln!("bench overhead: {line}"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}
