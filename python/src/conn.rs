//! One connection shared by every Python object made from it (client, sessions, streams,
//! tensors), and the rules for using it from Python threads.
//!
//! Invariants:
//! - The connection's mutex is taken only with the GIL released ([`Shared::with`] runs inside
//!   `Python::detach`) and is never held while acquiring the GIL, so a thread waiting on the
//!   network never blocks one that holds the GIL, and no lock order can deadlock.
//! - At most one token stream is open per connection ([`Conn::stream`]). While it is open,
//!   other calls fail with `ClientBusyError` instead of consuming its frames; a stream whose
//!   Python object was dropped unfinished is cancelled and drained by the next call.
//! - Tensors dropped by Python are freed on the server by the next call (one batched
//!   TensorFree), never from a destructor: destructors only push to [`Shared::dropped`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use djinn_client::{Client, DecodeStream};
use djinn_proto::msg::{Handle, FREE_HANDLES_MAX};
use pyo3::prelude::*;

use crate::errors::{Error, Res};

/// An open token stream: the serial of its Python object and the client-side state.
pub(crate) struct OpenStream {
    pub(crate) serial: u64,
    pub(crate) stream: DecodeStream,
}

pub(crate) struct Conn {
    /// None once closed.
    client: Option<Client>,
    pub(crate) stream: Option<OpenStream>,
    next_serial: u64,
}

pub(crate) struct Shared {
    conn: Mutex<Conn>,
    /// Handles of tensors Python dropped, to free before the next request.
    dropped: Mutex<Vec<Handle>>,
    /// Serial of a stream whose Python object was dropped before its end (0 = none).
    abandoned: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic inside a call (turned into a Python exception by PyO3) leaves nothing half-done
    // that a later call could trip on: the client's own state is updated atomically per frame.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub(crate) fn new(client: Client) -> Self {
        Shared {
            conn: Mutex::new(Conn { client: Some(client), stream: None, next_serial: 1 }),
            dropped: Mutex::new(Vec::new()),
            abandoned: AtomicU64::new(0),
        }
    }

    /// Runs `f` on the connection with the GIL released, after freeing dropped tensors and
    /// draining an abandoned stream. An open stream makes this `ClientBusyError`.
    pub(crate) fn with<T: Send>(&self, py: Python<'_>, f: impl FnOnce(&mut Client) -> Res<T> + Send) -> PyResult<T> {
        py.detach(|| {
            let mut c = lock(&self.conn);
            self.settle(&mut c)?;
            f(c.client.as_mut().ok_or(Error::Closed("the client"))?)
        })
        .map_err(|e| e.into_py(py))
    }

    /// Like [`Shared::with`], with the whole connection state (stream operations).
    pub(crate) fn with_conn<T: Send>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Conn, &mut Client) -> Res<T> + Send,
    ) -> PyResult<T> {
        py.detach(|| {
            let mut guard = lock(&self.conn);
            let conn = &mut *guard;
            let mut client = conn.client.take().ok_or(Error::Closed("the client"))?;
            let r = f(conn, &mut client);
            conn.client = Some(client);
            r
        })
        .map_err(|e| e.into_py(py))
    }

    /// Frees dropped tensors, drains an abandoned stream, refuses while a stream is open.
    fn settle(&self, c: &mut Conn) -> Res<()> {
        let Some(client) = c.client.as_mut() else { return Err(Error::Closed("the client")) };
        if let Some(open) = c.stream.as_mut() {
            if self.abandoned.load(Ordering::Acquire) != open.serial {
                return Err(Error::Busy(format!(
                    "a token stream of session {} is open on this connection: read it to its end or close() it \
                     first, or use another connection",
                    open.stream.session()
                )));
            }
            let drained = drain(client, &mut open.stream);
            c.stream = None;
            drained?;
        }
        let handles = std::mem::take(&mut *lock(&self.dropped));
        for chunk in handles.chunks(FREE_HANDLES_MAX) {
            match client.free(chunk) {
                // Handles the server already dropped (e.g. over a tenant limit) need no free.
                Ok(()) | Err(djinn_client::ClientError::Server { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Starts a stream with `start` (on a settled connection) and registers it; returns its serial.
    pub(crate) fn open_stream(
        &self,
        py: Python<'_>,
        start: impl FnOnce(&mut Client) -> Res<DecodeStream> + Send,
    ) -> PyResult<u64> {
        py.detach(|| {
            let mut guard = lock(&self.conn);
            self.settle(&mut guard)?;
            let c = &mut *guard;
            let client = c.client.as_mut().ok_or(Error::Closed("the client"))?;
            let stream = start(client)?;
            let serial = c.next_serial;
            c.next_serial += 1;
            c.stream = Some(OpenStream { serial, stream });
            Ok(serial)
        })
        .map_err(|e: Error| e.into_py(py))
    }

    /// A tensor's Python object is gone: free its handle with the next request.
    pub(crate) fn drop_handle(&self, h: Handle) {
        lock(&self.dropped).push(h);
    }

    /// A stream's Python object is gone before its end: the next request drains it.
    pub(crate) fn abandon_stream(&self, serial: u64) {
        self.abandoned.store(serial, Ordering::Release);
    }

    /// Closes the connection (an open stream is dropped with it). Idempotent.
    pub(crate) fn close(&self, py: Python<'_>) {
        py.detach(|| {
            let mut c = lock(&self.conn);
            c.stream = None;
            c.client = None;
        });
        lock(&self.dropped).clear();
    }

    pub(crate) fn is_closed(&self, py: Python<'_>) -> bool {
        py.detach(|| lock(&self.conn).client.is_none())
    }
}

/// Cancels a stream and reads it to its final frame, so the connection is in step again.
pub(crate) fn drain(client: &mut Client, s: &mut DecodeStream) -> Res<Option<djinn_client::DecodeSummary>> {
    if s.is_finished() {
        return Ok(None);
    }
    client.stream_cancel(s)?;
    loop {
        if let djinn_client::StreamEvent::Done(summary) = client.stream_next(s)? {
            return Ok(Some(summary));
        }
    }
}
