//! [`TokenStream`]: a decode read as a Python iterator of `(token id, text)`.
//!
//! Each `__next__` reads one token frame with the GIL released and returns a fresh tuple; the
//! client's stream state lives in the connection ([`crate::conn::Conn::stream`]), this object
//! only names it by serial.

use std::sync::{Arc, OnceLock};

use djinn_client::{DecodeSummary, FinishReason, StreamEvent};
use pyo3::prelude::*;

use crate::conn::{drain, Shared};
use crate::errors::Error;

pub(crate) fn finish_name(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Eos => "eos",
        FinishReason::Length => "length",
        FinishReason::Stop => "stop",
        FinishReason::Cancelled => "cancelled",
    }
}

/// Tokens of one decode as they are generated: iterate for `(token_id, text)` pairs (`text` is
/// what the token completes; it may be empty). After the last token, `finish`, `tokens`,
/// `prompt_tokens` and `context_tokens` tell how the decode ended. `close()` (or leaving a
/// `with` block, or dropping the object) cancels a decode that is still running.
#[pyclass(frozen, module = "djinn._djinn")]
pub struct TokenStream {
    shared: Arc<Shared>,
    serial: u64,
    session: u64,
    summary: OnceLock<DecodeSummary>,
}

impl TokenStream {
    pub(crate) fn new(shared: Arc<Shared>, serial: u64, session: u64) -> Self {
        TokenStream { shared, serial, session, summary: OnceLock::new() }
    }

    fn summary_field<T>(&self, f: impl FnOnce(&DecodeSummary) -> T) -> Option<T> {
        self.summary.get().map(f)
    }
}

enum Next {
    Token(u32, String),
    Done(DecodeSummary),
}

#[pymethods]
impl TokenStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<(u32, String)>> {
        if self.summary.get().is_some() {
            return Ok(None);
        }
        let serial = self.serial;
        let next = self.shared.with_conn(py, |conn, client| {
            let open = match conn.stream.as_mut() {
                Some(o) if o.serial == serial => o,
                _ => return Err(Error::Closed("this token stream")),
            };
            let next = match client.stream_next(&mut open.stream) {
                Ok(StreamEvent::Token(ev)) => Ok(Next::Token(ev.token, ev.text.to_owned())),
                Ok(StreamEvent::Done(s)) => Ok(Next::Done(s)),
                // Streams from Python are started without breakpoints, so the server never pauses them.
                Ok(StreamEvent::Paused(_)) => Err(djinn_client::ClientError::Protocol {
                    opcode: "SessionPaused",
                    why: "a pause on a decode started without breakpoints".into(),
                }),
                Err(e) => Err(e),
            };
            if open.stream.is_finished() {
                conn.stream = None;
            }
            Ok(next?)
        })?;
        match next {
            Next::Token(id, text) => Ok(Some((id, text))),
            Next::Done(s) => {
                let _ = self.summary.set(s);
                Ok(None)
            }
        }
    }

    /// Cancels the decode if it is still running and reads it to its end (idempotent).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        if self.summary.get().is_some() {
            return Ok(());
        }
        let serial = self.serial;
        let summary = self.shared.with_conn(py, |conn, client| match conn.stream.as_mut() {
            Some(open) if open.serial == serial => {
                let r = drain(client, &mut open.stream);
                conn.stream = None;
                r
            }
            _ => Ok(None),
        })?;
        if let Some(s) = summary {
            let _ = self.summary.set(s);
        }
        Ok(())
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    /// The session this decode runs on.
    #[getter]
    fn session_id(&self) -> u64 {
        self.session
    }
    /// Why the decode ended ("eos", "length", "stop", "cancelled"); None while it runs.
    #[getter]
    fn finish(&self) -> Option<&'static str> {
        self.summary_field(|s| finish_name(s.finish))
    }
    /// Tokens generated; None while the decode runs.
    #[getter]
    fn tokens(&self) -> Option<u32> {
        self.summary_field(|s| s.tokens)
    }
    /// Tokens the request's own input added; None while the decode runs.
    #[getter]
    fn prompt_tokens(&self) -> Option<u32> {
        self.summary_field(|s| s.prompt_tokens)
    }
    /// Tokens the session holds after the decode; None while it runs.
    #[getter]
    fn context_tokens(&self) -> Option<u32> {
        self.summary_field(|s| s.context_tokens)
    }

    fn __repr__(&self) -> String {
        match self.summary.get() {
            None => format!("<TokenStream session={} running>", self.session),
            Some(s) => {
                format!("<TokenStream session={} finish={} tokens={}>", self.session, finish_name(s.finish), s.tokens)
            }
        }
    }
}

impl Drop for TokenStream {
    fn drop(&mut self) {
        if self.summary.get().is_none() {
            self.shared.abandon_stream(self.serial);
        }
    }
}
