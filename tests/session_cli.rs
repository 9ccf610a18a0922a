//! `generate` and `logits` over the network (`--server URL --model NAME`) against a real
//! `serve --model NAME=DIR` process, checked against the same commands run in process
//! (`--model-dir DIR`) on a committed model. One body per transport (tcp, shm).

mod common;
#[path = "../src/cmd/tiny_model.rs"]
mod tiny_model;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{server, Transport};

/// The committed model every trial serves, under the name [`MODEL`].
const MODEL_DIR: &str = "llama-gqa";
const MODEL: &str = "gqa";
/// A prompt inside the model's 128-token vocabulary.
const PROMPT_IDS: &str = "1,17,42,99,5,63";
const NEW_TOKENS: usize = 12;

fn model_dir() -> PathBuf {
    djinn_model::testing::reference_root().join(MODEL_DIR)
}

fn model_server(t: Transport) -> common::ServerProc {
    common::model_server(t, MODEL, &model_dir(), &[])
}

fn bin() -> Command {
    Command::new(common::BIN)
}

fn json_of(what: &str, out: Output) -> serde_json::Value {
    assert!(out.status.success(), "{what} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{what}: not one JSON object ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn generate_args() -> Vec<String> {
    let n = NEW_TOKENS.to_string();
    ["generate", "--json", "--ignore-eos", "--prompt-ids", PROMPT_IDS, "--max-new-tokens", &n]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn generate_matches_in_process(t: Transport) {
    let srv = model_server(t);
    let local = bin()
        .args(generate_args())
        // The server computes in f32 (`model_server`); in process `generate` would pick bf16.
        .args(["--gpus", "cpu", "--threads", "1", "--dtype", "stored", "--model-dir"])
        .arg(model_dir())
        .output()
        .unwrap();
    let local = json_of("generate --model-dir", local);
    let remote = bin().args(generate_args()).args(["--server", srv.url(), "--model", MODEL]).output().unwrap();
    let remote = json_of("generate --server", remote);
    let want: Vec<u32> = serde_json::from_value(local["tokens"].clone()).unwrap();
    let got: Vec<u32> = serde_json::from_value(remote["tokens"].clone()).unwrap();
    assert_eq!(want.len(), NEW_TOKENS);
    assert_eq!(got, want, "remote greedy tokens differ from in-process ones over {}", t.name());
    assert_eq!(remote["prompt_tokens"], local["prompt_tokens"]);
    assert_eq!(remote["finish_reason"], "length");
    let sent = remote["bytes_sent"].as_u64().expect("bytes_sent");
    let received = remote["bytes_received"].as_u64().expect("bytes_received");
    // Handshake, open, prefill, decode, close: a few hundred bytes plus ≤ 64 B per token each
    // way; the KV cache or logits crossing would be megabytes.
    assert!(sent > 0 && sent < 2048, "bytes_sent {sent}");
    assert!(received > 64 && received < 2048 + 64 * NEW_TOKENS as u64, "bytes_received {received}");
    assert!(remote["ttft_ms"].as_f64().unwrap() > 0.0, "{remote}");
}

fn logits_match_in_process(t: Transport) {
    let srv = model_server(t);
    let base = ["logits", "--json", "--prompt-ids", PROMPT_IDS];
    let local =
        bin().args(base).args(["--gpus", "cpu", "--threads", "1", "--model-dir"]).arg(model_dir()).output().unwrap();
    let local = json_of("logits --model-dir", local);
    let remote =
        json_of("logits --server", bin().args(base).args(["--server", srv.url(), "--model", MODEL]).output().unwrap());
    let want: Vec<Vec<f32>> = serde_json::from_value(local["logits"].clone()).unwrap();
    let got: Vec<Vec<f32>> = serde_json::from_value(remote["logits"].clone()).unwrap();
    assert_eq!(got.len(), PROMPT_IDS.split(',').count());
    assert_eq!(got.len(), want.len());
    let scale = want.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
    for (r, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.len(), w.len(), "row {r}");
        let err = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= 1e-6 * scale, "row {r}: max |remote - local| {err} > 1e-6 x {scale}");
    }
}

fn unknown_model_fails_with_a_message(t: Transport) {
    let srv = model_server(t);
    for sub in [&["generate", "--prompt-ids", "1,2"][..], &["logits", "--prompt-ids", "1,2"][..]] {
        let out = bin().args(sub).args(["--server", srv.url(), "--model", "no-such-model"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{sub:?} succeeded on an unknown model");
        assert!(err.contains("no-such-model") && err.contains("UnknownModel"), "{sub:?}: {err}");
    }
    // A malformed URL is the client's error, with the URL in the message.
    let out =
        bin().args(["generate", "--prompt-ids", "1", "--server", "gopher://x", "--model", MODEL]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("gopher://x"));
}

/// Text in, text out: a generated tiny model with a tokenizer and a chat template, prompted with
/// raw text and with a chat turn; the server tokenizes, templates and detokenizes.
fn text_and_chat_match_in_process(t: Transport) {
    let dir = std::env::temp_dir().join(common::unique_name("tiny"));
    tiny_model::write(&dir, 5).unwrap();
    let spec = format!("tiny={}", dir.display());
    let srv = server(t, &["--dtype", "f32", "--model", &spec]);
    for chat in [false, true] {
        let mut base = vec!["generate", "--json", "--prompt", "Hello there, data plane!", "--max-new-tokens", "16"];
        if chat {
            base.push("--chat");
        }
        let mut local = bin();
        local.args(&base).args(["--gpus", "cpu", "--threads", "1", "--dtype", "stored", "--model-dir"]).arg(&dir);
        let local = local.output();
        let local = json_of("generate --model-dir (text)", local.unwrap());
        let remote = bin().args(&base).args(["--server", srv.url(), "--model", "tiny"]).output().unwrap();
        let remote = json_of("generate --server (text)", remote);
        for key in ["tokens", "text", "prompt_tokens", "finish_reason"] {
            assert_eq!(remote[key], local[key], "{key} (chat {chat}) over {}", t.name());
        }
        assert!(!remote["text"].as_str().unwrap().is_empty() || remote["finish_reason"] == "eos", "{remote}");
    }
    drop(srv);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn token_file_authenticates(t: Transport) {
    let dir = std::env::temp_dir().join(common::unique_name("tokens"));
    std::fs::create_dir_all(&dir).unwrap();
    let (auth, good, bad) = (dir.join("auth"), dir.join("good"), dir.join("bad"));
    std::fs::write(&auth, "alice s3cret-token-alice\n").unwrap();
    std::fs::write(&good, "s3cret-token-alice\n").unwrap();
    std::fs::write(&bad, "not-a-token\n").unwrap();
    let srv = common::model_server(t, MODEL, &model_dir(), &["--auth-token-file", auth.to_str().unwrap()]);
    let run = |token: &Path| {
        bin()
            .args(generate_args())
            .args(["--server", srv.url(), "--model", MODEL, "--token-file"])
            .arg(token)
            .env_remove("DJINN_TOKEN")
            .output()
            .unwrap()
    };
    let v = json_of("generate --token-file", run(&good));
    assert_eq!(v["tokens"].as_array().map(Vec::len), Some(NEW_TOKENS));
    let out = run(&bad);
    assert!(!out.status.success(), "a wrong token was accepted");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unauthorized"), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `chat` on the tiny model at `url` (greedy, 12 tokens a reply, plus `extra`) fed `input`; its
/// stdout.
fn chat(url: &str, extra: &[&str], input: &str) -> String {
    use std::io::Write;
    let mut chat = bin()
        .args(["chat", "--server", url, "--model", "tiny", "--temperature", "0", "--max-new-tokens", "12"])
        .args(extra)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    chat.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = chat.wait_with_output().unwrap();
    assert!(out.status.success(), "chat: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// `models` lists the server's models; `chat` keeps the conversation on the server (its first
/// reply is `generate --chat`'s); `logits` prints the top-k per position unless `--json`.
fn models_chat_and_logits_text(t: Transport) {
    let dir = std::env::temp_dir().join(common::unique_name("tiny"));
    tiny_model::write(&dir, 5).unwrap();
    let spec = format!("tiny={}", dir.display());
    let srv = server(t, &["--model", &spec]);
    let out = bin().args(["models", "--server", srv.url()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "tiny\n");
    let first = bin()
        .args(["generate", "--server", srv.url(), "--model", "tiny", "--chat", "--prompt", "Hello there"])
        .args(["--max-new-tokens", "12", "--json"])
        .output()
        .unwrap();
    let first = json_of("generate --chat", first)["text"].as_str().unwrap().to_owned();
    let said = chat(srv.url(), &[], "Hello there\nAnd again?\n");
    assert!(said.starts_with(&format!("{first}\n")), "chat's first reply {said:?} is not generate's {first:?}");
    let logits = ["logits", "--server", srv.url(), "--model", "tiny", "--prompt-ids", "1,2,3", "--top-k", "3"];
    let out = bin().args(logits).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.lines().count() == 3, "{text}");
    assert!(text.lines().all(|l| l.starts_with("position ") && l.matches(':').count() == 4), "{text}");
    drop(srv);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `chat --system TEXT`: the system turn goes up without the generation prompt, so the first reply
/// is what the whole conversation (system, user, then the assistant's turn opened) templated in
/// one piece generates — no stray assistant opening between the system and the user turn.
fn chat_system_turn_then_user_turn(t: Transport) {
    let dir = std::env::temp_dir().join(common::unique_name("tiny"));
    tiny_model::write(&dir, 5).unwrap();
    let srv = server(t, &["--model", &format!("tiny={}", dir.display())]);
    let tok = djinn_model::TextTokenizer::load(&dir).unwrap().expect("the tiny model has a tokenizer");
    let (system, user) = ("Be brief.", "Hello there");
    let whole = tok.apply_chat_messages(&[("system", system), ("user", user)], true).unwrap();
    let ids: Vec<String> = tok.encode(&whole, false).unwrap().iter().map(u32::to_string).collect();
    let want = bin()
        .args(["generate", "--server", srv.url(), "--model", "tiny", "--prompt-ids", &ids.join(",")])
        .args(["--max-new-tokens", "12", "--json"])
        .output()
        .unwrap();
    let want = json_of("generate --prompt-ids", want)["text"].as_str().unwrap().to_owned();
    let said = chat(srv.url(), &["--system", system], &format!("{user}\n"));
    assert_eq!(said, format!("{want}\n"), "chat --system's reply vs the whole template's");
    drop(srv);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--log-format json`: every stderr line is one JSON object, and each finished session request
/// has one line with its tenant, model, opcode, tokens, duration and status. Text logs written to
/// a file carry no terminal colours.
fn logs_are_json_lines_with_one_line_per_request(t: Transport) {
    let srv = common::model_server(t, MODEL, &model_dir(), &["--log-format", "json"]);
    let out = bin().args(generate_args()).args(["--server", srv.url(), "--model", MODEL]).output().unwrap();
    json_of("generate --server", out);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let decode = loop {
        let log = srv.stderr();
        let lines: Vec<serde_json::Value> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}")))
            .collect();
        let found =
            lines.into_iter().find(|v| v["target"] == "djinn::request" && v["fields"]["opcode"] == "SessionDecode");
        match found {
            Some(v) => break v,
            None if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(50)),
            None => panic!("no request line for the decode in:\n{log}"),
        }
    };
    let f = &decode["fields"];
    assert_eq!((f["model"].as_str(), f["status"].as_str()), (Some(MODEL), Some("Ok")), "{decode}");
    assert_eq!(f["tokens"].as_u64(), Some(NEW_TOKENS as u64), "{decode}");
    assert!(f["tenant"].is_string() && f["duration_us"].is_u64(), "{decode}");
    let text = common::model_server(t, MODEL, &model_dir(), &[]);
    let log = text.stderr();
    assert!(log.contains("server ready") && !log.contains('\x1b'), "ANSI escapes in a log file:\n{log}");
}

/// With no `--dtype`, `serve` computes as in-process `generate` does (bf16 for this f32
/// checkpoint): the same greedy tokens, and the load log names the dtype.
fn serve_defaults_to_generate_s_dtype(t: Transport) {
    let srv = server(t, &["--model", &format!("{MODEL}={}", model_dir().display())]);
    let local = bin().args(generate_args()).args(["--gpus", "cpu", "--model-dir"]).arg(model_dir()).output().unwrap();
    let local = json_of("generate --model-dir", local);
    let remote = bin().args(generate_args()).args(["--server", srv.url(), "--model", MODEL]).output().unwrap();
    let remote = json_of("generate --server", remote);
    assert_eq!(remote["tokens"], local["tokens"], "serve's default dtype vs generate's over {}", t.name());
    let log = srv.stderr();
    assert!(log.contains("dtype=bf16") || log.contains("\"dtype\":\"bf16\""), "no dtype=bf16 in the load log:\n{log}");
}

fn main() {
    common::run_trials(vec![
        ("serve_defaults_to_generate_s_dtype", Some(Transport::Tcp), serve_defaults_to_generate_s_dtype),
        ("generate_matches_in_process", None, generate_matches_in_process),
        ("logits_match_in_process", None, logits_match_in_process),
        ("text_and_chat_match_in_process", None, text_and_chat_match_in_process),
        ("unknown_model_fails_with_a_message", Some(Transport::Tcp), unknown_model_fails_with_a_message),
        ("token_file_authenticates", Some(Transport::Tcp), token_file_authenticates),
        ("models_chat_and_logits_text", Some(Transport::Tcp), models_chat_and_logits_text),
        ("chat_system_turn_then_user_turn", Some(Transport::Tcp), chat_system_turn_then_user_turn),
        (
            "logs_are_json_lines_with_one_line_per_request",
            Some(Transport::Tcp),
            logs_are_json_lines_with_one_line_per_request,
        ),
    ]);
}
