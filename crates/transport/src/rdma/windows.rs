//! Whether a device holds a peer's writes through a memory window to the window's range.
//!
//! Grants over a start-up host region are type-2 windows bound over exactly the destination
//! (`ring::rendezvous`); that isolates connections only if the NIC checks a window-addressed write
//! against the window, not just against the region under it. The verbs specification requires
//! it, but soft-RoCE (`rdma_rxe` in Linux 6.1) checks the region only: a write just past a window
//! but inside its region is accepted. So each device is probed once, when the first host region
//! is registered (start-up, never on a request): two of its QPs connected to each other, a window
//! over 64 bytes of a scratch region, one 8-byte write just past it. Refused: windows are used;
//! accepted: grants register each destination instead (what they do without a host region).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::verbs::{ibv_access_flags, ibv_wc_status, Cq, Device, HostRegion, Mr, Mw, Qp, QpPeer, QpSizes};

/// Bytes the probe's window covers (the write lands just past them, inside the region).
const WINDOW_BYTES: u64 = 64;
/// A probe's completion that has not come by then counts as "not bounded".
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The device's answer, probed on the first call. `stopped` is looked at between the probe's
/// steps and while it waits for a completion: a listener that stops ends the probe early (the
/// answer is then "not bounded"), so nothing a shutdown does waits for it.
pub(crate) fn bounded(dev: &Arc<Device>, stopped: &dyn Fn() -> bool) -> bool {
    *dev.windows_bounded.get_or_init(|| match probe(dev, stopped) {
        Ok(true) => {
            tracing::info!(device = %dev.name, "rdma: memory windows hold writes to their range; grants bind windows");
            true
        }
        Ok(false) => {
            tracing::info!(
                device = %dev.name,
                "rdma: the device does not hold window writes to the window (soft-RoCE); grants register each destination"
            );
            false
        }
        Err(e) => {
            tracing::info!(device = %dev.name, error = %e, "rdma: no memory windows; grants register each destination");
            false
        }
    })
}

/// What one probe holds. Fields drop in declaration order: the window first, so it is
/// deallocated (and its binding with it) before the QP it was bound through is destroyed — in
/// soft-RoCE a bound type-2 window holds a reference to its QP, and destroying the QP first
/// blocks in the kernel, uninterruptibly, for ~20 s (a process exiting meanwhile cannot finish);
/// then the QPs, then the scratch region they wrote.
struct Probe {
    mw: Mw,
    a: Qp,
    b: Qp,
    region: Mr,
}

fn probe(dev: &Arc<Device>, stopped: &dyn Fn() -> bool) -> std::io::Result<bool> {
    let region =
        Mr::with_access(dev, 4096, ibv_access_flags::IBV_ACCESS_LOCAL_WRITE | ibv_access_flags::IBV_ACCESS_MW_BIND)?;
    let mw = Mw::new(dev)?;
    let sizes = QpSizes { send_wr: 4, recv_wr: 1, inline_bytes: 16 };
    let (cq_a, cq_b) = (Arc::new(Cq::new(dev, 8)?), Arc::new(Cq::new(dev, 8)?));
    let a = Qp::new(dev, cq_a, sizes, 1)?;
    let b = Qp::new(dev, cq_b, sizes, 2)?;
    let mut p = Probe { mw, a, b, region };
    let peer = |q: &Qp| QpPeer { qpn: q.qpn(), psn: q.psn, gid: dev.gid, mtu: dev.active_mtu };
    p.a.connect(&peer(&p.b))?;
    p.b.connect(&peer(&p.a))?;
    tracing::debug!(device = %dev.name, "rdma: window probe: queue pairs connected");
    let rkey = p.mw.next_rkey();
    let host = HostRegion {
        mr: p.region.raw(),
        lkey: p.region.lkey(),
        covers: 4096,
        range: (p.region.addr(), p.region.addr() + 4096),
        unit: false,
    };
    // SAFETY: the scratch region is ours alone and outlives the window and both QPs (`Probe`'s
    // field order).
    unsafe { p.b.post_bind_mw(1, &mut p.mw, rkey, host, p.region.addr(), WINDOW_BYTES, true)? };
    let bound = completed(&p.b, 1, stopped);
    tracing::debug!(device = %dev.name, ?bound, "rdma: window probe: bind");
    if !bound? {
        return Err(std::io::Error::other("the window bind failed"));
    }
    let bytes = *b"outside!";
    // SAFETY: inline 8 bytes (copied during the call); the target is the scratch region.
    unsafe { p.a.post_write(2, bytes.as_ptr() as u64, 8, 0, p.region.addr() + WINDOW_BYTES, rkey, None, true)? };
    // Refused (a failed completion): the window is bounded.
    let refused = !completed(&p.a, 2, stopped)?;
    tracing::debug!(device = %dev.name, refused, "rdma: window probe: write past the window");
    Ok(refused)
}

/// Waits for the completion of `wr_id` on `qp`'s CQ; whether it succeeded. No completion in
/// time, or the listener stopping, is an error (the probe then counts as "not bounded").
fn completed(qp: &Qp, wr_id: u64, stopped: &dyn Fn() -> bool) -> std::io::Result<bool> {
    let start = Instant::now();
    let mut wcs = [std::mem::MaybeUninit::uninit()];
    while start.elapsed() < PROBE_TIMEOUT {
        if stopped() {
            return Err(std::io::Error::other("the listener stopped during the window probe"));
        }
        if let [wc] = qp.cq.poll(&mut wcs)? {
            if wc.wr_id == wr_id {
                return Ok(wc.status == ibv_wc_status::IBV_WC_SUCCESS);
            }
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    Err(std::io::Error::other("the window probe's work request did not complete"))
}
