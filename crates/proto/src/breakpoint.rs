//! Breakpoint messages (opcodes 41..=44): a prefill or decode request may carry breakpoint
//! layers; when its input pass reaches one, the session pauses and the client may read the
//! hidden state, write a replacement of the same shape, and resume (or cancel with
//! `SessionCancel`).
//!
//! # Layout
//! Conventions of [`crate::msg`]. Breakpoints travel at the end of `SessionPrefillReq` and
//! `SessionDecodeReq` as `[u32]` layers, strictly increasing, each ≥ 1, at most
//! [`BREAKPOINTS_MAX`] (the upper bound, the model's layer count L, is the server's to check;
//! N = L is the residual stream before the final norm).
//!
//! | opcode | request meta / data | reply meta / data |
//! |---|---|---|
//! | SessionPaused | (server → client, FLAG_REPLY, the paused request's id) `PausedNote` | — |
//! | SessionHiddenRead | `HiddenReadReq`: u64 session, u8 dtype | `HiddenDesc` / the state's bytes |
//! | SessionHiddenWrite | `HiddenDesc`-shaped `HiddenWriteReq` / the new state's bytes | empty |
//! | SessionResume | `SessionReq` | `ResumeReply` (the paused request goes on) |
//!
//! `PausedNote` = u64 session, u32 layer, u32 layers, u32 tokens, u32 hidden, u8 model dtype,
//! u32 lease_ms. `ResumeReply` = u32 swaps. `HiddenDesc` = u32 layer, u32 tokens, u32 hidden, u8 dtype. A hidden state is
//! `[tokens, hidden]` row-major, little-endian, in f32 or the model's dtype ([`HiddenDType`]).

use crate::meta::{Meta, MetaError, MetaReader, MetaWriter};
use crate::session::SessionWireId;

/// Most breakpoints of one request.
pub const BREAKPOINTS_MAX: usize = 64;

/// Element type of a hidden state on the wire: f32, or the model's 16-bit dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum HiddenDType {
    #[default]
    F32 = 0,
    F16 = 1,
    BF16 = 2,
}

impl HiddenDType {
    pub fn from_u8(v: u8) -> Result<Self, MetaError> {
        match v {
            0 => Ok(HiddenDType::F32),
            1 => Ok(HiddenDType::F16),
            2 => Ok(HiddenDType::BF16),
            _ => Err(MetaError::BadValue { what: "hidden dtype", value: v as u64 }),
        }
    }
    pub fn size_bytes(self) -> usize {
        match self {
            HiddenDType::F32 => 4,
            HiddenDType::F16 | HiddenDType::BF16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            HiddenDType::F32 => "f32",
            HiddenDType::F16 => "f16",
            HiddenDType::BF16 => "bf16",
        }
    }
}

pub(crate) fn put_breakpoints(w: &mut MetaWriter, layers: &[u32]) {
    w.put_count(layers.len());
    for &l in layers {
        w.put_u32(l);
    }
}

pub(crate) fn get_breakpoints(r: &mut MetaReader<'_>) -> Result<Vec<u32>, MetaError> {
    let n = r.get_count("breakpoints", 4, BREAKPOINTS_MAX)?;
    let mut layers = Vec::with_capacity(n);
    for _ in 0..n {
        let l = r.get_u32("breakpoint layer")?;
        if l == 0 || layers.last().is_some_and(|&p| l <= p) {
            return Err(MetaError::BadValue {
                what: "breakpoint layers (≥ 1, strictly increasing)", value: l as u64
            });
        }
        layers.push(l);
    }
    Ok(layers)
}

/// The session paused: its input pass stopped after `layer` of `layers` layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PausedNote {
    pub session: SessionWireId,
    pub layer: u32,
    pub layers: u32,
    /// Rows of the hidden state (the tokens of the input pass).
    pub tokens: u32,
    pub hidden: u32,
    /// The model's dtype, the other dtype a read may ask for besides f32.
    pub model_dtype: HiddenDType,
    /// The pause ends (rolled back, the request `Cancelled`) unless resumed within this time.
    pub lease_ms: u32,
}

impl Meta for PausedNote {
    fn encode(&self, w: &mut MetaWriter) {
        w.put_u64(self.session);
        w.put_u32(self.layer);
        w.put_u32(self.layers);
        w.put_u32(self.tokens);
        w.put_u32(self.hidden);
        w.put_u8(self.model_dtype as u8);
        w.put_u32(self.lease_ms);
    }
    fn decode(r: &mut MetaReader<'_>) -> Result<Self, MetaError> {
        Ok(PausedNote {
            session: r.get_u64("session")?,
            layer: r.get_u32("layer")?,
            layers: r.get_u32("layers")?,
            tokens: r.get_u32("tokens")?,
            hidden: r.get_u32("hidden")?,
            model_dtype: HiddenDType::from_u8(r.get_u8("model dtype")?)?,
            lease_ms: r.get_u32("lease_ms")?,
        })
    }
}

/// Request of SessionHiddenRead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HiddenReadReq {
    pub session: SessionWireId,
    pub dtype: HiddenDType,
}

impl Meta for HiddenReadReq {
    fn encode(&self, w: &mut MetaWriter) {
        w.put_u64(self.session);
        w.put_u8(self.dtype as u8);
    }
    fn decode(r: &mut MetaReader<'_>) -> Result<Self, MetaError> {
        Ok(HiddenReadReq { session: r.get_u64("session")?, dtype: HiddenDType::from_u8(r.get_u8("dtype")?)? })
    }
}

/// A hidden state's shape and dtype: reply of SessionHiddenRead, and the part of
/// `HiddenWriteReq` that the data must match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HiddenDesc {
    pub layer: u32,
    pub tokens: u32,
    pub hidden: u32,
    pub dtype: HiddenDType,
}

impl HiddenDesc {
    /// Bytes of the state this describes (`None` on overflow).
    pub fn bytes(&self) -> Option<u64> {
        (self.tokens as u64).checked_mul(self.hidden as u64)?.checked_mul(self.dtype.size_bytes() as u64)
    }
}

impl Meta for HiddenDesc {
    fn encode(&self, w: &mut MetaWriter) {
        w.put_u32(self.layer);
        w.put_u32(self.tokens);
        w.put_u32(self.hidden);
        w.put_u8(self.dtype as u8);
    }
    fn decode(r: &mut MetaReader<'_>) -> Result<Self, MetaError> {
        Ok(HiddenDesc {
            layer: r.get_u32("layer")?,
            tokens: r.get_u32("tokens")?,
            hidden: r.get_u32("hidden")?,
            dtype: HiddenDType::from_u8(r.get_u8("dtype")?)?,
        })
    }
}

/// Request of SessionHiddenWrite; the frame's data is the new state (`desc.bytes()` bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HiddenWriteReq {
    pub session: SessionWireId,
    pub desc: HiddenDesc,
}

impl HiddenWriteReq {
    /// Checks the frame's data length against the description before any byte of it is used.
    pub fn check_data(&self, data_len: u64) -> Result<(), MetaError> {
        match self.desc.bytes() {
            Some(b) if b == data_len => Ok(()),
            _ => Err(MetaError::BadValue {
                what: "hidden state bytes (tokens × hidden × dtype size)",
                value: data_len,
            }),
        }
    }
}

impl Meta for HiddenWriteReq {
    fn encode(&self, w: &mut MetaWriter) {
        w.put_u64(self.session);
        self.desc.encode(w);
    }
    fn decode(r: &mut MetaReader<'_>) -> Result<Self, MetaError> {
        Ok(HiddenWriteReq { session: r.get_u64("session")?, desc: HiddenDesc::decode(r)? })
    }
}

/// Runs every breakpoint decoder over `meta` (fuzzing): how many accepted it.
/// The reply to `SessionResume`: how often the paused pass's KV was swapped out to host memory
/// while paused, this pause included (each such pause swaps it back in before the next part).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResumeReply {
    pub swaps: u32,
}

impl Meta for ResumeReply {
    fn encode(&self, w: &mut MetaWriter) {
        w.put_u32(self.swaps);
    }
    fn decode(r: &mut MetaReader<'_>) -> Result<Self, MetaError> {
        Ok(ResumeReply { swaps: r.get_u32("swaps")? })
    }
}

pub fn decode_all_breakpoint_meta(meta: &[u8]) -> usize {
    [
        ResumeReply::from_meta(meta).is_ok(),
        PausedNote::from_meta(meta).is_ok(),
        HiddenReadReq::from_meta(meta).is_ok(),
        HiddenDesc::from_meta(meta).is_ok(),
        HiddenWriteReq::from_meta(meta).is_ok(),
    ]
    .iter()
    .filter(|&&ok| ok)
    .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::assert_round_trip as round_trip;

    fn desc() -> HiddenDesc {
        HiddenDesc { layer: 10, tokens: 7, hidden: 576, dtype: HiddenDType::BF16 }
    }

    #[test]
    fn messages_round_trip() {
        round_trip(&PausedNote {
            session: 0xfeed,
            layer: 10,
            layers: 30,
            tokens: 7,
            hidden: 576,
            model_dtype: HiddenDType::F16,
            lease_ms: 30_000,
        });
        round_trip(&HiddenReadReq { session: 3, dtype: HiddenDType::F32 });
        round_trip(&desc());
        round_trip(&HiddenWriteReq { session: 3, desc: desc() });
        round_trip(&ResumeReply { swaps: 2 });
    }

    #[test]
    fn bad_input_is_typed() {
        let mut b = HiddenReadReq { session: 3, dtype: HiddenDType::F32 }.to_meta();
        *b.last_mut().unwrap() = 3;
        assert_eq!(HiddenReadReq::from_meta(&b), Err(MetaError::BadValue { what: "hidden dtype", value: 3 }));
        let w = HiddenWriteReq { session: 3, desc: desc() };
        assert!(w.check_data(7 * 576 * 2).is_ok());
        assert!(w.check_data(7 * 576 * 4).is_err());
        let huge = HiddenWriteReq {
            session: 3,
            desc: HiddenDesc { layer: 1, tokens: u32::MAX, hidden: u32::MAX, dtype: HiddenDType::F32 },
        };
        assert!(huge.check_data(u64::MAX).is_err());
        for bad in [vec![0u32], vec![3, 3], vec![5, 2]] {
            let mut w = MetaWriter::new();
            put_breakpoints(&mut w, &bad);
            let b = w.finish();
            assert!(get_breakpoints(&mut MetaReader::new(&b)).is_err(), "{bad:?}");
        }
        let mut w = MetaWriter::new();
        put_breakpoints(&mut w, &vec![1; BREAKPOINTS_MAX + 1]);
        let b = w.finish();
        assert!(get_breakpoints(&mut MetaReader::new(&b)).is_err());
        assert_eq!(decode_all_breakpoint_meta(&[]), 0);
    }
}
