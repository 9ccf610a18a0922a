//! shm-specific tests over real shared memory and real processes: what the transport-generic
//! conformance suite (tests/conformance.rs) cannot express — a peer process killed with SIGKILL,
//! a hostile peer writing garbage into the ring headers, a hostile server handing over a bad
//! region, wrap-around through tiny rings, and idle CPU.

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use djinn_proto::{FrameHeader, HeaderError, HEADER_LEN};
use zerocopy::IntoBytes;

use super::raw::RawClient;
use super::region::{Layout, SLOT_BYTES};
use super::*;
use crate::{OutFrame, WaitMode};

/// Environment variable that turns the test binary into a peer process (see `child_helper`).
const CHILD_ENV: &str = "DJINN_SHM_TEST_CHILD";

fn unique_name(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("test-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn send(c: &mut Connection, id: u64, meta: &[u8], data: &[u8]) -> Result<(), TransportError> {
    let header = FrameHeader::new(2, 0, id, meta.len() as u32, data.len() as u64);
    c.tx.send(&OutFrame { header, meta, data: &[data] })
}

fn recv(c: &mut Connection) -> Result<(FrameHeader, Vec<u8>, Vec<u8>), TransportError> {
    let head = c.rx.recv_head()?;
    let mut data = vec![0u8; head.header.data_len.get() as usize];
    c.rx.recv_data(&mut data)?;
    Ok((head.header, head.meta, data))
}

/// Listener + one accepted connection on a fresh name.
fn pair(opts: &TransportOptions) -> (Connection, Connection) {
    let name = unique_name("pair");
    let mut l = listen(&name, opts).unwrap();
    let client = thread::spawn({
        let opts = opts.clone();
        move || connect(&name, &opts).unwrap()
    });
    let server = l.accept().unwrap();
    (client.join().unwrap(), server)
}

fn echo_thread(mut server: Connection) -> thread::JoinHandle<TransportError> {
    thread::spawn(move || loop {
        let (h, meta, data) = match recv(&mut server) {
            Ok(f) => f,
            Err(e) => return e,
        };
        let reply = FrameHeader::reply_to(&h, meta.len() as u32, data.len() as u64);
        if let Err(e) = server.tx.send(&OutFrame { header: reply, meta: &meta, data: &[&data] }) {
            return e;
        }
    })
}

#[test]
fn layout_encode_decode_and_rejects() {
    let l = Layout::new(256, 16 << 20).unwrap();
    assert_eq!(Layout::decode(&l.encode(), l.region_bytes as u64), Ok(l));
    assert!(Layout::decode(&l.encode(), l.region_bytes as u64 - 1).is_err());
    let mut bad = l.encode();
    bad[0] ^= 1;
    assert_eq!(Layout::decode(&bad, l.region_bytes as u64), Err("bad region magic"));
    let mut huge = l.encode();
    huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(Layout::decode(&huge, l.region_bytes as u64).is_err());
    assert!(Layout::new(0, 4096).is_err());
    assert!(Layout::new(1, 4095).is_err());
    assert!(Layout::new(1, (1 << 30) + 4096).is_err());
}

#[test]
fn bad_names_are_refused() {
    for name in ["", "a b", "x\0y", &"n".repeat(NAME_BYTES_MAX + 1)] {
        assert!(matches!(listen(name, &TransportOptions::default()), Err(TransportError::BadUrl { .. })));
    }
    let name = unique_name("nobody");
    let err = connect(&name, &TransportOptions::default()).err().unwrap();
    assert!(err.to_string().contains("no server listens"), "{err}");
}

#[test]
fn name_is_reusable_after_listener_drop_and_exclusive_while_bound() {
    let name = unique_name("rebind");
    let opts = TransportOptions::default();
    let l = listen(&name, &opts).unwrap();
    assert_eq!(l.url(), format!("shm://{name}"));
    let err = listen(&name, &opts).err().unwrap();
    assert!(err.to_string().contains("another server"), "{err}");
    drop(l);
    listen(&name, &opts).unwrap();
}

/// Tiny rings (2 slots, one page of data) force wrap-around, chunking and waiting on every frame,
/// including metadata too large for a slot, in both wait modes.
#[test]
fn tiny_rings_wrap_and_stream() {
    for wait in [WaitMode::SpinThenPark, WaitMode::BusyPoll] {
        let opts = TransportOptions { shm_slots: 2, shm_data_bytes: 4096, wait, ..TransportOptions::default() };
        let (mut c, server) = pair(&opts);
        let echo = echo_thread(server);
        let sizes = [0usize, 1, 4095, 4096, 4097, 10_000, 300_000, 1 << 20];
        for (i, &len) in sizes.iter().enumerate() {
            let meta = pattern([0, 479, 480, 481, 5000][i % 5], i as u64 + 100);
            let data = pattern(len, i as u64);
            send(&mut c, i as u64, &meta, &data).unwrap();
            let (h, m, d) = recv(&mut c).unwrap();
            assert_eq!(h.request_id.get(), i as u64);
            assert_eq!(m, meta);
            assert!(d == data, "frame {i} of {len} bytes differs ({wait:?})");
        }
        drop(c);
        assert!(matches!(echo.join().unwrap(), TransportError::Closed));
    }
}

/// A receiver parked in `recv_head` burns (almost) no CPU while nothing arrives.
#[test]
fn parked_receiver_is_idle() {
    let opts = TransportOptions { spin_us: 50, ..TransportOptions::default() };
    let (mut c, mut server) = pair(&opts);
    // The frame is sent 400 ms after the waiter started waiting, not after it was spawned: on a
    // loaded host the thread may start late.
    let (started_tx, started) = std::sync::mpsc::channel();
    let waiter = thread::spawn(move || {
        let cpu0 = thread_cpu();
        let t0 = Instant::now();
        started_tx.send(()).unwrap();
        let head = server.rx.recv_head().unwrap();
        (thread_cpu() - cpu0, t0.elapsed(), head.header.request_id.get())
    });
    started.recv().unwrap();
    thread::sleep(Duration::from_millis(400));
    send(&mut c, 7, b"", b"").unwrap();
    let (cpu, wall, id) = waiter.join().unwrap();
    assert_eq!(id, 7);
    assert!(wall >= Duration::from_millis(350));
    assert!(cpu < Duration::from_millis(20), "parked receiver used {cpu:?} CPU over {wall:?}");
}

fn thread_cpu() -> Duration {
    // SAFETY: timespec is plain data; clock_gettime writes it.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid clock id and a live out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

// ------------------------------------------------------------------------------------------------
// Hostile client: garbage in the ring headers must give typed errors, never a panic or a hang.

/// Accepts one raw client on a fresh listener.
fn raw_pair(opts: &TransportOptions) -> (RawClient, Connection) {
    let name = unique_name("raw");
    let mut l = listen(&name, opts).unwrap();
    let raw = thread::spawn(move || RawClient::connect(&name).unwrap());
    let server = l.accept().unwrap();
    (raw.join().unwrap(), server)
}

/// Publishes `header` (+ inline `meta`) in request slot `index` with the slot tail at `tail`.
fn publish_raw(raw: &RawClient, index: u64, header: &FrameHeader, meta: &[u8], tail: u64) {
    let d = raw.requests();
    let slot = d.slots + (index % raw.layout().slot_count as u64) as usize * SLOT_BYTES;
    raw.write(slot, header.as_bytes());
    raw.write(slot + HEADER_LEN, meta);
    raw.store_u64(d.tail_slots, tail);
    raw.ring_server_rx();
}

fn expect_header_error(r: Result<crate::RxHead, TransportError>, want: fn(&HeaderError) -> bool) {
    match r {
        Err(TransportError::BadHeader(e)) if want(&e) => {}
        other => panic!("expected a header error, got {other:?}"),
    }
}

fn expect_protocol_error<T: std::fmt::Debug>(r: Result<T, TransportError>, what: &str) {
    match r {
        Err(TransportError::Other(msg)) if msg.contains(what) => {}
        other => panic!("expected a ring-protocol error about {what:?}, got {other:?}"),
    }
}

#[test]
fn hostile_client_garbage_gives_typed_errors() {
    let opts = TransportOptions::default();
    let limits = opts.limits;

    // Bad magic, after one good frame.
    let (raw, mut s) = raw_pair(&opts);
    let good = FrameHeader::new(2, 0, 1, 3, 0);
    publish_raw(&raw, 0, &good, b"abc", 1);
    let head = s.rx.recv_head().unwrap();
    assert_eq!((head.header, head.meta.as_slice()), (good, &b"abc"[..]));
    let mut bad = good;
    bad.magic = 0xdead_beef.into();
    publish_raw(&raw, 1, &bad, b"", 2);
    expect_header_error(s.rx.recv_head(), |e| matches!(e, HeaderError::BadMagic(0xdead_beef)));
    // The connection stays failed; no panic on further use.
    assert!(s.rx.recv_head().is_err());
    assert!(s.rx.skip_data(0).is_err());

    // Oversized data and metadata lengths.
    for (h, want) in [
        (
            FrameHeader::new(2, 0, 1, 0, limits.frame_bytes_max),
            (|e: &HeaderError| matches!(e, HeaderError::FrameTooLarge { .. })) as fn(&HeaderError) -> bool,
        ),
        (FrameHeader::new(2, 0, 1, limits.meta_bytes_max + 1, 0), |e| matches!(e, HeaderError::MetaTooLarge { .. })),
        (FrameHeader::new(2, 0, 1, 0, u64::MAX), |e| matches!(e, HeaderError::FrameTooLarge { .. })),
    ] {
        let (raw, mut s) = raw_pair(&opts);
        publish_raw(&raw, 0, &h, b"", 1);
        expect_header_error(s.rx.recv_head(), want);
    }

    // Slot tail beyond the ring, and behind the head (wrapped).
    for tail in [opts.shm_slots as u64 + 1, u64::MAX, 1 << 40] {
        let (raw, mut s) = raw_pair(&opts);
        publish_raw(&raw, 0, &good, b"abc", tail);
        expect_protocol_error(s.rx.recv_head(), "slot tail out of range");
    }

    // Data tail beyond the data area while the server streams a frame's bulk data.
    let (raw, mut s) = raw_pair(&opts);
    let d = raw.requests();
    publish_raw(&raw, 0, &FrameHeader::new(2, 0, 1, 0, 1000), b"", 1);
    let head = s.rx.recv_head().unwrap();
    assert_eq!(head.header.data_len.get(), 1000);
    raw.store_u64(d.tail_data, raw.layout().data_bytes as u64 + 1);
    raw.ring_server_rx();
    expect_protocol_error(s.rx.recv_data(&mut [0u8; 1000]), "data tail out of range");

    // Head indices of the reply ring moved by the client: the server's sender refuses them
    // when it next needs space, instead of overwriting unread slots or data.
    let (raw, mut s) = raw_pair(&opts);
    let r = raw.replies();
    raw.store_u64(r.head_slots, 1 << 50);
    raw.store_u64(r.head_data, 1 << 50);
    let mut result = Ok(());
    for id in 0..=opts.shm_slots as u64 {
        result = send(&mut s, id, b"", b"x");
        if result.is_err() {
            break;
        }
    }
    expect_protocol_error(result, "head out of range");
}

/// A frame whose bulk data never comes, from a client that then goes away: the server's
/// receiver ends with `Closed`, it does not hang; and other clients are served meanwhile.
#[test]
fn half_sent_frame_then_client_gone() {
    let opts = TransportOptions::default();
    let (raw, mut s) = raw_pair(&opts);
    publish_raw(&raw, 0, &FrameHeader::new(2, 0, 1, 0, 1 << 20), b"", 1);
    let reader = thread::spawn(move || {
        let head = s.rx.recv_head().unwrap();
        let mut buf = vec![0u8; head.header.data_len.get() as usize];
        s.rx.recv_data(&mut buf)
    });
    let (mut c, server) = pair(&opts);
    let echo = echo_thread(server);
    for i in 0..20 {
        send(&mut c, i, b"m", &pattern(1000, i)).unwrap();
        assert_eq!(recv(&mut c).unwrap().2, pattern(1000, i));
    }
    drop(raw);
    assert!(matches!(reader.join().unwrap(), Err(TransportError::Closed)));
    drop(c);
    assert!(matches!(echo.join().unwrap(), TransportError::Closed));
}

// ------------------------------------------------------------------------------------------------
// Hostile server: a bad region is refused by the client.

fn fake_server(name: &str, region_bytes: u64, control: &[u8], seal: bool) -> thread::JoinHandle<()> {
    let listener = UnixListener::bind_addr(&socket_name(name).unwrap()).unwrap();
    let control = control.to_vec();
    thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let file = if seal {
            sys::sealed_memfd(region_bytes).unwrap()
        } else {
            // SAFETY: literal name; the descriptor is checked and wrapped at once.
            let fd = unsafe { libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC) };
            assert!(fd >= 0);
            // SAFETY: a fresh descriptor nobody else owns.
            let f = std::fs::File::from(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) });
            f.set_len(region_bytes).unwrap();
            f
        };
        file.write_all_at(&control, 0).unwrap();
        let e = [EventFd::new().unwrap(), EventFd::new().unwrap(), EventFd::new().unwrap(), EventFd::new().unwrap()];
        let fds = [
            file.as_raw_fd(),
            e[0].fd().as_raw_fd(),
            e[1].fd().as_raw_fd(),
            e[2].fd().as_raw_fd(),
            e[3].fd().as_raw_fd(),
        ];
        sys::send_fds(&stream, &HELLO, &fds).unwrap();
        // Keep the socket open until the client has looked.
        let mut b = [0u8; 1];
        let _ = std::io::Read::read(&mut &stream, &mut b);
    })
}

#[test]
fn client_refuses_bad_region() {
    let good = Layout::new(4, 4096).unwrap();
    let mut bad_magic = good.encode();
    bad_magic[1] ^= 0xff;
    let cases: [(&str, u64, [u8; CONTROL_USED_BYTES], bool); 4] = [
        ("bad region magic", good.region_bytes as u64, bad_magic, true),
        ("region size disagrees", good.region_bytes as u64 + 4096, good.encode(), true),
        ("not sealed", good.region_bytes as u64, good.encode(), false),
        (
            "slot count out of range",
            good.region_bytes as u64,
            {
                let mut c = good.encode();
                c[12..16].copy_from_slice(&0u32.to_le_bytes());
                c
            },
            true,
        ),
    ];
    for (want, bytes, control, seal) in cases {
        let name = unique_name("fake");
        let server = fake_server(&name, bytes, &control, seal);
        let err = connect(&name, &TransportOptions::default()).err().expect("bad region accepted");
        assert!(err.to_string().contains(want), "{want}: got {err}");
        server.join().unwrap();
    }
}

// ------------------------------------------------------------------------------------------------
// Peer processes killed with SIGKILL.

/// Kills and reaps the child on every exit path, so no process is left behind.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_child(role: &str) -> ChildGuard {
    let exe = std::env::current_exe().unwrap();
    let child = Command::new(exe)
        .args(["--ignored", "--exact", "shm::tests::child_helper", "--nocapture", "--test-threads", "1"])
        .env(CHILD_ENV, role)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    ChildGuard(child)
}

/// Reads the child's stdout until it prints `READY`.
fn wait_ready(child: &mut ChildGuard) {
    let out = child.0.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.trim_end().ends_with("READY") => break,
            Some(Ok(_)) => continue,
            other => panic!("child ended before READY: {other:?}"),
        }
    }
    // Keep draining so the child never blocks on a full pipe.
    thread::spawn(move || for _ in lines {});
}

/// Entry point of the peer processes used below (runs only with `DJINN_SHM_TEST_CHILD` set).
#[test]
#[ignore = "helper entry point: the peer-death tests run it as a child process"]
fn child_helper() {
    let Ok(role) = std::env::var(CHILD_ENV) else { return };
    let (role, name) = role.split_once(':').unwrap();
    let opts = TransportOptions::default();
    match role {
        "client" => {
            let mut c = connect(name, &opts).unwrap();
            send(&mut c, 1, b"hello", &pattern(1000, 1)).unwrap();
            println!("READY");
            thread::sleep(Duration::from_secs(60));
        }
        "server" => {
            let mut l = listen(name, &opts).unwrap();
            println!("READY");
            let mut s = l.accept().unwrap();
            let (h, m, d) = recv(&mut s).unwrap();
            let reply = FrameHeader::reply_to(&h, m.len() as u32, d.len() as u64);
            s.tx.send(&OutFrame { header: reply, meta: &m, data: &[&d] }).unwrap();
            thread::sleep(Duration::from_secs(60));
        }
        _ => panic!("unknown child role {role}"),
    }
}

/// Kills the child from another thread once `delay` has passed, while this thread is parked.
fn kill_later(child: &mut ChildGuard, delay: Duration) -> thread::JoinHandle<()> {
    let pid = child.0.id() as libc::pid_t;
    thread::spawn(move || {
        thread::sleep(delay);
        // SAFETY: signals our own child, which the guard has not reaped yet.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    })
}

#[test]
fn client_process_killed_server_sees_closed() {
    for wait in [WaitMode::SpinThenPark, WaitMode::BusyPoll] {
        let opts = TransportOptions { wait, ..TransportOptions::default() };
        let name = unique_name("kill-client");
        let mut l = listen(&name, &opts).unwrap();
        let mut child = spawn_child(&format!("client:{name}"));
        let mut s = l.accept().unwrap();
        let (h, m, d) = recv(&mut s).unwrap();
        assert_eq!((h.request_id.get(), m.as_slice(), d), (1, &b"hello"[..], pattern(1000, 1)));
        wait_ready(&mut child);
        // Blocked (parked or polling) when the kill lands.
        let killer = kill_later(&mut child, Duration::from_millis(100));
        let t0 = Instant::now();
        assert!(matches!(s.rx.recv_head(), Err(TransportError::Closed)), "{wait:?}");
        assert!(t0.elapsed() < Duration::from_secs(5));
        killer.join().unwrap();
        // The sender fills the dead client's ring, then sees Closed instead of waiting forever.
        let mut result = Ok(());
        for id in 0..=opts.shm_slots as u64 {
            result = send(&mut s, id, b"", b"");
            if result.is_err() {
                break;
            }
        }
        assert!(matches!(result, Err(TransportError::Closed)), "{result:?}");
    }
}

#[test]
fn server_process_killed_client_sees_closed() {
    let opts = TransportOptions::default();
    let name = unique_name("kill-server");
    let mut child = spawn_child(&format!("server:{name}"));
    wait_ready(&mut child);
    let mut c = connect(&name, &opts).unwrap();
    send(&mut c, 5, b"m", &pattern(100_000, 5)).unwrap();
    let (h, _, d) = recv(&mut c).unwrap();
    assert_eq!((h.request_id.get(), d), (5, pattern(100_000, 5)));
    let killer = kill_later(&mut child, Duration::from_millis(100));
    assert!(matches!(c.rx.recv_head(), Err(TransportError::Closed)));
    killer.join().unwrap();
    // A restarted server binds the same name at once: nothing stale remains.
    drop(child);
    listen(&name, &opts).unwrap();
}

/// Both directions full at once, halves on their own threads, tiny rings: every frame goes through
/// the park/ring handshake many times. A lost wake-up would hang; the watchdog turns it into a failure.
#[test]
fn stress_tiny_rings_halves_on_threads() {
    for wait in [WaitMode::SpinThenPark, WaitMode::BusyPoll] {
        let opts = TransportOptions { shm_slots: 4, shm_data_bytes: 4096, spin_us: 2, wait, ..Default::default() };
        let (c, server) = pair(&opts);
        let echo = echo_thread(server);
        let Connection { mut tx, mut rx, .. } = c;
        // Busy-poll here runs three spinning threads on a 2-core machine: it progresses only as
        // the scheduler rotates them (about a millisecond per hand-off), so it gets fewer frames.
        let frames: u64 = if wait == WaitMode::BusyPoll { 300 } else { 3000 };
        let size = |id: u64| (id * 7919 % 9000) as usize;
        let sender = thread::spawn(move || {
            for id in 0..frames {
                let data = pattern(size(id), id);
                let header = FrameHeader::new(2, 0, id, 0, data.len() as u64);
                tx.send(&OutFrame { header, meta: &[], data: &[&data] }).unwrap();
            }
            tx
        });
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for id in 0..frames {
                let head = rx.recv_head().unwrap();
                assert_eq!(head.header.request_id.get(), id);
                let mut d = vec![0; head.header.data_len.get() as usize];
                rx.recv_data(&mut d).unwrap();
                assert!(d == pattern(size(id), id), "frame {id}");
            }
            done_tx.send(rx).unwrap();
        });
        let rx = done_rx
            .recv_timeout(Duration::from_secs(90))
            .unwrap_or_else(|_| panic!("{wait:?}: stalled: lost wake-up or deadlock"));
        let tx = sender.join().unwrap();
        drop((tx, rx));
        assert!(matches!(echo.join().unwrap(), TransportError::Closed));
    }
}

/// The closer wakes a sender blocked on a full ring and a blocked receiver, in both wait modes;
/// the peer then sees `Closed`.
#[test]
fn closer_wakes_blocked_halves() {
    for wait in [WaitMode::SpinThenPark, WaitMode::BusyPoll] {
        let opts = TransportOptions { shm_slots: 2, shm_data_bytes: 4096, wait, ..Default::default() };
        let (c, mut server) = pair(&opts);
        let Connection { mut tx, mut rx, .. } = c;
        let close = tx.closer().expect("shm has a closer");
        // Nobody reads on the server: the third frame blocks on the full slot ring.
        let sender = thread::spawn(move || {
            (0..3).try_for_each(|id| {
                tx.send(&OutFrame { header: FrameHeader::new(2, 0, id, 0, 0), meta: &[], data: &[] })
            })
        });
        let receiver = thread::spawn(move || rx.recv_head().map(|_| ()));
        thread::sleep(Duration::from_millis(50));
        close();
        assert!(matches!(sender.join().unwrap(), Err(TransportError::Closed)), "{wait:?} sender");
        assert!(matches!(receiver.join().unwrap(), Err(TransportError::Closed)), "{wait:?} receiver");
        // The server drains the two frames that made it, then sees the end.
        for id in 0..2 {
            assert_eq!(server.rx.recv_head().unwrap().header.request_id.get(), id);
        }
        assert!(matches!(server.rx.recv_head(), Err(TransportError::Closed)));
    }
}
