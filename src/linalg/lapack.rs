//! LAPACK `xsyevr` (OpenBLAS exports it): the top eigenpairs of a symmetric matrix without the
//! others ([`sym_eig_top`]), in f64 or f32 ([`Syevr`]).

use super::int;
use crate::{Error, Result};
use ndarray::Array2;

/// LAPACK `xsyevr` (OpenBLAS exports it; Fortran ABI: every argument by pointer, then the hidden
/// lengths of the three character arguments).
macro_rules! syevr_decl {
    ($name:ident, $t:ty) => {
        fn $name(
            jobz: *const std::os::raw::c_char,
            range: *const std::os::raw::c_char,
            uplo: *const std::os::raw::c_char,
            n: *const i32,
            a: *mut $t,
            lda: *const i32,
            vl: *const $t,
            vu: *const $t,
            il: *const i32,
            iu: *const i32,
            abstol: *const $t,
            m: *mut i32,
            w: *mut $t,
            z: *mut $t,
            ldz: *const i32,
            isuppz: *mut i32,
            work: *mut $t,
            lwork: *const i32,
            iwork: *mut i32,
            liwork: *const i32,
            info: *mut i32,
            jobz_len: usize,
            range_len: usize,
            uplo_len: usize,
        );
    };
}

extern "C" {
    syevr_decl!(dsyevr_, f64);
    syevr_decl!(ssyevr_, f32);
}

/// Scalar types with a LAPACK `xsyevr`.
pub trait Syevr: Copy + Default + Into<f64> {
    /// # Safety
    /// The pointers must satisfy LAPACK's `xsyevr` contract.
    #[allow(clippy::too_many_arguments)]
    unsafe fn syevr(
        n: i32,
        a: *mut Self,
        il: i32,
        iu: i32,
        m: *mut i32,
        w: *mut Self,
        z: *mut Self,
        isuppz: *mut i32,
        work: *mut Self,
        lwork: i32,
        iwork: *mut i32,
        liwork: i32,
        info: *mut i32,
    );
    /// Converts a LAPACK workspace size returned in `work[0]`.
    fn to_len(self) -> usize;
}

macro_rules! syevr_impl {
    ($t:ty, $f:ident) => {
        impl Syevr for $t {
            unsafe fn syevr(
                n: i32,
                a: *mut Self,
                il: i32,
                iu: i32,
                m: *mut i32,
                w: *mut Self,
                z: *mut Self,
                isuppz: *mut i32,
                work: *mut Self,
                lwork: i32,
                iwork: *mut i32,
                liwork: i32,
                info: *mut i32,
            ) {
                let (jobz, range, uplo) = (
                    b'V' as std::os::raw::c_char,
                    b'I' as std::os::raw::c_char,
                    b'L' as std::os::raw::c_char,
                );
                let (zero, abstol) = (0.0 as $t, 0.0 as $t);
                $f(
                    &jobz, &range, &uplo, &n, a, &n, &zero, &zero, &il, &iu, &abstol, m, w, z, &n,
                    isuppz, work, &lwork, iwork, &liwork, info, 1, 1, 1,
                );
            }
            fn to_len(self) -> usize {
                self as usize
            }
        }
    };
}
syevr_impl!(f64, dsyevr_);
syevr_impl!(f32, ssyevr_);

/// Top `k` eigenpairs of a symmetric `d x d` matrix of which the upper triangle (row-major; the
/// rest is not read) is given, by LAPACK `xsyevr` with `RANGE = 'I'`: Householder
/// tridiagonalization (`4/3·d³` flops, the bulk of the time), then only the wanted eigenpairs of
/// the tridiagonal matrix (bisection and inverse iteration), instead of all `d` eigenvectors.
/// Eigenvalues descending, eigenvectors as columns (`d x k`), in f64 whatever `T`. `a` is
/// overwritten. In f32 (`ssyevr`) the pairs carry f32 rounding: residuals ~1e-7·‖C‖.
///
/// Bisection may find fewer than `k` eigenvalues in a tight cluster (LAPACK's `xstebz`, INFO = 3:
/// "non-monotonic arithmetic"; `xsyevr` then returns fewer pairs with INFO = 0; seen with
/// `ssyevr` on Intel Xeon in OpenBLAS 0.3.21). LAPACK's cure is applied then: all eigenpairs
/// (`IL = 1, IU = d`, the MRRR path), of which the top `k` are kept. The matrix for that retry is
/// a copy kept in the triangle LAPACK does not read, so no second `d²` buffer is needed.
pub fn sym_eig_top<T: Syevr>(a: &mut [T], d: usize, k: usize) -> Result<(Vec<f64>, Array2<f64>)> {
    assert_eq!(a.len(), d * d, "syevr: matrix has the wrong size");
    let k = k.min(d);
    if k == 0 {
        return Ok((Vec::new(), Array2::zeros((d, 0))));
    }
    // xsyevr returns NaN eigenpairs, or none, for a matrix with a NaN or an infinity.
    if (0..d).any(|i| {
        a[i * d + i..(i + 1) * d]
            .iter()
            .any(|&v| !v.into().is_finite())
    }) {
        return Err(Error::Numeric {
            op: "symmetric eigendecomposition (xsyevr)",
            detail: format!("the {d} x {d} matrix has non-finite entries"),
        });
    }
    // LAPACK reads (and destroys) the column-major lower triangle, i.e. the row-major upper one
    // with the diagonal; the strict row-major lower triangle keeps a copy, the diagonal aside.
    let diag: Vec<T> = (0..d).map(|i| a[i * d + i]).collect();
    for i in 0..d {
        for j in i + 1..d {
            a[j * d + i] = a[i * d + j];
        }
    }
    let (values, vectors) = syevr_range(a, d, d - k + 1, d)?;
    if values.len() == k {
        return Ok((values, vectors));
    }
    for i in 0..d {
        a[i * d + i] = diag[i];
        for j in i + 1..d {
            a[i * d + j] = a[j * d + i];
        }
    }
    let (values, vectors) = syevr_range(a, d, 1, d)?;
    if values.len() < k {
        return Err(Error::Numeric {
            op: "symmetric eigendecomposition (xsyevr)",
            detail: format!(
                "found {} of the {k} largest eigenpairs of a {d} x {d} matrix",
                values.len()
            ),
        });
    }
    Ok((
        values[..k].to_vec(),
        vectors.slice(ndarray::s![.., ..k]).to_owned(),
    ))
}

/// The eigenpairs `il..=iu` (1-based, ascending order) of the upper triangle by `xsyevr`, as
/// many as it found: eigenvalues descending, eigenvectors as columns. `a` is overwritten.
fn syevr_range<T: Syevr>(
    a: &mut [T],
    d: usize,
    il: usize,
    iu: usize,
) -> Result<(Vec<f64>, Array2<f64>)> {
    let k = iu + 1 - il;
    let n = int(d, "syevr")?;
    let fail = |info: i32| Error::Numeric {
        op: "symmetric eigendecomposition (xsyevr)",
        detail: format!("info = {info} (n = {d}, eigenpairs {il}..={iu})"),
    };
    let (il, iu) = (int(il, "syevr")?, int(iu, "syevr")?);
    let (mut found, mut info) = (0i32, 0i32);
    let mut w = vec![T::default(); d];
    let mut z = vec![T::default(); d * k];
    let mut isuppz = vec![0i32; 2 * k];
    // Workspace query.
    let (mut lw, mut liw) = (T::default(), 0i32);
    // SAFETY: sizes as documented for xsyevr; lwork = liwork = -1 only writes the optimal sizes.
    unsafe {
        T::syevr(
            n,
            a.as_mut_ptr(),
            il,
            iu,
            &mut found,
            w.as_mut_ptr(),
            z.as_mut_ptr(),
            isuppz.as_mut_ptr(),
            &mut lw,
            -1,
            &mut liw,
            -1,
            &mut info,
        )
    };
    if info != 0 {
        return Err(fail(info));
    }
    let lwork = lw.to_len().max(26 * d);
    let liwork = (liw as usize).max(10 * d);
    let mut work = vec![T::default(); lwork];
    let mut iwork = vec![0i32; liwork];
    // SAFETY: a is n*n (lda = n), z is n*k (ldz = n, k columns wanted), isuppz 2k, work/iwork sized.
    unsafe {
        T::syevr(
            n,
            a.as_mut_ptr(),
            il,
            iu,
            &mut found,
            w.as_mut_ptr(),
            z.as_mut_ptr(),
            isuppz.as_mut_ptr(),
            work.as_mut_ptr(),
            int(lwork, "syevr")?,
            iwork.as_mut_ptr(),
            int(liwork, "syevr")?,
            &mut info,
        )
    };
    if info != 0 || found < 0 || found as usize > k {
        return Err(fail(if info != 0 { info } else { -1000 - found }));
    }
    // LAPACK returns ascending eigenvalues and column-major eigenvectors (column c at z[c*d..]).
    let m = found as usize;
    let values = (0..m).rev().map(|c| w[c].into()).collect();
    let vectors = Array2::from_shape_fn((d, m), |(i, j)| z[(m - 1 - j) * d + i].into());
    Ok((values, vectors))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::noise;

    /// `sym_eig_top` reads only the upper triangle (the strict lower part holds NaN here) and
    /// gives the top pairs of the full range, which is what its retry computes.
    #[test]
    fn syevr_top_pairs_match_the_full_range() {
        let d = 40;
        let x = noise(3 * d * d, 7);
        let mut sym = vec![0f64; d * d];
        for i in 0..d {
            for j in 0..d {
                sym[i * d + j] = (0..3 * d)
                    .map(|t| f64::from(x[t * d + i]) * f64::from(x[t * d + j]))
                    .sum();
            }
        }
        let mut upper = sym.clone();
        for i in 0..d {
            for j in 0..i {
                upper[i * d + j] = f64::NAN;
            }
        }
        let (top, vectors) = sym_eig_top(&mut upper, d, 5).unwrap();
        let (all, all_vectors) = syevr_range(&mut sym, d, 1, d).unwrap();
        assert_eq!(all.len(), d);
        for i in 0..5 {
            assert!((top[i] - all[i]).abs() <= 1e-10 * all[0], "value {i}");
            let dot: f64 = (0..d).map(|r| vectors[(r, i)] * all_vectors[(r, i)]).sum();
            assert!((dot.abs() - 1.0).abs() < 1e-8, "vector {i}: {dot}");
        }
    }

    /// A matrix with an infinity is an error naming the solve, not a panic: xsyevr finds no
    /// eigenvalue there, and the retry over the full range finds none either.
    #[test]
    fn a_non_finite_matrix_is_an_error() {
        let d = 6;
        let mut a: Vec<f64> = (0..d * d).map(|i| (i % 7) as f64).collect();
        a[2 * d + 3] = f64::INFINITY;
        let e = sym_eig_top(&mut a, d, 2).unwrap_err().to_string();
        assert!(e.contains("xsyevr") && e.contains("non-finite"), "{e}");
    }
}
