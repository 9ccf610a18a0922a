//! `djinn-dataplane models --server URL`: the models a server serves (from its handshake reply),
//! one per line, or `--json` {"models", "backend", "transports"}.

use std::path::PathBuf;

use djinn_client::{Client, ClientOptions};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The server: tcp://HOST:PORT or shm://NAME.
    #[arg(long, value_name = "URL")]
    pub server: String,
    /// File holding the tenant token (else DJINN_TOKEN).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Print one JSON object instead of one model per line.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let opts = ClientOptions { token: djinn_client::load_token(args.token_file.as_deref())?, ..Default::default() };
    let client = Client::connect_with(&args.server, &opts)?;
    let caps = client.capabilities();
    if args.json {
        let v = serde_json::json!({
            "models": caps.models,
            "backend": caps.backend,
            "transports": caps.transports,
        });
        println!("{v}");
    } else if caps.models.is_empty() {
        eprintln!("{} serves no models (start it with `serve --model NAME=DIR`)", args.server);
    } else {
        for m in &caps.models {
            println!("{m}");
        }
    }
    Ok(())
}
