//! The `generate`, `logits` and `convert-gguf` subcommands as a user runs them: the real binary on
//! a committed reference checkpoint, checked against the transformers numbers recorded next to it.

use std::process::Command;

use djinn_model::testing::{argmax, read_reference, reference_root};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_djinn-dataplane"))
}

fn json_of(out: std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

#[test]
fn generate_json_greedy_matches_transformers() {
    let dir = reference_root().join("llama-gqa");
    let r = read_reference(&dir).unwrap();
    let case = &r.cases[0];
    let ids: Vec<String> = case.prompt.iter().map(u32::to_string).collect();
    let out = bin()
        .args([
            "generate",
            "--gpus",
            "cpu",
            "--threads",
            "1",
            "--dtype",
            "stored",
            "--json",
            "--ignore-eos",
            "--model-dir",
        ])
        .arg(&dir)
        .args(["--prompt-ids", &ids.join(","), "--max-new-tokens", &case.greedy.len().to_string()])
        .output()
        .unwrap();
    let v = json_of(out);
    let tokens: Vec<u32> = serde_json::from_value(v["tokens"].clone()).unwrap();
    assert_eq!(tokens, case.greedy);
    assert!(v["ttft_ms"].as_f64().unwrap() > 0.0 && v["tpot_ms"].as_f64().unwrap() > 0.0, "{v}");
    assert_eq!(v["text"], "");
}

#[test]
fn logits_json_matches_transformers() {
    let dir = reference_root().join("qwen2-bias");
    let r = read_reference(&dir).unwrap();
    let case = &r.cases[0];
    let ids: Vec<String> = case.prompt.iter().map(u32::to_string).collect();
    let out = bin()
        .args(["logits", "--gpus", "cpu", "--threads", "1", "--json", "--model-dir"])
        .arg(&dir)
        .args(["--prompt-ids", &ids.join(",")])
        .output()
        .unwrap();
    let v = json_of(out);
    let rows: Vec<Vec<f32>> = serde_json::from_value(v["logits"].clone()).unwrap();
    assert_eq!(rows.len(), case.prompt.len());
    for (got, want) in rows.iter().zip(&case.logits) {
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        let err = got.iter().zip(want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= 1e-3 * scale, "{err} vs {scale}");
        assert_eq!(argmax(got), argmax(want));
    }
}

#[test]
fn bad_requests_fail_with_a_message() {
    let dir = reference_root().join("llama-gqa");
    let out = bin().args(["generate", "--model-dir"]).arg(&dir).args(["--prompt-ids", "1,500"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("token id 500"), "{}", String::from_utf8_lossy(&out.stderr));
    // Text needs a tokenizer; this directory has none.
    let out = bin().args(["generate", "--model-dir"]).arg(&dir).args(["--prompt", "hi"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tokenizer"));
    let out = bin().args(["convert-gguf"]).arg(dir.join("config.json")).arg("/nonexistent/x").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad magic"));
}

#[test]
fn in_process_flags_are_refused_with_server() {
    for flag in [&["--dtype", "bf16"][..], &["--threads", "2"], &["--gpus", "cpu"]] {
        let out = bin()
            .args(["generate", "--prompt-ids", "1", "--server", "tcp://127.0.0.1:1", "--model", "m"])
            .args(flag)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag:?} with --server was accepted");
        assert!(err.contains(flag[0]) && err.contains("--server"), "{flag:?}: {err}");
    }
}

#[test]
fn errors_say_the_cause_once_and_what_to_do() {
    let out = bin().args(["generate", "--prompt-ids", "1", "--server", "tcp://127.0.0.1:1", "--model", "m"]).output();
    let err = String::from_utf8_lossy(&out.unwrap().stderr).into_owned();
    assert_eq!(err.matches("refused").count(), 1, "{err}");
    assert!(err.contains("serve --listen tcp://127.0.0.1:1"), "{err}");
    let out = bin().args(["generate", "--prompt-ids", "1", "--model-dir", "/nonexistent/m"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(err.matches("/nonexistent/m").count(), 1, "{err}");
    assert!(err.contains(".gguf"), "{err}");
}

/// `generate` computes an f32 checkpoint in bf16 unless told otherwise; `logits` keeps f32.
#[test]
fn generate_defaults_to_bf16_and_logits_to_stored() {
    let dir = reference_root().join("llama-gqa");
    let run = |extra: &[&str]| {
        let out = bin()
            .args(["generate", "--gpus", "cpu", "--threads", "1", "--json", "--ignore-eos", "--max-new-tokens", "24"])
            .args(["--prompt-ids", "1,17,42,99,5,63", "--model-dir"])
            .arg(&dir)
            .args(extra)
            .output()
            .unwrap();
        json_of(out)["tokens"].clone()
    };
    assert_eq!(run(&[]), run(&["--dtype", "bf16"]), "default = bf16 for an f32 checkpoint");
    let logits = |extra: &[&str]| {
        let mut cmd = bin();
        cmd.args(["logits", "--gpus", "cpu", "--json", "--prompt-ids", "1,2,3", "--model-dir"]).arg(&dir).args(extra);
        json_of(cmd.output().unwrap())["logits"].clone()
    };
    assert_eq!(logits(&[]), logits(&["--dtype", "f32"]), "logits keep the stored f32");
}
