//! Writing GGUF v3 files: metadata, tensor table, aligned data. With the reference quantizers
//! of `djinn_backend::quant` this makes test files of every supported type from f32 tensors
//! (llama.cpp's layout: GGUF names, dimensions innermost first, q/k rows permuted).

use std::path::Path;

use djinn_backend::quant::quantize_row;

use super::reader::GgmlType;
use crate::error::{ModelError, Result};

/// A metadata value.
#[derive(Clone, Debug)]
pub enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

/// One tensor to write: GGUF name, GGUF dimensions (innermost first), type and its bytes.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub name: String,
    pub dims: Vec<usize>,
    pub ty: GgmlType,
    pub data: Vec<u8>,
}

const ALIGN: usize = 32;

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

/// The bytes of a GGUF file holding `meta` and `tensors`.
pub fn to_bytes(meta: &[(String, Meta)], tensors: &[Tensor]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_str(&mut out, k);
        match v {
            Meta::U32(x) => {
                out.extend(4u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Meta::F32(x) => {
                out.extend(6u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Meta::Bool(x) => {
                out.extend(7u32.to_le_bytes());
                out.push(*x as u8);
            }
            Meta::Str(s) => {
                out.extend(8u32.to_le_bytes());
                put_str(&mut out, s);
            }
            Meta::Strs(xs) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((xs.len() as u64).to_le_bytes());
                xs.iter().for_each(|s| put_str(&mut out, s));
            }
            Meta::I32s(xs) => {
                out.extend(9u32.to_le_bytes());
                out.extend(5u32.to_le_bytes());
                out.extend((xs.len() as u64).to_le_bytes());
                xs.iter().for_each(|x| out.extend(x.to_le_bytes()));
            }
        }
    }
    let mut off = 0usize;
    for t in tensors {
        put_str(&mut out, &t.name);
        out.extend((t.dims.len() as u32).to_le_bytes());
        t.dims.iter().for_each(|d| out.extend((*d as u64).to_le_bytes()));
        out.extend(t.ty.id().to_le_bytes());
        out.extend((off as u64).to_le_bytes());
        off = (off + t.data.len()).next_multiple_of(ALIGN);
    }
    out.resize(out.len().next_multiple_of(ALIGN), 0);
    for t in tensors {
        out.extend(&t.data);
        out.resize(out.len().next_multiple_of(ALIGN), 0);
    }
    out
}

/// Writes `to_bytes(meta, tensors)` to `path`.
pub fn write(path: &Path, meta: &[(String, Meta)], tensors: &[Tensor]) -> Result<()> {
    std::fs::write(path, to_bytes(meta, tensors)).map_err(|e| ModelError::io(path, e))
}

/// `x` (rows of `cols`) stored as `ty`: quantized with the reference quantizers, or converted.
/// `None` when `cols` is not a whole number of `ty`'s blocks.
pub fn encode(ty: GgmlType, x: &[f32], cols: usize) -> Option<Vec<u8>> {
    Some(match ty {
        GgmlType::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => x.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        GgmlType::BF16 => x.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
        GgmlType::Quant(q) => {
            let rb = q.row_bytes(cols)?;
            let mut out = vec![0u8; x.len() / cols * rb];
            for (r, o) in x.chunks_exact(cols).zip(out.chunks_exact_mut(rb)) {
                quantize_row(q, r, o);
            }
            out
        }
    })
}

/// llama.cpp's converter permutation of q/k rows: HF row `p·hd/2 + i` of a head goes to GGUF
/// row `2i + p`.
pub fn permute_rows(x: &[f32], rows: usize, cols: usize, heads: usize) -> Vec<f32> {
    let hd = rows / heads;
    let mut out = vec![0f32; x.len()];
    for h in 0..heads {
        for p in 0..2 {
            for i in 0..hd / 2 {
                let (src, dst) = (h * hd + p * hd / 2 + i, h * hd + 2 * i + p);
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&x[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// The GGUF name of a Llama-family Hugging Face tensor name.
pub fn gguf_name(hf: &str) -> Option<String> {
    let map = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = map.iter().find(|(h, _)| *h == hf) {
        return Some(g.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (l, t) = rest.split_once('.')?;
    let (base, kind) = t.rsplit_once('.')?;
    let g = match base {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{l}.{g}.{kind}"))
}
