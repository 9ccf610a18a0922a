use super::*;
use crate::cpu::gemm::simd_levels_available;
use crate::quant::quantize_row;
use crate::DType;

fn lcg(z: &mut u64) -> f32 {
    *z = z.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
    ((*z >> 40) as f32 / (1u64 << 24) as f32) - 0.5
}

/// Every kernel this machine can run, for every type and 1..=9 activation rows, against the
/// scalar reference (dequantize, then an f64 product with the f32 activations) within the
/// activation-rounding bound stated in the module docs, and against the portable kernel (the
/// same integer sums) to f32 rounding.
#[test]
fn every_quant_kernel_matches_the_scalar_reference() {
    let be = CpuBackend::with_threads(2).unwrap();
    let mut z = 11u64;
    for t in QuantType::ALL {
        for (n, k) in [(1, 256), (7, 512), (37, 768), (130, 1536)] {
            let mut wf: Vec<f32> = (0..n * k).map(|_| lcg(&mut z)).collect();
            let mut wq = vec![0u8; n * t.row_bytes(k).unwrap()];
            quantize_row(t, &wf, &mut wq);
            dequantize_row(t, &wq, &mut wf);
            for m in [1, 2, 3, 4, 5, 9] {
                let mut x: Vec<f32> = (0..m * k).map(|_| lcg(&mut z) * 4.0).collect();
                let mut want = vec![0f32; m * n];
                for level in simd_levels_available() {
                    let mut c = vec![f32::NAN; m * n];
                    let ra = Raw { ptr: x.as_mut_ptr() as *mut u8, dtype: DType::F32, len: m * k };
                    let rc = Raw { ptr: c.as_mut_ptr() as *mut u8, dtype: DType::F32, len: m * n };
                    gemm_at(level, &be, &ra, wq.as_ptr(), t, &rc, m, n, k);
                    for r in 0..m {
                        let xr = &x[r * k..(r + 1) * k];
                        for j in 0..n {
                            let wr = &wf[j * k..(j + 1) * k];
                            let exact: f64 = wr.iter().zip(xr).map(|(a, b)| *a as f64 * *b as f64).sum();
                            // Activation rounding (16-bit): half a step of each 32-block's scale.
                            let bound: f64 = wr
                                .chunks(32)
                                .zip(xr.chunks(32))
                                .map(|(wc, xc)| {
                                    let d = xc.iter().fold(0f32, |a, v| a.max(v.abs())) as f64 / 32767.0;
                                    d / 2.0 * wc.iter().map(|v| v.abs() as f64).sum::<f64>()
                                })
                                .sum();
                            let got = c[r * n + j] as f64;
                            assert!(
                                (got - exact).abs() <= bound * 1.01 + 1e-4,
                                "{level:?} {t} n={n} k={k} m={m}: c[{r}][{j}] = {got}, exact {exact}, bound {bound}"
                            );
                        }
                    }
                    if level == SimdLevel::Portable {
                        want.clone_from(&c);
                    }
                }
                // The vector kernels against the portable one: same integers, f32 rounding.
                for level in simd_levels_available().into_iter().filter(|l| *l != SimdLevel::Portable) {
                    let mut c = vec![0f32; m * n];
                    let ra = Raw { ptr: x.as_mut_ptr() as *mut u8, dtype: DType::F32, len: m * k };
                    let rc = Raw { ptr: c.as_mut_ptr() as *mut u8, dtype: DType::F32, len: m * n };
                    gemm_at(level, &be, &ra, wq.as_ptr(), t, &rc, m, n, k);
                    for (i, (g, p)) in c.iter().zip(&want).enumerate() {
                        let mag: f32 = 1e-4 * (1.0 + k as f32 * 0.05);
                        assert!((g - p).abs() <= mag, "{level:?} {t} n={n} k={k} m={m}: [{i}] {g} vs portable {p}");
                    }
                }
            }
        }
    }
}

/// Batch invariance (preemption by recomputation relies on it): row `r` of an `m`-row product
/// bit-equals the product of that row alone, for every kernel, type and batch size.
#[test]
fn quant_gemm_rows_are_batch_invariant() {
    let be = CpuBackend::with_threads(2).unwrap();
    let mut z = 23u64;
    let (n, k) = (70, 512);
    for t in QuantType::ALL {
        let wf: Vec<f32> = (0..n * k).map(|_| lcg(&mut z)).collect();
        let mut wq = vec![0u8; n * t.row_bytes(k).unwrap()];
        quantize_row(t, &wf, &mut wq);
        let m = 9;
        let mut x: Vec<f32> = (0..m * k).map(|_| lcg(&mut z) * 3.0).collect();
        for level in simd_levels_available() {
            let mut alone = vec![0f32; m * n];
            for r in 0..m {
                let ra = Raw { ptr: x[r * k..].as_mut_ptr() as *mut u8, dtype: DType::F32, len: k };
                let rc = Raw { ptr: alone[r * n..].as_mut_ptr() as *mut u8, dtype: DType::F32, len: n };
                gemm_at(level, &be, &ra, wq.as_ptr(), t, &rc, 1, n, k);
            }
            for rows in 2..=m {
                let mut c = vec![f32::NAN; rows * n];
                let ra = Raw { ptr: x.as_mut_ptr() as *mut u8, dtype: DType::F32, len: rows * k };
                let rc = Raw { ptr: c.as_mut_ptr() as *mut u8, dtype: DType::F32, len: rows * n };
                gemm_at(level, &be, &ra, wq.as_ptr(), t, &rc, rows, n, k);
                for (i, (a, b)) in c.iter().zip(&alone).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "{level:?} {t} {rows} rows: [{}][{}] {a} vs alone {b}",
                        i / n,
                        i % n
                    );
                }
            }
        }
    }
}

#[test]
fn quant_embedding_is_the_dequantized_row() {
    let mut z = 5u64;
    for t in QuantType::ALL {
        let (vocab, hidden) = (6, 512);
        let wf: Vec<f32> = (0..vocab * hidden).map(|_| lcg(&mut z)).collect();
        let mut wq = vec![0u8; vocab * t.row_bytes(hidden).unwrap()];
        quantize_row(t, &wf, &mut wq);
        let mut all = vec![0f32; vocab * hidden];
        dequantize_row(t, &wq, &mut all);
        let ids = [3, 0, 5, 3];
        let mut out = vec![0f32; ids.len() * hidden];
        embedding(wq.as_ptr(), t, &ids, &mut out, hidden);
        for (i, &id) in ids.iter().enumerate() {
            assert_eq!(&out[i * hidden..(i + 1) * hidden], &all[id as usize * hidden..(id as usize + 1) * hidden]);
        }
    }
}
