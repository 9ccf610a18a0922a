//! Conformance suite for the compute backends (libtest-mimic, `harness = false`).
//!
//! One test body per op, generic over `B: Backend`, instantiated for every backend:
//! - `cpu::<op>` compares the CPU backend against a plain scalar reference written here (f64
//!   accumulation over the exact stored input values);
//! - `cuda::<op>` (feature `cuda`) compares the CUDA backend against the CPU backend on the same
//!   inputs. Without a GPU or driver the cuda trials are reported as ignored at run time with the
//!   reason, never as passed.
//!
//! Tolerances, relative to the largest magnitude in the reference output of each case:
//! max|got − want| ≤ 1e-5·max|want| when every operand is f32, ≤ 1e-2·max|want| when any
//! operand is stored as f16 or bf16. Integer results (argmax, sampling, ids) and byte moves
//! (block copies, gather/scatter, copies) must match exactly.
//!
//! Inputs are random (fixed seeds per case, printed on failure) with odd sizes, GQA groups 1–8,
//! head dims 64–256, contexts that cross block boundaries and pass 4096, mixed decode/prefill
//! steps, real vocabulary sizes with absurd `top_k`, and every storage dtype. On CUDA the
//! attention cases also check which kernels ran (decode rows of a mixed step take the decode
//! kernel).

mod gpu;

use std::sync::Arc;

use djinn_backend::backend::sample_uniform;
use djinn_backend::cpu::CpuBackend;
#[cfg(feature = "cuda")]
use djinn_backend::cuda::{AttnDispatch, PrefillRows};
use djinn_backend::{
    AttnBatch, Backend, BackendError, BinaryOp, DType, GemmArgs, HostBuf, KvCacheRef, KvLayout, RegionInfo,
    SampleParams, UnaryOp, View,
};
use half::{bf16, f16};
use libtest_mimic::{Arguments, Failed, Trial};

type R<T = ()> = Result<T, Failed>;

const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// The stated tolerance for a case whose operands have these dtypes.
fn tol(dts: &[DType]) -> f32 {
    if dts.iter().all(|d| *d == DType::F32) {
        1e-5
    } else {
        1e-2
    }
}

fn fail(e: BackendError) -> Failed {
    Failed::from(format!("backend error: {e}"))
}

// ---- deterministic inputs ---------------------------------------------------------------------

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5851_f42d_4c95_7f2d)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn f(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f() * scale).collect()
    }
}

fn encode(v: &[f32], dt: DType) -> Vec<u8> {
    match dt {
        DType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F16 => v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect(),
        DType::BF16 => v.iter().flat_map(|x| bf16::from_f32(*x).to_le_bytes()).collect(),
        DType::I32 => v.iter().flat_map(|x| (*x as i32).to_le_bytes()).collect(),
        other => panic!("encode: {other}"),
    }
}

fn decode(b: &[u8], dt: DType) -> Vec<f32> {
    match dt {
        DType::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
        DType::F16 => b.chunks_exact(2).map(|c| f16::from_le_bytes(c.try_into().unwrap()).to_f32()).collect(),
        DType::BF16 => b.chunks_exact(2).map(|c| bf16::from_le_bytes(c.try_into().unwrap()).to_f32()).collect(),
        DType::I32 => b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
        other => panic!("decode: {other}"),
    }
}

/// The values `v` take once stored as `dt`.
fn quant(v: &[f32], dt: DType) -> Vec<f32> {
    decode(&encode(v, dt), dt)
}

fn close(got: &[f32], want: &[f32], tol: f32, what: &str) -> R {
    if got.len() != want.len() {
        return Err(format!("{what}: {} values, expected {}", got.len(), want.len()).into());
    }
    let max = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE);
    let bound = tol * max;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        if d.is_nan() || d > bound {
            return Err(format!("{what}: [{i}] got {g}, want {w} (|Δ| {d} > {tol}·max|ref| = {bound})").into());
        }
    }
    Ok(())
}

fn exact<T: PartialEq + std::fmt::Debug>(got: &[T], want: &[T], what: &str) -> R {
    if got.len() != want.len() {
        return Err(format!("{what}: {} values, expected {}", got.len(), want.len()).into());
    }
    if let Some(i) = got.iter().zip(want).position(|(g, w)| g != w) {
        return Err(format!("{what}: [{i}] got {:?}, want {:?}", got[i], want[i]).into());
    }
    Ok(())
}

// ---- device arena -------------------------------------------------------------------------------

/// A tensor in an arena: `len` elements of `dt` in the arena's region `r`.
#[derive(Clone, Copy, Debug)]
struct T {
    r: usize,
    dt: DType,
    len: usize,
}

/// The tensors of one case, each in a region of its own of exactly its size: a kernel that
/// reads or writes past an operand's end reaches past a device allocation, which the kernel
/// emulator's memory check (scripts/cuda-emu --check) refuses by the byte; in a shared region it
/// would land, unseen, in the next tensor.
struct Arena<'b, B: Backend> {
    be: &'b B,
    regions: Vec<B::Region>,
}

impl<'b, B: Backend> Arena<'b, B> {
    fn new(be: &'b B) -> Self {
        Arena { be, regions: Vec::new() }
    }
    fn alloc(&mut self, dt: DType, len: usize) -> R<T> {
        self.regions.push(self.be.reserve(len * dt.size_bytes()).map_err(fail)?);
        Ok(T { r: self.regions.len() - 1, dt, len })
    }
    fn region(&self, t: T) -> &B::Region {
        &self.regions[t.r]
    }
    fn write_bytes(&self, t: T, bytes: &[u8]) -> R {
        self.be.write(self.region(t), 0, bytes).map_err(fail)
    }
    fn put(&mut self, v: &[f32], dt: DType) -> R<T> {
        let t = self.alloc(dt, v.len())?;
        self.write_bytes(t, &encode(v, dt))?;
        Ok(t)
    }
    fn put_i32(&mut self, v: &[i32]) -> R<T> {
        let t = self.alloc(DType::I32, v.len())?;
        self.write_bytes(t, &v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>())?;
        Ok(t)
    }
    /// An output pre-filled with a junk value, so unwritten elements are caught.
    fn out(&mut self, dt: DType, len: usize, junk: f32) -> R<T> {
        self.put(&vec![junk; len], dt)
    }
    fn view(&self, t: T) -> View<'_, B> {
        View::new(self.region(t), 0, t.dt, t.len)
    }
    fn bytes(&self, t: T) -> R<Vec<u8>> {
        let mut b = vec![0u8; t.len * t.dt.size_bytes()];
        self.be.read(self.region(t), 0, &mut b).map_err(fail)?;
        Ok(b)
    }
    fn get(&self, t: T) -> R<Vec<f32>> {
        Ok(decode(&self.bytes(t)?, t.dt))
    }
    fn get_i32(&self, t: T) -> R<Vec<i32>> {
        Ok(self.bytes(t)?.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect())
    }
    fn sync(&self) -> R {
        self.be.sync_stream(self.be.default_stream()).map_err(fail)
    }
}

/// What a case is compared against.
#[derive(Clone, Copy)]
enum Want<'a> {
    /// The scalar reference in this file.
    Reference,
    /// The CPU backend on the same inputs.
    Cpu(&'a CpuBackend),
}

/// Runs `$run` on the backend under test and produces the expected value: the reference
/// expression, or `$run` on the CPU backend.
macro_rules! expect {
    ($be:expr, $want:expr, $inp:expr, $run:ident, $reference:expr) => {{
        let got = $run($be, $inp)?;
        let want = match $want {
            Want::Reference => $reference,
            Want::Cpu(c) => $run(c, $inp)?,
        };
        (got, want)
    }};
}

/// `check_dispatch` where the CUDA backend is built (its types exist only there).
macro_rules! expect_dispatch {
    ($be:expr, $what:expr, $ok:expr) => {
        #[cfg(feature = "cuda")]
        check_dispatch($be, $what, $ok)?;
    };
}
// ---- memory -------------------------------------------------------------------------------------

fn memory<B: Backend>(be: &B, _want: Want) -> R {
    let info = be.info();
    if info.name.is_empty() {
        return Err("info(): empty device name".into());
    }
    let s = be.default_stream();
    let r1 = be.reserve(1 << 20).map_err(fail)?;
    let r2 = be.reserve(3 * 4096 + 17).map_err(fail)?;
    if r2.len_bytes() != 3 * 4096 + 17 {
        return Err(format!("region length {} != requested", r2.len_bytes()).into());
    }
    let mut rng = Rng::new(1);
    let data: Vec<u8> = (0..5000).map(|_| rng.next() as u8).collect();
    be.write(&r1, 100, &data).map_err(fail)?;
    let mut back = vec![0u8; data.len()];
    be.read(&r1, 100, &mut back).map_err(fail)?;
    exact(&back, &data, "write/read")?;

    // Device copies: inside one region (disjoint) and across regions.
    be.copy(s, &r1, 100, &r1, 200_000, 5000).map_err(fail)?;
    be.copy(s, &r1, 200_000, &r2, 7, 5000).map_err(fail)?;
    be.sync_stream(s).map_err(fail)?;
    be.read(&r2, 7, &mut back).map_err(fail)?;
    exact(&back, &data, "copy")?;

    // Async copies through page-locked host memory on a second stream, with events.
    let s2 = be.new_stream().map_err(fail)?;
    let mut h1 = be.alloc_host(8192).map_err(fail)?;
    let mut h2 = be.alloc_host(8192).map_err(fail)?;
    h1.as_mut_slice()[10..5010].copy_from_slice(&data);
    // SAFETY: the host buffers are neither touched nor dropped before `sync_event` below.
    unsafe {
        be.copy_h2d_async(&s2, &h1, 10, &r1, 300_000, 5000).map_err(fail)?;
        let e = be.record(&s2).map_err(fail)?;
        be.wait(s, &e).map_err(fail)?;
        be.copy_d2h_async(&s2, &r1, 300_000, &mut h2, 3000, 5000).map_err(fail)?;
        let e2 = be.record(&s2).map_err(fail)?;
        be.sync_event(&e2).map_err(fail)?;
        if !be.event_done(&e2).map_err(fail)? {
            return Err("event not done after sync_event".into());
        }
    }
    exact(&h2.as_slice()[3000..8000], &data, "async copies")?;

    // Typed errors, never panics.
    let oob = be.write(&r2, r2.len_bytes() - 10, &data[..11]);
    if !matches!(oob, Err(BackendError::OutOfBounds { .. })) {
        return Err(format!("write past the end: {oob:?}").into());
    }
    let oob = be.read(&r2, usize::MAX - 2, &mut back[..8]);
    if !matches!(oob, Err(BackendError::OutOfBounds { .. })) {
        return Err(format!("read at usize::MAX: {oob:?}").into());
    }
    let ov = be.copy(s, &r1, 0, &r1, 100, 1000);
    if !matches!(ov, Err(BackendError::Overlap { .. })) {
        return Err(format!("overlapping copy: {ov:?}").into());
    }
    // SAFETY: fails its bounds check before touching the buffer.
    let oob = unsafe { be.copy_h2d_async(s, &h1, 8000, &r1, 0, 1000) };
    if !matches!(oob, Err(BackendError::OutOfBounds { .. })) {
        return Err(format!("h2d past the host buffer: {oob:?}").into());
    }

    // Operand checks on ops: bounds, partial overlap, dtype.
    let v = |off, dt, len| View::<B>::new(&r2, off, dt, len);
    let e = be.binary(s, BinaryOp::Add, v(0, DType::F32, 100), v(400, DType::F32, 100), v(12_000, DType::F32, 100));
    if !matches!(e, Err(BackendError::OutOfBounds { .. })) {
        return Err(format!("binary output past the region: {e:?}").into());
    }
    let e = be.binary(s, BinaryOp::Add, v(0, DType::F32, 100), v(400, DType::F32, 100), v(200, DType::F32, 100));
    if !matches!(e, Err(BackendError::Overlap { .. })) {
        return Err(format!("binary output overlapping an input: {e:?}").into());
    }
    let e = be.unary(s, UnaryOp::Neg, v(0, DType::I32, 100), v(800, DType::F32, 100));
    if !matches!(e, Err(BackendError::DType { .. })) {
        return Err(format!("unary on i32: {e:?}").into());
    }
    Ok(())
}

/// Every op refuses an output that partially overlaps one of its inputs (or the KV cache it
/// reads), with a typed `Overlap`, on every backend: the rule is checked once, in
/// `djinn_backend::validate`, which both backends call before anything else. Shapes and dtypes
/// in each case are valid, so the overlap is the only fault.
fn overlap_test<B: Backend>(be: &B, _want: Want) -> R {
    let r = be.reserve(1 << 20).map_err(fail)?;
    let s = be.default_stream();
    let f = |off: usize, len| View::<B>::new(&r, off, DType::F32, len);
    let i = |off: usize, len| View::<B>::new(&r, off, DType::I32, len);
    // Valid index values where an op might read them: zeros (block 0, token 0, slot 0).
    be.write(&r, 0, &vec![0u8; 1 << 20]).map_err(fail)?;
    let l = layout(1, 8, 4, DType::F32);
    let cache = KvCacheRef { region: &r, offset: 0, num_blocks: 4, layout: l }; // 4 × 256 B
    let batch = AttnBatch {
        seqs: 1,
        q_start: i(8192, 2),
        ctx_lens: i(8200, 1),
        block_tables: i(12288, 1),
        max_blocks_per_seq: 1,
        max_q_len: 1,
        max_ctx_len: 1,
    };
    let mut cases: Vec<(&str, djinn_backend::error::Result<()>)> = vec![
        ("gemm c over a", be.gemm(s, f(4096, 16), f(8192, 16), f(4096 + 8, 16), &GemmArgs::linear(4, 4, 4))),
        ("binary", be.binary(s, BinaryOp::Mul, f(4096, 64), f(8192, 64), f(4096 + 4, 64))),
        ("unary", be.unary(s, UnaryOp::Exp, f(4096, 64), f(4096 + 4, 64))),
        ("cast", be.cast(s, f(4096, 64), View::new(&r, 4096 + 64, DType::F16, 64))),
        ("silu_mul", be.silu_mul(s, f(4096, 64), f(8192, 64), f(8192 + 8, 64))),
        ("softmax", be.softmax(s, f(4096, 64), f(4096 + 4, 64), 16)),
        ("embedding out over table", be.embedding(s, f(4096, 64), i(16384, 2), f(4096 + 128, 16), 8)),
        ("embedding out over ids", be.embedding(s, f(4096, 64), i(16384, 2), f(16384 - 8, 16), 8)),
        (
            "rms_norm residual over weight",
            be.rms_norm(s, f(4096, 16), Some(f(8192, 16)), f(8192 + 32, 8), f(12288, 16), 8, 1e-5),
        ),
        ("rope x over positions", be.rope(s, f(4096, 16), i(4096 + 32, 2), f(16384, 4), 1, 8)),
        ("kv_append k in the cache", be.kv_append(s, f(512, 8), f(4096, 8), &cache, 0, i(16384, 1))),
        ("kv_append slots in the cache", be.kv_append(s, f(4096, 8), f(8192, 8), &cache, 0, i(256, 1))),
        ("attention out over the tables", be.attention(s, f(4096, 8), &cache, 0, &batch, f(12288 - 4, 8), 1, 0.3)),
        ("attention out in the cache", be.attention(s, f(4096, 8), &cache, 0, &batch, f(512, 8), 1, 0.3)),
        ("copy_blocks pairs in the cache", be.copy_blocks(s, &cache, i(256, 2))),
        ("gather staging over the cache", be.gather_blocks(s, &cache, i(16384, 1), View::new(&r, 768, DType::U8, 256))),
        ("scatter ids in the cache", be.scatter_blocks(s, View::new(&r, 20480, DType::U8, 256), &cache, i(128, 1))),
        ("argmax", be.argmax(s, f(4096, 64), i(4096 + 16, 2), 32)),
        (
            "sample",
            be.sample(
                s,
                f(4096, 64),
                i(4096 + 16, 2),
                32,
                &[SampleParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 1, step: 0 }; 2],
            ),
        ),
    ];
    // Exactly in place is allowed where the op says so (and a plain no-op for cast).
    cases.retain(|(_, r)| !matches!(r, Err(BackendError::Overlap { .. })));
    if let Some((what, got)) = cases.first() {
        return Err(format!("{what}: expected Overlap, got {got:?}").into());
    }
    be.binary(s, BinaryOp::Add, f(4096, 64), f(8192, 64), f(4096, 64)).map_err(fail)?;
    be.cast(s, f(4096, 64), f(4096, 64)).map_err(fail)?;
    be.sync_stream(s).map_err(fail)
}

// ---- gemm -----------------------------------------------------------------------------------------

struct GemmIn {
    args: GemmArgs,
    dts: [DType; 3],
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
}

fn run_gemm<B: Backend>(be: &B, i: &GemmIn) -> R<Vec<f32>> {
    let mut ar = Arena::new(be);
    let a = ar.put(&i.a, i.dts[0])?;
    let b = ar.put(&i.b, i.dts[1])?;
    let c = ar.put(&i.c, i.dts[2])?;
    be.gemm(be.default_stream(), ar.view(a), ar.view(b), ar.view(c), &i.args).map_err(fail)?;
    ar.sync()?;
    ar.get(c)
}

fn ref_gemm(i: &GemmIn) -> Vec<f32> {
    let g = &i.args;
    let (a, b) = (quant(&i.a, i.dts[0]), quant(&i.b, i.dts[1]));
    let mut c = quant(&i.c, i.dts[2]);
    for bi in 0..g.batch {
        for r in 0..g.m {
            for j in 0..g.n {
                let mut s = 0f64;
                for kk in 0..g.k {
                    let av = a[bi * g.stride_a + r * g.k + kk] as f64;
                    let bv =
                        if g.trans_b { b[bi * g.stride_b + j * g.k + kk] } else { b[bi * g.stride_b + kk * g.n + j] };
                    s += av * bv as f64;
                }
                let at = bi * g.stride_c + r * g.n + j;
                let old = if g.beta == 0.0 { 0.0 } else { g.beta as f64 * c[at] as f64 };
                c[at] = (g.alpha as f64 * s + old) as f32;
            }
        }
    }
    quant(&c, i.dts[2])
}

fn gemm_test<B: Backend>(be: &B, want: Want) -> R {
    let mut rng = Rng::new(2);
    let mut cases = Vec::new();
    for dt in FLOATS {
        // Decode (GEMV) shapes, prefill shapes, odd sizes, both layouts.
        for (m, n, k) in
            [(1, 37, 64), (1, 96, 203), (3, 65, 130), (8, 33, 17), (9, 70, 41), (40, 129, 96), (64, 64, 300)]
        {
            cases.push((m, n, k, true, 1, false, [dt, dt, dt]));
        }
        cases.push((5, 31, 47, false, 1, false, [dt, dt, dt]));
        cases.push((33, 17, 9, false, 1, false, [dt, dt, dt]));
        cases.push((4, 24, 20, true, 3, false, [dt, dt, dt]));
        cases.push((17, 12, 8, false, 2, false, [dt, dt, dt]));
        // Activations f32 against stored weights, and mixed outputs.
        cases.push((1, 300, 257, true, 1, false, [DType::F32, dt, DType::F32]));
        cases.push((4, 77, 128, true, 1, false, [DType::F32, dt, DType::F32]));
        cases.push((20, 50, 70, true, 1, false, [DType::F32, dt, DType::F32]));
        cases.push((2, 64, 96, true, 1, false, [dt, dt, DType::F32]));
        cases.push((3, 40, 24, false, 2, false, [DType::F32, dt, DType::F32]));
        cases.push((3, 40, 24, true, 2, true, [DType::F32, dt, DType::F32]));
        cases.push((6, 10, 12, false, 1, false, [dt, DType::F32, DType::F32]));
        cases.push((5, 40, 24, true, 1, false, [DType::F32, dt, dt]));
        if dt != DType::F32 {
            // B widened to f32 past a 32 MiB workspace (CUDA): row slices of an [n, k] weight,
            // k slices of a [k, n] matrix, a B shared by a batch.
            cases.push((2, 4500, 2048, true, 1, false, [DType::F32, dt, DType::F32]));
            cases.push((3, 2048, 4500, false, 1, false, [DType::F32, dt, DType::F32]));
            cases.push((2, 4200, 2048, true, 2, true, [DType::F32, dt, DType::F32]));
        }
    }
    for (ci, (m, n, k, trans_b, batch, shared_b, dts)) in cases.into_iter().enumerate() {
        let (alpha, beta) = match ci % 3 {
            0 => (1.0, 0.0),
            1 => (0.5, 1.0),
            _ => (-1.25, 0.75),
        };
        // Batched entries at padded strides.
        let (sa, sb, sc) = match (batch > 1, shared_b) {
            (true, false) => (m * k + 3, n * k + 5, m * n + 7),
            (true, true) => (m * k + 3, 0, m * n + 7),
            _ => (0, 0, 0),
        };
        let args = GemmArgs {
            m,
            n,
            k,
            trans_b,
            batch,
            stride_a: sa,
            stride_b: sb,
            stride_c: sc,
            alpha,
            beta,
            bf16_activations: false,
        };
        let la = (batch - 1) * sa + m * k;
        let lb = (batch - 1) * sb + n * k;
        let lc = (batch - 1) * sc + m * n;
        let c = if beta == 0.0 { vec![f32::NAN; lc] } else { rng.vec(lc, 1.0) };
        let inp = GemmIn { args, dts, a: rng.vec(la, 1.0), b: rng.vec(lb, 1.0), c };
        let (got, mut wanted) = expect!(be, want, &inp, run_gemm, ref_gemm(&inp));
        let mut got = got;
        // Padding between batch entries is not the op's: compare only the products.
        if batch > 1 {
            let keep = |v: &mut Vec<f32>| {
                let mut out = Vec::new();
                for bi in 0..batch {
                    out.extend_from_slice(&v[bi * sc..bi * sc + m * n]);
                }
                *v = out;
            };
            keep(&mut got);
            keep(&mut wanted);
        }
        // Generic products (no `bf16_activations`) of f32 outputs multiply the stored inputs
        // exactly, widened to f32: nothing is rounded to 16 bits on the way.
        let tol = if dts[2] == DType::F32 && dts[..2].contains(&DType::F32) { 1e-5 } else { tol(&dts) };
        close(
            &got,
            &wanted,
            tol,
            &format!("gemm case {ci} m={m} n={n} k={k} trans_b={trans_b} batch={batch} shared_b={shared_b} {dts:?}"),
        )?;
    }
    Ok(())
}

// ---- elementwise --------------------------------------------------------------------------------

struct EwIn {
    dts: Vec<DType>,
    xs: Vec<Vec<f32>>,
    /// Output written over input 0 (in place).
    in_place: bool,
    kind: Ew,
}

#[derive(Clone, Copy, Debug)]
enum Ew {
    Binary(BinaryOp),
    Unary(UnaryOp),
    SiluMul,
    Cast,
    Softmax(usize),
}

fn run_ew<B: Backend>(be: &B, i: &EwIn) -> R<Vec<f32>> {
    let mut ar = Arena::new(be);
    let ins: Vec<T> = i.xs.iter().zip(&i.dts).map(|(x, dt)| ar.put(x, *dt)).collect::<R<_>>()?;
    let out_dt = *i.dts.last().unwrap();
    let out = if i.in_place { ins[0] } else { ar.out(out_dt, i.xs[0].len(), 7.0)? };
    let s = be.default_stream();
    let r = match i.kind {
        Ew::Binary(op) => be.binary(s, op, ar.view(ins[0]), ar.view(ins[1]), ar.view(out)),
        Ew::Unary(op) => be.unary(s, op, ar.view(ins[0]), ar.view(out)),
        Ew::SiluMul => be.silu_mul(s, ar.view(ins[0]), ar.view(ins[1]), ar.view(out)),
        Ew::Cast => be.cast(s, ar.view(ins[0]), ar.view(out)),
        Ew::Softmax(cols) => be.softmax(s, ar.view(ins[0]), ar.view(out), cols),
    };
    r.map_err(fail)?;
    ar.sync()?;
    ar.get(out)
}

fn silu64(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

fn ref_ew(i: &EwIn) -> Vec<f32> {
    let xs: Vec<Vec<f32>> = i.xs.iter().zip(&i.dts).map(|(x, dt)| quant(x, *dt)).collect();
    let a = &xs[0];
    let out: Vec<f32> = match i.kind {
        Ew::Binary(op) => {
            let b = &xs[1];
            a.iter()
                .enumerate()
                .map(|(j, &x)| {
                    let (x, y) = (x as f64, b[j % b.len()] as f64);
                    (match op {
                        BinaryOp::Add => x + y,
                        BinaryOp::Sub => x - y,
                        BinaryOp::Mul => x * y,
                        BinaryOp::Div => x / y,
                    }) as f32
                })
                .collect()
        }
        Ew::Unary(op) => a
            .iter()
            .map(|&x| {
                let x = x as f64;
                (match op {
                    UnaryOp::Silu => silu64(x),
                    UnaryOp::Exp => x.exp(),
                    UnaryOp::Neg => -x,
                    UnaryOp::Sqrt => x.sqrt(),
                }) as f32
            })
            .collect(),
        Ew::SiluMul => a.iter().zip(&xs[1]).map(|(&g, &u)| (silu64(g as f64) * u as f64) as f32).collect(),
        Ew::Cast => {
            if i.dts[1] == DType::I32 {
                a.iter().map(|&x| x.trunc()).collect()
            } else {
                a.clone()
            }
        }
        Ew::Softmax(cols) => a
            .chunks(cols)
            .flat_map(|row| {
                let m = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
                let e: Vec<f64> = row.iter().map(|&v| (v as f64 - m).exp()).collect();
                let s: f64 = e.iter().sum();
                e.into_iter().map(move |v| (v / s) as f32)
            })
            .collect(),
    };
    quant(&out, *i.dts.last().unwrap())
}

fn ew_case<B: Backend>(be: &B, want: Want, i: &EwIn, what: &str) -> R {
    let (got, wanted) = expect!(be, want, i, run_ew, ref_ew(i));
    close(&got, &wanted, tol(&i.dts), &format!("{what} {:?} {:?} len={}", i.kind, i.dts, i.xs[0].len()))
}

fn binary_test<B: Backend>(be: &B, want: Want) -> R {
    let mut rng = Rng::new(3);
    for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div] {
        for dt in FLOATS {
            for (n, bn, in_place) in [(1, 1, false), (1001, 1001, false), (70_001, 70_001, true), (4 * 77, 77, false)] {
                let a = rng.vec(n, 2.0);
                let mut b = rng.vec(bn, 2.0);
                if op == BinaryOp::Div {
                    b.iter_mut().for_each(|v| *v = 0.5 + v.abs());
                }
                let dts = vec![dt, rng.pick(&FLOATS), if in_place { dt } else { rng.pick(&FLOATS) }];
                ew_case(be, want, &EwIn { dts, xs: vec![a, b], in_place, kind: Ew::Binary(op) }, "binary")?;
            }
        }
    }
    Ok(())
}

fn unary_test<B: Backend>(be: &B, want: Want) -> R {
    let mut rng = Rng::new(4);
    for op in [UnaryOp::Silu, UnaryOp::Exp, UnaryOp::Neg, UnaryOp::Sqrt] {
        for dt in FLOATS {
            for (n, in_place) in [(3, false), (4097, true), (50_003, false)] {
                let mut x = rng.vec(n, 3.0);
                if op == UnaryOp::Sqrt {
                    x.iter_mut().for_each(|v| *v = v.abs());
                }
                let dts = vec![dt, if in_place { dt } else { rng.pick(&FLOATS) }];
                ew_case(be, want, &EwIn { dts, xs: vec![x], in_place, kind: Ew::Unary(op) }, "unary")?;
            }
        }
    }
    // exp(−∞) and exp(−1000) are exactly 0 (a masked position weighs nothing), not the smallest
    // normal; the tolerance of the cases above could not tell.
    let x = vec![f32::NEG_INFINITY, -1000.0, 0.0];
    let i = EwIn { dts: vec![DType::F32, DType::F32], xs: vec![x], in_place: false, kind: Ew::Unary(UnaryOp::Exp) };
    let got = run_ew(be, &i)?;
    exact(&got, &[0.0, 0.0, 1.0], "exp of -inf, -1000, 0")?;
    Ok(())
}

fn silu_mul_test<B: Backend>(be: &B, want: Want) -> R {
    let mut rng = Rng::new(5);
    for dt in FLOATS {
        for (n, in_place) in [(7, false), (8193, true), (100_001, false)] {
            let dts = vec![dt, rng.pick(&FLOATS), if in_place { dt } else { rng.pick(&FLOATS) }];
            let xs = vec![rng.vec(n, 4.0), rng.vec(n, 2.0)];
            ew_case(be, want, &EwIn { dts, xs, in_place, kind: Ew::SiluMul }, "silu_mul")?;
        }
    }
    Ok(())
}

fn cast_test<B: Backend>(be: &B, want: Want) -> R {
    let mut rng = Rng::new(6);
    let all = [DType::F32, DType::F16, DType::BF16, DType::I32];
    for from in all {
        for to in all {
            for n in [5, 3001, 66_000] {
                let x = if from == DType::I32 || to == DType::I32 {
                    // Integers that survive every float dtype exactly.
                    (0..n).map(|_| (rng.below(512) as f32) - 256.0).collect()
                } else {
                    rng.vec(n, 100.0)
                };
                let i = EwIn { dts: vec![from, to], xs: vec![x], in_place: false, kind: Ew::Cast };
                let (got, wanted) = expect!(be, want, &i, run_ew, ref_ew(&i));
                // Casting is exact rounding: compare exactly.
                exact(&got, &wanted, &format!("cast {from} -> {to} len={n}"))?;
            }
        }
    }
    Ok(())
}

fn softmax_test<B: Backend>(be: &B, want: Want) -> R {
    let mut rng = Rng::new(7);
    for dt in FLOATS {
        for (rows, cols, in_place) in
            [(1, 1, false), (3, 17, false), (7, 1000, true), (2, 32_003, false), (64, 129, false)]
        {
            let dts = vec![dt, if in_place { dt } else { rng.pick(&FLOATS) }];
            let xs = vec![rng.vec(rows * cols, 8.0)];
            ew_case(be, want, &EwIn { dts, xs, in_place, kind: Ew::Softmax(cols) }, "softmax")?;
        }
    }
    Ok(())
}

// ---- transformer ops --------------------------------------------------------------------------

struct EmbIn {
    dts: [DType; 2],
    table: Vec<f32>,
    ids: Vec<i32>,
    hidden: usize,
}

fn run_emb<B: Backend>(be: &B, i: &EmbIn) -> R<Vec<f32>> {
    let mut ar = Arena::new(be);
    let t = ar.put(&i.table, i.dts[0])?;
    let ids = ar.put_i32(&i.ids)?;
    let out = ar.out(i.dts[1], i.ids.len() * i.hidden, 9.0)?;
    be.embedding(be.default_stream(), ar.view(t), ar.view(ids), ar.view(out), i.hidden).map_err(fail)?;
    ar.sync()?;
    ar.get(out)
}

fn ref_emb(i: &EmbIn) -> Vec<f32> {
    let t = quant(&i.table, i.dts[0]);
    let out: Vec<f32> =
        i.ids.iter().flat_map(|&id| t[id as usize * i.hidden..(id as usize + 1) * i.hidden].to_vec()).collect();
    quant(&out, i.dts[1])
}

fn embedding_test<B: Backend>(be: &B, want: Want) -> R {
    let mut rng = Rng::new(8);
    for dt in FLOATS {
        for (vocab, hidden, n) in [(1, 1, 1), (50, 33, 7), (1000, 256, 300)] {
            let ids = (0..n).map(|_| rng.below(vocab) as i32).collect();
            let i = EmbIn { dts: [dt, rng.pick(&FLOATS)], table: rng.vec(vocab * hidden, 1.0), ids, hidden };
            let (got, wanted) = expect!(be, want, &i, run_emb, ref_emb(&i));
            close(&got, &wanted, tol(&i.dts), &format!("embedding {:?} vocab={vocab} hidden={hidden}", i.dts))?;
        }
    }
    // A bad id is a typed error, not a crash or a wild read.
    let mut ar = Arena::new(be);
    let t = ar.put(&[1.0; 40], DType::F32)?;
    let ids = ar.put_i32(&[0, 10])?;
    let out = ar.alloc(DType::F32, 8)?;
    // Device backends find bad ids inside the kernel and report them at the next sync, so the
    // check runs on a stream of its own (a pending error must not surface in another test).
    let s = be.new_stream()?;
    let e = be.embedding(&s, ar.view(t), ar.view(ids), ar.view(out), 4).and_then(|_| be.sync_stream(&s));
    if e.is_ok() {
        return Err("embedding accepted id 10 in a vocabulary of 10".into());
    }
    Ok(())
}

struct NormIn {
    dts: [DType; 4],
    x: Vec<f32>,
    res: Option<Vec<f32>>,
    w: Vec<f32>,
    hidden: usize,
    in_place: bool,
}

fn run_norm<B: Backend>(be: &B, i: &NormIn) -> R<(Vec<f32>, Vec<f32>)> {
    let mut ar = Arena::new(be);
    let x = ar.put(&i.x, i.dts[0])?;
    let res = match &i.res {
        Some(r) => Some(ar.put(r, i.dts[1])?),
        None => None,
    };
    let w = ar.put(&i.w, i.dts[2])?;
    let out = if i.in_place { x } else { ar.out(i.dts[3], i.x.len(), 5.0)? };
    be.rms_norm(be.default_stream(), ar.view(x), res.map(|r| ar.view(r)), ar.view(w), ar.view(out), i.hidden, 1e-5)
        .map_err(fail)?;
    ar.sync()?;
    Ok((
        ar.get(out)?,
        match res {
            Some(r) => ar.get(r)?,
            None => Vec::new(),
        },
    ))
}

fn ref_norm(i: &NormIn) -> (Vec<f32>, Vec<f32>) {
    let x = quant(&i.x, i.dts[0]);
    let w = quant(&i.w, i.dts[2]);
    let h = match &i.res {
        Some(r) => {
            let r = quant(r, i.dts[1]);
            quant(&x.iter().zip(&r).map(|(a, b)| a + b).collect::<Vec<_>>(), i.dts[1])
        }
        None => x,
    };
    let mut out = Vec::with_capacity(h.len());
    for row in h.chunks(i.hidden) {
        let ms: f64 = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / i.hidden as f64;
        let inv = 1.0 / (ms + 1e-5).sqrt();
        out.extend(row.iter().zip(&w).map(|(v, g)| (*v as f64 * inv * *g as f64) as f32));
    }
    let res = if i.res.is_some() { h } else { Vec::new() };
    (quant(&out, i.dts[3]), res)
}

fn rms_norm_test<B: Backend>(be: &B, want: Want) -> R {
    let mut rng = Rng::new(9);
    for dt in FLOATS {
        for (rows, hidden) in [(1, 1), (3, 67), (17, 576), (9, 4096)] {
            for (fused, in_place) in [(false, false), (true, false), (true, true)] {
                let out_dt = if in_place { dt } else { rng.pick(&FLOATS) };
                let dts = [dt, rng.pick(&FLOATS), rng.pick(&FLOATS), out_dt];
                let i = NormIn {
                    dts,
                    x: rng.vec(rows * hidden, 2.0),
                    res: fused.then(|| rng.vec(rows * hidden, 2.0)),
                    w: rng.vec(hidden, 1.5),
                    hidden,
                    in_place,
                };
                let ((go, gr), (wo, wr)) = expect!(be, want, &i, run_norm, ref_norm(&i));
                let what = format!("rms_norm {dts:?} rows={rows} hidden={hidden} fused={fused} in_place={in_place}");
                close(&go, &wo, tol(&dts), &what)?;
                close(&gr, &wr, tol(&dts), &format!("{what} (residual)"))?;
            }
        }
    }
    Ok(())
}

struct RopeIn {
    dt: DType,
    x: Vec<f32>,
    pos: Vec<i32>,
    inv_freq: Vec<f32>,
    heads: usize,
    head_dim: usize,
}

fn run_rope<B: Backend>(be: &B, i: &RopeIn) -> R<Vec<f32>> {
    let mut ar = Arena::new(be);
    let x = ar.put(&i.x, i.dt)?;
    let p = ar.put_i32(&i.pos)?;
    let f = ar.put(&i.inv_freq, DType::F32)?;
    be.rope(be.default_stream(), ar.view(x), ar.view(p), ar.view(f), i.heads, i.head_dim).map_err(fail)?;
    ar.sync()?;
    ar.get(x)
}

fn ref_rope(i: &RopeIn) -> Vec<f32> {
    let mut x = quant(&i.x, i.dt);
    let half = i.head_dim / 2;
    for (t, &p) in i.pos.iter().enumerate() {
        for h in 0..i.heads {
            let row = &mut x[(t * i.heads + h) * i.head_dim..][..i.head_dim];
            for d in 0..half {
                // The angle is an f32 product (as every backend computes it), then exact trig.
                let ang = (p as f32 * i.inv_freq[d]) as f64;
                let (s, c) = ang.sin_cos();
                let (a, b) = (row[d] as f64, row[d + half] as f64);
                row[d] = (a * c - b * s) as f32;
                row[d + half] = (b * c + a * s) as f32;
            }
        }
    }
    quant(&x, i.dt)
}

fn rope_test<B: Backend>(be: &B, want: Want) -> R {
    let mut rng = Rng::new(10);
    for dt in FLOATS {
        for (tokens, heads, head_dim, theta) in [(1, 1, 2, 10_000.0f64), (5, 3, 64, 10_000.0), (37, 8, 128, 500_000.0)]
        {
            let inv_freq: Vec<f32> =
                (0..head_dim / 2).map(|d| (1.0 / theta.powf(2.0 * d as f64 / head_dim as f64)) as f32).collect();
            let pos = (0..tokens).map(|_| rng.below(4096) as i32).collect();
            let i = RopeIn { dt, x: rng.vec(tokens * heads * head_dim, 1.0), pos, inv_freq, heads, head_dim };
            let (got, wanted) = expect!(be, want, &i, run_rope, ref_rope(&i));
            close(&got, &wanted, tol(&[dt]), &format!("rope {dt} tokens={tokens} heads={heads} dim={head_dim}"))?;
        }
    }
    Ok(())
}

// ---- paged KV cache ---------------------------------------------------------------------------

fn layout(kv_heads: usize, head_dim: usize, block_tokens: usize, dtype: DType) -> KvLayout {
    KvLayout { layers: 2, kv_heads, head_dim, block_tokens, dtype }
}

fn cache_elems(l: &KvLayout, blocks: usize) -> usize {
    blocks * l.block_bytes() / l.dtype.size_bytes()
}

struct AppendIn {
    l: KvLayout,
    blocks: usize,
    cache: Vec<f32>,
    k_dt: DType,
    k: Vec<f32>,
    v: Vec<f32>,
    slots: Vec<i32>,
}

fn run_append<B: Backend>(be: &B, i: &AppendIn) -> R<Vec<f32>> {
    let mut ar = Arena::new(be);
    let c = ar.put(&i.cache, i.l.dtype)?;
    let k = ar.put(&i.k, i.k_dt)?;
    let v = ar.put(&i.v, i.k_dt)?;
    let s = ar.put_i32(&i.slots)?;
    let cache = KvCacheRef { region: ar.region(c), offset: 0, num_blocks: i.blocks, layout: i.l };
    be.kv_append(be.default_stream(), ar.view(k), ar.view(v), &cache, 1, ar.view(s)).map_err(fail)?;
    ar.sync()?;
    ar.get(c)
}

fn ref_append(i: &AppendIn) -> Vec<f32> {
    let l = &i.l;
    let mut c = quant(&i.cache, l.dtype);
    let (k, v) = (quant(&i.k, i.k_dt), quant(&i.v, i.k_dt));
    for (t, &s) in i.slots.iter().enumerate() {
        let (blk, off) = (s as usize / l.block_tokens, s as usize % l.block_tokens);
        for h in 0..l.kv_heads {
            let src = (t * l.kv_heads + h) * l.head_dim;
            for (kv, data) in [(0, &k), (1, &v)] {
                let dst = l.elem_offset(blk, 1, kv, h, off);
                c[dst..dst + l.head_dim].copy_from_slice(&data[src..src + l.head_dim]);
            }
        }
    }
    quant(&c, l.dtype)
}

fn kv_append_test<B: Backend>(be: &B, want: Want) -> R {
    let mut rng = Rng::new(11);
    for dt in FLOATS {
        for (kvh, hd, bt, tokens) in [(1, 8, 16, 1usize), (2, 64, 16, 37), (8, 128, 16, 5), (3, 40, 7, 20)] {
            let l = layout(kvh, hd, bt, dt);
            let blocks = tokens.div_ceil(bt) + 3;
            // Distinct slots in a random order, crossing block boundaries.
            let mut slots: Vec<i32> = (0..(blocks * bt) as i32).collect();
            for j in (1..slots.len()).rev() {
                slots.swap(j, rng.below(j + 1));
            }
            slots.truncate(tokens);
            let i = AppendIn {
                l,
                blocks,
                cache: rng.vec(cache_elems(&l, blocks), 1.0),
                k_dt: rng.pick(&FLOATS),
                k: rng.vec(tokens * kvh * hd, 1.0),
                v: rng.vec(tokens * kvh * hd, 1.0),
                slots,
            };
            let (got, wanted) = expect!(be, want, &i, run_append, ref_append(&i));
            close(&got, &wanted, tol(&[dt, i.k_dt]), &format!("kv_append {l:?} tokens={tokens}"))?;
        }
    }
    // A slot past the cache is a typed error.
    let l = layout(1, 8, 4, DType::F32);
    let mut ar = Arena::new(be);
    let c = ar.alloc(DType::F32, cache_elems(&l, 2))?;
    let k = ar.put(&[0.5; 8], DType::F32)?;
    let s = ar.put_i32(&[8])?;
    let cache = KvCacheRef { region: ar.region(c), offset: 0, num_blocks: 2, layout: l };
    let st = be.new_stream()?;
    if be.kv_append(&st, ar.view(k), ar.view(k), &cache, 0, ar.view(s)).and_then(|_| be.sync_stream(&st)).is_ok() {
        return Err("kv_append accepted slot 8 in a cache of 8 slots".into());
    }
    Ok(())
}

struct AttnIn {
    l: KvLayout,
    blocks: usize,
    cache: Vec<f32>,
    q_dt: DType,
    out_dt: DType,
    heads: usize,
    q: Vec<f32>,
    q_start: Vec<i32>,
    ctx: Vec<i32>,
    tables: Vec<i32>,
    max_blocks: usize,
    scale: f32,
}

fn run_attn<B: Backend>(be: &B, i: &AttnIn) -> R<Vec<f32>> {
    let mut ar = Arena::new(be);
    let c = ar.put(&i.cache, i.l.dtype)?;
    let q = ar.put(&i.q, i.q_dt)?;
    let qs = ar.put_i32(&i.q_start)?;
    let ctx = ar.put_i32(&i.ctx)?;
    let tb = ar.put_i32(&i.tables)?;
    let out = ar.out(i.out_dt, i.q.len(), 3.0)?;
    let cache = KvCacheRef { region: ar.region(c), offset: 0, num_blocks: i.blocks, layout: i.l };
    let seqs = i.ctx.len();
    let batch = AttnBatch {
        seqs,
        q_start: ar.view(qs),
        ctx_lens: ar.view(ctx),
        block_tables: ar.view(tb),
        max_blocks_per_seq: i.max_blocks,
        max_q_len: (0..seqs).map(|s| (i.q_start[s + 1] - i.q_start[s]) as usize).max().unwrap_or(0),
        max_ctx_len: i.ctx.iter().copied().max().unwrap_or(0) as usize,
    };
    be.attention(be.default_stream(), ar.view(q), &cache, 1, &batch, ar.view(out), i.heads, i.scale).map_err(fail)?;
    ar.sync()?;
    ar.get(out)
}

fn ref_attn(i: &AttnIn) -> Vec<f32> {
    let l = &i.l;
    let (hd, bt) = (l.head_dim, l.block_tokens);
    let c = quant(&i.cache, l.dtype);
    let q = quant(&i.q, i.q_dt);
    let group = i.heads / l.kv_heads;
    let mut out = vec![0f32; q.len()];
    for s in 0..i.ctx.len() {
        let (q0, q1, n_ctx) = (i.q_start[s] as usize, i.q_start[s + 1] as usize, i.ctx[s] as usize);
        let q_len = q1 - q0;
        for j in 0..q_len {
            let pos = n_ctx - q_len + j;
            for h in 0..i.heads {
                let kvh = h / group;
                let qrow = &q[((q0 + j) * i.heads + h) * hd..][..hd];
                let at = |p: usize, kv: usize| {
                    let blk = i.tables[s * i.max_blocks + p / bt] as usize;
                    l.elem_offset(blk, 1, kv, kvh, p % bt)
                };
                let scores: Vec<f64> = (0..=pos)
                    .map(|p| {
                        let k = &c[at(p, 0)..][..hd];
                        qrow.iter().zip(k).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * i.scale as f64
                    })
                    .collect();
                let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|v| (v - m).exp()).collect();
                let sum: f64 = e.iter().sum();
                let o = &mut out[((q0 + j) * i.heads + h) * hd..][..hd];
                for d in 0..hd {
                    let acc: f64 = (0..=pos).map(|p| e[p] * c[at(p, 1) + d] as f64).sum();
                    o[d] = (acc / sum) as f32;
                }
            }
        }
    }
    quant(&out, i.out_dt)
}

/// A random ragged batch: decode rows, chunked prefill and whole prompts, over shuffled blocks.
fn attn_case(
    rng: &mut Rng,
    dt: DType,
    kvh: usize,
    group: usize,
    hd: usize,
    bt: usize,
    seqs: &[(usize, usize)],
) -> AttnIn {
    let l = layout(kvh, hd, bt, dt);
    let max_blocks = seqs.iter().map(|(ctx, _)| ctx.div_ceil(bt)).max().unwrap_or(0) + 1;
    // Exactly the blocks the contexts need (plus two never named), shuffled.
    let blocks = seqs.iter().map(|(ctx, _)| ctx.div_ceil(bt)).sum::<usize>() + 2;
    let mut ids: Vec<i32> = (0..blocks as i32).collect();
    for j in (1..ids.len()).rev() {
        ids.swap(j, rng.below(j + 1));
    }
    let mut tables = vec![0i32; seqs.len() * max_blocks];
    let mut next = 0;
    let mut q_start = vec![0i32];
    for (s, &(ctx, q_len)) in seqs.iter().enumerate() {
        for b in 0..ctx.div_ceil(bt) {
            tables[s * max_blocks + b] = ids[next];
            next += 1;
        }
        q_start.push(q_start[s] + q_len as i32);
    }
    let mut cache = rng.vec(cache_elems(&l, blocks), 1.0);
    // Slots past each context hold large junk: a kernel that reads them unmasked fails.
    for (s, &(ctx, _)) in seqs.iter().enumerate() {
        for p in ctx..ctx.div_ceil(bt) * bt {
            let blk = tables[s * max_blocks + p / bt] as usize;
            for kv in 0..2 {
                for h in 0..kvh {
                    let at = l.elem_offset(blk, 1, kv, h, p % bt);
                    cache[at..at + hd].iter_mut().for_each(|v| *v = 1e4);
                }
            }
        }
    }
    let rows = *q_start.last().unwrap() as usize;
    let heads = kvh * group;
    AttnIn {
        l,
        blocks,
        cache,
        q_dt: rng.pick(&FLOATS),
        out_dt: rng.pick(&FLOATS),
        heads,
        q: rng.vec(rows * heads * hd, 2.0),
        q_start,
        ctx: seqs.iter().map(|(c, _)| *c as i32).collect(),
        tables,
        max_blocks,
        scale: 1.0 / (hd as f32).sqrt(),
    }
}

fn attention_test<B: Backend>(be: &B, want: Want) -> R {
    let mut rng = Rng::new(12);
    for dt in FLOATS {
        for group in [1, 4, 8] {
            for (kvh, hd, bt) in [(1, 64, 16), (2, 128, 16), (2, 32, 8)] {
                // (context, query rows): decode at page edges, chunked prefill, whole prompts.
                let seqs = [(1, 1), (16, 1), (17, 1), (45, 1), (33, 5), (20, 20), (70, 3)];
                let take = 2 + rng.below(seqs.len() - 1);
                let mut pick: Vec<(usize, usize)> = (0..take).map(|_| rng.pick(&seqs)).collect();
                pick.push((bt * 3 + 1, 1));
                let i = attn_case(&mut rng, dt, kvh, group, hd, bt, &pick);
                let (got, wanted) = expect!(be, want, &i, run_attn, ref_attn(&i));
                let what = format!(
                    "attention {dt} q={} out={} group={group} kvh={kvh} hd={hd} bt={bt} seqs={pick:?}",
                    i.q_dt, i.out_dt
                );
                close(&got, &wanted, tol(&[dt, i.q_dt, i.out_dt]), &what)?;
            }
        }
    }
    // A long decode batch (several sequences, contexts over many blocks).
    let i = attn_case(&mut rng, DType::BF16, 2, 4, 128, 16, &[(300, 1), (17, 1), (129, 1), (64, 1)]);
    let (got, wanted) = expect!(be, want, &i, run_attn, ref_attn(&i));
    close(&got, &wanted, tol(&[DType::BF16]), "attention long decode batch")?;
    // A mixed step (decode rows next to a prefill chunk): decode rows take the decode kernel.
    let i = attn_case(&mut rng, DType::F16, 2, 4, 64, 16, &[(40, 1), (33, 5), (17, 1)]);
    let (got, wanted) = expect!(be, want, &i, run_attn, ref_attn(&i));
    close(&got, &wanted, tol(&[DType::F16, i.q_dt, i.out_dt]), "attention mixed step")?;
    expect_dispatch!(be, "mixed step", |d| d.decode.is_some() && d.prefill == Some(PrefillRows::MultiRow));
    // A block id outside the cache is a typed error.
    let mut bad = attn_case(&mut rng, DType::F32, 1, 1, 8, 4, &[(5, 1)]);
    bad.tables[1] = bad.blocks as i32;
    if run_attn(be, &bad).is_ok() {
        return Err("attention accepted a block id past the cache".into());
    }
    Ok(())
}

/// On the CUDA backend, checks which kernels the calling thread's last attention call used (the
/// dispatch is host-side logic, unit-tested in `cuda/dispatch.rs`; this checks it end to end).
/// Other backends have one attention path: nothing to check.
#[cfg(feature = "cuda")]
fn check_dispatch<B: Backend>(be: &B, what: &str, ok: impl Fn(&AttnDispatch) -> bool) -> R {
    if let Some(c) = (be as &dyn std::any::Any).downcast_ref::<djinn_backend::cuda::CudaBackend>() {
        let d = c.last_attention().ok_or_else(|| format!("{what}: no attention dispatch recorded"))?;
        if !ok(&d) {
            return Err(format!("{what}: attention used {d:?}").into());
        }
    }
    Ok(())
}

/// The shapes real models have: GQA groups 1–8 (Qwen2.5-7B has 7), head dims 64–256, contexts
/// past 4096 (forced split-K partitions), and a batch whose partials overflow the workspace
/// (fewer, longer partitions). Every case is a mixed step or a long decode batch.
fn attention_shapes_test<B: Backend>(be: &B, want: Want) -> R {
    let mut rng = Rng::new(21);
    for group in 1..=8 {
        for hd in [64, 80, 96, 128, 256] {
            let dt = FLOATS[(group + hd) % 3];
            let i = attn_case(&mut rng, dt, 2, group, hd, 16, &[(40, 1), (33, 5), (17, 1)]);
            let (got, wanted) = expect!(be, want, &i, run_attn, ref_attn(&i));
            let what = format!("attention {dt} q={} out={} group={group} hd={hd}", i.q_dt, i.out_dt);
            close(&got, &wanted, tol(&[dt, i.q_dt, i.out_dt]), &what)?;
            // f32 caches at head_dim 256 need 64 lanes of 16 bytes: the general kernel's case.
            expect_dispatch!(be, &what, |d| d.decode.is_some() != (dt == DType::F32 && hd == 256));
        }
    }
    // Contexts past 4096: at least two partitions per sequence.
    let seqs = [(5000, 1), (4097, 1), (9000, 1), (300, 1)];
    let i = attn_case(&mut rng, DType::BF16, 1, 7, 128, 16, &seqs);
    let (got, wanted) = expect!(be, want, &i, run_attn, ref_attn(&i));
    close(&got, &wanted, tol(&[DType::BF16, i.q_dt, i.out_dt]), "attention decode past 4096")?;
    expect_dispatch!(be, "decode past 4096", |d| d.decode.is_some_and(|p| p.parts >= 3));
    // A long context in a mixed step.
    let i = attn_case(&mut rng, DType::F16, 1, 6, 128, 16, &[(9000, 1), (4200, 8)]);
    let (got, wanted) = expect!(be, want, &i, run_attn, ref_attn(&i));
    close(&got, &wanted, tol(&[DType::F16, i.q_dt, i.out_dt]), "attention mixed past 4096")?;
    expect_dispatch!(be, "mixed past 4096", |d| d.decode.is_some() && d.prefill == Some(PrefillRows::MultiRow));
    // 4000 decode rows × 8 heads next to a 12289-token context: four 4096-token partitions'
    // partials (4 × 4000 × 8 × 66 f32 = 34 MB) overflow the 32 MiB workspace, so the plan takes
    // three longer ones.
    let mut seqs: Vec<(usize, usize)> = (0..3999).map(|j| (1 + j % 20, 1)).collect();
    seqs.push((3 * 4096 + 1, 1));
    let i = attn_case(&mut rng, DType::F16, 1, 8, 64, 16, &seqs);
    let (got, wanted) = expect!(be, want, &i, run_attn, ref_attn(&i));
    close(&got, &wanted, tol(&[DType::F16, i.q_dt, i.out_dt]), "attention workspace-limited decode")?;
    expect_dispatch!(be, "workspace-limited decode", |d| d.decode.is_some_and(|p| p.part_tokens > 4096));
    Ok(())
}

// ---- block moves ------------------------------------------------------------------------------

struct BlocksIn {
    l: KvLayout,
    blocks: usize,
    cache: Vec<f32>,
    pairs: Vec<i32>,
    gather: Vec<i32>,
    scatter: Vec<i32>,
}

/// Returns (cache after copy_blocks, staging after gather, cache after scatter).
fn run_blocks<B: Backend>(be: &B, i: &BlocksIn) -> R<(Vec<u8>, Vec<u8>, Vec<u8>)> {
    let bb = i.l.block_bytes();
    let mut ar = Arena::new(be);
    let c = ar.put(&i.cache, i.l.dtype)?;
    let pairs = ar.put_i32(&i.pairs)?;
    let g = ar.put_i32(&i.gather)?;
    let sc = ar.put_i32(&i.scatter)?;
    let st = ar.alloc(DType::U8, i.gather.len() * bb)?;
    let cache = KvCacheRef { region: ar.region(c), offset: 0, num_blocks: i.blocks, layout: i.l };
    let s = be.default_stream();
    be.copy_blocks(s, &cache, ar.view(pairs)).map_err(fail)?;
    ar.sync()?;
    let after_copy = ar.bytes(c)?;
    be.gather_blocks(s, &cache, ar.view(g), ar.view(st)).map_err(fail)?;
    ar.sync()?;
    let staging = ar.bytes(st)?;
    be.scatter_blocks(s, ar.view(st), &cache, ar.view(sc)).map_err(fail)?;
    ar.sync()?;
    Ok((after_copy, staging, ar.bytes(c)?))
}

fn ref_blocks(i: &BlocksIn) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let bb = i.l.block_bytes();
    let mut c = encode(&i.cache, i.l.dtype);
    for p in i.pairs.chunks(2) {
        let src = c[p[0] as usize * bb..][..bb].to_vec();
        c[p[1] as usize * bb..][..bb].copy_from_slice(&src);
    }
    let after_copy = c.clone();
    let staging: Vec<u8> = i.gather.iter().flat_map(|&b| c[b as usize * bb..][..bb].to_vec()).collect();
    for (n, &b) in i.scatter.iter().enumerate() {
        c[b as usize * bb..][..bb].copy_from_slice(&staging[n * bb..][..bb]);
    }
    (after_copy, staging, c)
}

fn blocks_test<B: Backend>(be: &B, want: Want) -> R {
    let mut rng = Rng::new(13);
    for dt in FLOATS {
        for (kvh, hd, bt, blocks) in [(1, 8, 16, 6), (2, 64, 16, 24), (4, 32, 5, 40)] {
            let l = layout(kvh, hd, bt, dt);
            let mut ids: Vec<i32> = (0..blocks as i32).collect();
            for j in (1..ids.len()).rev() {
                ids.swap(j, rng.below(j + 1));
            }
            let third = blocks / 3;
            // Sources from the first third, destinations from the second: disjoint.
            let pairs: Vec<i32> = (0..third).flat_map(|n| [ids[n], ids[third + n]]).collect();
            let gather: Vec<i32> = ids[..blocks / 2].to_vec();
            let scatter: Vec<i32> = ids[blocks - blocks / 2..].to_vec();
            let i = BlocksIn { l, blocks, cache: rng.vec(cache_elems(&l, blocks), 1.0), pairs, gather, scatter };
            let ((c1, s1, c2), (w1, ws, w2)) = expect!(be, want, &i, run_blocks, ref_blocks(&i));
            let what = format!("blocks {l:?} n={blocks}");
            exact(&c1, &w1, &format!("{what}: copy_blocks"))?;
            exact(&s1, &ws, &format!("{what}: gather_blocks"))?;
            exact(&c2, &w2, &format!("{what}: scatter_blocks"))?;
        }
    }
    Ok(())
}

// ---- sampling ---------------------------------------------------------------------------------

struct SampleIn {
    dt: DType,
    logits: Vec<f32>,
    vocab: usize,
    params: Vec<SampleParams>,
}

/// (argmax ids, sampled ids).
fn run_sample<B: Backend>(be: &B, i: &SampleIn) -> R<(Vec<i32>, Vec<i32>)> {
    let rows = i.params.len();
    let mut ar = Arena::new(be);
    let l = ar.put(&i.logits, i.dt)?;
    let am = ar.put_i32(&vec![-7; rows])?;
    let sm = ar.put_i32(&vec![-7; rows])?;
    let s = be.default_stream();
    be.argmax(s, ar.view(l), ar.view(am), i.vocab).map_err(fail)?;
    be.sample(s, ar.view(l), ar.view(sm), i.vocab, &i.params).map_err(fail)?;
    ar.sync()?;
    Ok((ar.get_i32(am)?, ar.get_i32(sm)?))
}

fn ref_argmax(row: &[f32]) -> i32 {
    let mut best = 0;
    for (j, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = j;
        }
    }
    best as i32
}

/// The sampling contract of `SampleParams`, written out directly.
fn ref_sample_row(row: &[f32], p: &SampleParams) -> i32 {
    if p.temperature.is_nan() || p.temperature <= 0.0 || !(1.0 / p.temperature).is_finite() || p.top_k == 1 {
        return ref_argmax(row);
    }
    let mut cand: Vec<usize> = (0..row.len()).collect();
    cand.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap().then(a.cmp(&b)));
    if p.top_k > 0 {
        // usize: any u32 top_k, up to u32::MAX, is a plain cut (a no-op past the vocabulary).
        cand.truncate(p.top_k as usize);
    }
    let max = row[cand[0]];
    let w = |j: usize| ((row[j] - max) / p.temperature).exp();
    if p.top_p < 1.0 {
        let total: f32 = cand.iter().map(|&j| w(j)).sum();
        let mut cum = 0.0;
        let mut keep = cand.len();
        for (n, &j) in cand.iter().enumerate() {
            cum += w(j);
            if cum >= p.top_p * total {
                keep = n + 1;
                break;
            }
        }
        cand.truncate(keep);
    }
    cand.sort();
    let total: f32 = cand.iter().map(|&j| w(j)).sum();
    let target = sample_uniform(p.seed, p.step) * total;
    let mut cum = 0.0;
    for &j in &cand {
        cum += w(j);
        if cum > target {
            return j as i32;
        }
    }
    *cand.last().unwrap() as i32
}

fn ref_sample(i: &SampleIn) -> (Vec<i32>, Vec<i32>) {
    let l = quant(&i.logits, i.dt);
    let rows: Vec<&[f32]> = l.chunks(i.vocab).collect();
    (
        rows.iter().map(|r| ref_argmax(r)).collect(),
        rows.iter().zip(&i.params).map(|(r, p)| ref_sample_row(r, p)).collect(),
    )
}

fn sample_test<B: Backend>(be: &B, want: Want) -> R {
    let mut rng = Rng::new(14);
    for dt in FLOATS {
        for (rows, vocab) in [(1, 1), (3, 17), (6, 1003), (4, 32_003)] {
            let mut logits = rng.vec(rows * vocab, 6.0);
            // Ties: the first maximum must win.
            if vocab > 10 {
                logits[3] = 50.0;
                logits[7] = 50.0;
            }
            let params = (0..rows)
                .map(|r| SampleParams {
                    // 1e-40: 1/T overflows; such tiny temperatures are greedy.
                    temperature: [0.0, 0.7, 1.0, 1.3, 1e-40][(r + rows) % 5],
                    top_k: [0, 1, 5, 40][rng.below(4)],
                    top_p: [1.0, 0.9, 0.5][rng.below(3)],
                    seed: rng.next(),
                    step: rng.below(1000) as u64,
                })
                .collect();
            let i = SampleIn { dt, logits, vocab, params };
            let ((ga, gs), (wa, ws)) = expect!(be, want, &i, run_sample, ref_sample(&i));
            exact(&ga, &wa, &format!("argmax {dt} rows={rows} vocab={vocab}"))?;
            exact(&gs, &ws, &format!("sample {dt} rows={rows} vocab={vocab} {:?}", i.params))?;
        }
    }
    // Reproducible per (seed, step), and never outside the top-k.
    let vocab = 500;
    let logits = rng.vec(vocab, 3.0);
    let mut top: Vec<usize> = (0..vocab).collect();
    top.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap());
    let steps = 64;
    let params: Vec<SampleParams> = (0..steps)
        .map(|s| SampleParams { temperature: 1.0, top_k: 3, top_p: 1.0, seed: 42, step: s as u64 / 2 })
        .collect();
    let i = SampleIn { dt: DType::F32, logits: logits.repeat(steps), vocab, params };
    let (_, ids) = run_sample(be, &i)?;
    for s in 0..steps / 2 {
        if ids[2 * s] != ids[2 * s + 1] {
            return Err(format!("sample not reproducible at step {s}: {} vs {}", ids[2 * s], ids[2 * s + 1]).into());
        }
    }
    if let Some(bad) = ids.iter().find(|&&t| !top[..3].contains(&(t as usize))) {
        return Err(format!("sample drew {bad} outside the top 3 {:?}", &top[..3]).into());
    }
    let distinct = ids.iter().collect::<std::collections::BTreeSet<_>>().len();
    if distinct < 2 {
        return Err("32 temperature-1 draws over three candidates all gave one id".into());
    }
    Ok(())
}

/// Real vocabulary sizes (Llama-2 32k, Llama-3 128k, Qwen2.5 152k) with `top_k` around the
/// vocabulary and absurd (2^31, u32::MAX: a request field no server may trust). Every backend
/// clamps `top_k` to the vocabulary, so these draw exactly what `top_k` = 0 draws.
fn sample_vocab_test<B: Backend>(be: &B, want: Want) -> R {
    let mut rng = Rng::new(15);
    for (vocab, dt) in [(32_000, DType::F32), (128_256, DType::BF16), (152_064, DType::F16)] {
        let v = vocab as u32;
        let top_ks = [0, 50, v - 1, v, v + 1, 1 << 31, u32::MAX];
        let logits = rng.vec(vocab, 4.0).repeat(top_ks.len());
        let seed = rng.next();
        let params: Vec<SampleParams> =
            top_ks.iter().map(|&top_k| SampleParams { temperature: 0.8, top_k, top_p: 1.0, seed, step: 3 }).collect();
        let i = SampleIn { dt, logits, vocab, params };
        let ((ga, gs), (wa, ws)) = expect!(be, want, &i, run_sample, ref_sample(&i));
        exact(&ga, &wa, &format!("argmax {dt} vocab={vocab}"))?;
        exact(&gs, &ws, &format!("sample {dt} vocab={vocab} top_k={top_ks:?}"))?;
        // Same row, same draw: every cut at or past the vocabulary equals no cut.
        if let Some(j) = (3..top_ks.len()).find(|&j| gs[j] != gs[0]) {
            return Err(format!("vocab {vocab}: top_k {} drew {}, top_k 0 drew {}", top_ks[j], gs[j], gs[0]).into());
        }
    }
    Ok(())
}

// ---- harness ----------------------------------------------------------------------------------

type Body<B> = fn(&B, Want) -> R;

fn bodies<B: Backend>() -> Vec<(&'static str, Body<B>)> {
    vec![
        ("memory", memory::<B>),
        ("overlap", overlap_test::<B>),
        ("gemm", gemm_test::<B>),
        ("binary", binary_test::<B>),
        ("unary", unary_test::<B>),
        ("cast", cast_test::<B>),
        ("silu_mul", silu_mul_test::<B>),
        ("softmax", softmax_test::<B>),
        ("embedding", embedding_test::<B>),
        ("rms_norm", rms_norm_test::<B>),
        ("rope", rope_test::<B>),
        ("kv_append", kv_append_test::<B>),
        ("attention", attention_test::<B>),
        ("attention_shapes", attention_shapes_test::<B>),
        ("blocks", blocks_test::<B>),
        ("sample", sample_test::<B>),
        ("sample_vocab", sample_vocab_test::<B>),
    ]
}

/// The op suite; `cpu` = the backend every result is compared with (None: the scalar reference).
struct Ops {
    cpu: Option<Arc<CpuBackend>>,
}

impl gpu::Suite for Ops {
    fn trials<B: Backend>(&self, kind: &str, backend: Result<Arc<B>, String>) -> Vec<Trial> {
        bodies::<B>()
            .into_iter()
            .map(|(name, body)| {
                let name = format!("{kind}::{name}");
                match &backend {
                    Ok(be) => {
                        let (be, cpu) = (be.clone(), self.cpu.clone());
                        Trial::test(name, move || {
                            // Trials run in parallel: each on a handle (stream, workspace, error
                            // word) of its own, as every user of a device must.
                            let be = be.handle().map_err(fail)?;
                            let want = match &cpu {
                                Some(c) => Want::Cpu(c),
                                None => Want::Reference,
                            };
                            body(&be, want)
                        })
                    }
                    Err(why) => gpu::ignored(name, why),
                }
            })
            .collect()
    }
}

fn main() {
    let args = Arguments::from_args();
    let cpu = Arc::new(CpuBackend::new().expect("cpu backend"));
    let mut all = gpu::Suite::trials(&Ops { cpu: None }, "cpu", Ok(cpu.clone()));
    all.extend(gpu::cuda_trials("backend_ops", &Ops { cpu: Some(cpu) }));
    libtest_mimic::run(&args, all).exit();
}
