//! The GGUF container (v2/v3): header, metadata, tensor table, each tensor's type and byte
//! range. Every length, count and offset read from the file is checked against the file before
//! use; a malformed file is a [`ModelError::Gguf`] naming what is wrong, never a panic. A tensor
//! of a type this loader does not read is refused naming the tensor, the type and what to do.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use djinn_backend::QuantType;

use crate::error::{ModelError, Result};

#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    Uint(u64),
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::Uint(v) => Some(v),
            GgufValue::Int(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::Float(v) => Some(v),
            GgufValue::Uint(v) => Some(v as f64),
            GgufValue::Int(v) => Some(v as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Str(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// The tensor types this loader reads: the float types and the GGML block quantizations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Quant(QuantType),
}

/// GGML's names of the type ids, for messages about the ones not read here.
fn ggml_type_name(id: u32) -> &'static str {
    const NAMES: [&str; 40] = [
        "F32",
        "F16",
        "Q4_0",
        "Q4_1",
        "Q4_2",
        "Q4_3",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q8_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ3_XXS",
        "IQ1_S",
        "IQ4_NL",
        "IQ3_S",
        "IQ2_S",
        "IQ4_XS",
        "I8",
        "I16",
        "I32",
        "I64",
        "F64",
        "IQ1_M",
        "BF16",
        "Q4_0_4_4",
        "Q4_0_4_8",
        "Q4_0_8_8",
        "TQ1_0",
        "TQ2_0",
        "IQ4_NL_4_4",
        "IQ4_NL_4_8",
        "IQ4_NL_8_8",
        "MXFP4",
    ];
    NAMES.get(id as usize).copied().unwrap_or("unknown")
}

impl GgmlType {
    pub fn from_id(id: u32) -> Option<GgmlType> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            30 => GgmlType::BF16,
            _ => GgmlType::Quant(QuantType::from_ggml_id(id)?),
        })
    }
    /// GGML's id of this type.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::BF16 => 30,
            GgmlType::Quant(q) => q.ggml_id(),
        }
    }
    pub fn name(self) -> &'static str {
        ggml_type_name(self.id())
    }
    /// (elements per block, bytes per block).
    pub fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Quant(q) => (q.block_len(), q.block_bytes()),
        }
    }
}

#[derive(Clone, Debug)]
pub struct GgufTensor {
    pub name: String,
    /// GGUF order: innermost first.
    pub dims: Vec<usize>,
    pub ty: GgmlType,
    /// Absolute byte range in the file.
    pub start: usize,
    pub end: usize,
}

#[derive(Debug)]
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub meta: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensor>,
}

struct Reader<'a> {
    path: &'a Path,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn err(&self, why: impl Into<String>) -> ModelError {
        ModelError::Gguf { path: self.path.to_path_buf(), why: format!("{} (at byte {})", why.into(), self.pos) }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| self.err("truncated file"))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| self.err("short read"))?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().map_err(|_| self.err("short read"))?))
    }
    /// A count that must fit in what is left of the file at `min_bytes` bytes per item.
    fn count(&mut self, min_bytes: usize, what: &str) -> Result<usize> {
        let n = self.u64()?;
        let left = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_bytes.max(1) as u64) > left {
            return Err(self.err(format!("{what} count {n} exceeds the file")));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String> {
        let n = self.count(1, "string length")?;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err("string is not UTF-8"))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<GgufValue> {
        Ok(match ty {
            0 => GgufValue::Uint(self.take(1)?[0] as u64),
            1 => GgufValue::Int(self.take(1)?[0] as i8 as i64),
            2 => GgufValue::Uint(u16::from_le_bytes([self.take(1)?[0], self.take(1)?[0]]) as u64),
            3 => GgufValue::Int(i16::from_le_bytes([self.take(1)?[0], self.take(1)?[0]]) as i64),
            4 => GgufValue::Uint(self.u32()? as u64),
            5 => GgufValue::Int(self.u32()? as i32 as i64),
            6 => GgufValue::Float(f32::from_bits(self.u32()?) as f64),
            7 => GgufValue::Bool(self.take(1)?[0] != 0),
            8 => GgufValue::Str(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(self.err("arrays nested too deeply"));
                }
                let ety = self.u32()?;
                let n = self.count(1, "array")?;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(ety, depth + 1)?);
                }
                GgufValue::Array(v)
            }
            10 => GgufValue::Uint(self.u64()?),
            11 => GgufValue::Int(self.u64()? as i64),
            12 => GgufValue::Float(f64::from_bits(self.u64()?)),
            t => return Err(self.err(format!("unknown metadata value type {t}"))),
        })
    }
}

impl GgufFile {
    /// Parses the header, metadata and tensor table of `buf` (the whole file).
    pub fn parse(path: &Path, buf: &[u8]) -> Result<GgufFile> {
        let mut r = Reader { path, buf, pos: 0 };
        if r.take(4)? != b"GGUF" {
            return Err(r.err("not a GGUF file (bad magic)"));
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(r.err(format!("unsupported GGUF version {version}")));
        }
        let n_tensors = r.count(24, "tensor")?;
        let n_kv = r.count(12, "metadata")?;
        let mut meta = BTreeMap::new();
        for _ in 0..n_kv {
            let k = r.string()?;
            let ty = r.u32()?;
            let v = r.value(ty, 0)?;
            meta.insert(k, v);
        }
        let mut infos = Vec::with_capacity(n_tensors);
        for _ in 0..n_tensors {
            let name = r.string()?;
            let nd = r.u32()? as usize;
            if nd == 0 || nd > 4 {
                return Err(r.err(format!("tensor {name}: {nd} dimensions")));
            }
            let mut dims = Vec::with_capacity(nd);
            for _ in 0..nd {
                let d = r.u64()?;
                if d == 0 || d > (1 << 40) {
                    return Err(r.err(format!("tensor {name}: dimension {d}")));
                }
                dims.push(d as usize);
            }
            let tid = r.u32()?;
            let ty = GgmlType::from_id(tid).ok_or_else(|| ModelError::Gguf {
                path: path.into(),
                why: format!(
                    "tensor {name} has type {} (id {tid}), which this loader does not read (it reads F32, F16, \
                     BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K and Q6_K): requantize the model \
                     to one of those (e.g. Q4_K_M with llama.cpp's llama-quantize) or load the safetensors directory",
                    ggml_type_name(tid)
                ),
            })?;
            let off = r.u64()? as usize;
            infos.push((name, dims, ty, off));
        }
        let align = match meta.get("general.alignment") {
            Some(v) => {
                v.as_u64().filter(|a| a.is_power_of_two() && *a <= 1 << 16).ok_or_else(|| r.err("bad alignment"))?
                    as usize
            }
            None => 32,
        };
        let data0 = r.pos.next_multiple_of(align);
        let mut tensors = Vec::with_capacity(infos.len());
        for (name, dims, ty, off) in infos {
            let numel = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
            let (be, bb) = ty.block();
            let bytes = numel.filter(|n| n % be == 0 && dims[0] % be == 0).map(|n| n / be * bb).ok_or_else(|| {
                ModelError::Gguf { path: path.into(), why: format!("tensor {name}: bad shape {dims:?}") }
            })?;
            let start = data0.checked_add(off);
            let end = start.and_then(|s| s.checked_add(bytes)).filter(|&e| e <= buf.len());
            let (Some(start), Some(end)) = (start, end) else {
                return Err(ModelError::Gguf {
                    path: path.into(),
                    why: format!("tensor {name}: data [{off}, +{bytes}) lies outside the file"),
                });
            };
            tensors.push(GgufTensor { name, dims, ty, start, end });
        }
        Ok(GgufFile { path: path.to_path_buf(), version, meta, tensors })
    }

    pub(crate) fn err(&self, why: impl Into<String>) -> ModelError {
        ModelError::Gguf { path: self.path.clone(), why: why.into() }
    }

    pub(crate) fn get(&self, k: &str) -> Option<&GgufValue> {
        self.meta.get(k)
    }
}
