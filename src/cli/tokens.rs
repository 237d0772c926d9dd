//! Fail fast on token counts: a run whose tokens can never exceed a layer's candidate components
//! is refused before the first forward pass, with the numbers, instead of after the whole run.

use crate::config::RunConfig;
use crate::leader::allocate;
use crate::source::Source;
use crate::{Error, Result};

/// Refuses a run in which some input can never see more tokens than its candidate components
/// (`round(r_l · rho)`, at most its dimension: the engine's final solve needs more), when the
/// source bounds the rows per unit ([`Source::max_unit_tokens`]). The bound is
/// `units read × rows per unit`, the units read being all of them or `--max-steps × --batch-size`.
pub fn check_reachable(source: &dyn Source, cfg: &RunConfig) -> Result<()> {
    let Some(per_unit) = source.max_unit_tokens() else {
        return Ok(());
    };
    let units = source.units();
    let read = cfg
        .max_steps
        .map_or(units, |s| units.min(s.saturating_mul(cfg.batch_size)));
    let most = read.saturating_mul(per_unit);
    let catalog = source.catalog();
    let caps = allocate::caps(catalog, &cfg.eva);
    let kmax = |g: usize| allocate::input_cap(catalog, &caps, g);
    let Some(g) = (0..catalog.inputs.len()).find(|&g| most <= kmax(g)) else {
        return Ok(());
    };
    let dim = catalog.inputs[g].dim;
    let kmax = kmax(g);
    // The group's cap is that of its largest rank.
    let rank = catalog.inputs[g]
        .members
        .iter()
        .map(|&m| cfg.eva.layer_rank(catalog.layers[m].target()))
        .max()
        .unwrap_or(cfg.eva.rank);
    let rank = cfg.eva.rank_phrase(rank);
    let units_read = match cfg.max_steps {
        Some(s) if read < units => format!(
            "{read} units (--max-steps {s} × --batch-size {})",
            cfg.batch_size
        ),
        _ => format!("{units} units"),
    };
    let components = if kmax < dim {
        format!(
            "its {kmax} candidate components (round({rank} × --rho {}))",
            cfg.eva.rho
        )
    } else {
        format!("its {dim} candidate components (its in_features)")
    };
    Err(Error::data(format!(
        "layer {}: at most {most} tokens can reach it ({units_read} × at most {per_unit} tokens each), not more than {components}; more data, a larger --max-steps or a smaller --rank/--rho",
        catalog.layers[catalog.representative(g)].name
    )))
}
