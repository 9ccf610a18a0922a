//! One module per subcommand.

pub mod convert;
pub mod demo;
pub mod generate;
pub mod logits;
pub mod ping;
pub mod remote;
pub mod serve;
pub mod tiny_model;

/// Logs go to stderr; `RUST_LOG` filters (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
