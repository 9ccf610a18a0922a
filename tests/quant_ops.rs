//! Quantized-weight ops through the [`Backend`] trait: `gemm_quant` (decode GEMV, batched decode
//! and prefill shapes) and `embedding_quant` over every GGML type, one test body per backend,
//! against a scalar reference written here (`dequantize_row`, then an f64 product with the f32
//! activations).
//!
//! Bound: the kernels multiply 16-bit activations (one f32 scale per 32), so each output may
//! differ from the reference by the activation rounding, at most
//! `Σ_blocks (max|x_block| / 32767) / 2 · Σ_block |w_i|`, plus f32 rounding (1e-4 here).
//! Embeddings must match the dequantized rows exactly.
//!
//! CUDA has no quantized kernels: its backend reports `quantized_weights() == false` and the
//! model dequantizes quantized weights to the compute dtype at load, so the CUDA trial is
//! ignored with that reason.

use djinn_backend::cpu::CpuBackend;
use djinn_backend::quant::{dequantize_row, quantize_row};
use djinn_backend::{Backend, DType, QuantType, View};

fn lcg(z: &mut u64) -> f32 {
    *z = z.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
    ((*z >> 40) as f32 / (1u64 << 24) as f32) - 0.5
}

fn f32_bytes(x: &[f32]) -> Vec<u8> {
    x.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn gemm_quant_body<B: Backend>(be: &B) {
    let s = be.default_stream();
    let mut z = 19u64;
    for t in QuantType::ALL {
        for (n, k) in [(3, 256), (70, 768), (257, 512)] {
            let wf: Vec<f32> = (0..n * k).map(|_| lcg(&mut z)).collect();
            let mut wq = vec![0u8; n * t.row_bytes(k).unwrap()];
            quantize_row(t, &wf, &mut wq);
            let mut wd = vec![0f32; n * k];
            dequantize_row(t, &wq, &mut wd);
            for m in [1, 2, 4, 8, 17] {
                let x: Vec<f32> = (0..m * k).map(|_| lcg(&mut z) * 3.0).collect();
                let (wo, xo) = (0, wq.len().next_multiple_of(256));
                let co = xo + m * k * 4;
                let region = be.reserve(co + m * n * 4).unwrap();
                be.write(&region, wo, &wq).unwrap();
                be.write(&region, xo, &f32_bytes(&x)).unwrap();
                let (a, w) = (View::new(&region, xo, DType::F32, m * k), View::new(&region, wo, DType::U8, wq.len()));
                let c = View::new(&region, co, DType::F32, m * n);
                be.gemm_quant(s, a, w, t, c, m, n, k).unwrap();
                be.sync_stream(s).unwrap();
                let mut cb = vec![0u8; m * n * 4];
                be.read(&region, co, &mut cb).unwrap();
                let got: Vec<f32> = cb.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
                for r in 0..m {
                    for j in 0..n {
                        let (xr, wr) = (&x[r * k..(r + 1) * k], &wd[j * k..(j + 1) * k]);
                        let exact: f64 = xr.iter().zip(wr).map(|(a, b)| *a as f64 * *b as f64).sum();
                        let bound: f64 = xr
                            .chunks(32)
                            .zip(wr.chunks(32))
                            .map(|(xc, wc)| {
                                let d = xc.iter().fold(0f32, |a, v| a.max(v.abs())) as f64 / 32767.0;
                                d / 2.0 * wc.iter().map(|v| v.abs() as f64).sum::<f64>()
                            })
                            .sum::<f64>()
                            + 1e-4;
                        let g = got[r * n + j] as f64;
                        assert!(
                            (g - exact).abs() <= bound,
                            "{t} m={m} n={n} k={k} c[{r}][{j}]: {g} vs {exact} (bound {bound})"
                        );
                    }
                }
            }
        }
    }
}

fn embedding_quant_body<B: Backend>(be: &B) {
    let s = be.default_stream();
    let mut z = 23u64;
    let (vocab, hidden) = (9, 512);
    for t in QuantType::ALL {
        let wf: Vec<f32> = (0..vocab * hidden).map(|_| lcg(&mut z)).collect();
        let mut wq = vec![0u8; vocab * t.row_bytes(hidden).unwrap()];
        quantize_row(t, &wf, &mut wq);
        let mut wd = vec![0f32; vocab * hidden];
        dequantize_row(t, &wq, &mut wd);
        let ids = [8i32, 0, 3, 3];
        let io = wq.len().next_multiple_of(256);
        let oo = io + 256;
        let region = be.reserve(oo + ids.len() * hidden * 4).unwrap();
        be.write(&region, 0, &wq).unwrap();
        be.write(&region, io, &ids.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
        let table = View::new(&region, 0, DType::U8, wq.len());
        let (idv, out) =
            (View::new(&region, io, DType::I32, ids.len()), View::new(&region, oo, DType::F32, ids.len() * hidden));
        be.embedding_quant(s, table, t, idv, out, hidden).unwrap();
        be.sync_stream(s).unwrap();
        let mut ob = vec![0u8; ids.len() * hidden * 4];
        be.read(&region, oo, &mut ob).unwrap();
        for (i, &id) in ids.iter().enumerate() {
            for e in 0..hidden {
                let g = f32::from_le_bytes(ob[(i * hidden + e) * 4..][..4].try_into().unwrap());
                assert_eq!(g, wd[id as usize * hidden + e], "{t} ids[{i}] element {e}");
            }
        }
        // Out-of-range ids are errors, not reads past the table.
        be.write(&region, io, &(vocab as i32).to_le_bytes()).unwrap();
        assert!(be.embedding_quant(s, table, t, idv, out, hidden).is_err(), "{t}: id past the table accepted");
    }
}

#[test]
fn cpu_gemm_quant() {
    gemm_quant_body(&CpuBackend::with_threads(2).unwrap());
}

#[test]
fn cpu_embedding_quant() {
    embedding_quant_body(&CpuBackend::with_threads(2).unwrap());
}

#[test]
#[ignore = "CUDA has no quantized kernels: quantized weights are dequantized to the compute dtype at load"]
fn cuda_gemm_quant() {}

#[test]
#[ignore = "CUDA has no quantized kernels: quantized weights are dequantized to the compute dtype at load"]
fn cuda_embedding_quant() {}
