//! `djinn-dataplane debug` as a user runs it: the real binary on the committed 4-layer reference
//! checkpoint, checked against what transformers recorded (`breakpoints.json`): the dumped
//! hidden states, the unpatched continuation, a patched one (both also with the pauses in a
//! prefill, `--prefill`), and a refused layer.

use std::path::{Path, PathBuf};
use std::process::Command;

use djinn_dataplane::npy;
use djinn_model::testing::{reference_root, Breakpoints, BREAKPOINT_MODEL};

fn record() -> (PathBuf, Breakpoints) {
    let dir = reference_root().join(BREAKPOINT_MODEL);
    let rec = serde_json::from_slice(&std::fs::read(dir.join("breakpoints.json")).unwrap()).unwrap();
    (dir, rec)
}

fn debug(model: &Path, rec: &Breakpoints, extra: &[&str]) -> std::process::Output {
    let ids: Vec<String> = rec.prompt.iter().map(u32::to_string).collect();
    Command::new(env!("CARGO_BIN_EXE_djinn-dataplane"))
        .args(["debug", "--gpus", "cpu", "--threads", "1", "--json", "--ignore-eos", "--model-dir"])
        .arg(model)
        .args(["--prompt-ids", &ids.join(","), "--max-new-tokens", &rec.greedy.len().to_string()])
        .args(extra)
        .output()
        .unwrap()
}

fn tokens(out: &std::process::Output) -> (Vec<u32>, serde_json::Value) {
    assert!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    (serde_json::from_value(v["tokens"].clone()).unwrap(), v)
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("djinn-debug-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn dumps_match_transformers_and_resume_continues() {
    let (model, rec) = record();
    let dump = tmp("dump");
    let all: Vec<String> = (1..=rec.layers).map(|n| n.to_string()).collect();
    let out = debug(&model, &rec, &["--break-at", &all.join(","), "--dump-dir", dump.to_str().unwrap()]);
    let (toks, v) = tokens(&out);
    assert_eq!(toks, rec.greedy);
    let pre = debug(&model, &rec, &["--prefill", "--break-at", "2", "--dump-dir", dump.to_str().unwrap()]);
    assert_eq!(tokens(&pre).0, rec.greedy, "--prefill");
    let pauses = v["pauses"].as_array().unwrap();
    assert_eq!(pauses.len(), rec.layers);
    for (p, n) in pauses.iter().zip(1..) {
        assert_eq!(p["layer"], n);
        assert!(p["pause_ms"].as_f64().unwrap() >= 0.0 && p["resume_ms"].as_f64().unwrap() > 0.0, "{p}");
    }
    for want in &rec.hidden {
        let (shape, got) = npy::read_f32(&dump.join(format!("layer-{}.npy", want.layer))).unwrap();
        assert_eq!(shape, [rec.prompt.len(), want.hidden[0].len()]);
        let want: Vec<f32> = want.hidden.concat();
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        let err = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(err <= 1e-4 * scale, "layer: max error {err} of {scale}");
    }
    std::fs::remove_dir_all(&dump).unwrap();
}

#[test]
fn patch_dir_replaces_the_state() {
    let (model, rec) = record();
    let (dump, patches) = (tmp("pdump"), tmp("patch"));
    for p in &rec.patches {
        let values: Vec<f32> = p.hidden.iter().flatten().map(|&x| x as f32).collect();
        npy::write_f32(&patches.join(format!("layer-{}.npy", p.layer)), &[p.hidden.len(), p.hidden[0].len()], &values)
            .unwrap();
        let out = debug(
            &model,
            &rec,
            &[
                "--break-at",
                &p.layer.to_string(),
                "--dump-dir",
                dump.to_str().unwrap(),
                "--patch-dir",
                patches.to_str().unwrap(),
            ],
        );
        assert_eq!(tokens(&out).0, p.greedy, "patch at layer {}", p.layer);
        // The same patch in a prefill's pass: the decode after it samples from the kept state.
        let layer = p.layer.to_string();
        let (d, q) = (dump.to_str().unwrap(), patches.to_str().unwrap());
        let out = debug(&model, &rec, &["--prefill", "--break-at", &layer, "--dump-dir", d, "--patch-dir", q]);
        assert_eq!(tokens(&out).0, p.greedy, "prefill patched at layer {}", p.layer);
        std::fs::remove_file(patches.join(format!("layer-{}.npy", p.layer))).unwrap();
    }
    // A patch of the wrong shape is refused, naming the file.
    npy::write_f32(&patches.join("layer-1.npy"), &[2, 3], &[0.0; 6]).unwrap();
    let out = debug(
        &model,
        &rec,
        &["--break-at", "1", "--dump-dir", dump.to_str().unwrap(), "--patch-dir", patches.to_str().unwrap()],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("shape [2, 3]"));
    let out = debug(&model, &rec, &["--break-at", "5", "--dump-dir", dump.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("within 1..=4"));
    std::fs::remove_dir_all(&dump).unwrap();
    std::fs::remove_dir_all(&patches).unwrap();
}
