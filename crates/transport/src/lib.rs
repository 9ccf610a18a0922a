//! Transports carry frames (see `djinn-proto`) between a client and the server. One trait pair
//! ([`FrameTx`], [`FrameRx`]) covers every implementation; each lives in a sibling module:
//! `tcp` (io_uring, plain-socket fallback), `shm` (memfd region + rings + doorbell) and `rdma`
//! (ibverbs, with the `rdma` feature). [`recommended`] picks the implementation for a URL.
//!
//! The shape every transport shares is the RDMA one: the sender places bytes into memory the
//! receiver owns (a socket buffer, a shared region, a registered MR) and rings a doorbell; the
//! receiver copies the header and metadata into private memory, validates them, and only then
//! moves bulk data straight into its destination buffer.

pub mod conn;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod recommended;
pub mod regbuf;
mod ring_rx;
pub mod shm;
pub mod tcp;

pub use conn::{
    ByteCounters, Connection, ConnectionClose, DmaBufDst, FrameRx, FrameTx, HostRegistrar, HostRegistration, Listener,
    ListenerStop, OutFrame, PinnedHost, RegCacheStats, Registration, RxHead, SpinGate, TransportError,
    TransportOptions, TrySend, UnreadProbe, WaitMode,
};
pub use recommended::{connect, listen};
pub use regbuf::RegBuf;

/// Whether this build carries the `rdma://` transport (the `rdma` feature).
pub const RDMA_BUILT: bool = cfg!(feature = "rdma");
