//! Breakpoints through the C ABI: `ffi/examples/breakpoints.c` compiled with `cc` against
//! `djinn.h` and the built `libdjinn.so`, run against a real server over tcp and shm on the
//! 4-layer reference checkpoint: it pauses after every layer (reading each state), optionally
//! writes the state back, and must generate transformers' greedy tokens — with the pauses in a
//! decode's input pass, and (`-p`) in a prefill's whose kept state the decode samples from.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{model_server, run_trials, Transport};
use djinn_model::testing::{reference_root, Breakpoints, BREAKPOINT_MODEL};

fn cc() -> String {
    std::env::var("DJINN_TEST_CC").or_else(|_| std::env::var("CC")).unwrap_or_else(|_| "cc".into())
}

/// Builds the example next to this test's temporary files; panics with the reason.
fn build() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap().to_path_buf();
    let lib = [deps.clone(), deps.parent().unwrap().to_path_buf()]
        .into_iter()
        .find(|d| d.join("libdjinn.so").is_file())
        .expect("libdjinn.so next to the test binary");
    let out = std::env::temp_dir().join(common::unique_name("breakpoints"));
    let status = Command::new(cc())
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-I"])
        .arg(root.join("ffi/include"))
        .arg(root.join("ffi/examples/breakpoints.c"))
        .arg("-L")
        .arg(&lib)
        .arg("-ldjinn")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-o")
        .arg(&out)
        .status()
        .expect("running cc");
    assert!(status.success(), "cc failed on ffi/examples/breakpoints.c");
    out
}

fn c_example_pauses_and_resumes(t: Transport) {
    let dir = reference_root().join(BREAKPOINT_MODEL);
    let rec: Breakpoints = serde_json::from_slice(&std::fs::read(dir.join("breakpoints.json")).unwrap()).unwrap();
    let srv = model_server(t, "deep", &dir, &["--dtype", "f32"]);
    let exe = build();
    let ids: Vec<String> = rec.prompt.iter().map(u32::to_string).collect();
    let layers: Vec<String> = (1..=rec.layers).map(|n| n.to_string()).collect();
    let want: Vec<String> = rec.greedy.iter().map(u32::to_string).collect();
    for (prefill, patch) in [(false, None), (false, Some("1.0")), (true, None), (true, Some("1.0"))] {
        let mut cmd = Command::new(&exe);
        if prefill {
            cmd.arg("-p");
        }
        if let Some(s) = patch {
            cmd.args(["-s", s]);
        }
        let out = cmd
            .args([srv.url(), "deep", &layers.join(","), &ids.join(","), &rec.greedy.len().to_string()])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
        let pauses: Vec<&str> = stdout.lines().filter(|l| l.starts_with("pause ")).collect();
        assert_eq!(pauses.len(), rec.layers, "{stdout}");
        for (line, n) in pauses.iter().zip(1..) {
            let f: Vec<&str> = line.split(' ').collect();
            assert_eq!(
                f[1..4],
                [n.to_string(), rec.prompt.len().to_string(), rec.hidden[0].hidden[0].len().to_string()]
            );
            let want: f64 = rec.hidden[n - 1].hidden.iter().flatten().map(|&x| f64::from(x)).sum();
            let got: f64 = f[4].parse().unwrap();
            assert!((got - want).abs() <= 1e-3 * want.abs().max(1.0), "layer {n}: sum {got} vs {want}");
        }
        let ids_line = stdout.lines().find_map(|l| l.strip_prefix("ids:")).expect("an ids line");
        assert_eq!(ids_line.split_whitespace().collect::<Vec<_>>(), want, "prefill {prefill}, patch {patch:?}");
    }
    let _ = std::fs::remove_file(&exe);
}

fn main() {
    run_trials(vec![("c_example_pauses_and_resumes", None, c_example_pauses_and_resumes)]);
}
