//! Rate-limited logging: a flood of the same event (refused connections, bad tokens) logs one
//! line per interval with the count of lines it stood for, instead of one line per event.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One event kind's throttle.
pub struct Throttle {
    epoch: Instant,
    interval_ms: u64,
    /// Milliseconds since `epoch` of the last line logged (+1; 0 = never).
    last_ms: AtomicU64,
    /// Events not logged since then.
    suppressed: AtomicU64,
}

impl Throttle {
    pub fn new(interval: Duration) -> Self {
        Throttle {
            epoch: Instant::now(),
            interval_ms: interval.as_millis() as u64,
            last_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Calls `log(suppressed)` if no line was logged within the interval (`suppressed`: events
    /// dropped since the last line); otherwise only counts the event. Returns whether it logged.
    pub fn warn(&self, log: impl FnOnce(u64)) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let last = self.last_ms.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= self.interval_ms;
        if due && self.last_ms.compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            log(self.suppressed.swap(0, Ordering::AcqRel));
            return true;
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_with_the_count_it_stands_for() {
        let t = Throttle::new(Duration::from_millis(50));
        let mut lines = Vec::new();
        for _ in 0..100 {
            t.warn(|n| lines.push(n));
        }
        assert_eq!(lines, [0]);
        std::thread::sleep(Duration::from_millis(60));
        t.warn(|n| lines.push(n));
        assert_eq!(lines, [0, 99]);
    }
}
