//! `--model DIR --data FILE`: a HuggingFace checkpoint run forward on tokenized examples. A unit
//! is one example (one line of the data file), so each rank reads only its own examples; the
//! engine hands over [`EXAMPLES_PER_PASS`] consecutive examples at a time, which run as one
//! packed forward pass. The inputs of the linear layers inside the transformer blocks are
//! captured; rows of padding (never materialized: packed sequences attend only within
//! themselves) and of tokens labelled -100 never reach the statistics.
//!
//! Equal-input groups come from the architecture: the layers reading the same capture point of
//! the same block ([`crate::model::Point`]: q/k/v, gate/up, BERT's query/key/value).
//!
//! A pipeline stage loads only its slice of blocks ([`ModelSource::open`] with `blocks`): it
//! starts from the previous stage's hidden state and hands its own to the next
//! ([`Source::read_stage`]); the catalog still lists every layer of the model.

use super::{Hidden, Sink, Source};
use crate::catalog::Catalog;
use crate::device::cpu::Cpu;
use crate::device::cuda::Cuda;
use crate::device::gpu::{CudaOptions, Gpu};
use crate::device::rows::Capture;
use crate::model::text::{read_examples, Examples, TextEncoder};
use crate::model::{Loaded, Model, Need, Point};
use crate::{Error, Result};
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

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

/// Where the weights live and the forward pass runs.
#[allow(clippy::large_enum_variant)] // one per source
enum Resident {
    /// The CPU reference (activations are host matrices: captures are handed over without a copy).
    Cpu(Loaded<Cpu>),
    /// A GPU (`--device cuda`): captured rows are gathered on the device and handed over there
    /// ([`Rows::Device`]); the statistics accumulate on the same GPU ([`Source::device`]).
    Cuda((Arc<Cuda>, Loaded<Cuda>)),
}

/// One packed forward pass: which examples, which inputs reach the sink, and whether the
/// slice's hidden state is returned (the hidden state it starts from, if a previous stage sent
/// one, travels beside it: its type depends on the backend).
#[derive(Clone, Copy)]
struct PassRequest<'a> {
    /// The examples (units), in order.
    units: &'a [usize],
    /// The blocks and capture points the forward pass must reach.
    need: &'a Need,
    /// Per catalog input: whether its rows go to the sink.
    wanted: &'a [bool],
    /// Return the slice's hidden state (for the next stage).
    output: bool,
}

/// A model and a data file as a [`Source`].
pub struct ModelSource {
    model: Model,
    resident: Resident,
    encoder: TextEncoder,
    examples: Examples,
    catalog: Catalog,
    /// Catalog input of each (block, point).
    inputs: HashMap<(usize, Point), usize>,
    use_label_mask: bool,
}

impl ModelSource {
    /// Opens the tokenizer and data for `model` and loads the weights of `blocks` (all of them
    /// for a single stage); the catalog lists every linear layer of the model.
    pub fn open(
        model: Model,
        data: &Path,
        opts: &ModelOptions,
        blocks: Range<usize>,
    ) -> Result<Self> {
        Self::open_on(model, data, opts, blocks, None)
    }

    /// [`ModelSource::open`] on the CPU (`device` `None`) or on the GPU `device` names: the
    /// slice's weights are uploaded once (after a check that they fit).
    pub fn open_on(
        mut model: Model,
        data: &Path,
        opts: &ModelOptions,
        blocks: Range<usize>,
        device: Option<CudaOptions>,
    ) -> Result<Self> {
        if opts.max_seq_len == 0 {
            return Err(Error::usage("--max-seq-len must be at least 1, found 0"));
        }
        let dir = model.checkpoint.dir.clone();
        let max_len = model
            .config
            .max_positions()
            .map_or(opts.max_seq_len, |m| m.min(opts.max_seq_len));
        let encoder = TextEncoder::open(&dir, max_len)?;
        let examples = read_examples(data, opts.text_field.as_deref())?;
        let (catalog, points) = model.catalog();
        let inputs = points
            .into_iter()
            .enumerate()
            .map(|(g, p)| (p, g))
            .collect();
        let resident = match device {
            None => Resident::Cpu(model.load(&Cpu, blocks)?),
            Some(mut o) => {
                o.slice = format!(
                    "blocks {}..{} of {}",
                    blocks.start,
                    blocks.end,
                    model.layers()
                );
                let gpu = Arc::new(Cuda::open(o)?);
                let loaded = model.load(&*gpu, blocks)?;
                gpu.check()?;
                Resident::Cuda((gpu, loaded))
            }
        };
        Ok(ModelSource {
            model,
            resident,
            encoder,
            examples,
            catalog,
            inputs,
            use_label_mask: opts.use_label_mask,
        })
    }

    /// Opens `dir` and loads every block (a single stage).
    pub fn open_dir(dir: &Path, data: &Path, opts: &ModelOptions) -> Result<Self> {
        let model = Model::open(dir)?;
        let blocks = 0..model.layers();
        Self::open(model, data, opts, blocks)
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

    /// Runs the request's examples as one packed batch through the loaded slice (from `input`
    /// if a previous stage sent one), delivering the wanted inputs to `sink` and, if asked,
    /// returning the slice's hidden state.
    fn run(
        &self,
        req: PassRequest<'_>,
        input: Option<Hidden>,
        sink: &mut Sink<'_>,
    ) -> Result<Option<Hidden>> {
        match &self.resident {
            Resident::Cpu(loaded) => {
                let input = input.map(Hidden::into_host).transpose()?;
                let out = self.pass(&Cpu, loaded, &|| Ok(()), req, input, sink)?;
                Ok(out.map(Hidden::Host))
            }
            Resident::Cuda(r) => {
                let (gpu, loaded) = r;
                let input = input.map(|h| h.into_device(gpu)).transpose()?;
                let out = self.pass(&**gpu, loaded, &|| gpu.check(), req, input, sink)?;
                gpu.check()?;
                // The hidden state stays on the GPU: the next stage receives it there.
                Ok(out.map(|x| Hidden::Device {
                    gpu: gpu.clone(),
                    x,
                }))
            }
        }
    }

    /// [`ModelSource::run`] on one backend; `check` reports a device failure recorded by an op
    /// that could not return it (called before each capture reaches the statistics).
    fn pass<B: Capture>(
        &self,
        be: &B,
        loaded: &Loaded<B>,
        check: &dyn Fn() -> Result<()>,
        req: PassRequest<'_>,
        input: Option<B::Tensor>,
        sink: &mut Sink<'_>,
    ) -> Result<Option<B::Tensor>> {
        let PassRequest {
            units,
            need,
            wanted,
            output,
        } = req;
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
        if keep.is_empty() && !output {
            return Ok(None);
        }
        let (first, last) = (
            ex.lines[units[0]],
            ex.lines[*units.last().expect("non-empty")],
        );
        let catalog = &self.catalog;
        if let Some(h) = &input {
            if be.tokens(h) != batch.ids.len() {
                return Err(Error::Comm(format!(
                    "examples on lines {first}..={last}: the previous stage sent {} hidden states for {} tokens",
                    be.tokens(h),
                    batch.ids.len()
                )));
            }
        }
        let kept_token = kept_tokens(&keep, batch.ids.len());
        loaded.forward(
            be,
            &batch,
            need,
            input,
            output,
            &mut |layer, point, x, tokens| {
                let g = self.inputs[&(layer, point)];
                if !wanted[g] || keep.is_empty() {
                    return Ok(());
                }
                let routed;
                let rows_kept = match tokens {
                    None => &keep[..],
                    Some(tokens) => {
                        routed = routed_rows(tokens, &kept_token);
                        if routed.is_empty() {
                            return Ok(());
                        }
                        &routed[..]
                    }
                };
                // Every token kept (no label mask hit): hand over the activation itself; otherwise
                // the kept rows, gathered where the activation is (a GPU's stay on it).
                let captured = be.capture(x, rows_kept);
                check()?;
                let rows = captured.rows();
                // The group's first module at this point (a GPU takes the name at every capture).
                let name = &catalog.layers[catalog.representative(g)].name;
                rows.check_finite(|| {
                    format!(
                        "model forward, input of {name} (examples on lines {first}..={last} of {})",
                        ex.path.display()
                    )
                })?;
                debug_assert_eq!(rows.ncols(), catalog.inputs[g].dim);
                sink(g, rows)
            },
        )
    }
}

/// Whether each of a batch's `tokens` is in `keep` (for routed rows, which name their tokens).
fn kept_tokens(keep: &[usize], tokens: usize) -> Vec<bool> {
    let mut kept = vec![false; tokens];
    for &t in keep {
        kept[t] = true;
    }
    kept
}

/// The rows of an expert's capture (row `j` holds token `tokens[j]`) whose token is kept:
/// the routed rows the statistics see (possibly none).
fn routed_rows(tokens: &[usize], kept: &[bool]) -> Vec<usize> {
    (0..tokens.len()).filter(|&j| kept[tokens[j]]).collect()
}

impl Source for ModelSource {
    fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    fn units(&self) -> usize {
        self.examples.items.len()
    }

    /// An example is cut to the encoder's `max_len` tokens (`--max-seq-len`, at most the model's
    /// positions); label masking only removes rows.
    fn max_unit_tokens(&self) -> Option<usize> {
        Some(self.encoder.max_len)
    }

    fn read(&mut self, units: &[usize], wanted: &[bool], sink: &mut Sink<'_>) -> Result<()> {
        self.read_stage(units, wanted, None, false, sink)
            .map(|_| ())
    }

    fn read_stage(
        &mut self,
        units: &[usize],
        wanted: &[bool],
        input: Option<Hidden>,
        output: bool,
        sink: &mut Sink<'_>,
    ) -> Result<Option<Hidden>> {
        let mut need = Need::new(self.model.layers());
        for (&(layer, point), &g) in &self.inputs {
            if wanted[g] {
                need.set(layer, point);
            }
        }
        if (need.last().is_none() && !output) || units.is_empty() {
            return Ok(None);
        }
        // One forward pass per pass of units: the engine groups examples the same way on every
        // world size, so the activations, their f32 Gram products and the adapter are bitwise
        // the same whichever rank reads them.
        let req = PassRequest {
            units,
            need: &need,
            wanted,
            output,
        };
        self.run(req, input, sink)
    }

    fn pipelined(&self) -> bool {
        true
    }

    fn pass_units(&self) -> usize {
        EXAMPLES_PER_PASS
    }

    fn device(&self) -> Option<Arc<Cuda>> {
        match &self.resident {
            Resident::Cpu(_) => None,
            Resident::Cuda((gpu, _)) => Some(gpu.clone()),
        }
    }
}
