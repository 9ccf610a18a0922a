//! `djinn-dataplane bench`: benchmarks run from the CLI, one subcommand per sibling module. Each
//! writes its results under `--out` and exits non-zero when its verdict fails.

pub mod breakpoints;
pub mod load;
pub mod overhead;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Sweep concurrent users against a server: tokens/s, TTFT, TPOT and SLA violations per
    /// class, as results.json, results.csv and SVG plots.
    Load(load::Args),
    /// Fixed per-call overhead of the remote path against in-process, per transport and payload.
    Overhead(overhead::Args),
    /// Many sessions paused at breakpoints, resumed, checked against uninterrupted runs.
    Breakpoints(breakpoints::Args),
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Load(a) => load::run(a),
        Command::Overhead(a) => overhead::run(a),
        Command::Breakpoints(a) => breakpoints::run(a),
    }
}
