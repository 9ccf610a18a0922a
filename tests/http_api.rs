//! The OpenAI-compatible HTTP front against real server processes serving SmolLM2 (bf16):
//! every route, SSE framing (chunked, `data: {json}`, `[DONE]`), the same greedy text as
//! `generate --chat` / `generate` over the binary protocol (streamed and not), a `session_id`
//! conversation equal to the same turns on one binary session, and the error codes (400
//! malformed JSON / bad parameter / `context_length_exceeded`, 401, 404, 413, 429). Trials are
//! ignored, with the reason, when `models/smollm2-bf16` has not been fetched
//! (`scripts/fetch_smollm2.sh models/smollm2-bf16 bf16`).

mod common;

#[path = "common/http.rs"]
mod http;

use std::path::Path;
use std::process::Command;

use common::{tenants_file, ServerProc, BIN};
use djinn_client::{Client, ClientOptions, DecodeOptions, Feed, OpenOptions};
use http::Http;
use libtest_mimic::{Arguments, Trial};
use serde_json::{json, Value};

const MODEL_DIR: &str = "models/smollm2-bf16";
const CHAT: &str = "/v1/chat/completions";
const COMPL: &str = "/v1/completions";

fn model_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(MODEL_DIR)
}

fn start(extra: &[&str]) -> ServerProc {
    let spec = format!("smollm2={}", model_dir().display());
    let mut args = vec!["--listen", "tcp://127.0.0.1:0", "--gpus", "cpu", "--http-listen", "127.0.0.1:0"];
    args.extend_from_slice(&["--model", &spec]);
    args.extend_from_slice(extra);
    ServerProc::start(&args)
}

fn api(srv: &ServerProc) -> Http {
    Http::connect(srv.http_api.as_deref().expect("http api address"))
}

fn chat_body(text: &str, max_tokens: u32, stream: bool) -> String {
    json!({"model": "smollm2", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
           "temperature": 0, "stream": stream, "stream_options": {"include_usage": true}})
    .to_string()
}

/// `djinn-dataplane generate --server URL --model smollm2 --json ...`: (text, tokens).
fn generate_cli(url: &str, prompt: &str, chat: bool, n: u32) -> (String, usize) {
    let n = n.to_string();
    let mut args = vec!["generate", "--server", url, "--model", "smollm2", "--prompt", prompt, "--json"];
    args.extend_from_slice(&["--max-new-tokens", &n]);
    if chat {
        args.push("--chat");
    }
    let out = Command::new(BIN).args(&args).output().expect("run generate");
    assert!(out.status.success(), "generate failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("generate --json");
    (v["text"].as_str().unwrap().to_owned(), v["tokens"].as_array().unwrap().len())
}

/// Streamed text, checking the framing: chunked, every event a JSON chunk of `object`, the last
/// `[DONE]`, one usage chunk.
fn stream_text(c: &mut Http, path: &str, body: &str, object: &str) -> (String, Value) {
    let r = c.post(path, body, None);
    assert_eq!(r.code, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{events:?}");
    let mut text = String::new();
    let mut usage = Value::Null;
    let mut finish = None;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap_or_else(|err| panic!("{err}: {e}"));
        assert_eq!(v["object"], object, "{e}");
        assert!(v["id"].as_str().is_some_and(|s| !s.is_empty()));
        if !v["usage"].is_null() {
            assert!(v["choices"].as_array().unwrap().is_empty());
            usage = v["usage"].clone();
            continue;
        }
        let ch = &v["choices"][0];
        if let Some(t) = ch["delta"]["content"].as_str().or(ch["text"].as_str()) {
            text.push_str(t);
        }
        if let Some(f) = ch["finish_reason"].as_str() {
            assert!(finish.is_none(), "two finish reasons");
            finish = Some(f.to_owned());
        }
    }
    assert!(finish.is_some(), "no finish_reason");
    (text, usage)
}

fn routes_and_framing() {
    let srv = start(&[]);
    let mut c = api(&srv);
    let r = c.get("/healthz", None);
    assert_eq!((r.code, r.body.as_slice()), (200, &b"ok\n"[..]));
    let m = c.get("/v1/models", None).json();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], "smollm2");
    assert_eq!(c.get("/v1/models/smollm2", None).json()["id"], "smollm2");
    assert_eq!(c.get("/v1/models/other", None).code, 404);
    assert_eq!(c.get("/v2/nothing", None).code, 404);
    assert_eq!(c.get(CHAT, None).code, 405);

    let q = "What is the capital of France?";
    let r = c.post(CHAT, &chat_body(q, 12, false), None);
    assert_eq!(r.code, 200);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let text = v["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    let u = &v["usage"];
    assert_eq!(u["total_tokens"], u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap());
    assert!(v.get("session_id").is_none(), "a stateless request has no session");
    let (streamed, usage) = stream_text(&mut c, CHAT, &chat_body(q, 12, true), "chat.completion.chunk");
    assert_eq!(streamed, text);
    assert_eq!(&usage, u);

    let body = json!({"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 10, "temperature": 0});
    let v = c.post(COMPL, &body.to_string(), None).json();
    assert_eq!(v["object"], "text_completion");
    let text = v["choices"][0]["text"].as_str().unwrap().to_owned();
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let (streamed, _) = stream_text(&mut c, COMPL, &sb.to_string(), "text_completion");
    assert_eq!(streamed, text);
    // Stop strings end the text before them.
    let mut stop = body.clone();
    // A whole word (the engine matches stop strings on the decoded text, as for binary clients).
    let cut = format!(" {}", text.split_whitespace().nth(2).expect("three words"));
    stop["stop"] = json!(cut);
    let v = c.post(COMPL, &stop.to_string(), None).json();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), &text[..text.find(&cut).unwrap()]);
}

fn same_text_as_generate() {
    let srv = start(&[]);
    let mut c = api(&srv);
    for q in ["What is the capital of France?", "Write a haiku about the sea."] {
        let (want, n) = generate_cli(srv.url(), q, true, 24);
        let v = c.post(CHAT, &chat_body(q, 24, false), None).json();
        assert_eq!(v["choices"][0]["message"]["content"], want.as_str(), "chat {q:?}");
        assert_eq!(v["usage"]["completion_tokens"], n as u64);
        let (streamed, _) = stream_text(&mut c, CHAT, &chat_body(q, 24, true), "chat.completion.chunk");
        assert_eq!(streamed, want, "streamed chat {q:?}");
    }
    let p = "The three primary colors are";
    let (want, _) = generate_cli(srv.url(), p, false, 16);
    let body = json!({"model": "smollm2", "prompt": p, "max_tokens": 16, "temperature": 0});
    assert_eq!(c.post(COMPL, &body.to_string(), None).json()["choices"][0]["text"], want.as_str());
}

fn session_conversation() {
    let srv = start(&[]);
    let turns = ["Hi, my name is Ann.", "What is my name?", "Say it again, in capitals."];
    // The same turns on one binary-protocol session.
    let mut bin = Client::connect_with(srv.url(), &ClientOptions::default()).unwrap();
    let sid = bin.open_session(&OpenOptions::new("smollm2")).unwrap().session;
    let opts = DecodeOptions { max_new_tokens: 20, temperature: 0.0, ..DecodeOptions::default() };
    let mut want = Vec::new();
    for t in turns {
        let mut text = String::new();
        bin.generate(sid, Feed::Turn { role: "user", text: t }, &opts, |ev| {
            text.push_str(ev.text);
            true
        })
        .unwrap();
        want.push(text);
    }
    let mut c = api(&srv);
    let mut session = "new".to_owned();
    for (i, t) in turns.iter().enumerate() {
        let stream = i == 1;
        let mut body: Value = serde_json::from_str(&chat_body(t, 20, stream)).unwrap();
        body["session_id"] = json!(session);
        let text = if stream {
            let r = c.post(CHAT, &body.to_string(), None);
            let evs = r.events();
            let mut text = String::new();
            for e in &evs[..evs.len() - 1] {
                let v: Value = serde_json::from_str(e).unwrap();
                assert_eq!(v["session_id"], session.as_str(), "every chunk names the session");
                text.push_str(v["choices"][0]["delta"]["content"].as_str().unwrap_or(""));
            }
            text
        } else {
            // A fresh connection each time: the session outlives the request.
            c = api(&srv);
            let v = c.post(CHAT, &body.to_string(), None).json();
            session = v["session_id"].as_str().expect("session_id").to_owned();
            assert_eq!(session.len(), 16);
            if i > 0 {
                // Only the new turn was fed, not the history.
                assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() < 30, "{v}");
            }
            v["choices"][0]["message"]["content"].as_str().unwrap().to_owned()
        };
        assert_eq!(text, want[i], "turn {i}");
    }
    // Another tenant's (or a made-up) id is unknown.
    let mut body: Value = serde_json::from_str(&chat_body("x", 2, false)).unwrap();
    body["session_id"] = json!("0123456789abcdef");
    let r = c.post(CHAT, &body.to_string(), None);
    assert_eq!((r.code, r.json()["error"]["code"].clone()), (404, json!("session_not_found")));
}

fn error_codes() {
    let tokens = tenants_file();
    let srv = start(&["--auth-token-file", tokens.to_str().unwrap(), "--max-context-tokens", "64"]);
    let mut c = api(&srv);
    let tok = Some("tok-alice");
    let err = |r: &http::Response| {
        let v = r.json();
        for k in ["message", "type", "param", "code"] {
            assert!(v["error"].get(k).is_some(), "error field {k} missing: {v}");
        }
        (r.code, v["error"]["code"].clone())
    };
    // 401: missing or wrong token; /healthz needs none.
    assert_eq!(err(&c.post(CHAT, &chat_body("hi", 2, false), None)), (401, json!("invalid_api_key")));
    assert_eq!(err(&c.post(CHAT, &chat_body("hi", 2, false), Some("tok-wrong"))), (401, json!("invalid_api_key")));
    assert_eq!(c.get("/v1/models", Some("nope")).code, 401);
    assert_eq!(c.get("/healthz", None).code, 200);
    assert_eq!(c.post(CHAT, &chat_body("hi", 2, false), tok).code, 200);
    // 404: unknown model.
    let body = json!({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(err(&c.post(CHAT, &body.to_string(), tok)), (404, json!("model_not_found")));
    // 400: malformed JSON, bad parameters, a prompt longer than the context.
    assert_eq!(c.post(CHAT, "{\"model\": ", tok).code, 400);
    let bad = [
        json!({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "n": 2}),
        json!({"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}),
        json!({"model": "smollm2", "messages": [{"role": "tool", "content": "hi"}]}),
        json!({"model": "smollm2", "messages": []}),
        json!({"model": "smollm2", "prompt": ["a", "b"]}),
    ];
    for b in bad {
        let path = if b.get("prompt").is_some() { COMPL } else { CHAT };
        assert_eq!(c.post(path, &b.to_string(), tok).code, 400, "{b}");
    }
    let long = "word ".repeat(200);
    assert_eq!(err(&c.post(CHAT, &chat_body(&long, 4, false), tok)), (400, json!("context_length_exceeded")));
    let body = json!({"model": "smollm2", "prompt": long, "max_tokens": 4});
    assert_eq!(err(&c.post(COMPL, &body.to_string(), tok)), (400, json!("context_length_exceeded")));
    // Streamed: the error comes before the stream begins, as a plain answer.
    assert_eq!(c.post(CHAT, &chat_body(&long, 4, true), tok).code, 400);
    // 413: a body over the bound (the connection closes after it).
    let huge = format!("{{\"model\":\"smollm2\",\"prompt\":\"{}\"}}", "a".repeat(2 << 20));
    assert_eq!(c.post(COMPL, &huge, tok).code, 413);
    // The server still serves.
    let mut c = api(&srv);
    assert_eq!(c.post(CHAT, &chat_body("hi", 2, false), tok).code, 200);
}

fn busy_is_429() {
    let srv = start(&["--http-api-requests-max", "1"]);
    // A streaming request held open (read slowly), then a second one is refused.
    let addr = srv.http_api.clone().unwrap();
    let mut a = Http::connect(&addr);
    let body = json!({"model": "smollm2", "prompt": "Count from one to one hundred:", "max_tokens": 200,
                      "temperature": 0, "stream": true});
    let stream = std::thread::spawn(move || {
        let mut first = true;
        a.call("POST", COMPL, Some(&body.to_string()), None, &mut |_| {
            if first {
                first = false;
                std::thread::sleep(std::time::Duration::from_millis(1500));
            }
        })
        .code
    });
    std::thread::sleep(std::time::Duration::from_millis(700));
    let mut b = Http::connect(&addr);
    let r = b.post(CHAT, &chat_body("hi", 2, false), None);
    assert_eq!((r.code, r.json()["error"]["code"].clone()), (429, json!("rate_limit_exceeded")));
    assert_eq!(stream.join().unwrap(), 200);
    assert_eq!(b.post(CHAT, &chat_body("hi", 2, false), None).code, 200);
}

/// A client that goes away mid-stream ends its request: the temporary session is closed (and a
/// kept one stays for its lease).
fn client_gone_ends_its_session() {
    let srv = start(&["--metrics-listen", "127.0.0.1:0"]);
    let metrics = srv.metrics.clone().unwrap();
    let open = || common::metric(&common::http_get(&metrics, "/metrics").1, "djinn_sessions_open").unwrap_or(-1.0);
    let addr = srv.http_api.clone().unwrap();
    for session in [None, Some("new")] {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        let mut body = json!({"model": "smollm2", "prompt": "Count from one to one hundred:", "max_tokens": 400,
                              "temperature": 0, "stream": true});
        if let Some(id) = session {
            body["session_id"] = json!(id);
        }
        let body = body.to_string();
        use std::io::{Read, Write};
        write!(s, "POST {COMPL} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
        let mut first = [0u8; 64];
        assert!(s.read(&mut first).unwrap() > 0);
        assert_eq!(open(), 1.0);
        drop(s);
        let t0 = std::time::Instant::now();
        let want = if session.is_some() { 1.0 } else { 0.0 };
        while open() != want || t0.elapsed() < std::time::Duration::from_millis(500) {
            assert!(t0.elapsed() < std::time::Duration::from_secs(10), "sessions open: {}", open());
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        // Nothing runs for the departed client any more.
        let steps = || common::metric(&common::http_get(&metrics, "/metrics").1, "djinn_engine_steps_total").unwrap();
        let before = steps();
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert_eq!(steps(), before, "the engine still steps for a client that went away");
    }
}

/// `qos` (and `deadline_ms`) choose the class of the session a request opens: each class is
/// served and shows up in the scheduler's per-class metrics; a bad value is a 400 naming it.
fn qos_classes() {
    let srv = start(&["--metrics-listen", "127.0.0.1:0"]);
    let metrics = srv.metrics.clone().unwrap();
    // Requests served in `class` so far (its time-to-first-token histogram's count).
    let served = |class: &str| {
        let body = common::http_get(&metrics, "/metrics").1;
        let want = format!("class=\"{class}\"");
        body.lines()
            .filter(|l| l.starts_with("djinn_scheduler_ttft_seconds_count") && l.contains(&want))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum::<f64>()
    };
    let mut c = api(&srv);
    // Background is scheduled as batch; a short deadline serves a batch request as realtime.
    let cases = [
        ("realtime", None, "realtime"),
        ("interactive", None, "interactive"),
        ("batch", None, "batch"),
        ("background", None, "batch"),
        ("batch", Some(20), "realtime"),
    ];
    for (qos, deadline, class) in cases {
        let before = served(class);
        for stream in [false, true] {
            let mut body: Value = serde_json::from_str(&chat_body("hi", 2, stream)).unwrap();
            body["qos"] = json!(qos);
            if let Some(d) = deadline {
                body["deadline_ms"] = json!(d);
            }
            let r = c.post(CHAT, &body.to_string(), None);
            assert_eq!(r.code, 200, "qos {qos}: {}", String::from_utf8_lossy(&r.body));
        }
        assert_eq!(served(class), before + 2.0, "qos {qos} deadline {deadline:?}: served as {class}");
    }
    for (param, v) in [("qos", json!("urgent")), ("qos", json!(3)), ("deadline_ms", json!(-5))] {
        let mut body: Value = serde_json::from_str(&chat_body("hi", 2, false)).unwrap();
        body[param] = v.clone();
        let r = c.post(CHAT, &body.to_string(), None);
        assert_eq!(r.code, 400, "{param} = {v}");
        if param != "qos" || v.is_string() {
            assert_eq!(r.json()["error"]["param"], param, "{param} = {v}");
        }
    }
}

/// A client that stops reading its stream slows nobody: its session pauses once its socket
/// (`http_api_sndbuf_bytes`) and outbound queue are full, and a binary-protocol client decodes
/// meanwhile at (about) its solo rate, measured in the same run before and after.
fn slow_reader_slows_nobody() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let srv = start(&["--metrics-listen", "127.0.0.1:0", "--http-api-sndbuf-bytes", "8192"]);
    let metrics = srv.metrics.clone().unwrap();
    let paused = || {
        common::metric(&common::http_get(&metrics, "/metrics").1, "djinn_sessions_paused_backpressure").unwrap_or(-1.0)
    };
    let mut bin = Client::connect_with(srv.url(), &ClientOptions::default()).unwrap();
    let sid = bin.open_session(&OpenOptions::new("smollm2")).unwrap().session;
    bin.generate(
        sid,
        Feed::Text("Once upon a time"),
        &DecodeOptions { max_new_tokens: 1, ..DecodeOptions::default() },
        |_| true,
    )
    .unwrap();
    let opts = DecodeOptions { max_new_tokens: 48, temperature: 0.0, ignore_eos: true, ..DecodeOptions::default() };
    let mut rate = || {
        let t0 = Instant::now();
        let s = bin.decode(sid, &opts, |_| true).unwrap();
        f64::from(s.tokens) / t0.elapsed().as_secs_f64()
    };
    let solo_before = rate();

    // The slow reader: a tiny receive buffer, reads the response head, then stops reading.
    let addr = srv.http_api.clone().unwrap();
    let s = std::net::TcpStream::connect(&addr).unwrap();
    let small: libc::c_int = 2048;
    // SAFETY: a pointer to a live local c_int and its size, for a socket `s` owns.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&small as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    let body = json!({"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 4000, "temperature": 0,
                      "ignore_eos": true, "stream": true})
    .to_string();
    let mut s = s;
    write!(s, "POST {COMPL} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut head = [0u8; 256];
    assert!(s.read(&mut head).unwrap() > 0);
    assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
    let t0 = Instant::now();
    while paused() < 1.0 {
        assert!(t0.elapsed() < Duration::from_secs(25), "the stalled stream's session never paused");
        std::thread::sleep(Duration::from_millis(100));
    }
    let paused_after_s = t0.elapsed().as_secs_f64();
    let stalled = rate();
    assert!(paused() >= 1.0, "the stalled session resumed without a reader");
    drop(s);
    let solo_after = rate();
    let solo = (solo_before + solo_after) / 2.0;
    eprintln!(
        "slow_reader_slows_nobody: solo {solo_before:.1}/{solo_after:.1} tok/s, beside a stalled stream \
         {stalled:.1} tok/s ({:.2}x), paused after {:.1} s",
        stalled / solo,
        paused_after_s
    );
    assert!(stalled >= 0.8 * solo, "{stalled:.1} tok/s beside a stalled reader, {solo:.1} alone");
}

fn main() {
    let args = Arguments::from_args();
    let missing = (!model_dir().join("config.json").exists())
        .then(|| format!("{MODEL_DIR} not fetched (scripts/fetch_smollm2.sh {MODEL_DIR} bf16)"));
    if let Some(why) = &missing {
        eprintln!("NOTE: http_api trials ignored: {why}");
    }
    let trials: [(&str, fn()); 8] = [
        ("client_gone_ends_its_session", client_gone_ends_its_session),
        ("routes_and_framing", routes_and_framing),
        ("same_text_as_generate", same_text_as_generate),
        ("session_conversation", session_conversation),
        ("error_codes", error_codes),
        ("busy_is_429", busy_is_429),
        ("qos_classes", qos_classes),
        ("slow_reader_slows_nobody", slow_reader_slows_nobody),
    ];
    let out = trials
        .into_iter()
        .map(|(name, f)| {
            Trial::test(name, move || {
                // The rate comparison runs with no other trial beside it (see common::TRIALS).
                if name == "slow_reader_slows_nobody" {
                    common::alone_trial(f);
                } else {
                    common::shared_trial(f);
                }
                Ok(())
            })
            .with_ignored_flag(missing.is_some())
        })
        .collect();
    libtest_mimic::run(&args, out).exit()
}
