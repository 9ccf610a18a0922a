//! `djinn-dataplane serve`: flags and an optional TOML file (same keys, `-` written `_`) become a
//! [`ServerConfig`]; flags override the file. Picks the backend from `--gpus`, starts the server,
//! and drains on SIGTERM/SIGINT (exit 0).

use std::path::PathBuf;

use anyhow::Context;
use djinn_server::{ModelSpec, Server, ServerConfig};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// TOML file whose keys match these flags (see configs/).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Transport URL to listen on (repeatable): tcp://HOST:PORT, shm://NAME. Default tcp://127.0.0.1:7070.
    #[arg(long)]
    pub listen: Vec<String>,
    /// `cpu`, or CUDA device ordinals (`0` or `0,1`). Default: cpu unless a GPU backend is built in.
    #[arg(long)]
    pub gpus: Option<String>,
    /// RDMA device (not available yet: refused at start-up).
    #[arg(long)]
    pub nic: Option<String>,
    /// Name of this server in logs and metrics.
    #[arg(long)]
    pub node_id: Option<String>,
    /// HOST:PORT serving /healthz and /metrics.
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// File of `TENANT TOKEN` lines; without it every connection is its own tenant.
    #[arg(long)]
    pub auth_token_file: Option<PathBuf>,
    /// Connections served at once.
    #[arg(long)]
    pub max_connections: Option<usize>,
    /// Requests in flight per connection.
    #[arg(long)]
    pub max_inflight_per_conn: Option<usize>,
    /// Tensor handles per tenant.
    #[arg(long)]
    pub handles_max_per_tenant: Option<usize>,
    /// Tensor bytes per tenant.
    #[arg(long)]
    pub tensor_bytes_max_per_tenant: Option<u64>,
    /// Tensor bytes over all tenants.
    #[arg(long)]
    pub tensor_bytes_max: Option<u64>,
    /// Nodes in one Exec graph.
    #[arg(long)]
    pub exec_nodes_max: Option<usize>,
    /// Largest frame accepted, bytes (default admits 64 MiB payloads).
    #[arg(long)]
    pub frame_bytes_max: Option<u64>,
    /// spin-then-park (default) or busy-poll.
    #[arg(long)]
    pub wait: Option<String>,
    /// TCP: plain sockets even where io_uring works.
    #[arg(long)]
    pub force_socket: bool,
    /// SHM: data-area bytes per direction of each client's region.
    #[arg(long)]
    pub shm_data_bytes: Option<usize>,
    /// Staging bytes connections may keep between large requests, over all connections.
    #[arg(long)]
    pub staging_bytes_retained_max: Option<u64>,
    /// Milliseconds SIGTERM waits for in-flight requests.
    #[arg(long)]
    pub drain_timeout_ms: Option<u64>,
    /// Milliseconds a new connection has to complete its Hello before it is closed.
    #[arg(long)]
    pub handshake_timeout_ms: Option<u64>,
    /// Models and sessions (boxed: these flags would make every CLI command's arguments large).
    #[command(flatten)]
    pub sessions: Box<SessionArgs>,
}

/// `serve` flags of the models and their sessions.
#[derive(clap::Args, Debug)]
pub struct SessionArgs {
    /// A model to serve sessions on: NAME=DIR (a Hugging Face directory or a .gguf file);
    /// repeatable. Every model is loaded before the server listens. A GGUF's quantized tensors
    /// stay quantized on the CPU backend; on CUDA they are dequantized to the model dtype at load
    /// (no quantized CUDA kernels yet).
    #[arg(long = "model", value_name = "NAME=DIR")]
    pub models: Vec<String>,
    /// KV cache capacity per model, MiB (fractions allowed); idle sessions swap to host memory.
    #[arg(long)]
    pub kv_capacity_mb: Option<f64>,
    /// Pinned host memory per model for swapped-out sessions, MiB.
    #[arg(long)]
    pub host_swap_mb: Option<f64>,
    /// Sessions open at once (over all models and tenants).
    #[arg(long)]
    pub max_sessions: Option<usize>,
    /// Seconds a session outlives its last connection.
    #[arg(long)]
    pub session_lease_s: Option<u64>,
    /// Weight dtype of the models: f32, f16 or bf16 (default: as stored).
    #[arg(long)]
    pub dtype: Option<String>,
    /// CPU backend worker threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Longest session in tokens (default: each model's maximum).
    #[arg(long)]
    pub max_context_tokens: Option<usize>,
    /// New tokens per engine step over all sessions (the prefill chunk).
    #[arg(long)]
    pub max_step_tokens: Option<usize>,
}

impl Args {
    /// The file's configuration (or defaults) with every given flag applied on top.
    pub fn to_config(&self) -> anyhow::Result<ServerConfig> {
        let mut c = match &self.config {
            Some(p) => ServerConfig::from_file(p)?,
            None => ServerConfig::default(),
        };
        if !self.listen.is_empty() {
            c.listen = self.listen.clone();
        }
        macro_rules! over {
            ($($f:ident),*) => { $( if let Some(v) = &self.$f { c.$f = v.clone().into(); } )* };
        }
        over!(gpus, node_id, max_connections, max_inflight_per_conn, handles_max_per_tenant);
        over!(tensor_bytes_max_per_tenant, tensor_bytes_max, exec_nodes_max, frame_bytes_max, wait);
        over!(shm_data_bytes, drain_timeout_ms, nic, metrics_listen, auth_token_file, staging_bytes_retained_max);
        over!(handshake_timeout_ms);
        let s = &*self.sessions;
        macro_rules! over_s {
            ($($f:ident),*) => { $( if let Some(v) = &s.$f { c.$f = v.clone().into(); } )* };
        }
        over_s!(max_sessions, session_lease_s, max_step_tokens);
        over_s!(kv_capacity_mb, host_swap_mb, dtype, threads, max_context_tokens);
        if !s.models.is_empty() {
            c.models = s.models.iter().map(|m| ModelSpec::parse_flag(m)).collect::<Result<_, _>>()?;
        }
        if self.force_socket {
            c.force_socket = true;
        }
        Ok(c)
    }
}

/// Which backend `--gpus` asks for.
enum Device {
    Cpu,
    Cuda(Vec<usize>),
}

fn parse_gpus(s: &str) -> anyhow::Result<Device> {
    match s.trim() {
        "" | "cpu" => Ok(Device::Cpu),
        list => {
            let ords = list
                .split(',')
                .map(|p| p.trim().parse::<usize>().with_context(|| format!("--gpus {list:?}: expected cpu or 0,1,...")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok(Device::Cuda(ords))
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let cfg = args.to_config()?;
    cfg.validate()?;
    match parse_gpus(&cfg.gpus)? {
        Device::Cpu if cfg.gpus.trim().is_empty() => serve_default(cfg),
        Device::Cpu => {
            let be = cpu_backend(cfg.threads)?;
            serve(cfg, be)
        }
        Device::Cuda(ords) => serve_cuda(cfg, &ords),
    }
}

fn cpu_backend(threads: Option<usize>) -> anyhow::Result<djinn_backend::cpu::CpuBackend> {
    match threads {
        Some(n) => djinn_backend::cpu::CpuBackend::with_threads(n),
        None => djinn_backend::cpu::CpuBackend::new(),
    }
    .context("starting the CPU backend")
}

/// No `--gpus`: GPU 0 when this build has CUDA and the machine a GPU, else the CPU.
#[cfg(feature = "cuda")]
fn serve_default(cfg: ServerConfig) -> anyhow::Result<()> {
    match djinn_dataplane::cuda_backend(0) {
        Ok(b) => serve(cfg, b),
        Err(e) => {
            tracing::info!(reason = %e, "no usable GPU: serving on the CPU backend");
            let be = cpu_backend(cfg.threads)?;
            serve(cfg, be)
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn serve_default(cfg: ServerConfig) -> anyhow::Result<()> {
    let be = cpu_backend(cfg.threads)?;
    serve(cfg, be)
}

fn one_device(ords: &[usize]) -> anyhow::Result<usize> {
    match ords {
        [one] => Ok(*one),
        _ => anyhow::bail!("--gpus {ords:?}: one device per server for now (multi-GPU serving is a later issue)"),
    }
}

#[cfg(feature = "cuda")]
fn serve_cuda(cfg: ServerConfig, ords: &[usize]) -> anyhow::Result<()> {
    let ord = one_device(ords)?;
    let backend = djinn_dataplane::cuda_backend(ord).with_context(|| format!("opening GPU {ord}"))?;
    serve(cfg, backend)
}

#[cfg(not(feature = "cuda"))]
fn serve_cuda(_cfg: ServerConfig, ords: &[usize]) -> anyhow::Result<()> {
    let ord = one_device(ords)?;
    anyhow::bail!("--gpus {ord}: this build has no CUDA backend (built without the `cuda` feature); use --gpus cpu")
}

fn serve<B: djinn_backend::Backend>(cfg: ServerConfig, backend: B) -> anyhow::Result<()> {
    let server = Server::start(cfg, backend)?;
    for url in server.urls() {
        // One line per listener on stdout, so scripts and tests can find resolved ports.
        println!("listening {url}");
    }
    if let Some(a) = server.metrics_addr() {
        println!("metrics http://{a}");
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    server.run_until_signal()?;
    Ok(())
}
