//! The run's configuration from the keyword options of `eva_lora.get_eva_state_dict`, checked
//! as `eva init` checks its flags.

use eva::config::{EstimatorChoice, EvaParams, RunConfig};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// `stats_memory` when not given: the CLI's `--stats-memory` default, in bytes.
pub const DEFAULT_STATS_MEMORY: u64 =
    (eva::cli::DEFAULT_STATS_MEMORY_GIB * (1u64 << 30) as f64) as u64;

/// `options[key]`, or `default` when absent or None.
fn get<'py, T: FromPyObject<'py>>(
    options: &Bound<'py, PyDict>,
    key: &str,
    default: T,
) -> PyResult<T> {
    match options.get_item(key)? {
        Some(v) if !v.is_none() => v
            .extract()
            .map_err(|e| super::EvaError::new_err(format!("option {key}: {e}"))),
        _ => Ok(default),
    }
}

fn usage(msg: String) -> PyErr {
    super::EvaError::new_err(msg)
}

/// EVA's knobs (LoraConfig.r, lora_alpha, EvaConfig) and eva's own options.
pub fn config(options: &Bound<'_, PyDict>) -> PyResult<RunConfig> {
    let d = EvaParams::default();
    let eva = EvaParams {
        rank: get(options, "r", d.rank)?,
        rank_pattern: get(options, "rank_pattern", d.rank_pattern)?,
        rho: get(options, "rho", d.rho)?,
        tau: get(options, "tau", d.tau)?,
        alpha: get(options, "lora_alpha", d.alpha)?,
        whiten: get(options, "whiten", d.whiten)?,
        adjust_alpha: get(options, "adjust_scaling_factors", d.adjust_alpha)?,
        use_label_mask: get(options, "use_label_mask", d.use_label_mask)?,
        label_mask_value: get(options, "label_mask_value", d.label_mask_value)?,
        lora_dropout: get(options, "lora_dropout", d.lora_dropout)?,
    };
    if eva.rank == 0 {
        return Err(usage("r must be at least 1".into()));
    }
    if let Some((name, r)) = eva.rank_pattern.iter().find(|(_, r)| *r == 0) {
        return Err(usage(format!(
            "rank_pattern must give every layer a rank of at least 1, found {r} for {name}"
        )));
    }
    if !(eva.rho >= 1.0 && eva.rho.is_finite()) {
        return Err(usage(format!(
            "eva_config.rho must be >= 1, found {}",
            eva.rho
        )));
    }
    if !(eva.tau > 0.0 && eva.tau <= 1.0) {
        return Err(usage(format!(
            "eva_config.tau must be in (0, 1], found {}",
            eva.tau
        )));
    }
    let estimator = match get(options, "estimator", "auto".to_string())?.as_str() {
        "auto" => EstimatorChoice::Auto,
        "exact" => EstimatorChoice::Exact,
        "sketch" => EstimatorChoice::Sketch,
        other => {
            return Err(usage(format!(
                "estimator must be auto, exact or sketch, found {other}"
            )))
        }
    };
    let max_steps: Option<usize> = get(options, "max_steps", None)?;
    if max_steps == Some(0) {
        return Err(usage("max_steps must be at least 1".into()));
    }
    let batch_size: usize = get(options, "batch_size", 1)?;
    Ok(RunConfig {
        eva,
        batch_size: batch_size.max(1),
        max_steps,
        no_early_stop: false,
        refine_converged: get(options, "refine_converged", false)?,
        estimator,
        sketch_size: get(options, "sketch_size", None)?,
        stats_memory: get(options, "stats_memory", DEFAULT_STATS_MEMORY)?,
        seed: get(options, "seed", 0)?,
        out: "python".into(),
        force: false,
        base_model: get(options, "base_model", None)?,
        task_type: get(options, "task_type", None)?,
        quiet: true,
        // Checkpoints belong to the CLI's step loop; the caller's loop owns its own state.
        checkpoint: None,
    })
}
