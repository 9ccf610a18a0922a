//! What the transport benchmarks share: a client connection paired with a server thread that
//! answers it, one timed request/reply, and histogram helpers. Each bench names its transport's
//! listener and connect, and its own server loop.

use std::thread;
use std::time::{Duration, Instant};

use djinn_proto::FrameHeader;
use djinn_transport::{Connection, Listener, OutFrame};
use hdrhistogram::Histogram;

/// A client connection and the thread serving its peer.
pub struct Pair {
    client: Option<Connection>,
    server: Option<thread::JoinHandle<()>>,
}

impl Pair {
    /// Serves the first connection `listener` accepts with `serve` on a thread, and connects to it
    /// with `connect` (the rendezvous may need the accepting side running).
    pub fn new(
        mut listener: impl Listener + 'static,
        serve: fn(Connection),
        connect: impl FnOnce(&str) -> Connection,
    ) -> Pair {
        let url = listener.url();
        let server = thread::spawn(move || serve(listener.accept().expect("accept")));
        Pair { client: Some(connect(&url)), server: Some(server) }
    }

    /// One request carrying `src` and its reply received into `dst`; returns the elapsed time.
    pub fn round_trip(&mut self, op: u16, id: u64, src: &[u8], dst: &mut [u8]) -> Duration {
        let c = self.client.as_mut().expect("open until drop");
        let t0 = Instant::now();
        let header = FrameHeader::new(op, 0, id, 0, src.len() as u64);
        c.tx.send(&OutFrame { header, meta: &[], data: &[src] }).expect("send");
        let head = c.rx.recv_head().expect("recv_head");
        let len = head.header.data_len.get() as usize;
        c.rx.recv_data(&mut dst[..len]).expect("recv_data");
        t0.elapsed()
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        // Dropping the client's halves closes the connection; the server thread then returns.
        drop(self.client.take());
        if let Some(t) = self.server.take() {
            t.join().unwrap();
        }
    }
}

/// Quantile `q` of `h` (nanoseconds) in microseconds.
pub fn us(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1e3
}
