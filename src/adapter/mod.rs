//! The PEFT adapter: `lora_A` from the leader's components, zero `lora_B`, and
//! `adapter_config.json` with PEFT's EVA semantics (docs/formats.md).
//!
//! | module | role |
//! |---|---|
//! | [`report`] | `eva_report.json` |
//! | [`grid`] | layers on a blocks × module types grid, read from their names |
//! | [`svg`] | `eva_report.svg`: the ranks, variance captured and convergence as heatmaps |
//! | [`card`] | `README.md`: the model card, in PEFT's form |
//! | [`write`] | safetensors serialization and atomic directory writing |

pub mod card;
pub mod grid;
pub mod report;
pub mod svg;
pub mod write;

use crate::catalog::{Catalog, LayerInfo};
use crate::config::{EvaParams, RunConfig};
use crate::leader::convergence::normalize_signs;
use crate::leader::Spectrum;
use ndarray::{s, Array2};
use serde_json::{json, Map, Value};

/// One layer's LoRA weights.
#[derive(Clone, Debug)]
pub struct LayerAdapter {
    /// Module path.
    pub name: String,
    /// Allocated rank (> 0).
    pub rank: usize,
    /// `lora_alpha` for this layer.
    pub alpha: f64,
    /// `lora_A`, `rank x in_features`: the top components (rows), whitened if asked.
    pub a: Array2<f32>,
    /// Rows of the zero `lora_B` (`out_features x rank`).
    pub out_features: usize,
}

/// The adapter's layers from the stage leaders' `(catalog index, layer)` pairs (rank > 0,
/// catalog order): modules as they are, and the experts' slices of each 3-D parameter stacked
/// into the parameter's one `lora_A` (`r · experts` rows, expert `e`'s at `e·r..(e+1)·r`, as
/// PEFT's `ParamWrapper` reads it), named by the parameter. Also returns the parameters' names
/// (PEFT's `target_parameters`). The experts of a parameter share one rank (the allocation
/// keeps them so); all of them are present or none.
pub fn fuse_experts(
    layers: Vec<(usize, LayerAdapter)>,
    catalog: &Catalog,
) -> (Vec<LayerAdapter>, Vec<String>) {
    let mut out: Vec<LayerAdapter> = Vec::new();
    let mut params: Vec<String> = Vec::new();
    for (i, l) in layers {
        let Some(p) = &catalog.layers[i].param else {
            out.push(l);
            continue;
        };
        if params.last() != Some(&p.name) {
            params.push(p.name.clone());
            out.push(LayerAdapter {
                name: p.name.clone(),
                rank: l.rank,
                alpha: l.alpha,
                a: Array2::zeros((0, l.a.ncols())),
                out_features: l.out_features,
            });
        }
        let fused = out.last_mut().expect("pushed above");
        assert_eq!(
            (fused.rank, p.expert),
            (l.rank, fused.a.nrows() / l.rank.max(1)),
            "the experts of {} arrive in order with one rank",
            p.name
        );
        fused
            .a
            .append(ndarray::Axis(0), l.a.view())
            .expect("same in_features");
    }
    (out, params)
}

/// Everything PEFT needs to load the adapter.
#[derive(Clone, Debug)]
pub struct Adapter {
    /// Layers with rank > 0, catalog order.
    pub layers: Vec<LayerAdapter>,
    /// `adapter_config.json`.
    pub config: Value,
}

/// Layer `name`'s alpha at its new rank: with PEFT's `adjust_scaling_factors`
/// `alpha × (rank / r_l)`, `r_l` its rank before redistribution (evaluated as PEFT does, so the
/// same bits), else `alpha`.
pub fn layer_alpha(params: &EvaParams, name: &str, rank: usize) -> f64 {
    let before = params.layer_rank(name);
    if params.adjust_alpha && rank != before {
        params.alpha * (rank as f64 / before as f64)
    } else {
        params.alpha
    }
}

/// One layer's LoRA weights from its rank and its input's final spectrum: the top `rank`
/// components as rows, signs normalized, whitened if asked.
pub fn layer(
    layer: &LayerInfo,
    rank: usize,
    spectrum: &Spectrum,
    params: &EvaParams,
) -> LayerAdapter {
    let mut v = spectrum.vectors.slice(s![.., ..rank]).to_owned();
    normalize_signs(&mut v);
    let mut a = v.t().mapv(|x| x as f32);
    if params.whiten {
        // Singular values of the centered data matrix: σ_i = sqrt(λ_i (n - 1)).
        let n1 = spectrum.summary.tokens.saturating_sub(1) as f64;
        for (mut row, &lambda) in a.rows_mut().into_iter().zip(&spectrum.summary.values) {
            let sigma = (lambda * n1).sqrt();
            if sigma > 0.0 {
                row.mapv_inplace(|x| (x as f64 / sigma.sqrt()) as f32);
            }
        }
    }
    LayerAdapter {
        name: layer.name.clone(),
        rank,
        alpha: layer_alpha(params, layer.target(), rank),
        a,
        out_features: layer.out_features,
    }
}

/// The adapter from its layers (rank > 0, catalog order; 3-D parameters fused, named in
/// `params`) and the run's configuration.
pub fn assemble(layers: Vec<LayerAdapter>, params: &[String], cfg: &RunConfig) -> Adapter {
    let config = config_json(&layers, params, cfg);
    Adapter { layers, config }
}

/// The module path under which PEFT keeps a layer's `lora_A`/`lora_B`: the layer's own name for
/// a module; for a parameter in `target_parameters`, its module (`...mlp.experts`), inside one
/// `base_layer.` per targeted parameter of the same module listed after it (PEFT nests one
/// `ParamWrapper` per parameter, the first in the module's declaration order innermost; eva lists
/// `gate_up_proj` before `down_proj`, their declaration order).
pub fn tensor_path(name: &str, config: &Value) -> String {
    let params: Vec<&str> = config
        .get("target_parameters")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let Some(at) = params.iter().position(|p| *p == name) else {
        return name.to_string();
    };
    let module = |p: &str| {
        p.rsplit_once('.')
            .map_or(String::new(), |(m, _)| m.to_string())
    };
    let own = module(name);
    let outer = params[at + 1..].iter().filter(|p| module(p) == own).count();
    format!("{own}{}", ".base_layer".repeat(outer))
}

fn number(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        json!(v as i64)
    } else {
        json!(v)
    }
}

fn config_json(layers: &[LayerAdapter], params: &[String], cfg: &RunConfig) -> Value {
    let p = &cfg.eva;
    let mut rank_pattern = Map::new();
    let mut alpha_pattern = Map::new();
    for l in layers {
        if l.rank != p.rank {
            rank_pattern.insert(l.name.clone(), json!(l.rank));
        }
        if l.alpha != p.alpha {
            alpha_pattern.insert(l.name.clone(), number(l.alpha));
        }
    }
    let mut config = json!({
        "peft_type": "LORA",
        "task_type": cfg.task_type,
        "base_model_name_or_path": cfg.base_model,
        "r": p.rank,
        "lora_alpha": number(p.alpha),
        "target_modules": layers
            .iter()
            .map(|l| l.name.clone())
            .filter(|n| !params.contains(n))
            .collect::<Vec<_>>(),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "init_lora_weights": "eva",
        "eva_config": {
            "rho": p.rho,
            "tau": p.tau,
            "use_label_mask": p.use_label_mask,
            "label_mask_value": p.label_mask_value,
            "whiten": p.whiten,
            "adjust_scaling_factors": p.adjust_alpha,
        },
        "bias": "none",
        "lora_dropout": p.lora_dropout,
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "inference_mode": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "revision": null,
    });
    // Only where experts are targeted: an adapter of modules alone stays the file it always was
    // (PEFT's default is no `target_parameters`).
    if !params.is_empty() {
        config["target_parameters"] = json!(params);
    }
    config
}
