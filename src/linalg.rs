//! Dense linear-algebra helpers: BLAS kernels the hot paths call directly (`ssyrk`, `dsymm`)
//! and the faer decompositions the leader needs, on row-major `ndarray` matrices.

use crate::{Error, Result};
use cblas_sys::{CBLAS_LAYOUT, CBLAS_SIDE, CBLAS_TRANSPOSE, CBLAS_UPLO};
use ndarray::{Array2, ArrayView2};

extern "C" {
    fn openblas_set_num_threads(n: std::os::raw::c_int);
}

/// Sets the number of threads OpenBLAS and faer use (0 = all available cores).
pub fn set_threads(n: usize) {
    let n = if n == 0 {
        std::thread::available_parallelism().map(|v| v.get()).unwrap_or(1)
    } else {
        n
    };
    // SAFETY: OpenBLAS allows changing its thread count between calls.
    unsafe { openblas_set_num_threads(n as std::os::raw::c_int) };
    faer::set_global_parallelism(match std::num::NonZeroUsize::new(n) {
        Some(v) if n > 1 => faer::Par::Rayon(v),
        _ => faer::Par::Seq,
    });
}

fn int(n: usize, what: &'static str) -> Result<i32> {
    i32::try_from(n).map_err(|_| Error::Numeric { op: what, detail: format!("dimension {n} exceeds the BLAS 32-bit limit") })
}

/// `out[i,j] += (xᵀx)[i,j]` for `j ≥ i` (upper triangle of a row-major `d x d` f64 matrix).
/// The product is formed by `ssyrk` in `scratch` (f32, `d x d`) and added in f64.
pub fn syrk_accumulate(x: ArrayView2<f32>, scratch: &mut Vec<f32>, out: &mut [f64]) -> Result<()> {
    let (n, d) = x.dim();
    assert_eq!(out.len(), d * d, "Gram buffer has the wrong size");
    if n == 0 {
        return Ok(());
    }
    let x = x.as_standard_layout();
    let xs = x.as_slice().expect("standard layout is contiguous");
    scratch.resize(d * d, 0.0);
    // SAFETY: `xs` is n*d row-major, `scratch` d*d; leading dimensions match.
    unsafe {
        cblas_sys::cblas_ssyrk(
            CBLAS_LAYOUT::CblasRowMajor,
            CBLAS_UPLO::CblasUpper,
            CBLAS_TRANSPOSE::CblasTrans,
            int(d, "ssyrk")?,
            int(n, "ssyrk")?,
            1.0,
            xs.as_ptr(),
            int(d, "ssyrk")?,
            0.0,
            scratch.as_mut_ptr(),
            int(d, "ssyrk")?,
        );
    }
    for i in 0..d {
        let (src, dst) = (&scratch[i * d + i..(i + 1) * d], &mut out[i * d + i..(i + 1) * d]);
        for (o, s) in dst.iter_mut().zip(src) {
            *o += *s as f64;
        }
    }
    Ok(())
}

/// `G·Q` for a symmetric `G` of which only the upper triangle (row-major `d x d`) is valid.
pub fn symm_upper(g: &[f64], d: usize, q: ArrayView2<f64>) -> Result<Array2<f64>> {
    let (rows, m) = q.dim();
    assert_eq!(rows, d, "symm: Q has {rows} rows, G is {d} x {d}");
    let q = q.as_standard_layout();
    let mut out = Array2::<f64>::zeros((d, m));
    if d == 0 || m == 0 {
        return Ok(out);
    }
    // SAFETY: g is d*d, q and out are d*m, all row-major.
    unsafe {
        cblas_sys::cblas_dsymm(
            CBLAS_LAYOUT::CblasRowMajor,
            CBLAS_SIDE::CblasLeft,
            CBLAS_UPLO::CblasUpper,
            int(d, "dsymm")?,
            int(m, "dsymm")?,
            1.0,
            g.as_ptr(),
            int(d, "dsymm")?,
            q.as_slice().expect("contiguous").as_ptr(),
            int(m, "dsymm")?,
            0.0,
            out.as_slice_mut().expect("contiguous").as_mut_ptr(),
            int(m, "dsymm")?,
        );
    }
    Ok(out)
}

/// Copies a row-major ndarray matrix into a faer matrix.
pub fn to_faer(a: ArrayView2<f64>) -> faer::Mat<f64> {
    faer::Mat::from_fn(a.nrows(), a.ncols(), |i, j| a[(i, j)])
}

/// Copies a faer matrix into a row-major ndarray matrix.
pub fn from_faer(a: faer::MatRef<'_, f64>) -> Array2<f64> {
    Array2::from_shape_fn((a.nrows(), a.ncols()), |(i, j)| a[(i, j)])
}

/// An orthonormal basis of the columns of `a` (thin QR; `a` has at least as many rows as columns).
pub fn orthonormalize(a: ArrayView2<f64>) -> Array2<f64> {
    let qr = to_faer(a).qr();
    from_faer(qr.compute_thin_Q().as_ref())
}

/// Eigen-decomposition of a symmetric matrix, eigenvalues in descending order and the matching
/// eigenvectors as columns.
pub fn sym_eig_desc(a: ArrayView2<f64>) -> Result<(Vec<f64>, Array2<f64>)> {
    let n = a.nrows();
    let evd = to_faer(a)
        .self_adjoint_eigen(faer::Side::Lower)
        .map_err(|e| Error::Numeric { op: "symmetric eigendecomposition", detail: format!("{e:?} (n = {n})") })?;
    let s = evd.S().column_vector();
    let u = evd.U();
    let values = (0..n).rev().map(|i| s[i]).collect();
    let vectors = Array2::from_shape_fn((n, n), |(i, j)| u[(i, n - 1 - j)]);
    Ok((values, vectors))
}

/// Thin SVD `a = U diag(s) Vᵀ`: returns `(U, s)`, singular values descending.
pub fn thin_svd_left(a: ArrayView2<f64>) -> Result<(Array2<f64>, Vec<f64>)> {
    let svd = to_faer(a)
        .thin_svd()
        .map_err(|e| Error::Numeric { op: "thin SVD", detail: format!("{e:?} (shape {:?})", a.dim()) })?;
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

/// Largest singular value of a small matrix.
pub fn spectral_norm(a: ArrayView2<f64>) -> Result<f64> {
    if a.is_empty() {
        return Ok(0.0);
    }
    let s = to_faer(a)
        .singular_values()
        .map_err(|e| Error::Numeric { op: "singular values", detail: format!("{e:?}") })?;
    Ok(s.first().copied().unwrap_or(0.0))
}

/// Smallest singular value of a small square matrix.
pub fn smallest_singular_value(a: ArrayView2<f64>) -> Result<f64> {
    if a.is_empty() {
        return Ok(1.0);
    }
    let s = to_faer(a)
        .singular_values()
        .map_err(|e| Error::Numeric { op: "singular values", detail: format!("{e:?}") })?;
    Ok(s.last().copied().unwrap_or(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn syrk_and_symm_match_plain_products() {
        let x = array![[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.5], [-1.0, 0.5, 2.0], [0.0, 1.0, -3.0]];
        let mut g = vec![0.0; 9];
        let mut scratch = Vec::new();
        syrk_accumulate(x.view(), &mut scratch, &mut g).unwrap();
        syrk_accumulate(x.view(), &mut scratch, &mut g).unwrap();
        let xd = x.mapv(|v| v as f64);
        let full = xd.t().dot(&xd) * 2.0;
        for i in 0..3 {
            for j in i..3 {
                assert!((g[i * 3 + j] - full[(i, j)]).abs() < 1e-9);
            }
        }
        let q = array![[1.0, 0.0], [0.5, 2.0], [-1.0, 1.0]];
        let gq = symm_upper(&g, 3, q.view()).unwrap();
        let want = full.dot(&q);
        assert!((&gq - &want).iter().all(|v| v.abs() < 1e-9));
    }

    #[test]
    fn eig_is_descending_and_reconstructs() {
        let a = array![[4.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 1.0]];
        let (w, v) = sym_eig_desc(a.view()).unwrap();
        assert!(w[0] >= w[1] && w[1] >= w[2]);
        let rec = v.dot(&Array2::from_diag(&ndarray::Array1::from(w))).dot(&v.t());
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
