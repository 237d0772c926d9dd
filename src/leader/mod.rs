//! The leader: turns reduced statistics into eigenpairs, tests convergence, redistributes ranks
//! globally and decides which inputs keep accumulating.
//!
//! | module | role |
//! |---|---|
//! | [`eigen`] | dense and warm-started iterative top-k eigensolvers |
//! | [`convergence`] | sign-free similarity of consecutive estimates |
//! | [`allocate`] | PEFT's global rank redistribution |

pub mod allocate;
pub mod convergence;
pub mod eigen;

use crate::config::EvaParams;
use crate::source::Catalog;
use crate::stats::sketch::Nystrom;
use crate::stats::Moments;
use crate::Result;
use ndarray::{Array2, ArrayView2};

/// Inputs up to this dimension use the dense eigensolver (a few ms at 512; the iterative solver
/// needs hundreds of iterations for the final tolerance on flat spectra).
pub const DENSE_MAX_DIM: usize = 512;

/// Relative residual below which a step's eigenpair counts as solved; a pair above it is never
/// taken as converged (a stalled warm-started iteration would otherwise look stable).
pub const STEP_TOLERANCE: f64 = 1e-4;

/// Subspace iterations per step at most: the next step continues from where this one stopped
/// (warm start), and pairs whose residual is still above [`STEP_TOLERANCE`] do not count as
/// converged, so a cap bounds the time and bytes of a step without faking convergence.
pub const STEP_ITERATIONS: usize = 12;

/// How accurately the eigenpairs are wanted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// During the steps: enough for the convergence test (residual ≤ [`STEP_TOLERANCE`]`·λ₁`).
    Step,
    /// For the adapter: residual ≤ 1e-9·λ₁ (angle error ≤ 1e-5 for a relative gap of 1e-4),
    /// dense fallback if the iteration stalls.
    Final,
}

impl Precision {
    fn tolerance(self) -> (f64, usize) {
        match self {
            Precision::Step => (STEP_TOLERANCE, STEP_ITERATIONS),
            Precision::Final => (1e-9, 400),
        }
    }
}

/// What the numbers in a spectrum are certified to.
#[derive(Clone, Debug, PartialEq)]
pub enum Certificate {
    /// Exact covariance; `residual` = `max ‖C u - λ u‖ / λ₁` of the returned pairs.
    Exact { residual: f64 },
    /// Nyström sketch of `sketch_size` columns; see [`crate::stats::sketch::Nystrom`].
    Sketch { sketch_size: usize, nuclear_error: f64, spectral_bound: f64 },
}

/// Top eigenpairs of one input's sample covariance.
#[derive(Clone, Debug)]
pub struct Spectrum {
    /// Covariance eigenvalues, descending (`kmax` of them).
    pub values: Vec<f64>,
    /// Eigenvectors as columns (`d x kmax`).
    pub vectors: Array2<f64>,
    /// Eigensolver residual of each pair relative to λ₁ (0 when solved densely or from a sketch).
    pub residuals: Vec<f64>,
    /// Trace of the covariance (total variance).
    pub trace: f64,
    /// Tokens the statistics hold.
    pub tokens: u64,
    /// Accuracy certificate.
    pub certificate: Certificate,
}

impl Spectrum {
    /// Explained-variance ratios `λ_i / trace C`.
    pub fn ratios(&self) -> Vec<f64> {
        let t = self.trace;
        self.values.iter().map(|&v| if t > 0.0 { v / t } else { 0.0 }).collect()
    }

    /// Upper bound on the error of each explained-variance ratio (0 for exact statistics).
    pub fn ratio_error_bound(&self) -> f64 {
        match self.certificate {
            Certificate::Exact { .. } => 0.0,
            Certificate::Sketch { nuclear_error, spectral_bound, .. } => {
                if self.trace > 0.0 {
                    nuclear_error.min(spectral_bound) / self.trace
                } else {
                    0.0
                }
            }
        }
    }

    /// Top `kmax` eigenpairs of the covariance from products `apply(Q) = G·Q` with the
    /// (uncentered, shifted) Gram; `moments` centers them. `dense` gives the covariance itself
    /// for small `d` and as the fallback when the iteration stalls at [`Precision::Final`].
    pub fn from_gram(
        apply: &mut dyn FnMut(ArrayView2<f64>) -> Result<Array2<f64>>,
        dense: &mut dyn FnMut() -> Result<Array2<f64>>,
        moments: &Moments,
        kmax: usize,
        warm: Option<ArrayView2<f64>>,
        precision: Precision,
    ) -> Result<Spectrum> {
        let d = moments.sum.len();
        let trace = moments.covariance_trace();
        let top = if d <= DENSE_MAX_DIM {
            eigen::dense_top_k(dense()?.view(), kmax)?
        } else {
            let (tol, max_iter) = precision.tolerance();
            let mut cov = |q: ArrayView2<f64>| -> Result<Array2<f64>> {
                let mut gq = apply(q)?;
                moments.center(&mut gq, q);
                Ok(gq)
            };
            let top = eigen::subspace_top_k(&mut cov, d, kmax, warm, d as u64, tol, max_iter)?;
            if !top.converged && precision == Precision::Final {
                eigen::dense_top_k(dense()?.view(), kmax)?
            } else {
                top
            }
        };
        let residual = top.residuals.iter().copied().fold(0.0, f64::max);
        Ok(Spectrum {
            values: top.values,
            vectors: top.vectors,
            residuals: top.residuals,
            trace,
            tokens: moments.n,
            certificate: Certificate::Exact { residual },
        })
    }

    /// Top `kmax` eigenpairs of a Nyström approximation from a sketch of `sketch_size` columns
    /// over `tokens` tokens.
    pub fn from_sketch(ny: &Nystrom, sketch_size: usize, tokens: u64, kmax: usize) -> Result<Spectrum> {
        let k = kmax.min(ny.values.len());
        Ok(Spectrum {
            values: ny.values[..k].to_vec(),
            vectors: ny.vectors.slice(ndarray::s![.., ..k]).to_owned(),
            residuals: vec![0.0; k],
            trace: ny.trace,
            tokens,
            certificate: Certificate::Sketch { sketch_size, nuclear_error: ny.nuclear_error, spectral_bound: ny.spectral_bound },
        })
    }
}

/// The leader's view of one unique input.
#[derive(Clone, Debug, Default)]
pub struct InputState {
    /// Latest estimate.
    pub spectrum: Option<Spectrum>,
    /// Similarity of each component to the estimate before it.
    pub similarity: Vec<f64>,
    /// `similarity ≥ tau` per component.
    pub converged: Vec<bool>,
    /// All components up to the group's allocated rank have converged.
    pub done: bool,
    /// The step (1-based) after which the input became done, if it is done.
    pub converged_step: Option<usize>,
    /// Steps in which the input accumulated data.
    pub steps_accumulated: usize,
}

/// The leader's per-step decision, broadcast to every rank.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Inputs that accumulate during the next step.
    pub active: Vec<bool>,
    /// Every input is done (early stopping may end the run).
    pub all_done: bool,
}

/// Convergence and allocation state across steps.
pub struct Leader {
    catalog: Catalog,
    cap: usize,
    budget: usize,
    tau: f64,
    early_stop: bool,
    /// Per unique input.
    pub states: Vec<InputState>,
    /// Current rank per layer (catalog order); `cap` for all before the first allocation, as in PEFT.
    pub ranks: Vec<usize>,
}

impl Leader {
    /// A leader for `catalog` with PEFT's knobs; `early_stop = false` keeps every input active.
    pub fn new(catalog: &Catalog, params: &EvaParams, early_stop: bool) -> Self {
        let cap = params.max_components();
        Leader {
            catalog: catalog.clone(),
            cap,
            budget: params.rank * catalog.layers.len(),
            tau: params.tau,
            early_stop,
            states: vec![InputState::default(); catalog.inputs.len()],
            ranks: catalog.layers.iter().map(|l| cap.min(l.in_features)).collect(),
        }
    }

    /// Candidate components of an input: `min(round(r·rho), d)`.
    pub fn kmax(&self, input: usize) -> usize {
        self.cap.min(self.catalog.inputs[input].dim)
    }

    /// Records the new estimate of an input that accumulated data this step.
    pub fn observe(&mut self, input: usize, spectrum: Spectrum) -> Result<()> {
        let state = &mut self.states[input];
        state.steps_accumulated += 1;
        state.similarity = match &state.spectrum {
            Some(prev) => convergence::similarities(prev.vectors.view(), spectrum.vectors.view(), &spectrum.values)?,
            None => vec![0.0; spectrum.values.len()],
        };
        state.converged = state.similarity.iter().zip(&spectrum.residuals).map(|(&s, &r)| s >= self.tau && r <= STEP_TOLERANCE).collect();
        state.spectrum = Some(spectrum);
        Ok(())
    }

    /// Re-allocates ranks from the latest estimates (once every input has one).
    pub fn allocate(&mut self) {
        let ratios: Option<Vec<Vec<f64>>> = self.states.iter().map(|s| s.spectrum.as_ref().map(Spectrum::ratios)).collect();
        if let Some(ratios) = ratios {
            self.ranks = allocate::redistribute(&self.catalog, &ratios, self.cap, self.budget);
        }
    }

    /// Allocates, then marks inputs done or reopened after step `step` (1-based) and says which
    /// inputs accumulate next.
    pub fn decide(&mut self, step: usize) -> Decision {
        self.allocate();
        for (i, input) in self.catalog.inputs.iter().enumerate() {
            let needed = input.members.iter().map(|&m| self.ranks[m]).max().unwrap_or(0);
            let state = &mut self.states[i];
            let done = state.spectrum.is_some() && state.converged.len() >= needed && state.converged[..needed].iter().all(|&c| c);
            if done && !state.done {
                state.converged_step = Some(step);
            } else if !done {
                state.converged_step = None;
            }
            state.done = done;
        }
        let all_done = self.states.iter().all(|s| s.done);
        let active = self.states.iter().map(|s| !self.early_stop || !s.done).collect();
        Decision { active, all_done }
    }

    /// Replaces every estimate with its final one and allocates ranks from them.
    pub fn finalize(&mut self, spectra: Vec<Spectrum>) {
        for (state, spectrum) in self.states.iter_mut().zip(spectra) {
            state.spectrum = Some(spectrum);
        }
        self.allocate();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spectrum(values: &[f64], vectors: Array2<f64>) -> Spectrum {
        Spectrum { values: values.to_vec(), vectors, residuals: vec![0.0; values.len()], trace: 1.0, tokens: 100, certificate: Certificate::Exact { residual: 0.0 } }
    }

    /// Two inputs of d = 4, r = 1, rho = 2 (cap 2, budget 2).
    fn leader() -> Leader {
        let catalog = Catalog::new(vec![("a".into(), 4, 4), ("b".into(), 4, 4)], vec![vec![0], vec![1]]);
        let params = EvaParams { rank: 1, rho: 2.0, ..EvaParams::default() };
        Leader::new(&catalog, &params, true)
    }

    #[test]
    fn converged_inputs_stop_and_reopen_when_their_rank_grows() {
        let mut l = leader();
        let e = Array2::<f64>::eye(4);
        let e2 = e.slice(ndarray::s![.., ..2]).to_owned();
        // Step 1: first estimates, nothing converged yet.
        l.observe(0, spectrum(&[0.5, 0.1], e2.clone())).unwrap();
        l.observe(1, spectrum(&[0.3, 0.2], e2.clone())).unwrap();
        let d = l.decide(1);
        assert_eq!(l.ranks, vec![1, 1]);
        assert_eq!(d.active, vec![true, true]);
        // Step 2: input 0's first component rotates away (not converged); input 1's first
        // component is stable and its second moved. Input 1 needs rank 1 only: it is done.
        let mut moved = e2.clone();
        moved.column_mut(0).assign(&e.column(3));
        l.observe(0, spectrum(&[0.5, 0.1], moved)).unwrap();
        let mut moved = e2.clone();
        moved.column_mut(1).assign(&e.column(2));
        l.observe(1, spectrum(&[0.3, 0.2], moved)).unwrap();
        let d = l.decide(2);
        assert_eq!(l.ranks, vec![1, 1]);
        assert_eq!(d.active, vec![true, false]);
        assert_eq!(l.states[1].converged_step, Some(2));
        // Step 3: only input 0 accumulates; its ratios drop, so input 1's second (unconverged)
        // component enters the budget: input 1 reopens, input 0 falls to rank 0 and is done.
        l.observe(0, spectrum(&[0.15, 0.1], e2.clone())).unwrap();
        let d = l.decide(3);
        assert_eq!(l.ranks, vec![0, 2]);
        assert_eq!(d.active, vec![false, true]);
        assert_eq!(l.states[1].converged_step, None);
        assert_eq!(l.states[0].converged_step, Some(3));
        assert!(!d.all_done);
    }

    #[test]
    fn without_early_stop_every_input_stays_active() {
        let mut l = leader();
        l.early_stop = false;
        let e2 = Array2::<f64>::eye(4).slice(ndarray::s![.., ..2]).to_owned();
        for step in 1..=2 {
            l.observe(0, spectrum(&[0.5, 0.1], e2.clone())).unwrap();
            l.observe(1, spectrum(&[0.3, 0.2], e2.clone())).unwrap();
            let d = l.decide(step);
            assert_eq!(d.active, vec![true, true]);
        }
        assert!(l.states.iter().all(|s| s.done));
    }
}
