//! CPU backend benchmarks (criterion).
//!
//! The headline is the bf16 GEMV of decode (`m = 1`, weights `[n, k]` kept in bf16): before the
//! criterion groups, each shape is timed against a plain multi-threaded read (a vectorised
//! integer sum over the very same bytes, split the same way over the same workers) in the same
//! run, interleaved, and the ratio of achieved bandwidths is printed (target ≥ 0.8): of the
//! medians, and of the best runs (the least disturbed on a shared machine). The default shapes
//! are SmolLM2's MLP matrices and a 4096² one; `DJINN_BENCH_GEMV_SHAPES=49152x576,...` picks
//! others (that one is SmolLM2's LM head, far larger than the last-level cache). The criterion
//! groups then report
//! throughput for the GEMV, the read baseline, prefill GEMM, and the transformer ops.

use std::hint::black_box;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use djinn_backend::cpu::{simd_level, CpuBackend, CpuRegion};
use djinn_backend::{AttnBatch, Backend, DType, GemmArgs, KvCacheRef, KvLayout, View};
use half::bf16;

/// A region with `elems` pseudo-random values of `dt` written at offset 0.
fn region_with(be: &CpuBackend, dt: DType, elems: usize, scale: f32) -> CpuRegion {
    let r = be.reserve(elems * dt.size_bytes()).expect("reserve");
    let mut bytes = Vec::with_capacity(elems * dt.size_bytes());
    let mut z = 0x1234_5678u32;
    for _ in 0..elems {
        z = z.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let v = ((z >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * scale;
        match dt {
            DType::F32 => bytes.extend_from_slice(&v.to_le_bytes()),
            DType::BF16 => bytes.extend_from_slice(&bf16::from_f32(v).to_le_bytes()),
            DType::F16 => bytes.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
            DType::I32 => bytes.extend_from_slice(&(((z >> 8) % 16) as i32).to_le_bytes()),
            _ => unreachable!(),
        }
    }
    be.write(&r, 0, &bytes).expect("write");
    r
}

fn view(r: &CpuRegion, dt: DType, len: usize) -> View<'_, CpuBackend> {
    View::new(r, 0, dt, len)
}

/// Wrapping sum of 32-bit words, 16 lanes (vectorises to 2 AVX2 registers).
fn sum_words(w: &[u32]) -> u32 {
    let mut acc = [0u32; 16];
    let mut it = w.chunks_exact(16);
    for c in &mut it {
        for l in 0..16 {
            acc[l] = acc[l].wrapping_add(c[l]);
        }
    }
    it.remainder().iter().fold(acc.iter().fold(0u32, |a, b| a.wrapping_add(*b)), |a, b| a.wrapping_add(*b))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_words_avx2(w: &[u32]) -> u32 {
    sum_words(w)
}

/// The baseline: every byte of `r` read once, as fast as a plain loop can, split into the same
/// contiguous chunks over the same workers (`parallel_for`) as the backend's ops.
fn read_all(be: &CpuBackend, r: &CpuRegion, bytes: usize) -> u32 {
    // SAFETY: nothing writes the region while the benchmark reads it; it holds `bytes` bytes.
    let words = unsafe { std::slice::from_raw_parts(r.as_ptr() as *const u32, bytes / 4) };
    let chunk = words.len().div_ceil(be.threads() * 4).max(1024);
    let n = words.len().div_ceil(chunk);
    let avx2 = simd_level().has_avx2();
    let total = AtomicU32::new(0);
    be.parallel_for(n, |i| {
        let c = &words[i * chunk..words.len().min((i + 1) * chunk)];
        let s = match avx2 {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX2 was detected at run time.
            true => unsafe { sum_words_avx2(c) },
            _ => sum_words(c),
        };
        total.fetch_add(s, Ordering::Relaxed);
    });
    total.into_inner()
}

struct Gemv {
    x: CpuRegion,
    w: CpuRegion,
    y: CpuRegion,
    n: usize,
    k: usize,
}

impl Gemv {
    fn new(be: &CpuBackend, n: usize, k: usize) -> Gemv {
        Gemv {
            x: region_with(be, DType::F32, k, 2.0),
            w: region_with(be, DType::BF16, n * k, 0.1),
            y: be.reserve(n * 4).unwrap(),
            n,
            k,
        }
    }
    fn run(&self, be: &CpuBackend) {
        let (n, k) = (self.n, self.k);
        be.gemm(
            be.default_stream(),
            view(&self.x, DType::F32, k),
            view(&self.w, DType::BF16, n * k),
            view(&self.y, DType::F32, n),
            &GemmArgs::linear(1, n, k),
        )
        .expect("gemv");
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Same-run comparison of the bf16 GEMV against reading its weight bytes; prints the ratio.
fn gemv_ratio(be: &CpuBackend, n: usize, k: usize) {
    let g = Gemv::new(be, n, k);
    let bytes = n * k * 2;
    let reps = (2_000_000_000 / bytes).clamp(20, 2000);
    for _ in 0..5 {
        g.run(be);
        black_box(read_all(be, &g.w, bytes));
    }
    let (mut tg, mut tr) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let t = Instant::now();
        g.run(be);
        tg.push(t.elapsed());
        let t = Instant::now();
        black_box(read_all(be, &g.w, bytes));
        tr.push(t.elapsed());
    }
    let (bg, br) = (*tg.iter().min().unwrap(), *tr.iter().min().unwrap());
    let (mg, mr) = (median(tg), median(tr));
    let gbs = |d: Duration| bytes as f64 / d.as_secs_f64() / 1e9;
    println!(
        "bf16 GEMV {n}x{k} ({:.1} MiB, {} threads, {:?}): gemv {:.2} GB/s, plain read {:.2} GB/s, ratio {:.2} \
         (target >= 0.8; best-of-{reps} ratio {:.2})",
        bytes as f64 / (1 << 20) as f64,
        be.threads(),
        simd_level(),
        gbs(mg),
        gbs(mr),
        gbs(mg) / gbs(mr),
        gbs(bg) / gbs(br),
    );
}

const GEMV_SHAPES: [(usize, usize); 3] = [(576, 1536), (1536, 576), (4096, 4096)];

/// The ratio shapes: [`GEMV_SHAPES`], or `DJINN_BENCH_GEMV_SHAPES=NxK,NxK,...` (e.g. the LM head
/// `49152x576`, or a matrix far larger than the last-level cache).
fn gemv_shapes() -> Vec<(usize, usize)> {
    let parse = |s: &str| {
        let (n, k) = s.trim().split_once('x')?;
        Some((n.parse().ok()?, k.parse().ok()?))
    };
    match std::env::var("DJINN_BENCH_GEMV_SHAPES") {
        Ok(v) => v.split(',').filter_map(parse).collect(),
        Err(_) => GEMV_SHAPES.to_vec(),
    }
}

/// The backend under test: `DJINN_BENCH_THREADS` workers, default one per core.
fn backend() -> CpuBackend {
    match std::env::var("DJINN_BENCH_THREADS").ok().and_then(|v| v.parse().ok()) {
        Some(n) => CpuBackend::with_threads(n).unwrap(),
        None => CpuBackend::new().unwrap(),
    }
}

fn bench_gemv(c: &mut Criterion) {
    let be = backend();
    for (n, k) in gemv_shapes() {
        gemv_ratio(&be, n, k);
    }
    let mut grp = c.benchmark_group("gemv_bf16");
    for (n, k) in GEMV_SHAPES {
        let g = Gemv::new(&be, n, k);
        grp.throughput(Throughput::Bytes((n * k * 2) as u64));
        grp.bench_function(BenchmarkId::new("gemv", format!("{n}x{k}")), |b| b.iter(|| g.run(&be)));
        grp.bench_function(BenchmarkId::new("plain_read", format!("{n}x{k}")), |b| {
            b.iter(|| black_box(read_all(&be, &g.w, n * k * 2)))
        });
    }
    grp.finish();
}

fn bench_gemm(c: &mut Criterion) {
    let be = backend();
    let mut grp = c.benchmark_group("gemm_prefill");
    for (m, n, k, wdt) in [(128, 1536, 576, DType::F32), (128, 1536, 576, DType::BF16), (4, 4096, 4096, DType::BF16)] {
        let x = region_with(&be, DType::F32, m * k, 2.0);
        let w = region_with(&be, wdt, n * k, 0.1);
        let y = be.reserve(m * n * 4).unwrap();
        grp.throughput(Throughput::Elements((2 * m * n * k) as u64));
        grp.bench_function(BenchmarkId::new(format!("{wdt}_weights_flop"), format!("{m}x{n}x{k}")), |b| {
            b.iter(|| {
                be.gemm(
                    be.default_stream(),
                    view(&x, DType::F32, m * k),
                    view(&w, wdt, n * k),
                    view(&y, DType::F32, m * n),
                    &GemmArgs::linear(m, n, k),
                )
                .unwrap()
            })
        });
    }
    grp.finish();
}

fn bench_ops(c: &mut Criterion) {
    let be = backend();
    let s = be.default_stream();
    let mut grp = c.benchmark_group("ops");
    let (rows, hidden) = (16, 4096);
    let x = region_with(&be, DType::F32, rows * hidden, 2.0);
    let res = region_with(&be, DType::F32, rows * hidden, 2.0);
    let w = region_with(&be, DType::BF16, hidden, 1.0);
    let vocab = 128_256;
    let out = be.reserve((rows * hidden).max(vocab) * 4).unwrap();
    grp.throughput(Throughput::Bytes((rows * hidden * 4 * 4) as u64));
    grp.bench_function("rms_norm_fused_16x4096", |b| {
        b.iter(|| {
            let xv = view(&x, DType::F32, rows * hidden);
            let rv = view(&res, DType::F32, rows * hidden);
            be.rms_norm(
                s,
                xv,
                Some(rv),
                view(&w, DType::BF16, hidden),
                view(&out, DType::F32, rows * hidden),
                hidden,
                1e-5,
            )
            .unwrap()
        })
    });
    grp.throughput(Throughput::Bytes((rows * hidden * 4 * 3) as u64));
    grp.bench_function("silu_mul_16x4096", |b| {
        b.iter(|| {
            let n = rows * hidden;
            be.silu_mul(s, view(&x, DType::F32, n), view(&res, DType::F32, n), view(&out, DType::F32, n)).unwrap()
        })
    });
    let logits = region_with(&be, DType::F32, vocab, 20.0);
    let ids = be.reserve(4).unwrap();
    grp.throughput(Throughput::Bytes((vocab * 4) as u64));
    grp.bench_function("softmax_128k", |b| {
        b.iter(|| be.softmax(s, view(&logits, DType::F32, vocab), view(&out, DType::F32, vocab), vocab).unwrap())
    });
    grp.bench_function("argmax_128k", |b| {
        b.iter(|| be.argmax(s, view(&logits, DType::F32, vocab), view(&ids, DType::I32, 1), vocab).unwrap())
    });
    let p = djinn_backend::SampleParams { temperature: 0.8, top_k: 40, top_p: 0.95, seed: 7, step: 0 };
    grp.bench_function("sample_topk40_topp095_128k", |b| {
        b.iter(|| be.sample(s, view(&logits, DType::F32, vocab), view(&ids, DType::I32, 1), vocab, &[p]).unwrap())
    });
    let (tokens, heads, hd) = (16, 32, 128);
    let q = region_with(&be, DType::F32, tokens * heads * hd, 1.0);
    let pos = region_with(&be, DType::I32, tokens, 1.0);
    let inv: Vec<u8> = (0..hd / 2).flat_map(|i| (10_000f32.powf(-2.0 * i as f32 / hd as f32)).to_le_bytes()).collect();
    let invr = be.reserve(inv.len()).unwrap();
    be.write(&invr, 0, &inv).unwrap();
    grp.throughput(Throughput::Bytes((tokens * heads * hd * 8) as u64));
    grp.bench_function("rope_16x32x128", |b| {
        b.iter(|| {
            be.rope(
                s,
                view(&q, DType::F32, tokens * heads * hd),
                view(&pos, DType::I32, tokens),
                view(&invr, DType::F32, hd / 2),
                heads,
                hd,
            )
            .unwrap()
        })
    });
    grp.finish();
}

/// Paged decode attention, Llama-3-8B head shapes, bf16 cache: bytes of K/V read per second.
fn bench_attention(c: &mut Criterion) {
    let be = backend();
    let s = be.default_stream();
    let (heads, kvh, hd, bt) = (32, 8, 128, 16);
    let (seqs, ctx) = (4usize, 1024usize);
    let layout = KvLayout { layers: 1, kv_heads: kvh, head_dim: hd, block_tokens: bt, dtype: DType::BF16 };
    let per_seq = ctx / bt;
    let blocks = seqs * per_seq;
    let cache_elems = blocks * layout.block_bytes() / 2;
    let cache_r = region_with(&be, DType::BF16, cache_elems, 1.0);
    let q = region_with(&be, DType::F32, seqs * heads * hd, 1.0);
    let out = be.reserve(seqs * heads * hd * 4).unwrap();
    let idx = be.reserve(4 * (2 * seqs + 1 + blocks)).unwrap();
    let mut ints: Vec<i32> = (0..=seqs as i32).collect();
    ints.extend(std::iter::repeat_n(ctx as i32, seqs));
    ints.extend(0..blocks as i32);
    be.write(&idx, 0, &ints.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>()).unwrap();
    let cache = KvCacheRef { region: &cache_r, offset: 0, num_blocks: blocks, layout };
    let batch = AttnBatch {
        seqs,
        q_start: View::new(&idx, 0, DType::I32, seqs + 1),
        ctx_lens: View::new(&idx, 4 * (seqs + 1), DType::I32, seqs),
        block_tables: View::new(&idx, 4 * (2 * seqs + 1), DType::I32, blocks),
        max_blocks_per_seq: per_seq,
        max_q_len: 1,
        max_ctx_len: ctx,
    };
    let mut grp = c.benchmark_group("attention");
    grp.throughput(Throughput::Bytes((blocks * layout.block_bytes()) as u64));
    grp.bench_function(format!("decode_bf16_b{seqs}_ctx{ctx}_h{heads}_kv{kvh}"), |b| {
        b.iter(|| {
            let qv = view(&q, DType::F32, seqs * heads * hd);
            be.attention(s, qv, &cache, 0, &batch, view(&out, DType::F32, seqs * heads * hd), heads, 0.088).unwrap()
        })
    });
    grp.finish();
}

fn config() -> Criterion {
    // Short runs: the machine is shared; ratios above come from an interleaved same-run loop.
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
}

criterion_group! { name = benches; config = config(); targets = bench_gemv, bench_gemm, bench_ops, bench_attention }
criterion_main!(benches);
