//! Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with their HTTP
//! status, and the mapping from the engine's typed statuses.

use djinn_proto::Status;
use serde::Serialize;

/// One error answer.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub http: u16,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
    pub message: String,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

/// Phrases with which the engine refuses input that does not fit the session or the KV capacity
/// (`session/engine_loop/{jobs,tokenize}.rs`); OpenAI names that `context_length_exceeded`.
const CONTEXT_PHRASES: [&str; 3] = ["prompt too long", "no room to generate", "whole KV capacity"];

impl ApiError {
    pub fn new(http: u16, kind: &'static str, code: Option<&'static str>, message: impl Into<String>) -> Self {
        ApiError { http, kind, param: None, code, message: message.into() }
    }

    /// 400 for a bad request body or parameter.
    pub fn invalid(param: Option<&'static str>, message: impl Into<String>) -> Self {
        ApiError { param, ..Self::new(400, "invalid_request_error", None, message) }
    }

    pub fn unauthorized() -> Self {
        let msg = "missing or wrong API key: send `Authorization: Bearer TOKEN` with a token of --auth-token-file";
        Self::new(401, "invalid_request_error", Some("invalid_api_key"), msg)
    }

    pub fn unknown_model(name: &str) -> Self {
        let msg = format!("the model `{name}` does not exist on this server (GET /v1/models lists them)");
        ApiError { param: Some("model"), ..Self::new(404, "invalid_request_error", Some("model_not_found"), msg) }
    }

    pub fn busy(message: impl Into<String>) -> Self {
        Self::new(429, "rate_limit_error", Some("rate_limit_exceeded"), message)
    }

    /// The answer to an engine refusal (`status` and its message).
    pub fn from_status(status: Status, message: &str) -> Self {
        let context = CONTEXT_PHRASES.iter().any(|p| message.contains(p));
        match status {
            Status::BadArgument | Status::OutOfMemory if context => ApiError {
                param: Some("messages"),
                ..Self::new(400, "invalid_request_error", Some("context_length_exceeded"), message)
            },
            Status::BadArgument => Self::invalid(None, message),
            Status::UnknownModel => ApiError {
                param: Some("model"),
                ..Self::new(404, "invalid_request_error", Some("model_not_found"), message)
            },
            Status::UnknownSession => ApiError {
                param: Some("session_id"),
                ..Self::new(404, "invalid_request_error", Some("session_not_found"), message)
            },
            Status::Unauthorized => Self::unauthorized(),
            Status::Busy | Status::LimitExceeded => Self::busy(message),
            Status::ShuttingDown | Status::OutOfMemory => Self::new(503, "server_error", Some(status.name()), message),
            _ => Self::new(500, "server_error", Some(status.name()), message),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Vec<u8> {
        let b = Body { error: Inner { message: &self.message, kind: self.kind, param: self.param, code: self.code } };
        serde_json::to_vec(&b).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_refusals_map_to_openai_codes() {
        let e = ApiError::from_status(Status::BadArgument, "prompt too long: 3 + 300 tokens exceed the session's 64");
        assert_eq!((e.http, e.code), (400, Some("context_length_exceeded")));
        assert_eq!(ApiError::from_status(Status::BadArgument, "temperature").code, None);
        assert_eq!(ApiError::from_status(Status::UnknownModel, "x").http, 404);
        assert_eq!(ApiError::from_status(Status::LimitExceeded, "x").http, 429);
        let v: serde_json::Value = serde_json::from_slice(&ApiError::unauthorized().body()).unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert!(v["error"]["param"].is_null());
    }
}
