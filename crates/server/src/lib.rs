//! The djinn-dataplane server: listeners and connections, the handshake and tenants, remote
//! tensor operations (the semantic-blind path), metrics. Sessions, the scheduler and the engine
//! loop plug in beside [`conn`]'s dispatch in a later issue: replies already go through a shared
//! [`server::ReplyTx`] so an engine thread can stream frames on a connection.
//!
//! Module map: [`config`] (flags/TOML), [`auth`] (tenants, tokens), [`server`] (start-up,
//! accept, drain), `conn` (one connection's reader and dispatch), [`tensors`] (per-tenant handle
//! tables and quotas), [`exec`] (op graphs through the backend), [`metrics`] (Prometheus, HTTP),
//! [`watchdog`] (handshake deadlines).

pub mod auth;
pub mod config;
mod conn;
pub mod exec;
pub mod metrics;
pub mod server;
pub mod tensors;
pub mod watchdog;

pub use config::{ServerConfig, DEFAULT_LISTEN};
pub use server::{Server, ServerError};
