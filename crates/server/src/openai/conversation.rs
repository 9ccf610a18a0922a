//! One HTTP request on the data plane: an [`Exchange`] turns a [`Plan`] into the session jobs a
//! binary client would send (open when needed, then one decode whose input is the request's
//! messages or prompt) on its own [`ConnLink`], and turns the frames the engine answers with
//! (the same `SessionToken` and final frames a binary client reads) into OpenAI JSON or
//! server-sent events.
//!
//! Sessions: a request without `session_id` runs in a temporary session of an ephemeral tenant
//! (the link's own, like an anonymous binary connection), so it ends with the link whatever the
//! client does; `"new"` and existing ids belong to the request's tenant, and the session's lease
//! starts when the request ends (its link closes), as for a binary connection.

use std::sync::Arc;

use djinn_proto::msg::ErrorReply;
use djinn_proto::session::{
    DecodeFeed, FinishWire, LogitsWire, SessionDecodeReply, SessionDecodeReq, SessionInfoReply, SessionOpenReq,
    SessionToken,
};
use djinn_proto::{Meta, Opcode, Status};
use serde::Serialize;

use super::errors::ApiError;
use super::parse::{session_str, Input, Kind, Plan, SessionMode};
use super::sse;
use crate::auth::TenantId;
use crate::quota::Ticket;
use crate::session::outbound::Frame;
use crate::session::{ConnLink, Request, SessionService};

const RID_OPEN: u64 = 1;
const RID_DECODE: u64 = 2;
const RID_CLOSE: u64 = 3;

/// Where an exchange is.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    Opening,
    Decoding,
    Done,
}

pub struct Exchange {
    pub link: Arc<ConnLink>,
    tenant: TenantId,
    plan: Plan,
    step: Step,
    session: Option<u64>,
    id: String,
    created: u64,
    /// Non-streamed text so far.
    text: String,
    /// The stream's head and first event are out.
    started: bool,
    /// The tenant's connection quota: a request in flight counts as one of its connections.
    _ticket: Ticket,
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
}

#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'a str,
    content: &'a str,
}

#[derive(Serialize)]
struct Choice<'a> {
    index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    delta: Option<Delta<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<Message<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<()>,
    finish_reason: Option<&'a str>,
}

#[derive(Serialize)]
struct Completion<'a> {
    id: &'a str,
    object: &'a str,
    created: u64,
    model: &'a str,
    choices: Vec<Choice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    session_id: Option<String>,
}

fn finish_name(f: FinishWire) -> &'static str {
    match f {
        FinishWire::Length => "length",
        _ => "stop",
    }
}

impl Exchange {
    /// Starts serving `plan` on `link`: submits its first job. On refusal the error to answer.
    pub fn start(
        svc: &SessionService,
        link: Arc<ConnLink>,
        tenant: TenantId,
        plan: Plan,
        seq: u64,
        ticket: Ticket,
    ) -> Result<Exchange, ApiError> {
        let prefix = if plan.kind == Kind::Chat { "chatcmpl" } else { "cmpl" };
        let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let mut ex = Exchange {
            id: format!("{prefix}-{seq:016x}"),
            created,
            link,
            tenant,
            step: Step::Opening,
            session: None,
            text: String::new(),
            started: false,
            plan,
            _ticket: ticket,
        };
        match ex.plan.session {
            SessionMode::Existing(id) => {
                ex.session = Some(id);
                ex.submit_decode(svc)?;
            }
            SessionMode::Stateless | SessionMode::New => {
                let req = SessionOpenReq {
                    model: ex.plan.model.clone(),
                    qos: ex.plan.qos,
                    max_tokens: 0,
                    deadline_ms: ex.plan.deadline_ms,
                };
                ex.submit(svc, RID_OPEN, Opcode::SessionOpen, Request::Open(req))?;
            }
        }
        Ok(ex)
    }

    pub fn is_done(&self) -> bool {
        self.step == Step::Done
    }

    fn submit(&self, svc: &SessionService, rid: u64, op: Opcode, req: Request) -> Result<(), ApiError> {
        svc.submit(&self.link, rid, op, self.tenant.clone(), req, false).map_err(|s| match s {
            Status::ShuttingDown => ApiError::from_status(s, "the server is shutting down"),
            _ => ApiError::busy("the session queue is full (session_queue_max): retry later"),
        })
    }

    fn submit_decode(&mut self, svc: &SessionService) -> Result<(), ApiError> {
        let p = &self.plan;
        let (feed, turns) = match &p.input {
            Input::Messages(m) => (DecodeFeed::None, Some(m.clone())),
            Input::Text(t) => (DecodeFeed::Text(t.clone()), None),
            Input::Ids(ids) => (DecodeFeed::Ids(ids.clone()), None),
        };
        let req = SessionDecodeReq {
            session: self.session.unwrap_or(0),
            feed,
            max_new_tokens: p.max_tokens,
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            seed: p.seed,
            ignore_eos: p.ignore_eos,
            logits: LogitsWire::None,
            stop: p.stop.clone(),
            breakpoints: Vec::new(),
        };
        let req = match turns {
            Some(t) => Request::Chat(req, t),
            None => Request::Decode(req),
        };
        self.step = Step::Decoding;
        self.submit(svc, RID_DECODE, Opcode::SessionDecode, req)
    }

    fn session_id(&self) -> Option<String> {
        match self.plan.session {
            SessionMode::Stateless => None,
            _ => self.session.map(session_str),
        }
    }

    fn object(&self) -> &'static str {
        match (self.plan.kind, self.plan.stream) {
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Completion, _) => "text_completion",
        }
    }

    /// One streamed chunk with `choice` (or none, for the usage chunk).
    fn chunk(&self, out: &mut Vec<u8>, choice: Option<Choice<'_>>, usage: Option<Usage>) {
        let c = Completion {
            id: &self.id,
            object: self.object(),
            created: self.created,
            model: &self.plan.model,
            choices: choice.into_iter().collect(),
            usage,
            session_id: self.session_id(),
        };
        sse::event(out, &c);
    }

    fn text_choice<'a>(&self, text: &'a str, finish: Option<&'a str>, first: bool) -> Choice<'a> {
        let chat = self.plan.kind == Kind::Chat;
        let (delta, message, text) = match (chat, self.plan.stream) {
            (true, true) => {
                let role = first.then_some("assistant");
                let content = (!text.is_empty() || finish.is_none()).then_some(text);
                (Some(Delta { role, content }), None, None)
            }
            (true, false) => (None, Some(Message { role: "assistant", content: text }), None),
            (false, _) => (None, None, Some(text)),
        };
        Choice { index: 0, delta, message, text, logprobs: None, finish_reason: finish }
    }

    /// An error: as the whole answer before the stream began, else as a last event.
    pub fn fail(&mut self, out: &mut Vec<u8>, e: &ApiError, keep_alive: bool) {
        self.step = Step::Done;
        if self.started {
            sse::event(out, &serde_json::from_slice::<serde_json::Value>(&e.body()).unwrap_or_default());
            sse::done(out);
        } else {
            sse::answer(out, e.http, "application/json", &e.body(), keep_alive);
        }
    }

    /// Handles one frame from the engine, appending what it means for the client to `out`.
    pub fn on_frame(&mut self, svc: &SessionService, f: &Frame, out: &mut Vec<u8>, keep_alive: bool) {
        let status = Status::try_from(f.header.status.get()).unwrap_or(Status::Internal);
        let op = f.header.opcode.get();
        if status != Status::Ok {
            let msg = ErrorReply::decode_bytes(&f.meta).message;
            if let (SessionMode::New, Some(id)) = (self.plan.session, self.session) {
                // The client never learns the id of a session whose first request failed: close it.
                let _ = self.submit(svc, RID_CLOSE, Opcode::SessionClose, Request::Close(id));
            }
            self.fail(out, &ApiError::from_status(status, &msg), keep_alive);
            return;
        }
        let bad = |out: &mut Vec<u8>, this: &mut Exchange, what: &str| {
            this.fail(
                out,
                &ApiError::new(500, "server_error", None, format!("bad {what} frame from the engine")),
                keep_alive,
            )
        };
        match (self.step == Step::Opening, op) {
            (true, o) if o == Opcode::SessionOpen.as_u16() => match SessionInfoReply::from_meta(&f.meta) {
                Ok(info) => {
                    self.session = Some(info.session);
                    if let Err(e) = self.submit_decode(svc) {
                        self.fail(out, &e, keep_alive);
                    }
                }
                Err(_) => bad(out, self, "open"),
            },
            (false, o) if o == Opcode::SessionToken.as_u16() => {
                let mut top = Vec::new();
                let Ok(t) = SessionToken::parse(&f.meta, &mut top) else { return bad(out, self, "token") };
                if !self.plan.stream {
                    self.text.push_str(t.text);
                    return;
                }
                let first = !self.started;
                if first {
                    sse::stream_head(out);
                    self.started = true;
                }
                if !t.text.is_empty() || first {
                    let c = self.text_choice(t.text, None, first);
                    self.chunk(out, Some(c), None);
                }
            }
            (false, o) if o == Opcode::SessionDecode.as_u16() => {
                let Ok(r) = SessionDecodeReply::from_meta(&f.meta) else { return bad(out, self, "decode reply") };
                self.finish(out, &r, keep_alive);
            }
            _ => {}
        }
    }

    fn finish(&mut self, out: &mut Vec<u8>, r: &SessionDecodeReply, keep_alive: bool) {
        self.step = Step::Done;
        let usage = Usage {
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.tokens,
            total_tokens: r.prompt_tokens + r.tokens,
        };
        let finish = finish_name(r.finish);
        if self.plan.stream {
            let first = !self.started;
            if first {
                sse::stream_head(out);
                self.started = true;
            }
            let c = self.text_choice("", Some(finish), first);
            self.chunk(out, Some(c), None);
            if self.plan.include_usage {
                self.chunk(out, None, Some(usage));
            }
            sse::done(out);
        } else {
            let text = std::mem::take(&mut self.text);
            let c = Completion {
                id: &self.id,
                object: self.object(),
                created: self.created,
                model: &self.plan.model,
                choices: vec![self.text_choice(&text, Some(finish), true)],
                usage: Some(usage),
                session_id: self.session_id(),
            };
            sse::json(out, 200, &c, keep_alive);
        }
    }
}
