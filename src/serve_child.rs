//! A `djinn-dataplane serve` child process for benchmarks: started with the arguments given, its
//! resolved listener URLs read from its stdout (`listening URL` lines), its stderr kept in a file
//! for the error message when it fails, and killed when dropped (so a failing benchmark leaves no
//! server behind).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How long a server gets to load its model and print its listeners.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// A running server, killed on drop.
pub struct ServeChild {
    child: Child,
    urls: Vec<String>,
    log: PathBuf,
}

impl ServeChild {
    /// Runs `exe serve ARGS` (one `--listen` per URL wanted) and waits for its listener lines.
    pub fn start(exe: &Path, args: &[String]) -> anyhow::Result<ServeChild> {
        let log = std::env::temp_dir().join(format!("djinn-bench-serve-{}-{}.log", std::process::id(), unique()));
        let log_file = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut child = Command::new(exe)
            .arg("serve")
            .args(args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {} serve", exe.display()))?;
        let stdout = child.stdout.take().context("server stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut me = ServeChild { child, urls: Vec::new(), log };
        let wanted = args.iter().filter(|a| *a == "--listen").count().max(1);
        let deadline = Instant::now() + START_TIMEOUT;
        while me.urls.len() < wanted {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    if let Some(u) = line.strip_prefix("listening ") {
                        me.urls.push(u.trim().to_owned());
                    }
                }
                Err(_) => {
                    let status = me.child.try_wait().ok().flatten();
                    bail!("server did not start (exit status {status:?}); its log ends:\n{}", me.log_tail(20));
                }
            }
        }
        Ok(me)
    }

    /// The first listener's URL, as resolved by the server (ephemeral ports filled in).
    pub fn url(&self) -> &str {
        &self.urls[0]
    }

    /// The last `lines` lines of the server's stderr.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for ServeChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A name part no other server of this process has.
pub fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{}-{nanos}", N.fetch_add(1, Ordering::Relaxed))
}
