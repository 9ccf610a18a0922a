//! AVX2 and AVX-512 kernels: one loop ([`body`]) for every type and both widths.
//!
//! Per 32-weight group, [`unpack`] yields the weights as 32 bytes in one 256-bit register:
//! signed, with the format's offset already subtracted, where the format is symmetric
//! (`w = d·s·(u − o)`: Q4_0, Q5_0, Q8_0, Q3_K, Q6_K), else unsigned beside a minimum applied
//! once per group in f32 (`w = d·s·u − fm·m`: Q4_1, Q5_1, Q2_K, Q4_K, Q5_K). A [`Lanes`] width
//! then widens them to 16 bits once and multiplies them against each activation row with
//! `vpmaddwd` (two 256-bit halves on AVX2, one 512-bit register on AVX-512BW), scaling each
//! half-group's exact integer sum in f32. So every kernel computes the portable kernel's
//! integers and agrees with it to f32 rounding; and a row's operations are the same whatever
//! the number of rows in the call, so its result is too (batch invariance).

use std::arch::x86_64::*;

use super::{ActBlock, RowDot, ROWS_MAX};
use crate::cpu::gemm::SimdLevel;
use crate::quant::{scale_min_k4, scales_q3k, QuantType, GROUP};

fn avx512_available() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vl")
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
        SimdLevel::Avx512 if avx512_available() => Some(pick!(dot_avx512)),
        SimdLevel::Avx512 | SimdLevel::Avx2Fma => Some(pick!(dot_avx2)),
        SimdLevel::Portable => None,
    }
}

/// # Safety
/// AVX2/FMA/F16C must be available; the rest as [`RowDot`].
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2<const T: usize>(
    w: *const u8,
    blocks: usize,
    x: *const ActBlock,
    x_stride: usize,
    m: usize,
    out: &mut [f32; ROWS_MAX],
) {
    rows::<Avx2, T>(w, blocks, x, x_stride, m, out)
}

/// # Safety
/// AVX-512F/BW/VL and AVX2/FMA/F16C must be available; the rest as [`RowDot`].
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
unsafe fn dot_avx512<const T: usize>(
    w: *const u8,
    blocks: usize,
    x: *const ActBlock,
    x_stride: usize,
    m: usize,
    out: &mut [f32; ROWS_MAX],
) {
    rows::<Avx512, T>(w, blocks, x, x_stride, m, out)
}

/// [`body`] with the row count as a constant (the accumulators stay in registers).
#[inline(always)]
unsafe fn rows<L: Lanes, const T: usize>(
    w: *const u8,
    blocks: usize,
    x: *const ActBlock,
    x_stride: usize,
    m: usize,
    out: &mut [f32; ROWS_MAX],
) {
    match m {
        1 => body::<L, T, 1>(w, blocks, x, x_stride, out),
        2 => body::<L, T, 2>(w, blocks, x, x_stride, out),
        3 => body::<L, T, 3>(w, blocks, x, x_stride, out),
        _ => body::<L, T, 4>(w, blocks, x, x_stride, out),
    }
}

/// Whether [`unpack`] yields signed weights with the offset subtracted (no minimum term).
const fn symmetric(t: QuantType) -> bool {
    matches!(t, QuantType::Q4_0 | QuantType::Q5_0 | QuantType::Q8_0 | QuantType::Q3_K | QuantType::Q6_K)
}

/// Whether both halves of every group share one scale and one minimum.
const fn one_scale_per_group(t: QuantType) -> bool {
    !matches!(t, QuantType::Q2_K | QuantType::Q3_K | QuantType::Q6_K)
}

/// The vector width: how group bytes become 16-bit lanes and meet an activation block.
trait Lanes {
    /// One row's running sums.
    type Acc: Copy;
    /// One group's 32 weights as 16-bit lanes.
    type Wide: Copy;
    /// One group's scale per product lane (the first half's lanes, then the second's).
    type Scale: Copy;
    unsafe fn zero() -> Self::Acc;
    /// `v` with 16 added to byte `i` where bit `i` of `qh` is set; minus 16 everywhere when
    /// `signed` (the 5-bit formats' high bits).
    unsafe fn bit4(v: __m256i, qh: u32, signed: bool) -> __m256i;
    unsafe fn widen(u: __m256i, signed: bool) -> Self::Wide;
    /// The f16 at `p` in every lane. Converted as a vector on purpose: a scalar conversion
    /// loads with a `vpinsrw` that merges into a free register (once the row's accumulator,
    /// chaining each block's products to the block before).
    unsafe fn scale_f16(p: *const u8) -> Self::Scale;
    /// `s0` on the first half's lanes, `s1` on the second's.
    unsafe fn scale_halves(s0: f32, s1: f32) -> Self::Scale;
    /// `s · d`.
    unsafe fn times(s: Self::Scale, d: f32) -> Self::Scale;
    /// `acc + s · (u · x)` lane-wise; `one`: both halves have the same scale.
    unsafe fn dot(u: Self::Wide, x: &ActBlock, s: Self::Scale, one: bool, acc: Self::Acc) -> Self::Acc;
    unsafe fn hsum(acc: Self::Acc) -> f32;
}

struct Avx2;
struct Avx512;

impl Lanes for Avx2 {
    type Acc = __m256;
    type Wide = (__m256i, __m256i);
    type Scale = (__m256, __m256);

    #[inline(always)]
    unsafe fn zero() -> __m256 {
        _mm256_setzero_ps()
    }

    #[inline(always)]
    unsafe fn bit4(v: __m256i, qh: u32, signed: bool) -> __m256i {
        // ggml's `bytes_from_bits_32`: byte `i` all ones where bit `i` is set.
        let shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), shuf);
        let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
        let set = _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
        if signed {
            // Clear bit: the nibble minus 16 is the nibble with the high four bits set.
            _mm256_or_si256(v, _mm256_andnot_si256(set, _mm256_set1_epi8(0xf0u8 as i8)))
        } else {
            _mm256_or_si256(v, _mm256_and_si256(set, _mm256_set1_epi8(0x10)))
        }
    }

    #[inline(always)]
    unsafe fn widen(u: __m256i, signed: bool) -> (__m256i, __m256i) {
        let (lo, hi) = (_mm256_castsi256_si128(u), _mm256_extracti128_si256::<1>(u));
        if signed {
            (_mm256_cvtepi8_epi16(lo), _mm256_cvtepi8_epi16(hi))
        } else {
            (_mm256_cvtepu8_epi16(lo), _mm256_cvtepu8_epi16(hi))
        }
    }

    #[inline(always)]
    unsafe fn scale_f16(p: *const u8) -> (__m256, __m256) {
        let v = _mm256_cvtph_ps(_mm_set1_epi16((p as *const i16).read_unaligned()));
        (v, v)
    }

    #[inline(always)]
    unsafe fn scale_halves(s0: f32, s1: f32) -> (__m256, __m256) {
        (_mm256_set1_ps(s0), _mm256_set1_ps(s1))
    }

    #[inline(always)]
    unsafe fn times(s: (__m256, __m256), d: f32) -> (__m256, __m256) {
        let d = _mm256_set1_ps(d);
        (_mm256_mul_ps(s.0, d), _mm256_mul_ps(s.1, d))
    }

    #[inline(always)]
    unsafe fn dot(u: (__m256i, __m256i), x: &ActBlock, s: (__m256, __m256), one: bool, acc: __m256) -> __m256 {
        let x0 = _mm256_loadu_si256(x.qs.as_ptr() as *const __m256i);
        let x1 = _mm256_loadu_si256(x.qs.as_ptr().add(16) as *const __m256i);
        let (p0, p1) = (_mm256_madd_epi16(u.0, x0), _mm256_madd_epi16(u.1, x1));
        if one {
            // One scale: add the halves' exact integer sums first.
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(p0, p1)), s.0, acc)
        } else {
            let acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), s.0, acc);
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), s.1, acc)
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps::<0b01>(s, s));
        _mm_cvtss_f32(s)
    }
}

impl Lanes for Avx512 {
    type Acc = __m512;
    type Wide = __m512i;
    type Scale = __m512;

    #[inline(always)]
    unsafe fn zero() -> __m512 {
        _mm512_setzero_ps()
    }

    #[inline(always)]
    unsafe fn bit4(v: __m256i, qh: u32, signed: bool) -> __m256i {
        // The bits are a byte mask as they are.
        if signed {
            _mm256_mask_sub_epi8(v, !qh, v, _mm256_set1_epi8(16))
        } else {
            _mm256_mask_add_epi8(v, qh, v, _mm256_set1_epi8(16))
        }
    }

    #[inline(always)]
    unsafe fn widen(u: __m256i, signed: bool) -> __m512i {
        if signed {
            _mm512_cvtepi8_epi16(u)
        } else {
            _mm512_cvtepu8_epi16(u)
        }
    }

    #[inline(always)]
    unsafe fn scale_f16(p: *const u8) -> __m512 {
        _mm512_cvtph_ps(_mm256_set1_epi16((p as *const i16).read_unaligned()))
    }

    #[inline(always)]
    unsafe fn scale_halves(s0: f32, s1: f32) -> __m512 {
        // Lanes 0..8 of the products are the first half.
        _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(s0), _mm512_set1_ps(s1))
    }

    #[inline(always)]
    unsafe fn times(s: __m512, d: f32) -> __m512 {
        _mm512_mul_ps(s, _mm512_set1_ps(d))
    }

    #[inline(always)]
    unsafe fn dot(u: __m512i, x: &ActBlock, s: __m512, _one: bool, acc: __m512) -> __m512 {
        let p = _mm512_cvtepi32_ps(_mm512_madd_epi16(u, _mm512_loadu_si512(x.qs.as_ptr() as *const __m512i)));
        _mm512_fmadd_ps(p, s, acc)
    }

    #[inline(always)]
    unsafe fn hsum(v: __m512) -> f32 {
        _mm512_reduce_add_ps(v)
    }
}

/// The two f16 at `p` (F16C), for scales read once per block off the per-group path (K-quant
/// headers, Q4_1/Q5_1 minimums); per-group scales are [`Lanes::scale_f16`].
#[inline(always)]
unsafe fn f16x2_at(p: *const u8) -> (f32, f32) {
    let v = _mm_cvtph_ps(_mm_cvtsi32_si128(u32_at(p) as i32));
    (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_movehdup_ps(v)))
}

#[inline(always)]
unsafe fn u32_at(p: *const u8) -> u32 {
    (p as *const u32).read_unaligned()
}

/// A K-quant super-block's scales in f32, per half-group `2g + h`: `s` = `fd · s_h` and, for
/// the formats with a minimum, `m` = `fm · m_h`.
struct Header {
    s: [f32; 16],
    m: [f32; 16],
}

/// The minimum of a 32-element Q4_1/Q5_1 block (its scale is [`Lanes::scale_f16`]).
#[inline(always)]
unsafe fn legacy_min(t: QuantType, b: *const u8) -> f32 {
    match t {
        QuantType::Q4_1 | QuantType::Q5_1 => -f16x2_at(b).1,
        _ => 0.0,
    }
}

#[inline(always)]
unsafe fn header(t: QuantType, b: *const u8) -> Header {
    let mut o = Header { s: [0.0; 16], m: [0.0; 16] };
    match t {
        QuantType::Q2_K => {
            let (fd, fm) = f16x2_at(b.add(80));
            for i in 0..16 {
                let sc = *b.add(i);
                (o.s[i], o.m[i]) = (fd * (sc & 0xf) as f32, fm * (sc >> 4) as f32);
            }
        }
        QuantType::Q3_K => {
            let sc = scales_q3k(std::slice::from_raw_parts(b.add(96), 12));
            let fd = f16x2_at(b.add(106)).1;
            for i in 0..16 {
                o.s[i] = fd * sc[i] as f32;
            }
        }
        QuantType::Q4_K | QuantType::Q5_K => {
            let (fd, fm) = f16x2_at(b);
            let q = std::slice::from_raw_parts(b.add(4), 12);
            for g in 0..8 {
                let (s, mn) = scale_min_k4(g, q);
                (o.s[2 * g], o.m[2 * g]) = (fd * s as f32, fm * mn as f32);
                (o.s[2 * g + 1], o.m[2 * g + 1]) = (o.s[2 * g], o.m[2 * g]);
            }
        }
        QuantType::Q6_K => {
            let fd = f16x2_at(b.add(206)).1;
            for i in 0..16 {
                o.s[i] = fd * *b.add(192 + i) as i8 as f32;
            }
        }
        _ => unreachable!("{t} has 32-element blocks: legacy_scales"),
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

/// `(v >> s) & mask` per byte.
#[inline(always)]
unsafe fn bits(v: __m256i, s: usize, mask: i8) -> __m256i {
    _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(s as i32)), _mm256_set1_epi8(mask))
}

#[inline(always)]
unsafe fn minus(v: __m256i, o: i8) -> __m256i {
    _mm256_sub_epi8(v, _mm256_set1_epi8(o))
}

/// Group `g` of block `b` as 32 bytes: signed with the offset subtracted when [`symmetric`].
#[inline(always)]
unsafe fn unpack<L: Lanes>(t: QuantType, b: *const u8, g: usize) -> __m256i {
    match t {
        QuantType::Q4_0 => minus(nibbles16(b.add(2)), 8),
        QuantType::Q4_1 => nibbles16(b.add(4)),
        QuantType::Q5_0 => L::bit4(nibbles16(b.add(6)), u32_at(b.add(2)), true),
        QuantType::Q5_1 => L::bit4(nibbles16(b.add(8)), u32_at(b.add(4)), false),
        QuantType::Q8_0 => ld(b.add(2)),
        QuantType::Q2_K => bits(ld(b.add(16 + 32 * (g / 4))), 2 * (g % 4), 3),
        QuantType::Q3_K => {
            let lo = bits(ld(b.add(32 + 32 * (g / 4))), 2 * (g % 4), 3);
            minus(_mm256_or_si256(lo, _mm256_slli_epi16::<2>(bits(ld(b), g, 1))), 4)
        }
        QuantType::Q4_K => bits(ld(b.add(16 + 32 * (g / 2))), 4 * (g % 2), 0x0f),
        QuantType::Q5_K => {
            let lo = bits(ld(b.add(48 + 32 * (g / 2))), 4 * (g % 2), 0x0f);
            _mm256_or_si256(lo, _mm256_slli_epi16::<4>(bits(ld(b.add(16)), g, 1)))
        }
        QuantType::Q6_K => {
            let (n, sub) = (g / 4, g % 4);
            let lo = bits(ld(b.add(64 * n + 32 * (sub & 1))), 4 * (sub / 2), 0x0f);
            minus(_mm256_or_si256(lo, _mm256_slli_epi16::<4>(bits(ld(b.add(128 + 32 * n)), 2 * sub, 3))), 32)
        }
    }
}

/// One weight row against `M` activation rows; see the module docs.
#[inline(always)]
unsafe fn body<L: Lanes, const T: usize, const M: usize>(
    w: *const u8,
    blocks: usize,
    x: *const ActBlock,
    x_stride: usize,
    out: &mut [f32; ROWS_MAX],
) {
    let t = QuantType::ALL[T];
    let (sym, one) = (symmetric(t), one_scale_per_group(t));
    let (bb, gpb) = (t.block_bytes(), t.block_len() / GROUP);
    let mut acc = [L::zero(); M];
    let mut mins = [0f32; M];
    for bi in 0..blocks {
        let b = w.add(bi * bb);
        if gpb == 1 {
            let (sd, fm) = (L::scale_f16(b), legacy_min(t, b));
            let u = L::widen(unpack::<L>(t, b, 0), sym);
            for r in 0..M {
                let xa = &*x.add(r * x_stride + bi);
                acc[r] = L::dot(u, xa, L::times(sd, xa.d), true, acc[r]);
                if !sym {
                    mins[r] += fm * (xa.ds[0] + xa.ds[1]);
                }
            }
            continue;
        }
        let hd = header(t, b);
        for g in 0..gpb {
            let u = L::widen(unpack::<L>(t, b, g), sym);
            let sv = L::scale_halves(hd.s[2 * g], hd.s[2 * g + 1]);
            for r in 0..M {
                let xa = &*x.add(r * x_stride + bi * gpb + g);
                acc[r] = L::dot(u, xa, L::times(sv, xa.d), one, acc[r]);
                if !sym {
                    mins[r] += hd.m[2 * g] * xa.ds[0] + hd.m[2 * g + 1] * xa.ds[1];
                }
            }
        }
    }
    for r in 0..M {
        out[r] = L::hsum(acc[r]) - mins[r];
    }
}
