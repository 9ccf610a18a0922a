//! Prompt-chunk sizing: how many prompt tokens a step of one model may feed (qos scheduler).
//!
//! While other work waits, a step feeds at most `prefill_chunk_tokens` prompt tokens, so decodes
//! and short prompts are never held behind a long prompt. A prompt that runs alone (nothing else
//! of any model has work) has nobody to hold back, so its chunk grows to what takes about
//! `prefill_alone_step_ms` at the measured prefill rate (bounded by `max_step_tokens`): a
//! 256-token prompt on an idle server is fed in one step, not eight. The time bound keeps the
//! wait of a request that arrives during such a step short (it waits for that step, then goes
//! ahead of the long prompt like any short prompt).
//!
//! Invariants: the chunk is at least `prefill_chunk_tokens`, and at most [`GROWTH_MAX`] times
//! the prompt tokens of the step the rate was measured on (a rate measured on a small step says
//! little about a much larger one; each step measures again); no allocation.

use std::time::Duration;

/// How many times the measured step's prompt tokens a lone chunk may be.
const GROWTH_MAX: usize = 8;

/// One model's lone-prompt chunk (see the module docs).
pub(crate) struct ChunkSizer {
    /// `prefill_chunk_tokens`: the chunk while others wait, and the least a lone prompt gets.
    base: usize,
    /// `prefill_alone_step_ms`: the step time a lone prompt's chunk aims at (zero: never grow).
    target: Duration,
    /// Prompt tokens of the step `ns_per_token` was measured on.
    measured_tokens: usize,
    /// Nanoseconds per row of the last step that fed at least `base` prompt tokens (0: none
    /// measured yet).
    ns_per_token: u64,
}

impl ChunkSizer {
    pub(crate) fn new(base: usize, target: Duration) -> Self {
        ChunkSizer { base, target, measured_tokens: 0, ns_per_token: 0 }
    }

    /// Prompt tokens the next step may feed: `base` unless `alone`, else what fits the target
    /// time at the last measured rate, at most [`GROWTH_MAX`] times the measured step's and
    /// `step_tokens`.
    pub(crate) fn chunk(&self, alone: bool, step_tokens: usize) -> usize {
        if !alone || self.target.is_zero() || self.ns_per_token == 0 {
            return self.base;
        }
        let fit = (self.target.as_nanos() / u128::from(self.ns_per_token)) as usize;
        fit.min(self.measured_tokens.saturating_mul(GROWTH_MAX)).min(step_tokens).max(self.base)
    }

    /// A step that fed `prompt_tokens` prompt tokens (and `decodes` decode rows) took `took`.
    /// Only steps with at least a base chunk of prompt tokens measure the rate (a decode step's
    /// time is mostly reading weights, not per-token work).
    pub(crate) fn observe(&mut self, prompt_tokens: usize, decodes: usize, took: Duration) {
        if prompt_tokens < self.base {
            return;
        }
        let rows = (prompt_tokens + decodes) as u128;
        self.measured_tokens = prompt_tokens;
        self.ns_per_token = (took.as_nanos() / rows).clamp(1, u128::from(u64::MAX)) as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_prompt_grows_to_the_time_target() {
        let mut c = ChunkSizer::new(32, Duration::from_millis(40));
        // Nothing measured: the base chunk.
        assert_eq!(c.chunk(true, 4096), 32);
        // 10 µs per token: 4000 tokens fit 40 ms; at most 8× the measured 32, and the step.
        c.observe(32, 0, Duration::from_micros(320));
        assert_eq!(c.chunk(true, 4096), 256);
        assert_eq!(c.chunk(true, 100), 100);
        c.observe(256, 0, Duration::from_micros(2560));
        assert_eq!(c.chunk(true, 8192), 2048);
        // Others wait: the base.
        assert_eq!(c.chunk(false, 4096), 32);
        // Slow tokens (1 ms each): 40 fit, never less than the base.
        c.observe(64, 0, Duration::from_millis(64));
        assert_eq!(c.chunk(true, 4096), 40);
        c.observe(40, 0, Duration::from_millis(400));
        assert_eq!(c.chunk(true, 4096), 32);
        // Decode-only steps do not measure.
        c.observe(1, 8, Duration::from_secs(1));
        assert_eq!(c.chunk(true, 4096), 32);
        // Zero target: never grows.
        let mut z = ChunkSizer::new(32, Duration::ZERO);
        z.observe(32, 0, Duration::from_micros(1));
        assert_eq!(z.chunk(true, 4096), 32);
    }
}
