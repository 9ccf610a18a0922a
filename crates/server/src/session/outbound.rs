//! A connection's outbound queue of session frames, and the writer thread that drains it.
//!
//! The engine loop never waits on a connection: when the connection's queue is empty and its
//! sending half is free it sends a session frame (token, reply) itself with a non-blocking send
//! ([`djinn_transport::FrameTx::try_send`]; a tcp token then costs one `sendmsg` and no thread
//! wake-up); otherwise it copies the frame into this queue and the connection's own writer
//! thread sends it, so a client that stops reading blocks only its writer.
//!
//! Invariants:
//! - The queue is bounded. Two backpressure marks: `frames_max` frames queued, or `bytes_max`
//!   bytes its client has not read — counted where they wait: this queue, the frame the writer is
//!   sending, and what the transport still holds unread ([`djinn_transport::FrameTx::unread_probe`]:
//!   the shm ring's fill, the tcp send queue). While a connection is past either mark its sessions
//!   are not stepped ([`Outbound::is_full`]); the byte mark is what stops a client that asks for
//!   full logits and stops reading, whose large frames fit in the transport's buffers so its
//!   frame count never rises. A step adds at most one
//!   token frame per decode and one final frame per job, and a connection has at most
//!   `max_inflight_per_conn` jobs, so the queue never holds more than `frames_max + 2 ×
//!   max_inflight_per_conn` frames; a push past that hard bound is refused (the caller closes
//!   the connection), never grown.
//! - Frame buffers are recycled (a spare list as long as the hard bound): at steady state a frame
//!   costs two copies of its bytes and no allocation. A frame whose bytes are already in staging
//!   chunks ([`Outbound::push_staged`]: a hidden-state read) is queued with them, not copied, and
//!   sent from them (over rdma: memory registered already); the chunks go back once it is sent
//!   or dropped. A pull link gets such a frame's bytes copied, as any frame's.
//! - Frames go out in order: a direct send happens only with the queue empty, no frame being
//!   sent and no tail of one pending (a direct send the transport took only part of leaves the
//!   rest to the writer, which sends it before any queued frame).
//! - The writer thread is started on the first queued frame (a connection whose client keeps up
//!   may never need one) and ends when the connection closes or a send fails; it holds the
//!   connection's `ReplyTx` only while sending one frame.
//! - A pull link (the HTTP front, [`crate::openai`]) has no writer thread: a push calls its
//!   waker and the front takes frames with [`Outbound::pop`] from its own event loop, with the
//!   same bounds, pause and stall rules.
//! - `djinn_conn_outbound_frames` counts the frames queued over all connections.
//! - A third mark is time: a connection holding at least [`UNREAD_PAUSE_BYTES_MIN`] unread
//!   bytes whose transport-held bytes have not fallen (its client read nothing) for
//!   `unread_pause` pauses too, so a client that stops reading stops costing engine work within
//!   that time, not only once megabytes of large frames piled up. (Over tcp the client's kernel
//!   taking bytes into its receive buffer also makes them fall, and restarts that time.) Each
//!   time a connection goes past a mark counts once in `djinn_conn_backpressure_total{mark}`.
//! - Nothing wakes the engine when a client reads from the transport, so while a connection is
//!   past the byte or time mark its [`Outbound::stall_deadline`] asks the loop to look again
//!   within [`BYTES_POLL`].

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use djinn_proto::{FrameHeader, HEADER_LEN};
use djinn_transport::{OutFrame, TrySend, UnreadProbe};
use prometheus::{IntCounter, IntCounterVec, IntGauge};

use super::ConnLink;
use crate::staging::Staged;

/// Bounds of every connection's queue, fixed at start-up.
#[derive(Clone)]
pub struct OutboundLimits {
    /// Frames at which the connection's sessions pause (`conn_outbound_frames_max`).
    pub frames_max: usize,
    /// Unread bytes at which the connection's sessions pause (`conn_outbound_bytes_max`).
    pub bytes_max: u64,
    /// Frames the queue holds at most (`frames_max` plus the answers of every in-flight job).
    pub frames_cap: usize,
    /// A full queue that sends nothing this long closes the connection (`conn_stall_timeout_ms`).
    pub stall: Duration,
    /// At least [`UNREAD_PAUSE_BYTES_MIN`] unread bytes, none read for this long: the sessions
    /// pause (`conn_unread_pause_ms`; zero: never by time).
    pub unread_pause: Duration,
    /// Frames queued over all connections (`djinn_conn_outbound_frames`).
    pub gauge: IntGauge,
    /// Times a connection went past each mark (`djinn_conn_backpressure_total`), indexed by
    /// [`Mark`].
    pub passed: [IntCounter; 3],
}

impl OutboundLimits {
    /// The per-mark counters of `djinn_conn_backpressure_total`, in [`Mark`] order.
    pub fn mark_counters(total: &IntCounterVec) -> [IntCounter; 3] {
        ["frames", "bytes", "unread"].map(|m| total.with_label_values(&[m]))
    }
}

/// How soon the engine looks again at a connection paused by the byte mark (its client's reads
/// are not signalled).
pub const BYTES_POLL: Duration = Duration::from_millis(2);

/// Unread bytes below which a client counts as keeping up (no pause by time): a few token
/// frames, or part of one full-logits frame.
pub const UNREAD_PAUSE_BYTES_MIN: u64 = 64 << 10;

/// Why a frame was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError {
    /// The hard bound was reached (the connection should be closed: its client is not reading).
    Full,
    /// The connection is closed or its writer could not start.
    Closed,
}

/// A backpressure mark; its value indexes [`OutboundLimits::passed`].
#[derive(Clone, Copy)]
enum Mark {
    Frames,
    Bytes,
    /// The client has not read for `unread_pause` while holding much unread.
    Unread,
}

/// One queued frame (a pull link reads it, then gives it back with [`Outbound::recycle`]).
pub struct Frame {
    pub header: FrameHeader,
    pub meta: Vec<u8>,
    pub data: Vec<u8>,
    /// The bulk data, when it is in staging chunks instead of `data` (never for a pull link).
    staged: Option<Staged>,
}

struct State {
    queue: VecDeque<Frame>,
    spare: Vec<Frame>,
    writer_started: bool,
    closed: bool,
    /// When the writer last sent a frame, the queue last became non-empty, or the client was
    /// last seen reading (its unread bytes fell).
    progress: Instant,
    /// A direct send left part of a frame in the transport ([`TrySend::Partly`]): the writer
    /// sends it before anything else, and no direct send is tried until it has.
    tail_pending: bool,
    /// Bytes of the frames in `queue`, and of the frame (or tail) the writer is sending.
    queued_bytes: u64,
    sending_bytes: u64,
    /// Unread bytes at the last look (a fall is progress).
    unread_last: u64,
    /// When the client was last seen keeping up: what the transport holds for it fell, or its
    /// unread bytes were below [`UNREAD_PAUSE_BYTES_MIN`].
    read_at: Instant,
    /// The transport's unread bytes at `held_at` (read at most once per [`BYTES_POLL`]: the
    /// engine asks several times a step, and on tcp each reading is a system call).
    held: u64,
    held_at: Option<Instant>,
    /// Whether the last look found the connection past a mark (a look that finds it past one
    /// after a look that did not counts that mark once).
    past: bool,
}

/// One connection's queue (see the module docs).
pub struct Outbound {
    st: Mutex<State>,
    cv: Condvar,
    limits: OutboundLimits,
    /// What the transport holds unread; `None`: only this queue counts.
    probe: Option<UnreadProbe>,
}

fn frame_bytes(f: &Frame) -> u64 {
    (HEADER_LEN + f.meta.len() + f.data.len() + f.staged.as_ref().map_or(0, Staged::len)) as u64
}

impl Outbound {
    pub fn new(limits: OutboundLimits, probe: Option<UnreadProbe>) -> Outbound {
        Outbound {
            st: Mutex::new(State {
                queue: VecDeque::new(),
                spare: Vec::new(),
                writer_started: false,
                closed: false,
                tail_pending: false,
                progress: Instant::now(),
                queued_bytes: 0,
                sending_bytes: 0,
                unread_last: 0,
                read_at: Instant::now(),
                held: 0,
                held_at: None,
                past: false,
            }),
            cv: Condvar::new(),
            limits,
            probe,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Frames queued now.
    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    /// Bytes the client has not read: queued, being sent, and held by the transport.
    pub fn unread_bytes(&self) -> u64 {
        self.unread(&mut self.lock())
    }

    fn unread(&self, st: &mut State) -> u64 {
        if let Some(p) = &self.probe {
            let now = Instant::now();
            if st.held_at.is_none_or(|t| now.duration_since(t) >= BYTES_POLL) {
                let held = p();
                // What the transport holds fell: the client read (a frame moving from the
                // queue into the transport is not a read).
                if held < st.held {
                    st.read_at = now;
                }
                st.held = held;
                st.held_at = Some(now);
            }
        }
        let n = st.queued_bytes + st.sending_bytes + st.held;
        if n < st.unread_last {
            st.progress = Instant::now();
        }
        if n < UNREAD_PAUSE_BYTES_MIN {
            st.read_at = Instant::now();
        }
        st.unread_last = n;
        n
    }

    /// Which mark the connection is past, if any.
    fn mark(&self, st: &mut State) -> Option<Mark> {
        let mark = if st.queue.len() >= self.limits.frames_max {
            Some(Mark::Frames)
        } else if self.unread(st) >= self.limits.bytes_max {
            Some(Mark::Bytes)
        } else if !self.limits.unread_pause.is_zero() && st.read_at.elapsed() >= self.limits.unread_pause {
            Some(Mark::Unread)
        } else {
            None
        };
        if let (Some(m), false) = (mark, st.past) {
            self.limits.passed[m as usize].inc();
        }
        st.past = mark.is_some();
        mark
    }

    /// Whether the connection's sessions must pause (a backpressure mark is reached).
    pub fn is_full(&self) -> bool {
        self.mark(&mut self.lock()).is_some()
    }

    /// The connection has been past a mark with no progress (nothing sent, nothing read) for
    /// longer than the stall timeout.
    pub fn stalled(&self, now: Instant) -> bool {
        let mut st = self.lock();
        self.mark(&mut st).is_some() && now.duration_since(st.progress) >= self.limits.stall
    }

    /// When the loop must look at this connection again without a wake-up: when a connection
    /// past a mark would count as stalled, or soon if it is past the byte mark (the client's
    /// reads from the transport wake nobody).
    pub fn stall_deadline(&self) -> Option<Instant> {
        let mut st = self.lock();
        let stall = st.progress + self.limits.stall;
        match self.mark(&mut st)? {
            Mark::Frames => Some(stall),
            Mark::Bytes | Mark::Unread => Some(stall.min(Instant::now() + BYTES_POLL)),
        }
    }

    /// Sends one frame of `link`, or copies it into its queue and starts its writer if needed.
    /// Never blocks on the peer: the frame is sent directly only when nothing of the connection
    /// waits before it and the transport takes it without waiting.
    pub(crate) fn push(
        link: &Arc<ConnLink>,
        header: FrameHeader,
        meta: &[u8],
        data: &[&[u8]],
    ) -> Result<(), PushError> {
        Self::push_then(link, header, meta, data, false)
    }

    /// [`Outbound::push`]; `more`: the caller pushes another frame of `link` right after (a
    /// decode's last token, then its final frame), so a direct send may hold this one back to
    /// go out with it ([`djinn_transport::FrameTx::try_send_more`]).
    pub(crate) fn push_then(
        link: &Arc<ConnLink>,
        header: FrameHeader,
        meta: &[u8],
        data: &[&[u8]],
        more: bool,
    ) -> Result<(), PushError> {
        let out = &link.out;
        let mut st = out.lock();
        if st.closed {
            return Err(PushError::Closed);
        }
        let (st_back, sent) = Self::try_direct(link, st, header, meta, data, more)?;
        st = st_back;
        if sent {
            return Ok(());
        }
        Self::queue(link, st, header, meta, |f| {
            for d in data {
                f.data.extend_from_slice(d);
            }
        })
    }

    /// As [`Outbound::push`], for a frame whose bulk data is `staged`: queued with the chunks
    /// (not copied) and sent from them; they go back when the frame is sent or dropped.
    pub(crate) fn push_staged(
        link: &Arc<ConnLink>,
        header: FrameHeader,
        meta: &[u8],
        staged: Staged,
    ) -> Result<(), PushError> {
        // One slice per chunk: a few pointers, not the bytes (on the stack).
        let segs: crate::staging::Segments<'_> = staged.chunks().collect();
        // A pull link reads `Frame::data`.
        if matches!(link.sink, super::Sink::Pull(_)) {
            return Self::push(link, header, meta, &segs);
        }
        let st = link.out.lock();
        if st.closed {
            return Err(PushError::Closed);
        }
        let (st, sent) = Self::try_direct(link, st, header, meta, &segs, false)?;
        drop(segs);
        if sent {
            return Ok(());
        }
        Self::queue(link, st, header, meta, |f| f.staged = Some(staged))
    }

    /// Queues a frame (its bulk data put in by `body`) and wakes whoever sends it.
    fn queue(
        link: &Arc<ConnLink>,
        mut st: MutexGuard<'_, State>,
        header: FrameHeader,
        meta: &[u8],
        body: impl FnOnce(&mut Frame),
    ) -> Result<(), PushError> {
        let out = &link.out;
        if st.queue.len() >= out.limits.frames_cap {
            return Err(PushError::Full);
        }
        let mut f =
            st.spare.pop().unwrap_or_else(|| Frame { header, meta: Vec::new(), data: Vec::new(), staged: None });
        f.header = header;
        f.meta.clear();
        f.meta.extend_from_slice(meta);
        f.data.clear();
        body(&mut f);
        if st.queue.is_empty() {
            st.progress = Instant::now();
        }
        st.queued_bytes += frame_bytes(&f);
        st.queue.push_back(f);
        out.limits.gauge.inc();
        if let super::Sink::Pull(wake) = &link.sink {
            drop(st);
            wake();
            return Ok(());
        }
        Self::wake_writer(link, st)
    }

    /// Starts the writer of `link` if needed and wakes it.
    fn wake_writer(link: &Arc<ConnLink>, mut st: MutexGuard<'_, State>) -> Result<(), PushError> {
        let out = &link.out;
        if !st.writer_started {
            st.writer_started = true;
            let l = link.clone();
            let spawned =
                std::thread::Builder::new().name(format!("djinn-write-{}", link.id)).spawn(move || writer(&l));
            if let Err(e) = spawned {
                tracing::warn!(conn = link.id, error = %e, "cannot start the connection's writer thread");
                out.gauge_sub(st.queue.len());
                st.queue.clear();
                st.queued_bytes = 0;
                st.closed = true;
                return Err(PushError::Closed);
            }
        }
        drop(st);
        out.cv.notify_one();
        Ok(())
    }

    /// Sends the frame on the caller's thread when the connection's writer has nothing queued,
    /// is not sending, and the transport's sending half is free: saves the writer a wake-up per
    /// frame. `true`: sent (wholly, or its tail handed to the writer). Never waits: a busy
    /// sending half or a transport without room leaves the frame for the queue.
    fn try_direct<'a>(
        link: &'a Arc<ConnLink>,
        mut st: MutexGuard<'a, State>,
        header: FrameHeader,
        meta: &[u8],
        data: &[&[u8]],
        more: bool,
    ) -> Result<(MutexGuard<'a, State>, bool), PushError> {
        let super::Sink::Writer(tx) = &link.sink else { return Ok((st, false)) };
        if !st.queue.is_empty() || st.sending_bytes > 0 || st.tail_pending {
            return Ok((st, false));
        }
        // Never wait for the half: the connection's reader may be sending a reply on it.
        let Ok(mut tx) = tx.try_lock() else { return Ok((st, false)) };
        let frame = OutFrame { header, meta, data };
        let r = if more { tx.try_send_more(&frame) } else { tx.try_send(&frame) };
        drop(tx);
        match r {
            Ok(TrySend::Sent) => {
                st.progress = Instant::now();
                Ok((st, true))
            }
            Ok(TrySend::WouldBlock) => Ok((st, false)),
            Ok(TrySend::Partly(rest)) => {
                st.progress = Instant::now();
                st.tail_pending = true;
                st.sending_bytes = rest as u64;
                Self::wake_writer(link, st)?;
                Ok((link.out.lock(), true))
            }
            Err(e) => {
                drop(st);
                send_failed(link, &e);
                Err(PushError::Closed)
            }
        }
    }

    /// The connection is gone: queued frames are dropped and the writer ends.
    pub fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        let n = st.queue.len();
        st.queue.clear();
        st.queued_bytes = 0;
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
        st.queued_bytes -= frame_bytes(&f);
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
/// A send on `link` failed (direct or by the writer): its queue is dropped, the connection
/// counts as closed and the loop looks at it again.
fn send_failed(link: &ConnLink, e: &djinn_transport::TransportError) {
    tracing::debug!(conn = link.id, error = %e, "session frame not delivered; closing");
    link.out.close();
    link.mark_closed();
    link.kick();
}

fn writer(link: &Arc<ConnLink>) {
    let out = &link.out;
    loop {
        let mut f = {
            let mut st = out.lock();
            loop {
                if st.closed {
                    return;
                }
                if st.tail_pending {
                    break None;
                }
                if let Some(f) = st.queue.pop_front() {
                    let n = frame_bytes(&f);
                    st.queued_bytes -= n;
                    st.sending_bytes = n;
                    break Some(f);
                }
                st = out.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            }
        };
        let super::Sink::Writer(tx) = &link.sink else { return };
        let r = match &f {
            Some(f) => {
                let one: [&[u8]; 1] = [&f.data];
                let chunks: crate::staging::Segments<'_>;
                let data: &[&[u8]] = match &f.staged {
                    Some(s) => {
                        chunks = s.chunks().collect();
                        &chunks
                    }
                    None if f.data.is_empty() => &[],
                    None => &one,
                };
                let frame = OutFrame { header: f.header, meta: &f.meta, data };
                tx.lock().unwrap_or_else(|p| p.into_inner()).send(&frame)
            }
            // What a direct send left in the transport.
            None => tx.lock().unwrap_or_else(|p| p.into_inner()).flush(),
        };
        // Sent (or failed): staged chunks go back before the frame's buffers are kept.
        if let Some(f) = f.as_mut() {
            f.staged = None;
        }
        let mut st = out.lock();
        st.sending_bytes = 0;
        match f {
            Some(f) => {
                out.gauge_sub(1);
                if st.spare.len() < out.limits.frames_cap {
                    st.spare.push(f);
                }
            }
            None => st.tail_pending = false,
        }
        if let Err(e) = r {
            drop(st);
            send_failed(link, &e);
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
