//! `djinn-dataplane demo`: the README's first command. Starts a real server on the embedded
//! default (CPU backend, loopback tcp and shm), runs a client against it over both transports —
//! round trips, then a small graph of remote tensor ops checked against a local computation — and
//! stops the server with SIGTERM, expecting a clean drain.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use djinn_client::Client;
use djinn_proto::msg::{ExecInput, ExecNode, ExecOp, ExecReq};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Round trips per payload size.
    #[arg(long, default_value_t = 2000)]
    pub count: u64,
    /// Seconds to wait for the server to report healthy.
    #[arg(long, default_value_t = 30)]
    pub start_timeout_s: u64,
}

/// Kills the server if the demo fails half-way, so no process is left behind.
struct ServerProcess(Option<Child>);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn healthz(addr: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 16];
    matches!(s.read(&mut head), Ok(n) if n >= 12 && &head[9..12] == b"200")
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let tcp = format!("tcp://127.0.0.1:{}", free_port()?);
    let shm = format!("shm://djinn-demo-{}", std::process::id());
    let metrics = format!("127.0.0.1:{}", free_port()?);

    println!("starting: djinn-dataplane serve --gpus cpu --listen {tcp} --listen {shm} --metrics-listen {metrics}");
    let mut server = ServerProcess(Some(
        Command::new(&exe)
            .args(["serve", "--gpus", "cpu", "--listen", &tcp, "--listen", &shm, "--metrics-listen", &metrics])
            .stdin(Stdio::null())
            .spawn()
            .context("starting the server")?,
    ));
    let deadline = Instant::now() + Duration::from_secs(args.start_timeout_s);
    while !healthz(&metrics) {
        if Instant::now() > deadline {
            bail!("server not healthy after {} s", args.start_timeout_s);
        }
        if let Some(status) = server.0.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            bail!("server exited during start-up: {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("server healthy (/healthz 200 on {metrics})\n");

    for url in [&tcp, &shm] {
        let mut client = Client::connect(url).with_context(|| format!("connecting to {url}"))?;
        let caps = client.capabilities();
        println!("{url}: transport {}, backend {}", client.transport(), caps.backend);
        for size in [64usize, 1 << 20] {
            let count = if size > 4096 { (args.count / 20).max(10) } else { args.count };
            let r = djinn_client::ping::run(&mut client, size, count, count / 10)?;
            println!(
                "  ping {:>8} B x {:>5}: rtt p50 {:>8.2} us  p99 {:>8.2} us  {:>6.3} GB/s",
                size, count, r.rtt_us.p50, r.rtt_us.p99, r.gbps
            );
        }
        tensor_ops(&mut client)?;
        println!("  bytes on this connection: sent {}, received {}\n", client.bytes_sent(), client.bytes_received());
    }

    let child = server.0.as_mut().expect("server child present");
    // SAFETY: kill(2) on our own child's pid; the pid is live because we have not waited on it.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    if rc != 0 {
        bail!("SIGTERM to the server failed: {}", std::io::Error::last_os_error());
    }
    let status = child.wait()?;
    server.0 = None;
    println!("server drained on SIGTERM: {status}");
    if !status.success() {
        bail!("server exited with {status}");
    }
    Ok(())
}

/// `softmax(x · w)` on the server, compared with the same computation done here.
fn tensor_ops(client: &mut Client) -> anyhow::Result<()> {
    let (m, k, n) = (4usize, 64usize, 32usize);
    let x: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 200.0).collect();
    let w: Vec<f32> = (0..k * n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 150.0).collect();
    let t0 = Instant::now();
    let hx = client.put_f32(&[m as u64, k as u64], &x)?;
    let hw = client.put_f32(&[k as u64, n as u64], &w)?;
    let req = ExecReq {
        nodes: vec![
            ExecNode::new(ExecOp::MatMul, &[ExecInput::Handle(hx), ExecInput::Handle(hw)]),
            ExecNode::new(ExecOp::Softmax, &[ExecInput::Node(0)]),
        ],
        outputs: vec![1],
    };
    let out = client.exec(&req)?;
    let (desc, got) = client.get_f32(out[0].0)?;
    client.free(&[hx, hw, out[0].0])?;
    let elapsed_us = t0.elapsed().as_secs_f64() * 1e6;

    let mut want = vec![0f32; m * n];
    for (row, want_row) in want.chunks_mut(n).enumerate() {
        for (j, v) in want_row.iter_mut().enumerate() {
            *v = (0..k).map(|p| x[row * k + p] * w[p * n + j]).sum();
        }
        let max = want_row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = want_row.iter().map(|v| (v - max).exp()).sum();
        want_row.iter_mut().for_each(|v| *v = (*v - max).exp() / sum);
    }
    let max_diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    println!(
        "  remote softmax(x[{m}x{k}] . w[{k}x{n}]) -> {:?}: max |remote - local| = {max_diff:.2e} ({elapsed_us:.0} us for put, put, exec, get, free)",
        desc.shape()
    );
    if max_diff > 1e-5 {
        bail!("remote result differs from the local one by {max_diff}");
    }
    Ok(())
}
