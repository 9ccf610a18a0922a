//! Remote tensors: [`Tensor`] names a tensor the server holds for this tenant; uploads send
//! straight from the caller's memory, downloads land in a [`HostBuffer`] that numpy views.
//! Ops run on the server (`Client.exec` for one op, `Client.run` for a small graph).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use djinn_proto::msg::{ExecInput, ExecNode, ExecOp, ExecReq, Handle};
use djinn_proto::{DType, TensorDesc};
use pyo3::buffer::PyUntypedBuffer;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

use crate::buffer::HostBuffer;
use crate::conn::Shared;
use crate::errors::{Error, Res};

/// `djinn._arrays`, imported once.
static ARRAYS: PyOnceLock<Py<PyModule>> = PyOnceLock::new();

pub(crate) fn arrays(py: Python<'_>) -> PyResult<&Bound<'_, PyModule>> {
    ARRAYS.get_or_try_init(py, || Ok::<_, PyErr>(py.import("djinn._arrays")?.unbind())).map(|m| m.bind(py))
}

pub(crate) fn dtype_from_name(name: &str) -> Res<DType> {
    DType::ALL
        .iter()
        .copied()
        .find(|d| d.name() == name)
        .ok_or_else(|| Error::Argument(format!("unknown dtype {name:?}: f32, f16, bf16, i32, i64 or u8")))
}

/// A numpy array over `buf`'s memory with `desc`'s dtype and shape.
pub(crate) fn to_numpy<'py>(py: Python<'py>, buf: HostBuffer, desc: &TensorDesc) -> PyResult<Bound<'py, PyAny>> {
    let buf = Bound::new(py, buf)?;
    arrays(py)?.getattr("from_buffer")?.call1((buf, desc.dtype().name(), desc.shape().to_vec()))
}

/// A tensor held by the server. Its memory is freed on the server by `free()`, by leaving a
/// `with` block, or (with the connection's next request) once Python drops the object.
#[pyclass(frozen, module = "djinn._djinn")]
pub struct Tensor {
    shared: Arc<Shared>,
    handle: Handle,
    desc: TensorDesc,
    freed: AtomicBool,
}

impl Tensor {
    pub(crate) fn new(shared: Arc<Shared>, handle: Handle, desc: TensorDesc) -> Self {
        Tensor { shared, handle, desc, freed: AtomicBool::new(false) }
    }

    /// The handle, unless freed.
    pub(crate) fn live_handle(&self) -> Res<Handle> {
        if self.freed.load(Ordering::Acquire) {
            return Err(Error::Closed("this tensor (freed)"));
        }
        Ok(self.handle)
    }

    pub(crate) fn same_connection(&self, shared: &Arc<Shared>) -> Res<()> {
        if !Arc::ptr_eq(&self.shared, shared) {
            return Err(Error::Argument("the tensor belongs to another connection".into()));
        }
        Ok(())
    }
}

#[pymethods]
impl Tensor {
    /// Downloads the tensor into a new numpy array (the array views the received bytes; bf16
    /// comes back as uint16 bit patterns).
    fn numpy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let h = self.live_handle()?;
        let (desc, bytes) = self.shared.with(py, move |c| Ok(c.get(h)?))?;
        to_numpy(py, HostBuffer::from_bytes(bytes), &desc)
    }

    /// Downloads the tensor into a torch CPU tensor sharing the received memory (needs torch).
    fn torch<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let arr = self.numpy(py)?;
        arrays(py)?.getattr("to_torch")?.call1((arr, self.desc.dtype().name()))
    }

    /// Frees the tensor on the server now (idempotent).
    pub(crate) fn free(&self, py: Python<'_>) -> PyResult<()> {
        if self.freed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let h = self.handle;
        self.shared.with(py, move |c| Ok(c.free(&[h])?))
    }

    #[getter]
    fn handle(&self) -> Handle {
        self.handle
    }
    /// Wire dtype: "f32", "f16", "bf16", "i32", "i64" or "u8".
    #[getter]
    fn dtype(&self) -> &'static str {
        self.desc.dtype().name()
    }
    #[getter]
    fn shape(&self) -> Vec<u64> {
        self.desc.shape().to_vec()
    }
    #[getter]
    fn nbytes(&self) -> u64 {
        self.desc.byte_len()
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        if !self.shared.is_closed(py) {
            self.free(py)?;
        }
        Ok(false)
    }

    fn __repr__(&self) -> String {
        format!("<Tensor handle={} {}{:?}>", self.handle, self.desc.dtype().name(), self.desc.shape())
    }
}

impl Drop for Tensor {
    fn drop(&mut self) {
        if !self.freed.load(Ordering::Acquire) {
            self.shared.drop_handle(self.handle);
        }
    }
}

/// Uploads `x` (numpy array, torch CPU tensor, DLPack or buffer object) from its own memory.
pub(crate) fn put(py: Python<'_>, shared: &Arc<Shared>, x: &Bound<'_, PyAny>, dtype: Option<&str>) -> PyResult<Tensor> {
    let (view, wire, shape): (Bound<'_, PyAny>, String, Vec<u64>) =
        arrays(py)?.getattr("as_bytes")?.call1((x, dtype))?.extract()?;
    let dtype = dtype_from_name(&wire)?;
    let desc = TensorDesc::new(dtype, &shape).map_err(|e| Error::Argument(e.to_string()))?;
    let buf = PyUntypedBuffer::get(&view)?;
    if !buf.is_c_contiguous() || buf.len_bytes() as u64 != desc.byte_len() {
        return Err(Error::Argument(format!("buffer of {} bytes does not hold {desc:?}", buf.len_bytes())).into());
    }
    let h = shared.with(py, |c| {
        // SAFETY: the buffer export (`buf`) pins the memory for this call and is released only
        // after `with` returns; `len_bytes` bytes from `buf_ptr` are the exporter's contiguous data.
        let bytes = unsafe { std::slice::from_raw_parts(buf.buf_ptr().cast::<u8>(), buf.len_bytes()) };
        Ok(c.put(desc, bytes)?)
    })?;
    drop(buf);
    Ok(Tensor::new(shared.clone(), h, desc))
}

/// The op of a name: `"matmul"`, `"rms_norm"`, `"RmsNorm"` (case and underscores ignored).
pub(crate) fn op_from_name(name: &str) -> Res<ExecOp> {
    let want: String = name.chars().filter(|c| *c != '_').flat_map(char::to_lowercase).collect();
    ExecOp::ALL.iter().copied().find(|op| op.name().to_lowercase() == want).ok_or_else(|| {
        let names: Vec<String> = ExecOp::ALL.iter().map(|o| o.name().to_lowercase()).collect();
        Error::Argument(format!("unknown op {name:?}; ops: {}", names.join(", ")))
    })
}

/// One node input: a Tensor of this connection, or an int naming an earlier node.
pub(crate) fn exec_input(shared: &Arc<Shared>, x: &Bound<'_, PyAny>) -> PyResult<ExecInput> {
    if let Ok(t) = x.cast::<Tensor>() {
        let t = t.get();
        t.same_connection(shared)?;
        return Ok(ExecInput::Handle(t.live_handle()?));
    }
    let i: u16 = x.extract().map_err(|_| Error::Argument("an op input is a Tensor or a node index".into()))?;
    Ok(ExecInput::Node(i))
}

pub(crate) fn node(
    shared: &Arc<Shared>,
    op: &str,
    inputs: &[Bound<'_, PyAny>],
    f32_attrs: Vec<f32>,
    i64_attrs: Vec<i64>,
) -> PyResult<ExecNode> {
    let op = op_from_name(op)?;
    let inputs = inputs.iter().map(|x| exec_input(shared, x)).collect::<PyResult<Vec<_>>>()?;
    Ok(ExecNode { op, inputs, attrs_f32: f32_attrs, attrs_i64: i64_attrs })
}

/// Runs `req` and wraps its outputs.
pub(crate) fn exec(py: Python<'_>, shared: &Arc<Shared>, req: ExecReq) -> PyResult<Vec<Tensor>> {
    let outs = shared.with(py, move |c| Ok(c.exec(&req)?))?;
    Ok(outs.into_iter().map(|(h, d)| Tensor::new(shared.clone(), h, d)).collect())
}
