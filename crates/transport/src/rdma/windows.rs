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

use super::verbs::{empty_wc, ibv_access_flags, ibv_wc_status, Cq, Device, HostRegion, Mr, Mw, Qp, QpPeer, QpSizes};

/// Bytes the probe's window covers (the write lands just past them, inside the region).
const WINDOW_BYTES: u64 = 64;
/// A probe's completion that has not come by then counts as "not bounded".
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The device's answer, probed on the first call.
pub(crate) fn bounded(dev: &Arc<Device>) -> bool {
    *dev.windows_bounded.get_or_init(|| match probe(dev) {
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

fn probe(dev: &Arc<Device>) -> std::io::Result<bool> {
    // Declared first, dropped last: the region and window outlive the QPs.
    let region =
        Mr::with_access(dev, 4096, ibv_access_flags::IBV_ACCESS_LOCAL_WRITE | ibv_access_flags::IBV_ACCESS_MW_BIND)?;
    let mut mw = Mw::new(dev)?;
    let sizes = QpSizes { send_wr: 4, recv_wr: 1, inline_bytes: 16 };
    let (cq_a, cq_b) = (Arc::new(Cq::new(dev, 8)?), Arc::new(Cq::new(dev, 8)?));
    let a = Qp::new(dev, cq_a, sizes, 1)?;
    let b = Qp::new(dev, cq_b, sizes, 2)?;
    let peer = |q: &Qp| QpPeer { qpn: q.qpn(), psn: q.psn, gid: dev.gid, mtu: dev.active_mtu };
    a.connect(&peer(&b))?;
    b.connect(&peer(&a))?;
    tracing::debug!(device = %dev.name, "rdma: window probe: queue pairs connected");
    let rkey = mw.next_rkey();
    let host = HostRegion { mr: region.raw(), lkey: region.lkey(), covers: 4096 };
    // SAFETY: the scratch region is ours alone and outlives both QPs (dropped after them).
    unsafe { b.post_bind_mw(1, &mut mw, rkey, host, region.addr(), WINDOW_BYTES, true)? };
    let bound = completed(&b, 1);
    tracing::debug!(device = %dev.name, ?bound, "rdma: window probe: bind");
    if !bound? {
        return Err(std::io::Error::other("the window bind failed"));
    }
    let bytes = *b"outside!";
    // SAFETY: inline 8 bytes (copied during the call); the target is the scratch region.
    unsafe { a.post_write(2, bytes.as_ptr() as u64, 8, 0, region.addr() + WINDOW_BYTES, rkey, None, true)? };
    // Refused (a failed completion): the window is bounded.
    Ok(!completed(&a, 2)?)
}

/// Waits for the completion of `wr_id` on `qp`'s CQ; whether it succeeded. No completion in
/// time is an error (the probe then counts as "not bounded").
fn completed(qp: &Qp, wr_id: u64) -> std::io::Result<bool> {
    let start = Instant::now();
    let mut wcs = [empty_wc()];
    while start.elapsed() < PROBE_TIMEOUT {
        if qp.cq.poll(&mut wcs)? == 1 && wcs[0].wr_id == wr_id {
            return Ok(wcs[0].status == ibv_wc_status::IBV_WC_SUCCESS);
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    Err(std::io::Error::other("the window probe's work request did not complete"))
}
