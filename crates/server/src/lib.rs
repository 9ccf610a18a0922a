//! The djinn-dataplane server: listeners and connections, the handshake and tenants, remote
//! tensor operations (the semantic-blind path), sessions on the models it loads at start-up
//! ([`session`]: one engine loop thread per device batches every session's step and streams
//! token frames through the connection's shared [`server::ReplyTx`]), metrics.
//!
//! Module map: [`config`] (the settings: flags, TOML, environment; mechanism in
//! [`settings`]), [`auth`] (tenants, tokens), [`server`] (start-up,
//! accept, drain), `conn` (one connection's reader and dispatch), [`tensors`] (per-tenant handle
//! tables and quotas), [`exec`] (op graphs through the backend), [`session`] (models, sessions,
//! the engine loop), [`metrics`] (Prometheus), [`http`] (`/healthz`, `/metrics`), [`openai`] (the
//! OpenAI-compatible HTTP API), [`watchdog`] (connection deadlines), [`staging`] (the bounded
//! staging pool), [`lanes`] (the backend handles Execs run on), [`quota`] (per-tenant quotas), [`throttle`]
//! (rate-limited logging).

pub mod auth;
pub mod config;
mod conn;
pub mod exec;
pub mod http;
pub mod lanes;
pub mod metrics;
pub mod openai;
pub mod quota;
pub mod server;
pub mod session;
pub mod settings;
pub mod staging;
pub mod tensors;
pub mod throttle;
pub mod watchdog;

pub use config::{ModelSpec, ServerConfig, ServerConfigLayer, DEFAULT_LISTEN};
pub use server::{Server, ServerError};
