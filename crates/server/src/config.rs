//! Server configuration: one struct read from an optional TOML file whose keys are exactly the
//! long names of the `serve` flags (with `-` written `_`); command-line flags override the file.
//!
//! Invariant: every bound the server enforces (connections, in-flight requests, handles, bytes)
//! is a named field here, fixed at start-up; nothing grows past it at run time.

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
    /// Tensor handles one tenant may hold at once.
    pub handles_max_per_tenant: usize,
    /// Tensor bytes one tenant may hold at once.
    pub tensor_bytes_max_per_tenant: u64,
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
    /// Staging bytes (for large pings, puts and gets) that connections may keep between requests,
    /// over all connections; beyond it a connection frees its large buffer after each request.
    pub staging_bytes_retained_max: u64,
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
            handles_max_per_tenant: 4096,
            tensor_bytes_max_per_tenant: 2 << 30,
            tensor_bytes_max: 8 << 30,
            exec_nodes_max: 256,
            frame_bytes_max: limits.frame_bytes_max,
            wait: "spin-then-park".into(),
            force_socket: false,
            shm_data_bytes: djinn_transport::TransportOptions::default().shm_data_bytes,
            staging_bytes_retained_max: 512 << 20,
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
        self.validate_nic()?;
        let positive = [
            ("max_connections", self.max_connections as u64),
            ("max_inflight_per_conn", self.max_inflight_per_conn as u64),
            ("handles_max_per_tenant", self.handles_max_per_tenant as u64),
            ("exec_nodes_max", self.exec_nodes_max as u64),
            ("tensor_bytes_max_per_tenant", self.tensor_bytes_max_per_tenant),
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

    /// `--nic` needs an `rdma://` listener; an `rdma://` listener needs a build with RDMA, and
    /// its port may not double as a `tcp://` listener's on the same address (the rdma endpoint
    /// exchange runs over TCP). Device existence is checked when the listener opens it.
    fn validate_nic(&self) -> Result<(), ConfigError> {
        let urls = self.listen_urls();
        let rdma: Vec<&str> = urls.iter().filter_map(|u| u.strip_prefix("rdma://")).collect();
        if let Some(nic) = &self.nic {
            if rdma.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "--nic {nic} without an rdma listener: add --listen rdma://ADDR:PORT (ADDR an address of {nic}'s interface)"
                )));
            }
        }
        if !rdma.is_empty() && !djinn_transport::RDMA_BUILT {
            return Err(ConfigError::Invalid(
                "--listen rdma://: this build has no RDMA support; build with `--features rdma` (needs libibverbs)"
                    .into(),
            ));
        }
        // Port 0 (the kernel picks) cannot collide.
        for addr in rdma.iter().filter(|a| !a.ends_with(":0")) {
            if urls.iter().any(|u| u.strip_prefix("tcp://") == Some(*addr)) {
                return Err(ConfigError::Invalid(format!(
                    "rdma://{addr} and tcp://{addr} share a port: the rdma endpoint exchange runs over TCP; pick another port"
                )));
            }
        }
        Ok(())
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
        o.rdma_device = self.nic.clone();
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
        assert!(e.contains("--listen rdma://"), "{e}");
        let both = ServerConfig {
            listen: vec!["tcp://127.0.0.1:7070".into(), "rdma://127.0.0.1:7070".into()],
            ..Default::default()
        };
        assert!(both.validate().is_err());
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
    fn default_listen_is_loopback_tcp() {
        assert_eq!(ServerConfig::default().listen_urls(), vec![DEFAULT_LISTEN.to_owned()]);
    }
}
