//! The `/healthz` + `/metrics` HTTP endpoint: one thread, `poll(2)` over a bounded table of
//! connections (the oldest closed when a new one needs room), a deadline to send the request, a
//! bounded request head; idle or slow clients never cost a thread and cannot starve a probe.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
#[error("metrics endpoint on {addr}: {msg}")]
pub struct HttpError {
    pub addr: String,
    pub msg: String,
}

/// The running HTTP endpoint. Dropping it does not stop it; call [`HttpEndpoint::stop`].
///
/// One thread serves every HTTP connection with `poll(2)`: at most `conns_max` are held at once
/// (a new one beyond it closes the oldest), each must send its request within `request_timeout`,
/// and a request is at most [`HTTP_REQUEST_BYTES_MAX`] bytes. Idle or slow clients therefore
/// cost a bounded table entry, never a thread, and cannot make `/healthz` time out.
pub struct HttpEndpoint {
    stop: Arc<AtomicBool>,
    wake: std::net::UdpSocket,
    thread: Option<JoinHandle<()>>,
    pub addr: String,
}

/// Longest request head read (`GET /metrics HTTP/1.1` plus headers).
const HTTP_REQUEST_BYTES_MAX: usize = 4096;

/// What the endpoint answers and how much it holds.
pub struct HttpOptions {
    pub conns_max: usize,
    pub request_timeout: std::time::Duration,
}

struct HttpConn {
    stream: std::net::TcpStream,
    since: std::time::Instant,
    buf: Vec<u8>,
}

impl HttpEndpoint {
    /// Serves `/healthz` (200 while `healthy` is set, else 503) and `/metrics` on `addr`.
    pub fn start(addr: &str, metrics: Metrics, healthy: Arc<AtomicBool>, opts: HttpOptions) -> Result<Self, HttpError> {
        let err = |e: std::io::Error| HttpError { addr: addr.to_owned(), msg: e.to_string() };
        let listener = std::net::TcpListener::bind(addr).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        let bound = listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| addr.to_owned());
        // A loopback datagram socket wakes the poll loop on stop (std has no eventfd).
        let wake = std::net::UdpSocket::bind("127.0.0.1:0").map_err(err)?;
        let wake_rx = wake.try_clone().map_err(err)?;
        wake.connect(wake_rx.local_addr().map_err(err)?).map_err(err)?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::Builder::new()
            .name("djinn-http".into())
            .spawn(move || serve_http(&listener, &wake_rx, &st, &metrics, &healthy, &opts))
            .map_err(err)?;
        Ok(HttpEndpoint { stop, wake, thread: Some(thread), addr: bound })
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.send(&[1]);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_http(
    listener: &std::net::TcpListener,
    wake: &std::net::UdpSocket,
    stop: &AtomicBool,
    metrics: &Metrics,
    healthy: &AtomicBool,
    opts: &HttpOptions,
) {
    use std::os::fd::AsRawFd;
    let mut conns: std::collections::VecDeque<HttpConn> = std::collections::VecDeque::with_capacity(opts.conns_max);
    let mut fds: Vec<libc::pollfd> = Vec::with_capacity(opts.conns_max + 2);
    let timeout_ms = (opts.request_timeout.as_millis() as i32).clamp(1, 1000);
    while !stop.load(Ordering::Acquire) {
        fds.clear();
        for fd in [listener.as_raw_fd(), wake.as_raw_fd()].into_iter().chain(conns.iter().map(|c| c.stream.as_raw_fd()))
        {
            fds.push(libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
        }
        // SAFETY: `fds` is a live, exclusively borrowed array of `fds.len()` pollfd entries.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n < 0 {
            continue; // EINTR
        }
        // Requests first (their revents index the table as it was), then expiry, then accepts.
        let mut i = 0usize;
        let mut k = 2usize;
        while i < conns.len() {
            let ready = fds[k].revents != 0;
            k += 1;
            let done = if ready { read_request(&mut conns[i], metrics, healthy) } else { false };
            if done || conns[i].since.elapsed() > opts.request_timeout {
                conns.remove(i);
            } else {
                i += 1;
            }
        }
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    if conns.len() >= opts.conns_max {
                        conns.pop_front();
                    }
                    conns.push_back(HttpConn { stream, since: std::time::Instant::now(), buf: Vec::new() });
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!(error = %e, "metrics accept failed");
                    break;
                }
            }
        }
    }
}

/// Reads what arrived; once the request head is complete, answers it. Returns true when the
/// connection is finished (answered, closed by the peer, or over the size bound).
fn read_request(c: &mut HttpConn, metrics: &Metrics, healthy: &AtomicBool) -> bool {
    use std::io::{Read, Write};
    let mut chunk = [0u8; 1024];
    match c.stream.read(&mut chunk) {
        Ok(0) => return true,
        Ok(n) => c.buf.extend_from_slice(&chunk[..n]),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
        Err(_) => return true,
    }
    if !c.buf.windows(4).any(|w| w == b"\r\n\r\n") && !c.buf.windows(2).any(|w| w == b"\n\n") {
        return c.buf.len() > HTTP_REQUEST_BYTES_MAX;
    }
    let line = c.buf.split(|&b| b == b'\n').next().unwrap_or(&[]);
    let path = std::str::from_utf8(line).ok().and_then(|l| l.split_whitespace().nth(1)).unwrap_or("");
    let path = path.split('?').next().unwrap_or("");
    let (code, ctype, body) = match path {
        "/healthz" if healthy.load(Ordering::Acquire) => (200, "text/plain", "ok\n".to_owned()),
        "/healthz" => (503, "text/plain", "starting or draining\n".to_owned()),
        "/metrics" => (200, "text/plain; version=0.0.4; charset=utf-8", metrics.render()),
        _ => (404, "text/plain", "not found\n".to_owned()),
    };
    let reason = match code {
        200 => "OK",
        503 => "Service Unavailable",
        _ => "Not Found",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    // The answer is small: send it blocking, bounded by a write timeout, then close.
    let _ = c.stream.set_nonblocking(false);
    let _ = c.stream.set_write_timeout(Some(std::time::Duration::from_secs(1)));
    if let Err(e) = c.stream.write_all(head.as_bytes()).and_then(|()| c.stream.write_all(body.as_bytes())) {
        tracing::debug!(error = %e, "metrics client went away");
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: &str, path: &str) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn idle_clients_cannot_starve_healthz() {
        let healthy = Arc::new(AtomicBool::new(true));
        let opts = HttpOptions { conns_max: 8, request_timeout: std::time::Duration::from_secs(30) };
        let mut h = HttpEndpoint::start("127.0.0.1:0", Metrics::new("t"), healthy.clone(), opts).unwrap();
        let idle: Vec<std::net::TcpStream> = (0..100).map(|_| std::net::TcpStream::connect(&h.addr).unwrap()).collect();
        let t0 = std::time::Instant::now();
        assert!(get(&h.addr, "/healthz").starts_with("HTTP/1.1 200"));
        assert!(t0.elapsed() < std::time::Duration::from_secs(2), "healthz took {:?}", t0.elapsed());
        assert!(get(&h.addr, "/metrics").contains("djinn_connections_active"));
        healthy.store(false, Ordering::Release);
        assert!(get(&h.addr, "/healthz").starts_with("HTTP/1.1 503"));
        drop(idle);
        h.stop();
    }
}
