//! Kernel images handed in by the binary (built by the root `build.rs`) and their loading.
//!
//! Per module, the loader takes the first that works: the cubin for the device's exact
//! architecture, the PTX (JIT-compiled by the driver for any newer GPU), the embedded CUDA
//! source compiled by NVRTC at run time (only when the build had no compiler). Modules load
//! once at start-up; functions are resolved on first use and cached by their static name.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{sys, CudaContext, CudaModule};
use cudarc::nvrtc::Ptx;

use crate::error::{BackendError, Result};

/// One `kernels/<name>.cu` module in every form the build produced.
#[derive(Debug)]
pub struct KernelModule {
    pub name: &'static str,
    /// Self-contained CUDA C++ (headers inlined): the runtime NVRTC fallback.
    pub source: &'static str,
    /// PTX for `compute_80`, when the build had a compiler.
    pub ptx: Option<&'static str>,
    /// `(sm, cubin)` pairs, e.g. `(90, …)` for H100.
    pub cubins: &'static [(u32, &'static [u8])],
}

/// Every kernel module of the build.
#[derive(Debug)]
pub struct KernelSet {
    /// What compiled the images ("nvrtc 12.9 (…)", "nvcc (…)", or runtime NVRTC).
    pub compiler: &'static str,
    pub modules: &'static [KernelModule],
}

impl KernelSet {
    /// Total bytes of embedded images (PTX + cubins + sources), for reports.
    pub fn image_bytes(&self) -> usize {
        self.modules
            .iter()
            .map(|m| m.source.len() + m.ptx.map_or(0, str::len) + m.cubins.iter().map(|c| c.1.len()).sum::<usize>())
            .sum()
    }
}

/// How a module ended up loaded (reported by [`crate::cuda::CudaBackend::kernel_origins`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelOrigin {
    Cubin(u32),
    Ptx,
    RuntimeNvrtc,
}

/// A resolved kernel entry point. The module it came from stays loaded for the life of the
/// [`Kernels`] that handed it out.
#[derive(Clone, Copy)]
pub(crate) struct Func(pub(crate) sys::CUfunction);

// SAFETY: a CUfunction is an immutable driver handle, valid from any thread with the owning
// context current; the module it belongs to outlives it (held by `Kernels`).
unsafe impl Send for Func {}
// SAFETY: as above; launching the same function concurrently from several threads is allowed.
unsafe impl Sync for Func {}

pub(crate) struct Kernels {
    modules: Vec<(&'static str, Arc<CudaModule>, KernelOrigin)>,
    cache: Mutex<HashMap<&'static str, Func>>,
}

impl Kernels {
    pub(crate) fn load(ctx: &Arc<CudaContext>, set: &KernelSet, arch: u32) -> Result<Kernels> {
        let mut modules = Vec::with_capacity(set.modules.len());
        for m in set.modules {
            let (module, origin) = load_module(ctx, m, arch)?;
            modules.push((m.name, module, origin));
        }
        Ok(Kernels { modules, cache: Mutex::new(HashMap::new()) })
    }

    pub(crate) fn origins(&self) -> Vec<(&'static str, KernelOrigin)> {
        self.modules.iter().map(|(n, _, o)| (*n, *o)).collect()
    }

    /// The function `name` from whichever module defines it.
    pub(crate) fn get(&self, name: &'static str) -> Result<Func> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = cache.get(name) {
            return Ok(*f);
        }
        for (_, module, _) in &self.modules {
            if let Ok(f) = module.load_function(name) {
                // The raw handle stays valid: `self.modules` keeps its module loaded.
                let func = Func(f.cu_function());
                cache.insert(name, func);
                return Ok(func);
            }
        }
        Err(BackendError::Kernel { module: "*".into(), msg: format!("kernel {name} not found in any module") })
    }
}

fn load_module(ctx: &Arc<CudaContext>, m: &KernelModule, arch: u32) -> Result<(Arc<CudaModule>, KernelOrigin)> {
    let mut errors = Vec::new();
    if let Some((sm, bin)) = m.cubins.iter().find(|(sm, _)| *sm == arch) {
        match ctx.load_module(Ptx::from_binary(bin.to_vec())) {
            Ok(module) => return Ok((module, KernelOrigin::Cubin(*sm))),
            Err(e) => errors.push(format!("cubin sm_{sm}: {e}")),
        }
    }
    if let Some(ptx) = m.ptx {
        match ctx.load_module(Ptx::from_src(ptx)) {
            Ok(module) => return Ok((module, KernelOrigin::Ptx)),
            Err(e) => errors.push(format!("ptx: {e}")),
        }
    }
    match runtime_nvrtc(m, arch).and_then(|ptx| ctx.load_module(ptx).map_err(|e| format!("load: {e}"))) {
        Ok(module) => Ok((module, KernelOrigin::RuntimeNvrtc)),
        Err(e) => {
            errors.push(format!("runtime nvrtc: {e}"));
            Err(BackendError::Kernel { module: m.name.to_string(), msg: errors.join("; ") })
        }
    }
}

/// Compiles the embedded source for the device's architecture. NVRTC needs `cuda_fp16.h` and
/// `cuda_bf16.h`: taken from `DJINN_CUDA_INCLUDE`, `$CUDA_HOME/include` or `/usr/local/cuda/include`.
fn runtime_nvrtc(m: &KernelModule, arch: u32) -> std::result::Result<Ptx, String> {
    // SAFETY: probing for the library only dlopens it; no NVRTC function is called if absent.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err("libnvrtc not found".into());
    }
    let mut include_paths = Vec::new();
    if let Ok(p) = std::env::var("DJINN_CUDA_INCLUDE") {
        include_paths.push(p);
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(p) = std::env::var(var) {
            include_paths.push(format!("{p}/include"));
        }
    }
    include_paths.push("/usr/local/cuda/include".into());
    include_paths.retain(|p| std::path::Path::new(p).join("cuda_fp16.h").is_file());
    // `arch` must be 'static for cudarc; the set of real architectures is small and fixed.
    let arch_name: &'static str = match arch {
        80 => "compute_80",
        86 => "compute_86",
        87 => "compute_87",
        89 => "compute_89",
        90 => "compute_90",
        100 => "compute_100",
        120 => "compute_120",
        _ => "compute_80",
    };
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch_name),
        include_paths,
        options: vec!["-std=c++17".into()],
        name: Some(format!("{}.cu", m.name)),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(m.source, opts).map_err(|e| e.to_string())
}
