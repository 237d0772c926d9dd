//! The finish phase, after the last step: precise eigenpairs in every stage, the final
//! allocation on the global leader, each stage leader's layers of the adapter sent to rank 0,
//! and the adapter with its report broadcast, so that every rank returns the same [`Outcome`].

use super::accounting::Wire;
use super::messages::{self, Verdict};
use super::{Engine, Outcome, StopReason};
use crate::adapter::report::{Bytes, CertificateReport, LayerReport, Report};
use crate::adapter::{self, layer_alpha, Adapter, LayerAdapter};
use crate::comm::codec::{Reader, Writer};
use crate::leader::{allocate, Certificate, Estimate, Precision, Spectrum, Summary};
use crate::{Error, Result};
use std::time::Instant;

impl Engine {
    /// Ends the run: final solves, allocation, adapter and report (collective over the world).
    pub fn finish(mut self, stop: StopReason) -> Result<Outcome> {
        let _label = crate::comm::context(format!(
            "finish after step {}: final solves, allocation and adapter (stage {})",
            self.step, self.topo.stage
        ));
        let leader_start = Instant::now();
        let comm_before = self.acct.time();
        let (bytes_before, hidden_before) = (self.acct.bytes(), self.acct.hidden());
        let finals = self.final_spectra();
        let finals = self.in_stage(finals);
        let finals = self.world().agree(finals)?;
        let summaries: Vec<(usize, Summary)> = finals
            .iter()
            .map(|(g, s)| (*g, s.summary.clone()))
            .collect();
        let ranks = self.final_ranks(&summaries)?;
        let layers = self.stage_layers(&finals, &ranks);
        let parts = self.gather_at_leader(&messages::encode_layers(&layers))?;
        let Some(parts) = parts.filter(|_| self.topo.world.is_leader()) else {
            return match messages::receive_verdict(&self.world())? {
                Verdict::Finish(bytes) => decode_outcome(&bytes),
                _ => Err(Error::Comm(
                    "rank 0 sent something else than the outcome".into(),
                )),
            };
        };
        let outcome = (|| {
            let mut layers = Vec::new();
            for p in &parts {
                layers.extend(messages::decode_layers(p)?);
            }
            layers.sort_by_key(|(i, _)| *i);
            let (layers, params) = adapter::fuse_experts(layers, &self.catalog);
            let adapter = adapter::assemble(layers, &params, &self.cfg);
            self.times.leader +=
                (leader_start.elapsed() - (self.acct.time() - comm_before)).as_secs_f64();
            self.times.communication = self.acct.time().as_secs_f64();
            if let Some(last) = self.step_bytes.last_mut() {
                *last += self.acct.bytes() - bytes_before;
            }
            if let Some(last) = self.step_hidden.last_mut() {
                *last += self.acct.hidden() - hidden_before;
            }
            self.times.total = self.started.elapsed().as_secs_f64();
            let report = self.report(stop, &ranks);
            Ok(Outcome { adapter, report })
        })();
        messages::announce(&self.world(), outcome, |o| {
            Verdict::Finish(encode_outcome(o))
        })
    }

    /// The stage's precise eigenpairs (on its leader; nothing elsewhere). Every input must hold
    /// more tokens than its candidate components, except an expert's: one routed too few tokens
    /// falls back to PEFT's default initialization ([`Spectrum::fallback`]), named in a warning.
    fn final_spectra(&mut self) -> Result<Vec<(usize, Spectrum)>> {
        let few = |g: usize| self.stats.tokens(g) as usize <= self.kmax(g);
        let expert = |g: usize| {
            self.catalog.layers[self.catalog.representative(g)]
                .param
                .is_some()
        };
        if let Some(&g) = self.mine.iter().find(|&&g| few(g) && !expert(g)) {
            return Err(Error::data(format!(
                "layer {}: only {} tokens were seen, fewer than the {} the candidate components need (more data or a smaller --rank/--rho)",
                self.catalog.layers[self.catalog.representative(g)].name,
                self.stats.tokens(g),
                self.kmax(g) + 1
            )));
        }
        let (under, mine): (Vec<usize>, Vec<usize>) = self.mine.iter().partition(|&&g| few(g));
        let mut solved = self.solve(&mine, Precision::Final)?;
        if self.topo.is_stage_leader() && !under.is_empty() {
            let names: Vec<String> = under
                .iter()
                .map(|&g| {
                    let name = &self.catalog.layers[self.catalog.representative(g)].name;
                    format!("{name} ({} tokens)", self.stats.tokens(g))
                })
                .collect();
            crate::log::say(&format!(
                "eva: warning: {} expert input(s) were routed too few tokens for their {} candidate components (at least {} needed) and get PEFT's default lora_A initialization instead: {}",
                under.len(),
                self.kmax(under[0]),
                self.kmax(under[0]) + 1,
                names.join(", ")
            ));
            for &g in &under {
                let layer = &self.catalog.layers[self.catalog.representative(g)];
                solved.push((
                    g,
                    Spectrum::fallback(
                        layer.in_features,
                        self.kmax(g),
                        self.stats.tokens(g),
                        self.cfg.seed,
                        &layer.name,
                    ),
                ));
            }
            solved.sort_by_key(|(g, _)| *g);
        }
        Ok(solved)
    }

    /// The final allocation: the stage leaders' summaries reach the global leader, which
    /// allocates from them and broadcasts every layer's rank.
    fn final_ranks(&mut self, summaries: &[(usize, Summary)]) -> Result<Vec<usize>> {
        let estimates: Vec<(usize, Estimate)> = summaries
            .iter()
            .map(|(g, s)| {
                (
                    *g,
                    Estimate {
                        converged: Vec::new(),
                        summary: s.clone(),
                    },
                )
            })
            .collect();
        let parts = self.gather_at_leader(&messages::encode_estimates(&estimates))?;
        let world = Wire::new(&*self.topo.world, &self.acct);
        let Some(parts) = parts.filter(|_| world.comm.is_leader()) else {
            return match messages::receive_verdict(&world)? {
                Verdict::Ranks(r) if r.len() == self.catalog.layers.len() => Ok(r),
                _ => Err(Error::Comm(
                    "rank 0 sent something else than the final ranks".into(),
                )),
            };
        };
        let n = self.catalog.inputs.len();
        let work = (|| {
            let mut finals: Vec<Option<Summary>> = vec![None; n];
            for p in &parts {
                for (g, e) in messages::decode_estimates(p)? {
                    *finals.get_mut(g).ok_or_else(|| {
                        Error::Comm(format!("final summary of input {g} of {n}"))
                    })? = Some(e.summary);
                }
            }
            let finals: Vec<Summary> = finals
                .into_iter()
                .enumerate()
                .map(|(g, s)| {
                    s.ok_or_else(|| {
                        Error::Comm(format!("no stage sent the final summary of input {g}"))
                    })
                })
                .collect::<Result<_>>()?;
            self.leader.finalize(&finals);
            if self.leader.degenerate_inputs().len() == n {
                return Err(all_degenerate(&self.catalog, &finals));
            }
            self.finals = finals;
            Ok(self.leader.ranks.clone())
        })();
        messages::announce(&world, work, |r| Verdict::Ranks(r.clone()))
    }

    /// This stage's layers of the adapter (on its leader): rank > 0, with their catalog index.
    fn stage_layers(
        &self,
        finals: &[(usize, Spectrum)],
        ranks: &[usize],
    ) -> Vec<(usize, LayerAdapter)> {
        let spectrum = |g: usize| finals.iter().find(|(h, _)| *h == g).map(|(_, s)| s);
        self.catalog
            .layers
            .iter()
            .enumerate()
            .filter(|(l, _)| ranks[*l] > 0)
            .filter_map(|(l, layer)| {
                spectrum(layer.input)
                    .map(|s| (l, adapter::layer(layer, ranks[l], s, &self.cfg.eva)))
            })
            .collect()
    }

    /// `eva_report.json` (global leader).
    fn report(&self, stop: StopReason, ranks: &[usize]) -> Report {
        let (cfg, params) = (&*self.cfg, &self.cfg.eva);
        let layers = self.layer_reports(ranks);
        // Degenerate layers are listed apart: they have nothing to converge.
        let unconverged_layers: Vec<String> = layers
            .iter()
            .filter(|l| l.converged_step.is_none() && !l.degenerate)
            .map(|l| l.name.clone())
            .collect();
        let degenerate_layers: Vec<String> = layers
            .iter()
            .filter(|l| l.degenerate)
            .map(|l| l.name.clone())
            .collect();
        Report {
            eva_version: crate::device::VERSION.to_string(),
            backend: self.topo.world.backend().to_string(),
            source: self.source_desc.clone(),
            world_size: self.topo.world.size(),
            pipeline_stages: self.topo.stages,
            stage_split: self.split.clone(),
            steps: self.step,
            resumed_from_step: self.resumed_from,
            batch_size: cfg.batch_size,
            units_seen: self.step.saturating_mul(cfg.batch_size).min(self.units),
            units_total: self.units,
            stop_reason: stop.as_str().to_string(),
            converged: unconverged_layers.is_empty(),
            unconverged_layers,
            degenerate_layers,
            rank_budget: self.leader.budget(),
            r: params.rank,
            rho: params.rho,
            tau: params.tau,
            time_s: self.times.clone(),
            bytes: self.bytes_report(),
            layers,
        }
    }

    /// Each layer's line of the report: its rank and alpha, its input's ratios, convergence,
    /// estimator and certificate, and whether the allocation is certain.
    fn layer_reports(&self, ranks: &[usize]) -> Vec<LayerReport> {
        let (catalog, finals, params) = (&self.catalog, &self.finals, &self.cfg.eva);
        let ratios: Vec<Vec<f64>> = finals.iter().map(Summary::ratios).collect();
        let bounds: Vec<f64> = finals.iter().map(Summary::ratio_error_bound).collect();
        let certain = allocate::certain(catalog, &ratios, &bounds, ranks, self.leader.caps());
        catalog
            .layers
            .iter()
            .enumerate()
            .map(|(l, layer)| {
                let g = layer.input;
                let s = &finals[g];
                LayerReport {
                    name: layer.name.clone(),
                    input: catalog.layers[catalog.representative(g)].name.clone(),
                    in_features: layer.in_features,
                    out_features: layer.out_features,
                    rank: ranks[l],
                    alpha: layer_alpha(params, layer.target(), ranks[l]),
                    explained_variance_ratio: ratios[g].clone(),
                    converged_step: self.leader.states[g].converged_step,
                    tokens: s.tokens,
                    estimator: s.estimator().to_string(),
                    error_bound: bounds[g],
                    allocation_certain: certain[l],
                    degenerate: s.is_degenerate(),
                    relative_variance: s.relative_variance(),
                    certificate: certificate_report(s),
                }
            })
            .collect()
    }

    /// Collective and hidden-state bytes this rank moved, in all and per step.
    fn bytes_report(&self) -> Bytes {
        let steps = self.step_bytes.len().max(1) as f64;
        Bytes {
            per_rank_total: self.acct.bytes(),
            per_rank_max_step: self.step_bytes.iter().copied().max().unwrap_or(0),
            per_rank_mean_step: self.step_bytes.iter().sum::<u64>() as f64 / steps,
            per_step: self.step_bytes.clone(),
            hidden_per_rank_total: self.acct.hidden(),
            hidden_per_step: self.step_hidden.clone(),
        }
    }
}

/// The report's certificate of an input's final summary.
fn certificate_report(s: &Summary) -> CertificateReport {
    match s.certificate {
        Certificate::Exact { residual } => CertificateReport::Exact { residual },
        Certificate::Sketch {
            sketch_size,
            nuclear_error,
            spectral_bound,
        } => CertificateReport::Sketch {
            sketch_size,
            nuclear_error,
            spectral_bound,
            trace: s.trace,
        },
    }
}

/// The error of a run whose every input is degenerate: nothing to initialize from.
fn all_degenerate(catalog: &crate::catalog::Catalog, finals: &[Summary]) -> Error {
    let largest = finals
        .iter()
        .filter_map(Summary::relative_variance)
        .fold(0.0f64, |a, b| a.max(b));
    let tokens = finals.iter().map(|s| s.tokens).max().unwrap_or(0);
    let largest = match largest {
        0.0 => "0".to_string(),
        v => format!("{v:.1e}"),
    };
    Error::data(format!(
        "every target layer's input is degenerate: none of the {} inputs ({} layers, up to {tokens} tokens each) varies beyond rounding (the largest total variance is {largest} of the rows' mean squared norm; at most {:.0e} is degenerate), so there are no directions to initialize LoRA from; every example may reduce to the same tokens (e.g. --max-seq-len 1 keeps only the first token) — use more varied data or a longer --max-seq-len; nothing was written",
        catalog.inputs.len(),
        catalog.layers.len(),
        crate::leader::DEGENERATE_RTOL
    ))
}

/// The outcome as bytes: the adapter's layers, its config and the report.
fn encode_outcome(o: &Outcome) -> Vec<u8> {
    let mut w = Writer::default();
    let layers: Vec<(usize, LayerAdapter)> = o.adapter.layers.iter().cloned().enumerate().collect();
    w.bytes(&messages::encode_layers(&layers));
    w.bytes(&serde_json::to_vec(&o.adapter.config).expect("JSON serializes"));
    w.bytes(&serde_json::to_vec(&o.report).expect("report serializes"));
    w.0
}

fn decode_outcome(buf: &[u8]) -> Result<Outcome> {
    let bad = |e: String| Error::Comm(format!("malformed outcome from rank 0: {e}"));
    let mut r = Reader::new(buf);
    let layers = messages::decode_layers(r.bytes()?)?
        .into_iter()
        .map(|(_, l)| l)
        .collect();
    let config = serde_json::from_slice(r.bytes()?).map_err(|e| bad(e.to_string()))?;
    let report = serde_json::from_slice(r.bytes()?).map_err(|e| bad(e.to_string()))?;
    Ok(Outcome {
        adapter: Adapter { layers, config },
        report,
    })
}
