//! Request parsing: the HTTP/1.1 head (httparse) with its bounds, and the JSON bodies of
//! `/v1/completions` and `/v1/chat/completions` (serde), checked into one [`Plan`].
//!
//! Parameters: `max_tokens` (`max_completion_tokens` too), `temperature`, `top_p`, `top_k`,
//! `seed`, `stop` (a string or up to 8 strings), `n` (only 1), `stream`,
//! `stream_options.include_usage`, our `session_id`, `qos` and `deadline_ms`, and vLLM's `ignore_eos`. A parameter we cannot honour and whose
//! absence would change the answer (`n` > 1, `logprobs`, `tools`, `echo`, `best_of` > 1, `suffix`) is a 400
//! naming it; the rest (penalties, `logit_bias`, `user`, ...) are ignored, as other
//! OpenAI-compatible servers do.

use djinn_proto::session::QosWire;
use serde::Deserialize;

use super::errors::ApiError;

/// Longest request head (request line and headers).
pub const HEAD_BYTES_MAX: usize = 16 << 10;
/// Headers read per request.
const HEADERS_MAX: usize = 32;

/// A parsed request head.
#[derive(Debug)]
pub struct Head {
    pub method: String,
    pub path: String,
    /// The token of `Authorization: Bearer TOKEN`.
    pub bearer: Option<Vec<u8>>,
    pub content_length: usize,
    /// The connection stays open after the answer (HTTP/1.1 without `Connection: close`).
    pub keep_alive: bool,
    /// Bytes of the head in the buffer.
    pub len: usize,
}

/// What the head parser says about the bytes so far.
pub enum HeadParse {
    Partial,
    Done(Head),
    Bad(ApiError),
}

pub fn head(buf: &[u8]) -> HeadParse {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > HEAD_BYTES_MAX => {
            return HeadParse::Bad(ApiError::new(431, "invalid_request_error", None, "request head too large"))
        }
        Ok(httparse::Status::Partial) => return HeadParse::Partial,
        Err(e) => return HeadParse::Bad(ApiError::invalid(None, format!("malformed HTTP request: {e}"))),
    };
    let mut h = Head {
        method: req.method.unwrap_or("").to_owned(),
        path: req.path.unwrap_or("").split('?').next().unwrap_or("").to_owned(),
        bearer: None,
        content_length: 0,
        keep_alive: req.version == Some(1),
        len,
    };
    for hd in req.headers.iter() {
        let v = hd.value;
        if hd.name.eq_ignore_ascii_case("content-length") {
            match std::str::from_utf8(v).ok().and_then(|s| s.trim().parse().ok()) {
                Some(n) => h.content_length = n,
                None => return HeadParse::Bad(ApiError::invalid(None, "bad Content-Length")),
            }
        } else if hd.name.eq_ignore_ascii_case("transfer-encoding") {
            let msg = "chunked request bodies are not accepted: send Content-Length";
            return HeadParse::Bad(ApiError::new(411, "invalid_request_error", None, msg));
        } else if hd.name.eq_ignore_ascii_case("connection") {
            let v = String::from_utf8_lossy(v).to_ascii_lowercase();
            if v.contains("close") {
                h.keep_alive = false;
            } else if v.contains("keep-alive") {
                h.keep_alive = true;
            }
        } else if hd.name.eq_ignore_ascii_case("authorization") {
            let t = v.strip_prefix(b"Bearer ").or_else(|| v.strip_prefix(b"bearer ")).unwrap_or(b"");
            h.bearer = Some(t.trim_ascii().to_vec());
        }
    }
    HeadParse::Done(h)
}

// ---- JSON bodies ------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Both endpoints' bodies (each reads its own input field).
#[derive(Deserialize)]
struct Body {
    model: String,
    #[serde(default)]
    messages: Option<Vec<Message>>,
    #[serde(default)]
    prompt: Option<Prompt>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<i64>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    session_id: Option<String>,
    #[serde(default)]
    qos: Option<String>,
    #[serde(default)]
    ignore_eos: Option<bool>,
    #[serde(default)]
    deadline_ms: Option<i64>,
    #[serde(default)]
    logprobs: Option<serde_json::Value>,
    #[serde(default)]
    tools: Option<serde_json::Value>,
    #[serde(default)]
    echo: Option<bool>,
    #[serde(default)]
    best_of: Option<u32>,
    #[serde(default)]
    suffix: Option<String>,
}

/// The endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

/// The input of a request.
#[derive(Debug, Clone)]
pub enum Input {
    /// Chat messages (role, text), the template applied on the server.
    Messages(Vec<(String, String)>),
    Text(String),
    Ids(Vec<u32>),
}

/// Which session a request runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionMode {
    /// A temporary session, closed at the end (no `session_id`).
    Stateless,
    /// `"new"`: a server-kept session, its id returned.
    New,
    /// An existing server-kept session: the input is appended to it.
    Existing(u64),
}

/// A checked request.
#[derive(Debug, Clone)]
pub struct Plan {
    pub kind: Kind,
    pub model: String,
    pub input: Input,
    pub max_tokens: u32,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: u32,
    pub seed: u64,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub session: SessionMode,
    /// QoS class of the session the request opens (stateless or `"new"`); an existing session
    /// keeps the class it was opened with.
    pub qos: QosWire,
    /// Deadline per token of the session the request opens, ms (0 = none): a short one serves
    /// the session in a more urgent class, as on the binary protocol.
    pub deadline_ms: u32,
    /// Decode past the end-of-sequence token (vLLM's extension): exactly `max_tokens` tokens.
    pub ignore_eos: bool,
}

/// Default `max_tokens` of `/v1/completions` (OpenAI's); chat defaults to the room left.
const COMPLETION_MAX_TOKENS_DEFAULT: u32 = 16;

/// A session id as the API writes it (16 hex digits).
pub fn session_str(id: u64) -> String {
    format!("{id:016x}")
}

pub fn body(kind: Kind, bytes: &[u8], seed: u64) -> Result<Plan, ApiError> {
    let b: Body = serde_json::from_slice(bytes).map_err(|e| ApiError::invalid(None, format!("malformed JSON: {e}")))?;
    if b.n.unwrap_or(1) != 1 {
        return Err(ApiError::invalid(Some("n"), "only n = 1 is supported"));
    }
    if b.best_of.unwrap_or(1) != 1 {
        return Err(ApiError::invalid(Some("best_of"), "only best_of = 1 is supported"));
    }
    let unsupported = [
        ("logprobs", b.logprobs.as_ref().is_some_and(|v| !(v.is_null() || v == &serde_json::Value::Bool(false)))),
        ("tools", b.tools.as_ref().is_some_and(|v| !(v.is_null() || v.as_array().is_some_and(|a| a.is_empty())))),
        ("echo", b.echo == Some(true)),
        ("suffix", b.suffix.is_some()),
    ];
    if let Some((p, _)) = unsupported.iter().find(|(_, on)| *on) {
        return Err(ApiError::invalid(Some(p), format!("`{p}` is not supported by this server")));
    }
    let temperature = b.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(Some("temperature"), "temperature must be between 0 and 2"));
    }
    let top_p = b.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(Some("top_p"), "top_p must be in (0, 1]"));
    }
    // vLLM's convention: -1 (or 0) = no top-k cut.
    let top_k = match b.top_k.unwrap_or(0) {
        k if k <= 0 => 0,
        k => u32::try_from(k).unwrap_or(u32::MAX),
    };
    let stop = match b.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    let stop: Vec<String> = stop.into_iter().filter(|s| !s.is_empty()).collect();
    if stop.len() > djinn_proto::session::SESSION_STOP_STRINGS_MAX
        || stop.iter().any(|s| s.len() > djinn_proto::session::SESSION_STOP_BYTES_MAX)
    {
        let msg = format!(
            "at most {} stop strings of {} bytes each",
            djinn_proto::session::SESSION_STOP_STRINGS_MAX,
            djinn_proto::session::SESSION_STOP_BYTES_MAX
        );
        return Err(ApiError::invalid(Some("stop"), msg));
    }
    let session = match b.session_id.as_deref() {
        None => SessionMode::Stateless,
        Some("new") => SessionMode::New,
        Some(s) => match u64::from_str_radix(s, 16) {
            Ok(id) if s.len() <= 16 => SessionMode::Existing(id),
            _ => {
                return Err(ApiError::invalid(Some("session_id"), "session_id: \"new\" or an id this server returned"))
            }
        },
    };
    let qos = match b.qos.as_deref() {
        None | Some("interactive") => QosWire::Interactive,
        Some("realtime") => QosWire::Realtime,
        Some("batch") => QosWire::Batch,
        Some("background") => QosWire::Background,
        Some(other) => {
            let msg = format!("qos {other:?}: one of \"realtime\", \"interactive\", \"batch\", \"background\"");
            return Err(ApiError::invalid(Some("qos"), msg));
        }
    };
    let deadline_ms = match b.deadline_ms.unwrap_or(0) {
        d if (0..=i64::from(u32::MAX)).contains(&d) => d as u32,
        _ => return Err(ApiError::invalid(Some("deadline_ms"), "deadline_ms: milliseconds, 0 (none) or more")),
    };
    let input = match kind {
        Kind::Chat => {
            let msgs = b.messages.ok_or_else(|| ApiError::invalid(Some("messages"), "`messages` is required"))?;
            if msgs.is_empty() {
                return Err(ApiError::invalid(Some("messages"), "`messages` is empty"));
            }
            let mut out = Vec::with_capacity(msgs.len());
            for m in msgs {
                let role = match m.role.as_str() {
                    "developer" => "system".to_owned(),
                    "system" | "user" | "assistant" => m.role,
                    other => {
                        let msg =
                            format!("role {other:?}: this server takes system, developer, user and assistant messages");
                        return Err(ApiError::invalid(Some("messages"), msg));
                    }
                };
                let text = match m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t,
                    Some(Content::Parts(parts)) => {
                        let mut t = String::new();
                        for p in parts {
                            match (p.kind.as_str(), p.text) {
                                ("text", Some(x)) => t.push_str(&x),
                                (k, _) => {
                                    let msg = format!("content part {k:?}: only text parts are supported");
                                    return Err(ApiError::invalid(Some("messages"), msg));
                                }
                            }
                        }
                        t
                    }
                };
                out.push((role, text));
            }
            if out.last().is_some_and(|(r, _)| r == "assistant") {
                let msg = "the last message must be a user or system message";
                return Err(ApiError::invalid(Some("messages"), msg));
            }
            Input::Messages(out)
        }
        Kind::Completion => match b.prompt {
            Some(Prompt::Text(t)) => Input::Text(t),
            Some(Prompt::Texts(mut v)) if v.len() == 1 => Input::Text(v.remove(0)),
            Some(Prompt::Ids(ids)) if !ids.is_empty() => Input::Ids(ids),
            Some(_) => return Err(ApiError::invalid(Some("prompt"), "one prompt per request (a string or token ids)")),
            None => return Err(ApiError::invalid(Some("prompt"), "`prompt` is required")),
        },
    };
    if matches!(&input, Input::Text(t) if t.is_empty()) {
        return Err(ApiError::invalid(Some("prompt"), "`prompt` is empty"));
    }
    let max_tokens = match (b.max_completion_tokens.or(b.max_tokens), kind) {
        (Some(0), _) => return Err(ApiError::invalid(Some("max_tokens"), "max_tokens must be at least 1")),
        (Some(n), _) => n,
        (None, Kind::Completion) => COMPLETION_MAX_TOKENS_DEFAULT,
        (None, Kind::Chat) => u32::MAX,
    };
    Ok(Plan {
        kind,
        model: b.model,
        input,
        max_tokens,
        temperature,
        top_p,
        top_k,
        seed: b.seed.map_or(seed, |s| s as u64),
        stop,
        stream: b.stream.unwrap_or(false),
        include_usage: b.stream_options.unwrap_or_default().include_usage,
        session,
        qos,
        deadline_ms,
        ignore_eos: b.ignore_eos.unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_and_bodies() {
        let r = b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer tok\r\nContent-Length: 5\r\n\r\nhello";
        let HeadParse::Done(h) = head(r) else { panic!("head") };
        assert_eq!((h.path.as_str(), h.content_length, h.keep_alive), ("/v1/chat/completions", 5, true));
        assert_eq!(h.bearer.as_deref(), Some(&b"tok"[..]));
        assert!(matches!(head(b"POST / HTTP/1.1\r\nHost"), HeadParse::Partial));
        assert!(matches!(head(b"\x01\x02 / HTTP/1.1\r\n\r\n"), HeadParse::Bad(_)));

        let p = body(Kind::Chat, br#"{"model":"m","messages":[{"role":"developer","content":"s"},{"role":"user","content":[{"type":"text","text":"hi"}]}],"stop":"x","session_id":"new"}"#, 7).unwrap();
        assert!(matches!(&p.input, Input::Messages(m) if m[0].0 == "system" && m[1].1 == "hi"));
        assert_eq!((p.stop.len(), p.seed, p.session, p.max_tokens), (1, 7, SessionMode::New, u32::MAX));
        let e = body(Kind::Chat, br#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":2}"#, 0).unwrap_err();
        assert_eq!((e.http, e.param), (400, Some("n")));
        assert_eq!(body(Kind::Chat, b"{not json", 0).unwrap_err().http, 400);
        let p =
            body(Kind::Completion, br#"{"model":"m","prompt":[1,2,3],"session_id":"00000000000000ff"}"#, 0).unwrap();
        assert_eq!((p.max_tokens, p.session), (16, SessionMode::Existing(255)));
        assert_eq!((p.qos, p.deadline_ms), (QosWire::Interactive, 0));
        let p = body(Kind::Completion, br#"{"model":"m","prompt":"x","qos":"realtime","deadline_ms":20}"#, 0).unwrap();
        assert_eq!((p.qos, p.deadline_ms), (QosWire::Realtime, 20));
        let e = body(Kind::Completion, br#"{"model":"m","prompt":"x","qos":"urgent"}"#, 0).unwrap_err();
        assert_eq!((e.http, e.param), (400, Some("qos")));
        let e = body(Kind::Completion, br#"{"model":"m","prompt":"x","deadline_ms":-1}"#, 0).unwrap_err();
        assert_eq!((e.http, e.param), (400, Some("deadline_ms")));
    }
}
