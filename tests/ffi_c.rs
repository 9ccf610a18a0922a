//! The C ABI end to end: `ffi/examples/chat.c` compiled with `cc` against `ffi/include/djinn.h`
//! and the built `libdjinn.so`, run against a real `serve --model NAME=DIR` process over tcp and
//! shm; its streamed token ids must equal in-process greedy decoding of the same conversation.
//! Then the ABI's error paths against the same kind of server, through the crate's Rust symbols
//! (the very functions C calls): codes plus messages, never a crash.

mod common;

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use common::Transport;
use djinn::*;
use djinn_backend::SampleParams;
use djinn_model::{Engine, EngineOptions};

const MODEL_DIR: &str = "llama-gqa";
const MODEL: &str = "gqa";
/// Two turns of raw ids (the committed model has no tokenizer), greedy, past EOS.
const TURNS: [&[u32]; 2] = [&[1, 17, 42, 99, 5], &[63, 7, 21]];
const NEW_TOKENS: usize = 8;

fn model_dir() -> PathBuf {
    djinn_model::testing::reference_root().join(MODEL_DIR)
}

fn model_server(t: Transport) -> common::ServerProc {
    common::model_server(t, MODEL, &model_dir(), &[])
}

/// The directory holding `libdjinn.so`: next to this test executable (`target/<profile>/deps`,
/// where cargo puts a dependency's cdylib) or one level up.
fn cdylib_dir() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let deps = exe.parent().ok_or("test executable has no directory")?.to_path_buf();
    let candidates = [deps.clone(), deps.parent().map(Path::to_path_buf).unwrap_or_default()];
    candidates
        .iter()
        .find(|d| d.join("libdjinn.so").is_file())
        .cloned()
        .ok_or_else(|| format!("libdjinn.so not found in {candidates:?}"))
}

/// The C example built by this test process (removed when the trials end).
static BUILT: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();

/// Compiles the example once per test process; `Err` says why it cannot be (no `cc`, no library).
fn build_example() -> Result<PathBuf, String> {
    BUILT
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            let lib = cdylib_dir()?;
            let out = std::env::temp_dir().join(common::unique_name("chat"));
            let status = Command::new(c_compiler())
                .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-I"])
                .arg(root.join("ffi/include"))
                .arg(root.join("ffi/examples/chat.c"))
                .arg("-L")
                .arg(&lib)
                .arg("-ldjinn")
                .arg(format!("-Wl,-rpath,{}", lib.display()))
                .arg("-o")
                .arg(&out)
                .status()
                .map_err(|e| format!("running cc: {e}"))?;
            if !status.success() {
                return Err(format!("cc failed on ffi/examples/chat.c: {status}"));
            }
            Ok(out)
        })
        .clone()
}

/// Greedy tokens of each turn when the conversation runs in process: turn k continues from every
/// earlier prompt and generated token.
fn in_process_turns() -> Vec<Vec<u32>> {
    let be = Arc::new(djinn_backend::cpu::CpuBackend::with_threads(1).unwrap());
    let mut eng = Engine::load_dir(be, &model_dir(), &EngineOptions::default()).unwrap();
    let sid = eng.open_session().unwrap();
    let greedy = [SampleParams { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0, step: 0 }];
    let mut ids = Vec::new();
    let mut turns = Vec::new();
    let mut pending: Vec<u32> = Vec::new(); // the last generated token, not yet fed
    for prompt in TURNS {
        pending.extend_from_slice(prompt);
        let mut got = Vec::new();
        eng.step_sample(&[(sid, &pending)], &greedy, &mut ids).unwrap();
        got.push(ids[0]);
        while got.len() < NEW_TOKENS {
            eng.step_sample(&[(sid, &[*got.last().unwrap()])], &greedy, &mut ids).unwrap();
            got.push(ids[0]);
        }
        pending = vec![*got.last().unwrap()];
        turns.push(got);
    }
    eng.close_session(sid).unwrap();
    turns
}

fn c_example_matches_in_process(t: Transport) {
    let exe = match build_example() {
        Ok(exe) => exe,
        Err(why) => panic!("cannot build the C example: {why}"),
    };
    let srv = model_server(t);
    let turns: Vec<String> = TURNS
        .iter()
        .map(|ids| format!("ids:{}", ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")))
        .collect();
    let out =
        Command::new(&exe).args(["-n", &NEW_TOKENS.to_string(), "-e", srv.url(), MODEL]).args(&turns).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "chat failed: {}\n{stdout}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    let got: Vec<Vec<u32>> = (1..=TURNS.len())
        .map(|k| {
            let prefix = format!("turn {k} ids:");
            let line = stdout.lines().find_map(|l| l.strip_prefix(prefix.as_str())).expect("turn line");
            line.split_whitespace().map(|x| x.parse().unwrap()).collect()
        })
        .collect();
    assert_eq!(got, in_process_turns(), "C example over {} vs in process:\n{stdout}", t.name());
    assert!(stdout.contains("bytes sent"), "{stdout}");
}

fn last_error() -> String {
    // SAFETY: djinn_last_error returns a valid NUL-terminated string owned by this thread.
    unsafe { CStr::from_ptr(djinn_last_error()) }.to_string_lossy().into_owned()
}

/// Connects through the ABI; panics with the ABI's message on failure.
fn connect(url: &str) -> *mut DjinnClient {
    let url = CString::new(url).unwrap();
    let mut client: *mut DjinnClient = std::ptr::null_mut();
    // SAFETY: valid C strings and a writable out pointer.
    let rc = unsafe { djinn_connect(url.as_ptr(), std::ptr::null(), &mut client) };
    assert_eq!(rc, DJINN_OK, "connect: {}", last_error());
    client
}

/// Cancels after `limit` tokens.
unsafe extern "C" fn stop_after(user: *mut c_void, _token: u32, _text: *const c_char, _len: usize) -> c_int {
    // SAFETY: the test passes a pointer to a live (count, limit) pair for the call's duration.
    let st = unsafe { &mut *(user as *mut (u32, u32)) };
    st.0 += 1;
    c_int::from(st.0 >= st.1)
}

/// What [`reenter`] saw: the client, the codes of its calls back into it, and the bytes it read.
struct Reentry {
    client: *mut DjinnClient,
    close_rc: c_int,
    bytes_received: u64,
}

/// Calls back into its own client from inside the callback: a close must be refused (busy), the
/// byte counters must be readable, and a free must do nothing.
unsafe extern "C" fn reenter(user: *mut c_void, _token: u32, _text: *const c_char, _len: usize) -> c_int {
    // SAFETY: the test passes a pointer to a live Reentry for the call's duration.
    let r = unsafe { &mut *(user as *mut Reentry) };
    // SAFETY: the client is live (the generate call using it is on the stack).
    unsafe {
        r.close_rc = djinn_session_close(r.client, 1);
        r.bytes_received = djinn_bytes_received(r.client);
        djinn_client_free(r.client);
    }
    1
}

fn error_paths_are_codes_with_messages(t: Transport) {
    let srv = model_server(t);
    let client = connect(srv.url());
    let mut info = DjinnSessionInfo::default();
    // SAFETY (whole block): `client` is live and used by this thread only; every other pointer is
    // NULL where the ABI allows it or points to live memory for the call.
    unsafe {
        assert_eq!(djinn_session_open(client, c"no-such-model".as_ptr(), 0, 0, &mut info), 14);
        assert!(last_error().contains("no-such-model"), "{}", last_error());
        assert_eq!(CStr::from_ptr(djinn_code_name(14)).to_str().unwrap(), "DJINN_E_UNKNOWN_MODEL");
        assert_eq!(djinn_session_open(client, std::ptr::null(), 0, 0, &mut info), DJINN_E_NULL_ARG);
        assert_eq!(djinn_session_open(client, c"gqa".as_ptr(), 7, 0, &mut info), DJINN_E_INVALID_ARG);
        assert_eq!(djinn_session_open(client, c"gqa".as_ptr(), 0, 0, std::ptr::null_mut()), DJINN_E_NULL_ARG);
        assert_eq!(djinn_session_close(client, 0xdead_beef), 15, "{}", last_error());
        assert_eq!(djinn_session_attach(client, 0xdead_beef, std::ptr::null_mut()), 15);

        assert_eq!(djinn_session_open(client, c"gqa".as_ptr(), 0, 0, &mut info), DJINN_OK, "{}", last_error());
        assert_eq!(info.vocab, 128);
        assert_eq!(info.has_tokenizer, 0);
        let mut res = DjinnGenerateResult::default();
        // Text needs a tokenizer; this model has none: the server's BadArgument.
        let rc = djinn_generate_text(
            client,
            info.session,
            DJINN_INPUT_RAW,
            c"hello".as_ptr(),
            std::ptr::null(),
            None,
            std::ptr::null_mut(),
            &mut res,
        );
        assert_eq!(rc, 10, "{}", last_error());
        let rc = djinn_generate_text(
            client,
            info.session,
            9,
            c"hello".as_ptr(),
            std::ptr::null(),
            None,
            std::ptr::null_mut(),
            &mut res,
        );
        assert_eq!(rc, DJINN_E_INVALID_ARG);
        let bad_utf8 = [b'h', 0xff, 0];
        let rc = djinn_generate_text(
            client,
            info.session,
            DJINN_INPUT_RAW,
            bad_utf8.as_ptr().cast(),
            std::ptr::null(),
            None,
            std::ptr::null_mut(),
            &mut res,
        );
        assert_eq!(rc, DJINN_E_INVALID_UTF8);
        // An id outside the vocabulary.
        let ids = [1u32, 5000];
        let rc = djinn_generate_ids(
            client,
            info.session,
            ids.as_ptr(),
            2,
            std::ptr::null(),
            None,
            std::ptr::null_mut(),
            &mut res,
        );
        assert_eq!(rc, 10, "{}", last_error());
        // The session is still usable; a callback returning non-zero cancels.
        let mut params = std::mem::zeroed::<DjinnDecodeParams>();
        djinn_decode_params_default(&mut params);
        params.max_new_tokens = 20;
        params.ignore_eos = 1;
        let mut st: (u32, u32) = (0, 3);
        let ids = [1u32, 17, 42];
        let rc = djinn_generate_ids(
            client,
            info.session,
            ids.as_ptr(),
            3,
            &params,
            Some(stop_after),
            (&mut st as *mut (u32, u32)).cast(),
            &mut res,
        );
        assert_eq!(rc, DJINN_OK, "{}", last_error());
        assert_eq!(res.finish, DJINN_FINISH_CANCELLED);
        assert_eq!(res.prompt_tokens, 3);
        assert_eq!((st.0, res.tokens), (3, 3), "the callback is not called again after it cancels");
        assert!(res.context_tokens >= 3 + 3, "{res:?}");
        // Calling back into the client from its callback: refused, not undefined behaviour.
        let mut r = Reentry { client, close_rc: 0, bytes_received: 0 };
        let rc = djinn_generate_ids(
            client,
            info.session,
            std::ptr::null(),
            0,
            &params,
            Some(reenter),
            (&mut r as *mut Reentry).cast(),
            &mut res,
        );
        assert_eq!(rc, DJINN_OK, "{}", last_error());
        assert_eq!(r.close_rc, DJINN_E_CLIENT_BUSY);
        assert!(r.bytes_received > 0);
        assert!(last_error().contains("in use"), "{}", last_error());
        assert_eq!(res.finish, DJINN_FINISH_CANCELLED);
        // The client survived the refused free and is still usable.
        assert_eq!(djinn_session_close(client, info.session), DJINN_OK, "{}", last_error());
        assert!(djinn_bytes_sent(client) > 0 && djinn_bytes_received(client) > 0);
        djinn_client_free(client);

        // Nothing listens on a port this test just bound and closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = CString::new(format!("tcp://127.0.0.1:{port}")).unwrap();
        let mut c: *mut DjinnClient = std::ptr::null_mut();
        assert_eq!(djinn_connect(url.as_ptr(), std::ptr::null(), &mut c), DJINN_E_CONNECT);
        assert!(last_error().contains(&port.to_string()), "{}", last_error());
        assert!(c.is_null());
    }
}

/// The header's structs and codes as a C compiler lays them out, against the Rust side.
fn header_matches_the_library(_t: Transport) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(common::unique_name("layout"));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("layout.c");
    std::fs::write(
        &src,
        r#"#include <stddef.h>
#include <stdio.h>
#include "djinn.h"
#define S(t) printf(#t " %zu\n", sizeof(t))
#define O(t, f) printf(#t "." #f " %zu\n", offsetof(t, f))
int main(void) {
    S(djinn_session_info); O(djinn_session_info, vocab); O(djinn_session_info, has_chat_template);
    S(djinn_decode_params); O(djinn_decode_params, seed); O(djinn_decode_params, ignore_eos);
    O(djinn_decode_params, stop); O(djinn_decode_params, stop_count);
    S(djinn_generate_result); O(djinn_generate_result, context_tokens);
    printf("codes %d %d %d %d\n", DJINN_E_UNKNOWN_MODEL, DJINN_E_NULL_ARG, DJINN_E_PANIC, DJINN_E_CLIENT_BUSY);
    return 0;
}
"#,
    )
    .unwrap();
    let exe = dir.join("layout");
    let status = Command::new(c_compiler())
        .args(["-std=c99", "-Wall", "-Werror", "-I"])
        .arg(root.join("ffi/include"))
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .status()
        .unwrap();
    assert!(status.success(), "cc failed on the layout probe");
    let out = String::from_utf8(Command::new(&exe).output().unwrap().stdout).unwrap();
    use std::mem::{offset_of, size_of};
    let want = [
        format!("djinn_session_info {}", size_of::<DjinnSessionInfo>()),
        format!("djinn_session_info.vocab {}", offset_of!(DjinnSessionInfo, vocab)),
        format!("djinn_session_info.has_chat_template {}", offset_of!(DjinnSessionInfo, has_chat_template)),
        format!("djinn_decode_params {}", size_of::<DjinnDecodeParams>()),
        format!("djinn_decode_params.seed {}", offset_of!(DjinnDecodeParams, seed)),
        format!("djinn_decode_params.ignore_eos {}", offset_of!(DjinnDecodeParams, ignore_eos)),
        format!("djinn_decode_params.stop {}", offset_of!(DjinnDecodeParams, stop)),
        format!("djinn_decode_params.stop_count {}", offset_of!(DjinnDecodeParams, stop_count)),
        format!("djinn_generate_result {}", size_of::<DjinnGenerateResult>()),
        format!("djinn_generate_result.context_tokens {}", offset_of!(DjinnGenerateResult, context_tokens)),
        format!("codes 14 {DJINN_E_NULL_ARG} {DJINN_E_PANIC} {DJINN_E_CLIENT_BUSY}"),
    ];
    assert_eq!(out.lines().collect::<Vec<_>>(), want.iter().map(String::as_str).collect::<Vec<_>>());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The C compiler: `DJINN_TEST_CC`, else `CC`, else `cc`.
fn c_compiler() -> String {
    std::env::var("DJINN_TEST_CC").or_else(|_| std::env::var("CC")).unwrap_or_else(|_| "cc".into())
}

/// Why the C example cannot be compiled on this machine (no C compiler), if it cannot.
fn no_c_compiler() -> Option<String> {
    let cc = c_compiler();
    match Command::new(&cc).arg("--version").output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!("`{cc} --version` failed: {}", o.status)),
        Err(e) => Some(format!("no C compiler `{cc}`: {e}")),
    }
}

/// The README's C lines (between `c-build` markers) run as written with `sh`, in a folder where
/// `ffi` is the repository's and `target/release` is where this build put `libdjinn.so` and
/// `libdjinn.a`; `cargo build` is skipped (cargo built the library for this test) and the
/// example's URL and model are this test's server's. Both binaries run without LD_LIBRARY_PATH.
fn readme_c_lines_work(t: Transport) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let block = readme.split("<!-- c-build:begin -->").nth(1).and_then(|r| r.split("<!-- c-build:end -->").next());
    let lines: Vec<&str> =
        block.expect("README has the c-build markers").lines().filter(|l| !l.starts_with("```")).collect();
    let lib = cdylib_dir().unwrap();
    assert!(lib.join("libdjinn.a").is_file(), "no libdjinn.a next to libdjinn.so in {}", lib.display());
    let dir = std::env::temp_dir().join(common::unique_name("readme-c"));
    std::fs::create_dir_all(dir.join("target")).unwrap();
    std::os::unix::fs::symlink(root.join("ffi"), dir.join("ffi")).unwrap();
    std::os::unix::fs::symlink(&lib, dir.join("target/release")).unwrap();
    let srv = model_server(t);
    let mut ran = 0;
    for line in lines.iter().map(|l| l.split(" # ").next().unwrap().trim()).filter(|l| !l.is_empty()) {
        let line = if line.starts_with("./chat ") {
            // The example's own server: its URL, its model (raw ids: the model has no tokenizer).
            format!("./chat -n 4 {} {MODEL} ids:1,2,3 && ./chat-static -n 4 {} {MODEL} ids:1,2,3", srv.url(), srv.url())
        } else if line.starts_with("cargo build") {
            continue;
        } else {
            line.replace("cc ", &format!("{} ", c_compiler()))
        };
        let out =
            Command::new("sh").args(["-c", &line]).current_dir(&dir).env_remove("LD_LIBRARY_PATH").output().unwrap();
        assert!(
            out.status.success(),
            "README line failed: {line}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        ran += 1;
    }
    assert_eq!(ran, 3, "expected two cc lines and a run line in the README block");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A trial body: its name, the body, and whether a missing C compiler ignores it.
type Body = (&'static str, fn(Transport), bool);

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    let shm_missing = Transport::Shm.unavailable();
    let rdma_missing = Transport::Rdma.unavailable();
    let cc_missing = no_c_compiler();
    for why in shm_missing.iter().chain(&rdma_missing).chain(&cc_missing) {
        eprintln!("NOTE: trials ignored: {why}");
    }
    // (name, body, ignored for want of a C compiler)
    let bodies: [Body; 4] = [
        ("readme_c_lines_work", readme_c_lines_work, cc_missing.is_some()),
        ("c_example_matches_in_process", c_example_matches_in_process, cc_missing.is_some()),
        ("header_matches_the_library", header_matches_the_library, cc_missing.is_some()),
        ("error_paths_are_codes_with_messages", error_paths_are_codes_with_messages, false),
    ];
    let mut trials = Vec::new();
    for (name, body, needs_missing_cc) in bodies {
        // The layout probe involves no server: once is enough.
        let transports: &[Transport] = if matches!(name, "header_matches_the_library" | "readme_c_lines_work") {
            &[Transport::Tcp]
        } else {
            &Transport::ALL
        };
        for &t in transports {
            let ignored = needs_missing_cc
                || (t == Transport::Shm && shm_missing.is_some())
                || (t == Transport::Rdma && rdma_missing.is_some());
            trials.push(
                libtest_mimic::Trial::test(
                    if transports.len() == 1 { name.to_string() } else { format!("{name}_{}", t.name()) },
                    move || {
                        body(t);
                        Ok(())
                    },
                )
                .with_ignored_flag(ignored),
            );
        }
    }
    let conclusion = libtest_mimic::run(&args, trials);
    if let Some(Ok(exe)) = BUILT.get() {
        let _ = std::fs::remove_file(exe);
    }
    conclusion.exit()
}
