//! Little-endian byte encoding for messages sent with `broadcast`/`gather`: a writer that
//! appends and a reader that fails with a message instead of panicking on short input.

use crate::{Error, Result};

/// Appends values to a byte buffer.
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn f64s(&mut self, v: &[f64]) -> &mut Self {
        self.u64(v.len() as u64);
        for x in v {
            self.0.extend_from_slice(&x.to_le_bytes());
        }
        self
    }
    pub fn f32s(&mut self, v: &[f32]) -> &mut Self {
        self.u64(v.len() as u64);
        for x in v {
            self.0.extend_from_slice(&x.to_le_bytes());
        }
        self
    }
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u64(v.len() as u64);
        self.0.extend_from_slice(v);
        self
    }
    pub fn bools(&mut self, v: &[bool]) -> &mut Self {
        self.bytes(&v.iter().map(|&b| b as u8).collect::<Vec<_>>())
    }
}

/// Reads values back in the order they were written.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                Error::Comm(format!(
                    "malformed message: wanted {n} bytes at offset {}, message has {}",
                    self.pos,
                    self.buf.len()
                ))
            })?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }
    pub fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn len(&mut self, width: usize) -> Result<usize> {
        let n = self.u64()? as usize;
        n.checked_mul(width)
            .filter(|&b| b <= self.buf.len() - self.pos)
            .map(|_| n)
            .ok_or_else(|| {
                Error::Comm(format!("malformed message: length {n} exceeds the message"))
            })
    }
    pub fn f64s(&mut self) -> Result<Vec<f64>> {
        let n = self.len(8)?;
        Ok(self
            .take(n * 8)?
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8")))
            .collect())
    }
    pub fn f32s(&mut self) -> Result<Vec<f32>> {
        let n = self.len(4)?;
        Ok(self
            .take(n * 4)?
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4")))
            .collect())
    }
    pub fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.len(1)?;
        self.take(n)
    }
    pub fn bools(&mut self) -> Result<Vec<bool>> {
        Ok(self.bytes()?.iter().map(|&b| b != 0).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_short_input() {
        let mut w = Writer::default();
        w.u8(7)
            .u64(1 << 40)
            .f64s(&[1.5, -2.0])
            .f32s(&[0.25])
            .bytes(b"hi")
            .bools(&[true, false]);
        let mut r = Reader::new(&w.0);
        assert_eq!(r.u8().unwrap(), 7);
        assert_eq!(r.u64().unwrap(), 1 << 40);
        assert_eq!(r.f64s().unwrap(), vec![1.5, -2.0]);
        assert_eq!(r.f32s().unwrap(), vec![0.25]);
        assert_eq!(r.bytes().unwrap(), b"hi");
        assert_eq!(r.bools().unwrap(), vec![true, false]);
        assert!(r.u8().is_err());
        let mut bad = Writer::default();
        bad.u64(u64::MAX);
        assert!(Reader::new(&bad.0).f64s().is_err());
    }
}
