//! Breakpoints against the real server binary, over every transport: this server version does
//! not pause sessions yet (the protocol and the engine's passes exist; the engine-loop part of
//! issue 13 remains), so a prefill or decode with breakpoints and every breakpoint opcode get a
//! typed `Unsupported`, and the session is intact: it then generates transformers' tokens.

mod common;

use common::{connect, model_server, run_trials, status_of, Transport};
use djinn_client::{DecodeOptions, Feed, OpenOptions};
use djinn_model::testing::{reference_root, Breakpoints, BREAKPOINT_MODEL};
use djinn_proto::{
    DecodeFeed, HiddenDType, HiddenReadReq, LogitsWire, Meta, Opcode, PrefillInput, SessionDecodeReq,
    SessionPrefillReq, SessionReq, Status,
};

const MODEL: &str = "deep";

fn refused_typed_and_session_intact(t: Transport) {
    let dir = reference_root().join(BREAKPOINT_MODEL);
    let rec: Breakpoints = serde_json::from_slice(&std::fs::read(dir.join("breakpoints.json")).unwrap()).unwrap();
    let srv = model_server(t, MODEL, &dir, &[]);
    let mut c = connect(srv.url());
    let s = c.open_session(&OpenOptions::new(MODEL)).unwrap().session;
    let decode = SessionDecodeReq {
        session: s,
        feed: DecodeFeed::Ids(rec.prompt.clone()),
        max_new_tokens: 4,
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
        ignore_eos: true,
        logits: LogitsWire::None,
        stop: vec![],
        breakpoints: vec![1, 3],
    };
    assert_eq!(status_of(c.call(Opcode::SessionDecode, &decode.to_meta(), &[])), Status::Unsupported);
    let prefill = SessionPrefillReq { session: s, input: PrefillInput::Ids(rec.prompt.clone()), breakpoints: vec![2] };
    assert_eq!(status_of(c.call(Opcode::SessionPrefill, &prefill.to_meta(), &[])), Status::Unsupported);
    let read = HiddenReadReq { session: s, dtype: HiddenDType::F32 };
    assert_eq!(status_of(c.call(Opcode::SessionHiddenRead, &read.to_meta(), &[])), Status::Unsupported);
    let resume = SessionReq { session: s };
    assert_eq!(status_of(c.call(Opcode::SessionResume, &resume.to_meta(), &[])), Status::Unsupported);
    // Malformed breakpoints (not increasing) are refused as they are parsed.
    let mut bad = decode.to_meta();
    let n = bad.len();
    bad[n - 4..].copy_from_slice(&1u32.to_le_bytes());
    assert_eq!(status_of(c.call(Opcode::SessionDecode, &bad, &[])), Status::BadArgument);

    let opts = DecodeOptions { max_new_tokens: rec.greedy.len() as u32, ignore_eos: true, ..DecodeOptions::default() };
    let mut got = Vec::new();
    let sum = c
        .generate(s, Feed::Ids(&rec.prompt), &opts, |ev| {
            got.push(ev.token);
            true
        })
        .unwrap();
    assert_eq!(got, rec.greedy, "the session was not intact after the refusals");
    assert_eq!(sum.prompt_tokens as usize, rec.prompt.len());
}

fn main() {
    run_trials(vec![("refused_typed_and_session_intact", None, refused_typed_and_session_intact)]);
}
