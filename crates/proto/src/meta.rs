//! Bounds-checked encoding and decoding of frame metadata.
//!
//! Metadata is a sequence of little-endian scalars, fixed `zerocopy` structs, and length-prefixed
//! byte strings / arrays (`u32` length or count first). [`MetaReader`] never panics on any input and
//! never allocates more than the bytes it was given: every count is checked against the bytes left
//! (times the smallest encoded size of one element) before a `Vec` is reserved for it.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Why a metadata block could not be decoded. Every variant maps to `Status::BadFrame` or
/// `Status::BadArgument` on the wire (see [`MetaError::status`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    #[error("metadata truncated reading {what}: need {need} bytes, {have} left")]
    Truncated { what: &'static str, need: usize, have: usize },
    #[error("{0} trailing bytes after the metadata")]
    TrailingBytes(usize),
    #[error("{what} is not valid UTF-8")]
    BadUtf8 { what: &'static str },
    #[error("{what}: {count} entries exceed the limit of {max}")]
    TooMany { what: &'static str, count: u64, max: u64 },
    #[error("{what}: bad value {value}")]
    BadValue { what: &'static str, value: u64 },
    #[error("tensor descriptor: {0}")]
    Tensor(#[from] crate::tensor::TensorDescError),
}

impl MetaError {
    /// The status an error reply carries for this decode failure.
    pub fn status(&self) -> crate::Status {
        match self {
            MetaError::Truncated { .. } | MetaError::TrailingBytes(_) | MetaError::BadUtf8 { .. } => {
                crate::Status::BadFrame
            }
            MetaError::TooMany { .. } | MetaError::BadValue { .. } => crate::Status::BadArgument,
            MetaError::Tensor(_) => crate::Status::ShapeMismatch,
        }
    }
}

/// Appends metadata to a byte buffer. Encoding cannot fail except on programmer error (a string
/// longer than `u32::MAX` bytes), which panics.
#[derive(Debug, Default)]
pub struct MetaWriter {
    buf: Vec<u8>,
}

impl MetaWriter {
    pub fn new() -> Self {
        MetaWriter { buf: Vec::new() }
    }

    /// Reuses `buf` (cleared) so a hot path can keep one allocation.
    pub fn with_buf(mut buf: Vec<u8>) -> Self {
        buf.clear();
        MetaWriter { buf }
    }

    pub fn put_u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    pub fn put_u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn put_u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn put_u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn put_i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    pub fn put_f32(&mut self, v: f32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    /// Appends a fixed struct as its exact wire bytes.
    pub fn put_struct<T: IntoBytes + Immutable>(&mut self, v: &T) {
        self.buf.extend_from_slice(v.as_bytes());
    }

    /// Appends an element count for an array that follows.
    pub fn put_count(&mut self, n: usize) {
        self.put_u32(u32::try_from(n).expect("metadata array longer than u32::MAX"));
    }

    /// Appends `u32` length + bytes.
    pub fn put_bytes(&mut self, b: &[u8]) {
        self.put_count(b.len());
        self.buf.extend_from_slice(b);
    }

    /// Appends `u32` length + UTF-8 bytes.
    pub fn put_str(&mut self, s: &str) {
        self.put_bytes(s.as_bytes());
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads metadata from a private byte slice. Every read is bounds-checked and returns a typed error.
#[derive(Debug, Clone)]
pub struct MetaReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> MetaReader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        MetaReader { buf, pos: 0 }
    }

    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Fails unless every byte was consumed: trailing garbage is a framing error, not padding.
    pub fn finish(&self) -> Result<(), MetaError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(MetaError::TrailingBytes(n)),
        }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], MetaError> {
        let have = self.remaining();
        if n > have {
            return Err(MetaError::Truncated { what, need: n, have });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn take_array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], MetaError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    pub fn get_u8(&mut self, what: &'static str) -> Result<u8, MetaError> {
        Ok(self.take_array::<1>(what)?[0])
    }
    pub fn get_u16(&mut self, what: &'static str) -> Result<u16, MetaError> {
        Ok(u16::from_le_bytes(self.take_array(what)?))
    }
    pub fn get_u32(&mut self, what: &'static str) -> Result<u32, MetaError> {
        Ok(u32::from_le_bytes(self.take_array(what)?))
    }
    pub fn get_u64(&mut self, what: &'static str) -> Result<u64, MetaError> {
        Ok(u64::from_le_bytes(self.take_array(what)?))
    }
    pub fn get_i64(&mut self, what: &'static str) -> Result<i64, MetaError> {
        Ok(i64::from_le_bytes(self.take_array(what)?))
    }
    pub fn get_f32(&mut self, what: &'static str) -> Result<f32, MetaError> {
        Ok(f32::from_le_bytes(self.take_array(what)?))
    }

    /// Copies a fixed struct out of the metadata.
    pub fn get_struct<T: FromBytes + KnownLayout + Immutable>(&mut self, what: &'static str) -> Result<T, MetaError> {
        let s = self.take(core::mem::size_of::<T>(), what)?;
        // Cannot fail: `s` has exactly size_of::<T>() bytes and T: FromBytes accepts any bit pattern.
        T::read_from_bytes(s).map_err(|_| MetaError::Truncated { what, need: core::mem::size_of::<T>(), have: 0 })
    }

    /// Reads an element count and checks that `count` elements of at least `elem_bytes_min` bytes
    /// each fit in what is left and that `count <= max`, so the caller may reserve `count` slots.
    pub fn get_count(&mut self, what: &'static str, elem_bytes_min: usize, max: usize) -> Result<usize, MetaError> {
        let count = self.get_u32(what)? as usize;
        if count > max {
            return Err(MetaError::TooMany { what, count: count as u64, max: max as u64 });
        }
        let need = count.saturating_mul(elem_bytes_min.max(1));
        if elem_bytes_min > 0 && need > self.remaining() {
            return Err(MetaError::Truncated { what, need, have: self.remaining() });
        }
        Ok(count)
    }

    /// Reads `u32` length + bytes, borrowed from the metadata.
    pub fn get_bytes(&mut self, what: &'static str, max: usize) -> Result<&'a [u8], MetaError> {
        let n = self.get_count(what, 1, max)?;
        self.take(n, what)
    }

    /// Reads `u32` length + UTF-8 bytes, borrowed from the metadata.
    pub fn get_str(&mut self, what: &'static str, max: usize) -> Result<&'a str, MetaError> {
        let b = self.get_bytes(what, max)?;
        core::str::from_utf8(b).map_err(|_| MetaError::BadUtf8 { what })
    }

    /// Reads `u32` count + that many strings into owned `String`s.
    pub fn get_str_list(
        &mut self,
        what: &'static str,
        count_max: usize,
        str_bytes_max: usize,
    ) -> Result<Vec<String>, MetaError> {
        // Each string is at least its 4-byte length prefix.
        let n = self.get_count(what, 4, count_max)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.get_str(what, str_bytes_max)?.to_owned());
        }
        Ok(out)
    }
}

/// A message that travels as frame metadata.
pub trait Meta: Sized {
    fn encode(&self, w: &mut MetaWriter);
    fn decode(r: &mut MetaReader<'_>) -> Result<Self, MetaError>;

    /// Encodes into a fresh buffer.
    fn to_meta(&self) -> Vec<u8> {
        let mut w = MetaWriter::new();
        self.encode(&mut w);
        w.finish()
    }

    /// Decodes a whole metadata block; trailing bytes are an error.
    fn from_meta(meta: &[u8]) -> Result<Self, MetaError> {
        let mut r = MetaReader::new(meta);
        let v = Self::decode(&mut r)?;
        r.finish()?;
        Ok(v)
    }
}

/// Test helper for every message: `v` survives encode + decode, every strict prefix of its
/// encoding fails with a typed error, and one extra byte is trailing garbage.
#[cfg(test)]
pub(crate) fn assert_round_trip<T: Meta + PartialEq + core::fmt::Debug>(v: &T) {
    let b = v.to_meta();
    assert_eq!(&T::from_meta(&b).unwrap(), v);
    for cut in 0..b.len() {
        assert!(T::from_meta(&b[..cut]).is_err(), "prefix {cut} of {} decoded", b.len());
    }
    let mut longer = b.clone();
    longer.push(0);
    assert_eq!(T::from_meta(&longer).unwrap_err(), MetaError::TrailingBytes(1));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_and_strings_round_trip() {
        let mut w = MetaWriter::new();
        w.put_u8(7);
        w.put_u16(0xBEEF);
        w.put_u32(123_456);
        w.put_u64(u64::MAX - 1);
        w.put_i64(-5);
        w.put_f32(1.5);
        w.put_str("héllo");
        w.put_bytes(&[1, 2, 3]);
        let b = w.finish();
        let mut r = MetaReader::new(&b);
        assert_eq!(r.get_u8("a").unwrap(), 7);
        assert_eq!(r.get_u16("a").unwrap(), 0xBEEF);
        assert_eq!(r.get_u32("a").unwrap(), 123_456);
        assert_eq!(r.get_u64("a").unwrap(), u64::MAX - 1);
        assert_eq!(r.get_i64("a").unwrap(), -5);
        assert_eq!(r.get_f32("a").unwrap(), 1.5);
        assert_eq!(r.get_str("s", 64).unwrap(), "héllo");
        assert_eq!(r.get_bytes("b", 64).unwrap(), &[1, 2, 3]);
        r.finish().unwrap();
    }

    #[test]
    fn huge_counts_are_rejected_before_allocating() {
        let mut w = MetaWriter::new();
        w.put_u32(u32::MAX);
        let b = w.finish();
        let err = MetaReader::new(&b).get_str_list("models", usize::MAX, 64).unwrap_err();
        assert!(matches!(err, MetaError::Truncated { .. }), "{err:?}");
        let err = MetaReader::new(&b).get_str_list("models", 16, 64).unwrap_err();
        assert!(matches!(err, MetaError::TooMany { .. }), "{err:?}");
    }

    #[test]
    fn bad_utf8_and_trailing_bytes() {
        let mut w = MetaWriter::new();
        w.put_bytes(&[0xff, 0xfe]);
        w.put_u8(0);
        let b = w.finish();
        let mut r = MetaReader::new(&b);
        assert_eq!(r.get_str("name", 64).unwrap_err(), MetaError::BadUtf8 { what: "name" });
        let mut r = MetaReader::new(&b);
        r.get_bytes("name", 64).unwrap();
        assert_eq!(r.finish().unwrap_err(), MetaError::TrailingBytes(1));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let mut w = MetaWriter::new();
        w.put_u64(1);
        w.put_str("abc");
        let b = w.finish();
        for cut in 0..b.len() {
            let mut r = MetaReader::new(&b[..cut]);
            let ok = r.get_u64("x").and_then(|_| r.get_str("s", 64).map(|_| ()));
            assert!(ok.is_err(), "cut at {cut} decoded");
        }
    }
}
