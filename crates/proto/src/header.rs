//! The fixed frame header. Every frame on every transport starts with one.
//!
//! Invariant: a header is validated (`FrameHeader::validate`) on a private copy before any of its
//! fields are used to size a buffer or index memory.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// "DJN1" read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"DJN1");
/// Protocol version spoken by this build. The handshake negotiates down to a common version.
pub const VERSION: u16 = 1;
/// Size of [`FrameHeader`] on the wire.
pub const HEADER_LEN: usize = core::mem::size_of::<FrameHeader>();
/// Set on every frame that answers a request (same `request_id`, same opcode).
pub const FLAG_REPLY: u16 = 1 << 0;

/// Fixed 32-byte little-endian frame header, parsed in place.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct FrameHeader {
    pub magic: U32,
    pub version: U16,
    pub opcode: U16,
    pub flags: U16,
    /// 0 on requests and successful replies; an error code on failed replies.
    pub status: U16,
    /// Bytes of opcode-specific metadata following the header.
    pub meta_len: U32,
    /// Chosen by the client; many requests may be in flight on one connection.
    pub request_id: U64,
    /// Bytes of bulk data following the metadata.
    pub data_len: U64,
}

const _: () = assert!(HEADER_LEN == 32);

/// Size limits a peer's header is checked against, fixed at start-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub meta_bytes_max: u32,
    pub frame_bytes_max: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            meta_bytes_max: 64 * 1024,
            // Admits a 64 MiB payload plus its metadata.
            frame_bytes_max: 64 * 1024 * 1024 + 64 * 1024 + HEADER_LEN as u64,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("frame shorter than the {HEADER_LEN}-byte header ({0} bytes)")]
    Truncated(usize),
    #[error("bad magic {0:#010x}")]
    BadMagic(u32),
    #[error("unsupported protocol version {0} (this build speaks {VERSION})")]
    BadVersion(u16),
    #[error("metadata of {len} bytes exceeds the limit of {max}")]
    MetaTooLarge { len: u32, max: u32 },
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge { len: u64, max: u64 },
}

impl FrameHeader {
    pub fn new(opcode: u16, flags: u16, request_id: u64, meta_len: u32, data_len: u64) -> Self {
        FrameHeader {
            magic: MAGIC.into(),
            version: VERSION.into(),
            opcode: opcode.into(),
            flags: flags.into(),
            status: 0.into(),
            meta_len: meta_len.into(),
            request_id: request_id.into(),
            data_len: data_len.into(),
        }
    }

    /// Copies a header out of `bytes` (which the peer may still be writing) and validates the copy.
    pub fn read_validated(bytes: &[u8], limits: &Limits) -> Result<FrameHeader, HeaderError> {
        let (head, _) = FrameHeader::read_from_prefix(bytes).map_err(|_| HeaderError::Truncated(bytes.len()))?;
        head.validate(limits)?;
        Ok(head)
    }

    pub fn validate(&self, limits: &Limits) -> Result<(), HeaderError> {
        if self.magic.get() != MAGIC {
            return Err(HeaderError::BadMagic(self.magic.get()));
        }
        if self.version.get() == 0 || self.version.get() > VERSION {
            return Err(HeaderError::BadVersion(self.version.get()));
        }
        let meta = self.meta_len.get();
        if meta > limits.meta_bytes_max {
            return Err(HeaderError::MetaTooLarge { len: meta, max: limits.meta_bytes_max });
        }
        let total = (HEADER_LEN as u64).saturating_add(meta as u64).saturating_add(self.data_len.get());
        if total > limits.frame_bytes_max {
            return Err(HeaderError::FrameTooLarge { len: total, max: limits.frame_bytes_max });
        }
        Ok(())
    }

    pub fn is_reply(&self) -> bool {
        self.flags.get() & FLAG_REPLY != 0
    }

    /// Total bytes of this frame on the wire.
    pub fn frame_len(&self) -> u64 {
        HEADER_LEN as u64 + self.meta_len.get() as u64 + self.data_len.get()
    }
}

impl FrameHeader {
    /// The header of a successful reply to `req` (same opcode and request id, `FLAG_REPLY` set).
    pub fn reply_to(req: &FrameHeader, meta_len: u32, data_len: u64) -> Self {
        FrameHeader::new(req.opcode.get(), FLAG_REPLY, req.request_id.get(), meta_len, data_len)
    }

    /// The header of a failed reply: `meta_len` bytes of UTF-8 message follow, no data.
    pub fn error_reply(opcode: u16, request_id: u64, status: crate::Status, meta_len: u32) -> Self {
        let mut h = FrameHeader::new(opcode, FLAG_REPLY, request_id, meta_len, 0);
        h.status = status.as_u16().into();
        h
    }

    /// The opcode, if this build knows it.
    pub fn opcode(&self) -> Result<crate::Opcode, crate::UnknownCode> {
        crate::Opcode::try_from(self.opcode.get())
    }

    /// The status, if this build knows it (an unknown non-zero status is still a failure).
    pub fn status(&self) -> Result<crate::Status, crate::UnknownCode> {
        crate::Status::try_from(self.status.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::IntoBytes;

    #[test]
    fn header_validation() {
        let limits = Limits::default();
        let h = FrameHeader::new(2, 0, 9, 16, 64 << 20);
        assert_eq!(FrameHeader::read_validated(h.as_bytes(), &limits), Ok(h));
        assert_eq!(FrameHeader::read_validated(&h.as_bytes()[..31], &limits), Err(HeaderError::Truncated(31)));
        let mut bad = h;
        bad.magic = 0.into();
        assert_eq!(bad.validate(&limits), Err(HeaderError::BadMagic(0)));
        let mut bad = h;
        bad.version = (VERSION + 1).into();
        assert_eq!(bad.validate(&limits), Err(HeaderError::BadVersion(VERSION + 1)));
        let mut bad = h;
        bad.meta_len = (limits.meta_bytes_max + 1).into();
        assert!(matches!(bad.validate(&limits), Err(HeaderError::MetaTooLarge { .. })));
        let mut bad = h;
        bad.data_len = u64::MAX.into();
        assert!(matches!(bad.validate(&limits), Err(HeaderError::FrameTooLarge { .. })));
    }

    #[test]
    fn replies() {
        let req = FrameHeader::new(crate::Opcode::Exec.as_u16(), 0, 5, 10, 0);
        let ok = FrameHeader::reply_to(&req, 3, 4);
        assert!(ok.is_reply());
        assert_eq!(
            (ok.request_id.get(), ok.opcode(), ok.status()),
            (5, Ok(crate::Opcode::Exec), Ok(crate::Status::Ok))
        );
        let err = FrameHeader::error_reply(req.opcode.get(), 5, crate::Status::BadHandle, 7);
        assert_eq!(err.status(), Ok(crate::Status::BadHandle));
        assert_eq!(err.frame_len(), 32 + 7);
    }
}
