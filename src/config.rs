//! Validated run configuration shared by the engine, the leader and the adapter writer.

use std::path::PathBuf;

/// PEFT's EVA knobs (`LoraConfig.r`, `lora_alpha`, `EvaConfig`), validated.
#[derive(Clone, Debug, PartialEq)]
pub struct EvaParams {
    /// Per-layer rank before redistribution (`LoraConfig.r`), where `rank_pattern` names none;
    /// the budget is the sum of the layers' ranks.
    pub rank: usize,
    /// Ranks before redistribution that differ from `rank` (PEFT's `rank_pattern`), in order:
    /// a key names a layer by its module path or a dotted suffix of it; the first match wins.
    pub rank_pattern: Vec<(String, usize)>,
    /// Cap per layer is `round(rank_l × rho)`; `rho = 1` disables redistribution.
    pub rho: f64,
    /// Convergence threshold on the (sign-free) similarity of consecutive components.
    pub tau: f64,
    /// `lora_alpha` written to the config.
    pub alpha: f64,
    /// Divide each component by the square root of its singular value.
    pub whiten: bool,
    /// `alpha_l = alpha × new rank / rank before` (PEFT's `adjust_scaling_factors`).
    pub adjust_alpha: bool,
    /// Leave out tokens whose label equals `label_mask_value`.
    pub use_label_mask: bool,
    /// The label value that marks masked tokens (PEFT: -100).
    pub label_mask_value: i64,
    /// `lora_dropout` written to the config.
    pub lora_dropout: f64,
}

impl Default for EvaParams {
    fn default() -> Self {
        EvaParams {
            rank: 8,
            rank_pattern: Vec::new(),
            rho: 2.0,
            tau: 0.99,
            alpha: 8.0,
            whiten: false,
            adjust_alpha: true,
            use_label_mask: true,
            label_mask_value: -100,
            lora_dropout: 0.0,
        }
    }
}

impl EvaParams {
    /// Layer `name`'s rank before redistribution: that of the first `rank_pattern` key that is
    /// its module path or a dotted suffix of it (PEFT's `get_pattern_key` for literal keys), else
    /// `rank`.
    pub fn layer_rank(&self, name: &str) -> usize {
        self.rank_pattern
            .iter()
            .find(|(key, _)| {
                name.strip_suffix(key.as_str())
                    .is_some_and(|head| head.is_empty() || head.ends_with('.'))
            })
            .map_or(self.rank, |&(_, r)| r)
    }

    /// How a message names a rank before redistribution: `--rank R` when it is `rank`, else
    /// `rank_pattern's rank R`.
    pub fn rank_phrase(&self, rank: usize) -> String {
        if rank == self.rank {
            format!("--rank {rank}")
        } else {
            format!("rank_pattern's rank {rank}")
        }
    }

    /// Candidate components of a layer of rank `rank` before redistribution: `round(rank × rho)`
    /// (PEFT's `max_components`), with Python's round-half-to-even so that e.g. r = 3, rho = 1.5
    /// gives 4 as in PEFT.
    pub fn components(&self, rank: usize) -> usize {
        (rank as f64 * self.rho).round_ties_even() as usize
    }

    /// The most candidate components any layer can have (an upper bound for memory estimates
    /// made before the target layers are known).
    pub fn most_components(&self) -> usize {
        let most = self
            .rank_pattern
            .iter()
            .map(|&(_, r)| r)
            .fold(self.rank, usize::max);
        self.components(most)
    }
}

#[cfg(test)]
mod tests {
    use super::EvaParams;

    #[test]
    fn components_round_like_python() {
        let c = |rank, rho| {
            EvaParams {
                rho,
                ..EvaParams::default()
            }
            .components(rank)
        };
        assert_eq!(c(3, 1.5), 4);
        assert_eq!(c(5, 1.5), 8);
        assert_eq!(c(8, 2.0), 16);
        assert_eq!(c(3, 1.0), 3);
    }

    #[test]
    fn rank_pattern_keys_match_paths_and_dotted_suffixes_first_key_first() {
        let p = EvaParams {
            rank: 8,
            rank_pattern: vec![("layers.0.q_proj".into(), 4), ("q_proj".into(), 2)],
            ..EvaParams::default()
        };
        assert_eq!(p.layer_rank("model.layers.0.q_proj"), 4);
        assert_eq!(p.layer_rank("layers.0.q_proj"), 4);
        assert_eq!(p.layer_rank("model.layers.1.q_proj"), 2);
        assert_eq!(p.layer_rank("q_proj"), 2);
        // A suffix that does not start at a dot is another module.
        assert_eq!(p.layer_rank("model.layers.1.xq_proj"), 8);
        assert_eq!(p.layer_rank("model.layers.1.v_proj"), 8);
        assert_eq!(p.most_components(), 16);
    }
}

/// Which statistic each unique input accumulates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EstimatorChoice {
    /// Exact Gram where its memory fits `stats_memory`, sketch otherwise.
    Auto,
    /// Exact Gram (`8·d²` bytes per unique input).
    Exact,
    /// Nyström sketch (`8·d·(k+q)` bytes per unique input).
    Sketch,
}

/// Everything `eva init` needs besides the data source.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// EVA's own knobs.
    pub eva: EvaParams,
    /// Units (files or sequences) per global step, whatever the world size.
    pub batch_size: usize,
    /// Stop after this many steps even if not converged.
    pub max_steps: Option<usize>,
    /// Use all data once and ignore convergence.
    pub no_early_stop: bool,
    /// Done inputs keep accumulating until the run stops, instead of stopping when they
    /// converge (PEFT's behaviour).
    pub refine_converged: bool,
    /// Statistic choice.
    pub estimator: EstimatorChoice,
    /// Sketch columns per unique input (`None` = automatic, see `stats::sketch_size`).
    pub sketch_size: Option<usize>,
    /// Memory budget in bytes for exact Grams under `--estimator auto`.
    pub stats_memory: u64,
    /// Seed for test matrices (and nothing else: exact runs do not depend on it).
    pub seed: u64,
    /// Output directory.
    pub out: PathBuf,
    /// Replace an existing output directory.
    pub force: bool,
    /// `base_model_name_or_path` written to the config.
    pub base_model: Option<String>,
    /// `task_type` written to the config.
    pub task_type: Option<String>,
    /// Print nothing but errors and warnings.
    pub quiet: bool,
    /// Checkpoints of the step loop and resuming from them (`--checkpoint`), if asked for.
    pub checkpoint: Option<crate::engine::checkpoint::Checkpointing>,
}
