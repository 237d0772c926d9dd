//! `eva_report.json`: per layer, what was allocated and how certain it is; per run, where the
//! time went and what was communicated.

use serde::{Deserialize, Serialize};

fn one() -> usize {
    1
}

/// Seconds spent in each phase (on the leader).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Times {
    /// Producing layer inputs (shard reading and decoding, synthetic generation, model forward).
    pub forward: f64,
    /// Accumulating statistics.
    pub statistics: f64,
    /// Collectives.
    pub communication: f64,
    /// Eigenpairs, convergence and allocation.
    pub leader: f64,
    /// Serializing and writing the output directory.
    pub writing: f64,
    /// Wall time of the whole run.
    pub total: f64,
}

/// Payload bytes the leader passed to collectives (0 in a world of one): every rank moves the
/// same all-reduce payloads; broadcasts are counted once, at their root.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Bytes {
    /// Over the whole run.
    pub per_rank_total: u64,
    /// Largest single step.
    pub per_rank_max_step: u64,
    /// Mean over the steps.
    #[serde(default)]
    pub per_rank_mean_step: f64,
    /// Per step, in order.
    #[serde(default)]
    pub per_step: Vec<u64>,
    /// Hidden states the leader sent to the next pipeline stage (0 with one stage), over the run.
    #[serde(default)]
    pub hidden_per_rank_total: u64,
    /// The same per step, in order.
    #[serde(default)]
    pub hidden_per_step: Vec<u64>,
}

/// Accuracy statement for one layer's statistics.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CertificateReport {
    /// Exact covariance; eigensolver residual relative to λ₁.
    Exact { residual: f64 },
    /// Nyström sketch; errors are absolute on the covariance, `ratio_error_bound` relative to its trace.
    Sketch {
        sketch_size: usize,
        nuclear_error: f64,
        spectral_bound: f64,
        trace: f64,
    },
}

/// One target layer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LayerReport {
    pub name: String,
    /// The representative of its equal-input group (itself when alone).
    pub input: String,
    pub in_features: usize,
    pub out_features: usize,
    /// Allocated rank (0 = left out of the adapter).
    pub rank: usize,
    pub alpha: f64,
    /// Explained-variance ratios of the candidate components, descending.
    pub explained_variance_ratio: Vec<f64>,
    /// Step (1-based) after which its components were stable, or null if they never were.
    pub converged_step: Option<usize>,
    /// Tokens its statistics hold.
    pub tokens: u64,
    /// `exact` or `sketch`.
    pub estimator: String,
    /// Bound on each explained-variance ratio's error (0 for exact statistics).
    pub error_bound: f64,
    /// Whether the rank is the same for every spectrum the error bounds allow.
    pub allocation_certain: bool,
    pub certificate: CertificateReport,
    /// Its input does not vary beyond rounding (total variance at most
    /// `leader::DEGENERATE_RTOL` of the rows' mean squared norm): no components, rank 0.
    #[serde(default)]
    pub degenerate: bool,
    /// The input's total variance over its rows' mean squared norm `Σ‖x‖²/n` (absent in
    /// reports of older versions).
    #[serde(default)]
    pub relative_variance: Option<f64>,
}

/// The whole run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub eva_version: String,
    /// Collectives backend (`single`, `threads`, `mpi`, `nccl`); absent in the first reports.
    #[serde(default)]
    pub backend: String,
    /// What the activations came from.
    pub source: String,
    pub world_size: usize,
    /// Pipeline stages (`--pp`); `world_size / pipeline_stages` data-parallel replicas.
    #[serde(default = "one")]
    pub pipeline_stages: usize,
    /// Blocks (model source) or unique inputs (others) of each stage, as `first..end` ranges.
    #[serde(default)]
    pub stage_split: Vec<String>,
    /// Global steps taken.
    pub steps: usize,
    /// The step of the checkpoint this run resumed from (`--resume`), if it did.
    #[serde(default)]
    pub resumed_from_step: Option<usize>,
    /// Units per global step.
    pub batch_size: usize,
    pub units_seen: usize,
    pub units_total: usize,
    /// `converged`, `data_exhausted` or `max_steps` (`all_data` with --no-early-stop).
    pub stop_reason: String,
    /// Every layer converged.
    pub converged: bool,
    /// Layers whose components had not converged when the run stopped (degenerate ones aside).
    pub unconverged_layers: Vec<String>,
    /// Layers whose input is degenerate ([`LayerReport::degenerate`]): rank 0.
    #[serde(default)]
    pub degenerate_layers: Vec<String>,
    pub rank_budget: usize,
    pub r: usize,
    pub rho: f64,
    pub tau: f64,
    pub time_s: Times,
    pub bytes: Bytes,
    pub layers: Vec<LayerReport>,
}

/// Most layer names a warning lists before it counts the rest.
const WARN_LISTED: usize = 12;

impl Report {
    /// The warning for layers whose input is degenerate, if there are any: how many, which
    /// (grouped by input), and what it means. An expert that fell back to PEFT's default
    /// initialization (too few routed tokens) is degenerate but keeps its parameter's rank: the
    /// engine warned about it, and it is not left out.
    pub fn degenerate_warning(&self) -> Option<String> {
        let bad: Vec<&LayerReport> = self
            .layers
            .iter()
            .filter(|l| l.degenerate && l.rank == 0)
            .collect();
        if bad.is_empty() {
            return None;
        }
        let mut inputs: Vec<(&str, Vec<&str>, Option<f64>)> = Vec::new();
        for l in &bad {
            match inputs.iter_mut().find(|(i, _, _)| *i == l.input) {
                Some((_, members, _)) => members.push(&l.name),
                None => inputs.push((&l.input, vec![&l.name], l.relative_variance)),
            }
        }
        let listed: Vec<String> = inputs
            .iter()
            .take(WARN_LISTED)
            .map(|(_, members, rv)| {
                let rv = rv.map_or(String::new(), |v| format!(" ({v:.1e})"));
                format!("{}{rv}", members.join(", "))
            })
            .collect();
        let more = match inputs.len().saturating_sub(WARN_LISTED) {
            0 => String::new(),
            n => format!("; and {n} more inputs (see degenerate_layers in eva_report.json)"),
        };
        Some(format!(
            "eva: warning: {} of {} layers read an input that does not vary beyond rounding (total variance at most {:.0e} of the rows' mean squared norm, shown in parentheses): they get no components and rank 0, and are left out of the adapter: {}{more}",
            bad.len(),
            self.layers.len(),
            crate::leader::DEGENERATE_RTOL,
            listed.join("; ")
        ))
    }
}
