//! Wire protocol of djinn-dataplane: frame header, opcodes, status codes, tensor descriptors and
//! the handshake. Parsing happens in place with `zerocopy`; this crate does no I/O and knows
//! nothing of sockets or GPUs.
//!
//! A frame is `FrameHeader` (32 bytes, little-endian) + `meta_len` bytes of opcode-specific
//! metadata + `data_len` bytes of bulk data (tensor bytes). Metadata is small and always copied
//! into private memory before it is parsed; bulk data is received straight into its destination.

pub mod header;

pub use header::{FrameHeader, HeaderError, Limits, FLAG_REPLY, HEADER_LEN, MAGIC, VERSION};
