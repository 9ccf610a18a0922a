//! Raw peers for tests that write frames byte by byte as they like, with no client library in
//! between: over real TCP sockets and straight into the request slots of a real shm region.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use djinn_proto::{FrameHeader, HelloReq, Meta, Opcode, Status, FLAG_REPLY, HEADER_LEN};
use zerocopy::{FromBytes, IntoBytes};

use super::Transport;

/// How long a raw peer waits for a reply.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(15);

/// A peer that writes frames byte by byte as it likes, with no client library in between.
pub trait RawPeer {
    fn send(&mut self, h: &FrameHeader, meta: &[u8]);
    /// The next reply's header, or `None` when the server closed the connection.
    fn recv(&mut self) -> Option<FrameHeader>;
}

pub struct RawTcp {
    pub s: TcpStream,
}

impl RawTcp {
    pub fn connect(url: &str) -> RawTcp {
        let s = TcpStream::connect(url.strip_prefix("tcp://").unwrap()).unwrap();
        s.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
        s.set_nodelay(true).unwrap();
        RawTcp { s }
    }
}

impl RawPeer for RawTcp {
    fn send(&mut self, h: &FrameHeader, meta: &[u8]) {
        let mut b = h.as_bytes().to_vec();
        b.extend_from_slice(meta);
        self.s.write_all(&b).unwrap();
    }
    fn recv(&mut self) -> Option<FrameHeader> {
        let mut hb = [0u8; HEADER_LEN];
        match self.s.read_exact(&mut hb) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
            Err(e) => panic!("waiting for a reply: {e}"),
        }
        let h = FrameHeader::read_from_bytes(&hb).unwrap();
        let mut rest = vec![0u8; h.meta_len.get() as usize + h.data_len.get() as usize];
        self.s.read_exact(&mut rest).unwrap();
        Some(h)
    }
}

/// Raw shared memory: frames written straight into the request slots of the region.
pub struct RawShm {
    c: djinn_transport::shm::raw::RawClient,
    sent: u64,
    read: u64,
}

impl RawShm {
    pub fn connect(url: &str) -> RawShm {
        let c = djinn_transport::shm::raw::RawClient::connect(url.strip_prefix("shm://").unwrap()).unwrap();
        RawShm { c, sent: 0, read: 0 }
    }
    fn slot_bytes(&self) -> usize {
        djinn_transport::shm::region::SLOT_BYTES
    }
}

impl RawPeer for RawShm {
    fn send(&mut self, h: &FrameHeader, meta: &[u8]) {
        let req = self.c.requests();
        let slot_count = self.c.layout().slot_count as u64;
        let slot = req.slots + (self.sent % slot_count) as usize * self.slot_bytes();
        assert!(HEADER_LEN + meta.len() <= self.slot_bytes(), "raw shm frames carry inline metadata only");
        self.c.write(slot, h.as_bytes());
        self.c.write(slot + HEADER_LEN, meta);
        self.sent += 1;
        self.c.store_u64(req.tail_slots, self.sent);
        self.c.ring_server_rx();
    }
    fn recv(&mut self) -> Option<FrameHeader> {
        let rep = self.c.replies();
        let slot_count = self.c.layout().slot_count as u64;
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            if self.c.load_u64(rep.tail_slots) > self.read {
                let slot = rep.slots + (self.read % slot_count) as usize * self.slot_bytes();
                let h = FrameHeader::read_from_bytes(&self.c.read(slot, HEADER_LEN)).unwrap();
                self.read += 1;
                // Hand the slot back (bulk data of replies is not consumed: the tests below only
                // read header-only or inline replies, or stop reading after this one).
                self.c.store_u64(rep.head_slots, self.read);
                self.c.ring_server_tx();
                return Some(h);
            }
            if self.c.read(rep.tx_closed, 4) != [0, 0, 0, 0] {
                return None;
            }
            assert!(Instant::now() < deadline, "no reply over shm within {REPLY_TIMEOUT:?}");
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// Raw RDMA: bytes placed in the server's ring by one-sided writes, replies read by the
/// transport's own receiving half.
#[cfg(feature = "rdma")]
pub struct RawRdma {
    c: djinn_transport::rdma::RawClient,
}

#[cfg(feature = "rdma")]
impl RawPeer for RawRdma {
    fn send(&mut self, h: &FrameHeader, meta: &[u8]) {
        let mut b = h.as_bytes().to_vec();
        b.extend_from_slice(meta);
        self.c.write_all(&b).unwrap();
    }
    fn recv(&mut self) -> Option<FrameHeader> {
        let head = self.c.rx().recv_head().ok()?;
        self.c.rx().skip_data(head.header.data_len.get()).ok()?;
        Some(head.header)
    }
}

pub fn raw(t: Transport, url: &str) -> Box<dyn RawPeer> {
    match t {
        Transport::Tcp => Box::new(RawTcp::connect(url)),
        Transport::Shm => Box::new(RawShm::connect(url)),
        #[cfg(feature = "rdma")]
        Transport::Rdma => Box::new(RawRdma {
            c: djinn_transport::rdma::RawClient::connect(url.strip_prefix("rdma://").unwrap(), 64 * 1024).unwrap(),
        }),
        #[cfg(not(feature = "rdma"))]
        Transport::Rdma => unreachable!("rdma trials are ignored in builds without the feature"),
    }
}

pub fn header(op: u16, rid: u64, meta_len: usize, data_len: u64) -> FrameHeader {
    FrameHeader::new(op, 0, rid, meta_len as u32, data_len)
}

pub fn hello(p: &mut dyn RawPeer) {
    let m = HelloReq { version_min: 1, version_max: 1, token: vec![], client_name: "raw".into() }.to_meta();
    p.send(&header(Opcode::Hello.as_u16(), 1, m.len(), 0), &m);
    let r = p.recv().expect("hello reply");
    assert_eq!(r.status.get(), 0, "hello refused");
}

pub fn expect_status(p: &mut dyn RawPeer, rid: u64, want: Status, what: &str) {
    let r = p.recv().unwrap_or_else(|| panic!("{what}: connection closed instead of a {want:?} reply"));
    assert!(r.flags.get() & FLAG_REPLY != 0, "{what}: not a reply");
    assert_eq!(Status::try_from(r.status.get()), Ok(want), "{what}");
    assert_eq!(r.request_id.get(), rid, "{what}: request id");
}
