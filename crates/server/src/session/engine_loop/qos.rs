//! QoS: the classes a session is served in and the policy that decides how much of a step each
//! ready session gets (`scheduler = "qos"`); [`super::schedule`] turns the plan into a batch.
//!
//! Classes, most urgent first: realtime, interactive, batch (`QosWire::Background` is batch). A
//! session's class is its `SessionOpen` class, raised by its `deadline_ms` (≤ 25 ms realtime,
//! ≤ 250 ms interactive); work that waits unseated for `qos_escalation_ms` is promoted one
//! class per period.
//!
//! A step, planned by [`QosPolicy::plan`]:
//! - **Budget**: `max_step_tokens`, or `qos_realtime_step_tokens` while realtime work is ready
//!   (at least one token per realtime decode, plus a chunk for a realtime prompt), so a realtime
//!   time per token stays near its unloaded value whatever else is queued. Prompt tokens (prefill
//!   chunks) take at most `prefill_chunk_tokens` of it: a long prompt is fed in chunks between
//!   decode steps.
//! - **Minimum shares**: each class with ready work first gets up to `share × budget` tokens
//!   (at least one), classes in priority order — so no class starves; then what is left goes by
//!   strict priority (realtime > interactive > batch).
//! - **Within a class**: decodes first (one token each, least recently served first), then
//!   prompt chunks, the chunk budget split evenly (water-filling: a 16-token prompt is fed whole
//!   in the step beside a 4000-token one, which takes the rest).
//! - **Concurrency**: while another class has ready work, a class seats at most its
//!   `qos_max_sessions` (default floor(share × max_sessions)) sessions in a step.
//!
//! Nothing here allocates per step: the caller's buffers are reused.
//!
//! Invariant: a plan never exceeds the budget, `seqs_max`, a candidate's need, or what `fits`
//! admits (KV memory); every candidate's grant is a prefix of its need.

use std::time::{Duration, Instant};

use djinn_proto::session::QosWire;

use crate::config::ServerConfig;

/// A session's scheduling class, most urgent first (the order is the priority).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Class {
    Realtime = 0,
    Interactive = 1,
    Batch = 2,
}

impl Class {
    pub(crate) const ALL: [Class; 3] = [Class::Realtime, Class::Interactive, Class::Batch];

    /// The `class` label of the metrics.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Class::Realtime => "realtime",
            Class::Interactive => "interactive",
            Class::Batch => "batch",
        }
    }

    /// The class a session opened with `qos` and `deadline_ms` (0 = none) is served in: the
    /// more urgent of the two.
    pub(crate) fn of(qos: QosWire, deadline_ms: u32) -> Class {
        let asked = match qos {
            QosWire::Realtime => Class::Realtime,
            QosWire::Interactive => Class::Interactive,
            QosWire::Batch | QosWire::Background => Class::Batch,
        };
        let by_deadline = match deadline_ms {
            0 => Class::Batch,
            1..=25 => Class::Realtime,
            26..=250 => Class::Interactive,
            _ => Class::Batch,
        };
        asked.min(by_deadline)
    }

    /// `levels` classes more urgent (at most realtime).
    fn promoted(self, levels: u32) -> Class {
        Class::ALL[(self as usize).saturating_sub(levels as usize)]
    }
}

/// Which step scheduler the loop runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scheduler {
    /// Classes, decode first, chunked prompts ([`QosPolicy::plan`]).
    Qos,
    /// First come first served over the whole step budget (the baseline).
    Fcfs,
}

/// The QoS settings, checked at start-up.
#[derive(Clone, Debug)]
pub(crate) struct QosPolicy {
    pub(crate) scheduler: Scheduler,
    prefill_chunk_tokens: usize,
    realtime_step_tokens: usize,
    shares: [f64; 3],
    max_sessions: [usize; 3],
    escalation: Duration,
}

/// One session with work, as the planner sees it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Candidate {
    /// The caller's index (a session).
    pub(crate) key: u64,
    /// Its class, escalation included ([`QosPolicy::effective`]).
    pub(crate) class: Class,
    /// Tokens it would take: 1 for a decode step, else its unfed input.
    pub(crate) need: usize,
    /// Whether this is a decode step (one token that samples the next).
    pub(crate) decode: bool,
    /// When it was last seated (or its work arrived): least recently served goes first.
    pub(crate) since: Instant,
}

impl QosPolicy {
    pub(crate) fn from_config(cfg: &ServerConfig) -> Result<Self, String> {
        let scheduler = match cfg.scheduler.as_str() {
            "qos" => Scheduler::Qos,
            "fcfs" => Scheduler::Fcfs,
            other => return Err(format!("scheduler {other:?}: use \"qos\" or \"fcfs\"")),
        };
        let shares = [cfg.qos_share_realtime, cfg.qos_share_interactive, cfg.qos_share_batch];
        if let Some(bad) = shares.iter().find(|s| !(0.0..=1.0).contains(*s)) {
            return Err(format!("qos share {bad}: each qos_share_* is between 0 and 1"));
        }
        if shares.iter().sum::<f64>() > 1.0 + 1e-9 {
            return Err(format!("qos shares {shares:?} add up to more than 1"));
        }
        let max_sessions = match cfg.qos_max_sessions.as_slice() {
            [] => [0, 0, 0],
            [a, b, c] => [*a, *b, *c],
            other => return Err(format!("qos_max_sessions {other:?}: three values (realtime, interactive, batch)")),
        };
        let max_sessions = std::array::from_fn(|i| match max_sessions[i] {
            0 => ((shares[i] * cfg.max_sessions as f64) as usize).max(1),
            n => n,
        });
        if cfg.prefill_chunk_tokens == 0 || cfg.qos_realtime_step_tokens == 0 || cfg.qos_escalation_ms == 0 {
            return Err(
                "prefill_chunk_tokens, qos_realtime_step_tokens and qos_escalation_ms must be at least 1".into()
            );
        }
        Ok(QosPolicy {
            scheduler,
            prefill_chunk_tokens: cfg.prefill_chunk_tokens,
            realtime_step_tokens: cfg.qos_realtime_step_tokens,
            shares,
            max_sessions,
            escalation: Duration::from_millis(cfg.qos_escalation_ms),
        })
    }

    pub(crate) fn prefill_chunk_tokens(&self) -> usize {
        self.prefill_chunk_tokens
    }

    /// `class` raised one level per escalation period its work waited since `since`.
    pub(crate) fn effective(&self, class: Class, since: Instant, now: Instant) -> Class {
        let waited = now.saturating_duration_since(since);
        class.promoted((waited.as_nanos() / self.escalation.as_nanos().max(1)).min(2) as u32)
    }

    /// Plans one step over `cands` (reordered): `grant[i]` tokens for `cands[i]` (0 = not
    /// seated). `fits(i, n)` says whether the step still fits in KV memory with `cands[i]`
    /// taking `n` tokens in all (it records the grant when it says yes).
    #[cfg(test)]
    pub(crate) fn plan(
        &self,
        cands: &mut [Candidate],
        step_tokens: usize,
        seqs_max: usize,
        grant: &mut Vec<usize>,
        scratch: &mut Vec<usize>,
        fits: impl FnMut(&Candidate, usize) -> bool,
    ) {
        self.plan_chunk(self.prefill_chunk_tokens, cands, step_tokens, seqs_max, grant, scratch, fits)
    }

    /// [`QosPolicy::plan`] with `prefill_tokens` (at least `prefill_chunk_tokens`) as the step's
    /// prompt-token budget: the loop grows it for a prompt that runs alone
    /// ([`super::chunk::ChunkSizer`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn plan_chunk(
        &self,
        prefill_tokens: usize,
        cands: &mut [Candidate],
        step_tokens: usize,
        seqs_max: usize,
        grant: &mut Vec<usize>,
        scratch: &mut Vec<usize>,
        mut fits: impl FnMut(&Candidate, usize) -> bool,
    ) {
        // Class, then decodes before prompts, then least recently served.
        cands.sort_by_key(|c| (c.class, !c.decode, c.since));
        grant.clear();
        grant.resize(cands.len(), 0);
        let mut demand = [false; 3];
        let (mut rt_decodes, mut rt_prompt) = (0, false);
        for c in cands.iter() {
            demand[c.class as usize] = true;
            rt_decodes += usize::from(c.class == Class::Realtime && c.decode);
            rt_prompt |= c.class == Class::Realtime && !c.decode;
        }
        // A realtime prompt is fed a full chunk per step (it would crawl at a few tokens).
        let rt_budget = rt_decodes + if rt_prompt { self.prefill_chunk_tokens } else { 0 };
        let budget = match demand[Class::Realtime as usize] {
            true => self.realtime_step_tokens.max(rt_budget).min(step_tokens),
            false => step_tokens,
        };
        let prefill_max = prefill_tokens.max(self.prefill_chunk_tokens);
        let mut st = Plan { used: 0, prefill_used: 0, prefill_max, seats: 0, class_seats: [0; 3], short_class: 3 };
        let classes_waiting = demand.iter().filter(|&&d| d).count();
        let cap = |c: Class| if classes_waiting > 1 { self.max_sessions[c as usize] } else { usize::MAX };
        // Minimum shares, in priority order; then what is left, by strict priority.
        for reserved in [true, false] {
            for class in Class::ALL {
                if !demand[class as usize] {
                    continue;
                }
                let limit = match reserved {
                    true => st.used + ((self.shares[class as usize] * budget as f64) as usize).max(1),
                    false => budget,
                }
                .min(budget);
                let range = class_range(cands, class);
                let (cs, gs) = (&cands[range.clone()], &mut grant[range]);
                self.fill(cs, gs, limit, cap(class), seqs_max, &mut st, scratch, &mut fits);
            }
        }
    }

    /// Gives the candidates of one class (`cs`, sorted decodes first) tokens up to `limit`
    /// used in the whole step: decodes one each, then prompt chunks water-filled.
    #[allow(clippy::too_many_arguments)]
    fn fill(
        &self,
        cs: &[Candidate],
        grant: &mut [usize],
        limit: usize,
        cap: usize,
        seqs_max: usize,
        st: &mut Plan,
        idx: &mut Vec<usize>,
        fits: &mut impl FnMut(&Candidate, usize) -> bool,
    ) {
        let class = match cs.first() {
            Some(c) => c.class as usize,
            None => return,
        };
        for (c, g) in cs.iter().zip(grant.iter_mut()).filter(|(c, _)| c.decode) {
            if st.used >= limit {
                return;
            }
            if *g == 0 && st.seats < seqs_max && st.class_seats[class] < cap && fits(c, 1) {
                *g = 1;
                st.used += 1;
                st.seats += 1;
                st.class_seats[class] += 1;
            }
        }
        // Prompt chunks: smallest remaining need first, each an even share of what is left.
        idx.clear();
        idx.extend((0..cs.len()).filter(|&i| !cs[i].decode && grant[i] < cs[i].need));
        idx.sort_unstable_by_key(|&i| (cs[i].need - grant[i], i));
        // Short prompts (a chunk or less left) go ahead of long ones: while one is in the step a
        // long prompt sits it out, so a short prompt's first token costs a step of its own size
        // (its solo time to first token), not one shared with a long prompt's chunk. A long
        // prompt deferred this way waits unseated and escalates like any waiting work, which
        // bounds the deferral (`qos_escalation_ms` per class); one more urgent than every short
        // prompt is not deferred.
        let chunk = self.prefill_chunk_tokens;
        if idx.first().is_some_and(|&i| cs[i].need - grant[i] <= chunk) {
            st.short_class = st.short_class.min(class);
        }
        if st.short_class <= class {
            idx.retain(|&i| cs[i].need - grant[i] <= chunk);
        }
        let pool = (limit.saturating_sub(st.used)).min(st.prefill_max.saturating_sub(st.prefill_used));
        let mut left = pool;
        for (done, &i) in idx.iter().enumerate() {
            if left == 0 {
                break;
            }
            let new_seat = grant[i] == 0;
            if new_seat && (st.seats >= seqs_max || st.class_seats[class] >= cap) {
                continue;
            }
            let share = left.div_ceil(idx.len() - done);
            let n = share.min(cs[i].need - grant[i]);
            if n == 0 || !fits(&cs[i], grant[i] + n) {
                continue;
            }
            grant[i] += n;
            left -= n;
            st.used += n;
            st.prefill_used += n;
            if new_seat {
                st.seats += 1;
                st.class_seats[class] += 1;
            }
        }
    }
}

/// Running totals of a plan.
struct Plan {
    used: usize,
    prefill_used: usize,
    /// Prompt tokens the step may take (`prefill_chunk_tokens`, or more for a lone prompt).
    prefill_max: usize,
    seats: usize,
    class_seats: [usize; 3],
    /// The most urgent class with a prompt of at most a chunk left (3: none); long prompts of
    /// that class and less urgent ones sit the step out.
    short_class: usize,
}

/// The candidates of `class` in `cands` (sorted by class).
fn class_range(cands: &[Candidate], class: Class) -> std::ops::Range<usize> {
    let start = cands.partition_point(|c| c.class < class);
    let end = cands.partition_point(|c| c.class <= class);
    start..end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> QosPolicy {
        let cfg = ServerConfig { max_sessions: 16, ..ServerConfig::default() };
        QosPolicy::from_config(&cfg).unwrap()
    }

    fn cand(key: u64, class: Class, need: usize, decode: bool, t: Instant) -> Candidate {
        Candidate { key, class, need, decode, since: t }
    }

    fn granted(cands: &[Candidate], grant: &[usize], key: u64) -> usize {
        cands.iter().zip(grant).find(|(c, _)| c.key == key).map_or(0, |(_, g)| *g)
    }

    #[test]
    fn classes_from_the_wire() {
        assert_eq!(Class::of(QosWire::Background, 0), Class::Batch);
        assert_eq!(Class::of(QosWire::Batch, 20), Class::Realtime);
        assert_eq!(Class::of(QosWire::Batch, 200), Class::Interactive);
        assert_eq!(Class::of(QosWire::Realtime, 1000), Class::Realtime);
        assert_eq!(Class::of(QosWire::Interactive, 0), Class::Interactive);
        let p = policy();
        let t = Instant::now();
        assert_eq!(p.effective(Class::Batch, t, t + Duration::from_millis(799)), Class::Batch);
        assert_eq!(p.effective(Class::Batch, t, t + Duration::from_millis(800)), Class::Interactive);
        assert_eq!(p.effective(Class::Batch, t, t + Duration::from_secs(10)), Class::Realtime);
    }

    /// Every decode is seated; prompts share the chunk budget; a short one is fed whole and a
    /// long one sits that step out.
    #[test]
    fn decodes_first_and_prompts_in_chunks() {
        let p = policy();
        let t = Instant::now();
        let mut cs = vec![cand(1, Class::Interactive, 4000, false, t), cand(2, Class::Interactive, 16, false, t)];
        cs.extend((10..20).map(|k| cand(k, Class::Interactive, 1, true, t)));
        let mut g = Vec::new();
        p.plan(&mut cs, 256, 64, &mut g, &mut Vec::new(), |_, _| true);
        for k in 10..20 {
            assert_eq!(granted(&cs, &g, k), 1);
        }
        assert_eq!(granted(&cs, &g, 2), 16, "the short prompt is fed whole");
        assert_eq!(granted(&cs, &g, 1), 0, "the long prompt waits for the short one's step");
        // Alone, or with short ones of another class, the long prompt gets the chunk budget.
        let mut cs = vec![cand(1, Class::Interactive, 4000, false, t), cand(3, Class::Interactive, 100, false, t)];
        p.plan(&mut cs, 256, 64, &mut g, &mut Vec::new(), |_, _| true);
        assert_eq!((granted(&cs, &g, 3), granted(&cs, &g, 1)), (16, 16), "two long prompts share the chunk");
        // Two short prompts share it; then a long one escalated past them is fed first.
        let mut cs = vec![cand(2, Class::Batch, 16, false, t), cand(4, Class::Batch, 20, false, t)];
        cs.push(cand(1, Class::Realtime, 4000, false, t));
        p.plan(&mut cs, 256, 64, &mut g, &mut Vec::new(), |_, _| true);
        assert_eq!(granted(&cs, &g, 1), 32 - 6, "the escalated long prompt takes all but batch's share");
        assert_eq!(granted(&cs, &g, 2) + granted(&cs, &g, 4), 6);
    }

    /// Realtime work keeps steps short; batch still gets its share, and a class seats at most
    /// its cap while another waits.
    #[test]
    fn realtime_first_and_batch_not_starved() {
        let p = policy();
        let t = Instant::now();
        let mut cs = vec![cand(1, Class::Realtime, 1, true, t)];
        cs.extend((10..25).map(|k| cand(k, Class::Batch, 1, true, t + Duration::from_millis(k))));
        let mut g = Vec::new();
        p.plan(&mut cs, 256, 64, &mut g, &mut Vec::new(), |_, _| true);
        assert_eq!(granted(&cs, &g, 1), 1);
        let batch: usize = (10..25).map(|k| granted(&cs, &g, k)).sum();
        assert_eq!(batch, 3, "a realtime step holds 4 tokens: one realtime, three batch");
        assert_eq!(granted(&cs, &g, 10), 1, "least recently served batch decode first");
        // Without realtime work, batch alone is not capped.
        let mut cs: Vec<Candidate> = (10..25).map(|k| cand(k, Class::Batch, 1, true, t)).collect();
        p.plan(&mut cs, 256, 64, &mut g, &mut Vec::new(), |_, _| true);
        assert_eq!(g.iter().sum::<usize>(), 15);
        // Interactive beside batch: batch capped at floor(0.2 × 16) = 3 seats.
        let mut cs: Vec<Candidate> = (10..25).map(|k| cand(k, Class::Batch, 1, true, t)).collect();
        cs.push(cand(1, Class::Interactive, 1, true, t));
        p.plan(&mut cs, 256, 64, &mut g, &mut Vec::new(), |_, _| true);
        assert_eq!(g.iter().sum::<usize>(), 4);
    }

    /// A plan respects the step budget, the sequence bound and what fits.
    #[test]
    fn plans_respect_every_bound() {
        let p = policy();
        let t = Instant::now();
        let mut cs: Vec<Candidate> =
            (0..40).map(|k| cand(k, Class::Interactive, 1 + k as usize * 7, k % 3 == 0, t)).collect();
        for c in cs.iter_mut().filter(|c| c.decode) {
            c.need = 1;
        }
        let mut g = Vec::new();
        p.plan(&mut cs, 20, 8, &mut g, &mut Vec::new(), |c, _| c.key != 3);
        assert!(g.iter().sum::<usize>() <= 20);
        assert!(g.iter().filter(|&&n| n > 0).count() <= 8);
        assert_eq!(granted(&cs, &g, 3), 0);
        assert!(cs.iter().zip(&g).all(|(c, &n)| n <= c.need));
    }
}
