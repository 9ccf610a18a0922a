use super::*;

fn lcg(z: &mut u64) -> f32 {
    *z = z.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
    ((*z >> 40) as f32 / (1u64 << 24) as f32) - 0.5
}

/// Quantize then dequantize: every type reproduces its input within its resolution (relative
/// to the block's range), so the layouts of the quantizer and the dequantizer agree.
#[test]
fn every_type_round_trips_within_its_resolution() {
    let mut z = 3u64;
    for t in QuantType::ALL {
        let x: Vec<f32> = (0..4 * QK_K).map(|i| lcg(&mut z) * if i % 7 == 0 { 3.0 } else { 1.0 }).collect();
        let mut q = vec![0u8; t.row_bytes(x.len()).unwrap()];
        quantize_row(t, &x, &mut q);
        let mut y = vec![0f32; x.len()];
        dequantize_row(t, &q, &mut y);
        // Levels per unit of range: 2, 3, 4, 5, 6 and 8 bits.
        let bits = match t {
            QuantType::Q2_K => 2,
            QuantType::Q3_K => 3,
            QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q4_K => 4,
            QuantType::Q5_0 | QuantType::Q5_1 | QuantType::Q5_K => 5,
            QuantType::Q6_K => 6,
            QuantType::Q8_0 => 8,
        };
        let range = 3.0f32;
        // Half a step of the coarsest scale, plus the scale quantization of the K types.
        let tol = range / ((1u32 << bits) - 1) as f32 * if bits <= 3 { 1.5 } else { 1.0 };
        let worst = x.iter().zip(&y).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= tol, "{t}: worst error {worst} > {tol}");
        // And the error is not trivially zero-information: the mean error is well below the range.
        let mean = x.iter().zip(&y).map(|(a, b)| (a - b).abs()).sum::<f32>() / x.len() as f32;
        assert!(mean < tol / 2.0, "{t}: mean error {mean}");
    }
}

#[test]
fn block_sizes_are_ggml_s() {
    let want = [(2, 18, 32), (3, 20, 32), (6, 22, 32), (7, 24, 32), (8, 34, 32)];
    for (id, bytes, len) in want {
        let t = QuantType::from_ggml_id(id).unwrap();
        assert_eq!((t.block_bytes(), t.block_len()), (bytes, len), "{t}");
    }
    let k = [(10, 84), (11, 110), (12, 144), (13, 176), (14, 210)];
    for (id, bytes) in k {
        let t = QuantType::from_ggml_id(id).unwrap();
        assert_eq!((t.block_bytes(), t.block_len()), (bytes, QK_K), "{t}");
    }
    assert_eq!(QuantType::Q4_K.row_bytes(576), None);
    assert_eq!(QuantType::Q4_K.row_bytes(1536), Some(6 * 144));
}

/// Hand-built K blocks decode as ggml's `dequantize_row_q*_K` does.
#[test]
fn k_blocks_decode_like_ggml() {
    // Q4_K: scales of sub-blocks 0 and 5 (6-bit split encoding), d = 1, dmin = 0.5.
    let mut b = vec![0u8; 144];
    b[0..2].copy_from_slice(&f16::from_f32(1.0).to_le_bytes());
    b[2..4].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
    b[4] = 3; // scale 0
    b[8] = 2; // min 0
              // sub-block 5: scale = (q[9] & 0xf) | (q[1] >> 6) << 4 = 1 | 16 = 17; min = (q[9] >> 4) | (q[5] >> 6) << 4.
    b[4 + 9] = 0x21;
    b[4 + 1] = 0x40;
    b[4 + 5] = 0x00;
    b[16] = 0x57; // element 0: low nibble 7; element 32: high nibble 5
    b[16 + 64] = 0xa0; // sub-block 4 (low nibbles) element 128 = 0; sub-block 5 element 160: 10
    let mut y = vec![0f32; 256];
    dequantize_row(QuantType::Q4_K, &b, &mut y);
    assert_eq!(y[0], 3.0 * 7.0 - 0.5 * 2.0);
    assert_eq!(y[160], 17.0 * 10.0 - 0.5 * 2.0);
    // Q6_K: element 100 = 128·0 + 32·3 + 4 → high nibble of ql[32 + 4], qh[4] bits 6..7.
    let mut b = vec![0u8; 210];
    b[208..210].copy_from_slice(&f16::from_f32(0.25).to_le_bytes());
    b[32 + 4] = 0x90; // high nibble 9
    b[128 + 4] = 0b1100_0000; // top bits 3
    b[192 + 6] = (-2i8) as u8; // scale of elements 96..112
    let mut y = vec![0f32; 256];
    dequantize_row(QuantType::Q6_K, &b, &mut y);
    assert_eq!(y[100], 0.25 * -2.0 * ((9 | (3 << 4)) as f32 - 32.0));
}
