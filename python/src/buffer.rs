//! Memory handed to Python without a copy: [`HostBuffer`] owns a reply's bytes (a tensor, logits)
//! and exports them through the buffer protocol, so `numpy.frombuffer` (and from there
//! `torch.from_numpy`) views the very allocation the reply was received into.
//!
//! Invariant: the allocation is never resized or moved while the object lives; Python holds the
//! object (through each exported view's `obj`) as long as any array views it.

use std::ffi::{c_int, c_void};

use pyo3::ffi;
use pyo3::prelude::*;

/// Bytes received from the server, shared with numpy arrays over the buffer protocol.
#[pyclass(frozen, module = "djinn._djinn")]
pub struct HostBuffer {
    /// From `Box::into_raw`; freed in Drop.
    bytes: *mut [u8],
}

// SAFETY: the allocation is owned by this object alone (no other Rust reference to it exists) and
// freed once, in Drop; concurrent access from Python threads goes through the buffer protocol,
// where (as for `bytearray`) the Python program orders its own reads and writes.
unsafe impl Send for HostBuffer {}
// SAFETY: as for Send: Rust never reads or writes the bytes after construction.
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    pub(crate) fn from_bytes(v: Vec<u8>) -> Self {
        // A vector received into at its exact size has no spare capacity: no reallocation here.
        HostBuffer { bytes: Box::into_raw(v.into_boxed_slice()) }
    }

    fn ptr_len(&self) -> (*mut u8, usize) {
        (self.bytes.cast::<u8>(), self.bytes.len())
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        // SAFETY: the pointer came from Box::into_raw in `from_bytes` and is freed only here; no
        // exported view outlives the object (each holds a reference to it).
        unsafe { drop(Box::from_raw(self.bytes)) }
    }
}

#[pymethods]
impl HostBuffer {
    /// Size in bytes.
    fn __len__(&self) -> usize {
        self.bytes.len()
    }

    /// Address of the first byte (tests use it to check that arrays share this memory).
    #[getter]
    fn address(&self) -> usize {
        self.ptr_len().0 as usize
    }

    /// # Safety
    /// Called by CPython with a valid `view` to fill; the view keeps `slf` alive.
    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        let (ptr, len) = slf.get().ptr_len();
        // SAFETY: `view` is CPython's to fill; `ptr..ptr + len` stays valid while `slf` lives,
        // and PyBuffer_FillInfo takes a reference to `slf` into `view.obj`.
        let rc = unsafe {
            ffi::PyBuffer_FillInfo(view, slf.as_ptr(), ptr.cast::<c_void>(), len as ffi::Py_ssize_t, 0, flags)
        };
        if rc == -1 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }
}
