//! Tensor descriptors: dtype, shape (rank ≤ [`RANK_MAX`]) and byte length.
//!
//! Invariant: a [`TensorDesc`] always satisfies `byte_len == dtype.size_bytes() × Π shape`, computed
//! with overflow checks; constructing or decoding one that does not is an error. Receivers may size
//! buffers from `byte_len()` only after also checking it against the frame's `data_len`.

use zerocopy::little_endian::U64;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::meta::{Meta, MetaError, MetaReader, MetaWriter};

/// Most dimensions a tensor may have.
pub const RANK_MAX: usize = 8;

/// Element types on the wire (one byte).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32 = 0,
    F16 = 1,
    BF16 = 2,
    I32 = 3,
    I64 = 4,
    U8 = 5,
}

impl DType {
    pub const ALL: &'static [DType] = &[DType::F32, DType::F16, DType::BF16, DType::I32, DType::I64, DType::U8];

    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::I64 => 8,
            DType::U8 => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
        }
    }
}

impl TryFrom<u8> for DType {
    type Error = TensorDescError;
    fn try_from(v: u8) -> Result<Self, TensorDescError> {
        DType::ALL.get(v as usize).copied().ok_or(TensorDescError::BadDType(v))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TensorDescError {
    #[error("unknown dtype code {0}")]
    BadDType(u8),
    #[error("rank {0} exceeds {RANK_MAX}")]
    RankTooLarge(usize),
    #[error("shape overflows u64 bytes")]
    Overflow,
    #[error("byte length {stated} does not match dtype × shape = {computed}")]
    ByteLenMismatch { stated: u64, computed: u64 },
}

/// A validated tensor descriptor. `Copy` and allocation-free (shape stored inline).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TensorDesc {
    dtype: DType,
    rank: u8,
    dims: [u64; RANK_MAX],
    byte_len: u64,
}

impl core::fmt::Debug for TensorDesc {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}{:?}", self.dtype.name(), self.shape())
    }
}

fn byte_len_of(dtype: DType, shape: &[u64]) -> Result<u64, TensorDescError> {
    shape.iter().try_fold(dtype.size_bytes() as u64, |acc, &d| acc.checked_mul(d)).ok_or(TensorDescError::Overflow)
}

impl TensorDesc {
    pub fn new(dtype: DType, shape: &[u64]) -> Result<Self, TensorDescError> {
        if shape.len() > RANK_MAX {
            return Err(TensorDescError::RankTooLarge(shape.len()));
        }
        let byte_len = byte_len_of(dtype, shape)?;
        let mut dims = [0u64; RANK_MAX];
        dims[..shape.len()].copy_from_slice(shape);
        Ok(TensorDesc { dtype, rank: shape.len() as u8, dims, byte_len })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn shape(&self) -> &[u64] {
        &self.dims[..self.rank as usize]
    }
    pub fn rank(&self) -> usize {
        self.rank as usize
    }
    /// Number of elements (product of the shape; 1 for a scalar).
    pub fn elements(&self) -> u64 {
        self.byte_len / self.dtype.size_bytes() as u64
    }
    pub fn byte_len(&self) -> u64 {
        self.byte_len
    }
}

/// Wire form of a [`TensorDesc`]: 80 bytes, fixed, little-endian.
#[repr(C)]
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct TensorDescWire {
    pub dtype: u8,
    pub rank: u8,
    pub reserved: [u8; 6],
    pub byte_len: U64,
    /// Unused trailing dimensions are zero.
    pub shape: [U64; RANK_MAX],
}

pub const TENSOR_DESC_WIRE_LEN: usize = core::mem::size_of::<TensorDescWire>();
const _: () = assert!(TENSOR_DESC_WIRE_LEN == 80);

impl From<&TensorDesc> for TensorDescWire {
    fn from(d: &TensorDesc) -> Self {
        TensorDescWire {
            dtype: d.dtype as u8,
            rank: d.rank,
            reserved: [0; 6],
            byte_len: d.byte_len.into(),
            shape: d.dims.map(U64::new),
        }
    }
}

impl TryFrom<&TensorDescWire> for TensorDesc {
    type Error = TensorDescError;
    fn try_from(w: &TensorDescWire) -> Result<Self, TensorDescError> {
        let dtype = DType::try_from(w.dtype)?;
        let rank = w.rank as usize;
        if rank > RANK_MAX {
            return Err(TensorDescError::RankTooLarge(rank));
        }
        let mut shape = [0u64; RANK_MAX];
        for (s, d) in shape.iter_mut().zip(&w.shape).take(rank) {
            *s = d.get();
        }
        let desc = TensorDesc::new(dtype, &shape[..rank])?;
        if desc.byte_len != w.byte_len.get() {
            return Err(TensorDescError::ByteLenMismatch { stated: w.byte_len.get(), computed: desc.byte_len });
        }
        Ok(desc)
    }
}

impl Meta for TensorDesc {
    fn encode(&self, w: &mut MetaWriter) {
        w.put_struct(&TensorDescWire::from(self));
    }
    fn decode(r: &mut MetaReader<'_>) -> Result<Self, MetaError> {
        let wire: TensorDescWire = r.get_struct("tensor descriptor")?;
        Ok(TensorDesc::try_from(&wire)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn desc_round_trip() {
        for &dt in DType::ALL {
            for shape in [&[][..], &[3], &[2, 3, 4], &[1, 1, 1, 1, 1, 1, 1, 7]] {
                let d = TensorDesc::new(dt, shape).unwrap();
                let back = TensorDesc::from_meta(&d.to_meta()).unwrap();
                assert_eq!(back, d);
                assert_eq!(back.byte_len(), dt.size_bytes() as u64 * shape.iter().product::<u64>());
            }
        }
        assert_eq!(TensorDesc::new(DType::F32, &[]).unwrap().elements(), 1);
        assert_eq!(TensorDesc::new(DType::F32, &[0, 5]).unwrap().byte_len(), 0);
    }

    #[test]
    fn desc_rejections() {
        assert_eq!(TensorDesc::new(DType::F32, &[1; 9]), Err(TensorDescError::RankTooLarge(9)));
        assert_eq!(TensorDesc::new(DType::F32, &[u64::MAX, 2]), Err(TensorDescError::Overflow));
        assert_eq!(TensorDesc::new(DType::U8, &[1 << 32, 1 << 32]), Err(TensorDescError::Overflow));

        let good = TensorDescWire::from(&TensorDesc::new(DType::F16, &[4, 4]).unwrap());
        let mut bad = good;
        bad.dtype = 6;
        assert_eq!(TensorDesc::try_from(&bad), Err(TensorDescError::BadDType(6)));
        let mut bad = good;
        bad.rank = 9;
        assert_eq!(TensorDesc::try_from(&bad), Err(TensorDescError::RankTooLarge(9)));
        let mut bad = good;
        bad.byte_len = 33.into();
        assert_eq!(TensorDesc::try_from(&bad), Err(TensorDescError::ByteLenMismatch { stated: 33, computed: 32 }));
        let bytes = good.as_bytes();
        assert!(matches!(TensorDesc::from_meta(&bytes[..79]), Err(MetaError::Truncated { .. })));
    }
}
