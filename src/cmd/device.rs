//! Which device a command computes on: `serve`, `generate` and `logits` read `--gpus` the same
//! way. Unset or empty: GPU 0 when this build has CUDA and a GPU answers, else the CPU (logged).

use anyhow::{bail, Context};

/// What `--gpus` asks for.
pub enum Device {
    /// No `--gpus`: GPU 0 if one answers, else the CPU.
    Auto,
    Cpu,
    Cuda(Vec<usize>),
}

pub fn parse(gpus: Option<&str>) -> anyhow::Result<Device> {
    match gpus.map(str::trim) {
        None | Some("") => Ok(Device::Auto),
        Some("cpu") => Ok(Device::Cpu),
        Some(list) => {
            let ords = list
                .split(',')
                .map(|p| {
                    p.trim()
                        .parse::<usize>()
                        .with_context(|| format!("--gpus {list:?}: write cpu, or GPU ordinals like 0 or 0,1"))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            Ok(Device::Cuda(ords))
        }
    }
}

/// The one GPU a process drives (several are a later issue).
pub fn one_device(ords: &[usize]) -> anyhow::Result<usize> {
    match ords {
        [one] => Ok(*one),
        _ => bail!(
            "--gpus {ords:?}: one device per process for now (multi-GPU serving is a later issue); give one ordinal"
        ),
    }
}

/// Logs why `Auto` fell back to the CPU.
pub fn log_cpu_fallback(reason: &dyn std::fmt::Display) {
    tracing::info!(%reason, "no usable GPU: computing on the CPU (give --gpus cpu to skip the probe)");
}
