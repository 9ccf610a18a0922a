//! `shm://NAME`: same-host transport over a shared-memory region per client.
//!
//! Rendezvous. The server listens on the unix socket `djinn-shm/NAME` in the *abstract* namespace
//! (Linux): the name vanishes with the listening socket, so a killed server leaves nothing stale
//! and a restart binds again at once; a second live server on the same name gets `AddrInUse`.
//! Abstract names are per network namespace and carry no file permissions: any local process in
//! the namespace can connect, and authentication is the handshake's job (protocol layer).
//!
//! Per accepted client the server creates a memfd of the region's size (`memfd_create` +
//! `ftruncate`, sealed against shrink/grow so a peer cannot make our accesses fault), writes its
//! control header, creates four eventfd doorbells (data and space, per direction), and passes all
//! five descriptors with `SCM_RIGHTS` in one message. The client checks the seals, re-derives the
//! layout from a private copy of the control header, checks it against the file size, and maps it.
//! Nothing has a name in the file system: the kernel reclaims region and doorbells when both sides
//! have exited or been killed.
//!
//! The unix socket stays open for the connection's life and carries nothing more; its hang-up is
//! how each side learns the other process died. A parked waiter polls its doorbell *and* the socket;
//! a busy-polling one checks the socket every millisecond. A half that is dropped sets its closed
//! flag in the region and rings the peer, so closing one half is seen even while the process lives.
//! Both surface as `TransportError::Closed` once everything already published has been consumed.
//! `FrameTx::closer` shuts the socket down: our own parked halves wake and return `Closed`, and
//! the peer sees the hang-up.
//!
//! Inside the region (see [`region`]): per direction, a ring of `opts.shm_slots` frame slots
//! (header + up to `SLOT_META_INLINE_MAX` bytes of metadata) and a byte ring of `opts.shm_data_bytes`
//! for bulk data. The sender writes tensor bytes straight into the receiver's ring (a one-sided
//! write, as RDMA will do) and rings a doorbell only if the receiver is parked (see `ring.rs` for
//! the ordering). Region sizes are the server's options; the client's options set only its own
//! waiting and limits.
//!
//! Errors: a header that fails validation is `BadHeader`; an index in the region that a peer set
//! out of range is `Other("shm peer … broke the ring protocol: …")`. Either poisons that half: the
//! connection is unusable (framing is lost) and every later call returns the error again.

pub mod raw;
pub mod region;
mod ring;
pub(crate) mod sys;
#[cfg(test)]
mod tests;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::FileExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use memmap2::MmapOptions;

use self::region::{Direction, Layout, Region, CONTROL_USED_BYTES, PAGE_BYTES};
use self::ring::{Bells, Link};
pub use self::ring::{ShmRx, ShmTx};
use self::sys::EventFd;
use crate::{ByteCounters, Connection, Listener, ListenerStop, TransportError, TransportOptions};

/// Payload of the rendezvous message (beside the descriptors).
const HELLO: [u8; 8] = *b"DJNSHM01";
/// Descriptors in the rendezvous message: region, then data/space doorbells of each direction.
const RENDEZVOUS_FDS: usize = 5;
/// A client gives up on a server that accepts the socket but sends no region.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest NAME accepted (the abstract address holds 107 bytes; the prefix takes 10).
pub const NAME_BYTES_MAX: usize = 96;

fn socket_name(name: &str) -> Result<SocketAddr, TransportError> {
    let ok = !name.is_empty()
        && name.len() <= NAME_BYTES_MAX
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
    if !ok {
        return Err(TransportError::BadUrl {
            url: format!("shm://{name}"),
            why: format!("NAME must be 1..={NAME_BYTES_MAX} characters of [A-Za-z0-9._/-]"),
        });
    }
    SocketAddr::from_abstract_name(format!("djinn-shm/{name}").as_bytes())
        .map_err(|source| TransportError::Io { what: "shm socket name", source })
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> TransportError {
    move |source| TransportError::Io { what, source }
}

/// The server's layout for these options (data area rounded up to a page multiple).
fn server_layout(opts: &TransportOptions) -> Result<Layout, TransportError> {
    Layout::new(opts.shm_slots, opts.shm_data_bytes.next_multiple_of(PAGE_BYTES))
        .map_err(|why| TransportError::Other(format!("shm options: {why}")))
}

/// What the listener shares with its stop handles.
struct StopState {
    stopped: AtomicBool,
    bell: EventFd,
}

/// A bound `shm://NAME` endpoint.
pub struct ShmListener {
    listener: UnixListener,
    name: String,
    layout: Layout,
    opts: TransportOptions,
    stop: Arc<StopState>,
}

/// Binds `shm://NAME`.
pub fn listen(name: &str, opts: &TransportOptions) -> Result<ShmListener, TransportError> {
    let addr = socket_name(name)?;
    let layout = server_layout(opts)?;
    let listener = UnixListener::bind_addr(&addr).map_err(|source| {
        let what = if source.kind() == io::ErrorKind::AddrInUse {
            "shm bind: another server listens on this name"
        } else {
            "shm bind"
        };
        TransportError::Io { what, source }
    })?;
    listener.set_nonblocking(true).map_err(io_err("shm listener non-blocking"))?;
    let stop = Arc::new(StopState {
        stopped: AtomicBool::new(false),
        bell: EventFd::new().map_err(io_err("shm stop eventfd"))?,
    });
    tracing::debug!(name, region_bytes = layout.region_bytes, "shm listening");
    Ok(ShmListener { listener, name: name.to_string(), layout, opts: opts.clone(), stop })
}

/// Why setting up one accepted client failed.
enum SetupError {
    /// This side ran out of something (memory, descriptors): the listener's caller should know.
    Local(TransportError),
    /// The client went away or misbehaved during the rendezvous: skip it.
    Client(io::Error),
}

impl ShmListener {
    fn setup(&self, stream: UnixStream) -> Result<Connection, SetupError> {
        let local = |what: &'static str| move |source| SetupError::Local(TransportError::Io { what, source });
        let layout = self.layout;
        let file = sys::sealed_memfd(layout.region_bytes as u64).map_err(local("shm memfd"))?;
        let map = MmapOptions::new().len(layout.region_bytes).map_raw(&file).map_err(local("shm mmap"))?;
        let region = Region::new(map, layout);
        region.write(0, &layout.encode());
        let mut bells = Vec::with_capacity(4);
        for _ in 0..4 {
            bells.push(EventFd::new().map_err(local("shm doorbell eventfd"))?);
        }
        let [to_server_data, to_server_space, to_client_data, to_client_space]: [EventFd; 4] =
            bells.try_into().expect("four doorbells");
        let fds = [
            file.as_raw_fd(),
            to_server_data.fd().as_raw_fd(),
            to_server_space.fd().as_raw_fd(),
            to_client_data.fd().as_raw_fd(),
            to_client_space.fd().as_raw_fd(),
        ];
        sys::send_fds(&stream, &HELLO, &fds).map_err(SetupError::Client)?;
        // The mapping keeps the region alive; the client holds its own descriptor.
        drop(file);
        let pid = sys::peer_pid(&stream).unwrap_or(0);
        let counters = Arc::new(ByteCounters::default());
        let peer = format!("shm://{} pid {pid}", self.name);
        let link = Arc::new(Link {
            region,
            sock: OwnedFd::from(stream),
            peer: peer.clone(),
            counters: counters.clone(),
            closed: Default::default(),
        });
        let bells = Bells {
            tx_park: to_client_space,
            tx_ring: to_client_data,
            rx_park: to_server_data,
            rx_ring: to_server_space,
        };
        let (tx, rx) =
            ring::halves(link, layout.dir(Direction::ToClient), layout.dir(Direction::ToServer), bells, &self.opts);
        Ok(Connection { tx: Box::new(tx), rx: Box::new(rx), counters, transport: "shm", peer })
    }
}

impl Listener for ShmListener {
    fn accept(&mut self) -> Result<Connection, TransportError> {
        loop {
            if self.stop.stopped.load(Ordering::Acquire) {
                return Err(TransportError::Closed);
            }
            let readable = sys::poll_accept(&self.listener, &self.stop.bell).map_err(io_err("shm accept poll"))?;
            if self.stop.stopped.load(Ordering::Acquire) {
                return Err(TransportError::Closed);
            }
            if !readable {
                continue;
            }
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e)
                    if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted)
                        || e.raw_os_error() == Some(libc::ECONNABORTED) =>
                {
                    continue
                }
                Err(source) => return Err(TransportError::Io { what: "shm accept", source }),
            };
            match self.setup(stream) {
                Ok(conn) => return Ok(conn),
                Err(SetupError::Local(e)) => return Err(e),
                Err(SetupError::Client(e)) => {
                    tracing::debug!(name = %self.name, error = %e, "shm client left during rendezvous");
                }
            }
        }
    }

    fn url(&self) -> String {
        format!("shm://{}", self.name)
    }

    fn stopper(&self) -> ListenerStop {
        let stop = self.stop.clone();
        Arc::new(move || {
            stop.stopped.store(true, Ordering::Release);
            stop.bell.ring();
        })
    }
}

/// What a client holds after the rendezvous, before it builds halves (shared with [`raw`]).
pub(crate) struct ClientParts {
    pub(crate) region: Region,
    pub(crate) sock: OwnedFd,
    pub(crate) to_server_data: EventFd,
    pub(crate) to_server_space: EventFd,
    pub(crate) to_client_data: EventFd,
    pub(crate) to_client_space: EventFd,
}

fn protocol_err(name: &str, why: &str) -> TransportError {
    TransportError::Other(format!("shm://{name}: server sent a bad region ({why})"))
}

/// Connects, receives the region and doorbells, and validates them.
pub(crate) fn rendezvous(name: &str) -> Result<ClientParts, TransportError> {
    let addr = socket_name(name)?;
    let stream = UnixStream::connect_addr(&addr).map_err(|source| {
        let what = match source.kind() {
            io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound => "shm connect: no server listens on this name",
            _ => "shm connect",
        };
        TransportError::Io { what, source }
    })?;
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(io_err("shm socket timeout"))?;
    let mut hello = [0u8; 16];
    let (n, fds) = sys::recv_fds(&stream, &mut hello).map_err(io_err("shm rendezvous receive"))?;
    if n == 0 && fds.is_empty() {
        return Err(TransportError::Closed);
    }
    if hello[..n] != HELLO || fds.len() != RENDEZVOUS_FDS {
        return Err(protocol_err(name, "unexpected rendezvous message"));
    }
    let mut fds = fds.into_iter();
    let mut next = || fds.next().expect("count checked");
    let file = std::fs::File::from(next());
    let seals = sys::seals(&file).map_err(io_err("shm region seals"))?;
    if seals & libc::F_SEAL_SHRINK == 0 {
        return Err(protocol_err(name, "region not sealed against shrinking"));
    }
    let file_bytes = file.metadata().map_err(io_err("shm region size"))?.len();
    let mut control = [0u8; CONTROL_USED_BYTES];
    file.read_exact_at(&mut control, 0).map_err(|_| protocol_err(name, "region shorter than its header"))?;
    let layout = Layout::decode(&control, file_bytes).map_err(|why| protocol_err(name, why))?;
    let map = MmapOptions::new().len(layout.region_bytes).map_raw(&file).map_err(io_err("shm mmap"))?;
    Ok(ClientParts {
        region: Region::new(map, layout),
        to_server_data: EventFd::from_owned(next()),
        to_server_space: EventFd::from_owned(next()),
        to_client_data: EventFd::from_owned(next()),
        to_client_space: EventFd::from_owned(next()),
        sock: OwnedFd::from(stream),
    })
}

/// Connects to `shm://NAME`.
pub fn connect(name: &str, opts: &TransportOptions) -> Result<Connection, TransportError> {
    let parts = rendezvous(name)?;
    let layout = *parts.region.layout();
    let counters = Arc::new(ByteCounters::default());
    let peer = format!("shm://{name}");
    let link = Arc::new(Link {
        region: parts.region,
        sock: parts.sock,
        peer: peer.clone(),
        counters: counters.clone(),
        closed: Default::default(),
    });
    let bells = Bells {
        tx_park: parts.to_server_space,
        tx_ring: parts.to_server_data,
        rx_park: parts.to_client_data,
        rx_ring: parts.to_client_space,
    };
    let (tx, rx) = ring::halves(link, layout.dir(Direction::ToServer), layout.dir(Direction::ToClient), bells, opts);
    tracing::debug!(name, region_bytes = layout.region_bytes, "shm connected");
    Ok(Connection { tx: Box::new(tx), rx: Box::new(rx), counters, transport: "shm", peer })
}
