//! Thin RAII wrappers over the Linux calls the shm transport needs: eventfd doorbells, sealed
//! memfd regions, fd passing with `SCM_RIGHTS`, and `poll` on a doorbell plus the peer's socket.
//!
//! Every raw descriptor is wrapped in an `OwnedFd` the moment the kernel hands it out, so an early
//! return or a panic can never leak one.

use std::fs::File;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Most descriptors one rendezvous message carries (region + four doorbells).
pub(crate) const FDS_PER_MESSAGE_MAX: usize = 8;

/// An eventfd used as a doorbell: the ringing side adds 1, the parked side polls it and drains it.
/// Non-blocking, so draining never waits.
#[derive(Debug)]
pub(crate) struct EventFd(OwnedFd);

impl EventFd {
    pub(crate) fn new() -> io::Result<EventFd> {
        // SAFETY: eventfd takes no pointers; a non-negative return is a fresh descriptor we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is valid and owned by nobody else.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    pub(crate) fn from_owned(fd: OwnedFd) -> EventFd {
        EventFd(fd)
    }

    pub(crate) fn fd(&self) -> &OwnedFd {
        &self.0
    }

    /// Wakes whoever polls this doorbell. Errors are ignored: the only possible one on a valid
    /// eventfd is a saturated counter (EAGAIN), which already means "ringing".
    pub(crate) fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local into our own descriptor.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), size_of::<u64>()) };
    }

    /// Resets the counter so the next poll waits for a new ring.
    pub(crate) fn drain(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live local; non-blocking, so it cannot wait.
        let _ = unsafe { libc::read(self.0.as_raw_fd(), (&mut value as *mut u64).cast(), size_of::<u64>()) };
    }
}

/// Creates an anonymous shared-memory file of `len` bytes and seals its size, so a peer holding
/// the descriptor can neither shrink it (which would make our accesses fault with SIGBUS) nor grow it.
pub(crate) fn sealed_memfd(len: u64) -> io::Result<File> {
    // SAFETY: the name is a NUL-terminated literal; a non-negative return is a fresh descriptor.
    let fd = unsafe { libc::memfd_create(c"djinn-shm".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is valid and owned by nobody else.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(len)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on our own descriptor with integer arguments only.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// The seals on a memfd (`F_GET_SEALS`).
pub(crate) fn seals(file: &File) -> io::Result<i32> {
    // SAFETY: fcntl on a descriptor we own, no pointers.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(seals)
}

/// Control-message buffer, aligned for `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuf([u8; 128]);

// CMSG_SPACE(n) = aligned 16-byte cmsghdr + n rounded up to 8: the buffer must hold the largest message.
const _: () = assert!(16 + (FDS_PER_MESSAGE_MAX * size_of::<RawFd>()).next_multiple_of(8) <= 128);

/// Sends `payload` and `fds` in one message (`SCM_RIGHTS`). The kernel duplicates the descriptors
/// into the peer; ours stay open.
pub(crate) fn send_fds(sock: &impl AsRawFd, payload: &[u8], fds: &[RawFd]) -> io::Result<()> {
    assert!(!payload.is_empty() && fds.len() <= FDS_PER_MESSAGE_MAX);
    let mut cmsg = CmsgBuf([0; 128]);
    let fds_bytes = std::mem::size_of_val(fds);
    let mut iov = libc::iovec { iov_base: payload.as_ptr() as *mut libc::c_void, iov_len: payload.len() };
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure size computation.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(fds_bytes as u32) } as _;
    // SAFETY: msg_control points at our aligned 128-byte buffer, which holds CMSG_SPACE(fds_bytes)
    // (checked by the const assertion above), so CMSG_FIRSTHDR/CMSG_DATA stay inside it and the
    // copy writes exactly `fds_bytes` bytes there.
    unsafe {
        let hdr = libc::CMSG_FIRSTHDR(&msg);
        (*hdr).cmsg_level = libc::SOL_SOCKET;
        (*hdr).cmsg_type = libc::SCM_RIGHTS;
        (*hdr).cmsg_len = libc::CMSG_LEN(fds_bytes as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(hdr), fds_bytes);
    }
    loop {
        // SAFETY: `msg` points at live locals (payload via iov, cmsg buffer) for the whole call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return if n as usize == payload.len() {
                Ok(())
            } else {
                Err(io::Error::new(io::ErrorKind::WriteZero, "short rendezvous message"))
            };
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Receives one message into `payload` plus up to `FDS_PER_MESSAGE_MAX` descriptors (close-on-exec).
/// Returns the payload length and the descriptors, each already owned.
pub(crate) fn recv_fds(sock: &impl AsRawFd, payload: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    let mut cmsg = CmsgBuf([0; 128]);
    let mut iov = libc::iovec { iov_base: payload.as_mut_ptr().cast(), iov_len: payload.len() };
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.0.as_mut_ptr().cast();
    msg.msg_controllen = cmsg.0.len() as _;
    let n = loop {
        // SAFETY: `msg` points at live locals (payload via iov, cmsg buffer) for the whole call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `msg_control` with `msg_controllen` bytes of well-formed control
    // messages inside our buffer; CMSG_FIRSTHDR/NXTHDR walk only within that length. Each SCM_RIGHTS
    // payload holds (cmsg_len - CMSG_LEN(0)) / 4 descriptors that now belong to this process; they are
    // read unaligned and wrapped in OwnedFd at once so none leaks.
    unsafe {
        let mut hdr = libc::CMSG_FIRSTHDR(&msg);
        while !hdr.is_null() {
            if (*hdr).cmsg_level == libc::SOL_SOCKET && (*hdr).cmsg_type == libc::SCM_RIGHTS {
                let data_len = (*hdr).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(hdr);
                for i in 0..data_len / size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.add(i * size_of::<RawFd>()).cast::<RawFd>());
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            hdr = libc::CMSG_NXTHDR(&msg, hdr);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "rendezvous message carried too many descriptors"));
    }
    Ok((n, fds))
}

/// Waits until `doorbell` rings or `sock` reports the peer gone; `timeout_ms` < 0 waits forever.
/// Returns true when the peer is gone. Nothing is ever sent on the socket after the rendezvous,
/// so readability means EOF: the peer process closed the connection or died.
pub(crate) fn poll_doorbell(doorbell: &EventFd, sock: &impl AsRawFd, timeout_ms: i32) -> io::Result<bool> {
    let mut fds = [
        libc::pollfd { fd: doorbell.fd().as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLIN | libc::POLLRDHUP, revents: 0 },
    ];
    // SAFETY: two live pollfd entries.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
    if n < 0 {
        let err = io::Error::last_os_error();
        // Interrupted: the caller re-checks and parks again.
        return if err.kind() == io::ErrorKind::Interrupted { Ok(false) } else { Err(err) };
    }
    Ok(fds[1].revents != 0)
}

/// True when the peer's socket has hung up (non-blocking check, used while busy-polling).
pub(crate) fn peer_gone_now(sock: &impl AsRawFd) -> bool {
    let mut fd = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLIN | libc::POLLRDHUP, revents: 0 };
    // SAFETY: one live pollfd entry, zero timeout.
    let n = unsafe { libc::poll(&mut fd, 1, 0) };
    n > 0 && fd.revents != 0
}

/// Waits until `fd` is readable or `stop` rings. Returns true when `fd` is readable.
pub(crate) fn poll_accept(fd: &impl AsRawFd, stop: &EventFd) -> io::Result<bool> {
    let mut fds = [
        libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: stop.fd().as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    loop {
        // SAFETY: two live pollfd entries.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n >= 0 {
            return Ok(fds[0].revents != 0);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// The process id of the peer of a unix socket (`SO_PEERCRED`), for logs.
pub(crate) fn peer_pid(sock: &impl AsRawFd) -> Option<i32> {
    // SAFETY: ucred is plain data.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(cred.pid)
}
