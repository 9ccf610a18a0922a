//! Exec lanes: a fixed pool of backend handles (each with its own stream, workspace and device
//! error word: [`Backend::handle`]) that Exec requests borrow, one per request, for the whole
//! run — first op to final synchronise. The engine has handles of its own (each model's engine
//! makes one), so a tenant's ops never share a stream with a decode step or with another
//! tenant's ops: no workspace interleaves, no sync waits for someone else's work, and a kernel's
//! input error is reported to the request whose kernel set it.
//!
//! Bound: `exec_streams` handles, made at start-up (no allocation on the request path). A
//! request finding every lane taken waits for one; each holder is itself bounded
//! (`exec_nodes_max` nodes, `exec::NODE_COPIES_MAX` copies per node), so the wait is too.

use std::ops::Deref;
use std::sync::{Arc, Condvar, Mutex};

use djinn_backend::{Backend, BackendError};

/// The pool.
pub struct ExecLanes<B: Backend> {
    free: Mutex<Vec<Arc<B>>>,
    returned: Condvar,
    lanes: usize,
}

/// One lane, held exclusively until dropped (then returned to the pool).
pub struct Lane<'a, B: Backend> {
    pool: &'a ExecLanes<B>,
    handle: Option<Arc<B>>,
}

impl<B: Backend> ExecLanes<B> {
    /// `lanes` new handles on `base`'s device.
    pub fn new(base: &Arc<B>, lanes: usize) -> Result<Self, BackendError> {
        let lanes = lanes.max(1);
        let mut free = Vec::with_capacity(lanes);
        for _ in 0..lanes {
            free.push(base.handle()?);
        }
        Ok(ExecLanes { free: Mutex::new(free), returned: Condvar::new(), lanes })
    }

    /// How many lanes the pool holds.
    pub fn lanes(&self) -> usize {
        self.lanes
    }

    /// A free lane, waiting for one to come back if every lane is taken.
    pub fn take(&self) -> Lane<'_, B> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(h) = free.pop() {
                return Lane { pool: self, handle: Some(h) };
            }
            free = self.returned.wait(free).unwrap_or_else(|p| p.into_inner());
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
        let pool = ExecLanes::new(&Arc::new(CpuBackend::new().unwrap()), 2).unwrap();
        let a = pool.take();
        let b = pool.take();
        assert_eq!(pool.free.lock().unwrap().len(), 0);
        drop(a);
        let c = pool.take();
        drop((b, c));
        assert_eq!(pool.free.lock().unwrap().len(), 2);
        // A third taker waits until a lane comes back.
        let held = pool.take();
        let held2 = pool.take();
        std::thread::scope(|s| {
            let t = s.spawn(|| drop(pool.take()));
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert!(!t.is_finished(), "a taker must wait while every lane is held");
            drop(held);
            t.join().unwrap();
        });
        drop(held2);
    }
}
