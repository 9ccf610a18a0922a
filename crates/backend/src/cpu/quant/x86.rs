//! AVX2 and AVX-512 kernels: each group of 32 weights is unpacked to bytes in one 256-bit
//! register, widened to 16 bits and multiplied against the 16-bit activations with `vpmaddwd`
//! (two 256-bit halves on AVX2, one 512-bit register on AVX-512BW); the per-half scales are
//! applied in f32. The integer sums are exact, so both agree with the portable kernel to f32
//! rounding.

use std::arch::x86_64::*;

use super::{ActBlock, RowDot, ROWS_MAX};
use crate::cpu::gemm::SimdLevel;
use crate::quant::{h, scale_min_k4, scales_q3k, QuantType, GROUP};

fn avx512bw_available() -> bool {
    is_x86_feature_detected!("avx512bw")
}

pub(super) fn row_dot(level: SimdLevel, t: QuantType) -> Option<RowDot> {
    macro_rules! pick {
        ($f:ident) => {
            match t {
                QuantType::Q4_0 => $f::<0>,
                QuantType::Q4_1 => $f::<1>,
                QuantType::Q5_0 => $f::<2>,
                QuantType::Q5_1 => $f::<3>,
                QuantType::Q8_0 => $f::<4>,
                QuantType::Q2_K => $f::<5>,
                QuantType::Q3_K => $f::<6>,
                QuantType::Q4_K => $f::<7>,
                QuantType::Q5_K => $f::<8>,
                QuantType::Q6_K => $f::<9>,
            }
        };
    }
    match level {
        SimdLevel::Avx512 if avx512bw_available() => Some(pick!(dot_avx512)),
        SimdLevel::Avx512 | SimdLevel::Avx2Fma => Some(pick!(dot_avx2)),
        SimdLevel::Portable => None,
    }
}

/// # Safety
/// AVX2/FMA must be available; the rest as [`RowDot`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2<const T: usize>(
    w: *const u8,
    blocks: usize,
    x: *const ActBlock,
    x_stride: usize,
    m: usize,
    out: &mut [f32; ROWS_MAX],
) {
    match m {
        1 => body::<T, false, 1>(w, blocks, x, x_stride, out),
        2 => body::<T, false, 2>(w, blocks, x, x_stride, out),
        3 => body::<T, false, 3>(w, blocks, x, x_stride, out),
        _ => body::<T, false, 4>(w, blocks, x, x_stride, out),
    }
}

/// # Safety
/// AVX-512F/BW and AVX2/FMA must be available; the rest as [`RowDot`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw")]
unsafe fn dot_avx512<const T: usize>(
    w: *const u8,
    blocks: usize,
    x: *const ActBlock,
    x_stride: usize,
    m: usize,
    out: &mut [f32; ROWS_MAX],
) {
    match m {
        1 => body::<T, true, 1>(w, blocks, x, x_stride, out),
        2 => body::<T, true, 2>(w, blocks, x, x_stride, out),
        3 => body::<T, true, 3>(w, blocks, x, x_stride, out),
        _ => body::<T, true, 4>(w, blocks, x, x_stride, out),
    }
}

/// Per-block scales: `s`/`m` per half-group (index `2g + h`), `fd`/`fm` per block.
struct Header {
    fd: f32,
    fm: f32,
    s: [i16; 16],
    m: [i16; 16],
}

#[inline(always)]
fn header(t: QuantType, b: &[u8]) -> Header {
    let mut o = Header { fd: 0.0, fm: 0.0, s: [1; 16], m: [0; 16] };
    match t {
        QuantType::Q4_0 | QuantType::Q5_0 => {
            o.fd = h(b, 0);
            o.fm = o.fd;
            o.m = [if t == QuantType::Q4_0 { 8 } else { 16 }; 16];
        }
        QuantType::Q4_1 | QuantType::Q5_1 => {
            (o.fd, o.fm) = (h(b, 0), -h(b, 2));
            o.m = [1; 16];
        }
        QuantType::Q8_0 => o.fd = h(b, 0),
        QuantType::Q2_K => {
            for i in 0..16 {
                (o.s[i], o.m[i]) = ((b[i] & 0xf) as i16, (b[i] >> 4) as i16);
            }
            (o.fd, o.fm) = (h(b, 80), h(b, 82));
        }
        QuantType::Q3_K => {
            let sc = scales_q3k(&b[96..108]);
            for i in 0..16 {
                (o.s[i], o.m[i]) = (sc[i] as i16, 4 * sc[i] as i16);
            }
            o.fd = h(b, 108);
            o.fm = o.fd;
        }
        QuantType::Q4_K | QuantType::Q5_K => {
            for g in 0..8 {
                let (s, mn) = scale_min_k4(g, &b[4..16]);
                (o.s[2 * g], o.s[2 * g + 1], o.m[2 * g], o.m[2 * g + 1]) = (s as i16, s as i16, mn as i16, mn as i16);
            }
            (o.fd, o.fm) = (h(b, 0), h(b, 2));
        }
        QuantType::Q6_K => {
            for i in 0..16 {
                o.s[i] = b[192 + i] as i8 as i16;
                o.m[i] = 32 * o.s[i];
            }
            o.fd = h(b, 208);
            o.fm = o.fd;
        }
    }
    o
}

#[inline(always)]
unsafe fn ld(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

/// 16 bytes to 32 values: low nibbles in elements 0..16, high nibbles in 16..32.
#[inline(always)]
unsafe fn nibbles16(p: *const u8) -> __m256i {
    let q = _mm_loadu_si128(p as *const __m128i);
    let m = _mm_set1_epi8(0x0f);
    _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16::<4>(q), m), _mm_and_si128(q, m))
}

/// Bit `i` of the 32-bit word at `p` as 0x10 in byte `i` (ggml's `bytes_from_bits_32`).
#[inline(always)]
unsafe fn bit4_from_bits32(p: *const u8) -> __m256i {
    let x32 = u32::from_le_bytes([*p, *p.add(1), *p.add(2), *p.add(3)]);
    let shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x32 as i32), shuf);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    _mm256_and_si256(_mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1)), _mm256_set1_epi8(0x10))
}

/// `(v >> s) & mask` per byte.
#[inline(always)]
unsafe fn bits(v: __m256i, s: usize, mask: i8) -> __m256i {
    _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(s as i32)), _mm256_set1_epi8(mask))
}

/// Group `g` of block `b` as 32 bytes.
#[inline(always)]
unsafe fn unpack(t: QuantType, b: *const u8, g: usize) -> __m256i {
    match t {
        QuantType::Q4_0 => nibbles16(b.add(2)),
        QuantType::Q4_1 => nibbles16(b.add(4)),
        QuantType::Q5_0 => _mm256_or_si256(nibbles16(b.add(6)), bit4_from_bits32(b.add(2))),
        QuantType::Q5_1 => _mm256_or_si256(nibbles16(b.add(8)), bit4_from_bits32(b.add(4))),
        QuantType::Q8_0 => ld(b.add(2)),
        QuantType::Q2_K => bits(ld(b.add(16 + 32 * (g / 4))), 2 * (g % 4), 3),
        QuantType::Q3_K => {
            let lo = bits(ld(b.add(32 + 32 * (g / 4))), 2 * (g % 4), 3);
            _mm256_or_si256(lo, _mm256_slli_epi16::<2>(bits(ld(b), g, 1)))
        }
        QuantType::Q4_K => bits(ld(b.add(16 + 32 * (g / 2))), 4 * (g % 2), 0x0f),
        QuantType::Q5_K => {
            let lo = bits(ld(b.add(48 + 32 * (g / 2))), 4 * (g % 2), 0x0f);
            _mm256_or_si256(lo, _mm256_slli_epi16::<4>(bits(ld(b.add(16)), g, 1)))
        }
        QuantType::Q6_K => {
            let (n, sub) = (g / 4, g % 4);
            let lo = bits(ld(b.add(64 * n + 32 * (sub & 1))), 4 * (sub / 2), 0x0f);
            _mm256_or_si256(lo, _mm256_slli_epi16::<4>(bits(ld(b.add(128 + 32 * n)), 2 * sub, 3)))
        }
    }
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
    _mm_cvtss_f32(s)
}

#[inline(always)]
unsafe fn hsum512(v: __m512) -> f32 {
    _mm512_reduce_add_ps(v)
}

#[inline(always)]
unsafe fn body<const T: usize, const W: bool, const M: usize>(
    w: *const u8,
    blocks: usize,
    x: *const ActBlock,
    x_stride: usize,
    out: &mut [f32; ROWS_MAX],
) {
    let t = QuantType::ALL[T];
    let (bb, gpb) = (t.block_bytes(), t.block_len() / GROUP);
    let mut acc = [_mm256_setzero_ps(); M];
    let mut acc_w = [_mm512_setzero_ps(); M];
    let mut mins = [0f32; M];
    for bi in 0..blocks {
        let b = w.add(bi * bb);
        let hd = header(t, std::slice::from_raw_parts(b, bb));
        for g in 0..gpb {
            let u = unpack(t, b, g);
            let (s0, s1) = (hd.s[2 * g] as f32 * hd.fd, hd.s[2 * g + 1] as f32 * hd.fd);
            let (m0, m1) = (hd.m[2 * g] as f32, hd.m[2 * g + 1] as f32);
            if W {
                // 32 weights as 16-bit lanes; lanes 0..8 of the products are the first half.
                let u16 = if t.signed() { _mm512_cvtepi8_epi16(u) } else { _mm512_cvtepu8_epi16(u) };
                let sv = _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(s0), _mm512_set1_ps(s1));
                for r in 0..M {
                    let xa = &*x.add(r * x_stride + bi * gpb + g);
                    let xq = _mm512_loadu_si512(xa.qs.as_ptr() as *const __m512i);
                    let p = _mm512_cvtepi32_ps(_mm512_madd_epi16(u16, xq));
                    acc_w[r] = _mm512_fmadd_ps(p, _mm512_mul_ps(sv, _mm512_set1_ps(xa.d)), acc_w[r]);
                    if !t.signed() {
                        mins[r] += xa.d * hd.fm * (m0 * xa.s[0] as f32 + m1 * xa.s[1] as f32);
                    }
                }
            } else {
                let (lo, hi) = (_mm256_castsi256_si128(u), _mm256_extracti128_si256::<1>(u));
                let (u0, u1) = if t.signed() {
                    (_mm256_cvtepi8_epi16(lo), _mm256_cvtepi8_epi16(hi))
                } else {
                    (_mm256_cvtepu8_epi16(lo), _mm256_cvtepu8_epi16(hi))
                };
                for r in 0..M {
                    let xa = &*x.add(r * x_stride + bi * gpb + g);
                    let x0 = _mm256_loadu_si256(xa.qs.as_ptr() as *const __m256i);
                    let x1 = _mm256_loadu_si256(xa.qs.as_ptr().add(16) as *const __m256i);
                    let p0 = _mm256_cvtepi32_ps(_mm256_madd_epi16(u0, x0));
                    let p1 = _mm256_cvtepi32_ps(_mm256_madd_epi16(u1, x1));
                    acc[r] = _mm256_fmadd_ps(p0, _mm256_set1_ps(xa.d * s0), acc[r]);
                    acc[r] = _mm256_fmadd_ps(p1, _mm256_set1_ps(xa.d * s1), acc[r]);
                    if !t.signed() {
                        mins[r] += xa.d * hd.fm * (m0 * xa.s[0] as f32 + m1 * xa.s[1] as f32);
                    }
                }
            }
        }
    }
    for r in 0..M {
        out[r] = if W { hsum512(acc_w[r]) } else { hsum(acc[r]) } - mins[r];
    }
}
