//! Routing a complete request: `/healthz`, `/v1/models` (and `/v1/models/{id}`),
//! `/v1/completions`, `/v1/chat/completions`; authentication and the tenant's quota before any
//! work; everything else is answered here at once.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use djinn_backend::Backend;
use serde::Serialize;

use super::conversation::Exchange;
use super::errors::ApiError;
use super::parse::{self, Head, Kind, SessionMode};
use super::sse;
use crate::auth::TenantId;
use crate::server::Shared;
use crate::session::ConnLink;

/// The tenant of HTTP requests when the server has no token file: one tenant for all, so a
/// `session_id` can be used again from any connection (the id, 64 random bits, is the capability).
pub const ANONYMOUS_TENANT: &str = "anonymous";

/// What a request turned into.
pub enum Routed {
    /// Answered at once (bytes appended to the output).
    Answered,
    /// A session exchange is running.
    Started(Box<Exchange>),
}

#[derive(Serialize)]
struct ModelEntry<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

#[derive(Serialize)]
struct ModelList<'a> {
    object: &'static str,
    data: Vec<ModelEntry<'a>>,
}

/// Everything a request needs from the front besides the server.
pub struct Ctx<'a> {
    pub started_s: u64,
    /// A fresh link for a session exchange (only called once the request is accepted).
    pub new_link: &'a mut dyn FnMut() -> Arc<ConnLink>,
    /// Exchanges running now, and their bound.
    pub running: usize,
    pub seq: u64,
}

fn tenant<B: Backend>(sh: &Shared<B>, head: &Head) -> Result<TenantId, ApiError> {
    if !sh.auth.required() {
        return Ok(TenantId::Named(ANONYMOUS_TENANT.to_owned()));
    }
    let tok = head.bearer.as_deref().ok_or_else(ApiError::unauthorized)?;
    sh.auth.authenticate(tok).map(|t| TenantId::Named(t.to_owned())).ok_or_else(ApiError::unauthorized)
}

pub fn route<B: Backend>(sh: &Arc<Shared<B>>, head: &Head, body: &[u8], ctx: Ctx<'_>, out: &mut Vec<u8>) -> Routed {
    let ka = head.keep_alive;
    let err = |out: &mut Vec<u8>, e: ApiError| {
        sse::answer(out, e.http, "application/json", &e.body(), ka);
        Routed::Answered
    };
    let kind = match (head.method.as_str(), head.path.as_str()) {
        ("GET", "/healthz") => {
            let (code, body) = match sh.healthy.load(Ordering::Acquire) {
                true => (200, &b"ok\n"[..]),
                false => (503, &b"starting or draining\n"[..]),
            };
            sse::answer(out, code, "text/plain", body, ka);
            return Routed::Answered;
        }
        ("GET", p) if p == "/v1/models" || p.starts_with("/v1/models/") => {
            if let Err(e) = tenant(sh, head) {
                return err(out, e);
            }
            let names = sh.sessions.models();
            let created = ctx.started_s;
            fn entry(name: &str, created: u64) -> ModelEntry<'_> {
                ModelEntry { id: name, object: "model", created, owned_by: "djinn" }
            }
            match p.strip_prefix("/v1/models/") {
                None => {
                    let list =
                        ModelList { object: "list", data: names.iter().map(|m| entry(&m.name, created)).collect() };
                    sse::json(out, 200, &list, ka);
                }
                Some(id) => match names.iter().find(|m| m.name == id) {
                    Some(m) => sse::json(out, 200, &entry(&m.name, created), ka),
                    None => return err(out, ApiError::unknown_model(id)),
                },
            }
            return Routed::Answered;
        }
        ("POST", "/v1/chat/completions") => Kind::Chat,
        ("POST", "/v1/completions") => Kind::Completion,
        (_, "/v1/chat/completions" | "/v1/completions" | "/v1/models" | "/healthz") => {
            return err(out, ApiError::new(405, "invalid_request_error", None, "method not allowed"));
        }
        (_, p) => {
            return err(out, ApiError::new(404, "invalid_request_error", None, format!("no route {p}")));
        }
    };
    let tenant = match tenant(sh, head) {
        Ok(t) => t,
        Err(e) => return err(out, e),
    };
    let plan = match parse::body(kind, body, rand_seed(ctx.seq)) {
        Ok(p) => p,
        Err(e) => return err(out, e),
    };
    if !sh.sessions.models().iter().any(|m| m.name == plan.model) {
        return err(out, ApiError::unknown_model(&plan.model));
    }
    if ctx.running >= sh.cfg.http_api_requests_max {
        let msg = format!("{} requests are being served (http_api_requests_max): retry later", ctx.running);
        return err(out, ApiError::busy(msg));
    }
    // A request in flight counts as one of its tenant's connections.
    let ticket = match sh.quotas.connect(&tenant) {
        Ok(t) => t,
        Err(e) => return err(out, ApiError::busy(e.to_string())),
    };
    let link = (ctx.new_link)();
    // A temporary session belongs to the link alone (an ephemeral tenant, like an anonymous
    // binary connection): it is closed when the link closes, whatever the client does.
    let session_tenant = match plan.session {
        SessionMode::Stateless => TenantId::Connection(link.id),
        _ => tenant,
    };
    match Exchange::start(&sh.sessions, link.clone(), session_tenant, plan, ctx.seq, ticket) {
        Ok(ex) => Routed::Started(Box::new(ex)),
        Err(e) => {
            sh.sessions.connection_closed(&link);
            err(out, e)
        }
    }
}

/// A seed for requests that give none: different per request and per process.
fn rand_seed(seq: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(seq);
    h.finish()
}
