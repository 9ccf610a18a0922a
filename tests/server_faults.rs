//! Bad input and process-level behaviour against real server processes: raw malformed frames
//! over real TCP sockets and real shared memory, truncated and half-sent frames, a reader that
//! never reads, clients that never say Hello (handshake timeout), a free racing a get's send,
//! SIGTERM drain, /healthz and /metrics, `ping --json`, `--nic`, config files.

mod common;
mod gpu;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::raw::{expect_status, header, hello, raw, RawPeer, RawTcp, REPLY_TIMEOUT};
use common::{http_get, metric, run_trials_and, server, unique_name, ServerProc, Transport, TrialSpec, BIN};
use djinn_client::{Client, ClientOptions};
use djinn_proto::{FrameHeader, HelloReq, Meta, Opcode, Status, TensorGetReq, FLAG_REPLY, HEADER_LEN, MAGIC};
use zerocopy::{FromBytes, IntoBytes};

fn still_serves(url: &str) {
    let mut c = Client::connect_with(url, &ClientOptions::default()).expect("server still accepts");
    assert_eq!(c.ping(b"alive").unwrap(), b"alive");
}

/// Headers that lose framing: a typed error frame, then this connection alone closes.
fn framing_errors_close_only_that_connection(t: Transport) {
    let srv = server(t, &[]);
    let mut bystander = Client::connect_with(srv.url(), &ClientOptions::default()).unwrap();
    let cases: Vec<(&str, FrameHeader, Status)> = vec![
        (
            "bad magic",
            {
                let mut h = header(Opcode::Ping.as_u16(), 5, 0, 0);
                h.magic = (MAGIC ^ 0xffff).into();
                h
            },
            Status::BadMagic,
        ),
        (
            "bad version",
            {
                let mut h = header(Opcode::Ping.as_u16(), 5, 0, 0);
                h.version = 77.into();
                h
            },
            Status::BadVersion,
        ),
        ("oversized data", header(Opcode::Ping.as_u16(), 5, 0, 1 << 40), Status::FrameTooLarge),
        ("oversized meta", header(Opcode::Ping.as_u16(), 5, 1 << 30, 0), Status::FrameTooLarge),
    ];
    for (what, h, want) in cases {
        let mut p = raw(t, srv.url());
        hello(p.as_mut());
        p.send(&h, &[]);
        expect_status(p.as_mut(), 0, want, what);
        assert!(p.recv().is_none(), "{what}: connection should close after framing is lost");
        assert_eq!(bystander.ping(what.as_bytes()).unwrap(), what.as_bytes(), "{what}: bystander");
    }
    still_serves(srv.url());
}

/// Request-level errors: a typed reply with the request's id, and the connection goes on.
fn request_errors_keep_the_connection(t: Transport) {
    let srv = server(t, &[]);
    let mut p = raw(t, srv.url());
    // Before the handshake.
    p.send(&header(Opcode::Ping.as_u16(), 2, 0, 0), &[]);
    expect_status(p.as_mut(), 2, Status::Unauthorized, "ping before hello");
    hello(p.as_mut());
    p.send(&header(Opcode::Hello.as_u16(), 3, 0, 0), &[]);
    expect_status(p.as_mut(), 3, Status::BadArgument, "second hello");
    p.send(&header(999, 4, 3, 0), &[1, 2, 3]);
    expect_status(p.as_mut(), 4, Status::UnknownOpcode, "unknown opcode");
    p.send(&header(Opcode::TensorGet.as_u16(), 5, 3, 0), &[1, 2, 3]);
    expect_status(p.as_mut(), 5, Status::BadFrame, "truncated metadata");
    let mut m = TensorGetReq { handle: 1 }.to_meta();
    m.push(0);
    p.send(&header(Opcode::TensorGet.as_u16(), 6, m.len(), 0), &m);
    expect_status(p.as_mut(), 6, Status::BadFrame, "trailing metadata");
    let m = TensorGetReq { handle: 0x5eed }.to_meta();
    p.send(&header(Opcode::TensorGet.as_u16(), 7, m.len(), 0), &m);
    expect_status(p.as_mut(), 7, Status::BadHandle, "unknown handle");
    let m = u32::MAX.to_le_bytes();
    p.send(&header(Opcode::TensorFree.as_u16(), 8, m.len(), 0), &m);
    let r = p.recv().unwrap();
    let st = Status::try_from(r.status.get()).unwrap();
    assert!(matches!(st, Status::BadArgument | Status::BadFrame), "huge free count: {st:?}");
    let mut h = header(Opcode::Ping.as_u16(), 9, 0, 0);
    h.flags = FLAG_REPLY.into();
    p.send(&h, &[]);
    expect_status(p.as_mut(), 9, Status::BadFrame, "client sent a reply frame");
    p.send(&header(Opcode::SessionOpen.as_u16(), 10, 0, 0), &[]);
    expect_status(p.as_mut(), 10, Status::BadFrame, "session open without its metadata");
    let m = [0u8; 12];
    p.send(&header(Opcode::Exec.as_u16(), 11, m.len(), 0), &m);
    let r = p.recv().unwrap();
    assert_ne!(r.status.get(), 0, "garbage exec accepted");
    p.send(&header(Opcode::Ping.as_u16(), 12, 0, 0), &[]);
    expect_status(p.as_mut(), 12, Status::Ok, "ping after all that");
}

/// TCP byte-level abuse: truncated headers and frames, then the server still serves.
fn truncated_frames_do_not_hurt_the_server(t: Transport) {
    let srv = server(t, &[]);
    let url = srv.url().strip_prefix("tcp://").unwrap().to_owned();
    {
        let mut s = TcpStream::connect(&url).unwrap();
        s.write_all(&[0x44, 0x4a, 0x4e, 0x31, 1, 0, 2]).unwrap();
    }
    {
        let mut s = TcpStream::connect(&url).unwrap();
        let m = HelloReq { version_min: 1, version_max: 1, token: vec![], client_name: "t".into() }.to_meta();
        let mut b = header(Opcode::Hello.as_u16(), 1, m.len(), 0).as_bytes().to_vec();
        b.extend_from_slice(&m[..m.len() / 2]);
        s.write_all(&b).unwrap();
    }
    {
        let mut p = RawTcp::connect(srv.url());
        hello(&mut p);
        let mut b = header(Opcode::Ping.as_u16(), 2, 0, 100).as_bytes().to_vec();
        b.extend_from_slice(&[7; 5]);
        p.s.write_all(&b).unwrap();
    }
    {
        let mut s = TcpStream::connect(&url).unwrap();
        s.write_all(&[0xff; 4096]).unwrap();
        let mut hb = [0u8; HEADER_LEN];
        s.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
        s.read_exact(&mut hb).unwrap();
        let h = FrameHeader::read_from_bytes(&hb).unwrap();
        assert_eq!(Status::try_from(h.status.get()), Ok(Status::BadMagic), "garbage bytes");
    }
    still_serves(srv.url());
}

/// A client that stops mid-frame holds up nobody else.
fn half_sent_frame_does_not_delay_others(t: Transport) {
    let srv = server(t, &[]);
    let mut a = RawTcp::connect(srv.url());
    hello(&mut a);
    let mut b = header(Opcode::Ping.as_u16(), 2, 0, 1000).as_bytes().to_vec();
    b.extend_from_slice(&[9; 10]);
    a.s.write_all(&b).unwrap();
    let mut other = Client::connect_with(srv.url(), &ClientOptions::default()).unwrap();
    let start = Instant::now();
    for i in 0..200u32 {
        assert_eq!(other.ping(&i.to_le_bytes()).unwrap(), i.to_le_bytes());
    }
    let took = start.elapsed();
    assert!(took < Duration::from_secs(10), "200 pings took {took:?} while another client was mid-frame");
    a.s.write_all(&[9; 990]).unwrap();
    expect_status(&mut a, 2, Status::Ok, "the half-sent ping completes");
}

/// Reads until the server closes the connection (EOF or reset); false if it stays open past
/// `REPLY_TIMEOUT`.
fn tcp_closed_by_server(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// Clients that connect and never complete a Hello — silent, stopped mid-header, or sending
/// requests before it — are closed once `--handshake-timeout-ms` passes; everyone else is served
/// meanwhile, and a connection that said Hello is not timed out.
fn silent_clients_are_closed_after_the_handshake_timeout(t: Transport) {
    const TIMEOUT_MS: u64 = 600;
    let srv = server(t, &["--handshake-timeout-ms", &TIMEOUT_MS.to_string()]);
    let mut greeted = raw(t, srv.url());
    hello(greeted.as_mut());
    let start = Instant::now();
    let mut silent = raw(t, srv.url());
    let mut unauthorized = raw(t, srv.url());
    unauthorized.send(&header(Opcode::Ping.as_u16(), 2, 0, 0), &[]);
    expect_status(unauthorized.as_mut(), 2, Status::Unauthorized, "ping before hello");
    let mut half = (t == Transport::Tcp).then(|| {
        let mut s = TcpStream::connect(srv.url().strip_prefix("tcp://").unwrap()).unwrap();
        s.write_all(&header(Opcode::Hello.as_u16(), 1, 40, 0).as_bytes()[..10]).unwrap();
        s
    });
    let mut other = Client::connect_with(srv.url(), &ClientOptions::default()).unwrap();
    let mut pings = 0u32;
    while start.elapsed() < Duration::from_millis(TIMEOUT_MS + 300) {
        assert_eq!(other.ping(&pings.to_le_bytes()).unwrap(), pings.to_le_bytes());
        pings += 1;
    }
    // The clients above are all closed by now (the timeout has passed); `recv` confirms it.
    assert!(silent.recv().is_none(), "a silent client outlived the handshake timeout");
    let closed_by = start.elapsed();
    assert!(unauthorized.recv().is_none(), "requests before Hello must not extend the handshake deadline");
    if let Some(s) = half.as_mut() {
        assert!(tcp_closed_by_server(s), "a client stopped mid-header outlived the handshake timeout");
    }
    greeted.send(&header(Opcode::Ping.as_u16(), 3, 0, 0), &[]);
    expect_status(greeted.as_mut(), 3, Status::Ok, "a greeted connection is not timed out");
    assert_eq!(other.ping(b"after").unwrap(), b"after");
    eprintln!(
        "[{}] silent clients closed by {closed_by:?} (timeout {TIMEOUT_MS} ms), {pings} pings served meanwhile",
        t.name()
    );
}

/// With every slot held by clients that never say Hello, a new client is admitted at once: the
/// silent client that has waited longest makes way (it is closed), well before the handshake
/// timeout.
fn silent_clients_cannot_lock_out_others(t: Transport) {
    const SLOTS: usize = 3;
    const TIMEOUT_MS: u64 = 60_000;
    let srv = server(t, &["--max-connections", &SLOTS.to_string(), "--handshake-timeout-ms", &TIMEOUT_MS.to_string()]);
    let mut silent: Vec<Box<dyn RawPeer>> = Vec::new();
    for _ in 0..SLOTS {
        silent.push(raw(t, srv.url()));
        // Accepted in this order, so the first is the oldest.
        std::thread::sleep(Duration::from_millis(20));
    }
    let start = Instant::now();
    let mut c = Client::connect_with(srv.url(), &ClientOptions::default()).expect("admitted with every slot silent");
    assert_eq!(c.ping(b"in").unwrap(), b"in");
    assert!(silent[0].recv().is_none(), "the oldest silent client was not closed to make way");
    assert!(start.elapsed() < REPLY_TIMEOUT, "took {:?}", start.elapsed());
}

/// A get sends straight from the tensor's memory without holding the tenant's lock: another
/// connection of the tenant frees the handle while the reply is stuck behind a reader that does
/// not read, and the reply still carries the tensor's bytes intact.
fn free_during_a_blocked_get_keeps_the_bytes(t: Transport) {
    let tokens = std::env::temp_dir().join(unique_name("auth"));
    std::fs::write(&tokens, "alice tok-alice\n").unwrap();
    let srv = server(t, &["--auth-token-file", tokens.to_str().unwrap()]);
    let opts = ClientOptions { token: Some(b"tok-alice".to_vec()), ..Default::default() };
    let mut owner = Client::connect_with(srv.url(), &opts).unwrap();
    // Far more than loopback socket buffers hold, so the server's send blocks on our reader.
    let bytes: Vec<u8> = (0..48u64 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let h = owner
        .put(djinn_proto::TensorDesc::new(djinn_proto::DType::U8, &[bytes.len() as u64]).unwrap(), &bytes)
        .unwrap();

    let mut reader = RawTcp::connect(srv.url());
    let m =
        HelloReq { version_min: 1, version_max: 1, token: b"tok-alice".to_vec(), client_name: "raw".into() }.to_meta();
    reader.send(&header(Opcode::Hello.as_u16(), 1, m.len(), 0), &m);
    assert_eq!(reader.recv().expect("hello reply").status.get(), 0);
    let m = TensorGetReq { handle: h }.to_meta();
    reader.send(&header(Opcode::TensorGet.as_u16(), 2, m.len(), 0), &m);
    // The reply's header has arrived: the server is sending and holds the tensor.
    let mut hb = [0u8; HEADER_LEN];
    reader.s.read_exact(&mut hb).unwrap();
    let rh = FrameHeader::read_from_bytes(&hb).unwrap();
    assert_eq!(rh.status.get(), 0, "get refused");
    assert_eq!(rh.data_len.get(), bytes.len() as u64);

    let started = Instant::now();
    owner.free(&[h]).unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "free waited {took:?} for another connection's send");
    assert_eq!(owner.get(h).map_err(|e| e.status()).unwrap_err(), Some(Status::BadHandle));

    let mut rest = vec![0u8; rh.meta_len.get() as usize + bytes.len()];
    reader.s.read_exact(&mut rest).unwrap();
    assert!(rest[rh.meta_len.get() as usize..] == bytes[..], "bytes changed under a free racing the send");
    let live = owner.stats().unwrap().into_iter().find(|(k, _)| k == "tensors_live").unwrap().1;
    assert_eq!(live, 0);
    let _ = std::fs::remove_file(&tokens);
}

fn vm_rss_kib(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)).unwrap().parse().unwrap()
}

/// A client that sends and never reads: the server stops reading it instead of buffering.
fn slow_reader_cannot_grow_the_server(t: Transport) {
    let srv = server(t, &[]);
    let rss0 = vm_rss_kib(srv.pid());
    let mut p = RawTcp::connect(srv.url());
    hello(&mut p);
    p.s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let payload = vec![1u8; 1 << 20];
    let mut sent_mib = 0u64;
    let limit_mib = 1024u64;
    while sent_mib < limit_mib {
        let mut b = header(Opcode::Ping.as_u16(), 100 + sent_mib, 0, payload.len() as u64).as_bytes().to_vec();
        b.extend_from_slice(&payload);
        if p.s.write_all(&b).is_err() {
            break;
        }
        sent_mib += 1;
    }
    assert!(sent_mib < limit_mib, "server kept reading {limit_mib} MiB from a client that never reads");
    let grown_mib = vm_rss_kib(srv.pid()).saturating_sub(rss0) / 1024;
    assert!(grown_mib < 128, "server grew {grown_mib} MiB for a client that never reads");
    drop(p);
    still_serves(srv.url());
}

fn sigterm_drains_and_exits_zero(t: Transport) {
    let srv = server(t, &["--metrics-listen", "127.0.0.1:0"]);
    let metrics = srv.metrics.clone().unwrap();
    let mut idle = Client::connect_with(srv.url(), &ClientOptions::default()).unwrap();
    assert_eq!(idle.ping(b"x").unwrap(), b"x");
    let url = srv.url().to_owned();
    // SIGTERM goes out once the busy client has connected and been served: a fixed sleep was
    // shorter than an rdma connect under TCG, whose Hello was then refused as shutting down.
    let (served_tx, served) = std::sync::mpsc::channel();
    let busy = std::thread::spawn(move || {
        let mut c = Client::connect_with(&url, &ClientOptions::default()).unwrap();
        let mut ok = 0u64;
        loop {
            match c.ping(&[3; 4096]) {
                Ok(_) => {
                    ok += 1;
                    if ok == 1 {
                        let _ = served_tx.send(());
                    }
                }
                Err(e) => {
                    let st = e.status();
                    assert!(st.is_none() || st == Some(Status::ShuttingDown), "during drain: {e}");
                    return ok;
                }
            }
        }
    });
    served.recv_timeout(Duration::from_secs(60)).expect("the busy client was served");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(http_get(&metrics, "/healthz").0, 200);
    let status = srv.terminate();
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
    assert!(busy.join().unwrap() > 0);
    assert!(idle.ping(b"y").is_err(), "a request after the server exited must fail");
}

fn healthz_and_metrics(t: Transport) {
    let srv = server(t, &["--metrics-listen", "127.0.0.1:0", "--node-id", "node-under-test"]);
    let m = srv.metrics.clone().unwrap();
    let (code, body) = http_get(&m, "/healthz");
    assert_eq!((code, body.trim()), (200, "ok"));
    assert_eq!(http_get(&m, "/nope").0, 404);
    let mut c = Client::connect_with(srv.url(), &ClientOptions::default()).unwrap();
    for _ in 0..2000 {
        c.ping(&[]).unwrap();
    }
    let h = c.put_f32(&[4], &[1.0; 4]).unwrap();
    c.get(h).unwrap();
    assert!(c.get(h + 12345).is_err());
    let (code, body) = http_get(&m, "/metrics");
    assert_eq!(code, 200);
    for name in [
        "djinn_connections_active",
        "djinn_connections_total",
        "djinn_requests_total",
        "djinn_bytes_received_total",
        "djinn_bytes_sent_total",
        "djinn_errors_total",
        "djinn_request_duration_seconds_bucket",
        "djinn_server_time_seconds_bucket",
        "djinn_tensors_live",
    ] {
        assert!(body.contains(name), "/metrics lacks {name}:\n{body}");
    }
    assert!(body.contains("node=\"node-under-test\""));
    assert_eq!(metric(&body, "djinn_connections_active "), Some(1.0));
    assert!(metric(&body, "djinn_requests_total{opcode=\"ping\"").unwrap() >= 2000.0);
    assert_eq!(metric(&body, "djinn_errors_total{kind=\"bad_handle\""), Some(1.0));
    assert!(metric(&body, "djinn_bytes_received_total ").unwrap() > 2000.0 * HEADER_LEN as f64);
    assert_eq!(metric(&body, "djinn_tensors_live "), Some(1.0));
    // The server's own time for empty requests, from the histogram buckets (upper bound of the
    // bucket holding the median).
    let count = metric(&body, "djinn_server_time_seconds_count ").unwrap();
    assert!(count >= 2000.0);
    let p50 = body
        .lines()
        .filter(|l| l.starts_with("djinn_server_time_seconds_bucket{"))
        .find_map(|l| {
            let le: f64 = l.split("le=\"").nth(1)?.split('"').next()?.parse().ok()?;
            let v: f64 = l.rsplit(' ').next()?.parse().ok()?;
            (v >= count / 2.0).then_some(le)
        })
        .unwrap();
    eprintln!("[{}] server time (received → reply queued), empty ping: p50 ≤ {:.1} µs", t.name(), p50 * 1e6);
}

fn ping_json_has_the_keys(t: Transport) {
    let srv = server(t, &[]);
    let out = Command::new(BIN)
        .args(["ping", "--server", srv.url(), "--size", "4096", "--count", "200", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "ping failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert!(v["transport"].as_str().unwrap().starts_with(t.name()));
    assert_eq!(v["size"], 4096);
    assert_eq!(v["count"], 200);
    for k in ["p50", "p99", "p999", "min", "max"] {
        assert!(v["rtt_us"][k].as_f64().unwrap() > 0.0, "rtt_us.{k}");
    }
    let r = &v["rtt_us"];
    assert!(r["min"].as_f64() <= r["p50"].as_f64() && r["p50"].as_f64() <= r["max"].as_f64());
    assert!(v["gbps"].as_f64().unwrap() > 0.0);
}

/// `--nic` without an rdma listener names the missing `--listen rdma://`; a device that does not
/// exist (or a build or machine without RDMA) fails start-up with one clear sentence.
fn nic_needs_an_rdma_listener_and_a_device(_t: Transport) {
    let out = Command::new(BIN).args(["serve", "--listen", "tcp://127.0.0.1:0", "--nic", "mlx5_0"]).output().unwrap();
    assert!(!out.status.success(), "--nic without an rdma listener must be refused");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--listen rdma://"), "message: {err}");
    let out =
        Command::new(BIN).args(["serve", "--listen", "rdma://127.0.0.1:0", "--nic", "no_such_dev0"]).output().unwrap();
    assert!(!out.status.success(), "a missing device must fail start-up");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no_such_dev0") || err.contains("no RDMA device") || err.contains("no RDMA support"),
        "message: {err}"
    );
    let out = Command::new(BIN)
        .args(["serve", "--listen", "tcp://127.0.0.1:7071", "--listen", "rdma://127.0.0.1:7071"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "an rdma port shared with a tcp listener must be refused");
}

/// Bad `--gpus` values are refused everywhere; `--gpus 0` without a GPU is refused with a reason
/// that names the GPU (on a GPU machine it serves: see `gpus_0_serves_on_the_gpu`).
fn gpus_flag_is_checked(_t: Transport) {
    let out = Command::new(BIN).args(["serve", "--listen", "tcp://127.0.0.1:0", "--gpus", "0,1"]).output().unwrap();
    assert!(!out.status.success(), "two GPUs are not served yet");
    assert!(String::from_utf8_lossy(&out.stderr).contains("one device per"));
    let out = Command::new(BIN).args(["serve", "--listen", "tcp://127.0.0.1:0", "--gpus", "x"]).output().unwrap();
    assert!(!out.status.success(), "--gpus x must be refused");
    if gpu::probe().is_err() {
        let why = match ServerProc::try_start(&["--listen", "tcp://127.0.0.1:0", "--gpus", "0"]) {
            Ok(_) => panic!("--gpus 0 started on a machine where GPU 0 does not open"),
            Err(why) => why,
        };
        assert!(why.contains("GPU") || why.contains("CUDA"), "refusal should name the GPU: {why}");
    }
}

/// `--gpus 0` serves on GPU 0, the CPU backend's greedy tokens. Ignored, with the reason, where
/// GPU 0 does not open.
fn gpus_0_serves_on_the_gpu() -> libtest_mimic::Trial {
    let name = match gpu::probe() {
        Err(why) => return gpu::ignored("gpus_0_serves_on_the_gpu_tcp".to_owned(), &why),
        // Not a GPU: named so no log counts it as one (scripts/cuda-emu).
        Ok(true) => "gpus_0_serves_on_the_cuda_emulator_tcp".to_owned(),
        Ok(false) => "gpus_0_serves_on_the_gpu_tcp".to_owned(),
    };
    libtest_mimic::Trial::test(name, || {
        // The committed tiny model in f32: greedy tokens as the CPU backend's. Found from the
        // working directory (the repository root, under cargo and in the GPU check alike).
        let dir = std::env::current_dir().map_err(|e| e.to_string())?.join(TINY);
        let model = format!("tiny={}", dir.display());
        let start = |gpus: &str| {
            ServerProc::try_start(&[
                "--listen",
                "tcp://127.0.0.1:0",
                "--gpus",
                gpus,
                "--model",
                &model,
                "--dtype",
                "f32",
            ])
        };
        let srv = start("0")?;
        let c = Client::connect_with(srv.url(), &ClientOptions::default()).map_err(|e| e.to_string())?;
        let backend = c.capabilities().backend.clone();
        if backend != "cuda" {
            return Err(format!("--gpus 0 serves on {backend:?}, not cuda").into());
        }
        still_serves(srv.url());
        let cpu = start("cpu")?;
        let (got, want) = (greedy_tokens(srv.url()), greedy_tokens(cpu.url()));
        if got != want {
            return Err(format!("--gpus 0 generated {got:?}, the CPU backend {want:?}").into());
        }
        Ok(())
    })
}

/// The committed tiny model (tests/data/models).
const TINY: &str = "tests/data/models/llama-gqa";

/// 24 greedy tokens after a 12-token prompt, from model `tiny`.
fn greedy_tokens(url: &str) -> Vec<u32> {
    use djinn_client::{DecodeOptions, Input, OpenOptions};
    let mut c = Client::connect_with(url, &ClientOptions::default()).unwrap();
    let s = c.open_session(&OpenOptions::new("tiny")).unwrap().session;
    let prompt: Vec<u32> = (0..12).map(|i| 8 + (i * 37) % 120).collect();
    c.prefill(s, Input::Ids(&prompt)).unwrap();
    let opts = DecodeOptions { max_new_tokens: 24, ignore_eos: true, ..Default::default() };
    c.decode_collect(s, &opts).unwrap().0
}

fn bad_listen_url_fails_start(_t: Transport) {
    let out = Command::new(BIN).args(["serve", "--listen", "udp://127.0.0.1:0"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("udp"));
}

fn config_files_start_and_flags_override(t: Transport) {
    // The shipped examples parse and start (listeners and metrics overridden to free ones).
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/configs");
    let mut seen = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().and_then(|x| x.to_str()) != Some("toml") {
            continue;
        }
        seen += 1;
        let url = t.listen_url();
        let srv =
            ServerProc::start(&["--config", p.to_str().unwrap(), "--listen", &url, "--metrics-listen", "127.0.0.1:0"]);
        still_serves(srv.url());
    }
    assert!(seen > 0, "no example configs in {dir}");
    // Every top-level key of the documented example is a `serve` flag (tables such as
    // `[tenant_defaults]` are config-file only).
    let help = Command::new(BIN).args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    let example = std::fs::read_to_string(format!("{dir}/server-cpu.toml")).unwrap();
    let top_level = example.lines().map(str::trim).take_while(|l| !l.starts_with('['));
    for line in top_level.filter(|l| !l.starts_with('#') && l.contains('=')) {
        let key = line.split('=').next().unwrap().trim();
        let flag = format!("--{}", key.replace('_', "-"));
        assert!(help.contains(&flag), "config key {key} has no flag {flag}");
    }
    // A file's keys apply; a flag beats the file.
    let f = std::env::temp_dir().join(format!("{}.toml", unique_name("cfg")));
    std::fs::write(&f, "max_connections = 1\nnode_id = \"from-file\"\nlisten = [\"tcp://127.0.0.1:1\"]\n").unwrap();
    let url = t.listen_url();
    let srv = ServerProc::start(&["--config", f.to_str().unwrap(), "--listen", &url]);
    let _one = Client::connect_with(srv.url(), &ClientOptions::default()).unwrap();
    assert!(Client::connect_with(srv.url(), &ClientOptions::default()).is_err(), "max_connections from the file");
    std::fs::write(&f, "no_such_key = 1\n").unwrap();
    let out = Command::new(BIN).args(["serve", "--config", f.to_str().unwrap()]).output().unwrap();
    assert!(!out.status.success(), "unknown config keys must be refused");
    let _ = std::fs::remove_file(&f);
}

fn tcp_and_shm_together(_t: Transport) {
    let shm = Transport::Shm.listen_url();
    let srv = ServerProc::start(&["--listen", "tcp://127.0.0.1:0", "--listen", &shm]);
    assert_eq!(srv.urls.len(), 2);
    for u in &srv.urls {
        let c = Client::connect_with(u, &ClientOptions::default()).unwrap();
        assert_eq!(c.capabilities().transports, vec!["tcp".to_owned(), "shm".to_owned()]);
    }
}

/// A client process killed in the middle of 16 MiB echoes: only its connection ends; the server
/// serves the next client, bulk data included.
fn client_killed_mid_transfer(t: Transport) {
    let srv = server(t, &[]);
    let mut child = Command::new(BIN)
        .args(["ping", "--server", srv.url(), "--size", "16777216", "--count", "1000000", "--warmup", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Long enough to be inside a transfer (soft-RoCE in the VM moves ~30 MB/s), short of the end.
    std::thread::sleep(Duration::from_millis(if t == Transport::Rdma { 2000 } else { 300 }));
    child.kill().unwrap();
    child.wait().unwrap();
    still_serves(srv.url());
    let mut c = Client::connect_with(srv.url(), &ClientOptions::default()).unwrap();
    let payload: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    assert_eq!(c.ping(&payload).unwrap(), payload);
}

/// An rdma listener beside tcp and shm ones: each serves, and each lists all three.
fn rdma_beside_tcp_and_shm(_t: Transport) {
    let shm = Transport::Shm.listen_url();
    let srv = ServerProc::start(&["--listen", "tcp://127.0.0.1:0", "--listen", &shm, "--listen", "rdma://127.0.0.1:0"]);
    assert_eq!(srv.urls.len(), 3);
    for u in &srv.urls {
        let mut c = Client::connect_with(u, &ClientOptions::default()).unwrap();
        assert_eq!(c.capabilities().transports, vec!["tcp".to_owned(), "shm".to_owned(), "rdma".to_owned()]);
        assert_eq!(c.ping(u.as_bytes()).unwrap(), u.as_bytes());
    }
}

fn main() {
    let trials: Vec<TrialSpec> = vec![
        ("framing_errors_close_only_that_connection", None, framing_errors_close_only_that_connection),
        ("request_errors_keep_the_connection", None, request_errors_keep_the_connection),
        ("truncated_frames_do_not_hurt_the_server", Some(Transport::Tcp), truncated_frames_do_not_hurt_the_server),
        ("half_sent_frame_does_not_delay_others", Some(Transport::Tcp), half_sent_frame_does_not_delay_others),
        ("slow_reader_cannot_grow_the_server", Some(Transport::Tcp), slow_reader_cannot_grow_the_server),
        (
            "silent_clients_are_closed_after_the_handshake_timeout",
            None,
            silent_clients_are_closed_after_the_handshake_timeout,
        ),
        ("silent_clients_cannot_lock_out_others", None, silent_clients_cannot_lock_out_others),
        ("free_during_a_blocked_get_keeps_the_bytes", Some(Transport::Tcp), free_during_a_blocked_get_keeps_the_bytes),
        ("sigterm_drains_and_exits_zero", None, sigterm_drains_and_exits_zero),
        ("healthz_and_metrics", None, healthz_and_metrics),
        ("ping_json_has_the_keys", None, ping_json_has_the_keys),
        ("nic_needs_an_rdma_listener_and_a_device", Some(Transport::Tcp), nic_needs_an_rdma_listener_and_a_device),
        ("bad_listen_url_fails_start", Some(Transport::Tcp), bad_listen_url_fails_start),
        ("gpus_flag_is_checked", Some(Transport::Tcp), gpus_flag_is_checked),
        ("config_files_start_and_flags_override", Some(Transport::Tcp), config_files_start_and_flags_override),
        ("tcp_and_shm_together", Some(Transport::Shm), tcp_and_shm_together),
        ("client_killed_mid_transfer", None, client_killed_mid_transfer),
        ("rdma_beside_tcp_and_shm", Some(Transport::Rdma), rdma_beside_tcp_and_shm),
    ];
    run_trials_and(trials, vec![gpus_0_serves_on_the_gpu()])
}
