//! The portable kernel: the integer algorithm every vector kernel implements, written plainly
//! over [`crate::quant::group`].

use super::{ActBlock, RowDot, ROWS_MAX};
use crate::quant::{group, QuantType, GROUP};

pub(super) fn row_dot(t: QuantType) -> RowDot {
    match t {
        QuantType::Q4_0 => dot::<0>,
        QuantType::Q4_1 => dot::<1>,
        QuantType::Q5_0 => dot::<2>,
        QuantType::Q5_1 => dot::<3>,
        QuantType::Q8_0 => dot::<4>,
        QuantType::Q2_K => dot::<5>,
        QuantType::Q3_K => dot::<6>,
        QuantType::Q4_K => dot::<7>,
        QuantType::Q5_K => dot::<8>,
        QuantType::Q6_K => dot::<9>,
    }
}

/// # Safety
/// `w` holds `blocks` blocks of type `QuantType::ALL[T]`; `x` holds `m` rows of the matching
/// activation blocks, `x_stride` apart; `m <= ROWS_MAX`.
unsafe fn dot<const T: usize>(
    w: *const u8,
    blocks: usize,
    x: *const ActBlock,
    x_stride: usize,
    m: usize,
    out: &mut [f32; ROWS_MAX],
) {
    let t = QuantType::ALL[T];
    let (bb, gpb) = (t.block_bytes(), t.block_len() / GROUP);
    let w = std::slice::from_raw_parts(w, blocks * bb);
    let mut acc = [0f32; ROWS_MAX];
    for (bi, b) in w.chunks_exact(bb).enumerate() {
        for g in 0..gpb {
            let gr = group(t, b, g);
            for r in 0..m {
                let xa = &*x.add(r * x_stride + bi * gpb + g);
                let mut isum = [0i32; 2];
                for i in 0..32 {
                    let u = if t.signed() { gr.u[i] as i8 as i32 } else { gr.u[i] as i32 };
                    isum[i / 16] += u * xa.qs[i] as i32;
                }
                let dots = gr.s[0] as i64 * isum[0] as i64 + gr.s[1] as i64 * isum[1] as i64;
                let mins = gr.m[0] as i64 * xa.s[0] as i64 + gr.m[1] as i64 * xa.s[1] as i64;
                acc[r] += xa.d * (gr.fd * dots as f32 - gr.fm * mins as f32);
            }
        }
    }
    out[..m].copy_from_slice(&acc[..m]);
}
