//! GGML block-quantized weight formats: the block layouts (bit-exact with ggml's `block_q4_0`
//! … `block_q6_K`), a scalar reference dequantizer, reference quantizers (used to write test
//! files; [`quantize`]) and the decomposition every CPU dot kernel shares ([`Group`]).
//!
//! A quantized matrix is stored as rows of whole blocks, `[n, k]` with `k` a multiple of the
//! type's block length; it is addressed as a `U8` view of `n * row_bytes(k)` bytes plus its
//! [`QuantType`]. Row-major, no padding: rows of one matrix follow each other, so a fused
//! matrix (q, k and v back to back) is one matrix when its parts share a type.
//!
//! Every block splits into groups of 32 elements. Element `i` of a group is
//! `w_i = fd · s_h · u_i − fm · m_h` with `u_i` a small unsigned integer, `h = i / 16` the half
//! of the group, `s_h`, `m_h` small signed integers and `fd`, `fm` f32: the kernels multiply the
//! integers `u_i` against 8-bit activations and apply the scales once per group (see
//! `cpu::quant`). Q8_0 is the exception with signed `u_i` ([`QuantType::signed`]).

// Block decoding indexes several parallel arrays with one counter; iterators would hide that.
#![allow(clippy::needless_range_loop)]

mod quantize;

pub use quantize::quantize_row;

use half::f16;

/// The GGML quantized types llama.cpp's quantizer writes for Llama-family models.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum QuantType {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
}

/// Elements of a K-quant super-block.
pub const QK_K: usize = 256;
/// Elements of one kernel group (and of one activation block).
pub const GROUP: usize = 32;

impl QuantType {
    pub const ALL: [QuantType; 10] = [
        QuantType::Q4_0,
        QuantType::Q4_1,
        QuantType::Q5_0,
        QuantType::Q5_1,
        QuantType::Q8_0,
        QuantType::Q2_K,
        QuantType::Q3_K,
        QuantType::Q4_K,
        QuantType::Q5_K,
        QuantType::Q6_K,
    ];

    /// The GGML type id (as in a GGUF tensor table).
    pub const fn ggml_id(self) -> u32 {
        match self {
            QuantType::Q4_0 => 2,
            QuantType::Q4_1 => 3,
            QuantType::Q5_0 => 6,
            QuantType::Q5_1 => 7,
            QuantType::Q8_0 => 8,
            QuantType::Q2_K => 10,
            QuantType::Q3_K => 11,
            QuantType::Q4_K => 12,
            QuantType::Q5_K => 13,
            QuantType::Q6_K => 14,
        }
    }

    pub fn from_ggml_id(id: u32) -> Option<QuantType> {
        QuantType::ALL.into_iter().find(|t| t.ggml_id() == id)
    }

    pub const fn name(self) -> &'static str {
        match self {
            QuantType::Q4_0 => "Q4_0",
            QuantType::Q4_1 => "Q4_1",
            QuantType::Q5_0 => "Q5_0",
            QuantType::Q5_1 => "Q5_1",
            QuantType::Q8_0 => "Q8_0",
            QuantType::Q2_K => "Q2_K",
            QuantType::Q3_K => "Q3_K",
            QuantType::Q4_K => "Q4_K",
            QuantType::Q5_K => "Q5_K",
            QuantType::Q6_K => "Q6_K",
        }
    }

    /// Elements per block.
    pub const fn block_len(self) -> usize {
        match self {
            QuantType::Q4_0 | QuantType::Q4_1 | QuantType::Q5_0 | QuantType::Q5_1 | QuantType::Q8_0 => 32,
            _ => QK_K,
        }
    }

    /// Bytes per block (ggml's `sizeof(block_…)`).
    pub const fn block_bytes(self) -> usize {
        match self {
            QuantType::Q4_0 => 18,
            QuantType::Q4_1 => 20,
            QuantType::Q5_0 => 22,
            QuantType::Q5_1 => 24,
            QuantType::Q8_0 => 34,
            QuantType::Q2_K => 84,
            QuantType::Q3_K => 110,
            QuantType::Q4_K => 144,
            QuantType::Q5_K => 176,
            QuantType::Q6_K => 210,
        }
    }

    /// Bytes of a row of `k` elements; `None` unless `k` is a whole number of blocks.
    pub const fn row_bytes(self, k: usize) -> Option<usize> {
        if k.is_multiple_of(self.block_len()) {
            Some(k / self.block_len() * self.block_bytes())
        } else {
            None
        }
    }

    /// Whether the group integers `u_i` are signed (Q8_0) rather than unsigned.
    pub const fn signed(self) -> bool {
        matches!(self, QuantType::Q8_0)
    }
}

impl std::fmt::Display for QuantType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One 32-element group of a block, decomposed (see the module docs):
/// `w_i = fd · s[i / 16] · u[i] − fm · m[i / 16]`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Group {
    /// The integers; for Q8_0 these are the `i8` values' bits.
    pub u: [u8; 32],
    pub s: [i16; 2],
    pub m: [i16; 2],
    pub fd: f32,
    pub fm: f32,
}

#[inline]
pub(crate) fn h(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K block.
#[inline]
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// The sixteen signed 6-bit scales of a Q3_K block (ggml's `kmask` unpacking), each minus 32.
#[inline]
pub(crate) fn scales_q3k(sc: &[u8]) -> [i8; 16] {
    let a = |i: usize| u32::from_le_bytes([sc[4 * i], sc[4 * i + 1], sc[4 * i + 2], sc[4 * i + 3]]);
    let (a0, a1, tmp) = (a(0), a(1), a(2));
    let (m1, m2) = (0x0303_0303u32, 0x0f0f_0f0fu32);
    let aux = [
        (a0 & m2) | ((tmp & m1) << 4),
        (a1 & m2) | (((tmp >> 2) & m1) << 4),
        ((a0 >> 4) & m2) | (((tmp >> 4) & m1) << 4),
        ((a1 >> 4) & m2) | (((tmp >> 6) & m1) << 4),
    ];
    let mut out = [0i8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = (aux[i / 4] >> (8 * (i % 4))) as u8 as i8 - 32;
    }
    out
}

/// Group `g` (0..block_len/32) of one block `b` (`block_bytes` bytes).
pub fn group(t: QuantType, b: &[u8], g: usize) -> Group {
    let mut o = Group { s: [1, 1], ..Group::default() };
    match t {
        QuantType::Q4_0 | QuantType::Q4_1 => {
            let q4_1 = t == QuantType::Q4_1;
            let qs = if q4_1 { &b[4..20] } else { &b[2..18] };
            for j in 0..16 {
                o.u[j] = qs[j] & 0xf;
                o.u[j + 16] = qs[j] >> 4;
            }
            o.fd = h(b, 0);
            // q4_0: w = d·(u − 8); q4_1: w = d·u + m.
            (o.fm, o.m) = if q4_1 { (-h(b, 2), [1, 1]) } else { (o.fd, [8, 8]) };
        }
        QuantType::Q5_0 | QuantType::Q5_1 => {
            let q5_1 = t == QuantType::Q5_1;
            let r = if q5_1 { &b[4..] } else { &b[2..] };
            let qh = u32::from_le_bytes([r[0], r[1], r[2], r[3]]);
            for j in 0..16 {
                o.u[j] = (r[4 + j] & 0xf) | ((((qh >> j) & 1) << 4) as u8);
                o.u[j + 16] = (r[4 + j] >> 4) | ((((qh >> (j + 16)) & 1) << 4) as u8);
            }
            o.fd = h(b, 0);
            (o.fm, o.m) = if q5_1 { (-h(b, 2), [1, 1]) } else { (o.fd, [16, 16]) };
        }
        QuantType::Q8_0 => {
            o.u.copy_from_slice(&b[2..34]);
            o.fd = h(b, 0);
        }
        QuantType::Q2_K => {
            let (sc, qs) = (&b[0..16], &b[16 + 32 * (g / 4)..16 + 32 * (g / 4) + 32]);
            let shift = 2 * (g % 4);
            for l in 0..32 {
                o.u[l] = (qs[l] >> shift) & 3;
            }
            for hh in 0..2 {
                o.s[hh] = (sc[2 * g + hh] & 0xf) as i16;
                o.m[hh] = (sc[2 * g + hh] >> 4) as i16;
            }
            (o.fd, o.fm) = (h(b, 80), h(b, 82));
        }
        QuantType::Q3_K => {
            let (hm, qs) = (&b[0..32], &b[32 + 32 * (g / 4)..32 + 32 * (g / 4) + 32]);
            let shift = 2 * (g % 4);
            for l in 0..32 {
                o.u[l] = ((qs[l] >> shift) & 3) | (((hm[l] >> g) & 1) << 2);
            }
            let sc = scales_q3k(&b[96..108]);
            for hh in 0..2 {
                o.s[hh] = sc[2 * g + hh] as i16;
                o.m[hh] = 4 * o.s[hh];
            }
            o.fd = h(b, 108);
            o.fm = o.fd;
        }
        QuantType::Q4_K | QuantType::Q5_K => {
            let q5 = t == QuantType::Q5_K;
            let qs0 = if q5 { 48 } else { 16 };
            let qs = &b[qs0 + 32 * (g / 2)..qs0 + 32 * (g / 2) + 32];
            for l in 0..32 {
                let nib = if g.is_multiple_of(2) { qs[l] & 0xf } else { qs[l] >> 4 };
                o.u[l] = if q5 { nib | (((b[16 + l] >> g) & 1) << 4) } else { nib };
            }
            let (sc, mn) = scale_min_k4(g, &b[4..16]);
            o.s = [sc as i16; 2];
            o.m = [mn as i16; 2];
            (o.fd, o.fm) = (h(b, 0), h(b, 2));
        }
        QuantType::Q6_K => {
            let (n, sub) = (g / 4, g % 4);
            let ql = &b[64 * n + 32 * (sub & 1)..64 * n + 32 * (sub & 1) + 32];
            let qh = &b[128 + 32 * n..128 + 32 * n + 32];
            for l in 0..32 {
                let nib = if sub < 2 { ql[l] & 0xf } else { ql[l] >> 4 };
                o.u[l] = nib | (((qh[l] >> (2 * sub)) & 3) << 4);
            }
            for hh in 0..2 {
                o.s[hh] = b[192 + 8 * n + 2 * sub + hh] as i8 as i16;
                o.m[hh] = 32 * o.s[hh];
            }
            o.fd = h(b, 208);
            o.fm = o.fd;
        }
    }
    o
}

/// Scalar reference: dequantizes one row (whole blocks of `t`) into `out`
/// (`out.len()` = elements of `bytes`). Written after ggml's `dequantize_row_*`.
pub fn dequantize_row(t: QuantType, bytes: &[u8], out: &mut [f32]) {
    let (bl, bb) = (t.block_len(), t.block_bytes());
    assert_eq!(
        bytes.len() / bb * bl,
        out.len(),
        "dequantize_row: {} bytes do not hold {} {t} values",
        bytes.len(),
        out.len()
    );
    for (b, y) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(bl)) {
        for (g, yg) in y.chunks_exact_mut(GROUP).enumerate() {
            let gr = group(t, b, g);
            for (i, v) in yg.iter_mut().enumerate() {
                let q = if t.signed() { gr.u[i] as i8 as f32 } else { gr.u[i] as f32 };
                *v = gr.fd * (gr.s[i / 16] as f32 * q) - gr.fm * gr.m[i / 16] as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests;
