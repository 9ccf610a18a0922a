//! The OpenAI-compatible HTTP front (`--http-listen HOST:PORT`): `/v1/models`,
//! `/v1/completions`, `/v1/chat/completions` (JSON or server-sent events) and `/healthz`.
//!
//! No second inference path: each request becomes the session jobs a binary client would send
//! ([`conversation`]), queued on the engine loop like any other, and the engine answers it with
//! the same frames, through a bounded outbound queue per request ([`crate::session::ConnLink`] in
//! pull mode). This thread pulls those frames only while the client's socket takes the bytes:
//! a slow reader leaves frames in its own queue, which pauses only its own session (and past
//! `conn_stall_timeout_ms` the engine gives up on it), never the engine or other clients.
//!
//! Threads and bounds: one thread serves every HTTP connection with `poll(2)` over non-blocking
//! sockets (at most `http_api_conns_max`; a new one beyond it closes the oldest idle one, or
//! is answered 429 when none is idle); a request head is at most [`parse::HEAD_BYTES_MAX`], a
//! body at most `http_api_body_bytes_max`; requests in flight at most `http_api_requests_max`
//! server-wide and the tenant's `connections_max` per tenant (429 beyond); a connection must
//! send each request, and may stay idle between requests, for `http_api_timeout_ms`; bytes
//! waiting for a socket are bounded by [`OUT_BYTES_MAX`] plus one frame's worth, and the kernel holds at
//! most `http_api_sndbuf_bytes` (SO_SNDBUF) of them, so a client that stops reading pauses soon.
//!
//! Modules: [`parse`] (HTTP head, JSON bodies), [`routes`], [`conversation`] (a request on a
//! session), [`sse`] (answers and event streams), [`errors`] (OpenAI's error shape).

mod conversation;
mod errors;
mod parse;
mod routes;
mod sse;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use djinn_backend::Backend;

use crate::server::Shared;
use crate::session::outbound::Outbound;

pub use routes::ANONYMOUS_TENANT;

/// Output bytes a connection may have waiting for its socket before this thread stops taking
/// its frames (its session then pauses in the engine, by the outbound queue's bound). Small: the
/// socket's send buffer (`http_api_sndbuf_bytes`) is the reservoir that keeps a reader fed.
pub const OUT_BYTES_MAX: usize = 16 << 10;

#[derive(Debug, thiserror::Error)]
#[error("HTTP API on {addr}: {msg}")]
pub struct HttpApiError {
    pub addr: String,
    pub msg: String,
}

/// Wakes the front's thread: which connections have frames (or were closed by the engine).
struct Waker {
    fd: OwnedFd,
    ready: Mutex<Vec<u64>>,
}

impl Waker {
    fn ring(&self, key: u64) {
        let mut r = self.ready.lock().unwrap_or_else(|p| p.into_inner());
        let first = r.is_empty();
        if !r.contains(&key) {
            r.push(key);
        }
        drop(r);
        if first {
            self.poke();
        }
    }

    fn poke(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local buffer to an eventfd this struct owns.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), 8) };
    }

    fn take(&self, into: &mut Vec<u64>) {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live local buffer from the non-blocking eventfd.
        let _ = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
        std::mem::swap(&mut *self.ready.lock().unwrap_or_else(|p| p.into_inner()), into);
    }
}

/// The running HTTP front. Stop it with [`HttpApi::stop`].
pub struct HttpApi {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
    pub addr: String,
}

struct Conn {
    stream: TcpStream,
    gen: u32,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    /// Start of the current request, or of the idle time since the last answer.
    since: Instant,
    ex: Option<Box<conversation::Exchange>>,
    keep_alive: bool,
    /// Close once the output is written.
    close_after: bool,
    /// Close now.
    dead: bool,
    /// The answer is out and our side shut down: what the client still sends is read and dropped
    /// until it closes (or [`LINGER`]), so closing with its unread bytes does not reset the
    /// connection before it has read our answer (a 413 while it is still sending its body).
    lingering: bool,
}

/// Longest a connection lingers after its last answer.
const LINGER: Duration = Duration::from_secs(2);

impl HttpApi {
    pub fn start<B: Backend>(sh: Arc<Shared<B>>, addr: &str) -> Result<HttpApi, HttpApiError> {
        let err = |msg: String| HttpApiError { addr: addr.to_owned(), msg };
        for (k, v) in [
            ("http_api_conns_max", sh.cfg.http_api_conns_max as u64),
            ("http_api_requests_max", sh.cfg.http_api_requests_max as u64),
            ("http_api_body_bytes_max", sh.cfg.http_api_body_bytes_max as u64),
            ("http_api_timeout_ms", sh.cfg.http_api_timeout_ms),
        ] {
            if v == 0 {
                return Err(err(format!("{k} must be at least 1")));
            }
        }
        let listener = TcpListener::bind(addr).map_err(|e| err(e.to_string()))?;
        listener.set_nonblocking(true).map_err(|e| err(e.to_string()))?;
        let bound = listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| addr.to_owned());
        // SAFETY: eventfd takes no pointers; the returned descriptor is checked, then owned.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(err(format!("eventfd: {}", std::io::Error::last_os_error())));
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let cap = sh.cfg.http_api_conns_max;
        let waker = Arc::new(Waker { fd, ready: Mutex::new(Vec::with_capacity(cap)) });
        let stop = Arc::new(AtomicBool::new(false));
        let (st, wk) = (stop.clone(), waker.clone());
        let thread = std::thread::Builder::new()
            .name("djinn-http-api".into())
            .spawn(move || Front::new(sh, wk, cap).run(&listener, &st))
            .map_err(|e| err(e.to_string()))?;
        Ok(HttpApi { stop, waker, thread: Some(thread), addr: bound })
    }

    /// Stops serving: running requests end (their sessions stop at the next step), sockets close.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.waker.poke();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Front<B: Backend> {
    sh: Arc<Shared<B>>,
    waker: Arc<Waker>,
    conns: Vec<Option<Conn>>,
    gen: u32,
    seq: u64,
    started_s: u64,
    timeout: Duration,
}

impl<B: Backend> Front<B> {
    fn new(sh: Arc<Shared<B>>, waker: Arc<Waker>, cap: usize) -> Self {
        let started_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let timeout = Duration::from_millis(sh.cfg.http_api_timeout_ms);
        Front { sh, waker, conns: (0..cap).map(|_| None).collect(), gen: 0, seq: 0, started_s, timeout }
    }

    fn run(mut self, listener: &TcpListener, stop: &AtomicBool) {
        let cap = self.conns.len();
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(cap + 2);
        let mut slots: Vec<usize> = Vec::with_capacity(cap);
        let mut ready: Vec<u64> = Vec::with_capacity(cap);
        while !stop.load(Ordering::Acquire) {
            fds.clear();
            slots.clear();
            fds.push(libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 });
            fds.push(libc::pollfd { fd: self.waker.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 });
            for (i, c) in self.conns.iter().enumerate() {
                let Some(c) = c else { continue };
                let mut events = 0;
                if c.out_pos < c.out.len() {
                    events |= libc::POLLOUT;
                }
                if c.ex.is_some() {
                    // Only to learn that the client went away (a request is not read meanwhile).
                    events |= libc::POLLRDHUP;
                } else if !c.close_after || c.lingering {
                    events |= libc::POLLIN;
                }
                fds.push(libc::pollfd { fd: c.stream.as_raw_fd(), events, revents: 0 });
                slots.push(i);
            }
            // SAFETY: `fds` is a live, exclusively borrowed array of `fds.len()` pollfd entries.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 200) };
            if n < 0 {
                continue; // EINTR
            }
            if fds[1].revents != 0 {
                self.waker.take(&mut ready);
                for key in ready.drain(..) {
                    let slot = (key & 0xffff_ffff) as usize;
                    if self.conns.get(slot).and_then(|c| c.as_ref()).is_some_and(|c| u64::from(c.gen) == key >> 32) {
                        self.pump(slot);
                    }
                }
            }
            for (k, &i) in slots.iter().enumerate() {
                let rev = fds[k + 2].revents;
                if rev == 0 || self.conns[i].is_none() {
                    continue;
                }
                let busy = self.conns[i].as_ref().is_some_and(|c| c.ex.is_some());
                if busy && rev & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
                    self.close(i); // the client went away mid-request: its session stops
                    continue;
                }
                if rev & libc::POLLOUT != 0 {
                    if busy {
                        self.pump(i);
                    } else {
                        self.flush(i);
                    }
                }
                if rev & libc::POLLIN != 0 {
                    self.read(i);
                } else if rev & (libc::POLLHUP | libc::POLLERR) != 0 {
                    self.close(i);
                }
            }
            let now = Instant::now();
            for i in 0..cap {
                // Between requests `since` is when the last answer was queued: idle, or an answer
                // the client does not read, ends after the timeout.
                let expired = self.conns[i].as_ref().is_some_and(|c| {
                    let limit = if c.lingering { LINGER } else { self.timeout };
                    c.dead || (c.ex.is_none() && now.duration_since(c.since) > limit)
                });
                if expired {
                    self.close(i);
                }
            }
            self.accept(listener);
        }
        for i in 0..cap {
            self.close(i);
        }
    }

    fn accept(&mut self, listener: &TcpListener) {
        loop {
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    self.sh.refusals.warn(|suppressed| tracing::warn!(error = %e, suppressed, "HTTP accept failed"));
                    return;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let _ = stream.set_nodelay(true);
            set_sndbuf(&stream, self.sh.cfg.http_api_sndbuf_bytes);
            let slot = match self.conns.iter().position(|c| c.is_none()) {
                Some(s) => Some(s),
                None => {
                    // The oldest idle connection makes way; with none idle the newcomer gets a 429.
                    let idle = self
                        .conns
                        .iter()
                        .enumerate()
                        .filter_map(|(i, c)| {
                            c.as_ref().filter(|c| c.ex.is_none() && c.inbuf.is_empty()).map(|c| (i, c.since))
                        })
                        .min_by_key(|&(_, t)| t)
                        .map(|(i, _)| i);
                    if let Some(i) = idle {
                        self.close(i);
                    }
                    idle
                }
            };
            let Some(slot) = slot else {
                let e = errors::ApiError::busy("every HTTP connection slot is serving a request (http_api_conns_max)");
                let mut out = Vec::new();
                sse::answer(&mut out, e.http, "application/json", &e.body(), false);
                let _ = (&stream).write(&out);
                continue;
            };
            self.gen = self.gen.wrapping_add(1);
            self.conns[slot] = Some(Conn {
                stream,
                gen: self.gen,
                inbuf: Vec::new(),
                out: Vec::new(),
                out_pos: 0,
                since: Instant::now(),
                ex: None,
                keep_alive: true,
                close_after: false,
                dead: false,
                lingering: false,
            });
        }
    }

    /// Ends a connection; a request still running ends with it (its link closes: the decode
    /// stops at its next step, a temporary session is closed, a kept one starts its lease).
    fn close(&mut self, i: usize) {
        if let Some(c) = self.conns[i].take() {
            if let Some(ex) = c.ex {
                self.sh.sessions.connection_closed(&ex.link);
            }
        }
    }

    fn read(&mut self, i: usize) {
        let max = parse::HEAD_BYTES_MAX + self.sh.cfg.http_api_body_bytes_max;
        let Some(c) = self.conns[i].as_mut() else { return };
        let mut chunk = [0u8; 16 << 10];
        if c.lingering {
            loop {
                match c.stream.read(&mut chunk) {
                    Ok(0) => break c.dead = true,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break c.dead = true,
                }
            }
            return;
        }
        loop {
            match c.stream.read(&mut chunk) {
                Ok(0) => {
                    c.dead = true;
                    return;
                }
                Ok(n) => {
                    if c.inbuf.is_empty() {
                        c.since = Instant::now();
                    }
                    if c.inbuf.len() + n > max {
                        let e = errors::ApiError::new(413, "invalid_request_error", None, "request too large");
                        sse::answer(&mut c.out, e.http, "application/json", &e.body(), false);
                        c.close_after = true;
                        c.inbuf.clear();
                        break;
                    }
                    c.inbuf.extend_from_slice(&chunk[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    c.dead = true;
                    return;
                }
            }
        }
        self.serve_input(i);
    }

    /// Serves the complete requests in the connection's input, one at a time.
    fn serve_input(&mut self, i: usize) {
        let body_max = self.sh.cfg.http_api_body_bytes_max;
        loop {
            let Some(c) = self.conns[i].as_mut() else { return };
            if c.ex.is_some() || c.close_after || c.inbuf.is_empty() {
                break;
            }
            let head = match parse::head(&c.inbuf) {
                parse::HeadParse::Partial => break,
                parse::HeadParse::Bad(e) => {
                    sse::answer(&mut c.out, e.http, "application/json", &e.body(), false);
                    c.close_after = true;
                    break;
                }
                parse::HeadParse::Done(h) => h,
            };
            if head.content_length > body_max {
                let msg = format!("request body over {body_max} bytes (http_api_body_bytes_max)");
                let e = errors::ApiError::new(413, "invalid_request_error", None, msg);
                sse::answer(&mut c.out, e.http, "application/json", &e.body(), false);
                c.close_after = true;
                break;
            }
            let end = head.len + head.content_length;
            if c.inbuf.len() < end {
                break;
            }
            let body: Vec<u8> = c.inbuf[head.len..end].to_vec();
            c.inbuf.drain(..end);
            c.keep_alive = head.keep_alive;
            self.seq += 1;
            let running = self.conns.iter().filter(|c| c.as_ref().is_some_and(|c| c.ex.is_some())).count();
            let key = (u64::from(self.conns[i].as_ref().map_or(0, |c| c.gen)) << 32) | i as u64;
            let (sh, waker) = (self.sh.clone(), self.waker.clone());
            let mut new_link = || {
                let id = sh.next_conn_id.fetch_add(1, Ordering::Relaxed);
                let w = waker.clone();
                sh.sessions.link_pull(id, Arc::new(move || w.ring(key)), Arc::new(AtomicUsize::new(0)))
            };
            let ctx = routes::Ctx { started_s: self.started_s, new_link: &mut new_link, running, seq: self.seq };
            let Some(c) = self.conns[i].as_mut() else { return };
            let routed = routes::route(&self.sh, &head, &body, ctx, &mut c.out);
            if !head.keep_alive {
                c.close_after = true;
            }
            match routed {
                routes::Routed::Answered => {
                    c.since = Instant::now();
                    if !write_out(c) {
                        break;
                    }
                }
                routes::Routed::Started(ex) => {
                    c.ex = Some(ex);
                    self.pump(i);
                    return;
                }
            }
        }
        if let Some(c) = self.conns[i].as_mut() {
            write_out(c);
            if c.close_after && c.out_pos >= c.out.len() {
                linger(c);
            }
        }
    }

    /// Moves the engine's frames for connection `i` into its output while the socket keeps up
    /// (at most [`OUT_BYTES_MAX`] waiting), and writes them.
    fn pump(&mut self, i: usize) {
        loop {
            let Some(c) = self.conns[i].as_mut() else { return };
            let mut took = false;
            if let Some(ex) = c.ex.as_mut() {
                while c.out.len() - c.out_pos < OUT_BYTES_MAX && !ex.is_done() {
                    let Some(f) = Outbound::pop(&ex.link) else { break };
                    ex.on_frame(&self.sh.sessions, &f, &mut c.out, c.keep_alive);
                    ex.link.out.recycle(f);
                    took = true;
                }
                if ex.is_done() {
                    // Answered: its link closes (a temporary session is closed, a kept one's
                    // lease starts).
                    self.sh.sessions.connection_closed(&ex.link);
                    c.ex = None;
                    c.since = Instant::now();
                } else if !ex.link.is_alive() {
                    // The engine gave up on this client (its queue stayed full past the stall
                    // timeout).
                    c.dead = true;
                    return;
                }
            }
            if !write_out(c) || !took || c.ex.is_none() {
                break;
            }
        }
        self.settle(i);
    }

    /// Writes what it can; when the answer is out: close, or serve a pipelined request.
    fn flush(&mut self, i: usize) {
        if let Some(c) = self.conns[i].as_mut() {
            write_out(c);
        }
        self.settle(i);
    }

    fn settle(&mut self, i: usize) {
        let Some(c) = self.conns[i].as_mut() else { return };
        if c.ex.is_some() || c.out_pos < c.out.len() || c.dead {
            return;
        }
        if c.close_after {
            linger(c);
        } else if !c.inbuf.is_empty() {
            self.serve_input(i);
        }
    }
}

/// The last answer is out: shut our side (the client sees the end of the answer) and linger.
fn linger(c: &mut Conn) {
    if c.lingering {
        return;
    }
    c.inbuf.clear();
    c.lingering = true;
    c.since = Instant::now();
    if c.stream.shutdown(std::net::Shutdown::Write).is_err() {
        c.dead = true;
    }
}

/// Caps the socket's send buffer at `bytes` (0: leave the kernel's autotuning), so a client that
/// stops reading backs up into its own outbound queue after `bytes` and not megabytes.
fn set_sndbuf(stream: &TcpStream, bytes: usize) {
    if bytes == 0 {
        return;
    }
    // The kernel doubles the value for its bookkeeping; ask for half to hold about `bytes`.
    let v = libc::c_int::try_from(bytes / 2).unwrap_or(libc::c_int::MAX).max(1);
    // SAFETY: passes a pointer to a live local c_int and its size for a socket this stream owns.
    let _ = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// Writes the connection's output without blocking; returns whether all of it went out.
fn write_out(c: &mut Conn) -> bool {
    while c.out_pos < c.out.len() {
        match c.stream.write(&c.out[c.out_pos..]) {
            Ok(0) => {
                c.dead = true;
                return false;
            }
            Ok(n) => c.out_pos += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => {
                c.dead = true;
                return false;
            }
        }
    }
    c.out.clear();
    c.out_pos = 0;
    true
}
