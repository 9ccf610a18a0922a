//! `tcp://HOST:PORT`: persistent TCP connections with `TCP_NODELAY`, framed by `frame`, moved by
//! one of two engines:
//! - `uring` (io_uring, transport name "tcp"): each half owns a ring; zero-copy send at or above
//!   `TransportOptions::zerocopy_send_bytes_min`;
//! - `socket` (plain `sendmsg`/`recv`, transport name "tcp-socket"): chosen by
//!   `TransportOptions::force_socket`, or automatically when io_uring cannot be set up (ENOSYS,
//!   EPERM from `kernel.io_uring_disabled` or seccomp).
//!
//! Both halves share the socket through an `Arc<OwnedFd>`; the socket closes when both are dropped.
//! The listener accepts with a blocking `accept(2)`; its stopper calls `shutdown(2)` on the
//! listening socket, which wakes a blocked `accept` (Linux returns EINVAL) and makes it `Closed`.

mod frame;
mod socket;
mod uring;

use std::net::{TcpListener as StdListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::{ByteCounters, Connection, Listener, ListenerStop, TransportError, TransportOptions};
use frame::{StreamRx, StreamTx};

/// Whether io_uring works in this process (probed once). `Err` carries why not.
pub fn uring_available() -> Result<(), std::io::Error> {
    uring::probe().map(|_| ())
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> TransportError {
    move |source| TransportError::Io { what, source }
}

/// Builds a connection over a connected stream with the engine `opts` and the kernel allow.
fn make_connection(stream: TcpStream, opts: &TransportOptions) -> Result<Connection, TransportError> {
    stream.set_nodelay(true).map_err(io("tcp: set TCP_NODELAY"))?;
    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    let fd: Arc<OwnedFd> = Arc::new(stream.into());
    let counters = Arc::new(ByteCounters::default());
    let uring_ok = !opts.force_socket
        && match uring::probe() {
            Ok(_) => true,
            Err(e) => {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| tracing::warn!(error = %e, "io_uring unavailable; tcp uses plain sockets"));
                false
            }
        };
    if uring_ok {
        let mk = || uring::UringIo::new(fd.clone(), opts.wait, opts.spin_us, opts.zerocopy_send_bytes_min);
        match (mk(), mk()) {
            (Ok(t), Ok(r)) => {
                return Ok(Connection {
                    tx: Box::new(StreamTx::new(t, counters.clone())),
                    rx: Box::new(StreamRx::new(r, counters.clone(), opts.limits)),
                    counters,
                    transport: "tcp",
                    peer,
                })
            }
            // The probe passed but this ring failed (e.g. memlock limit): fall back for this one.
            (Err(e), _) | (_, Err(e)) => tracing::warn!(%peer, error = %e, "io_uring ring setup failed; using sockets"),
        }
    }
    let t = socket::SocketIo::new(fd.clone(), opts.wait, opts.spin_us);
    let r = socket::SocketIo::new(fd, opts.wait, opts.spin_us);
    Ok(Connection {
        tx: Box::new(StreamTx::new(t, counters.clone())),
        rx: Box::new(StreamRx::new(r, counters.clone(), opts.limits)),
        counters,
        transport: "tcp-socket",
        peer,
    })
}

/// Connects to `HOST:PORT`.
pub fn connect(addr: &str, opts: &TransportOptions) -> Result<Connection, TransportError> {
    let addrs: Vec<_> = addr
        .to_socket_addrs()
        .map_err(|e| TransportError::BadUrl { url: format!("tcp://{addr}"), why: e.to_string() })?
        .collect();
    let stream = TcpStream::connect(&addrs[..]).map_err(io("tcp connect"))?;
    make_connection(stream, opts)
}

/// Binds `HOST:PORT` (port 0 picks a free port; `url()` reports the bound one).
pub fn listen(addr: &str, opts: &TransportOptions) -> Result<TcpListener, TransportError> {
    let sock = StdListener::bind(addr).map_err(io("tcp bind"))?;
    let local = sock.local_addr().map_err(io("tcp local_addr"))?;
    Ok(TcpListener { sock: Arc::new(sock), stopped: Arc::new(AtomicBool::new(false)), opts: opts.clone(), local })
}

pub struct TcpListener {
    sock: Arc<StdListener>,
    stopped: Arc<AtomicBool>,
    opts: TransportOptions,
    local: std::net::SocketAddr,
}

impl Listener for TcpListener {
    fn accept(&mut self) -> Result<Connection, TransportError> {
        loop {
            if self.stopped.load(Ordering::Acquire) {
                return Err(TransportError::Closed);
            }
            match self.sock.accept() {
                Ok((stream, _)) => return make_connection(stream, &self.opts),
                // After shutdown(2) accept fails with EINVAL; the flag says it was us.
                Err(_) if self.stopped.load(Ordering::Acquire) => return Err(TransportError::Closed),
                // A client that reset before we accepted it is its own problem, not the listener's.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ECONNABORTED) | Some(libc::EINTR) | Some(libc::EPROTO) | Some(libc::EPERM)
                    ) => {}
                Err(e) => return Err(TransportError::Io { what: "tcp accept", source: e }),
            }
        }
    }

    fn url(&self) -> String {
        format!("tcp://{}", self.local)
    }

    fn stopper(&self) -> ListenerStop {
        let sock = self.sock.clone();
        let stopped = self.stopped.clone();
        Arc::new(move || {
            // Release: a woken accept that sees its error also sees the flag.
            stopped.store(true, Ordering::Release);
            // SAFETY: `sock` keeps the listening fd open for as long as this closure lives.
            unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_RDWR) };
        })
    }
}
