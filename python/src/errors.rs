//! Errors of the extension and their Python form: every [`Error`] becomes an instance of a class
//! of `djinn.errors` (built by its `_make`), carrying the server's status name, code and opcode
//! when the server refused the request.

use djinn_client::ClientError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

/// What a call of the extension can fail with.
#[derive(Debug)]
pub(crate) enum Error {
    Client(ClientError),
    /// The connection is reading a token stream.
    Busy(String),
    /// The client, session, stream or tensor was closed.
    Closed(&'static str),
    /// An argument the client refuses before sending anything.
    Argument(String),
}

impl From<ClientError> for Error {
    fn from(e: ClientError) -> Self {
        Error::Client(e)
    }
}

pub(crate) type Res<T> = Result<T, Error>;

/// `djinn.errors._make`, looked up once.
static MAKE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

impl Error {
    /// (kind, message, status name, status code, opcode) as `djinn.errors._make` takes them.
    fn parts(&self) -> (&'static str, String, Option<&'static str>, Option<u16>, Option<&'static str>) {
        match self {
            Error::Client(ClientError::Server { opcode, status, message }) => {
                let msg = format!("{message} (server status {} to {opcode})", status.name());
                ("server", msg, Some(status.name()), Some(u16::from(*status)), Some(opcode))
            }
            Error::Client(e @ ClientError::Connect { .. }) => ("connect", e.to_string(), None, None, None),
            Error::Client(e @ ClientError::Transport(_)) => ("transport", e.to_string(), None, None, None),
            Error::Client(e @ ClientError::Protocol { opcode, .. }) => {
                ("protocol", e.to_string(), None, None, Some(opcode))
            }
            Error::Client(e) => ("client", e.to_string(), None, None, None),
            Error::Busy(m) => ("busy", m.clone(), None, None, None),
            Error::Closed(what) => ("closed", format!("{what} is closed"), None, None, None),
            Error::Argument(m) => ("argument", m.clone(), None, None, None),
        }
    }

    pub(crate) fn into_py(self, py: Python<'_>) -> PyErr {
        let (kind, msg, status, code, opcode) = self.parts();
        let made = MAKE
            .get_or_try_init(py, || Ok::<_, PyErr>(py.import("djinn.errors")?.getattr("_make")?.unbind()))
            .and_then(|make| make.bind(py).call1((kind, msg, status, code, opcode)));
        match made {
            Ok(exc) => PyErr::from_value(exc),
            Err(e) => e,
        }
    }
}

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        Python::attach(|py| e.into_py(py))
    }
}
