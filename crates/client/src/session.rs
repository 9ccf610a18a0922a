//! The session API: open a session on a model the server holds, feed it ids, text or chat
//! turns, decode with a per-token callback (or collect), cancel, close, attach from another
//! connection, and stateless all-position logits.
//!
//! Only token ids and their text deltas cross the wire per decode step. A decode is one request
//! whose reply is a stream: `SessionToken` frames with the decode's request id, then one final
//! `SessionDecode` frame. Replies to other requests that arrive meanwhile are buffered like any
//! pipelined reply (within `replies_buffered_max`).

use djinn_proto::session::{
    LogitsReply, LogitsReq, PrefillInput, PrefillReply as PrefillWire, QosWire, SessionAppendReq, SessionInfoReply,
    SessionOpenReq, SessionPrefillReq, SessionReq,
};
use djinn_proto::{HiddenDType, HiddenDesc, HiddenReadReq, HiddenWriteReq, Meta, Opcode, PausedNote, ResumeReply};

use crate::stream::{DecodeStream, StreamEvent};
use crate::{decode, Client, ClientError, Result};

pub type SessionId = u64;

/// Scheduling class of a session: the server seats realtime before interactive before batch in
/// every step, each with a minimum share so none starves. `Background` is scheduled as `Batch`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Qos {
    Realtime,
    #[default]
    Interactive,
    Batch,
    Background,
}

impl Qos {
    /// The class's name, as `--qos` and the metrics spell it.
    pub fn name(self) -> &'static str {
        match self {
            Qos::Realtime => "realtime",
            Qos::Interactive => "interactive",
            Qos::Batch => "batch",
            Qos::Background => "background",
        }
    }
}

impl std::str::FromStr for Qos {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "realtime" => Ok(Qos::Realtime),
            "interactive" => Ok(Qos::Interactive),
            "batch" => Ok(Qos::Batch),
            "background" => Ok(Qos::Background),
            other => Err(format!("unknown QoS class {other:?}: expected realtime, interactive, batch or background")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct OpenOptions {
    pub model: String,
    pub qos: Qos,
    /// Longest the session may grow, in tokens; 0 = the model's maximum.
    pub max_tokens: u32,
    /// Time per output token needed, in ms (0 = none); a tight one raises the class (≤ 25 ms
    /// realtime, ≤ 250 ms interactive).
    pub deadline_ms: u32,
}

impl OpenOptions {
    pub fn new(model: impl Into<String>) -> Self {
        OpenOptions { model: model.into(), qos: Qos::Interactive, max_tokens: 0, deadline_ms: 0 }
    }
}

#[derive(Clone, Debug)]
pub struct SessionInfo {
    pub session: SessionId,
    pub context_tokens: u32,
    pub max_tokens: u32,
    pub vocab: u32,
    pub eos_ids: Vec<u32>,
    pub has_tokenizer: bool,
    pub has_chat_template: bool,
}

/// What a prefill feeds: token ids, or raw text tokenized on the server (no chat template).
pub enum Input<'a> {
    Ids(&'a [u32]),
    Text(&'a str),
}

/// Input a [`Client::generate`] feeds before its first token: ids, raw text, or a chat turn
/// (`role` "user" or "system", the template applied on the server).
#[derive(Clone, Copy, Debug)]
pub enum Feed<'a> {
    Ids(&'a [u32]),
    Text(&'a str),
    Turn { role: &'a str, text: &'a str },
}

#[derive(Clone, Copy, Debug)]
pub struct PrefillReply {
    /// Tokens this request added.
    pub prompt_tokens: u32,
    /// Tokens the session holds now.
    pub context_tokens: u32,
}

/// Logits each token event carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogitsRequest {
    #[default]
    None,
    TopK(u16),
    Full,
}

#[derive(Clone, Debug)]
pub struct DecodeOptions {
    pub max_new_tokens: u32,
    /// ≤ 0 = greedy.
    pub temperature: f32,
    /// 0 = no top-k cut.
    pub top_k: u32,
    /// 1 = no nucleus cut.
    pub top_p: f32,
    pub seed: u64,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    pub logits: LogitsRequest,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            max_new_tokens: 128,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
            stop: Vec::new(),
            ignore_eos: false,
            logits: LogitsRequest::None,
        }
    }
}

/// One generated token, as the callback sees it.
pub struct TokenEvent<'a> {
    pub token: u32,
    /// 0-based index within this decode.
    pub index: u32,
    /// The text this token completes (may be empty: an incomplete character, or a stop cut).
    pub text: &'a str,
    pub top_k: &'a [(u32, f32)],
    pub logits: Option<&'a [f32]>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    Eos,
    Length,
    Stop,
    Cancelled,
}

#[derive(Clone, Copy, Debug)]
pub struct DecodeSummary {
    pub tokens: u32,
    pub finish: FinishReason,
    pub context_tokens: u32,
    /// Tokens the request's own input added ([`Client::generate`]; 0 for [`Client::decode`]).
    pub prompt_tokens: u32,
}

fn info(r: SessionInfoReply) -> SessionInfo {
    SessionInfo {
        session: r.session,
        context_tokens: r.context_tokens,
        max_tokens: r.max_tokens,
        vocab: r.vocab,
        eos_ids: r.eos_ids,
        has_tokenizer: r.has_tokenizer,
        has_chat_template: r.has_chat_template,
    }
}

fn prefill_reply(op: Opcode, meta: &[u8]) -> Result<PrefillReply> {
    let r: PrefillWire = decode(op, meta)?;
    Ok(PrefillReply { prompt_tokens: r.prompt_tokens, context_tokens: r.context_tokens })
}

impl Client {
    /// Opens a session on `opts.model`.
    pub fn open_session(&mut self, opts: &OpenOptions) -> Result<SessionInfo> {
        let qos = match opts.qos {
            Qos::Interactive => QosWire::Interactive,
            Qos::Batch => QosWire::Batch,
            Qos::Background => QosWire::Background,
            Qos::Realtime => QosWire::Realtime,
        };
        let req = SessionOpenReq {
            model: opts.model.clone(),
            qos,
            max_tokens: opts.max_tokens,
            deadline_ms: opts.deadline_ms,
        };
        let r = self.call(Opcode::SessionOpen, &req.to_meta(), &[])?;
        Ok(info(decode(Opcode::SessionOpen, &r.meta)?))
    }

    /// Attaches this connection to a session of the same tenant (e.g. after a reconnect).
    pub fn attach_session(&mut self, session: SessionId) -> Result<SessionInfo> {
        let r = self.call(Opcode::SessionAttach, &SessionReq { session }.to_meta(), &[])?;
        Ok(info(decode(Opcode::SessionAttach, &r.meta)?))
    }

    /// Feeds ids or raw text into the session's KV cache.
    pub fn prefill(&mut self, session: SessionId, input: Input<'_>) -> Result<PrefillReply> {
        let input = match input {
            Input::Ids(ids) => PrefillInput::Ids(ids.to_vec()),
            Input::Text(t) => PrefillInput::Text(t.to_owned()),
        };
        let r = self.call(
            Opcode::SessionPrefill,
            &SessionPrefillReq { session, input, breakpoints: Vec::new() }.to_meta(),
            &[],
        )?;
        prefill_reply(Opcode::SessionPrefill, &r.meta)
    }

    /// [`Client::prefill`] whose input pass pauses after each of `breakpoints` (layers 1..=L,
    /// increasing; the input is fed in one pass). Unlike a plain prefill the pass feeds every
    /// token, the last included — a paused state is `[tokens, hidden]` over the session's
    /// pending token (if an earlier request left one) and `input` — and the session keeps the
    /// last token's state, from which the next [`Client::decode`] samples its first token.
    /// `on_pause` runs at each pause as for [`Client::generate_with_breakpoints`]; a cancel or
    /// the pause's lease ends the prefill `Cancelled`, rolled back.
    pub fn prefill_with_breakpoints(
        &mut self,
        session: SessionId,
        input: Input<'_>,
        breakpoints: &[u32],
        mut on_pause: impl FnMut(&mut Client, &PausedNote) -> Result<()>,
    ) -> Result<PrefillReply> {
        let input = match input {
            Input::Ids(ids) => PrefillInput::Ids(ids.to_vec()),
            Input::Text(t) => PrefillInput::Text(t.to_owned()),
        };
        let req = SessionPrefillReq { session, input, breakpoints: breakpoints.to_vec() };
        let id = self.submit(Opcode::SessionPrefill, &req.to_meta(), &[])?;
        let paused_op = Opcode::SessionPaused.as_u16();
        loop {
            // A reply read while `on_pause` waited for its own calls is buffered.
            let (rid, r) = match self.ready.remove(&id) {
                Some(r) => (id, r),
                None => self.recv_reply(None)?,
            };
            // Request id 0 is an unsolicited error that concerns the whole connection.
            if rid != id && rid != 0 {
                self.buffer_reply(rid, r)?;
                continue;
            }
            let reply = match r {
                Ok(reply) if reply.header.opcode.get() == paused_op => {
                    let note = PausedNote::from_meta(&reply.meta)
                        .map_err(|e| ClientError::Protocol { opcode: "SessionPaused", why: e.to_string() })?;
                    on_pause(self, &note)?;
                    continue;
                }
                r => r,
            };
            self.pending.remove(id);
            return prefill_reply(Opcode::SessionPrefill, &reply?.meta);
        }
    }

    /// Adds one chat turn (`role` "user" or "system"); the server applies the chat template over
    /// the conversation it keeps and feeds only the new tokens.
    pub fn append_turn(&mut self, session: SessionId, role: &str, text: &str) -> Result<PrefillReply> {
        let req = SessionAppendReq { session, role: role.to_owned(), text: text.to_owned() };
        let r = self.call(Opcode::SessionAppend, &req.to_meta(), &[])?;
        prefill_reply(Opcode::SessionAppend, &r.meta)
    }

    /// Streams tokens to `on_token`; returning `false` from it cancels (SessionCancel is sent and
    /// the stream is drained to its final frame, finish = Cancelled).
    pub fn decode(
        &mut self,
        session: SessionId,
        opts: &DecodeOptions,
        on_token: impl FnMut(&TokenEvent<'_>) -> bool,
    ) -> Result<DecodeSummary> {
        let stream = self.decode_start(session, opts)?;
        self.drive(stream, on_token, &mut |_, _| Ok(()))
    }

    /// Feeds `feed` and decodes in ONE request: the forward pass over the input also samples the
    /// first token (no separate prefill round trip).
    pub fn generate(
        &mut self,
        session: SessionId,
        feed: Feed<'_>,
        opts: &DecodeOptions,
        on_token: impl FnMut(&TokenEvent<'_>) -> bool,
    ) -> Result<DecodeSummary> {
        let stream = self.generate_start(session, feed, opts)?;
        self.drive(stream, on_token, &mut |_, _| Ok(()))
    }

    /// [`Client::generate`] whose input pass pauses after each of `breakpoints` (layers 1..=L,
    /// increasing; the input is fed in one pass). At each pause `on_pause` runs with this client
    /// and the pause: it may [`Client::read_hidden_f32`], [`Client::write_hidden_f32`], and must
    /// end with [`Client::resume`] or [`Client::cancel`] (else the pause's lease ends the
    /// request `Cancelled`, rolled back).
    pub fn generate_with_breakpoints(
        &mut self,
        session: SessionId,
        feed: Feed<'_>,
        opts: &DecodeOptions,
        breakpoints: &[u32],
        on_token: impl FnMut(&TokenEvent<'_>) -> bool,
        mut on_pause: impl FnMut(&mut Client, &PausedNote) -> Result<()>,
    ) -> Result<DecodeSummary> {
        let stream = self.start_fed(session, feed.into(), opts, breakpoints.to_vec())?;
        self.drive(stream, on_token, &mut on_pause)
    }

    /// The paused session's hidden state as `dtype` (f32 or the model's): its description and
    /// little-endian bytes, `[tokens, hidden]` row-major.
    pub fn read_hidden(&mut self, session: SessionId, dtype: HiddenDType) -> Result<(HiddenDesc, Vec<u8>)> {
        let r = self.call(Opcode::SessionHiddenRead, &HiddenReadReq { session, dtype }.to_meta(), &[])?;
        let desc: HiddenDesc = decode(Opcode::SessionHiddenRead, &r.meta)?;
        Ok((desc, r.data))
    }

    /// [`Client::read_hidden`] in f32.
    pub fn read_hidden_f32(&mut self, session: SessionId) -> Result<(HiddenDesc, Vec<f32>)> {
        let (desc, bytes) = self.read_hidden(session, HiddenDType::F32)?;
        Ok((desc, bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()))
    }

    /// Replaces the paused session's hidden state after `layer` layers with `values`
    /// (`[tokens, hidden]` f32, the paused state's shape).
    pub fn write_hidden_f32(
        &mut self,
        session: SessionId,
        layer: u32,
        tokens: u32,
        hidden: u32,
        values: &[f32],
    ) -> Result<()> {
        let desc = HiddenDesc { layer, tokens, hidden, dtype: HiddenDType::F32 };
        let bytes: Vec<u8> = values.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.call(Opcode::SessionHiddenWrite, &HiddenWriteReq { session, desc }.to_meta(), &[&bytes])?;
        Ok(())
    }

    /// Resumes the paused session's pass (from the state it holds now).
    pub fn resume(&mut self, session: SessionId) -> Result<()> {
        self.resume_reply(session)?;
        Ok(())
    }

    /// [`Client::resume`], with the server's reply: how often the pass's KV was swapped out to
    /// host memory while paused, this pause included.
    pub fn resume_reply(&mut self, session: SessionId) -> Result<ResumeReply> {
        let r = self.call(Opcode::SessionResume, &SessionReq { session }.to_meta(), &[])?;
        decode(Opcode::SessionResume, &r.meta)
    }

    /// Reads a started decode to its end, handing each token to `on_token` and each breakpoint
    /// pause to `on_pause` (the callback form over [`Client::stream_next`]).
    fn drive(
        &mut self,
        mut stream: DecodeStream,
        mut on_token: impl FnMut(&TokenEvent<'_>) -> bool,
        on_pause: &mut dyn FnMut(&mut Client, &PausedNote) -> Result<()>,
    ) -> Result<DecodeSummary> {
        loop {
            match self.stream_next(&mut stream)? {
                StreamEvent::Token(ev) => {
                    if !on_token(&ev) {
                        self.stream_cancel(&mut stream)?;
                    }
                }
                StreamEvent::Paused(note) => on_pause(self, &note)?,
                StreamEvent::Done(summary) => return Ok(summary),
            }
        }
    }

    /// Blocking form of [`Client::decode`]: all generated ids and the text.
    pub fn decode_collect(
        &mut self,
        session: SessionId,
        opts: &DecodeOptions,
    ) -> Result<(Vec<u32>, String, DecodeSummary)> {
        let mut ids = Vec::with_capacity(opts.max_new_tokens.min(4096) as usize);
        let mut text = String::new();
        let s = self.decode(session, opts, |ev| {
            ids.push(ev.token);
            text.push_str(ev.text);
            true
        })?;
        Ok((ids, text, s))
    }

    /// Ends the session's running decode (if any) at its next step, finish = Cancelled.
    pub fn cancel(&mut self, session: SessionId) -> Result<()> {
        self.call(Opcode::SessionCancel, &SessionReq { session }.to_meta(), &[])?;
        Ok(())
    }

    /// Closes the session and frees its KV cache.
    pub fn close_session(&mut self, session: SessionId) -> Result<()> {
        self.call(Opcode::SessionClose, &SessionReq { session }.to_meta(), &[])?;
        Ok(())
    }

    /// Every position's logits of `ids` (row-major `rows × vocab`), on a temporary session.
    pub fn logits(&mut self, model: &str, ids: &[u32]) -> Result<(u32, u32, Vec<f32>)> {
        let (rows, vocab, bytes) = self.logits_bytes(model, ids)?;
        let v = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Ok((rows, vocab, v))
    }

    /// [`Client::logits`] as the received bytes (little-endian f32, `rows × vocab`), for callers
    /// that view them in place (the Python client's numpy arrays).
    pub fn logits_bytes(&mut self, model: &str, ids: &[u32]) -> Result<(u32, u32, Vec<u8>)> {
        let req = LogitsReq { model: model.to_owned(), ids: ids.to_vec() };
        let r = self.call(Opcode::Logits, &req.to_meta(), &[])?;
        let h: LogitsReply = decode(Opcode::Logits, &r.meta)?;
        let n = h.rows as usize * h.vocab as usize;
        if r.data.len() != n * 4 {
            return Err(ClientError::Protocol {
                opcode: "Logits",
                why: format!("{} × {} logits announced, {} bytes arrived", h.rows, h.vocab, r.data.len()),
            });
        }
        Ok((h.rows, h.vocab, r.data))
    }
}
