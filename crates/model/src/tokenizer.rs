//! Text in, text out: `tokenizer.json` through the `tokenizers` crate, the model's chat template
//! (from `tokenizer_config.json` or `chat_template.jinja`) rendered with minijinja, and stop
//! strings (incremental detokenization is [`crate::detokenize`]).
//!
//! A model directory without `tokenizer.json` still serves token ids; only text needs this.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::detokenize::ByteTable;
use crate::error::{ModelError, Result};

pub struct TextTokenizer {
    path: PathBuf,
    inner: Tokenizer,
    chat_template: Option<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    /// Each id's bytes, for a byte-level or `Fuse` tokenizer (the streaming detokenizer's fast
    /// path).
    bytes: Option<ByteTable>,
}

/// `bos_token` in tokenizer_config.json is a string or `{"content": "..."}`.
fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

impl TextTokenizer {
    /// Loads `dir/tokenizer.json` (+ tokenizer_config.json / chat_template.jinja when present).
    /// `Ok(None)` when the directory has no tokenizer.
    pub fn load(dir: &Path) -> Result<Option<TextTokenizer>> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Ok(None);
        }
        let bytes = std::fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = if cfg_path.exists() { Some(crate::config::read_json(&cfg_path)?) } else { None };
        let jinja = dir.join("chat_template.jinja");
        let template = if jinja.exists() {
            Some(std::fs::read_to_string(&jinja).map_err(|e| ModelError::io(&jinja, e))?)
        } else {
            None
        };
        Self::from_parts(&path, &bytes, cfg.as_ref(), template).map(Some)
    }

    /// Builds from in-memory files (a converted GGUF carries them without a directory).
    pub fn from_parts(
        path: &Path,
        tokenizer_json: &[u8],
        config: Option<&Value>,
        chat_template: Option<String>,
    ) -> Result<TextTokenizer> {
        let inner = Tokenizer::from_bytes(tokenizer_json)
            .map_err(|e| ModelError::Tokenizer { path: path.to_path_buf(), why: e.to_string() })?;
        let mut template = chat_template;
        if template.is_none() {
            template = match config.and_then(|c| c.get("chat_template")) {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: take "default".
                Some(Value::Array(xs)) => xs
                    .iter()
                    .find(|x| x.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|x| x.get("template").and_then(Value::as_str))
                    .map(String::from),
                _ => None,
            };
        }
        Ok(TextTokenizer {
            path: path.to_path_buf(),
            bytes: ByteTable::build(&inner),
            inner,
            chat_template: template,
            bos_token: token_str(config.and_then(|c| c.get("bos_token"))),
            eos_token: token_str(config.and_then(|c| c.get("eos_token"))),
        })
    }

    pub(crate) fn err(&self, why: impl std::fmt::Display) -> ModelError {
        ModelError::Tokenizer { path: self.path.clone(), why: why.to_string() }
    }

    pub(crate) fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Each id's bytes, when the tokenizer is byte-level or `Fuse` ([`ByteTable::build`]).
    pub fn byte_table(&self) -> Option<&ByteTable> {
        self.bytes.as_ref()
    }

    /// Token ids of `text`; `special` adds the tokenizer's own BOS/EOS post-processing.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        Ok(self.inner.encode(text, special).map_err(|e| self.err(e))?.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| self.err(e))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The id of the configured EOS token, if any.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_id(t))
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders the chat template for one user message with the generation prompt appended.
    pub fn apply_chat(&self, user: &str) -> Result<String> {
        let src = self
            .chat_template
            .as_deref()
            .ok_or_else(|| ModelError::Template("the model has no chat template".into()))?;
        render_chat(src, &[("user", user)], self.bos_token.as_deref(), self.eos_token.as_deref())
    }

    /// Renders the chat template over a whole conversation (role, content), with or without the
    /// generation prompt (the assistant header) at the end.
    pub fn apply_chat_messages(&self, messages: &[(&str, &str)], add_generation_prompt: bool) -> Result<String> {
        let src = self
            .chat_template
            .as_deref()
            .ok_or_else(|| ModelError::Template("the model has no chat template".into()))?;
        render_chat_with(src, messages, self.bos_token.as_deref(), self.eos_token.as_deref(), add_generation_prompt)
    }
}

/// Renders a Hugging Face chat template (Jinja) over `messages` (role, content).
pub fn render_chat(src: &str, messages: &[(&str, &str)], bos: Option<&str>, eos: Option<&str>) -> Result<String> {
    render_chat_with(src, messages, bos, eos, true)
}

/// [`render_chat`] with the generation prompt optional.
pub fn render_chat_with(
    src: &str,
    messages: &[(&str, &str)],
    bos: Option<&str>,
    eos: Option<&str>,
    add_generation_prompt: bool,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    let tpl = env.template_from_str(src).map_err(|e| ModelError::Template(e.to_string()))?;
    use minijinja::Value as J;
    let msgs: Vec<J> = messages
        .iter()
        .map(|(r, c)| {
            J::from(std::collections::BTreeMap::from([
                ("role".to_string(), J::from(*r)),
                ("content".to_string(), J::from(*c)),
            ]))
        })
        .collect();
    let ctx = minijinja::context! {
        messages => msgs,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos.unwrap_or(""),
        eos_token => eos.unwrap_or(""),
    };
    tpl.render(ctx).map_err(|e| ModelError::Template(e.to_string()))
}

/// Watches generated text for stop strings.
#[derive(Debug, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    text: String,
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Self {
        StopStrings { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), text: String::new() }
    }

    /// Appends `delta`; returns the part of it to emit (the end of [`Self::text`]) and whether
    /// a stop string was hit (the stop string itself and anything after it are not emitted).
    pub fn push(&mut self, delta: &str) -> (&str, bool) {
        let start = self.text.len();
        self.text.push_str(delta);
        if self.stops.is_empty() {
            return (&self.text[start..], false);
        }
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        // Only a window that overlaps the new text can hold a new match.
        let mut from = start.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self.stops.iter().filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i)).min();
        match hit {
            Some(at) => {
                self.text.truncate(at);
                (&self.text[start.min(at)..], true)
            }
            None => (&self.text[start..], false),
        }
    }

    /// The text emitted so far.
    pub fn text(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_cut_across_deltas() {
        let mut s = StopStrings::new(vec!["END".into()]);
        assert_eq!(s.push("hello E"), ("hello E", false));
        let (emit, hit) = s.push("ND more");
        assert!(hit);
        assert_eq!(emit, "");
        assert_eq!(s.text(), "hello ");
        let mut s = StopStrings::new(vec!["\n\n".into()]);
        assert_eq!(s.push("ab\n\ncd"), ("ab", true));
    }

    #[test]
    fn chat_template_renders_smollm_style() {
        let src = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + \
                   '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% \
                   endif %}";
        let out = render_chat(src, &[("user", "Hi")], None, None).unwrap();
        assert_eq!(out, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
        let py = "{{ messages[0]['content'].strip().upper() }}";
        assert_eq!(render_chat(py, &[("user", " x ")], None, None).unwrap(), "X");
        let bad = "{{ raise_exception('nope') }}";
        assert!(render_chat(bad, &[("user", "x")], None, None).unwrap_err().to_string().contains("nope"));
    }
}
