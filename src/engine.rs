//! The step loop (DESIGN.md §2): each rank reads its units of the global step, accumulates
//! statistics of the active inputs, the leader estimates eigenpairs, tests convergence and
//! redistributes ranks, and the decision says which inputs keep accumulating.

use crate::adapter::report::{Bytes, CertificateReport, LayerReport, Report, Times};
use crate::adapter::{self, layer_alpha, Adapter};
use crate::comm::Communicator;
use crate::config::RunConfig;
use crate::leader::{allocate, Certificate, Leader, Precision, Spectrum};
use crate::source::Source;
use crate::stats::{self, exact::ExactStats, sketch::SketchStats, InputStats};
use crate::{Error, Result};
use std::time::{Duration, Instant};

/// Progress after one global step.
#[derive(Clone, Debug)]
pub struct StepInfo {
    /// Steps done (1-based).
    pub step: usize,
    /// Steps the data allows (or `--max-steps`, if smaller).
    pub total_steps: usize,
    /// Layers whose components are stable.
    pub converged_layers: usize,
    /// Target layers.
    pub layers: usize,
    /// Tokens accumulated so far by the input that has seen the most (on this rank).
    pub tokens: u64,
    /// Tokens per second since the start.
    pub tokens_per_s: f64,
}

/// The adapter and the report of a finished run.
pub struct Outcome {
    pub adapter: Adapter,
    pub report: Report,
}

/// Which units global step `step` covers on `rank` of `size` (DESIGN.md §2 Determinism).
pub fn units_of_step(step: usize, batch: usize, units: usize, rank: usize, size: usize) -> Vec<usize> {
    let start = (step * batch).min(units);
    let end = (start + batch).min(units);
    (start..end).filter(|u| u % size == rank).collect()
}

/// Column means of unit 0 per input, read on rank 0 and broadcast: the shift that keeps the
/// Gram free of cancellation (identical on every rank, so sums stay additive).
fn reference_vectors(source: &mut dyn Source, comm: &dyn Communicator, comm_time: &mut Duration, bytes: &mut u64) -> Result<Vec<Vec<f32>>> {
    let dims: Vec<usize> = source.catalog().inputs.iter().map(|i| i.dim).collect();
    let mut sums: Vec<Vec<f64>> = dims.iter().map(|&d| vec![0.0; d]).collect();
    let mut counts = vec![0usize; dims.len()];
    if comm.is_leader() && source.units() > 0 {
        let all = vec![true; dims.len()];
        source.read(&[0], &all, &mut |g, x| {
            counts[g] += x.nrows();
            for row in x.rows() {
                for (s, &v) in sums[g].iter_mut().zip(row) {
                    *s += v as f64;
                }
            }
            Ok(())
        })?;
    }
    let mut wire: Vec<u8> = sums
        .iter()
        .zip(&counts)
        .flat_map(|(s, &n)| s.iter().map(move |v| if n > 0 { (v / n as f64) as f32 } else { 0.0 }))
        .flat_map(f32::to_le_bytes)
        .collect();
    let t = Instant::now();
    comm.broadcast(&mut wire, 0)?;
    *comm_time += t.elapsed();
    if comm.size() > 1 {
        *bytes += wire.len() as u64;
    }
    let mut values = wire.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    Ok(dims.iter().map(|&d| values.by_ref().take(d).collect()).collect())
}

/// Eigenpairs of one input's statistics.
fn estimate(stats: &InputStats, kmax: usize, warm: Option<&Spectrum>, precision: Precision) -> Result<Spectrum> {
    match stats {
        InputStats::Exact(e) => Spectrum::from_gram(
            &mut |q| e.gram_apply(q),
            &mut || Ok(e.covariance()),
            &e.moments,
            kmax,
            warm.map(|s| s.vectors.view()),
            precision,
        ),
        InputStats::Sketch(s) => Spectrum::from_sketch(s, kmax),
    }
}

/// Runs EVA over `source` and returns the adapter and report (identical on every rank).
pub fn run(source: &mut dyn Source, source_desc: &str, comm: &dyn Communicator, cfg: &RunConfig, on_step: &mut dyn FnMut(&StepInfo)) -> Result<Outcome> {
    let started = Instant::now();
    if comm.size() > 1 {
        return Err(Error::Comm(format!(
            "this build's engine runs in a single process; a world of {} ranks needs the distributed Gram protocol",
            comm.size()
        )));
    }
    let catalog = source.catalog().clone();
    let params = &cfg.eva;
    if let Some(l) = catalog.layers.iter().find(|l| l.in_features < params.rank) {
        return Err(Error::usage(format!(
            "--rank {} is larger than in_features = {} of layer {}",
            params.rank, l.in_features, l.name
        )));
    }
    let mut leader = Leader::new(&catalog, params, !cfg.no_early_stop);
    let dims: Vec<usize> = catalog.inputs.iter().map(|i| i.dim).collect();
    let exact = stats::choose(cfg.estimator, &dims, cfg.stats_memory);
    let mut times = Times::default();
    let mut comm_time = Duration::ZERO;
    let mut bytes = Bytes::default();
    let mut wire = 0u64;

    let refs = reference_vectors(source, comm, &mut comm_time, &mut wire)?;
    let mut all_stats = Vec::with_capacity(dims.len());
    for (g, reference) in refs.into_iter().enumerate() {
        let kmax = leader.kmax(g);
        all_stats.push(if exact {
            InputStats::Exact(ExactStats::new(reference))
        } else {
            let k = cfg.sketch_size.unwrap_or_else(|| stats::default_sketch_size(kmax, dims[g]));
            if k < kmax {
                return Err(Error::usage(format!(
                    "--sketch-size {k} is smaller than the {kmax} candidate components (round(rank x rho)) of layer {}",
                    catalog.layers[catalog.inputs[g].members[0]].name
                )));
            }
            InputStats::Sketch(SketchStats::new(reference, k, cfg.seed, g))
        });
    }
    bytes.per_rank_total += wire;
    bytes.per_rank_max_step = wire;

    let units = source.units();
    let data_steps = units.div_ceil(cfg.batch_size);
    let total_steps = cfg.max_steps.map_or(data_steps, |m| m.min(data_steps));
    let mut workspace = stats::Workspace::default();
    let mut active = vec![true; dims.len()];
    let mut step = 0;
    let stop_reason = loop {
        if cfg.max_steps.is_some_and(|m| step >= m) {
            break "max_steps";
        }
        if step >= data_steps {
            break if cfg.no_early_stop { "all_data" } else { "data_exhausted" };
        }
        let mine = units_of_step(step, cfg.batch_size, units, comm.rank(), comm.size());
        let read_start = Instant::now();
        let mut stat_time = Duration::ZERO;
        source.read(&mine, &active, &mut |g, x| {
            let t = Instant::now();
            all_stats[g].accumulate(x, &mut workspace)?;
            stat_time += t.elapsed();
            Ok(())
        })?;
        times.forward += (read_start.elapsed() - stat_time).as_secs_f64();
        times.statistics += stat_time.as_secs_f64();
        step += 1;
        let tokens = all_stats.iter().map(|s| s.moments().n).max().unwrap_or(0);

        let leader_start = Instant::now();
        for g in 0..dims.len() {
            // PEFT skips batches with fewer tokens than components; wait for enough data.
            if active[g] && all_stats[g].moments().n as usize > leader.kmax(g) {
                let spectrum = estimate(&all_stats[g], leader.kmax(g), leader.states[g].spectrum.as_ref(), Precision::Step)?;
                leader.observe(g, spectrum)?;
            }
        }
        let decision = leader.decide(step);
        times.leader += leader_start.elapsed().as_secs_f64();
        active = decision.active;
        let converged_layers = catalog.layers.iter().filter(|l| leader.states[l.input].done).count();
        let elapsed = started.elapsed().as_secs_f64();
        on_step(&StepInfo {
            step,
            total_steps,
            converged_layers,
            layers: catalog.layers.len(),
            tokens,
            tokens_per_s: tokens as f64 / elapsed.max(1e-9),
        });
        if !cfg.no_early_stop && decision.all_done {
            break "converged";
        }
    };

    let leader_start = Instant::now();
    let mut finals = Vec::with_capacity(dims.len());
    for g in 0..dims.len() {
        let n = all_stats[g].moments().n;
        if (n as usize) <= leader.kmax(g) {
            return Err(Error::data(format!(
                "layer {}: only {n} tokens were seen, fewer than the {} candidate components need (more data or a smaller --rank/--rho)",
                catalog.layers[catalog.inputs[g].members[0]].name,
                leader.kmax(g) + 1
            )));
        }
        finals.push(estimate(&all_stats[g], leader.kmax(g), leader.states[g].spectrum.as_ref(), Precision::Final)?);
    }
    leader.finalize(finals.clone());
    times.leader += leader_start.elapsed().as_secs_f64();
    times.communication = comm_time.as_secs_f64();

    let ranks = leader.ranks.clone();
    let adapter = adapter::build(&catalog, &ranks, &finals, cfg);
    let ratios: Vec<Vec<f64>> = finals.iter().map(Spectrum::ratios).collect();
    let bounds: Vec<f64> = finals.iter().map(Spectrum::ratio_error_bound).collect();
    let certain = allocate::certain(&catalog, &ratios, &bounds, &ranks, params.max_components());
    let layers: Vec<LayerReport> = catalog
        .layers
        .iter()
        .enumerate()
        .map(|(l, layer)| {
            let g = layer.input;
            let spectrum = &finals[g];
            LayerReport {
                name: layer.name.clone(),
                input: catalog.layers[catalog.inputs[g].members[0]].name.clone(),
                in_features: layer.in_features,
                out_features: layer.out_features,
                rank: ranks[l],
                alpha: layer_alpha(params, ranks[l]),
                explained_variance_ratio: ratios[g].clone(),
                converged_step: leader.states[g].converged_step,
                tokens: spectrum.tokens,
                estimator: all_stats[g].name(),
                error_bound: bounds[g],
                allocation_certain: certain[l],
                certificate: match spectrum.certificate {
                    Certificate::Exact { residual } => CertificateReport::Exact { residual },
                    Certificate::Sketch { sketch_size, nuclear_error, spectral_bound } => {
                        CertificateReport::Sketch { sketch_size, nuclear_error, spectral_bound, trace: spectrum.trace }
                    }
                },
            }
        })
        .collect();
    let unconverged_layers: Vec<String> = layers.iter().filter(|l| l.converged_step.is_none()).map(|l| l.name.clone()).collect();
    times.total = started.elapsed().as_secs_f64();
    let report = Report {
        eva_version: env!("CARGO_PKG_VERSION"),
        source: source_desc.to_string(),
        world_size: comm.size(),
        steps: step,
        batch_size: cfg.batch_size,
        units_seen: (step * cfg.batch_size).min(units),
        units_total: units,
        stop_reason,
        converged: unconverged_layers.is_empty(),
        unconverged_layers,
        rank_budget: params.rank * catalog.layers.len(),
        r: params.rank,
        rho: params.rho,
        tau: params.tau,
        time_s: times,
        bytes,
        layers,
    };
    Ok(Outcome { adapter, report })
}

#[cfg(test)]
mod tests {
    use super::units_of_step;

    #[test]
    fn every_world_size_covers_each_step_exactly_once() {
        for size in 1..=5 {
            for step in 0..4 {
                let mut all: Vec<usize> = (0..size).flat_map(|r| units_of_step(step, 3, 10, r, size)).collect();
                all.sort_unstable();
                let want: Vec<usize> = (step * 3..((step + 1) * 3).min(10)).collect();
                assert_eq!(all, want, "size {size}, step {step}");
            }
        }
        assert_eq!(units_of_step(1, 4, 10, 1, 2), vec![5, 7]);
    }
}
