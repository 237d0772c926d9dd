//! Dense decompositions of small f64 matrices on row-major `ndarray`s: faer's QR, symmetric
//! eigendecomposition, SVD and Cholesky; the triangular solve; CholQR2 (two BLAS-3 passes instead
//! of a Householder QR).

use crate::{Error, Result};
use ndarray::{Array2, ArrayView2};

/// Orthonormal basis of the columns of a tall `a` (`d x m`, `d ≥ m`) by Cholesky QR, twice
/// (CholQR2: Yamamoto, Nakatsukasa, Yanagisawa & Fukaya, "Roundoff error analysis of the
/// CholeskyQR2 algorithm", ETNA 44, 2015): `R = chol(AᵀA)`, `Q = A R⁻¹`, repeated once on `Q`.
/// Two `d x m x m` BLAS-3 passes instead of a Householder QR; orthogonal to f64 rounding when
/// `cond(A) ≲ 1e7` (the first pass squares the condition number). Returns `None` when a Cholesky
/// factorization fails or the first pass is too far from orthogonal (`‖Q₁ᵀQ₁ − I‖_max > 0.5`):
/// the caller then falls back to Householder QR ([`orthonormalize_householder`]).
///
/// Each pass is two GEMMs (`QᵀQ`, then `Q·L⁻ᵀ` with the explicit inverse of the small factor,
/// [`solve_right_lower_transpose`] of the identity): at 576 x 32 OpenBLAS's `dtrsm` and the
/// strided in-place normalization of the columns took most of the time (`benches/leader.rs`:
/// 0.4 → 0.1 ms).
pub fn cholqr2(a: ArrayView2<f64>) -> Option<Array2<f64>> {
    let (d, m) = a.dim();
    if m == 0 || d < m {
        return None;
    }
    // Unit columns first (the span is the same, and the condition number CholQR is sensitive to
    // no longer includes the columns' scales: a Chebyshev-filtered block's differ by up to 1e6),
    // folded into the first pass: with `D` the column norms, `chol(D⁻¹AᵀAD⁻¹) = LLᵀ` and
    // `Q₁ = A·D⁻¹L⁻ᵀ`.
    let g = a.t().dot(&a);
    let inv_norm: Vec<f64> = g.diag().iter().map(|&v| 1.0 / v.sqrt()).collect();
    if !inv_norm.iter().all(|v| v.is_finite()) {
        return None;
    }
    let g = Array2::from_shape_fn((m, m), |(i, j)| g[(i, j)] * inv_norm[i] * inv_norm[j]);
    let mut r_inv = inverse_transpose(cholesky_lower(g.view())?.view());
    for (mut row, s) in r_inv.rows_mut().into_iter().zip(&inv_norm) {
        row *= *s;
    }
    let q = a.dot(&r_inv);
    let g = q.t().dot(&q);
    let off = g
        .indexed_iter()
        .map(|((i, j), v)| (v - if i == j { 1.0 } else { 0.0 }).abs())
        .fold(0.0, f64::max);
    if off.is_nan() || off > 0.5 {
        return None;
    }
    let q = q.dot(&inverse_transpose(cholesky_lower(g.view())?.view()));
    q.iter().all(|v| v.is_finite()).then_some(q)
}

/// `L⁻ᵀ` for a lower-triangular `L`: the `X` with `X Lᵀ = I`.
fn inverse_transpose(l: ArrayView2<f64>) -> Array2<f64> {
    solve_right_lower_transpose(Array2::eye(l.nrows()).view(), l)
}

/// Copies a row-major ndarray matrix into a faer matrix.
fn to_faer(a: ArrayView2<f64>) -> faer::Mat<f64> {
    faer::Mat::from_fn(a.nrows(), a.ncols(), |i, j| a[(i, j)])
}

/// Copies a faer matrix into a row-major ndarray matrix.
fn from_faer(a: faer::MatRef<'_, f64>) -> Array2<f64> {
    Array2::from_shape_fn((a.nrows(), a.ncols()), |(i, j)| a[(i, j)])
}

/// An orthonormal basis of the columns of `a` by Householder QR (faer's thin QR; `a` has at least
/// as many rows as columns): stable whatever the conditioning, unlike [`cholqr2`].
pub fn orthonormalize_householder(a: ArrayView2<f64>) -> Array2<f64> {
    let qr = to_faer(a).qr();
    from_faer(qr.compute_thin_Q().as_ref())
}

/// Eigen-decomposition of a symmetric matrix, eigenvalues in descending order and the matching
/// eigenvectors as columns.
pub fn sym_eig_desc(a: ArrayView2<f64>) -> Result<(Vec<f64>, Array2<f64>)> {
    let n = a.nrows();
    let evd = to_faer(a)
        .self_adjoint_eigen(faer::Side::Lower)
        .map_err(|e| Error::Numeric {
            op: "symmetric eigendecomposition",
            detail: format!("{e:?} (n = {n})"),
        })?;
    let s = evd.S().column_vector();
    let u = evd.U();
    let values = (0..n).rev().map(|i| s[i]).collect();
    let vectors = Array2::from_shape_fn((n, n), |(i, j)| u[(i, n - 1 - j)]);
    Ok((values, vectors))
}

/// Thin SVD `a = U diag(s) Vᵀ`: returns `(U, s)`, singular values descending.
pub fn thin_svd_left(a: ArrayView2<f64>) -> Result<(Array2<f64>, Vec<f64>)> {
    let svd = to_faer(a).thin_svd().map_err(|e| Error::Numeric {
        op: "thin SVD",
        detail: format!("{e:?} (shape {:?})", a.dim()),
    })?;
    let s = svd.S().column_vector();
    Ok((from_faer(svd.U()), (0..s.nrows()).map(|i| s[i]).collect()))
}

/// Lower Cholesky factor `L` of a symmetric positive-definite matrix, or `None` if it is not.
pub fn cholesky_lower(a: ArrayView2<f64>) -> Option<Array2<f64>> {
    let llt = to_faer(a).llt(faer::Side::Lower).ok()?;
    Some(from_faer(llt.L()))
}

/// Solves `X Lᵀ = B` for `X` with a lower-triangular `L` (i.e. `X = B L⁻ᵀ`), row by row.
pub fn solve_right_lower_transpose(b: ArrayView2<f64>, l: ArrayView2<f64>) -> Array2<f64> {
    let (rows, k) = b.dim();
    let mut x = Array2::<f64>::zeros((rows, k));
    for r in 0..rows {
        // Row r of X satisfies L x_rᵀ = b_rᵀ: forward substitution.
        for i in 0..k {
            let mut v = b[(r, i)];
            for j in 0..i {
                v -= l[(i, j)] * x[(r, j)];
            }
            x[(r, i)] = v / l[(i, i)];
        }
    }
    x
}

/// Smallest singular value of a small square matrix.
pub fn smallest_singular_value(a: ArrayView2<f64>) -> Result<f64> {
    if a.is_empty() {
        return Ok(1.0);
    }
    let s = to_faer(a).singular_values().map_err(|e| Error::Numeric {
        op: "singular values",
        detail: format!("{e:?}"),
    })?;
    Ok(s.last().copied().unwrap_or(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    /// `L⁻ᵀ` (CholQR2's inverse) is upper triangular and `L·(L⁻ᵀ)ᵀ = I` to rounding, for a
    /// well-conditioned factor and for one with a 1e-4 diagonal entry.
    #[test]
    fn inverse_transpose_inverts() {
        let mut rng = crate::rng::Rng::new(&[7]);
        for small in [1.0, 1e-4] {
            let m = 12;
            let mut l = Array2::from_shape_fn((m, m), |(i, j)| match i.cmp(&j) {
                std::cmp::Ordering::Greater => rng.normal(),
                std::cmp::Ordering::Equal => 1.0 + rng.normal().abs(),
                std::cmp::Ordering::Less => 0.0,
            });
            l[(5, 5)] = small;
            let x = inverse_transpose(l.view());
            assert!(x.indexed_iter().all(|((i, j), &v)| i <= j || v == 0.0));
            let err = (&l.dot(&x.t()) - &Array2::<f64>::eye(m))
                .iter()
                .fold(0.0f64, |a, v| a.max(v.abs()));
            assert!(err < 1e-10 / small, "max |L·X − I| = {err:e}");
        }
    }

    #[test]
    fn eig_is_descending_and_reconstructs() {
        let a = array![[4.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 1.0]];
        let (w, v) = sym_eig_desc(a.view()).unwrap();
        assert!(w[0] >= w[1] && w[1] >= w[2]);
        let rec = v
            .dot(&Array2::from_diag(&ndarray::Array1::from(w)))
            .dot(&v.t());
        assert!((&rec - &a).iter().all(|e| e.abs() < 1e-12));
    }

    #[test]
    fn triangular_solve_inverts_cholesky() {
        let a = array![[4.0, 2.0], [2.0, 3.0]];
        let l = cholesky_lower(a.view()).unwrap();
        let b = array![[1.0, 2.0], [3.0, -1.0], [0.5, 0.25]];
        let x = solve_right_lower_transpose(b.view(), l.view());
        let back = x.dot(&l.t());
        assert!((&back - &b).iter().all(|e| e.abs() < 1e-12));
        assert!(cholesky_lower(array![[1.0, 2.0], [2.0, 1.0]].view()).is_none());
    }
}
