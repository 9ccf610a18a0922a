//! Streaming: a decode step's sampled token becomes the session's pending token and a
//! `SessionToken` frame (text delta, stop strings, top-k or full logits) on the connection's queue.

use super::*;
use prometheus::{Histogram, IntCounter};

impl<B: Backend> EngineLoop<B> {
    /// A decode step of session `id` sampled `t`: emit it, or finish.
    pub(super) fn on_token(&mut self, m: usize, id: u64, t: u32, logits: Option<&[f32]>) {
        let lm = &self.models[m];
        let s = self.sessions.get_mut(&id).expect("batched sessions exist");
        let Work::Decode(d) = &mut s.work else { return };
        // The sampled token is the session's new pending token, EOS included (a next turn's
        // template usually begins by closing the reply with it).
        s.tokens.push(t);
        if !d.ignore_eos && lm.eos.contains(&t) {
            self.end_work(id, Ok(()), FinishWire::Eos);
            return;
        }
        let index = d.produced;
        d.produced += 1;
        let (emit, hit) = match &lm.tok {
            Some(tok) => match d.detok.push(tok, t) {
                Ok(delta) => d.stops.push(delta),
                Err(_) => ("", false),
            },
            None => ("", false),
        };
        let mut w = MetaWriter::with_buf(std::mem::take(&mut self.meta));
        let top: Vec<(u32, f32)> = match (d.logits, logits) {
            (LogitsWire::TopK(k), Some(row)) => top_k(row, k as usize),
            _ => Vec::new(),
        };
        let delta = truncate_str(emit, djinn_proto::session::SESSION_DELTA_BYTES_MAX);
        SessionToken::encode_parts(&mut w, t, index, delta, &top);
        let full: &[&[u8]] = match (d.logits, logits) {
            (LogitsWire::Full, Some(row)) => &[f32_bytes(row)],
            _ => &[],
        };
        // Known before the send: a last token's frame may go out together with the final frame.
        let finish = if hit {
            Some(FinishWire::Stop)
        } else if d.produced >= d.max_new || s.tokens.len() >= s.max_tokens {
            Some(FinishWire::Length)
        } else {
            None
        };
        let bytes = d.ans.send_then(Opcode::SessionToken, Status::Ok, w.as_bytes(), full, finish.is_some());
        self.meta = w.finish();
        let now = Instant::now();
        let meters = &self.models[m].meters;
        if index == 0 {
            let t = now.duration_since(d.ans.received).as_secs_f64();
            self.metrics.ttft_s.observe(t);
            meters.ttft[s.class as usize].observe(t);
        } else {
            let t = now.duration_since(d.last).as_secs_f64();
            self.metrics.token_latency_s.observe(t);
            meters.tpot[s.class as usize].observe(t);
        }
        d.last = now;
        meters.tokens.inc();
        self.metrics.step_bytes.observe(bytes as f64);
        if let Some(f) = finish {
            self.end_work(id, Ok(()), f);
        }
    }
}

/// One model's per-token series, resolved at start-up: a token costs no label lookup (each is a
/// hash and a lock in the registry).
pub(crate) struct TokenMeters {
    /// `djinn_tokens_generated_total{model}`, `djinn_prompt_tokens_total{model}`.
    tokens: IntCounter,
    pub(super) prompt_tokens: IntCounter,
    /// `djinn_scheduler_ttft_seconds` and `djinn_scheduler_tpot_seconds` by class (indexed by `Class`).
    ttft: [Histogram; 3],
    tpot: [Histogram; 3],
}

impl TokenMeters {
    pub(crate) fn new(metrics: &Metrics, model: &str) -> TokenMeters {
        let by_class = |h: &prometheus::HistogramVec| Class::ALL.map(|c| h.with_label_values(&[model, c.name()]));
        TokenMeters {
            tokens: metrics.tokens_generated_total.with_label_values(&[model]),
            prompt_tokens: metrics.prompt_tokens_total.with_label_values(&[model]),
            ttft: by_class(&metrics.sched_ttft_s),
            tpot: by_class(&metrics.sched_tpot_s),
        }
    }
}

/// The `k` largest logits, largest first.
pub(super) fn top_k(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut idx: Vec<(u32, f32)> = row.iter().enumerate().map(|(i, &l)| (i as u32, l)).collect();
    let k = k.min(idx.len());
    let cmp = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
    if k < idx.len() {
        idx.select_nth_unstable_by(k, cmp);
        idx.truncate(k);
    }
    idx.sort_by(cmp);
    idx
}

pub(super) fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut cut = max;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    &s[..cut]
}

pub(super) fn f32_bytes(xs: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte is a valid u8; the slice covers exactly the same
    // memory (alignment of u8 is 1) and borrows `xs` for its lifetime. Little-endian hosts only
    // (the wire is little-endian; every supported target is).
    unsafe { std::slice::from_raw_parts(xs.as_ptr().cast::<u8>(), std::mem::size_of_val(xs)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_sorted_and_bounded() {
        let row = [0.5, 3.0, -1.0, 2.0, 3.0];
        let t = top_k(&row, 3);
        assert_eq!(t.len(), 3);
        assert_eq!(t[0].1, 3.0);
        assert_eq!(t[2], (3, 2.0));
        assert_eq!(top_k(&row, 10).len(), 5);
        assert_eq!(truncate_str("héllo", 2), "h");
    }
}
