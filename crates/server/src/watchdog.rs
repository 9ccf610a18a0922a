//! Connection deadlines: one thread closes connections that hold the server without using it —
//! no Hello within `handshake_timeout_ms` of accept, a frame's bulk data not arrived within
//! `frame_data_timeout_ms` of its header, no request and no work in flight for
//! `conn_idle_timeout_ms` — and, with busy-poll, tells idle connections to stop spinning.
//!
//! Invariants:
//! - Each connection publishes its phase and when it entered it in a [`ConnClock`] (two atomic
//!   stores per phase change, no lock); the watchdog thread sweeps every registered connection
//!   every `period` (a fraction of the shortest timeout): no per-connection timers, one lock
//!   taken per sweep and per accept/close. With nothing registered it sleeps until a
//!   registration wakes it.
//! - The registry is bounded by `capacity` (fixed at start-up); registering beyond it fails
//!   instead of growing.
//! - A passed deadline calls the connection's transport closer (`FrameTx::closer`) outside the
//!   registry's lock; the connection's own thread then sees its receive fail and ends as usual,
//!   releasing its slot. Closing twice, or after the connection ended, is harmless.
//! - Connections still in their handshake are bounded too (`handshakes_pending_max`): the accept
//!   path closes the oldest of them to make room ([`Watchdog::evict_oldest_handshake`]), so a
//!   flood of silent connections ages out faster than any real client's Hello.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use djinn_transport::ConnectionClose;

use crate::metrics::Metrics;

/// What a connection is doing, as its deadlines see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Accepted, no successful Hello yet (`handshake_timeout_ms` from accept).
    Handshake = 0,
    /// Said Hello, waiting for its next request (`conn_idle_timeout_ms` unless work is in flight).
    Waiting = 1,
    /// A request with bulk data is being served; the data must arrive (and the request end)
    /// within `frame_data_timeout_ms`.
    Serving = 2,
    /// A request without bulk data is being served (no deadline here: compute takes what it
    /// takes, and a stalled send is the sending side's deadline).
    Busy = 3,
}

/// A connection's phase and when it entered it; written by its reader, read by the sweep.
pub struct ConnClock {
    phase: AtomicU8,
    /// Milliseconds since the watchdog's epoch.
    since_ms: AtomicU64,
    epoch: Instant,
}

impl ConnClock {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Enters `phase` now. `Busy` has no deadline, so entering it reads no clock (a clock read
    /// costs microseconds where the clocksource is emulated, and a ping enters it every time).
    pub fn enter(&self, phase: Phase) {
        if phase != Phase::Busy {
            self.since_ms.store(self.now_ms(), Ordering::Relaxed);
        }
        self.phase.store(phase as u8, Ordering::Release);
    }

    /// Enters `phase` as of `at`: a time the caller read anyway (one read serves both).
    pub fn enter_at(&self, phase: Phase, at: Instant) {
        self.since_ms.store(at.saturating_duration_since(self.epoch).as_millis() as u64, Ordering::Relaxed);
        self.phase.store(phase as u8, Ordering::Release);
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Handshake,
            1 => Phase::Waiting,
            2 => Phase::Serving,
            _ => Phase::Busy,
        }
    }
}

/// The timeouts the sweep enforces.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub handshake: Duration,
    pub frame_data: Duration,
    pub idle: Duration,
    /// Busy-poll: how long a waiting connection with nothing in flight keeps spinning.
    pub busy_poll_linger: Option<Duration>,
}

impl Timeouts {
    /// How often the sweep runs: an eighth of the shortest timeout (so a deadline is late by at
    /// most that), or the busy-poll linger; 1 ms to 100 ms.
    fn period(&self) -> Duration {
        let shortest = self.handshake.min(self.frame_data).min(self.idle) / 8;
        let p = match self.busy_poll_linger {
            Some(l) => shortest.min(l),
            None => shortest,
        };
        p.clamp(Duration::from_millis(1), Duration::from_millis(100))
    }
}

/// What the watchdog knows of one connection.
pub struct Watched {
    pub clock: Arc<ConnClock>,
    pub close: ConnectionClose,
    /// Requests of the connection in progress (a streaming decode counts).
    pub inflight: Arc<AtomicUsize>,
    /// Busy-poll gate handed to the connection's receiving half: open while it may spin.
    pub spin: Arc<AtomicBool>,
}

/// The registry is full (more connections than it was sized for).
#[derive(Debug, thiserror::Error)]
#[error("connection registry full ({0} entries)")]
pub struct Full(pub usize);

/// Names one registered connection (for [`Watchdog::unregister`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot(usize);

struct Registry {
    entries: Vec<Option<(u64, Watched)>>,
    free: Vec<usize>,
    stopped: bool,
}

impl Registry {
    /// Connections registered.
    fn len(&self) -> usize {
        self.entries.len() - self.free.len()
    }
}

struct State {
    reg: Mutex<Registry>,
    wake: Condvar,
    timeouts: Timeouts,
    epoch: Instant,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Registry> {
        // Every mutation is one slot write; a poisoned registry is still consistent.
        self.reg.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The shared handle: register and unregister connections from any thread.
#[derive(Clone)]
pub struct Watchdog {
    state: Arc<State>,
}

/// Owns the watchdog thread; dropping it stops and joins the thread.
pub struct WatchdogThread {
    state: Arc<State>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts the thread; `capacity` bounds the connections registered at once.
    pub fn start(timeouts: Timeouts, capacity: usize, metrics: Metrics) -> std::io::Result<(Watchdog, WatchdogThread)> {
        let state = Arc::new(State {
            reg: Mutex::new(Registry {
                entries: (0..capacity).map(|_| None).collect(),
                free: (0..capacity).rev().collect(),
                stopped: false,
            }),
            wake: Condvar::new(),
            timeouts,
            epoch: Instant::now(),
        });
        let st = state.clone();
        let thread = std::thread::Builder::new().name("djinn-watchdog".into()).spawn(move || run(&st, &metrics))?;
        Ok((Watchdog { state: state.clone() }, WatchdogThread { state, thread: Some(thread) }))
    }

    /// A clock in the handshake phase, started now.
    pub fn new_clock(&self) -> Arc<ConnClock> {
        let c = Arc::new(ConnClock { phase: AtomicU8::new(0), since_ms: AtomicU64::new(0), epoch: self.state.epoch });
        c.enter(Phase::Handshake);
        c
    }

    /// Registers connection `conn`; its deadlines run from now on.
    pub fn register(&self, conn: u64, w: Watched) -> Result<Slot, Full> {
        let mut reg = self.state.lock();
        let Some(i) = reg.free.pop() else {
            return Err(Full(reg.entries.len()));
        };
        reg.entries[i] = Some((conn, w));
        // The sweep sleeps untimed while nothing is registered.
        if reg.len() == 1 {
            self.state.wake.notify_one();
        }
        Ok(Slot(i))
    }

    pub fn unregister(&self, slot: Slot) {
        let mut reg = self.state.lock();
        if reg.entries[slot.0].take().is_some() {
            reg.free.push(slot.0);
        }
    }

    /// Connections registered right now.
    pub fn registered(&self) -> usize {
        self.state.lock().len()
    }

    /// With `max` or more connections still in their handshake, closes the one that has waited
    /// longest; returns whether it did.
    pub fn evict_oldest_handshake(&self, max: usize) -> bool {
        let reg = self.state.lock();
        let mut pending = 0usize;
        let mut oldest: Option<(u64, &Watched)> = None;
        for (_, w) in reg.entries.iter().flatten() {
            if w.clock.phase() == Phase::Handshake {
                pending += 1;
                let since = w.clock.since_ms.load(Ordering::Relaxed);
                if oldest.is_none_or(|(s, _)| since < s) {
                    oldest = Some((since, w));
                }
            }
        }
        match oldest {
            Some((_, w)) if pending >= max => {
                let close = w.close.clone();
                // Phase change first, so the next eviction picks another connection.
                w.clock.enter(Phase::Busy);
                drop(reg);
                close();
                true
            }
            _ => false,
        }
    }
}

/// Why a sweep closes a connection (metric label).
fn due(w: &Watched, t: &Timeouts, now_ms: u64) -> Option<&'static str> {
    let since = w.clock.since_ms.load(Ordering::Relaxed);
    let age = Duration::from_millis(now_ms.saturating_sub(since));
    match w.clock.phase() {
        Phase::Handshake => (age > t.handshake).then_some("handshake_timeout"),
        Phase::Serving => (age > t.frame_data).then_some("frame_data_timeout"),
        Phase::Busy => None,
        Phase::Waiting => {
            if w.inflight.load(Ordering::Acquire) > 0 {
                // Work in flight: the connection is not idle; its idle time starts afresh later.
                w.clock.since_ms.store(now_ms, Ordering::Relaxed);
                w.spin.store(true, Ordering::Relaxed);
                return None;
            }
            if t.busy_poll_linger.is_some_and(|l| age >= l) {
                w.spin.store(false, Ordering::Relaxed);
            }
            (age > t.idle).then_some("idle_timeout")
        }
    }
}

fn run(state: &State, metrics: &Metrics) {
    let period = state.timeouts.period();
    let mut closing: Vec<(u64, &'static str, ConnectionClose)> = Vec::new();
    let mut reg = state.lock();
    loop {
        if reg.stopped {
            return;
        }
        let now_ms = state.epoch.elapsed().as_millis() as u64;
        for (conn, w) in reg.entries.iter().flatten() {
            if let Some(why) = due(w, &state.timeouts, now_ms) {
                // Closed once: no deadline applies until the reader ends (or enters a phase).
                w.clock.enter(Phase::Busy);
                closing.push((*conn, why, w.close.clone()));
            }
        }
        if !closing.is_empty() {
            // Close outside the lock: a closer may take transport locks of its own.
            drop(reg);
            for (conn, why, close) in closing.drain(..) {
                tracing::debug!(conn, reason = why, "closing connection");
                metrics.errors_total.with_label_values(&[why]).inc();
                close();
            }
            reg = state.lock();
        }
        reg = if reg.len() == 0 {
            // No connection: nothing can fall due until one registers (which wakes this), so an
            // idle server does not wake every period (2 ms with busy-poll's linger).
            state.wake.wait(reg).unwrap_or_else(|p| p.into_inner())
        } else {
            state.wake.wait_timeout(reg, period).unwrap_or_else(|p| p.into_inner()).0
        };
    }
}

impl WatchdogThread {
    /// Stops the thread (nothing more is closed) and joins it.
    pub fn stop(&mut self) {
        self.state.lock().stopped = true;
        self.state.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for WatchdogThread {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watched(w: &Watchdog, n: &Arc<AtomicUsize>) -> Watched {
        let n = n.clone();
        Watched {
            clock: w.new_clock(),
            close: Arc::new(move || {
                n.fetch_add(1, Ordering::SeqCst);
            }),
            inflight: Arc::new(AtomicUsize::new(0)),
            spin: Arc::new(AtomicBool::new(true)),
        }
    }

    fn wait_for(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn timeouts(ms: u64) -> Timeouts {
        let d = Duration::from_millis(ms);
        Timeouts { handshake: d, frame_data: d, idle: d, busy_poll_linger: Some(Duration::from_millis(5)) }
    }

    #[test]
    fn each_phase_has_its_deadline_and_work_in_flight_is_not_idle() {
        let (w, _t) = Watchdog::start(timeouts(60), 8, Metrics::new("t")).unwrap();
        // The sweep is asleep (nothing registered); registering below wakes it.
        std::thread::sleep(Duration::from_millis(20));
        let counts: Vec<Arc<AtomicUsize>> = (0..4).map(|_| Arc::new(AtomicUsize::new(0))).collect();
        let ws: Vec<Watched> = counts.iter().map(|n| watched(&w, n)).collect();
        let (clocks, busy, spin) =
            (ws.iter().map(|x| x.clock.clone()).collect::<Vec<_>>(), ws[3].inflight.clone(), ws[2].spin.clone());
        clocks[1].enter(Phase::Serving);
        clocks[2].enter(Phase::Waiting);
        clocks[3].enter(Phase::Waiting);
        busy.store(1, Ordering::SeqCst);
        let start = Instant::now();
        for (i, x) in ws.into_iter().enumerate() {
            w.register(i as u64, x).unwrap();
        }
        wait_for("handshake, data and idle deadlines fired", || {
            counts[..3].iter().all(|n| n.load(Ordering::SeqCst) == 1)
        });
        assert!(start.elapsed() >= Duration::from_millis(60));
        assert!(!spin.load(Ordering::SeqCst), "an idle waiting connection stops spinning");
        std::thread::sleep(Duration::from_millis(150));
        assert_eq!(counts[3].load(Ordering::SeqCst), 0, "a connection with work in flight is not idle");
        assert!(counts[..3].iter().all(|n| n.load(Ordering::SeqCst) == 1), "a deadline fires once");
    }

    #[test]
    fn the_registry_is_bounded_and_the_oldest_handshake_is_evicted() {
        let (w, mut t) = Watchdog::start(timeouts(60_000), 2, Metrics::new("t")).unwrap();
        let (old, new) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let a = w.register(1, watched(&w, &old)).unwrap();
        std::thread::sleep(Duration::from_millis(3));
        w.register(2, watched(&w, &new)).unwrap();
        assert!(w.register(3, watched(&w, &new)).is_err());
        assert!(!w.evict_oldest_handshake(3), "below the bound nothing is evicted");
        assert!(w.evict_oldest_handshake(2));
        assert_eq!((old.load(Ordering::SeqCst), new.load(Ordering::SeqCst)), (1, 0));
        w.unregister(a);
        w.unregister(a);
        assert_eq!(w.registered(), 1);
        t.stop();
    }
}
