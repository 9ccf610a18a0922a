//! The conversation a session keeps (role, text per turn, the generated assistant replies
//! included) and the incremental chat template: a new turn tokenizes only the text the template
//! adds after what the session's KV already holds.
//!
//! The session's token ids are authoritative (as in llama.cpp's server and vLLM's prefix cache):
//! a turn never re-tokenizes text the KV holds. What it feeds is found on text. `rendered` is the
//! template's text of the conversation as last fed (generation prompt included); the KV holds its
//! ids, `rendered_ids` of them, then whatever was generated (or fed as ids) since. A new turn
//! renders the whole conversation again (`full`), decodes the ids held since `rendered` with
//! their special tokens (`<|im_end|>` stays text), and feeds the tokens of `full` after the
//! longest common prefix of `full` and `rendered + that text`.
//!
//! Why this, and not the text after `rendered(prev)`: the template closes an assistant turn with
//! text of its own (ChatML: `<|im_end|>\n`) that the model generates only in part (the EOS, not
//! the newline) or not at all (a reply cut by length). Tokenizing the template's text of the new
//! turn alone drops that newline (or the whole close), which is where the ids diverged from a
//! full re-tokenization. With the common prefix the close is fed: after a reply that ended in
//! EOS, `\n<|im_start|>user…`; after one cut by length, `<|im_end|>\n<|im_start|>user…`; after one
//! cut by a stop string, the close after the recorded text (the stop's tokens stay in the KV).
//!
//! Exactness: when the held ids re-tokenize to themselves, the boundary lies at a special token
//! (the suffix starts with one or follows one), and the `tokenizers` crate splits the added
//! tokens out before it pre-tokenizes; the pieces on either side are tokenized independently, so
//! the ids fed are exactly those a full re-tokenization of the rendered conversation gives.
//!
//! Invariant: the conversation's text is bounded by [`CONVERSATION_BYTES_MAX`]; a turn that would
//! pass it is refused and leaves the conversation unchanged. Work per turn: one render of the
//! conversation and a byte comparison (linear, cheap), a decode of the ids generated since the
//! last turn, and a tokenization of the new turn's text only.

use djinn_model::TextTokenizer;

/// Text a session's conversation may hold over all its turns.
pub const CONVERSATION_BYTES_MAX: usize = 4 << 20;

#[derive(Debug, Default)]
pub struct Conversation {
    turns: Vec<(String, String)>,
    bytes: usize,
    /// The template's text of the conversation as last fed (with the generation prompt).
    rendered: String,
    /// How many of the session's ids are `rendered`'s (the rest came after it).
    rendered_ids: usize,
    /// `(rendered, rendered_ids)` before the last recorded turns, for [`Conversation::pop_turns`].
    undo: Option<(String, usize)>,
}

/// The ids a new turn feeds and what recording it changes, found off the engine loop.
#[derive(Debug)]
pub struct TurnIds {
    pub ids: Vec<u32>,
    /// Turns recorded (undone with [`Conversation::pop_turns`] when the ids are refused).
    pub turns: usize,
}

/// The longest common prefix of `a` and `b`, in bytes, at a character boundary of both.
fn common_prefix(a: &str, b: &str) -> usize {
    let n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    (0..=n).rev().find(|&i| a.is_char_boundary(i) && b.is_char_boundary(i)).unwrap_or(0)
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

    /// The tokens new turns feed (the HTTP front's messages, assistant turns of a history
    /// included, rendered together with one generation prompt after the last when `reply`), given the ids the
    /// session holds (`held`); the turns are recorded. See the module docs for what is fed.
    pub fn new_turns(
        &mut self,
        tok: &TextTokenizer,
        held: &[u32],
        turns: &[(&str, &str)],
        reply: bool,
    ) -> Result<TurnIds, String> {
        self.fits(turns.iter().map(|(_, t)| t.len()).sum())?;
        let prev: Vec<(&str, &str)> = self.turns.iter().map(|(r, t)| (r.as_str(), t.as_str())).collect();
        let mut all = prev.clone();
        all.extend_from_slice(turns);
        let full = tok.apply_chat_messages(&all, reply).map_err(|e| e.to_string())?;
        // Ids held past `rendered` (a reply, EOS included): their text with special tokens.
        // Ids truncated below `rendered_ids` (never after a fed turn) count as all new.
        let (rendered, since) = match held.get(self.rendered_ids..) {
            Some(rest) => (self.rendered.as_str(), rest),
            None => ("", held),
        };
        let since_text = tok.decode(since, false).map_err(|e| e.to_string())?;
        let k = match full.strip_prefix(rendered) {
            Some(rest) => rendered.len() + common_prefix(rest, &since_text),
            // The template rendered earlier turns otherwise (or the session held raw input
            // before its first turn): feed what it adds after the previous turns.
            None => {
                let before = if prev.is_empty() {
                    String::new()
                } else {
                    tok.apply_chat_messages(&prev, false).map_err(|e| e.to_string())?
                };
                if !full.starts_with(before.as_str()) {
                    return Err("the chat template does not render the conversation incrementally".into());
                }
                before.len()
            }
        };
        let ids = tok.encode(&full[k..], false).map_err(|e| e.to_string())?;
        for (role, text) in turns {
            self.turns.push(((*role).to_owned(), (*text).to_owned()));
            self.bytes += text.len();
        }
        let old = std::mem::replace(&mut self.rendered, full);
        self.undo = Some((old, std::mem::replace(&mut self.rendered_ids, held.len() + ids.len())));
        Ok(TurnIds { ids, turns: turns.len() })
    }

    /// Undoes the last `n` turns recorded (their tokens were refused).
    pub fn pop_turns(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        for _ in 0..n {
            if let Some((_, t)) = self.turns.pop() {
                self.bytes -= t.len();
            }
        }
        if let Some((r, n)) = self.undo.take() {
            self.rendered = r;
            self.rendered_ids = n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2's tokenizer (byte-level BPE, ChatML), when fetched.
    fn smollm2() -> Option<TextTokenizer> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/smollm2-bf16");
        TextTokenizer::load(&dir).ok().flatten()
    }

    /// Feeds turns like a session: `held` gains the fed ids, then a reply's ids.
    fn turn(c: &mut Conversation, tok: &TextTokenizer, held: &mut Vec<u32>, text: &str) -> Vec<u32> {
        let t = c.new_turns(tok, held, &[("user", text)], true).unwrap();
        held.extend(&t.ids);
        t.ids
    }

    #[test]
    fn common_prefix_stops_at_char_boundaries() {
        assert_eq!(common_prefix("abc", "abd"), 2);
        assert_eq!(common_prefix("é", "è"), 0);
        assert_eq!(common_prefix("", "x"), 0);
        assert_eq!(common_prefix("xy", "xy"), 2);
    }

    #[test]
    fn turns_after_eos_length_and_stop_replies() {
        let Some(tok) = smollm2() else {
            eprintln!("models/smollm2-bf16 not fetched: skipped");
            return;
        };
        let eos = tok.eos_id().unwrap();
        let (mut c, mut held) = (Conversation::default(), Vec::new());
        turn(&mut c, &tok, &mut held, "Hi");
        // A reply ending in EOS: the next turn gives the full re-tokenization.
        let reply = "Hello! How can I help?";
        held.extend(tok.encode(reply, false).unwrap());
        held.push(eos);
        c.push_assistant(reply);
        turn(&mut c, &tok, &mut held, "Name a colour.");
        let full = tok.apply_chat_messages(&[("user", "Hi"), ("assistant", reply), ("user", "Name a colour.")], true);
        assert_eq!(held, tok.encode(&full.unwrap(), false).unwrap());
        // A reply cut by length (no EOS): the turn closes it with `<|im_end|>` first.
        held.extend(tok.encode("Blue is", false).unwrap());
        c.push_assistant("Blue is");
        let ids = turn(&mut c, &tok, &mut held, "Another.");
        assert_eq!(ids[0], eos);
        // A reply cut by a stop string: its ids stay, the recorded text is shorter.
        let before = held.len();
        held.extend(tok.encode("Red. User:", false).unwrap());
        c.push_assistant("Red.");
        let ids = turn(&mut c, &tok, &mut held, "Ok");
        assert_eq!(
            ids,
            tok.encode("<|im_end|>\n<|im_start|>user\nOk<|im_end|>\n<|im_start|>assistant\n", false).unwrap()
        );
        assert!(held.len() > before + ids.len());
        // A refused turn is undone: the same turn again feeds the same ids.
        let again = c.new_turns(&tok, &held, &[("user", "More")], true).unwrap();
        c.pop_turns(again.turns);
        assert_eq!(c.new_turns(&tok, &held, &[("user", "More")], true).unwrap().ids, again.ids);
    }
}
