//! Conformance suite: one set of test bodies run against every transport over real endpoints
//! (real sockets, real shared memory). A transport joins by adding one constructor function that
//! returns its [`Fixture`] (or why it cannot run here) and naming it in the `conformance!` line at
//! the bottom. Fixtures that cannot run on this machine are reported as ignored, with the reason
//! printed, never silently passed.

use std::io::Write;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use djinn_proto::{FrameHeader, HEADER_LEN, VERSION};
use djinn_transport::{
    Connection, ListenerStop, OutFrame, RegBuf, Registration, TransportError, TransportOptions, TrySend, WaitMode,
};
use libtest_mimic::{Arguments, Failed, Trial};
use zerocopy::IntoBytes;

/// How to exercise one transport.
#[derive(Clone)]
pub struct Fixture {
    /// A fresh URL to bind (unique per call, e.g. port 0 or a unique shm name).
    pub listen_url: fn() -> String,
    pub opts: TransportOptions,
    /// `Connection::transport` both ends must report.
    pub transport: &'static str,
    /// Opens a raw byte stream to a bound listener URL, for tests that write bytes no well-behaved
    /// sender would. `None`: this transport has no raw byte path (those tests are ignored).
    pub raw_connect: Option<RawConnect>,
    /// `FrameTx::closer` returns a handle (tests that need one are ignored otherwise).
    pub has_closer: bool,
    /// Connects a hostile peer to a listener URL that makes one write outside what it was granted
    /// (see [`Aim`]) and says whether it was refused.
    /// `None`: the peer cannot write the receiver's memory on this transport.
    pub write_out_of_bounds: Option<fn(&str, Aim) -> bool>,
    /// The echo registers a host arena with its listener at start and receives bulk data into it
    /// (`Listener::register_host_memory`; rdma then grants through memory windows).
    pub host_arena: bool,
    /// The listener holds at most `TransportOptions::rdma_connections_max` connections.
    pub bounds_connections: bool,
}

type Setup = Result<Fixture, String>;

/// Where a hostile peer aims its write.
#[derive(Clone, Copy, Debug)]
pub enum Aim {
    /// Just past its ring.
    PastRing,
    /// Just past a direct grant.
    PastGrant,
    /// Inside a direct grant whose transfer is over (its frame was answered).
    StaleGrant,
}
/// Opens a raw byte stream to a listener URL.
pub type RawConnect = fn(&str) -> Box<dyn Write + Send>;

// ------------------------------------------------------------------------------------------------
// Constructors, one per transport.

fn tcp_url() -> String {
    "tcp://127.0.0.1:0".into()
}

fn tcp_raw(url: &str) -> Box<dyn Write + Send> {
    let s = std::net::TcpStream::connect(url.strip_prefix("tcp://").unwrap()).unwrap();
    s.set_nodelay(true).unwrap();
    Box::new(s)
}

fn tcp_uring() -> Setup {
    djinn_transport::tcp::uring_available().map_err(|e| format!("io_uring unavailable here: {e}"))?;
    Ok(Fixture {
        listen_url: tcp_url,
        opts: TransportOptions::default(),
        transport: "tcp",
        raw_connect: Some(tcp_raw),
        has_closer: true,
        write_out_of_bounds: None,
        bounds_connections: false,
        host_arena: false,
    })
}

/// io_uring with every send zero-copy, so SENDMSG_ZC and its notifications are exercised at all sizes.
fn tcp_uring_zc() -> Setup {
    let mut f = tcp_uring()?;
    f.opts.zerocopy_send_bytes_min = 1;
    Ok(f)
}

fn tcp_uring_busy() -> Setup {
    let mut f = tcp_uring()?;
    f.opts.wait = WaitMode::BusyPoll;
    Ok(f)
}

fn tcp_socket() -> Setup {
    let opts = TransportOptions { force_socket: true, ..TransportOptions::default() };
    Ok(Fixture {
        listen_url: tcp_url,
        opts,
        transport: "tcp-socket",
        raw_connect: Some(tcp_raw),
        has_closer: true,
        write_out_of_bounds: None,
        bounds_connections: false,
        host_arena: false,
    })
}

fn tcp_socket_busy() -> Setup {
    let mut f = tcp_socket()?;
    f.opts.wait = WaitMode::BusyPoll;
    Ok(f)
}

/// Shared memory (memfd region + doorbells) with default options; a fresh socket name per listener.
fn shm() -> Setup {
    let listen_url = || {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        format!("shm://conformance-{}-{}", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    };
    Ok(Fixture {
        listen_url,
        opts: TransportOptions::default(),
        transport: "shm",
        raw_connect: None,
        has_closer: true,
        write_out_of_bounds: None,
        bounds_connections: false,
        host_arena: false,
    })
}

/// RDMA over whatever verbs device owns 127.0.0.1 (soft-RoCE `rxe0` on `lo` in the VM that
/// `scripts/rdma-vm` boots). Ignored, with the reason, where the build or the machine has none.
fn rdma() -> Setup {
    #[cfg(not(feature = "rdma"))]
    return Err("built without the `rdma` feature".into());
    #[cfg(feature = "rdma")]
    {
        let devices = djinn_transport::rdma::device_names();
        if devices.is_empty() {
            return Err("no RDMA device here (run through scripts/rdma-vm for soft-RoCE)".into());
        }
        // Small rings so wrap-around and credit waits are exercised by the larger frames.
        let opts = TransportOptions { rdma_ring_bytes: 64 * 1024, ..TransportOptions::default() };
        Ok(Fixture {
            listen_url: || "rdma://127.0.0.1:0".into(),
            opts,
            transport: "rdma",
            raw_connect: Some(rdma_raw),
            has_closer: true,
            write_out_of_bounds: Some(rdma_out_of_bounds),
            bounds_connections: true,
            host_arena: false,
        })
    }
}

/// The rdma rendezvous needs the server to answer, and the tests accept only after connecting: the
/// raw client connects on a thread and its first write waits for it.
#[cfg(feature = "rdma")]
struct RdmaRaw {
    connecting: Option<thread::JoinHandle<djinn_transport::rdma::RawClient>>,
    client: Option<djinn_transport::rdma::RawClient>,
}

#[cfg(feature = "rdma")]
impl Write for RdmaRaw {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if let Some(t) = self.connecting.take() {
            self.client = Some(t.join().expect("rdma raw connect"));
        }
        self.client.as_mut().expect("connected").write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(feature = "rdma")]
fn rdma_raw(url: &str) -> Box<dyn Write + Send> {
    let addr = url.strip_prefix("rdma://").unwrap().to_owned();
    let connecting =
        thread::spawn(move || djinn_transport::rdma::RawClient::connect(&addr, 64 * 1024).expect("rdma raw connect"));
    Box::new(RdmaRaw { connecting: Some(connecting), client: None })
}

/// Past the ring: a plain write. Past a grant: sends the header of a 2 MiB frame, which the echo
/// receives with one `recv_data` (a direct grant), then aims past that grant's end. A stale grant:
/// a whole 2 MiB frame, its echo read, then a write through the grant it used.
#[cfg(feature = "rdma")]
fn rdma_out_of_bounds(url: &str, aim: Aim) -> bool {
    use djinn_transport::rdma::{OutOfBounds, RawClient};
    let mut c = RawClient::connect(url.strip_prefix("rdma://").unwrap(), 64 * 1024).expect("rdma raw connect");
    let header = FrameHeader::new(2, 0, 1, 0, 2 << 20);
    match aim {
        Aim::PastRing => c.write_out_of_bounds(OutOfBounds::PastRing).expect("rogue write"),
        Aim::PastGrant => {
            c.write_all(header.as_bytes()).unwrap();
            c.write_out_of_bounds(OutOfBounds::PastGrant).expect("rogue write")
        }
        Aim::StaleGrant => c.stale_grant(header.as_bytes(), 2 << 20).expect("rogue write"),
    }
}

/// rdma with the echo's receive buffers in a host arena registered at start: grants are memory
/// windows over the arena, bound per transfer and invalidated after it, where the device holds a
/// window's writes to its range (probed at start-up); elsewhere (soft-RoCE) they register each
/// destination as without the arena.
fn rdma_windows() -> Setup {
    let mut f = rdma()?;
    f.host_arena = true;
    Ok(f)
}

/// As `rdma_windows`, with windows used even where the device does not bound them, so that the
/// bind, grant and invalidate path runs on soft-RoCE (a write past a window is then not refused
/// by rxe: that one check is left out, see `writes_out_of_bounds_are_refused`).
fn rdma_windows_unchecked() -> Setup {
    let mut f = rdma_windows()?;
    f.opts.rdma_windows_unchecked = true;
    Ok(f)
}

fn rdma_busy() -> Setup {
    let mut f = rdma()?;
    f.opts.wait = WaitMode::BusyPoll;
    Ok(f)
}

// ------------------------------------------------------------------------------------------------
// Helpers.

/// Deterministic bytes so a misplaced byte shows up.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn send(c: &mut Connection, opcode: u16, flags: u16, id: u64, meta: &[u8], data: &[u8]) -> Result<(), TransportError> {
    let header = FrameHeader::new(opcode, flags, id, meta.len() as u32, data.len() as u64);
    c.tx.send(&OutFrame { header, meta, data: &[data] })
}

/// Receives one whole frame: header, meta, data.
fn recv(c: &mut Connection) -> Result<(FrameHeader, Vec<u8>, Vec<u8>), TransportError> {
    let head = c.rx.recv_head()?;
    let mut data = vec![0u8; head.header.data_len.get() as usize];
    c.rx.recv_data(&mut data)?;
    Ok((head.header, head.meta, data))
}

/// A server that echoes every frame back as a reply (same opcode, id, meta and data), one thread
/// per connection. Records each connection's final byte counters and what ended it.
struct Echo {
    url: String,
    stop: ListenerStop,
    accept_thread: Option<thread::JoinHandle<()>>,
    conn_threads: Arc<std::sync::Mutex<Vec<thread::JoinHandle<ConnEnd>>>>,
}

#[derive(Debug)]
struct ConnEnd {
    transport: &'static str,
    error: TransportError,
    sent: u64,
    received: u64,
}

impl Echo {
    fn start(f: &Fixture) -> Echo {
        let mut listener = djinn_transport::listen(&(f.listen_url)(), &f.opts).expect("listen");
        let arena = f.host_arena.then(|| {
            let a = Arc::new(Arena::new());
            assert!(listener.register_host_memory(a.clone()).expect("register the arena"), "nothing registered");
            a
        });
        let url = listener.url();
        let stop = listener.stopper();
        let conn_threads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let threads = conn_threads.clone();
        let accept_thread = thread::spawn(move || loop {
            match listener.accept() {
                Ok(c) => {
                    let arena = arena.clone();
                    threads.lock().unwrap().push(thread::spawn(move || echo_conn(c, arena)))
                }
                Err(TransportError::Closed) => return,
                Err(e) => panic!("accept: {e}"),
            }
        });
        Echo { url, stop, accept_thread: Some(accept_thread), conn_threads }
    }

    fn connect(&self, f: &Fixture) -> Connection {
        let c = djinn_transport::connect(&self.url, &f.opts).expect("connect");
        assert_eq!(c.transport, f.transport);
        c
    }

    /// Stops accepting and returns how each connection ended (all clients must be dropped first).
    fn finish(mut self) -> Vec<ConnEnd> {
        (self.stop)();
        self.accept_thread.take().unwrap().join().unwrap();
        let threads = std::mem::take(&mut *self.conn_threads.lock().unwrap());
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        (self.stop)();
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
    }
}

fn echo_conn(mut c: Connection, arena: Option<Arc<Arena>>) -> ConnEnd {
    let error = loop {
        let got = match &arena {
            Some(a) => recv_into_arena(&mut c, a),
            None => recv(&mut c).map(|(h, meta, data)| (h, meta, Buf::Heap(data))),
        };
        match got {
            Ok((h, meta, data)) => {
                let reply = FrameHeader::reply_to(&h, meta.len() as u32, data.len() as u64);
                if let Err(e) = c.tx.send(&OutFrame { header: reply, meta: &meta, data: &[&data] }) {
                    break e;
                }
            }
            Err(e) => break e,
        }
    };
    ConnEnd { transport: c.transport, error, sent: c.counters.sent(), received: c.counters.received() }
}

/// Host memory registered with a listener at start: [`ARENA_SLOTS`] slots of [`ARENA_SLOT_BYTES`].
struct Arena {
    base: *mut u8,
    _mem: Box<[u8]>,
    free: std::sync::Mutex<Vec<usize>>,
}

const ARENA_SLOTS: usize = 2;
const ARENA_SLOT_BYTES: usize = 64 << 20;

// SAFETY: `base` points into `_mem`, owned for the arena's life; a slot's bytes are reached only
// through the one `Buf::Arena` that took its index from the free list.
unsafe impl Send for Arena {}
// SAFETY: as above; the free list is behind a mutex.
unsafe impl Sync for Arena {}

// SAFETY: one boxed allocation, never moved or freed while the arena lives.
unsafe impl djinn_transport::PinnedHost for Arena {
    fn ptr(&self) -> *mut u8 {
        self.base
    }
    fn len_bytes(&self) -> usize {
        self._mem.len()
    }
}

impl Arena {
    fn new() -> Arena {
        let mut mem = vec![0u8; ARENA_SLOTS * ARENA_SLOT_BYTES].into_boxed_slice();
        Arena { base: mem.as_mut_ptr(), _mem: mem, free: std::sync::Mutex::new((0..ARENA_SLOTS).collect()) }
    }
}

/// A frame's data: in an arena slot (given back on drop) or, where none is free or it is too
/// large, on the heap.
enum Buf {
    Heap(Vec<u8>),
    Arena { arena: Arc<Arena>, slot: usize, len: usize },
}

impl std::ops::Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Buf::Heap(v) => v,
            // SAFETY: the slot is held by this value alone (see `Arena`).
            Buf::Arena { arena, slot, len } => unsafe {
                std::slice::from_raw_parts(arena.base.add(slot * ARENA_SLOT_BYTES), *len)
            },
        }
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            Buf::Heap(v) => v,
            // SAFETY: as in `deref`; `&mut self` makes the borrow exclusive.
            Buf::Arena { arena, slot, len } => unsafe {
                std::slice::from_raw_parts_mut(arena.base.add(*slot * ARENA_SLOT_BYTES), *len)
            },
        }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Buf::Arena { arena, slot, .. } = self {
            arena.free.lock().unwrap().push(*slot);
        }
    }
}

fn recv_into_arena(c: &mut Connection, arena: &Arc<Arena>) -> Result<(FrameHeader, Vec<u8>, Buf), TransportError> {
    let head = c.rx.recv_head()?;
    let len = head.header.data_len.get() as usize;
    let slot = if len <= ARENA_SLOT_BYTES { arena.free.lock().unwrap().pop() } else { None };
    let mut data = match slot {
        Some(slot) => Buf::Arena { arena: arena.clone(), slot, len },
        None => Buf::Heap(vec![0u8; len]),
    };
    c.rx.recv_data(&mut data)?;
    Ok((head.header, head.meta, data))
}

fn round_trip(c: &mut Connection, id: u64, meta_len: usize, data_len: usize) {
    let meta = pattern(meta_len, id ^ 0xAA);
    let data = pattern(data_len, id);
    send(c, 2, 0, id, &meta, &data).expect("send");
    let (h, m, d) = recv(c).expect("recv");
    assert!(h.is_reply());
    assert_eq!(h.request_id.get(), id);
    assert_eq!(m, meta, "meta of frame {id}");
    assert!(d == data, "data of frame {id} ({data_len} bytes) differs");
}

// ------------------------------------------------------------------------------------------------
// Test bodies.

fn round_trip_sizes(f: &Fixture) {
    let echo = Echo::start(f);
    let mut c = echo.connect(f);
    let big = if f.opts.wait == WaitMode::BusyPoll { 1 << 20 } else { 64 << 20 };
    for (i, &len) in [0usize, 1, 8, 64, 4095, 16 * 1024 + 3, 256 * 1024, 1 << 20, big].iter().enumerate() {
        round_trip(&mut c, i as u64, i * 7, len);
    }
    if f.transport == "rdma" {
        // The large replies were written straight into the receive buffers (direct grants).
        assert!(c.counters.received_direct() >= 1 << 20, "direct bytes: {}", c.counters.received_direct());
    }
    drop(c);
    let ends = echo.finish();
    assert_eq!(ends.len(), 1);
    assert_eq!(ends[0].transport, f.transport);
    assert!(matches!(ends[0].error, TransportError::Closed), "{:?}", ends[0].error);
}

/// Echoes that leave a small ring 16 bytes short of its end, twice. An rdma busy-poll client is
/// written its replies on the polled ring (`rdma/ring/polled.rs`: 16 bytes of framing around a
/// payload padded to 16), where a 32-byte header and 96 bytes of data take 144 bytes: 455 of them
/// end 16 bytes before the end of the fixture's 64 KiB ring, too little for a chunk, so the next
/// one follows a wrap marker. Every transport carries the same frames.
fn ring_end_too_small_for_a_chunk(f: &Fixture) {
    let echo = Echo::start(f);
    let mut c = echo.connect(f);
    for id in 0..2 * 455 + 10 {
        round_trip(&mut c, id, 0, 96);
    }
}

fn pipelined(f: &Fixture) {
    // Requests sent without reading a reply, within what every transport buffers each way: the
    // echo blocks on a reply once the client's receive side is full, and then only the credits
    // it already returned let the client go on. rdma keeps 128 receives posted each way and
    // returns credits a quarter at a time, so 256 was right at the edge and hung when the credit
    // batches fell badly (a bounded transport's limit, not a fault; the server never blocks on
    // a peer: it queues per connection and pauses that connection's sessions).
    const FRAMES: u64 = 128;
    let echo = Echo::start(f);
    let mut c = echo.connect(f);
    for id in 0..FRAMES {
        send(&mut c, 2, 0, id, &pattern(id as usize % 17, id), &pattern(100 + id as usize, id)).unwrap();
    }
    for id in 0..FRAMES {
        let (h, m, d) = recv(&mut c).unwrap();
        assert_eq!(h.request_id.get(), id, "replies arrive in order");
        assert_eq!(m, pattern(id as usize % 17, id));
        assert_eq!(d, pattern(100 + id as usize, id));
    }
}

fn halves_on_threads(f: &Fixture) {
    const FRAMES: u64 = 2000;
    let echo = Echo::start(f);
    let Connection { mut tx, mut rx, .. } = echo.connect(f);
    let sender = thread::spawn(move || {
        for id in 0..FRAMES {
            let data = pattern((id % 300) as usize, id);
            let header = FrameHeader::new(2, 0, id, 0, data.len() as u64);
            tx.send(&OutFrame { header, meta: &[], data: &[&data] }).unwrap();
        }
        tx
    });
    let receiver = thread::spawn(move || {
        for id in 0..FRAMES {
            let head = rx.recv_head().unwrap();
            assert_eq!(head.header.request_id.get(), id);
            let mut d = vec![0; head.header.data_len.get() as usize];
            rx.recv_data(&mut d).unwrap();
            assert_eq!(d, pattern((id % 300) as usize, id));
        }
    });
    let _tx = sender.join().unwrap();
    receiver.join().unwrap();
}

fn concurrent_32(f: &Fixture) {
    const CLIENTS: usize = 32;
    let echo = Echo::start(f);
    let start = Arc::new(Barrier::new(CLIENTS));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let mut c = echo.connect(f);
            let start = start.clone();
            thread::spawn(move || {
                start.wait();
                for j in 0..20 {
                    round_trip(&mut c, (i * 1000 + j) as u64, 8, 64 + i * 100 + j);
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let ends = echo.finish();
    assert_eq!(ends.len(), CLIENTS);
    assert!(ends.iter().all(|e| matches!(e.error, TransportError::Closed)), "{ends:?}");
}

fn peer_close(f: &Fixture) {
    // Server drops its end: the client sees Closed.
    let mut listener = djinn_transport::listen(&(f.listen_url)(), &f.opts).unwrap();
    let url = listener.url();
    let server = thread::spawn(move || drop(listener.accept().unwrap()));
    let mut c = djinn_transport::connect(&url, &f.opts).unwrap();
    server.join().unwrap();
    assert!(matches!(c.rx.recv_head(), Err(TransportError::Closed)));
    // Client drops its end mid-conversation: the server sees Closed.
    let echo = Echo::start(f);
    let mut c = echo.connect(f);
    round_trip(&mut c, 1, 0, 10);
    drop(c);
    let ends = echo.finish();
    assert!(matches!(ends[0].error, TransportError::Closed), "{:?}", ends[0].error);
}

fn bad_headers(f: &Fixture) {
    let raw_connect = f.raw_connect.expect("checked by runner");
    let limits = f.opts.limits;
    let good = FrameHeader::new(2, 0, 1, 0, 0);
    let mut bad_magic = good;
    bad_magic.magic = 0xdead_beef.into();
    let mut bad_version = good;
    bad_version.version = (VERSION + 1).into();
    let mut too_big = good;
    too_big.data_len = limits.frame_bytes_max.into();
    let mut meta_too_big = good;
    meta_too_big.meta_len = (limits.meta_bytes_max + 1).into();
    let mut zero_version = good;
    zero_version.version = 0.into();
    for (what, h) in [
        ("magic", bad_magic),
        ("version", bad_version),
        ("zero version", zero_version),
        ("size", too_big),
        ("meta", meta_too_big),
    ] {
        let mut listener = djinn_transport::listen(&(f.listen_url)(), &f.opts).unwrap();
        let url = listener.url();
        let mut raw = raw_connect(&url);
        let mut c = listener.accept().unwrap();
        // One good frame first: framing holds until the bad header.
        raw.write_all(good.as_bytes()).unwrap();
        raw.write_all(h.as_bytes()).unwrap();
        raw.write_all(&[0u8; 64]).unwrap();
        raw.flush().unwrap();
        assert_eq!(c.rx.recv_head().unwrap().header, good);
        match c.rx.recv_head() {
            Err(TransportError::BadHeader(_)) => {}
            other => panic!("bad {what}: expected BadHeader, got {other:?}"),
        }
    }
}

fn half_sent_frame_does_not_block_others(f: &Fixture) {
    let raw_connect = f.raw_connect.expect("checked by runner");
    let echo = Echo::start(f);
    let mut stalled = raw_connect(&echo.url);
    let h = FrameHeader::new(2, 0, 9, 0, 1000);
    stalled.write_all(&h.as_bytes()[..HEADER_LEN / 2]).unwrap();
    stalled.flush().unwrap();
    let mut stalled2 = raw_connect(&echo.url);
    stalled2.write_all(h.as_bytes()).unwrap();
    stalled2.write_all(&[1u8; 10]).unwrap();
    stalled2.flush().unwrap();
    let t0 = Instant::now();
    let mut c = echo.connect(f);
    for i in 0..50 {
        round_trip(&mut c, i, 4, 1000);
    }
    assert!(t0.elapsed() < Duration::from_secs(10), "other connections were delayed");
    drop((c, stalled, stalled2));
}

fn counters(f: &Fixture) {
    let echo = Echo::start(f);
    let mut c = echo.connect(f);
    let mut expect = 0u64;
    for (i, (m, d)) in [(0usize, 0usize), (5, 0), (0, 77), (100, 300_000)].into_iter().enumerate() {
        round_trip(&mut c, i as u64, m, d);
        expect += (HEADER_LEN + m + d) as u64;
    }
    assert_eq!(c.counters.sent(), expect);
    assert_eq!(c.counters.received(), expect);
    drop(c);
    let ends = echo.finish();
    assert_eq!((ends[0].sent, ends[0].received), (expect, expect));
}

/// A client's registered buffers ([`RegBuf`]): repeated sends from one and receives into another
/// register each once (rdma: a per-connection cache; no registration per transfer, the echo lands
/// by one-sided write), and a cache at its bound deregisters the least recently used buffer. On
/// transports that register nothing the same bytes go both ways.
fn registered_buffers(f: &Fixture) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut f = f.clone();
    f.opts.rdma_reg_cache_entries_max = 2;
    let echo = Echo::start(&f);
    let mut c = echo.connect(&f);
    let rdma = f.transport == "rdma";
    let (new, hit) = if rdma {
        (Registration::Registered, Registration::Cached)
    } else {
        (Registration::Unsupported, Registration::Unsupported)
    };
    // Large enough to move by grants (rdma rendezvous: 1 MiB and more).
    let len = 2 << 20;
    let mut out = RegBuf::new(len).unwrap();
    out.copy_from_slice(&pattern(len, 3));
    let mut back = RegBuf::new(len).unwrap();
    assert_eq!(c.tx.register_buffer(&out).unwrap(), new);
    assert_eq!(c.tx.register_buffer(&back).unwrap(), new);
    let direct_before = c.counters.received_direct();
    for i in 0..3u64 {
        // As a client's put and get do: make sure of the registration, then move the bytes.
        assert_eq!(c.tx.register_buffer(&out).unwrap(), hit);
        assert_eq!(c.tx.register_buffer(&back).unwrap(), hit);
        out[0] = i as u8;
        send(&mut c, 2, 0, i, b"m", &out).unwrap();
        let head = c.rx.recv_head().unwrap();
        assert_eq!(head.header.data_len.get(), len as u64);
        back[..8].fill(0xee);
        c.rx.recv_data(&mut back).unwrap();
        assert!(back[..] == out[..], "echo {i} differs");
    }
    if !rdma {
        assert!(c.tx.registration_cache().is_none());
        return;
    }
    assert_eq!(c.counters.registrations.load(Relaxed), 0, "a transfer registered a cached buffer");
    assert_eq!(c.counters.received_direct() - direct_before, 3 * len as u64, "echoes not written in place");
    let s = c.tx.registration_cache().unwrap();
    assert_eq!((s.entries, s.bytes, s.registered_total, s.deregistered_total), (2, 2 * len as u64, 2, 0));
    // At the bound of 2, a third buffer evicts the least recently used (`out`: `back` was used
    // last) and deregisters it.
    let third = RegBuf::new(4096).unwrap();
    assert_eq!(c.tx.register_buffer(&third).unwrap(), Registration::Registered);
    let s = c.tx.registration_cache().unwrap();
    assert_eq!((s.entries, s.registered_total, s.deregistered_total), (2, 3, 1), "{s:?}");
    // Evicted: a send from it registers for the transfer, and still arrives whole (so does the
    // echo's receive into a plain vector: two registrations).
    send(&mut c, 2, 0, 9, b"m", &out).unwrap();
    let (_, _, d) = recv(&mut c).unwrap();
    assert!(d[..] == out[..]);
    assert_eq!(c.counters.registrations.load(Relaxed), 2);
    // Registered again, it evicts `back` (now the least recently used).
    assert_eq!(c.tx.register_buffer(&out).unwrap(), Registration::Registered);
    assert_eq!(c.tx.registration_cache().unwrap().deregistered_total, 2);
    // A buffer over the byte bound is not cached.
    f.opts.rdma_reg_cache_bytes_max = 0;
    let mut small = echo.connect(&f);
    assert_eq!(small.tx.register_buffer(&third).unwrap(), Registration::TooLarge);
}

fn data_misuse_and_skip(f: &Fixture) {
    let echo = Echo::start(f);
    let mut c = echo.connect(f);
    send(&mut c, 2, 0, 1, b"m", &pattern(50_000, 1)).unwrap();
    send(&mut c, 2, 0, 2, b"", &pattern(10, 2)).unwrap();
    let head = c.rx.recv_head().unwrap();
    assert_eq!(head.header.data_len.get(), 50_000);
    assert!(matches!(c.rx.recv_head(), Err(TransportError::DataMisuse(_))));
    assert!(matches!(c.rx.recv_data(&mut vec![0; 50_001]), Err(TransportError::DataMisuse(_))));
    let mut first = [0u8; 100];
    c.rx.recv_data(&mut first).unwrap();
    assert_eq!(&first[..], &pattern(50_000, 1)[..100]);
    c.rx.skip_data(49_900).unwrap();
    let (h, _, d) = recv(&mut c).unwrap();
    assert_eq!((h.request_id.get(), d), (2, pattern(10, 2)));
    // A header whose lengths disagree with the slices is refused before anything is sent.
    let header = FrameHeader::new(2, 0, 3, 0, 5);
    assert!(matches!(c.tx.send(&OutFrame { header, meta: &[], data: &[b"abc"] }), Err(TransportError::DataMisuse(_))));
    round_trip(&mut c, 4, 1, 1);
}

/// Large frames read in pieces of every kind: big reads (rdma: direct writes into each piece),
/// a small read (rdma: the rest comes through the ring), skips; vectored large data from many
/// slices; a large frame skipped whole.
fn large_frames_in_pieces(f: &Fixture) {
    let echo = Echo::start(f);
    let mut c = echo.connect(f);
    let data = pattern(3 << 20, 9);
    send(&mut c, 2, 0, 1, b"m", &data).unwrap();
    let head = c.rx.recv_head().unwrap();
    assert_eq!(head.header.data_len.get(), 3 << 20);
    let (mut a, mut b, mut small) = (vec![0u8; (1 << 20) + 3], vec![0u8; 512 * 1024], [0u8; 100]);
    c.rx.recv_data(&mut a).unwrap();
    c.rx.recv_data(&mut b).unwrap();
    c.rx.recv_data(&mut small).unwrap();
    let at = a.len() + b.len() + small.len();
    c.rx.skip_data(1 << 20).unwrap();
    let mut tail = vec![0u8; data.len() - at - (1 << 20)];
    c.rx.recv_data(&mut tail).unwrap();
    assert!(a == data[..a.len()] && b == data[a.len()..a.len() + b.len()], "direct pieces differ");
    assert_eq!(&small[..], &data[a.len() + b.len()..at]);
    assert!(tail == data[at + (1 << 20)..], "the piece after the skip differs");
    // Many slices of one frame, some crossing any piece boundary the receiver picks.
    let parts: Vec<Vec<u8>> = (0..9).map(|i| pattern(i * 300_001 + 7, i as u64)).collect();
    let slices: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
    let total: usize = parts.iter().map(|p| p.len()).sum();
    c.tx.send(&OutFrame { header: FrameHeader::new(2, 0, 2, 0, total as u64), meta: &[], data: &slices }).unwrap();
    let (h, _, d) = recv(&mut c).unwrap();
    assert!(h.request_id.get() == 2 && d == parts.concat(), "vectored large frame differs");
    // Skipped whole, then the connection goes on.
    send(&mut c, 2, 0, 3, b"", &pattern(2 << 20, 3)).unwrap();
    let head = c.rx.recv_head().unwrap();
    c.rx.skip_data(head.header.data_len.get()).unwrap();
    round_trip(&mut c, 4, 1, 1 << 20);
}

/// A peer writing outside its ring or its grant is refused by the receiver's NIC and loses its
/// connection; the receiver's other connections go on.
fn writes_out_of_bounds_are_refused(f: &Fixture) {
    let rogue = f.write_out_of_bounds.expect("trial runs only with a hostile peer");
    let echo = Echo::start(f);
    let mut c = echo.connect(f);
    round_trip(&mut c, 1, 3, 100);
    let mut conns = 1;
    for (i, aim) in [Aim::PastRing, Aim::PastGrant, Aim::StaleGrant].into_iter().enumerate() {
        // Windows forced onto a device that does not bound them: only their lifetime is checked.
        if matches!(aim, Aim::PastGrant) && f.opts.rdma_windows_unchecked {
            continue;
        }
        assert!(rogue(&echo.url, aim), "a write {aim:?} was not refused");
        conns += 1;
        round_trip(&mut c, 2 + i as u64, 3, 2 << 20);
    }
    drop(c);
    let ends = echo.finish();
    assert_eq!(ends.len(), conns, "{ends:?}");
}

/// A client beyond the listener's connection bound is answered Busy at once; the connections held
/// go on, and a slot given back is taken by the next client.
fn connections_beyond_the_bound_are_busy(f: &Fixture) {
    let mut f = f.clone();
    f.opts.rdma_connections_max = 2;
    let echo = Echo::start(&f);
    let (mut a, mut b) = (echo.connect(&f), echo.connect(&f));
    // The listener counts a connection from its rendezvous on, so `accept` need not have run.
    match djinn_transport::connect(&echo.url, &f.opts) {
        Err(TransportError::Other(why)) if why.contains("busy") => {}
        Err(e) => panic!("third connection: expected busy, got {e}"),
        Ok(_) => panic!("third connection accepted beyond a bound of 2"),
    }
    round_trip(&mut a, 1, 0, 10);
    round_trip(&mut b, 2, 0, 10);
    drop(a);
    // The echo thread drops its side once it sees the hang-up; then the slot is free.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut c = loop {
        match djinn_transport::connect(&echo.url, &f.opts) {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                assert!(e.to_string().contains("busy"), "{e}");
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("no slot came back: {e}"),
        }
    };
    round_trip(&mut c, 3, 0, 10);
}

fn vectored_data_slices(f: &Fixture) {
    let echo = Echo::start(f);
    let mut c = echo.connect(f);
    let parts: Vec<Vec<u8>> = (0..40).map(|i| pattern(i * 1000 + 1, i as u64)).collect();
    let slices: Vec<&[u8]> = parts.iter().map(|p| p.as_slice()).collect();
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let header = FrameHeader::new(2, 0, 7, 3, total as u64);
    c.tx.send(&OutFrame { header, meta: b"abc", data: &slices }).unwrap();
    let (_, m, d) = recv(&mut c).unwrap();
    assert_eq!(m, b"abc");
    assert_eq!(d, parts.concat());
}

fn closer_unblocks_both_sides(f: &Fixture) {
    let echo = Echo::start(f);
    let Connection { mut tx, mut rx, .. } = echo.connect(f);
    let close = tx.closer().expect("fixture says this transport has a closer");
    let header = FrameHeader::new(2, 0, 1, 0, 3);
    tx.send(&OutFrame { header, meta: &[], data: &[b"abc"] }).unwrap();
    let (echoed_tx, echoed) = std::sync::mpsc::channel();
    let reader = thread::spawn(move || {
        let mut d = [0u8; 3];
        let head = rx.recv_head().unwrap();
        rx.recv_data(&mut d[..head.header.data_len.get() as usize]).unwrap();
        echoed_tx.send(()).unwrap();
        // Nothing more comes: this receive blocks until the closer runs.
        rx.recv_head()
    });
    // Close only once the echo is in (under the VM's emulation it can take longer than any fixed
    // sleep), then give the reader time to block in its second receive.
    echoed.recv_timeout(Duration::from_secs(30)).expect("the echo came back");
    thread::sleep(Duration::from_millis(50));
    close();
    match reader.join().unwrap() {
        Err(TransportError::Closed) | Err(TransportError::Io { .. }) => {}
        other => panic!("blocked receive after close: {other:?}"),
    }
    assert!(tx.send(&OutFrame { header, meta: &[], data: &[b"abc"] }).is_err(), "send after close");
    drop(tx);
    let ends = echo.finish();
    assert!(matches!(ends[0].error, TransportError::Closed), "server saw {:?}", ends[0].error);
}

/// A client connection and the server side the listener accepted for it, no echo behind it (the
/// body drives both ends).
fn connected_pair(f: &Fixture) -> (Connection, Connection) {
    let mut listener = djinn_transport::listen(&(f.listen_url)(), &f.opts).expect("listen");
    let url = listener.url();
    let accept = thread::spawn(move || listener.accept().expect("accept"));
    let c = djinn_transport::connect(&url, &f.opts).expect("connect");
    (c, accept.join().unwrap())
}

/// `try_send` never waits and never leaves part of a frame unaccounted: against a peer that reads
/// nothing it sends until the transport is full (or, on a transport without a non-blocking send,
/// sends nothing), and once the peer reads, every frame arrives whole and in order, the one a
/// partial `try_send` kept included (flushed by the next `send`).
fn try_send_whole_frames(f: &Fixture) {
    let (mut c, mut server) = connected_pair(f);
    let (mut sent, mut partly) = (0u64, false);
    let t0 = Instant::now();
    while sent < 1_000_000 {
        let data = pattern(1000, sent);
        let header = FrameHeader::new(2, 0, sent, 0, data.len() as u64);
        match c.tx.try_send(&OutFrame { header, meta: &[], data: &[&data] }).expect("try_send") {
            TrySend::Sent => sent += 1,
            TrySend::Partly(rest) => {
                assert!(rest > 0 && rest < HEADER_LEN + 1000, "kept {rest} bytes");
                sent += 1;
                partly = true;
                break;
            }
            TrySend::WouldBlock => break,
        }
    }
    assert!(t0.elapsed() < Duration::from_secs(5), "try_send waited");
    // tcp until the socket buffers fill; shm until the ring has no slot or byte left.
    if f.transport.starts_with("tcp") || f.transport == "shm" {
        assert!(sent > 0 && sent < 1_000_000, "{} sent {sent} frames without a reader", f.transport);
    }
    let last = sent;
    let reader = thread::spawn(move || {
        for id in 0..=last {
            let (h, _, d) = recv(&mut server).expect("recv");
            assert_eq!(h.request_id.get(), id);
            assert!(d == pattern(1000, id), "frame {id} differs");
        }
    });
    // A `send` first sends what a partial `try_send` kept.
    let data = pattern(1000, last);
    send(&mut c, 2, 0, last, &[], &data).expect("send after try_send");
    reader.join().unwrap();
    eprintln!("{}: {sent} frames by try_send (last partly: {partly})", f.transport);
}

/// A frame sent with `try_send_more` (which a transport may hold back for the next one: tcp's
/// `MSG_MORE`) arrives whole and in order once the next frame is sent, by `try_send` or by
/// `send` — a decode's last token and its final frame.
fn try_send_more_then_next(f: &Fixture) {
    let (mut c, mut server) = connected_pair(f);
    const PAIRS: u64 = 50;
    let reader = thread::spawn(move || {
        for id in 0..2 * PAIRS {
            let (h, meta, d) = recv(&mut server).expect("recv");
            assert_eq!(h.request_id.get(), id);
            assert_eq!(meta, id.to_le_bytes());
            assert!(d == pattern((id % 7) as usize * 100, id), "frame {id} differs");
        }
    });
    let t0 = Instant::now();
    for pair in 0..PAIRS {
        let (first, second) = (2 * pair, 2 * pair + 1);
        let data = pattern((first % 7) as usize * 100, first);
        let meta = first.to_le_bytes();
        let header = FrameHeader::new(2, 0, first, meta.len() as u32, data.len() as u64);
        match c.tx.try_send_more(&OutFrame { header, meta: &meta, data: &[&data] }).expect("try_send_more") {
            TrySend::Sent | TrySend::Partly(_) => {}
            TrySend::WouldBlock => send(&mut c, 2, 0, first, &meta, &data).expect("send"),
        }
        let data = pattern((second % 7) as usize * 100, second);
        let meta = second.to_le_bytes();
        let header = FrameHeader::new(2, 0, second, meta.len() as u32, data.len() as u64);
        // Odd pairs end with `try_send` (falling back to `send`), even ones with `send`.
        let direct = pair % 2 == 1
            && match c.tx.try_send(&OutFrame { header, meta: &meta, data: &[&data] }).expect("try_send") {
                TrySend::Sent => true,
                TrySend::Partly(_) => {
                    c.tx.flush().expect("flush");
                    true
                }
                TrySend::WouldBlock => false,
            };
        if !direct {
            send(&mut c, 2, 0, second, &meta, &data).expect("send");
        }
    }
    reader.join().unwrap();
    // A frame held back until a timer (tcp's 200 ms) would take 10 s here.
    assert!(t0.elapsed() < Duration::from_secs(5), "frames held back: {:?}", t0.elapsed());
}

/// Pairs of `try_send_more` and `try_send` against a peer that reads nothing, until the transport
/// is full: a held-back frame, the frame sent with it and a partial send's rest all arrive whole
/// and in order once the peer reads, with the frames no `try_` call took sent by `send` (which
/// sends whatever is held or kept first).
fn try_send_more_until_full(f: &Fixture) {
    let (mut c, mut server) = connected_pair(f);
    let frame_of = |id: u64| (id.to_le_bytes(), pattern(300 + (id % 5) as usize * 100, id));
    let (mut next, mut how, t0) = (0u64, "sent", Instant::now());
    // Until a `try_` call takes nothing (left to `send`) or only part of its frame.
    while next < 1_000_000 {
        let (meta, data) = frame_of(next);
        let header = FrameHeader::new(2, 0, next, meta.len() as u32, data.len() as u64);
        let frame = OutFrame { header, meta: &meta, data: &[&data] };
        let r = if next % 2 == 0 { c.tx.try_send_more(&frame) } else { c.tx.try_send(&frame) };
        match r.expect("try_send(_more)") {
            TrySend::Sent => next += 1,
            TrySend::Partly(_) => {
                (next, how) = (next + 1, "partly");
                break;
            }
            TrySend::WouldBlock => {
                how = "would block";
                break;
            }
        }
    }
    assert!(t0.elapsed() < Duration::from_secs(5), "try_send(_more) waited");
    // Whatever a pair's first frame was, the second follows at once: by `send` here.
    let last = next | 1;
    let reader = thread::spawn(move || {
        for id in 0..=last {
            let (h, meta, d) = recv(&mut server).expect("recv");
            assert_eq!(h.request_id.get(), id);
            let (want_meta, want_data) = frame_of(id);
            assert_eq!(meta, want_meta);
            assert!(d == want_data, "frame {id} differs");
        }
    });
    for id in next..=last {
        let (meta, data) = frame_of(id);
        send(&mut c, 2, 0, id, &meta, &data).expect("send after try_send(_more)");
    }
    reader.join().unwrap();
    eprintln!("{}: {next} frames by try_send(_more), the last {how}", f.transport);
}

fn listener_stop(f: &Fixture) {
    let mut listener = djinn_transport::listen(&(f.listen_url)(), &f.opts).unwrap();
    let stop = listener.stopper();
    let t = thread::spawn(move || listener.accept().map(|_| ()));
    thread::sleep(Duration::from_millis(50));
    stop();
    assert!(matches!(t.join().unwrap(), Err(TransportError::Closed)));
}

// ------------------------------------------------------------------------------------------------
// Runner.

type Body = fn(&Fixture);

/// What a test needs beyond the common seam.
#[derive(Clone, Copy, PartialEq)]
enum Needs {
    Nothing,
    RawBytes,
    Closer,
    OneSided,
    ConnectionBound,
}
use Needs::*;

const TESTS: &[(&str, Body, Needs)] = &[
    ("round_trip_sizes", round_trip_sizes, Nothing),
    ("pipelined", pipelined, Nothing),
    ("ring_end_too_small_for_a_chunk", ring_end_too_small_for_a_chunk, Nothing),
    ("halves_on_threads", halves_on_threads, Nothing),
    ("concurrent_32", concurrent_32, Nothing),
    ("peer_close", peer_close, Nothing),
    ("bad_headers", bad_headers, RawBytes),
    ("half_sent_frame_does_not_block_others", half_sent_frame_does_not_block_others, RawBytes),
    ("counters", counters, Nothing),
    ("data_misuse_and_skip", data_misuse_and_skip, Nothing),
    ("registered_buffers", registered_buffers, Nothing),
    ("vectored_data_slices", vectored_data_slices, Nothing),
    ("large_frames_in_pieces", large_frames_in_pieces, Nothing),
    ("writes_out_of_bounds_are_refused", writes_out_of_bounds_are_refused, OneSided),
    ("connections_beyond_the_bound_are_busy", connections_beyond_the_bound_are_busy, ConnectionBound),
    ("closer_unblocks_both_sides", closer_unblocks_both_sides, Closer),
    ("listener_stop", listener_stop, Nothing),
    ("try_send_whole_frames", try_send_whole_frames, Nothing),
    ("try_send_more_then_next", try_send_more_then_next, Nothing),
    ("try_send_more_until_full", try_send_more_until_full, Nothing),
];

/// Busy-poll fixtures burn a core per waiting side; on a 2-core machine only the cheap tests run.
const BUSY_TESTS: &[&str] =
    &["round_trip_sizes", "pipelined", "ring_end_too_small_for_a_chunk", "halves_on_threads", "counters"];

fn trials(name: &'static str, setup: Setup) -> Vec<Trial> {
    let busy = setup.as_ref().map(|f| f.opts.wait == WaitMode::BusyPoll).unwrap_or(false);
    TESTS
        .iter()
        .filter(|(t, _, _)| !busy || BUSY_TESTS.contains(t))
        .map(|&(test, body, needs)| {
            let skip = match &setup {
                Err(why) => Some(why.clone()),
                Ok(f) if needs == RawBytes && f.raw_connect.is_none() => {
                    Some("no raw byte path for this transport".into())
                }
                Ok(f) if needs == Closer && !f.has_closer => Some("no connection closer for this transport".into()),
                Ok(f) if needs == ConnectionBound && !f.bounds_connections => {
                    Some("this transport has no per-listener connection bound".into())
                }
                Ok(f) if needs == OneSided && f.write_out_of_bounds.is_none() => {
                    Some("peers cannot write the receiver's memory on this transport".into())
                }
                Ok(_) => None,
            };
            let full = format!("{name}::{test}");
            if let Some(why) = &skip {
                eprintln!("ignored {full}: {why}");
            }
            let fixture = setup.clone().ok();
            Trial::test(full, move || {
                body(fixture.as_ref().ok_or_else(|| Failed::from("fixture unavailable"))?);
                Ok(())
            })
            .with_ignored_flag(skip.is_some())
        })
        .collect()
}

macro_rules! conformance {
    ($($ctor:ident),* $(,)?) => {
        fn all_trials() -> Vec<Trial> {
            let mut v = Vec::new();
            $(v.extend(trials(stringify!($ctor), $ctor()));)*
            v
        }
    };
}

conformance!(
    tcp_uring,
    tcp_uring_zc,
    tcp_uring_busy,
    tcp_socket,
    tcp_socket_busy,
    shm,
    rdma,
    rdma_busy,
    rdma_windows,
    rdma_windows_unchecked
);

fn main() {
    let args = Arguments::from_args();
    libtest_mimic::run(&args, all_trials()).exit();
}
