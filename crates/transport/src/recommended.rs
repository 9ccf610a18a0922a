//! URL → transport: `tcp://HOST:PORT`, `shm://NAME`.

use crate::{Connection, Listener, TransportError, TransportOptions};

fn split(url: &str) -> Result<(&str, &str), TransportError> {
    url.split_once("://")
        .ok_or_else(|| TransportError::BadUrl { url: url.into(), why: "expected SCHEME://ADDRESS".into() })
}

/// Connects to a server URL.
pub fn connect(url: &str, opts: &TransportOptions) -> Result<Connection, TransportError> {
    match split(url)? {
        ("tcp", addr) => crate::tcp::connect(addr, opts),
        ("shm", name) => crate::shm::connect(name, opts),
        (scheme, _) => {
            Err(TransportError::BadUrl { url: url.into(), why: format!("unknown scheme {scheme:?} (tcp, shm)") })
        }
    }
}

/// Binds a listener for a URL.
pub fn listen(url: &str, opts: &TransportOptions) -> Result<Box<dyn Listener>, TransportError> {
    match split(url)? {
        ("tcp", addr) => Ok(Box::new(crate::tcp::listen(addr, opts)?)),
        ("shm", name) => Ok(Box::new(crate::shm::listen(name, opts)?)),
        (scheme, _) => {
            Err(TransportError::BadUrl { url: url.into(), why: format!("unknown scheme {scheme:?} (tcp, shm)") })
        }
    }
}
