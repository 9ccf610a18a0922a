//! Checkpoint files: safetensors (single or sharded via `model.safetensors.index.json`),
//! memory-mapped and validated, or tensors already in memory (a converted GGUF).
//!
//! Invariant: every [`TensorEntry`] lies inside its blob and its byte length equals
//! `numel × dtype size` (the safetensors crate checks offsets, overlaps and the file length; we
//! re-check the element count). Only F32, F16 and BF16 tensors are accepted from safetensors;
//! tensors in memory (a GGUF) may also be GGML-quantized: `quant` names the block type, `dtype`
//! is then `U8` and the bytes are whole rows of blocks.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use djinn_backend::{DType, QuantType};
use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::error::{ModelError, Result};

enum Blob {
    Mapped(Mmap),
    Owned(Vec<u8>),
}

impl Blob {
    fn bytes(&self) -> &[u8] {
        match self {
            Blob::Mapped(m) => m,
            Blob::Owned(v) => v,
        }
    }
}

#[derive(Clone, Debug)]
pub struct TensorEntry {
    pub dtype: DType,
    /// The GGML block type of a quantized tensor (`dtype` is then `U8`).
    pub quant: Option<QuantType>,
    pub shape: Vec<usize>,
    blob: usize,
    start: usize,
    end: usize,
}

/// A tensor handed over in memory (from the GGUF converter).
pub struct OwnedTensor {
    pub name: String,
    pub dtype: DType,
    /// The GGML block type of a quantized tensor (`dtype` is then `U8`).
    pub quant: Option<QuantType>,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

pub struct Checkpoint {
    dir: PathBuf,
    blobs: Vec<(PathBuf, Blob)>,
    tensors: HashMap<String, TensorEntry>,
}

fn st_dtype(d: StDtype) -> Option<DType> {
    match d {
        StDtype::F32 => Some(DType::F32),
        StDtype::F16 => Some(DType::F16),
        StDtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

impl Checkpoint {
    /// Opens `dir/model.safetensors`, or every shard named by `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files: Vec<PathBuf> = if index.exists() {
            let v = crate::config::read_json(&index)?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::config(&index, "weight_map", "missing or not an object"))?;
            let mut files: Vec<PathBuf> = Vec::new();
            for (tensor, file) in map {
                let name = file
                    .as_str()
                    .ok_or_else(|| ModelError::config(&index, &format!("weight_map.{tensor}"), "not a file name"))?;
                // Shard names are bare file names; anything with a path component could escape dir.
                if name.contains('/') || name.contains('\\') || name == ".." {
                    return Err(ModelError::config(&index, &format!("weight_map.{tensor}"), "not a bare file name"));
                }
                let p = dir.join(name);
                if !files.contains(&p) {
                    files.push(p);
                }
            }
            files.sort();
            files
        } else if single.exists() {
            vec![single]
        } else {
            return Err(ModelError::NoWeights { dir: dir.to_path_buf() });
        };
        let mut ck = Checkpoint { dir: dir.to_path_buf(), blobs: Vec::new(), tensors: HashMap::new() };
        for f in files {
            let file = File::open(&f).map_err(|e| ModelError::io(&f, e))?;
            // SAFETY: the mapping is read-only and private to this process; a checkpoint modified
            // on disk while we run is outside our contract (as for every mmap-based loader), and
            // every byte read from it is validated before use.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io(&f, e))?;
            ck.add_blob(f, Blob::Mapped(map))?;
        }
        Ok(ck)
    }

    /// Wraps tensors already in memory (a GGUF converted without touching disk).
    pub fn from_owned(dir: &Path, tensors: Vec<OwnedTensor>) -> Result<Self> {
        let mut ck = Checkpoint { dir: dir.to_path_buf(), blobs: Vec::new(), tensors: HashMap::new() };
        for t in tensors {
            let numel: usize = t.shape.iter().product();
            let want = match t.quant {
                // Rows of whole blocks: the innermost dimension is the row.
                Some(q) => {
                    t.shape.last().and_then(|&k| q.row_bytes(k)).map(|rb| numel / t.shape[t.shape.len() - 1] * rb)
                }
                None => Some(numel * t.dtype.size_bytes()),
            };
            if want != Some(t.data.len()) {
                return Err(ModelError::tensor(dir, &t.name, "byte length does not match shape"));
            }
            let blob = ck.blobs.len();
            let end = t.data.len();
            let e = TensorEntry { dtype: t.dtype, quant: t.quant, shape: t.shape, blob, start: 0, end };
            ck.tensors.insert(t.name, e);
            ck.blobs.push((dir.to_path_buf(), Blob::Owned(t.data)));
        }
        Ok(ck)
    }

    fn add_blob(&mut self, path: PathBuf, blob: Blob) -> Result<()> {
        let bytes = blob.bytes();
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| ModelError::Header { path: path.clone(), why: e.to_string() })?;
        let base = bytes.as_ptr() as usize;
        let idx = self.blobs.len();
        for (name, view) in st.iter() {
            let dtype = st_dtype(view.dtype()).ok_or_else(|| ModelError::DType {
                path: path.clone(),
                tensor: name.to_string(),
                dtype: format!("{:?}", view.dtype()),
            })?;
            let data = view.data();
            let numel: usize = view.shape().iter().product();
            if numel * dtype.size_bytes() != data.len() {
                return Err(ModelError::tensor(&path, name, "byte length does not match shape"));
            }
            let start = data.as_ptr() as usize - base;
            if self.tensors.contains_key(name) {
                return Err(ModelError::tensor(&path, name, "appears in more than one shard"));
            }
            let entry = TensorEntry {
                dtype,
                quant: None,
                shape: view.shape().to_vec(),
                blob: idx,
                start,
                end: start + data.len(),
            };
            self.tensors.insert(name.to_string(), entry);
        }
        self.blobs.push((path, blob));
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The tensor's bytes and the file it came from.
    pub fn data(&self, e: &TensorEntry) -> (&Path, &[u8]) {
        let (path, blob) = &self.blobs[e.blob];
        (path, &blob.bytes()[e.start..e.end])
    }

    /// Looks a tensor up and checks its shape.
    pub fn expect(&self, name: &str, shape: &[usize]) -> Result<&TensorEntry> {
        let e = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor { dir: self.dir.clone(), tensor: name.to_string() })?;
        if e.shape != shape {
            return Err(ModelError::Shape {
                path: self.blobs[e.blob].0.clone(),
                tensor: name.to_string(),
                got: e.shape.clone(),
                expected: shape.to_vec(),
            });
        }
        Ok(e)
    }
}

/// Converts `src` (elements of `from`) into `dst` (elements of `to`); float dtypes only.
/// Rounds to nearest even like torch's `.to(dtype)`.
pub fn convert_floats(src: &[u8], from: DType, dst: &mut [u8], to: DType) {
    use half::{bf16, f16};
    let n = src.len() / from.size_bytes();
    debug_assert_eq!(dst.len(), n * to.size_bytes());
    if from == to {
        dst.copy_from_slice(src);
        return;
    }
    let read = |i: usize| -> f32 {
        match from {
            DType::F32 => f32::from_le_bytes(src[4 * i..4 * i + 4].try_into().unwrap_or([0; 4])),
            DType::F16 => f16::from_le_bytes([src[2 * i], src[2 * i + 1]]).to_f32(),
            DType::BF16 => bf16::from_le_bytes([src[2 * i], src[2 * i + 1]]).to_f32(),
            _ => 0.0,
        }
    };
    for i in 0..n {
        let x = read(i);
        match to {
            DType::F32 => dst[4 * i..4 * i + 4].copy_from_slice(&x.to_le_bytes()),
            DType::F16 => dst[2 * i..2 * i + 2].copy_from_slice(&f16::from_f32(x).to_le_bytes()),
            DType::BF16 => dst[2 * i..2 * i + 2].copy_from_slice(&bf16::from_f32(x).to_le_bytes()),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn write_st(path: &Path, tensors: &[(&str, StDtype, Vec<usize>)]) {
        let datas: Vec<Vec<u8>> =
            tensors.iter().map(|(_, d, s)| vec![0u8; s.iter().product::<usize>() * d.bitsize() / 8]).collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .zip(&datas)
            .map(|((n, d, s), b)| (n.to_string(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("djinn-model-ck-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn opens_and_checks_shapes() {
        let d = tmp("ok");
        write_st(&d.join("model.safetensors"), &[("a", StDtype::BF16, vec![2, 3]), ("b", StDtype::F32, vec![4])]);
        let ck = Checkpoint::open(&d).unwrap();
        assert_eq!(ck.expect("a", &[2, 3]).unwrap().dtype, DType::BF16);
        let e = ck.expect("a", &[3, 2]).unwrap_err().to_string();
        assert!(e.contains("model.safetensors") && e.contains("`a`"), "{e}");
        let e = ck.expect("zz", &[1]).unwrap_err().to_string();
        assert!(e.contains("missing tensor `zz`"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn truncated_and_garbage_files_are_errors() {
        let d = tmp("trunc");
        let f = d.join("model.safetensors");
        write_st(&f, &[("a", StDtype::F32, vec![16])]);
        let bytes = std::fs::read(&f).unwrap();
        std::fs::write(&f, &bytes[..bytes.len() - 5]).unwrap();
        let e = Checkpoint::open(&d).err().unwrap().to_string();
        assert!(e.contains("model.safetensors") && e.contains("header"), "{e}");
        std::fs::write(&f, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
        assert!(matches!(Checkpoint::open(&d), Err(ModelError::Header { .. })));
        std::fs::write(&f, b"abc").unwrap();
        assert!(matches!(Checkpoint::open(&d), Err(ModelError::Header { .. })));
        // Offsets past the end of the data.
        let hdr = br#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,64]}}"#;
        let mut b = (hdr.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(hdr);
        b.extend_from_slice(&[0u8; 16]);
        std::fs::write(&f, &b).unwrap();
        assert!(matches!(Checkpoint::open(&d), Err(ModelError::Header { .. })));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn unsupported_dtype_and_missing_files() {
        let d = tmp("dtype");
        write_st(&d.join("model.safetensors"), &[("q", StDtype::I8, vec![4])]);
        let e = Checkpoint::open(&d).err().unwrap();
        assert!(matches!(e, ModelError::DType { ref tensor, .. } if tensor == "q"), "{e}");
        std::fs::remove_file(d.join("model.safetensors")).unwrap();
        assert!(matches!(Checkpoint::open(&d), Err(ModelError::NoWeights { .. })));
        std::fs::write(d.join("model.safetensors.index.json"), br#"{"weight_map":{"a":"shard-1.safetensors"}}"#)
            .unwrap();
        let e = Checkpoint::open(&d).err().unwrap().to_string();
        assert!(e.contains("shard-1.safetensors"), "{e}");
        std::fs::write(d.join("model.safetensors.index.json"), br#"{"weight_map":{"a":"../x.safetensors"}}"#).unwrap();
        assert!(matches!(Checkpoint::open(&d), Err(ModelError::Config { .. })));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn sharded_index() {
        let d = tmp("shard");
        write_st(&d.join("s1.safetensors"), &[("a", StDtype::F16, vec![2])]);
        write_st(&d.join("s2.safetensors"), &[("b", StDtype::F16, vec![3])]);
        std::fs::write(
            d.join("model.safetensors.index.json"),
            br#"{"metadata":{},"weight_map":{"a":"s1.safetensors","b":"s2.safetensors"}}"#,
        )
        .unwrap();
        let ck = Checkpoint::open(&d).unwrap();
        assert_eq!(ck.expect("b", &[3]).unwrap().dtype, DType::F16);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn float_conversion_round_trips() {
        let xs: Vec<f32> = vec![1.0, -2.5, 0.333, 65504.0];
        let src: Vec<u8> = xs.iter().flat_map(|x| x.to_le_bytes()).collect();
        let mut b = vec![0u8; 8];
        convert_floats(&src, DType::F32, &mut b, DType::BF16);
        let mut back = vec![0u8; 16];
        convert_floats(&b, DType::BF16, &mut back, DType::F32);
        let got: Vec<f32> = back.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(got[0], 1.0);
        assert_eq!(got[1], -2.5);
        assert!((got[2] - 0.333).abs() < 2e-3);
    }
}
