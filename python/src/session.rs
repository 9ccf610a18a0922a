//! [`Session`]: a conversation the server keeps (KV cache and chat history), and [`Generation`],
//! the result of a decode read in one call.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use djinn_client::{Client, DecodeOptions, Feed, PrefillReply, SessionInfo};
use pyo3::prelude::*;
use pyo3::types::PyString;

use crate::conn::Shared;
use crate::errors::{Error, Res};
use crate::stream::{finish_name, TokenStream};

/// What a generation feeds before its first token.
enum Prompt {
    None,
    Text(String),
    Ids(Vec<u32>),
    Turn(String, String),
}

impl Prompt {
    fn from_py(p: Option<&Bound<'_, PyAny>>) -> PyResult<Prompt> {
        Ok(match p {
            None => Prompt::None,
            Some(p) if p.is_none() => Prompt::None,
            Some(p) => {
                match p.cast::<PyString>() {
                    Ok(s) => Prompt::Text(s.to_str()?.to_owned()),
                    Err(_) => Prompt::Ids(p.extract::<Vec<u32>>().map_err(|_| {
                        Error::Argument("prompt must be a str, a sequence of token ids, or None".into())
                    })?),
                }
            }
        })
    }

    fn feed(&self) -> Option<Feed<'_>> {
        match self {
            Prompt::None => None,
            Prompt::Text(t) => Some(Feed::Text(t)),
            Prompt::Ids(ids) => Some(Feed::Ids(ids)),
            Prompt::Turn(role, text) => Some(Feed::Turn { role, text }),
        }
    }
}

/// The result of a decode read in one call.
#[pyclass(frozen, get_all, module = "djinn._djinn")]
pub struct Generation {
    /// The generated text.
    text: String,
    /// The generated token ids.
    token_ids: Vec<u32>,
    /// Why the decode ended: "eos", "length", "stop" or "cancelled".
    finish: &'static str,
    /// Tokens the request's own input added.
    prompt_tokens: u32,
    /// Tokens the session holds after the decode.
    context_tokens: u32,
}

#[pymethods]
impl Generation {
    fn __repr__(&self) -> String {
        format!(
            "Generation(text={:?}, tokens={}, finish={:?}, context_tokens={})",
            self.text,
            self.token_ids.len(),
            self.finish,
            self.context_tokens
        )
    }
}

/// A session on a model the server holds. Only token ids and their text cross the wire per
/// decode step; the KV cache and the conversation stay on the server. Close it with `close()`
/// or a `with` block; otherwise it lives until its connection is gone and its lease runs out.
#[pyclass(frozen, module = "djinn._djinn")]
pub struct Session {
    shared: Arc<Shared>,
    info: SessionInfo,
    closed: AtomicBool,
}

impl Session {
    pub(crate) fn new(shared: Arc<Shared>, info: SessionInfo) -> Self {
        Session { shared, info, closed: AtomicBool::new(false) }
    }

    fn run(&self, py: Python<'_>, prompt: Prompt, opts: DecodeOptions) -> PyResult<Generation> {
        let sid = self.info.session;
        let (ids, text, s) = self.shared.with(py, move |c| {
            let mut ids = Vec::with_capacity(opts.max_new_tokens.min(4096) as usize);
            let mut text = String::new();
            let mut on_token = |ev: &djinn_client::TokenEvent<'_>| {
                ids.push(ev.token);
                text.push_str(ev.text);
                true
            };
            let s = match prompt.feed() {
                Some(feed) => c.generate(sid, feed, &opts, &mut on_token)?,
                None => c.decode(sid, &opts, &mut on_token)?,
            };
            Ok((ids, text, s))
        })?;
        Ok(Generation {
            text,
            token_ids: ids,
            finish: finish_name(s.finish),
            prompt_tokens: s.prompt_tokens,
            context_tokens: s.context_tokens,
        })
    }

    /// One call that feeds the session without decoding (`f` gets the client and the session id);
    /// returns `(prompt_tokens, context_tokens)`.
    fn feed_only(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&mut Client, u64) -> Res<PrefillReply> + Send,
    ) -> PyResult<(u32, u32)> {
        let sid = self.info.session;
        let r = self.shared.with(py, move |c| f(c, sid))?;
        Ok((r.prompt_tokens, r.context_tokens))
    }

    fn start(&self, py: Python<'_>, prompt: Prompt, opts: DecodeOptions) -> PyResult<TokenStream> {
        let sid = self.info.session;
        let serial = self.shared.open_stream(py, move |c| {
            Ok(match prompt.feed() {
                Some(feed) => c.generate_start(sid, feed, &opts)?,
                None => c.decode_start(sid, &opts)?,
            })
        })?;
        Ok(TokenStream::new(self.shared.clone(), serial, sid))
    }
}

#[allow(clippy::too_many_arguments)]
fn options(
    max_new_tokens: u32,
    temperature: f32,
    top_k: u32,
    top_p: f32,
    seed: u64,
    stop: Option<Vec<String>>,
    ignore_eos: bool,
) -> DecodeOptions {
    DecodeOptions {
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        stop: stop.unwrap_or_default(),
        ignore_eos,
        ..DecodeOptions::default()
    }
}

fn check_role(role: &str) -> Res<()> {
    match role {
        "user" | "system" => Ok(()),
        r => Err(Error::Argument(format!("role {r:?}: a turn is \"user\" or \"system\""))),
    }
}

#[pymethods]
impl Session {
    /// Generates in one call: feeds `prompt` (str = raw text, token ids, or None = nothing new)
    /// and decodes up to `max_new_tokens`, all in one request. Greedy unless `temperature` > 0.
    #[pyo3(signature = (prompt=None, *, max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0, seed=0, stop=None, ignore_eos=false))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompt: Option<&Bound<'_, PyAny>>,
        max_new_tokens: u32,
        temperature: f32,
        top_k: u32,
        top_p: f32,
        seed: u64,
        stop: Option<Vec<String>>,
        ignore_eos: bool,
    ) -> PyResult<Generation> {
        let p = Prompt::from_py(prompt)?;
        self.run(py, p, options(max_new_tokens, temperature, top_k, top_p, seed, stop, ignore_eos))
    }

    /// As `generate`, but returns a `TokenStream` of `(token_id, text)` as tokens arrive.
    #[pyo3(signature = (prompt=None, *, max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0, seed=0, stop=None, ignore_eos=false))]
    #[allow(clippy::too_many_arguments)]
    fn stream(
        &self,
        py: Python<'_>,
        prompt: Option<&Bound<'_, PyAny>>,
        max_new_tokens: u32,
        temperature: f32,
        top_k: u32,
        top_p: f32,
        seed: u64,
        stop: Option<Vec<String>>,
        ignore_eos: bool,
    ) -> PyResult<TokenStream> {
        let p = Prompt::from_py(prompt)?;
        self.start(py, p, options(max_new_tokens, temperature, top_k, top_p, seed, stop, ignore_eos))
    }

    /// One chat turn on the conversation the server keeps: the server applies the model's chat
    /// template to the new turn only and answers it. Returns a `Generation`, or with
    /// `stream=True` a `TokenStream`.
    #[pyo3(signature = (text, *, role="user", stream=false, max_new_tokens=128, temperature=0.0, top_k=0, top_p=1.0, seed=0, stop=None))]
    #[allow(clippy::too_many_arguments)]
    fn chat(
        &self,
        py: Python<'_>,
        text: String,
        role: &str,
        stream: bool,
        max_new_tokens: u32,
        temperature: f32,
        top_k: u32,
        top_p: f32,
        seed: u64,
        stop: Option<Vec<String>>,
    ) -> PyResult<Py<PyAny>> {
        check_role(role)?;
        let p = Prompt::Turn(role.to_owned(), text);
        let opts = options(max_new_tokens, temperature, top_k, top_p, seed, stop, false);
        Ok(if stream {
            Py::new(py, self.start(py, p, opts)?)?.into_any()
        } else {
            Py::new(py, self.run(py, p, opts)?)?.into_any()
        })
    }

    /// Feeds raw text (str) or token ids into the KV cache without generating; returns
    /// `(prompt_tokens, context_tokens)`.
    fn prefill(&self, py: Python<'_>, input: &Bound<'_, PyAny>) -> PyResult<(u32, u32)> {
        let p = Prompt::from_py(Some(input))?;
        self.feed_only(py, move |c, sid| {
            Ok(match &p {
                Prompt::Text(t) => c.prefill(sid, djinn_client::Input::Text(t))?,
                Prompt::Ids(ids) => c.prefill(sid, djinn_client::Input::Ids(ids))?,
                _ => return Err(Error::Argument("prefill needs text or token ids".into())),
            })
        })
    }

    /// Adds a chat turn ("user" or "system") without answering it; returns
    /// `(prompt_tokens, context_tokens)`.
    #[pyo3(signature = (text, role="user"))]
    fn append(&self, py: Python<'_>, text: String, role: &str) -> PyResult<(u32, u32)> {
        check_role(role)?;
        let role = role.to_owned();
        self.feed_only(py, move |c, sid| Ok(c.append_turn(sid, &role, &text)?))
    }

    /// Closes the session on the server and frees its KV cache (idempotent).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let sid = self.info.session;
        self.shared.with(py, move |c| Ok(c.close_session(sid)?))
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<bool> {
        if !self.shared.is_closed(py) {
            self.close(py)?;
        }
        Ok(false)
    }

    /// The session's id (give it to `Client.attach` on another connection of the same tenant).
    #[getter]
    fn id(&self) -> u64 {
        self.info.session
    }
    /// Tokens the session held when this object was made (open or attach).
    #[getter]
    fn context_tokens(&self) -> u32 {
        self.info.context_tokens
    }
    /// Longest the session may grow, in tokens.
    #[getter]
    fn max_tokens(&self) -> u32 {
        self.info.max_tokens
    }
    #[getter]
    fn vocab(&self) -> u32 {
        self.info.vocab
    }
    #[getter]
    fn eos_ids(&self) -> Vec<u32> {
        self.info.eos_ids.clone()
    }
    /// Whether the model has a tokenizer (text in and out).
    #[getter]
    fn has_tokenizer(&self) -> bool {
        self.info.has_tokenizer
    }
    /// Whether the model has a chat template (`chat`, `append`).
    #[getter]
    fn has_chat_template(&self) -> bool {
        self.info.has_chat_template
    }

    fn __repr__(&self) -> String {
        format!(
            "<Session id={} context_tokens={} vocab={}>",
            self.info.session, self.info.context_tokens, self.info.vocab
        )
    }
}
