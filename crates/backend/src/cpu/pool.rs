//! The CPU backend's worker pool for its own ops: `threads - 1` persistent workers plus the
//! calling thread, which always takes part.
//!
//! Decode runs hundreds of small ops per token (a few GEMVs and norms per layer), each too short
//! to pay a futex wake of a parked thread (tens of microseconds in a VM). So workers spin on the
//! job word for a bounded time after each job ([`SPIN_US`]) and only then park; ops that follow
//! each other closely find them awake. A job is a number of chunks claimed one at a time, so a
//! worker that is descheduled (a loaded machine) leaves its share to the others instead of
//! stalling the op.
//!
//! Invariants:
//! - One job at a time: `submit` is held while a job is published. A caller that finds it taken
//!   (another thread's op, or a chunk calling back into the backend) runs its chunks inline, so
//!   nesting cannot deadlock.
//! - The job word packs (epoch, chunk count, next chunk). A worker may touch the job only after
//!   claiming a chunk of the current epoch with one CAS; the caller returns only after every
//!   chunk has completed, so the job (on the caller's stack) outlives every access to it.
//! - A chunk that panics is caught in the worker and re-raised on the calling thread.

use std::cell::UnsafeCell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins for the next job before parking. Longer than the gap between
/// consecutive ops of a decode step (a few µs) and than a token's host-side work, shorter than a
/// scheduler tick, so an idle backend stops burning its cores almost at once.
const SPIN_US: u64 = 300;
/// Of that, how long a worker spins without giving its core away. Past it, it yields between
/// looks: the ops of a step follow each other within a few µs, so a longer gap means the backend
/// is between steps, and on a small host the threads it would keep off the core (a connection
/// thread, a client on the same host, another process's pool) are what the next step waits for.
/// A benchmark's in-process call left its worker spinning without yielding for 300 µs through
/// the remote call that followed it, which then measured 340 µs against 40.
const PURE_SPIN_US: u64 = 20;
/// Most chunks one job may have (the chunk fields of the job word are 16 bits).
pub(crate) const CHUNKS_MAX: usize = 0xffff;

const IDX_BITS: u32 = 16;
const N_SHIFT: u32 = IDX_BITS;
const EPOCH_SHIFT: u32 = 2 * IDX_BITS;
const IDX_MASK: u64 = (1 << IDX_BITS) - 1;

fn pack(epoch: u64, n: usize, idx: usize) -> u64 {
    (epoch << EPOCH_SHIFT) | ((n as u64) << N_SHIFT) | idx as u64
}
fn epoch_of(w: u64) -> u64 {
    w >> EPOCH_SHIFT
}
fn n_of(w: u64) -> usize {
    ((w >> N_SHIFT) & IDX_MASK) as usize
}
fn idx_of(w: u64) -> usize {
    (w & IDX_MASK) as usize
}

/// The published job: a type-erased `&dyn Fn(usize) + Sync` living on the caller's stack.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
}

struct Shared {
    /// (epoch, chunks, next chunk); see the module invariants.
    word: AtomicU64,
    /// The current job; valid while a claimed chunk of the current epoch has not completed.
    job: AtomicPtr<Job<'static>>,
    /// Chunks of the current job that have finished running.
    done: AtomicUsize,
    /// A chunk of the current job panicked.
    panicked: AtomicBool,
    /// Workers that are parked or about to park (Dekker pairing with `word`, both SeqCst).
    sleepers: AtomicUsize,
    /// The epoch current at the last [`Pool::quiesce`]: a worker whose last job is of this epoch
    /// skips the rest of its pure spin (`u64::MAX`: none yet; epochs are 32 bits).
    quiet: AtomicU64,
    stop: AtomicBool,
    park: Mutex<()>,
    wake: Condvar,
}

impl Shared {
    /// Claims and runs chunks of epoch `epoch` until none is left. Returns whether any ran.
    fn work(&self, epoch: u64) -> bool {
        let mut ran = false;
        let mut w = self.word.load(Ordering::Acquire);
        loop {
            if epoch_of(w) != epoch || idx_of(w) >= n_of(w) {
                return ran;
            }
            match self.word.compare_exchange_weak(w, w + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    // SAFETY: this thread holds an unfinished chunk of the current epoch, so the
                    // caller is still waiting and its job (published before the word, Release;
                    // the CAS above is Acquire) is alive and unchanged.
                    let job = unsafe { &*self.job.load(Ordering::Acquire) };
                    if catch_unwind(AssertUnwindSafe(|| (job.f)(idx_of(w)))).is_err() {
                        self.panicked.store(true, Ordering::Relaxed);
                    }
                    // Release: the chunk's writes happen-before the caller's Acquire of `done`.
                    self.done.fetch_add(1, Ordering::Release);
                    ran = true;
                    w = self.word.load(Ordering::Acquire);
                }
                Err(now) => w = now,
            }
        }
    }
}

pub(crate) struct Pool {
    shared: Arc<Shared>,
    submit: Mutex<()>,
    workers: Vec<JoinHandle<()>>,
    epoch: UnsafeCell<u64>,
}

// SAFETY: `epoch` is only read and written while `submit` is held; everything else is atomics,
// a mutex/condvar pair, or join handles (Send + Sync).
unsafe impl Sync for Pool {}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("workers", &self.workers.len()).finish()
    }
}

impl Pool {
    /// A pool of `threads` in all: the caller plus `threads - 1` workers named `djinn-cpu-{i}`.
    pub(crate) fn new(threads: usize) -> std::io::Result<Pool> {
        let shared = Arc::new(Shared {
            word: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            quiet: AtomicU64::new(u64::MAX),
            stop: AtomicBool::new(false),
            park: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut pool = Pool { shared, submit: Mutex::new(()), workers: Vec::new(), epoch: UnsafeCell::new(0) };
        for i in 1..threads.max(1) {
            let sh = Arc::clone(&pool.shared);
            // On error `pool` drops here, which stops and joins the workers already started.
            let h = std::thread::Builder::new().name(format!("djinn-cpu-{i}")).spawn(move || worker(&sh))?;
            pool.workers.push(h);
        }
        Ok(pool)
    }

    /// No job follows soon (the caller's last step is done and nothing is queued): workers that
    /// have finished the latest job skip the rest of their pure spin and yield between looks, so
    /// the threads the next request waits for (a connection thread, a client on this host) get
    /// the core. The next job ends it: a worker that takes one spins purely again after it.
    pub(crate) fn quiesce(&self) {
        let sh = &*self.shared;
        sh.quiet.store(epoch_of(sh.word.load(Ordering::Acquire)), Ordering::Relaxed);
    }

    /// Runs `f(i)` for every `i in 0..n`, spread over the workers and the calling thread; returns
    /// when all have finished. Inline when there is one chunk, no worker, or the pool is busy.
    pub(crate) fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if n == 0 {
            return;
        }
        let guard = match self.submit.try_lock() {
            Ok(g) if n > 1 && !self.workers.is_empty() => g,
            _ => return (0..n).for_each(f),
        };
        let sh = &*self.shared;
        for first in (0..n).step_by(CHUNKS_MAX) {
            let count = CHUNKS_MAX.min(n - first);
            let g = move |i: usize| f(first + i);
            let job = Job { f: &g };
            // SAFETY: `submit` is held.
            let epoch = unsafe {
                let e = &mut *self.epoch.get();
                *e = (*e + 1) & (u64::MAX >> EPOCH_SHIFT);
                *e
            };
            sh.done.store(0, Ordering::Relaxed);
            // The lifetime is erased; the module invariant keeps every use inside this call.
            sh.job.store(&job as *const Job<'_> as *mut Job<'static>, Ordering::Relaxed);
            // SeqCst: pairs with the workers' `sleepers` increment (see `worker`).
            sh.word.store(pack(epoch, count, 0), Ordering::SeqCst);
            if sh.sleepers.load(Ordering::SeqCst) > 0 {
                let _p = sh.park.lock().unwrap_or_else(|p| p.into_inner());
                sh.wake.notify_all();
            }
            sh.work(epoch);
            let mut spins = 0u32;
            // Acquire: pairs with each chunk's Release increment, so its writes are visible.
            while sh.done.load(Ordering::Acquire) < count {
                spins += 1;
                if spins < 1 << 14 {
                    std::hint::spin_loop();
                } else {
                    // A worker holding a chunk was descheduled: let it run.
                    std::thread::yield_now();
                }
            }
            sh.job.store(std::ptr::null_mut(), Ordering::Relaxed);
        }
        drop(guard);
        if sh.panicked.swap(false, Ordering::Relaxed) {
            panic!("a CPU backend worker panicked while running a chunk");
        }
    }
}

fn worker(sh: &Shared) {
    let mut seen = epoch_of(sh.word.load(Ordering::Acquire));
    loop {
        let spin_from = Instant::now();
        let (pure_until, spin_until) =
            (spin_from + Duration::from_micros(PURE_SPIN_US), spin_from + Duration::from_micros(SPIN_US));
        let mut i = 0u32;
        let epoch = loop {
            let e = epoch_of(sh.word.load(Ordering::Acquire));
            if e != seen || sh.stop.load(Ordering::Relaxed) {
                break e;
            }
            i = i.wrapping_add(1);
            // The clock every 16 pauses (~0.4 µs: a PAUSE is ~25 ns on Zen 4), so past the pure
            // spin a thread sharing this core waits at most that long for its turn (every 256
            // pauses was ~7 µs: the lag of a connection thread's or client's wake-up per call).
            if i.is_multiple_of(16) {
                let now = Instant::now();
                if now >= spin_until {
                    let mut g = sh.park.lock().unwrap_or_else(|p| p.into_inner());
                    // SeqCst: either the publisher's `sleepers` load sees this increment (and it
                    // notifies under the lock, after this thread waits), or this load sees its job.
                    sh.sleepers.fetch_add(1, Ordering::SeqCst);
                    while epoch_of(sh.word.load(Ordering::SeqCst)) == seen && !sh.stop.load(Ordering::SeqCst) {
                        g = sh.wake.wait(g).unwrap_or_else(|p| p.into_inner());
                    }
                    sh.sleepers.fetch_sub(1, Ordering::SeqCst);
                    drop(g);
                    continue;
                }
                // Past the pure spin, or told that no job follows soon ([`Pool::quiesce`]).
                if now >= pure_until || sh.quiet.load(Ordering::Relaxed) == seen {
                    std::thread::yield_now();
                }
            }
            std::hint::spin_loop();
        };
        if sh.stop.load(Ordering::Relaxed) {
            return;
        }
        seen = epoch;
        sh.work(epoch);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _p = self.shared.park.lock().unwrap_or_else(|p| p.into_inner());
            self.shared.wake.notify_all();
        }
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_runs_once_across_many_jobs() {
        let pool = Pool::new(3).unwrap();
        // 70 000 chunks take two jobs (at most `CHUNKS_MAX` each).
        for (n, rounds) in [(1usize, 50), (2, 50), (7, 50), (64, 50), (1000, 50), (70_000, 3)] {
            for _ in 0..rounds {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                pool.run(n, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n = {n}");
            }
        }
    }

    #[test]
    fn parked_workers_wake_and_nested_runs_go_inline() {
        let pool = Pool::new(2).unwrap();
        std::thread::sleep(Duration::from_millis(5)); // past the spin window: workers park
        let total = AtomicUsize::new(0);
        pool.run(8, &|_| {
            pool.run(4, &|_| {
                total.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(total.load(Ordering::Relaxed), 32);
    }

    #[test]
    fn a_panicking_chunk_reaches_the_caller_and_the_pool_survives() {
        let pool = Pool::new(2).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| pool.run(16, &|i| assert_ne!(i, 5))));
        assert!(r.is_err());
        let count = AtomicUsize::new(0);
        pool.run(16, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 16);
    }

    #[test]
    fn jobs_after_a_quiesce_hint_run_every_chunk() {
        let pool = Pool::new(2).unwrap();
        for round in 0..50 {
            let count = AtomicUsize::new(0);
            pool.run(16, &|_| {
                count.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(count.load(Ordering::Relaxed), 16);
            pool.quiesce();
            if round % 10 == 0 {
                std::thread::sleep(Duration::from_millis(1)); // past the spin: workers park
            }
        }
    }

    #[test]
    fn concurrent_callers_each_complete() {
        let pool = Pool::new(2).unwrap();
        let count = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..200 {
                        pool.run(10, &|_| {
                            count.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(count.load(Ordering::Relaxed), 4 * 200 * 10);
    }
}
