//! Memory handed to Python without a copy: [`HostBuffer`] owns a download's bytes (or a logits
//! vector) and exports them through the buffer protocol, so `numpy.frombuffer` (and from there
//! `torch.from_numpy`) views the very allocation the reply was received into.
//!
//! Invariant: the allocation is never resized or moved while the object lives; Python holds the
//! object (through each exported view's `obj`) as long as any array views it.

use std::ffi::{c_int, c_void};

use pyo3::ffi;
use pyo3::prelude::*;

/// Who frees the allocation.
enum Owner {
    Bytes(*mut [u8]),
    F32(*mut [f32]),
}

/// Bytes received from the server, shared with numpy arrays over the buffer protocol.
#[pyclass(frozen, module = "djinn._djinn")]
pub struct HostBuffer {
    ptr: *mut u8,
    len: usize,
    owner: Owner,
}

// SAFETY: the allocation is owned by this object alone (no other Rust reference to it exists) and
// freed once, in Drop; concurrent access from Python threads goes through the buffer protocol,
// where (as for `bytearray`) the Python program orders its own reads and writes.
unsafe impl Send for HostBuffer {}
// SAFETY: as for Send: Rust never reads or writes the bytes after construction.
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    pub(crate) fn from_bytes(v: Vec<u8>) -> Self {
        let raw = Box::into_raw(v.into_boxed_slice());
        HostBuffer { ptr: raw.cast::<u8>(), len: raw.len(), owner: Owner::Bytes(raw) }
    }

    pub(crate) fn from_f32(v: Vec<f32>) -> Self {
        let raw = Box::into_raw(v.into_boxed_slice());
        HostBuffer { ptr: raw.cast::<u8>(), len: raw.len() * 4, owner: Owner::F32(raw) }
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        // SAFETY: each pointer came from Box::into_raw in a constructor and is freed only here;
        // no view outlives the object (every exported view holds a reference to it).
        unsafe {
            match self.owner {
                Owner::Bytes(p) => drop(Box::from_raw(p)),
                Owner::F32(p) => drop(Box::from_raw(p)),
            }
        }
    }
}

#[pymethods]
impl HostBuffer {
    /// Size in bytes.
    fn __len__(&self) -> usize {
        self.len
    }

    /// Address of the first byte (tests use it to check that arrays share this memory).
    #[getter]
    fn address(&self) -> usize {
        self.ptr as usize
    }

    /// # Safety
    /// Called by CPython with a valid `view` to fill; the view keeps `slf` alive.
    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut ffi::Py_buffer, flags: c_int) -> PyResult<()> {
        let (ptr, len) = (slf.get().ptr, slf.get().len);
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
