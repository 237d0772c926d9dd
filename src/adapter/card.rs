//! The output directory's `README.md`: a model card in the form PEFT's `save_pretrained` writes
//! (YAML front matter with `base_model`, `library_name: peft`, `tags`), with what eva adds: the
//! EVA settings, the data seen, the rank distribution and a link to `eva_report.svg`.

use super::grid::{Grid, RankStats};
use super::report::Report;
use super::write::{REPORT_FILE, SVG_FILE};
use serde_json::Value;
use std::fmt::Write as _;

/// A YAML scalar: plain when that reads back as the same string, else double-quoted.
///
/// JSON string syntax is a subset of YAML's double-quoted scalars (YAML 1.2 §7.3.1), so
/// `serde_json` does the escaping.
pub fn yaml_scalar(s: &str) -> String {
    let plain_char = |c: char| c.is_ascii_alphanumeric() || "_-./:@+".contains(c);
    let first_ok = s
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '/' || c == '_');
    // YAML 1.1 readers (PyYAML) retype these.
    let special = [
        "true", "false", "yes", "no", "on", "off", "y", "n", "null", "~",
    ]
    .contains(&s.to_ascii_lowercase().as_str());
    let numeric = s.parse::<f64>().is_ok() || s.starts_with("0x") || s.starts_with("0o");
    if first_ok
        && s.chars().all(plain_char)
        && !s.ends_with(':')
        && !s.contains(": ")
        && !special
        && !numeric
    {
        s.to_string()
    } else {
        serde_json::to_string(s).expect("strings serialize")
    }
}

/// The front matter's fields, as PEFT's `create_or_update_model_card` sets them
/// (`src/peft/peft_model.py`): `base_model` from the base model's `_name_or_path`,
/// `library_name: peft`, `pipeline_tag: text-generation` for causal LMs, and the sorted tags
/// `base_model:adapter:<base>`, `lora`, `transformers`; eva adds the tag `eva`.
fn front_matter(base: Option<&str>, task_type: Option<&str>, transformers: bool) -> String {
    let mut tags = vec!["eva".to_string(), "lora".to_string()];
    if let Some(b) = base {
        tags.push(format!("base_model:adapter:{b}"));
    }
    if transformers {
        tags.push("transformers".into());
    }
    tags.sort();
    // Keys in ModelCardData's order (huggingface_hub `repocard_data.py`), as PEFT's card has them.
    let mut y = String::from("---\n");
    if let Some(b) = base {
        let _ = writeln!(y, "base_model: {}", yaml_scalar(b));
    }
    y.push_str("library_name: peft\n");
    if task_type == Some("CAUSAL_LM") {
        y.push_str("pipeline_tag: text-generation\n");
    }
    y.push_str("tags:\n");
    for t in &tags {
        let _ = writeln!(y, "- {}", yaml_scalar(t));
    }
    y.push_str("---\n");
    y
}

/// What the source's units are called.
fn unit_word(source: &str) -> &'static str {
    if source.starts_with("model:") {
        "examples"
    } else if source.starts_with("activations:") {
        "activation files"
    } else {
        "units"
    }
}

fn yes(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "true",
        Some(false) => "false",
        None => "unknown",
    }
}

/// Renders `README.md` for an adapter with this report and `adapter_config.json`.
pub fn render(report: &Report, config: &Value) -> String {
    let base = config
        .get("base_model_name_or_path")
        .and_then(Value::as_str);
    let task_type = config.get("task_type").and_then(Value::as_str);
    let eva = config.get("eva_config");
    let flag = |k: &str| eva.and_then(|e| e.get(k)).and_then(Value::as_bool);
    let grid = Grid::new(report);
    let all = RankStats::of(report.layers.iter().map(|l| l.rank));
    let units = unit_word(&report.source);

    let mut md = front_matter(base, task_type, report.source.starts_with("model:"));
    let _ = writeln!(md);
    let _ = writeln!(
        md,
        "# EVA-initialized LoRA adapter{}",
        base.map(|b| format!(" for {b}")).unwrap_or_default()
    );
    let _ = writeln!(md);
    let _ = writeln!(
        md,
        "Initialized by eva {} with EVA (Explained Variance Adaptation, Paischer et al., \
         [arXiv 2410.07170](https://arxiv.org/abs/2410.07170)): each layer's `lora_A` holds the top \
         principal components of its inputs on the data below, `lora_B` is zero (the model is unchanged \
         until fine-tuning), and ranks were redistributed across layers by explained variance.",
        report.eva_version
    );
    let _ = writeln!(md);
    let _ = writeln!(md, "```python\nfrom peft import PeftModel\n\nmodel = PeftModel.from_pretrained(base_model, \"path/to/this/directory\")\n```");
    let _ = writeln!(md);

    let _ = writeln!(md, "## EVA settings\n");
    let _ = writeln!(md, "| setting | value |\n|---|---|");
    let _ = writeln!(
        md,
        "| `r` (per layer, before redistribution) | {} |",
        report.r
    );
    let _ = writeln!(
        md,
        "| rank budget (`r` × {} target layers) | {} |",
        report.layers.len(),
        report.rank_budget
    );
    let _ = writeln!(
        md,
        "| `rho` (cap per layer `round(r·rho)`) | {} |",
        report.rho
    );
    let _ = writeln!(md, "| `tau` (convergence threshold) | {} |", report.tau);
    if let Some(a) = config.get("lora_alpha") {
        let _ = writeln!(
            md,
            "| `lora_alpha` | {a} (`adjust_scaling_factors`: {}) |",
            yes(flag("adjust_scaling_factors"))
        );
    }
    let _ = writeln!(md, "| `whiten` | {} |", yes(flag("whiten")));
    let _ = writeln!(md, "| `use_label_mask` | {} |", yes(flag("use_label_mask")));
    let exact = report
        .layers
        .iter()
        .filter(|l| l.estimator == "exact")
        .count();
    let _ = writeln!(
        md,
        "| estimator | exact for {exact} layers, sketch for {} |",
        report.layers.len() - exact
    );
    if let Some(t) = task_type {
        let _ = writeln!(md, "| `task_type` | {t} |");
    }
    let _ = writeln!(md);

    let _ = writeln!(md, "## Data seen\n");
    let _ = writeln!(md, "- source: `{}`", report.source);
    let _ = writeln!(
        md,
        "- {} of {} {units}, in {} steps of {} (stop: {})",
        report.units_seen, report.units_total, report.steps, report.batch_size, report.stop_reason
    );
    let most = report.layers.iter().map(|l| l.tokens).max().unwrap_or(0);
    let fewest = report.layers.iter().map(|l| l.tokens).min().unwrap_or(0);
    if most == fewest {
        let _ = writeln!(md, "- {most} tokens in every layer's statistics");
    } else {
        let _ = writeln!(
            md,
            "- {most} tokens in the statistics of the layers that read the most, {fewest} in those that read the fewest (a converged layer stops accumulating)"
        );
    }
    let _ = writeln!(
        md,
        "- {} rank(s) ({}), {:.2} s",
        report.world_size, report.backend, report.time_s.total
    );
    let _ = writeln!(md);

    let _ = writeln!(md, "## Rank distribution\n");
    let _ = writeln!(md, "![EVA ranks per block and module type]({SVG_FILE})\n");
    let _ = writeln!(
        md,
        "Ranks sum to {} (budget {}) over {} layers; {} kept (rank > 0), ranks {}..{}.\n",
        all.total,
        report.rank_budget,
        all.layers,
        all.layers - all.dropped,
        all.min,
        all.max
    );
    let _ = writeln!(
        md,
        "| module type | layers | total rank | min | mean | max |\n|---|---:|---:|---:|---:|---:|"
    );
    for (t, st) in grid.by_type() {
        let _ = writeln!(
            md,
            "| {t} | {} | {} | {} | {:.1} | {} |",
            st.layers,
            st.total,
            st.min,
            st.mean(),
            st.max
        );
    }
    let blocks = grid.by_block();
    if !blocks.is_empty() {
        let list: Vec<String> = blocks
            .iter()
            .map(|(b, st)| format!("{b}: {}", st.total))
            .collect();
        let _ = writeln!(md, "\nTotal rank per block: {}.", list.join(", "));
    }
    let _ = writeln!(md);
    let unconverged: Vec<&str> = report
        .layers
        .iter()
        .filter(|l| l.converged_step.is_none() && !l.degenerate)
        .map(|l| l.name.as_str())
        .collect();
    let degenerate: Vec<&str> = report
        .layers
        .iter()
        .filter(|l| l.degenerate)
        .map(|l| l.name.as_str())
        .collect();
    let uncertain: Vec<&str> = report
        .layers
        .iter()
        .filter(|l| !l.allocation_certain)
        .map(|l| l.name.as_str())
        .collect();
    let list = |v: &[&str]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let _ = writeln!(
        md,
        "- not converged when the run stopped: {}",
        list(&unconverged)
    );
    let _ = writeln!(
        md,
        "- allocation not certified (sketch error bounds allow another rank): {}",
        list(&uncertain)
    );
    if !degenerate.is_empty() {
        let _ = writeln!(
            md,
            "- input without variance (rank 0, left out): {}",
            list(&degenerate)
        );
    }
    let _ = writeln!(md, "\nEvery layer's numbers are in `{REPORT_FILE}`; `eva report <this directory>` prints this summary.\n");

    // PEFT's `create_or_update_model_card` appends `- PEFT <version>` under this heading when it
    // saves into the same directory.
    let _ = writeln!(md, "### Framework versions\n\n- eva {}", report.eva_version);
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_are_plain_only_when_they_read_back_the_same() {
        assert_eq!(
            yaml_scalar("meta-llama/Llama-3.2-1B"),
            "meta-llama/Llama-3.2-1B"
        );
        assert_eq!(yaml_scalar("/work/models/tiny"), "/work/models/tiny");
        assert_eq!(
            yaml_scalar("base_model:adapter:/m"),
            "base_model:adapter:/m"
        );
        assert_eq!(yaml_scalar("yes"), "\"yes\"");
        assert_eq!(yaml_scalar("1.0"), "\"1.0\"");
        assert_eq!(yaml_scalar("my model: v2"), "\"my model: v2\"");
        assert_eq!(yaml_scalar("#x"), "\"#x\"");
        assert_eq!(yaml_scalar(""), "\"\"");
    }
}
