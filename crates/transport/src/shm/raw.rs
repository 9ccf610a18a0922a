//! A client that performs only the rendezvous and then hands out raw access to the region and
//! the doorbells. It exists to play a misbehaving peer in tests and tools (garbage headers,
//! indices out of range, oversized lengths): the server must answer those with typed errors.
//! Nothing here is needed to use the transport.

use std::sync::atomic::Ordering;

use super::region::{DirOffsets, Direction, Layout};
use super::ClientParts;
use crate::TransportError;

/// The client side of a region with no protocol logic on top.
pub struct RawClient {
    parts: ClientParts,
}

impl RawClient {
    /// Connects to `shm://NAME` and maps the region the server hands over.
    pub fn connect(name: &str) -> Result<RawClient, TransportError> {
        Ok(RawClient { parts: super::rendezvous(name)? })
    }

    pub fn layout(&self) -> Layout {
        *self.parts.region.layout()
    }

    /// Offsets of the client → server (request) direction.
    pub fn requests(&self) -> DirOffsets {
        self.layout().dir(Direction::ToServer)
    }

    /// Offsets of the server → client (reply) direction.
    pub fn replies(&self) -> DirOffsets {
        self.layout().dir(Direction::ToClient)
    }

    /// Writes bytes at `off` (panics outside the region: a test bug, not peer input).
    pub fn write(&self, off: usize, bytes: &[u8]) {
        self.parts.region.write(off, bytes);
    }

    /// Reads bytes at `off`.
    pub fn read(&self, off: usize, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.parts.region.read(off, &mut out);
        out
    }

    /// Stores a 64-bit index word with Release (as a well-behaved peer would).
    pub fn store_u64(&self, off: usize, value: u64) {
        self.parts.region.u64_at(off).store(value, Ordering::Release);
    }

    pub fn load_u64(&self, off: usize) -> u64 {
        self.parts.region.u64_at(off).load(Ordering::Acquire)
    }

    pub fn store_u32(&self, off: usize, value: u32) {
        self.parts.region.u32_at(off).store(value, Ordering::Release);
    }

    /// Rings the doorbell the server's receiving half parks on.
    pub fn ring_server_rx(&self) {
        self.parts.to_server_data.ring();
    }

    /// Rings the doorbell the server's sending half parks on.
    pub fn ring_server_tx(&self) {
        self.parts.to_client_space.ring();
    }
}
