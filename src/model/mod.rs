//! HuggingFace checkpoints: the configuration, the weights, the tokenizer and the architectures'
//! forward passes (written against `device::backend::Backend`, so they run on any backend) that
//! produce the inputs of every linear layer inside the transformer blocks.
//!
//! | module | role |
//! |---|---|
//! | [`config`] | `config.json` → architecture and sizes; supported `model_type`s |
//! | [`checkpoint`] | memory-mapped safetensors (single file or shards), F32/F16/BF16 |
//! | [`decoder`] | llama, mistral, qwen2, mixtral, qwen2_moe |
//! | [`moe`] | mixture-of-experts MLPs: router, routed experts, shared expert |
//! | [`encoder`] | bert, roberta |
//! | [`text`] | `.txt` / `.jsonl` examples and tokenization with the model's `tokenizer.json` |
//!
//! [`Model`] ties them together: [`Model::open`] reads the config and indexes the checkpoint
//! (no shard is opened), [`Model::modules`] lists the linear layers (named by their checkpoint
//! key paths, which are the module paths PEFT sees) with the capture point that feeds each,
//! [`Model::load`] decodes the weights of a slice of blocks (a pipeline stage: only the shards
//! holding them are opened), and [`Loaded::forward`] runs a packed batch through the slice,
//! handing the activations at each needed capture point to a callback and, for the next stage,
//! returning the hidden state.

pub mod checkpoint;
pub mod config;
pub mod decoder;
pub mod encoder;
pub mod moe;
pub mod text;

use crate::catalog::Catalog;
use crate::device::backend::{Backend, Segments};
use crate::{Error, Result};
use checkpoint::Checkpoint;
use config::{Family, ModelConfig};
use std::ops::Range;
use std::path::Path;

/// Where in a block a linear layer reads its input; layers at the same point of the same block
/// read the same tensor (an equal-input group). Points order as the forward pass reaches them
/// (a sparse block's experts after its router input, all gate/up inputs before the down inputs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Point {
    /// The normalized hidden state entering attention (q/k/v; BERT query/key/value).
    AttnIn,
    /// The attention output entering the output projection (o_proj; attention.output.dense).
    AttnOut,
    /// The normalized hidden state entering the MLP (gate/up; intermediate.dense; a sparse
    /// block's router, shared expert and shared-expert gate).
    MlpIn,
    /// The MLP's hidden activation entering the down projection (down_proj; output.dense; a
    /// sparse block's shared expert).
    MlpHidden,
    /// The rows routed to expert `e` of a sparse block, entering its `gate_up_proj`.
    ExpertIn(u32),
    /// `act(gate) · up` of the rows routed to expert `e`, entering its `down_proj`.
    ExpertHidden(u32),
}

impl Point {
    /// The points of a dense block, in forward order.
    pub const ALL: [Point; 4] = [
        Point::AttnIn,
        Point::AttnOut,
        Point::MlpIn,
        Point::MlpHidden,
    ];

    /// The expert a point belongs to, if it is an expert's.
    pub fn expert(self) -> Option<usize> {
        match self {
            Point::ExpertIn(e) | Point::ExpertHidden(e) => Some(e as usize),
            _ => None,
        }
    }
}

/// A layer that is one expert's slice of a 3-D parameter (PEFT's `target_parameters`): the
/// adapter holds one `lora_A` per parameter, `r · experts` rows, expert `e`'s at `e·r..(e+1)·r`.
#[derive(Clone, Debug, PartialEq)]
pub struct ExpertOf {
    /// The parameter's path, e.g. `model.layers.0.mlp.experts.gate_up_proj`.
    pub param: String,
    pub expert: usize,
    pub experts: usize,
}

/// One linear layer inside a transformer block.
#[derive(Clone, Debug, PartialEq)]
pub struct Module {
    /// Checkpoint key without `.weight`, e.g. `model.layers.0.self_attn.q_proj`; an expert's
    /// slice of a parameter is `<param>[e]`.
    pub name: String,
    /// Block index.
    pub layer: usize,
    /// Which tensor feeds it.
    pub point: Point,
    pub in_features: usize,
    pub out_features: usize,
    /// Set when the layer is one expert of a 3-D expert parameter.
    pub expert: Option<ExpertOf>,
}

/// Which capture points a forward pass must deliver.
#[derive(Clone, Debug, Default)]
pub struct Need {
    points: Vec<std::collections::BTreeSet<Point>>,
}

impl Need {
    /// Nothing needed, for `layers` blocks.
    pub fn new(layers: usize) -> Self {
        Need {
            points: vec![Default::default(); layers],
        }
    }

    /// Marks a point as needed.
    pub fn set(&mut self, layer: usize, point: Point) {
        self.points[layer].insert(point);
    }

    /// Whether a point is needed.
    pub fn get(&self, layer: usize, point: Point) -> bool {
        self.points.get(layer).is_some_and(|f| f.contains(&point))
    }

    /// Whether any expert point of `layer` is needed.
    pub fn any_expert(&self, layer: usize) -> bool {
        self.points
            .get(layer)
            .is_some_and(|f| f.iter().any(|p| p.expert().is_some()))
    }

    /// Where a slice's pass may stop: `Some(None)` runs every block (the next stage needs the
    /// output), `Some(Some(p))` stops after the last needed point `p`, `None` has nothing to do.
    pub fn stop(&self, output: bool) -> Option<Option<(usize, Point)>> {
        match (output, self.last()) {
            (true, _) => Some(None),
            (false, Some(last)) => Some(Some(last)),
            (false, None) => None,
        }
    }

    /// The last needed point in forward order, if any.
    pub fn last(&self) -> Option<(usize, Point)> {
        self.points
            .iter()
            .enumerate()
            .rev()
            .find_map(|(l, f)| f.iter().next_back().map(|&p| (l, p)))
    }
}

/// A packed batch of token sequences (no padding: [`Segments`] delimit the sequences).
#[derive(Clone, Debug, Default)]
pub struct Batch {
    /// Token ids, all sequences one after another.
    pub ids: Vec<u32>,
    /// Token type ids (BERT segment ids), same length.
    pub type_ids: Vec<u32>,
    /// Position ids, same length (architecture-specific; see [`Model::batch`]).
    pub positions: Vec<u32>,
    /// Where each sequence lies.
    pub segments: Segments,
}

/// Receives the activation at a capture point of a block: `[tokens, in_features]`, or for an
/// expert's point the rows routed to it, with the batch token of each row (`Some(tokens)`).
pub type Capture<'a, T> = dyn FnMut(usize, Point, &T, Option<&[usize]>) -> Result<()> + 'a;

/// A linear layer's weight `[out, in]` and optional bias.
pub struct Linear<W> {
    pub w: W,
    pub b: Option<W>,
}

impl<W> Linear<W> {
    /// `x Wᵀ + b`.
    pub fn apply<B: Backend<Weight = W>>(&self, be: &B, x: &B::Tensor) -> B::Tensor {
        be.linear(x, &self.w, self.b.as_ref())
    }
}

/// A checkpoint whose configuration is read and whose tensors are indexed (not yet decoded).
pub struct Model {
    /// Parsed `config.json`.
    pub config: ModelConfig,
    /// The mapped safetensors files.
    pub checkpoint: Checkpoint,
    /// Key prefix in front of the base model's tensors (`model.`, `bert.`, `roberta.`,
    /// `model.language_model.`, ... or ``).
    pub prefix: String,
    /// The blocks' module path as PEFT sees it: the key prefix, except for multimodal checkpoints
    /// saved in the older layout (keys `language_model.model.*`, which transformers renames to
    /// the modules `model.language_model.*` when it loads them).
    pub module_prefix: String,
    modules: Vec<Module>,
}

/// A model whose weights are resident on a backend, ready to run.
pub enum Loaded<B: Backend> {
    /// Boxed: the decoder is the larger by far.
    Decoder(Box<decoder::Decoder<B>>),
    Encoder(encoder::Encoder<B>),
}

impl Model {
    /// Reads `config.json`, indexes the checkpoint (no shard opened) and finds the key prefix.
    pub fn open(dir: &Path) -> Result<Self> {
        let checkpoint = Checkpoint::open(dir)?;
        let config = config::load(dir)?;
        let anchor = match config.family {
            Family::Decoder(_) => "embed_tokens.weight",
            Family::Encoder(_) => "embeddings.word_embeddings.weight",
        };
        let prefix = checkpoint.prefix_of(anchor).ok_or_else(|| {
            let mut names = checkpoint.names();
            names.truncate(8);
            Error::data(format!(
                "checkpoint in {}: no tensor named `[prefix.]{anchor}`, so this is not a {} checkpoint (first keys: {})",
                dir.display(),
                config.arch.name(),
                names.join(", ")
            ))
        })?;
        let module_prefix = module_prefix(&config, &prefix);
        let modules = match &config.family {
            Family::Decoder(c) => decoder::modules(c, &module_prefix),
            Family::Encoder(c) => encoder::modules(c, &prefix),
        };
        Ok(Model {
            config,
            checkpoint,
            prefix,
            module_prefix,
            modules,
        })
    }

    /// Every linear layer inside the transformer blocks, in model order.
    pub fn modules(&self) -> &[Module] {
        &self.modules
    }

    /// The modules as a catalog: equal-input groups are the modules at the same capture point of
    /// the same block; an expert's slice of a parameter is tagged with its parameter. Also
    /// returns the (block, point) of each unique input.
    pub fn catalog(&self) -> (Catalog, Vec<(usize, Point)>) {
        let modules = &self.modules;
        let layers = modules
            .iter()
            .map(|m| (m.name.clone(), m.in_features, m.out_features))
            .collect();
        let experts = modules
            .iter()
            .map(|m| {
                m.expert
                    .as_ref()
                    .map(|e| crate::catalog::Param::new(&e.param, e.expert, e.experts))
            })
            .collect();
        let mut groups: Vec<Vec<usize>> = Vec::new();
        let mut group_of = std::collections::HashMap::new();
        for (i, m) in modules.iter().enumerate() {
            let g = *group_of.entry((m.layer, m.point)).or_insert_with(|| {
                groups.push(Vec::new());
                groups.len() - 1
            });
            groups[g].push(i);
        }
        let catalog = Catalog::new(layers, groups).with_params(experts);
        let points = catalog
            .inputs
            .iter()
            .map(|inp| (modules[inp.members[0]].layer, modules[inp.members[0]].point))
            .collect();
        (catalog, points)
    }

    /// Number of transformer blocks.
    pub fn layers(&self) -> usize {
        match &self.config.family {
            Family::Decoder(c) => c.layers,
            Family::Encoder(c) => c.layers,
        }
    }

    /// The block a checkpoint key belongs to, or `None` for a tensor outside the blocks
    /// (embeddings, final norm, head).
    pub fn block_of(&self, name: &str) -> Option<usize> {
        let rest = name.strip_prefix(&self.prefix)?;
        let rest = match &self.config.family {
            Family::Decoder(_) => rest.strip_prefix("layers.")?,
            Family::Encoder(_) => rest.strip_prefix("encoder.layer.")?,
        };
        rest.split('.').next()?.parse().ok()
    }

    /// Whether a checkpoint key is an input embedding (held by the first stage).
    pub fn is_embedding(&self, name: &str) -> bool {
        name.strip_prefix(&self.prefix)
            .is_some_and(|rest| match &self.config.family {
                Family::Decoder(_) => rest == "embed_tokens.weight",
                Family::Encoder(_) => rest.starts_with("embeddings."),
            })
    }

    /// Whether the stage holding `blocks` needs a checkpoint key: its blocks' tensors, and the
    /// embeddings when it starts at block 0.
    pub fn in_slice(&self, name: &str, blocks: &Range<usize>) -> bool {
        match self.block_of(name) {
            Some(b) => blocks.contains(&b),
            None => blocks.start == 0 && self.is_embedding(name),
        }
    }

    /// Parameters of the input embeddings and of each block, from the configuration (no
    /// checkpoint read): what the default pipeline split balances.
    pub fn parameters(&self) -> (u64, Vec<u64>) {
        match &self.config.family {
            Family::Decoder(c) => (
                self.config.vocab as u64 * c.hidden as u64,
                (0..c.layers)
                    .map(|l| decoder::block_parameters(c, l))
                    .collect(),
            ),
            Family::Encoder(c) => (
                encoder::embedding_parameters(c, self.config.vocab),
                vec![encoder::block_parameters(c); c.layers],
            ),
        }
    }

    /// Opens the shards that hold `blocks` (and the embeddings if `blocks` starts at 0) and decodes
    /// those weights onto `be`; no other shard is opened.
    pub fn load<B: Backend>(&mut self, be: &B, blocks: Range<usize>) -> Result<Loaded<B>> {
        let blocks = blocks.start.min(self.layers())..blocks.end.min(self.layers());
        let keep: Vec<String> = self
            .checkpoint
            .names()
            .into_iter()
            .filter(|n| self.in_slice(n, &blocks))
            .map(str::to_string)
            .collect();
        let keep: std::collections::HashSet<String> = keep.into_iter().collect();
        self.checkpoint.load(|n| keep.contains(n))?;
        let (ckpt, prefix) = (&self.checkpoint, &self.prefix);
        Ok(match &self.config.family {
            Family::Decoder(c) => Loaded::Decoder(Box::new(decoder::Decoder::load(
                be,
                c,
                self.config.vocab,
                ckpt,
                prefix,
                blocks,
            )?)),
            Family::Encoder(c) => Loaded::Encoder(encoder::Encoder::load(
                be,
                c,
                self.config.vocab,
                ckpt,
                prefix,
                blocks,
            )?),
        })
    }

    /// Packs tokenized sequences `(ids, type_ids)` into a batch with the architecture's
    /// position ids: `0..n` per sequence (llama family, BERT); RoBERTa's
    /// `padding_idx + cumsum(id != padding_idx)` for real tokens and `padding_idx` for padding
    /// ids (transformers' `create_position_ids_from_input_ids`).
    pub fn batch<'a>(&self, seqs: impl IntoIterator<Item = (&'a [u32], &'a [u32])>) -> Batch {
        let offset = match &self.config.family {
            Family::Encoder(c) => c.position_offset,
            Family::Decoder(_) => None,
        };
        let mut b = Batch::default();
        let mut lengths = Vec::new();
        for (ids, types) in seqs {
            lengths.push(ids.len());
            b.ids.extend_from_slice(ids);
            b.type_ids.extend_from_slice(types);
            match offset {
                None => b.positions.extend(0..ids.len() as u32),
                Some(pad) => {
                    let mut count = 0;
                    for &id in ids {
                        if id == pad {
                            b.positions.push(pad);
                        } else {
                            count += 1;
                            b.positions.push(pad + count);
                        }
                    }
                }
            }
        }
        b.segments = Segments::from_lengths(lengths);
        b
    }
}

/// The module path of the blocks for a checkpoint key prefix: transformers' conversion of
/// multimodal (llava-style, Gemma 3) checkpoints moves `language_model.model.` to
/// `model.language_model.` in `*ForConditionalGeneration` (and to `language_model.` in the bare
/// `*Model`); every other prefix is the module path itself.
fn module_prefix(config: &ModelConfig, prefix: &str) -> String {
    match prefix.strip_suffix("language_model.model.") {
        Some(outer) if config.arch == config::Arch::Gemma3 => {
            if config.class.ends_with("ForConditionalGeneration") {
                format!("{outer}model.language_model.")
            } else {
                format!("{outer}language_model.")
            }
        }
        _ => prefix.to_string(),
    }
}

impl<B: Backend> Loaded<B> {
    /// Runs the loaded slice over `batch`, delivering the needed capture points. `input` is the
    /// hidden state the previous stage returned (`None` on the first stage, which embeds the
    /// tokens). With `output` the whole slice runs and its hidden state is returned for the next
    /// stage; without, the pass stops after the last needed point and returns `None`.
    pub fn forward(
        &self,
        be: &B,
        batch: &Batch,
        need: &Need,
        input: Option<B::Tensor>,
        output: bool,
        capture: &mut Capture<'_, B::Tensor>,
    ) -> Result<Option<B::Tensor>> {
        match self {
            Loaded::Decoder(m) => m.forward(be, batch, need, input, output, capture),
            Loaded::Encoder(m) => m.forward(be, batch, need, input, output, capture),
        }
    }
}
