//! `djinn-dataplane bench load` and `bench overhead` against real servers (the committed tiny
//! test model), the QoS flags of the session commands, and the errors bad flags get.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{Transport, BIN};

const TINY: &str = "llama-gqa";

fn tiny_server() -> common::ServerProc {
    common::model_server(Transport::Tcp, "tiny", &djinn_model::testing::reference_root().join(TINY), &[])
}

fn out_dir(what: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(common::unique_name(what));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("running djinn-dataplane")
}

fn ok(args: &[&str]) -> Output {
    let o = run(args);
    assert!(
        o.status.success(),
        "{args:?} failed: {}\nstdout: {}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    o
}

/// Runs `bench load` with small settings against `url`, into `out`.
fn load(url: &str, users: &str, out: &Path, extra: &[&str]) {
    let out = out.to_str().unwrap();
    let mut args = vec!["bench", "load", "--server", url, "--model", "tiny", "--users", users, "--duration-s", "1.5"];
    args.extend_from_slice(&["--mix", "realtime=0.5,batch=0.5", "--prompt-tokens", "8", "--max-new-tokens", "8"]);
    args.extend_from_slice(&["--out", out]);
    args.extend_from_slice(extra);
    ok(&args);
}

/// A well-formed SVG document: one `<svg>` root, every element closed in order.
fn assert_svg(path: &Path) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let body = text.trim();
    assert!(body.starts_with("<svg") && body.ends_with("</svg>"), "{} is not an SVG document", path.display());
    assert!(body.contains("<text"), "{} has no text", path.display());
    let mut stack: Vec<&str> = Vec::new();
    let mut rest = body;
    while let Some(i) = rest.find('<') {
        let j = rest[i..].find('>').unwrap_or_else(|| panic!("{}: unterminated tag", path.display())) + i;
        let tag = &rest[i + 1..j];
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(stack.pop(), Some(name.trim()), "{}: </{name}> closes the wrong element", path.display());
        } else if !tag.ends_with('/') && !tag.starts_with('?') && !tag.starts_with('!') {
            stack.push(tag.split_whitespace().next().unwrap_or(""));
        }
        rest = &rest[j + 1..];
    }
    assert!(stack.is_empty(), "{}: unclosed {stack:?}", path.display());
}

fn results(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap()).unwrap()
}

#[test]
fn bench_load_writes_results_csv_and_plots() {
    let srv = tiny_server();
    let dir = out_dir("load");
    load(srv.url(), "1,2", &dir, &["--scheduler", "fcfs"]);
    let r = results(&dir);
    let keys: Vec<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
    let mut want =
        vec!["server", "model", "scheduler", "mode", "duration_s", "prompt_tokens", "max_new_tokens", "mix", "runs"];
    want.sort();
    let mut got = keys.clone();
    got.sort();
    assert_eq!(got, want);
    assert_eq!(r["scheduler"], "fcfs");
    assert_eq!(r["mode"], "closed");
    assert_eq!(r["model"], "tiny");
    assert_eq!(r["mix"]["realtime"], 0.5);
    let runs = r["runs"].as_array().unwrap();
    let level: Vec<(u64, &str)> =
        runs.iter().map(|row| (row["users"].as_u64().unwrap(), row["class"].as_str().unwrap())).collect();
    // One user gets the higher-priority class of a tie; two users one each.
    assert_eq!(level, vec![(1, "all"), (1, "realtime"), (2, "all"), (2, "realtime"), (2, "batch")]);
    for row in runs {
        let mut k: Vec<&str> = row.as_object().unwrap().keys().map(String::as_str).collect();
        k.sort();
        assert_eq!(
            k,
            ["class", "errors", "requests", "sla_violations", "tokens", "tokens_per_s", "tpot_ms", "ttft_ms", "users"]
        );
        assert_eq!(row["errors"], 0, "{row}");
        assert!(row["requests"].as_u64().unwrap() > 0, "{row}");
        // EOS is ignored: every completed request made exactly --max-new-tokens.
        assert!(row["tokens"].as_u64().unwrap() >= 8 * row["requests"].as_u64().unwrap(), "{row}");
        assert!(row["tokens_per_s"].as_f64().unwrap() > 0.0);
        for m in ["ttft_ms", "tpot_ms"] {
            let (p50, p99) = (row[m]["p50"].as_f64().unwrap(), row[m]["p99"].as_f64().unwrap());
            assert!(0.0 <= p50 && p50 <= p99, "{m} of {row}");
        }
    }
    let csv = std::fs::read_to_string(dir.join("results.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0].split(',').count(), 11);
    assert_eq!(lines.len(), runs.len() + 1, "{csv}");
    for (line, row) in lines[1..].iter().zip(runs) {
        let f: Vec<&str> = line.split(',').collect();
        assert_eq!(f[0], row["users"].to_string());
        assert_eq!(f[1], row["class"].as_str().unwrap());
        assert_eq!(f[3], row["tokens"].to_string());
    }
    for svg in ["throughput_vs_users.svg", "tpot_p99_vs_users.svg"] {
        assert_svg(&dir.join(svg));
    }
    assert!(!dir.join("qos_vs_fcfs.svg").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bench_load_compare_draws_both_runs() {
    let srv = tiny_server();
    let (a, b) = (out_dir("cmp-a"), out_dir("cmp-b"));
    load(srv.url(), "1", &a, &["--scheduler", "fcfs"]);
    load(srv.url(), "1", &b, &["--scheduler", "qos", "--compare", a.to_str().unwrap(), "--rate", "50"]);
    assert_eq!(results(&b)["mode"], "open");
    let svg = b.join("qos_vs_fcfs.svg");
    assert_svg(&svg);
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("(fcfs)") && text.contains("(qos)"), "both runs are labelled");
    // A folder without results.json is refused before any load runs.
    let o = run(&[
        "bench",
        "load",
        "--server",
        srv.url(),
        "--model",
        "tiny",
        "--out",
        b.to_str().unwrap(),
        "--compare",
        "/nonexistent",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--compare /nonexistent"));
    let _ = std::fs::remove_dir_all(&a);
    let _ = std::fs::remove_dir_all(&b);
}

#[test]
fn bench_load_refuses_bad_flags_clearly() {
    let out = out_dir("bad");
    let o = out.to_str().unwrap();
    let base = ["bench", "load", "--server", "tcp://127.0.0.1:1", "--model", "m", "--out", o];
    for (extra, says) in [
        (&["--mix", "realtime=0.5,batch=0.4"][..], "add up to 0.9"),
        (&["--mix", "realtime=0.5,bulk=0.5"][..], "unknown class \"bulk\""),
        (&["--users", "1,0"][..], "every level needs at least one user"),
        (&["--rate", "0"][..], "--rate 0 must be a positive number"),
        (&["--duration-s=-1"][..], "--duration-s -1"),
    ] {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let r = run(&args);
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(!r.status.success() && err.contains(says), "{extra:?}: {err}");
    }
    assert!(!out.exists(), "nothing is written for bad flags");
}

#[test]
fn bench_overhead_reports_every_available_transport() {
    let o = ok(&[
        "bench",
        "overhead",
        "--transports",
        "tcp,shm,rdma",
        "--payload-tokens",
        "1,16",
        "--decode-tokens",
        "4",
        "--calls",
        "3",
        "--threads",
        "1",
        "--json",
    ]);
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rows = r["rows"].as_array().unwrap();
    let skipped: Vec<&str> = r["skipped"].as_array().unwrap().iter().map(|s| s[0].as_str().unwrap()).collect();
    for t in Transport::ALL {
        let of: Vec<&serde_json::Value> = rows.iter().filter(|row| row["transport"] == t.name()).collect();
        if t.unavailable().is_some() {
            assert!(of.is_empty() && skipped.contains(&t.name()), "{} is skipped with its reason", t.name());
            continue;
        }
        let shape: Vec<(&str, u64)> =
            of.iter().map(|row| (row["kind"].as_str().unwrap(), row["payload_bytes"].as_u64().unwrap())).collect();
        assert_eq!(shape, vec![("call", 4), ("call", 64), ("decode_step", 4)], "{}", t.name());
        for row in of {
            assert!(row["in_process_us"].as_f64().unwrap() > 0.0, "{row}");
            assert!(row["remote_us"].as_f64().unwrap() > 0.0, "{row}");
            assert!(row["ratio"].as_f64().unwrap() > 0.0, "{row}");
            assert!(row["overhead_us"].is_number(), "{row}");
        }
    }
}

#[test]
fn session_commands_take_a_qos_class_and_deadline() {
    let srv = tiny_server();
    let o = ok(&[
        "generate",
        "--server",
        srv.url(),
        "--model",
        "tiny",
        "--prompt-ids",
        "1,2,3",
        "--max-new-tokens",
        "3",
        "--qos",
        "realtime",
        "--deadline-ms",
        "20",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["tokens"].as_array().unwrap().len(), 3);
    let r = run(&["generate", "--server", srv.url(), "--model", "tiny", "--prompt-ids", "1", "--qos", "fast"]);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("unknown QoS class \"fast\""));
    let r = run(&["chat", "--server", srv.url(), "--model", "tiny", "--qos", "bulk"]);
    assert!(String::from_utf8_lossy(&r.stderr).contains("unknown QoS class \"bulk\""));
}
