//! A connection's outbound queue of session frames, and the writer thread that drains it.
//!
//! The engine loop never sends on a connection: it copies each session frame (token, reply)
//! into this queue and the connection's own writer thread sends it, so a client that stops
//! reading blocks only its writer.
//!
//! Invariants:
//! - The queue is bounded. `frames_max` is the backpressure mark: while a connection holds that
//!   many frames its sessions are not stepped ([`Outbound::is_full`]). A step adds at most one
//!   token frame per decode and one final frame per job, and a connection has at most
//!   `max_inflight_per_conn` jobs, so the queue never holds more than `frames_max + 2 ×
//!   max_inflight_per_conn` frames; a push past that hard bound is refused (the caller closes
//!   the connection), never grown.
//! - Frame buffers are recycled (a spare list as long as the hard bound): at steady state a frame
//!   costs two copies of its bytes and no allocation.
//! - The writer thread is started on the first frame and ends when the connection closes or a
//!   send fails; it holds the connection's `ReplyTx` only while sending one frame.
//! - A pull link (the HTTP front, [`crate::openai`]) has no writer thread: a push calls its
//!   waker and the front takes frames with [`Outbound::pop`] from its own event loop, with the
//!   same bounds, pause and stall rules.
//! - `djinn_conn_outbound_frames` counts the frames queued over all connections.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use djinn_proto::FrameHeader;
use djinn_transport::OutFrame;
use prometheus::IntGauge;

use super::ConnLink;

/// Bounds of every connection's queue, fixed at start-up.
#[derive(Clone)]
pub struct OutboundLimits {
    /// Frames at which the connection's sessions pause (`conn_outbound_frames_max`).
    pub frames_max: usize,
    /// Frames the queue holds at most (`frames_max` plus the answers of every in-flight job).
    pub frames_cap: usize,
    /// A full queue that sends nothing this long closes the connection (`conn_stall_timeout_ms`).
    pub stall: Duration,
    /// Frames queued over all connections (`djinn_conn_outbound_frames`).
    pub gauge: IntGauge,
}

/// Why a frame was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError {
    /// The hard bound was reached (the connection should be closed: its client is not reading).
    Full,
    /// The connection is closed or its writer could not start.
    Closed,
}

/// One queued frame (a pull link reads it, then gives it back with [`Outbound::recycle`]).
pub struct Frame {
    pub header: FrameHeader,
    pub meta: Vec<u8>,
    pub data: Vec<u8>,
}

struct State {
    queue: VecDeque<Frame>,
    spare: Vec<Frame>,
    writer_started: bool,
    closed: bool,
    /// When the writer last sent a frame, or the queue last became non-empty.
    progress: Instant,
}

/// One connection's queue (see the module docs).
pub struct Outbound {
    st: Mutex<State>,
    cv: Condvar,
    limits: OutboundLimits,
}

impl Outbound {
    pub fn new(limits: OutboundLimits) -> Outbound {
        Outbound {
            st: Mutex::new(State {
                queue: VecDeque::new(),
                spare: Vec::new(),
                writer_started: false,
                closed: false,
                progress: Instant::now(),
            }),
            cv: Condvar::new(),
            limits,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Frames queued now.
    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    /// Whether the connection's sessions must pause (the backpressure mark is reached).
    pub fn is_full(&self) -> bool {
        self.lock().queue.len() >= self.limits.frames_max
    }

    /// The queue has been full with nothing sent for longer than the stall timeout.
    pub fn stalled(&self, now: Instant) -> bool {
        let st = self.lock();
        st.queue.len() >= self.limits.frames_max && now.duration_since(st.progress) >= self.limits.stall
    }

    /// When a full queue that sends nothing more will count as stalled.
    pub fn stall_deadline(&self) -> Option<Instant> {
        let st = self.lock();
        (st.queue.len() >= self.limits.frames_max).then(|| st.progress + self.limits.stall)
    }

    /// Copies one frame into the queue of `link` and starts its writer if needed. Never blocks
    /// on the peer.
    pub(crate) fn push(
        link: &Arc<ConnLink>,
        header: FrameHeader,
        meta: &[u8],
        data: &[&[u8]],
    ) -> Result<(), PushError> {
        let out = &link.out;
        let mut st = out.lock();
        if st.closed {
            return Err(PushError::Closed);
        }
        if st.queue.len() >= out.limits.frames_cap {
            return Err(PushError::Full);
        }
        let mut f = st.spare.pop().unwrap_or_else(|| Frame { header, meta: Vec::new(), data: Vec::new() });
        f.header = header;
        f.meta.clear();
        f.meta.extend_from_slice(meta);
        f.data.clear();
        for d in data {
            f.data.extend_from_slice(d);
        }
        if st.queue.is_empty() {
            st.progress = Instant::now();
        }
        st.queue.push_back(f);
        out.limits.gauge.inc();
        if let super::Sink::Pull(wake) = &link.sink {
            drop(st);
            wake();
            return Ok(());
        }
        if !st.writer_started {
            st.writer_started = true;
            let l = link.clone();
            let spawned =
                std::thread::Builder::new().name(format!("djinn-write-{}", link.id)).spawn(move || writer(&l));
            if let Err(e) = spawned {
                tracing::warn!(conn = link.id, error = %e, "cannot start the connection's writer thread");
                out.gauge_sub(st.queue.len());
                st.queue.clear();
                st.closed = true;
                return Err(PushError::Closed);
            }
        }
        drop(st);
        out.cv.notify_one();
        Ok(())
    }

    /// The connection is gone: queued frames are dropped and the writer ends.
    pub fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        let n = st.queue.len();
        st.queue.clear();
        self.gauge_sub(n);
        drop(st);
        self.cv.notify_all();
    }

    fn gauge_sub(&self, n: usize) {
        self.limits.gauge.sub(n as i64);
    }

    /// A pull link's next frame (the front sends it, then calls [`Outbound::recycle`]). Counts
    /// as progress: the stall clock restarts, and paused sessions resume below the mark.
    pub(crate) fn pop(link: &ConnLink) -> Option<Frame> {
        let out = &link.out;
        let mut st = out.lock();
        let f = st.queue.pop_front()?;
        out.gauge_sub(1);
        st.progress = Instant::now();
        let resumed = st.queue.len() + 1 == out.limits.frames_max;
        drop(st);
        if resumed {
            link.kick();
        }
        Some(f)
    }

    /// Gives a popped frame's buffers back for reuse.
    pub(crate) fn recycle(&self, f: Frame) {
        let mut st = self.lock();
        if st.spare.len() < self.limits.frames_cap {
            st.spare.push(f);
        }
    }
}

/// The writer thread of `link`: sends queued frames in order until the connection closes.
fn writer(link: &Arc<ConnLink>) {
    let out = &link.out;
    loop {
        let f = {
            let mut st = out.lock();
            loop {
                if st.closed {
                    return;
                }
                if let Some(f) = st.queue.pop_front() {
                    break f;
                }
                st = out.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        };
        let data: &[&[u8]] = &[&f.data];
        let frame = OutFrame { header: f.header, meta: &f.meta, data: if f.data.is_empty() { &[] } else { data } };
        let super::Sink::Writer(tx) = &link.sink else { return };
        let r = tx.lock().unwrap_or_else(|p| p.into_inner()).send(&frame);
        let mut st = out.lock();
        out.gauge_sub(1);
        if st.spare.len() < out.limits.frames_cap {
            st.spare.push(f);
        }
        if let Err(e) = r {
            tracing::debug!(conn = link.id, error = %e, "session frame not delivered; closing");
            drop(st);
            out.close();
            link.mark_closed();
            link.kick();
            return;
        }
        st.progress = Instant::now();
        // Just dropped below the mark: the connection's paused sessions may run again.
        let resumed = st.queue.len() + 1 == out.limits.frames_max;
        drop(st);
        if resumed {
            link.kick();
        }
    }
}
