//! The thin client of djinn-dataplane: connect by URL (`tcp://HOST:PORT`, `shm://NAME`), the
//! handshake, blocking calls, pipelined submission, and the bytes the connection has moved.
//!
//! One [`Client`] is one connection, used from one thread. Pipelining: [`Client::submit`] sends a
//! request and returns its id at once; [`Client::wait`] returns the reply of one id, keeping
//! replies to other ids that arrive first (at most `replies_buffered_max` of them, after which
//! waiting is an error rather than growth). Blocking calls are submit + wait.
//!
//! Sessions ([`session`]): a decode's reply is a stream of `SessionToken` frames with its request
//! id before its final frame; [`Client::decode`] hands them to a callback, [`Client::stream_next`]
//! returns them one at a time ([`stream`]), and plain waits skip them.
//!
//! Errors carry the server's status code and message ([`ClientError::Server`]).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use djinn_proto::msg::{
    ErrorReply, ExecReply, ExecReq, Handle, HelloReply, HelloReq, StatsReply, TensorFreeReq, TensorGetReq,
    TensorPutReply, TensorPutReq,
};
use djinn_proto::{FrameHeader, Meta, MetaError, Opcode, Status, TensorDesc, VERSION};
use djinn_transport::{ByteCounters, FrameRx, FrameTx, OutFrame, RegBuf, TransportError, TransportOptions};

pub mod ping;
pub mod session;
pub mod stream;

pub use session::{
    DecodeOptions, DecodeSummary, Feed, FinishReason, Input, LogitsRequest, OpenOptions, PrefillReply, Qos, SessionId,
    SessionInfo, TokenEvent,
};
pub use stream::{DecodeStream, StreamEvent};

/// Environment variable holding a token when no token file is given.
pub const TOKEN_ENV: &str = "DJINN_TOKEN";

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {url}: {source}{}", connect_hint(url, source))]
    Connect { url: String, source: TransportError },
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// The server answered with a failure status (its message says why; the status names the kind).
    #[error("{message} (server status {status:?} to {opcode})")]
    Server { opcode: &'static str, status: Status, message: String },
    #[error("bad reply to {opcode}: {why}")]
    Protocol { opcode: &'static str, why: String },
    #[error("reading token file {path}: {source}")]
    Token { path: PathBuf, source: std::io::Error },
    #[error("{0} replies are buffered unclaimed (replies_buffered_max); claim them with wait()")]
    TooManyBuffered(usize),
    #[error("request {0} was never submitted on this connection or was already claimed")]
    UnknownRequest(u64),
}

/// What to do when nothing answers at `url`.
fn connect_hint(url: &str, e: &TransportError) -> String {
    use std::io::ErrorKind::{ConnectionRefused, NotFound};
    match e {
        TransportError::Io { source, .. } if matches!(source.kind(), ConnectionRefused | NotFound) => {
            format!("; start a server there (`djinn-dataplane serve --listen {url}`) or fix the URL")
        }
        _ => String::new(),
    }
}

impl ClientError {
    /// The server's status code, when the server refused the request.
    pub fn status(&self) -> Option<Status> {
        match self {
            ClientError::Server { status, .. } => Some(*status),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// The token to present: the file's first line if a file is given, else `DJINN_TOKEN`, else none.
pub fn load_token(token_file: Option<&Path>) -> Result<Option<Vec<u8>>> {
    if let Some(p) = token_file {
        let text = std::fs::read_to_string(p).map_err(|source| ClientError::Token { path: p.to_owned(), source })?;
        return Ok(Some(text.lines().next().unwrap_or("").trim().as_bytes().to_vec()));
    }
    Ok(std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty()).map(String::into_bytes))
}

#[derive(Clone, Debug)]
pub struct ClientOptions {
    pub token: Option<Vec<u8>>,
    pub client_name: String,
    pub transport: TransportOptions,
    /// Replies that may wait unclaimed while the caller waits for another one.
    pub replies_buffered_max: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            token: None,
            client_name: format!("djinn-client/{}", env!("CARGO_PKG_VERSION")),
            // Plain sockets on tcp, as the server's default: small messages (a decode step's)
            // measured faster than on io_uring (README, "Defaults").
            transport: TransportOptions { force_socket: true, ..TransportOptions::default() },
            replies_buffered_max: 1024,
        }
    }
}

/// Where a reply's bulk data goes instead of a fresh vector.
enum Dest<'a> {
    /// Resized to fit.
    Vec(&'a mut Vec<u8>),
    /// The data must fit.
    Slice(&'a mut [u8]),
}

impl Dest<'_> {
    fn reborrow(&mut self) -> Dest<'_> {
        match self {
            Dest::Vec(v) => Dest::Vec(v),
            Dest::Slice(s) => Dest::Slice(s),
        }
    }
}

/// Fixed slots for the ids in flight before [`Pending`] spills into its set.
const PENDING_SLOTS: usize = 8;

/// The ids submitted and not yet claimed. The first [`PENDING_SLOTS`] in flight sit in fixed
/// slots, found by comparison, so a blocking call or a ping (one request in flight) does no
/// hashing on its round trip; more at once (pipelining) spill into a set. Request ids start at 1,
/// so 0 marks a free slot.
#[derive(Default)]
struct Pending {
    slots: [u64; PENDING_SLOTS],
    spill: HashSet<u64>,
    len: usize,
}

impl Pending {
    fn insert(&mut self, id: u64) {
        debug_assert!(id != 0 && !self.contains(id));
        match self.slots.iter_mut().find(|s| **s == 0) {
            Some(s) => *s = id,
            None => {
                self.spill.insert(id);
            }
        }
        self.len += 1;
    }

    fn contains(&self, id: u64) -> bool {
        id != 0 && (self.slots.contains(&id) || (!self.spill.is_empty() && self.spill.contains(&id)))
    }

    fn remove(&mut self, id: u64) {
        if id == 0 {
            return;
        }
        let found = match self.slots.iter_mut().find(|s| **s == id) {
            Some(s) => {
                *s = 0;
                true
            }
            None => !self.spill.is_empty() && self.spill.remove(&id),
        };
        if found {
            self.len -= 1;
        }
    }
}

/// A reply frame: header, metadata and bulk data, all owned.
#[derive(Debug)]
pub struct Reply {
    pub header: FrameHeader,
    pub meta: Vec<u8>,
    pub data: Vec<u8>,
}

/// One connection to a server.
pub struct Client {
    tx: Box<dyn FrameTx>,
    rx: Box<dyn FrameRx>,
    counters: Arc<ByteCounters>,
    transport: &'static str,
    url: String,
    hello: HelloReply,
    next_id: u64,
    pending: Pending,
    ready: HashMap<u64, Result<Reply>>,
    replies_buffered_max: usize,
}

fn opcode_name(raw: u16) -> &'static str {
    Opcode::try_from(raw).map(|o| o.name()).unwrap_or("unknown opcode")
}

impl Client {
    /// Connects with a token from `DJINN_TOKEN` (if set) and default options.
    pub fn connect(url: &str) -> Result<Client> {
        let opts = ClientOptions { token: load_token(None)?, ..Default::default() };
        Client::connect_with(url, &opts)
    }

    /// Connects and completes the handshake.
    pub fn connect_with(url: &str, opts: &ClientOptions) -> Result<Client> {
        let conn = djinn_transport::connect(url, &opts.transport)
            .map_err(|source| ClientError::Connect { url: url.to_owned(), source })?;
        let mut c = Client {
            tx: conn.tx,
            rx: conn.rx,
            counters: conn.counters,
            transport: conn.transport,
            url: url.to_owned(),
            hello: HelloReply {
                version: 0,
                tenant_id: 0,
                frame_bytes_max: 0,
                meta_bytes_max: 0,
                backend: String::new(),
                devices: Vec::new(),
                models: Vec::new(),
                transports: Vec::new(),
            },
            next_id: 1,
            pending: Pending::default(),
            ready: HashMap::new(),
            replies_buffered_max: opts.replies_buffered_max.max(1),
        };
        let req = HelloReq {
            version_min: 1,
            version_max: VERSION,
            token: opts.token.clone().unwrap_or_default(),
            client_name: opts.client_name.clone(),
        };
        let reply = c.call(Opcode::Hello, &req.to_meta(), &[])?;
        c.hello = decode(Opcode::Hello, &reply.meta)?;
        Ok(c)
    }

    /// The server's capabilities (backend, devices, models, transports, limits).
    pub fn capabilities(&self) -> &HelloReply {
        &self.hello
    }
    /// "tcp", "tcp-socket", "shm", ...
    pub fn transport(&self) -> &'static str {
        self.transport
    }
    pub fn url(&self) -> &str {
        &self.url
    }
    pub fn bytes_sent(&self) -> u64 {
        self.counters.sent()
    }
    pub fn bytes_received(&self) -> u64 {
        self.counters.received()
    }
    /// The live counters, readable from other threads.
    pub fn counters(&self) -> Arc<ByteCounters> {
        self.counters.clone()
    }
    /// The connection's cache of registered buffers (rdma; `None` on transports without one).
    pub fn registration_cache(&self) -> Option<djinn_transport::RegCacheStats> {
        self.tx.registration_cache()
    }
    /// Requests submitted and not yet claimed.
    pub fn pending(&self) -> usize {
        self.pending.len
    }

    // ---- pipelining -----------------------------------------------------------------------------

    /// Sends a request and returns its id without waiting for the reply.
    ///
    /// Flow control is end to end: the server answers in order and stops reading a connection
    /// whose replies are not being read. A single thread that submits more than the transport
    /// buffers can hold in unread replies (a few MiB on TCP, the ring on shm) before waiting
    /// blocks in `submit`; keep the window of outstanding bulk replies below that.
    pub fn submit(&mut self, opcode: Opcode, meta: &[u8], data: &[&[u8]]) -> Result<u64> {
        self.submit_raw(opcode.as_u16(), meta, data)
    }

    /// [`Client::submit`] with any opcode number (tests of unknown opcodes use this).
    pub fn submit_raw(&mut self, opcode: u16, meta: &[u8], data: &[&[u8]]) -> Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let data_len = data.iter().map(|d| d.len() as u64).sum();
        let meta_len = u32::try_from(meta.len())
            .map_err(|_| ClientError::Protocol { opcode: opcode_name(opcode), why: "metadata over 4 GiB".into() })?;
        let header = FrameHeader::new(opcode, 0, id, meta_len, data_len);
        self.tx.send(&OutFrame { header, meta, data })?;
        self.pending.insert(id);
        Ok(id)
    }

    /// Waits for the reply to `id`. A failure status becomes [`ClientError::Server`].
    pub fn wait(&mut self, id: u64) -> Result<Reply> {
        if let Some(r) = self.ready.remove(&id) {
            self.pending.remove(id);
            return r;
        }
        if !self.pending.contains(id) {
            return Err(ClientError::UnknownRequest(id));
        }
        self.await_reply(id, None)
    }

    /// Waits for whichever pending reply comes next (or one already buffered).
    pub fn wait_any(&mut self) -> Result<(u64, Result<Reply>)> {
        if let Some(&id) = self.ready.keys().next() {
            self.pending.remove(id);
            let r = self.ready.remove(&id).expect("key just seen");
            return Ok((id, r));
        }
        loop {
            let (rid, r) = self.recv_reply(None)?;
            if is_stream_frame(&r) {
                continue;
            }
            self.pending.remove(rid);
            return Ok((rid, r));
        }
    }

    /// Waits for the reply to `id` and moves its bulk data into `data` (resized to fit; its
    /// allocation is reused across calls, so repeated large replies cost no allocation). The
    /// returned reply's own `data` is empty.
    pub fn wait_into(&mut self, id: u64, data: &mut Vec<u8>) -> Result<Reply> {
        if self.ready.contains_key(&id) || !self.pending.contains(id) {
            let mut r = self.wait(id)?;
            *data = std::mem::take(&mut r.data);
            return Ok(r);
        }
        self.await_reply(id, Some(Dest::Vec(data)))
    }

    /// Receives replies until the one to `id` (pending, not yet buffered) arrives, buffering
    /// the others within `replies_buffered_max`. With `into`, `id`'s bulk data lands there.
    fn await_reply(&mut self, id: u64, mut into: Option<Dest<'_>>) -> Result<Reply> {
        loop {
            let (rid, r) = self.recv_reply(into.as_mut().map(|d| (id, d.reborrow())))?;
            // Request id 0 is an unsolicited error (connection refused, framing lost): it
            // concerns every request on the connection, so it answers the one being waited for.
            if is_stream_frame(&r) {
                // A decode's token frames are consumed by `Client::decode`; a plain wait on a
                // decode's id skips them and returns its final frame.
                continue;
            }
            if rid == id || rid == 0 {
                self.pending.remove(id);
                return r;
            }
            self.buffer_reply(rid, r)?;
        }
    }

    /// Keeps the reply to another pending request until it is claimed, within
    /// `replies_buffered_max`.
    fn buffer_reply(&mut self, rid: u64, r: Result<Reply>) -> Result<()> {
        if is_stream_frame(&r) {
            return Ok(());
        }
        if !self.pending.contains(rid) || self.ready.contains_key(&rid) {
            return Err(ClientError::Protocol {
                opcode: "reply",
                why: format!("reply to request {rid}, which is not pending"),
            });
        }
        if self.ready.len() >= self.replies_buffered_max {
            return Err(ClientError::TooManyBuffered(self.ready.len()));
        }
        self.ready.insert(rid, r);
        Ok(())
    }

    /// Receives one reply frame. The outer error is a transport failure; the inner one the
    /// server's verdict on that request. With `into = (id, buf)`, the data of `id`'s reply goes
    /// into `buf` instead of a fresh vector.
    fn recv_reply(&mut self, into: Option<(u64, Dest<'_>)>) -> Result<(u64, Result<Reply>)> {
        let head = self.rx.recv_head()?;
        let h = head.header;
        let n = usize::try_from(h.data_len.get())
            .map_err(|_| ClientError::Protocol { opcode: "reply", why: "data larger than memory".into() })?;
        let rid = h.request_id.get();
        let mut data = Vec::new();
        match into {
            Some((id, Dest::Vec(buf))) if id == rid => {
                if buf.len() < n {
                    buf.resize(n, 0);
                }
                buf.truncate(n);
                if n > 0 {
                    self.rx.recv_data(buf)?;
                }
            }
            Some((id, Dest::Slice(buf))) if id == rid => {
                if n > buf.len() {
                    self.rx.skip_data(n as u64)?;
                    return Err(ClientError::Protocol {
                        opcode: opcode_name(h.opcode.get()),
                        why: format!("reply of {n} bytes for a buffer of {}", buf.len()),
                    });
                }
                if n > 0 {
                    self.rx.recv_data(&mut buf[..n])?;
                }
            }
            _ => {
                data = vec![0u8; n];
                if n > 0 {
                    self.rx.recv_data(&mut data)?;
                }
            }
        }
        let op = opcode_name(h.opcode.get());
        if !h.is_reply() {
            return Err(ClientError::Protocol { opcode: op, why: "server sent a request frame".into() });
        }
        let status = Status::try_from(h.status.get()).unwrap_or(Status::Internal);
        if status != Status::Ok {
            let message = ErrorReply::decode_bytes(&head.meta).message;
            return Ok((rid, Err(ClientError::Server { opcode: op, status, message })));
        }
        Ok((rid, Ok(Reply { header: h, meta: head.meta, data })))
    }

    /// Submits and waits.
    pub fn call(&mut self, opcode: Opcode, meta: &[u8], data: &[&[u8]]) -> Result<Reply> {
        let id = self.submit(opcode, meta, data)?;
        self.wait(id)
    }

    // ---- calls ----------------------------------------------------------------------------------

    /// One echo round trip; returns the echoed bytes.
    pub fn ping(&mut self, payload: &[u8]) -> Result<Vec<u8>> {
        let r = self.call(Opcode::Ping, &[], &[payload])?;
        if r.data.len() != payload.len() {
            return Err(ClientError::Protocol {
                opcode: "Ping",
                why: format!("echoed {} bytes of {}", r.data.len(), payload.len()),
            });
        }
        Ok(r.data)
    }

    /// Uploads a tensor; `bytes` are sent straight from the caller's buffer.
    pub fn put(&mut self, desc: TensorDesc, bytes: &[u8]) -> Result<Handle> {
        let r = self.call(Opcode::TensorPut, &TensorPutReq { desc }.to_meta(), &[bytes])?;
        Ok(decode::<TensorPutReply>(Opcode::TensorPut, &r.meta)?.handle)
    }

    /// Uploads the first `desc.byte_len()` bytes of `buf`. The connection registers `buf` once
    /// (rdma: a bounded cache per connection, see `FrameTx::register_buffer`), so putting from the
    /// same buffer again registers nothing.
    pub fn put_from(&mut self, desc: TensorDesc, buf: &RegBuf) -> Result<Handle> {
        let n = usize::try_from(desc.byte_len()).unwrap_or(usize::MAX);
        if n > buf.len() {
            return Err(ClientError::Protocol {
                opcode: "TensorPut",
                why: format!("tensor of {n} bytes from a buffer of {}", buf.len()),
            });
        }
        self.tx.register_buffer(buf)?;
        self.put(desc, &buf[..n])
    }

    /// Downloads a tensor into `buf` (its bytes are `buf[..desc.byte_len()]`); returns its
    /// descriptor. As [`Client::put_from`], `buf` is registered once per connection: the server
    /// writes the tensor straight into it.
    pub fn get_into(&mut self, handle: Handle, buf: &mut RegBuf) -> Result<TensorDesc> {
        self.tx.register_buffer(buf)?;
        let id = self.submit(Opcode::TensorGet, &TensorGetReq { handle }.to_meta(), &[])?;
        let r = self.await_reply_checked(id, buf)?;
        let desc: TensorDesc = decode(Opcode::TensorGet, &r.meta)?;
        if desc.byte_len() != r.header.data_len.get() {
            return Err(ClientError::Protocol {
                opcode: "TensorGet",
                why: format!("descriptor says {} bytes, {} arrived", desc.byte_len(), r.header.data_len.get()),
            });
        }
        Ok(desc)
    }

    /// Waits for `id`'s reply with its data landing in `buf` (a reply already buffered is copied).
    fn await_reply_checked(&mut self, id: u64, buf: &mut [u8]) -> Result<Reply> {
        if self.ready.contains_key(&id) || !self.pending.contains(id) {
            let r = self.wait(id)?;
            let cap = buf.len();
            let dst = buf.get_mut(..r.data.len()).ok_or_else(|| ClientError::Protocol {
                opcode: "TensorGet",
                why: format!("reply of {} bytes for a buffer of {cap}", r.data.len()),
            })?;
            dst.copy_from_slice(&r.data);
            return Ok(r);
        }
        self.await_reply(id, Some(Dest::Slice(buf)))
    }

    /// Uploads f32 values of `shape`.
    pub fn put_f32(&mut self, shape: &[u64], values: &[f32]) -> Result<Handle> {
        let desc = TensorDesc::new(djinn_proto::DType::F32, shape)
            .map_err(|e| ClientError::Protocol { opcode: "TensorPut", why: e.to_string() })?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.put(desc, &bytes)
    }

    /// Downloads a tensor: its descriptor and bytes.
    pub fn get(&mut self, handle: Handle) -> Result<(TensorDesc, Vec<u8>)> {
        let r = self.call(Opcode::TensorGet, &TensorGetReq { handle }.to_meta(), &[])?;
        let desc: TensorDesc = decode(Opcode::TensorGet, &r.meta)?;
        if desc.byte_len() != r.data.len() as u64 {
            return Err(ClientError::Protocol {
                opcode: "TensorGet",
                why: format!("descriptor says {} bytes, {} arrived", desc.byte_len(), r.data.len()),
            });
        }
        Ok((desc, r.data))
    }

    /// Downloads an f32 tensor's values.
    pub fn get_f32(&mut self, handle: Handle) -> Result<(TensorDesc, Vec<f32>)> {
        let (d, bytes) = self.get(handle)?;
        if d.dtype() != djinn_proto::DType::F32 {
            return Err(ClientError::Protocol { opcode: "TensorGet", why: format!("tensor is {:?}, not f32", d) });
        }
        Ok((d, bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()))
    }

    pub fn free(&mut self, handles: &[Handle]) -> Result<()> {
        self.call(Opcode::TensorFree, &TensorFreeReq { handles: handles.to_vec() }.to_meta(), &[])?;
        Ok(())
    }

    /// Runs an op graph; returns one (handle, descriptor) per requested output.
    pub fn exec(&mut self, req: &ExecReq) -> Result<Vec<(Handle, TensorDesc)>> {
        let r = self.call(Opcode::Exec, &req.to_meta(), &[])?;
        Ok(decode::<ExecReply>(Opcode::Exec, &r.meta)?.outputs)
    }

    /// The server's named counters.
    pub fn stats(&mut self) -> Result<Vec<(String, u64)>> {
        let r = self.call(Opcode::Stats, &[], &[])?;
        Ok(decode::<StatsReply>(Opcode::Stats, &r.meta)?.counters)
    }
}

/// A `SessionToken` frame: one of many replies to a decode, not its final reply.
fn is_stream_frame(r: &Result<Reply>) -> bool {
    matches!(r, Ok(reply) if reply.header.opcode.get() == Opcode::SessionToken.as_u16())
}

fn decode<T: Meta>(op: Opcode, meta: &[u8]) -> Result<T> {
    T::from_meta(meta).map_err(|e: MetaError| ClientError::Protocol { opcode: op.name(), why: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::{Pending, PENDING_SLOTS};

    /// Ids in the fixed slots and in the spill are found, counted and removed alike; a freed
    /// slot is reused; 0 (unsolicited replies) and unknown ids are never pending.
    #[test]
    fn pending_slots_and_spill() {
        let mut p = Pending::default();
        let n = PENDING_SLOTS as u64 * 3;
        for id in 1..=n {
            p.insert(id);
        }
        assert_eq!(p.len, n as usize);
        assert_eq!(p.spill.len(), n as usize - PENDING_SLOTS);
        assert!((1..=n).all(|id| p.contains(id)));
        assert!(!p.contains(0) && !p.contains(n + 1));
        // Remove a slotted id and a spilled one; removing again or an unknown id changes nothing.
        p.remove(2);
        p.remove(n);
        p.remove(2);
        p.remove(n + 7);
        p.remove(0);
        assert_eq!(p.len, n as usize - 2);
        assert!(!p.contains(2) && !p.contains(n));
        // The freed slot takes the next id.
        p.insert(n + 1);
        assert!(p.slots.contains(&(n + 1)));
        for id in (1..=n + 1).filter(|&id| id != 2 && id != n) {
            p.remove(id);
        }
        assert_eq!(p.len, 0);
        assert!(p.spill.is_empty() && p.slots.iter().all(|&s| s == 0));
    }
}
