use std::path::Path;

use djinn_backend::QuantType;
use half::f16;

use super::convert::{dequantize, unpermute_rows_f32};
use super::reader::{GgmlType, GgufFile};

fn f16b(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

#[test]
fn q8_0_block() {
    let mut b = f16b(0.5).to_vec();
    b.extend((0..32).map(|i| (i as i8 - 16) as u8));
    let mut out = Vec::new();
    dequantize(GgmlType::Quant(QuantType::Q8_0), &b, &mut out);
    assert_eq!(out.len(), 32);
    assert_eq!(out[0], -8.0);
    assert_eq!(out[31], 7.5);
}

#[test]
fn q4_0_and_q4_1_blocks() {
    // Byte j holds element j (low nibble) and element j+16 (high nibble).
    let qs: Vec<u8> = (0..16).map(|j| (j as u8) | (((15 - j) as u8) << 4)).collect();
    let mut b = f16b(2.0).to_vec();
    b.extend(&qs);
    let mut out = Vec::new();
    dequantize(GgmlType::Quant(QuantType::Q4_0), &b, &mut out);
    assert_eq!(out[0], (0.0 - 8.0) * 2.0);
    assert_eq!(out[3], (3.0 - 8.0) * 2.0);
    assert_eq!(out[16], (15.0 - 8.0) * 2.0);
    assert_eq!(out[31], (0.0 - 8.0) * 2.0);
    let mut b = f16b(0.25).to_vec();
    b.extend(f16b(-1.0));
    b.extend(&qs);
    out.clear();
    dequantize(GgmlType::Quant(QuantType::Q4_1), &b, &mut out);
    assert_eq!(out[5], 5.0 * 0.25 - 1.0);
    assert_eq!(out[17], 14.0 * 0.25 - 1.0);
}

#[test]
fn q5_blocks_use_high_bits() {
    let mut b = f16b(1.0).to_vec();
    b.extend(f16b(0.0));
    b.extend((1u32 | (1 << 16)).to_le_bytes()); // high bit set for elements 0 and 16
    b.extend([0x21u8; 16]);
    let mut out = Vec::new();
    dequantize(GgmlType::Quant(QuantType::Q5_1), &b, &mut out);
    assert_eq!(out[0], 17.0);
    assert_eq!(out[1], 1.0);
    assert_eq!(out[16], 18.0);
    assert_eq!(out[17], 2.0);
    let mut b = f16b(1.0).to_vec();
    b.extend(0u32.to_le_bytes());
    b.extend([0u8; 16]);
    out.clear();
    dequantize(GgmlType::Quant(QuantType::Q5_0), &b, &mut out);
    assert!(out.iter().all(|&x| x == -16.0));
}

#[test]
fn float_types() {
    let mut out = Vec::new();
    dequantize(GgmlType::F32, &1.5f32.to_le_bytes(), &mut out);
    dequantize(GgmlType::F16, &f16b(-2.0), &mut out);
    dequantize(GgmlType::BF16, &half::bf16::from_f32(3.0).to_le_bytes(), &mut out);
    assert_eq!(out, vec![1.5, -2.0, 3.0]);
}

#[test]
fn unpermute_inverts_llama_cpp_permute() {
    // llama.cpp: reshape(heads, 2, hd/2, cols).swapaxes(1, 2) → row (h, i, p) ← (h, p, i).
    let (heads, hd, cols) = (2, 4, 1);
    let hf: Vec<f32> = (0..heads * hd).map(|x| x as f32).collect();
    let mut gg = vec![0f32; hf.len()];
    for h in 0..heads {
        for p in 0..2 {
            for i in 0..hd / 2 {
                gg[h * hd + 2 * i + p] = hf[h * hd + p * hd / 2 + i];
            }
        }
    }
    assert_eq!(unpermute_rows_f32(&gg, heads * hd, cols, heads), hf);
}

fn push_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

#[test]
fn malformed_files_are_errors() {
    let p = Path::new("x.gguf");
    assert!(GgufFile::parse(p, b"GGML").is_err());
    assert!(GgufFile::parse(p, b"GGUF\x03\0\0\0").is_err());
    // Absurd counts.
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(u64::MAX.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    assert!(GgufFile::parse(p, &b).unwrap_err().to_string().contains("exceeds"));
    // A tensor whose data lies past the end.
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    push_str(&mut b, "t");
    b.extend(1u32.to_le_bytes());
    b.extend(64u64.to_le_bytes());
    b.extend(0u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    let e = GgufFile::parse(p, &b).unwrap_err().to_string();
    assert!(e.contains("outside the file") && e.contains("x.gguf"), "{e}");
    b.resize(b.len().next_multiple_of(32) + 256, 0);
    let g = GgufFile::parse(p, &b).unwrap();
    assert_eq!(g.tensors[0].dims, vec![64]);
}
