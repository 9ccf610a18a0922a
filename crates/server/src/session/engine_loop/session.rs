//! A session as the loop holds it: its tokens and how many are in the KV, its conversation, the
//! connections attached to it, its lease, and its current work (idle, a feed, or a decode).

use super::*;

/// A running decode.
pub(super) struct DecodeState {
    pub(super) ans: Answer,
    /// Tokens the decode's own input added, and the session's length before it (undone when the
    /// decode fails before anything of it was fed).
    pub(super) prompt_tokens: u32,
    pub(super) base: usize,
    /// Chat turns the input recorded in the conversation (0: not a chat turn).
    pub(super) turns: usize,
    pub(super) params: SampleParams,
    pub(super) max_new: u32,
    pub(super) produced: u32,
    pub(super) ignore_eos: bool,
    pub(super) logits: LogitsWire,
    pub(super) detok: Detokenizer,
    pub(super) stops: StopStrings,
    pub(super) last: Instant,
    /// The input pass's breakpoints, while it has not finished ([`super::breakpoint`]); for a
    /// decode that samples its first token from the session's held row, that row.
    pub(super) brk: Option<Box<super::breakpoint::BreakState>>,
    /// A prefill's pass with breakpoints, not a decode: it samples nothing and ends with a
    /// `PrefillReply` when it commits ([`super::breakpoint`]).
    pub(super) prefill: bool,
}

pub(super) enum Work {
    Idle,
    /// Feeding `tokens[kv..len-1]`; `base` = length before the request (undo on failure).
    Feed {
        ans: Answer,
        added: u32,
        base: usize,
    },
    Decode(Box<DecodeState>),
    /// Its request's text is with the tokenizer pool ([`super::tokenize`]).
    Tokenizing(Box<Tokenizing>),
}

pub(super) struct Session {
    pub(super) tenant: TenantId,
    pub(super) model: usize,
    pub(super) vs: djinn_model::SessionId,
    pub(super) max_tokens: usize,
    pub(super) tokens: Vec<u32>,
    pub(super) kv: usize,
    pub(super) conv: Conversation,
    /// Every connection that opened, attached to or made a request on the session and is still
    /// open (at most one entry per connection): the session's lease starts only when all are gone.
    pub(super) conns: Vec<Arc<ConnLink>>,
    pub(super) detached_at: Option<Instant>,
    pub(super) work: Work,
    pub(super) cancel: bool,
    /// Whether its KV may be dropped and rebuilt from `tokens` (preemption by recomputation):
    /// true unless the KV holds something the tokens do not say (e.g. a patched hidden state),
    /// which whoever patches it must clear.
    pub(super) recomputable: bool,
    /// The state after every layer (before the final norm) of the last token, which a prefill's
    /// breakpoint pass fed with the rest (`hidden` f32): the next decode samples from it.
    /// Valid only while the KV holds every token and there are `held.0` of them (anything that
    /// adds, drops or rolls back tokens makes it stale without touching it).
    pub(super) held: Option<(usize, Box<[f32]>)>,
    /// Its QoS class (from the open's class and deadline).
    pub(super) class: Class,
    /// When its work was last seated in a step, or arrived: escalation and fairness.
    pub(super) since: Instant,
    /// The tenant's quota this session holds (sessions_max, and the KV bytes of its tokens plus
    /// what its running request may add, against kv_bytes_max); given back on drop.
    pub(super) quota: crate::quota::Ticket,
}

impl Session {
    /// The held row of the last token, while it is valid.
    pub(super) fn held_row(&self) -> Option<&[f32]> {
        match &self.held {
            Some((n, row)) if *n == self.tokens.len() && self.kv == *n => Some(row),
            _ => None,
        }
    }

    pub(super) fn has_work(&self) -> bool {
        !matches!(self.work, Work::Idle)
    }

    /// Whether whoever waits for the current work can still hear of it.
    pub(super) fn work_heard(&self) -> bool {
        match &self.work {
            Work::Idle => true,
            Work::Feed { ans, .. } => ans.conn.is_alive(),
            Work::Decode(d) => d.ans.conn.is_alive(),
            Work::Tokenizing(t) => t.ans.as_ref().is_none_or(|a| a.conn.is_alive()),
        }
    }
}
