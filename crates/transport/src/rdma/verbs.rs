//! Owned verbs resources: each raw handle from libibverbs lives in one type whose `Drop` releases
//! it, and a resource holds an `Arc` of what it was created from (a QP its CQ and device, an MR
//! its device), so teardown runs in the order verbs requires whatever order owners drop in.
//!
//! Verbs calls on distinct objects are thread-safe (rdma-core documents it), which is what makes
//! these types `Send`/`Sync`; each CQ and QP here is still used by one half of one connection.

use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::net::IpAddr;
use std::os::fd::RawFd;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rdma_sys::*;

/// Physical port every device here is used through (soft-RoCE and single-port NICs have one).
pub(crate) const PORT: u8 = 1;
/// Hop limit of RoCE v2 packets (routable: the GRH is always present).
const HOP_LIMIT: u8 = 64;

fn last_os(what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

fn ret(what: &str, rc: i32) -> io::Result<()> {
    // Verbs return 0, or an errno value (some providers return -1 and set errno).
    match rc {
        0 => Ok(()),
        -1 => Err(last_os(what)),
        e => Err(io::Error::new(io::Error::from_raw_os_error(e.abs()).kind(), format!("{what}: errno {e}"))),
    }
}

/// The IPv4-mapped or native IPv6 GID of an address (RoCE v2 GIDs are IP addresses).
pub(crate) fn gid_of(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Names of the RDMA devices present (empty when libibverbs finds none).
pub fn device_names() -> Vec<String> {
    let mut n = 0;
    // SAFETY: ibv_get_device_list returns an array of `n` device pointers (or null), freed below
    // after the names (which it owns) are copied out.
    unsafe {
        let list = ibv_get_device_list(&mut n);
        if list.is_null() {
            return Vec::new();
        }
        let names = (0..n.max(0) as usize)
            .map(|i| CStr::from_ptr(ibv_get_device_name(*list.add(i))).to_string_lossy().into_owned())
            .collect();
        ibv_free_device_list(list);
        names
    }
}

/// Why a device could not be opened for an address.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("no RDMA device is present (is the driver loaded? e.g. `rdma link add rxe0 type rxe netdev IFACE`)")]
    NoDevices,
    #[error("RDMA device {name:?} does not exist; devices present: {present}")]
    NoSuchDevice { name: String, present: String },
    #[error("no RDMA device owns address {ip} (devices present: {present}); name one with --nic")]
    NoDeviceForAddress { ip: IpAddr, present: String },
    #[error("RDMA device {name:?} has no GID for address {ip}; use an address of its network interface")]
    NoGid { name: String, ip: IpAddr },
    #[error("RDMA device {name:?}: {source}")]
    Io { name: String, source: io::Error },
}

/// What to do when a QP gets a fatal asynchronous event (close its connection).
pub(crate) type OnFatal = Arc<dyn Fn() + Send + Sync>;

/// An open device with its protection domain, the port's attributes and the GID used for `ip`.
pub(crate) struct Device {
    ctx: NonNull<ibv_context>,
    pd: NonNull<ibv_pd>,
    pub(crate) name: String,
    pub(crate) gid: [u8; 16],
    pub(crate) gid_index: u8,
    pub(crate) active_mtu: u32,
    /// QP number → what to do on its fatal event; entries live as long as their QP.
    on_fatal: Arc<Mutex<HashMap<u32, OnFatal>>>,
    events: Option<AsyncEvents>,
    /// Host memory handed over once (`Listener::register_host_memory`), registered piece by piece
    /// on first use and kept for the device's life (see [`HostMr`]).
    host: std::sync::RwLock<HostRegions>,
    /// Held while one piece registers, so two transfers that miss the same piece register it once.
    host_registering: Mutex<()>,
    /// Ranges registered at run time ([`Device::register_range`]: a server's tensors), sorted by
    /// start; each entry lives exactly as long as its [`RangeReg`] guard.
    ranges: std::sync::RwLock<Vec<RangeMr>>,
    /// Whether a peer's write through a memory window is held to the window's range (probed
    /// once, see `windows`); grants use windows only where it is.
    pub(crate) windows_bounded: std::sync::OnceLock<bool>,
}

/// Host regions one device takes at most (start-up arenas: a handful).
pub(crate) const HOST_REGIONS_MAX: usize = 8;
/// A host region is registered in pieces of this size (the last one shorter), each on the first
/// transfer that touches it, unless it is handed out in units ([`crate::PinnedHost::unit_bytes`]:
/// a staging pool's chunks), which are then its pieces. Registering pins and, for lazily zeroed
/// memory, faults in every page: 256 MiB took over 20 s in the TCG VM, and a process cannot exit
/// while a registration is in the kernel. A piece bounds both what one transfer pays once and how
/// long an exit waits.
pub(crate) const HOST_PIECE_BYTES: u64 = 8 << 20;

/// Host memory someone else owns ([`crate::PinnedHost`]) and the pieces of it registered so far.
#[derive(Default)]
struct HostRegions {
    regions: Vec<Arc<dyn crate::PinnedHost>>,
    /// Sorted by start; at most one per piece of the regions (`pieces_max`), never removed
    /// before the device drops.
    pieces: Vec<HostMr>,
    /// The regions' pieces together (a staging pool: its chunk count): the bound of `pieces`,
    /// reserved when a region is taken, so registering a piece never grows the list.
    pieces_max: usize,
}

/// The piece size of `mem` and whether its pieces are units it hands out whole.
fn piece_of(mem: &dyn crate::PinnedHost) -> (u64, bool) {
    match mem.unit_bytes().filter(|&u| u > 0) {
        Some(u) => (u as u64, true),
        None => (HOST_PIECE_BYTES, false),
    }
}

/// One registered piece of a host region, kept alive by the registration itself and
/// deregistered when dropped (before the memory it holds is released). Its own rkey grants
/// nothing: access is `LOCAL_WRITE | MW_BIND`, so the NIC may read it as a send source and write
/// it on the local side, and a peer may write it only through a memory window bound over one
/// granted range (see `rendezvous`).
struct HostMr {
    mr: NonNull<ibv_mr>,
    start: u64,
    end: u64,
    /// The piece is one unit of its region ([`crate::PinnedHost::unit_bytes`]).
    unit: bool,
    _mem: Arc<dyn crate::PinnedHost>,
}

impl Drop for HostMr {
    fn drop(&mut self) {
        // SAFETY: a listed piece drops only with its device (`Device::drop`), when every QP (each
        // holds an Arc<Device>) is gone, and one never listed was never used, so no work request
        // uses the registration; `_mem` (the memory) is released only after this body.
        unsafe { ibv_dereg_mr(self.mr.as_ptr()) };
    }
}

/// What a transfer needs of the registered piece that covers the start of its buffer.
#[derive(Clone, Copy)]
pub(crate) struct HostRegion {
    /// The registration (valid while the device is: pieces are never removed; a run-time range
    /// while its guard lives, which the memory's owner keeps beside the memory).
    pub(crate) mr: *mut ibv_mr,
    pub(crate) lkey: u32,
    /// Bytes of the asked range, from its start, that this piece covers (at least one).
    pub(crate) covers: u64,
    /// The whole range the registration covers.
    pub(crate) range: (u64, u64),
    /// The registration is one unit of a region handed out in whole units
    /// ([`crate::PinnedHost::unit_bytes`]): whoever receives into part of it holds all of it.
    pub(crate) unit: bool,
}

/// A range registered at run time, listed while its [`RangeReg`] lives.
struct RangeMr {
    mr: NonNull<ibv_mr>,
    start: u64,
    end: u64,
}

/// Keeps one run-time registration ([`Device::register_range`]); dropping it unlists and
/// deregisters it.
pub(crate) struct RangeReg {
    dev: Arc<Device>,
    mr: NonNull<ibv_mr>,
}

// SAFETY: an owned registration handle; verbs objects are thread-safe.
unsafe impl Send for RangeReg {}
// SAFETY: as above; `&RangeReg` gives access to nothing.
unsafe impl Sync for RangeReg {}

impl Drop for RangeReg {
    fn drop(&mut self) {
        let mut ranges = self.dev.ranges.write().unwrap_or_else(|p| p.into_inner());
        ranges.retain(|r| r.mr != self.mr);
        drop(ranges);
        // SAFETY: unlisted above, so no new transfer finds it; a transfer using it borrows the
        // memory, whose owner drops this guard only after such borrows end.
        unsafe { ibv_dereg_mr(self.mr.as_ptr()) };
    }
}

/// The thread that reads the context's asynchronous events (ibv_get_async_event) and acks each.
struct AsyncEvents {
    stop: Arc<AtomicBool>,
    bell: Arc<crate::shm::sys::EventFd>,
    thread: Option<JoinHandle<()>>,
}

/// The context pointer, moved to the event thread (which the device joins before closing it).
struct CtxPtr(NonNull<ibv_context>);
// SAFETY: verbs contexts may be used from any thread; the device outlives the thread (joined in Drop).
unsafe impl Send for CtxPtr {}

impl AsyncEvents {
    fn start(ctx: NonNull<ibv_context>, name: &str, on_fatal: Arc<Mutex<HashMap<u32, OnFatal>>>) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let bell = Arc::new(crate::shm::sys::EventFd::new()?);
        // SAFETY: ctx is open; the async fd is made non-blocking so the thread never sleeps in
        // ibv_get_async_event itself (it sleeps in poll, where the stop bell reaches it).
        let fd = unsafe {
            let fd = ctx.as_ref().async_fd;
            let flags = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
            fd
        };
        let (stop2, bell2, ctx) = (stop.clone(), bell.clone(), CtxPtr(ctx));
        let thread = std::thread::Builder::new().name(format!("rdma-events-{name}")).spawn(move || {
            let ctx = ctx;
            while !stop2.load(Ordering::Acquire) {
                use std::os::fd::AsRawFd;
                let mut fds = [
                    libc::pollfd { fd, events: libc::POLLIN, revents: 0 },
                    libc::pollfd { fd: bell2.fd().as_raw_fd(), events: libc::POLLIN, revents: 0 },
                ];
                // SAFETY: two live pollfd entries.
                if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
                    continue;
                }
                if fds[0].revents != 0 {
                    take_async_events(ctx.0, &on_fatal);
                }
            }
        })?;
        Ok(AsyncEvents { stop, bell, thread: Some(thread) })
    }
}

/// Reads every pending asynchronous event: a QP's fatal event closes its connection; each event is
/// acknowledged (ibv_destroy_qp waits for that).
fn take_async_events(ctx: NonNull<ibv_context>, on_fatal: &Mutex<HashMap<u32, OnFatal>>) {
    loop {
        // SAFETY: ctx is open (the device joins this thread before closing it); the event is
        // plain data written by the call and acknowledged below.
        let mut ev: ibv_async_event = unsafe { std::mem::zeroed() };
        if unsafe { ibv_get_async_event(ctx.as_ptr(), &mut ev) } != 0 {
            return;
        }
        // Read as a number: a newer rdma-core may report kinds this binding's enum lacks.
        // SAFETY: the field is a C enum, 4 bytes.
        let kind = unsafe { *(ptr::addr_of!(ev.event_type) as *const u32) };
        let qp_fatal = [
            ibv_event_type::IBV_EVENT_QP_FATAL as u32,
            ibv_event_type::IBV_EVENT_QP_REQ_ERR as u32,
            ibv_event_type::IBV_EVENT_QP_ACCESS_ERR as u32,
            ibv_event_type::IBV_EVENT_PATH_MIG_ERR as u32,
        ];
        if qp_fatal.contains(&kind) {
            // SAFETY: for QP events the element is the QP, which stays valid until the event is
            // acknowledged (ibv_destroy_qp waits for it).
            let qpn = unsafe { (*ev.element.qp).qp_num };
            let f = on_fatal.lock().unwrap_or_else(|p| p.into_inner()).get(&qpn).cloned();
            tracing::warn!(qpn, kind, "rdma: fatal queue-pair event; closing its connection");
            if let Some(f) = f {
                f();
            }
        } else if kind == ibv_event_type::IBV_EVENT_DEVICE_FATAL as u32 {
            tracing::error!("rdma: device fatal event; every connection on it will fail");
            let all: Vec<OnFatal> = on_fatal.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
            all.iter().for_each(|f| f());
        } else {
            tracing::debug!(kind, "rdma: asynchronous event");
        }
        // SAFETY: acknowledges exactly the event got above.
        unsafe { ibv_ack_async_event(&mut ev) };
    }
}

// SAFETY: verbs objects may be used from any thread; the pointers are owned by this value.
unsafe impl Send for Device {}
// SAFETY: as above; &Device only reads immutable fields and calls thread-safe verbs.
unsafe impl Sync for Device {}

impl Device {
    /// Opens `name` (or, when `None`, the device that has a GID for `ip`) and finds its GID for `ip`.
    pub(crate) fn open(name: Option<&str>, ip: IpAddr) -> Result<Arc<Device>, DeviceError> {
        let present = device_names();
        if present.is_empty() {
            return Err(DeviceError::NoDevices);
        }
        let list = present.join(", ");
        match name {
            Some(n) if !present.iter().any(|p| p == n) => {
                Err(DeviceError::NoSuchDevice { name: n.to_string(), present: list })
            }
            Some(n) => match Self::open_one(n, ip)? {
                Some(d) => Ok(Arc::new(d)),
                None => Err(DeviceError::NoGid { name: n.to_string(), ip }),
            },
            None => {
                for n in &present {
                    if let Some(d) = Self::open_one(n, ip)? {
                        return Ok(Arc::new(d));
                    }
                }
                Err(DeviceError::NoDeviceForAddress { ip, present: list })
            }
        }
    }

    /// Opens one device; `None` when it has no GID for `ip`.
    fn open_one(name: &str, ip: IpAddr) -> Result<Option<Device>, DeviceError> {
        let io_err = |source| DeviceError::Io { name: name.to_string(), source };
        let want = gid_of(ip);
        let mut n = 0;
        // SAFETY: the device list lives until ibv_free_device_list; the context we open from one of
        // its entries stays valid after the list is freed (documented by libibverbs).
        let ctx = unsafe {
            let list = ibv_get_device_list(&mut n);
            if list.is_null() {
                return Err(io_err(last_os("ibv_get_device_list")));
            }
            let mut ctx = ptr::null_mut();
            for i in 0..n.max(0) as usize {
                let dev = *list.add(i);
                if CStr::from_ptr(ibv_get_device_name(dev)).to_bytes() == name.as_bytes() {
                    ctx = ibv_open_device(dev);
                    break;
                }
            }
            ibv_free_device_list(list);
            NonNull::new(ctx).ok_or_else(|| io_err(last_os("ibv_open_device")))?
        };
        // From here on `guard` closes the context on every early return.
        let guard = CtxGuard(ctx);
        // SAFETY: ctx is an open context; the attribute struct is plain data written by the call.
        let port = unsafe {
            let mut port: ibv_port_attr = std::mem::zeroed();
            ret("ibv_query_port", ___ibv_query_port(ctx.as_ptr(), PORT, &mut port)).map_err(io_err)?;
            port
        };
        let mut gid_index = None;
        for i in 0..port.gid_tbl_len.clamp(0, 256) {
            // SAFETY: index within the port's GID table; `gid` is plain data written by the call.
            let raw = unsafe {
                let mut gid: ibv_gid = std::mem::zeroed();
                if ibv_query_gid(ctx.as_ptr(), PORT, i, &mut gid) != 0 {
                    continue;
                }
                gid.raw
            };
            if raw == want {
                gid_index = Some(i as u8);
                break;
            }
        }
        let Some(gid_index) = gid_index else {
            return Ok(None);
        };
        // SAFETY: ctx is open; a null PD means failure (errno set).
        let pd = NonNull::new(unsafe { ibv_alloc_pd(ctx.as_ptr()) }).ok_or_else(|| io_err(last_os("ibv_alloc_pd")))?;
        let on_fatal = Arc::new(Mutex::new(HashMap::new()));
        let events = match AsyncEvents::start(ctx, name, on_fatal.clone()) {
            Ok(e) => e,
            Err(e) => {
                // SAFETY: the PD was just allocated and nothing was created from it.
                unsafe { ibv_dealloc_pd(pd.as_ptr()) };
                return Err(io_err(e));
            }
        };
        std::mem::forget(guard);
        Ok(Some(Device {
            ctx,
            pd,
            name: name.to_string(),
            gid: want,
            gid_index,
            active_mtu: port.active_mtu,
            on_fatal,
            events: Some(events),
            host: std::sync::RwLock::new(HostRegions::default()),
            host_registering: Mutex::new(()),
            ranges: std::sync::RwLock::new(Vec::new()),
            windows_bounded: std::sync::OnceLock::new(),
        }))
    }
}

/// Closes a context on an early return from `open_one`.
struct CtxGuard(NonNull<ibv_context>);

impl Drop for CtxGuard {
    fn drop(&mut self) {
        // SAFETY: the context is open and nothing was created from it yet.
        unsafe { ibv_close_device(self.0.as_ptr()) };
    }
}

impl Device {
    /// The protection domain, for registrations owned elsewhere (`regcache`), which hold an
    /// `Arc` of this device so the PD outlives them.
    pub(crate) fn pd_raw(&self) -> *mut ibv_pd {
        self.pd.as_ptr()
    }

    /// Runs `f` when the QP numbered `qpn` gets a fatal asynchronous event (until its QP drops).
    pub(crate) fn on_fatal(&self, qpn: u32, f: OnFatal) {
        self.on_fatal.lock().unwrap_or_else(|p| p.into_inner()).insert(qpn, f);
    }
}

impl Device {
    /// Takes `mem` for the device's life (bounded by [`HOST_REGIONS_MAX`]); its pieces register
    /// on first use ([`Device::host_region`]).
    pub(crate) fn add_host(&self, mem: Arc<dyn crate::PinnedHost>) -> io::Result<()> {
        let mut host = self.host.write().unwrap_or_else(|p| p.into_inner());
        if host.regions.len() >= HOST_REGIONS_MAX {
            return Err(io::Error::other(format!("a device takes at most {HOST_REGIONS_MAX} host regions")));
        }
        let (piece, _) = piece_of(&*mem);
        let pieces = usize::try_from((mem.len_bytes() as u64).div_ceil(piece)).unwrap_or(usize::MAX);
        host.pieces_max = host.pieces_max.saturating_add(pieces);
        let more = host.pieces_max - host.pieces.len();
        host.pieces.try_reserve_exact(more).map_err(|e| io::Error::other(format!("host region pieces: {e}")))?;
        host.regions.push(mem);
        Ok(())
    }

    /// The registered piece of a host region that covers `addr` (and how much of `addr..+len`),
    /// registering it first if this is its first use; `None` outside every host region, or when
    /// the registration failed (the caller then registers per transfer, as without the region).
    ///
    /// A run-time range (registered exactly over one destination) is looked up first: where a
    /// region and a range overlap, the exact registration is the one that keeps a peer inside
    /// the destination on a device whose windows do not.
    pub(crate) fn host_region(&self, addr: u64, len: u64) -> Option<HostRegion> {
        if let Some(r) = self.range_piece(addr, len) {
            return Some(r);
        }
        if let Some(r) = self.host_piece(addr, len) {
            return Some(r);
        }
        let mem = {
            let host = self.host.read().unwrap_or_else(|p| p.into_inner());
            host.regions
                .iter()
                .find(|m| (m.ptr() as u64..m.ptr() as u64 + m.len_bytes() as u64).contains(&addr))?
                .clone()
        };
        let _one = self.host_registering.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = self.host_piece(addr, len) {
            return Some(r);
        }
        let (piece, unit) = piece_of(&*mem);
        let base = mem.ptr() as u64;
        let start = base + (addr - base) / piece * piece;
        let end = (start + piece).min(base + mem.len_bytes() as u64);
        let access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE | ibv_access_flags::IBV_ACCESS_MW_BIND;
        let t0 = std::time::Instant::now();
        // SAFETY: `PinnedHost` promises the region stays valid at a fixed address while `mem`
        // lives; the piece keeps `mem` and is deregistered (dropped) before it.
        let mr = unsafe { ibv_reg_mr(self.pd.as_ptr(), start as *mut _, (end - start) as usize, access.0 as i32) };
        let Some(mr) = NonNull::new(mr) else {
            let e = last_os("ibv_reg_mr (host region piece)");
            tracing::warn!(device = %self.name, error = %e, "rdma: host region piece not registered; registering per transfer");
            return None;
        };
        tracing::debug!(device = %self.name, bytes = end - start, took_ms = t0.elapsed().as_millis() as u64, "rdma: host region piece registered");
        let piece = HostMr { mr, start, end, unit, _mem: mem };
        let mut host = self.host.write().unwrap_or_else(|p| p.into_inner());
        // Never past the reservation: one piece per piece-sized step of a region, each registered
        // once (under `host_registering`, after the lookup above missed it).
        if host.pieces.len() >= host.pieces_max {
            tracing::warn!(device = %self.name, "rdma: host region pieces at their bound; registering per transfer");
            return None;
        }
        let at = host.pieces.partition_point(|p| p.start < start);
        host.pieces.insert(at, piece);
        drop(host);
        self.host_piece(addr, len)
    }

    /// Registers `ptr..+len` for local access and window binding (a peer writes it only through
    /// a window granted for one transfer), listed for [`Device::host_region`] until the guard
    /// drops.
    ///
    /// # Safety
    /// `ptr..+len` must be valid, at a fixed address, until the guard drops.
    pub(crate) unsafe fn register_range(self: &Arc<Self>, ptr: *mut u8, len: usize) -> io::Result<RangeReg> {
        let access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE | ibv_access_flags::IBV_ACCESS_MW_BIND;
        // SAFETY (caller): the range outlives the registration.
        let mr = unsafe { ibv_reg_mr(self.pd.as_ptr(), ptr.cast(), len, access.0 as i32) };
        let mr = NonNull::new(mr).ok_or_else(|| last_os("ibv_reg_mr (run-time range)"))?;
        let start = ptr as u64;
        let mut ranges = self.ranges.write().unwrap_or_else(|p| p.into_inner());
        let at = ranges.partition_point(|r| r.start < start);
        ranges.insert(at, RangeMr { mr, start, end: start + len as u64 });
        Ok(RangeReg { dev: self.clone(), mr })
    }

    /// The run-time range that covers `addr`.
    fn range_piece(&self, addr: u64, len: u64) -> Option<HostRegion> {
        let ranges = self.ranges.read().unwrap_or_else(|p| p.into_inner());
        let i = ranges.partition_point(|r| r.start <= addr).checked_sub(1)?;
        let r = &ranges[i];
        (addr < r.end && len > 0).then(|| HostRegion {
            mr: r.mr.as_ptr(),
            // SAFETY: registered while listed.
            lkey: unsafe { r.mr.as_ref().lkey },
            covers: len.min(r.end - addr),
            range: (r.start, r.end),
            unit: false,
        })
    }

    /// The piece registered already that covers `addr`.
    fn host_piece(&self, addr: u64, len: u64) -> Option<HostRegion> {
        let host = self.host.read().unwrap_or_else(|p| p.into_inner());
        let i = host.pieces.partition_point(|p| p.start <= addr).checked_sub(1)?;
        let p = &host.pieces[i];
        (addr < p.end && len > 0).then(|| HostRegion {
            mr: p.mr.as_ptr(),
            // SAFETY: registered for the device's life.
            lkey: unsafe { p.mr.as_ref().lkey },
            covers: len.min(p.end - addr),
            range: (p.start, p.end),
            unit: p.unit,
        })
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // Deregistered (`HostMr::drop`) before the PD below is deallocated.
        self.host.get_mut().unwrap_or_else(|p| p.into_inner()).pieces.clear();
        if let Some(mut ev) = self.events.take() {
            ev.stop.store(true, Ordering::Release);
            ev.bell.ring();
            if let Some(t) = ev.thread.take() {
                let _ = t.join();
            }
        }
        // SAFETY: every QP, CQ and MR holds an Arc<Device>, so all are gone: PD then context.
        unsafe {
            ibv_dealloc_pd(self.pd.as_ptr());
            ibv_close_device(self.ctx.as_ptr());
        }
    }
}

/// A completion queue with its own completion channel (for parking).
pub(crate) struct Cq {
    cq: NonNull<ibv_cq>,
    channel: NonNull<ibv_comp_channel>,
    _dev: Arc<Device>,
}

// SAFETY: owned handles to thread-safe verbs objects.
unsafe impl Send for Cq {}
// SAFETY: as above.
unsafe impl Sync for Cq {}

impl Cq {
    pub(crate) fn new(dev: &Arc<Device>, entries: u32) -> io::Result<Cq> {
        // SAFETY: the context is open; null return means failure. The channel's fd is made
        // non-blocking so a spurious wake-up never blocks in ibv_get_cq_event.
        unsafe {
            let channel = NonNull::new(ibv_create_comp_channel(dev.ctx.as_ptr()))
                .ok_or_else(|| last_os("ibv_create_comp_channel"))?;
            let fd = channel.as_ref().fd;
            let flags = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
            let cq = ibv_create_cq(dev.ctx.as_ptr(), entries as i32, ptr::null_mut(), channel.as_ptr(), 0);
            let Some(cq) = NonNull::new(cq) else {
                let e = last_os("ibv_create_cq");
                ibv_destroy_comp_channel(channel.as_ptr());
                return Err(e);
            };
            Ok(Cq { cq, channel, _dev: dev.clone() })
        }
    }

    /// Moves up to `out.len()` completions into `out`, entries nobody needs to initialise (a
    /// busy-polling loop calls this for every look at the CQ: zeroing a batch each time would
    /// cost more than the poll); returns the completions taken.
    pub(crate) fn poll<'a>(&self, out: &'a mut [std::mem::MaybeUninit<ibv_wc>]) -> io::Result<&'a [ibv_wc]> {
        // SAFETY: `out` has room for `out.len()` entries; the provider writes the first `n`.
        let n = unsafe { ibv_poll_cq(self.cq.as_ptr(), out.len() as i32, out.as_mut_ptr().cast()) };
        if n < 0 {
            return Err(io::Error::other("ibv_poll_cq failed"));
        }
        // SAFETY: the provider initialised the first `n` (≤ out.len()) entries.
        Ok(unsafe { std::slice::from_raw_parts(out.as_ptr().cast::<ibv_wc>(), n as usize) })
    }

    /// Asks for one event on the channel at the next completion.
    pub(crate) fn arm(&self) -> io::Result<()> {
        // SAFETY: valid CQ.
        ret("ibv_req_notify_cq", unsafe { ibv_req_notify_cq(self.cq.as_ptr(), 0) })
    }

    /// The channel's descriptor, readable when an armed CQ got a completion.
    pub(crate) fn fd(&self) -> RawFd {
        // SAFETY: the channel lives as long as self.
        unsafe { self.channel.as_ref().fd }
    }

    /// Consumes and acknowledges a pending channel event, if any (non-blocking).
    pub(crate) fn take_event(&self) {
        let mut cq = ptr::null_mut();
        let mut ctx = ptr::null_mut();
        // SAFETY: valid channel (non-blocking fd); an event got is acknowledged at once, as
        // ibv_destroy_cq requires.
        unsafe {
            if ibv_get_cq_event(self.channel.as_ptr(), &mut cq, &mut ctx) == 0 {
                ibv_ack_cq_events(cq, 1);
            }
        }
    }

    fn raw(&self) -> *mut ibv_cq {
        self.cq.as_ptr()
    }
}

impl Drop for Cq {
    fn drop(&mut self) {
        // SAFETY: the QP using this CQ holds an Arc<Cq> and is gone; events were acknowledged.
        unsafe {
            ibv_destroy_cq(self.cq.as_ptr());
            ibv_destroy_comp_channel(self.channel.as_ptr());
        }
    }
}

/// Memory we own (anonymous, page-aligned, zeroed) registered with the device.
pub(crate) struct Mr {
    mr: NonNull<ibv_mr>,
    map: memmap2::MmapMut,
    _dev: Arc<Device>,
}

// SAFETY: owned registration and mapping; concurrent access to the bytes is the owner's protocol.
unsafe impl Send for Mr {}
// SAFETY: as above.
unsafe impl Sync for Mr {}

impl Mr {
    /// Allocates `len` bytes and registers them; `remote_write`: the peer may RDMA-write them.
    pub(crate) fn new(dev: &Arc<Device>, len: usize, remote_write: bool) -> io::Result<Mr> {
        let mut access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE;
        if remote_write {
            access |= ibv_access_flags::IBV_ACCESS_REMOTE_WRITE;
        }
        Self::with_access(dev, len, access)
    }

    /// Allocates `len` bytes and registers them with `access`.
    pub(crate) fn with_access(dev: &Arc<Device>, len: usize, access: ibv_access_flags) -> io::Result<Mr> {
        let mut map = memmap2::MmapMut::map_anon(len.max(1))?;
        // SAFETY: the mapping outlives the registration (both owned here; the MR is deregistered
        // first in Drop) and is not unmapped or remapped while registered.
        let mr = unsafe { ibv_reg_mr(dev.pd.as_ptr(), map.as_mut_ptr().cast(), map.len(), access.0 as i32) };
        let mr = NonNull::new(mr).ok_or_else(|| last_os("ibv_reg_mr"))?;
        Ok(Mr { mr, map, _dev: dev.clone() })
    }

    pub(crate) fn addr(&self) -> u64 {
        self.map.as_ptr() as u64
    }
    pub(crate) fn raw(&self) -> *mut ibv_mr {
        self.mr.as_ptr()
    }
    pub(crate) fn ptr(&self) -> *mut u8 {
        self.map.as_ptr() as *mut u8
    }
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
    pub(crate) fn lkey(&self) -> u32 {
        // SAFETY: registered for self's life.
        unsafe { self.mr.as_ref().lkey }
    }
    pub(crate) fn rkey(&self) -> u32 {
        // SAFETY: as above.
        unsafe { self.mr.as_ref().rkey }
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: no work request that uses this MR can complete after its QP is destroyed, and
        // every QP that used it was dropped by its owning half before this MR (field order).
        unsafe { ibv_dereg_mr(self.mr.as_ptr()) };
    }
}

/// What a peer tells us about one of its QPs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QpPeer {
    pub(crate) qpn: u32,
    pub(crate) psn: u32,
    pub(crate) gid: [u8; 16],
    pub(crate) mtu: u32,
}

/// A reliable-connected queue pair whose send and receive completions go to one CQ.
pub(crate) struct Qp {
    qp: NonNull<ibv_qp>,
    pub(crate) cq: Arc<Cq>,
    dev: Arc<Device>,
    pub(crate) max_inline: u32,
    pub(crate) psn: u32,
}

// SAFETY: owned handle; verbs are thread-safe.
unsafe impl Send for Qp {}
// SAFETY: as above.
unsafe impl Sync for Qp {}

/// Queue sizes of one QP.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QpSizes {
    pub(crate) send_wr: u32,
    pub(crate) recv_wr: u32,
    pub(crate) inline_bytes: u32,
}

impl Qp {
    /// Creates the QP and moves it to INIT (receives may be posted from there).
    pub(crate) fn new(dev: &Arc<Device>, cq: Arc<Cq>, sizes: QpSizes, psn: u32) -> io::Result<Qp> {
        // SAFETY: PD and CQ are live (Arcs held by the QP); init_attr is plain data.
        let qp = unsafe {
            let mut init: ibv_qp_init_attr = std::mem::zeroed();
            init.send_cq = cq.raw();
            init.recv_cq = cq.raw();
            init.qp_type = ibv_qp_type::IBV_QPT_RC;
            init.cap = ibv_qp_cap {
                max_send_wr: sizes.send_wr,
                max_recv_wr: sizes.recv_wr,
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: sizes.inline_bytes,
            };
            let qp = ibv_create_qp(dev.pd.as_ptr(), &mut init);
            // Retry without inline data if the provider offers none.
            let qp = if qp.is_null() && sizes.inline_bytes > 0 {
                init.cap.max_inline_data = 0;
                ibv_create_qp(dev.pd.as_ptr(), &mut init)
            } else {
                qp
            };
            (NonNull::new(qp).ok_or_else(|| last_os("ibv_create_qp"))?, init.cap.max_inline_data)
        };
        let qp = Qp { qp: qp.0, cq, dev: dev.clone(), max_inline: qp.1, psn };
        // SAFETY: attr is plain data; the mask names exactly the fields set.
        unsafe {
            let mut a: ibv_qp_attr = std::mem::zeroed();
            a.qp_state = ibv_qp_state::IBV_QPS_INIT;
            a.pkey_index = 0;
            a.port_num = PORT;
            a.qp_access_flags = ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0;
            let mask = ibv_qp_attr_mask::IBV_QP_STATE
                | ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
                | ibv_qp_attr_mask::IBV_QP_PORT
                | ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS;
            ret("ibv_modify_qp(INIT)", ibv_modify_qp(qp.qp.as_ptr(), &mut a, mask.0 as i32))?;
        }
        Ok(qp)
    }

    pub(crate) fn qpn(&self) -> u32 {
        // SAFETY: live QP.
        unsafe { self.qp.as_ref().qp_num }
    }

    /// INIT → RTR → RTS against the peer's QP.
    pub(crate) fn connect(&self, peer: &QpPeer) -> io::Result<()> {
        let mtu = self.dev.active_mtu.min(peer.mtu).max(ibv_mtu::IBV_MTU_256);
        // SAFETY: attr is plain data; each mask names the fields set for that transition.
        unsafe {
            let mut a: ibv_qp_attr = std::mem::zeroed();
            a.qp_state = ibv_qp_state::IBV_QPS_RTR;
            a.path_mtu = mtu;
            a.dest_qp_num = peer.qpn;
            a.rq_psn = peer.psn;
            a.max_dest_rd_atomic = 1;
            a.min_rnr_timer = 12;
            a.ah_attr.is_global = 1;
            a.ah_attr.grh.dgid.raw = peer.gid;
            a.ah_attr.grh.sgid_index = self.dev.gid_index;
            a.ah_attr.grh.hop_limit = HOP_LIMIT;
            a.ah_attr.port_num = PORT;
            let mask = ibv_qp_attr_mask::IBV_QP_STATE
                | ibv_qp_attr_mask::IBV_QP_AV
                | ibv_qp_attr_mask::IBV_QP_PATH_MTU
                | ibv_qp_attr_mask::IBV_QP_DEST_QPN
                | ibv_qp_attr_mask::IBV_QP_RQ_PSN
                | ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
                | ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER;
            ret("ibv_modify_qp(RTR)", ibv_modify_qp(self.qp.as_ptr(), &mut a, mask.0 as i32))?;
            let mut a: ibv_qp_attr = std::mem::zeroed();
            a.qp_state = ibv_qp_state::IBV_QPS_RTS;
            // 4.096 µs × 2^14 ≈ 67 ms per try, 7 retries (~0.5 s before a connection fails). A
            // longer try (2^17, 0.54 s) was tried for long writes on a loaded soft-RoCE VM, but
            // then a lost packet stalls its connection half a second (suspected when `server_sessions
            // faults_rdma` ran out its 1 s lease between reconnects). A dead peer is seen at once
            // through the rendezvous socket either way.
            a.timeout = 14;
            a.retry_cnt = 7;
            // 7: retry receiver-not-ready forever; the credit protocol keeps receives posted, so
            // an RNR is only ever a peer that is slow to repost, never a lost message.
            a.rnr_retry = 7;
            a.sq_psn = self.psn;
            a.max_rd_atomic = 1;
            let mask = ibv_qp_attr_mask::IBV_QP_STATE
                | ibv_qp_attr_mask::IBV_QP_TIMEOUT
                | ibv_qp_attr_mask::IBV_QP_RETRY_CNT
                | ibv_qp_attr_mask::IBV_QP_RNR_RETRY
                | ibv_qp_attr_mask::IBV_QP_SQ_PSN
                | ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC;
            ret("ibv_modify_qp(RTS)", ibv_modify_qp(self.qp.as_ptr(), &mut a, mask.0 as i32))
        }
    }

    /// Posts one RDMA WRITE (with immediate `imm` when given) of `len` bytes at local `addr`
    /// (registered under `lkey`, or sent inline) to `remote_addr` under `rkey`.
    ///
    /// # Safety
    /// Unless `inline`, the `len` bytes at `addr` must stay valid and unmodified until the NIC
    /// has read them (this work request, or a later signalled one, completed); with `inline`
    /// they are copied during the call. `remote_addr..+len` must lie in the peer's region.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn post_write(
        &self,
        wr_id: u64,
        addr: u64,
        len: u32,
        lkey: u32,
        remote_addr: u64,
        rkey: u32,
        imm: Option<u32>,
        signaled: bool,
    ) -> io::Result<()> {
        let inline = len > 0 && len <= self.max_inline;
        let mut sge = ibv_sge { addr, length: len, lkey };
        // SAFETY (caller): buffer lifetime as documented; wr and sge live across the call.
        unsafe {
            let mut wr: ibv_send_wr = std::mem::zeroed();
            wr.wr_id = wr_id;
            wr.sg_list = &mut sge;
            wr.num_sge = if len == 0 { 0 } else { 1 };
            wr.opcode = match imm {
                Some(_) => ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM,
                None => ibv_wr_opcode::IBV_WR_RDMA_WRITE,
            };
            if let Some(imm) = imm {
                wr.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
            }
            let mut flags = ibv_send_flags(0);
            if signaled {
                flags |= ibv_send_flags::IBV_SEND_SIGNALED;
            }
            if inline {
                flags |= ibv_send_flags::IBV_SEND_INLINE;
            }
            wr.send_flags = flags.0;
            wr.wr.rdma.remote_addr = remote_addr;
            wr.wr.rdma.rkey = rkey;
            let mut bad = ptr::null_mut();
            ret("ibv_post_send(write)", ibv_post_send(self.qp.as_ptr(), &mut wr, &mut bad))
        }
    }

    /// Moves the QP to the error state: it takes no more incoming writes and flushes its queues.
    pub(crate) fn to_error(&self) {
        // SAFETY: attr is plain data; the mask names the one field set.
        unsafe {
            let mut a: ibv_qp_attr = std::mem::zeroed();
            a.qp_state = ibv_qp_state::IBV_QPS_ERR;
            ibv_modify_qp(self.qp.as_ptr(), &mut a, ibv_qp_attr_mask::IBV_QP_STATE.0 as i32);
        }
    }

    /// Posts a type-2 bind of `mw` over `addr..+len` of the host region `region`, for remote
    /// writes, under the key `rkey` (the window's next key: [`Mw::next_rkey`]).
    ///
    /// # Safety
    /// Until the window is invalidated (a later [`Qp::post_local_inv`] completed) or the QP is
    /// destroyed, the peer may write `addr..+len`: it must be memory nothing else reads or writes
    /// meanwhile, inside `region`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn post_bind_mw(
        &self,
        wr_id: u64,
        mw: &mut Mw,
        rkey: u32,
        region: HostRegion,
        addr: u64,
        len: u64,
        signaled: bool,
    ) -> io::Result<()> {
        // SAFETY (caller): the range is the peer's alone until invalidated; wr lives across the call.
        unsafe {
            let mut wr: ibv_send_wr = std::mem::zeroed();
            wr.wr_id = wr_id;
            wr.opcode = ibv_wr_opcode::IBV_WR_BIND_MW;
            wr.send_flags = if signaled { ibv_send_flags::IBV_SEND_SIGNALED.0 } else { 0 };
            wr.bind_mw_tso_union.bind_mw = bind_mw_t {
                mw: mw.mw.as_ptr(),
                rkey,
                bind_info: ibv_mw_bind_info {
                    mr: region.mr,
                    addr,
                    length: len,
                    mw_access_flags: (ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
                        | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE)
                        .0,
                },
            };
            let mut bad = ptr::null_mut();
            ret("ibv_post_send(bind_mw)", ibv_post_send(self.qp.as_ptr(), &mut wr, &mut bad))?;
            // The provider names the window by the key it holds now (the kernel checks it), and
            // only a type-1 bind updates it: the next bind or invalidation uses the new key.
            (*mw.mw.as_ptr()).rkey = rkey;
        }
        Ok(())
    }

    /// Posts a local invalidate of `rkey` (a window bound by [`Qp::post_bind_mw`]): once it
    /// completes, the peer's writes under that key are refused.
    pub(crate) fn post_local_inv(&self, wr_id: u64, rkey: u32) -> io::Result<()> {
        // SAFETY: touches no memory; wr lives across the call.
        unsafe {
            let mut wr: ibv_send_wr = std::mem::zeroed();
            wr.wr_id = wr_id;
            wr.opcode = ibv_wr_opcode::IBV_WR_LOCAL_INV;
            wr.send_flags = ibv_send_flags::IBV_SEND_SIGNALED.0;
            wr.imm_data_invalidated_rkey_union.invalidated_rkey = rkey;
            let mut bad = ptr::null_mut();
            ret("ibv_post_send(local_inv)", ibv_post_send(self.qp.as_ptr(), &mut wr, &mut bad))
        }
    }

    /// Posts one SEND of `bytes`, inline (the bytes are copied during the call), with no buffer
    /// to keep alive. `bytes.len()` must not exceed `max_inline`.
    pub(crate) fn post_send_inline(&self, wr_id: u64, bytes: &[u8], signaled: bool) -> io::Result<()> {
        assert!(bytes.len() as u32 <= self.max_inline, "inline send larger than the QP allows");
        let mut sge = ibv_sge { addr: bytes.as_ptr() as u64, length: bytes.len() as u32, lkey: 0 };
        // SAFETY: inline: the provider copies the bytes before returning; wr and sge live across
        // the call.
        unsafe {
            let mut wr: ibv_send_wr = std::mem::zeroed();
            wr.wr_id = wr_id;
            wr.sg_list = &mut sge;
            wr.num_sge = 1;
            wr.opcode = ibv_wr_opcode::IBV_WR_SEND;
            let mut flags = ibv_send_flags::IBV_SEND_INLINE;
            if signaled {
                flags |= ibv_send_flags::IBV_SEND_SIGNALED;
            }
            wr.send_flags = flags.0;
            let mut bad = ptr::null_mut();
            ret("ibv_post_send(send)", ibv_post_send(self.qp.as_ptr(), &mut wr, &mut bad))
        }
    }

    /// Posts one receive of up to `len` bytes at `addr` (`len` 0: for WRITE_WITH_IMM only).
    ///
    /// # Safety
    /// `addr..+len` must be registered under `lkey` and stay valid until the receive completes
    /// or the QP is destroyed.
    pub(crate) unsafe fn post_recv(&self, wr_id: u64, addr: u64, len: u32, lkey: u32) -> io::Result<()> {
        let mut sge = ibv_sge { addr, length: len, lkey };
        // SAFETY (caller): buffer lifetime as documented; wr and sge live across the call.
        unsafe {
            let mut wr =
                ibv_recv_wr { wr_id, next: ptr::null_mut(), sg_list: &mut sge, num_sge: if len == 0 { 0 } else { 1 } };
            let mut bad = ptr::null_mut();
            ret("ibv_post_recv", ibv_post_recv(self.qp.as_ptr(), &mut wr, &mut bad))
        }
    }
}

impl Qp {
    /// Posts `n` zero-length receives (for WRITE_WITH_IMM, which consumes no buffer), chained
    /// [`RECV_CHAIN`] per call: one provider call per chain instead of one per receive.
    pub(crate) fn post_empty_recvs(&self, n: u64) -> io::Result<()> {
        let mut left = n;
        while left > 0 {
            let k = left.min(RECV_CHAIN as u64) as usize;
            let mut wrs: [ibv_recv_wr; RECV_CHAIN] = std::array::from_fn(|_| ibv_recv_wr {
                wr_id: 0,
                next: ptr::null_mut(),
                sg_list: ptr::null_mut(),
                num_sge: 0,
            });
            let base = wrs.as_mut_ptr();
            for i in 0..k - 1 {
                // SAFETY: i + 1 < k <= RECV_CHAIN: both entries are inside `wrs`, which is only
                // reached through `base` from here on.
                unsafe { (*base.add(i)).next = base.add(i + 1) };
            }
            let mut bad = ptr::null_mut();
            // SAFETY: zero-length receives hand no memory to the NIC; the chain lives across the call.
            ret("ibv_post_recv", unsafe { ibv_post_recv(self.qp.as_ptr(), base, &mut bad) })?;
            left -= k as u64;
        }
        Ok(())
    }
}

/// Receives one [`Qp::post_empty_recvs`] call posts at most.
pub(crate) const RECV_CHAIN: usize = 16;

impl Drop for Qp {
    fn drop(&mut self) {
        let qpn = self.qpn();
        self.dev.on_fatal.lock().unwrap_or_else(|p| p.into_inner()).remove(&qpn);
        // SAFETY: the QP is owned here; destroying it flushes its work requests, after which no
        // buffer of ours is touched by the NIC.
        unsafe { ibv_destroy_qp(self.qp.as_ptr()) };
    }
}

/// A type-2 memory window: bound by its QP over one granted range of a host region, then
/// invalidated, so a peer's access lasts exactly one transfer without registering anything.
pub(crate) struct Mw {
    mw: NonNull<ibv_mw>,
    /// The key of the current (or last) binding; each bind takes the next.
    rkey: u32,
    _dev: Arc<Device>,
}

// SAFETY: owned handle to a thread-safe verbs object.
unsafe impl Send for Mw {}

impl Mw {
    /// Allocates a type-2 window; an error where the device or provider has none.
    pub(crate) fn new(dev: &Arc<Device>) -> io::Result<Mw> {
        // SAFETY: the PD is live (the window holds its device).
        let mw = unsafe { ibv_alloc_mw(dev.pd.as_ptr(), ibv_mw_type::IBV_MW_TYPE_2) }
            .ok_or_else(|| io::Error::other("the provider has no memory windows"))?;
        let mw = NonNull::new(mw).ok_or_else(|| last_os("ibv_alloc_mw"))?;
        // SAFETY: just allocated.
        let rkey = unsafe { mw.as_ref().rkey };
        Ok(Mw { mw, rkey, _dev: dev.clone() })
    }

    /// Takes the key for the next binding (same index, next 8-bit tag, as `ibv_inc_rkey`), so a
    /// key from an earlier grant never matches again until the tag wraps.
    pub(crate) fn next_rkey(&mut self) -> u32 {
        self.rkey = (self.rkey & 0xffff_ff00) | (self.rkey.wrapping_add(1) & 0xff);
        self.rkey
    }
}

impl Drop for Mw {
    fn drop(&mut self) {
        // SAFETY: owned. Deallocating a bound window invalidates it (the NIC refuses its key from
        // then on); owners drop it before the QP it was bound through (see `RdmaRx`).
        unsafe { ibv_dealloc_mw(self.mw.as_ptr()) };
    }
}

pub(crate) use rdma_sys::{ibv_access_flags, ibv_wc, ibv_wc_opcode, ibv_wc_status};

/// A registration of memory the caller lends for `'a` (a frame's bulk data, a receive buffer):
/// the borrow outlives the registration, which is dropped (deregistered) first, so the NIC can
/// never touch the memory after it is given back. One per granted transfer (see `rendezvous`).
pub(crate) struct LentMr<'a> {
    mr: NonNull<ibv_mr>,
    _mem: std::marker::PhantomData<&'a mut [u8]>,
    _dev: Arc<Device>,
}

impl<'a> LentMr<'a> {
    /// Registers `bytes` for the local NIC to read (the source of RDMA WRITEs). No remote access.
    pub(crate) fn for_reading(dev: &Arc<Device>, bytes: &'a [u8]) -> io::Result<LentMr<'a>> {
        // SAFETY: access 0: the NIC only reads the range, for as long as the borrow `'a` keeps it
        // alive (the registration is dropped inside it).
        unsafe { Self::register(dev, bytes.as_ptr() as *mut u8, bytes.len(), 0) }
    }

    /// Registers `bytes` for the peer to RDMA-WRITE into (exactly this range: its rkey is the grant).
    pub(crate) fn for_remote_writing(dev: &Arc<Device>, bytes: &'a mut [u8]) -> io::Result<LentMr<'a>> {
        let access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE;
        // SAFETY: the range is borrowed mutably for `'a`, so nothing else reads or writes it while
        // the peer may; the registration is dropped inside the borrow.
        unsafe { Self::register(dev, bytes.as_mut_ptr(), bytes.len(), access.0 as i32) }
    }

    /// Registers `len` bytes at `offset` of the dma-buf `fd` (device memory) for the peer to
    /// RDMA-WRITE into, addressed from `iova`.
    ///
    /// # Safety
    /// Nothing else may touch the exported range while the registration lives.
    pub(crate) unsafe fn for_dmabuf(
        dev: &Arc<Device>,
        fd: std::os::fd::BorrowedFd<'a>,
        offset: u64,
        len: usize,
        iova: u64,
    ) -> io::Result<LentMr<'a>> {
        use std::os::fd::AsRawFd;
        let access = ibv_access_flags::IBV_ACCESS_LOCAL_WRITE | ibv_access_flags::IBV_ACCESS_REMOTE_WRITE;
        // SAFETY: the descriptor is borrowed for `'a`, the registration dropped inside it; the
        // caller keeps the memory to the NIC alone meanwhile.
        let mr = unsafe { ibv_reg_dmabuf_mr(dev.pd.as_ptr(), offset, len, iova, fd.as_raw_fd(), access.0 as i32) };
        let mr = NonNull::new(mr).ok_or_else(|| last_os("ibv_reg_dmabuf_mr"))?;
        Ok(LentMr { mr, _mem: std::marker::PhantomData, _dev: dev.clone() })
    }

    /// # Safety
    /// `ptr..+len` must stay valid (and, with write access, unaliased) for `'a`.
    unsafe fn register(dev: &Arc<Device>, ptr: *mut u8, len: usize, access: i32) -> io::Result<LentMr<'a>> {
        // SAFETY (caller): the range is valid for the registration's life.
        let mr = unsafe { ibv_reg_mr(dev.pd.as_ptr(), ptr.cast(), len, access) };
        let mr = NonNull::new(mr).ok_or_else(|| last_os("ibv_reg_mr (lent buffer)"))?;
        Ok(LentMr { mr, _mem: std::marker::PhantomData, _dev: dev.clone() })
    }

    pub(crate) fn lkey(&self) -> u32 {
        // SAFETY: registered for self's life.
        unsafe { self.mr.as_ref().lkey }
    }
    pub(crate) fn rkey(&self) -> u32 {
        // SAFETY: as above.
        unsafe { self.mr.as_ref().rkey }
    }
}

impl Drop for LentMr<'_> {
    fn drop(&mut self) {
        // SAFETY: deregistering revokes the NIC's (and the peer's) access; the memory itself is
        // still borrowed until after this returns.
        unsafe { ibv_dereg_mr(self.mr.as_ptr()) };
    }
}

// SAFETY: an owned registration; the memory it covers is borrowed by whoever holds it.
unsafe impl Send for LentMr<'_> {}
