//! URL → transport: `tcp://HOST:PORT`, `shm://NAME`, `rdma://HOST:PORT` (with the `rdma` feature;
//! without it an rdma URL is a typed error that says how to get it, never a build failure).

use crate::{Connection, Listener, TransportError, TransportOptions};

fn split(url: &str) -> Result<(&str, &str), TransportError> {
    url.split_once("://")
        .ok_or_else(|| TransportError::BadUrl { url: url.into(), why: "expected SCHEME://ADDRESS".into() })
}

fn unknown(url: &str, scheme: &str) -> TransportError {
    TransportError::BadUrl { url: url.into(), why: format!("unknown scheme {scheme:?} (tcp, shm, rdma)") }
}

#[cfg(not(feature = "rdma"))]
fn no_rdma(url: &str) -> TransportError {
    TransportError::BadUrl {
        url: url.into(),
        why: "this build has no RDMA support: build with `--features rdma` (needs libibverbs)".into(),
    }
}

/// Connects to a server URL.
pub fn connect(url: &str, opts: &TransportOptions) -> Result<Connection, TransportError> {
    match split(url)? {
        ("tcp", addr) => crate::tcp::connect(addr, opts),
        ("shm", name) => crate::shm::connect(name, opts),
        #[cfg(feature = "rdma")]
        ("rdma", addr) => crate::rdma::connect(addr, opts),
        #[cfg(not(feature = "rdma"))]
        ("rdma", _) => Err(no_rdma(url)),
        (scheme, _) => Err(unknown(url, scheme)),
    }
}

/// Binds a listener for a URL.
pub fn listen(url: &str, opts: &TransportOptions) -> Result<Box<dyn Listener>, TransportError> {
    match split(url)? {
        ("tcp", addr) => Ok(Box::new(crate::tcp::listen(addr, opts)?)),
        ("shm", name) => Ok(Box::new(crate::shm::listen(name, opts)?)),
        #[cfg(feature = "rdma")]
        ("rdma", addr) => Ok(Box::new(crate::rdma::listen(addr, opts)?)),
        #[cfg(not(feature = "rdma"))]
        ("rdma", _) => Err(no_rdma(url)),
        (scheme, _) => Err(unknown(url, scheme)),
    }
}
