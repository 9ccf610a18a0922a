//! Input to token ids: ids checked against the vocabulary and the session's length, raw text,
//! and chat turns through the model's template.

use super::*;

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

    /// Raw text (no chat template) as the session's next tokens.
    pub(super) fn tokenize_raw(&self, id: u64, text: &str) -> Result<Vec<u32>, Refusal> {
        let s = &self.sessions[&id];
        let Some(tok) = self.models[s.model].tok.as_ref() else {
            return Err(Refusal::new(
                Status::BadArgument,
                "this model has no tokenizer: feed token ids instead of text",
            ));
        };
        // The tokenizer's own BOS/EOS post-processing only at the start of a session.
        tok.encode(text, s.tokens.is_empty()).map_err(|e| Refusal::new(Status::BadArgument, e.to_string()))
    }

    /// The tokens one more chat turn feeds (ending with the generation prompt when `reply`, see
    /// [`crate::session::chat::Conversation::new_turn`]); the turn is recorded in the conversation
    /// (the caller pops it if the tokens are refused).
    pub(super) fn tokenize_turn(&mut self, id: u64, role: &str, text: &str, reply: bool) -> Result<Vec<u32>, Refusal> {
        if role != "user" && role != "system" {
            let msg = format!("role {role:?}: a turn is \"user\" or \"system\"");
            return Err(Refusal::new(Status::BadArgument, msg));
        }
        let s = self.sessions.get_mut(&id).expect("caller looked it up");
        let Some(tok) = self.models[s.model].tok.as_ref().filter(|t| t.has_chat_template()) else {
            let msg = "this model has no tokenizer with a chat template: feed ids or text instead";
            return Err(Refusal::new(Status::BadArgument, msg));
        };
        s.conv.new_turn(tok, &s.tokens, role, text, reply).map_err(|e| Refusal::new(Status::BadArgument, e))
    }

    /// The tokens several chat turns feed (every role but the last may be "assistant": a history
    /// sent whole); all are recorded (the caller pops them if the tokens are refused).
    pub(super) fn tokenize_turns(&mut self, id: u64, turns: &[(String, String)]) -> Result<Vec<u32>, Refusal> {
        let last = turns.len().checked_sub(1).ok_or_else(|| Refusal::new(Status::BadArgument, "no messages"))?;
        for (i, (role, _)) in turns.iter().enumerate() {
            let ok = matches!(role.as_str(), "user" | "system") || (role == "assistant" && i < last);
            if !ok {
                let msg = format!(
                    "message {i}: role {role:?}; messages are \"system\", \"user\" or (before the last) \"assistant\""
                );
                return Err(Refusal::new(Status::BadArgument, msg));
            }
        }
        let s = self.sessions.get_mut(&id).expect("caller looked it up");
        let Some(tok) = self.models[s.model].tok.as_ref().filter(|t| t.has_chat_template()) else {
            let msg = "this model has no tokenizer with a chat template: feed ids or text instead";
            return Err(Refusal::new(Status::BadArgument, msg));
        };
        let turns: Vec<(&str, &str)> = turns.iter().map(|(r, t)| (r.as_str(), t.as_str())).collect();
        s.conv.new_turns(tok, &s.tokens, &turns, true).map_err(|e| Refusal::new(Status::BadArgument, e))
    }
}
