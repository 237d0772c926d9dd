//! The solve phase, inside one stage: eigenpairs of the stage's inputs from its reduced
//! statistics.
//!
//! Inputs whose reduced statistics every rank of the stage holds in full (sketches, shared
//! Grams, everything when the stage has one replica) are solved round-robin: the stage's `i`-th
//! input (in catalog order) on replica `i mod dp`, warm-started from that replica's previous
//! solve of it, and gathered on the stage leader. A rank solves its inputs below
//! [`CONCURRENT_MAX_DIM`] concurrently, one per thread ([`linalg::par_map`]), larger ones one
//! after the other on all threads; a solve's result does not depend on the threads it runs on.
//! The stage leader then solves the exact inputs whose Grams stay on their ranks (`d ≥ 2048`
//! with several replicas) by subspace iteration on `Σ_r G_r·Q` products, which the stage's
//! other ranks serve ([`products::serve`]).

use super::accounting::Wire;
use super::messages;
use super::products;
use super::{Engine, Stats};
use crate::leader::{Gram, Precision, Spectrum};
use crate::stats::{InputStats, Shared};
use crate::{linalg, Error, Result};
use ndarray::Array2;

/// Inputs below this dimension are solved concurrently, one per thread: each solve's transient
/// covariance copy is then at most 32 MiB (f64), so `threads` of them stay small next to the
/// statistics, and above it one solve's products fill the cores by themselves.
pub const CONCURRENT_MAX_DIM: usize = 2048;

/// Whether every rank of the stage holds all of an input's statistics after the fused
/// all-reduce (a shared Gram, a sketch, or host statistics with one replica); the others (large
/// exact Grams on several replicas, or on a GPU) are reached through products.
fn held_here(local: &InputStats, shared: &Shared, replicas: usize) -> bool {
    shared.gram.is_some()
        || local.sketch().is_some()
        || (replicas == 1 && local.host_gram().is_some())
}

/// Eigenpairs of an input whose reduced statistics this rank holds in full ([`held_here`]).
fn estimate_held(
    local: &InputStats,
    shared: &Shared,
    kmax: usize,
    warm: &mut Option<Array2<f64>>,
    precision: Precision,
) -> Result<Spectrum> {
    // A shared Gram is the sum; with one replica the local Gram is.
    let gram = shared.gram.as_deref().or_else(|| local.host_gram());
    match (gram, local.sketch()) {
        (_, Some(s)) => {
            let y = shared
                .sketch
                .as_ref()
                .expect("sketch inputs share their sketch");
            Spectrum::from_sketch(
                &s.nystrom_from(&shared.moments, y)?,
                s.size(),
                shared.moments.n,
                kmax,
            )
        }
        (Some(g), None) => {
            Spectrum::from_gram(Gram::Local(g), &shared.moments, kmax, warm, precision)
        }
        (None, None) => Err(crate::Error::Comm(
            "an exact input without a Gram on this rank was solved as if held here".into(),
        )),
    }
}

/// Solves this rank's share of `inputs` (all held in full) and gathers the spectra on the stage
/// leader (the others get none). `slot(g)` is the input's fixed position in the stage.
fn solve_spread(
    stage: &Wire,
    stats: &mut Stats,
    inputs: &[usize],
    slot: &dyn Fn(usize) -> usize,
    kmax: &(dyn Fn(usize) -> usize + Sync),
    precision: Precision,
) -> Result<Vec<(usize, Spectrum)>> {
    let (rank, size) = (stage.comm.rank(), stage.comm.size());
    let ours: Vec<usize> = inputs
        .iter()
        .copied()
        .filter(|&g| slot(g) % size == rank)
        .collect();
    let dim = |i: usize| {
        stats.shared[ours[i]]
            .as_ref()
            .map_or(0, |s| s.moments.sum.len())
    };
    // Small inputs largest first, so that the threads finish together.
    let (mut small, large): (Vec<usize>, Vec<usize>) =
        (0..ours.len()).partition(|&i| dim(i) < CONCURRENT_MAX_DIM);
    small.sort_by_key(|&i| std::cmp::Reverse(dim(i)));
    let starts: Vec<std::sync::Mutex<Option<Array2<f64>>>> = ours
        .iter()
        .map(|&g| std::sync::Mutex::new(stats.warm[g].take()))
        .collect();
    let (local, shared) = (&stats.local, &stats.shared);
    let solve = |i: usize| {
        let g = ours[i];
        let mut start = starts[i].lock().expect("one solve per input");
        estimate_held(
            local[g].as_ref().expect("stage input"),
            shared[g].as_ref().expect("stage input"),
            kmax(g),
            &mut start,
            precision,
        )
    };
    let mut results: Vec<Option<Result<Spectrum>>> = (0..ours.len()).map(|_| None).collect();
    for i in large {
        results[i] = Some(solve(i));
    }
    for (i, r) in small
        .iter()
        .zip(linalg::par_map(small.len(), |j| solve(small[j])))
    {
        results[*i] = Some(r);
    }
    for (&g, start) in ours.iter().zip(starts) {
        stats.warm[g] = start.into_inner().expect("no solve panicked");
    }
    // In input order, so that a failure names the first failing input.
    let mine: Result<Vec<(usize, Spectrum)>> = ours
        .iter()
        .zip(results)
        .map(|(&g, r)| r.expect("every input solved").map(|s| (g, s)))
        .collect();
    let mine = stage.agree(mine)?;
    if size == 1 {
        return Ok(mine);
    }
    Ok(match stage.gather(&messages::encode_spectra(&mine), 0)? {
        Some(parts) => {
            let mut all = Vec::with_capacity(inputs.len());
            for part in parts {
                all.extend(messages::decode_spectra(&part)?);
            }
            all
        }
        None => Vec::new(),
    })
}

impl Engine {
    /// Eigenpairs of this stage's `inputs` at `precision`: on the stage leader, every one of
    /// them in input order, with the rows' second moment that tells a degenerate input
    /// ([`crate::leader::Summary::is_degenerate`]); on the stage's other ranks, none.
    pub(super) fn solve(
        &mut self,
        inputs: &[usize],
        precision: Precision,
    ) -> Result<Vec<(usize, Spectrum)>> {
        self.check_overflow(inputs)?;
        let mut solved = self.solve_spectra(inputs, precision)?;
        for (g, s) in &mut solved {
            let shared = self.stats.shared[*g].as_ref().expect("stage input");
            s.summary.second_moment = shared.moments.second_moment(&self.references[*g]);
        }
        Ok(solved)
    }

    /// Fails, naming the layer, when an input's squares overflowed f32 as its rows were
    /// accumulated (finite activations beyond ~1.8e19 in magnitude): its Gram or sketch then
    /// holds infinities that no eigen-solve takes. Every rank of the stage holds the same reduced
    /// moments, so all of them fail here, before any collective of the solve.
    fn check_overflow(&self, inputs: &[usize]) -> Result<()> {
        for &g in inputs {
            let m = &self.stats.shared[g].as_ref().expect("stage input").moments;
            let bad = (m.sum.iter().zip(&m.sum_sq)).position(|(s, q)| !(s + q).is_finite());
            if let Some(j) = bad {
                let name = &self.catalog.layers[self.catalog.representative(g)].name;
                return Err(Error::data(format!(
                    "input of {name}: the squares of its activations overflow f32 (feature {j}: sum of squares {} over {} tokens); activations beyond ~1.8e19 in magnitude cannot be accumulated: the model diverges on this data (check its weights and the dtype they were saved in)",
                    m.sum_sq[j], m.n
                )));
            }
        }
        Ok(())
    }

    /// [`Engine::solve`] without the second moments.
    fn solve_spectra(
        &mut self,
        inputs: &[usize],
        precision: Precision,
    ) -> Result<Vec<(usize, Spectrum)>> {
        let stage = Wire::new(&*self.topo.stage_comm, &self.acct);
        let replicas = self.topo.replicas;
        let stats = &mut self.stats;
        let held = |g: usize| {
            held_here(
                stats.local[g].as_ref().expect("stage input"),
                stats.shared[g].as_ref().expect("stage input"),
                replicas,
            )
        };
        let (spread, remote): (Vec<usize>, Vec<usize>) = inputs.iter().partition(|&&g| held(g));
        let mine = &self.mine;
        let slot = |g: usize| mine.binary_search(&g).expect("a stage input");
        let leader = &self.leader;
        let kmax = |g: usize| leader.kmax(g);
        let mut solved = solve_spread(&stage, stats, &spread, &slot, &kmax, precision)?;
        solved.sort_by_key(|(g, _)| *g);
        if remote.is_empty() {
            return Ok(solved);
        }
        if !self.topo.is_stage_leader() {
            products::serve(&stage, &stats.local)?;
            return Ok(Vec::new());
        }
        let remote_grams = products::Leader::new(&stage, &stats.local);
        let mut products = || -> Result<()> {
            for &g in &remote {
                let moments = &stats.shared[g].as_ref().expect("stage input").moments;
                let gram = Gram::Remote {
                    apply: &mut |q| remote_grams.apply(g, q),
                    all_reduce: &mut || remote_grams.gram(g),
                };
                let spectrum =
                    Spectrum::from_gram(gram, moments, kmax(g), &mut stats.warm[g], precision)?;
                solved.push((g, spectrum));
            }
            Ok(())
        };
        let result = products();
        remote_grams.finish(result)?;
        solved.sort_by_key(|(g, _)| *g);
        Ok(solved)
    }
}
