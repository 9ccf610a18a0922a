//! Wire protocol of djinn-dataplane: frame header, opcodes, status codes, tensor descriptors,
//! the handshake and the metadata of every request. Parsing happens on private copies with
//! bounds-checked readers and `zerocopy` structs; this crate does no I/O and knows nothing of
//! sockets or GPUs.
//!
//! A frame is `FrameHeader` (32 bytes, little-endian) + `meta_len` bytes of opcode-specific
//! metadata + `data_len` bytes of bulk data (tensor bytes). Metadata is small and always copied
//! into private memory before it is parsed; bulk data is received straight into its destination.
//! [`msg`] documents what the metadata of each opcode holds; [`session`] the session opcodes'.
//!
//! Invariant: no decoder panics on any input, and none allocates more than the metadata length it
//! was given (the header's limits bound that length before the bytes are read).

pub mod breakpoint;
pub mod codes;
pub mod header;
pub mod meta;
pub mod msg;
pub mod session;
pub mod tensor;

pub use breakpoint::{
    HiddenDType, HiddenDesc, HiddenReadReq, HiddenWriteReq, PausedNote, ResumeReply, BREAKPOINTS_MAX,
};
pub use codes::{Opcode, Status, UnknownCode};
pub use header::{FrameHeader, HeaderError, Limits, FLAG_REPLY, HEADER_LEN, MAGIC, VERSION};
pub use meta::{Meta, MetaError, MetaReader, MetaWriter};
pub use msg::{
    DeviceInfo, ErrorReply, ExecInput, ExecNode, ExecOp, ExecReply, ExecReq, Handle, HelloReply, HelloReq, StatsReply,
    TensorFreeReq, TensorGetReq, TensorPutReply, TensorPutReq,
};
pub use session::{
    DecodeFeed, FinishWire, LogitsReply, LogitsReq, LogitsWire, PrefillInput, PrefillReply, QosWire, SessionAppendReq,
    SessionDecodeReply, SessionDecodeReq, SessionInfoReply, SessionOpenReq, SessionPrefillReq, SessionReq,
    SessionToken,
};
pub use tensor::{DType, TensorDesc, TensorDescError, TensorDescWire, RANK_MAX};

/// Runs every metadata decoder of this crate over `meta` (for fuzzing and corpus replay). Returns
/// how many accepted it; the point is that none panics and none over-allocates.
pub fn decode_all_meta(meta: &[u8]) -> usize {
    let results = [
        HelloReq::from_meta(meta).is_ok(),
        HelloReply::from_meta(meta).is_ok(),
        StatsReply::from_meta(meta).is_ok(),
        TensorPutReq::from_meta(meta).is_ok(),
        TensorPutReply::from_meta(meta).is_ok(),
        TensorGetReq::from_meta(meta).is_ok(),
        TensorFreeReq::from_meta(meta).is_ok(),
        ExecReq::from_meta(meta).is_ok(),
        ExecReply::from_meta(meta).is_ok(),
        TensorDesc::from_meta(meta).is_ok(),
    ];
    let _ = ErrorReply::decode_bytes(meta);
    results.iter().filter(|&&ok| ok).count()
        + session::decode_all_session_meta(meta)
        + breakpoint::decode_all_breakpoint_meta(meta)
}

/// What the `frame_decoder` fuzz target (and its corpus replay test) runs on one input: the input as
/// a frame (header validated against the default limits, then its metadata through every decoder)
/// and the whole input as metadata. Panics only on a bug: a validated header that breaks its limits.
pub fn check_frame_bytes(data: &[u8]) {
    let limits = Limits::default();
    if let Ok(h) = FrameHeader::read_validated(data, &limits) {
        assert!(h.meta_len.get() <= limits.meta_bytes_max);
        assert!(h.frame_len() <= limits.frame_bytes_max);
        let rest = &data[HEADER_LEN..];
        decode_all_meta(&rest[..rest.len().min(h.meta_len.get() as usize)]);
    }
    decode_all_meta(data);
}
