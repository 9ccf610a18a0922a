//! `shm` transport (being written).

use crate::{Connection, Listener, ListenerStop, TransportError, TransportOptions};

pub struct ShmListener;

impl Listener for ShmListener {
    fn accept(&mut self) -> Result<Connection, TransportError> {
        Err(TransportError::Other("shm: not built yet".into()))
    }
    fn url(&self) -> String {
        String::new()
    }
    fn stopper(&self) -> ListenerStop {
        std::sync::Arc::new(|| {})
    }
}

pub fn connect(_addr: &str, _opts: &TransportOptions) -> Result<Connection, TransportError> {
    Err(TransportError::Other("shm: not built yet".into()))
}

pub fn listen(_addr: &str, _opts: &TransportOptions) -> Result<ShmListener, TransportError> {
    Err(TransportError::Other("shm: not built yet".into()))
}
