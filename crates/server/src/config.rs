//! Server configuration: one struct read from an optional TOML file whose keys are exactly the
//! long names of the `serve` flags (with `-` written `_`); command-line flags override the file.
//!
//! Invariant: every bound the server enforces (connections, in-flight requests, handles, bytes)
//! is a named field here, fixed at start-up; nothing grows past it at run time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the server listens when neither the file nor the flags name a listener.
pub const DEFAULT_LISTEN: &str = "tcp://127.0.0.1:7070";

/// A model the server loads at start-up and serves sessions on under `name`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: String,
    /// Hugging Face layout directory, or a `.gguf` file.
    pub dir: PathBuf,
}

impl ModelSpec {
    /// Parses the `--model NAME=DIR` flag.
    pub fn parse_flag(s: &str) -> Result<ModelSpec, ConfigError> {
        match s.split_once('=') {
            Some((name, dir)) if !name.trim().is_empty() && !dir.trim().is_empty() => {
                Ok(ModelSpec { name: name.trim().to_owned(), dir: PathBuf::from(dir.trim()) })
            }
            _ => Err(ConfigError::Invalid(format!("--model {s:?}: expected NAME=DIR"))),
        }
    }
}

/// What one tenant may hold at once (TOML: `[tenant_defaults]`, and `[tenants.NAME]` whose keys
/// override the defaults for tenant NAME). Tokens stay in `auth_token_file`; without it (anonymous
/// mode) every connection is its own tenant and gets the defaults.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct TenantQuota {
    /// Sessions open at once; more opens are refused with `LimitExceeded`.
    pub sessions_max: usize,
    /// KV cache bytes the tenant's open sessions may grow to (each session counts its
    /// `max_tokens` × the model's KV bytes per token from its open); beyond it an open is refused
    /// with `LimitExceeded`.
    pub kv_bytes_max: u64,
    /// Tensor bytes held at once (TensorPut and Exec outputs).
    pub tensor_bytes_max: u64,
    /// Tensor handles held at once.
    pub handles_max: usize,
    /// Connections that completed their Hello, at once; a further Hello is refused with `Busy`.
    pub connections_max: usize,
}

impl Default for TenantQuota {
    fn default() -> Self {
        TenantQuota {
            sessions_max: 64,
            kv_bytes_max: 16 << 30,
            tensor_bytes_max: 2 << 30,
            handles_max: 4096,
            connections_max: 64,
        }
    }
}

/// A `[tenants.NAME]` table: the keys it gives replace the defaults' for that tenant.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct TenantOverride {
    pub sessions_max: Option<usize>,
    pub kv_bytes_max: Option<u64>,
    pub tensor_bytes_max: Option<u64>,
    pub handles_max: Option<usize>,
    pub connections_max: Option<usize>,
}

impl TenantOverride {
    /// `base` with this table's keys applied.
    pub fn apply(&self, base: &TenantQuota) -> TenantQuota {
        TenantQuota {
            sessions_max: self.sessions_max.unwrap_or(base.sessions_max),
            kv_bytes_max: self.kv_bytes_max.unwrap_or(base.kv_bytes_max),
            tensor_bytes_max: self.tensor_bytes_max.unwrap_or(base.tensor_bytes_max),
            handles_max: self.handles_max.unwrap_or(base.handles_max),
            connections_max: self.connections_max.unwrap_or(base.connections_max),
        }
    }
}

/// Everything `djinn-dataplane serve` needs to start. Field names are the TOML keys.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Transport URLs to listen on (`tcp://HOST:PORT`, `shm://NAME`); several at once.
    pub listen: Vec<String>,
    /// `cpu`, or comma-separated CUDA ordinals (`0`, `0,1`). Empty = CPU unless a GPU backend is built in.
    pub gpus: String,
    /// RDMA device. Refused until the RDMA transport exists.
    pub nic: Option<String>,
    /// Name of this server in logs, metrics and the capabilities reply.
    pub node_id: String,
    /// `HOST:PORT` serving `/healthz` and `/metrics`; none = no HTTP endpoint.
    pub metrics_listen: Option<String>,
    /// File of `TENANT TOKEN` lines; none = every connection is its own tenant.
    pub auth_token_file: Option<PathBuf>,
    /// Connections served at once; further connections are refused with `Busy`.
    pub max_connections: usize,
    /// Requests one connection may have in flight at once; more are refused with `Busy`.
    pub max_inflight_per_conn: usize,
    /// Tensor bytes all tenants together may hold at once.
    pub tensor_bytes_max: u64,
    /// Nodes in one Exec graph.
    pub exec_nodes_max: usize,
    /// Largest frame accepted (header + metadata + data). The default admits a 64 MiB payload.
    pub frame_bytes_max: u64,
    /// `spin-then-park` (default) or `busy-poll`.
    pub wait: String,
    /// TCP: plain sockets even where io_uring works.
    pub force_socket: bool,
    /// SHM: data-area bytes per direction of each client's region.
    pub shm_data_bytes: usize,
    /// Bytes of the staging pool, allocated at start-up, through which bulk data that cannot
    /// land in its destination (a ping's echo, puts and gets of device memory) moves in pieces.
    pub staging_pool_bytes: u64,
    /// Staging bytes one connection may hold at once (a ping's echo is held whole).
    pub staging_bytes_max_per_conn: u64,
    /// Staging bytes one tenant's connections may hold at once.
    pub staging_bytes_max_per_tenant: u64,
    /// How long a frame's bulk data may take to arrive once its header has; then the connection
    /// is closed (a header announcing data that never comes holds nothing for longer).
    pub frame_data_timeout_ms: u64,
    /// How long a connection that said Hello may stay without a request and without work in
    /// flight (a decode streaming counts as work); then it is closed.
    pub conn_idle_timeout_ms: u64,
    /// Connections still without a successful Hello, at once; a new connection beyond it closes
    /// the oldest of them, so a flood of silent connections cannot lock legitimate clients out.
    pub handshakes_pending_max: usize,
    /// With `wait = "busy-poll"`: how long a connection keeps busy-polling for its next request
    /// after its last one ended and nothing is in flight; then it parks, so idle connections
    /// burn no CPU.
    pub busy_poll_linger_us: u64,
    /// HTTP connections the `/healthz` + `/metrics` endpoint holds at once (one thread serves
    /// them all); a new one beyond it closes the oldest, so idle clients cannot starve a probe.
    pub http_conns_max: usize,
    /// How long an HTTP connection may take to send its request.
    pub http_request_timeout_ms: u64,
    /// How long SIGTERM waits for in-flight requests before the process exits anyway.
    pub drain_timeout_ms: u64,
    /// How long a new connection may take to complete its Hello; a connection still without a
    /// successful Hello then is closed, so silent clients cannot hold connection slots.
    pub handshake_timeout_ms: u64,
    /// Models served (TOML: `[[models]]` tables with `name` and `dir`); all loaded at start-up.
    pub models: Vec<ModelSpec>,
    /// KV cache capacity per model, MiB (fractions allowed); none = every session at full length,
    /// at most 512 MiB.
    pub kv_capacity_mb: Option<f64>,
    /// Pinned host memory per model for swapped-out sessions, MiB; none = room for every session.
    pub host_swap_mb: Option<f64>,
    /// Sessions open at once over all models and tenants; more are refused with `LimitExceeded`.
    pub max_sessions: usize,
    /// Seconds a session outlives the last connection attached to it (then it is closed).
    pub session_lease_s: u64,
    /// Weight dtype of the models: f32, f16 or bf16; none = as stored.
    pub dtype: Option<String>,
    /// CPU backend worker threads; none = every core.
    pub threads: Option<usize>,
    /// Longest session, tokens; none = each model's `max_position_embeddings`.
    pub max_context_tokens: Option<usize>,
    /// New tokens in one engine step over all sessions (bounds a prefill chunk).
    pub max_step_tokens: usize,
    /// Session requests waiting for the engine loop; more are refused with `Busy`.
    pub session_queue_max: usize,
    /// Quotas of every tenant not named in `tenants` (and of each anonymous connection).
    pub tenant_defaults: TenantQuota,
    /// Per-tenant overrides of `tenant_defaults`, by tenant name (TOML: `[tenants.NAME]`).
    pub tenants: BTreeMap<String, TenantOverride>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        let limits = djinn_proto::Limits::default();
        ServerConfig {
            listen: Vec::new(),
            gpus: String::new(),
            nic: None,
            node_id: "djinn-0".into(),
            metrics_listen: None,
            auth_token_file: None,
            max_connections: 256,
            max_inflight_per_conn: 64,
            tensor_bytes_max: 8 << 30,
            exec_nodes_max: 256,
            frame_bytes_max: limits.frame_bytes_max,
            wait: "spin-then-park".into(),
            force_socket: false,
            shm_data_bytes: djinn_transport::TransportOptions::default().shm_data_bytes,
            staging_pool_bytes: 256 << 20,
            staging_bytes_max_per_conn: limits.frame_bytes_max,
            staging_bytes_max_per_tenant: 128 << 20,
            frame_data_timeout_ms: 10_000,
            conn_idle_timeout_ms: 600_000,
            handshakes_pending_max: 64,
            busy_poll_linger_us: 2_000,
            http_conns_max: 64,
            http_request_timeout_ms: 2_000,
            drain_timeout_ms: 5_000,
            handshake_timeout_ms: 5_000,
            models: Vec::new(),
            kv_capacity_mb: None,
            host_swap_mb: None,
            max_sessions: 64,
            session_lease_s: 300,
            dtype: None,
            threads: None,
            max_context_tokens: None,
            max_step_tokens: 256,
            session_queue_max: 1024,
            tenant_defaults: TenantQuota::default(),
            tenants: BTreeMap::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("parsing config {path}: {source}")]
    Parse { path: PathBuf, source: Box<toml::de::Error> },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl ServerConfig {
    /// Reads a TOML file; keys missing from it keep their defaults, unknown keys are an error.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse { path: path.to_owned(), source },
            other => other,
        })
    }

    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse { path: PathBuf::new(), source: Box::new(e) })
    }

    /// The listeners to bind: the configured ones, or [`DEFAULT_LISTEN`].
    pub fn listen_urls(&self) -> Vec<String> {
        if self.listen.is_empty() {
            vec![DEFAULT_LISTEN.to_owned()]
        } else {
            self.listen.clone()
        }
    }

    /// Checks what can be checked before binding anything.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(nic) = &self.nic {
            return Err(ConfigError::Invalid(format!(
                "--nic {nic}: the RDMA transport is not built yet (it belongs to a later issue); \
                 serve over tcp:// or shm:// and leave --nic out"
            )));
        }
        let positive = [
            ("max_connections", self.max_connections as u64),
            ("max_inflight_per_conn", self.max_inflight_per_conn as u64),
            ("exec_nodes_max", self.exec_nodes_max as u64),
            ("staging_pool_bytes", self.staging_pool_bytes),
            ("staging_bytes_max_per_conn", self.staging_bytes_max_per_conn),
            ("staging_bytes_max_per_tenant", self.staging_bytes_max_per_tenant),
            ("frame_data_timeout_ms", self.frame_data_timeout_ms),
            ("conn_idle_timeout_ms", self.conn_idle_timeout_ms),
            ("handshakes_pending_max", self.handshakes_pending_max as u64),
            ("http_conns_max", self.http_conns_max as u64),
            ("http_request_timeout_ms", self.http_request_timeout_ms),
            ("tensor_bytes_max", self.tensor_bytes_max),
            ("handshake_timeout_ms", self.handshake_timeout_ms),
            ("max_sessions", self.max_sessions as u64),
            ("max_step_tokens", self.max_step_tokens as u64),
            ("session_queue_max", self.session_queue_max as u64),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
            }
        }
        if self.frame_bytes_max < (djinn_proto::HEADER_LEN as u64) + 1024 {
            return Err(ConfigError::Invalid(format!("frame_bytes_max {} is too small", self.frame_bytes_max)));
        }
        let quotas = std::iter::once(("tenant_defaults".to_owned(), self.tenant_defaults.clone()))
            .chain(self.tenants.iter().map(|(n, o)| (format!("tenants.{n}"), o.apply(&self.tenant_defaults))));
        for (table, q) in quotas {
            for (key, v) in [
                ("sessions_max", q.sessions_max as u64),
                ("kv_bytes_max", q.kv_bytes_max),
                ("tensor_bytes_max", q.tensor_bytes_max),
                ("handles_max", q.handles_max as u64),
                ("connections_max", q.connections_max as u64),
            ] {
                if v == 0 {
                    return Err(ConfigError::Invalid(format!("[{table}] {key} must be at least 1")));
                }
            }
        }
        self.wait_mode()?;
        for (name, v) in [("kv_capacity_mb", self.kv_capacity_mb), ("host_swap_mb", self.host_swap_mb)] {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0) {
                    return Err(ConfigError::Invalid(format!("{name} {v}: expected a positive number of MiB")));
                }
            }
        }
        if let Some(d) = &self.dtype {
            self.model_dtype().map_err(|_| ConfigError::Invalid(format!("dtype {d:?}: expected f32, f16 or bf16")))?;
        }
        for (i, m) in self.models.iter().enumerate() {
            if m.name.is_empty() || m.name.len() > djinn_proto::msg::NAME_BYTES_MAX {
                return Err(ConfigError::Invalid(format!("model name {:?}: 1 to 256 bytes", m.name)));
            }
            if self.models[..i].iter().any(|o| o.name == m.name) {
                return Err(ConfigError::Invalid(format!("model name {:?} given twice", m.name)));
            }
        }
        Ok(())
    }

    /// The quota of tenant `name` (`None`: an anonymous connection): its `[tenants.NAME]` table
    /// over the defaults.
    pub fn quota_of(&self, name: Option<&str>) -> TenantQuota {
        match name.and_then(|n| self.tenants.get(n)) {
            Some(o) => o.apply(&self.tenant_defaults),
            None => self.tenant_defaults.clone(),
        }
    }

    /// The models' weight dtype (`dtype`), `None` = as stored.
    pub fn model_dtype(&self) -> Result<Option<djinn_backend::DType>, ConfigError> {
        use djinn_backend::DType;
        Ok(match self.dtype.as_deref() {
            None => None,
            Some("f32" | "float32") => Some(DType::F32),
            Some("f16" | "float16") => Some(DType::F16),
            Some("bf16" | "bfloat16") => Some(DType::BF16),
            Some(other) => return Err(ConfigError::Invalid(format!("dtype {other:?}: expected f32, f16 or bf16"))),
        })
    }

    /// MiB (fractions allowed) to bytes.
    pub fn mib_bytes(mb: f64) -> usize {
        (mb * (1u64 << 20) as f64) as usize
    }

    pub fn wait_mode(&self) -> Result<djinn_transport::WaitMode, ConfigError> {
        match self.wait.as_str() {
            "spin-then-park" | "" => Ok(djinn_transport::WaitMode::SpinThenPark),
            "busy-poll" => Ok(djinn_transport::WaitMode::BusyPoll),
            other => Err(ConfigError::Invalid(format!("wait {other:?}: expected spin-then-park or busy-poll"))),
        }
    }

    /// Transport settings derived from this configuration.
    pub fn transport_options(&self) -> Result<djinn_transport::TransportOptions, ConfigError> {
        let mut o = djinn_transport::TransportOptions { wait: self.wait_mode()?, ..Default::default() };
        o.force_socket = self.force_socket;
        o.shm_data_bytes = self.shm_data_bytes;
        o.limits.frame_bytes_max = self.frame_bytes_max;
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_keys_override_defaults() {
        let c = ServerConfig::from_toml(
            "listen = [\"tcp://127.0.0.1:9\", \"shm://x\"]\nnode_id = \"n1\"\nmax_connections = 3\n",
        )
        .unwrap();
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.node_id, "n1");
        assert_eq!(c.max_connections, 3);
        assert_eq!(c.max_inflight_per_conn, ServerConfig::default().max_inflight_per_conn);
    }

    #[test]
    fn unknown_keys_and_nic_are_refused() {
        assert!(ServerConfig::from_toml("lisen = []").is_err());
        let c = ServerConfig { nic: Some("mlx5_0".into()), ..Default::default() };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("RDMA"), "{e}");
    }

    #[test]
    fn shipped_examples_parse() {
        for text in
            [include_str!("../../../configs/server-cpu.toml"), include_str!("../../../configs/server-tenants.toml")]
        {
            let c = ServerConfig::from_toml(text).unwrap();
            c.validate().unwrap();
        }
    }

    #[test]
    fn session_keys_and_model_flags() {
        let c = ServerConfig::from_toml(
            "kv_capacity_mb = 0.5\nmax_sessions = 8\nsession_lease_s = 2\ndtype = \"bf16\"\n\
             [[models]]\nname = \"tiny\"\ndir = \"/m/tiny\"\n",
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.models, vec![ModelSpec { name: "tiny".into(), dir: "/m/tiny".into() }]);
        assert_eq!((c.kv_capacity_mb, c.max_sessions, c.session_lease_s), (Some(0.5), 8, 2));
        assert_eq!(ServerConfig::mib_bytes(0.5), 512 << 10);
        assert_eq!(ModelSpec::parse_flag("a=/x=y").unwrap().dir, PathBuf::from("/x=y"));
        assert!(ModelSpec::parse_flag("noequals").is_err());
        let dup = ServerConfig { models: vec![c.models[0].clone(), c.models[0].clone()], ..c.clone() };
        assert!(dup.validate().is_err());
        assert!(ServerConfig { kv_capacity_mb: Some(-1.0), ..c.clone() }.validate().is_err());
        assert!(ServerConfig { dtype: Some("f8".into()), ..c }.validate().is_err());
    }

    #[test]
    fn tenant_tables_override_the_defaults() {
        let c = ServerConfig::from_toml(
            "[tenant_defaults]\nsessions_max = 4\nconnections_max = 8\n\
             [tenants.alice]\nsessions_max = 16\nkv_bytes_max = 1024\n",
        )
        .unwrap();
        c.validate().unwrap();
        let (a, b) = (c.quota_of(Some("alice")), c.quota_of(Some("bob")));
        assert_eq!((a.sessions_max, a.kv_bytes_max, a.connections_max), (16, 1024, 8));
        assert_eq!((b.sessions_max, b.connections_max), (4, 8));
        assert_eq!(c.quota_of(None), c.tenant_defaults);
        assert_eq!(b.handles_max, TenantQuota::default().handles_max);
        assert!(ServerConfig::from_toml("[tenants.x]\nsesions_max = 1\n").is_err(), "unknown quota key");
        let zero = ServerConfig::from_toml("[tenants.x]\nhandles_max = 0\n").unwrap();
        assert!(zero.validate().unwrap_err().to_string().contains("tenants.x"));
    }

    #[test]
    fn default_listen_is_loopback_tcp() {
        assert_eq!(ServerConfig::default().listen_urls(), vec![DEFAULT_LISTEN.to_owned()]);
    }
}
