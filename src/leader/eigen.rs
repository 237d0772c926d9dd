//! Top-k symmetric eigensolvers: dense (faer) for small `d`, and a warm-started block subspace
//! iteration with Rayleigh–Ritz for large `d`, which only needs products `C·Q` — the form that
//! distributes (each rank multiplies its local Gram, an all-reduce sums `d x m` blocks).

use crate::linalg;
use crate::rng::Rng;
use crate::Result;
use ndarray::{s, Array2, ArrayView2, Axis};

/// Top-k eigenpairs of a symmetric positive semi-definite operator.
#[derive(Clone, Debug)]
pub struct TopK {
    /// Eigenvalues, descending.
    pub values: Vec<f64>,
    /// Eigenvectors as columns (`d x k`).
    pub vectors: Array2<f64>,
    /// `‖C u_i - λ_i u_i‖ / λ_1` per pair at exit (0 for the dense solver).
    pub residuals: Vec<f64>,
    /// Operator applications used (0 for the dense solver).
    pub iterations: usize,
    /// Whether every residual reached `tol`.
    pub converged: bool,
}

/// Top-k eigenpairs of a dense symmetric matrix.
pub fn dense_top_k(c: ArrayView2<f64>, k: usize) -> Result<TopK> {
    let (values, vectors) = linalg::sym_eig_desc(c)?;
    let k = k.min(values.len());
    Ok(TopK {
        values: values[..k].iter().map(|v| v.max(0.0)).collect(),
        vectors: vectors.slice(s![.., ..k]).to_owned(),
        residuals: vec![0.0; k],
        iterations: 0,
        converged: true,
    })
}

/// Subspace block size for `k` wanted pairs: `k + max(k, 8)` extra columns speed up convergence
/// (the rate is `λ_{m+1}/λ_k` per iteration).
pub fn block_size(k: usize, d: usize) -> usize {
    (k + k.max(8)).min(d)
}

/// Block subspace iteration with Rayleigh–Ritz on `apply(Q) = C·Q`, started from the columns of
/// `start` (previous eigenvectors; random columns fill the rest of the block) or from a seeded
/// random block. Stops when every wanted residual is at most `tol · λ_1`, or after `max_iter`
/// applications.
pub fn subspace_top_k(
    apply: &mut dyn FnMut(ArrayView2<f64>) -> Result<Array2<f64>>,
    d: usize,
    k: usize,
    start: Option<ArrayView2<f64>>,
    seed: u64,
    tol: f64,
    max_iter: usize,
) -> Result<TopK> {
    let k = k.min(d);
    let m = block_size(k, d);
    let mut rng = Rng::new(&[seed, 0x5B5, d as u64, k as u64]);
    let mut q = Array2::from_shape_fn((d, m), |_| rng.normal());
    if let Some(start) = start {
        let cols = start.ncols().min(m);
        q.slice_mut(s![.., ..cols]).assign(&start.slice(s![.., ..cols]));
    }
    let mut q = linalg::orthonormalize(q.view());
    let mut best = None;
    for it in 1..=max_iter.max(1) {
        let z = apply(q.view())?;
        let h = q.t().dot(&z);
        let h = (&h + &h.t()) * 0.5;
        let (theta, w) = linalg::sym_eig_desc(h.view())?;
        let u = q.dot(&w);
        let cu = z.dot(&w);
        let scale = theta[0].abs().max(f64::MIN_POSITIVE);
        let residuals: Vec<f64> = (0..k)
            .map(|i| {
                let r = &cu.column(i) - &(&u.column(i) * theta[i]);
                r.dot(&r).sqrt() / scale
            })
            .collect();
        let converged = residuals.iter().all(|&r| r <= tol) || theta[0] <= 0.0;
        let result = TopK {
            values: theta[..k].iter().map(|v| v.max(0.0)).collect(),
            vectors: u.slice(s![.., ..k]).to_owned(),
            residuals,
            iterations: it,
            converged,
        };
        if converged || it == max_iter.max(1) {
            return Ok(result);
        }
        best = Some(result);
        q = linalg::orthonormalize(cu.view());
        // A rank-deficient C can zero whole columns; refill them so the block keeps its size.
        for mut col in q.axis_iter_mut(Axis(1)) {
            if !col.iter().all(|v| v.is_finite()) {
                col.mapv_inplace(|_| rng.normal());
            }
        }
    }
    Ok(best.expect("at least one iteration"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array1;

    /// `Q diag(w) Qᵀ` for a seeded random orthogonal Q.
    fn with_spectrum(w: &[f64], seed: u64) -> (Array2<f64>, Array2<f64>) {
        let n = w.len();
        let mut rng = Rng::new(&[seed]);
        let q = linalg::orthonormalize(Array2::from_shape_fn((n, n), |_| rng.normal()).view());
        let a = q.dot(&Array2::from_diag(&Array1::from(w.to_vec()))).dot(&q.t());
        (a, q)
    }

    fn subspace_similarity(a: ArrayView2<f64>, b: ArrayView2<f64>) -> f64 {
        let m = a.t().dot(&b);
        m.iter().map(|v| v * v).sum::<f64>() / a.ncols() as f64
    }

    fn check_invariants(a: &Array2<f64>, t: &TopK, tol: f64) {
        let k = t.values.len();
        let gram = t.vectors.t().dot(&t.vectors);
        assert!((&gram - &Array2::<f64>::eye(k)).iter().all(|v| v.abs() < 1e-10), "orthonormal");
        let av = a.dot(&t.vectors);
        for i in 0..k {
            let r = &av.column(i) - &(&t.vectors.column(i) * t.values[i]);
            assert!(r.dot(&r).sqrt() <= tol * t.values[0].max(1.0), "residual of pair {i}");
        }
        assert!(t.values.windows(2).all(|p| p[0] >= p[1]), "descending");
    }

    #[test]
    fn dense_and_iterative_agree_on_power_law() {
        let w: Vec<f64> = (0..120).map(|i| 1.0 / (i as f64 + 1.0)).collect();
        let (a, q) = with_spectrum(&w, 1);
        let dense = dense_top_k(a.view(), 10).unwrap();
        check_invariants(&a, &dense, 1e-10);
        let mut apply = |x: ArrayView2<f64>| Ok(a.dot(&x));
        let it = subspace_top_k(&mut apply, 120, 10, None, 0, 1e-10, 500).unwrap();
        assert!(it.converged);
        check_invariants(&a, &it, 1e-9);
        for i in 0..10 {
            assert!((it.values[i] - w[i]).abs() < 1e-10);
        }
        assert!(subspace_similarity(it.vectors.view(), q.slice(s![.., ..10])) > 1.0 - 1e-12);
    }

    #[test]
    fn warm_start_converges_in_fewer_iterations() {
        let w: Vec<f64> = (0..200).map(|i| (i as f64 + 1.0).powf(-0.7)).collect();
        let (a, _) = with_spectrum(&w, 2);
        let mut apply = |x: ArrayView2<f64>| Ok(a.dot(&x));
        let cold = subspace_top_k(&mut apply, 200, 8, None, 0, 1e-8, 1000).unwrap();
        // Perturb the matrix slightly, as one more step of data would.
        let (e, _) = with_spectrum(&(0..200).map(|i| 1e-4 * (i % 3) as f64).collect::<Vec<_>>(), 3);
        let b = &a + &e;
        let mut apply_b = |x: ArrayView2<f64>| Ok(b.dot(&x));
        let warm = subspace_top_k(&mut apply_b, 200, 8, Some(cold.vectors.view()), 0, 1e-8, 1000).unwrap();
        let cold_b = subspace_top_k(&mut apply_b, 200, 8, None, 0, 1e-8, 1000).unwrap();
        assert!(warm.converged && cold_b.converged);
        assert!(warm.iterations < cold_b.iterations, "warm {} vs cold {}", warm.iterations, cold_b.iterations);
        check_invariants(&b, &warm, 1e-7);
    }

    #[test]
    fn degenerate_spectra() {
        // Identity: every orthonormal block is exact.
        let a = Array2::<f64>::eye(50);
        let mut apply = |x: ArrayView2<f64>| Ok(a.dot(&x));
        let t = subspace_top_k(&mut apply, 50, 5, None, 0, 1e-12, 10).unwrap();
        assert!(t.converged && t.values.iter().all(|v| (v - 1.0).abs() < 1e-12));
        // Zero matrix.
        let z = Array2::<f64>::zeros((30, 30));
        let mut apply = |x: ArrayView2<f64>| Ok(z.dot(&x));
        let t = subspace_top_k(&mut apply, 30, 4, None, 0, 1e-12, 10).unwrap();
        assert!(t.values.iter().all(|&v| v == 0.0));
        // Rank one: the top vector is found, the rest have eigenvalue 0.
        let v = Array1::from_shape_fn(40, |i| (i as f64).sin());
        let v = &v / v.dot(&v).sqrt();
        let r1 = v.clone().insert_axis(Axis(1)).dot(&v.clone().insert_axis(Axis(0))) * 3.0;
        let mut apply = |x: ArrayView2<f64>| Ok(r1.dot(&x));
        let t = subspace_top_k(&mut apply, 40, 3, None, 0, 1e-12, 50).unwrap();
        assert!((t.values[0] - 3.0).abs() < 1e-12 && t.values[1].abs() < 1e-12);
        assert!((t.vectors.column(0).dot(&v).abs() - 1.0).abs() < 1e-12);
        let dense = dense_top_k(r1.view(), 3).unwrap();
        assert!((dense.values[0] - 3.0).abs() < 1e-12);
        // Repeated eigenvalue inside the block: the subspace, not the vectors, is determined.
        let mut w = vec![0.1; 60];
        w[..3].copy_from_slice(&[5.0, 5.0, 5.0]);
        let (a, q) = with_spectrum(&w, 4);
        let mut apply = |x: ArrayView2<f64>| Ok(a.dot(&x));
        let t = subspace_top_k(&mut apply, 60, 3, None, 0, 1e-12, 100).unwrap();
        assert!(subspace_similarity(t.vectors.view(), q.slice(s![.., ..3])) > 1.0 - 1e-12);
    }
}
