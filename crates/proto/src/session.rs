//! Session messages (opcodes 32..=40): open, attach, prefill, append a chat turn, decode with a
//! stream of token frames, cancel, close, and stateless all-position logits.
//!
//! # Layout
//! Same conventions as [`crate::msg`]: little-endian scalars, `str` = `u32` length + UTF-8,
//! `[T]` = `u32` count + elements; every count and string is bounded by a constant below, checked
//! before anything is allocated.
//!
//! | opcode | request meta | reply meta / data |
//! |---|---|---|
//! | SessionOpen | `SessionOpenReq`: str model, u8 qos, u32 max_tokens, u32 deadline_ms | `SessionInfoReply` |
//! | SessionAttach | `SessionReq`: u64 session | `SessionInfoReply` |
//! | SessionPrefill | `SessionPrefillReq`: u64 session, u8 kind (0 ids, 1 text), [u32] or str, [u32] breakpoints | `PrefillReply` |
//! | SessionAppend | `SessionAppendReq`: u64 session, str role, str text | `PrefillReply` |
//! | SessionDecode | `SessionDecodeReq` (+ optional input fed first, [u32] breakpoints) | `SessionToken` frames, then `SessionDecodeReply` |
//! | SessionCancel, SessionClose | `SessionReq` | empty |
//! | Logits | `LogitsReq`: str model, [u32] ids | `LogitsReply`: u32 rows, u32 vocab / f32 LE logits |
//!
//! `SessionInfoReply` = u64 session, u32 context_tokens, u32 max_tokens, u32 vocab, [u32] eos_ids,
//! u8 has_tokenizer, u8 has_chat_template. A token frame (`SessionToken | FLAG_REPLY`, the
//! decode's request id) = u32 token, u32 index, str text delta, [(u32 id, f32 logit)] top-k; with
//! full logits requested its bulk data is the step's f32 logits. A short delta keeps the whole
//! frame within 64 bytes.
//!
//! A decode may carry its own input (`DecodeFeed`: ids, raw text or a chat turn), fed before the
//! first token is sampled. The prompt's forward pass then also yields the first token — one pass
//! instead of a prefill's plus a decode step's, which is what time to first token asks for.

use crate::breakpoint::{get_breakpoints, put_breakpoints};
use crate::meta::{Meta, MetaError, MetaReader, MetaWriter};
use crate::msg::NAME_BYTES_MAX;

/// A server-side session, valid only for the tenant that opened it.
pub type SessionWireId = u64;

/// Most stop strings of one decode.
pub const SESSION_STOP_STRINGS_MAX: usize = 8;
/// Longest stop string.
pub const SESSION_STOP_BYTES_MAX: usize = 256;
/// Longest text of a prefill or chat turn (the frame's metadata limit usually binds first).
pub const SESSION_TEXT_BYTES_MAX: usize = 1 << 20;
/// Most token ids in one prefill or logits request.
pub const SESSION_PROMPT_IDS_MAX: usize = 1 << 20;
/// Most (id, logit) pairs a token frame carries.
pub const SESSION_TOPK_LOGITS_MAX: usize = 64;
/// Most EOS ids a model declares.
pub const SESSION_EOS_IDS_MAX: usize = 64;
/// Longest chat role name.
pub const SESSION_ROLE_BYTES_MAX: usize = 64;
/// Longest text delta of one token frame.
pub const SESSION_DELTA_BYTES_MAX: usize = 4096;

/// Scheduling class of a session. `Background` is accepted and scheduled as `Batch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum QosWire {
    #[default]
    Interactive = 0,
    Batch = 1,
    Background = 2,
    /// Latency-critical: seated first in every step.
    Realtime = 3,
}

impl QosWire {
    fn from_u8(v: u8) -> Result<Self, MetaError> {
        match v {
            0 => Ok(QosWire::Interactive),
            1 => Ok(QosWire::Batch),
            2 => Ok(QosWire::Background),
            3 => Ok(QosWire::Realtime),
            _ => Err(MetaError::BadValue { what: "qos", value: v as u64 }),
        }
    }
}

/// Why a decode ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishWire {
    Eos = 0,
    Length = 1,
    Stop = 2,
    Cancelled = 3,
}

impl FinishWire {
    pub fn from_u8(v: u8) -> Result<Self, MetaError> {
        match v {
            0 => Ok(FinishWire::Eos),
            1 => Ok(FinishWire::Length),
            2 => Ok(FinishWire::Stop),
            3 => Ok(FinishWire::Cancelled),
            _ => Err(MetaError::BadValue { what: "finish", value: v as u64 }),
        }
    }
}

/// Which logits each token frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogitsWire {
    #[default]
    None,
    /// The `k` largest (id, logit) pairs, 1 ≤ k ≤ [`SESSION_TOPK_LOGITS_MAX`].
    TopK(u16),
    /// Every logit, as the frame's bulk data.
    Full,
}

fn get_bool(r: &mut MetaReader<'_>, what: &'static str) -> Result<bool, MetaError> {
    match r.get_u8(what)? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(MetaError::BadValue { what, value: v as u64 }),
    }
}

fn put_ids(w: &mut MetaWriter, ids: &[u32]) {
    w.put_count(ids.len());
    for &id in ids {
        w.put_u32(id);
    }
}

fn get_ids(r: &mut MetaReader<'_>, what: &'static str, max: usize) -> Result<Vec<u32>, MetaError> {
    let n = r.get_count(what, 4, max)?;
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        ids.push(r.get_u32(what)?);
    }
    Ok(ids)
}

/// Request of SessionOpen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionOpenReq {
    pub model: String,
    pub qos: QosWire,
    /// 0 = the model's (or server's) maximum.
    pub max_tokens: u32,
    /// Time per output token the client needs, in ms; 0 = none. The server maps it to a class
    /// (≤ 25 ms realtime, ≤ 250 ms interactive) when that is more urgent than `qos`.
    pub deadline_ms: u32,
}

impl Meta for SessionOpenReq {
    fn encode(&self, w: &mut MetaWriter) {
        w.put_str(&self.model);
        w.put_u8(self.qos as u8);
        w.put_u32(self.max_tokens);
        w.put_u32(self.deadline_ms);
    }
    fn decode(r: &mut MetaReader<'_>) -> Result<Self, MetaError> {
        Ok(SessionOpenReq {
            model: r.get_str("model", NAME_BYTES_MAX)?.to_owned(),
            qos: QosWire::from_u8(r.get_u8("qos")?)?,
            max_tokens: r.get_u32("max_tokens")?,
            deadline_ms: r.get_u32("deadline_ms")?,
        })
    }
}

/// Reply of SessionOpen and SessionAttach.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionInfoReply {
    pub session: SessionWireId,
    pub context_tokens: u32,
    pub max_tokens: u32,
    pub vocab: u32,
    pub eos_ids: Vec<u32>,
    pub has_tokenizer: bool,
    pub has_chat_template: bool,
}

impl Meta for SessionInfoReply {
    fn encode(&self, w: &mut MetaWriter) {
        w.put_u64(self.session);
        w.put_u32(self.context_tokens);
        w.put_u32(self.max_tokens);
        w.put_u32(self.vocab);
        put_ids(w, &self.eos_ids);
        w.put_u8(self.has_tokenizer as u8);
        w.put_u8(self.has_chat_template as u8);
    }
    fn decode(r: &mut MetaReader<'_>) -> Result<Self, MetaError> {
        Ok(SessionInfoReply {
            session: r.get_u64("session")?,
            context_tokens: r.get_u32("context_tokens")?,
            max_tokens: r.get_u32("max_tokens")?,
            vocab: r.get_u32("vocab")?,
            eos_ids: get_ids(r, "eos_ids", SESSION_EOS_IDS_MAX)?,
            has_tokenizer: get_bool(r, "has_tokenizer")?,
            has_chat_template: get_bool(r, "has_chat_template")?,
        })
    }
}

/// Request naming one session: SessionAttach, SessionCancel, SessionClose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionReq {
    pub session: SessionWireId,
}

impl Meta for SessionReq {
    fn encode(&self, w: &mut MetaWriter) {
        w.put_u64(self.session);
    }
    fn decode(r: &mut MetaReader<'_>) -> Result<Self, MetaError> {
        Ok(SessionReq { session: r.get_u64("session")? })
    }
}

/// What a prefill feeds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PrefillInput {
    Ids(Vec<u32>),
    /// Raw text, tokenized on the server without a chat template.
    Text(String),
}

/// Request of SessionPrefill.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionPrefillReq {
    pub session: SessionWireId,
    pub input: PrefillInput,
    /// Layers where the input pass pauses ([`crate::breakpoint`]); empty = none.
    pub breakpoints: Vec<u32>,
}

impl Meta for SessionPrefillReq {
    fn encode(&self, w: &mut MetaWriter) {
        w.put_u64(self.session);
        match &self.input {
            PrefillInput::Ids(ids) => {
                w.put_u8(0);
                put_ids(w, ids);
            }
            PrefillInput::Text(t) => {
                w.put_u8(1);
                w.put_str(t);
            }
        }
        put_breakpoints(w, &self.breakpoints);
    }
    fn decode(r: &mut MetaReader<'_>) -> Result<Self, MetaError> {
        let session = r.get_u64("session")?;
        let input = match r.get_u8("input kind")? {
            0 => PrefillInput::Ids(get_ids(r, "prompt ids", SESSION_PROMPT_IDS_MAX)?),
            1 => PrefillInput::Text(r.get_str("prompt text", SESSION_TEXT_BYTES_MAX)?.to_owned()),
            k => return Err(MetaError::BadValue { what: "input kind", value: k as u64 }),
        };
        Ok(SessionPrefillReq { session, input, breakpoints: get_breakpoints(r)? })
    }
}

/// Reply of SessionPrefill and SessionAppend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillReply {
    /// Tokens this request added to the session.
    pub prompt_tokens: u32,
    /// Tokens the session holds now.
    pub context_tokens: u32,
}

impl Meta for PrefillReply {
    fn encode(&self, w: &mut MetaWriter) {
        w.put_u32(self.prompt_tokens);
        w.put_u32(self.context_tokens);
    }
    fn decode(r: &mut MetaReader<'_>) -> Result<Self, MetaError> {
        Ok(PrefillReply { prompt_tokens: r.get_u32("prompt_tokens")?, context_tokens: r.get_u32("context_tokens")? })
    }
}

/// Request of SessionAppend: one more chat turn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionAppendReq {
    pub session: SessionWireId,
    /// "user" or "system".
    pub role: String,
    pub text: String,
}

impl Meta for SessionAppendReq {
    fn encode(&self, w: &mut MetaWriter) {
        w.put_u64(self.session);
        w.put_str(&self.role);
        w.put_str(&self.text);
    }
    fn decode(r: &mut MetaReader<'_>) -> Result<Self, MetaError> {
        Ok(SessionAppendReq {
            session: r.get_u64("session")?,
            role: r.get_str("role", SESSION_ROLE_BYTES_MAX)?.to_owned(),
            text: r.get_str("turn text", SESSION_TEXT_BYTES_MAX)?.to_owned(),
        })
    }
}

/// Request of SessionDecode.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionDecodeReq {
    pub session: SessionWireId,
    /// Fed into the session before the first token is sampled.
    pub feed: DecodeFeed,
    pub max_new_tokens: u32,
    /// ≤ 0 = greedy.
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub seed: u64,
    pub ignore_eos: bool,
    pub logits: LogitsWire,
    pub stop: Vec<String>,
    /// Layers where the input pass pauses ([`crate::breakpoint`]); empty = none.
    pub breakpoints: Vec<u32>,
}

impl Meta for SessionDecodeReq {
    fn encode(&self, w: &mut MetaWriter) {
        w.put_u64(self.session);
        w.put_u32(self.max_new_tokens);
        w.put_f32(self.temperature);
        w.put_u32(self.top_k);
        w.put_f32(self.top_p);
        w.put_u64(self.seed);
        w.put_u8(self.ignore_eos as u8);
        let (mode, k) = match self.logits {
            LogitsWire::None => (0, 0),
            LogitsWire::TopK(k) => (1, k),
            LogitsWire::Full => (2, 0),
        };
        w.put_u8(mode);
        w.put_u16(k);
        w.put_count(self.stop.len());
        for s in &self.stop {
            w.put_str(s);
        }
        self.feed.encode(w);
        put_breakpoints(w, &self.breakpoints);
    }
    fn decode(r: &mut MetaReader<'_>) -> Result<Self, MetaError> {
        let session = r.get_u64("session")?;
        let max_new_tokens = r.get_u32("max_new_tokens")?;
        let temperature = r.get_f32("temperature")?;
        let top_k = r.get_u32("top_k")?;
        let top_p = r.get_f32("top_p")?;
        let seed = r.get_u64("seed")?;
        let ignore_eos = get_bool(r, "ignore_eos")?;
        let mode = r.get_u8("logits mode")?;
        let k = r.get_u16("logits_k")?;
        let logits = match mode {
            0 => LogitsWire::None,
            1 if k >= 1 && k as usize <= SESSION_TOPK_LOGITS_MAX => LogitsWire::TopK(k),
            1 => return Err(MetaError::BadValue { what: "logits_k", value: k as u64 }),
            2 => LogitsWire::Full,
            m => return Err(MetaError::BadValue { what: "logits mode", value: m as u64 }),
        };
        if !temperature.is_finite() || !top_p.is_finite() {
            return Err(MetaError::BadValue { what: "temperature/top_p not finite", value: 0 });
        }
        let stop = r.get_str_list("stop strings", SESSION_STOP_STRINGS_MAX, SESSION_STOP_BYTES_MAX)?;
        let feed = DecodeFeed::decode(r)?;
        let breakpoints = get_breakpoints(r)?;
        Ok(SessionDecodeReq {
            session,
            feed,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            seed,
            ignore_eos,
            logits,
            stop,
            breakpoints,
        })
    }
}

/// Input a decode feeds before sampling its first token: u8 kind (0 none, 1 ids, 2 raw text,
/// 3 chat turn) then `[u32]`, `str`, or `str role, str text`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum DecodeFeed {
    #[default]
    None,
    Ids(Vec<u32>),
    /// Raw text, tokenized on the server without a chat template.
    Text(String),
    /// One chat turn, as `SessionAppend` feeds it.
    Turn {
        role: String,
        text: String,
    },
}

impl DecodeFeed {
    fn encode(&self, w: &mut MetaWriter) {
        match self {
            DecodeFeed::None => w.put_u8(0),
            DecodeFeed::Ids(ids) => {
                w.put_u8(1);
                put_ids(w, ids);
            }
            DecodeFeed::Text(t) => {
                w.put_u8(2);
                w.put_str(t);
            }
            DecodeFeed::Turn { role, text } => {
                w.put_u8(3);
                w.put_str(role);
                w.put_str(text);
            }
        }
    }
    fn decode(r: &mut MetaReader<'_>) -> Result<Self, MetaError> {
        Ok(match r.get_u8("feed kind")? {
            0 => DecodeFeed::None,
            1 => DecodeFeed::Ids(get_ids(r, "prompt ids", SESSION_PROMPT_IDS_MAX)?),
            2 => DecodeFeed::Text(r.get_str("prompt text", SESSION_TEXT_BYTES_MAX)?.to_owned()),
            3 => DecodeFeed::Turn {
                role: r.get_str("role", SESSION_ROLE_BYTES_MAX)?.to_owned(),
                text: r.get_str("turn text", SESSION_TEXT_BYTES_MAX)?.to_owned(),
            },
            k => return Err(MetaError::BadValue { what: "feed kind", value: k as u64 }),
        })
    }
}

/// One generated token: the metadata of a `SessionToken` stream frame. Encoded from borrowed
/// parts on the server ([`SessionToken::encode_parts`]) and parsed without allocating the text on
/// the client ([`SessionToken::parse`]).
#[derive(Clone, Debug, PartialEq)]
pub struct SessionToken<'a> {
    pub token: u32,
    /// 0-based index of the token within its decode.
    pub index: u32,
    pub text: &'a str,
}

impl<'a> SessionToken<'a> {
    /// Appends a token frame's metadata to `w`.
    pub fn encode_parts(w: &mut MetaWriter, token: u32, index: u32, text: &str, top_k: &[(u32, f32)]) {
        w.put_u32(token);
        w.put_u32(index);
        w.put_str(text);
        w.put_count(top_k.len());
        for &(id, l) in top_k {
            w.put_u32(id);
            w.put_f32(l);
        }
    }

    /// Parses a token frame's metadata; the top-k pairs are written into `top_k` (cleared).
    pub fn parse(meta: &'a [u8], top_k: &mut Vec<(u32, f32)>) -> Result<SessionToken<'a>, MetaError> {
        let mut r = MetaReader::new(meta);
        let token = r.get_u32("token")?;
        let index = r.get_u32("token index")?;
        let text = r.get_str("token text", SESSION_DELTA_BYTES_MAX)?;
        let n = r.get_count("top-k logits", 8, SESSION_TOPK_LOGITS_MAX)?;
        top_k.clear();
        for _ in 0..n {
            let id = r.get_u32("top-k id")?;
            top_k.push((id, r.get_f32("top-k logit")?));
        }
        r.finish()?;
        Ok(SessionToken { token, index, text })
    }
}

/// Final frame of a decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionDecodeReply {
    pub tokens: u32,
    pub finish: FinishWire,
    pub context_tokens: u32,
    /// Tokens the decode's own input added (0 without one).
    pub prompt_tokens: u32,
}

impl Meta for SessionDecodeReply {
    fn encode(&self, w: &mut MetaWriter) {
        w.put_u32(self.tokens);
        w.put_u8(self.finish as u8);
        w.put_u32(self.context_tokens);
        w.put_u32(self.prompt_tokens);
    }
    fn decode(r: &mut MetaReader<'_>) -> Result<Self, MetaError> {
        Ok(SessionDecodeReply {
            tokens: r.get_u32("tokens")?,
            finish: FinishWire::from_u8(r.get_u8("finish")?)?,
            context_tokens: r.get_u32("context_tokens")?,
            prompt_tokens: r.get_u32("prompt_tokens")?,
        })
    }
}

/// Request of Logits: every position's logits of `ids` on a temporary session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogitsReq {
    pub model: String,
    pub ids: Vec<u32>,
}

impl Meta for LogitsReq {
    fn encode(&self, w: &mut MetaWriter) {
        w.put_str(&self.model);
        put_ids(w, &self.ids);
    }
    fn decode(r: &mut MetaReader<'_>) -> Result<Self, MetaError> {
        Ok(LogitsReq {
            model: r.get_str("model", NAME_BYTES_MAX)?.to_owned(),
            ids: get_ids(r, "ids", SESSION_PROMPT_IDS_MAX)?,
        })
    }
}

/// Reply of Logits; the data is `rows × vocab` f32 little-endian.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogitsReply {
    pub rows: u32,
    pub vocab: u32,
}

impl Meta for LogitsReply {
    fn encode(&self, w: &mut MetaWriter) {
        w.put_u32(self.rows);
        w.put_u32(self.vocab);
    }
    fn decode(r: &mut MetaReader<'_>) -> Result<Self, MetaError> {
        Ok(LogitsReply { rows: r.get_u32("rows")?, vocab: r.get_u32("vocab")? })
    }
}

/// Runs every session decoder over `meta` (fuzzing): how many accepted it.
pub fn decode_all_session_meta(meta: &[u8]) -> usize {
    let mut top_k = Vec::new();
    [
        SessionOpenReq::from_meta(meta).is_ok(),
        SessionInfoReply::from_meta(meta).is_ok(),
        SessionReq::from_meta(meta).is_ok(),
        SessionPrefillReq::from_meta(meta).is_ok(),
        PrefillReply::from_meta(meta).is_ok(),
        SessionAppendReq::from_meta(meta).is_ok(),
        SessionDecodeReq::from_meta(meta).is_ok(),
        SessionToken::parse(meta, &mut top_k).is_ok(),
        SessionDecodeReply::from_meta(meta).is_ok(),
        LogitsReq::from_meta(meta).is_ok(),
        LogitsReply::from_meta(meta).is_ok(),
    ]
    .iter()
    .filter(|&&ok| ok)
    .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::meta::assert_round_trip as round_trip;

    fn decode_req() -> SessionDecodeReq {
        SessionDecodeReq {
            session: 9,
            feed: DecodeFeed::None,
            max_new_tokens: 48,
            temperature: 0.7,
            top_k: 40,
            top_p: 0.9,
            seed: 1234,
            ignore_eos: true,
            logits: LogitsWire::TopK(5),
            stop: vec!["\n\n".into(), "END".into()],
            breakpoints: vec![],
        }
    }

    #[test]
    fn session_messages_round_trip() {
        round_trip(&SessionOpenReq { model: "tiny".into(), qos: QosWire::Batch, max_tokens: 0, deadline_ms: 0 });
        round_trip(&SessionOpenReq { model: "rt".into(), qos: QosWire::Realtime, max_tokens: 9, deadline_ms: 20 });
        round_trip(&SessionInfoReply {
            session: u64::MAX,
            context_tokens: 3,
            max_tokens: 64,
            vocab: 128,
            eos_ids: vec![2, 7],
            has_tokenizer: true,
            has_chat_template: false,
        });
        round_trip(&SessionReq { session: 42 });
        round_trip(&SessionPrefillReq {
            session: 1,
            input: PrefillInput::Ids(vec![1, 2, 3]),
            breakpoints: vec![2, 30],
        });
        round_trip(&SessionPrefillReq { session: 1, input: PrefillInput::Text("héllo".into()), breakpoints: vec![] });
        round_trip(&PrefillReply { prompt_tokens: 5, context_tokens: 12 });
        round_trip(&SessionAppendReq { session: 3, role: "user".into(), text: "and then?".into() });
        round_trip(&decode_req());
        round_trip(&SessionDecodeReq { logits: LogitsWire::Full, stop: vec![], ..decode_req() });
        round_trip(&SessionDecodeReq { feed: DecodeFeed::Ids(vec![3, 1, 4]), ..decode_req() });
        round_trip(&SessionDecodeReq {
            feed: DecodeFeed::Ids(vec![3, 1, 4]),
            breakpoints: vec![1, 10, 20],
            ..decode_req()
        });
        round_trip(&SessionDecodeReq { feed: DecodeFeed::Text("raw".into()), ..decode_req() });
        let turn = DecodeFeed::Turn { role: "user".into(), text: "hi".into() };
        round_trip(&SessionDecodeReq { feed: turn, ..decode_req() });
        round_trip(&SessionDecodeReply { tokens: 48, finish: FinishWire::Stop, context_tokens: 60, prompt_tokens: 12 });
        round_trip(&LogitsReq { model: "m".into(), ids: vec![0, 127] });
        round_trip(&LogitsReply { rows: 2, vocab: 128 });
    }

    #[test]
    fn token_frames_are_small_and_parse_in_place() {
        let mut w = MetaWriter::new();
        SessionToken::encode_parts(&mut w, 17, 3, " the", &[]);
        assert!(crate::HEADER_LEN + w.len() <= 64, "{} bytes", crate::HEADER_LEN + w.len());
        let mut top = vec![(0, 0.0)];
        let t = SessionToken::parse(w.as_bytes(), &mut top).unwrap();
        assert_eq!((t.token, t.index, t.text), (17, 3, " the"));
        assert!(top.is_empty());
        let mut w = MetaWriter::new();
        SessionToken::encode_parts(&mut w, 1, 0, "", &[(5, 1.5), (6, -2.0)]);
        let b = w.finish();
        assert_eq!(SessionToken::parse(&b, &mut top).unwrap().text, "");
        assert_eq!(top, vec![(5, 1.5), (6, -2.0)]);
        for cut in 0..b.len() {
            assert!(SessionToken::parse(&b[..cut], &mut top).is_err());
        }
    }

    #[test]
    fn bounds_and_bad_values_are_typed() {
        let mut bad = decode_req();
        bad.stop = vec!["x".into(); SESSION_STOP_STRINGS_MAX + 1];
        assert!(matches!(SessionDecodeReq::from_meta(&bad.to_meta()), Err(MetaError::TooMany { .. })));
        let mut bad = decode_req();
        bad.stop = vec!["x".repeat(SESSION_STOP_BYTES_MAX + 1)];
        assert!(matches!(SessionDecodeReq::from_meta(&bad.to_meta()), Err(MetaError::TooMany { .. })));
        let bad = SessionDecodeReq { logits: LogitsWire::TopK(0), ..decode_req() };
        assert!(matches!(SessionDecodeReq::from_meta(&bad.to_meta()), Err(MetaError::BadValue { .. })));
        let bad = SessionDecodeReq { logits: LogitsWire::TopK(65), ..decode_req() };
        assert!(matches!(SessionDecodeReq::from_meta(&bad.to_meta()), Err(MetaError::BadValue { .. })));
        let bad = SessionDecodeReq { temperature: f32::NAN, ..decode_req() };
        assert!(SessionDecodeReq::from_meta(&bad.to_meta()).is_err());
        let mut b =
            SessionOpenReq { model: "m".into(), qos: QosWire::Interactive, max_tokens: 1, deadline_ms: 0 }.to_meta();
        b[5] = 9;
        assert!(matches!(SessionOpenReq::from_meta(&b), Err(MetaError::BadValue { what: "qos", .. })));
        // A count that cannot fit in the bytes left is refused before allocating.
        let mut b = SessionPrefillReq { session: 1, input: PrefillInput::Ids(vec![1]), breakpoints: vec![] }.to_meta();
        b[9..13].copy_from_slice(&1_000_000u32.to_le_bytes());
        assert!(matches!(SessionPrefillReq::from_meta(&b), Err(MetaError::Truncated { .. })));
        let mut b = SessionPrefillReq { session: 1, input: PrefillInput::Ids(vec![]), breakpoints: vec![] }.to_meta();
        b[8] = 7;
        assert!(matches!(SessionPrefillReq::from_meta(&b), Err(MetaError::BadValue { .. })));
        let mut b =
            SessionDecodeReply { tokens: 1, finish: FinishWire::Eos, context_tokens: 1, prompt_tokens: 0 }.to_meta();
        b[4] = 4;
        assert!(SessionDecodeReply::from_meta(&b).is_err());
        assert_eq!(decode_all_session_meta(&[]), 0);
    }
}
