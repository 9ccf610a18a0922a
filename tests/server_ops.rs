//! Every opcode through the client against a real server process, once per transport (tcp, shm):
//! handshake and capabilities, ping, stats, put/get/free, exec (single ops and graphs, checked
//! against host arithmetic), pipelining, byte counters, tenants, and 32+ concurrent clients.

mod common;

use common::{assert_close, connect, run_trials, server, status_of, unique_name, Transport};
use djinn_client::{Client, ClientError, ClientOptions};
use djinn_proto::{DType, ExecInput, ExecNode, ExecOp, ExecReq, Opcode, Status, TensorDesc};

fn node(op: ExecOp, inputs: &[ExecInput]) -> ExecNode {
    ExecNode::new(op, inputs)
}

fn handshake_and_capabilities(t: Transport) {
    let srv = server(t, &[]);
    let c = connect(srv.url());
    let caps = c.capabilities();
    assert_eq!(caps.version, djinn_proto::VERSION);
    assert_eq!(caps.backend, common::test_backend_kind());
    assert_eq!(caps.devices.len(), 1);
    assert!(caps.devices[0].memory_bytes > 0);
    assert!(caps.models.is_empty());
    assert_eq!(caps.transports, vec![t.name().to_owned()]);
    assert!(caps.frame_bytes_max >= 64 << 20, "default frame limit admits 64 MiB");
    assert!(c.transport().starts_with(t.name()));
}

fn ping_echoes_and_counts_bytes(t: Transport) {
    let srv = server(t, &[]);
    let mut c = connect(srv.url());
    let (s0, r0) = (c.bytes_sent(), c.bytes_received());
    assert!(c.ping(&[]).unwrap().is_empty());
    for size in [1usize, 64, 4096, 1 << 20, 8 << 20] {
        let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        assert_eq!(c.ping(&payload).unwrap(), payload, "echo of {size} B");
    }
    let moved: u64 = 1 + 64 + 4096 + (1 << 20) + (8 << 20);
    assert!(c.bytes_sent() - s0 >= moved, "sent counter");
    assert!(c.bytes_received() - r0 >= moved, "received counter");
    let stats = c.stats().unwrap();
    let get = |k: &str| stats.iter().find(|(n, _)| n == k).map(|(_, v)| *v).unwrap();
    // The server counts the Stats request's own header too, as the client does.
    assert_eq!(get("connection_bytes_received"), c.bytes_sent(), "server saw what we sent");
    assert!(get("connections_active") >= 1);
}

fn pipelined_requests_complete_by_id(t: Transport) {
    let srv = server(t, &[]);
    let mut c = connect(srv.url());
    let ids: Vec<(u64, Vec<u8>)> = (0..100u32)
        .map(|i| {
            let p = i.to_le_bytes().repeat(i as usize % 7 + 1);
            (c.submit(Opcode::Ping, &[], &[&p]).unwrap(), p)
        })
        .collect();
    assert_eq!(c.pending(), 100);
    // Claim in reverse: replies to other ids are buffered meanwhile.
    for (id, p) in ids.iter().rev() {
        assert_eq!(&c.wait(*id).unwrap().data, p);
    }
    assert_eq!(c.pending(), 0);
    assert!(matches!(c.wait(ids[0].0), Err(ClientError::UnknownRequest(_))));
    // wait_into reuses one buffer, also when other replies arrive first.
    let mut buf = Vec::new();
    let a = c.submit(Opcode::Ping, &[], &[&[1u8; 3000]]).unwrap();
    let b = c.submit(Opcode::Ping, &[], &[&[2u8; 10]]).unwrap();
    c.wait_into(b, &mut buf).unwrap();
    assert_eq!(buf, [2u8; 10]);
    c.wait_into(a, &mut buf).unwrap();
    assert_eq!(buf, [1u8; 3000]);
}

fn put_get_free_every_dtype(t: Transport) {
    let srv = server(t, &[]);
    let mut c = connect(srv.url());
    for &dt in DType::ALL {
        for shape in [&[][..], &[0][..], &[3][..], &[2, 3, 5][..]] {
            let d = TensorDesc::new(dt, shape).unwrap();
            let bytes: Vec<u8> = (0..d.byte_len()).map(|i| (i * 7 + dt as u64) as u8).collect();
            let h = c.put(d, &bytes).unwrap();
            let (d2, b2) = c.get(h).unwrap();
            assert_eq!(d2, d);
            assert_eq!(b2, bytes);
            c.free(&[h]).unwrap();
            assert_eq!(status_of(c.get(h)), Status::BadHandle, "get after free");
            assert_eq!(status_of(c.free(&[h])), Status::BadHandle, "double free");
        }
    }
    // A large tensor moves in many chunks.
    let big: Vec<f32> = (0..(6 << 20) / 4).map(|i| i as f32).collect();
    let h = c.put_f32(&[big.len() as u64], &big).unwrap();
    assert_eq!(c.get_f32(h).unwrap().1, big);
}

/// Puts from and gets into client-owned registered buffers (`RegBuf`): the bytes round-trip on
/// every transport; over rdma each buffer is registered once for the connection (its cache), the
/// server's tensors are registered at creation, no transfer registers anything on either side,
/// and puts and gets land by one-sided write.
fn registered_buffer_puts_and_gets(t: Transport) {
    use std::sync::atomic::Ordering::Relaxed;
    let srv = server(t, &[]);
    let mut c = connect(srv.url());
    let n = 3 << 20;
    let d = TensorDesc::new(DType::U8, &[n as u64]).unwrap();
    let mut out = djinn_transport::RegBuf::new(n).unwrap();
    let mut back = djinn_transport::RegBuf::new(n).unwrap();
    let direct0 = c.counters().received_direct();
    for i in 0..3u8 {
        out.iter_mut().enumerate().for_each(|(k, b)| *b = (k as u8).wrapping_mul(31).wrapping_add(i));
        let h = c.put_from(d, &out).unwrap();
        assert_eq!(c.get_into(h, &mut back).unwrap(), d);
        assert!(back[..] == out[..], "round trip {i} differs");
        c.free(&[h]).unwrap();
    }
    let stats = c.stats().unwrap();
    let server = |k: &str| stats.iter().find(|(n, _)| n == k).map(|(_, v)| *v).unwrap_or_else(|| panic!("no {k}"));
    match c.registration_cache() {
        Some(s) => {
            assert_eq!(c.transport(), "rdma");
            assert_eq!((s.entries, s.registered_total, s.deregistered_total), (2, 2, 0), "{s:?}");
            assert_eq!(c.counters().registrations.load(Relaxed), 0, "a transfer registered a cached buffer");
            assert_eq!(c.counters().received_direct() - direct0, 3 * n as u64, "gets not written in place");
            // The server's tensors were registered at creation: the puts landed in them through
            // a window and the gets were sent from them, with no registration per transfer.
            assert_eq!(server("connection_registrations"), 0, "the server registered on the request path");
            assert_eq!(server("connection_bytes_received_direct"), 3 * n as u64, "puts not written in place");
        }
        None => {
            assert_ne!(c.transport(), "rdma");
            assert_eq!(server("connection_registrations"), 0);
        }
    }
}

fn matmul_host(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
        }
    }
    c
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

fn exec_single_ops_match_host(t: Transport) {
    let srv = server(t, &[]);
    let mut c = connect(srv.url());
    let (m, k, n) = (3usize, 4usize, 5usize);
    let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.11).cos()).collect();
    let ha = c.put_f32(&[m as u64, k as u64], &a).unwrap();
    let hb = c.put_f32(&[k as u64, n as u64], &b).unwrap();
    let out = c.exec(&ExecReq::single(node(ExecOp::MatMul, &[ExecInput::Handle(ha), ExecInput::Handle(hb)]))).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].1.shape(), &[m as u64, n as u64]);
    assert_close(&c.get_f32(out[0].0).unwrap().1, &matmul_host(&a, &b, m, k, n), 1e-4, "matmul");

    let x: Vec<f32> = (0..12).map(|i| i as f32 * 0.25 - 1.0).collect();
    let y: Vec<f32> = (0..12).map(|i| 2.0 - i as f32 * 0.125).collect();
    let hx = c.put_f32(&[3, 4], &x).unwrap();
    let hy = c.put_f32(&[3, 4], &y).unwrap();
    let bin = |c: &mut Client, op| {
        let o = c.exec(&ExecReq::single(node(op, &[ExecInput::Handle(hx), ExecInput::Handle(hy)]))).unwrap();
        c.get_f32(o[0].0).unwrap().1
    };
    assert_close(&bin(&mut c, ExecOp::Add), &x.iter().zip(&y).map(|(a, b)| a + b).collect::<Vec<_>>(), 1e-6, "add");
    assert_close(&bin(&mut c, ExecOp::Mul), &x.iter().zip(&y).map(|(a, b)| a * b).collect::<Vec<_>>(), 1e-6, "mul");
    assert_close(&bin(&mut c, ExecOp::Sub), &x.iter().zip(&y).map(|(a, b)| a - b).collect::<Vec<_>>(), 1e-6, "sub");
    let sm = bin(&mut c, ExecOp::SiluMul);
    assert_close(&sm, &x.iter().zip(&y).map(|(a, b)| silu(*a) * b).collect::<Vec<_>>(), 1e-5, "silu_mul");

    let un = |c: &mut Client, op| {
        let o = c.exec(&ExecReq::single(node(op, &[ExecInput::Handle(hx)]))).unwrap();
        c.get_f32(o[0].0).unwrap().1
    };
    assert_close(&un(&mut c, ExecOp::Silu), &x.iter().map(|v| silu(*v)).collect::<Vec<_>>(), 1e-5, "silu");
    let mut want = Vec::new();
    for row in x.chunks(4) {
        let mx = row.iter().cloned().fold(f32::MIN, f32::max);
        let e: Vec<f32> = row.iter().map(|v| (v - mx).exp()).collect();
        let s: f32 = e.iter().sum();
        want.extend(e.iter().map(|v| v / s));
    }
    assert_close(&un(&mut c, ExecOp::Softmax), &want, 1e-5, "softmax");

    let w = [0.5f32, 1.0, 1.5, 2.0];
    let hw = c.put_f32(&[4], &w).unwrap();
    let mut rms = node(ExecOp::RmsNorm, &[ExecInput::Handle(hx), ExecInput::Handle(hw)]);
    rms.attrs_f32.push(1e-6);
    let o = c.exec(&ExecReq::single(rms)).unwrap();
    let mut want = Vec::new();
    for row in x.chunks(4) {
        let ms: f32 = row.iter().map(|v| v * v).sum::<f32>() / 4.0;
        let r = 1.0 / (ms + 1e-6).sqrt();
        want.extend(row.iter().zip(&w).map(|(v, g)| v * r * g));
    }
    assert_close(&c.get_f32(o[0].0).unwrap().1, &want, 1e-5, "rmsnorm");

    let mut reshape = node(ExecOp::Reshape, &[ExecInput::Handle(hx)]);
    reshape.attrs_i64.extend([2, -1]);
    let o = c.exec(&ExecReq::single(reshape)).unwrap();
    assert_eq!(o[0].1.shape(), &[2, 6]);
    assert_eq!(c.get_f32(o[0].0).unwrap().1, x);
}

fn exec_graph_keeps_only_outputs(t: Transport) {
    let srv = server(t, &[]);
    let mut c = connect(srv.url());
    // y = softmax(silu(x @ w1) * (x @ w2)); keep y and x@w1.
    let x: Vec<f32> = (0..8).map(|i| i as f32 * 0.1).collect();
    let w1: Vec<f32> = (0..16).map(|i| (i as f32 * 0.3).sin()).collect();
    let w2: Vec<f32> = (0..16).map(|i| (i as f32 * 0.2).cos()).collect();
    let hx = c.put_f32(&[2, 4], &x).unwrap();
    let h1 = c.put_f32(&[4, 4], &w1).unwrap();
    let h2 = c.put_f32(&[4, 4], &w2).unwrap();
    let req = ExecReq {
        nodes: vec![
            node(ExecOp::MatMul, &[ExecInput::Handle(hx), ExecInput::Handle(h1)]),
            node(ExecOp::MatMul, &[ExecInput::Handle(hx), ExecInput::Handle(h2)]),
            node(ExecOp::SiluMul, &[ExecInput::Node(0), ExecInput::Node(1)]),
            node(ExecOp::Softmax, &[ExecInput::Node(2)]),
        ],
        outputs: vec![3, 0],
    };
    let before = handles(&mut c);
    let out = c.exec(&req).unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(handles(&mut c), before + 2, "intermediates are not kept");
    let g = matmul_host(&x, &w1, 2, 4, 4);
    let u = matmul_host(&x, &w2, 2, 4, 4);
    let h: Vec<f32> = g.iter().zip(&u).map(|(a, b)| silu(*a) * b).collect();
    let mut want = Vec::new();
    for row in h.chunks(4) {
        let mx = row.iter().cloned().fold(f32::MIN, f32::max);
        let e: Vec<f32> = row.iter().map(|v| (v - mx).exp()).collect();
        let s: f32 = e.iter().sum();
        want.extend(e.iter().map(|v| v / s));
    }
    assert_close(&c.get_f32(out[0].0).unwrap().1, &want, 1e-4, "graph output");
    assert_close(&c.get_f32(out[1].0).unwrap().1, &g, 1e-4, "kept intermediate");
}

fn handles(c: &mut Client) -> u64 {
    c.stats().unwrap().iter().find(|(k, _)| k == "tenant_handles").unwrap().1
}

fn exec_errors_are_typed(t: Transport) {
    let srv = server(t, &["--exec-nodes-max", "4"]);
    let mut c = connect(srv.url());
    let a = c.put_f32(&[2, 3], &[0.0; 6]).unwrap();
    let b = c.put_f32(&[2, 2], &[0.0; 4]).unwrap();
    let i = c.put(TensorDesc::new(DType::I32, &[2, 3]).unwrap(), &[0; 24]).unwrap();
    let two = |op, x, y| ExecReq::single(node(op, &[ExecInput::Handle(x), ExecInput::Handle(y)]));
    assert_eq!(status_of(c.exec(&two(ExecOp::Add, a, b))), Status::ShapeMismatch);
    assert_eq!(status_of(c.exec(&two(ExecOp::MatMul, a, b))), Status::ShapeMismatch);
    assert_eq!(status_of(c.exec(&two(ExecOp::Add, a, i))), Status::DTypeMismatch);
    assert_eq!(status_of(c.exec(&two(ExecOp::Add, a, 0xdead_beef))), Status::BadHandle);
    assert_eq!(status_of(c.exec(&ExecReq::single(node(ExecOp::Add, &[ExecInput::Handle(a)])))), Status::BadArgument);
    assert_eq!(status_of(c.exec(&ExecReq::single(node(ExecOp::Gelu, &[ExecInput::Handle(a)])))), Status::Unsupported);
    let mut bad = node(ExecOp::Reshape, &[ExecInput::Handle(a)]);
    bad.attrs_i64.extend([4, 4]);
    assert_eq!(status_of(c.exec(&ExecReq::single(bad))), Status::ShapeMismatch);
    let long =
        ExecReq { nodes: (0..5).map(|_| node(ExecOp::Silu, &[ExecInput::Handle(a)])).collect(), outputs: vec![4] };
    assert_eq!(status_of(c.exec(&long)), Status::LimitExceeded);
    // The connection still works after every refusal.
    assert_eq!(c.ping(b"ok").unwrap(), b"ok");
}

fn limits_are_enforced(t: Transport) {
    let srv = server(t, &["--handles-max-per-tenant", "3", "--tensor-bytes-max-per-tenant", "4096"]);
    let mut c = connect(srv.url());
    let hs: Vec<u64> = (0..3).map(|_| c.put_f32(&[4], &[1.0; 4]).unwrap()).collect();
    assert_eq!(status_of(c.put_f32(&[4], &[1.0; 4])), Status::LimitExceeded, "handle limit");
    c.free(&hs).unwrap();
    assert_eq!(status_of(c.put_f32(&[2048], &[0.0; 2048])), Status::LimitExceeded, "byte limit");
    c.put_f32(&[1024], &[0.0; 1024]).unwrap();
    // An exec whose intermediates would pass the byte limit is refused before running.
    assert_eq!(handles(&mut c), 1);
}

fn tenants_are_isolated_with_tokens(t: Transport) {
    let dir = std::env::temp_dir().join(unique_name("auth"));
    std::fs::write(&dir, "# test tenants\nalice tok-alice\nbob tok-bob\n").unwrap();
    let path = dir.to_str().unwrap().to_owned();
    let srv = server(t, &["--auth-token-file", &path]);
    let with = |tok: &str| ClientOptions { token: Some(tok.as_bytes().to_vec()), ..Default::default() };
    let mut alice = Client::connect_with(srv.url(), &with("tok-alice")).unwrap();
    let mut bob = Client::connect_with(srv.url(), &with("tok-bob")).unwrap();
    assert_ne!(alice.capabilities().tenant_id, bob.capabilities().tenant_id);
    let h = alice.put_f32(&[2], &[1.0, 2.0]).unwrap();
    assert_eq!(status_of(bob.get(h)), Status::BadHandle, "bob reads alice's handle");
    assert_eq!(status_of(bob.free(&[h])), Status::BadHandle, "bob frees alice's handle");
    let ex = ExecReq::single(node(ExecOp::Silu, &[ExecInput::Handle(h)]));
    assert_eq!(status_of(bob.exec(&ex)), Status::BadHandle, "bob computes on alice's handle");
    // A named tenant's handles outlive its connection and are shared by its connections.
    drop(alice);
    let mut alice2 = Client::connect_with(srv.url(), &with("tok-alice")).unwrap();
    assert_eq!(alice2.get_f32(h).unwrap().1, vec![1.0, 2.0]);
    // Wrong, missing and empty tokens.
    for bad in [Some("tok-carol"), Some("tok-alic"), None] {
        let opts = ClientOptions { token: bad.map(|s| s.as_bytes().to_vec()), ..Default::default() };
        match Client::connect_with(srv.url(), &opts) {
            Err(e) => assert_eq!(e.status(), Some(Status::Unauthorized), "{bad:?}: {e}"),
            Ok(_) => panic!("token {bad:?} accepted"),
        }
    }
    let _ = std::fs::remove_file(&dir);
}

fn anonymous_connections_are_tenants(t: Transport) {
    let srv = server(t, &["--metrics-listen", "127.0.0.1:0"]);
    let metrics = srv.metrics.clone().unwrap();
    let mut a = connect(srv.url());
    let mut b = connect(srv.url());
    let h = a.put_f32(&[3], &[1.0, 2.0, 3.0]).unwrap();
    assert_eq!(status_of(b.get(h)), Status::BadHandle);
    // Stats shows each tenant its own tensors; the server-wide count is on /metrics.
    let live = |c: &mut Client| c.stats().unwrap().iter().find(|(k, _)| k == "tensors_live").unwrap().1;
    assert_eq!((live(&mut a), live(&mut b)), (1, 0));
    let server_live = || common::metric(&common::http_get(&metrics, "/metrics").1, "djinn_tensors_live").unwrap();
    assert_eq!(server_live(), 1.0);
    drop(a);
    // The server frees the closed connection's tensors when it sees the close.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while server_live() != 0.0 {
        assert!(std::time::Instant::now() < deadline, "handles of a closed anonymous connection were not freed");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn many_concurrent_clients(t: Transport) {
    const CLIENTS: usize = 34;
    // Every client must be served: Execs wait for one of the 4 lanes as long as it takes (in the
    // soft-RoCE VM, emulated on two cores, 34 clients' lane holders were off the CPU past the
    // default 2 s wait once; `exec_waits_for_a_lane_with_a_deadline` tests the wait itself).
    let srv = server(t, &["--max-connections", "64", "--exec-lane-wait-ms", "60000"]);
    let url = srv.url().to_owned();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let url = url.clone();
            std::thread::spawn(move || {
                let mut c = connect(&url);
                for round in 0..10 {
                    let v: Vec<f32> = (0..64).map(|j| (i * 1000 + round * 64 + j) as f32).collect();
                    let h = c.put_f32(&[8, 8], &v).unwrap();
                    let o = c
                        .exec(&ExecReq::single(node(ExecOp::Add, &[ExecInput::Handle(h), ExecInput::Handle(h)])))
                        .unwrap();
                    let got = c.get_f32(o[0].0).unwrap().1;
                    assert_eq!(got, v.iter().map(|x| x * 2.0).collect::<Vec<_>>(), "client {i} round {round}");
                    let p = vec![i as u8; 1000 + round];
                    assert_eq!(c.ping(&p).unwrap(), p);
                    c.free(&[h, o[0].0]).unwrap();
                }
                c.bytes_sent()
            })
        })
        .collect();
    for th in threads {
        assert!(th.join().expect("client thread panicked") > 0);
    }
}

fn too_many_connections_are_refused(t: Transport) {
    let srv = server(t, &["--max-connections", "2"]);
    let _a = connect(srv.url());
    let _b = connect(srv.url());
    match Client::connect_with(srv.url(), &ClientOptions::default()) {
        Err(e) => {
            assert!(e.status() == Some(Status::Busy) || matches!(e, ClientError::Transport(_)), "third connection: {e}")
        }
        Ok(_) => panic!("third connection accepted with max_connections 2"),
    }
}

fn main() {
    run_trials(vec![
        ("handshake_and_capabilities", None, handshake_and_capabilities),
        ("ping_echoes_and_counts_bytes", None, ping_echoes_and_counts_bytes),
        ("pipelined_requests_complete_by_id", None, pipelined_requests_complete_by_id),
        ("put_get_free_every_dtype", None, put_get_free_every_dtype),
        ("registered_buffer_puts_and_gets", None, registered_buffer_puts_and_gets),
        ("exec_single_ops_match_host", None, exec_single_ops_match_host),
        ("exec_graph_keeps_only_outputs", None, exec_graph_keeps_only_outputs),
        ("exec_errors_are_typed", None, exec_errors_are_typed),
        ("limits_are_enforced", None, limits_are_enforced),
        ("tenants_are_isolated_with_tokens", None, tenants_are_isolated_with_tokens),
        ("anonymous_connections_are_tenants", None, anonymous_connections_are_tenants),
        ("many_concurrent_clients", None, many_concurrent_clients),
        ("too_many_connections_are_refused", None, too_many_connections_are_refused),
    ])
}
