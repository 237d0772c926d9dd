//! `--model DIR --data FILE`: a HuggingFace checkpoint run forward on tokenized examples. A unit
//! is one example (one line of the data file), so each rank reads only its own examples; the
//! engine hands over [`EXAMPLES_PER_PASS`] consecutive examples at a time, which run as one
//! packed forward pass. The inputs of the linear layers inside the transformer blocks are
//! captured; rows of padding (never materialized: packed sequences attend only within
//! themselves) and of tokens labelled -100 never reach the statistics.
//!
//! Equal-input groups come from the architecture: the layers reading the same capture point of
//! the same block ([`crate::model::Point`]: q/k/v, gate/up, BERT's query/key/value).

use super::{check_finite, Catalog, Sink, Source};
use crate::model::ops::{Backend, Cpu};
use crate::model::text::{read_examples, Examples, TextEncoder};
use crate::model::{Loaded, Model, Need, Point};
use crate::{Error, Result};
use std::collections::HashMap;
use std::path::Path;

/// Examples per forward pass. Packing amortizes each layer's weights over more rows (larger
/// BLAS products) and the f64 update of each exact Gram over more tokens: on all-MiniLM-L6-v2,
/// 8 per pass made forward 1.3x and statistics 2.1x faster than one (docs/model-benchmarks.md).
/// A step of `--batch-size B` has `ceil(B / 8)` passes, shared round-robin by the ranks.
pub const EXAMPLES_PER_PASS: usize = 8;

/// Settings of the model source.
#[derive(Clone, Debug)]
pub struct ModelOptions {
    /// JSON key of plain text in `.jsonl` data (`None`: `text`, else `prompt` + `completion`).
    pub text_field: Option<String>,
    /// Tokens per sequence, special tokens included (capped by the model's learned positions).
    pub max_seq_len: usize,
    /// Leave out tokens labelled -100 (prompt tokens).
    pub use_label_mask: bool,
}

/// A model and a data file as a [`Source`].
pub struct ModelSource {
    model: Model,
    loaded: Loaded<Cpu>,
    backend: Cpu,
    encoder: TextEncoder,
    examples: Examples,
    catalog: Catalog,
    /// Catalog input of each (block, point).
    inputs: HashMap<(usize, Point), usize>,
    use_label_mask: bool,
}

impl ModelSource {
    /// Opens the checkpoint, tokenizer and data, and loads the weights.
    pub fn open(model_dir: &Path, data: &Path, opts: &ModelOptions) -> Result<Self> {
        if opts.max_seq_len == 0 {
            return Err(Error::usage("--max-seq-len must be at least 1, found 0"));
        }
        let model = Model::open(model_dir)?;
        let max_len = model
            .config
            .max_positions()
            .map_or(opts.max_seq_len, |m| m.min(opts.max_seq_len));
        let encoder = TextEncoder::open(model_dir, max_len)?;
        let examples = read_examples(data, opts.text_field.as_deref())?;
        let modules = model.modules();
        let layers: Vec<(String, usize, usize)> = modules
            .iter()
            .map(|m| (m.name.clone(), m.in_features, m.out_features))
            .collect();
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut group_of: HashMap<(usize, Point), usize> = HashMap::new();
        for (i, m) in modules.iter().enumerate() {
            let g = *group_of.entry((m.layer, m.point)).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[g].push(i);
        }
        let catalog = Catalog::new(layers, groups);
        let inputs = catalog
            .inputs
            .iter()
            .enumerate()
            .map(|(g, inp)| {
                let m = &modules[inp.members[0]];
                ((m.layer, m.point), g)
            })
            .collect();
        let backend = Cpu;
        let loaded = model.load(&backend, model.layers())?;
        Ok(ModelSource {
            model,
            loaded,
            backend,
            encoder,
            examples,
            catalog,
            inputs,
            use_label_mask: opts.use_label_mask,
        })
    }

    /// The checkpoint.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The examples read from the data file.
    pub fn examples(&self) -> &Examples {
        &self.examples
    }

    /// Tokens per sequence after capping by the model's positions.
    pub fn max_len(&self) -> usize {
        self.encoder.max_len
    }

    /// Runs examples `units` as one packed batch, delivering the needed inputs to `sink`.
    fn run(
        &self,
        units: &[usize],
        need: &Need,
        wanted: &[bool],
        sink: &mut Sink<'_>,
    ) -> Result<()> {
        let ex = &self.examples;
        let what = |u: usize| format!("{}:{}", ex.path.display(), ex.lines[u]);
        let encoded = units
            .iter()
            .map(|&u| self.encoder.encode(&ex.items[u], || what(u)))
            .collect::<Result<Vec<_>>>()?;
        let batch = self
            .model
            .batch(encoded.iter().map(|e| (&e.ids[..], &e.type_ids[..])));
        let keep: Vec<usize> = encoded
            .iter()
            .flat_map(|e| e.labelled.iter())
            .enumerate()
            .filter(|(_, &l)| l || !self.use_label_mask)
            .map(|(i, _)| i)
            .collect();
        if keep.is_empty() {
            return Ok(());
        }
        let (first, last) = (
            ex.lines[units[0]],
            ex.lines[*units.last().expect("non-empty")],
        );
        let modules = self.model.modules();
        let catalog = &self.catalog;
        let be = &self.backend;
        self.loaded
            .forward(be, &batch, need, &mut |layer, point, x| {
                let g = self.inputs[&(layer, point)];
                if !wanted[g] {
                    return Ok(());
                }
                // Every token kept (no label mask hit): hand over the activation itself.
                let copied;
                let rows = match be.host_view(x).filter(|v| v.nrows() == keep.len()) {
                    Some(v) => v,
                    None => {
                        copied = be.rows(x, &keep);
                        copied.view()
                    }
                };
                let name = || {
                    modules
                        .iter()
                        .find(|m| m.layer == layer && m.point == point)
                        .map_or("?", |m| m.name.as_str())
                        .to_string()
                };
                check_finite(rows, || {
                    format!(
                        "model forward, input of {} (examples on lines {first}..={last} of {})",
                        name(),
                        ex.path.display()
                    )
                })?;
                debug_assert_eq!(rows.ncols(), catalog.inputs[g].dim);
                sink(g, rows)
            })
    }
}

impl Source for ModelSource {
    fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    fn units(&self) -> usize {
        self.examples.items.len()
    }

    fn read(&mut self, units: &[usize], wanted: &[bool], sink: &mut Sink<'_>) -> Result<()> {
        let mut need = Need::new(self.model.layers());
        for (&(layer, point), &g) in &self.inputs {
            if wanted[g] {
                need.set(layer, point);
            }
        }
        if need.last().is_none() || units.is_empty() {
            return Ok(());
        }
        // One forward pass per pass of units: the engine groups examples the same way on every
        // world size, so the activations, their f32 Gram products and the adapter are bitwise
        // the same whichever rank reads them.
        self.run(units, &need, wanted, sink)
    }

    fn pass_units(&self) -> usize {
        EXAMPLES_PER_PASS
    }
}
