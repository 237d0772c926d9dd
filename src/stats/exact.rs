//! Exact statistics: the Gram `Σ (x-c)(x-c)ᵀ` of shifted rows, formed per chunk by `ssyrk`
//! (f32 products over at most `CHUNK_ROWS` rows) and summed in f64.

use super::{Moments, Workspace};
use crate::device::blocks::CHUNK_ROWS;
use crate::linalg;
use crate::Result;
use ndarray::{Array2, ArrayView2};

/// Exact Gram statistics of one unique input.
#[derive(Clone)]
pub struct ExactStats {
    d: usize,
    reference: Vec<f32>,
    /// Count and sums of shifted rows.
    pub moments: Moments,
    /// Upper triangle of `Σ (x-c)(x-c)ᵀ`, row-major `d x d`.
    gram: Vec<f64>,
}

impl ExactStats {
    /// Empty statistics around the reference vector `reference` (length `d`).
    pub fn new(reference: Vec<f32>) -> Self {
        let d = reference.len();
        ExactStats {
            d,
            reference,
            moments: Moments::new(d),
            gram: vec![0.0; d * d],
        }
    }

    /// Adds rows (`tokens x d`).
    pub fn accumulate(&mut self, x: ArrayView2<f32>, ws: &mut Workspace) -> Result<()> {
        for start in (0..x.nrows()).step_by(CHUNK_ROWS) {
            let chunk = x.slice(ndarray::s![start..(start + CHUNK_ROWS).min(x.nrows()), ..]);
            self.moments
                .add_shifted(chunk, &self.reference, &mut ws.shifted);
            linalg::syrk_accumulate(ws.shifted.view(), &mut ws.product, &mut self.gram)?;
        }
        Ok(())
    }

    /// Statistics with these sums (e.g. copied from a GPU): `gram` is row-major `d x d` with at
    /// least its upper triangle valid.
    pub fn from_parts(reference: Vec<f32>, moments: Moments, gram: Vec<f64>) -> Self {
        let d = reference.len();
        assert!(
            gram.len() == d * d && moments.sum.len() == d,
            "ExactStats::from_parts: parts of dimension {d} expected"
        );
        ExactStats {
            d,
            reference,
            moments,
            gram,
        }
    }

    /// The shift `c` of the rows.
    pub fn reference(&self) -> &[f32] {
        &self.reference
    }

    /// Replaces the count, sums and Gram with saved ones (`packed`: the upper triangle as
    /// [`pack_upper`] writes it, `d(d+1)/2` values), in the Gram's own buffer.
    pub fn restore(&mut self, moments: Moments, packed: &[f64]) {
        assert_eq!(moments.sum.len(), self.d, "moments of another dimension");
        assert_eq!(
            packed.len(),
            self.d * (self.d + 1) / 2,
            "triangle of another size"
        );
        self.moments = moments;
        unpack_upper(packed, self.d, &mut self.gram);
    }

    /// Dimension.
    pub fn dim(&self) -> usize {
        self.d
    }

    /// `G·Q` for the Gram of shifted rows (`Q` is `d x m`); [`Moments::center`] turns it into `C·Q`.
    pub fn gram_apply(&self, q: ArrayView2<f64>) -> Result<Array2<f64>> {
        linalg::symm_upper(&self.gram, self.d, q)
    }

    /// Upper triangle of the local Gram (row-major `d x d`), e.g. to all-reduce it.
    pub fn gram(&self) -> &[f64] {
        &self.gram
    }

    /// The dense sample covariance (`d x d`) of these statistics alone.
    pub fn covariance(&self) -> Array2<f64> {
        Array2::from_shape_vec(
            (self.d, self.d),
            covariance_full(&self.gram, self.d, &self.moments, |v| v),
        )
        .expect("d x d values")
    }
}

/// Appends the upper triangle of a row-major `d x d` matrix, row by row (`d(d+1)/2` values).
pub fn pack_upper(full: &[f64], d: usize, out: &mut Vec<f64>) {
    for i in 0..d {
        out.extend_from_slice(&full[i * d + i..(i + 1) * d]);
    }
}

/// Writes a packed upper triangle (see [`pack_upper`]) into `full`, returning what follows it.
pub fn unpack_upper<'a>(packed: &'a [f64], d: usize, full: &mut [f64]) -> &'a [f64] {
    let mut rest = packed;
    for i in 0..d {
        let len = d - i;
        full[i * d + i..(i + 1) * d].copy_from_slice(&rest[..len]);
        rest = &rest[len..];
    }
    rest
}

/// The centered covariance `(G − s sᵀ/n) / (n − 1)`, full and symmetric (row-major `d x d`), from
/// the upper triangle of a row-major Gram, converted by `conv` (to f32 for the step's operator).
/// Full rather than a triangle because the products with it are GEMMs: at d = 1536, m = 32
/// (2 Zen 2 cores) `dgemm` 6.6 ms against `dsymm` + centering 10.7 ms, `sgemm` 3.5 ms against
/// `ssymm` 5.1 ms. The upper triangle is computed row by row (contiguous, vectorized), then
/// mirrored in 64 x 64 tiles, each read and written while in cache.
pub fn covariance_full<T: Copy + Default>(
    g: &[f64],
    d: usize,
    moments: &Moments,
    conv: impl Fn(f64) -> T,
) -> Vec<T> {
    const TILE: usize = 64;
    let n = moments.n as f64;
    let scale = 1.0 / (n - 1.0);
    let s = &moments.sum;
    let sn: Vec<f64> = s.iter().map(|v| v / n).collect();
    let mut c = vec![T::default(); d * d];
    for i in 0..d {
        let (row, gi, sj) = (
            &mut c[i * d + i..(i + 1) * d],
            &g[i * d + i..(i + 1) * d],
            &s[i..],
        );
        for ((c, &g), &sj) in row.iter_mut().zip(gi).zip(sj) {
            *c = conv((g - sn[i] * sj) * scale);
        }
    }
    for i0 in (0..d).step_by(TILE) {
        for j0 in (0..i0).step_by(TILE) {
            // Rows i0.. of columns j0.. (below the diagonal) from rows j0.. of columns i0...
            for i in i0..(i0 + TILE).min(d) {
                for j in j0..(j0 + TILE).min(d) {
                    c[i * d + j] = c[j * d + i];
                }
            }
        }
        // The diagonal tile's lower part.
        for i in i0..(i0 + TILE).min(d) {
            for j in i0..i {
                c[i * d + j] = c[j * d + i];
            }
        }
    }
    c
}
