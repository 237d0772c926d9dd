//! Nyström sketch (Tropp, Yurtsever, Udell & Cevher, NeurIPS 2017): `Y = G[Ω Θ]` for a seeded
//! orthonormal Gaussian test matrix `Ω` (`d x k`) and `q` Gaussian probe columns `Θ`, identical
//! on every rank. The leader centers it with a rank-one correction, reconstructs the top
//! eigenpairs stably and certifies the error (docs/numerics.md).

use super::{Moments, Workspace, PROBES};
use crate::device::blocks::CHUNK_ROWS;
use crate::linalg;
use crate::rng::Rng;
use crate::{Error, Result};
use ndarray::{s, Array2, ArrayView2};

/// Allowance added to both certificates, relative to the trace, for the f32 rounding of the
/// products `X[Ω Θ]` and `Xᵀ(X[Ω Θ])` and the shift ν (measured rounding: ≤ 3e-8 of the trace).
pub const ROUNDING_SLACK: f64 = 1e-6;

/// Sketch statistics of one unique input.
#[derive(Clone)]
pub struct SketchStats {
    k: usize,
    reference: Vec<f32>,
    /// Count and sums of shifted rows.
    pub moments: Moments,
    /// `[Ω Θ]` in f64 (`d x (k+q)`), for the leader.
    test: Array2<f64>,
    /// `[Ω Θ]` in f32, for the products.
    test32: Array2<f32>,
    /// `Σ (x-c)ᵀ((x-c)[Ω Θ])`, f64.
    y: Array2<f64>,
}

/// The Nyström approximation `Ĉ = U diag(λ̂) Uᵀ` of the covariance and its certificates.
#[derive(Clone, Debug)]
pub struct Nystrom {
    /// Eigenvalues of `Ĉ`, descending (`k` of them); each is ≤ the true one.
    pub values: Vec<f64>,
    /// Eigenvectors of `Ĉ` as columns (`d x k`).
    pub vectors: Array2<f64>,
    /// Trace of the true covariance.
    pub trace: f64,
    /// `trace C - Σ λ̂ = ‖C - Ĉ‖_*` (exact in exact arithmetic, since `0 ≼ Ĉ ≼ C`), plus
    /// [`ROUNDING_SLACK`]` · trace`.
    pub nuclear_error: f64,
    /// `10·sqrt(2/π)·max_j ‖(C - Ĉ)θ_j‖ ≥ ‖C - Ĉ‖₂` with probability ≥ 1 - 10^-q
    /// (Halko, Martinsson & Tropp 2011, Lemma 4.1), plus [`ROUNDING_SLACK`]` · trace`.
    pub spectral_bound: f64,
}

impl Nystrom {
    /// `min(spectral bound, nuclear error)`: bounds `‖C - Ĉ‖₂`, so every true eigenvalue
    /// `λ_i ∈ [λ̂_i, λ̂_i + ε]` (Weyl).
    pub fn error_bound(&self) -> f64 {
        self.spectral_bound.min(self.nuclear_error)
    }
}

impl SketchStats {
    /// Empty sketch of `k` columns around `reference`; the test matrix is drawn from `seed` and
    /// `stream` (e.g. a hash of the layer name, so it does not depend on which layers are targeted).
    pub fn new(reference: Vec<f32>, k: usize, seed: u64, stream: u64) -> Self {
        let d = reference.len();
        let k = k.min(d).max(1);
        let mut rng = Rng::new(&[seed, 0x5EED, stream]);
        let omega = Array2::from_shape_fn((d, k), |_| rng.normal());
        let omega = linalg::orthonormalize_householder(omega.view());
        let mut test = Array2::<f64>::zeros((d, k + PROBES));
        test.slice_mut(s![.., ..k]).assign(&omega);
        test.slice_mut(s![.., k..]).mapv_inplace(|_| rng.normal());
        let test32 = test.mapv(|v| v as f32);
        SketchStats {
            k,
            reference,
            moments: Moments::new(d),
            y: Array2::zeros((d, k + PROBES)),
            test,
            test32,
        }
    }

    /// Sketch columns (without probes).
    pub fn size(&self) -> usize {
        self.k
    }

    /// The shift `c` of the rows.
    pub fn reference(&self) -> &[f32] {
        &self.reference
    }

    /// Replaces the count, sums and sketch with saved ones (same shapes).
    pub fn restore(&mut self, moments: Moments, y: Array2<f64>) {
        assert_eq!(
            moments.sum.len(),
            self.reference.len(),
            "moments of another dimension"
        );
        assert_eq!(y.dim(), self.y.dim(), "sketch of another shape");
        self.moments = moments;
        self.y = y;
    }

    /// The test matrix `[Ω Θ]` in f32 (`d x (k+q)`), as the products use it.
    pub fn test32(&self) -> &Array2<f32> {
        &self.test32
    }

    /// These statistics with the sums replaced (e.g. by those copied from a GPU); `y` is
    /// row-major `d x (k+q)`.
    pub fn with_sums(mut self, moments: Moments, y: Vec<f64>) -> Self {
        let y = Array2::from_shape_vec(self.y.dim(), y).expect("d x (k+q) sums");
        self.restore(moments, y);
        self
    }

    /// Adds rows (`tokens x d`).
    pub fn accumulate(&mut self, x: ArrayView2<f32>, ws: &mut Workspace) -> Result<()> {
        for start in (0..x.nrows()).step_by(CHUNK_ROWS) {
            let chunk = x.slice(s![start..(start + CHUNK_ROWS).min(x.nrows()), ..]);
            self.moments
                .add_shifted(chunk, &self.reference, &mut ws.shifted);
            // Two tiled products with fixed tile shapes (so the f32 results do not depend on the
            // thread count): `P = X[Ω Θ]` by row tiles of X, then `Y += XᵀP` by tiles of Y's
            // rows (column blocks of X); X is read twice in all.
            let x = &ws.shifted;
            let (n, d) = x.dim();
            let rows = linalg::tiles(n, 512);
            let p_parts = linalg::par_map(rows.len(), |t| {
                x.slice(s![rows[t].clone(), ..]).dot(&self.test32)
            });
            let p = ndarray::concatenate(
                ndarray::Axis(0),
                &p_parts.iter().map(|a| a.view()).collect::<Vec<_>>(),
            )
            .expect("same columns");
            let cols = linalg::tiles(d, 256);
            let y_parts =
                linalg::par_map(cols.len(), |t| x.slice(s![.., cols[t].clone()]).t().dot(&p));
            for (c, yc) in cols.iter().zip(&y_parts) {
                self.y
                    .slice_mut(s![c.clone(), ..])
                    .zip_mut_with(yc, |a, &b| *a += b as f64);
            }
        }
        Ok(())
    }

    /// The local sketch `Σ (x-c)ᵀ((x-c)[Ω Θ])` (`d x (k+q)`), e.g. to all-reduce it.
    pub fn sketch(&self) -> &Array2<f64> {
        &self.y
    }

    /// Stable Nyström reconstruction of these statistics alone.
    pub fn nystrom(&self) -> Result<Nystrom> {
        self.nystrom_from(&self.moments, &self.y)
    }

    /// Stable Nyström reconstruction (shift of Frangella, Tropp & Udell 2023) from summed
    /// moments and sketch, using this input's test matrix.
    pub fn nystrom_from(&self, moments: &Moments, y: &Array2<f64>) -> Result<Nystrom> {
        let (d, k) = (self.test.nrows(), self.k);
        let trace = moments.covariance_trace();
        let mut cy = y.clone();
        moments.center(&mut cy, self.test.view());
        let (cy_omega, cy_probe) = (cy.slice(s![.., ..k]), cy.slice(s![.., k..]));
        let omega = self.test.slice(s![.., ..k]);
        let norm = cy_omega.iter().map(|v| v * v).sum::<f64>().sqrt();
        let mut nu = (d as f64).sqrt() * f64::EPSILON * norm.max(f64::MIN_POSITIVE);
        let (u, sigma) = loop {
            let y_nu = &cy_omega + &(&omega * nu);
            let b = omega.t().dot(&y_nu);
            let b = (&b + &b.t()) * 0.5;
            if let Some(l) = linalg::cholesky_lower(b.view()) {
                let f = linalg::solve_right_lower_transpose(y_nu.view(), l.view());
                break linalg::thin_svd_left(f.view())?;
            }
            nu *= 10.0;
            if !nu.is_finite() || nu > norm.max(1.0) {
                return Err(Error::Numeric {
                    op: "Nyström reconstruction",
                    detail: format!("Cholesky failed for every shift up to {nu:e}"),
                });
            }
        };
        let values: Vec<f64> = sigma.iter().map(|s| (s * s - nu).max(0.0)).collect();
        let captured: f64 = values.iter().sum();
        // Probe residuals (C - Ĉ)θ_j = Cθ_j - U diag(λ̂) Uᵀθ_j.
        let probes = self.test.slice(s![.., k..]);
        let mut coeff = u.t().dot(&probes);
        for (mut row, &l) in coeff.rows_mut().into_iter().zip(&values) {
            row *= l;
        }
        let resid = &cy_probe - &u.dot(&coeff);
        let max_probe = resid
            .columns()
            .into_iter()
            .map(|c| c.dot(&c).sqrt())
            .fold(0.0, f64::max);
        let slack = ROUNDING_SLACK * trace;
        Ok(Nystrom {
            values,
            vectors: u,
            trace,
            nuclear_error: (trace - captured).max(0.0) + slack,
            spectral_bound: 10.0 * (2.0 / std::f64::consts::PI).sqrt() * max_probe + slack,
        })
    }
}
