//! `/metrics` after a real session: the exposition passes `promtool check metrics` (Debian's
//! `prometheus` package; without promtool the trial is reported as ignored, with the reason),
//! carries the session series (queue depth, prompt tokens, end-to-end latency, `model` labels),
//! the node as one `djinn_target_info` series, and the renamed series under both names, label
//! values in snake_case beside the wire-cased series of the previous release.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::{http_get, metric, Transport};

fn promtool_missing() -> Option<String> {
    match Command::new("promtool").arg("--version").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("no `promtool` (install Debian's `prometheus` package)".into()),
    }
}

fn metrics_after_a_session() -> String {
    let dir = djinn_model::testing::reference_root().join("llama-gqa");
    let srv = common::model_server(Transport::Tcp, "gqa", &dir, &["--metrics-listen", "127.0.0.1:0"]);
    let out = Command::new(common::BIN)
        .args(["generate", "--server", srv.url(), "--model", "gqa", "--prompt-ids", "1,2,3", "--max-new-tokens", "4"])
        .args(["--ignore-eos", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (code, body) = http_get(srv.metrics.as_deref().unwrap(), "/metrics");
    assert_eq!(code, 200);
    body
}

fn series_are_there() {
    let body = metrics_after_a_session();
    for (name, want) in [
        ("djinn_prompt_tokens_total{model=\"gqa\"}", Some(3.0)),
        ("djinn_tokens_generated_total{model=\"gqa\"}", Some(4.0)),
        ("djinn_session_request_duration_seconds_count{opcode=\"session_decode\"}", Some(1.0)),
        ("djinn_session_request_duration_seconds_count{opcode=\"SessionDecode\"}", Some(1.0)),
        ("djinn_requests_total{opcode=\"session_open\"}", Some(1.0)),
        ("djinn_requests_total{opcode=\"SessionOpen\"}", Some(1.0)),
        ("djinn_session_queue_depth", None),
        ("djinn_target_info{node=\"djinn-0\"", Some(1.0)),
        ("djinn_kv_peak_used_bytes{model=\"gqa\"}", None),
        ("djinn_kv_used_bytes_peak{model=\"gqa\"}", None),
        ("djinn_tensor_live_bytes", None),
        ("djinn_tensor_bytes_live", None),
    ] {
        let got = metric(&body, name);
        assert!(got.is_some(), "{name} missing from:\n{body}");
        if let Some(w) = want {
            assert_eq!(got, Some(w), "{name}");
        }
    }
    let noded = body.lines().filter(|l| !l.starts_with('#') && l.contains("node=")).count();
    assert_eq!(noded, 1, "only djinn_target_info carries the node:\n{body}");
}

fn promtool_accepts_the_exposition() {
    let body = metrics_after_a_session();
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "promtool check metrics:\n{said}");
}

fn main() {
    let args = libtest_mimic::Arguments::from_args();
    let missing = promtool_missing();
    if let Some(why) = &missing {
        eprintln!("NOTE: promtool trial ignored: {why}");
    }
    let trials = vec![
        libtest_mimic::Trial::test("series_are_there", || {
            series_are_there();
            Ok(())
        }),
        libtest_mimic::Trial::test("promtool_accepts_the_exposition", || {
            promtool_accepts_the_exposition();
            Ok(())
        })
        .with_ignored_flag(missing.is_some()),
    ];
    libtest_mimic::run(&args, trials).exit()
}
