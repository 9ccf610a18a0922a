//! The pull form of a decode: start it, then read its events one at a time.
//!
//! [`Client::decode`] and [`Client::generate`] hand tokens to a callback; callers that cannot
//! hand over a callback for the whole decode (iterators of other languages, event loops) start a
//! [`DecodeStream`] instead and call [`Client::stream_next`] until it returns
//! [`StreamEvent::Done`]. Both forms are this one code path.
//!
//! Invariants: a stream's request stays pending on its connection until its final frame (or
//! error) has been read; replies to other requests that arrive meanwhile are buffered as any
//! pipelined reply. After [`Client::stream_cancel`] the remaining token frames are read and
//! dropped, so the stream always ends on its final frame and the connection stays in step.

use djinn_proto::session::{
    DecodeFeed, FinishWire, LogitsWire, SessionDecodeReply, SessionDecodeReq, SessionReq, SessionToken,
};
use djinn_proto::{Meta, Opcode, PausedNote};

use crate::session::{DecodeOptions, DecodeSummary, Feed, FinishReason, LogitsRequest, SessionId, TokenEvent};
use crate::{decode, Client, ClientError, Result};

/// A decode in progress on one connection. Its buffers are reused from token to token: a token
/// event borrows them until the next [`Client::stream_next`].
pub struct DecodeStream {
    id: u64,
    session: SessionId,
    /// The SessionCancel request, once sent.
    cancel: Option<u64>,
    finished: bool,
    /// The latest token frame's metadata (the event's text points into it).
    meta: Vec<u8>,
    top_k: Vec<(u32, f32)>,
    logits: Vec<f32>,
}

/// What [`Client::stream_next`] read.
pub enum StreamEvent<'a> {
    Token(TokenEvent<'a>),
    /// The input pass stopped at a breakpoint (only for decodes started with breakpoints): the
    /// session waits for [`Client::resume`] or [`Client::cancel`] before the stream goes on.
    Paused(PausedNote),
    /// The decode's final frame: the stream is over.
    Done(DecodeSummary),
}

impl DecodeStream {
    /// The decode's request id on its connection.
    pub fn request_id(&self) -> u64 {
        self.id
    }
    pub fn session(&self) -> SessionId {
        self.session
    }
    /// The final frame (or the server's refusal) has been read.
    pub fn is_finished(&self) -> bool {
        self.finished
    }
    /// [`Client::stream_cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_some()
    }
}

impl From<Feed<'_>> for DecodeFeed {
    fn from(feed: Feed<'_>) -> DecodeFeed {
        match feed {
            Feed::Ids(ids) => DecodeFeed::Ids(ids.to_vec()),
            Feed::Text(t) => DecodeFeed::Text(t.to_owned()),
            Feed::Turn { role, text } => DecodeFeed::Turn { role: role.to_owned(), text: text.to_owned() },
        }
    }
}

impl Client {
    /// Starts a decode of `session` (no new input) and returns at once; read it with
    /// [`Client::stream_next`].
    pub fn decode_start(&mut self, session: SessionId, opts: &DecodeOptions) -> Result<DecodeStream> {
        self.start_fed(session, DecodeFeed::None, opts, Vec::new())
    }

    /// Starts a decode that first feeds `feed` (as [`Client::generate`]) and returns at once.
    pub fn generate_start(&mut self, session: SessionId, feed: Feed<'_>, opts: &DecodeOptions) -> Result<DecodeStream> {
        self.start_fed(session, feed.into(), opts, Vec::new())
    }

    pub(crate) fn start_fed(
        &mut self,
        session: SessionId,
        feed: DecodeFeed,
        opts: &DecodeOptions,
        breakpoints: Vec<u32>,
    ) -> Result<DecodeStream> {
        let logits = match opts.logits {
            LogitsRequest::None => LogitsWire::None,
            LogitsRequest::TopK(k) => LogitsWire::TopK(k),
            LogitsRequest::Full => LogitsWire::Full,
        };
        let req = SessionDecodeReq {
            session,
            feed,
            max_new_tokens: opts.max_new_tokens,
            temperature: opts.temperature,
            top_k: opts.top_k,
            top_p: opts.top_p,
            seed: opts.seed,
            ignore_eos: opts.ignore_eos,
            logits,
            stop: opts.stop.clone(),
            breakpoints,
        };
        let id = self.submit(Opcode::SessionDecode, &req.to_meta(), &[])?;
        Ok(DecodeStream {
            id,
            session,
            cancel: None,
            finished: false,
            meta: Vec::new(),
            top_k: Vec::new(),
            logits: Vec::new(),
        })
    }

    /// Reads the stream's next event, blocking until it arrives. After [`StreamEvent::Done`] or
    /// an error from the server the stream is finished, and another call is
    /// [`ClientError::UnknownRequest`].
    pub fn stream_next<'s>(&mut self, s: &'s mut DecodeStream) -> Result<StreamEvent<'s>> {
        if s.finished {
            return Err(ClientError::UnknownRequest(s.id));
        }
        let token_op = Opcode::SessionToken.as_u16();
        let paused_op = Opcode::SessionPaused.as_u16();
        loop {
            let (rid, r) = self.recv_reply(None)?;
            // Request id 0 is an unsolicited error that concerns the whole connection.
            if rid != s.id && rid != 0 {
                self.buffer_reply(rid, r)?;
                continue;
            }
            let reply = match r {
                Ok(reply) => reply,
                Err(e) => {
                    self.finish_stream(s)?;
                    return Err(e);
                }
            };
            if reply.header.opcode.get() == paused_op {
                let note = PausedNote::from_meta(&reply.meta)
                    .map_err(|e| ClientError::Protocol { opcode: "SessionPaused", why: e.to_string() })?;
                if s.cancel.is_some() {
                    // Cancelled: the pause is rolled back with the request.
                    continue;
                }
                return Ok(StreamEvent::Paused(note));
            }
            if reply.header.opcode.get() == token_op {
                if s.cancel.is_some() {
                    // Cancelled: drain to the final frame.
                    continue;
                }
                s.meta = reply.meta;
                let t = SessionToken::parse(&s.meta, &mut s.top_k)
                    .map_err(|e| ClientError::Protocol { opcode: "SessionToken", why: e.to_string() })?;
                let logits = if reply.data.is_empty() {
                    None
                } else {
                    s.logits.clear();
                    s.logits.extend(reply.data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
                    Some(&s.logits[..])
                };
                let ev = TokenEvent { token: t.token, index: t.index, text: t.text, top_k: &s.top_k, logits };
                return Ok(StreamEvent::Token(ev));
            }
            let parsed: Result<SessionDecodeReply> = decode(Opcode::SessionDecode, &reply.meta);
            self.finish_stream(s)?;
            let r = parsed?;
            let finish = match r.finish {
                FinishWire::Eos => FinishReason::Eos,
                FinishWire::Length => FinishReason::Length,
                FinishWire::Stop => FinishReason::Stop,
                FinishWire::Cancelled => FinishReason::Cancelled,
            };
            return Ok(StreamEvent::Done(DecodeSummary {
                tokens: r.tokens,
                finish,
                context_tokens: r.context_tokens,
                prompt_tokens: r.prompt_tokens,
            }));
        }
    }

    /// Asks the server to end the decode at its next step (SessionCancel). Token frames already
    /// on their way are dropped by [`Client::stream_next`], whose `Done` then says
    /// `Cancelled` (or the finish the decode reached first). A second call does nothing.
    pub fn stream_cancel(&mut self, s: &mut DecodeStream) -> Result<()> {
        if s.finished || s.cancel.is_some() {
            return Ok(());
        }
        let session = s.session;
        s.cancel = Some(self.submit(Opcode::SessionCancel, &SessionReq { session }.to_meta(), &[])?);
        Ok(())
    }

    /// The final frame has been read: the request is no longer pending, and a cancel's own
    /// (empty) reply is claimed (a decode that had already ended makes it a no-op).
    fn finish_stream(&mut self, s: &mut DecodeStream) -> Result<()> {
        s.finished = true;
        self.pending.remove(s.id);
        if let Some(c) = s.cancel {
            self.wait(c)?;
        }
        Ok(())
    }
}
