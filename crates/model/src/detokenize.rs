//! Streaming detokenization: generated ids, one at a time, into text deltas, equal to what the
//! `tokenizers` crate's streaming decoder (`step_decode_stream`) gives.
//!
//! Two paths, one answer:
//! - A byte-level tokenizer (GPT-2 style: SmolLM2, Llama 3, Qwen; `decoder.type = ByteLevel`)
//!   decodes a sequence to the bytes of its tokens concatenated, read as lossy UTF-8 (a `Fuse`
//!   decoder likewise, each token's bytes being its UTF-8). Its
//!   [`ByteTable`] (built once per tokenizer) holds each id's bytes, so a step appends a slice
//!   and checks UTF-8: no tokenizer call, no allocation at steady state (a decode step's token
//!   path is on the engine loop).
//! - Any other decoder (SentencePiece's metaspace, byte fallback, strip) depends on the tokens
//!   around it: the crate's `step_decode_stream`, which re-decodes a short window of ids.
//!
//! Invariant of the byte path: `pending` holds the bytes since the last emitted delta, and a
//! delta is emitted exactly when their lossy decoding is non-empty and does not end in U+FFFD
//! (an incomplete character, or one the crate's decoder would also hold back). Deltas start and
//! end on character boundaries of the whole stream, so lossy decoding of the whole stream is the
//! concatenation of the deltas: what `step_decode_stream` emits step by step.

use tokenizers::{DecoderWrapper, Tokenizer};

/// Each id's bytes under a byte-level decoder; special tokens (skipped) and unknown ids are
/// empty.
#[derive(Debug)]
pub struct ByteTable {
    bytes: Vec<u8>,
    /// Id `i`'s bytes are `bytes[ends[i - 1]..ends[i]]` (`0` before id 0).
    ends: Vec<u32>,
}

/// GPT-2's byte ↔ character mapping: the printable bytes stand for themselves, the others for
/// `U+0100 + n` in byte order. Returns the byte a character stands for.
fn byte_of(c: char) -> Option<u8> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let c = c as u32;
    if c < 256 {
        return printable(c).then_some(c as u8);
    }
    // The n-th non-printable byte (in byte order) is U+0100 + n.
    let n = c - 256;
    (0u32..256).filter(|&b| !printable(b)).nth(n as usize).map(|b| b as u8)
}

impl ByteTable {
    /// The table of `tok` when its decoder is exactly `ByteLevel` or `Fuse` (tokens joined as
    /// they are), else `None`. Under `ByteLevel` each token's bytes follow the decoder's rule:
    /// every character mapped back to its byte, or, if any character has no byte, the token's
    /// own UTF-8. A sample of ids is checked against the tokenizer's own decode; any difference
    /// gives `None` (the caller keeps the crate's path).
    pub fn build(tok: &Tokenizer) -> Option<ByteTable> {
        let byte_level = match tok.get_decoder() {
            Some(DecoderWrapper::ByteLevel(_)) => true,
            // Tokens joined as they are.
            Some(DecoderWrapper::Fuse(_)) => false,
            _ => return None,
        };
        let map: Vec<Option<u8>> = (0u32..512).map(|c| char::from_u32(c).and_then(byte_of)).collect();
        let added = tok.get_added_vocabulary();
        let last_added = added.get_added_tokens_decoder().keys().copied().max();
        let n = tok.get_vocab_size(false).max(last_added.map_or(0, |m| m as usize + 1));
        let mut t = ByteTable { bytes: Vec::new(), ends: Vec::with_capacity(n) };
        for id in 0..n as u32 {
            if let Some(s) = tok.id_to_token(id).filter(|s| !added.is_special_token(s)) {
                let start = t.bytes.len();
                let mapped = byte_level
                    && s.chars().all(|c| map.get(c as usize).copied().flatten().map(|b| t.bytes.push(b)).is_some());
                if !mapped {
                    t.bytes.truncate(start);
                    t.bytes.extend_from_slice(s.as_bytes());
                }
            }
            t.ends.push(u32::try_from(t.bytes.len()).ok()?);
        }
        t.agrees_with(tok, n).then_some(t)
    }

    /// Id `id`'s bytes (empty for a special token or an id the tokenizer does not know).
    pub fn get(&self, id: u32) -> &[u8] {
        let i = id as usize;
        match self.ends.get(i) {
            Some(&end) => &self.bytes[if i == 0 { 0 } else { self.ends[i - 1] as usize }..end as usize],
            None => &[],
        }
    }

    /// Every 97th id, the added tokens and a few ids past the end decode as the tokenizer does.
    fn agrees_with(&self, tok: &Tokenizer, n: usize) -> bool {
        let added = tok.get_added_vocabulary().get_added_tokens_decoder().keys().copied().collect::<Vec<_>>();
        let ids = (0..n as u32).step_by(97).chain(added).chain(n as u32..n as u32 + 3);
        ids.into_iter().all(|id| tok.decode(&[id], true).is_ok_and(|s| s == String::from_utf8_lossy(self.get(id))))
    }
}

/// Turns generated ids, one at a time, into text deltas (see the module docs). Its state lives
/// here rather than in the crate's `DecodeStream` (which borrows the tokenizer) so that a
/// session can own it.
#[derive(Debug, Default)]
pub struct Detokenizer {
    /// Byte path: bytes since the last emitted delta.
    pending: Vec<u8>,
    /// The crate's path: its window of ids and their decoded prefix.
    ids: Vec<u32>,
    prefix: String,
    prefix_index: usize,
    /// The last delta (reused).
    out: String,
}

impl Detokenizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one id; returns the text it completes (possibly empty).
    pub fn push(&mut self, tok: &crate::TextTokenizer, id: u32) -> crate::Result<&str> {
        self.out.clear();
        let Some(table) = tok.byte_table() else {
            let step = tokenizers::tokenizer::step_decode_stream(
                tok.inner(),
                vec![id],
                true,
                &mut self.ids,
                &mut self.prefix,
                &mut self.prefix_index,
            );
            if let Some(s) = step.map_err(|e| tok.err(e))? {
                self.out = s;
            }
            return Ok(&self.out);
        };
        self.pending.extend_from_slice(table.get(id));
        match std::str::from_utf8(&self.pending) {
            Ok(s) if !s.ends_with('\u{FFFD}') => self.out.push_str(s),
            Ok(_) => return Ok(""),
            Err(_) => {
                let s = String::from_utf8_lossy(&self.pending);
                if s.ends_with('\u{FFFD}') {
                    return Ok("");
                }
                self.out.push_str(&s);
            }
        }
        self.pending.clear();
        Ok(&self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TextTokenizer;
    use std::path::Path;

    /// A byte-level vocabulary where "é" (C3 A9) takes two tokens: the first alone yields
    /// nothing, the second the whole character; the deltas add up to the full decode.
    #[test]
    fn detokenizer_streams_whole_characters() {
        let json = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
            "pre_tokenizer":null,"post_processor":null,
            "decoder":{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":false,"use_regex":false},
            "model":{"type":"WordLevel","vocab":{"Ã":0,"©":1,"a":2,"Ġb":3},"unk_token":"a"}}"#;
        let tok = TextTokenizer::from_parts(Path::new("t.json"), json.as_bytes(), None, None).unwrap();
        assert!(tok.byte_table().is_some());
        let mut d = Detokenizer::new();
        let deltas: Vec<String> = [2, 0, 1, 3, 2].iter().map(|&id| d.push(&tok, id).unwrap().to_owned()).collect();
        assert_eq!(deltas, ["a", "", "é", " b", "a"]);
        assert_eq!(deltas.concat(), tok.decode(&[2, 0, 1, 3, 2], true).unwrap());
    }

    #[test]
    fn gpt2_byte_map() {
        assert_eq!(byte_of('a'), Some(b'a'));
        assert_eq!(byte_of('Ġ'), Some(b' '));
        assert_eq!(byte_of('Ċ'), Some(b'\n'));
        assert_eq!(byte_of('Ā'), Some(0));
        assert_eq!(byte_of('ġ'), Some(0x7f));
        assert_eq!(byte_of('ł'), Some(0xa0));
        assert_eq!(byte_of('Ń'), Some(0xad));
        assert_eq!(byte_of('ń'), None);
        assert_eq!(byte_of(' '), None);
    }

    /// A `Fuse` decoder (the generated tiny model's) joins tokens as they are: a table too.
    #[test]
    fn fuse_decoder_gets_a_table() {
        let json = r#"{"version":"1.0","truncation":null,"padding":null,
            "added_tokens":[{"id":3,"content":"<e>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],
            "normalizer":null,"pre_tokenizer":null,"post_processor":null,"decoder":{"type":"Fuse"},
            "model":{"type":"WordLevel","vocab":{"a":0,"é":1," b":2,"<e>":3},"unk_token":"a"}}"#;
        let tok = TextTokenizer::from_parts(Path::new("t.json"), json.as_bytes(), None, None).unwrap();
        assert_eq!(tok.byte_table().map(|t| t.get(1)), Some("é".as_bytes()));
        let mut d = Detokenizer::new();
        let deltas: Vec<String> = [0, 1, 3, 2].iter().map(|&id| d.push(&tok, id).unwrap().to_owned()).collect();
        assert_eq!(deltas, ["a", "é", "", " b"]);
    }

    /// Random id streams through a byte-level vocabulary of all 256 bytes (so characters split
    /// across tokens, and invalid sequences, are common), a few words, a special and a plain
    /// added token, and ids past the end: the byte path's deltas are the crate's, step by step.
    #[test]
    fn byte_path_equals_the_crates_stream() {
        let char_of = |b: u8| (0u32..512).filter_map(char::from_u32).find(|&c| byte_of(c) == Some(b)).unwrap();
        let mut vocab: Vec<String> = (0..=255u8).map(|b| char_of(b).to_string()).collect();
        vocab.extend(["Ġhello", "ĠÃ©", "âĤ¬", "ðŁĺ", "ĠĠ"].map(String::from));
        let n = vocab.len() as u32;
        let entries: Vec<String> =
            vocab.iter().enumerate().map(|(i, t)| format!("{}:{i}", serde_json::Value::from(t.as_str()))).collect();
        let added = |id: u32, content: &str, special: bool| {
            format!(
                r#"{{"id":{id},"content":"{content}","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":{special}}}"#
            )
        };
        let json = format!(
            r#"{{"version":"1.0","truncation":null,"padding":null,"added_tokens":[{},{}],"normalizer":null,
            "pre_tokenizer":null,"post_processor":null,
            "decoder":{{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":false,"use_regex":false}},
            "model":{{"type":"WordLevel","vocab":{{{}}},"unk_token":"a"}}}}"#,
            added(n, "<|end|>", true),
            added(n + 1, "<x>", false),
            entries.join(",")
        );
        let tok = TextTokenizer::from_parts(Path::new("t.json"), json.as_bytes(), None, None).unwrap();
        let table = tok.byte_table().expect("a ByteLevel decoder gets a table");
        assert_eq!(table.get(n), b"", "a special token is skipped");
        assert_eq!(table.get(n + 1), b"<x>");
        let mut rng = 0x9e3779b97f4a7c15u64;
        let mut next = |m: u32| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % m as u64) as u32
        };
        for _ in 0..300 {
            let mut fast = Detokenizer::new();
            let (mut ids, mut prefix, mut prefix_index) = (Vec::new(), String::new(), 0);
            let mut all = Vec::new();
            for _ in 0..24 {
                let id = match next(3) {
                    // Bytes 0x80.. are continuation and lead bytes: partial characters.
                    0 => 0x80 + next(0x80),
                    _ => next(n + 4),
                };
                all.push(id);
                let want = tokenizers::tokenizer::step_decode_stream(
                    tok.inner(),
                    vec![id],
                    true,
                    &mut ids,
                    &mut prefix,
                    &mut prefix_index,
                )
                .unwrap()
                .unwrap_or_default();
                assert_eq!(fast.push(&tok, id).unwrap(), want, "ids {all:?}");
            }
        }
    }
}
