//! Validated operands: a [`View`] checked against its region (bounds, alignment, dtype) becomes
//! a [`Raw`] pointer range the kernels may touch; plus the f32 load/store conversions every op
//! uses (storage dtype → f32 compute → storage dtype, round-to-nearest-even on the way back).
//!
//! Invariant: a `Raw` only exists for a range that lies inside a live region and is aligned for
//! its dtype; kernels write only to outputs that the op checked against every input for overlap.

use std::cell::Cell;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use super::CpuBackend;
use crate::backend::{RegionInfo, View};
use crate::error::{BackendError, Result};
use crate::DType;

/// A checked operand: `len` elements of `dtype` at `ptr`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Raw {
    pub ptr: *mut u8,
    pub dtype: DType,
    pub len: usize,
}

// SAFETY: a `Raw` is a plain address range inside a region that the issuing thread holds (and
// keeps alive) for the whole op; ops split writes into disjoint element ranges per worker, and
// reads of inputs never overlap outputs (checked) except in the exact in-place cases each op
// documents, where every element is read before it is written by the same worker.
unsafe impl Send for Raw {}
// SAFETY: see `Send`.
unsafe impl Sync for Raw {}

impl Raw {
    pub fn bytes(&self) -> usize {
        self.len * self.dtype.size_bytes()
    }
    fn start(&self) -> usize {
        self.ptr as usize
    }
    fn end(&self) -> usize {
        self.start() + self.bytes()
    }
    pub fn overlaps(&self, other: &Raw) -> bool {
        self.bytes() > 0 && other.bytes() > 0 && self.start() < other.end() && other.start() < self.end()
    }
    pub fn same(&self, other: &Raw) -> bool {
        self.ptr == other.ptr && self.dtype == other.dtype && self.len == other.len
    }
    /// Elements `first..first + len` (caller checked the range).
    pub fn sub(&self, first: usize, len: usize) -> Raw {
        debug_assert!(first + len <= self.len);
        // SAFETY: `first + len <= self.len`, so the result stays inside the checked range.
        Raw { ptr: unsafe { self.ptr.add(first * self.dtype.size_bytes()) }, dtype: self.dtype, len }
    }
    /// The elements as a typed slice.
    ///
    /// # Safety
    /// `T` must match `dtype`, and no other thread may write these elements while it lives.
    pub unsafe fn slice<'a, T>(&self) -> &'a [T] {
        debug_assert_eq!(std::mem::size_of::<T>(), self.dtype.size_bytes());
        std::slice::from_raw_parts(self.ptr as *const T, self.len)
    }
    /// # Safety
    /// `T` must match `dtype`, and nothing else may read or write these elements while it lives.
    pub unsafe fn slice_mut<'a, T>(&self) -> &'a mut [T] {
        debug_assert_eq!(std::mem::size_of::<T>(), self.dtype.size_bytes());
        std::slice::from_raw_parts_mut(self.ptr as *mut T, self.len)
    }
}

/// Byte range `[offset, offset + bytes)` of `region`, checked.
pub(crate) fn range(
    op: &'static str,
    operand: &'static str,
    region: &super::CpuRegion,
    offset: usize,
    bytes: usize,
) -> Result<*mut u8> {
    let region_bytes = region.len_bytes();
    match offset.checked_add(bytes) {
        Some(end) if end <= region_bytes => {
            // SAFETY: `offset <= region_bytes`, inside (or one past) the mapping.
            Ok(unsafe { region.base().add(offset) })
        }
        _ => Err(BackendError::OutOfBounds { op, operand, offset, bytes, region_bytes }),
    }
}

/// Checks a view (bounds, alignment) and turns it into a [`Raw`].
pub(crate) fn operand(op: &'static str, name: &'static str, v: &View<'_, CpuBackend>) -> Result<Raw> {
    let size = v.dtype.size_bytes();
    let bytes = v.len.checked_mul(size).ok_or(BackendError::OutOfBounds {
        op,
        operand: name,
        offset: v.offset,
        bytes: usize::MAX,
        region_bytes: v.region.len_bytes(),
    })?;
    if !v.offset.is_multiple_of(size) {
        return Err(BackendError::Shape {
            op,
            why: format!("operand {name} offset {} is not aligned to its {} elements", v.offset, v.dtype),
        });
    }
    let ptr = range(op, name, v.region, v.offset, bytes)?;
    Ok(Raw { ptr, dtype: v.dtype, len: v.len })
}

/// A float (f32/f16/bf16) operand.
pub(crate) fn float(op: &'static str, name: &'static str, v: &View<'_, CpuBackend>) -> Result<Raw> {
    let r = operand(op, name, v)?;
    if !r.dtype.is_float() {
        return Err(BackendError::DType { op, operand: name, got: r.dtype, expected: "f32, f16 or bf16" });
    }
    Ok(r)
}

/// An operand of exactly `dtype`.
pub(crate) fn typed(op: &'static str, name: &'static str, v: &View<'_, CpuBackend>, dtype: DType) -> Result<Raw> {
    let r = operand(op, name, v)?;
    if r.dtype != dtype {
        return Err(BackendError::DType { op, operand: name, got: r.dtype, expected: dtype.name() });
    }
    Ok(r)
}

/// `out` must not overlap `input`.
pub(crate) fn disjoint(op: &'static str, name: &'static str, out: &Raw, input: &Raw) -> Result<()> {
    if out.overlaps(input) {
        return Err(BackendError::Overlap { op, operand: name });
    }
    Ok(())
}

pub(crate) fn shape(op: &'static str, why: impl Into<String>) -> BackendError {
    BackendError::Shape { op, why: why.into() }
}

pub(crate) fn len_eq(op: &'static str, name: &'static str, r: &Raw, want: usize) -> Result<()> {
    if r.len != want {
        return Err(shape(op, format!("{name} has {} elements, expected {want}", r.len)));
    }
    Ok(())
}

/// Loads elements `first..first + dst.len()` of `src` as f32 (i32 converts by value).
///
/// # Safety
/// The range must lie inside `src` and no other thread may write it meanwhile.
pub(crate) unsafe fn load(src: &Raw, first: usize, dst: &mut [f32]) {
    let r = src.sub(first, dst.len());
    match r.dtype {
        DType::F32 => dst.copy_from_slice(r.slice::<f32>()),
        DType::F16 => r.slice::<f16>().convert_to_f32_slice(dst),
        DType::BF16 => r.slice::<bf16>().convert_to_f32_slice(dst),
        DType::I32 => dst.iter_mut().zip(r.slice::<i32>()).for_each(|(d, s)| *d = *s as f32),
        DType::I64 => dst.iter_mut().zip(r.slice::<i64>()).for_each(|(d, s)| *d = *s as f32),
        DType::U8 => dst.iter_mut().zip(r.slice::<u8>()).for_each(|(d, s)| *d = *s as f32),
    }
}

/// Runs `f` over the first `len` elements of `src` as f32: borrowed in place when `src` is f32,
/// else widened into per-thread scratch (see [`with_scratch`]).
///
/// # Safety
/// `src` must hold at least `len` elements and no other thread may write them meanwhile.
pub(crate) unsafe fn with_f32<R>(src: &Raw, len: usize, f: impl FnOnce(&[f32]) -> R) -> R {
    if src.dtype == DType::F32 {
        f(&src.slice::<f32>()[..len])
    } else {
        with_scratch(len, |x| {
            load(src, 0, x);
            f(x)
        })
    }
}

/// Stores `src` into elements `first..first + src.len()` of `dst`, rounding to its dtype
/// (ints: truncation toward zero, saturating).
///
/// # Safety
/// The range must lie inside `dst` and nothing else may access it meanwhile.
pub(crate) unsafe fn store(dst: &Raw, first: usize, src: &[f32]) {
    let r = dst.sub(first, src.len());
    match r.dtype {
        DType::F32 => r.slice_mut::<f32>().copy_from_slice(src),
        DType::F16 => r.slice_mut::<f16>().convert_from_f32_slice(src),
        DType::BF16 => r.slice_mut::<bf16>().convert_from_f32_slice(src),
        DType::I32 => r.slice_mut::<i32>().iter_mut().zip(src).for_each(|(d, s)| *d = *s as i32),
        DType::I64 => r.slice_mut::<i64>().iter_mut().zip(src).for_each(|(d, s)| *d = *s as i64),
        DType::U8 => r.slice_mut::<u8>().iter_mut().zip(src).for_each(|(d, s)| *d = *s as u8),
    }
}

/// Rounds f32 values to what `dtype` would store (so later math sees the stored value).
pub(crate) fn round_to(dtype: DType, xs: &mut [f32]) {
    match dtype {
        DType::F16 => xs.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32()),
        DType::BF16 => xs.iter_mut().for_each(|x| *x = bf16::from_f32(*x).to_f32()),
        _ => {}
    }
}

/// Reads an i32 index operand (host memory on this backend).
///
/// # Safety
/// `r` must be an i32 operand that no other thread writes meanwhile.
pub(crate) unsafe fn ints<'a>(r: &Raw) -> &'a [i32] {
    r.slice::<i32>()
}

thread_local! {
    static SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Runs `f` with a per-thread f32 scratch buffer of `len` elements (contents unspecified).
/// The buffer only grows, so after warm-up no op allocates; a nested call gets its own buffer.
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut v = SCRATCH.with(|c| c.take());
    if v.len() < len {
        v.resize(len, 0.0);
    }
    let r = f(&mut v[..len]);
    SCRATCH.with(|c| {
        let other = c.take();
        c.set(if other.capacity() > v.capacity() { other } else { v });
    });
    r
}
