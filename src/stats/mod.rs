//! Additive per-input statistics. Everything here is a sum of per-token contributions, so a
//! plain sum all-reduce combines ranks and the result does not depend on data order.
//!
//! Rows are shifted by a reference vector `c` (the mean of the first unit, identical on every
//! rank) before accumulation, which removes the cancellation of `G - s sᵀ/n` when the mean is
//! large (Chan, Golub & LeVeque 1983); the covariance is shift-invariant.
//!
//! | estimator | state per input | memory |
//! |---|---|---|
//! | [`exact::ExactStats`] | Gram of shifted rows (f64, upper triangle) | `8·d²` bytes |
//! | [`sketch::SketchStats`] | Nyström sketch `G[Ω Θ]` (f64) with its test matrix (f64 and f32) | `20·d·(k+q)` bytes ([`memory_bytes`]) |
//! | [`InputStats::Device`] | either of them on the GPU that ran the forward pass (`--device cuda`) | `12·d²` or `16·d·(k+q)` bytes of device memory |
//!
//! [`Packed`] is a stage's step of shared parts, packed for the fused all-reduce where the
//! statistics are (host memory, or one GPU buffer that NCCL sums in place).

pub mod device;
pub mod exact;
pub mod sketch;

use crate::config::EstimatorChoice;
use crate::device::blocks::SUM_BLOCK;
use crate::device::cuda::{Cuda, DeviceSums};
use crate::device::gpu::DeviceBuffer;
use crate::device::rows::Rows;
use crate::{Error, Result};
use device::DeviceStats;
use ndarray::{Array2, ArrayView2};
use std::sync::Arc;

/// Count, feature sums and feature sums of squares of the shifted rows.
#[derive(Clone, Debug)]
pub struct Moments {
    /// Number of rows (tokens).
    pub n: u64,
    /// `Σ (x - c)`.
    pub sum: Vec<f64>,
    /// `Σ (x - c)²` per feature (its total is `trace G`).
    pub sum_sq: Vec<f64>,
}

impl Moments {
    /// Zero count and sums of dimension `d`.
    pub fn new(d: usize) -> Self {
        Moments {
            n: 0,
            sum: vec![0.0; d],
            sum_sq: vec![0.0; d],
        }
    }

    /// Writes `x - c` into `buf` (reshaped to `x`'s shape, reusing its allocation) and adds the
    /// shifted rows to the count and sums, in one pass. Partial sums run in f32 over blocks of
    /// [`SUM_BLOCK`] rows (vectorized across features) and are added in f64.
    fn add_shifted(&mut self, x: ArrayView2<f32>, c: &[f32], buf: &mut Array2<f32>) {
        let d = c.len();
        if buf.dim() != x.dim() {
            let mut v = std::mem::take(buf).into_raw_vec_and_offset().0;
            v.resize(x.len(), 0.0);
            *buf = Array2::from_shape_vec(x.dim(), v).expect("length matches");
        }
        self.n += x.nrows() as u64;
        let x = x.as_standard_layout();
        let src = x.as_slice().expect("standard layout");
        let dst = buf.as_slice_mut().expect("owned standard layout");
        let (mut s32, mut q32) = (vec![0f32; d], vec![0f32; d]);
        for (block_in, block_out) in src.chunks(SUM_BLOCK * d).zip(dst.chunks_mut(SUM_BLOCK * d)) {
            for (row_in, row_out) in block_in.chunks_exact(d).zip(block_out.chunks_exact_mut(d)) {
                for ((((o, &v), &ci), s), q) in row_out
                    .iter_mut()
                    .zip(row_in)
                    .zip(c)
                    .zip(s32.iter_mut())
                    .zip(q32.iter_mut())
                {
                    let y = v - ci;
                    *o = y;
                    *s += y;
                    *q += y * y;
                }
            }
            for (((s, q), s_), q_) in self
                .sum
                .iter_mut()
                .zip(self.sum_sq.iter_mut())
                .zip(s32.iter_mut())
                .zip(q32.iter_mut())
            {
                *s += *s_ as f64;
                *q += *q_ as f64;
                *s_ = 0.0;
                *q_ = 0.0;
            }
        }
    }

    /// Trace of the sample covariance, `(Σ q₂ - ‖s‖²/n) / (n-1)`.
    pub fn covariance_trace(&self) -> f64 {
        if self.n < 2 {
            return 0.0;
        }
        let n = self.n as f64;
        let sq: f64 = self.sum_sq.iter().sum();
        let ss: f64 = self.sum.iter().map(|v| v * v).sum();
        ((sq - ss / n) / (n - 1.0)).max(0.0)
    }

    /// Mean squared norm of the rows before the shift by `reference` (`c`), `Σ‖x‖²/n` with
    /// `x = x̃ + c`: `(Σ‖x̃‖² + 2 cᵀΣx̃ + n‖c‖²) / n` (0 without rows). The scale of
    /// `leader::DEGENERATE_RTOL`.
    pub fn second_moment(&self, reference: &[f32]) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        let n = self.n as f64;
        let sq: f64 = self.sum_sq.iter().sum();
        let cross: f64 = self
            .sum
            .iter()
            .zip(reference)
            .map(|(s, &c)| s * c as f64)
            .sum();
        let cc: f64 = reference.iter().map(|&c| (c as f64) * (c as f64)).sum();
        ((sq + 2.0 * cross) / n + cc).max(0.0)
    }

    /// `C·Q` from `G·Q` by the rank-one centering correction `(GQ - s (sᵀQ)/n) / (n-1)`.
    pub fn center(&self, gq: &mut Array2<f64>, q: ArrayView2<f64>) {
        let n = self.n as f64;
        let s = ndarray::ArrayView1::from(&self.sum[..]);
        let stq = s.dot(&q);
        for (i, mut row) in gq.rows_mut().into_iter().enumerate() {
            row.scaled_add(-s[i] / n, &stq);
        }
        *gq /= n - 1.0;
    }
}

/// The part of an input's statistics that every step all-reduces: count and sums; the sketch
/// for the sketch estimator; and, for exact inputs below [`SHARED_GRAM_MAX_DIM`] in a world of
/// several ranks, the Gram's upper triangle. Larger exact Grams stay on their ranks and the
/// leader reaches them through products (see `engine::products`).
#[derive(Clone, Debug)]
pub struct Shared {
    /// Summed count and sums.
    pub moments: Moments,
    /// Summed sketch (`d x (k+q)`), for the sketch estimator.
    pub sketch: Option<Array2<f64>>,
    /// Summed Gram (row-major `d x d`, upper triangle valid), when shared.
    pub gram: Option<Vec<f64>>,
}

/// Exact inputs smaller than this share their Gram (`d(d+1)/2` values per step), which at these
/// sizes costs about as much as a step of distributed products (`≤ 12 · 2·d·m` values) and saves
/// their latency; larger ones never move `d²`.
pub const SHARED_GRAM_MAX_DIM: usize = 2048;

impl Shared {
    /// Reads back what [`Packed::of`] wrote (after the sum), returning the rest.
    pub fn unpack<'a>(&mut self, data: &'a [f64]) -> &'a [f64] {
        let d = self.moments.sum.len();
        self.moments.n = data[0].round() as u64;
        self.moments.sum.copy_from_slice(&data[1..1 + d]);
        self.moments.sum_sq.copy_from_slice(&data[1 + d..1 + 2 * d]);
        let mut rest = &data[1 + 2 * d..];
        if let Some(y) = &mut self.sketch {
            let n = y.len();
            y.as_slice_mut()
                .expect("owned standard layout")
                .copy_from_slice(&rest[..n]);
            rest = &rest[n..];
        }
        if let Some(g) = &mut self.gram {
            rest = exact::unpack_upper(rest, d, g);
        }
        rest
    }
}

/// How one unique input is estimated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Estimator {
    /// The exact Gram.
    Exact,
    /// A Nyström sketch of `k` columns, its test matrix drawn from `seed` and `stream`.
    Sketch { k: usize, seed: u64, stream: u64 },
}

/// The statistic one unique input accumulates: on the host, or on the GPU that computes its rows
/// (`--device cuda`: the rows never leave it, see [`device`]).
pub enum InputStats {
    Exact(exact::ExactStats),
    Sketch(sketch::SketchStats),
    Device(Box<DeviceStats>),
}

/// Scratch buffers shared by all inputs of a rank (one input accumulates at a time): the
/// shifted rows of a chunk and the f32 product before it is added in f64.
#[derive(Default)]
pub struct Workspace {
    shifted: Array2<f32>,
    product: Vec<f32>,
}

/// The packed shared parts of a stage's inputs, where they were packed: host memory, or one
/// buffer on the GPU that holds the statistics (all-reduced there, e.g. by NCCL).
pub enum Packed {
    Host(Vec<f64>),
    Device(DeviceSums),
}

impl Packed {
    /// Packs the shared parts of `inputs` (`(statistics, shared part)` pairs, in order) where the
    /// statistics are: host statistics into a host buffer, device ones into one device buffer.
    pub fn of(inputs: &mut [(&mut InputStats, &Shared)]) -> Result<Packed> {
        let gpu = inputs.iter().find_map(|(s, _)| match s {
            InputStats::Device(d) => Some(d.gpu().clone()),
            _ => None,
        });
        let Some(gpu) = gpu else {
            let mut buf = Vec::new();
            for (s, shared) in inputs.iter() {
                s.pack_shared(shared, &mut buf);
            }
            return Ok(Packed::Host(buf));
        };
        let len: usize = inputs
            .iter()
            .map(|(s, shared)| match s {
                InputStats::Device(d) => Ok(d.packed_len(shared.gram.is_some())),
                _ => Err(Error::Device(
                    "a stage holds statistics on the GPU and on the host at once".into(),
                )),
            })
            .sum::<Result<usize>>()?;
        let mut buf = DeviceSums::zeros(&gpu, len, "the fused all-reduce's buffer")?;
        let mut at = 0;
        for (s, shared) in inputs.iter_mut() {
            if let InputStats::Device(d) = s {
                at = d.pack(&mut buf, at, shared.gram.is_some())?;
            }
        }
        debug_assert_eq!(at, len);
        Ok(Packed::Device(buf))
    }

    /// The values in host memory (a copy of device ones), e.g. after the all-reduce, for
    /// [`Shared::unpack`].
    pub fn into_host(self) -> Result<Vec<f64>> {
        match self {
            Packed::Host(v) => Ok(v),
            Packed::Device(d) => d.to_host(),
        }
    }
}

/// Values one input's packed shared part holds: `[n, Σx̃, Σx̃²]`, then the sketch (`d·m` for
/// `m` columns) or, with `with_gram`, the Gram's upper triangle (`d(d+1)/2`). The GPU packs
/// into a buffer of this size ([`device::DeviceStats::packed_len`]).
pub fn shared_len(d: usize, sketch_columns: Option<usize>, with_gram: bool) -> usize {
    1 + 2 * d
        + match sketch_columns {
            Some(m) => d * m,
            None if with_gram => d * (d + 1) / 2,
            None => 0,
        }
}

impl InputStats {
    /// Empty statistics of an input around `reference` (its length is `d`), on the host, or on
    /// `device`.
    pub fn new(
        reference: Vec<f32>,
        estimator: Estimator,
        device: Option<&Arc<Cuda>>,
    ) -> Result<Self> {
        let host = match estimator {
            Estimator::Exact => InputStats::Exact(exact::ExactStats::new(reference)),
            Estimator::Sketch { k, seed, stream } => {
                InputStats::Sketch(sketch::SketchStats::new(reference, k, seed, stream))
            }
        };
        match device {
            None => Ok(host),
            Some(gpu) => host.to_device(gpu),
        }
    }

    /// These statistics on `gpu` (their sums uploaded; device ones copied through the host).
    pub fn to_device(&self, gpu: &Arc<Cuda>) -> Result<Self> {
        Ok(InputStats::Device(Box::new(DeviceStats::new(gpu, self)?)))
    }

    /// These statistics as host ones, the same estimator, shift, test matrix and sums (a copy):
    /// what a checkpoint writes, whichever device accumulated them.
    pub fn to_host(&self) -> Result<Self> {
        Ok(match self {
            InputStats::Exact(e) => InputStats::Exact(e.clone()),
            InputStats::Sketch(s) => InputStats::Sketch(s.clone()),
            InputStats::Device(d) => d.to_host()?,
        })
    }

    /// Adds rows (`tokens x d`), on the host or the GPU wherever the statistics are (rows
    /// elsewhere are copied there first).
    pub fn accumulate(&mut self, x: Rows<'_>, ws: &mut Workspace) -> Result<()> {
        match (self, x) {
            (InputStats::Device(d), Rows::Device { x, .. }) => d.accumulate(x),
            (InputStats::Device(d), Rows::Host(x)) => d.accumulate_host(x),
            (InputStats::Exact(s), Rows::Host(x)) => s.accumulate(x, ws),
            (InputStats::Sketch(s), Rows::Host(x)) => s.accumulate(x, ws),
            (host, rows) => host.accumulate(Rows::Host(rows.to_host()?.view()), ws),
        }
    }

    /// Dimension.
    pub fn dim(&self) -> usize {
        match self {
            InputStats::Exact(s) => s.dim(),
            InputStats::Sketch(s) => s.reference().len(),
            InputStats::Device(d) => d.dim(),
        }
    }

    /// The sketch's test matrices and reconstruction (`None` for exact statistics).
    pub fn sketch(&self) -> Option<&sketch::SketchStats> {
        match self {
            InputStats::Exact(_) => None,
            InputStats::Sketch(s) => Some(s),
            InputStats::Device(d) => d.sketch(),
        }
    }

    /// Whether the fused all-reduce carries this input's Gram (so that every rank of the stage
    /// holds the summed Gram after it): exact inputs below [`SHARED_GRAM_MAX_DIM`] in a stage of
    /// several replicas; on a GPU with any number of replicas, since that is how the leader, on
    /// the host, gets it. Larger Grams stay where they are (products, `engine::products`).
    pub fn shares_gram(&self, replicas: usize) -> bool {
        let small = self.dim() < SHARED_GRAM_MAX_DIM;
        match self {
            InputStats::Exact(_) => replicas > 1 && small,
            InputStats::Sketch(_) => false,
            InputStats::Device(d) => d.sketch().is_none() && small,
        }
    }

    /// This rank's own Gram in host memory (row-major `d x d`, upper triangle valid), for host
    /// exact statistics.
    pub fn host_gram(&self) -> Option<&[f64]> {
        match self {
            InputStats::Exact(e) => Some(e.gram()),
            _ => None,
        }
    }

    /// An empty [`Shared`] of the right shape for this input in a stage of `replicas` replicas
    /// (with the Gram when [`InputStats::shares_gram`]).
    pub fn empty_shared(&self, replicas: usize) -> Shared {
        let d = self.dim();
        Shared {
            moments: Moments::new(d),
            sketch: self.sketch().map(|s| Array2::zeros(s.sketch().dim())),
            gram: self.shares_gram(replicas).then(|| vec![0.0; d * d]),
        }
    }

    /// Appends the local part to be all-reduced: `[n, Σx, Σx², sketch | Gram upper triangle]`
    /// (the Gram only when `shared` holds one), for host statistics ([`Packed::of`] packs both).
    fn pack_shared(&self, shared: &Shared, out: &mut Vec<f64>) {
        let m = match self {
            InputStats::Exact(e) => &e.moments,
            InputStats::Sketch(s) => &s.moments,
            InputStats::Device(_) => unreachable!("Packed::of packs device statistics"),
        };
        out.push(m.n as f64);
        out.extend_from_slice(&m.sum);
        out.extend_from_slice(&m.sum_sq);
        match self {
            InputStats::Sketch(s) => out.extend(s.sketch().iter()),
            InputStats::Exact(e) if shared.gram.is_some() => {
                exact::pack_upper(e.gram(), e.dim(), out)
            }
            _ => {}
        }
    }

    /// The estimator's name in reports.
    pub fn name(&self) -> &'static str {
        match self.sketch() {
            None => "exact",
            Some(_) => "sketch",
        }
    }
}

/// Probe columns used by the sketch's a-posteriori error estimate.
pub const PROBES: usize = 10;

/// Default sketch columns for `kmax` candidate components and dimension `d`:
/// `min(d, max(4·kmax, kmax + 16))` (docs/numerics.md explains the choice).
pub fn default_sketch_size(kmax: usize, d: usize) -> usize {
    (4 * kmax).max(kmax + 16).min(d)
}

/// Bytes of statistics one input of dimension `d` keeps under each estimator on one rank of a
/// world of `world` ranks (the shared [`Workspace`] adds `4·d²` for exact or `4·d·(k+q)` for
/// sketch, plus `4·CHUNK_ROWS·d`, once). With several ranks an input also keeps its all-reduced
/// [`Shared`] copy and its part of the send buffer: exact Grams below
/// [`SHARED_GRAM_MAX_DIM`] add `8·d²` (the summed Gram) and `4·d(d+1)` (the packed triangle);
/// sketches add `16·d·(k+q)`.
pub fn memory_bytes(exact: bool, d: usize, sketch_size: usize, world: usize) -> u64 {
    let d = d as u64;
    let several = world > 1;
    if exact {
        let shared = if several && d < SHARED_GRAM_MAX_DIM as u64 {
            8 * d * d + 4 * d * (d + 1)
        } else {
            0
        };
        8 * d * d + shared
    } else {
        let cols = (sketch_size + PROBES) as u64;
        // Sketch and test matrix (f64), test matrix (f32); summed copy and send buffer.
        20 * d * cols + if several { 16 * d * cols } else { 0 }
    }
}

/// Decides, per input, exact (`true`) or sketch. `auto` makes inputs exact from the smallest `d`
/// up (ties in input order) while their exact statistics together ([`memory_bytes`] on a world
/// of `world` ranks) fit `budget` bytes; the rest use the sketch. The sketch's components are far
/// less accurate than its certified ratios (numerics.md), so every input that fits is exact.
pub fn choose(choice: EstimatorChoice, dims: &[usize], budget: u64, world: usize) -> Vec<bool> {
    match choice {
        EstimatorChoice::Exact => vec![true; dims.len()],
        EstimatorChoice::Sketch => vec![false; dims.len()],
        EstimatorChoice::Auto => {
            let mut order: Vec<usize> = (0..dims.len()).collect();
            order.sort_by_key(|&g| dims[g]);
            let mut exact = vec![false; dims.len()];
            let mut used = 0u64;
            for g in order {
                used = used.saturating_add(memory_bytes(true, dims[g], 0, world));
                if used > budget {
                    break;
                }
                exact[g] = true;
            }
            exact
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_len_is_what_the_host_packs() {
        let reference = vec![0.5f32; 7];
        let x = Array2::from_shape_fn((30, 7), |(i, j)| ((i * 3 + j) % 5) as f32);
        let sketch = Estimator::Sketch {
            k: 3,
            seed: 1,
            stream: 2,
        };
        for (estimator, replicas) in [(Estimator::Exact, 1), (Estimator::Exact, 2), (sketch, 1)] {
            let mut s = InputStats::new(reference.clone(), estimator, None).unwrap();
            s.accumulate(Rows::Host(x.view()), &mut Workspace::default())
                .unwrap();
            let shared = s.empty_shared(replicas);
            let want = shared_len(
                7,
                s.sketch().map(|k| k.sketch().ncols()),
                shared.gram.is_some(),
            );
            let v = Packed::of(&mut [(&mut s, &shared)])
                .unwrap()
                .into_host()
                .unwrap();
            assert_eq!(v.len(), want, "{estimator:?}, {replicas} replicas");
            assert_eq!(v[0], 30.0);
            // What was packed reads back.
            let mut back = s.empty_shared(replicas);
            assert!(back.unpack(&v).is_empty());
            assert_eq!(back.moments.n, 30);
        }
    }

    #[test]
    fn auto_makes_the_smallest_inputs_exact_within_the_budget() {
        let dims = [600, 24, 40, 24];
        let gram = |d: u64| 8 * d * d;
        // Room for the two d = 24 and the d = 40 Grams, not for d = 600.
        let budget = 2 * gram(24) + gram(40);
        assert_eq!(
            choose(EstimatorChoice::Auto, &dims, budget, 1),
            vec![false, true, true, true]
        );
        assert_eq!(
            choose(EstimatorChoice::Auto, &dims, budget - 1, 1),
            vec![false, true, false, true]
        );
        assert_eq!(
            choose(EstimatorChoice::Auto, &dims, u64::MAX, 1),
            vec![true; 4]
        );
        assert_eq!(choose(EstimatorChoice::Auto, &dims, 0, 1), vec![false; 4]);
        // Several ranks also hold the summed copy (20·d² below d = 2048): one d = 24 fits.
        assert_eq!(
            choose(EstimatorChoice::Auto, &dims, budget, 2),
            vec![false, true, false, false]
        );
        assert_eq!(choose(EstimatorChoice::Exact, &dims, 0, 1), vec![true; 4]);
        assert_eq!(
            choose(EstimatorChoice::Sketch, &dims, u64::MAX, 1),
            vec![false; 4]
        );
    }
}
