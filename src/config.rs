//! Validated run configuration shared by the engine, the leader and the adapter writer, and
//! ([`validate`]) the one validation that makes it from every front end's options.

pub mod validate;

pub use validate::{validate, Options, Plan, DEFAULT_STATS_MEMORY, DEFAULT_STATS_MEMORY_GIB};

use std::path::PathBuf;
use std::time::Duration;

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

/// Which statistic each unique input accumulates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EstimatorChoice {
    /// Exact Gram where its memory fits `stats_memory`, sketch otherwise.
    Auto,
    /// Exact Gram (`8·d²` bytes per unique input).
    Exact,
    /// Nyström sketch (`20·d·(k+q)` bytes per unique input: `stats::memory_bytes`).
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
    pub checkpoint: Option<Checkpointing>,
}

/// When to write checkpoints.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Every {
    /// After every N-th step.
    Steps(usize),
    /// After the first step that ends at least this long after the previous checkpoint (or the
    /// start), by the global leader's clock.
    Time(Duration),
}

impl std::str::FromStr for Every {
    type Err = String;

    /// `N` steps, or a duration: `90s`, `10m`, `1.5h`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || {
            format!("expected a number of steps (e.g. 50) or a duration (e.g. 90s, 10m, 1h), found `{s}`")
        };
        let t = s.trim();
        let (num, unit) = match t.find(|c: char| c.is_ascii_alphabetic()) {
            Some(i) => (&t[..i], &t[i..]),
            None => {
                let n: usize = t.parse().map_err(|_| bad())?;
                return if n == 0 {
                    Err("expected at least 1 step, found 0".into())
                } else {
                    Ok(Every::Steps(n))
                };
            }
        };
        let scale = match unit {
            "s" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        let v: f64 = num.trim().parse().map_err(|_| bad())?;
        if !(v > 0.0 && v.is_finite()) {
            return Err(format!("expected a positive duration, found `{s}`"));
        }
        Ok(Every::Time(Duration::from_secs_f64(v * scale)))
    }
}

impl std::fmt::Display for Every {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Every::Steps(n) => write!(f, "{n} steps"),
            Every::Time(d) => write!(f, "{} s", d.as_secs_f64()),
        }
    }
}

/// What `--checkpoint` asks of the run. The caller checks the directory on every rank with
/// `engine::checkpoint::prepare` before any work.
#[derive(Clone, Debug)]
pub struct Checkpointing {
    /// Where the checkpoints go (created if missing; every rank must be able to write there).
    pub dir: PathBuf,
    /// How often.
    pub every: Every,
    /// Continue from the latest complete checkpoint in `dir`, if there is one.
    pub resume: bool,
    /// Everything besides the grid and the catalog that the adapter depends on (flags, data and
    /// model identity), as `(what, value)` pairs; a checkpoint with other values is refused,
    /// naming each difference.
    pub fingerprint: Vec<(String, String)>,
}

#[cfg(test)]
mod tests {
    use super::{EvaParams, Every};
    use std::time::Duration;

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

    #[test]
    fn every_parses_steps_and_durations() {
        assert_eq!("50".parse::<Every>(), Ok(Every::Steps(50)));
        assert_eq!(
            "10m".parse::<Every>(),
            Ok(Every::Time(Duration::from_secs(600)))
        );
        assert_eq!(
            "1.5h".parse::<Every>(),
            Ok(Every::Time(Duration::from_secs(5400)))
        );
        assert_eq!(
            "90s".parse::<Every>(),
            Ok(Every::Time(Duration::from_secs(90)))
        );
        for bad in ["0", "-3", "10x", "m", "", "0s", "nan s"] {
            assert!(bad.parse::<Every>().is_err(), "{bad}");
        }
    }
}
