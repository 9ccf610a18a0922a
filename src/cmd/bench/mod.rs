//! `djinn-dataplane bench ...`: benchmarks run against a server, each writing `DIR/results.json`
//! and exiting non-zero when its verdict fails.

pub mod breakpoints;

#[derive(clap::Subcommand, Debug)]
pub enum Bench {
    /// Many sessions paused at breakpoints, resumed, checked against uninterrupted runs.
    Breakpoints(breakpoints::Args),
}

pub fn run(b: Bench) -> anyhow::Result<()> {
    match b {
        Bench::Breakpoints(a) => breakpoints::run(a),
    }
}
