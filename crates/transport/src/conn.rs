//! The transport seam: a connection is a sending half and a receiving half that can live on
//! different threads (the server streams replies from its engine while a reader parses requests).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use djinn_proto::{FrameHeader, HeaderError};

/// How a waiting side waits for the peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WaitMode {
    /// Spin for a short while, then park in the kernel (eventfd/futex/epoll). No CPU burnt idle.
    #[default]
    SpinThenPark,
    /// Never park: lowest latency, one core per waiting side.
    BusyPoll,
}

/// Bytes a connection has moved, readable by the caller at any time.
#[derive(Debug, Default)]
pub struct ByteCounters {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    /// Of `received`, bulk bytes the peer placed straight in the destination buffer (rdma direct
    /// grants); 0 on transports that copy them out of a ring or socket.
    pub received_direct: AtomicU64,
    /// Memory registrations made for one transfer (rdma; 0 on other transports): a transfer
    /// from or into host memory handed over at start-up or a cached [`crate::RegBuf`] makes none.
    pub registrations: AtomicU64,
}

impl ByteCounters {
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
    pub fn received_direct(&self) -> u64 {
        self.received_direct.load(Ordering::Relaxed)
    }
}

/// One outgoing frame: header, metadata, and bulk data gathered from the caller's buffers
/// without copying them (vectored send / one-sided write).
pub struct OutFrame<'a> {
    pub header: FrameHeader,
    pub meta: &'a [u8],
    pub data: &'a [&'a [u8]],
}

/// The header and metadata of a received frame, in private memory, header already validated.
/// The frame's `data_len` bytes of bulk data are still pending on the receiving half.
#[derive(Debug)]
pub struct RxHead {
    pub header: FrameHeader,
    pub meta: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("peer closed the connection")]
    Closed,
    #[error("framing lost: {0}")]
    BadHeader(#[from] HeaderError),
    #[error("{what}: {source}")]
    Io { what: &'static str, source: std::io::Error },
    #[error("ring or queue full ({0})")]
    Full(&'static str),
    #[error("bulk data misuse: {0}")]
    DataMisuse(&'static str),
    #[error("bad URL {url:?}: {why}")]
    BadUrl { url: String, why: String },
    #[error("{0}")]
    Other(String),
}

/// What [`FrameTx::try_send`] did with a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrySend {
    /// The whole frame was handed to the transport.
    Sent,
    /// Nothing was sent (no room now, too large to try, or the transport cannot send without
    /// waiting): send it with [`FrameTx::send`], e.g. from a thread that may wait.
    WouldBlock,
    /// The transport took part of the frame and keeps the remaining bytes (this many) itself: a
    /// [`FrameTx::flush`] or the next `send` must run before the peer sees the whole frame.
    Partly(usize),
}

/// The sending half of a connection.
pub trait FrameTx: Send {
    /// Sends one whole frame. Blocks (according to the connection's `WaitMode`) while the peer's
    /// receive space is full; never buffers without bound. Sends first what a
    /// [`FrameTx::try_send`] left over.
    fn send(&mut self, frame: &OutFrame<'_>) -> Result<(), TransportError>;

    /// Sends one frame only as far as it can go without waiting: lets a thread that must never
    /// wait on one peer (the server's engine loop) skip a hand-off to a sending thread when the
    /// connection has room. A frame is never left half-sent without its rest kept ([`TrySend`]).
    /// The default (transports without a non-blocking send) sends nothing.
    fn try_send(&mut self, _frame: &OutFrame<'_>) -> Result<TrySend, TransportError> {
        Ok(TrySend::WouldBlock)
    }

    /// [`FrameTx::try_send`] of a frame that another frame on this half follows at once (a
    /// decode's last token, then its final frame): the transport may hold this one back to go
    /// out with the next (tcp: `MSG_MORE`, one segment and one wake-up of the peer instead of
    /// two sends of ~5 µs each on loopback). The caller must send another frame on this half
    /// right after (that `send` or `try_send` releases both). The default sends it as `try_send`
    /// does.
    fn try_send_more(&mut self, frame: &OutFrame<'_>) -> Result<TrySend, TransportError> {
        self.try_send(frame)
    }

    /// Sends, waiting as `send` does, what a [`FrameTx::try_send`] left over (nothing to do if it
    /// left nothing).
    fn flush(&mut self) -> Result<(), TransportError> {
        Ok(())
    }

    /// A handle that closes the connection from any thread: a blocked or later `recv_head`,
    /// `recv_data` or `send` on either half returns `Closed` (or an I/O error), and the peer sees
    /// the connection end. For draining a server on shutdown. `None`: the transport has none.
    fn closer(&self) -> Option<ConnectionClose> {
        None
    }

    /// A reading of how many bytes this half has handed to the transport that the peer has not
    /// read yet (shm: the ring's unconsumed data; tcp: the socket's send queue), callable from
    /// any thread while a `send` blocks. Lets a sender bound what a client that stops reading
    /// holds, where the bytes actually wait. `None`: the transport cannot tell.
    fn unread_probe(&self) -> Option<UnreadProbe> {
        None
    }

    /// Makes sure `buf` is registered with this connection, so bulk data sent from it or received
    /// into it moves without a registration per transfer. rdma: a cache per connection, bounded
    /// by `rdma_reg_cache_entries_max` and `rdma_reg_cache_bytes_max`; the least recently used
    /// buffer is deregistered to make room. The default (transports that register nothing):
    /// [`Registration::Unsupported`].
    fn register_buffer(&mut self, buf: &crate::RegBuf) -> Result<Registration, TransportError> {
        let _ = buf;
        Ok(Registration::Unsupported)
    }

    /// What the registration cache holds and has done (`None` where there is none).
    fn registration_cache(&self) -> Option<RegCacheStats> {
        None
    }
}

/// What [`FrameTx::register_buffer`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Registration {
    /// Registered now (and cached).
    Registered,
    /// Found in the cache: nothing registered.
    Cached,
    /// Larger than the cache may hold: not registered (transfers register per transfer).
    TooLarge,
    /// The transport registers nothing.
    Unsupported,
}

/// A connection's registration cache (rdma).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegCacheStats {
    pub entries: usize,
    pub bytes: u64,
    /// Buffers registered since the connection opened.
    pub registered_total: u64,
    /// Cached registrations deregistered (evicted; a transfer holding one defers it).
    pub deregistered_total: u64,
}

/// Device memory exported as a dma-buf: the range starts `offset` bytes into the export.
pub struct DmaBufDst<'a> {
    pub fd: std::os::fd::BorrowedFd<'a>,
    pub offset: u64,
    pub len: usize,
}

/// See [`FrameTx::unread_probe`]; reads 0 once the connection is gone.
pub type UnreadProbe = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The receiving half of a connection.
pub trait FrameRx: Send {
    /// Waits for the next frame and returns its validated header and metadata. The previous
    /// frame's bulk data must have been consumed (`recv_data`/`skip_data`) first.
    fn recv_head(&mut self) -> Result<RxHead, TransportError>;
    /// Moves the next `dst.len()` bytes of the current frame's bulk data into `dst`.
    fn recv_data(&mut self, dst: &mut [u8]) -> Result<(), TransportError>;
    /// Discards the next `len` bytes of the current frame's bulk data.
    fn skip_data(&mut self, len: u64) -> Result<(), TransportError>;
    /// Moves the next `dst.len` bytes of the current frame's bulk data straight into the device
    /// memory `dst` exports (GPUDirect RDMA). `Ok(false)`: this transport, device or frame cannot
    /// (nothing was consumed: receive into host staging instead).
    ///
    /// # Safety
    /// Nothing else may read or write the exported range until the call returns: the NIC writes
    /// it meanwhile.
    unsafe fn recv_data_dmabuf(&mut self, dst: &DmaBufDst<'_>) -> Result<bool, TransportError> {
        let _ = dst;
        Ok(false)
    }
    /// Busy-poll only: while `gate` is closed (false) this half waits as spin-then-park does —
    /// spins `spin_us`, then parks — so a connection with nothing in flight burns no CPU; while it
    /// is open, it never parks. Transports without busy-poll ignore it.
    fn set_spin_gate(&mut self, _gate: SpinGate) {}
}

/// Whether a busy-polling receiver may keep spinning (see [`FrameRx::set_spin_gate`]); written by
/// whoever knows if the connection has work (the server), read in the receiver's wait loop.
pub type SpinGate = Arc<std::sync::atomic::AtomicBool>;

/// A bounded spin (spin-then-park) spins without giving its core away for this long, then
/// yields between looks: a thread woken onto the spinner's own core (the scheduler likes to put
/// a wakee beside its waker) would otherwise wait out the whole spin. On two cores that wait was
/// the 50–60 µs behind every slow tcp call. Zero: a per-call timeline on the 2-core host showed
/// the client, the server's connection thread and its engine loop all on one core, so each hop
/// of a call (request → connection thread, reply → client) waited out the waiter's pure spin
/// (5 µs each); a look between yields costs under a microsecond where the peer runs elsewhere.
pub(crate) const PURE_SPIN: std::time::Duration = std::time::Duration::ZERO;

/// Whether a wait in `mode` with `gate` may spin without bound right now.
pub(crate) fn spins_unbounded(mode: WaitMode, gate: &Option<SpinGate>) -> bool {
    mode == WaitMode::BusyPoll && gate.as_ref().is_none_or(|g| g.load(Ordering::Relaxed))
}

/// A connected pair of halves plus what both sides share.
pub struct Connection {
    pub tx: Box<dyn FrameTx>,
    pub rx: Box<dyn FrameRx>,
    pub counters: Arc<ByteCounters>,
    /// "tcp", "tcp-socket", "shm", "rdma".
    pub transport: &'static str,
    /// Human-readable peer (address or socket name) for logs and errors.
    pub peer: String,
}

/// A bound server endpoint.
pub trait Listener: Send {
    /// Blocks until a client connects (or the listener is shut down → `Closed`).
    fn accept(&mut self) -> Result<Connection, TransportError>;
    /// The URL clients connect to.
    fn url(&self) -> String;
    /// A handle that makes a blocked (or later) `accept` return `Closed`.
    fn stopper(&self) -> ListenerStop;
    /// Registers `mem` once, at start-up, for every connection this listener accepts: bulk data
    /// received into it or sent from it then moves without registering anything on the request
    /// path (rdma: a peer may still write only the one range granted to it, through a memory
    /// window). `Ok(false)`: this transport has nothing to register (tcp, shm).
    fn register_host_memory(&mut self, mem: Arc<dyn PinnedHost>) -> Result<bool, TransportError> {
        let _ = mem;
        Ok(false)
    }

    /// A handle that registers host memory at run time for every connection of this listener,
    /// while a guard lives (a server's tensors, at creation). `None`: the transport registers
    /// nothing.
    fn host_registrar(&self) -> Option<Arc<dyn HostRegistrar>> {
        None
    }
}

/// Registers host memory for as long as the returned guard lives, so bulk data sent from it or
/// received into it moves without a registration per transfer (rdma: the range gets its own
/// registration; a peer still writes it only through a window granted for one transfer).
pub trait HostRegistrar: Send + Sync {
    /// `None` when nothing was registered (too small to move by grants, or the device refused:
    /// transfers then register per transfer, as without it).
    ///
    /// # Safety
    /// `ptr..+len` must be valid and stay at the same address until the guard drops.
    unsafe fn register(&self, ptr: *mut u8, len: usize) -> Option<HostRegistration>;
}

/// Keeps a [`HostRegistrar`]'s registration; dropping it deregisters.
pub type HostRegistration = Box<dyn std::any::Any + Send + Sync>;

/// Host memory a transport may register once for zero-copy bulk data (the server's staging pool).
///
/// # Safety
/// `ptr()..+len_bytes()` must be one allocation that stays valid, at the same address, for as long as
/// the value lives (a transport keeps an `Arc` of it beside its registration). Where
/// [`PinnedHost::unit_bytes`] is `Some(u)`, every `u`-byte unit from `ptr()` must be held whole
/// by one user at a time, and a receive into part of a unit must come from its holder: for that
/// receive, the peer may be able to write anywhere in the unit.
pub unsafe trait PinnedHost: Send + Sync {
    fn ptr(&self) -> *mut u8;
    fn len_bytes(&self) -> usize;
    /// The size of the units the memory is handed out in, whole, one holder each (a staging
    /// pool's chunks); `None`: it is not. rdma registers such a region unit by unit (one
    /// registration per unit, on its first use), so a receive into one unit is bounded by the
    /// unit's own registration, needing none for the transfer even where the device's memory
    /// windows do not bound a peer's writes (soft-RoCE).
    fn unit_bytes(&self) -> Option<usize> {
        None
    }
}

/// Settings every transport reads, fixed at start-up.
#[derive(Clone, Debug)]
pub struct TransportOptions {
    pub wait: WaitMode,
    pub limits: djinn_proto::Limits,
    /// TCP: use plain sockets even where io_uring works.
    pub force_socket: bool,
    /// TCP (io_uring): sends of at least this many bytes use zero-copy send (`usize::MAX`: never;
    /// the default, from measurement, see `Default`).
    pub zerocopy_send_bytes_min: usize,
    /// SHM: bytes of the data area of each direction's ring in a client's region.
    pub shm_data_bytes: usize,
    /// SHM: frame slots in each direction's ring.
    pub shm_slots: usize,
    /// Spin this long before parking (SpinThenPark).
    pub spin_us: u64,
    /// RDMA: the device to use (`--nic`); `None`: the device that owns the endpoint's address.
    pub rdma_device: Option<String>,
    /// RDMA: bytes of this side's receive ring per connection (a server also refuses clients
    /// asking for more than its own).
    pub rdma_ring_bytes: usize,
    /// RDMA: connections a listener holds at once; the next client is answered Busy.
    pub rdma_connections_max: usize,
    /// RDMA, tests only: grant through memory windows even where the device does not hold a
    /// window's writes to its range (soft-RoCE), so the bind/invalidate path runs in the VM.
    /// Isolation then rests on the registered region: never set it in a server.
    pub rdma_windows_unchecked: bool,
    /// RDMA, client: buffers ([`crate::RegBuf`]) a connection keeps registered at once.
    pub rdma_reg_cache_entries_max: usize,
    /// RDMA, client: bytes a connection keeps registered in its cache at once (pinned memory).
    pub rdma_reg_cache_bytes_max: u64,
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            wait: WaitMode::SpinThenPark,
            limits: djinn_proto::Limits::default(),
            force_socket: false,
            // Zero-copy send is off by default: measured on this 2-core VM over loopback
            // (benches/transport_tcp.rs, io_uring busy-poll, same run), SENDMSG_ZC reached only
            // 0.34× (16 KiB), 0.91× (64 KiB), 0.56× (256 KiB), 0.86× (1 MiB), 0.62× (4 MiB), 0.76×
            // (16 MiB) and 0.95× (64 MiB) of plain SENDMSG bandwidth: loopback delivery copies the
            // pages anyway and the completion notification is extra work. On a real NIC, lower it
            // to the crossover the bench's zero-copy table shows there.
            zerocopy_send_bytes_min: usize::MAX,
            shm_data_bytes: 16 * 1024 * 1024,
            shm_slots: 256,
            spin_us: 50,
            rdma_device: None,
            rdma_ring_bytes: 4 * 1024 * 1024,
            rdma_connections_max: 256,
            rdma_windows_unchecked: false,
            rdma_reg_cache_entries_max: 16,
            rdma_reg_cache_bytes_max: 1 << 30,
        }
    }
}

/// Stops a listener from another thread: a blocked `accept` returns `TransportError::Closed`.
pub type ListenerStop = std::sync::Arc<dyn Fn() + Send + Sync>;

/// Closes a connection from another thread (see [`FrameTx::closer`]).
pub type ConnectionClose = std::sync::Arc<dyn Fn() + Send + Sync>;
