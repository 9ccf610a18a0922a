//! `djinn-dataplane`: serve, ping, generate, logits, models, chat, convert-gguf, demo, bench.

use clap::{Parser, Subcommand};

mod cmd;

#[derive(Parser)]
#[command(name = "djinn-dataplane", version, about = "Remote GPU inference with server-resident state")]
struct Cli {
    /// Log lines on stderr: text, or json (one object per line). RUST_LOG filters them.
    #[arg(long, global = true, value_enum, default_value_t, env = "DJINN_LOG_FORMAT")]
    log_format: cmd::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the data-plane server.
    Serve(cmd::serve::Args),
    /// Round-trip latency and bandwidth against a server.
    Ping(cmd::ping::Args),
    /// Generate tokens from a model (in process with --model-dir, or remote with --server).
    Generate(cmd::generate::Args),
    /// Print a model's logits for a prompt (top-k per position; --json for every logit).
    Logits(cmd::logits::Args),
    /// List the models a server serves.
    Models(cmd::models::Args),
    /// Chat with a server's model: each stdin line is a turn; the session keeps the history.
    Chat(cmd::chat::Args),
    /// Convert a GGUF file into a Hugging Face layout directory.
    ConvertGguf(cmd::convert::Args),
    /// Start a server on loopback (CPU backend, tcp + shm) and run a client against it.
    Demo(cmd::demo::Args),
    /// Run a prompt with breakpoints: dump (and optionally replace) the hidden state after layer N.
    Debug(cmd::debug::Args),
    /// Benchmarks: load sweeps, the remote path's fixed overhead, breakpoints at scale.
    Bench(cmd::bench::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    cmd::init_tracing(cli.log_format);
    let result = match cli.command {
        Command::Serve(a) => cmd::serve::run(a),
        Command::Ping(a) => cmd::ping::run(a),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Logits(a) => cmd::logits::run(a),
        Command::Models(a) => cmd::models::run(a),
        Command::Chat(a) => cmd::chat::run(a),
        Command::ConvertGguf(a) => cmd::convert::run(a),
        Command::Demo(a) => cmd::demo::run(a),
        Command::Debug(a) => cmd::debug::run(a),
        Command::Bench(a) => cmd::bench::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", cmd::error_text(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
