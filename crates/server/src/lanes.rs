//! Exec lanes: a fixed pool of backend handles (each with its own stream, workspace and device
//! error word: [`Backend::handle`]) that Exec requests borrow, one per request, for the whole
//! run — first op to final synchronise. The engine has handles of its own (each model's engine
//! makes one), so a tenant's ops never share a stream with a decode step or with another
//! tenant's ops: no workspace interleaves, no sync waits for someone else's work, and a kernel's
//! input error is reported to the request whose kernel set it.
//!
//! Bound: `exec_streams` handles, made at start-up (no allocation on the request path). A
//! request finding every lane taken waits for one at most `exec_lane_wait_ms`, then is refused
//! [`LanesBusy`] (answered `Busy`): a connection thread never waits on other tenants' Execs
//! without limit, however long they run.

use std::ops::Deref;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use djinn_backend::{Backend, BackendError};

/// The pool.
pub struct ExecLanes<B: Backend> {
    free: Mutex<Vec<Arc<B>>>,
    returned: Condvar,
    lanes: usize,
    wait: Duration,
}

/// Every lane stayed taken for the whole wait.
#[derive(Debug, thiserror::Error)]
#[error(
    "all {lanes} Exec lanes stayed taken for {waited_ms} ms (other Execs are running): retry later, or raise the \
     server's `exec_streams` or `exec_lane_wait_ms`"
)]
pub struct LanesBusy {
    pub lanes: usize,
    pub waited_ms: u64,
}

/// One lane, held exclusively until dropped (then returned to the pool).
pub struct Lane<'a, B: Backend> {
    pool: &'a ExecLanes<B>,
    handle: Option<Arc<B>>,
}

impl<B: Backend> ExecLanes<B> {
    /// `lanes` new handles on `base`'s device; a taker waits at most `wait` for one.
    pub fn new(base: &Arc<B>, lanes: usize, wait: Duration) -> Result<Self, BackendError> {
        let lanes = lanes.max(1);
        let mut free = Vec::with_capacity(lanes);
        for _ in 0..lanes {
            free.push(base.handle()?);
        }
        Ok(ExecLanes { free: Mutex::new(free), returned: Condvar::new(), lanes, wait })
    }

    /// How many lanes the pool holds.
    pub fn lanes(&self) -> usize {
        self.lanes
    }

    /// A free lane, waiting up to the pool's bound for one to come back if every lane is taken.
    pub fn take(&self) -> Result<Lane<'_, B>, LanesBusy> {
        let start = Instant::now();
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(h) = free.pop() {
                return Ok(Lane { pool: self, handle: Some(h) });
            }
            let left = self.wait.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(LanesBusy { lanes: self.lanes, waited_ms: self.wait.as_millis() as u64 });
            }
            free = self.returned.wait_timeout(free, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

impl<B: Backend> Deref for Lane<'_, B> {
    type Target = B;
    fn deref(&self) -> &B {
        self.handle.as_deref().expect("a lane holds its handle until dropped")
    }
}

impl<B: Backend> Drop for Lane<'_, B> {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            self.pool.free.lock().unwrap_or_else(|p| p.into_inner()).push(h);
            self.pool.returned.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use djinn_backend::cpu::CpuBackend;

    #[test]
    fn lanes_are_exclusive_and_come_back() {
        let pool = ExecLanes::new(&Arc::new(CpuBackend::new().unwrap()), 2, Duration::from_secs(30)).unwrap();
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        assert_eq!(pool.free.lock().unwrap().len(), 0);
        drop(a);
        let c = pool.take().unwrap();
        drop((b, c));
        assert_eq!(pool.free.lock().unwrap().len(), 2);
        // A third taker waits until a lane comes back.
        let held = pool.take().unwrap();
        let held2 = pool.take().unwrap();
        std::thread::scope(|s| {
            let t = s.spawn(|| drop(pool.take().unwrap()));
            std::thread::sleep(Duration::from_millis(20));
            assert!(!t.is_finished(), "a taker must wait while every lane is held");
            drop(held);
            t.join().unwrap();
        });
        drop(held2);
    }

    #[test]
    fn a_taker_gives_up_after_the_bound() {
        let pool = ExecLanes::new(&Arc::new(CpuBackend::new().unwrap()), 1, Duration::from_millis(50)).unwrap();
        let held = pool.take().unwrap();
        let start = Instant::now();
        let err = pool.take().err().expect("every lane is held: the taker must be refused");
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(50) && waited < Duration::from_secs(5), "waited {waited:?}");
        assert_eq!((err.lanes, err.waited_ms), (1, 50));
        assert!(err.to_string().contains("exec_streams"), "{err}");
        drop(held);
        drop(pool.take().unwrap());
    }
}
