//! Input to token ids: ids checked against the vocabulary and the session's length; raw text and
//! chat turns go to the tokenizer pool ([`crate::session::tokenizer_pool`]) and come back as ids,
//! so the loop never tokenizes.
//!
//! While its text is tokenized a session's work is [`Work::Tokenizing`]: it takes no other
//! request (`Busy`), its conversation is with the job, and the request waits in the work. The
//! result continues the request as if it had come with ids (prefill, append, decode). Work ended
//! meanwhile (drain, close) is answered at once; the session stays busy until the job is back.

use super::*;
use crate::session::chat::TurnIds;
use crate::session::tokenizer_pool::{PoolFull, TextInput, TokenizeDone, TokenizeJob};

/// The request a session's text belongs to, continued with its ids.
pub(super) enum Then {
    /// A prefill, with its breakpoint layers (empty: none).
    Prefill(Vec<u32>),
    Append,
    Decode(Box<SessionDecodeReq>),
}

pub(super) struct Tokenizing {
    /// `None` once the request was answered (drain, close) before its ids came back.
    pub(super) ans: Option<Answer>,
    pub(super) ticket: u64,
    pub(super) then: Then,
}

fn no_template() -> Refusal {
    Refusal::new(Status::BadArgument, "this model has no tokenizer with a chat template: feed ids or text instead")
}

impl<B: Backend> EngineLoop<B> {
    /// Checks `new` tokens against the vocabulary and the session's length and adds them (not
    /// fed yet); returns the session's length before them.
    pub(super) fn add_tokens(&mut self, id: u64, new: &[u32]) -> Result<usize, Refusal> {
        let cap = self.kv_capacity_tokens(self.sessions[&id].model);
        let s = self.sessions.get_mut(&id).expect("caller looked it up");
        let vocab = self.models[s.model].info.vocab;
        if let Some(&bad) = new.iter().find(|&&t| t >= vocab) {
            let msg = format!("token id {bad} is outside the vocabulary of {vocab}");
            return Err(Refusal::new(Status::BadArgument, msg));
        }
        if s.tokens.len() + new.len() > s.max_tokens {
            let msg = format!(
                "prompt too long: {} + {} tokens exceed the session's {} (model limit {})",
                s.tokens.len(),
                new.len(),
                s.max_tokens,
                self.models[s.model].engine.max_context_tokens()
            );
            return Err(Refusal::new(Status::BadArgument, msg));
        }
        if s.tokens.len() + new.len() > cap {
            let msg = format!(
                "{} context + {} input tokens exceed the model's whole KV capacity of {cap} tokens (--kv-capacity-mb)",
                s.tokens.len(),
                new.len()
            );
            return Err(Refusal::new(Status::OutOfMemory, msg));
        }
        let base = s.tokens.len();
        s.tokens.extend_from_slice(new);
        Ok(base)
    }

    /// Raw text (no chat template) as the session's next tokens: tokenized off the loop, then
    /// `then` continues.
    pub(super) fn tokenize_raw(
        &mut self,
        ans: Answer,
        id: u64,
        text: String,
        then: Then,
    ) -> Result<(), (Answer, Refusal)> {
        let s = &self.sessions[&id];
        if self.models[s.model].tok.is_none() {
            let msg = "this model has no tokenizer: feed token ids instead of text";
            return Err((ans, Refusal::new(Status::BadArgument, msg)));
        }
        // The tokenizer's own BOS/EOS post-processing only at the start of a session.
        let special = s.tokens.is_empty();
        self.submit_tokenize(ans, id, TextInput::Raw { text, special }, then)
    }

    /// Chat turns (every role but the last may be "assistant": a history sent whole; the last is
    /// "user" or "system"): rendered and tokenized off the loop, recorded in the conversation,
    /// then `then` continues.
    pub(super) fn tokenize_turns(
        &mut self,
        ans: Answer,
        id: u64,
        turns: Vec<(String, String)>,
        then: Then,
    ) -> Result<(), (Answer, Refusal)> {
        let Some(last) = turns.len().checked_sub(1) else {
            return Err((ans, Refusal::new(Status::BadArgument, "no messages")));
        };
        for (i, (role, _)) in turns.iter().enumerate() {
            let ok = matches!(role.as_str(), "user" | "system") || (role == "assistant" && i < last);
            if !ok {
                let msg = match turns.len() {
                    1 => format!("role {role:?}: a turn is \"user\" or \"system\""),
                    _ => format!(
                        "message {i}: role {role:?}; messages are \"system\", \"user\" or (before the last) \"assistant\""
                    ),
                };
                return Err((ans, Refusal::new(Status::BadArgument, msg)));
            }
        }
        let s = &self.sessions[&id];
        if !self.models[s.model].tok.as_ref().is_some_and(|t| t.has_chat_template()) {
            return Err((ans, no_template()));
        }
        // A user turn appended alone is answered by a later decode; a system turn is not.
        let reply = !(matches!(then, Then::Append) && turns[last].0 == "system");
        self.submit_tokenize(ans, id, TextInput::Turns { turns, reply }, then)
    }

    fn submit_tokenize(&mut self, ans: Answer, id: u64, input: TextInput, then: Then) -> Result<(), (Answer, Refusal)> {
        let max = self.tok_pool.queue_max();
        if self.tokenizing >= max {
            let msg = format!("{max} requests wait for tokenization (tokenize_queue_max): retry later");
            return Err((ans, Refusal::new(Status::Busy, msg)));
        }
        self.tok_ticket += 1;
        let ticket = self.tok_ticket;
        let s = self.sessions.get_mut(&id).expect("caller looked it up");
        let tok = self.models[s.model].tok.clone().expect("callers checked for a tokenizer");
        let job =
            TokenizeJob { session: id, ticket, tok, input, conv: std::mem::take(&mut s.conv), held: s.tokens.clone() };
        if let Err(PoolFull(job)) = self.tok_pool.submit(job) {
            s.conv = job.conv;
            let msg = format!("the tokenizer queue is full (tokenize_queue_max {max}): retry later");
            return Err((ans, Refusal::new(Status::Busy, msg)));
        }
        self.tokenizing += 1;
        s.work = Work::Tokenizing(Box::new(Tokenizing { ans: Some(ans), ticket, then }));
        Ok(())
    }

    /// A tokenizer job is back: the conversation returns to its session and the request
    /// continues with the ids (or is refused with why they could not be made).
    pub(super) fn tokenized(&mut self, done: TokenizeDone) {
        self.tokenizing -= 1;
        let TokenizeDone { session: id, ticket, conv, result } = done;
        let Some(s) = self.sessions.get_mut(&id) else { return };
        let Work::Tokenizing(t) = &s.work else { return };
        if t.ticket != ticket {
            return;
        }
        let Work::Tokenizing(t) = std::mem::replace(&mut s.work, Work::Idle) else { unreachable!() };
        s.conv = conv;
        let Some(ans) = t.ans else {
            // Answered already: nothing of it stays.
            if let Ok(r) = &result {
                s.conv.pop_turns(r.turns);
            }
            return;
        };
        let r = match result {
            Err(e) => Err((ans, Refusal::new(Status::BadArgument, e))),
            Ok(TurnIds { ids, turns }) => match t.then {
                Then::Prefill(layers) => self.start_prefill(ans, id, &ids, layers),
                Then::Append => {
                    let r = self.start_feed(ans, id, &ids);
                    if r.is_err() {
                        if let Some(s) = self.sessions.get_mut(&id) {
                            s.conv.pop_turns(turns);
                        }
                    }
                    r
                }
                Then::Decode(mut req) => {
                    req.feed = DecodeFeed::Ids(ids);
                    self.decode_ids(ans, *req, turns)
                }
            },
        };
        self.finish_handling(Some(id), r);
    }
}
