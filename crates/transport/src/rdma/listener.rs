//! The `rdma://ADDR:PORT` listener. An acceptor thread takes TCP connections and gives each its
//! own handshake thread (at most `HANDSHAKES_MAX` at once; more are closed at once), so a client
//! that connects and says nothing, or a slow registration, never delays the others. Finished
//! connections wait in a bounded queue for `accept`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use super::verbs::Device;
use super::{io_err, open_device, read_hello, ring_bytes, Halves, Hello, Side, STATUS_BUSY, STATUS_REFUSED};
use crate::shm::sys::{poll_accept, EventFd};
use crate::{Connection, Listener, ListenerStop, TransportError, TransportOptions};

/// A client that connects but does not finish its half of the rendezvous is dropped after this.
/// Generous: a client opens its device and registers its ring between its TCP connect and its
/// hello, and 34 clients doing that at once in the TCG VM on a loaded host took more than 10 s.
/// A silent client costs one of `HANDSHAKES_MAX` slots meanwhile, nothing else.
const SERVER_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Rendezvous in progress at once; a client beyond it is disconnected at once (it sees `Closed`).
const HANDSHAKES_MAX: usize = 64;
/// Connections set up but not yet taken by `accept`.
const READY_MAX: usize = 16;
/// How often a blocked `accept` looks at the stop flag.
const STOP_CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// What the listener, its acceptor thread and its stop handles share.
struct Shared {
    stopped: AtomicBool,
    bell: EventFd,
    dev: Arc<Device>,
    ring_bytes: usize,
    opts: TransportOptions,
    handshakes: AtomicUsize,
    /// Connections set up and not yet dropped (bounded by `opts.rdma_connections_max`).
    live: Arc<AtomicUsize>,
}

/// One of a listener's `rdma_connections_max` connections, given back on drop.
pub(crate) struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(live: &Arc<AtomicUsize>, max: usize) -> Option<Slot> {
        if live.fetch_add(1, Ordering::AcqRel) >= max {
            live.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(live.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A bound `rdma://ADDR:PORT` endpoint.
pub struct RdmaListener {
    shared: Arc<Shared>,
    local: SocketAddr,
    ready: Receiver<Halves>,
    acceptor: Option<thread::JoinHandle<()>>,
}

/// Binds `rdma://ADDR:PORT` on the device `opts.rdma_device` names (else the one owning ADDR).
pub fn listen(addr: &str, opts: &TransportOptions) -> Result<RdmaListener, TransportError> {
    let ring_bytes = ring_bytes(opts)?;
    let bad = |why: String| TransportError::BadUrl { url: format!("rdma://{addr}"), why };
    let sa = addr.to_socket_addrs().map_err(|e| bad(e.to_string()))?.next().ok_or_else(|| bad("no address".into()))?;
    if sa.ip().is_unspecified() {
        return Err(bad("listen on an address of the RDMA device's network interface, not a wildcard".into()));
    }
    let dev = open_device(opts.rdma_device.as_deref(), sa.ip())?;
    let listener = TcpListener::bind(sa).map_err(io_err("rdma: bind the rendezvous endpoint"))?;
    listener.set_nonblocking(true).map_err(io_err("rdma: listener non-blocking"))?;
    let local = listener.local_addr().map_err(io_err("rdma: local address"))?;
    let shared = Arc::new(Shared {
        stopped: AtomicBool::new(false),
        bell: EventFd::new().map_err(io_err("rdma: stop eventfd"))?,
        dev,
        ring_bytes,
        opts: opts.clone(),
        handshakes: AtomicUsize::new(0),
        live: Arc::new(AtomicUsize::new(0)),
    });
    let (tx, ready) = sync_channel(READY_MAX);
    let sh = shared.clone();
    let acceptor = thread::Builder::new()
        .name("rdma-accept".into())
        .spawn(move || acceptor(listener, sh, tx))
        .map_err(io_err("rdma: acceptor thread"))?;
    tracing::debug!(%local, device = %shared.dev.name, "rdma listening");
    Ok(RdmaListener { shared, local, ready, acceptor: Some(acceptor) })
}

/// Takes TCP connections until stopped; each gets a handshake thread.
fn acceptor(listener: TcpListener, sh: Arc<Shared>, ready: SyncSender<Halves>) {
    while !sh.stopped.load(Ordering::Acquire) {
        match poll_accept(&listener, &sh.bell) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "rdma accept poll failed; listener stops");
                return;
            }
        }
        let sock = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::Interrupted => {
                continue
            }
            Err(e) => {
                tracing::debug!(error = %e, "rdma accept");
                continue;
            }
        };
        if sh.handshakes.fetch_add(1, Ordering::AcqRel) >= HANDSHAKES_MAX {
            sh.handshakes.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!("rdma: {HANDSHAKES_MAX} rendezvous in progress; a new client is turned away");
            continue;
        }
        let (sh2, ready2) = (sh.clone(), ready.clone());
        let spawned = thread::Builder::new().name("rdma-handshake".into()).spawn(move || {
            match setup(&sh2, sock) {
                // A full queue blocks this thread, not the acceptor: accept() drains it.
                Ok(h) => {
                    let _ = ready2.send(h);
                }
                Err(why) => tracing::debug!(why, "rdma client dropped during rendezvous"),
            }
            sh2.handshakes.fetch_sub(1, Ordering::AcqRel);
        });
        if spawned.is_err() {
            sh.handshakes.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// The server's half of the rendezvous with one client; `Err` says why the client was dropped.
fn setup(sh: &Shared, mut sock: TcpStream) -> Result<Halves, String> {
    let client = |e: std::io::Error| e.to_string();
    sock.set_nonblocking(false).map_err(client)?;
    sock.set_nodelay(true).map_err(client)?;
    sock.set_read_timeout(Some(SERVER_HANDSHAKE_TIMEOUT)).map_err(client)?;
    let peer_addr = sock.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
    let hello = read_hello(&mut sock).map_err(client)?.ok_or("bad hello")?;
    if hello.ring_bytes < 4096 || hello.ring_bytes > sh.ring_bytes as u64 {
        let _ = sock.write_all(&Hello::busy(STATUS_REFUSED).encode());
        return Err(format!("asked for a ring of {} bytes", hello.ring_bytes));
    }
    let Some(slot) = Slot::take(&sh.live, sh.opts.rdma_connections_max) else {
        let _ = sock.write_all(&Hello::busy(STATUS_BUSY).encode());
        let max = sh.opts.rdma_connections_max;
        tracing::warn!(peer = %peer_addr, max, "rdma: rdma_connections_max reached; answered Busy");
        return Err(format!("busy: {max} connections"));
    };
    let side = match Side::new(&sh.dev, sh.ring_bytes) {
        Ok(s) => s,
        Err(e) => {
            // Out of QPs, CQs or registrable memory: this client is told Busy; others go on.
            let _ = sock.write_all(&Hello::busy(STATUS_BUSY).encode());
            tracing::warn!(error = %e, peer = %peer_addr, "rdma: answered Busy");
            return Err(format!("busy: {e}"));
        }
    };
    // The client's receiving half polls its ring if it asked (a busy-poll client): we write to
    // it framed, without immediates. Ours is gated (`FrameRx::set_spin_gate`), so it never asks.
    let polled = super::ring::Polled { tx: hello.flags & super::FLAG_POLLED_RING != 0, rx: false };
    let ours = side.hello(if polled.tx { super::FLAG_POLLED_RING } else { 0 });
    let halves = side
        .finish(&hello, sock.try_clone().map_err(client)?, format!("rdma://{peer_addr}"), &sh.opts, Some(slot), polled)
        .map_err(|e| e.to_string())?;
    sock.write_all(&ours.encode()).map_err(client)?;
    let mut ready = [0u8; 1];
    sock.read_exact(&mut ready).map_err(client)?;
    Ok(halves)
}

impl RdmaListener {
    /// The device this listener opened.
    pub fn device(&self) -> &str {
        &self.shared.dev.name
    }

    fn stop(&self) {
        self.shared.stopped.store(true, Ordering::Release);
        self.shared.bell.ring();
    }
}

impl Listener for RdmaListener {
    fn accept(&mut self) -> Result<Connection, TransportError> {
        loop {
            if self.shared.stopped.load(Ordering::Acquire) {
                return Err(TransportError::Closed);
            }
            match self.ready.recv_timeout(STOP_CHECK_INTERVAL) {
                Ok(h) => return Ok(h.into_connection()),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(TransportError::Closed),
            }
        }
    }

    fn url(&self) -> String {
        format!("rdma://{}", self.local)
    }

    /// Takes the region at once and registers it piece by piece on first use (see
    /// `verbs::HOST_PIECE_BYTES`, or unit by unit: `PinnedHost::unit_bytes`). Grants bind windows
    /// over it once the device's window probe has said they are bounded, or at once where the
    /// registration under the window bounds the peer itself (a receive inside one unit): the probe
    /// runs on a thread of its own, so no request waits for it (other receives register their
    /// destination per transfer until then).
    fn register_host_memory(&mut self, mem: Arc<dyn crate::PinnedHost>) -> Result<bool, TransportError> {
        let (dev, unchecked) = (self.shared.dev.clone(), self.shared.opts.rdma_windows_unchecked);
        let (bytes, unit_bytes) = (mem.len_bytes(), mem.unit_bytes());
        dev.add_host(mem).map_err(io_err("rdma: take a host region"))?;
        tracing::info!(device = %dev.name, bytes, ?unit_bytes, "rdma: host region taken (registered piece by piece on first use)");
        if unchecked {
            let _ = dev.windows_bounded.set(true);
        }
        // Detached, never joined: shutdown does not wait for it, and the listener's stop flag
        // ends it early (it holds no lock or resource anything else waits for).
        let sh = self.shared.clone();
        thread::Builder::new()
            .name("rdma-probe".into())
            .spawn(move || {
                super::windows::bounded(&dev, &|| sh.stopped.load(Ordering::Acquire));
            })
            .map_err(io_err("rdma: start the window probe thread"))?;
        Ok(true)
    }

    fn host_registrar(&self) -> Option<Arc<dyn crate::HostRegistrar>> {
        Some(Arc::new(Registrar(self.shared.dev.clone())))
    }

    fn stopper(&self) -> ListenerStop {
        let sh = self.shared.clone();
        Arc::new(move || {
            sh.stopped.store(true, Ordering::Release);
            sh.bell.ring();
        })
    }
}

/// Registers a server's memory at run time on the listener's device (see `Device::register_range`).
struct Registrar(Arc<Device>);

impl crate::HostRegistrar for Registrar {
    unsafe fn register(&self, ptr: *mut u8, len: usize) -> Option<crate::HostRegistration> {
        // Smaller frames move through the ring: a registration would never be used.
        if (len as u64) < super::ring::RENDEZVOUS_BYTES_MIN {
            return None;
        }
        // SAFETY (caller): the range stays valid at its address until the guard drops.
        match unsafe { self.0.register_range(ptr, len) } {
            Ok(guard) => Some(Box::new(guard)),
            Err(e) => {
                tracing::debug!(device = %self.0.name, error = %e, len, "rdma: range not registered; transfers register it");
                None
            }
        }
    }
}

impl Drop for RdmaListener {
    fn drop(&mut self) {
        self.stop();
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
    }
}
