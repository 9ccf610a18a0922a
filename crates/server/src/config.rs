//! Server configuration: the one list of the server's settings (the [`crate::settings!`] call
//! below; the mechanism is in `settings.rs`). Each setting is a field of [`ServerConfig`], a TOML
//! key of the same name, a `serve` flag (`_` written `-`) and a `DJINN_NAME` environment
//! variable. Layers: defaults < config file < environment < flags.
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
            _ => Err(ConfigError::Invalid(
                "write NAME=DIR, e.g. smollm2=models/smollm2-135m-instruct (DIR: a model directory or a .gguf file)"
                    .to_owned(),
            )),
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

crate::settings! {
    /// Transport URL to listen on (repeatable): tcp://HOST:PORT, shm://NAME, rdma://ADDR:PORT (ADDR an
    /// address of the RDMA device's interface).
    listen: Vec<String> = vec![DEFAULT_LISTEN.to_owned()], value = "URL";
    /// `cpu`, or CUDA device ordinals (`0`, `0,1`). Empty: GPU 0 when this build has CUDA and the
    /// machine a GPU, else the CPU.
    gpus: String = String::new(), value = "cpu|0";
    /// RDMA device for the rdma:// listeners (e.g. mlx5_0). Default: the device that owns ADDR.
    nic: Option<String> = None, value = "DEVICE";
    /// Name of this server in logs, metrics and the capabilities reply.
    node_id: String = "djinn-0".into(), value = "NAME";
    /// HOST:PORT serving /healthz and /metrics; without it there is no HTTP endpoint.
    metrics_listen: Option<String> = None, value = "HOST:PORT";
    /// File of `TENANT TOKEN` lines; without it every connection is its own tenant.
    auth_token_file: Option<PathBuf> = None;
    /// Connections served at once; further connections are refused with `Busy`.
    max_connections: usize = 256;
    /// Requests one connection may have in flight at once; more are refused with `Busy`.
    max_inflight_per_conn: usize = 64;
    /// Tensor handles one tenant may hold at once: sets `[tenant_defaults] handles_max`.
    handles_max_per_tenant: Option<usize> = None, value = "N";
    /// Tensor bytes one tenant may hold at once: sets `[tenant_defaults] tensor_bytes_max`.
    tensor_bytes_max_per_tenant: Option<u64> = None, value = "BYTES";
    /// Tensor bytes all tenants together may hold at once.
    tensor_bytes_max: u64 = 8 << 30;
    /// Nodes in one Exec graph.
    exec_nodes_max: usize = 256;
    /// Largest frame accepted, bytes (header + metadata + data); the default admits a 64 MiB payload.
    frame_bytes_max: u64 = djinn_proto::Limits::default().frame_bytes_max;
    /// How idle connections wait: `spin-then-park` (no CPU when idle) or `busy-poll` (lowest latency).
    wait: String = "spin-then-park".into(), value = "MODE";
    /// TCP: plain sockets (the default: small messages, what a decode step sends, measured 0.76-0.80x
    /// io_uring's round-trip time); `--force-socket=false` uses io_uring where it works.
    force_socket: bool = true;
    /// SHM: data-area bytes per direction of each client's region.
    shm_data_bytes: usize = djinn_transport::TransportOptions::default().shm_data_bytes;
    /// Bytes of the staging pool, allocated at start-up, through which bulk data that cannot
    /// land in its destination (a ping's echo, puts and gets of device memory) moves in pieces.
    staging_pool_bytes: u64 = 256 << 20, value = "BYTES";
    /// Staging bytes one connection may hold at once (a ping's echo is held whole).
    staging_bytes_max_per_conn: u64 = djinn_proto::Limits::default().frame_bytes_max, value = "BYTES";
    /// Staging bytes one tenant's connections may hold at once.
    staging_bytes_max_per_tenant: u64 = 128 << 20, value = "BYTES";
    /// Milliseconds a frame's bulk data may take to arrive once its header has; then the
    /// connection is closed (a header announcing data that never comes holds nothing longer).
    frame_data_timeout_ms: u64 = 10_000;
    /// Milliseconds a connection that said Hello may stay without a request and without work in
    /// flight (a streaming decode counts as work); then it is closed.
    conn_idle_timeout_ms: u64 = 600_000;
    /// Connections still without a successful Hello, at once; a new connection beyond it closes
    /// the oldest of them, so a flood of silent connections cannot lock legitimate clients out.
    handshakes_pending_max: usize = 64;
    /// With `wait = "busy-poll"`: microseconds a connection keeps busy-polling for its next
    /// request after its last one ended; then it parks, so idle connections burn no CPU.
    busy_poll_linger_us: u64 = 2_000;
    /// HTTP connections the `/healthz` + `/metrics` endpoint holds at once (one thread serves
    /// them all); a new one beyond it closes the oldest, so idle clients cannot starve a probe.
    http_conns_max: usize = 64;
    /// Milliseconds an HTTP connection may take to send its request.
    http_request_timeout_ms: u64 = 2_000;
    /// Milliseconds SIGTERM waits for in-flight requests before the process exits anyway.
    drain_timeout_ms: u64 = 5_000;
    /// Milliseconds a new connection has to complete its Hello; then it is closed, so silent
    /// clients cannot hold connection slots.
    handshake_timeout_ms: u64 = 5_000;
    /// A model to serve sessions on: NAME=DIR (a Hugging Face directory or a .gguf file);
    /// repeatable; every model is loaded before the server listens. In a file: `[[models]]`
    /// tables with `name` and `dir`. A GGUF's quantized tensors stay quantized on the CPU backend;
    /// on CUDA they are dequantized to the model dtype at load (no quantized CUDA kernels yet).
    models: Vec<ModelSpec> = Vec::new(), flag = "model";
    /// KV cache capacity per model, MiB (fractions allowed); idle sessions swap to host memory.
    /// Default: every session at full length, at most 512 MiB.
    kv_capacity_mb: Option<f64> = None, value = "MIB";
    /// Pinned host memory per model for swapped-out sessions, MiB. Default: room for every session.
    host_swap_mb: Option<f64> = None, value = "MIB";
    /// Sessions open at once over all models and tenants; more are refused with `LimitExceeded`.
    max_sessions: usize = 64;
    /// Seconds a session outlives the last connection attached to it (then it is closed).
    session_lease_s: u64 = 300;
    /// Dtype the models compute in: f32, f16, bf16, or `stored` (as in the checkpoint). Default:
    /// the fastest faithful path, as `generate`'s: bf16 for an f32 safetensors directory (decode
    /// 1.57x f32 on SmolLM2-135M, same greedy text, measured), as stored otherwise (a GGUF keeps
    /// its quantized blocks on the CPU). Give `f32` to match an f32 reference bit for bit.
    dtype: Option<String> = None, value = "DTYPE";
    /// CPU backend worker threads. Default: every core.
    threads: Option<usize> = None;
    /// Longest session, tokens. Default: each model's `max_position_embeddings`.
    max_context_tokens: Option<usize> = None;
    /// New tokens in one engine step over all sessions (bounds a prefill chunk).
    max_step_tokens: usize = 256;
    /// Session requests waiting for the engine loop; more are refused with `Busy`.
    session_queue_max: usize = 1024;
    /// Session frames (tokens, replies) one connection may have queued for its writer. When a
    /// connection's queue is full its sessions are not stepped (paused, KV kept and swappable)
    /// until the client reads: a slow reader slows only itself, and the engine never blocks.
    conn_outbound_frames_max: usize = 64;
    /// Milliseconds a connection's outbound queue may stay full with no frame sent before the
    /// connection is closed (its sessions keep their lease and can be attached again).
    conn_stall_timeout_ms: u64 = 10_000;
    /// Quotas of every tenant not named in `tenants` (and of each anonymous connection); config
    /// file only: a `[tenant_defaults]` table.
    tenant_defaults: TenantQuota = TenantQuota::default();
    /// Per-tenant overrides of `tenant_defaults`, by tenant name; config file only:
    /// `[tenants.NAME]` tables.
    tenants: BTreeMap<String, TenantOverride> = BTreeMap::new();
    /// Backend handles Exec requests run on, one per request for its whole run (on a GPU each is
    /// a stream with its own 32 MiB workspace; the engine has its own). More concurrent Execs wait.
    exec_streams: usize = 4;
    /// Milliseconds a session may stay paused at a breakpoint without a resume; then its request
    /// ends `Cancelled` and the session is as it was before the request.
    breakpoint_lease_ms: u64 = 60_000;
    /// Step scheduler: `qos` (decode first, prompts fed in chunks between decode steps, classes
    /// realtime > interactive > batch with minimum shares) or `fcfs` (first come first served
    /// over `max_step_tokens`, the baseline).
    scheduler: String = "qos".to_owned(), value = "qos|fcfs";
    /// qos: prompt tokens one step feeds over all sessions, after its decodes (keeps a step short
    /// so decodes and new prompts are not held behind a long prompt).
    prefill_chunk_tokens: usize = 32;
    /// qos: tokens of a step that seats realtime work (decodes and prompt tokens over all
    /// classes), so realtime's time per token stays near its unloaded value.
    qos_realtime_step_tokens: usize = 4;
    /// qos: minimum share of each step's tokens kept for realtime work while it has any.
    qos_share_realtime: f64 = 0.3;
    /// qos: minimum share of each step's tokens kept for interactive work while it has any.
    qos_share_interactive: f64 = 0.5;
    /// qos: minimum share of each step's tokens kept for batch (and background) work.
    qos_share_batch: f64 = 0.2;
    /// qos: sessions of one class seated in a step while another class waits; 0 = floor(share ×
    /// max_sessions). One value per class: realtime, interactive, batch.
    qos_max_sessions: Vec<usize> = Vec::new(), value = "N";
    /// qos: milliseconds a request waits unseated before it is promoted one class.
    qos_escalation_ms: u64 = 800;
    /// HOST:PORT of the OpenAI-compatible HTTP API (/v1/models, /v1/completions,
    /// /v1/chat/completions, /healthz); without it there is none.
    http_listen: Option<String> = None, value = "HOST:PORT";
    /// HTTP API connections held at once (one thread serves them all); a new one beyond it closes
    /// the oldest idle one, or is answered 429 when every one is serving a request.
    http_api_conns_max: usize = 256;
    /// HTTP API requests served at once over all clients; more are answered 429.
    http_api_requests_max: usize = 64;
    /// Largest HTTP API request body, bytes; larger ones are answered 413.
    http_api_body_bytes_max: usize = 1 << 20, value = "BYTES";
    /// Milliseconds an HTTP API connection may take to send a request, and may stay idle between
    /// requests; then it is closed.
    http_api_timeout_ms: u64 = 30_000;
    /// SO_SNDBUF of each HTTP API connection, bytes (0 = the kernel's autotuned size, which grows
    /// to megabytes): bounds what a client that stops reading holds in the kernel, so its stream
    /// backs up into its own outbound queue and its session pauses soon.
    http_api_sndbuf_bytes: usize = 64 << 10, value = "BYTES";
    /// RDMA connections held at once per `rdma://` listener (each holds two QPs, CQs and its
    /// rings' registrations); a client beyond it is answered Busy at the rendezvous.
    rdma_connections_max: usize = 256;
    /// Threads that tokenize requests' text and chat turns off the engine loop.
    tokenize_workers: usize = 1;
    /// Tokenization jobs waiting for those threads; more are refused `Busy`.
    tokenize_queue_max: usize = 64;
    /// Breakpoint passes one batched part runs at most (passes at the same layer run together;
    /// 1 runs each alone, the unbatched baseline `bench breakpoints` compares against).
    breakpoint_part_passes_max: usize = 64;
    /// Milliseconds an Exec waits for a free lane (`exec_streams`) when every one is running
    /// another Exec; then it is answered `Busy`, so a connection never waits on others' work
    /// without limit.
    exec_lane_wait_ms: u64 = 2_000;
    /// Bytes one connection's client may leave unread — its outbound queue plus what the
    /// transport holds (the shm ring's fill, the tcp send queue) — before its sessions pause as
    /// at `conn_outbound_frames_max`: bounds the work a client that asks for full logits and
    /// stops reading gets (its large frames fit in the transport, so its frame count never rises).
    conn_outbound_bytes_max: u64 = 2 << 20, value = "BYTES";
    /// qos: a prompt fed while nothing else has work takes chunks larger than
    /// `prefill_chunk_tokens` (up to `max_step_tokens`), sized by the measured prefill rate so a
    /// step takes about this many milliseconds (what a request arriving meanwhile waits at most
    /// for that step); 0 = always `prefill_chunk_tokens`.
    prefill_alone_step_ms: u64 = 20;
    /// Milliseconds a connection may hold at least 64 KiB its client has not read (counted as
    /// for `conn_outbound_bytes_max`) without reading any of it; then its sessions pause until it
    /// reads (0 = only the byte and frame marks): a client that stops reading stops costing
    /// engine work within this time, well before 2 MiB of large frames pile up.
    conn_unread_pause_ms: u64 = 50;
    /// A connection thread that queues a session request while the engine loop is parked runs
    /// that turn of the loop itself (one step at most; the engine thread takes over whatever is
    /// left), so a lone request's answer costs no thread wake-up. false: the engine thread runs
    /// every turn.
    engine_inline_turns: bool = true;
}

/// A `[tenant_defaults]` table: file only, no flag.
impl crate::settings::Setting for TenantQuota {
    const FLAG: bool = false;
}

/// `[tenants.NAME]` tables: file only, no flag.
impl crate::settings::Setting for BTreeMap<String, TenantOverride> {
    const FLAG: bool = false;
}

/// `--model NAME=DIR`, and `[[models]]` tables in a file.
impl crate::settings::Scalar for ModelSpec {
    const VALUE_NAME: &'static str = "NAME=DIR";
    fn parser() -> clap::builder::ValueParser {
        // The flag's name is already in clap's message: only the reason.
        clap::builder::ValueParser::new(|s: &str| {
            ModelSpec::parse_flag(s).map_err(|e| match e {
                ConfigError::Invalid(why) => why,
                other => other.to_string(),
            })
        })
    }
    fn show(&self) -> String {
        format!("{}={}", self.name, self.dir.display())
    }
    fn resolve(&mut self, base: &Path) {
        crate::settings::Scalar::resolve(&mut self.dir, base);
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

/// The `dtype` setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelDtype {
    /// No setting: per model, [`djinn_model::fast_dtype`].
    Fast,
    /// As in the checkpoint.
    Stored,
    Cast(djinn_backend::DType),
}

impl ModelDtype {
    /// The load dtype for the checkpoint at `path` (`None` = as stored).
    pub fn for_model(self, path: &std::path::Path, ck: &djinn_model::Checkpoint) -> Option<djinn_backend::DType> {
        match self {
            ModelDtype::Fast => djinn_model::fast_dtype(path, ck),
            ModelDtype::Stored => None,
            ModelDtype::Cast(d) => Some(d),
        }
    }
}

impl ServerConfig {
    /// Defaults, then the file `path` (if any), then `over` (the environment and the flags).
    pub fn load(path: Option<&Path>, over: ServerConfigLayer) -> Result<Self, ConfigError> {
        let mut c = match path {
            Some(p) => Self::from_file(p)?,
            None => ServerConfig::default(),
        };
        over.apply(&mut c);
        c.fold_tenant_flags();
        Ok(c)
    }

    /// `handles_max_per_tenant` / `tensor_bytes_max_per_tenant` (flags, variables or keys) set
    /// the `[tenant_defaults]` they name.
    fn fold_tenant_flags(&mut self) {
        if let Some(v) = self.handles_max_per_tenant {
            self.tenant_defaults.handles_max = v;
        }
        if let Some(v) = self.tensor_bytes_max_per_tenant {
            self.tenant_defaults.tensor_bytes_max = v;
        }
    }

    /// Reads a TOML file; keys missing from it keep their defaults, unknown keys are an error,
    /// relative paths in it resolve against its folder.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let mut layer = Self::layer_from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse { path: path.to_owned(), source },
            other => other,
        })?;
        layer.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        let mut c = ServerConfig::default();
        layer.apply(&mut c);
        c.fold_tenant_flags();
        Ok(c)
    }

    /// A TOML text over the defaults (paths as written).
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let mut c = ServerConfig::default();
        Self::layer_from_toml(text)?.apply(&mut c);
        c.fold_tenant_flags();
        Ok(c)
    }

    fn layer_from_toml(text: &str) -> Result<ServerConfigLayer, ConfigError> {
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
            ("conn_outbound_frames_max", self.conn_outbound_frames_max as u64),
            ("conn_stall_timeout_ms", self.conn_stall_timeout_ms),
            ("exec_streams", self.exec_streams as u64),
            ("breakpoint_lease_ms", self.breakpoint_lease_ms),
            ("breakpoint_part_passes_max", self.breakpoint_part_passes_max as u64),
            ("exec_lane_wait_ms", self.exec_lane_wait_ms),
            ("conn_outbound_bytes_max", self.conn_outbound_bytes_max),
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
            self.model_dtype()
                .map_err(|_| ConfigError::Invalid(format!("dtype {d:?}: expected f32, f16, bf16 or stored")))?;
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

    /// What the models compute in (`dtype`).
    pub fn model_dtype(&self) -> Result<ModelDtype, ConfigError> {
        use djinn_backend::DType;
        Ok(match self.dtype.as_deref() {
            None => ModelDtype::Fast,
            Some("stored") => ModelDtype::Stored,
            Some("f32" | "float32") => ModelDtype::Cast(DType::F32),
            Some("f16" | "float16") => ModelDtype::Cast(DType::F16),
            Some("bf16" | "bfloat16") => ModelDtype::Cast(DType::BF16),
            Some(other) => {
                return Err(ConfigError::Invalid(format!("dtype {other:?}: expected f32, f16, bf16 or stored")))
            }
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
        o.rdma_connections_max = self.rdma_connections_max;
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

    /// The flags and DJINN_* variables of the settings, parsed as `serve` parses them.
    fn cli_layer(args: &[&str]) -> ServerConfigLayer {
        use clap::{Args, FromArgMatches};
        let cmd = ServerConfigLayer::augment_args(clap::Command::new("serve"));
        let m = cmd.try_get_matches_from(std::iter::once("serve").chain(args.iter().copied())).unwrap();
        ServerConfigLayer::from_arg_matches(&m).unwrap()
    }

    #[test]
    fn layers_defaults_file_env_flags() {
        let dir = std::env::temp_dir().join(format!("djinn-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("server.toml");
        std::fs::write(
            &file,
            "max_sessions = 3\nsession_lease_s = 7\nmax_step_tokens = 9\nauth_token_file = \"tokens\"\n\
             [[models]]\nname = \"m\"\ndir = \"weights/m\"\n",
        )
        .unwrap();
        // Only this test reads these two variables.
        std::env::set_var("DJINN_SESSION_LEASE_S", "11");
        std::env::set_var("DJINN_MAX_STEP_TOKENS", "12");
        let c = ServerConfig::load(Some(&file), cli_layer(&["--max-step-tokens", "13", "--session-queue-max", "5"]))
            .unwrap();
        std::env::remove_var("DJINN_SESSION_LEASE_S");
        std::env::remove_var("DJINN_MAX_STEP_TOKENS");
        assert_eq!(c.max_sessions, 3, "file over default");
        assert_eq!(c.session_lease_s, 11, "environment over file");
        assert_eq!(c.max_step_tokens, 13, "flag over environment");
        assert_eq!(c.session_queue_max, 5, "every setting is a flag");
        assert_eq!(c.max_connections, ServerConfig::default().max_connections);
        // Paths in the file resolve against its folder; on the command line, as given.
        assert_eq!(c.auth_token_file.as_deref(), Some(dir.join("tokens").as_path()));
        assert_eq!(c.models[0].dir, dir.join("weights/m"));
        let c = ServerConfig::load(Some(&file), cli_layer(&["--model", "x=rel/x", "--force-socket"])).unwrap();
        assert_eq!(c.models, vec![ModelSpec { name: "x".into(), dir: "rel/x".into() }]);
        assert!(c.force_socket);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn help_shows_defaults_and_variables() {
        use clap::Args;
        let help = ServerConfigLayer::augment_args(clap::Command::new("serve")).render_long_help().to_string();
        for want in ["--session-queue-max <N>", "[default: 1024]", "DJINN_SESSION_QUEUE_MAX", "--model <NAME=DIR>"] {
            assert!(help.contains(want), "{want} missing from:\n{help}");
        }
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
    fn tenant_flags_set_the_defaults_and_tables_are_file_only() {
        let c = ServerConfig::load(None, cli_layer(&["--handles-max-per-tenant", "5"])).unwrap();
        assert_eq!(c.tenant_defaults.handles_max, 5);
        use clap::Args;
        let help = ServerConfigLayer::augment_args(clap::Command::new("serve")).render_long_help().to_string();
        assert!(!help.contains("--tenant-defaults") && !help.contains("--tenants"), "{help}");
    }

    #[test]
    fn default_listen_is_loopback_tcp() {
        assert_eq!(ServerConfig::default().listen_urls(), vec![DEFAULT_LISTEN.to_owned()]);
    }
}
