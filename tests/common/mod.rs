//! Helpers for tests that run real `djinn-dataplane serve` processes: spawn with ephemeral ports
//! and unique shm names, read the resolved URLs from stdout, kill on drop (even when a test
//! panics), raw HTTP GET for /healthz and /metrics, and a probe for the shm transport.

#![allow(dead_code)]

pub mod raw;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_djinn-dataplane");

/// The binary [`ServerProc`] starts: `DJINN_SERVER_BIN` where set (the GPU check runs a release
/// build carried in gpu-bundle/, away from this build tree), else this build's [`BIN`].
pub fn server_bin() -> PathBuf {
    std::env::var_os("DJINN_SERVER_BIN").map_or_else(|| PathBuf::from(BIN), PathBuf::from)
}

/// How long a server gets to print its listeners.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A transport a test body runs over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Shm,
    /// Soft-RoCE in the VM (`scripts/rdma-vm`); ignored, with the reason, elsewhere.
    Rdma,
}

impl Transport {
    pub const ALL: [Transport; 3] = [Transport::Tcp, Transport::Shm, Transport::Rdma];

    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Shm => "shm",
            Transport::Rdma => "rdma",
        }
    }

    /// A `--listen` URL that cannot collide with another test's.
    pub fn listen_url(self) -> String {
        match self {
            Transport::Tcp => "tcp://127.0.0.1:0".into(),
            Transport::Shm => format!("shm://{}", unique_name("srv")),
            Transport::Rdma => "rdma://127.0.0.1:0".into(),
        }
    }

    /// Why this transport cannot run here, if it cannot (checked at run time, not guessed).
    pub fn unavailable(self) -> Option<String> {
        match self {
            Transport::Tcp => None,
            Transport::Shm => {
                let name = unique_name("probe");
                match djinn_transport::listen(&format!("shm://{name}"), &Default::default()) {
                    Ok(_) => None,
                    Err(e) => Some(format!("shm transport unavailable here: {e}")),
                }
            }
            #[cfg(not(feature = "rdma"))]
            Transport::Rdma => Some("built without the `rdma` feature".into()),
            #[cfg(feature = "rdma")]
            Transport::Rdma => djinn_transport::rdma::device_names()
                .is_empty()
                .then(|| "no RDMA device here (scripts/rdma-vm runs these on soft-RoCE)".into()),
        }
    }
}

pub fn unique_name(what: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    format!("djt-{what}-{}-{}-{nanos}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// A running server process, killed when dropped.
pub struct ServerProc {
    child: Option<Child>,
    pub urls: Vec<String>,
    pub metrics: Option<String>,
    /// The OpenAI-compatible HTTP API's address (`--http-listen`).
    pub http_api: Option<String>,
    stderr_path: PathBuf,
    /// Files made for this server (a tenants file), removed with it.
    files: Vec<PathBuf>,
}

impl ServerProc {
    /// Starts `serve` with `args` and waits until it prints its listeners (and metrics address
    /// when `--metrics-listen` is among the args).
    pub fn start(args: &[&str]) -> ServerProc {
        Self::try_start(args).unwrap_or_else(|e| panic!("server did not start: {e}"))
    }

    pub fn try_start(args: &[&str]) -> Result<ServerProc, String> {
        Self::try_start_with(args, |_| {})
    }

    /// [`Self::try_start`] with the command adjusted by `configure` first (limits, environment).
    pub fn try_start_with(args: &[&str], configure: impl FnOnce(&mut Command)) -> Result<ServerProc, String> {
        let stderr_path = std::env::temp_dir().join(format!("{}.stderr", unique_name("log")));
        let stderr = std::fs::File::create(&stderr_path).map_err(|e| e.to_string())?;
        let bin = server_bin();
        let mut cmd = Command::new(&bin);
        cmd.arg("serve").args(args).env("RUST_LOG", "info").stdin(Stdio::null()).stdout(Stdio::piped()).stderr(stderr);
        configure(&mut cmd);
        let mut child = cmd.spawn().map_err(|e| format!("spawning {}: {e}", bin.display()))?;
        let want_metrics = args.contains(&"--metrics-listen");
        let want_api = args.contains(&"--http-listen");
        let listeners = args.iter().filter(|a| **a == "--listen").count().max(1);
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut proc = ServerProc {
            child: Some(child),
            urls: Vec::new(),
            metrics: None,
            http_api: None,
            stderr_path,
            files: Vec::new(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while proc.urls.len() < listeners
            || (want_metrics && proc.metrics.is_none())
            || (want_api && proc.http_api.is_none())
        {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(u) = line.strip_prefix("listening ") {
                        proc.urls.push(u.trim().to_owned());
                    } else if let Some(m) = line.strip_prefix("metrics http://") {
                        proc.metrics = Some(m.trim().to_owned());
                    } else if let Some(a) = line.strip_prefix("http-api http://") {
                        proc.http_api = Some(a.trim().to_owned());
                    }
                }
                Err(_) => {
                    let status = proc.child.as_mut().unwrap().try_wait().ok().flatten();
                    return Err(format!("exit status {status:?}; stderr:\n{}", proc.stderr()));
                }
            }
        }
        Ok(proc)
    }

    pub fn url(&self) -> &str {
        &self.urls[0]
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill(2) on our own child's pid has no memory-safety preconditions.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("server ignored SIGTERM for 20 s; stderr:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.stderr_path);
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// `--gpus` for servers the tests start: `DJINN_TEST_GPUS` (e.g. `0` on a GPU machine), else cpu.
pub fn test_gpus() -> String {
    std::env::var("DJINN_TEST_GPUS").ok().filter(|g| !g.is_empty()).unwrap_or_else(|| "cpu".into())
}

/// The backend kind the capabilities reply names for [`test_gpus`].
pub fn test_backend_kind() -> &'static str {
    if test_gpus() == "cpu" {
        "cpu"
    } else {
        "cuda"
    }
}

/// Bytes of one 16-token KV block of the committed tiny model (llama-gqa: 2 layers × 2 KV heads ×
/// 16 dims × K,V = 128 elements per token) as a server of [`test_gpus`] keeps it at `serve`'s
/// default dtype: f32 on the CPU backend (8 KiB), the served weights' dtype on CUDA (bf16 for
/// this f32 checkpoint: 4 KiB).
pub fn tiny_kv_block_bytes() -> u64 {
    let elem = if test_backend_kind() == "cpu" { 4 } else { 2 };
    16 * 128 * elem
}

/// A server serving the model directory `dir` under `name` (plus `extra` args), as [`server`].
/// It computes in f32 (`serve` would pick bf16 for an f32 checkpoint), so its sessions can be
/// compared with in-process f32 runs.
pub fn model_server(t: Transport, name: &str, dir: &std::path::Path, extra: &[&str]) -> ServerProc {
    let spec = format!("{name}={}", dir.display());
    // f32 unless the test names a dtype: these servers are compared with in-process f32 runs.
    let mut args = if extra.contains(&"--dtype") { vec![] } else { vec!["--dtype", "f32"] };
    args.extend_from_slice(&["--model", spec.as_str()]);
    args.extend_from_slice(extra);
    server(t, &args)
}

/// [`model_server`] with the tenants of [`tenants_file`] (`--auth-token-file`), whose file goes
/// with the server.
pub fn tenants_model_server(t: Transport, name: &str, dir: &std::path::Path, extra: &[&str]) -> ServerProc {
    let tokens = tenants_file();
    let mut args = vec!["--auth-token-file", tokens.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut srv = model_server(t, name, dir, &args);
    srv.files.push(tokens);
    srv
}

/// A client with default options; panics naming the URL.
/// A copy of the checkpoint in `src` (a directory with `config.json`, `generation_config.json`
/// and `model.safetensors`) whose config allows `max_positions` positions — the weights do not
/// depend on it — so a test can run a long context on a committed tiny model. Made once per
/// test binary under `CARGO_TARGET_TMPDIR`.
pub fn model_with_context(src: &std::path::Path, max_positions: usize, what: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique_name(what));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["generation_config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["max_position_embeddings"] = max_positions.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    dir
}

pub fn connect(url: &str) -> djinn_client::Client {
    djinn_client::Client::connect_with(url, &djinn_client::ClientOptions::default())
        .unwrap_or_else(|e| panic!("connect {url}: {e}"))
}

/// The server's status for a request that must be refused.
pub fn status_of<T: std::fmt::Debug>(r: djinn_client::Result<T>) -> djinn_proto::Status {
    match r {
        Err(e) => e.status().unwrap_or_else(|| panic!("expected a server status, got {e}")),
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

/// Starts a server listening on one URL of `t` with extra args, on the [`test_gpus`] backend.
pub fn server(t: Transport, extra: &[&str]) -> ServerProc {
    let url = t.listen_url();
    let gpus = test_gpus();
    let mut args = vec!["--listen", url.as_str(), "--gpus", gpus.as_str()];
    args.extend_from_slice(extra);
    ServerProc::start(&args)
}

/// Plain HTTP/1.0 GET; returns (status code, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let code = resp.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (code, body)
}

/// The value of one un-labelled-beyond-node metric sample line starting with `name`.
pub fn metric(body: &str, name_and_labels: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(name_and_labels) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}[{i}]: got {g}, want {w}");
    }
}

/// An `--auth-token-file` with tenants `alice` (`tok-alice`) and `bob` (`tok-bob`), in a file of
/// its own.
pub fn tenants_file() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(unique_name("tokens"));
    std::fs::write(&p, "alice tok-alice\nbob tok-bob\n").unwrap();
    p
}

/// One test body: its name, the transport it is pinned to (`None` = run once per transport), and
/// the body.
pub type TrialSpec = (&'static str, Option<Transport>, fn(Transport));

/// Runs libtest-mimic trials; trials whose transport is unavailable are reported as ignored with
/// the reason printed.
pub fn run_trials(trials: Vec<TrialSpec>) -> ! {
    run_trials_with(trials, &[], Vec::new())
}

/// [`run_trials`] plus ready-made trials (e.g. one ignored with its reason where a GPU is absent).
pub fn run_trials_and(trials: Vec<TrialSpec>, extra: Vec<libtest_mimic::Trial>) -> ! {
    run_trials_with(trials, &[], extra)
}

/// Trials run side by side (libtest's threads, one per core), and each takes this lock shared; a
/// trial that compares a rate or a latency with one measured earlier in the same trial takes it
/// exclusively, so no other trial of the binary (cargo runs binaries one at a time) changes the
/// machine between its two measurements. A CI run on two cores measured a victim at 0.43× its
/// "solo" rate because a full-logits trial started between the two.
static TRIALS: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Runs `body` as one of the trials that share the machine.
pub fn shared_trial<T>(body: impl FnOnce() -> T) -> T {
    let _g = TRIALS.read().unwrap_or_else(|p| p.into_inner());
    body()
}

/// Runs `body` with no other trial of this binary running (see [`TRIALS`]).
pub fn alone_trial<T>(body: impl FnOnce() -> T) -> T {
    let _g = TRIALS.write().unwrap_or_else(|p| p.into_inner());
    body()
}

/// [`run_trials_and`], where the trials named in `alone` (names without the transport suffix)
/// run with no other trial beside them ([`alone_trial`]).
pub fn run_trials_with(trials: Vec<TrialSpec>, alone: &[&str], extra: Vec<libtest_mimic::Trial>) -> ! {
    let args = libtest_mimic::Arguments::from_args();
    let mut out = extra;
    let missing: Vec<(Transport, Option<String>)> = Transport::ALL.iter().map(|&t| (t, t.unavailable())).collect();
    for (t, why) in &missing {
        if let Some(why) = why {
            eprintln!("NOTE: {} trials ignored: {why}", t.name());
        }
    }
    for (name, t, body) in trials {
        let transports: Vec<Transport> = match t {
            Some(t) => vec![t],
            None => Transport::ALL.to_vec(),
        };
        for t in transports {
            let full = format!("{name}_{}", t.name());
            let ignored = missing.iter().any(|(m, why)| *m == t && why.is_some());
            let by_itself = alone.contains(&name);
            out.push(
                libtest_mimic::Trial::test(full, move || {
                    if by_itself {
                        alone_trial(|| body(t));
                    } else {
                        shared_trial(|| body(t));
                    }
                    Ok(())
                })
                .with_ignored_flag(ignored),
            );
        }
    }
    libtest_mimic::run(&args, out).exit()
}
