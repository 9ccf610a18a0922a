//! Handshake deadlines: one thread closes connections that have not completed their Hello in
//! time, so clients that connect and stay silent (or stop mid-frame) cannot hold connection slots.
//!
//! Invariants:
//! - One thread for the whole server, parked on a condition variable until the earliest deadline
//!   (or a new, earlier one): no per-connection timers, nothing busy-waits.
//! - The deadline list is bounded by `capacity` (the server's `max_connections`: each connection
//!   has at most one deadline, armed at accept and disarmed by its successful Hello or its end);
//!   arming beyond it fails instead of growing.
//! - A deadline that passes calls the connection's transport closer (`FrameTx::closer`) outside
//!   the list's lock; the connection's own thread then sees its receive fail and ends as usual,
//!   releasing its slot. Closing twice, or after the connection ended, is harmless.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use djinn_transport::ConnectionClose;

use crate::metrics::Metrics;

/// Names one armed deadline (for [`Watchdog::disarm`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeadlineKey {
    at: Instant,
    conn: u64,
}

/// The deadline list is full (more connections than it was sized for).
#[derive(Debug, thiserror::Error)]
#[error("handshake deadline list full ({0} entries)")]
pub struct Full(pub usize);

struct List {
    deadlines: BTreeMap<DeadlineKey, ConnectionClose>,
    capacity: usize,
    stopped: bool,
}

struct State {
    list: Mutex<List>,
    wake: Condvar,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, List> {
        // Every mutation is one insert/remove; a poisoned list is still consistent.
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The shared handle: arm and disarm deadlines from any thread.
#[derive(Clone)]
pub struct Watchdog {
    state: Arc<State>,
    timeout: Duration,
}

/// Owns the watchdog thread; dropping it stops and joins the thread.
pub struct WatchdogThread {
    state: Arc<State>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts the thread. `timeout` is the handshake deadline after accept; `capacity` bounds the
    /// deadlines armed at once.
    pub fn start(timeout: Duration, capacity: usize, metrics: Metrics) -> std::io::Result<(Watchdog, WatchdogThread)> {
        let state = Arc::new(State {
            list: Mutex::new(List { deadlines: BTreeMap::new(), capacity, stopped: false }),
            wake: Condvar::new(),
        });
        let st = state.clone();
        let thread = std::thread::Builder::new().name("djinn-watchdog".into()).spawn(move || run(&st, &metrics))?;
        Ok((Watchdog { state: state.clone(), timeout }, WatchdogThread { state, thread: Some(thread) }))
    }

    /// Arms connection `conn`'s handshake deadline: `close` is called if it is not disarmed
    /// within the timeout.
    pub fn arm(&self, conn: u64, close: ConnectionClose) -> Result<DeadlineKey, Full> {
        let key = DeadlineKey { at: Instant::now() + self.timeout, conn };
        let mut list = self.state.lock();
        if list.deadlines.len() >= list.capacity {
            return Err(Full(list.capacity));
        }
        let earliest = list.deadlines.keys().next().is_none_or(|first| key < *first);
        list.deadlines.insert(key, close);
        drop(list);
        if earliest {
            // The thread may be sleeping until a later deadline (or forever).
            self.state.wake.notify_one();
        }
        Ok(key)
    }

    /// Cancels a deadline; returns false when it had already passed (the connection is closing).
    pub fn disarm(&self, key: DeadlineKey) -> bool {
        // No wake-up: a thread sleeping until this deadline wakes, finds it gone and sleeps again.
        self.state.lock().deadlines.remove(&key).is_some()
    }

    /// Deadlines armed right now.
    pub fn armed(&self) -> usize {
        self.state.lock().deadlines.len()
    }
}

fn run(state: &State, metrics: &Metrics) {
    let mut list = state.lock();
    loop {
        if list.stopped {
            return;
        }
        let now = Instant::now();
        let mut due: Vec<(DeadlineKey, ConnectionClose)> = Vec::new();
        while let Some(entry) = list.deadlines.first_entry() {
            if entry.key().at > now {
                break;
            }
            due.push(entry.remove_entry());
        }
        if !due.is_empty() {
            // Close outside the lock: a closer may take transport locks of its own.
            drop(list);
            for (key, close) in due {
                tracing::debug!(conn = key.conn, "no Hello within the handshake timeout; closing");
                metrics.errors_total.with_label_values(&["handshake_timeout"]).inc();
                close();
            }
            list = state.lock();
            continue;
        }
        list = match list.deadlines.keys().next().map(|k| k.at) {
            Some(at) => {
                let timeout = at.saturating_duration_since(now);
                state.wake.wait_timeout(list, timeout).unwrap_or_else(|p| p.into_inner()).0
            }
            None => state.wake.wait(list).unwrap_or_else(|p| p.into_inner()),
        };
    }
}

impl WatchdogThread {
    /// Stops the thread (deadlines still armed are dropped without closing) and joins it.
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
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn counter_closer(n: &Arc<AtomicUsize>) -> ConnectionClose {
        let n = n.clone();
        Arc::new(move || {
            n.fetch_add(1, Ordering::SeqCst);
        })
    }

    fn wait_for(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn passed_deadlines_close_and_disarmed_ones_do_not() {
        let (w, _t) = Watchdog::start(Duration::from_millis(50), 4, Metrics::new("t")).unwrap();
        let (fired, spared) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let start = Instant::now();
        w.arm(1, counter_closer(&fired)).unwrap();
        let k = w.arm(2, counter_closer(&spared)).unwrap();
        assert!(w.disarm(k));
        wait_for("deadline fired", || fired.load(Ordering::SeqCst) == 1);
        assert!(start.elapsed() >= Duration::from_millis(50));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(spared.load(Ordering::SeqCst), 0);
        assert_eq!(fired.load(Ordering::SeqCst), 1, "a deadline fires once");
        assert_eq!(w.armed(), 0);
    }

    #[test]
    fn the_list_is_bounded() {
        let (w, mut t) = Watchdog::start(Duration::from_secs(60), 2, Metrics::new("t")).unwrap();
        let n = Arc::new(AtomicUsize::new(0));
        let a = w.arm(1, counter_closer(&n)).unwrap();
        w.arm(2, counter_closer(&n)).unwrap();
        assert!(w.arm(3, counter_closer(&n)).is_err());
        assert!(w.disarm(a));
        assert!(!w.disarm(a), "disarmed twice");
        w.arm(3, counter_closer(&n)).unwrap();
        t.stop();
        assert_eq!(n.load(Ordering::SeqCst), 0, "stopping closes nothing");
    }
}
