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

use crate::catalog::Catalog;
use crate::config::EvaParams;
use crate::linalg;
use crate::stats::sketch::Nystrom;
use crate::stats::{exact, Moments};
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

/// Largest `d` for which a solve on a local Gram forms the centered covariance as a full matrix
/// (f32 at Step, f64 at Final) for GEMM products: a transient `4·d²` or `8·d²` bytes (67 or
/// 134 MB at 4096) next to the `8·d²` of the Gram. Larger inputs multiply the Gram's triangle in
/// place (`dsymm` and the rank-one centering), as the iteration did before.
pub const COPY_MAX_DIM: usize = 4096;

/// An input is **degenerate** when the trace of its covariance (its total variance) is at most
/// this fraction of its rows' mean squared norm `Σ‖x‖²/n` (uncentered): its rows agree to about
/// `sqrt(1e-10)` = 1e-5 of their norm (RMS), in the first 17 of f32's 24 significant bits. Rows
/// that are one vector give exactly 0 here (the shift is that vector, so the shifted rows are
/// zeros); rows that differ by f32 rounding — a forward pass that rounds the same input
/// differently, `k` units in the last place per entry — give about `(k·2⁻²⁴)²`: 4e-15 for one
/// ulp, 1e-10 for ~170 ulps RMS. Data that varies, even little next to its mean, lies far
/// above: an input of the exact-PCA test, with a mean of about 100 per coordinate and a total
/// variance of 2.6 over `d = 600`, has 4.3e-7 (real layer inputs: 1e-2 and more). Noise of a bf16
/// computation (2⁻⁹ relative per entry) can reach 4e-6 and is not told apart from data: bf16
/// activations that differ only by rounding count as varying. A degenerate input (e.g.
/// every example cut to the same first token by `--max-seq-len 1`) has no directions to offer:
/// its explained-variance ratios would be `0/0` or rounding noise, so it gets no components and
/// rank 0 for every layer of its group, and is named in the warning and the report.
pub const DEGENERATE_RTOL: f64 = 1e-10;

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
    Sketch {
        sketch_size: usize,
        nuclear_error: f64,
        spectral_bound: f64,
    },
}

/// How the leader reaches an input's summed Gram (uncentered, of shifted rows).
pub enum Gram<'a> {
    /// Held here (shared by the all-reduce, or a world of one): the upper triangle of a row-major
    /// `d x d` matrix.
    Local(&'a [f64]),
    /// Spread over the ranks (large `d`): `apply(Q) = Σ_r G_r·Q` products with every rank, and
    /// `all_reduce()` the Gram summed over the ranks (upper triangle, row-major `d x d`) for the
    /// dense solver.
    Remote {
        apply: &'a mut dyn FnMut(ArrayView2<f64>) -> Result<Array2<f64>>,
        all_reduce: &'a mut dyn FnMut() -> Result<Vec<f64>>,
    },
}

/// `Q ↦ C·Q` for one solve.
type Operator<'a> = Box<dyn FnMut(ArrayView2<f64>) -> Result<Array2<f64>> + 'a>;

/// Produces the full covariance (row-major `d x d`) for a dense solve.
type Fetch<'a> = Box<dyn FnMut() -> Result<Vec<f64>> + 'a>;

/// The numbers of one input's top eigenpairs, without the vectors: what the global leader
/// needs for the rank redistribution and the report.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Covariance eigenvalues, descending (`kmax` of them).
    pub values: Vec<f64>,
    /// Eigensolver residual of each pair relative to λ₁ (0 when solved densely or from a sketch).
    pub residuals: Vec<f64>,
    /// Trace of the covariance (total variance).
    pub trace: f64,
    /// Tokens the statistics hold.
    pub tokens: u64,
    /// Mean squared norm of the rows, uncentered (`Σ‖x‖²/n`): the scale [`DEGENERATE_RTOL`] is
    /// relative to (set by the engine from the moments and the shift; 0 when unknown, and then
    /// only a zero trace is degenerate).
    pub second_moment: f64,
    /// Accuracy certificate.
    pub certificate: Certificate,
}

impl Summary {
    /// Explained-variance ratios `λ_i / trace C`; all 0 for a degenerate input
    /// ([`Summary::is_degenerate`]), whose ratios would be `0/0` or rounding noise. A NaN or
    /// infinite value stays as it is (the allocation never offers it).
    pub fn ratios(&self) -> Vec<f64> {
        if self.is_degenerate() {
            return vec![0.0; self.values.len()];
        }
        self.values.iter().map(|&v| v / self.trace).collect()
    }

    /// Whether the input has no variance beyond rounding: `trace C ≤`
    /// [`DEGENERATE_RTOL`]` · Σ‖x‖²/n`; also when the trace is not finite (statistics that
    /// overflowed have nothing to offer either).
    pub fn is_degenerate(&self) -> bool {
        let floor = DEGENERATE_RTOL * self.second_moment;
        !self.trace.is_finite() || self.trace <= floor || floor.is_nan()
    }

    /// `trace C / (Σ‖x‖²/n)`: the fraction of the rows' mean squared norm that varies (`None`
    /// when the second moment is unknown or zero).
    pub fn relative_variance(&self) -> Option<f64> {
        (self.second_moment > 0.0).then(|| self.trace / self.second_moment)
    }

    /// Upper bound on the error of each explained-variance ratio (0 for exact statistics).
    pub fn ratio_error_bound(&self) -> f64 {
        match self.certificate {
            Certificate::Exact { .. } => 0.0,
            Certificate::Sketch {
                nuclear_error,
                spectral_bound,
                ..
            } => {
                if self.trace > 0.0 {
                    nuclear_error.min(spectral_bound) / self.trace
                } else {
                    0.0
                }
            }
        }
    }

    /// The estimator's name in reports.
    pub fn estimator(&self) -> &'static str {
        match self.certificate {
            Certificate::Exact { .. } => "exact",
            Certificate::Sketch { .. } => "sketch",
        }
    }
}

/// Top eigenpairs of one input's sample covariance.
#[derive(Clone, Debug)]
pub struct Spectrum {
    /// Eigenvectors as columns (`d x kmax`).
    pub vectors: Array2<f64>,
    /// Their eigenvalues and certificates.
    pub summary: Summary,
}

/// What a stage leader tells the global leader about one input after a solve: the numbers of
/// the estimate and which components are stable (similar enough to the previous estimate and
/// solved to the step tolerance).
#[derive(Clone, Debug, PartialEq)]
pub struct Estimate {
    /// Per component: converged.
    pub converged: Vec<bool>,
    /// The estimate's numbers.
    pub summary: Summary,
}

impl Spectrum {
    /// Top `kmax` eigenpairs of the covariance of an input from its (uncentered, shifted) Gram;
    /// `moments` center it. `warm` holds the previous solve's basis of this input, if any: the
    /// iteration starts from it, and it is replaced by this solve's basis.
    ///
    /// | precision | Gram | `d ≤` [`DENSE_MAX_DIM`] | larger `d` |
    /// |---|---|---|---|
    /// | Step | local | subspace iteration on the f32 covariance (`sgemm`); `ssyevr` on it if the iteration stops at the cap | the same iteration, its result as it is at the cap |
    /// | Step | remote | `dsyevr` on the all-reduced Gram | subspace iteration on centered `Σ_r G_r·Q` products |
    /// | Final | local | `dsyevr` | subspace iteration on the f64 covariance (`dgemm`), `dsyevr` if it stalls |
    /// | Final | remote | `dsyevr` on the all-reduced Gram | iteration on centered products, `dsyevr` on the all-reduced Gram if it stalls |
    ///
    /// Above [`COPY_MAX_DIM`] a local Gram is used like a remote one, through centered `dsymm`
    /// products, at both precisions.
    ///
    /// At Step, small inputs are tried iteratively first: warm-started, a few products of
    /// `d x d` by `d x 32` in f32 take ~1 ms at d = 384 against 5.8 ms for `ssyevr` (10 ms
    /// `dsyevr`, 18 ms faer's full decomposition). `ssyevr` only runs when the iteration does not
    /// reach [`STEP_TOLERANCE`] within [`STEP_ITERATIONS`] products, so a small input's step
    /// estimate is, as before, always solved to the step tolerance.
    ///
    /// In f32 the covariance is rounded once (relative `6e-8` per entry) and the products carry f32
    /// sums: the operator differs from `C` by `‖E‖₂ ≲ 1e-6·λ₁` for `d ≤ 4096` (`‖E‖_F` over `d`
    /// rows of f32 dot products, `‖C‖_F ≤ √d·λ₁`), so the residuals the step test reads (computed
    /// with the f32 operator, also for `ssyevr`'s pairs) are honest to ~1e-6·λ₁, 100 times below
    /// [`STEP_TOLERANCE`]. Eigenvectors differ from f64 ones by ~1e-6 over the relative gap, far
    /// below what moves a similarity across `tau`. The final pairs are always f64.
    pub fn from_gram(
        gram: Gram<'_>,
        moments: &Moments,
        kmax: usize,
        warm: &mut Option<Array2<f64>>,
        precision: Precision,
    ) -> Result<Spectrum> {
        let d = moments.sum.len();
        let trace = moments.covariance_trace();
        let (tol, max_iter) = precision.tolerance();
        let start = warm.take();
        let start = start.as_ref().map(|w| w.view());
        let top = match (gram, precision) {
            (Gram::Local(g), Precision::Step) if d <= COPY_MAX_DIM => {
                let c32 = exact::covariance_full(g, d, moments, |v| v as f32);
                let mut apply = |q: ArrayView2<f64>| linalg::gemm_square(&c32, d, q);
                let top =
                    eigen::subspace_top_k(&mut apply, d, kmax, start, d as u64, tol, max_iter)?;
                if d <= DENSE_MAX_DIM && !top.converged {
                    let mut top = eigen::dense_top_k_upper(&mut c32.clone(), d, kmax)?;
                    top.residuals = eigen::residuals(
                        apply(top.vectors.view())?.view(),
                        top.vectors.view(),
                        &top.values,
                    );
                    top
                } else {
                    top
                }
            }
            (gram, _) => {
                // Local: the full f64 covariance, formed once (a transient `8·d²` bytes), for
                // `dgemm` products and the dense solvers. Remote: centered products.
                let (mut apply, mut dense): (Operator<'_>, Fetch<'_>) = match gram {
                    Gram::Local(g) if d > COPY_MAX_DIM => (
                        Box::new(move |q: ArrayView2<f64>| {
                            let mut gq = linalg::symm_upper(g, d, q)?;
                            moments.center(&mut gq, q);
                            Ok(gq)
                        }),
                        Box::new(move || Ok(exact::covariance_full(g, d, moments, |v| v))),
                    ),
                    Gram::Local(g) => {
                        let c = std::rc::Rc::new(exact::covariance_full(g, d, moments, |v| v));
                        let c2 = c.clone();
                        (
                            Box::new(move |q| linalg::gemm_square(&c, d, q)),
                            Box::new(move || Ok(c2.to_vec())),
                        )
                    }
                    Gram::Remote { apply, all_reduce } => (
                        Box::new(move |q: ArrayView2<f64>| {
                            let mut gq = apply(q)?;
                            moments.center(&mut gq, q);
                            Ok(gq)
                        }),
                        Box::new(move || {
                            Ok(exact::covariance_full(&all_reduce()?, d, moments, |v| v))
                        }),
                    ),
                };
                if d <= DENSE_MAX_DIM {
                    eigen::dense_top_k_upper(&mut dense()?, d, kmax)?
                } else {
                    let top = eigen::subspace_top_k(
                        &mut *apply,
                        d,
                        kmax,
                        start,
                        d as u64,
                        tol,
                        max_iter,
                    )?;
                    if !top.converged && precision == Precision::Final {
                        eigen::dense_top_k_upper(&mut dense()?, d, kmax)?
                    } else {
                        top
                    }
                }
            }
        };
        *warm = Some(top.basis);
        let residual = top.residuals.iter().copied().fold(0.0, f64::max);
        Ok(Spectrum {
            vectors: top.vectors,
            summary: Summary {
                values: top.values,
                residuals: top.residuals,
                trace,
                tokens: moments.n,
                second_moment: 0.0,
                certificate: Certificate::Exact { residual },
            },
        })
    }

    /// The components of an expert routed too few tokens (`tokens ≤ kmax`) to have `kmax`
    /// directions of its own: PEFT's default `lora_A` initialization (`kaiming_uniform_` with
    /// `a = √5`, uniform in `±1/√d`), drawn from a stream seeded by `seed` and the layer's name, as
    /// columns. Its summary explains no variance (degenerate), so it offers no rank and follows
    /// its parameter's other experts.
    pub fn fallback(d: usize, kmax: usize, tokens: u64, seed: u64, name: &str) -> Spectrum {
        let mut rng = crate::rng::Rng::new(&[seed, crate::rng::name_key(name)]);
        let bound = 1.0 / (d as f64).sqrt();
        let vectors = Array2::from_shape_fn((d, kmax), |_| (2.0 * rng.uniform() - 1.0) * bound);
        Spectrum {
            vectors,
            summary: Summary {
                values: vec![0.0; kmax],
                residuals: vec![0.0; kmax],
                trace: 0.0,
                tokens,
                second_moment: 0.0,
                certificate: Certificate::Exact { residual: 0.0 },
            },
        }
    }

    /// Top `kmax` eigenpairs of a Nyström approximation from a sketch of `sketch_size` columns
    /// over `tokens` tokens.
    pub fn from_sketch(
        ny: &Nystrom,
        sketch_size: usize,
        tokens: u64,
        kmax: usize,
    ) -> Result<Spectrum> {
        let k = kmax.min(ny.values.len());
        Ok(Spectrum {
            vectors: ny.vectors.slice(ndarray::s![.., ..k]).to_owned(),
            summary: Summary {
                values: ny.values[..k].to_vec(),
                residuals: vec![0.0; k],
                trace: ny.trace,
                tokens,
                second_moment: 0.0,
                certificate: Certificate::Sketch {
                    sketch_size,
                    nuclear_error: ny.nuclear_error,
                    spectral_bound: ny.spectral_bound,
                },
            },
        })
    }
}

/// A stage leader's memory of its inputs' previous estimates, for the convergence test.
pub struct Tracker {
    tau: f64,
    previous: Vec<Option<Array2<f64>>>,
}

impl Tracker {
    /// No estimates yet, for `inputs` unique inputs and threshold `tau`.
    pub fn new(inputs: usize, tau: f64) -> Self {
        Tracker {
            tau,
            previous: vec![None; inputs],
        }
    }

    /// Compares a new estimate of `input` with the previous one (sign-free similarity, principal
    /// angles in clusters) and keeps it: component `i` is converged when its similarity is at
    /// least `tau` and its residual at most [`STEP_TOLERANCE`] (a first estimate converges nothing).
    pub fn observe(&mut self, input: usize, spectrum: Spectrum) -> Result<Estimate> {
        let s = &spectrum.summary;
        let similarity = match &self.previous[input] {
            Some(prev) => {
                convergence::similarities(prev.view(), spectrum.vectors.view(), &s.values)?
            }
            None => vec![0.0; s.values.len()],
        };
        let converged = similarity
            .iter()
            .zip(&s.residuals)
            .map(|(&sim, &r)| sim >= self.tau && r <= STEP_TOLERANCE)
            .collect();
        self.previous[input] = Some(spectrum.vectors);
        Ok(Estimate {
            converged,
            summary: spectrum.summary,
        })
    }

    /// The previous estimate's vectors of every input (a checkpoint saves them).
    pub fn previous(&self) -> &[Option<Array2<f64>>] {
        &self.previous
    }

    /// Replaces the previous estimates with saved ones (one per input).
    pub fn restore(&mut self, previous: Vec<Option<Array2<f64>>>) {
        assert_eq!(
            previous.len(),
            self.previous.len(),
            "estimates of another catalog"
        );
        self.previous = previous;
    }
}

/// The leader's view of one unique input.
#[derive(Clone, Debug, Default)]
pub struct InputState {
    /// Explained-variance ratios of the latest estimate.
    pub ratios: Option<Vec<f64>>,
    /// Tokens of the latest estimate.
    pub tokens: u64,
    /// Per component of the latest estimate: converged ([`Tracker::observe`]).
    pub converged: Vec<bool>,
    /// All components up to the group's allocated rank have converged.
    pub done: bool,
    /// The step (1-based) after which the input became done, if it is done.
    pub converged_step: Option<usize>,
    /// The latest estimate found no variance ([`Summary::is_degenerate`]): the input gets no
    /// components, is never done (it keeps accumulating while the run goes on, in case later
    /// data varies) and does not hold the run up. Set from every estimate, so a checkpoint
    /// need not save it (a resumed run re-estimates it before the next decision).
    pub degenerate: bool,
}

/// The leader's per-step decision, broadcast to every rank.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Inputs that accumulate statistics during the next step.
    pub accumulate: Vec<bool>,
    /// Inputs re-estimated and tested for convergence after the next step: those not done (all
    /// of them without early stopping).
    pub test: Vec<bool>,
    /// Every input is done (early stopping may end the run).
    pub all_done: bool,
}

impl Decision {
    /// The decision before the first step: every input accumulates and is tested.
    pub fn first(inputs: usize) -> Self {
        Decision {
            accumulate: vec![true; inputs],
            test: vec![true; inputs],
            all_done: false,
        }
    }
}

/// Convergence and allocation state across steps.
pub struct Leader {
    catalog: Catalog,
    /// Candidate components per layer ([`allocate::caps`]).
    caps: Vec<usize>,
    budget: usize,
    early_stop: bool,
    refine_converged: bool,
    /// Per unique input.
    pub states: Vec<InputState>,
    /// Current rank per layer (catalog order); its cap before the first allocation, as in PEFT.
    pub ranks: Vec<usize>,
}

impl Leader {
    /// A leader for `catalog` with PEFT's knobs. `early_stop = false` tests every input at every
    /// step. Done inputs stop accumulating, as in PEFT, unless `refine_converged`: then they keep
    /// accumulating, untested, until the run stops.
    pub fn new(
        catalog: &Catalog,
        params: &EvaParams,
        early_stop: bool,
        refine_converged: bool,
    ) -> Self {
        let caps = allocate::caps(catalog, params);
        Leader {
            catalog: catalog.clone(),
            ranks: caps.clone(),
            caps,
            budget: allocate::budget(catalog, params),
            early_stop,
            refine_converged,
            states: vec![InputState::default(); catalog.inputs.len()],
        }
    }

    /// Candidate components of an input: `min(round(r_l·rho), d)`, the same for all its layers.
    pub fn kmax(&self, input: usize) -> usize {
        allocate::input_cap(&self.catalog, &self.caps, input)
    }

    /// Candidate components per layer ([`allocate::caps`]).
    pub fn caps(&self) -> &[usize] {
        &self.caps
    }

    /// The rank budget ([`allocate::budget`]).
    pub fn budget(&self) -> usize {
        self.budget
    }

    /// Records a stage leader's estimate of an input that was tested this step.
    pub fn observe(&mut self, input: usize, estimate: Estimate) {
        let state = &mut self.states[input];
        state.ratios = Some(estimate.summary.ratios());
        state.tokens = estimate.summary.tokens;
        state.degenerate = estimate.summary.is_degenerate();
        state.converged = estimate.converged;
    }

    /// Whether input `g` is an expert's (its layer is a slice of a 3-D parameter): such an input
    /// may see too few routed tokens to be estimated, and then neither holds the allocation nor
    /// the run up (it follows its parameter's other experts).
    fn is_expert(&self, g: usize) -> bool {
        self.catalog.layers[self.catalog.representative(g)]
            .param
            .is_some()
    }

    /// Re-allocates ranks from the latest estimates (once every input has one; an expert's
    /// input without one offers nothing).
    pub fn allocate(&mut self) {
        let ratios: Option<Vec<Vec<f64>>> = self
            .states
            .iter()
            .enumerate()
            .map(|(g, s)| {
                s.ratios
                    .clone()
                    .or_else(|| self.is_expert(g).then(Vec::new))
            })
            .collect();
        if let Some(ratios) = ratios {
            self.ranks = allocate::redistribute(&self.catalog, &ratios, &self.caps, self.budget);
        }
    }

    /// Allocates, then marks inputs done or reopened after step `step` (1-based) and says which
    /// inputs accumulate next.
    pub fn decide(&mut self, step: usize) -> Decision {
        self.allocate();
        for (i, input) in self.catalog.inputs.iter().enumerate() {
            let needed = input
                .members
                .iter()
                .map(|&m| self.ranks[m])
                .max()
                .unwrap_or(0);
            let state = &mut self.states[i];
            let done = state.ratios.is_some()
                && !state.degenerate
                && state.converged.len() >= needed
                && state.converged[..needed].iter().all(|&c| c);
            if done && !state.done {
                state.converged_step = Some(step);
            } else if !done {
                state.converged_step = None;
            }
            state.done = done;
        }
        // Degenerate inputs do not hold the run up, but a run of nothing else goes on (later
        // data may vary) and fails at the end if it never does.
        let all_done = (0..self.states.len()).all(|g| {
            let s = &self.states[g];
            s.done || s.degenerate || (s.ratios.is_none() && self.is_expert(g))
        }) && self.states.iter().any(|s| s.done);
        let test: Vec<bool> = self
            .states
            .iter()
            .map(|s| !self.early_stop || !s.done)
            .collect();
        let accumulate = test.iter().map(|&t| t || self.refine_converged).collect();
        Decision {
            accumulate,
            test,
            all_done,
        }
    }

    /// Replaces every estimate with its final one and allocates ranks from them.
    pub fn finalize(&mut self, finals: &[Summary]) {
        for (state, summary) in self.states.iter_mut().zip(finals) {
            state.ratios = Some(summary.ratios());
            state.tokens = summary.tokens;
            state.degenerate = summary.is_degenerate();
        }
        self.allocate();
    }

    /// The inputs whose latest estimate is degenerate, in input order.
    pub fn degenerate_inputs(&self) -> Vec<usize> {
        (0..self.states.len())
            .filter(|&g| self.states[g].degenerate)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spectrum(values: &[f64], vectors: Array2<f64>) -> Spectrum {
        Spectrum {
            vectors,
            summary: Summary {
                values: values.to_vec(),
                residuals: vec![0.0; values.len()],
                trace: 1.0,
                tokens: 100,
                second_moment: 2.0,
                certificate: Certificate::Exact { residual: 0.0 },
            },
        }
    }

    /// A leader and a stage's tracker, as one process has them.
    struct Both {
        leader: Leader,
        tracker: Tracker,
    }

    impl Both {
        fn observe(&mut self, input: usize, s: Spectrum) -> Result<()> {
            let e = self.tracker.observe(input, s)?;
            self.leader.observe(input, e);
            Ok(())
        }
    }

    /// Two inputs of d = 4, r = 1, rho = 2 (cap 2, budget 2), with early stopping.
    fn leader(refine_converged: bool) -> Both {
        let catalog = Catalog::new(
            vec![("a".into(), 4, 4), ("b".into(), 4, 4)],
            vec![vec![0], vec![1]],
        );
        let params = EvaParams {
            rank: 1,
            rho: 2.0,
            ..EvaParams::default()
        };
        Both {
            leader: Leader::new(&catalog, &params, true, refine_converged),
            tracker: Tracker::new(2, params.tau),
        }
    }

    /// Checks a decision's tested inputs; done inputs accumulate only when refined.
    fn assert_tests(d: &Decision, refine: bool, test: &[bool]) {
        assert_eq!(d.test, test);
        assert_eq!(
            d.accumulate,
            if refine {
                vec![true; test.len()]
            } else {
                test.to_vec()
            }
        );
    }

    #[test]
    fn converged_inputs_stop_and_reopen_when_their_rank_grows() {
        for refine in [false, true] {
            converged_inputs_stop_and_reopen(refine);
        }
    }

    fn converged_inputs_stop_and_reopen(refine: bool) {
        let mut l = leader(refine);
        let e = Array2::<f64>::eye(4);
        let e2 = e.slice(ndarray::s![.., ..2]).to_owned();
        // Step 1: first estimates, nothing converged yet.
        l.observe(0, spectrum(&[0.5, 0.1], e2.clone())).unwrap();
        l.observe(1, spectrum(&[0.3, 0.2], e2.clone())).unwrap();
        let d = l.leader.decide(1);
        assert_eq!(l.leader.ranks, vec![1, 1]);
        assert_tests(&d, refine, &[true, true]);
        // Step 2: input 0's first component rotates away (not converged); input 1's first
        // component is stable and its second moved. Input 1 needs rank 1 only: it is done.
        let mut moved = e2.clone();
        moved.column_mut(0).assign(&e.column(3));
        l.observe(0, spectrum(&[0.5, 0.1], moved)).unwrap();
        let mut moved = e2.clone();
        moved.column_mut(1).assign(&e.column(2));
        l.observe(1, spectrum(&[0.3, 0.2], moved)).unwrap();
        let d = l.leader.decide(2);
        assert_eq!(l.leader.ranks, vec![1, 1]);
        assert_tests(&d, refine, &[true, false]);
        assert_eq!(l.leader.states[1].converged_step, Some(2));
        // Step 3: only input 0 is re-estimated; its ratios drop, so input 1's second (unconverged)
        // component enters the budget: input 1 reopens, input 0 falls to rank 0 and is done.
        l.observe(0, spectrum(&[0.15, 0.1], e2.clone())).unwrap();
        let d = l.leader.decide(3);
        assert_eq!(l.leader.ranks, vec![0, 2]);
        assert_tests(&d, refine, &[false, true]);
        assert_eq!(l.leader.states[1].converged_step, None);
        assert_eq!(l.leader.states[0].converged_step, Some(3));
        assert!(!d.all_done);
    }

    /// Exact statistics of `rows` rows of dimension `d` with a decaying spectrum and a mean far
    /// from the origin (the shift matters).
    fn stats(d: usize, rows: usize, seed: u64) -> crate::stats::exact::ExactStats {
        let mut rng = crate::rng::Rng::new(&[seed]);
        let q = linalg::orthonormalize_householder(
            Array2::from_shape_fn((d, d), |_| rng.normal()).view(),
        );
        let z = Array2::from_shape_fn((rows, d), |(_, j)| rng.normal() / (j as f64 + 1.0).sqrt());
        let x = z.dot(&q.t()).mapv(|v| (v + 3.0) as f32);
        let mut e = crate::stats::exact::ExactStats::new(vec![2.5; d]);
        e.accumulate(x.view(), &mut crate::stats::Workspace::default())
            .unwrap();
        e
    }

    #[test]
    fn from_gram_paths_agree_with_a_dense_reference() {
        for d in [200, DENSE_MAX_DIM + 88] {
            let e = stats(d, 3000, d as u64);
            let k = 8;
            let c = e.covariance();
            let reference = eigen::dense_top_k(c.view(), k).unwrap();
            let solve = |precision, remote: bool, warm: &mut Option<Array2<f64>>| {
                if remote {
                    let mut apply = |q: ArrayView2<f64>| e.gram_apply(q);
                    let mut all_reduce = || Ok(e.gram().to_vec());
                    Spectrum::from_gram(
                        Gram::Remote {
                            apply: &mut apply,
                            all_reduce: &mut all_reduce,
                        },
                        &e.moments,
                        k,
                        warm,
                        precision,
                    )
                    .unwrap()
                } else {
                    Spectrum::from_gram(Gram::Local(e.gram()), &e.moments, k, warm, precision)
                        .unwrap()
                }
            };
            let cos = |a: &Spectrum, i: usize| {
                a.vectors.column(i).dot(&reference.vectors.column(i)).abs()
            };
            for remote in [false, true] {
                let mut warm = None;
                let step = solve(Precision::Step, remote, &mut warm);
                assert!(warm.as_ref().is_some_and(|w| w.ncols() >= k));
                let fin = solve(Precision::Final, remote, &mut warm);
                for i in 0..k {
                    let rel = |v: f64| (v - reference.values[i]).abs() / reference.values[0];
                    let (ss, fs) = (&step.summary, &fin.summary);
                    assert!(
                        rel(ss.values[i]) < 1e-4 && ss.residuals[i] <= STEP_TOLERANCE,
                        "d {d} remote {remote}: step pair {i}"
                    );
                    assert!(
                        rel(fs.values[i]) < 1e-9 && fs.residuals[i] <= 1e-9,
                        "d {d} remote {remote}: final pair {i}"
                    );
                    assert!(
                        cos(&fin, i) > 1.0 - 1e-9,
                        "d {d} remote {remote}: final vector {i}"
                    );
                    assert!(
                        cos(&step, i) > 0.999,
                        "d {d} remote {remote}: step vector {i}"
                    );
                }
            }
        }
    }

    /// Exact statistics of `rows`, shifted by `reference`, and their final spectrum with the
    /// second moment the engine sets.
    fn summary_of(rows: &Array2<f32>, reference: Vec<f32>, k: usize) -> Summary {
        let mut e = crate::stats::exact::ExactStats::new(reference.clone());
        e.accumulate(rows.view(), &mut crate::stats::Workspace::default())
            .unwrap();
        let mut s = Spectrum::from_gram(
            Gram::Local(e.gram()),
            &e.moments,
            k,
            &mut None,
            Precision::Final,
        )
        .unwrap()
        .summary;
        s.second_moment = e.moments.second_moment(&reference);
        s
    }

    #[test]
    fn an_input_without_variance_is_degenerate_and_offers_nothing() {
        let d = 16;
        let row: Vec<f32> = (0..d).map(|j| 0.25 + j as f32 * 0.125).collect();
        let constant = Array2::from_shape_fn((40, d), |(_, j)| row[j]);
        let norm2: f64 = row.iter().map(|&v| (v as f64) * (v as f64)).sum();
        // Shifted by the row itself (what unit 0's mean gives) and by something else: the
        // second moment is the rows' own, whatever the shift.
        for reference in [row.clone(), vec![1.0; d], vec![0.0; d]] {
            let s = summary_of(&constant, reference, 4);
            assert!((s.second_moment - norm2).abs() <= 1e-9 * norm2, "{s:?}");
            assert!(s.is_degenerate(), "{s:?}");
            assert_eq!(s.ratios(), vec![0.0; 4]);
        }
        // Rounding-level noise (f32 ulps of each entry) is degenerate too; a spread of 1e-4 or
        // 1 % of each entry is data.
        let mut rng = crate::rng::Rng::new(&[5]);
        let cases = [
            (4.0 * f32::EPSILON as f64, true),
            (1e-4, false),
            (1e-2, false),
        ];
        for (noise, degenerate) in cases {
            let rows = Array2::from_shape_fn((40, d), |(_, j)| {
                (row[j] as f64 * (1.0 + noise * rng.normal())) as f32
            });
            let s = summary_of(&rows, row.clone(), 4);
            assert_eq!(s.is_degenerate(), degenerate, "noise {noise}: {s:?}");
            let rv = s.relative_variance().unwrap();
            assert_eq!(rv <= DEGENERATE_RTOL, degenerate, "noise {noise}: {rv}");
        }
        // A NaN trace is degenerate; a zero trace without a known second moment too.
        let mut s = summary_of(&constant, row.clone(), 4);
        s.trace = f64::NAN;
        assert!(s.is_degenerate());
        s.trace = 0.0;
        s.second_moment = 0.0;
        assert!(s.is_degenerate() && s.relative_variance().is_none());
    }

    #[test]
    fn degenerate_inputs_are_never_done_and_do_not_hold_the_run_up() {
        let mut l = leader(false);
        let e2 = Array2::<f64>::eye(4).slice(ndarray::s![.., ..2]).to_owned();
        let flat = |s: Spectrum| Spectrum {
            summary: Summary {
                trace: 0.0,
                ..s.summary
            },
            ..s
        };
        // Input 1 has no variance: rank 0, never done; input 0 takes the whole budget.
        for step in 1..=2 {
            l.observe(0, spectrum(&[0.5, 0.1], e2.clone())).unwrap();
            l.observe(1, flat(spectrum(&[0.0, 0.0], e2.clone())))
                .unwrap();
            let d = l.leader.decide(step);
            assert_eq!(l.leader.ranks, vec![2, 0]);
            assert_eq!(l.leader.degenerate_inputs(), vec![1]);
            assert!(!l.leader.states[1].done);
            // After the second step input 0 is stable: the run may stop, and input 1 has kept
            // accumulating (tested) all along.
            assert_eq!(d.all_done, step == 2);
            assert!(d.test[1] && d.accumulate[1]);
        }
        // When every input is degenerate the run goes on (later data may vary).
        let mut l = leader(false);
        for step in 1..=3 {
            for g in 0..2 {
                l.observe(g, flat(spectrum(&[0.0, 0.0], e2.clone())))
                    .unwrap();
            }
            let d = l.leader.decide(step);
            assert!(!d.all_done && d.test == vec![true, true]);
            assert_eq!(l.leader.ranks, vec![0, 0]);
        }
    }

    #[test]
    fn without_early_stop_every_input_stays_active() {
        let mut l = leader(false);
        l.leader.early_stop = false;
        let e2 = Array2::<f64>::eye(4).slice(ndarray::s![.., ..2]).to_owned();
        for step in 1..=2 {
            l.observe(0, spectrum(&[0.5, 0.1], e2.clone())).unwrap();
            l.observe(1, spectrum(&[0.3, 0.2], e2.clone())).unwrap();
            let d = l.leader.decide(step);
            assert_tests(&d, false, &[true, true]);
        }
        assert!(l.leader.states.iter().all(|s| s.done));
    }
}
