//! The checkpoint files' encoding: little-endian values streamed through a 64-bit checksum, so
//! that a file of several GiB is written and read without a second copy in memory, and a
//! truncated or damaged one is refused instead of restored.
//!
//! A file is `MAGIC`, the values in the order the writer wrote them, and the checksum of
//! everything before it. Lengths are checked against what is left of the file before anything
//! is allocated, so a damaged length cannot ask for more memory than the file holds.

use crate::{Error, Result};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// First bytes of every checkpoint file (the last one is the format version).
pub const MAGIC: &[u8; 8] = b"EVACKPT\x01";

/// A streaming 64-bit checksum (FNV-1a over 8-byte words, then a final avalanche): fast enough
/// not to matter next to the disk, and any flipped bit or truncation changes it.
#[derive(Clone)]
pub struct Checksum {
    state: u64,
    pending: Vec<u8>,
    len: u64,
}

impl Default for Checksum {
    fn default() -> Self {
        Self::new()
    }
}

impl Checksum {
    /// The checksum of nothing.
    pub fn new() -> Self {
        Checksum {
            state: 0xcbf2_9ce4_8422_2325,
            pending: Vec::with_capacity(8),
            len: 0,
        }
    }

    fn word(&mut self, w: u64) {
        self.state = (self.state ^ w).wrapping_mul(0x0000_0100_0000_01b3);
    }

    /// Adds bytes.
    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if !self.pending.is_empty() {
            let take = (8 - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == 8 {
                let w = u64::from_le_bytes(self.pending[..].try_into().expect("8 bytes"));
                self.word(w);
                self.pending.clear();
            }
        }
        let mut words = data.chunks_exact(8);
        for w in &mut words {
            self.word(u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
        self.pending.extend_from_slice(words.remainder());
    }

    /// The checksum of the bytes added so far.
    pub fn finish(&self) -> u64 {
        let mut c = self.clone();
        let mut last = [0u8; 8];
        last[..c.pending.len()].copy_from_slice(&c.pending);
        c.word(u64::from_le_bytes(last));
        c.word(c.len);
        let mut x = c.state;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^ (x >> 33)
    }
}

/// Writes values to a file through the checksum.
pub struct Encoder<W: Write> {
    out: W,
    sum: Checksum,
    path: PathBuf,
}

impl<W: Write> Encoder<W> {
    /// Starts a file at `path` (named in errors) with the magic bytes.
    pub fn new(out: W, path: &Path) -> Result<Self> {
        let mut e = Encoder {
            out,
            sum: Checksum::new(),
            path: path.to_path_buf(),
        };
        e.raw(MAGIC)?;
        Ok(e)
    }

    fn raw(&mut self, b: &[u8]) -> Result<()> {
        self.sum.update(b);
        self.out
            .write_all(b)
            .map_err(|e| Error::io("writing checkpoint", &self.path, e))
    }

    pub fn u8(&mut self, v: u8) -> Result<()> {
        self.raw(&[v])
    }

    pub fn u64(&mut self, v: u64) -> Result<()> {
        self.raw(&v.to_le_bytes())
    }

    pub fn bool(&mut self, v: bool) -> Result<()> {
        self.u8(v as u8)
    }

    pub fn bytes(&mut self, v: &[u8]) -> Result<()> {
        self.u64(v.len() as u64)?;
        self.raw(v)
    }

    pub fn str(&mut self, v: &str) -> Result<()> {
        self.bytes(v.as_bytes())
    }

    pub fn bools(&mut self, v: &[bool]) -> Result<()> {
        self.bytes(&v.iter().map(|&b| b as u8).collect::<Vec<_>>())
    }

    pub fn u64s(&mut self, v: &[u64]) -> Result<()> {
        self.u64(v.len() as u64)?;
        v.iter().try_for_each(|&x| self.u64(x))
    }

    /// A length, then the values, in blocks (one write per block, not per value).
    pub fn f64s(&mut self, v: &[f64]) -> Result<()> {
        self.u64(v.len() as u64)?;
        let mut buf = Vec::with_capacity(8 * 4096);
        for block in v.chunks(4096) {
            buf.clear();
            block
                .iter()
                .for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
            self.raw(&buf)?;
        }
        Ok(())
    }

    pub fn f32s(&mut self, v: &[f32]) -> Result<()> {
        self.u64(v.len() as u64)?;
        let buf: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.raw(&buf)
    }

    /// Writes the checksum of everything so far, so that a reader can trust what precedes it
    /// (the header) before it reads the rest.
    pub fn seal(&mut self) -> Result<()> {
        let sum = self.sum.finish();
        self.u64(sum)
    }

    /// Appends the checksum and returns the writer (to be flushed and synced by the caller).
    pub fn finish(mut self) -> Result<W> {
        let sum = self.sum.finish();
        self.out
            .write_all(&sum.to_le_bytes())
            .map_err(|e| Error::io("writing checkpoint", &self.path, e))?;
        Ok(self.out)
    }
}

/// Reads values back, checking each length against the bytes left and, at the end, the checksum.
pub struct Decoder<R: Read> {
    input: R,
    sum: Checksum,
    left: u64,
    path: PathBuf,
}

impl<R: Read> Decoder<R> {
    /// Opens a stream of `len` bytes (the file's size) read from `path`; fails unless it starts
    /// with the magic bytes.
    pub fn new(input: R, len: u64, path: &Path) -> Result<Self> {
        let mut d = Decoder {
            input,
            sum: Checksum::new(),
            left: len.checked_sub(8).ok_or_else(|| {
                Error::data(format!(
                    "checkpoint file {} is {len} bytes, too short to be one",
                    path.display()
                ))
            })?,
            path: path.to_path_buf(),
        };
        let mut magic = [0u8; 8];
        d.raw(&mut magic)?;
        if &magic != MAGIC {
            return Err(d.damaged(format!(
                "it does not start with eva's checkpoint header ({:?})",
                String::from_utf8_lossy(MAGIC)
            )));
        }
        Ok(d)
    }

    /// An error naming the file and what is wrong with it.
    pub fn damaged(&self, what: String) -> Error {
        Error::data(format!(
            "checkpoint file {} is damaged or not a checkpoint of this eva: {what}",
            self.path.display()
        ))
    }

    fn raw(&mut self, buf: &mut [u8]) -> Result<()> {
        if buf.len() as u64 > self.left {
            return Err(self.damaged(format!(
                "wanted {} more bytes, {} are left",
                buf.len(),
                self.left
            )));
        }
        self.input
            .read_exact(buf)
            .map_err(|e| Error::io("reading checkpoint", &self.path, e))?;
        self.left -= buf.len() as u64;
        self.sum.update(buf);
        Ok(())
    }

    /// A length of `width`-byte values that fits in what is left of the file.
    fn len(&mut self, width: u64) -> Result<usize> {
        let n = self.u64()?;
        match n.checked_mul(width) {
            Some(b) if b <= self.left => Ok(n as usize),
            _ => Err(self.damaged(format!(
                "a length of {n} values does not fit in the {} bytes left",
                self.left
            ))),
        }
    }

    pub fn u8(&mut self) -> Result<u8> {
        let mut b = [0u8; 1];
        self.raw(&mut b)?;
        Ok(b[0])
    }

    pub fn u64(&mut self) -> Result<u64> {
        let mut b = [0u8; 8];
        self.raw(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// A `u64` that must fit `usize` and be at most `max` (names `what` otherwise).
    pub fn count(&mut self, what: &str, max: usize) -> Result<usize> {
        let v = self.u64()?;
        if v > max as u64 {
            return Err(self.damaged(format!("{what} is {v}, at most {max} is possible")));
        }
        Ok(v as usize)
    }

    pub fn bool(&mut self) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.damaged(format!("a flag is {b}, not 0 or 1"))),
        }
    }

    pub fn bytes(&mut self) -> Result<Vec<u8>> {
        let n = self.len(1)?;
        let mut v = vec![0u8; n];
        self.raw(&mut v)?;
        Ok(v)
    }

    pub fn str(&mut self) -> Result<String> {
        let b = self.bytes()?;
        String::from_utf8(b).map_err(|_| self.damaged("a text field is not UTF-8".into()))
    }

    pub fn bools(&mut self) -> Result<Vec<bool>> {
        let b = self.bytes()?;
        b.iter()
            .map(|&x| match x {
                0 => Ok(false),
                1 => Ok(true),
                _ => Err(self.damaged(format!("a flag is {x}, not 0 or 1"))),
            })
            .collect()
    }

    pub fn u64s(&mut self) -> Result<Vec<u64>> {
        let n = self.len(8)?;
        (0..n).map(|_| self.u64()).collect()
    }

    pub fn f64s(&mut self) -> Result<Vec<f64>> {
        let n = self.len(8)?;
        let mut out = Vec::with_capacity(n);
        let mut buf = vec![0u8; 8 * 4096];
        let mut left = n;
        while left > 0 {
            let m = left.min(4096);
            self.raw(&mut buf[..8 * m])?;
            out.extend(
                buf[..8 * m]
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes"))),
            );
            left -= m;
        }
        Ok(out)
    }

    pub fn f32s(&mut self) -> Result<Vec<f32>> {
        let n = self.len(4)?;
        let mut buf = vec![0u8; 4 * n];
        self.raw(&mut buf)?;
        Ok(buf
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect())
    }

    /// Checks a checksum written by [`Encoder::seal`] against what was read so far.
    pub fn check_seal(&mut self) -> Result<()> {
        let expected = self.sum.finish();
        if self.u64()? != expected {
            return Err(self.damaged("the checksum of its header does not match".into()));
        }
        Ok(())
    }

    /// Checks that nothing but the checksum is left and that it matches.
    pub fn finish(mut self) -> Result<()> {
        if self.left != 0 {
            return Err(self.damaged(format!("{} bytes follow the last value", self.left)));
        }
        let expected = self.sum.finish();
        let mut b = [0u8; 8];
        self.input
            .read_exact(&mut b)
            .map_err(|e| Error::io("reading checkpoint", &self.path, e))?;
        if u64::from_le_bytes(b) != expected {
            return Err(self.damaged("its checksum does not match its contents".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode() -> Vec<u8> {
        let p = Path::new("test.ckpt");
        let mut e = Encoder::new(Vec::new(), p).unwrap();
        e.u8(7).unwrap();
        e.str("rank=8").unwrap();
        e.f64s(&(0..1_000).map(|i| i as f64 * 0.5).collect::<Vec<_>>())
            .unwrap();
        e.f32s(&[1.5, -2.0]).unwrap();
        e.bools(&[true, false]).unwrap();
        e.u64s(&[1, 2, 3]).unwrap();
        e.finish().unwrap()
    }

    type Values = (u8, String, Vec<f64>, Vec<f32>, Vec<bool>, Vec<u64>);

    fn decode(b: &[u8]) -> Result<Values> {
        let mut d = Decoder::new(b, b.len() as u64, Path::new("test.ckpt"))?;
        let v = (
            d.u8()?,
            d.str()?,
            d.f64s()?,
            d.f32s()?,
            d.bools()?,
            d.u64s()?,
        );
        d.finish()?;
        Ok(v)
    }

    #[test]
    fn round_trip() {
        let (a, b, c, d, e, f) = decode(&encode()).unwrap();
        assert_eq!((a, b.as_str()), (7, "rank=8"));
        assert!(c.len() == 1_000 && c[999] == 499.5);
        assert_eq!(
            (d, e, f),
            (vec![1.5, -2.0], vec![true, false], vec![1, 2, 3])
        );
    }

    #[test]
    fn every_truncation_and_every_flipped_byte_is_refused() {
        let good = encode();
        for cut in 0..good.len() {
            assert!(decode(&good[..cut]).is_err(), "truncated at {cut}");
        }
        // Each step of the checksum is a bijection of its state, so any changed word changes it.
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            assert!(decode(&bad).is_err(), "flip at byte {i} was not refused");
        }
    }
}
