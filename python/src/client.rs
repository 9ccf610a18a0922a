//! [`Client`]: one connection to a server, and `connect`.

use std::sync::Arc;

use djinn_client::{ClientOptions, OpenOptions, Qos};
use djinn_proto::msg::{ExecReq, HelloReply};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString, PyTuple};

use crate::buffer::HostBuffer;
use crate::conn::Shared;
use crate::errors::{Error, Res};
use crate::session::Session;
use crate::tensor::{self, Tensor};

/// A connection to a djinn-dataplane server (`tcp://HOST:PORT` or `shm://NAME`). Calls block
/// with the GIL released; one connection serves one call at a time (calls from several threads
/// queue). Close it with `close()` or a `with` block.
#[pyclass(frozen, module = "djinn._djinn")]
pub struct Client {
    shared: Arc<Shared>,
    url: String,
    transport: &'static str,
    hello: HelloReply,
}

fn token_bytes(token: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Vec<u8>>> {
    let Some(t) = token.filter(|t| !t.is_none()) else {
        // As the CLI: DJINN_TOKEN when no token is given.
        return Ok(djinn_client::load_token(None).map_err(Error::from)?);
    };
    if let Ok(s) = t.cast::<PyString>() {
        return Ok(Some(s.to_str()?.as_bytes().to_vec()));
    }
    if let Ok(b) = t.cast::<PyBytes>() {
        return Ok(Some(b.as_bytes().to_vec()));
    }
    Err(Error::Argument("token must be str, bytes or None".into()).into())
}

/// Connects to the server at `url` and completes the handshake. `token` (str or bytes)
/// authenticates the tenant; None uses the `DJINN_TOKEN` environment variable, if set.
#[pyfunction]
#[pyo3(signature = (url, token=None))]
pub fn connect(py: Python<'_>, url: &str, token: Option<&Bound<'_, PyAny>>) -> PyResult<Client> {
    let opts = ClientOptions { token: token_bytes(token)?, ..ClientOptions::default() };
    let url_owned = url.to_owned();
    let client = py
        .detach(move || djinn_client::Client::connect_with(&url_owned, &opts))
        .map_err(|e| Error::from(e).into_py(py))?;
    Ok(Client {
        url: url.to_owned(),
        transport: client.transport(),
        hello: client.capabilities().clone(),
        shared: Arc::new(Shared::new(client)),
    })
}

fn parse_qos(qos: Option<&str>) -> Res<Qos> {
    match qos {
        None => Ok(Qos::Interactive),
        Some(q) => q.parse().map_err(Error::Argument),
    }
}

#[pymethods]
impl Client {
    /// Names of the models the server serves.
    fn models(&self) -> Vec<String> {
        self.hello.models.clone()
    }

    /// What the server said in the handshake: backend, devices, transports, tenant id, limits.
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let h = &self.hello;
        let d = PyDict::new(py);
        d.set_item("version", h.version)?;
        d.set_item("tenant_id", h.tenant_id)?;
        d.set_item("backend", &h.backend)?;
        let devices: Vec<(String, u64)> = h.devices.iter().map(|d| (d.name.clone(), d.memory_bytes)).collect();
        d.set_item("devices", devices)?;
        d.set_item("models", &h.models)?;
        d.set_item("transports", &h.transports)?;
        d.set_item("frame_bytes_max", h.frame_bytes_max)?;
        d.set_item("meta_bytes_max", h.meta_bytes_max)?;
        Ok(d)
    }

    /// Opens a session on `model`. `qos`: "realtime", "interactive" (default) or "batch";
    /// `max_tokens`: longest the session may grow (0 = the model's maximum); `deadline_ms`: time
    /// per output token needed (0 = none).
    #[pyo3(signature = (model, qos=None, *, max_tokens=0, deadline_ms=0))]
    fn open_session(
        &self,
        py: Python<'_>,
        model: String,
        qos: Option<&str>,
        max_tokens: u32,
        deadline_ms: u32,
    ) -> PyResult<Session> {
        let opts = OpenOptions { model, qos: parse_qos(qos)?, max_tokens, deadline_ms };
        let info = self.shared.with(py, move |c| Ok(c.open_session(&opts)?))?;
        Ok(Session::new(self.shared.clone(), info))
    }

    /// Attaches this connection to an existing session of the same tenant (e.g. one opened on
    /// another connection, or before a reconnect).
    fn attach(&self, py: Python<'_>, session_id: u64) -> PyResult<Session> {
        let info = self.shared.with(py, move |c| Ok(c.attach_session(session_id)?))?;
        Ok(Session::new(self.shared.clone(), info))
    }

    /// Every position's logits of `ids` on `model` (a temporary session), as a float32 numpy
    /// array of shape (len(ids), vocab) over the received memory.
    fn logits<'py>(&self, py: Python<'py>, model: String, ids: Vec<u32>) -> PyResult<Bound<'py, PyAny>> {
        let (rows, vocab, bytes) = self.shared.with(py, move |c| Ok(c.logits_bytes(&model, &ids)?))?;
        let buf = Bound::new(py, HostBuffer::from_bytes(bytes))?;
        tensor::arrays(py)?.getattr("from_buffer")?.call1((buf, "f32", (rows, vocab)))
    }

    /// Uploads `x` (numpy array, torch CPU tensor, any DLPack or buffer object) and returns the
    /// remote `Tensor`. Bytes go from `x`'s own memory to the socket; `dtype` overrides the wire
    /// dtype for same-sized elements (e.g. "bf16" for uint16 bit patterns).
    #[pyo3(signature = (x, dtype=None))]
    fn put(&self, py: Python<'_>, x: &Bound<'_, PyAny>, dtype: Option<&str>) -> PyResult<Tensor> {
        tensor::put(py, &self.shared, x, dtype)
    }

    /// Downloads a tensor into a numpy array (same as `tensor.numpy()`).
    fn get<'py>(&self, py: Python<'py>, t: &Bound<'py, Tensor>) -> PyResult<Bound<'py, PyAny>> {
        t.get().same_connection(&self.shared)?;
        let h = t.get().live_handle()?;
        let (desc, bytes) = self.shared.with(py, move |c| Ok(c.get(h)?))?;
        tensor::to_numpy(py, HostBuffer::from_bytes(bytes), &desc)
    }

    /// Frees tensors on the server now.
    #[pyo3(signature = (*tensors))]
    fn free(&self, py: Python<'_>, tensors: &Bound<'_, PyTuple>) -> PyResult<()> {
        for t in tensors.iter() {
            t.cast::<Tensor>().map_err(|_| Error::Argument("free takes Tensors".into()))?.get().free(py)?;
        }
        Ok(())
    }

    /// Runs one op on the server: `exec("matmul", a, b)`, `exec("scale", x, f32=[0.5])`.
    /// Inputs are Tensors; `f32` and `i64` are the op's attributes. Returns the result Tensor.
    #[pyo3(signature = (op, *inputs, f32=None, i64=None))]
    fn exec(
        &self,
        py: Python<'_>,
        op: &str,
        inputs: &Bound<'_, PyTuple>,
        f32: Option<Vec<f32>>,
        i64: Option<Vec<i64>>,
    ) -> PyResult<Tensor> {
        let inputs: Vec<Bound<'_, PyAny>> = inputs.iter().collect();
        let n = tensor::node(&self.shared, op, &inputs, f32.unwrap_or_default(), i64.unwrap_or_default())?;
        let mut out = tensor::exec(py, &self.shared, ExecReq::single(n))?;
        Ok(out.remove(0))
    }

    /// Runs a small graph in one request. `nodes`: a list of `(op, inputs, f32_attrs,
    /// i64_attrs)` where an input is a Tensor or the index of an earlier node; `outputs`: the
    /// indices of the nodes to keep. Returns one Tensor per output (see `djinn.Graph`).
    fn run(&self, py: Python<'_>, nodes: &Bound<'_, PyList>, outputs: Vec<u16>) -> PyResult<Vec<Tensor>> {
        let mut req = ExecReq { nodes: Vec::with_capacity(nodes.len()), outputs };
        for n in nodes.iter() {
            let (op, inputs, f, i): (String, Vec<Bound<'_, PyAny>>, Vec<f32>, Vec<i64>) = n.extract()?;
            req.nodes.push(tensor::node(&self.shared, &op, &inputs, f, i)?);
        }
        tensor::exec(py, &self.shared, req)
    }

    /// Echoes `payload` through the server (a round trip); returns the echo.
    fn ping<'py>(&self, py: Python<'py>, payload: Vec<u8>) -> PyResult<Bound<'py, PyBytes>> {
        let echo = self.shared.with(py, move |c| Ok(c.ping(&payload)?))?;
        Ok(PyBytes::new(py, &echo))
    }

    /// The server's named counters.
    fn stats(&self, py: Python<'_>) -> PyResult<Vec<(String, u64)>> {
        self.shared.with(py, |c| Ok(c.stats()?))
    }

    /// Closes the connection (idempotent). Sessions stay on the server until their lease ends.
    fn close(&self, py: Python<'_>) {
        self.shared.close(py);
    }

    #[getter]
    fn closed(&self, py: Python<'_>) -> bool {
        self.shared.is_closed(py)
    }
    #[getter]
    fn url(&self) -> &str {
        &self.url
    }
    /// "tcp-socket", "tcp", "shm", ...
    #[getter]
    fn transport(&self) -> &'static str {
        self.transport
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, PyTuple>) -> bool {
        self.close(py);
        false
    }

    fn __repr__(&self) -> String {
        format!("<Client {} ({}) models={:?}>", self.url, self.transport, self.hello.models)
    }
}
