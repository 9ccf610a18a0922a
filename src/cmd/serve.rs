//! `djinn-dataplane serve`: defaults, an optional TOML file, `DJINN_*` variables and flags
//! become a [`ServerConfig`] (the settings are declared once, in `djinn_server::config`). Picks
//! the backend from `--gpus`, starts the server, and drains on SIGTERM/SIGINT (exit 0).

use std::path::PathBuf;

use anyhow::Context;
use djinn_server::{Server, ServerConfig, ServerConfigLayer};

use super::device::{self, Device};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// TOML file whose keys are these flags' names with `-` written `_` (see configs/); flags and
    /// DJINN_* variables override it; relative paths in it resolve against its folder.
    #[arg(long, env = "DJINN_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Every setting of the server (boxed: the layer is large for every CLI command's arguments).
    #[command(flatten)]
    pub settings: Box<ServerConfigLayer>,
}

impl Args {
    /// Defaults < the file < DJINN_* variables < flags.
    pub fn to_config(&self) -> anyhow::Result<ServerConfig> {
        Ok(ServerConfig::load(self.config.as_deref(), (*self.settings).clone())?)
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let cfg = args.to_config()?;
    cfg.validate()?;
    match device::parse(Some(&cfg.gpus))? {
        Device::Auto => serve_default(cfg),
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
            device::log_cpu_fallback(&e);
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

#[cfg(feature = "cuda")]
fn serve_cuda(cfg: ServerConfig, ords: &[usize]) -> anyhow::Result<()> {
    let ord = device::one_device(ords)?;
    let backend = djinn_dataplane::cuda_backend(ord).with_context(|| format!("opening GPU {ord}"))?;
    serve(cfg, backend)
}

#[cfg(not(feature = "cuda"))]
fn serve_cuda(_cfg: ServerConfig, ords: &[usize]) -> anyhow::Result<()> {
    let ord = device::one_device(ords)?;
    anyhow::bail!("--gpus {ord}: this build has no CUDA backend (built without the `cuda` feature); use --gpus cpu")
}

fn serve<B: djinn_backend::Backend>(cfg: ServerConfig, backend: B) -> anyhow::Result<()> {
    let server = Server::start(cfg, backend)?;
    for url in server.urls() {
        // One line per listener on stdout, so scripts and tests can find resolved ports.
        println!("listening {url}");
    }
    if let Some(a) = server.http_api_addr() {
        println!("http-api http://{a}");
    }
    if let Some(a) = server.metrics_addr() {
        println!("metrics http://{a}");
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    server.run_until_signal()?;
    Ok(())
}
