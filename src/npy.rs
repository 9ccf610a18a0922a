//! numpy `.npy` files of f32 matrices: format v1.0, little-endian `<f4`, C order — what
//! `djinn-dataplane debug` dumps and reads back for hidden states. By hand because this is the
//! whole need (one dtype, one order, rank ≤ 2); the maintained crates parse any Python literal
//! header and pull in a parser generator for it.

use std::io::{Read, Write};
use std::path::Path;

use anyhow::{bail, ensure, Context};

const MAGIC: &[u8; 6] = b"\x93NUMPY";
/// Header (magic through the dict's newline) padded to a multiple of this, as numpy writes it.
const ALIGN_BYTES: usize = 64;
/// Longest header read (numpy's own limit for v1.0 is 65535).
const HEADER_BYTES_MAX: usize = 4096;

/// Writes `data` as a `shape` array of f32 to `path`.
pub fn write_f32(path: &Path, shape: &[usize], data: &[f32]) -> anyhow::Result<()> {
    ensure!(shape.iter().product::<usize>() == data.len(), "{} values do not fill shape {shape:?}", data.len());
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let shape_txt = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_txt}, }}");
    let unpadded = MAGIC.len() + 4 + dict.len() + 1;
    dict.push_str(&" ".repeat(unpadded.next_multiple_of(ALIGN_BYTES) - unpadded));
    dict.push('\n');
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + dict.len() + data.len() * 4);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    for x in data {
        out.extend_from_slice(&x.to_le_bytes());
    }
    let mut f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(&out).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Reads an f32 `.npy` file (v1.0 or v2.0 header, `<f4`, C order): its shape and values.
pub fn read_f32(path: &Path) -> anyhow::Result<(Vec<usize>, Vec<f32>)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).with_context(|| format!("reading {}", path.display()))?;
    parse_f32(&bytes).with_context(|| format!("{}: not an f32 .npy file", path.display()))
}

fn parse_f32(b: &[u8]) -> anyhow::Result<(Vec<usize>, Vec<f32>)> {
    ensure!(b.len() >= 10 && &b[..6] == MAGIC, "no numpy magic");
    let (len, start) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 if b.len() >= 12 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        v => bail!("format version {v} is not 1, 2 or 3"),
    };
    ensure!(len <= HEADER_BYTES_MAX && start + len <= b.len(), "header of {len} bytes");
    let dict = std::str::from_utf8(&b[start..start + len]).context("header is not text")?;
    let field = |key: &str| -> anyhow::Result<&str> {
        let at = dict.find(&format!("'{key}'")).with_context(|| format!("no '{key}' in the header"))?;
        let rest = dict[at + key.len() + 2..].trim_start();
        Ok(rest.strip_prefix(':').context("malformed header")?.trim_start())
    };
    let descr = field("descr")?;
    ensure!(descr.starts_with("'<f4'"), "dtype {} is not little-endian f32 ('<f4')", &descr[..descr.len().min(8)]);
    ensure!(field("fortran_order")?.starts_with("False"), "Fortran order; write it in C order");
    let shape = field("shape")?;
    let shape = shape.strip_prefix('(').and_then(|s| s.split_once(')')).context("malformed shape")?.0;
    let shape: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().with_context(|| format!("shape entry {s:?}")))
        .collect::<anyhow::Result<_>>()?;
    let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).context("shape overflows")?;
    let data = &b[start + len..];
    ensure!(data.len() == n * 4, "{} data bytes for shape {shape:?} of f32", data.len());
    Ok((shape, data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bad_files() {
        let dir = std::env::temp_dir().join(format!("djinn-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.npy");
        let data: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
        write_f32(&p, &[2, 3], &data).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + hlen) % ALIGN_BYTES, 0);
        assert!(std::str::from_utf8(&bytes[10..10 + hlen]).unwrap().contains("'shape': (2, 3)"));
        assert_eq!(read_f32(&p).unwrap(), (vec![2, 3], data.clone()));
        write_f32(&p, &[6], &data).unwrap();
        assert_eq!(read_f32(&p).unwrap().0, vec![6]);
        assert!(write_f32(&p, &[4], &data).is_err());
        let mut bad = bytes.clone();
        bad.pop();
        assert!(parse_f32(&bad).is_err());
        let mut f8 = bytes.clone();
        let at = f8.windows(3).position(|w| w == b"<f4").unwrap();
        f8[at + 2] = b'8';
        assert!(parse_f32(&f8).is_err());
        assert!(parse_f32(b"\x93NUMPY\x01\x00\xff\xff").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
