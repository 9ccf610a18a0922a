//! `djinn-dataplane ping`: perftest-style round trips of a payload against a server.

use std::path::PathBuf;

use anyhow::Context;
use djinn_client::{Client, ClientOptions};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Server URL: tcp://HOST:PORT, shm://NAME or rdma://HOST:PORT.
    #[arg(long)]
    pub server: String,
    /// With an rdma:// server: the local RDMA device (default: the one on the route to HOST).
    #[arg(long, env = "DJINN_NIC")]
    pub nic: Option<String>,
    /// Payload bytes per round trip.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Timed round trips.
    #[arg(long, default_value_t = 10_000)]
    pub count: u64,
    /// Untimed round trips first.
    #[arg(long, default_value_t = 100)]
    pub warmup: u64,
    /// Busy-poll instead of spin-then-park while waiting.
    #[arg(long)]
    pub busy_poll: bool,
    /// File holding the tenant token (else DJINN_TOKEN).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut opts = ClientOptions { token: djinn_client::load_token(args.token_file.as_deref())?, ..Default::default() };
    opts.transport.rdma_device = args.nic.clone();
    if args.busy_poll {
        opts.transport.wait = djinn_transport::WaitMode::BusyPoll;
    }
    let mut client = Client::connect_with(&args.server, &opts)?;
    let report = djinn_client::ping::run(&mut client, args.size, args.count, args.warmup)
        .with_context(|| format!("pinging {}", args.server))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let r = &report.rtt_us;
        println!(
            "{} {} B x {}: rtt p50 {:.2} us, p99 {:.2} us, p999 {:.2} us, min {:.2} us, max {:.2} us; {:.3} GB/s one way",
            report.transport, report.size, report.count, r.p50, r.p99, r.p999, r.min, r.max, report.gbps
        );
    }
    Ok(())
}
