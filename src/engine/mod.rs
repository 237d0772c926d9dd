//! The step loop (DESIGN.md §2). Every global step, on every rank:
//!
//! 1. read this rank's units of the step and accumulate statistics of the accumulating inputs;
//! 2. agree that no rank failed (one `P`-long all-reduce);
//! 3. one fused all-reduce of the shared parts (counts, sums, sketches) of those inputs;
//! 4. the leader estimates eigenpairs of the inputs under test — exact Grams stay on their ranks
//!    and are reached through `Σ_r G_r·Q` products ([`protocol`]) — tests convergence,
//!    redistributes ranks and broadcasts the decision (which inputs accumulate and which are
//!    tested next); the others serve its products until the decision arrives.
//!
//! At the end the leader solves precisely, allocates, builds the adapter and broadcasts it
//! with the report, so every rank returns the same [`Outcome`].

pub mod protocol;

use crate::adapter::report::{Bytes, CertificateReport, LayerReport, Report, Times};
use crate::adapter::{self, layer_alpha, Adapter};
use crate::comm::wire::{Reader, Writer};
use crate::comm::Communicator;
use crate::config::RunConfig;
use crate::leader::{allocate, Certificate, Decision, Gram, Leader, Precision, Spectrum};
use crate::source::{Catalog, Source};
use crate::stats::{self, exact, sketch::SketchStats, InputStats, Shared};
use crate::{linalg, Error, Result};
use ndarray::Array2;
use protocol::{Command, Reply, Wire};
use std::time::{Duration, Instant};

/// Progress after one global step (shown by the leader).
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
    /// Tokens accumulated so far (all ranks) by the input that has seen the most.
    pub tokens: u64,
    /// Tokens per second since the start.
    pub tokens_per_s: f64,
}

/// The adapter and the report of a finished run (identical on every rank).
pub struct Outcome {
    pub adapter: Adapter,
    pub report: Report,
}

/// The passes of global step `step` that `rank` of `size` reads (DESIGN.md §2 Determinism): the
/// step's units `[step·batch, (step+1)·batch)` cut into runs of `pass` consecutive units, pass
/// `j` (numbered across steps) going to rank `j mod size`; the cut never depends on `size`. With
/// `pass = 1` rank `p` reads the units `u ≡ p (mod size)`.
pub fn passes_of_step(
    step: usize,
    batch: usize,
    pass: usize,
    units: usize,
    rank: usize,
    size: usize,
) -> Vec<Vec<usize>> {
    let start = step.saturating_mul(batch).min(units);
    let end = start.saturating_add(batch).min(units);
    let pass = pass.max(1);
    let first = step.saturating_mul(passes_per_step(batch, pass));
    (start..end)
        .step_by(pass)
        .enumerate()
        .filter(|(i, _)| (first + i) % size == rank)
        .map(|(_, p)| (p..(p + pass).min(end)).collect())
        .collect()
}

/// Passes per step: ranks beyond this count have nothing to read.
pub fn passes_per_step(batch: usize, pass: usize) -> usize {
    batch.div_ceil(pass.max(1))
}

/// A one-line description of the catalog, for checking that every rank sees the same layers.
fn fingerprint(catalog: &Catalog, units: usize) -> String {
    let layers: Vec<String> = catalog
        .layers
        .iter()
        .map(|l| {
            format!(
                "{}:{}x{}@{}",
                l.name, l.in_features, l.out_features, l.input
            )
        })
        .collect();
    format!("{units} units; {}", layers.join(","))
}

/// Fails unless every rank's source has the leader's layers and unit count.
fn check_same_source(wire: &Wire, catalog: &Catalog, units: usize) -> Result<()> {
    let mine = fingerprint(catalog, units);
    let mut leaders = mine.clone().into_bytes();
    wire.broadcast(&mut leaders, 0)?;
    let local = if leaders == mine.as_bytes() {
        Ok(())
    } else {
        Err(Error::data(format!(
            "rank {} sees a different source than rank 0 (layers or number of units differ): {} vs {}",
            wire.comm.rank(),
            mine.chars().take(200).collect::<String>(),
            String::from_utf8_lossy(&leaders).chars().take(200).collect::<String>()
        )))
    };
    wire.agree(local)
}

/// Column means of unit 0 per input, read on rank 0 and broadcast: the shift that keeps the
/// Gram free of cancellation (identical on every rank, so sums stay additive).
fn reference_vectors(source: &mut dyn Source, wire: &Wire) -> Result<Vec<Vec<f32>>> {
    let dims: Vec<usize> = source.catalog().inputs.iter().map(|i| i.dim).collect();
    let mut sums: Vec<Vec<f64>> = dims.iter().map(|&d| vec![0.0; d]).collect();
    let mut counts = vec![0usize; dims.len()];
    let local = if wire.comm.is_leader() && source.units() > 0 {
        let all = vec![true; dims.len()];
        source.read(&[0], &all, &mut |g, x| {
            counts[g] += x.nrows();
            for row in x.rows() {
                for (s, &v) in sums[g].iter_mut().zip(row) {
                    *s += v as f64;
                }
            }
            Ok(())
        })
    } else {
        Ok(())
    };
    wire.agree(local)?;
    let means: Vec<f32> = sums
        .iter()
        .zip(&counts)
        .flat_map(|(s, &n)| {
            s.iter()
                .map(move |v| if n > 0 { (v / n as f64) as f32 } else { 0.0 })
        })
        .collect();
    let mut buf = Writer::default().f32s(&means).0.clone();
    wire.broadcast(&mut buf, 0)?;
    let values = Reader::new(&buf).f32s()?;
    let mut it = values.into_iter();
    Ok(dims
        .iter()
        .map(|&d| it.by_ref().take(d).collect())
        .collect())
}

/// Eigenpairs of one input from the reduced statistics (leader only): a Gram held here is used
/// in place, one spread over the ranks through `Σ_r G_r·Q` products with every rank.
fn estimate(
    wire: &Wire,
    local: &[InputStats],
    shared: &Shared,
    g: usize,
    kmax: usize,
    warm: &mut Option<Array2<f64>>,
    precision: Precision,
) -> Result<Spectrum> {
    if held_here(&local[g], shared, wire.comm.size()) {
        return estimate_held(&local[g], shared, kmax, warm, precision);
    }
    Spectrum::from_gram(
        Gram::Remote {
            apply: &mut |q| protocol::apply(wire, local, g, q),
            gather: &mut || protocol::gram(wire, local, g),
        },
        &shared.moments,
        kmax,
        warm,
        precision,
    )
}

/// Eigenpairs of an input whose reduced statistics this rank holds in full ([`held_here`]).
fn estimate_held(
    local: &InputStats,
    shared: &Shared,
    kmax: usize,
    warm: &mut Option<Array2<f64>>,
    precision: Precision,
) -> Result<Spectrum> {
    match (local, &shared.gram) {
        (InputStats::Exact(_), Some(gram)) => {
            Spectrum::from_gram(Gram::Local(gram), &shared.moments, kmax, warm, precision)
        }
        // A world of one: the local Gram is the sum.
        (InputStats::Exact(e), None) => Spectrum::from_gram(
            Gram::Local(e.gram()),
            &shared.moments,
            kmax,
            warm,
            precision,
        ),
        (InputStats::Sketch(s), _) => {
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
    }
}

/// Inputs below this dimension are solved concurrently, one per thread: each solve's transient
/// covariance copy is then at most 32 MiB (f64), so `threads` of them stay small next to the
/// statistics, and above it one solve's products fill the cores by themselves.
pub const CONCURRENT_MAX_DIM: usize = 2048;

/// Whether every rank holds all of an input's statistics after the fused all-reduce (a shared
/// Gram, a sketch, or anything in a world of one), so that any rank can solve it alone.
fn held_here(local: &InputStats, shared: &Shared, world: usize) -> bool {
    world == 1 || shared.gram.is_some() || matches!(local, InputStats::Sketch(_))
}

/// Solves `inputs` round-robin over the ranks (input `g` on rank `g mod P`, warm-started from
/// that rank's previous solve) and gathers the spectra on the leader (the others get none). A
/// rank solves its inputs below [`CONCURRENT_MAX_DIM`] concurrently, one per thread
/// ([`linalg::par_map`]): small problems whose products do not fill the cores; larger ones
/// one after the other, each on all threads. A solve's result does not depend on the threads it
/// runs on.
#[allow(clippy::too_many_arguments)]
fn solve_spread(
    wire: &Wire,
    local: &[InputStats],
    shared: &[Shared],
    inputs: &[usize],
    kmax: &(dyn Fn(usize) -> usize + Sync),
    warm: &mut [Option<Array2<f64>>],
    precision: Precision,
) -> Result<Vec<(usize, Spectrum)>> {
    let (rank, size) = (wire.comm.rank(), wire.comm.size());
    let ours: Vec<usize> = inputs
        .iter()
        .copied()
        .filter(|&g| g % size == rank)
        .collect();
    let dim = |i: usize| shared[ours[i]].moments.sum.len();
    // Small inputs largest first, so that the threads finish together.
    let (mut small, large): (Vec<usize>, Vec<usize>) =
        (0..ours.len()).partition(|&i| dim(i) < CONCURRENT_MAX_DIM);
    small.sort_by_key(|&i| std::cmp::Reverse(dim(i)));
    let starts: Vec<std::sync::Mutex<Option<Array2<f64>>>> = ours
        .iter()
        .map(|&g| std::sync::Mutex::new(warm[g].take()))
        .collect();
    let solve = |i: usize| {
        let g = ours[i];
        let mut start = starts[i].lock().expect("one solve per input");
        estimate_held(&local[g], &shared[g], kmax(g), &mut start, precision)
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
        warm[g] = start.into_inner().expect("no solve panicked");
    }
    // In input order, so that a failure names the first failing input.
    let mine: Result<Vec<(usize, Spectrum)>> = ours
        .iter()
        .zip(results)
        .map(|(&g, r)| r.expect("every input solved").map(|s| (g, s)))
        .collect();
    let mine = wire.agree(mine)?;
    if size == 1 {
        return Ok(mine);
    }
    Ok(match wire.gather(&protocol::encode_spectra(&mine), 0)? {
        Some(parts) => {
            let mut all = Vec::with_capacity(inputs.len());
            for part in parts {
                all.extend(protocol::decode_spectra(&part)?);
            }
            all
        }
        None => Vec::new(),
    })
}

/// Leader: runs `work`; on success broadcasts what `announce` makes of its result, on failure
/// broadcasts an abort so that the other ranks stop serving and fail with the same message.
fn lead<T>(
    wire: &Wire,
    work: impl FnOnce() -> Result<T>,
    announce: impl FnOnce(&T) -> Command,
) -> Result<T> {
    match work() {
        Ok(v) => {
            if wire.comm.size() > 1 {
                protocol::send(wire, &announce(&v))?;
            }
            Ok(v)
        }
        Err(e) => {
            if wire.comm.size() > 1 {
                protocol::send(wire, &Command::Abort(e.to_string()))?;
            }
            Err(e)
        }
    }
}

/// Runs EVA over `source` on every rank of `comm`; returns the same adapter and report on each.
pub fn run(
    source: &mut dyn Source,
    source_desc: &str,
    comm: &dyn Communicator,
    cfg: &RunConfig,
    on_step: &mut dyn FnMut(&StepInfo),
) -> Result<Outcome> {
    let started = Instant::now();
    let wire = Wire::new(comm);
    let catalog = source.catalog().clone();
    let params = &cfg.eva;
    let units = source.units();
    // First collective: from here on every rank takes the same decisions on the same catalog.
    check_same_source(&wire, &catalog, units)?;
    if let Some(l) = catalog.layers.iter().find(|l| l.in_features < params.rank) {
        return Err(Error::usage(format!(
            "--rank {} is larger than in_features = {} of layer {}",
            params.rank, l.in_features, l.name
        )));
    }
    let mut leader = Leader::new(&catalog, params, !cfg.no_early_stop, cfg.refine_converged);
    let dims: Vec<usize> = catalog.inputs.iter().map(|i| i.dim).collect();
    let name_of = |g: usize| catalog.layers[catalog.inputs[g].members[0]].name.clone();
    let exact = stats::choose(cfg.estimator, &dims, cfg.stats_memory, comm.size());
    let mut times = Times::default();

    let refs = reference_vectors(source, &wire)?;
    let mut local = Vec::with_capacity(dims.len());
    for (g, reference) in refs.into_iter().enumerate() {
        let kmax = leader.kmax(g);
        local.push(if exact[g] {
            InputStats::Exact(exact::ExactStats::new(reference))
        } else {
            let k = cfg.sketch_size.unwrap_or_else(|| stats::default_sketch_size(kmax, dims[g]));
            if k < kmax {
                return Err(Error::usage(format!(
                    "--sketch-size {k} is smaller than the {kmax} candidate components (round(rank x rho)) of layer {}",
                    name_of(g)
                )));
            }
            InputStats::Sketch(SketchStats::new(reference, k, cfg.seed, crate::rng::name_key(&name_of(g))))
        });
    }
    let share_gram = |g: usize| comm.size() > 1 && dims[g] < stats::SHARED_GRAM_MAX_DIM;
    let mut shared: Vec<Shared> = local
        .iter()
        .enumerate()
        .map(|(g, s)| s.empty_shared(share_gram(g)))
        .collect();
    let mut workspace = stats::Workspace::default();
    let data_steps = units.div_ceil(cfg.batch_size);
    let total_steps = cfg.max_steps.map_or(data_steps, |m| m.min(data_steps));
    let mut decision = Decision::first(dims.len());
    let mut warm: Vec<Option<Array2<f64>>> = vec![None; dims.len()];
    let mut step = 0;
    let mut step_bytes = Vec::new();
    let stop_reason = loop {
        if cfg.max_steps.is_some_and(|m| step >= m) {
            break "max_steps";
        }
        if step >= data_steps {
            break if cfg.no_early_stop {
                "all_data"
            } else {
                "data_exhausted"
            };
        }
        let bytes_before = wire.bytes();
        // 1-2. Local statistics, then agreement that every rank succeeded.
        let passes = passes_of_step(
            step,
            cfg.batch_size,
            source.pass_units(),
            units,
            comm.rank(),
            comm.size(),
        );
        let read_start = Instant::now();
        let mut stat_time = Duration::ZERO;
        let read = passes.iter().try_for_each(|pass| {
            source.read(pass, &decision.accumulate, &mut |g, x| {
                let t = Instant::now();
                let r = local[g].accumulate(x, &mut workspace);
                stat_time += t.elapsed();
                r
            })
        });
        times.forward += (read_start.elapsed() - stat_time).as_secs_f64();
        times.statistics += stat_time.as_secs_f64();
        wire.agree(read)?;
        step += 1;

        // 3. One fused all-reduce of the accumulating inputs' shared parts.
        let accumulated = || (0..dims.len()).filter(|&g| decision.accumulate[g]);
        let mut buf = Vec::new();
        for g in accumulated() {
            local[g].pack_shared(&shared[g], &mut buf);
        }
        wire.all_reduce_sum(&mut buf)?;
        let mut rest = &buf[..];
        for g in accumulated() {
            rest = shared[g].unpack(rest);
        }

        // 4. Inputs every rank holds in full are solved round-robin; the leader solves the
        // others through products, decides and broadcasts; the others serve until it arrives.
        let leader_start = Instant::now();
        let comm_before = wire.time();
        let kmax = |g: usize| leader.kmax(g);
        // PEFT skips batches with fewer tokens than components; wait for enough data.
        let ready: Vec<usize> = (0..dims.len())
            .filter(|&g| decision.test[g] && shared[g].moments.n as usize > kmax(g))
            .collect();
        let spread: Vec<usize> = ready
            .iter()
            .copied()
            .filter(|&g| held_here(&local[g], &shared[g], comm.size()))
            .collect();
        let solved = solve_spread(
            &wire,
            &local,
            &shared,
            &spread,
            &kmax,
            &mut warm,
            Precision::Step,
        )?;
        let next = if comm.is_leader() {
            lead(
                &wire,
                || {
                    for (g, spectrum) in solved {
                        leader.observe(g, spectrum)?;
                    }
                    for &g in ready.iter().filter(|g| !spread.contains(g)) {
                        let spectrum = estimate(
                            &wire,
                            &local,
                            &shared[g],
                            g,
                            leader.kmax(g),
                            &mut warm[g],
                            Precision::Step,
                        )?;
                        leader.observe(g, spectrum)?;
                    }
                    Ok(leader.decide(step))
                },
                |d| Command::Decide(d.clone()),
            )?
        } else {
            match protocol::serve(&wire, &local)? {
                Reply::Decide(d) => d,
                Reply::Finish(_) => {
                    return Err(Error::Comm(
                        "rank 0 finished the run in the middle of a step".into(),
                    ))
                }
            }
        };
        times.leader += (leader_start.elapsed() - (wire.time() - comm_before)).as_secs_f64();
        if next.accumulate.len() != dims.len() || next.test.len() != dims.len() {
            return Err(Error::Comm(format!(
                "decision names {} inputs, this rank has {}",
                next.accumulate.len(),
                dims.len()
            )));
        }
        decision = next;
        step_bytes.push(wire.bytes() - bytes_before);

        if comm.is_leader() {
            let converged_layers = catalog
                .layers
                .iter()
                .filter(|l| leader.states[l.input].done)
                .count();
            let tokens = shared.iter().map(|s| s.moments.n).max().unwrap_or(0);
            on_step(&StepInfo {
                step,
                total_steps,
                converged_layers,
                layers: catalog.layers.len(),
                tokens,
                tokens_per_s: tokens as f64 / started.elapsed().as_secs_f64().max(1e-9),
            });
        }
        if !cfg.no_early_stop && decision.all_done {
            break "converged";
        }
    };

    // Final: precise eigenpairs (round-robin where possible), allocation, adapter; broadcast.
    let leader_start = Instant::now();
    let comm_before = wire.time();
    let bytes_before = wire.bytes();
    let kmax = |g: usize| leader.kmax(g);
    let spread: Vec<usize> = (0..dims.len())
        .filter(|&g| {
            shared[g].moments.n as usize > kmax(g) && held_here(&local[g], &shared[g], comm.size())
        })
        .collect();
    let solved = solve_spread(
        &wire,
        &local,
        &shared,
        &spread,
        &kmax,
        &mut warm,
        Precision::Final,
    )?;
    if !comm.is_leader() {
        return match protocol::serve(&wire, &local)? {
            Reply::Finish(bytes) => decode_outcome(&bytes),
            Reply::Decide(_) => Err(Error::Comm(
                "rank 0 sent a step decision after the last step".into(),
            )),
        };
    }
    let outcome = lead(
        &wire,
        || {
            let mut solved: Vec<Option<Spectrum>> = {
                let mut v = vec![None; dims.len()];
                for (g, s) in solved {
                    v[g] = Some(s);
                }
                v
            };
            let mut finals = Vec::with_capacity(dims.len());
            for g in 0..dims.len() {
                let n = shared[g].moments.n;
                if (n as usize) <= leader.kmax(g) {
                    return Err(Error::data(format!(
                        "layer {}: only {n} tokens were seen, fewer than the {} the candidate components need (more data or a smaller --rank/--rho)",
                        name_of(g),
                        leader.kmax(g) + 1
                    )));
                }
                finals.push(match solved[g].take() {
                    Some(s) => s,
                    None => estimate(
                        &wire,
                        &local,
                        &shared[g],
                        g,
                        leader.kmax(g),
                        &mut warm[g],
                        Precision::Final,
                    )?,
                });
            }
            leader.finalize(finals.clone());
            times.leader += (leader_start.elapsed() - (wire.time() - comm_before)).as_secs_f64();
            times.communication = wire.time().as_secs_f64();
            let final_bytes = wire.bytes() - bytes_before;
            if let Some(last) = step_bytes.last_mut() {
                *last += final_bytes;
            }
            let bytes = Bytes {
                per_rank_total: wire.bytes(),
                per_rank_max_step: step_bytes.iter().copied().max().unwrap_or(0),
                per_rank_mean_step: if step_bytes.is_empty() {
                    0.0
                } else {
                    step_bytes.iter().sum::<u64>() as f64 / step_bytes.len() as f64
                },
                per_step: step_bytes.clone(),
            };
            times.total = started.elapsed().as_secs_f64();
            let report = build_report(
                &catalog,
                &leader,
                &finals,
                &local,
                cfg,
                comm,
                source_desc,
                step,
                units,
                stop_reason,
                times.clone(),
                bytes,
            );
            let adapter = adapter::build(&catalog, &leader.ranks, &finals, cfg);
            Ok(Outcome { adapter, report })
        },
        |o| Command::Finish(encode_outcome(o)),
    )?;
    Ok(outcome)
}

#[allow(clippy::too_many_arguments)]
fn build_report(
    catalog: &Catalog,
    leader: &Leader,
    finals: &[Spectrum],
    local: &[InputStats],
    cfg: &RunConfig,
    comm: &dyn Communicator,
    source_desc: &str,
    steps: usize,
    units: usize,
    stop_reason: &str,
    times: Times,
    bytes: Bytes,
) -> Report {
    let params = &cfg.eva;
    let ranks = &leader.ranks;
    let ratios: Vec<Vec<f64>> = finals.iter().map(Spectrum::ratios).collect();
    let bounds: Vec<f64> = finals.iter().map(Spectrum::ratio_error_bound).collect();
    let certain = allocate::certain(catalog, &ratios, &bounds, ranks, params.max_components());
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
                estimator: local[g].name().to_string(),
                error_bound: bounds[g],
                allocation_certain: certain[l],
                certificate: match spectrum.certificate {
                    Certificate::Exact { residual } => CertificateReport::Exact { residual },
                    Certificate::Sketch {
                        sketch_size,
                        nuclear_error,
                        spectral_bound,
                    } => CertificateReport::Sketch {
                        sketch_size,
                        nuclear_error,
                        spectral_bound,
                        trace: spectrum.trace,
                    },
                },
            }
        })
        .collect();
    let unconverged_layers: Vec<String> = layers
        .iter()
        .filter(|l| l.converged_step.is_none())
        .map(|l| l.name.clone())
        .collect();
    Report {
        eva_version: env!("CARGO_PKG_VERSION").to_string(),
        backend: comm.backend().to_string(),
        source: source_desc.to_string(),
        world_size: comm.size(),
        steps,
        batch_size: cfg.batch_size,
        units_seen: steps.saturating_mul(cfg.batch_size).min(units),
        units_total: units,
        stop_reason: stop_reason.to_string(),
        converged: unconverged_layers.is_empty(),
        unconverged_layers,
        rank_budget: params.rank * catalog.layers.len(),
        r: params.rank,
        rho: params.rho,
        tau: params.tau,
        time_s: times,
        bytes,
        layers,
    }
}

/// The outcome as bytes: the adapter's layers, its config and the report.
fn encode_outcome(o: &Outcome) -> Vec<u8> {
    let mut w = Writer::default();
    w.u64(o.adapter.layers.len() as u64);
    for l in &o.adapter.layers {
        w.bytes(l.name.as_bytes())
            .u64(l.rank as u64)
            .f64s(&[l.alpha])
            .u64(l.out_features as u64)
            .u64(l.a.ncols() as u64);
        w.f32s(
            l.a.as_standard_layout()
                .as_slice()
                .expect("standard layout"),
        );
    }
    w.bytes(&serde_json::to_vec(&o.adapter.config).expect("JSON serializes"));
    w.bytes(&serde_json::to_vec(&o.report).expect("report serializes"));
    w.0
}

fn decode_outcome(buf: &[u8]) -> Result<Outcome> {
    let bad = |e: String| Error::Comm(format!("malformed outcome from rank 0: {e}"));
    let mut r = Reader::new(buf);
    let n = r.u64()? as usize;
    let mut layers = Vec::with_capacity(n.min(1 << 20));
    for _ in 0..n {
        let name = String::from_utf8_lossy(r.bytes()?).into_owned();
        let rank = r.u64()? as usize;
        let alpha = r
            .f64s()?
            .first()
            .copied()
            .ok_or_else(|| bad("missing alpha".into()))?;
        let out_features = r.u64()? as usize;
        let cols = r.u64()? as usize;
        let a = ndarray::Array2::from_shape_vec((rank, cols), r.f32s()?)
            .map_err(|e| bad(e.to_string()))?;
        layers.push(adapter::LayerAdapter {
            name,
            rank,
            alpha,
            a,
            out_features,
        });
    }
    let config = serde_json::from_slice(r.bytes()?).map_err(|e| bad(e.to_string()))?;
    let report = serde_json::from_slice(r.bytes()?).map_err(|e| bad(e.to_string()))?;
    Ok(Outcome {
        adapter: Adapter { layers, config },
        report,
    })
}

#[cfg(test)]
mod tests {
    use super::passes_of_step;

    #[test]
    fn every_world_size_covers_each_step_exactly_once_in_the_same_passes() {
        for pass in 1..=4 {
            let one: Vec<Vec<usize>> = (0..4)
                .flat_map(|step| passes_of_step(step, 5, pass, 17, 0, 1))
                .collect();
            for size in 1..=5 {
                for step in 0..4 {
                    let mut all: Vec<usize> = (0..size)
                        .flat_map(|r| passes_of_step(step, 5, pass, 17, r, size))
                        .flatten()
                        .collect();
                    all.sort_unstable();
                    let want: Vec<usize> = (step * 5..((step + 1) * 5).min(17)).collect();
                    assert_eq!(all, want, "size {size}, step {step}, pass {pass}");
                }
                // The same passes, whichever rank reads them.
                let mut passes: Vec<Vec<usize>> = (0..4)
                    .flat_map(|step| {
                        (0..size).flat_map(move |r| passes_of_step(step, 5, pass, 17, r, size))
                    })
                    .collect();
                passes.sort();
                let mut want = one.clone();
                want.sort();
                assert_eq!(passes, want, "size {size}, pass {pass}");
            }
        }
        assert_eq!(passes_of_step(1, 4, 1, 10, 1, 2), vec![vec![5], vec![7]]);
        // Step 1 of batch 8 in passes of 3: global passes 3 ([8,9,10]), 4 ([11,12,13]), 5 ([14,15]).
        assert_eq!(
            passes_of_step(1, 8, 3, 20, 1, 2),
            vec![vec![8, 9, 10], vec![14, 15]]
        );
    }
}
