//! A tensor of a memory-mapped checkpoint file, as the backends receive it to make a weight.

use crate::{Error, Result};
use safetensors::Dtype;
use std::ops::Range;
use std::sync::Arc;

/// One tensor inside a mapped checkpoint file.
#[derive(Clone)]
pub struct HostTensor {
    /// Key in the checkpoint.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// The file's memory map.
    pub map: Arc<memmap2::Mmap>,
    /// Byte range of the data in `map`.
    pub range: Range<usize>,
    /// File index in the checkpoint's list of files (`model::checkpoint::Checkpoint::files`).
    pub file: usize,
}

impl HostTensor {
    /// A tensor of computed f32 values (e.g. Gemma's `1 + w` norm weights), in an anonymous map.
    pub fn from_f32(name: String, shape: Vec<usize>, values: &[f32]) -> Result<Self> {
        assert_eq!(
            shape.iter().product::<usize>(),
            values.len(),
            "{name}: shape and values disagree"
        );
        let bytes = values.len() * 4;
        let mut map = memmap2::MmapMut::map_anon(bytes.max(1))
            .map_err(|e| Error::data(format!("cannot allocate {bytes} bytes for {name}: {e}")))?;
        for (dst, v) in map.chunks_exact_mut(4).zip(values) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
        let map = map
            .make_read_only()
            .map_err(|e| Error::data(format!("cannot seal the values of {name}: {e}")))?;
        Ok(HostTensor {
            name,
            dtype: Dtype::F32,
            shape,
            map: Arc::new(map),
            range: 0..bytes,
            file: usize::MAX,
        })
    }

    /// Rows `rows` of a matrix, without a copy (a fused projection's part, e.g. Phi-3's q rows
    /// of `qkv_proj`), named `name`. A tensor of more dimensions counts its rows over all but
    /// the last (an expert's part of a fused `[experts, rows, cols]` parameter).
    pub fn row_slice(&self, rows: Range<usize>, name: String) -> Self {
        let (cols, total) = match self.shape.split_last() {
            Some((&cols, lead)) if !lead.is_empty() => (cols, lead.iter().product::<usize>()),
            _ => (0, 0),
        };
        assert!(
            rows.end <= total,
            "{}: rows {rows:?} of shape {:?}",
            self.name,
            self.shape
        );
        let row_bytes = cols * self.dtype.bitsize() / 8;
        HostTensor {
            name,
            dtype: self.dtype,
            shape: vec![rows.len(), cols],
            map: self.map.clone(),
            range: self.range.start + rows.start * row_bytes
                ..self.range.start + rows.end * row_bytes,
            file: self.file,
        }
    }

    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.range.clone()]
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Refuses a tensor holding NaN or infinity, naming it and the first bad element. An OR
    /// over exponent bits (all ones = NaN or infinity) vectorizes: ~memory bandwidth.
    pub fn check_finite(&self) -> Result<()> {
        let b = self.bytes();
        let (width, mask): (usize, u32) = match self.dtype {
            Dtype::F32 => (4, 0x7f80_0000),
            Dtype::F16 => (2, 0x7c00),
            Dtype::BF16 => (2, 0x7f80),
            _ => return Ok(()),
        };
        let word = |c: &[u8]| {
            if width == 4 {
                u32::from_le_bytes([c[0], c[1], c[2], c[3]])
            } else {
                u16::from_le_bytes([c[0], c[1]]) as u32
            }
        };
        let bad = |c: &[u8]| (word(c) & mask == mask) as u32;
        let any = if width == 4 {
            b.chunks_exact(4).fold(0, |a, c| a | bad(c))
        } else {
            b.chunks_exact(2).fold(0, |a, c| a | bad(c))
        };
        if any == 0 {
            return Ok(());
        }
        let i = b
            .chunks_exact(width)
            .position(|c| bad(c) == 1)
            .expect("a non-finite element was seen");
        let v = match self.dtype {
            Dtype::F32 => f32::from_bits(word(&b[i * 4..])),
            Dtype::F16 => half::f16::from_bits(word(&b[i * 2..]) as u16).to_f32(),
            _ => half::bf16::from_bits(word(&b[i * 2..]) as u16).to_f32(),
        };
        let cols = self
            .shape
            .last()
            .copied()
            .filter(|&c| c > 0 && self.shape.len() > 1);
        let at = cols.map_or(format!("element {i}"), |c| {
            format!("row {}, column {}", i / c, i % c)
        });
        Err(Error::data(format!(
            "checkpoint tensor {} ({:?}, shape {:?}): non-finite weight {v} at {at}; the checkpoint is damaged or was saved after a diverged step",
            self.name, self.dtype, self.shape
        )))
    }

    /// Decodes F32 / F16 / BF16 into f32 after [`HostTensor::check_finite`]; any other dtype is
    /// an error naming the tensor.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        self.check_finite()?;
        let b = self.bytes();
        Ok(match self.dtype {
            Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::F16 => b.chunks_exact(2).map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect(),
            Dtype::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect(),
            other => {
                return Err(Error::data(format!(
                    "checkpoint tensor {}: dtype {other:?} is not supported (expected F32, F16 or BF16)",
                    self.name
                )))
            }
        })
    }
}
