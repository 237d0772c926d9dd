//! The run's configuration from the keyword options of `eva_lora.get_eva_state_dict`: they fill
//! the library's plain [`Options`] and go through `eva init`'s own validation
//! ([`eva::config::validate`]), so both refuse the same values with the same message.

use eva::config::{EstimatorChoice, Options, RunConfig, DEFAULT_STATS_MEMORY};
use pyo3::prelude::*;
use pyo3::types::PyDict;

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

/// EVA's knobs (LoraConfig.r, lora_alpha, EvaConfig) and eva's own options, validated.
pub fn config(options: &Bound<'_, PyDict>) -> PyResult<RunConfig> {
    let d = Options::default();
    let estimator: EstimatorChoice = get(options, "estimator", "auto".to_string())?
        .parse()
        .map_err(super::py_err)?;
    let stats_memory: u64 = get(options, "stats_memory", DEFAULT_STATS_MEMORY)?;
    let options = Options {
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
        // The global batch of the caller's loader (one pass per rank and step).
        batch_size: get(options, "batch_size", 1)?,
        max_steps: get(options, "max_steps", None)?,
        refine_converged: get(options, "refine_converged", false)?,
        estimator,
        sketch_size: get(options, "sketch_size", None)?,
        // Bytes to GiB and back are exact below 2^53 bytes.
        stats_memory_gib: stats_memory as f64 / (1u64 << 30) as f64,
        seed: get(options, "seed", 0)?,
        out: "python".into(),
        base_model: get(options, "base_model", None)?,
        task_type: get(options, "task_type", None)?,
        quiet: true,
        // No source (the hooks hand over the layer inputs), one stage, the caller's process
        // group, and no checkpoints: the caller's loop owns its own state.
        ..d
    };
    Ok(eva::config::validate(&options).map_err(super::py_err)?.run)
}
