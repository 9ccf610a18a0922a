//! Reference quantizers: f32 rows to GGML blocks. The legacy types follow ggml's
//! `quantize_row_*_ref` exactly; the K-quants use a plain min/max fit per sub-block (ggml's
//! searches for slightly better scales, the block layouts are the same), which is what the
//! project needs to write test files of every type.

use half::f16;

use super::QuantType;

fn put_f16(b: &mut [u8], at: usize, v: f32) {
    b[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

fn f16r(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// Quantizes `x` (a whole number of blocks of `t`) into `out` (`t.row_bytes(x.len())` bytes).
pub fn quantize_row(t: QuantType, x: &[f32], out: &mut [u8]) {
    let (bl, bb) = (t.block_len(), t.block_bytes());
    assert!(x.len().is_multiple_of(bl) && out.len() == x.len() / bl * bb, "quantize_row: shape");
    for (xb, b) in x.chunks_exact(bl).zip(out.chunks_exact_mut(bb)) {
        b.fill(0);
        match t {
            QuantType::Q4_0 | QuantType::Q5_0 => {
                let levels = if t == QuantType::Q4_0 { 8.0 } else { 16.0 };
                let max = xb.iter().copied().fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
                let d = max / -levels;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                put_f16(b, 0, d);
                let q = |v: f32| ((v * id + levels + 0.5) as i8).min(2 * levels as i8 - 1) as u8;
                pack_low(t, b, xb, q);
            }
            QuantType::Q4_1 | QuantType::Q5_1 => {
                let top = if t == QuantType::Q4_1 { 15.0 } else { 31.0 };
                let (mn, mx) = xb.iter().fold((f32::MAX, f32::MIN), |(a, z), &v| (a.min(v), z.max(v)));
                let d = (mx - mn) / top;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                put_f16(b, 0, d);
                put_f16(b, 2, mn);
                let q = |v: f32| (((v - mn) * id + 0.5) as i8).min(top as i8) as u8;
                pack_low(t, b, xb, q);
            }
            QuantType::Q8_0 => {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                put_f16(b, 0, d);
                for (i, &v) in xb.iter().enumerate() {
                    b[2 + i] = (v * id).round() as i8 as u8;
                }
            }
            QuantType::Q2_K => q2_k(xb, b),
            QuantType::Q3_K => q3_k(xb, b),
            QuantType::Q4_K | QuantType::Q5_K => q45_k(t, xb, b),
            QuantType::Q6_K => q6_k(xb, b),
        }
    }
}

/// Q4_0/Q4_1/Q5_0/Q5_1: element `j` in the low nibble of byte `j`, `j + 16` in the high one;
/// for Q5 bit 4 of element `j` goes to bit `j` of `qh`.
fn pack_low(t: QuantType, b: &mut [u8], xb: &[f32], q: impl Fn(f32) -> u8) {
    let (qh_at, qs_at) = match t {
        QuantType::Q4_0 => (None, 2),
        QuantType::Q4_1 => (None, 4),
        QuantType::Q5_0 => (Some(2), 6),
        _ => (Some(4), 8),
    };
    let mut qh = 0u32;
    for j in 0..16 {
        let (a, c) = (q(xb[j]), q(xb[j + 16]));
        b[qs_at + j] = (a & 0xf) | ((c & 0xf) << 4);
        qh |= (((a >> 4) & 1) as u32) << j | (((c >> 4) & 1) as u32) << (j + 16);
    }
    if let Some(at) = qh_at {
        b[at..at + 4].copy_from_slice(&qh.to_le_bytes());
    }
}

/// Per sub-block of `len`: (scale, min) with `x ≈ scale·q − min`, `q` in `0..=top`, `min ≥ 0`.
fn fit_min(xs: &[f32], top: f32) -> (f32, f32) {
    let (mn, mx) = xs.iter().fold((f32::MAX, f32::MIN), |(a, z), &v| (a.min(v), z.max(v)));
    let mn = mn.min(0.0);
    ((mx - mn) / top, -mn)
}

fn q_of(v: f32, scale: f32, min: f32, top: i32) -> u8 {
    if scale == 0.0 {
        return 0;
    }
    (((v + min) / scale).round() as i32).clamp(0, top) as u8
}

fn q2_k(xb: &[f32], b: &mut [u8]) {
    let fits: Vec<(f32, f32)> = xb.chunks_exact(16).map(|c| fit_min(c, 3.0)).collect();
    let smax = fits.iter().fold(0f32, |m, f| m.max(f.0));
    let mmax = fits.iter().fold(0f32, |m, f| m.max(f.1));
    let (d, dmin) = (f16r(smax / 15.0), f16r(mmax / 15.0));
    put_f16(b, 80, d);
    put_f16(b, 82, dmin);
    for (j, &(s, m)) in fits.iter().enumerate() {
        let ls = if d > 0.0 { (s / d).round().min(15.0) as u8 } else { 0 };
        let lm = if dmin > 0.0 { (m / dmin).round().min(15.0) as u8 } else { 0 };
        b[j] = ls | (lm << 4);
        let (sc, mi) = (d * ls as f32, dmin * lm as f32);
        for l in 0..16 {
            let e = 16 * j + l;
            let q = q_of(xb[e], sc, mi, 3);
            // Element e = 128·n + 32·jj + ll sits in byte 32·n + ll at bit shift 2·jj.
            let (n, jj, ll) = (e / 128, (e % 128) / 32, e % 32);
            b[16 + 32 * n + ll] |= q << (2 * jj);
        }
    }
}

fn q3_k(xb: &[f32], b: &mut [u8]) {
    // Signed scale per 16: x ≈ d·sc·(q − 4), q in 0..=7, sc in −32..=31.
    let scales: Vec<f32> = xb
        .chunks_exact(16)
        .map(|c| {
            let max = c.iter().copied().fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
            max / -4.0
        })
        .collect();
    let smax = scales.iter().copied().fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
    let d = if smax != 0.0 { f16r(smax / -32.0) } else { 0.0 };
    put_f16(b, 108, d);
    let mut ls = [0u8; 16];
    for (j, &s) in scales.iter().enumerate() {
        let l = if d != 0.0 { ((s / d).round() as i32).clamp(-32, 31) } else { 0 };
        ls[j] = (l + 32) as u8;
        let sc = d * l as f32;
        for i in 0..16 {
            let e = 16 * j + i;
            let q = if sc != 0.0 { ((xb[e] / sc).round() as i32).clamp(-4, 3) + 4 } else { 4 } as u8;
            let (n, jj, ll) = (e / 128, (e % 128) / 32, e % 32);
            b[32 + 32 * n + ll] |= (q & 3) << (2 * jj);
            if q & 4 != 0 {
                b[ll] |= 1 << (4 * n + jj);
            }
        }
    }
    // Inverse of `scales_q3k`: low nibbles in bytes 0..8, high 2 bits in bytes 8..12.
    let sc = &mut b[96..108];
    for (j, &l) in ls.iter().enumerate() {
        if j < 8 {
            sc[j] = l & 0xf;
        } else {
            sc[j - 8] |= (l & 0xf) << 4;
        }
        sc[8 + j % 4] |= (l >> 4) << (2 * (j / 4));
    }
}

fn q45_k(t: QuantType, xb: &[f32], b: &mut [u8]) {
    let q5 = t == QuantType::Q5_K;
    let top = if q5 { 31.0 } else { 15.0 };
    let fits: Vec<(f32, f32)> = xb.chunks_exact(32).map(|c| fit_min(c, top)).collect();
    let smax = fits.iter().fold(0f32, |m, f| m.max(f.0));
    let mmax = fits.iter().fold(0f32, |m, f| m.max(f.1));
    let (d, dmin) = (f16r(smax / 63.0), f16r(mmax / 63.0));
    put_f16(b, 0, d);
    put_f16(b, 2, dmin);
    let qs0 = if q5 { 48 } else { 16 };
    for (j, &(s, m)) in fits.iter().enumerate() {
        let ls = if d > 0.0 { (s / d).round().min(63.0) as u8 } else { 0 };
        let lm = if dmin > 0.0 { (m / dmin).round().min(63.0) as u8 } else { 0 };
        let sc = &mut b[4..16];
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0xf) | ((lm & 0xf) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
        let (scale, mi) = (d * ls as f32, dmin * lm as f32);
        for l in 0..32 {
            let q = q_of(xb[32 * j + l], scale, mi, top as i32);
            b[qs0 + 32 * (j / 2) + l] |= if j % 2 == 0 { q & 0xf } else { (q & 0xf) << 4 };
            if q5 && q & 16 != 0 {
                b[16 + l] |= 1 << j;
            }
        }
    }
}

fn q6_k(xb: &[f32], b: &mut [u8]) {
    let scales: Vec<f32> = xb
        .chunks_exact(16)
        .map(|c| {
            let max = c.iter().copied().fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
            max / -32.0
        })
        .collect();
    let smax = scales.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = f16r(smax / 127.0);
    put_f16(b, 208, d);
    for (j, &s) in scales.iter().enumerate() {
        let l = if d > 0.0 { ((s / d).round() as i32).clamp(-128, 127) } else { 0 };
        b[192 + j] = l as i8 as u8;
        let sc = d * l as f32;
        for i in 0..16 {
            let e = 16 * j + i;
            let q = if sc != 0.0 { ((xb[e] / sc).round() as i32).clamp(-32, 31) + 32 } else { 32 } as u8;
            // Element e = 128·n + 32·sub + l: low nibble in ql[64n + 32(sub & 1) + l] (high half
            // of the byte for sub ≥ 2), top 2 bits in qh[32n + l] at shift 2·sub.
            let (n, sub, ll) = (e / 128, (e % 128) / 32, e % 32);
            let at = 64 * n + 32 * (sub & 1) + ll;
            b[at] |= if sub < 2 { q & 0xf } else { (q & 0xf) << 4 };
            b[128 + 32 * n + ll] |= (q >> 4) << (2 * sub);
        }
    }
}
