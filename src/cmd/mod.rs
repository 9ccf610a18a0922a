//! One module per subcommand.

pub mod bench;
pub mod chat;
pub mod convert;
pub mod debug;
pub mod demo;
pub mod device;
pub mod generate;
pub mod local;
pub mod logits;
pub mod models;
pub mod ping;
pub mod remote;
pub mod serve;
pub mod tiny_model;

/// An error and its causes on one line, each said once: a cause whose text an outer message
/// already holds is left out (thiserror messages carry their source's text and also return it as
/// `source()`, so printing the chain would repeat it).
pub fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if s.is_empty() || out.contains(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn error_text_says_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        let e = anyhow::Error::new(io).context("tcp connect: Connection refused").context("connecting to tcp://h:1");
        assert_eq!(super::error_text(&e), "connecting to tcp://h:1: tcp connect: Connection refused");
    }
}

/// How log lines are written.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default)]
pub enum LogFormat {
    /// One plain line per event (colours only when stderr is a terminal).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Logs go to stderr; `RUST_LOG` filters (default `info`).
pub fn init_tracing(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let sub = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => sub.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => sub.json().with_current_span(false).init(),
    }
}
