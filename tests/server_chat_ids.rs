//! Chat turns feed the KV's ids incrementally, against a real server on SmolLM2 (its byte-level
//! BPE tokenizer and ChatML template), over every transport:
//! - a reply that ended in EOS and re-tokenizes to its own ids: the next turn leaves the session
//!   holding exactly the ids of a full re-tokenization of the rendered conversation (the newline
//!   the template puts after `<|im_end|>` included, which tokenizing the new turn's template text
//!   alone drops);
//! - a reply cut by a stop string: the generated ids stay (the KV's ids are authoritative), and
//!   the turn feeds the template's text after the recorded reply.
//!
//! Which ids a session holds is checked twice: by its length, and by a greedy continuation equal
//! to that of a second session fed the expected ids directly (the CPU step is batch invariant).
//! Trials are ignored, with the reason, when `models/smollm2-bf16` has not been fetched.

mod common;

use std::path::{Path, PathBuf};

use common::{connect, server, Transport};
use djinn_client::{Client, DecodeOptions, FinishReason, Input, OpenOptions};
use djinn_model::TextTokenizer;

const MODEL_DIR: &str = "models/smollm2-bf16";

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(MODEL_DIR)
}

fn greedy(n: u32, eos: bool) -> DecodeOptions {
    DecodeOptions { max_new_tokens: n, ignore_eos: !eos, ..DecodeOptions::default() }
}

/// Greedy tokens of a fresh session fed `ids`.
fn continuation(c: &mut Client, ids: &[u32], n: u32) -> Vec<u32> {
    let s = c.open_session(&OpenOptions::new("smollm2")).unwrap().session;
    c.prefill(s, Input::Ids(ids)).unwrap();
    let (out, _, _) = c.decode_collect(s, &greedy(n, false)).unwrap();
    c.close_session(s).unwrap();
    out
}

fn start(t: Transport) -> common::ServerProc {
    let spec = format!("smollm2={}", model_dir().display());
    server(t, &["--dtype", "bf16", "--model", &spec])
}

fn eos_reply_then_turn_equals_full_retokenization(t: Transport) {
    let srv = start(t);
    let tok = TextTokenizer::load(&model_dir()).unwrap().unwrap();
    let eos = tok.eos_id().unwrap();
    let mut c = connect(srv.url());
    let s = c.open_session(&OpenOptions::new("smollm2")).unwrap().session;
    let (q1, q2) = ("Say hello.", "Now say goodbye.");
    let r1 = c.append_turn(s, "user", q1).unwrap();
    let (ids1, text1, sum1) = c.decode_collect(s, &greedy(64, true)).unwrap();
    assert_eq!(sum1.finish, FinishReason::Eos, "the reply {text1:?} must end in EOS for this check");
    // The session holds the first turn's ids, the reply and its EOS.
    let mut held = tok.encode(&tok.apply_chat_messages(&[("user", q1)], true).unwrap(), false).unwrap();
    assert_eq!(held.len() as u32, r1.context_tokens);
    held.extend(&ids1);
    held.push(eos);
    assert_eq!(sum1.context_tokens as usize, held.len());
    let full_text = tok.apply_chat_messages(&[("user", q1), ("assistant", &text1), ("user", q2)], true).unwrap();
    let full = tok.encode(&full_text, false).unwrap();
    assert!(full.starts_with(&held), "precondition: the reply {text1:?} re-tokenizes to its own ids");

    let r2 = c.append_turn(s, "user", q2).unwrap();
    assert_eq!(r2.context_tokens as usize, full.len(), "the session holds a full re-tokenization's ids");
    assert_eq!(r2.prompt_tokens as usize, full.len() - held.len());
    // Why the new turn is not its template text tokenized alone: that drops the `\n` the
    // template closes the reply with (the model generated only the `<|im_end|>` before it).
    let prev = tok.apply_chat_messages(&[("user", q1), ("assistant", &text1)], false).unwrap();
    let alone = tok.encode(&full_text[prev.len()..], false).unwrap();
    assert_eq!(alone.len() + 1, full.len() - held.len(), "the template's text of the turn alone lacks the newline");
    let (next, _, _) = c.decode_collect(s, &greedy(8, false)).unwrap();
    assert_eq!(next, continuation(&mut c, &full, 8), "the session's KV is not the full re-tokenization");
}

fn stop_cut_reply_keeps_the_generated_ids(t: Transport) {
    let srv = start(t);
    let tok = TextTokenizer::load(&model_dir()).unwrap().unwrap();
    let mut c = connect(srv.url());
    let (q1, q2) = ("Count from one to ten in words.", "Thanks.");
    // The reply uncut, to pick a stop string inside it.
    let probe = c.open_session(&OpenOptions::new("smollm2")).unwrap().session;
    c.append_turn(probe, "user", q1).unwrap();
    let (_, whole, _) = c.decode_collect(probe, &greedy(24, false)).unwrap();
    c.close_session(probe).unwrap();
    let words: Vec<&str> = whole.split_whitespace().collect();
    assert!(words.len() >= 4, "reply {whole:?}");
    let stop = words[words.len() / 2].to_owned();

    let s = c.open_session(&OpenOptions::new("smollm2")).unwrap().session;
    let r1 = c.append_turn(s, "user", q1).unwrap();
    let opts = DecodeOptions { stop: vec![stop.clone()], ..greedy(24, false) };
    let (ids1, cut, sum1) = c.decode_collect(s, &opts).unwrap();
    assert_eq!(sum1.finish, FinishReason::Stop, "stop {stop:?} in {whole:?}");
    let first = tok.apply_chat_messages(&[("user", q1)], true).unwrap();
    let mut held = tok.encode(&first, false).unwrap();
    assert_eq!(held.len() as u32, r1.context_tokens);
    held.extend(&ids1);
    assert_eq!(sum1.context_tokens as usize, held.len());
    // The conversation records the text before the stop; the KV keeps every generated id. The
    // turn feeds what the template renders after the recorded reply.
    let full_text = tok.apply_chat_messages(&[("user", q1), ("assistant", &cut), ("user", q2)], true).unwrap();
    let want_new = tok.encode(&full_text[first.len() + cut.len()..], false).unwrap();
    let r2 = c.append_turn(s, "user", q2).unwrap();
    assert_eq!(r2.prompt_tokens as usize, want_new.len());
    assert_eq!(r2.context_tokens as usize, held.len() + want_new.len());
    let mut want = held.clone();
    want.extend(&want_new);
    assert_ne!(want, tok.encode(&full_text, false).unwrap(), "the stop's ids stay in the KV");
    let (next, _, _) = c.decode_collect(s, &greedy(8, false)).unwrap();
    assert_eq!(next, continuation(&mut c, &want, 8));
}

fn main() {
    let missing = !model_dir().join("config.json").exists();
    let trials: Vec<common::TrialSpec> = vec![
        ("eos_reply_then_turn_equals_full_retokenization", None, eos_reply_then_turn_equals_full_retokenization),
        ("stop_cut_reply_keeps_the_generated_ids", None, stop_cut_reply_keeps_the_generated_ids),
    ];
    if missing {
        eprintln!(
            "NOTE: server_chat_ids trials ignored: {MODEL_DIR} not fetched (scripts/fetch_smollm2.sh {MODEL_DIR} bf16)"
        );
        let ignored = trials
            .iter()
            .flat_map(|(name, _, _)| Transport::ALL.iter().map(move |t| format!("{name}_{}", t.name())))
            .map(|n| libtest_mimic::Trial::test(n, || Ok(())).with_ignored_flag(true))
            .collect();
        common::run_trials_and(Vec::new(), ignored);
    }
    common::run_trials(trials);
}
