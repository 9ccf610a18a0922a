//! GEMM for [`CudaBackend`]: cuBLAS (`cublasGemmEx`; strided-batched when `batch > 1`), f32
//! accumulation.
//!
//! cuBLAS multiplies A and B of one type, so mixed inputs are converted first, in the stream's
//! workspace, by what [`GemmArgs`] allows:
//! * **a model's projection** (`bf16_activations`), f32 activations against 16-bit weights: the
//!   activations are rounded to the weights' type (as transformers runs a 16-bit model) — the
//!   small operand, converted once;
//! * **any other f32 × 16-bit product into f32** (generic tensor ops, whose f32 operands stay
//!   f32): the 16-bit operand is widened to f32 in slices that fit the workspace — row slices of
//!   an [n, k] weight, each writing its own columns of C, or k slices of a [k, n] matrix,
//!   accumulated with beta = 1 — so the product is the f32 product of the inputs at any size
//!   (into a 16-bit C, rounded to 16 bits anyway, A is rounded instead, as for a model's
//!   projection: cuBLAS writes no 16-bit C from f32 inputs);
//! * a 16-bit A against f32 B: A widened (exact).
//!
//! C is f32, or the 16-bit type both inputs are multiplied in.

use std::ffi::c_void;

use cudarc::cublas::sys as blas_sys;

use super::ops::{code, dptr, i32_arg, shape, THREADS};
use super::{kargs, CudaBackend, Stream, ATTN_WORKSPACE_BYTES};
use crate::backend::{GemmArgs, View};
use crate::error::{BackendError, Result};
use crate::validate;
use crate::DType;

type V<'a> = View<'a, CudaBackend>;

/// How mixed input types are brought to one (the module doc).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Convert {
    None,
    /// A rounded to B's 16-bit type (a model's projection).
    NarrowA,
    /// A (16-bit) widened to B's f32.
    WidenA,
    /// B (16-bit) widened to A's f32, slice by slice.
    WidenB,
}

fn convert_for(a: DType, b: DType, c: DType, bf16_activations: bool) -> Option<Convert> {
    match (a, b) {
        _ if a == b => Some(Convert::None),
        (_, DType::F32) => Some(Convert::WidenA),
        (DType::F32, _) if bf16_activations || c != DType::F32 => Some(Convert::NarrowA),
        (DType::F32, _) => Some(Convert::WidenB),
        _ => None, // f16 × bf16: neither widens to the other
    }
}

fn blas_type(d: DType) -> blas_sys::cudaDataType {
    match d {
        DType::F32 => blas_sys::cudaDataType::CUDA_R_32F,
        DType::F16 => blas_sys::cudaDataType::CUDA_R_16F,
        _ => blas_sys::cudaDataType::CUDA_R_16BF,
    }
}

/// One cuBLAS product in its column-major terms: C[m, n] = alpha · op(A)[m, k] · B[k, n] + beta · C,
/// `batch` times at the given element strides. Addresses are device addresses.
struct Call {
    trans_a: bool,
    m: i32,
    n: i32,
    k: i32,
    a: u64,
    lda: i32,
    stride_a: i64,
    b: u64,
    ldb: i32,
    stride_b: i64,
    c: u64,
    ldc: i32,
    stride_c: i64,
    batch: i32,
    alpha: f32,
    beta: f32,
    /// A's and B's type.
    ab: DType,
    ct: DType,
}

/// # Safety
/// `handle` is a live cuBLAS handle bound to the stream the operands are ordered on and held
/// exclusively; every operand extent the call implies (all batch entries) lies inside memory
/// the device may access for the duration of the product.
unsafe fn blas(handle: blas_sys::cublasHandle_t, c: &Call) -> Result<()> {
    let op = |t| if t { blas_sys::cublasOperation_t::CUBLAS_OP_T } else { blas_sys::cublasOperation_t::CUBLAS_OP_N };
    let compute = blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
    let algo = blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
    // alpha/beta are host f32: the handle's default host pointer mode reads them before returning.
    let (alpha, beta) = (&c.alpha as *const f32 as *const c_void, &c.beta as *const f32 as *const c_void);
    let (ab, ct) = (blas_type(c.ab), blas_type(c.ct));
    let no = blas_sys::cublasOperation_t::CUBLAS_OP_N;
    // SAFETY: the caller's contract covers the handle and every extent.
    let r = unsafe {
        if c.batch == 1 {
            cudarc::cublas::result::gemm_ex(
                handle,
                op(c.trans_a),
                no,
                c.m,
                c.n,
                c.k,
                alpha,
                c.a as *const c_void,
                ab,
                c.lda,
                c.b as *const c_void,
                ab,
                c.ldb,
                beta,
                c.c as *mut c_void,
                ct,
                c.ldc,
                compute,
                algo,
            )
        } else {
            cudarc::cublas::result::gemm_strided_batched_ex(
                handle,
                op(c.trans_a),
                no,
                c.m,
                c.n,
                c.k,
                alpha,
                c.a as *const c_void,
                ab,
                c.lda,
                c.stride_a,
                c.b as *const c_void,
                ab,
                c.ldb,
                c.stride_b,
                beta,
                c.c as *mut c_void,
                ct,
                c.ldc,
                c.stride_c,
                c.batch,
                compute,
                algo,
            )
        }
    };
    r.map_err(|e| BackendError::Driver { op: "cublasGemmEx", msg: e.to_string() })
}

impl CudaBackend {
    pub(super) fn gemm_impl(&self, s: &Stream, a: V, b: V, c: V, args: &GemmArgs) -> Result<()> {
        const OP: &str = "gemm";
        let ca = code(OP, "a", &a, false)?;
        let cb = code(OP, "b", &b, false)?;
        code(OP, "c", &c, false)?;
        let Some(conv) = convert_for(a.dtype, b.dtype, c.dtype, args.bf16_activations) else {
            return Err(BackendError::Unsupported {
                op: OP,
                why: format!("{} × {}: convert one operand to the other's type first", a.dtype, b.dtype),
            });
        };
        let ab = match conv {
            Convert::None | Convert::NarrowA => b.dtype,
            Convert::WidenA | Convert::WidenB => DType::F32,
        };
        // cuBLAS writes C as f32 or as the 16-bit type A and B are multiplied in.
        if !(c.dtype == DType::F32 || (c.dtype == ab && ab != DType::F32)) {
            return Err(BackendError::Unsupported {
                op: OP,
                why: format!("{} × {} into {}: ask for an f32 output", a.dtype, b.dtype, c.dtype),
            });
        }
        let GemmArgs { m, n, k, trans_b, batch, stride_a, stride_b, stride_c, alpha, beta, .. } = *args;
        if m == 0 || n == 0 || batch == 0 {
            return Ok(());
        }
        let need = |stride: usize, one: usize| (batch - 1).checked_mul(stride).and_then(|x| x.checked_add(one));
        shape(OP, need(stride_a, m * k).is_some_and(|x| x <= a.len), || format!("a holds {} < needed", a.len))?;
        shape(OP, need(stride_b, n * k).is_some_and(|x| x <= b.len), || format!("b holds {} < needed", b.len))?;
        shape(OP, need(stride_c, m * n).is_some_and(|x| x <= c.len), || format!("c holds {} < needed", c.len))?;
        let (pa, pb, pc) = (dptr(OP, "a", &a)?, dptr(OP, "b", &b)?, dptr(OP, "c", &c)?);
        validate::gemm(&a, &b, &c)?;
        let (mi, ni, ki) = (i32_arg(OP, "m", m)?, i32_arg(OP, "n", n)?, i32_arg(OP, "k", k)?);
        let batch_i = i32_arg(OP, "batch", batch)?;
        // Held until the last product is issued: converted operands live in the workspace until
        // cuBLAS has read them, and the handle is bound to this stream.
        let scratch = s.scratch(OP)?;
        self.bind()?;
        let ws = scratch.ptr();
        if conv == Convert::WidenB {
            return self.gemm_widen_b(s, scratch.blas(), ws, (pa, pb, pc), b.dtype, cb, args);
        }
        // Row-major C[m,n] = A[m,k] · op(B) is column-major Cᵀ[n,m] = op(B)ᵀ · Aᵀ: B is cuBLAS's
        // first operand (transposed iff B is the [n,k] weight layout) and A its second.
        let mut pa = pa;
        if conv != Convert::None {
            let a_elems = need(stride_a, m * k).unwrap_or(usize::MAX);
            let bytes = a_elems.saturating_mul(ab.size_bytes());
            if bytes > ATTN_WORKSPACE_BYTES {
                return Err(BackendError::Unsupported {
                    op: OP,
                    why: format!("{} × {} operand A of {bytes} B exceeds the conversion workspace", a.dtype, b.dtype),
                });
            }
            let to = if conv == Convert::NarrowA { cb } else { 0 };
            // SAFETY: A's extent was checked against its region and the workspace holds `bytes`.
            unsafe { self.cast_into(s, pa, ca, ws, to, a_elems)? };
            pa = ws;
        }
        let call = Call {
            trans_a: trans_b,
            m: ni,
            n: mi,
            k: ki,
            a: pb,
            lda: if trans_b { ki } else { ni },
            stride_a: stride_b as i64,
            b: pa,
            ldb: ki,
            stride_b: stride_a as i64,
            c: pc,
            ldc: ni,
            stride_c: stride_c as i64,
            batch: batch_i,
            alpha,
            beta,
            ab,
            ct: c.dtype,
        };
        // SAFETY: every operand's extent (all batch entries) was checked against its region
        // above; the handle is bound to `s` and held through `scratch`.
        unsafe { blas(scratch.blas(), &call) }
    }

    /// f32 A × 16-bit B (`b_dtype`, kernel code `b_code`), on `s` whose scratch the caller holds
    /// (`handle` its cuBLAS handle, `ws` its workspace): B widened to f32 in the workspace in
    /// slices of whole rows — of the [n, k] weight (`trans_b`; each slice writes its columns of
    /// C) or of the [k, n] matrix (each slice one k range, accumulated with beta = 1). A B shared
    /// by the batch (`stride_b == 0`) is widened once per slice for every entry.
    #[allow(clippy::too_many_arguments)]
    fn gemm_widen_b(
        &self,
        s: &Stream,
        handle: blas_sys::cublasHandle_t,
        ws: u64,
        (pa, pb, pc): (u64, u64, u64),
        b_dtype: DType,
        b_code: i32,
        args: &GemmArgs,
    ) -> Result<()> {
        const OP: &str = "gemm";
        let GemmArgs { m, n, k, trans_b, batch, stride_a, stride_b, stride_c, alpha, beta, .. } = *args;
        let (rows, row_elems) = if trans_b { (n, k) } else { (k, n) };
        let per = (ATTN_WORKSPACE_BYTES / 4) / row_elems;
        if per == 0 {
            return Err(BackendError::Unsupported {
                op: OP,
                why: format!("a row of {row_elems} elements of B does not fit the workspace as f32"),
            });
        }
        let shared = batch == 1 || stride_b == 0;
        let (entries, nb) = if shared { (1, batch) } else { (batch, 1) };
        let (mi, ni, ki, nbi) =
            (i32_arg(OP, "m", m)?, i32_arg(OP, "n", n)?, i32_arg(OP, "k", k)?, i32_arg(OP, "batch", nb)?);
        let (bsz, f32sz) = (b_dtype.size_bytes() as u64, 4u64);
        for p in 0..entries as u64 {
            let (pa_p, pb_p, pc_p) =
                (pa + p * stride_a as u64 * f32sz, pb + p * stride_b as u64 * bsz, pc + p * stride_c as u64 * f32sz);
            let mut r0 = 0;
            while r0 < rows {
                let nr = per.min(rows - r0);
                let nri = i32_arg(OP, "rows", nr)?;
                // SAFETY: rows r0..r0+nr of this entry of B lie inside B's checked extent, and
                // nr * row_elems f32 fit the workspace (`per`).
                unsafe { self.cast_into(s, pb_p + (r0 * row_elems) as u64 * bsz, b_code, ws, 0, nr * row_elems)? };
                let call = if trans_b {
                    // Cᵀ rows r0.. (C's columns) = B[r0..r0+nr, :] · Aᵀ.
                    Call {
                        trans_a: true,
                        m: nri,
                        n: mi,
                        k: ki,
                        a: ws,
                        lda: ki,
                        stride_a: 0,
                        b: pa_p,
                        ldb: ki,
                        stride_b: stride_a as i64,
                        c: pc_p + r0 as u64 * f32sz,
                        ldc: ni,
                        stride_c: stride_c as i64,
                        batch: nbi,
                        alpha,
                        beta,
                        ab: DType::F32,
                        ct: DType::F32,
                    }
                } else {
                    // Cᵀ (+)= B[r0..r0+nr, :]ᵀ · A[:, r0..r0+nr]ᵀ.
                    Call {
                        trans_a: false,
                        m: ni,
                        n: mi,
                        k: nri,
                        a: ws,
                        lda: ni,
                        stride_a: 0,
                        b: pa_p + r0 as u64 * f32sz,
                        ldb: ki,
                        stride_b: stride_a as i64,
                        c: pc_p,
                        ldc: ni,
                        stride_c: stride_c as i64,
                        batch: nbi,
                        alpha,
                        beta: if r0 == 0 { beta } else { 1.0 },
                        ab: DType::F32,
                        ct: DType::F32,
                    }
                };
                // SAFETY: the slice's operands lie inside A's, C's and the workspace's checked
                // extents; the caller holds the handle (bound to `s`) through the scratch guard.
                unsafe { blas(handle, &call)? };
                r0 += nr;
            }
        }
        Ok(())
    }

    /// Converts `elems` elements at `src` (kernel dtype code `from`) into `dst` (code `to`).
    ///
    /// # Safety
    /// Both extents lie inside device memory this stream may access, and do not overlap.
    unsafe fn cast_into(&self, s: &Stream, src: u64, from: i32, dst: u64, to: i32, elems: usize) -> Result<()> {
        let n = elems as i64;
        let mut p = kargs![&src, &from, &dst, &to, &n];
        // SAFETY: matches `cast(const void*, int, void*, int, i64)`; extents per this fn's contract.
        unsafe { self.launch(s, "cast", (self.grid_1d(elems), 1, 1), THREADS, 0, &mut p) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_types_convert_without_losing_f32() {
        use DType::*;
        assert_eq!(convert_for(BF16, BF16, BF16, false), Some(Convert::None));
        assert_eq!(convert_for(F32, BF16, F32, true), Some(Convert::NarrowA));
        assert_eq!(convert_for(F32, F16, F32, true), Some(Convert::NarrowA));
        assert_eq!(convert_for(F32, BF16, F32, false), Some(Convert::WidenB));
        assert_eq!(convert_for(F32, BF16, BF16, false), Some(Convert::NarrowA), "a 16-bit C is rounded anyway");
        assert_eq!(convert_for(BF16, F32, F32, false), Some(Convert::WidenA));
        assert_eq!(convert_for(F16, F32, F32, true), Some(Convert::WidenA));
        assert_eq!(convert_for(F16, BF16, F32, false), None);
    }
}
