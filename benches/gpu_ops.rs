//! GPU op benchmarks (harness = false): each figure is printed next to a baseline measured in the
//! same run on the same device — a device-to-device copy, counted as bytes read plus written.
//!
//! * paged decode attention, Llama-3-8B shapes (32 query heads, 8 KV heads, head_dim 128, bf16,
//!   16-token blocks scattered at random): KV bytes read / time, as a fraction of copy bandwidth
//!   (target ≥ 0.70 at context ≥ 4096, batch ≥ 8);
//! * cuBLAS GEMM (bf16 in, f32 compute): TFLOP/s, and the decode-shaped GEMM as weight bandwidth;
//! * RMSNorm (fused residual) and RoPE: bytes moved / time against the copy.
//!
//! Timing: host clock around `iters` launches, with a stream synchronise before the clock stops
//! (and one warm-up pass first). Without a GPU the bench prints why and exits successfully.
//!
//! Flags (for `scripts/gpu-bundle`'s runner): `--json PATH` also writes every figure as JSON;
//! `--smoke` runs every case kind once at toy sizes (the kernel emulator's rehearsal of the check,
//! `scripts/cuda-emu --bundle`: its figures mean nothing);
//! `--probe` prints the GPU's name (exit 0) or why none opens (exit 3); `--kernels` prints how
//! this build's kernels were compiled and fails unless every module carries PTX and cubins.

use std::time::Instant;

use djinn_backend::{AttnBatch, Backend, DType, GemmArgs, KvCacheRef, KvLayout, View};
use serde_json::{json, Value};

type Be = djinn_backend::cuda::CudaBackend;
type Region = <Be as Backend>::Region;

/// `--smoke`: toy sizes, one timed call each (set once in `main`).
static SMOKE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

fn smoke() -> bool {
    SMOKE.get().copied().unwrap_or(false)
}

/// Seconds per call of `f`, averaged over `iters` calls after one warm-up call (one call under
/// `--smoke`).
fn time(be: &Be, iters: usize, mut f: impl FnMut()) -> f64 {
    let iters = if smoke() { 1 } else { iters };
    let s = be.default_stream();
    f();
    be.sync_stream(s).expect("sync");
    let t0 = Instant::now();
    for _ in 0..iters {
        f();
    }
    be.sync_stream(s).expect("sync");
    t0.elapsed().as_secs_f64() / iters as f64
}

/// Deterministic filler bytes (small bf16/f32 magnitudes whatever the dtype reads them as).
fn fill(be: &Be, r: &Region, offset: usize, bytes: usize, seed: u64) {
    const CHUNK: usize = 16 << 20;
    let mut x = seed | 1;
    let mut buf = vec![0u8; CHUNK.min(bytes)];
    let mut done = 0;
    while done < bytes {
        let n = CHUNK.min(bytes - done);
        for pair in buf[..n].chunks_exact_mut(2) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // bf16 in [-1, 1): sign/exponent 0x3c..0x3f, random mantissa.
            pair[0] = x as u8;
            pair[1] = 0x3c | ((x >> 8) as u8 & 0x03) | ((x >> 16) as u8 & 0x80);
        }
        be.write(r, offset + done, &buf[..n]).expect("write");
        done += n;
    }
}

fn write_i32(be: &Be, r: &Region, offset: usize, v: &[i32]) {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    be.write(r, offset, &bytes).expect("write i32");
}

fn copy_bandwidth(be: &Be) -> f64 {
    let bytes = if smoke() { 16usize << 20 } else { 1usize << 30 };
    let src = be.reserve(bytes).expect("reserve");
    let dst = be.reserve(bytes).expect("reserve");
    let s = be.default_stream();
    let t = time(be, 10, || be.copy(s, &src, 0, &dst, 0, bytes).expect("copy"));
    2.0 * bytes as f64 / t
}

/// Paged decode attention at batch 1–64 and context 512–32k. One cache (sized for the largest
/// case, filled once) serves every case; each case's blocks are a random permutation of it.
fn decode_attention(be: &Be, copy_bw: f64) -> Value {
    let (heads, kv_heads, head_dim, bt) = (32usize, 8usize, 128usize, 16usize);
    let layout = KvLayout { layers: 1, kv_heads, head_dim, block_tokens: bt, dtype: DType::BF16 };
    println!(
        "paged decode attention, bf16, {heads} q heads / {kv_heads} kv heads, head_dim {head_dim}, {bt}-token blocks"
    );
    println!("{:>6} {:>7} {:>10} {:>10} {:>12} {:>6}", "batch", "context", "time_us", "GB/s", "vs_copy", "parts");
    let (batches, contexts): (&[usize], &[usize]) =
        if smoke() { (&[1, 8], &[512, 4096]) } else { (&[1, 8, 16, 64], &[512, 4096, 8192, 32768]) };
    let (batch_max, ctx_max) = (batches[batches.len() - 1], contexts[contexts.len() - 1]);
    let num_blocks = batch_max * ctx_max.div_ceil(bt);
    let cache_bytes = num_blocks * layout.block_bytes();
    let q_elems_max = batch_max * heads * head_dim;
    // One region: cache | q | out | q_start | ctx_lens | block tables.
    let q_off = cache_bytes;
    let out_off = q_off + q_elems_max * 2;
    let qs_off = (out_off + q_elems_max * 2).next_multiple_of(256);
    let cl_off = qs_off + (batch_max + 1) * 4;
    let bt_off = (cl_off + batch_max * 4).next_multiple_of(256);
    let r = be.reserve(bt_off + num_blocks * 4).expect("reserve");
    fill(be, &r, 0, out_off, 7);
    let cache = KvCacheRef { region: &r, offset: 0, num_blocks, layout };
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut rows = Vec::new();
    let (mut target_cases, mut target_met) = (0, 0);
    for &batch in batches {
        for &ctx in contexts {
            let blocks_per_seq = ctx.div_ceil(bt);
            // Blocks scattered over the cache (a permutation prefix), as a long-running
            // server's would be.
            let mut ids: Vec<i32> = (0..num_blocks as i32).collect();
            for j in (1..ids.len()).rev() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ids.swap(j, (x % (j as u64 + 1)) as usize);
            }
            ids.truncate(batch * blocks_per_seq);
            write_i32(be, &r, qs_off, &(0..=batch as i32).collect::<Vec<_>>());
            write_i32(be, &r, cl_off, &vec![ctx as i32; batch]);
            write_i32(be, &r, bt_off, &ids);
            let attn = AttnBatch {
                seqs: batch,
                q_start: View::new(&r, qs_off, DType::I32, batch + 1),
                ctx_lens: View::new(&r, cl_off, DType::I32, batch),
                block_tables: View::new(&r, bt_off, DType::I32, ids.len()),
                max_blocks_per_seq: blocks_per_seq,
                max_q_len: 1,
                max_ctx_len: ctx,
            };
            let q_elems = batch * heads * head_dim;
            let q = View::new(&r, q_off, DType::BF16, q_elems);
            let out = View::new(&r, out_off, DType::BF16, q_elems);
            let s = be.default_stream();
            let scale = 1.0 / (head_dim as f32).sqrt();
            let iters = if batch * ctx >= 1 << 20 { 10 } else { 50 };
            let t = time(be, iters, || be.attention(s, q, &cache, 0, &attn, out, heads, scale).expect("attention"));
            let parts = be.last_attention().and_then(|d| d.decode).map_or(0, |p| p.parts);
            let kv_bytes = (batch * ctx * kv_heads * head_dim * 2 * 2) as f64;
            let bw = kv_bytes / t;
            let vs = bw / copy_bw;
            println!("{batch:>6} {ctx:>7} {:>10.1} {:>10.1} {:>11.1}% {parts:>6}", t * 1e6, bw / 1e9, 100.0 * vs);
            if ctx >= 4096 && batch >= 8 {
                target_cases += 1;
                target_met += usize::from(vs >= 0.70);
            }
            rows.push(json!({"batch": batch, "context": ctx, "time_us": t * 1e6, "gbps": bw / 1e9,
                             "vs_copy": vs, "parts": parts}));
        }
    }
    println!("  target ≥ 70% of copy at context ≥ 4096, batch ≥ 8: met in {target_met} of {target_cases} cases");
    json!({"cases": rows, "target_vs_copy": 0.70, "target_cases": target_cases, "target_met": target_met})
}

fn gemm(be: &Be) -> Value {
    println!("cuBLAS GEMM (bf16 in, f32 compute, bf16 out), C[m,n] = A[m,k] · B[n,k]ᵀ");
    println!("{:>6} {:>6} {:>6} {:>10} {:>10} {:>12}", "m", "n", "k", "time_us", "TFLOP/s", "weight GB/s");
    let mut rows = Vec::new();
    let shapes: &[(usize, usize, usize)] = if smoke() {
        &[(64, 64, 64), (8, 256, 128), (1, 128, 128)]
    } else {
        &[(8192, 8192, 8192), (4096, 14336, 4096), (8, 14336, 4096), (1, 4096, 4096)]
    };
    for &(m, n, k) in shapes {
        let (a_b, b_b, c_b) = (m * k * 2, n * k * 2, m * n * 2);
        let r = be.reserve(a_b + b_b + c_b).expect("reserve");
        fill(be, &r, 0, a_b + b_b, 3);
        let a = View::new(&r, 0, DType::BF16, m * k);
        let b = View::new(&r, a_b, DType::BF16, n * k);
        let c = View::new(&r, a_b + b_b, DType::BF16, m * n);
        let s = be.default_stream();
        let args = GemmArgs::linear(m, n, k);
        let t = time(be, 20, || be.gemm(s, a, b, c, &args).expect("gemm"));
        let (tflops, wgbps) = (2.0 * (m * n * k) as f64 / t / 1e12, b_b as f64 / t / 1e9);
        println!("{m:>6} {n:>6} {k:>6} {:>10.1} {tflops:>10.1} {wgbps:>12.1}", t * 1e6);
        rows.push(json!({"m": m, "n": n, "k": k, "time_us": t * 1e6, "tflops": tflops, "weight_gbps": wgbps}));
    }
    Value::Array(rows)
}

fn norm_rope(be: &Be, copy_bw: f64) -> Value {
    // hidden = heads × head_dim of the RoPE case below, which reuses the region.
    let (rows, hidden) = (if smoke() { 64usize } else { 4096usize }, 4096usize);
    let n = rows * hidden;
    let r = be.reserve(n * 2 * 3 + hidden * 2 + rows * 4 + 64 * 4).expect("reserve");
    fill(be, &r, 0, n * 2 * 3 + hidden * 2, 5);
    let x = View::new(&r, 0, DType::BF16, n);
    let res = View::new(&r, n * 2, DType::BF16, n);
    let out = View::new(&r, n * 4, DType::BF16, n);
    let w = View::new(&r, n * 6, DType::BF16, hidden);
    let s = be.default_stream();
    let t = time(be, 50, || be.rms_norm(s, x, Some(res), w, out, hidden, 1e-5).expect("rms_norm"));
    // x read, residual read + written, out written.
    let bytes = (4 * n * 2) as f64;
    let norm = json!({"time_us": t * 1e6, "gbps": bytes / t / 1e9, "vs_copy": bytes / t / copy_bw});
    println!(
        "rms_norm+residual bf16 [{rows}, {hidden}]: {:.1} us, {:.1} GB/s, {:.1}% of copy",
        t * 1e6,
        bytes / t / 1e9,
        100.0 * bytes / t / copy_bw
    );

    let (tokens, heads, head_dim) = (rows, 32usize, 128usize);
    let pos_off = n * 6 + hidden * 2;
    let freq_off = pos_off + tokens * 4;
    write_i32(be, &r, pos_off, &(0..tokens as i32).collect::<Vec<_>>());
    let inv_freq: Vec<u8> = (0..head_dim / 2)
        .flat_map(|i| (1.0f32 / 500_000f32.powf(2.0 * i as f32 / head_dim as f32)).to_le_bytes())
        .collect();
    be.write(&r, freq_off, &inv_freq).expect("write inv_freq");
    let q = View::new(&r, 0, DType::BF16, tokens * heads * head_dim);
    let pos = View::new(&r, pos_off, DType::I32, tokens);
    let freq = View::new(&r, freq_off, DType::F32, head_dim / 2);
    let t = time(be, 50, || be.rope(s, q, pos, freq, heads, head_dim).expect("rope"));
    let bytes = (2 * tokens * heads * head_dim * 2) as f64;
    println!(
        "rope bf16 [{tokens}, {heads}, {head_dim}]: {:.1} us, {:.1} GB/s, {:.1}% of copy",
        t * 1e6,
        bytes / t / 1e9,
        100.0 * bytes / t / copy_bw
    );
    json!({"rms_norm_residual": norm, "rope": {"time_us": t * 1e6, "gbps": bytes / t / 1e9, "vs_copy": bytes / t / copy_bw}})
}

/// `--kernels`: how this build's kernels were compiled; `Err` unless every module has PTX and
/// the sm_80 and sm_90 cubins (a build without a compiler embeds only sources).
fn kernel_images() -> Result<Value, String> {
    let set = &djinn_dataplane::kernels::KERNELS;
    let mut modules = Vec::new();
    let mut missing = Vec::new();
    for m in set.modules {
        let archs: Vec<u32> = m.cubins.iter().map(|c| c.0).collect();
        if m.ptx.is_none() || !archs.contains(&80) || !archs.contains(&90) {
            missing.push(m.name);
        }
        modules.push(json!({"name": m.name, "ptx_bytes": m.ptx.map_or(0, str::len), "cubin_archs": archs}));
    }
    let v = json!({"compiler": set.compiler, "image_bytes": set.image_bytes(), "modules": modules});
    println!("kernels: {v}");
    if missing.is_empty() {
        Ok(v)
    } else {
        Err(format!("modules without PTX + sm_80/sm_90 cubins (source fallback only): {missing:?}"))
    }
}

fn main() {
    // `cargo bench` passes `--bench`; the runner's flags are documented at the top.
    let args: Vec<String> = std::env::args().collect();
    let json_path = args.iter().position(|a| a == "--json").and_then(|i| args.get(i + 1)).cloned();
    SMOKE.set(args.iter().any(|a| a == "--smoke")).expect("set once");
    if args.iter().any(|a| a == "--kernels") {
        if let Err(why) = kernel_images() {
            eprintln!("gpu_ops: {why}");
            std::process::exit(1);
        }
        return;
    }
    let be = match djinn_dataplane::kernels::cuda_backend(0) {
        Ok(be) => be,
        Err(e) => {
            println!("gpu_ops: skipped, no GPU: {e}");
            if args.iter().any(|a| a == "--probe") {
                std::process::exit(3);
            }
            return;
        }
    };
    let info = be.info();
    if args.iter().any(|a| a == "--probe") {
        println!("{} (sm_{}, {} MiB)", info.name, be.arch(), info.memory_total_bytes >> 20);
        return;
    }
    println!("gpu_ops on {} (sm_{}), kernels: {:?}", info.name, be.arch(), be.kernel_origins());
    let copy_bw = copy_bandwidth(&be);
    println!("baseline device-to-device copy (read + write): {:.1} GB/s", copy_bw / 1e9);
    let decode = decode_attention(&be, copy_bw);
    let gemm = gemm(&be);
    let elementwise = norm_rope(&be, copy_bw);
    let all = json!({
        "gpu": info.name,
        "copy_gbps": copy_bw / 1e9,
        "decode_attention": decode,
        "gemm": gemm,
        "elementwise": elementwise,
        "attention_kernels": format!("{:?}", be.attention_kernels()),
    });
    if let Some(p) = json_path {
        std::fs::write(&p, serde_json::to_vec_pretty(&all).expect("json")).expect("write --json file");
    }
}
