//! `rdma://HOST:PORT`: reliable-connected verbs queue pairs, one per direction, carrying frames
//! by one-sided RDMA WRITE into a ring the receiver registered (see [`ring`]).
//!
//! Rendezvous (as perftest does, out of band): HOST:PORT is a TCP endpoint. The client connects,
//! opens the RDMA device that owns its end of that TCP connection (or `TransportOptions::
//! rdma_device`), builds its side and sends a [`Hello`]: GID, MTU, both QP numbers and PSNs, and
//! its receive ring's address, rkey and size. The server answers with its own (or `Busy` when it
//! cannot allocate the QPs/MRs), both sides move their QPs to RTS, and the client sends one byte
//! once it is ready to receive. The TCP connection then stays open, silent, for the connection's
//! life: its hang-up is how each side learns the other died (a QP alone only notices when it
//! next sends).
//!
//! Per connection, per side: two QPs (each with its own CQ and completion channel), a receive
//! ring of `rdma_ring_bytes` registered for remote write (its own rkey: a peer can write only its
//! own ring), a staging buffer of the peer's ring size, and a few credit slots. Nothing is
//! registered after the rendezvous. A server bounds what a client may ask of it: the client's
//! ring may be no larger than the server's own.
//!
//! The listener opens its device once (`--nic`, else the device with a GID for the listen
//! address) and refuses an unspecified address without a named device.

mod listener;
mod regcache;
mod ring;
pub mod verbs;
mod windows;

use std::io::{Read, Write};
use std::net::{IpAddr, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

pub use self::listener::{listen, RdmaListener};
use self::ring::{Link, RemoteRing, CREDIT_BYTES, CREDIT_RECV_WR, DATA_RECV_WR, INLINE_BYTES, SEND_WR};
pub use self::ring::{OutOfBounds, RdmaRx, RdmaTx};
pub use self::verbs::{device_names, DeviceError};
use self::verbs::{Cq, Device, Mr, Qp, QpPeer, QpSizes};
use crate::{ByteCounters, Connection, TransportError, TransportOptions};

/// A client waits this long for the server's half of the rendezvous (the server may be setting up
/// many clients at once, each registering its rings).
const CLIENT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest ring a client accepts from a server (bounds the staging buffer it allocates).
const PEER_RING_BYTES_MAX: u64 = 1 << 30;
const MAGIC: [u8; 8] = *b"DJNRDMA2";
const HELLO_BYTES: usize = 80;
const STATUS_OK: u32 = 0;
const STATUS_BUSY: u32 = 1;
const STATUS_REFUSED: u32 = 2;
/// Hello flag: the sender's receiving half polls its ring (a client's ask), or will be written
/// to as one (the server's answer); see `ring::polled`.
const FLAG_POLLED_RING: u32 = 1;

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> TransportError {
    move |source| TransportError::Io { what, source }
}

/// One side's half of the rendezvous, little-endian on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Hello {
    status: u32,
    mtu: u32,
    gid: [u8; 16],
    tx_qpn: u32,
    tx_psn: u32,
    rx_qpn: u32,
    rx_psn: u32,
    ring_addr: u64,
    ring_rkey: u32,
    flags: u32,
    ring_bytes: u64,
}

impl Hello {
    fn encode(&self) -> [u8; HELLO_BYTES] {
        let mut b = [0u8; HELLO_BYTES];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.status.to_le_bytes());
        b[12..16].copy_from_slice(&self.mtu.to_le_bytes());
        b[16..32].copy_from_slice(&self.gid);
        b[32..36].copy_from_slice(&self.tx_qpn.to_le_bytes());
        b[36..40].copy_from_slice(&self.tx_psn.to_le_bytes());
        b[40..44].copy_from_slice(&self.rx_qpn.to_le_bytes());
        b[44..48].copy_from_slice(&self.rx_psn.to_le_bytes());
        b[48..56].copy_from_slice(&self.ring_addr.to_le_bytes());
        b[56..60].copy_from_slice(&self.ring_rkey.to_le_bytes());
        b[60..64].copy_from_slice(&self.flags.to_le_bytes());
        b[64..72].copy_from_slice(&self.ring_bytes.to_le_bytes());
        b
    }

    fn decode(b: &[u8; HELLO_BYTES]) -> Option<Hello> {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        (b[0..8] == MAGIC).then(|| Hello {
            status: u32_at(8),
            mtu: u32_at(12),
            gid: b[16..32].try_into().expect("16 bytes"),
            tx_qpn: u32_at(32),
            tx_psn: u32_at(36),
            rx_qpn: u32_at(40),
            rx_psn: u32_at(44),
            ring_addr: u64_at(48),
            ring_rkey: u32_at(56),
            flags: u32_at(60),
            ring_bytes: u64_at(64),
        })
    }

    fn busy(status: u32) -> Hello {
        Hello { status, ..Hello::default() }
    }
}

/// A random 24-bit packet sequence number (as perftest picks them).
fn psn() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most 4 bytes into `b`.
    unsafe { libc::getrandom(b.as_mut_ptr().cast(), 4, 0) };
    u32::from_le_bytes(b) & 0xff_ffff
}

/// One side's resources before the peer's hello arrives.
struct Side {
    dev: Arc<Device>,
    tx_qp: Qp,
    credit_slots: Mr,
    rx_qp: Qp,
    ring: Mr,
}

impl Side {
    fn new(dev: &Arc<Device>, ring_bytes: usize) -> std::io::Result<Side> {
        let entries = SEND_WR + CREDIT_RECV_WR;
        let tx_cq = Arc::new(Cq::new(dev, entries)?);
        let tx_qp = Qp::new(
            dev,
            tx_cq,
            QpSizes { send_wr: SEND_WR, recv_wr: CREDIT_RECV_WR, inline_bytes: INLINE_BYTES },
            psn(),
        )?;
        let credit_slots = Mr::new(dev, CREDIT_RECV_WR as usize * CREDIT_BYTES, false)?;
        ring::post_credit_recvs(&tx_qp, &credit_slots)?;
        let rx_cq = Arc::new(Cq::new(dev, SEND_WR + DATA_RECV_WR)?);
        let rx_qp = Qp::new(
            dev,
            rx_cq,
            QpSizes { send_wr: SEND_WR, recv_wr: DATA_RECV_WR, inline_bytes: CREDIT_BYTES as u32 },
            psn(),
        )?;
        if rx_qp.max_inline < CREDIT_BYTES as u32 {
            return Err(std::io::Error::other("device offers no inline data for credit messages"));
        }
        let ring = Mr::new(dev, ring_bytes, true)?;
        ring::post_data_recvs(&rx_qp)?;
        Ok(Side { dev: dev.clone(), tx_qp, credit_slots, rx_qp, ring })
    }

    fn hello(&self, flags: u32) -> Hello {
        Hello {
            flags,
            status: STATUS_OK,
            mtu: self.dev.active_mtu,
            gid: self.dev.gid,
            tx_qpn: self.tx_qp.qpn(),
            tx_psn: self.tx_qp.psn,
            rx_qpn: self.rx_qp.qpn(),
            rx_psn: self.rx_qp.psn,
            ring_addr: self.ring.addr(),
            ring_rkey: self.ring.rkey(),
            ring_bytes: self.ring.len() as u64,
        }
    }

    /// Connects both QPs to the peer's and allocates staging for its ring.
    fn finish(
        self,
        peer: &Hello,
        sock: TcpStream,
        peer_name: String,
        opts: &TransportOptions,
        slot: Option<listener::Slot>,
        polled: ring::Polled,
    ) -> Result<Halves, TransportError> {
        let verbs_err = |what: &'static str| io_err(what);
        // Our tx QP talks to the peer's rx QP, and the reverse.
        self.tx_qp
            .connect(&QpPeer { qpn: peer.rx_qpn, psn: peer.rx_psn, gid: peer.gid, mtu: peer.mtu })
            .map_err(verbs_err("rdma: connect send queue pair"))?;
        self.rx_qp
            .connect(&QpPeer { qpn: peer.tx_qpn, psn: peer.tx_psn, gid: peer.gid, mtu: peer.mtu })
            .map_err(verbs_err("rdma: connect receive queue pair"))?;
        let staging = Mr::new(&self.dev, peer.ring_bytes as usize, false).map_err(verbs_err("rdma: staging buffer"))?;
        let counters = Arc::new(ByteCounters::default());
        // Client side only (a listener's connections carry their slot): see `regcache`.
        let reg_cache = slot.is_none().then(|| regcache::RegCache::new(opts));
        let link = Arc::new(Link {
            reg_cache,
            sock: OwnedFd::from(sock),
            peer: peer_name.clone(),
            counters: counters.clone(),
            closed: AtomicBool::new(false),
            dev: self.dev.clone(),
            _slot: slot,
        });
        // A fatal event on either QP (the peer's NIC refused us, a retry ran out) closes this
        // connection at once; the halves then answer `Closed`.
        for qpn in [self.tx_qp.qpn(), self.rx_qp.qpn()] {
            let weak = Arc::downgrade(&link);
            self.dev.on_fatal(
                qpn,
                Arc::new(move || {
                    if let Some(l) = weak.upgrade() {
                        l.close();
                    }
                }),
            );
        }
        let remote = RemoteRing { addr: peer.ring_addr, rkey: peer.ring_rkey, bytes: peer.ring_bytes };
        let (tx, rx) =
            ring::halves(link, self.tx_qp, staging, self.credit_slots, remote, self.rx_qp, self.ring, opts, polled);
        Ok(Halves { tx, rx, counters, peer: peer_name })
    }
}

/// Both halves of one side, before they become a [`Connection`].
struct Halves {
    tx: RdmaTx,
    rx: RdmaRx,
    counters: Arc<ByteCounters>,
    peer: String,
}

impl Halves {
    fn into_connection(self) -> Connection {
        Connection {
            tx: Box::new(self.tx),
            rx: Box::new(self.rx),
            counters: self.counters,
            transport: "rdma",
            peer: self.peer,
        }
    }
}

fn read_hello(sock: &mut TcpStream) -> std::io::Result<Option<Hello>> {
    let mut b = [0u8; HELLO_BYTES];
    sock.read_exact(&mut b)?;
    Ok(Hello::decode(&b))
}

fn ring_bytes(opts: &TransportOptions) -> Result<usize, TransportError> {
    let page = 4096;
    if opts.rdma_ring_bytes < page || opts.rdma_ring_bytes as u64 > PEER_RING_BYTES_MAX {
        return Err(TransportError::Other(format!(
            "rdma ring of {} bytes: must be {page}..={PEER_RING_BYTES_MAX}",
            opts.rdma_ring_bytes
        )));
    }
    Ok(opts.rdma_ring_bytes.next_multiple_of(page))
}

fn open_device(name: Option<&str>, ip: IpAddr) -> Result<Arc<Device>, TransportError> {
    Device::open(name, ip).map_err(|e| TransportError::Other(e.to_string()))
}

/// Connects to `rdma://HOST:PORT`.
pub fn connect(addr: &str, opts: &TransportOptions) -> Result<Connection, TransportError> {
    Ok(connect_halves(addr, opts)?.into_connection())
}

fn connect_halves(addr: &str, opts: &TransportOptions) -> Result<Halves, TransportError> {
    let ring_bytes = ring_bytes(opts)?;
    let mut sock = TcpStream::connect(addr).map_err(io_err("rdma: connect to the rendezvous endpoint"))?;
    sock.set_nodelay(true).map_err(io_err("rdma: set TCP_NODELAY"))?;
    sock.set_read_timeout(Some(CLIENT_HANDSHAKE_TIMEOUT)).map_err(io_err("rdma: socket timeout"))?;
    let local = sock.local_addr().map_err(io_err("rdma: local address"))?;
    let dev = open_device(opts.rdma_device.as_deref(), local.ip())?;
    let side = Side::new(&dev, ring_bytes).map_err(io_err("rdma: create queue pairs and regions"))?;
    // A busy-poll client never parks its receiving half: it asks for the polled ring.
    let ask = if opts.wait == crate::WaitMode::BusyPoll { FLAG_POLLED_RING } else { 0 };
    sock.write_all(&side.hello(ask).encode()).map_err(io_err("rdma: send hello"))?;
    let peer = match read_hello(&mut sock) {
        Ok(Some(h)) => h,
        Ok(None) => return Err(TransportError::Other(format!("rdma://{addr}: not a djinn rdma endpoint"))),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(TransportError::Closed),
        Err(source) => return Err(TransportError::Io { what: "rdma: receive hello", source }),
    };
    match peer.status {
        STATUS_OK => {}
        STATUS_BUSY => {
            return Err(TransportError::Other(format!(
                "rdma://{addr}: server busy (at its rdma_connections_max, or out of queue pairs or registered memory); retry later"
            )))
        }
        _ => return Err(TransportError::Other(format!("rdma://{addr}: server refused our ring size"))),
    }
    if peer.ring_bytes < 4096 || peer.ring_bytes > PEER_RING_BYTES_MAX {
        return Err(TransportError::Other(format!(
            "rdma://{addr}: server announced a ring of {} bytes",
            peer.ring_bytes
        )));
    }
    // A server that predates the polled ring answers without the flag: immediates both ways.
    let polled = ring::Polled { tx: false, rx: ask & peer.flags & FLAG_POLLED_RING != 0 };
    let halves = side.finish(
        &peer,
        sock.try_clone().map_err(io_err("rdma: socket"))?,
        format!("rdma://{addr}"),
        opts,
        None,
        polled,
    )?;
    // Our receives are posted and our QPs are in RTS: the server may send.
    sock.write_all(&[1]).map_err(io_err("rdma: send ready"))?;
    tracing::debug!(addr, device = %dev.name, ring_bytes, polled_ring = polled.rx, "rdma connected");
    Ok(halves)
}

/// A client that performs the rendezvous and then writes raw bytes into the server's ring, with
/// no framing on top: it plays a misbehaving peer in tests (garbage headers, a frame cut short).
/// Nothing here is needed to use the transport.
pub struct RawClient {
    tx: RdmaTx,
    rx: RdmaRx,
}

impl RawClient {
    /// Connects to `rdma://HOST:PORT` with a ring of `ring_bytes` (the server refuses more than its own).
    pub fn connect(addr: &str, ring_bytes: usize) -> Result<RawClient, TransportError> {
        let opts = TransportOptions { rdma_ring_bytes: ring_bytes, ..TransportOptions::default() };
        let h = connect_halves(addr, &opts)?;
        Ok(RawClient { tx: h.tx, rx: h.rx })
    }

    /// Writes outside what the server granted (see [`OutOfBounds`]); `Ok(true)`: the server's NIC
    /// refused the write (this connection is then dead, as the server's side of it).
    pub fn write_out_of_bounds(&mut self, at: OutOfBounds) -> Result<bool, TransportError> {
        self.tx.write_out_of_bounds(at).map_err(|e| e.into_transport("raw client"))
    }

    /// Sends a frame of `data_len` bytes of zeros (moved by a direct grant when large), reads
    /// the reply, then writes through that grant's key again ([`OutOfBounds::StaleGrant`]);
    /// `Ok(true)`: refused.
    pub fn stale_grant(&mut self, header: &[u8], data_len: usize) -> Result<bool, TransportError> {
        let err = |e: ring::RingError| e.into_transport("raw client");
        self.tx.write_raw(header)?;
        let data = vec![0u8; data_len];
        self.tx.send_granted(&[&data], data_len as u64).map_err(err)?;
        let head = crate::FrameRx::recv_head(&mut self.rx)?;
        let mut reply = vec![0u8; head.header.data_len.get() as usize];
        crate::FrameRx::recv_data(&mut self.rx, &mut reply)?;
        self.tx.write_out_of_bounds(OutOfBounds::StaleGrant).map_err(err)
    }

    /// The receiving half, to read the server's replies as a normal client would.
    pub fn rx(&mut self) -> &mut dyn crate::FrameRx {
        &mut self.rx
    }
}

impl Write for RawClient {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.tx.write_raw(bytes).map_err(std::io::Error::other)?;
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
