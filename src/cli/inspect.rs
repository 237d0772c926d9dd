//! `eva inspect --model DIR`: what `eva init --model DIR` would capture, without running it:
//! architecture, blocks, every targeted module with its shape, the equal-input groups, the
//! statistics memory per estimator and the size of the weights.

use crate::catalog::{matches_target, Catalog};
use crate::config::EstimatorChoice;
use crate::model::config::{Family, ModelConfig};
use crate::model::{Model, Point};
use crate::source::stages::{block_memory, model_blocks, owners_by_block};
use crate::stats::{choose, default_sketch_size, memory_bytes};
use crate::{Error, Result};
use clap::Args;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Arguments of `eva inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A HuggingFace model directory (config.json, model.safetensors or shards).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,

    /// Target modules, comma-separated, PEFT semantics [default: every linear layer inside the blocks].
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    pub targets: Option<Vec<String>>,

    /// LoRA rank r, for the sketch size and memory estimate.
    #[arg(long, default_value_t = 8)]
    pub rank: usize,

    /// rho, for the sketch size and memory estimate.
    #[arg(long, default_value_t = 2.0)]
    pub rho: f64,

    /// Sketch columns per input [default: as `eva init`].
    #[arg(long)]
    pub sketch_size: Option<usize>,

    /// Memory for exact Grams under --estimator auto, in GiB.
    #[arg(long, default_value_t = crate::config::DEFAULT_STATS_MEMORY_GIB, value_name = "GIB")]
    pub stats_memory: f64,

    /// Pipeline stages: print how `eva init --pp S` splits the blocks, and each stage's memory.
    #[arg(long, default_value_t = 1, value_name = "S")]
    pub pp: usize,

    /// Blocks per stage, as `eva init --pp-split` [default: balanced by each stage's memory: f32 weights plus exact statistics].
    #[arg(long, value_delimiter = ',', value_name = "BLOCKS")]
    pub pp_split: Option<Vec<usize>>,
}

/// `base_model_name_or_path` for a model directory: its absolute path.
pub fn model_name(dir: &Path) -> String {
    dir.canonicalize()
        .unwrap_or_else(|_| dir.to_path_buf())
        .display()
        .to_string()
}

/// PEFT `task_type` from the checkpoint's class (`None` if unreadable or without one).
pub fn task_type(dir: &Path) -> Option<String> {
    crate::model::config::load(dir)
        .ok()
        .and_then(|c| c.task_type().map(str::to_string))
}

fn mib(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.2} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

fn describe(c: &ModelConfig) -> String {
    match &c.family {
        Family::Decoder(d) => {
            let windows: Vec<usize> = d.windows.iter().flatten().copied().collect();
            let window = match windows.first() {
                Some(w) => format!(", sliding window {w} in {} of {} blocks", windows.len(), d.layers),
                None => String::new(),
            };
            let mut extras = Vec::new();
            if d.qk_norm {
                extras.push("per-head q/k RMSNorm".to_string());
            }
            if d.norm_offset {
                extras.push("RMSNorm x(1+w)".to_string());
            }
            if d.sandwich {
                extras.push("4 norms per block".to_string());
            }
            if d.fused {
                extras.push("fused qkv_proj and gate_up_proj".to_string());
            }
            if let Some(s) = d.embed_scale {
                extras.push(format!("embeddings x{s}"));
            }
            if d.attn_scale != 1.0 / (d.head_dim as f32).sqrt() {
                extras.push(format!("attention scale {}", d.attn_scale));
            }
            if let Some(cap) = d.softcap {
                extras.push(format!("attention soft-cap {cap}"));
            }
            let extras = if extras.is_empty() {
                String::new()
            } else {
                format!("; {}", extras.join(", "))
            };
            format!(
                "hidden {}, heads {} (kv {}, head_dim {}), intermediate {}, {:?}, RMSNorm eps {:e}, RoPE {}{window}; bias q/k/v {}, o {}, mlp {}{extras}",
                d.hidden, d.heads, d.kv_heads, d.head_dim, d.intermediate, d.act, d.eps, d.rope_desc, d.qkv_bias, d.o_bias, d.mlp_bias
            )
        }
        Family::Encoder(e) => format!(
            "hidden {}, heads {}, intermediate {}, {:?}, LayerNorm eps {:e}, {} positions{}, {} token types",
            e.hidden,
            e.heads,
            e.intermediate,
            e.act,
            e.eps,
            e.max_positions,
            e.position_offset.map_or(String::new(), |p| format!(" (offset {})", p + 1)),
            e.type_vocab
        ),
    }
}

/// The report `eva inspect` prints.
pub fn report(args: &InspectArgs) -> Result<String> {
    // `eva init`'s validation of the knobs `eva inspect` shares with it.
    let plan = crate::config::validate(&crate::config::Options {
        rank: args.rank,
        rho: args.rho,
        sketch_size: args.sketch_size,
        stats_memory_gib: args.stats_memory,
        targets: args.targets.clone(),
        pp: args.pp,
        pp_split: args.pp_split.clone(),
        ..Default::default()
    })?;
    let (eva, cfg) = (&plan.run.eva, &plan.run);
    let mut model = Model::open(&args.model)?;
    let memory = block_memory(&model, plan.source.targets.as_deref(), |d| {
        memory_bytes(true, d, 0, 1)
    });
    let blocks = model_blocks(&model, plan.grid.pp, plan.grid.pp_split.as_deref(), memory)?;
    model.checkpoint.load(|_| true)?;
    let (catalog, _) = model.catalog();
    let c = &model.config;
    let modules = model.modules();
    let catalog = match &plan.source.targets {
        None => catalog,
        Some(t) => {
            if let Some(bad) = t.iter().find(|t| {
                !catalog
                    .layers
                    .iter()
                    .any(|l| matches_target(&l.name, std::slice::from_ref(t)))
            }) {
                let names: Vec<&str> = catalog.layers.iter().map(|l| l.name.as_str()).collect();
                return Err(Error::usage(format!(
                    "--targets entry `{bad}` matches no layer; available layers: {}",
                    names.join(", ")
                )));
            }
            catalog.retain(|l| matches_target(&l.name, t))
        }
    };

    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(w, "model        {}", model_name(&args.model));
    let _ = writeln!(
        w,
        "architecture {} ({}), task_type {}",
        c.arch.name(),
        if c.class.is_empty() {
            "no architectures entry"
        } else {
            &c.class
        },
        c.task_type().unwrap_or("none")
    );
    let _ = writeln!(w, "blocks       {}: {}", model.layers(), describe(c));
    if let Some(m) = match &c.family {
        crate::model::config::Family::Decoder(d) => d.moe.as_deref(),
        _ => None,
    } {
        let sparse: Vec<String> = (0..m.sparse.len())
            .filter(|&l| m.sparse[l])
            .map(|l| l.to_string())
            .collect();
        let _ = writeln!(
            w,
            "experts      {} per sparse block (blocks {}), top-{}{}, width {}{}; targets: PEFT target_parameters mlp.experts.gate_up_proj, mlp.experts.down_proj (one input per expert: its routed rows)",
            m.experts,
            sparse.join(","),
            m.top_k,
            if m.norm_topk { " renormalized" } else { "" },
            m.intermediate,
            m.shared
                .map_or(String::new(), |s| format!(", shared expert of width {s}"))
        );
    }
    let _ = writeln!(
        w,
        "key prefix   {}",
        if model.prefix.is_empty() {
            "(none)"
        } else {
            &model.prefix
        }
    );
    if model.module_prefix != model.prefix {
        let _ = writeln!(
            w,
            "module path  {} (as transformers loads the keys; the adapter's names)",
            model.module_prefix
        );
    }
    if let Some(m) = c.max_positions() {
        let _ = writeln!(
            w,
            "max tokens   {m} per example (learned positions; --max-seq-len is capped to it)"
        );
    }
    let by_dtype = model.checkpoint.bytes_by_dtype(|_| true);
    let total: u64 = by_dtype.values().sum();
    let parts: Vec<String> = by_dtype
        .iter()
        .map(|(d, b)| format!("{d} {}", mib(*b)))
        .collect();
    let decoded: u64 = by_dtype
        .iter()
        .filter(|(d, _)| *d == "F16" || *d == "BF16")
        .map(|(_, b)| 2 * b)
        .sum();
    let _ = writeln!(
        w,
        "weights      {} in {} file(s) ({}); eva decodes F16/BF16 to f32 ({} more memory, at most) and reads F32 in place",
        mib(total),
        model.checkpoint.files.len(),
        parts.join(", "),
        mib(decoded)
    );
    let _ = writeln!(
        w,
        "targets      {} modules, {} unique inputs{}",
        catalog.layers.len(),
        catalog.inputs.len(),
        if plan.source.targets.is_none() {
            " (default: every linear layer inside the blocks)"
        } else {
            ""
        }
    );
    let _ = writeln!(w);
    let width = catalog
        .layers
        .iter()
        .map(|l| l.name.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let _ = writeln!(w, "{:<width$}  {:>6}  {:>6}  input", "module", "in", "out");
    for l in &catalog.layers {
        let _ = writeln!(
            w,
            "{:<width$}  {:>6}  {:>6}  {}",
            l.name, l.in_features, l.out_features, l.input
        );
    }
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "equal-input groups (layers that read the same tensor share one decomposition):"
    );
    for (g, inp) in catalog.inputs.iter().enumerate() {
        let names: Vec<&str> = inp
            .members
            .iter()
            .map(|&m| catalog.layers[m].name.as_str())
            .collect();
        let first = &modules
            .iter()
            .find(|m| m.name == names[0])
            .expect("from the model")
            .point;
        let what = match first {
            Point::AttnIn => "attention input",
            Point::AttnOut => "attention output",
            Point::MlpIn => "MLP input",
            Point::MlpHidden => "MLP hidden",
            Point::ExpertIn(_) => "expert's routed rows",
            Point::ExpertHidden(_) => "expert's routed hidden",
        };
        let _ = writeln!(
            w,
            "  {g:>3}  d={:<6} {what:<16} {}",
            inp.dim,
            names.join(", ")
        );
    }
    let kmax = eva.components(eva.rank);
    let dims: Vec<usize> = catalog.inputs.iter().map(|i| i.dim).collect();
    let total = |exact: bool, world: usize| -> u64 {
        dims.iter()
            .map(|&d| {
                memory_bytes(
                    exact,
                    d,
                    cfg.sketch_size
                        .unwrap_or_else(|| default_sketch_size(kmax, d))
                        .min(d),
                    world,
                )
            })
            .sum()
    };
    let budget = cfg.stats_memory;
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "statistics memory per rank (rank {}, rho {}: {kmax} candidate components per input)",
        eva.rank, eva.rho
    );
    let _ = writeln!(
        w,
        "                one rank    several ranks (summed copies for the all-reduce)"
    );
    let _ = writeln!(
        w,
        "  exact   {:>12}  {:>12}",
        mib(total(true, 1)),
        mib(total(true, 2))
    );
    let _ = writeln!(
        w,
        "  sketch  {:>12}  {:>12}  ({} columns per input)",
        mib(total(false, 1)),
        mib(total(false, 2)),
        cfg.sketch_size
            .map_or_else(|| "default".to_string(), |k| k.to_string())
    );
    let pick = |world: usize| {
        let exact = choose(EstimatorChoice::Auto, &dims, budget, world);
        match exact.iter().filter(|&&e| e).count() {
            n if n == dims.len() => "exact for all inputs".to_string(),
            0 => "sketch for all inputs".to_string(),
            n => format!(
                "exact for the {n} smallest of {} inputs, sketch for the rest",
                dims.len()
            ),
        }
    };
    let _ = writeln!(
        w,
        "  --estimator auto with --stats-memory {} GiB: {} on one rank; {} on several",
        args.stats_memory,
        pick(1),
        pick(2)
    );
    if plan.grid.pp > 1 || plan.grid.pp_split.is_some() {
        stage_table(
            w,
            &model,
            &catalog,
            &blocks,
            |d| memory_bytes(true, d, 0, 1),
            |d| {
                memory_bytes(
                    false,
                    d,
                    cfg.sketch_size
                        .unwrap_or_else(|| default_sketch_size(kmax.min(d), d))
                        .min(d),
                    1,
                )
            },
        )?;
    }
    Ok(s)
}

/// The `--pp` split: per stage, its blocks, the weights it loads and its statistics memory.
fn stage_table(
    w: &mut String,
    model: &Model,
    catalog: &Catalog,
    blocks: &[std::ops::Range<usize>],
    exact: impl Fn(usize) -> u64,
    sketch: impl Fn(usize) -> u64,
) -> Result<()> {
    let block: std::collections::HashMap<&str, usize> = model
        .modules()
        .iter()
        .map(|m| (m.name.as_str(), m.layer))
        .collect();
    let owner = owners_by_block(catalog, |n| block.get(n).copied(), blocks)?;
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "pipeline stages ({}; stage s holds world ranks s*dp .. s*dp + dp - 1):",
        blocks.len()
    );
    let _ = writeln!(
        w,
        "  stage  blocks      weights (file)   statistics per rank: exact / sketch (one replica)"
    );
    for (s, r) in blocks.iter().enumerate() {
        let weights: u64 = model
            .checkpoint
            .bytes_by_dtype(|n| model.in_slice(n, r))
            .values()
            .sum();
        let dims: Vec<usize> = (0..catalog.inputs.len())
            .filter(|&g| owner[g] == s)
            .map(|g| catalog.inputs[g].dim)
            .collect();
        let (e, k): (u64, u64) = (
            dims.iter().map(|&d| exact(d)).sum(),
            dims.iter().map(|&d| sketch(d)).sum(),
        );
        let _ = writeln!(
            w,
            "  {s:>5}  {:<10}  {:>14}   {} / {}",
            format!("{}..{}", r.start, r.end),
            mib(weights),
            mib(e),
            mib(k)
        );
    }
    Ok(())
}

/// Runs `eva inspect`.
pub fn run(args: &InspectArgs) -> Result<()> {
    print!("{}", report(args)?);
    Ok(())
}
