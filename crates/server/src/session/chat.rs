//! The conversation a session keeps (role, text per turn, the generated assistant replies
//! included) and the incremental chat template: a new turn feeds only the tokens after what the
//! session already holds.
//!
//! Invariant: the conversation's text is bounded by [`CONVERSATION_BYTES_MAX`]; a turn that would
//! pass it is refused and leaves the conversation unchanged.

use djinn_model::TextTokenizer;

/// Text a session's conversation may hold over all its turns.
pub const CONVERSATION_BYTES_MAX: usize = 4 << 20;

#[derive(Debug, Default)]
pub struct Conversation {
    turns: Vec<(String, String)>,
    bytes: usize,
}

impl Conversation {
    pub fn is_empty(&self) -> bool {
        self.turns.is_empty()
    }

    fn fits(&self, more: usize) -> Result<(), String> {
        if self.bytes + more > CONVERSATION_BYTES_MAX {
            return Err(format!("the conversation would pass {CONVERSATION_BYTES_MAX} bytes of text"));
        }
        Ok(())
    }

    /// Adds generated assistant text: to the last turn if it is the assistant's (a decode that
    /// continues a reply), else as a new turn. Text past the bound is dropped from the record
    /// (the tokens stay in the KV cache either way).
    pub fn push_assistant(&mut self, text: &str) {
        if self.fits(text.len()).is_err() {
            return;
        }
        self.bytes += text.len();
        match self.turns.last_mut() {
            Some((role, t)) if role == "assistant" => t.push_str(text),
            _ => self.turns.push(("assistant".into(), text.to_owned())),
        }
    }

    /// The tokens a new `role` turn feeds, given the ids the session holds (`held`), and the turn
    /// recorded. `reply`: the turn ends with the template's generation prompt (the assistant's
    /// turn opened), as it must before a decode answers it; a system turn appended on its own has
    /// none, or the prompt would stand stray before the user turn that follows it. The whole
    /// conversation is rendered (with the generation prompt when `reply`) and tokenized; if
    /// the held ids are a prefix of that, the rest is fed — exactly what one prefill of the whole
    /// rendered conversation would hold. Otherwise (a reply that does not re-tokenize the same,
    /// e.g. cut by a stop string) the text the template adds after the previous render is
    /// tokenized on its own.
    pub fn new_turn(
        &mut self,
        tok: &TextTokenizer,
        held: &[u32],
        role: &str,
        text: &str,
        reply: bool,
    ) -> Result<Vec<u32>, String> {
        self.new_turns(tok, held, &[(role, text)], reply)
    }

    /// [`Conversation::new_turn`] for several turns at once (the HTTP front's messages, assistant
    /// turns of a history included), rendered together (with one generation prompt after the last
    /// when `reply`); undone with [`Conversation::pop_turns`].
    pub fn new_turns(
        &mut self,
        tok: &TextTokenizer,
        held: &[u32],
        turns: &[(&str, &str)],
        reply: bool,
    ) -> Result<Vec<u32>, String> {
        self.fits(turns.iter().map(|(_, t)| t.len()).sum())?;
        let prev: Vec<(&str, &str)> = self.turns.iter().map(|(r, t)| (r.as_str(), t.as_str())).collect();
        let mut all = prev.clone();
        all.extend_from_slice(turns);
        let full = tok.apply_chat_messages(&all, reply).map_err(|e| e.to_string())?;
        let ids = tok.encode(&full, false).map_err(|e| e.to_string())?;
        let new = if ids.starts_with(held) {
            ids[held.len()..].to_vec()
        } else {
            let before = if prev.is_empty() {
                String::new()
            } else {
                tok.apply_chat_messages(&prev, false).map_err(|e| e.to_string())?
            };
            match full.strip_prefix(before.as_str()) {
                Some(rest) => tok.encode(rest, false).map_err(|e| e.to_string())?,
                None => return Err("the chat template does not render the conversation incrementally".into()),
            }
        };
        for (role, text) in turns {
            self.turns.push(((*role).to_owned(), (*text).to_owned()));
            self.bytes += text.len();
        }
        Ok(new)
    }

    /// Undoes the last `n` turns recorded (their tokens were refused).
    pub fn pop_turns(&mut self, n: usize) {
        for _ in 0..n {
            self.pop_turn();
        }
    }

    /// Undoes the last [`Conversation::new_turn`] (its tokens were refused).
    pub fn pop_turn(&mut self) {
        if let Some((_, t)) = self.turns.pop() {
            self.bytes -= t.len();
        }
    }
}
